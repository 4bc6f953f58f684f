//! The audit log: NDJSON, one record per task outcome and one per poll,
//! for trust-centre operators. Records name tasks by taskId or content
//! hash and patients by fingerprint; they never hold IDAT, API keys or raw
//! Bloom filters.

use crate::vocab::{AuditKind, Outcome};
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

impl AuditError {
    pub fn exit_code(&self) -> u8 {
        crate::exit::IO
    }
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
    /// The study the record belongs to (absent in records from before
    /// several studies, and in site-wide ones).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub study: Option<String>,
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
    /// The record's number in the chain, 1 for the first record ever: a
    /// reader sees how many records came before, and a gap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// `sha256` or `hmac-sha256`: how `hash` is computed (one per log).
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
    pub(crate) fn set_outcome(&mut self, outcome: Outcome) {
        self.outcome = outcome.as_str().to_string();
    }

    pub fn new(kind: impl Into<AuditKind>, outcome: Outcome, target: &str) -> Self {
        AuditRecord {
            ts: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            kind: kind.into().as_str().to_string(),
            outcome: outcome.as_str().to_string(),
            target: target.to_string(),
            ..Default::default()
        }
    }

    /// The record, for `study`.
    pub(crate) fn in_study(mut self, study: &str) -> Self {
        self.study = Some(study.to_string());
        self
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
    pub(crate) fn hmac_from_file(path: &Path) -> Result<Chain, crate::crypto::KeyError> {
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
    /// The two sides of the cross-check with the store (see `Links`).
    links: Links,
}

/// What the audit log and the store tell each other, so that a copy of
/// either restored alone (a backup, a rolled-back disk) is noticed: the
/// store's generation as of the last durable sync goes into the saved head
/// (`store=N`), and the last record number made durable goes into the
/// store's sealed manifest at its next write. Both only lag behind what is
/// on disk, never lead, so a crash between the two never looks like a
/// rollback.
#[derive(Clone, Default)]
pub(crate) struct Links {
    /// The store's generation, as the store last committed it (raised only).
    pub store_generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The number of the last record made durable (0: none numbered yet).
    pub durable_seq: std::sync::Arc<std::sync::atomic::AtomicU64>,
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
    /// The number of the last record written (`None`: continuing a log
    /// from before records were numbered; its records stay unnumbered).
    seq: Option<u64>,
    links: Links,
}

/// The sidecar that remembers the chain's head across log rotation.
fn head_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(std::ffi::OsStr::to_os_string).unwrap_or_default();
    name.push(".head");
    path.with_file_name(name)
}

/// Where a chain stands: the hash of its last record and that record's
/// number (none in logs written before records were numbered).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Head {
    pub hash: String,
    pub seq: Option<u64>,
    /// The store's generation at that sync (heads saved before the store
    /// kept one have none).
    pub store_generation: Option<u64>,
}

impl Head {
    fn describe(&self) -> String {
        let short: String = self.hash.chars().take(12).collect();
        match self.seq {
            Some(n) => format!("record {n} ({short}…)"),
            None => format!("the record {short}…"),
        }
    }
}

/// The head saved beside `path` at its last sync: `hash [seq]`.
pub(crate) fn saved_head(path: &Path) -> Option<Head> {
    let text = std::fs::read_to_string(head_path(path)).ok()?;
    let mut words = text.split_whitespace();
    let hash = words
        .next()
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))?;
    let seq = words.next().and_then(|n| n.parse().ok());
    let store_generation = words
        .next()
        .and_then(|w| w.strip_prefix("store="))
        .and_then(|n| n.parse().ok());
    Some(Head {
        hash: hash.to_string(),
        seq,
        store_generation,
    })
}

/// The last complete record of `path`, if any.
fn last_record(path: &Path) -> Option<Head> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let from = len.saturating_sub(64 * 1024);
    f.seek(SeekFrom::Start(from)).ok()?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).ok()?;
    let tail = String::from_utf8_lossy(&tail);
    tail.lines().rev().find_map(|l| {
        let v = serde_json::from_str::<serde_json::Value>(l).ok()?;
        Some(Head {
            hash: v.get("hash")?.as_str()?.to_string(),
            seq: v.get("seq").and_then(serde_json::Value::as_u64),
            store_generation: None,
        })
    })
}

