//! The audit log: NDJSON, one record per task outcome and one per poll,
//! for trust-centre operators. Records name tasks by taskId or content
//! hash and patients by fingerprint; they never hold IDAT, API keys or raw
//! Bloom filters.

use chrono::{SecondsFormat, Utc};
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("audit log {path}: cannot {op}: {source}")]
pub struct AuditError {
    pub path: PathBuf,
    pub op: &'static str,
    pub source: std::io::Error,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct AuditRecord {
    /// RFC 3339, UTC.
    pub ts: String,
    /// `poll`, or the task kind.
    pub kind: String,
    /// taskId, or the first characters of the task's content hash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    pub outcome: String,
    pub target: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// Fingerprint of the local patient concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    /// Fingerprint of the Bloom filter concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bloomfilter: Option<String>,
    /// IDAT element codes requested (send_idat).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub elements: Vec<String>,
    /// Requested element codes the store had no value for.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
    /// Number of tasks received (poll records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tasks: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// `sha256` or `hmac-sha256`: how `hash` is computed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chain: Option<String>,
    /// `hash` of the previous record (64 zeros for the first one ever).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prev: Option<String>,
    /// Hash of this record's canonical JSON (without `hash`), set on write.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
}

impl AuditRecord {
    pub fn new(kind: &str, outcome: &str, target: &str) -> Self {
        AuditRecord {
            ts: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            kind: kind.to_string(),
            outcome: outcome.to_string(),
            target: target.to_string(),
            ..Default::default()
        }
    }
}

/// How records are chained: plain SHA-256, or HMAC-SHA256 under a key so
/// that whoever can write the file cannot forge a consistent chain.
pub enum Chain {
    Sha256,
    Hmac(ring::hmac::Key),
}

impl Chain {
    /// HMAC-SHA256 keyed by a key file in the store key's format (`keygen`).
    pub fn hmac_from_file(path: &Path) -> Result<Chain, crate::crypto::KeyError> {
        let bytes = crate::crypto::read_key_bytes(path)?;
        Ok(Chain::Hmac(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            bytes.as_ref(),
        )))
    }

    fn name(&self) -> &'static str {
        match self {
            Chain::Sha256 => "sha256",
            Chain::Hmac(_) => "hmac-sha256",
        }
    }

    fn hash(&self, canonical: &[u8]) -> String {
        match self {
            Chain::Sha256 => crate::privacy::sha256_hex(canonical),
            Chain::Hmac(k) => crate::privacy::hex(ring::hmac::sign(k, canonical).as_ref()),
        }
    }
}

/// `prev` of the very first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The audit log of one run. Records are serialised, chained and written
/// on a thread of their own: at a re-keying that is 100,000 records a
/// cycle, a tenth of the agent's own work, and it need not wait. Order is
/// kept (one queue), `written` counts the records written out to the file,
/// `write_out` and `sync` wait for everything before them, and a failed
/// write is reported by a later `write` (a bunch later) or `sync`.
pub struct Audit {
    path: PathBuf,
    /// Records not yet handed to the writer thread: they go in bunches,
    /// since waking it for each one cost the agent more than the writing.
    bunch: Vec<AuditRecord>,
    queue: Option<std::sync::mpsc::SyncSender<Job>>,
    worker: Option<std::thread::JoinHandle<()>>,
    /// The first failure of the writer thread (later records are dropped:
    /// the file may end in half a line, and the chain must not skip it).
    failed: std::sync::Arc<std::sync::Mutex<Option<Failure>>>,
    /// Records taken by `write` so far.
    accepted: u64,
    /// Records the writer thread has handed to the kernel (written out of
    /// its buffer): they survive the process being killed.
    written: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// What failed on the writer thread: the operation and the error (kept as
/// kind and text, to be reported more than once).
type Failure = (&'static str, std::io::ErrorKind, String);

enum Job {
    Records(Vec<AuditRecord>),
    /// Replies once every record before it is written out of the buffer
    /// and, with `durable`, fsynced.
    Sync {
        durable: bool,
        reply: std::sync::mpsc::SyncSender<Result<(), (&'static str, std::io::Error)>>,
    },
}

/// Bunches queued for the writer thread before `write` waits for it. Kept
/// small: the agent stores an outcome only once its record is out of this
/// queue and the writer's buffer (`written`), so a long queue would hold
/// outcomes back.
const QUEUE: usize = 2;

/// Records in a bunch.
const BUNCH: usize = 128;

/// The file and the chain's head: the writer thread's.
struct Writer {
    path: PathBuf,
    /// Buffered: a record is never split across writes (BufWriter flushes
    /// before a record that does not fit), and `sync` flushes and fsyncs.
    file: std::io::BufWriter<File>,
    chain: Chain,
    last: String,
}

/// The sidecar that remembers the chain's head across log rotation.
fn head_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".head");
    path.with_file_name(name)
}

/// The `hash` of the last complete record of `path`, if any.
fn last_hash(path: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let from = len.saturating_sub(64 * 1024);
    f.seek(SeekFrom::Start(from)).ok()?;
    let mut tail = String::new();
    f.read_to_string(&mut tail).ok()?;
    tail.lines().rev().find_map(|l| {
        serde_json::from_str::<serde_json::Value>(l)
            .ok()?
            .get("hash")?
            .as_str()
            .map(str::to_string)
    })
}

impl Audit {
    pub fn open(path: &Path, chain: Chain) -> Result<Audit, AuditError> {
        let err = |op| {
            move |source| AuditError {
                path: path.to_path_buf(),
                op,
                source,
            }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(err("create its directory"))?;
        }
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(err("open"))?;
        // Continue the chain: from this file's last record, or, in a file
        // freshly started by log rotation, from the head remembered before.
        let last = last_hash(path)
            .or_else(|| {
                std::fs::read_to_string(head_path(path))
                    .ok()
                    .map(|s| s.trim().to_string())
                    .filter(|s| s.len() == 64)
            })
            .unwrap_or_else(|| GENESIS.to_string());
        Audit::start(path, file, chain, last)
    }

