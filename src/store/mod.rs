//! The crash-safe local store: patients' IDAT and Bloom filters, pseudonyms
//! received, the task ledger, the last poll.
//!
//! On disk, a directory with
//! - `snapshot`: the whole state as checksummed lines, written to a temp
//!   file, fsynced and renamed into place (then the directory is fsynced);
//! - `journal`: checksummed records appended (and fsynced) since that
//!   snapshot, so writing one record never rewrites the store;
//! - `LOCK`: held with an OS file lock by the one agent using the store.
//!
//! Both files start with a header naming their generation. A crash between
//! installing a new snapshot and starting its journal leaves an older
//! journal, which is recognised by its generation and skipped: its records
//! are in the snapshot. A torn last journal line (a crash mid-append) is an
//! unacknowledged write and is cut off; damage anywhere else is corruption,
//! reported with file and line, and the store refuses to open.

mod batch;
mod disk;
use batch::BatchWriter;
use disk::{Line, load, push, write_atomically};
pub mod records;

pub use records::{
    EnrolmentRecord, EnrolmentStatus, LedgerEntry, PatientRecord, PollRecord, Progress, PseudonymRecord, Record, Status,
};

use crate::crypto::{OpenError, StoreKey};
use records::{DiskRecord, PatientSecret};

use crate::privacy::sha256_hex;
use crate::types::{BloomFilter, LocalId};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

const SNAPSHOT: &str = "snapshot";
const JOURNAL: &str = "journal";
const LOCK: &str = "LOCK";
const FORMAT: &str = "fttp-agent-store";
/// v4: journal writes and the snapshot's ledger are sealed batches of
/// records in a binary form (`batch`). (v2, one sealed line per record, and
/// v3, batches of JSON records, are not read: no release ever wrote them.)
const VERSION: u32 = 4;
/// Default for [`Store::set_compact_after`].
pub const COMPACT_AFTER: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store {path} is in use by another fttp-agent{}", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Locked { path: PathBuf, pid: Option<u32> },
    #[error("store {path}: cannot {op}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "store file {path} is damaged at line {line} ({reason}); refusing to run. \
         The file is left as it is for recovery"
    )]
    Corrupt { path: PathBuf, line: usize, reason: String },
    #[error(
        "store file {path} was written with store key {stored}, but the configured key is {given}; \
         use the right [store] key_file (nothing was changed)"
    )]
    WrongKey {
        path: PathBuf,
        stored: String,
        given: String,
    },
    #[error("store {path}{}: {source}; refusing to use it (nothing was changed)", at_line(*.line))]
    Tampered {
        path: PathBuf,
        /// The file's line, when the record was read from one.
        line: Option<usize>,
        source: OpenError,
    },
    #[error(
        "store file {path} is in store format v{found}; this fttp-agent reads v{VERSION} only \
         (nothing was changed)"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("store {path}: a write was started before the one before it was settled (a bug); nothing was written")]
    Unsettled { path: PathBuf },
    #[error(
        "store {path}: an earlier write could not be synced to disk; this run takes no more writes \
         (the store is read afresh from disk by the next run)"
    )]
    Poisoned { path: PathBuf },
}

/// Records appended to the journal but not yet known to be on disk
/// (`Store::write_ahead`).
#[must_use = "an appended write must be settled"]
pub struct Appended {
    /// A second handle on the journal, so that it can be synced on another
    /// thread while the store is read. `None` for an empty write.
    journal: Option<File>,
    len: u64,
}

/// The records of a `write_ahead`, for `Store::apply`.
#[must_use = "the records of a write_ahead must be applied"]
pub struct ToApply(Vec<Record>);

impl Appended {
    /// Waits for the appended records to be on disk (fdatasync).
    pub fn sync(&self) -> std::io::Result<()> {
        self.journal.as_ref().map_or(Ok(()), File::sync_data)
    }
}

fn at_line(line: Option<usize>) -> String {
    line.map(|l| format!(" at line {l}")).unwrap_or_default()
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
    generation: u64,
    /// Which store key wrote this file (a public name of the key).
    key_id: String,
    /// Records of each kind in a snapshot, so that loading sizes its tables
    /// once instead of growing them (a growing table briefly holds two copies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    counts: Option<Counts>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Counts {
    patients: usize,
    pseudonyms: usize,
    ledger: usize,
}

/// How to wait for the store lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Fail with `Locked` if the lock stays held for a second (cron
    /// overlap: the other agent is doing the work).
    Try,
    /// Block until the other agent is done (an import while the daemon polls).
    Wait,
}

/// A keyed HMAC index (128 bits), as bytes in memory and hex on disk.
type Index = [u8; 16];

/// An index no Bloom filter has (HMAC outputs of all ones: 2^-128).
const NO_FILTER: Index = [0xff; 16];

fn index_hex(i: &Index) -> String {
    crate::privacy::hex(i)
}

fn parse_index(hex: &str) -> Result<Index, OpenError> {
    let bad = OpenError::layout("index");
    if hex.len() != 32 {
        return Err(bad);
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or(bad.clone())?, 16).map_err(|_| bad.clone())?;
    }
    Ok(out)
}

/// Decodes into a buffer of exactly the decoded size (no reallocation:
/// a million of these are made at open).
fn decode_sealed(b64: &str, what: &'static str) -> Result<Box<[u8]>, OpenError> {
    use base64::Engine;
    let padding = b64.bytes().rev().take_while(|b| *b == b'=').count();
    let exact = (b64.len() / 4 * 3).saturating_sub(padding);
    let mut out = vec![0u8; exact].into_boxed_slice();
    match base64::engine::general_purpose::STANDARD.decode_slice(b64, &mut out) {
        Ok(n) if n == exact => Ok(out),
        _ => Err(OpenError::auth(what)),
    }
}

/// Hashes HMAC indexes by their first eight bytes: they are uniformly
/// random and unknown without the store key, so SipHash's protection
/// against chosen keys buys nothing here and costs a fifth of the open time.
#[derive(Default, Clone, Copy)]
struct IndexHasher(u64);

impl std::hash::Hasher for IndexHasher {
    fn write(&mut self, bytes: &[u8]) {
        if let Some(first) = bytes.first_chunk::<8>() {
            self.0 = self.0.rotate_left(17) ^ u64::from_le_bytes(*first);
        } else {
            for b in bytes {
                self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
            }
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type ByIndex = std::hash::BuildHasherDefault<IndexHasher>;

/// FxHash (as in rustc) for local ids: they come from the site's own
/// registry, not from the network, so a fast hash is safe and a million
/// lookups at open are cheaper.
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(K);
        }
        for b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(*b)).wrapping_mul(K);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type ById = std::hash::BuildHasherDefault<IdHasher>;

/// A record as the loader's reading thread hands it over: patients already
/// decoded, so the indexing thread only inserts.
enum Ready {
    Patient {
        id: std::sync::Arc<str>,
        bf: Option<Index>,
        data: Box<[u8]>,
        updated: chrono::DateTime<chrono::Utc>,
    },
    Other(DiskRecord),
}

impl Ready {
    fn from_disk(r: DiskRecord) -> Result<Ready, OpenError> {
        Ok(match r {
            DiskRecord::Patient { id, bf, data, updated } => Ready::Patient {
                id: std::sync::Arc::from(id.0),
                bf: bf.as_deref().map(parse_index).transpose()?,
                data: decode_sealed(&data, "patient")?,
                updated,
            },
            other => Ready::Other(other),
        })
    }
}

/// A patient as held in memory: sealed bytes, opened on lookup.
#[derive(Debug)]
struct SealedPatient {
    bf: Option<Index>,
    data: Box<[u8]>,
    updated: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug)]
struct SealedPseudonym {
    psn: Index,
    data: Box<[u8]>,
}

