//! The store's files: checksummed JSON lines, written atomically and read
//! back on two threads (reading, checksumming and parsing on one, indexing
//! on the caller's).

use super::*;

/// A line's checksum: CRC-32 as 8 hex digits. It finds torn writes and
/// damage; integrity against tampering is the seals' job (AES-GCM), and
/// SHA-256 here cost a sixth of opening a store of a million patients.
fn checksum(payload: &str) -> String {
    format!("{:08x}", crc32fast::hash(payload.as_bytes()))
}

/// What `push` writes first, for the checksum to replace.
const PLACEHOLDER: &str = "00000000 ";

pub(super) fn push_line<T: Serialize>(buf: &mut String, value: &T) {
    // Serialising our own plain data types cannot fail.
    let payload = serde_json::to_string(value).unwrap_or_default();
    buf.push_str(&checksum(&payload));
    buf.push(' ');
    buf.push_str(&payload);
    buf.push('\n');
}

/// A line to write. The kinds that carry sealed data are written by hand:
/// serde escapes strings byte by byte, and sealed base64 (which never needs
/// escaping) is nearly all of a store. They read back as `DiskRecord`s.
pub(super) enum Line<'a> {
    Patient {
        id: &'a str,
        bf: Option<&'a Index>,
        data: &'a [u8],
        updated: chrono::DateTime<chrono::Utc>,
    },
    Pseudonym {
        bf: &'a Index,
        target: &'a str,
        psn: &'a Index,
        data: &'a [u8],
    },
    /// Sealed records (`DiskRecord::Batch`).
    Batch(Vec<u8>),
    Other(DiskRecord),
}

/// Appends one checksummed line.
pub(super) fn push(buf: &mut String, line: Line<'_>) {
    use base64::Engine;
    let b64 = |buf: &mut String, raw: &[u8]| base64::engine::general_purpose::STANDARD.encode_string(raw, buf);
    // JSON strings of our own plain text cannot fail to serialise.
    let json = |v: &str| serde_json::to_string(v).unwrap_or_default();
    let start = buf.len();
    // The checksum goes in front once the payload is there.
    buf.push_str(PLACEHOLDER);
    match line {
        Line::Patient { id, bf, data, updated } => {
            buf.push_str("{\"t\":\"patient\",\"id\":");
            buf.push_str(&json(id));
            if let Some(bf) = bf {
                buf.push_str(",\"bf\":\"");
                buf.push_str(&index_hex(bf));
                buf.push('"');
            }
            buf.push_str(",\"data\":\"");
            b64(buf, data);
            buf.push_str("\",\"updated\":");
            buf.push_str(&updated.timestamp_millis().to_string());
            buf.push('}');
        }
        Line::Pseudonym { bf, target, psn, data } => {
            buf.push_str("{\"t\":\"pseudonym\",\"bf\":\"");
            buf.push_str(&index_hex(bf));
            buf.push_str("\",\"target\":");
            buf.push_str(&json(target));
            buf.push_str(",\"psn\":\"");
            buf.push_str(&index_hex(psn));
            buf.push_str("\",\"data\":\"");
            b64(buf, data);
            buf.push_str("\"}");
        }
        Line::Batch(sealed) => {
            buf.push_str("{\"t\":\"batch\",\"data\":\"");
            b64(buf, &sealed);
            buf.push_str("\"}");
        }
        Line::Other(r) => {
            buf.truncate(start);
            return push_line(buf, &r);
        }
    }
    let sum = checksum(&buf[start + PLACEHOLDER.len()..]);
    buf.replace_range(start..start + PLACEHOLDER.len() - 1, &sum);
    buf.push('\n');
}

pub(super) struct Loaded {
    pub header: Header,
    /// Bytes up to the end of the last good line.
    pub good_len: u64,
    pub file_len: u64,
}

/// Streams a snapshot or journal, line by line, so that opening a large
/// store never holds the file and its records in memory at once.
/// `on_header` says whether to apply the records; `on_record` applies one.
/// With `tolerate_torn_tail`, a damaged *last* line is left out (it was
/// never acknowledged); otherwise, and anywhere else, damage is fatal.
pub(super) fn load(
    path: &Path,
    tolerate_torn_tail: bool,
    mut on_header: impl FnMut(&Header) -> Result<bool, StoreError>,
    // (with the record's line in the file)
    mut on_record: impl FnMut(usize, Ready) -> Result<(), StoreError>,
) -> Result<Option<Loaded>, StoreError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("read", path)(e)),
    };
    // Reading, checksumming and parsing run on a second thread while this
    // one indexes: opening a large store uses both cores.
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Parsed>(16);
        scope.spawn(move || parse_file(path, file, tolerate_torn_tail, &tx));
        let mut header = None;
        let mut apply = false;
        for msg in rx {
            match msg {
                Parsed::Header(h) => {
                    apply = on_header(&h)?;
                    header = Some(h);
                }
                Parsed::Records(records) => {
                    if apply {
                        for (line, r) in records {
                            on_record(line, r)?;
                        }
                    }
                }
                Parsed::Done { good_len, file_len } => {
                    let header = header.take().ok_or_else(|| StoreError::Corrupt {
                        path: path.to_path_buf(),
                        line: 1,
                        reason: "missing header".into(),
                    })?;
                    return Ok(Some(Loaded {
                        header,
                        good_len,
                        file_len,
                    }));
                }
                Parsed::Failed(e) => return Err(e),
            }
        }
        Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            line: 0,
            reason: "the reader stopped unexpectedly".into(),
        })
    })
}