    /// Starts the writer thread on an open file whose chain head is `last`.
    fn start(path: &Path, file: File, chain: Chain, last: String) -> Result<Audit, AuditError> {
        let mut writer = Writer {
            path: path.to_path_buf(),
            file: std::io::BufWriter::with_capacity(64 * 1024, file),
            chain,
            last,
        };
        let failed = std::sync::Arc::new(std::sync::Mutex::new(None));
        let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (queue, jobs) = std::sync::mpsc::sync_channel(QUEUE);
        let report = failed.clone();
        let out = written.clone();
        let worker = std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || {
                let mut broken = false;
                let mut done = 0u64;
                for job in jobs {
                    match job {
                        Job::Records(records) => {
                            let n = records.len() as u64;
                            for rec in records {
                                if broken {
                                    break;
                                }
                                if let Err(e) = writer.append(rec) {
                                    *crate::lock(&report) = Some(("append", e.kind(), e.to_string()));
                                    broken = true;
                                }
                            }
                            // Each bunch leaves the buffer at once, so that the
                            // agent can tell which outcomes are audited.
                            if !broken && let Err(e) = writer.file.flush() {
                                *crate::lock(&report) = Some(("append", e.kind(), e.to_string()));
                                broken = true;
                            }
                            if !broken {
                                done += n;
                                out.store(done, std::sync::atomic::Ordering::Release);
                            }
                        }
                        Job::Sync { durable, reply } => {
                            let result = if durable {
                                writer.sync()
                            } else {
                                writer.file.flush().map_err(|e| ("write", e))
                            };
                            let _ = reply.send(result);
                        }
                    }
                }
            })
            .map_err(|source| AuditError {
                path: path.to_path_buf(),
                op: "start its writer thread",
                source,
            })?;
        Ok(Audit {
            path: path.to_path_buf(),
            bunch: Vec::with_capacity(BUNCH),
            queue: Some(queue),
            worker: Some(worker),
            failed,
            accepted: 0,
            written,
        })
    }

    /// Records taken by `write` so far (a record's number is this count
    /// right after its `write`).
    pub fn accepted(&self) -> u64 {
        self.accepted
    }