/// Whether the record with `hash` is in `path`, searched from the end (the
/// saved head is at most a cycle's records before the end).
fn holds_record(path: &Path, hash: &str) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    const CHUNK: u64 = 1 << 20;
    let needle = format!("\"hash\":\"{hash}\"");
    let mut f = File::open(path)?;
    let mut end = f.metadata()?.len();
    let mut buf = Vec::new();
    while end > 0 {
        // Chunks overlap by the needle's length, so no match is split.
        let start = end.saturating_sub(CHUNK);
        f.seek(SeekFrom::Start(start))?;
        buf.clear();
        let want = (end - start + needle.len() as u64).min(f.metadata()?.len() - start);
        (&mut f).take(want).read_to_end(&mut buf)?;
        if buf.windows(needle.len()).any(|w| w == needle.as_bytes()) {
            return Ok(true);
        }
        end = start;
    }
    Ok(false)
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
        // freshly started by log rotation, from the head saved before. A
        // file that does not hold its saved head was cut short or replaced:
        // appending to it would hide that, so the agent stops.
        let saved = saved_head(path);
        let last = match (last_record(path), saved) {
            (Some(last), Some(saved)) => {
                if last.hash != saved.hash && !holds_record(path, &saved.hash).map_err(err("read"))? {
                    return Err(AuditError {
                        path: path.to_path_buf(),
                        op: "continue its chain",
                        source: std::io::Error::other(format!(
                            "it does not hold its saved head, {} (in {}): records were cut off the end or the \
                             file was replaced. Check it with `fttp-agent audit verify`, restore it from a backup, \
                             or move it aside after review (the agent then starts a new file continuing the saved head)",
                            saved.describe(),
                            head_path(path).display()
                        )),
                    });
                }
                last
            }
            (Some(last), None) => last,
            (None, Some(saved)) => saved,
            (None, None) => Head {
                hash: GENESIS.to_string(),
                seq: Some(0),
                store_generation: None,
            },
        };
        let links = Links::default();
        if let Some(saved) = saved_head(path) {
            use std::sync::atomic::Ordering;
            links
                .store_generation
                .store(saved.store_generation.unwrap_or(0), Ordering::Release);
            links.durable_seq.store(saved.seq.unwrap_or(0), Ordering::Release);
        }
        Audit::start(path, file, chain, last, links)
    }

    /// Starts the writer thread on an open file whose chain head is `last`.
    fn start(path: &Path, file: File, chain: Chain, last: Head, links: Links) -> Result<Audit, AuditError> {
        let mut writer = Writer {
            path: path.to_path_buf(),
            file: std::io::BufWriter::with_capacity(64 * 1024, file),
            chain,
            last: last.hash,
            seq: last.seq,
            links: links.clone(),
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
            links,
        })
    }

    /// The links the store follows (`Store::link_audit`).
    pub(crate) fn links(&self) -> Links {
        self.links.clone()
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
    pub(crate) fn write_out(&mut self) -> Result<(), AuditError> {
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
        self.seq = self.seq.map(|n| n + 1);
        rec.seq = self.seq;
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
        use std::sync::atomic::Ordering;
        let generation = self.links.store_generation.load(Ordering::Acquire);
        let head = match self.seq {
            Some(n) if generation > 0 => format!("{} {n} store={generation}\n", self.last),
            Some(n) => format!("{} {n}\n", self.last),
            None => format!("{}\n", self.last),
        };
        crate::fsutil::write_atomic(&head_path(&self.path), head.as_bytes(), 0o600)
            .map_err(|e| ("record the chain head", e))?;
        if let Some(n) = self.seq {
            self.links.durable_seq.fetch_max(n, Ordering::AcqRel);
        }
        Ok(())
    }
}

/// What `audit verify` found.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Every record is intact and linked; the count, the `prev` the first
    /// record continues from (the last hash of a rotated predecessor, with
    /// `--partial`), and how many records follow the saved head (written
    /// after the last sync; `None` without a saved head).
    Intact {
        records: usize,
        continues_from: String,
        after_head: Option<usize>,
    },
    /// The first problem: file, 1-based line, what is wrong.
    Broken { file: PathBuf, line: usize, reason: String },
}

/// Checks one audit file, or several in rotation order (oldest first), as
/// one chain. The algorithm is the first record's and fixed for the log;
/// with a key every record must be keyed. Unless `partial`, the chain must
/// start at the first record ever; and it must hold the head saved beside
/// the last file (records cut off the end).
pub fn verify(files: &[PathBuf], key: Option<&Chain>, partial: bool) -> Result<Verdict, AuditError> {
    let verdict = verify_chain(files, key, partial)?;
    // A break may be rotated files given newest first: then say so (looked
    // at only after a break, so an intact log is read once).
    if matches!(verdict, Verdict::Broken { .. })
        && let Some(order) = rotation_order(files)
    {
        let names: Vec<String> = order.iter().map(|f| f.display().to_string()).collect();
        return Ok(Verdict::Broken {
            file: files[0].clone(),
            line: 1,
            reason: format!(
                "the files are given in the wrong order: give them oldest first ({})",
                names.join(", ")
            ),
        });
    }
    Ok(verdict)
}