enum Parsed {
    Header(Header),
    Records(Vec<(usize, Ready)>),
    Done { good_len: u64, file_len: u64 },
    Failed(StoreError),
}

/// The reading side of `load`. Sends the header, records in batches, then
/// `Done` or `Failed`; stops early if the receiver has gone.
fn parse_file(path: &Path, file: File, tolerate_torn_tail: bool, tx: &std::sync::mpsc::SyncSender<Parsed>) {
    use std::io::BufRead;
    const BATCH: usize = 1024;
    let corrupt = |line: usize, reason: &str| StoreError::Corrupt {
        path: path.to_path_buf(),
        line,
        reason: reason.to_string(),
    };
    let fail = |e: StoreError| {
        let _ = tx.send(Parsed::Failed(e));
    };
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut buf = Vec::with_capacity(1024);
    let mut have_header = false;
    let mut batch = Vec::with_capacity(BATCH);
    let (mut lineno, mut offset, mut good_len) = (0usize, 0u64, 0u64);
    let mut torn: Option<(usize, &'static str)> = None;
    loop {
        buf.clear();
        let n = match reader.read_until(b'\n', &mut buf) {
            Ok(n) => n,
            Err(e) => return fail(io("read", path)(e)),
        };
        if n == 0 {
            break;
        }
        if let Some((line, reason)) = torn {
            // The damaged line was not the last: real damage.
            return fail(corrupt(line, reason));
        }
        lineno += 1;
        offset += n as u64;
        let payload = match std::str::from_utf8(&buf).map_err(|_| "not UTF-8").and_then(parse_line) {
            Ok(p) => p,
            Err(reason) if tolerate_torn_tail && have_header => {
                torn = Some((lineno, reason));
                continue;
            }
            Err(reason) => return fail(corrupt(lineno, reason)),
        };
        if !have_header {
            let h: Header = match serde_json::from_str(payload) {
                Ok(h) => h,
                Err(_) => return fail(corrupt(lineno, "bad header")),
            };
            if h.format != FORMAT {
                return fail(corrupt(lineno, &format!("not a {FORMAT} file")));
            }
            if h.version != VERSION {
                return fail(StoreError::Version {
                    path: path.to_path_buf(),
                    found: h.version,
                });
            }
            have_header = true;
            if tx.send(Parsed::Header(h)).is_err() {
                return;
            }
        } else {
            match parse_record(payload) {
                Ok(r) => match r {
                    Ok(r) => batch.push((lineno, r)),
                    Err(source) => {
                        return fail(StoreError::Tampered {
                            path: path.to_path_buf(),
                            line: Some(lineno),
                            source,
                        });
                    }
                },
                Err(_) if tolerate_torn_tail => {
                    torn = Some((lineno, "unreadable record"));
                    continue;
                }
                Err(_) => return fail(corrupt(lineno, "unreadable record")),
            }
            if batch.len() == BATCH && tx.send(Parsed::Records(std::mem::take(&mut batch))).is_err() {
                return;
            }
        }
        good_len = offset;
    }
    if !have_header {
        return fail(corrupt(1, "missing header"));
    }
    if !batch.is_empty() && tx.send(Parsed::Records(batch)).is_err() {
        return;
    }
    let _ = tx.send(Parsed::Done {
        good_len,
        file_len: offset,
    });
}

pub(super) fn parse_line(raw: &str) -> Result<&str, &'static str> {
    // (a checksum mismatch on the last line of a journal is a torn write)
    let line = raw.strip_suffix('\n').ok_or("incomplete line")?;
    let (sum, payload) = line.split_once(' ').ok_or("missing checksum")?;
    let ok = match sum.len() {
        // Compared in place: a million lines are checked at open.
        8 => {
            const DIGITS: &[u8; 16] = b"0123456789abcdef";
            let v = crc32fast::hash(payload.as_bytes());
            (sum.bytes().enumerate()).all(|(i, h)| h == DIGITS[((v >> (28 - 4 * i)) & 15) as usize])
        }
        // Files of store format v3 and older (SHA-256): read as far as
        // their header, so that their version is reported as such.
        16 => sha256_hex(payload.as_bytes()).starts_with(sum),
        _ => false,
    };
    if !ok {
        return Err("checksum mismatch");
    }
    Ok(payload)
}