/// The store in memory: patients and pseudonyms stay sealed and are opened
/// one at a time on lookup; the (small) ledger is held decrypted.
#[derive(Debug, Default)]
struct State {
    /// Local ids are shared between the two tables (one allocation each).
    patients: HashMap<std::sync::Arc<str>, SealedPatient, ById>,
    /// HMAC index of a Bloom filter -> patient.
    by_bf: HashMap<Index, std::sync::Arc<str>, ByIndex>,
    /// (HMAC index of the Bloom filter, target) -> pseudonym.
    pseudonyms: HashMap<(Index, String), SealedPseudonym, ByIndex>,
    /// HMAC index of a pseudonym value -> HMAC index of its Bloom filter.
    by_psn: HashMap<Index, Index, ByIndex>,
    ledger: HashMap<String, LedgerEntry>,
    last_poll: Option<PollRecord>,
    enrolments: HashMap<LocalId, Enrolment>,
}

#[derive(Debug, Clone)]
struct Enrolment {
    bf: Index,
    status: EnrolmentStatus,
    detail: Option<String>,
    updated: chrono::DateTime<chrono::Utc>,
}

/// A patient's enrolment, as `Store::enrolment` tells it.
#[derive(Debug, Clone, PartialEq)]
pub struct EnrolmentState {
    pub status: EnrolmentStatus,
    pub detail: Option<String>,
    pub updated: chrono::DateTime<chrono::Utc>,
    /// Whether the filter sent is the patient's current one.
    pub same_filter: bool,
}

fn patient_context(id: &str) -> Vec<u8> {
    format!("patient\0{id}").into_bytes()
}

fn pseudonym_context(bf: &str, target: &str) -> Vec<u8> {
    format!("pseudonym\0{bf}\0{target}").into_bytes()
}

/// The associated data of a batch line (its records, keys and all, are
/// inside the seal).
const BATCH_CONTEXT: &[u8] = b"batch";

/// Records per batch line: bounds one line (and the memory to write or read
/// it) when a write carries 100,000 records.
const BATCH_RECORDS: usize = 4096;

/// Seals what `fill` writes as one batch (`batch` has the binary form):
/// records of a write, or the ledger's own entries for a snapshot
/// (borrowed, not copied into records first).
fn seal_batch(key: &StoreKey, fill: impl FnOnce(&mut BatchWriter)) -> Vec<u8> {
    let mut w = BatchWriter::new();
    fill(&mut w);
    key.seal_raw(BATCH_CONTEXT, &w.finish())
}

impl State {
    fn insert_patient(
        &mut self,
        id: std::sync::Arc<str>,
        bf: Option<Index>,
        data: Box<[u8]>,
        updated: chrono::DateTime<chrono::Utc>,
    ) {
        // One probe: insert, then tidy up after a replaced record.
        if let Some(old) = self.patients.insert(id.clone(), SealedPatient { bf, data, updated })
            && let Some(old_bf) = old.bf
            && Some(old_bf) != bf
            && self.by_bf.get(&old_bf).is_some_and(|x| *x == id)
        {
            self.by_bf.remove(&old_bf);
        }
        if let Some(bf) = bf {
            self.by_bf.insert(bf, id);
        }
    }

    fn forget(&mut self, id: &LocalId) {
        self.enrolments.remove(id);
        if let Some(old) = self.patients.remove(id.0.as_str())
            && let Some(bf) = old.bf
            && self.by_bf.get(&bf).is_some_and(|x| **x == *id.0)
        {
            self.by_bf.remove(&bf);
        }
    }

    fn insert_pseudonym(&mut self, bf: Index, target: String, psn: Index, data: Box<[u8]>) {
        self.by_psn.insert(psn, bf);
        self.pseudonyms.insert((bf, target), SealedPseudonym { psn, data });
    }

    /// Applies a line of a snapshot or journal; returns how many records it held.
    fn apply_ready(&mut self, r: Ready, key: &StoreKey) -> Result<usize, OpenError> {
        let r = match r {
            Ready::Patient { id, bf, data, updated } => {
                self.insert_patient(id, bf, data, updated);
                return Ok(1);
            }
            Ready::Other(r) => r,
        };
        match r {
            // (from_disk turns every patient into Ready::Patient)
            patient @ DiskRecord::Patient { .. } => return self.apply_ready(Ready::from_disk(patient)?, key),
            DiskRecord::Pseudonym { bf, target, psn, data } => {
                let (bf, psn) = (parse_index(&bf)?, parse_index(&psn)?);
                let data = decode_sealed(&data, "pseudonym")?;
                self.insert_pseudonym(bf, target, psn, data);
            }
            DiskRecord::Poll(p) => self.last_poll = Some(p),
            DiskRecord::Enrolment {
                id,
                bf,
                status,
                detail,
                updated,
            } => {
                let bf = parse_index(&bf)?;
                self.enrolments.insert(
                    id,
                    Enrolment {
                        bf,
                        status,
                        detail,
                        updated,
                    },
                );
            }
            DiskRecord::Batch { data } => {
                let what = "batch of records";
                let plain = key.open(what, BATCH_CONTEXT, &data)?;
                let records = batch::decode(&plain).ok_or(OpenError::layout(what))?;
                let n = records.len();
                for r in records {
                    self.apply_record(r, key);
                }
                return Ok(n);
            }
        }
        Ok(1)
    }

    /// Applies records just written, with room made first for the new
    /// ledger entries (100,000 at a re-keying: growing the table step by
    /// step rehashed it a dozen times).
    fn apply_all(&mut self, records: Vec<Record>, key: &StoreKey) {
        let new = records.iter().filter(|r| matches!(r, Record::Ledger(_))).count();
        self.ledger.reserve(new);
        for r in records {
            self.apply_record(r, key);
        }
    }

    /// Applies a record in plain text (just written, or read from a batch);
    /// what memory holds sealed is sealed here.
    fn apply_record(&mut self, r: Record, key: &StoreKey) {
        match r {
            Record::Patient(p) => {
                let bf = p.bloomfilter.as_ref().map(|bf| key.index_bytes("bf", bf.as_bytes()));
                let plain = PatientSecret::encode_parts(&p.idat, p.bloomfilter.as_ref());
                let data = key.seal_raw(&patient_context(&p.local_id.0), &plain);
                self.insert_patient(std::sync::Arc::from(p.local_id.0), bf, data.into(), p.updated);
            }
            Record::Pseudonym(p) => {
                let bf = key.index_bytes("bf", p.bloomfilter.as_bytes());
                let psn = key.index_bytes("psn", p.pseudonym.value.as_bytes());
                let plain = records::encode_pseudonym(&p);
                let data = key.seal_raw(&pseudonym_context(&index_hex(&bf), &p.target), &plain);
                self.insert_pseudonym(bf, p.target, psn, data.into());
            }
            Record::Ledger(e) => {
                self.ledger.insert(e.key.clone(), e);
            }
            Record::Poll(p) => self.last_poll = Some(p),
            Record::Purge { key: k } => {
                self.ledger.remove(&k);
            }
            Record::Forget { local_id } => self.forget(&local_id),
            Record::Progress(p) => {
                if let Some(e) = self.ledger.get_mut(&p.key) {
                    p.apply_to(e);
                }
            }
            Record::Enrolment(e) => {
                let bf = key.index_bytes("bf", e.bloomfilter.as_bytes());
                self.enrolments.insert(
                    e.local_id,
                    Enrolment {
                        bf,
                        status: e.status,
                        detail: e.detail,
                        updated: e.updated,
                    },
                );
            }
        }
    }