fn verify_chain(files: &[PathBuf], key: Option<&Chain>, partial: bool) -> Result<Verdict, AuditError> {
    let mut prev: Option<String> = None;
    let mut prev_seq: Option<u64> = None;
    let mut algorithm: Option<String> = None;
    let mut first_prev = None;
    let mut count = 0;
    let mut seen: Vec<String> = Vec::new();
    let sha = Chain::Sha256;
    // Lines of the last file read: where a cut-off end shows.
    let mut last_lines = 0;
    for file in files {
        let text = std::fs::read_to_string(file).map_err(|source| AuditError {
            path: file.clone(),
            op: "read",
            source,
        })?;
        last_lines = text.lines().count();
        for (i, line) in text.lines().enumerate() {
            let broken = |reason: String| Verdict::Broken {
                file: file.clone(),
                line: i + 1,
                reason,
            };
            let mut map = match crate::fhir::json::parse_strict(line.as_bytes()) {
                Ok(serde_json::Value::Object(map)) => map,
                Err(e) if crate::fhir::json::is_duplicate_key(&e) => {
                    return Ok(broken(
                        "a field appears twice in this record (readers could disagree on its value)".into(),
                    ));
                }
                _ => return Ok(broken("not a JSON record (edited or truncated)".into())),
            };
            let hash = map.remove("hash").and_then(|h| h.as_str().map(str::to_string));
            let rec_prev = map.get("prev").and_then(|h| h.as_str()).map(str::to_string);
            let (Some(hash), Some(rec_prev)) = (hash, rec_prev) else {
                return Ok(broken(
                    "record without prev/hash (not written by fttp-agent, or edited)".into(),
                ));
            };
            let Some(name) = map.get("chain").and_then(|c| c.as_str()).map(str::to_string) else {
                return Ok(broken("record without its chain algorithm (edited)".into()));
            };
            match &algorithm {
                None => {
                    if key.is_some() && name != "hmac-sha256" {
                        return Ok(broken(format!(
                            "the log is chained with {name}, but a key was given: a keyed log rewritten \
                             without the key, or the wrong log"
                        )));
                    }
                    algorithm = Some(name.clone());
                }
                Some(a) if *a != name => {
                    return Ok(broken(format!(
                        "the chain's algorithm changes here ({a} before, {name} here): records were replaced"
                    )));
                }
                Some(_) => {}
            }
            let chain = match (name.as_str(), key) {
                ("hmac-sha256", Some(k @ Chain::Hmac(_))) => k,
                ("hmac-sha256", _) => {
                    return Ok(broken(
                        "the chain is keyed (hmac-sha256): give the audit HMAC key".into(),
                    ));
                }
                ("sha256", _) => &sha,
                _ => return Ok(broken("unknown chain algorithm".into())),
            };
            let canonical = serde_json::to_string(&map).unwrap_or_default();
            if chain.hash(canonical.as_bytes()) != hash {
                return Ok(broken(
                    "this record was edited (its hash does not match its content)".into(),
                ));
            }
            let seq = map.get("seq").and_then(serde_json::Value::as_u64);
            match &prev {
                None => {
                    if rec_prev != GENESIS && !partial {
                        return Ok(broken(format!(
                            "the chain starts mid-way{}: the records before it were cut off, or are in rotated \
                             files (give them too, oldest first; or --partial to check from here)",
                            seq.map(|n| format!(" at record {n}")).unwrap_or_default()
                        )));
                    }
                    if rec_prev == GENESIS && seq.is_some_and(|n| n != 1) {
                        return Ok(broken("the first record of the chain is not numbered 1".into()));
                    }
                    first_prev = Some(rec_prev.clone());
                }
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
                Some(_) => {
                    if let (Some(before), Some(n)) = (prev_seq, seq)
                        && n != before + 1
                    {
                        return Ok(broken(format!("record {n} follows record {before}")));
                    }
                }
            }
            seen.push(hash.clone());
            prev = Some(hash);
            prev_seq = seq;
            count += 1;
        }
    }
    let last_file = files.last();
    let head = last_file.and_then(|f| saved_head(f));
    let after_head = match (&head, last_file) {
        (Some(head), Some(file)) => match seen.iter().rposition(|h| *h == head.hash) {
            Some(at) => Some(seen.len() - at - 1),
            None => {
                return Ok(Verdict::Broken {
                    file: file.clone(),
                    line: last_lines + 1,
                    reason: format!(
                        "the log ends here, but the head saved at its last sync is {}, which it does not hold: \
                         records were cut off the end, or the file was replaced",
                        head.describe()
                    ),
                });
            }
        },
        _ => None,
    };
    if count == 0 {
        return Ok(Verdict::Broken {
            file: last_file.cloned().unwrap_or_default(),
            line: 1,
            reason: "no records: fttp-agent never leaves an empty audit log (emptied, or not its log)".into(),
        });
    }
    Ok(Verdict::Intact {
        records: count,
        continues_from: first_prev.unwrap_or_else(|| GENESIS.to_string()),
        after_head,
    })
}

