//! The v1 store's files: checksummed JSON lines, read on two threads
//! (reading, checksumming and parsing on one, indexing on the caller's).

use super::*;

/// A line's checksum: CRC-32 as 8 hex digits. It finds torn writes and
/// damage; integrity against tampering is the seals' job (AES-GCM), and
/// SHA-256 here cost a sixth of opening a store of a million patients.
#[cfg(test)]
fn checksum(payload: &str) -> String {
    format!("{:08x}", crc32fast::hash(payload.as_bytes()))
}

pub(super) struct Loaded {
    pub header: Header,
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
                Parsed::Done => {
                    let header = header.take().ok_or_else(|| corrupt(path, 1, "missing header".into()))?;
                    return Ok(Some(Loaded { header }));
                }
                Parsed::Failed(e) => return Err(e),
            }
        }
        Err(corrupt(path, 0, "the reader stopped unexpectedly".into()))
    })
}

enum Parsed {
    Header(Header),
    Records(Vec<(usize, Ready)>),
    Done,
    Failed(StoreError),
}

/// The reading side of `load`. Sends the header, records in batches, then
/// `Done` or `Failed`; stops early if the receiver has gone.
fn parse_file(path: &Path, file: File, tolerate_torn_tail: bool, tx: &std::sync::mpsc::SyncSender<Parsed>) {
    use std::io::BufRead;
    const BATCH: usize = 1024;
    let corrupt = |line: usize, reason: &str| corrupt(path, line, reason.to_string());
    let fail = |e: StoreError| {
        let _ = tx.send(Parsed::Failed(e));
    };
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut buf = Vec::with_capacity(1024);
    let mut have_header = false;
    let mut batch = Vec::with_capacity(BATCH);
    let mut lineno = 0usize;
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
                return fail(StoreError::Migration {
                    path: path.to_path_buf(),
                    reason: format!(
                        "it is in store format v{}; this fttp-agent migrates format v{VERSION} only",
                        h.version
                    ),
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
                        return fail(tampered(path, Some(lineno))(source));
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
    }
    if !have_header {
        return fail(corrupt(1, "missing header"));
    }
    if !batch.is_empty() && tx.send(Parsed::Records(batch)).is_err() {
        return;
    }
    let _ = tx.send(Parsed::Done);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_checked_by_its_crc_and_an_old_sha256_line_still_reads() {
        let payload = r#"{"t":"batch","data":"AAEC"}"#;
        let line = format!("{} {payload}\n", checksum(payload));
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