    /// The state as snapshot lines: patients and pseudonyms with the sealed
    /// bytes memory holds (nothing is re-sealed), the ledger in batches.
    fn lines<'a>(&'a self, key: &'a StoreKey) -> impl Iterator<Item = Line<'a>> + 'a {
        let patients = self.patients.iter().map(|(id, p)| Line::Patient {
            id,
            bf: p.bf.as_ref(),
            data: &p.data,
            updated: p.updated,
        });
        let pseudonyms = self.pseudonyms.iter().map(|((bf, target), p)| Line::Pseudonym {
            bf,
            target,
            psn: &p.psn,
            data: &p.data,
        });
        let entries: Vec<&'a LedgerEntry> = self.ledger.values().collect();
        let ledger = (0..entries.len()).step_by(BATCH_RECORDS).map(move |i| {
            let chunk = &entries[i..entries.len().min(i + BATCH_RECORDS)];
            Line::Batch(seal_batch(key, |w| chunk.iter().for_each(|e| w.push_ledger(e))))
        });
        let enrolments = self.enrolments.iter().map(|(id, e)| {
            Line::Other(DiskRecord::Enrolment {
                id: id.clone(),
                bf: index_hex(&e.bf),
                status: e.status,
                detail: e.detail.clone(),
                updated: e.updated,
            })
        });
        patients
            .chain(pseudonyms)
            .chain(ledger)
            .chain(enrolments)
            .chain(self.last_poll.clone().map(|p| Line::Other(DiskRecord::Poll(p))))
    }

    fn len(&self) -> usize {
        self.patients.len() + self.pseudonyms.len() + self.ledger.len() + self.enrolments.len() + 1
    }

    fn counts(&self) -> Counts {
        Counts {
            patients: self.patients.len(),
            pseudonyms: self.pseudonyms.len(),
            ledger: self.ledger.len(),
        }
    }

    fn reserve(&mut self, c: Counts) {
        self.patients.reserve(c.patients);
        self.by_bf.reserve(c.patients);
        self.pseudonyms.reserve(c.pseudonyms);
        self.by_psn.reserve(c.pseudonyms);
        self.ledger.reserve(c.ledger);
    }
}

pub struct Store {
    dir: PathBuf,
    _lock: File,
    journal: File,
    journal_len: u64,
    journal_records: usize,
    generation: u64,
    compact_after: usize,
    /// A `write_ahead` is not yet settled.
    unsettled: bool,
    /// A `write_ahead` failed to sync: memory holds records the disk lacks.
    poisoned: bool,
    state: State,
    key: StoreKey,
}