/// The files in the order their chain links them, when that differs from
/// the order given (rotated files given newest first); `None` when the
/// given order links, or no order does (then `verify` names the break).
fn rotation_order(files: &[PathBuf]) -> Option<Vec<PathBuf>> {
    if files.len() < 2 {
        return None;
    }
    // Each file's first `prev` and last `hash` (its first line and tail).
    let ends: Vec<(String, String)> = files
        .iter()
        .map(|f| {
            use std::io::BufRead;
            let mut first = String::new();
            std::io::BufReader::new(File::open(f).ok()?)
                .read_line(&mut first)
                .ok()?;
            let prev = serde_json::from_str::<serde_json::Value>(&first)
                .ok()?
                .get("prev")?
                .as_str()?
                .to_string();
            Some((prev, last_record(f)?.hash))
        })
        .collect::<Option<_>>()?;
    let links = |a: usize, b: usize| ends[a].1 == ends[b].0;
    if (1..files.len()).all(|i| links(i - 1, i)) {
        return None;
    }
    // The oldest is the one no other file leads to; follow the links.
    let start = (0..files.len()).find(|&i| !(0..files.len()).any(|j| j != i && links(j, i)))?;
    let mut order = vec![start];
    while order.len() < files.len() {
        let last = *order.last()?;
        let next = (0..files.len()).find(|&j| !order.contains(&j) && links(last, j))?;
        order.push(next);
    }
    Some(order.into_iter().map(|i| files[i].clone()).collect())
}

/// The rotated predecessors of `path` that logrotate left (`path.N`, the
/// highest N oldest), oldest first, then `path` itself; compressed ones
/// (`path.N.gz`) are named apart, since they cannot be read as they are.
pub(crate) fn rotated_files(path: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mut numbered: Vec<(u32, PathBuf)> = Vec::new();
    let mut compressed = Vec::new();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Some(dir) = path
        .parent()
        .map(|d| if d.as_os_str().is_empty() { Path::new(".") } else { d })
        && let Ok(entries) = std::fs::read_dir(dir)
    {
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(suffix) = file.strip_prefix(&format!("{name}.")) else {
                continue;
            };
            if let Ok(n) = suffix.parse::<u32>() {
                numbered.push((n, entry.path()));
            } else if suffix.strip_suffix(".gz").is_some_and(|n| n.parse::<u32>().is_ok()) {
                compressed.push(entry.path());
            }
        }
    }
    numbered.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    let mut files: Vec<PathBuf> = numbered.into_iter().map(|(_, p)| p).collect();
    if path.exists() {
        files.push(path.to_path_buf());
    }
    compressed.sort();
    (files, compressed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: usize) -> AuditRecord {
        let mut rec = AuditRecord::new(AuditKind::RepeatRequest, Outcome::Stored, "dic_test");
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
            verify(std::slice::from_ref(&path), None, false).unwrap(),
            Verdict::Intact {
                records: 10_000,
                continues_from: GENESIS.into(),
                after_head: Some(0),
            }
        );
        // The head is remembered for a rotated successor, and a reopened
        // log continues the chain.
        let head = saved_head(&path).unwrap();
        assert_eq!(head.seq, Some(10_000));
        drop(audit);
        let mut audit = Audit::open(&path, Chain::Sha256).unwrap();
        audit.write(record(10_000)).unwrap();
        drop(audit);
        let text = std::fs::read_to_string(&path).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["prev"], head.hash.as_str());
        assert_eq!(last["seq"], 10_001);
        // Not synced: one record after the saved head.
        assert!(matches!(
            verify(std::slice::from_ref(&path), None, false).unwrap(),
            Verdict::Intact {
                records: 10_001,
                after_head: Some(1),
                ..
            }
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
        let genesis = Head {
            hash: GENESIS.into(),
            seq: Some(0),
            store_generation: None,
        };
        let mut audit = Audit::start(Path::new("/dev/full"), full, Chain::Sha256, genesis, Links::default()).unwrap();
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