    /// Records written out to the file so far: they survive the process
    /// being killed (not a power loss: `sync` makes them durable).
    pub fn written(&self) -> u64 {
        self.written.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Hands the records taken so far to the writer thread, without
    /// waiting for it; `written` then catches up.
    pub fn push(&mut self) -> Result<(), AuditError> {
        self.check()?;
        self.hand_over()
    }

    /// Waits until every record taken so far is written out to the file
    /// (not fsynced).
    pub fn write_out(&mut self) -> Result<(), AuditError> {
        self.wait(false)
    }

    /// Queues one record (written as one line, in one write, so concurrent
    /// readers never see half a record, with its `chain`, `prev` and
    /// `hash`). Fails if an earlier record could not be written (noticed
    /// a bunch of records later, or at `sync`).
    pub fn write(&mut self, rec: AuditRecord) -> Result<(), AuditError> {
        self.bunch.push(rec);
        self.accepted += 1;
        if self.bunch.len() < BUNCH {
            return Ok(());
        }
        self.check()?;
        self.hand_over()
    }

    /// Hands the bunch to the writer thread.
    fn hand_over(&mut self) -> Result<(), AuditError> {
        if self.bunch.is_empty() {
            return Ok(());
        }
        let bunch = std::mem::replace(&mut self.bunch, Vec::with_capacity(BUNCH));
        match self.queue.as_ref().map(|q| q.send(Job::Records(bunch))) {
            Some(Ok(())) => Ok(()),
            _ => Err(self.gone()),
        }
    }

    /// Makes every record written so far durable and remembers the chain's
    /// head for a rotated successor file.
    pub fn sync(&mut self) -> Result<(), AuditError> {
        self.wait(true)
    }

    /// Waits for everything before to be written out, and with `durable`
    /// fsynced with the chain's head remembered.
    fn wait(&mut self, durable: bool) -> Result<(), AuditError> {
        self.hand_over()?;
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        let sent = self.queue.as_ref().map(|q| q.send(Job::Sync { durable, reply }));
        let synced = match sent {
            Some(Ok(())) => answer.recv().map_err(|_| self.gone())?,
            _ => return Err(self.gone()),
        };
        self.check()?;
        synced.map_err(|(op, source)| AuditError {
            path: self.path.clone(),
            op,
            source,
        })
    }

    /// The writer thread's first failure, if any.
    fn check(&self) -> Result<(), AuditError> {
        match &*crate::lock(&self.failed) {
            None => Ok(()),
            Some((op, kind, message)) => Err(AuditError {
                path: self.path.clone(),
                op,
                source: std::io::Error::new(*kind, message.clone()),
            }),
        }
    }

    /// The writer thread has ended (only by a panic: a bug).
    fn gone(&self) -> AuditError {
        AuditError {
            path: self.path.clone(),
            op: "append",
            source: std::io::Error::other("the audit writer thread has stopped"),
        }
    }
}

impl Drop for Audit {
    /// Writes what is queued (buffered records reach the file, as a
    /// BufWriter's would; `sync` is what makes them durable).
    fn drop(&mut self) {
        let _ = self.hand_over();
        drop(self.queue.take());
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Writer {
    fn append(&mut self, mut rec: AuditRecord) -> std::io::Result<()> {
        rec.chain = Some(self.chain.name().to_string());
        rec.prev = Some(std::mem::take(&mut self.last));
        rec.hash = None;
        let canonical = serde_json::to_string(&rec).unwrap_or_default();
        let hash = self.chain.hash(canonical.as_bytes());
        // `hash` is the last field: the line is the canonical form plus it.
        let mut line = canonical;
        line.pop();
        line.push_str(",\"hash\":\"");
        line.push_str(&hash);
        line.push_str("\"}\n");
        self.last = hash;
        self.file.write_all(line.as_bytes())
    }

    fn sync(&mut self) -> Result<(), (&'static str, std::io::Error)> {
        self.file.flush().map_err(|e| ("write", e))?;
        self.file.get_ref().sync_data().map_err(|e| ("sync", e))?;
        crate::fsutil::write_atomic(&head_path(&self.path), self.last.as_bytes(), 0o600)
            .map_err(|e| ("record the chain head", e))
    }
}

/// What `audit verify` found.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Every record is intact and linked; the count, and the `prev` the
    /// first record continues from (the last hash of a rotated predecessor).
    Intact { records: usize, continues_from: String },
    /// The first problem: file, 1-based line, what is wrong.
    Broken { file: PathBuf, line: usize, reason: String },
}

/// Checks one audit file, or several in rotation order (oldest first), as
/// one chain. With an HMAC chain the key is needed.
pub fn verify(files: &[PathBuf], key: Option<&Chain>) -> Result<Verdict, AuditError> {
    let mut prev: Option<String> = None;
    let mut first_prev = None;
    let mut count = 0;
    let mut seen: Vec<String> = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).map_err(|source| AuditError {
            path: file.clone(),
            op: "read",
            source,
        })?;
        for (i, line) in text.lines().enumerate() {
            let broken = |reason: String| Verdict::Broken {
                file: file.clone(),
                line: i + 1,
                reason,
            };
            let Ok(serde_json::Value::Object(mut map)) = serde_json::from_str::<serde_json::Value>(line) else {
                return Ok(broken("not a JSON record (edited or truncated)".into()));
            };
            let hash = map.remove("hash").and_then(|h| h.as_str().map(str::to_string));
            let rec_prev = map.get("prev").and_then(|h| h.as_str()).map(str::to_string);
            let (Some(hash), Some(rec_prev)) = (hash, rec_prev) else {
                return Ok(broken(
                    "record without prev/hash (not written by fttp-agent, or edited)".into(),
                ));
            };
            let chain_name = map.get("chain").and_then(|c| c.as_str()).unwrap_or("sha256");
            let sha;
            let chain = match (chain_name, key) {
                ("hmac-sha256", Some(k @ Chain::Hmac(_))) => k,
                ("hmac-sha256", _) => {
                    return Ok(broken(
                        "the chain is keyed (hmac-sha256): give the audit HMAC key".into(),
                    ));
                }
                _ => {
                    sha = Chain::Sha256;
                    &sha
                }
            };
            let canonical = serde_json::to_string(&map).unwrap_or_default();
            if chain.hash(canonical.as_bytes()) != hash {
                return Ok(broken(
                    "this record was edited (its hash does not match its content)".into(),
                ));
            }
            match &prev {
                None => first_prev = Some(rec_prev.clone()),
                Some(p) if *p != rec_prev => {
                    let reason = if seen.contains(&rec_prev) {
                        "records before this line were removed or reordered"
                    } else if rec_prev == hash {
                        "this record links to itself"
                    } else {
                        "this record was inserted, or records before it were removed"
                    };
                    return Ok(broken(reason.into()));
                }
                Some(_) => {}
            }
            seen.push(hash.clone());
            prev = Some(hash);
            count += 1;
        }
    }
    Ok(Verdict::Intact {
        records: count,
        continues_from: first_prev.unwrap_or_else(|| GENESIS.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: usize) -> AuditRecord {
        let mut rec = AuditRecord::new("repeat_request", "stored", "dic_test");
        rec.task = Some(format!("{n:019}"));
        rec
    }

    /// A fresh audit log in a temporary directory, `n` records written.
    fn with_records(n: usize) -> (tempfile::TempDir, Audit) {
        let dir = tempfile::tempdir().unwrap();
        let mut audit = Audit::open(&dir.path().join("audit.ndjson"), Chain::Sha256).unwrap();
        for i in 0..n {
            audit.write(record(i)).unwrap();
        }
        (dir, audit)
    }

    #[test]
    fn records_are_written_in_order_and_chained_by_the_writer_thread() {
        let (dir, mut audit) = with_records(10_000);
        let path = dir.path().join("audit.ndjson");
        audit.sync().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let tasks: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["task"].to_string())
            .collect();
        assert_eq!(tasks, (0..10_000).map(|n| format!("\"{n:019}\"")).collect::<Vec<_>>());
        assert_eq!(
            verify(std::slice::from_ref(&path), None).unwrap(),
            Verdict::Intact {
                records: 10_000,
                continues_from: GENESIS.into()
            }
        );
        // The head is remembered for a rotated successor, and a reopened
        // log continues the chain.
        let head = std::fs::read_to_string(head_path(&path)).unwrap();
        drop(audit);
        let mut audit = Audit::open(&path, Chain::Sha256).unwrap();
        audit.write(record(10_000)).unwrap();
        drop(audit);
        let text = std::fs::read_to_string(&path).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["prev"], head.as_str());
        assert!(matches!(
            verify(std::slice::from_ref(&path), None).unwrap(),
            Verdict::Intact { records: 10_001, .. }
        ));
    }