impl Store {
    pub fn open(dir: &Path, mode: LockMode, key: StoreKey) -> Result<Store, StoreError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("create the store directory", dir))?;
        let lock = acquire_lock(dir, mode)?;

        let state = State::default();
        let snap_path = dir.join(SNAPSHOT);
        let cell = std::cell::RefCell::new(state);
        let snapshot = load(
            &snap_path,
            false,
            |h| {
                check_key(&snap_path, h, &key)?;
                if let Some(c) = h.counts {
                    cell.borrow_mut().reserve(c);
                }
                Ok(true)
            },
            |line, r| {
                cell.borrow_mut()
                    .apply_ready(r, &key)
                    .map(drop)
                    .map_err(tampered_at(&snap_path, Some(line)))
            },
        )?;
        let mut state = cell.into_inner();
        let generation = snapshot.map_or(0, |l| l.header.generation);

        let journal_path = dir.join(JOURNAL);
        let mut journal_records = 0;
        let mut journal_len = 0u64;
        let mut start_new_journal = true;
        let loaded = load(
            &journal_path,
            true,
            |h| {
                if h.generation > generation {
                    return Err(StoreError::Corrupt {
                        path: journal_path.clone(),
                        line: 1,
                        reason: format!(
                            "journal generation {} is newer than snapshot generation {generation}",
                            h.generation
                        ),
                    });
                }
                // An older journal: its records are already in the snapshot.
                if h.generation < generation {
                    return Ok(false);
                }
                check_key(&journal_path, h, &key)?;
                Ok(true)
            },
            |line, r| {
                journal_records += state
                    .apply_ready(r, &key)
                    .map_err(tampered_at(&journal_path, Some(line)))?;
                Ok(())
            },
        )?;
        if let Some(l) = loaded
            && l.header.generation == generation
        {
            journal_len = l.good_len;
            if l.good_len < l.file_len {
                let kept = dir.join(format!("journal.torn-{}", chrono::Utc::now().format("%Y%m%dT%H%M%S")));
                log::warn!(
                    "store journal {}: an incomplete last record (an interrupted write) was never \
                     acknowledged; it is cut off and kept in {}",
                    journal_path.display(),
                    kept.display()
                );
                let tail = {
                    use std::io::{Seek, SeekFrom};
                    let mut f = File::open(&journal_path).map_err(io("open the journal", &journal_path))?;
                    f.seek(SeekFrom::Start(l.good_len))
                        .map_err(io("read the journal", &journal_path))?;
                    let mut tail = Vec::new();
                    f.read_to_end(&mut tail)
                        .map_err(io("read the journal", &journal_path))?;
                    tail
                };
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&kept)
                    .and_then(|mut f| f.write_all(&tail))
                    .map_err(io("keep the torn record", &kept))?;
                let f = OpenOptions::new()
                    .write(true)
                    .open(&journal_path)
                    .map_err(io("open the journal", &journal_path))?;
                f.set_len(journal_len)
                    .map_err(io("truncate the journal", &journal_path))?;
                f.sync_all().map_err(io("sync the journal", &journal_path))?;
            }
            start_new_journal = false;
        }
        if start_new_journal {
            journal_len = write_atomically(dir, JOURNAL, generation, key.id(), None, std::iter::empty())?;
        }
        let journal = OpenOptions::new()
            .append(true)
            .open(&journal_path)
            .map_err(io("open the journal", &journal_path))?;
        Ok(Store {
            dir: dir.to_path_buf(),
            _lock: lock,
            journal,
            journal_len,
            journal_records,
            generation,
            compact_after: COMPACT_AFTER,
            unsettled: false,
            poisoned: false,
            state,
            key,
        })
    }

    /// Compact once the journal holds this many records and more than a
    /// fresh snapshot would: bounds replay time without rewriting the store
    /// on every write.
    pub fn set_compact_after(&mut self, records: usize) {
        self.compact_after = records.max(1);
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends records durably, then applies them. Nothing is applied if the
    /// write fails, and a partial append is rolled back so that the journal
    /// never holds a torn record in its middle. The records go to disk as
    /// sealed batches of up to `BATCH_RECORDS`, all fsynced at once.
    pub fn write(&mut self, records: Vec<Record>) -> Result<(), StoreError> {
        self.writable()?;
        if records.is_empty() {
            return Ok(());
        }
        let len = self.append_lines(&records)?;
        if let Err(source) = self.journal.sync_data() {
            return Err(self.roll_back("sync the journal", source));
        }
        crate::crashpoint::hit("journal:written");
        self.journal_len += len;
        self.journal_records += records.len();
        self.state.apply_all(records, &self.key);
        Ok(())
    }

    /// `write` for a caller with other work to do while the disk syncs:
    /// appends the records and hands them back to be applied with `apply`
    /// (at once: while `Appended::sync` waits for the disk on another
    /// thread, before the records are known to be on disk); `settle` then
    /// takes the sync's outcome. Until then the store takes no other write.
    /// A failed sync leaves this handle with records in memory that are not
    /// on disk: it is cut off the journal and the handle takes no more
    /// writes (a cycle ends there; the next one opens the store afresh from
    /// disk).
    pub fn write_ahead(&mut self, records: Vec<Record>) -> Result<(Appended, ToApply), StoreError> {
        self.writable()?;
        if records.is_empty() {
            return Ok((Appended { journal: None, len: 0 }, ToApply(records)));
        }
        let journal = self
            .journal
            .try_clone()
            .map_err(io("open the journal", &self.dir.join(JOURNAL)))?;
        let len = self.append_lines(&records)?;
        self.unsettled = true;
        self.journal_records += records.len();
        let appended = Appended {
            journal: Some(journal),
            len,
        };
        Ok((appended, ToApply(records)))
    }

    /// Applies the records of a `write_ahead`.
    pub fn apply(&mut self, records: ToApply) {
        self.state.apply_all(records.0, &self.key);
    }

    /// Whether this handle takes a write now: not while a `write_ahead` is
    /// unsettled, nor ever after one failed.
    fn writable(&self) -> Result<(), StoreError> {
        let path = self.dir.clone();
        match (self.poisoned, self.unsettled) {
            (true, _) => Err(StoreError::Poisoned { path }),
            (false, true) => Err(StoreError::Unsettled { path }),
            (false, false) => Ok(()),
        }
    }

    /// Whether a `write_ahead` waits to be settled.
    pub fn unsettled(&self) -> bool {
        self.unsettled
    }

    /// Ends a `write_ahead` with the outcome of its `Appended::sync`.
    pub fn settle(&mut self, appended: Appended, synced: std::io::Result<()>) -> Result<(), StoreError> {
        if appended.journal.is_none() {
            return Ok(());
        }
        self.unsettled = false;
        if let Err(source) = synced {
            self.poisoned = true;
            return Err(self.roll_back("sync the journal", source));
        }
        crate::crashpoint::hit("journal:written");
        self.journal_len += appended.len;
        Ok(())
    }

    /// Seals the records as batch lines and appends them (not synced);
    /// returns the bytes appended. A failed append is cut off again.
    fn append_lines(&mut self, records: &[Record]) -> Result<u64, StoreError> {
        let mut buf = String::new();
        let mut appended = 0u64;
        let mut result = Ok(());
        for chunk in records.chunks(BATCH_RECORDS) {
            push(
                &mut buf,
                Line::Batch(seal_batch(&self.key, |w| chunk.iter().for_each(|r| w.push(r)))),
            );
            if buf.len() >= 1 << 20 {
                result = append(&mut self.journal, buf.as_bytes());
                appended += buf.len() as u64;
                buf.clear();
                if result.is_err() {
                    break;
                }
            }
        }
        appended += buf.len() as u64;
        match result.and_then(|()| append(&mut self.journal, buf.as_bytes())) {
            Ok(()) => Ok(appended),
            Err(source) => Err(self.roll_back("write the journal", source)),
        }
    }

    /// Cuts a failed write off the journal.
    fn roll_back(&mut self, op: &'static str, source: std::io::Error) -> StoreError {
        let path = self.dir.join(JOURNAL);
        if let Err(e) = self.journal.set_len(self.journal_len) {
            log::error!("store journal {}: cannot roll back a failed write: {e}", path.display());
        }
        StoreError::Io { op, path, source }
    }

    /// Compacts when the journal has grown past `compact_after` records and
    /// half the state: called at the end of a cycle or an import, so a large
    /// cycle is not interrupted by rewrites.
    pub fn maybe_compact(&mut self) -> Result<(), StoreError> {
        if self.journal_records >= self.compact_after && self.journal_records > self.state.len() / 2 {
            self.compact()?;
        }
        Ok(())
    }

    pub fn put(&mut self, record: Record) -> Result<(), StoreError> {
        self.write(vec![record])
    }

    /// Writes the whole state as a new snapshot generation and starts an
    /// empty journal for it.
    pub fn compact(&mut self) -> Result<(), StoreError> {
        self.writable()?;
        let next = self.generation + 1;
        // The current generation stays available as *.prev for recovery.
        for name in [SNAPSHOT, JOURNAL] {
            let (cur, prev) = (self.dir.join(name), self.dir.join(format!("{name}.prev")));
            if cur.exists() {
                let _ = std::fs::remove_file(&prev);
                std::fs::hard_link(&cur, &prev).map_err(io("keep the previous generation", &prev))?;
            }
        }
        write_atomically(
            &self.dir,
            SNAPSHOT,
            next,
            self.key.id(),
            Some(self.state.counts()),
            self.state.lines(&self.key),
        )?;
        crate::crashpoint::hit("snapshot:installed");
        self.journal_len = write_atomically(&self.dir, JOURNAL, next, self.key.id(), None, std::iter::empty())?;
        let path = self.dir.join(JOURNAL);
        self.journal = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io("open the journal", &path))?;
        self.generation = next;
        self.journal_records = 0;
        Ok(())
    }

    fn open_patient(&self, id: &LocalId, p: &SealedPatient) -> Result<PatientRecord, StoreError> {
        let plain = self
            .key
            .open_raw("patient", &patient_context(&id.0), &p.data)
            .map_err(tampered(&self.dir))?;
        let secret = PatientSecret::decode(&plain).ok_or_else(|| tampered(&self.dir)(OpenError::layout("patient")))?;
        Ok(PatientRecord {
            local_id: id.clone(),
            idat: secret.idat,
            bloomfilter: secret.bloomfilter,
            updated: p.updated,
        })
    }

    pub fn patient(&self, id: &LocalId) -> Result<Option<PatientRecord>, StoreError> {
        self.state
            .patients
            .get(id.0.as_str())
            .map(|p| self.open_patient(id, p))
            .transpose()
    }

    /// The local id of the patient with this Bloom filter, without decrypting.
    pub fn local_id_by_bloomfilter(&self, bf: &BloomFilter) -> Option<LocalId> {
        self.state
            .by_bf
            .get(&self.key.index_bytes("bf", bf.as_bytes()))
            .map(|id| LocalId(id.to_string()))
    }

    pub fn patient_by_bloomfilter(&self, bf: &BloomFilter) -> Result<Option<PatientRecord>, StoreError> {
        match self.local_id_by_bloomfilter(bf) {
            Some(id) => self.patient(&id),
            None => Ok(None),
        }
    }

    /// The patient a pseudonym was issued for (any target, any system).
    pub fn patient_by_pseudonym(&self, value: &str) -> Result<Option<PatientRecord>, StoreError> {
        let Some(bf) = self.state.by_psn.get(&self.key.index_bytes("psn", value.as_bytes())) else {
            return Ok(None);
        };
        match self.state.by_bf.get(bf) {
            Some(id) => self.patient(&LocalId(id.to_string())),
            None => Ok(None),
        }
    }

    /// The patient a task names: by pseudonym, else by Bloom filter.
    pub fn find_patient(
        &self,
        pseudonym: Option<&crate::types::Pseudonym>,
        bloomfilter: Option<&BloomFilter>,
    ) -> Result<Option<PatientRecord>, StoreError> {
        if let Some(p) = pseudonym
            && let Some(found) = self.patient_by_pseudonym(&p.value)?
        {
            return Ok(Some(found));
        }
        match bloomfilter {
            Some(bf) => self.patient_by_bloomfilter(bf),
            None => Ok(None),
        }
    }

    pub fn pseudonym(&self, bf: &BloomFilter, target: &str) -> Result<Option<PseudonymRecord>, StoreError> {
        Ok(self.patient_and_pseudonym(bf, target)?.1)
    }

    /// The local patient with this Bloom filter and the pseudonym stored
    /// for it and `target`: one keyed index for both (100,000 of these are
    /// asked in a re-keying cycle).
    pub fn patient_and_pseudonym(
        &self,
        bf: &BloomFilter,
        target: &str,
    ) -> Result<(Option<LocalId>, Option<PseudonymRecord>), StoreError> {
        let index = self.key.index_bytes("bf", bf.as_bytes());
        let patient = self.state.by_bf.get(&index).map(|id| LocalId(id.to_string()));
        let pseudonym = self
            .state
            .pseudonyms
            .get(&(index, target.to_string()))
            .map(|p| self.open_pseudonym(&index, target, p))
            .transpose()?;
        Ok((patient, pseudonym))
    }

    fn open_pseudonym(&self, bf: &Index, target: &str, p: &SealedPseudonym) -> Result<PseudonymRecord, StoreError> {
        let plain = self
            .key
            .open_raw("pseudonym", &pseudonym_context(&index_hex(bf), target), &p.data)
            .map_err(tampered(&self.dir))?;
        records::decode_pseudonym(&plain, target).ok_or_else(|| tampered(&self.dir)(OpenError::layout("pseudonym")))
    }

    /// Every pseudonym, decrypted (for tests, exports and re-keying).
    pub fn all_pseudonyms(&self) -> Result<Vec<PseudonymRecord>, StoreError> {
        self.state
            .pseudonyms
            .iter()
            .map(|((bf, target), p)| self.open_pseudonym(bf, target, p))
            .collect()
    }

    /// Every patient, decrypted (for tests, exports and re-keying).
    pub fn all_patients(&self) -> Result<Vec<PatientRecord>, StoreError> {
        self.state
            .patients
            .iter()
            .map(|(id, p)| self.open_patient(&LocalId(id.to_string()), p))
            .collect()
    }

    pub fn patient_count(&self) -> usize {
        self.state.patients.len()
    }

    pub fn patients_with_bloomfilter(&self) -> usize {
        self.state.patients.values().filter(|p| p.bf.is_some()).count()
    }

    pub fn pseudonym_count(&self) -> usize {
        self.state.pseudonyms.len()
    }

    /// Re-encrypts the whole store under `new`, atomically: a new snapshot
    /// generation written with the new key replaces the old files in one
    /// rename. A crash before it leaves the store under the old key.
    pub fn rekey(&mut self, new: StoreKey) -> Result<(), StoreError> {
        self.writable()?;
        let mut state = State::default();
        for p in self.all_patients()? {
            state.apply_record(Record::Patient(p), &new);
        }
        for p in self.all_pseudonyms()? {
            state.apply_record(Record::Pseudonym(p), &new);
        }
        state.ledger = self.state.ledger.clone();
        state.last_poll = self.state.last_poll.clone();
        state.enrolments = self.rekeyed_enrolments(&new)?;
        let next = self.generation + 1;
        write_atomically(
            &self.dir,
            SNAPSHOT,
            next,
            new.id(),
            Some(state.counts()),
            state.lines(&new),
        )?;
        self.journal_len = write_atomically(&self.dir, JOURNAL, next, new.id(), None, std::iter::empty())?;
        let path = self.dir.join(JOURNAL);
        self.journal = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io("open the journal", &path))?;
        // The previous generations were readable with the old key only.
        for name in ["snapshot.prev", "journal.prev"] {
            let _ = std::fs::remove_file(self.dir.join(name));
        }
        self.generation = next;
        self.journal_records = 0;
        self.state = state;
        self.key = new;
        Ok(())
    }

    /// Enrolments keep only the index of the filter sent, which cannot be
    /// recomputed under a new key without the filter: it is taken from the
    /// patient when it is still their filter; otherwise the index becomes
    /// one no filter has, which keeps what matters ("not the current one").
    fn rekeyed_enrolments(&self, new: &StoreKey) -> Result<HashMap<LocalId, Enrolment>, StoreError> {
        let mut out = HashMap::with_capacity(self.state.enrolments.len());
        for (id, e) in &self.state.enrolments {
            let current = self.patient(id)?.and_then(|p| p.bloomfilter);
            let bf = match current {
                Some(bf) if self.key.index_bytes("bf", bf.as_bytes()) == e.bf => new.index_bytes("bf", bf.as_bytes()),
                _ => NO_FILTER,
            };
            out.insert(id.clone(), Enrolment { bf, ..e.clone() });
        }
        Ok(out)
    }

    /// A patient's enrolment, compared with `current`, their filter now.
    pub fn enrolment(&self, id: &LocalId, current: Option<&BloomFilter>) -> Option<EnrolmentState> {
        let e = self.state.enrolments.get(id)?;
        Some(EnrolmentState {
            status: e.status,
            detail: e.detail.clone(),
            updated: e.updated,
            same_filter: current.is_some_and(|bf| self.key.index_bytes("bf", bf.as_bytes()) == e.bf),
        })
    }

    pub fn enrolment_counts(&self) -> std::collections::BTreeMap<EnrolmentStatus, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for e in self.state.enrolments.values() {
            *counts.entry(e.status).or_insert(0) += 1;
        }
        counts
    }

    /// Local ids of the patients whose sealed record passes `keep`, sorted;
    /// found from the indexes, without decrypting anyone.
    fn ids_where(&self, keep: impl Fn(&SealedPatient) -> bool) -> Vec<LocalId> {
        let mut ids: Vec<LocalId> = self
            .state
            .patients
            .iter()
            .filter(|(_, p)| keep(p))
            .map(|(id, _)| LocalId(id.to_string()))
            .collect();
        ids.sort();
        ids
    }

    /// Patients with a Bloom filter but no pseudonym for `target`.
    pub fn without_pseudonym(&self, target: &str) -> Vec<LocalId> {
        let target = target.to_string();
        self.ids_where(|p| {
            p.bf.is_some_and(|bf| !self.state.pseudonyms.contains_key(&(bf, target.clone())))
        })
    }

    /// Patients without a Bloom filter.
    pub fn without_bloomfilter(&self) -> Vec<LocalId> {
        self.ids_where(|p| p.bf.is_none())
    }

    /// Every patient.
    pub fn local_ids(&self) -> Vec<LocalId> {
        self.ids_where(|_| true)
    }

    pub fn key_id(&self) -> &str {
        self.key.id()
    }

    /// Removes a patient's IDAT and Bloom filter for good: the removal is
    /// recorded, then the store is compacted and the previous generation
    /// deleted, so the sealed data is gone from every store file.
    pub fn forget(&mut self, id: &LocalId) -> Result<bool, StoreError> {
        if !self.state.patients.contains_key(id.0.as_str()) {
            return Ok(false);
        }
        self.put(Record::Forget { local_id: id.clone() })?;
        self.compact()?;
        for name in ["snapshot.prev", "journal.prev"] {
            let p = self.dir.join(name);
            if p.exists() {
                std::fs::remove_file(&p).map_err(io("remove the previous generation", &p))?;
            }
        }
        Ok(true)
    }

    pub fn ledger(&self, key: &str) -> Option<&LedgerEntry> {
        self.state.ledger.get(key)
    }

    pub fn ledger_entries(&self) -> impl Iterator<Item = &LedgerEntry> {
        self.state.ledger.values()
    }

    pub fn last_poll(&self) -> Option<&PollRecord> {
        self.state.last_poll.as_ref()
    }
}

