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
pub mod db;
mod disk;
mod forgotten;
mod state;
use batch::BatchWriter;
use disk::{Line, load, push, write_atomically};
use state::*;
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

impl StoreError {
    pub fn exit_code(&self) -> u8 {
        match self {
            StoreError::Locked { .. } => crate::exit::LOCKED,
            StoreError::WrongKey { .. } | StoreError::Version { .. } => crate::exit::CONFIG,
            _ => crate::exit::IO,
        }
    }
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

/// Whether a store handle takes writes (`Store::write_ahead`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writes {
    Open,
    /// A `write_ahead` is not yet settled.
    Unsettled,
    /// A `write_ahead` failed to sync: memory holds records the disk lacks.
    Poisoned,
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

/// A patient's enrolment, as `Store::enrolment` tells it.
#[derive(Debug, Clone, PartialEq)]
pub struct EnrolmentState {
    pub status: EnrolmentStatus,
    pub detail: Option<String>,
    pub updated: chrono::DateTime<chrono::Utc>,
    /// Whether the filter sent is the patient's current one.
    pub same_filter: bool,
}

pub struct Store {
    dir: PathBuf,
    _lock: File,
    journal: File,
    journal_len: u64,
    journal_records: usize,
    generation: u64,
    compact_after: usize,
    writes: Writes,
    state: State,
    key: StoreKey,
    /// Local ids erased by `forget` (see `forgotten`).
    forgotten: std::collections::BTreeSet<String>,
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
        let forgotten = forgotten::load(dir, &key)?;
        Ok(Store {
            forgotten,
            dir: dir.to_path_buf(),
            _lock: lock,
            journal,
            journal_len,
            journal_records,
            generation,
            compact_after: COMPACT_AFTER,
            writes: Writes::Open,
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
        self.writes = Writes::Unsettled;
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
        match self.writes {
            Writes::Open => Ok(()),
            Writes::Unsettled => Err(StoreError::Unsettled { path }),
            Writes::Poisoned => Err(StoreError::Poisoned { path }),
        }
    }

    /// Whether a `write_ahead` waits to be settled.
    pub fn unsettled(&self) -> bool {
        self.writes == Writes::Unsettled
    }

    /// Ends a `write_ahead` with the outcome of its `Appended::sync`.
    pub fn settle(&mut self, appended: Appended, synced: std::io::Result<()>) -> Result<(), StoreError> {
        if appended.journal.is_none() {
            return Ok(());
        }
        if let Err(source) = synced {
            self.writes = Writes::Poisoned;
            return Err(self.roll_back("sync the journal", source));
        }
        self.writes = Writes::Open;
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

    /// A patient's record. An erased patient is absent even if her record
    /// is there: an erasure interrupted before the IDAT went, or an old
    /// write replayed into the store, never leads to a send.
    pub fn patient(&self, id: &LocalId) -> Result<Option<PatientRecord>, StoreError> {
        if self.is_forgotten(id) {
            if self.state.patients.contains_key(id.0.as_str()) {
                log::warn!(
                    "patient {} was erased but her record is in the store again (an interrupted forget: run it \
                     again; or a replayed write): treated as absent",
                    id.fingerprint()
                );
            }
            return Ok(None);
        }
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

    /// The patient with this Bloom filter. The index that leads to her
    /// lies outside the encryption: the opened record must hold the very
    /// filter asked for, or the store was altered (two patients' index
    /// values swapped would otherwise send one's IDAT for the other).
    pub fn patient_by_bloomfilter(&self, bf: &BloomFilter) -> Result<Option<PatientRecord>, StoreError> {
        let Some(id) = self.local_id_by_bloomfilter(bf) else {
            return Ok(None);
        };
        let patient = self.patient(&id)?;
        if patient.as_ref().is_some_and(|p| p.bloomfilter.as_ref() != Some(bf)) {
            return Err(tampered(&self.dir)(OpenError::Mismatch { what: "patient" }));
        }
        Ok(patient)
    }

    /// The patient a pseudonym was issued for (any target, any system).
    /// The patient whose pseudonym in `target` is `value`. Both indexes
    /// on the way lie outside the encryption: the sealed pseudonym record
    /// the first leads to must hold `value`, and the patient record the
    /// second leads to must hold that filter, or the store was altered.
    pub fn patient_by_pseudonym(&self, target: &str, value: &str) -> Result<Option<PatientRecord>, StoreError> {
        let Some(bf) = self
            .state
            .by_psn
            .get(&self.key.index_bytes("psn", value.as_bytes()))
            .copied()
        else {
            return Ok(None);
        };
        let Some(sealed) = self.state.pseudonyms.get(&(bf, target.to_string())) else {
            return Ok(None);
        };
        if self.open_pseudonym(&bf, target, sealed)?.pseudonym.value != value {
            return Err(tampered(&self.dir)(OpenError::Mismatch { what: "pseudonym" }));
        }
        let Some(id) = self.state.by_bf.get(&bf).map(|id| LocalId(id.to_string())) else {
            return Ok(None);
        };
        let patient = self.patient(&id)?;
        if patient
            .as_ref()
            .is_some_and(|p| p.bloomfilter.as_ref().map(|b| self.key.index_bytes("bf", b.as_bytes())) != Some(bf))
        {
            return Err(tampered(&self.dir)(OpenError::Mismatch { what: "patient" }));
        }
        Ok(patient)
    }

    /// The patient a task names: by pseudonym, else by Bloom filter.
    pub fn find_patient(
        &self,
        target: &str,
        pseudonym: Option<&crate::types::Pseudonym>,
        bloomfilter: Option<&BloomFilter>,
    ) -> Result<Option<PatientRecord>, StoreError> {
        if let Some(p) = pseudonym
            && let Some(found) = self.patient_by_pseudonym(target, &p.value)?
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
        // Under the new key before the switch (the file is named by it).
        if !self.forgotten.is_empty() {
            forgotten::save(&self.dir, &new, &self.forgotten)?;
        }
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
        forgotten::remove_others(&self.dir, &self.key);
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
    /// Whether `id` was erased by `forget`: `import` skips it.
    pub fn is_forgotten(&self, id: &LocalId) -> bool {
        forgotten::holds(&self.forgotten, id)
    }

    /// How many patients were erased (and not taken back).
    pub fn forgotten_count(&self) -> usize {
        self.forgotten.len()
    }

    /// Takes back a mistaken erasure: the next import may bring the patient
    /// back (her data is gone: it comes only from that import). False if
    /// `id` was not erased.
    pub fn unforget(&mut self, id: &LocalId) -> Result<bool, StoreError> {
        self.writable()?;
        if !self.forgotten.contains(id.0.as_str()) {
            return Ok(false);
        }
        let mut next = self.forgotten.clone();
        next.remove(id.0.as_str());
        forgotten::save(&self.dir, &self.key, &next)?;
        self.forgotten = next;
        Ok(true)
    }

    pub fn forget(&mut self, id: &LocalId) -> Result<bool, StoreError> {
        self.writable()?;
        // The tombstone first: a crash after it leaves the patient erased
        // from every later import, and `forget` can simply be run again.
        if !self.forgotten.contains(id.0.as_str()) {
            let mut next = self.forgotten.clone();
            next.insert(id.0.clone());
            forgotten::save(&self.dir, &self.key, &next)?;
            self.forgotten = next;
        }
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
mod tests;

#[cfg(test)]
mod crypto_tests;