/// A patient line as `seal` writes it, read with borrowed strings: most of
/// a large store is patients, and the generic record enum (internally
/// tagged) would copy every field first.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatientLine<'a> {
    #[allow(dead_code)]
    t: &'a str,
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    #[serde(default)]
    bf: Option<&'a str>,
    data: &'a str,
    #[serde(with = "chrono::serde::ts_milliseconds")]
    updated: chrono::DateTime<chrono::Utc>,
}

pub(super) fn parse_record(payload: &str) -> Result<Result<Ready, OpenError>, ()> {
    if payload.starts_with("{\"t\":\"patient\",")
        && let Ok(p) = serde_json::from_str::<PatientLine<'_>>(payload)
    {
        let ready = (|| {
            Ok(Ready::Patient {
                id: std::sync::Arc::from(p.id.as_ref()),
                bf: p.bf.map(parse_index).transpose()?,
                data: decode_sealed(p.data, "patient")?,
                updated: p.updated,
            })
        })();
        return Ok(ready);
    }
    serde_json::from_str::<DiskRecord>(payload)
        .map(Ready::from_disk)
        .map_err(|_| ())
}

/// Writes header + records to `name.tmp`, fsyncs, renames over `name`, and
/// fsyncs the directory. Returns the file's length.
pub(super) fn write_atomically<'a>(
    dir: &Path,
    name: &str,
    generation: u64,
    key_id: &str,
    counts: Option<Counts>,
    lines: impl Iterator<Item = Line<'a>>,
) -> Result<u64, StoreError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dest = dir.join(name);
    let mut buf = String::new();
    push_line(
        &mut buf,
        &Header {
            format: FORMAT.into(),
            version: VERSION,
            generation,
            key_id: key_id.to_string(),
            counts,
        },
    );
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("create a temporary file", &tmp))?;
    // Lines are sealed and encoded on this thread while a second one
    // writes the megabyte before: at a compaction after a re-keying
    // (100 MB) the kernel's copy takes as long as the sealing.
    let (full, empty) = std::sync::mpsc::sync_channel::<String>(2);
    let written = std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> Result<u64, (&'static str, std::io::Error)> {
            let mut len = 0u64;
            for chunk in empty {
                file.write_all(chunk.as_bytes()).map_err(|e| ("write", e))?;
                len += chunk.len() as u64;
            }
            file.sync_all().map_err(|e| ("sync", e))?;
            Ok(len)
        });
        for line in lines {
            push(&mut buf, line);
            // (A send fails only once the writer has failed: its join says why.)
            if buf.len() > 1 << 20
                && full
                    .send(std::mem::replace(&mut buf, String::with_capacity(3 << 20)))
                    .is_err()
            {
                break;
            }
        }
        let _ = full.send(buf);
        drop(full);
        writer.join()
    });
    // (A panic in the writer is a bug: it goes on as a panic.)
    let len = written
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        .map_err(|(op, e)| io(op, &tmp)(e))?;
    if name == SNAPSHOT {
        crate::crashpoint::hit("snapshot:tmp");
    }
    std::fs::rename(&tmp, &dest).map_err(io("rename into place", &dest))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync the store directory", dir))?;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_checked_by_its_crc_and_an_old_sha256_line_still_reads() {
        let payload = r#"{"t":"batch","data":"AAEC"}"#;
        let mut line = String::new();
        push_line(&mut line, &serde_json::from_str::<DiskRecord>(payload).unwrap());
        let (sum, _) = line.split_once(' ').unwrap();
        assert_eq!(sum, format!("{:08x}", crc32fast::hash(payload.as_bytes())));
        assert_eq!(parse_line(&line), Ok(payload));
        // One byte changed anywhere: refused.
        for at in 0..line.len() - 1 {
            let mut bytes = line.clone().into_bytes();
            bytes[at] ^= 1;
            let changed = String::from_utf8(bytes).unwrap();
            assert!(parse_line(&changed).is_err(), "{changed}");
        }
        // Upper-case digits are not what is written.
        assert!(parse_line(&line.to_uppercase()).is_err());
        // Store format v3 and older: 16 hex digits of SHA-256.
        let old = format!("{} {payload}\n", &sha256_hex(payload.as_bytes())[..16]);
        assert_eq!(parse_line(&old), Ok(payload));
        assert!(parse_line(&format!("{} {payload}\n", &sha256_hex(b"x")[..16])).is_err());
        assert!(parse_line(&format!("{payload}\n")).is_err());
    }
}