/// Appends to the journal. (Test builds can tear this write in half and
/// die: the crash tests.)
fn append(journal: &mut File, bytes: &[u8]) -> std::io::Result<()> {
    if crate::crashpoint::armed("journal:torn") && !bytes.is_empty() {
        let (first, rest) = bytes.split_at(bytes.len() / 2);
        journal.write_all(first)?;
        journal.sync_data()?;
        crate::crashpoint::hit("journal:torn");
        return journal.write_all(rest);
    }
    journal.write_all(bytes)
}

fn check_key(path: &Path, header: &Header, key: &StoreKey) -> Result<(), StoreError> {
    if header.key_id != key.id() {
        return Err(StoreError::WrongKey {
            path: path.to_path_buf(),
            stored: header.key_id.clone(),
            given: key.id().to_string(),
        });
    }
    Ok(())
}

fn tampered(path: &Path) -> impl Fn(OpenError) -> StoreError + '_ {
    tampered_at(path, None)
}

fn tampered_at(path: &Path, line: Option<usize>) -> impl Fn(OpenError) -> StoreError + '_ {
    move |source| StoreError::Tampered {
        path: path.to_path_buf(),
        line,
        source,
    }
}

fn acquire_lock(dir: &Path, mode: LockMode) -> Result<File, StoreError> {
    let path = dir.join(LOCK);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io("open the lock file", &path))?;
    match mode {
        LockMode::Wait => file.lock().map_err(io("lock the store", &path))?,
        LockMode::Try => {
            // A short grace period: a lock seen held for a moment (a process
            // between fork and exec still shares the descriptor) is not an
            // overlapping agent.
            let give_up = std::time::Instant::now() + std::time::Duration::from_secs(1);
            loop {
                match file.try_lock() {
                    Ok(()) => break,
                    Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < give_up => {
                        std::thread::sleep(std::time::Duration::from_millis(25));
                    }
                    Err(std::fs::TryLockError::WouldBlock) => {
                        let mut text = String::new();
                        let _ = file.read_to_string(&mut text);
                        return Err(StoreError::Locked {
                            path: dir.to_path_buf(),
                            pid: text.trim().parse().ok(),
                        });
                    }
                    Err(std::fs::TryLockError::Error(e)) => return Err(io("lock the store", &path)(e)),
                }
            }
        }
    }
    // Who holds it, for the message the next agent prints.
    file.set_len(0).map_err(io("write the lock file", &path))?;
    write!(file, "{}", std::process::id()).map_err(io("write the lock file", &path))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::idat::Idat;
    use chrono::Utc;

    fn key() -> StoreKey {
        StoreKey::from_bytes(&[42; 32])
    }

    fn patient(id: &str, bf: &[u8]) -> Record {
        Record::Patient(PatientRecord {
            local_id: LocalId(id.into()),
            idat: Idat {
                family: Some(format!("Family{id}")),
                ..Idat::default()
            },
            bloomfilter: Some(BloomFilter::from_bytes(bf.to_vec()).unwrap()),
            updated: Utc::now(),
        })
    }

    #[test]
    fn state_survives_reopen_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(dir.path(), LockMode::Try, key()).unwrap();
            s.put(patient("1", b"one")).unwrap();
            s.put(patient("2", b"two")).unwrap();
        }
        {
            let mut s = Store::open(dir.path(), LockMode::Try, key()).unwrap();
            assert_eq!(s.patient_count(), 2);
            s.compact().unwrap();
            s.put(patient("2", b"TWO")).unwrap();
        }
        let s = Store::open(dir.path(), LockMode::Try, key()).unwrap();
        let bf = BloomFilter::from_bytes(b"TWO".to_vec()).unwrap();
        assert_eq!(s.patient_by_bloomfilter(&bf).unwrap().unwrap().local_id.0, "2");
        let old = BloomFilter::from_bytes(b"two".to_vec()).unwrap();
        assert!(s.patient_by_bloomfilter(&old).unwrap().is_none());
    }

    #[test]
    fn a_write_ahead_is_applied_at_once_and_a_failed_sync_ends_the_handles_writes() {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join(JOURNAL);
        let ids = |s: &Store| -> Vec<String> {
            let mut v: Vec<String> = s.local_ids().into_iter().map(|l| l.0).collect();
            v.sort();
            v
        };
        let mut s = Store::open(dir.path(), LockMode::Try, key()).unwrap();
        s.put(patient("1", b"one")).unwrap();
        let before = std::fs::read(&journal).unwrap();

        // Appended and applied; no other write, compaction or rekey until
        // it is settled.
        let (a, records) = s.write_ahead(vec![patient("2", b"two")]).unwrap();
        assert!(s.unsettled());
        assert!(std::fs::metadata(&journal).unwrap().len() > before.len() as u64);
        assert_eq!(ids(&s), ["1"]);
        s.apply(records);
        assert_eq!(ids(&s), ["1", "2"]);
        for refused in [
            s.put(patient("3", b"three")),
            s.write_ahead(vec![patient("3", b"three")]).map(drop),
            s.compact(),
            s.rekey(StoreKey::from_bytes(&[7; 32])),
        ] {
            assert!(matches!(refused, Err(StoreError::Unsettled { .. })), "{refused:?}");
        }
        let synced = std::thread::scope(|t| t.spawn(|| a.sync()).join().unwrap());
        s.settle(a, synced).unwrap();
        s.put(patient("3", b"three")).unwrap();
        let good = std::fs::read(&journal).unwrap();

        // A failed sync: cut off the journal again, and this handle (whose
        // memory has the record) takes no more writes.
        let (a, records) = s.write_ahead(vec![patient("4", b"four")]).unwrap();
        s.apply(records);
        let failed = s.settle(a, Err(std::io::Error::other("disk gone")));
        assert!(
            matches!(
                &failed,
                Err(StoreError::Io {
                    op: "sync the journal",
                    ..
                })
            ),
            "{failed:?}"
        );
        assert_eq!(std::fs::read(&journal).unwrap(), good);
        for refused in [s.put(patient("5", b"five")), s.compact()] {
            assert!(matches!(refused, Err(StoreError::Poisoned { .. })), "{refused:?}");
        }
        drop(s);
        let s = Store::open(dir.path(), LockMode::Try, key()).unwrap();
        assert_eq!(ids(&s), ["1", "2", "3"]);
    }

    #[test]
    fn a_torn_last_record_is_dropped_and_earlier_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(dir.path(), LockMode::Try, key()).unwrap();
            s.put(patient("1", b"one")).unwrap();
            s.put(patient("2", b"two")).unwrap();
        }
        let j = dir.path().join(JOURNAL);
        let len = std::fs::metadata(&j).unwrap().len();
        let f = OpenOptions::new().write(true).open(&j).unwrap();
        f.set_len(len - 7).unwrap();
        drop(f);
        let mut s = Store::open(dir.path(), LockMode::Try, key()).unwrap();
        assert_eq!(s.patient_count(), 1);
        s.put(patient("3", b"three")).unwrap();
        drop(s);
        let s = Store::open(dir.path(), LockMode::Try, key()).unwrap();
        assert_eq!(s.patient_count(), 2);
    }

    /// A store whose journal holds a header and two patients; its path and text.
    fn journal_of_two_patients(dir: &Path) -> (PathBuf, String) {
        {
            let mut s = Store::open(dir, LockMode::Try, key()).unwrap();
            s.put(patient("1", b"one")).unwrap();
            s.put(patient("2", b"two")).unwrap();
        }
        let j = dir.join(JOURNAL);
        let text = std::fs::read_to_string(&j).unwrap();
        (j, text)
    }

    #[test]
    fn damage_in_the_middle_refuses_to_open_and_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let (j, text) = journal_of_two_patients(dir.path());
        // Flip one character inside the second line (the first record).
        let second = text.find('\n').unwrap() + 40;
        let mut bytes = text.into_bytes();
        bytes[second] = if bytes[second] == b'A' { b'B' } else { b'A' };
        std::fs::write(&j, &bytes).unwrap();
        let err = Store::open(dir.path(), LockMode::Try, key()).err().unwrap().to_string();
        assert!(err.contains("journal") && err.contains("line 2"), "{err}");
        // Left untouched for recovery.
        assert_eq!(std::fs::read(&j).unwrap(), bytes);
    }

    #[test]
    fn a_sealed_batch_that_cannot_be_used_refuses_to_open_and_names_file_and_line() {
        // Checksums intact, so not a torn write: one batch sealed under
        // another key, one that opens but is not what the batch writer
        // writes (a bug, or another layout). Each is named by its line.
        let other_key = StoreKey::from_bytes(&[9; 32]);
        let valid = {
            let mut w = BatchWriter::new();
            w.push(&Record::Purge { key: "k".into() });
            w.finish()
        };
        let cases = [
            (other_key.seal_raw(BATCH_CONTEXT, &valid), "fails authentication"),
            (
                key().seal_raw(BATCH_CONTEXT, b"\x01not a batch"),
                "not in the layout this version writes",
            ),
        ];
        for (sealed, says) in cases {
            let dir = tempfile::tempdir().unwrap();
            let (j, text) = journal_of_two_patients(dir.path());
            let lines: Vec<&str> = text.lines().collect();
            let mut bad = String::new();
            push(&mut bad, Line::Batch(sealed));
            let damaged = format!("{}\n{}\n{}\n{bad}{}\n", lines[0], lines[1], lines[2], lines[2]);
            std::fs::write(&j, &damaged).unwrap();
            let err = Store::open(dir.path(), LockMode::Try, key()).err().unwrap().to_string();
            assert!(err.contains("journal at line 4") && err.contains(says), "{err}");
            assert_eq!(
                std::fs::read_to_string(&j).unwrap(),
                damaged,
                "left untouched for recovery"
            );
        }
    }

    #[test]
    fn a_second_opener_is_refused_with_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let _s = Store::open(dir.path(), LockMode::Try, key()).unwrap();
        match Store::open(dir.path(), LockMode::Try, key()) {
            Err(StoreError::Locked { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("expected Locked, got {:?}", other.err()),
        }
    }

    #[test]
    fn a_journal_older_than_the_snapshot_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(dir.path(), LockMode::Try, key()).unwrap();
            s.put(patient("1", b"one")).unwrap();
        }
        let old_journal = std::fs::read(dir.path().join(JOURNAL)).unwrap();
        {
            let mut s = Store::open(dir.path(), LockMode::Try, key()).unwrap();
            s.compact().unwrap();
        }
        // Crash after the snapshot rename, before the new journal: old journal back.
        std::fs::write(dir.path().join(JOURNAL), old_journal).unwrap();
        let s = Store::open(dir.path(), LockMode::Try, key()).unwrap();
        assert_eq!(s.patient_count(), 1);
    }
}