    #[test]
    fn written_counts_the_records_out_of_the_writers_buffer() {
        let (dir, mut audit) = with_records(300);
        let path = dir.path().join("audit.ndjson");
        assert_eq!(audit.accepted(), 300);
        // Two bunches were handed over by `write`; the rest waits.
        assert!(audit.written() <= 2 * BUNCH as u64);
        audit.write_out().unwrap();
        assert_eq!(audit.written(), 300);
        // Out of the buffer means in the file, for any other process.
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 300);
        audit.write(record(300)).unwrap();
        audit.push().unwrap();
        let start = std::time::Instant::now();
        while audit.written() < 301 {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "never written out"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 301);
    }

    #[test]
    fn a_failed_write_on_the_writer_thread_is_reported_by_the_next_write_or_sync() {
        // /dev/full takes the open and fails every write (ENOSPC).
        let full = OpenOptions::new().write(true).open("/dev/full").unwrap();
        let mut audit = Audit::start(Path::new("/dev/full"), full, Chain::Sha256, GENESIS.into()).unwrap();
        // More than the writer's buffer: its flush fails while records
        // are still being queued; a later write says so.
        let refused = (0..20_000).find_map(|n| audit.write(record(n)).err());
        let err = refused.or_else(|| audit.sync().err()).expect("the failure is reported");
        assert_eq!(err.op, "append");
        assert_eq!(err.source.kind(), std::io::ErrorKind::StorageFull, "{err}");
        // And from then on, every time.
        assert!(audit.write(record(0)).is_err());
        assert!(audit.sync().is_err());
    }
}