#[cfg(test)]
mod crypto_tests {
    use super::*;
    use crate::fhir::idat::Idat;
    use chrono::Utc;

    fn patient() -> Record {
        Record::Patient(PatientRecord {
            local_id: LocalId("p1".into()),
            idat: Idat {
                family: Some("Mustermann".into()),
                ..Idat::default()
            },
            bloomfilter: Some(BloomFilter::from_bytes(b"bloom-bytes".to_vec()).unwrap()),
            updated: Utc::now(),
        })
    }

    fn files(dir: &Path) -> Vec<u8> {
        let mut all = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            all.extend(std::fs::read(e.unwrap().path()).unwrap());
        }
        all
    }

    #[test]
    fn nothing_identifying_is_stored_in_clear_and_a_wrong_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = StoreKey::from_bytes(&[1; 32]);
        {
            let mut s = Store::open(dir.path(), LockMode::Try, StoreKey::from_bytes(&[1; 32])).unwrap();
            s.put(patient()).unwrap();
            s.compact().unwrap();
            s.put(patient()).unwrap();
        }
        let raw = String::from_utf8_lossy(&files(dir.path())).to_string();
        assert!(!raw.contains("Mustermann"));
        let b64 = BloomFilter::from_bytes(b"bloom-bytes".to_vec()).unwrap().to_base64();
        assert!(!raw.contains(&b64));
        let before = files(dir.path());
        let err = Store::open(dir.path(), LockMode::Try, StoreKey::from_bytes(&[2; 32]))
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::WrongKey { .. }), "{err}");
        assert_eq!(files(dir.path()), before, "a wrong key changes nothing");
        let s = Store::open(dir.path(), LockMode::Try, k1).unwrap();
        let bf = BloomFilter::from_bytes(b"bloom-bytes".to_vec()).unwrap();
        assert_eq!(
            s.patient_by_bloomfilter(&bf).unwrap().unwrap().idat.family.as_deref(),
            Some("Mustermann")
        );
    }

    #[test]
    fn a_record_swapped_between_patients_fails_authentication() {
        let dir = tempfile::tempdir().unwrap();
        let key = || StoreKey::from_bytes(&[3; 32]);
        {
            let mut s = Store::open(dir.path(), LockMode::Try, key()).unwrap();
            s.put(patient()).unwrap();
            s.compact().unwrap();
        }
        // Forge a record for p2 that carries p1's sealed data, with a valid checksum.
        let j = dir.path().join(SNAPSHOT);
        let text = std::fs::read_to_string(&j).unwrap();
        let line = text.lines().nth(1).unwrap();
        let payload = line
            .split_once(' ')
            .unwrap()
            .1
            .replace("\"id\":\"p1\"", "\"id\":\"p2\"");
        let mut forged = text.clone();
        super::disk::push_line(&mut forged, &serde_json::from_str::<DiskRecord>(&payload).unwrap());
        std::fs::write(&j, forged).unwrap();
        let s = Store::open(dir.path(), LockMode::Try, key()).unwrap();
        let err = s.patient(&LocalId("p2".into())).unwrap_err().to_string();
        assert!(err.contains("fails authentication"), "{err}");
        assert!(s.patient(&LocalId("p1".into())).unwrap().is_some());
    }

    #[test]
    fn rekey_reencrypts_everything_atomically() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(dir.path(), LockMode::Try, StoreKey::from_bytes(&[4; 32])).unwrap();
            s.put(patient()).unwrap();
            s.rekey(StoreKey::from_bytes(&[5; 32])).unwrap();
        }
        assert!(Store::open(dir.path(), LockMode::Try, StoreKey::from_bytes(&[4; 32])).is_err());
        let s = Store::open(dir.path(), LockMode::Try, StoreKey::from_bytes(&[5; 32])).unwrap();
        assert_eq!(s.all_patients().unwrap().len(), 1);
        let bf = BloomFilter::from_bytes(b"bloom-bytes".to_vec()).unwrap();
        assert!(s.local_id_by_bloomfilter(&bf).is_some());
    }

    #[test]
    fn enrolments_survive_reopen_compaction_and_rekey_and_keep_which_filter_was_sent() {
        let dir = tempfile::tempdir().unwrap();
        let bf = BloomFilter::from_bytes(b"bloom-bytes".to_vec()).unwrap();
        let other = BloomFilter::from_bytes(b"other-bytes".to_vec()).unwrap();
        let enrol = |id: &str, bf: &BloomFilter, status| {
            Record::Enrolment(EnrolmentRecord {
                local_id: LocalId(id.into()),
                bloomfilter: bf.clone(),
                status,
                detail: None,
                updated: chrono::Utc::now(),
            })
        };
        let id = LocalId("p1".into());
        let check = |s: &Store, key: &str| {
            // p1 was sent its current filter; p2 was sent a filter it no longer has.
            let p1 = s.enrolment(&id, Some(&bf)).unwrap();
            assert_eq!((p1.status, p1.same_filter), (EnrolmentStatus::Clearing, true), "{key}");
            assert!(!s.enrolment(&id, Some(&other)).unwrap().same_filter, "{key}");
            let p2 = s.enrolment(&LocalId("p2".into()), Some(&bf)).unwrap();
            assert_eq!((p2.status, p2.same_filter), (EnrolmentStatus::Sending, false), "{key}");
            assert_eq!(s.enrolment_counts().values().sum::<usize>(), 2, "{key}");
        };
        {
            let mut s = Store::open(dir.path(), LockMode::Try, StoreKey::from_bytes(&[4; 32])).unwrap();
            s.put(patient()).unwrap();
            s.write(vec![
                enrol("p1", &bf, EnrolmentStatus::Sending),
                enrol("p1", &bf, EnrolmentStatus::Clearing),
                enrol("p2", &other, EnrolmentStatus::Sending),
            ])
            .unwrap();
            check(&s, "written");
        }
        let mut s = Store::open(dir.path(), LockMode::Try, StoreKey::from_bytes(&[4; 32])).unwrap();
        check(&s, "reopened");
        s.compact().unwrap();
        drop(s);
        let mut s = Store::open(dir.path(), LockMode::Try, StoreKey::from_bytes(&[4; 32])).unwrap();
        check(&s, "compacted");
        s.rekey(StoreKey::from_bytes(&[5; 32])).unwrap();
        drop(s);
        let mut s = Store::open(dir.path(), LockMode::Try, StoreKey::from_bytes(&[5; 32])).unwrap();
        check(&s, "rekeyed");
        // The filter itself is never on disk with an enrolment: only its keyed index.
        let text = String::from_utf8_lossy(&files(dir.path())).to_string();
        assert!(text.contains("\"t\":\"enrolment\""));
        // Forgetting the patient forgets the enrolment too.
        s.forget(&id).unwrap();
        assert!(s.enrolment(&id, Some(&bf)).is_none());
    }

    #[test]
    fn patient_lines_read_the_same_by_the_fast_and_the_generic_path() {
        use super::disk::{parse_line, parse_record, push_line};
        let key = StoreKey::from_bytes(&[6; 32]);
        for id in ["p1", "p\"quoted\"", "Müller\\1", "tab\there"] {
            let data = key.seal_raw(&patient_context(id), b"secret");
            let mut line = String::new();
            push(
                &mut line,
                Line::Patient {
                    id,
                    bf: Some(&[7; 16]),
                    data: &data,
                    updated: Utc::now(),
                },
            );
            let payload = parse_line(&line).unwrap();
            assert!(payload.starts_with("{\"t\":\"patient\","), "{payload}");
            let fast = match parse_record(payload).unwrap().unwrap() {
                Ready::Patient { id, bf, data, updated } => (id.to_string(), bf, data, updated.timestamp_millis()),
                Ready::Other(_) => panic!("not a patient"),
            };
            let generic = match Ready::from_disk(serde_json::from_str::<DiskRecord>(payload).unwrap()).unwrap() {
                Ready::Patient { id, bf, data, updated } => (id.to_string(), bf, data, updated.timestamp_millis()),
                Ready::Other(_) => panic!("not a patient"),
            };
            assert_eq!(fast, generic);
            assert_eq!((fast.0.as_str(), fast.1, &*fast.2), (id, Some([7; 16]), &data[..]));
        }
        // Hand-written lines read back as what serde would have written.
        let (bf, psn) = ([1; 16], [2; 16]);
        let mut line = String::new();
        push(
            &mut line,
            Line::Pseudonym {
                bf: &bf,
                target: "dic \"x\"",
                psn: &psn,
                data: b"sealed",
            },
        );
        push(&mut line, Line::Batch(b"sealed batch".to_vec()));
        let read: Vec<DiskRecord> = line
            .split_inclusive('\n')
            .map(|l| serde_json::from_str(parse_line(l).unwrap()).unwrap())
            .collect();
        assert_eq!(
            read,
            [
                DiskRecord::Pseudonym {
                    bf: index_hex(&bf),
                    target: "dic \"x\"".into(),
                    psn: index_hex(&psn),
                    data: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b"sealed"),
                },
                DiskRecord::Batch {
                    data: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b"sealed batch"),
                }
            ]
        );
        // A damaged checksum is refused by the in-place comparison.
        let mut line = String::new();
        push_line(&mut line, &DiskRecord::Batch { data: "k".into() });
        let flipped = if line.starts_with('0') {
            line.replacen('0', "1", 1)
        } else {
            format!("0{}", &line[1..])
        };
        assert_eq!(parse_line(&flipped), Err("checksum mismatch"));
        assert!(parse_line(&line).is_ok());
    }

    #[test]
    fn each_write_is_sealed_batches_that_replay_in_order() {
        use crate::tasks::TaskKind;
        let dir = tempfile::tempdir().unwrap();
        let key = || StoreKey::from_bytes(&[7; 32]);
        let entry = |k: &str| LedgerEntry {
            key: k.into(),
            kind: TaskKind::RepeatRequest,
            display_id: k.into(),
            task: None,
            status: Status::Pending,
            outcome: "received".into(),
            detail: None,
            expires: None,
            first_seen: Utc::now(),
            last_seen: Utc::now(),
            updated: Utc::now(),
            attempts: 0,
        };
        let step = |k: &str, status: Status, outcome: &str, attempts: u32| {
            let mut e = entry(k);
            e.status = status;
            e.outcome = outcome.into();
            e.attempts = attempts;
            Record::Progress(Progress::of(&e))
        };
        let many = BATCH_RECORDS + 10;
        let expected;
        {
            let mut s = Store::open(dir.path(), LockMode::Try, key()).unwrap();
            s.write(vec![Record::Ledger(entry("a")), Record::Ledger(entry("b"))])
                .unwrap();
            s.write(vec![
                step("a", Status::InFlight, "sending", 1),
                step("b", Status::InFlight, "sending", 1),
                // A later state of "a" in the same write wins.
                step("a", Status::Resolved, "stored", 1),
                Record::Ledger(entry("gone")),
                Record::Purge { key: "gone".into() },
                step("b", Status::Failed, "failed", 1),
            ])
            .unwrap();
            s.write(vec![
                step("a", Status::Resolved, "stored", 2),
                Record::Pseudonym(PseudonymRecord {
                    bloomfilter: BloomFilter::from_bytes(b"bf".to_vec()).unwrap(),
                    target: "t".into(),
                    pseudonym: crate::types::Pseudonym {
                        system: None,
                        value: "psn".into(),
                    },
                    received: Utc::now(),
                    source: "a".into(),
                }),
                step("b", Status::Resolved, "stored", 2),
            ])
            .unwrap();
            // A write larger than a batch is split, in order.
            s.write(
                (0..many)
                    .map(|i| Record::Ledger(entry(&format!("k{i}"))))
                    .chain([Record::Purge { key: "k0".into() }])
                    .collect(),
            )
            .unwrap();
            expected = (s.ledger("a").cloned().unwrap(), s.ledger("b").cloned().unwrap());
            assert_eq!((expected.0.status, expected.0.attempts), (Status::Resolved, 2));
            assert_eq!((expected.1.status, expected.1.attempts), (Status::Resolved, 2));
            assert!(s.ledger("gone").is_none());
        }
        let journal = std::fs::read_to_string(dir.path().join(JOURNAL)).unwrap();
        assert_eq!(
            journal.lines().count(),
            1 + 3 + 2,
            "header, one line per write, two for the large one"
        );
        assert_eq!(journal.matches("\"t\":\"batch\"").count(), 5);
        for dir_state in [false, true] {
            let mut s = Store::open(dir.path(), LockMode::Try, key()).unwrap();
            assert_eq!(
                (s.ledger("a").cloned().unwrap(), s.ledger("b").cloned().unwrap()),
                expected
            );
            assert!(s.ledger("gone").is_none() && s.ledger("k0").is_none());
            assert!(s.ledger(&format!("k{}", many - 1)).is_some());
            assert_eq!(s.ledger_entries().count(), 2 + many - 1);
            assert_eq!(s.pseudonym_count(), 1);
            assert_eq!(s.journal_records, if dir_state { 0 } else { 2 + 6 + 3 + many + 1 });
            // The same state from a snapshot (its ledger in batches, too).
            s.compact().unwrap();
        }
        let snapshot = std::fs::read_to_string(dir.path().join(SNAPSHOT)).unwrap();
        assert_eq!(
            snapshot.matches("\"t\":\"batch\"").count(),
            2,
            "{} entries",
            2 + many - 1
        );
    }

    #[test]
    fn an_older_store_format_is_refused_by_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut line = String::new();
        super::disk::push_line(
            &mut line,
            &Header {
                format: FORMAT.into(),
                version: 3,
                generation: 1,
                key_id: StoreKey::from_bytes(&[8; 32]).id().into(),
                counts: None,
            },
        );
        std::fs::write(dir.path().join(SNAPSHOT), &line).unwrap();
        let err = Store::open(dir.path(), LockMode::Try, StoreKey::from_bytes(&[8; 32]))
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::Version { found: 3, .. }), "{err}");
        assert!(err.to_string().contains("format v3; this fttp-agent reads v4"), "{err}");
        assert_eq!(std::fs::read_to_string(dir.path().join(SNAPSHOT)).unwrap(), line);
    }
}
