//! The local store: patients' IDAT and Bloom filters, pseudonyms received,
//! the task ledger, enrolments, tombstones of erased patients, the last
//! poll. One SQLite database (`db::FILE`) in the store directory:
//!
//! - `db`: the connection, its pragmas (WAL, `synchronous = FULL`,
//!   `secure_delete`) and the schema's migrations;
//! - `rows`: how each record is sealed into a row, bound to its columns;
//! - `records`: the records themselves and their binary forms (with `batch`);
//! - `migrate` and `v1`: the one-time conversion of a store written by a
//!   release before the database.
//!
//! One writer at a time holds `LOCK` (an OS file lock, as before the
//! database: a second `run` exits 75, `import` waits). Readers (`tasks`,
//! `status`, `backup`, exports) take no lock: WAL lets them read the last
//! committed write while a cycle writes the next. Every `write` is one
//! transaction, on disk (fsynced) when it returns.
//!
//! The ledger and the last poll are small and read on every task: they are
//! held in memory, decrypted, as the database has them. Patients and
//! pseudonyms stay in the database and are opened one at a time.

mod batch;
pub mod db;
mod ledger;
mod migrate;
pub mod records;
mod rows;
mod v1;

pub use migrate::MigrationReport;
pub use records::{
    EnrolmentRecord, EnrolmentStatus, LedgerEntry, PatientRecord, PollRecord, Progress, PseudonymRecord, Record, Status,
};

use crate::crypto::{OpenError, StoreKey};
use crate::types::{BloomFilter, LocalId};
use db::{Db, DbError};
use ledger::Ledger;
use rows::{Index, Manifest};
use rusqlite::{OptionalExtension, Transaction, params};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

const LOCK: &str = "LOCK";

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
    #[error("store database {path}: cannot {what}: {}", describe(source))]
    Sqlite {
        path: PathBuf,
        what: &'static str,
        source: rusqlite::Error,
    },
    #[error("store file {path} is damaged ({reason}); refusing to run. The file is left as it is for recovery")]
    Damaged { path: PathBuf, reason: String },
    #[error(
        "store {path} was written with store key {stored}, but the configured key is {given}; \
         use the right [store] key_file (nothing was changed)"
    )]
    WrongKey {
        path: PathBuf,
        stored: String,
        given: String,
    },
    #[error("store {path}{what}: {source}; refusing to use it (nothing was changed)")]
    Tampered {
        path: PathBuf,
        /// Where in the file, when known (" at line 3").
        what: String,
        source: OpenError,
    },
    #[error(
        "store database {path} has schema version {found}, newer than this fttp-agent knows ({known}): \
         use the release that wrote it or a newer one (nothing was changed)"
    )]
    Newer { path: PathBuf, found: u32, known: u32 },
    #[error("cannot migrate the store {path} to the database: {reason} (the old files are left as they are)")]
    Migration { path: PathBuf, reason: String },
    #[error(
        "store {path}: an earlier write could not be committed; this run takes no more writes \
         (the next run reads the store afresh from disk)"
    )]
    Poisoned { path: PathBuf },
    #[error(
        "store {path}: {detail}. Nothing was changed. If this copy is meant (a restore), run the command again \
         with --accept-restore: it is then taken as it is, and that is audited"
    )]
    Diverged { path: PathBuf, detail: String },
    #[error("store {path} was opened for reading only; a write was refused (a bug)")]
    ReadOnly { path: PathBuf },
}

impl StoreError {
    pub fn exit_code(&self) -> u8 {
        match self {
            StoreError::Locked { .. } => crate::exit::LOCKED,
            StoreError::WrongKey { .. } | StoreError::Newer { .. } => crate::exit::CONFIG,
            _ => crate::exit::IO,
        }
    }
}

/// What SQLite's error means for the people running the agent; its own
/// text names no value (statements carry their values as parameters).
fn describe(e: &rusqlite::Error) -> String {
    use rusqlite::ErrorCode::*;
    let hint = match e.sqlite_error_code() {
        Some(DatabaseCorrupt | NotADatabase) => {
            " (the file is damaged: restore the last backup, see README \"Backup and restore\")"
        }
        Some(DiskFull) => " (the disk is full: free space and run again; nothing was half-written)",
        Some(ReadOnly | CannotOpen | PermissionDenied) => {
            " (the store directory or file cannot be written: check its owner and permissions)"
        }
        Some(DatabaseBusy | DatabaseLocked) => " (another process holds the database)",
        _ => "",
    };
    format!("{e}{hint}")
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl From<DbError> for StoreError {
    fn from(e: DbError) -> StoreError {
        match e {
            DbError::Sqlite { path, what, source } => StoreError::Sqlite { path, what, source },
            DbError::Newer { path, found, known } => StoreError::Newer { path, found, known },
            DbError::Io { path, source } => StoreError::Io {
                op: "create the database file",
                path,
                source,
            },
        }
    }
}

/// What the store holds for a Bloom filter: the local patient with it,
/// and the pseudonym stored for it in a study.
pub(crate) type Found = (Option<LocalId>, Option<PseudonymRecord>);

/// How to open the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Write; fail with `Locked` if the lock stays held for a second (cron
    /// overlap: the other agent is doing the work).
    Try,
    /// Write; block until the other agent is done (an import while the
    /// daemon polls).
    Wait,
    /// Read only, without the lock, while an agent may be writing: a
    /// consistent view of the last committed write.
    Read,
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
    /// The writer's lock; `None` for a reader.
    lock: Option<File>,
    db: Db,
    key: StoreKey,
    ledger: Ledger,
    /// The last poll of each study.
    polls: BTreeMap<String, PollRecord>,
    /// Local ids erased by `forget` (their tombstones).
    forgotten: BTreeSet<String>,
    manifest: Manifest,
    /// A commit failed: memory and disk may disagree.
    poisoned: bool,
    /// A migration from v1 done but not yet audited and finished.
    migration: Option<MigrationReport>,
    /// Rows from before several studies wait for `adopt_legacy`.
    needs_study: bool,
    /// What the store and the audit log tell each other (`link_audit`).
    audit: Option<AuditLinks>,
}

/// The audit log's side of the cross-check against restored copies (see
/// `audit::Links`): the store raises the first to its generation after
/// each commit, and seals the second into its manifest with each write.
#[derive(Clone)]
pub(crate) struct AuditLinks {
    pub store_generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub durable_seq: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// How the store and its audit log disagree: one of them is an older copy.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Divergence {
    /// The audit log's head says the store was at a later generation.
    StoreOlder { store: u64, audit_says: u64 },
    /// The store saw audit records the log no longer has.
    AuditOlder { audit: u64, store_saw: u64 },
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Divergence::StoreOlder { store, audit_says } => write!(
                f,
                "the store is older than its audit log (store generation {store}; the audit log's head was \
                 saved with generation {audit_says}): a restored backup or a rolled-back copy of the store"
            ),
            Divergence::AuditOlder { audit, store_saw } => write!(
                f,
                "the audit log is older than the store (its head is record {audit}; the store saw record \
                 {store_saw}): a restored or rolled-back copy of the audit log"
            ),
        }
    }
}

fn sql<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError + 'a {
    move |source| StoreError::Sqlite {
        path: path.to_path_buf(),
        what,
        source,
    }
}

fn tampered(path: &Path) -> impl Fn(OpenError) -> StoreError + '_ {
    move |source| StoreError::Tampered {
        path: path.to_path_buf(),
        what: String::new(),
        source,
    }
}

impl Store {
    pub fn open(dir: &Path, mode: LockMode, key: StoreKey) -> Result<Store, StoreError> {
        if mode == LockMode::Read && dir.join(db::FILE).exists() && !v1::present(dir) {
            let db = Db::reader(dir)?;
            if db.version()? == db::current_version() && !legacy_rows(&db)? {
                return Store::load(dir, db, key, None);
            }
        }
        // (A reader of a store not yet created or migrated, or whose
        // migration was interrupted, does that first, as a writer.)
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("create the store directory", dir))?;
        let lock = acquire_lock(dir, if mode == LockMode::Read { LockMode::Try } else { mode })?;
        if !dir.join(db::FILE).exists() && v1::present(dir) {
            migrate::run(dir, &key)?;
        }
        // A wrong key or a newer schema is refused by a reader, before a
        // writer could change a byte (closing a writer checkpoints the WAL).
        if dir.join(db::FILE).exists() {
            check_key(&Db::reader(dir)?, &key)?;
        }
        let db = Db::open(dir)?;
        let mut store = Store::load(dir, db, key, Some(lock))?;
        if v1::present(dir) {
            store.migration = migrate::report(&store.db)?;
        }
        Ok(store)
    }

    /// A reader for lookups by local id or pseudonym alone (the local
    /// service): like `open` with `LockMode::Read`, without reading the
    /// task ledger into memory, which such a reader never consults.
    pub(crate) fn open_lookups(dir: &Path, key: StoreKey) -> Result<Store, StoreError> {
        if dir.join(db::FILE).exists() && !v1::present(dir) {
            let db = Db::reader(dir)?;
            if db.version()? == db::current_version() && !legacy_rows(&db)? {
                return Store::load_with(dir, db, key, None, false);
            }
        }
        Store::open(dir, LockMode::Read, key)
    }

    fn load(dir: &Path, db: Db, key: StoreKey, lock: Option<File>) -> Result<Store, StoreError> {
        Store::load_with(dir, db, key, lock, true)
    }

    /// Reads what is held in memory, in one read transaction (a reader sees
    /// one committed write, never part of one). A new database gets its key
    /// and first manifest here.
    fn load_with(
        dir: &Path,
        mut db: Db,
        key: StoreKey,
        lock: Option<File>,
        with_ledger: bool,
    ) -> Result<Store, StoreError> {
        let path = db.path().to_path_buf();
        let tx = db.connection_mut().transaction().map_err(sql(&path, "start reading"))?;
        let stored: Option<String> = tx
            .query_row("SELECT value FROM meta WHERE key = 'key_id'", [], |r| r.get(0))
            .optional()
            .map_err(sql(&path, "read the store key's id"))?;
        let held = match stored {
            None if lock.is_some() => {
                let held = Held::default();
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('key_id', ?1), ('manifest', ?2)",
                    params![key.id(), rows::seal_manifest(&key, &held.manifest)],
                )
                .map_err(sql(&path, "initialise the store"))?;
                held
            }
            // (A reader of a database whose writer has not initialised it
            // yet: an empty store.)
            None => Held::default(),
            Some(stored) if stored != key.id() => {
                return Err(StoreError::WrongKey {
                    path,
                    stored,
                    given: key.id().to_string(),
                });
            }
            Some(_) => read_state(&tx, &key, &path, with_ledger)?,
        };
        tx.commit().map_err(sql(&path, "finish reading"))?;
        let needs_study = legacy_rows(&db)?;
        Ok(Store {
            dir: dir.to_path_buf(),
            lock,
            db,
            key,
            ledger: held.ledger,
            polls: held.polls,
            forgotten: held.forgotten,
            manifest: held.manifest,
            poisoned: false,
            migration: None,
            needs_study,
            audit: None,
        })
    }

    /// Whether rows from before several studies wait for `adopt_legacy`.
    pub fn needs_study(&self) -> bool {
        self.needs_study
    }

    /// Gives the pseudonyms, enrolments, polls and ledger entries of a store
    /// from before several studies to `study` (the configured one, or the
    /// first configured): sealed again with their study, ledger keys
    /// qualified by it, in one transaction. False if there was nothing to do.
    pub(crate) fn adopt_legacy(&mut self, study: &str) -> Result<bool, StoreError> {
        if !self.needs_study {
            return Ok(false);
        }
        self.writable()?;
        let pseudonyms: Vec<PseudonymRecord> = self
            .all_pseudonyms()?
            .into_iter()
            .filter(|p| p.study.is_empty())
            .map(|p| PseudonymRecord {
                study: study.to_string(),
                ..p
            })
            .collect();
        let enrolments: Vec<rows::Enrolment> = self
            .all_enrolments()?
            .into_iter()
            .filter(|e| e.study.is_empty())
            .map(|e| rows::Enrolment {
                study: study.to_string(),
                ..e
            })
            .collect();
        let polls: Vec<PollRecord> = self
            .polls
            .get("")
            .map(|p| PollRecord {
                study: study.to_string(),
                ..p.clone()
            })
            .into_iter()
            .collect();
        let ledger: Vec<(String, LedgerEntry)> = self
            .ledger
            .values()
            .filter(|e| !e.key.contains('/'))
            .map(|e| {
                let moved = LedgerEntry {
                    key: records::ledger_key(study, &e.key),
                    ..e.clone()
                };
                (e.key.clone(), moved)
            })
            .collect();
        let manifest = self.next_manifest();
        self.transact("give the store's rows their study", manifest, |tx, key| {
            tx.execute_batch(
                "DELETE FROM pseudonyms WHERE study = ''; DELETE FROM enrolments WHERE study = ''; \
                 DELETE FROM polls WHERE study = ''; DELETE FROM meta WHERE key = 'needs_study';",
            )?;
            let (mut staged, mut poll) = (HashMap::new(), Vec::new());
            let none = Ledger::default();
            for p in pseudonyms {
                put(tx, key, &Record::Pseudonym(p), &none, &mut staged, &mut poll)?;
            }
            for e in &enrolments {
                put_enrolment(tx, &rows::seal_enrolment(key, e))?;
            }
            for p in &polls {
                put(tx, key, &Record::Poll(p.clone()), &none, &mut staged, &mut poll)?;
            }
            for (old, e) in &ledger {
                tx.execute(
                    "DELETE FROM ledger WHERE key_index = ?1",
                    [&rows::ledger_index(key, old)[..]],
                )?;
                put_ledger(tx, key, e)?;
            }
            Ok(())
        })?;
        for (old, e) in ledger {
            self.ledger.remove(&old);
            self.ledger.insert(e.key.clone(), e);
        }
        self.polls.remove("");
        for p in polls {
            self.polls.insert(p.study.clone(), p);
        }
        self.needs_study = false;
        Ok(true)
    }

    /// Follows the audit log's links from now on (`AuditLinks`).
    pub(crate) fn link_audit(&mut self, links: AuditLinks) {
        links
            .store_generation
            .fetch_max(self.manifest.generation, std::sync::atomic::Ordering::AcqRel);
        self.audit = Some(links);
    }

    /// Whether the store and the audit log whose saved head holds
    /// `head_store_generation` and `head_seq` are copies of different moments.
    pub(crate) fn diverges_from(
        &self,
        head_store_generation: Option<u64>,
        head_seq: Option<u64>,
    ) -> Option<Divergence> {
        if let Some(g) = head_store_generation
            && g > self.manifest.generation
        {
            return Some(Divergence::StoreOlder {
                store: self.manifest.generation,
                audit_says: g,
            });
        }
        let audit = head_seq.unwrap_or(0);
        (self.manifest.audit_seq > audit).then_some(Divergence::AuditOlder {
            audit,
            store_saw: self.manifest.audit_seq,
        })
    }

    /// Takes a restored store or audit log as it is (after
    /// `--accept-restore`): the generation moves past what the audit log
    /// saw, and the audit position seen becomes the log's own.
    pub fn accept_restore(
        &mut self,
        head_store_generation: Option<u64>,
        head_seq: Option<u64>,
    ) -> Result<(), StoreError> {
        self.writable()?;
        let path = self.path();
        let mut manifest = self.manifest.clone();
        manifest.generation = manifest.generation.max(head_store_generation.unwrap_or(0)) + 1;
        manifest.audit_seq = head_seq.unwrap_or(0);
        self.db
            .connection()
            .execute(
                "UPDATE meta SET value = ?1 WHERE key = 'manifest'",
                [rows::seal_manifest(&self.key, &manifest)],
            )
            .map_err(sql(&path, "accept the restored copy"))?;
        self.committed(manifest);
        Ok(())
    }

    /// The manifest of the next write: one generation more, and the audit
    /// log's position as last made durable.
    fn next_manifest(&self) -> Manifest {
        let mut m = self.manifest.clone();
        m.generation += 1;
        if let Some(links) = &self.audit {
            m.audit_seq = m
                .audit_seq
                .max(links.durable_seq.load(std::sync::atomic::Ordering::Acquire));
        }
        m
    }

    /// One write transaction beside `write`'s: `body` with the store key,
    /// then `manifest` sealed, then the commit (a failed commit ends this
    /// handle's writes); memory follows only a commit.
    fn transact<T>(
        &mut self,
        what: &'static str,
        manifest: Manifest,
        body: impl FnOnce(&Transaction<'_>, &StoreKey) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        self.writable()?;
        let path = self.path();
        let tx = self
            .db
            .connection_mut()
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql(&path, "start a write"))?;
        let out = body(&tx, &self.key)
            .and_then(|out| {
                tx.execute(
                    "UPDATE meta SET value = ?1 WHERE key = 'manifest'",
                    [rows::seal_manifest(&self.key, &manifest)],
                )?;
                Ok(out)
            })
            .map_err(sql(&path, what))?;
        if let Err(e) = tx.commit() {
            self.poisoned = true;
            return Err(sql(&path, what)(e));
        }
        self.committed(manifest);
        Ok(out)
    }

    /// A write with `manifest` is on disk.
    fn committed(&mut self, manifest: Manifest) {
        if let Some(links) = &self.audit {
            links
                .store_generation
                .fetch_max(manifest.generation, std::sync::atomic::Ordering::AcqRel);
        }
        self.manifest = manifest;
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Closes the database (its WAL checkpointed) but leaves the ledger's
    /// memory to the OS: for a process that ends next (freeing 100,000
    /// ledger entries one by one takes half a second).
    pub(crate) fn close_and_exit_soon(mut self) {
        std::mem::forget(std::mem::take(&mut self.ledger));
    }

    fn path(&self) -> PathBuf {
        self.db.path().to_path_buf()
    }

    /// The store's generation: one more with every write.
    #[cfg(test)]
    pub(crate) fn generation(&self) -> u64 {
        self.manifest.generation
    }

    /// The migration from a v1 store that waits to be audited (see
    /// `finish_migration`).
    pub(crate) fn pending_migration(&self) -> Option<&MigrationReport> {
        self.migration.as_ref()
    }

    /// Once the migration is in the audit log: the old files get a `.v1`
    /// suffix (never deleted: they are the way back).
    pub(crate) fn finish_migration(&mut self) -> Result<(), StoreError> {
        if self.migration.take().is_some() {
            migrate::retire_old_files(&self.dir)?;
        }
        Ok(())
    }

    fn writable(&self) -> Result<(), StoreError> {
        if self.lock.is_none() {
            return Err(StoreError::ReadOnly { path: self.path() });
        }
        if self.poisoned {
            return Err(StoreError::Poisoned { path: self.path() });
        }
        Ok(())
    }

    /// Writes the records in one transaction, on disk when this returns;
    /// then memory follows. Nothing is applied if the write fails.
    pub fn write(&mut self, records: Vec<Record>) -> Result<(), StoreError> {
        self.writable()?;
        if records.is_empty() {
            return Ok(());
        }
        let path = self.path();
        let mut staged: HashMap<String, Option<LedgerEntry>> = HashMap::new();
        let mut poll = Vec::new();
        let manifest = self.next_manifest();
        let tx = self
            .db
            .connection_mut()
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql(&path, "start a write"))?;
        for r in &records {
            put(&tx, &self.key, r, &self.ledger, &mut staged, &mut poll).map_err(sql(&path, "write"))?;
        }
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'manifest'",
            [rows::seal_manifest(&self.key, &manifest)],
        )
        .map_err(sql(&path, "write the manifest"))?;
        crate::crashpoint::hit("store:committing");
        if let Err(e) = tx.commit() {
            self.poisoned = true;
            return Err(sql(&path, "commit a write")(e));
        }
        crate::crashpoint::hit("store:committed");
        self.committed(manifest);
        // (In the records' order: new entries take their places in the
        // ledger in the order they arrived, as their rows did.)
        for r in &records {
            let k = match r {
                Record::Ledger(e) => &e.key,
                Record::Progress(p) => &p.key,
                Record::Purge { key } => key,
                _ => continue,
            };
            match staged.remove(k) {
                Some(Some(e)) => self.ledger.insert(k.clone(), e),
                Some(None) => self.ledger.remove(k),
                None => {}
            }
        }
        for p in poll {
            self.polls.insert(p.study.clone(), p);
        }
        Ok(())
    }

    pub fn put(&mut self, record: Record) -> Result<(), StoreError> {
        self.write(vec![record])
    }

    fn patient_row(&self, clause: &str, index: &Index) -> Result<Option<rows::PatientRow>, StoreError> {
        let path = self.path();
        self.db
            .connection()
            .prepare_cached(&format!(
                "SELECT id_index, bf_index, id_sealed, sealed, updated FROM patients WHERE {clause} \
                 ORDER BY rowid DESC LIMIT 1"
            ))
            .and_then(|mut s| s.query_row([&index[..]], patient_row).optional())
            .map_err(sql(&path, "read a patient"))
    }

    /// A patient as found by an index; an erased patient is absent even if
    /// her record is there (an interrupted forget, a replayed write).
    fn open_found(&self, row: Option<rows::PatientRow>) -> Result<Option<PatientRecord>, StoreError> {
        let Some(row) = row else { return Ok(None) };
        let p = rows::open_patient(&self.key, &row).map_err(tampered(&self.path()))?;
        if self.is_forgotten(&p.local_id) {
            log::warn!(
                "patient {} was erased but her record is in the store again (an interrupted forget: run it \
                 again; or a replayed write): treated as absent",
                p.local_id.fingerprint()
            );
            return Ok(None);
        }
        Ok(Some(p))
    }

    /// A patient's record.
    pub fn patient(&self, id: &LocalId) -> Result<Option<PatientRecord>, StoreError> {
        let row = self.patient_row("id_index = ?1", &rows::id_index(&self.key, id))?;
        self.open_found(row)
    }

    /// The local id of the patient with this Bloom filter (her IDAT stays
    /// sealed).
    pub(crate) fn local_id_by_bloomfilter(&self, bf: &BloomFilter) -> Result<Option<LocalId>, StoreError> {
        let Some(row) = self.patient_row("bf_index = ?1", &rows::bf_index(&self.key, bf))? else {
            return Ok(None);
        };
        let id = rows::open_local_id(&self.key, &row.id_index, &row.id_sealed).map_err(tampered(&self.path()))?;
        Ok((!self.is_forgotten(&id)).then_some(id))
    }

    /// The patient with this Bloom filter. The opened record must hold the
    /// very filter asked for, or the store was altered.
    pub fn patient_by_bloomfilter(&self, bf: &BloomFilter) -> Result<Option<PatientRecord>, StoreError> {
        let row = self.patient_row("bf_index = ?1", &rows::bf_index(&self.key, bf))?;
        let patient = self.open_found(row)?;
        if patient.as_ref().is_some_and(|p| p.bloomfilter.as_ref() != Some(bf)) {
            return Err(tampered(&self.path())(OpenError::Mismatch { what: "patient" }));
        }
        Ok(patient)
    }

    fn pseudonym_row(
        &self,
        clause: &str,
        index: &Index,
        study: &str,
    ) -> Result<Option<rows::PseudonymRow>, StoreError> {
        let path = self.path();
        self.db
            .connection()
            .prepare_cached(&format!(
                "SELECT bf_index, study, target, psn_index, received, source, sealed FROM pseudonyms \
                 WHERE {clause} AND study = ?2 LIMIT 1"
            ))
            .and_then(|mut s| s.query_row(params![&index[..], study], pseudonym_row).optional())
            .map_err(sql(&path, "read a pseudonym"))
    }

    /// The patient whose pseudonym in `study` is `value` (a pseudonym of
    /// another study never leads to her). The sealed
    /// pseudonym found must hold `value`, and the patient it leads to the
    /// filter it was issued for, or the store was altered.
    pub fn patient_by_pseudonym(&self, study: &str, value: &str) -> Result<Option<PatientRecord>, StoreError> {
        let Some(row) = self.pseudonym_row("psn_index = ?1", &rows::psn_index(&self.key, value), study)? else {
            return Ok(None);
        };
        let p = rows::open_pseudonym(&self.key, &row).map_err(tampered(&self.path()))?;
        if p.pseudonym.value != value {
            return Err(tampered(&self.path())(OpenError::Mismatch { what: "pseudonym" }));
        }
        self.patient_by_bloomfilter(&p.bloomfilter)
    }

    /// The patient a task of `study` names: by pseudonym (of that study),
    /// else by Bloom filter.
    pub(crate) fn find_patient(
        &self,
        study: &str,
        pseudonym: Option<&crate::types::Pseudonym>,
        bloomfilter: Option<&BloomFilter>,
    ) -> Result<Option<PatientRecord>, StoreError> {
        if let Some(p) = pseudonym
            && let Some(found) = self.patient_by_pseudonym(study, &p.value)?
        {
            return Ok(Some(found));
        }
        match bloomfilter {
            Some(bf) => self.patient_by_bloomfilter(bf),
            None => Ok(None),
        }
    }

    /// The pseudonym issued in `study` for this Bloom filter.
    pub fn pseudonym(&self, bf: &BloomFilter, study: &str) -> Result<Option<PseudonymRecord>, StoreError> {
        let Some(row) = self.pseudonym_row("bf_index = ?1", &rows::bf_index(&self.key, bf), study)? else {
            return Ok(None);
        };
        let p = rows::open_pseudonym(&self.key, &row).map_err(tampered(&self.path()))?;
        if p.bloomfilter != *bf {
            return Err(tampered(&self.path())(OpenError::Mismatch { what: "pseudonym" }));
        }
        Ok(Some(p))
    }

    /// The local patient with this Bloom filter and the pseudonym stored
    /// for it in `study`.
    pub(crate) fn patient_and_pseudonym(
        &self,
        bf: &BloomFilter,
        study: &str,
    ) -> Result<(Option<LocalId>, Option<PseudonymRecord>), StoreError> {
        Ok((self.local_id_by_bloomfilter(bf)?, self.pseudonym(bf, study)?))
    }

    /// `patient_and_pseudonym` for each of `bfs`, in two statements (a
    /// batch's answer is recorded with one lookup per table, not two per
    /// filter); the same checks as one at a time.
    pub(crate) fn patients_and_pseudonyms(&self, bfs: &[&BloomFilter], study: &str) -> Result<Vec<Found>, StoreError> {
        let path = self.path();
        let indexes: Vec<Index> = bfs.iter().map(|bf| rows::bf_index(&self.key, bf)).collect();
        if indexes.is_empty() {
            return Ok(Vec::new());
        }
        let marks = vec!["?"; indexes.len()].join(",");
        let values = || rusqlite::params_from_iter(indexes.iter().map(|i| &i[..]));
        // The newest patient row per filter, as `patient_row` picks it.
        let mut patients: HashMap<Index, (i64, rows::PatientRow)> = HashMap::with_capacity(indexes.len());
        {
            let conn = self.db.connection();
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT id_index, bf_index, id_sealed, sealed, updated, rowid FROM patients \
                     WHERE bf_index IN ({marks})"
                ))
                .map_err(sql(&path, "read patients"))?;
            let mut rows = stmt.query(values()).map_err(sql(&path, "read patients"))?;
            while let Some(r) = rows.next().map_err(sql(&path, "read patients"))? {
                let row = patient_row(r).map_err(sql(&path, "read patients"))?;
                let rowid: i64 = r.get(5).map_err(sql(&path, "read patients"))?;
                let Some(bf_index) = row.bf_index else { continue };
                if patients.get(&bf_index).is_none_or(|(known, _)| *known < rowid) {
                    patients.insert(bf_index, (rowid, row));
                }
            }
        }
        let mut pseudonyms: HashMap<Index, rows::PseudonymRow> = HashMap::with_capacity(indexes.len());
        {
            let conn = self.db.connection();
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT bf_index, study, target, psn_index, received, source, sealed FROM pseudonyms \
                     WHERE study = ? AND bf_index IN ({marks})"
                ))
                .map_err(sql(&path, "read pseudonyms"))?;
            let params = std::iter::once(rusqlite::types::Value::from(study.to_string()))
                .chain(indexes.iter().map(|i| rusqlite::types::Value::from(i.to_vec())));
            let mut rows = stmt
                .query(rusqlite::params_from_iter(params))
                .map_err(sql(&path, "read pseudonyms"))?;
            while let Some(r) = rows.next().map_err(sql(&path, "read pseudonyms"))? {
                let row = pseudonym_row(r).map_err(sql(&path, "read pseudonyms"))?;
                pseudonyms.insert(row.bf_index, row);
            }
        }
        let mut out = Vec::with_capacity(bfs.len());
        for (bf, index) in bfs.iter().zip(&indexes) {
            let id = match patients.get(index) {
                Some((_, row)) => {
                    let id = rows::open_local_id(&self.key, &row.id_index, &row.id_sealed).map_err(tampered(&path))?;
                    (!self.is_forgotten(&id)).then_some(id)
                }
                None => None,
            };
            let psn = match pseudonyms.get(index) {
                Some(row) => {
                    let p = rows::open_pseudonym(&self.key, row).map_err(tampered(&path))?;
                    if p.bloomfilter != **bf {
                        return Err(tampered(&path)(OpenError::Mismatch { what: "pseudonym" }));
                    }
                    Some(p)
                }
                None => None,
            };
            out.push((id, psn));
        }
        Ok(out)
    }

    /// Every pseudonym, decrypted (for tests, exports and re-keying).
    pub fn all_pseudonyms(&self) -> Result<Vec<PseudonymRecord>, StoreError> {
        let path = self.path();
        let mut out = Vec::new();
        for_each_row(
            self.db.connection(),
            &path,
            "read the pseudonyms",
            "SELECT bf_index, study, target, psn_index, received, source, sealed FROM pseudonyms",
            [],
            pseudonym_row,
            |row| {
                out.push(rows::open_pseudonym(&self.key, &row).map_err(tampered(&path))?);
                Ok(())
            },
        )?;
        Ok(out)
    }

    /// Every pseudonym with the local patient its Bloom filter names, if
    /// any (the export: `pseudonyms`).
    pub(crate) fn pseudonyms_with_patients(&self) -> Result<Vec<(PseudonymRecord, Option<LocalId>)>, StoreError> {
        self.all_pseudonyms()?
            .into_iter()
            .map(|p| {
                let id = self.local_id_by_bloomfilter(&p.bloomfilter)?;
                Ok((p, id))
            })
            .collect()
    }

    /// Every patient, decrypted (for tests, exports and re-keying).
    pub fn all_patients(&self) -> Result<Vec<PatientRecord>, StoreError> {
        let path = self.path();
        let mut out = Vec::new();
        for_each_row(
            self.db.connection(),
            &path,
            "read the patients",
            "SELECT id_index, bf_index, id_sealed, sealed, updated FROM patients",
            [],
            patient_row,
            |row| {
                let p = rows::open_patient(&self.key, &row).map_err(tampered(&path))?;
                if !self.is_forgotten(&p.local_id) {
                    out.push(p);
                }
                Ok(())
            },
        )?;
        Ok(out)
    }

    fn count(&self, query: &str) -> Result<usize, StoreError> {
        let path = self.path();
        self.db
            .connection()
            .query_row(query, [], |r| r.get::<_, i64>(0))
            .map(|n| usize::try_from(n).unwrap_or(0))
            .map_err(sql(&path, "count"))
    }

    pub fn patient_count(&self) -> Result<usize, StoreError> {
        self.count("SELECT count(*) FROM patients")
    }

    pub(crate) fn patients_with_bloomfilter(&self) -> Result<usize, StoreError> {
        self.count("SELECT count(*) FROM patients WHERE bf_index IS NOT NULL")
    }

    pub fn pseudonym_count(&self) -> Result<usize, StoreError> {
        self.count("SELECT count(*) FROM pseudonyms")
    }

    /// Local ids of the patients a query selects (`id_index, id_sealed`),
    /// sorted; their IDAT stays sealed.
    fn ids(&self, query: &str, params: impl rusqlite::Params) -> Result<Vec<LocalId>, StoreError> {
        let path = self.path();
        let mut out = Vec::new();
        for_each_row(
            self.db.connection(),
            &path,
            "list patients",
            query,
            params,
            |r| Ok((blob_index(r, 0)?, r.get::<_, Vec<u8>>(1)?)),
            |(index, sealed)| {
                let id = rows::open_local_id(&self.key, &index, &sealed).map_err(tampered(&path))?;
                if !self.is_forgotten(&id) {
                    out.push(id);
                }
                Ok(())
            },
        )?;
        out.sort();
        Ok(out)
    }

    /// Patients with a Bloom filter but no pseudonym in `study`.
    pub(crate) fn without_pseudonym(&self, study: &str) -> Result<Vec<LocalId>, StoreError> {
        self.ids(
            "SELECT id_index, id_sealed FROM patients p WHERE bf_index IS NOT NULL AND NOT EXISTS \
             (SELECT 1 FROM pseudonyms q WHERE q.bf_index = p.bf_index AND q.study = ?1)",
            [study],
        )
    }

    /// Patients without a Bloom filter.
    pub(crate) fn without_bloomfilter(&self) -> Result<Vec<LocalId>, StoreError> {
        self.ids("SELECT id_index, id_sealed FROM patients WHERE bf_index IS NULL", [])
    }

    /// Every patient.
    pub(crate) fn local_ids(&self) -> Result<Vec<LocalId>, StoreError> {
        self.ids("SELECT id_index, id_sealed FROM patients", [])
    }

    /// A patient's enrolment in `study`, compared with `current`, their
    /// filter now.
    pub fn enrolment(
        &self,
        id: &LocalId,
        study: &str,
        current: Option<&BloomFilter>,
    ) -> Result<Option<EnrolmentState>, StoreError> {
        let Some(e) = self.enrolment_record(id, study)? else {
            return Ok(None);
        };
        Ok(Some(EnrolmentState {
            status: e.status,
            detail: e.detail,
            updated: e.updated,
            same_filter: current.is_some_and(|bf| rows::bf_index(&self.key, bf) == e.bf_index),
        }))
    }

    pub(crate) fn enrolment_counts(&self) -> Result<BTreeMap<EnrolmentStatus, usize>, StoreError> {
        let path = self.path();
        let mut counts = BTreeMap::new();
        for_each_row(
            self.db.connection(),
            &path,
            "count enrolments",
            "SELECT status, count(*) FROM enrolments GROUP BY status",
            [],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
            |(status, n)| {
                let status = rows::enrolment_status(&status)
                    .ok_or_else(|| tampered(&path)(OpenError::layout("enrolment status")))?;
                counts.insert(status, usize::try_from(n).unwrap_or(0));
                Ok(())
            },
        )?;
        Ok(counts)
    }

    pub(crate) fn key_id(&self) -> &str {
        self.key.id()
    }

    /// Whether `id` was erased by `forget`: `import` skips it.
    pub(crate) fn is_forgotten(&self, id: &LocalId) -> bool {
        self.forgotten.contains(id.0.as_str())
    }

    /// The manifest after the tombstones change to `ids`.
    fn manifest_with(&self, ids: &BTreeSet<String>) -> Manifest {
        let indexes: Vec<Index> = ids
            .iter()
            .map(|id| rows::tombstone_index(&self.key, &LocalId(id.clone())))
            .collect();
        Manifest {
            tombstones: ids.len() as u64,
            tombstone_digest: rows::tombstone_digest(indexes.iter()),
            ..self.next_manifest()
        }
    }

    /// Removes a patient's IDAT and Bloom filter for good, and keeps a
    /// tombstone so that no later import brings her back. With
    /// `secure_delete` her rows' bytes are overwritten, and the checkpoint
    /// after the commit empties the WAL of every copy of them.
    pub fn forget(&mut self, id: &LocalId) -> Result<bool, StoreError> {
        self.writable()?;
        let mut ids = self.forgotten.clone();
        ids.insert(id.0.clone());
        let manifest = self.manifest_with(&ids);
        let (tombstone, sealed) = rows::seal_tombstone(&self.key, id);
        let index = rows::id_index(&self.key, id);
        let erased = self.transact("erase a patient", manifest, |tx, _| {
            tx.execute(
                "INSERT OR REPLACE INTO tombstones (tombstone_index, sealed) VALUES (?1, ?2)",
                params![&tombstone[..], sealed],
            )?;
            let erased = tx.execute("DELETE FROM patients WHERE id_index = ?1", [&index[..]])? > 0;
            tx.execute("DELETE FROM enrolments WHERE id_index = ?1", [&index[..]])?;
            Ok(erased)
        })?;
        self.forgotten = ids;
        self.checkpoint()?;
        if !v1::files(&self.dir).is_empty() || migrate::retired_files(&self.dir).next().is_some() {
            log::warn!(
                "the store's files from before the database (*.v1 in {}) still hold the erased patient's \
                 sealed data: delete them once the migrated store has run well",
                self.dir.display()
            );
        }
        Ok(erased)
    }

    /// Copies every page of the WAL into the database and empties it, so
    /// that what was deleted lives on in no copy. A reader holding an old
    /// snapshot makes this wait (the busy timeout) or fail: then the copy
    /// stays until the next checkpoint, and the caller is told.
    fn checkpoint(&mut self) -> Result<(), StoreError> {
        let path = self.path();
        let (busy, _, _): (i64, i64, i64) = self
            .db
            .connection()
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .map_err(sql(&path, "checkpoint the write-ahead log"))?;
        if busy != 0 {
            return Err(StoreError::Io {
                op: "empty the write-ahead log (a reader is holding it; run the command again)",
                path: path.with_extension("sqlite3-wal"),
                source: std::io::Error::from(std::io::ErrorKind::ResourceBusy),
            });
        }
        Ok(())
    }

    /// Takes back a mistaken erasure: the next import may bring the patient
    /// back (her data is gone: it comes only from that import). False if
    /// `id` was not erased.
    pub(crate) fn unforget(&mut self, id: &LocalId) -> Result<bool, StoreError> {
        self.writable()?;
        if !self.forgotten.contains(id.0.as_str()) {
            return Ok(false);
        }
        let mut ids = self.forgotten.clone();
        ids.remove(id.0.as_str());
        let manifest = self.manifest_with(&ids);
        self.transact("take back an erasure", manifest, |tx, key| {
            tx.execute(
                "DELETE FROM tombstones WHERE tombstone_index = ?1",
                [&rows::tombstone_index(key, id)[..]],
            )
            .map(drop)
        })?;
        self.forgotten = ids;
        Ok(true)
    }

    /// Re-encrypts the whole store under `new` in one transaction: a crash
    /// before its commit leaves the store under the old key, after it under
    /// the new one.
    pub fn rekey(&mut self, new: StoreKey) -> Result<(), StoreError> {
        self.writable()?;
        let path = self.path();
        let patients = self.all_patients()?;
        let pseudonyms = self.all_pseudonyms()?;
        let by_id: HashMap<&str, &PatientRecord> = patients.iter().map(|p| (p.local_id.0.as_str(), p)).collect();
        let mut enrolments = Vec::new();
        for e in self.all_enrolments()? {
            let Some(p) = by_id.get(e.local_id.0.as_str()) else {
                continue;
            };
            // Only the index of the filter sent is kept, which cannot be
            // recomputed under a new key without the filter: it is taken
            // from the patient when it is still her filter; otherwise it
            // becomes one no filter has, which keeps what matters.
            let still = p
                .bloomfilter
                .as_ref()
                .filter(|bf| rows::bf_index(&self.key, bf) == e.bf_index);
            let bf_index = still.map_or(rows::NO_FILTER, |bf| rows::bf_index(&new, bf));
            enrolments.push(rows::Enrolment { bf_index, ..e });
        }
        let forgotten: Vec<LocalId> = self.forgotten.iter().map(|id| LocalId(id.clone())).collect();
        let mut manifest = self.next_manifest();
        let indexes: Vec<Index> = forgotten.iter().map(|id| rows::tombstone_index(&new, id)).collect();
        manifest.tombstone_digest = rows::tombstone_digest(indexes.iter());
        let tx = self
            .db
            .connection_mut()
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql(&path, "start a write"))?;
        (|| {
            tx.execute_batch(
                "DELETE FROM patients; DELETE FROM pseudonyms; DELETE FROM ledger_tasks; DELETE FROM ledger; \
                 DELETE FROM enrolments; \
                 DELETE FROM tombstones; DELETE FROM polls;",
            )?;
            let mut ignored = (HashMap::new(), Vec::new());
            for p in patients {
                put(
                    &tx,
                    &new,
                    &Record::Patient(p),
                    &Ledger::default(),
                    &mut ignored.0,
                    &mut ignored.1,
                )?;
            }
            for p in pseudonyms {
                put(
                    &tx,
                    &new,
                    &Record::Pseudonym(p),
                    &Ledger::default(),
                    &mut ignored.0,
                    &mut ignored.1,
                )?;
            }
            for e in self.ledger.values() {
                put_ledger(&tx, &new, e)?;
            }
            for e in &enrolments {
                put_enrolment(&tx, &rows::seal_enrolment(&new, e))?;
            }
            for id in &forgotten {
                let (index, sealed) = rows::seal_tombstone(&new, id);
                tx.execute(
                    "INSERT INTO tombstones (tombstone_index, sealed) VALUES (?1, ?2)",
                    params![&index[..], sealed],
                )?;
            }
            for p in self.polls.values() {
                tx.execute(
                    "INSERT INTO polls (study, sealed) VALUES (?1, ?2)",
                    params![p.study, rows::seal_poll(&new, p)],
                )?;
            }
            tx.execute("UPDATE meta SET value = ?1 WHERE key = 'key_id'", [new.id()])?;
            tx.execute(
                "UPDATE meta SET value = ?1 WHERE key = 'manifest'",
                [rows::seal_manifest(&new, &manifest)],
            )?;
            tx.commit()
        })()
        .map_err(sql(&path, "re-key the store"))?;
        self.key = new;
        self.committed(manifest);
        // Old seals live on in freed pages and the WAL until overwritten.
        self.checkpoint()?;
        Ok(())
    }

    fn all_enrolments(&self) -> Result<Vec<rows::Enrolment>, StoreError> {
        let path = self.path();
        let mut out = Vec::new();
        for_each_row(
            self.db.connection(),
            &path,
            "read the enrolments",
            "SELECT id_index, study, bf_index, status, updated, sealed FROM enrolments",
            [],
            enrolment_row,
            |row| {
                out.push(rows::open_enrolment(&self.key, &row).map_err(tampered(&path))?);
                Ok(())
            },
        )?;
        Ok(out)
    }

    fn enrolment_record(&self, id: &LocalId, study: &str) -> Result<Option<rows::Enrolment>, StoreError> {
        let path = self.path();
        let row = self
            .db
            .connection()
            .prepare_cached(
                "SELECT id_index, study, bf_index, status, updated, sealed FROM enrolments \
                 WHERE id_index = ?1 AND study = ?2",
            )
            .and_then(|mut s| {
                s.query_row(params![&rows::id_index(&self.key, id)[..], study], enrolment_row)
                    .optional()
            })
            .map_err(sql(&path, "read an enrolment"))?;
        row.map(|r| rows::open_enrolment(&self.key, &r))
            .transpose()
            .map_err(tampered(&path))
    }

    /// An online, consistent copy of the store into the new directory
    /// `dest` (`VACUUM INTO`: the last committed write, compacted), usable
    /// as `[store] path` as it is. The key is not in it: back it up apart.
    pub fn backup(&self, dest: &Path) -> Result<PathBuf, StoreError> {
        let path = self.path();
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dest)
            .map_err(io("create the backup directory (it must not exist yet)", dest))?;
        let file = dest.join(db::FILE);
        let name = file
            .to_str()
            .ok_or_else(|| io("name the backup file", dest)(std::io::ErrorKind::InvalidFilename.into()))?;
        db::create_private(&file).map_err(io("create the backup file", &file))?;
        self.db
            .connection()
            .execute("VACUUM INTO ?1", [name])
            .map_err(sql(&path, "write the backup"))?;
        File::open(&file)
            .and_then(|f| f.sync_all())
            .and_then(|()| File::open(dest))
            .and_then(|d| d.sync_all())
            .map_err(io("sync the backup", &file))?;
        Ok(file)
    }

    pub fn ledger(&self, key: &str) -> Option<&LedgerEntry> {
        self.ledger.get(key)
    }

    /// Room in memory for `n` more ledger entries, made at once: growing
    /// the table step by step while 100,000 tasks arrive holds the old
    /// table and the new one at each step.
    pub(crate) fn reserve_ledger(&mut self, n: usize) {
        self.ledger.reserve(n);
    }

    pub fn ledger_entries(&self) -> impl Iterator<Item = &LedgerEntry> {
        self.ledger.values()
    }

    /// The ledger in the order its entries arrived.
    pub(crate) fn ledger_in_arrival_order(&self) -> Vec<&LedgerEntry> {
        self.ledger.in_arrival_order()
    }

    /// The last poll of the study that fares worst: the most failures in a
    /// row, then the oldest success (what `status` must warn about).
    pub fn last_poll(&self) -> Option<&PollRecord> {
        self.polls
            .values()
            .max_by_key(|p| (p.failures, std::cmp::Reverse(p.last_ok)))
    }

    /// The last poll of each study.
    pub fn last_polls(&self) -> &BTreeMap<String, PollRecord> {
        &self.polls
    }
}

/// What a store holds in memory, read in the transaction of `Store::load`.
struct Held {
    ledger: Ledger,
    /// The last poll of each study.
    polls: BTreeMap<String, PollRecord>,
    forgotten: BTreeSet<String>,
    manifest: Manifest,
}

impl Default for Held {
    fn default() -> Held {
        Held {
            ledger: Ledger::default(),
            polls: BTreeMap::new(),
            forgotten: BTreeSet::new(),
            manifest: Manifest {
                generation: 0,
                tombstones: 0,
                tombstone_digest: rows::tombstone_digest(std::iter::empty()),
                audit_seq: 0,
            },
        }
    }
}

fn read_state(tx: &Transaction<'_>, key: &StoreKey, path: &Path, with_ledger: bool) -> Result<Held, StoreError> {
    let mut held = Held::default();
    let bad = tampered(path);
    let manifest: Option<Vec<u8>> = tx
        .query_row("SELECT value FROM meta WHERE key = 'manifest'", [], |r| r.get(0))
        .optional()
        .map_err(sql(path, "read the manifest"))?;
    let manifest = manifest.ok_or_else(|| bad(OpenError::layout("manifest (missing)")))?;
    held.manifest = rows::open_manifest(key, &manifest).map_err(&bad)?;

    let mut indexes = Vec::new();
    for_each_row(
        tx,
        path,
        "read the tombstones",
        "SELECT tombstone_index, sealed FROM tombstones",
        [],
        |r| Ok((blob_index(r, 0)?, r.get::<_, Vec<u8>>(1)?)),
        |(index, sealed)| {
            let id = rows::open_tombstone(key, &index, &sealed).map_err(&bad)?;
            held.forgotten.insert(id.0);
            indexes.push(index);
            Ok(())
        },
    )?;
    if indexes.len() as u64 != held.manifest.tombstones
        || rows::tombstone_digest(indexes.iter()) != held.manifest.tombstone_digest
    {
        return Err(bad(OpenError::Mismatch {
            what: "set of erased patients (a tombstone was added or removed without the key)",
        }));
    }

    if !with_ledger {
        return Ok(held);
    }
    for_each_row(
        tx,
        path,
        "read the ledger",
        "SELECT l.key_index, l.kind, l.status, l.outcome, l.expires, l.first_seen, l.last_seen, l.updated, \
         l.attempts, l.sealed, t.sealed FROM ledger l LEFT JOIN ledger_tasks t ON t.id = l.id ORDER BY l.id",
        [],
        |r| Ok((ledger_row(r)?, r.get::<_, Option<Vec<u8>>>(10)?)),
        |(row, task)| {
            let e = rows::open_ledger(key, &row, task.as_deref()).map_err(&bad)?;
            held.ledger.insert(e.key.clone(), e);
            Ok(())
        },
    )?;
    for_each_row(
        tx,
        path,
        "read the last polls",
        "SELECT study, sealed FROM polls",
        [],
        |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)),
        |(study, sealed)| {
            let p = rows::open_poll(key, &study, &sealed).map_err(&bad)?;
            held.polls.insert(study, p);
            Ok(())
        },
    )?;
    Ok(held)
}

/// Refuses a database written under another key (its meta data are the
/// same in every schema version).
fn check_key(db: &Db, key: &StoreKey) -> Result<(), StoreError> {
    let stored: Option<String> = db
        .connection()
        .query_row("SELECT value FROM meta WHERE key = 'key_id'", [], |r| r.get(0))
        .optional()
        .map_err(sql(db.path(), "read the store key's id"))?;
    match stored {
        Some(stored) if stored != key.id() => Err(StoreError::WrongKey {
            path: db.path().to_path_buf(),
            stored,
            given: key.id().to_string(),
        }),
        _ => Ok(()),
    }
}

/// Whether the database holds rows from before several studies.
fn legacy_rows(db: &Db) -> Result<bool, StoreError> {
    db.connection()
        .query_row("SELECT count(*) FROM meta WHERE key = 'needs_study'", [], |r| {
            r.get::<_, i64>(0)
        })
        .map(|n| n > 0)
        .map_err(sql(db.path(), "read the store's meta data"))
}

/// Runs `query` and hands each row, as `map` reads it, to `each` (rows
/// are streamed: the ledger of a re-keying is 100,000 of them).
fn for_each_row<T>(
    conn: &rusqlite::Connection,
    path: &Path,
    what: &'static str,
    query: &str,
    params: impl rusqlite::Params,
    map: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    mut each: impl FnMut(T) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(query).map_err(sql(path, what))?;
    let rows = stmt.query_map(params, map).map_err(sql(path, what))?;
    for row in rows {
        each(row.map_err(sql(path, what))?)?;
    }
    Ok(())
}

fn blob_index(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Index> {
    let v: Vec<u8> = r.get(i)?;
    v.try_into()
        .map_err(|_| rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Blob, "not an index".into()))
}

fn patient_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<rows::PatientRow> {
    let bf: Option<Vec<u8>> = r.get(1)?;
    Ok(rows::PatientRow {
        id_index: blob_index(r, 0)?,
        bf_index: match bf {
            Some(b) => Some(b.try_into().map_err(|_| {
                rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Blob, "not an index".into())
            })?),
            None => None,
        },
        id_sealed: r.get(2)?,
        sealed: r.get(3)?,
        updated: r.get(4)?,
    })
}

fn pseudonym_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<rows::PseudonymRow> {
    Ok(rows::PseudonymRow {
        bf_index: blob_index(r, 0)?,
        study: r.get(1)?,
        target: r.get(2)?,
        psn_index: blob_index(r, 3)?,
        received: r.get(4)?,
        source: r.get(5)?,
        sealed: r.get(6)?,
    })
}

fn ledger_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<rows::LedgerRow> {
    Ok(rows::LedgerRow {
        key_index: blob_index(r, 0)?,
        kind: r.get(1)?,
        status: r.get(2)?,
        outcome: r.get(3)?,
        expires: r.get(4)?,
        first_seen: r.get(5)?,
        last_seen: r.get(6)?,
        updated: r.get(7)?,
        attempts: r.get(8)?,
        sealed: r.get(9)?,
    })
}

fn enrolment_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<rows::EnrolmentRow> {
    Ok(rows::EnrolmentRow {
        id_index: blob_index(r, 0)?,
        study: r.get(1)?,
        bf_index: blob_index(r, 2)?,
        status: r.get(3)?,
        updated: r.get(4)?,
        sealed: r.get(5)?,
    })
}

/// A ledger entry, new or replacing the one with its key, with its task.
fn put_ledger(tx: &Transaction<'_>, key: &StoreKey, e: &LedgerEntry) -> rusqlite::Result<()> {
    let row = rows::seal_ledger(key, e);
    let id: i64 = tx
        .prepare_cached(
            "INSERT INTO ledger (key_index, kind, status, outcome, expires, first_seen, last_seen, updated, \
             attempts, sealed) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
             ON CONFLICT (key_index) DO UPDATE SET kind = excluded.kind, status = excluded.status, \
             outcome = excluded.outcome, expires = excluded.expires, first_seen = excluded.first_seen, \
             last_seen = excluded.last_seen, updated = excluded.updated, attempts = excluded.attempts, \
             sealed = excluded.sealed RETURNING id",
        )?
        .query_row(
            params![
                &row.key_index[..],
                row.kind,
                row.status,
                row.outcome,
                row.expires,
                row.first_seen,
                row.last_seen,
                row.updated,
                row.attempts,
                row.sealed
            ],
            |r| r.get(0),
        )?;
    match &e.task {
        Some(task) => {
            tx.prepare_cached("INSERT OR REPLACE INTO ledger_tasks (id, sealed) VALUES (?1, ?2)")?
                .execute(params![id, rows::seal_task(key, &row.key_index, task)])?;
        }
        None => {
            tx.prepare_cached("DELETE FROM ledger_tasks WHERE id = ?1")?
                .execute([id])?;
        }
    }
    Ok(())
}

/// A new state of an entry already written: the small row only (its task
/// does not change).
fn update_ledger(tx: &Transaction<'_>, key: &StoreKey, e: &LedgerEntry) -> rusqlite::Result<()> {
    let row = rows::seal_ledger(key, e);
    tx.prepare_cached(
        "UPDATE ledger SET status = ?2, outcome = ?3, last_seen = ?4, updated = ?5, attempts = ?6, sealed = ?7 \
         WHERE key_index = ?1",
    )?
    .execute(params![
        &row.key_index[..],
        row.status,
        row.outcome,
        row.last_seen,
        row.updated,
        row.attempts,
        row.sealed
    ])?;
    Ok(())
}

fn put_enrolment(tx: &Transaction<'_>, row: &rows::EnrolmentRow) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT OR REPLACE INTO enrolments (id_index, study, bf_index, status, updated, sealed) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        &row.id_index[..],
        row.study,
        &row.bf_index[..],
        row.status,
        row.updated,
        row.sealed
    ])?;
    Ok(())
}

/// Writes one record into the transaction. Ledger entries changed in it
/// are staged (`None`: purged) until the commit.
fn put(
    tx: &Transaction<'_>,
    key: &StoreKey,
    record: &Record,
    ledger: &Ledger,
    staged: &mut HashMap<String, Option<LedgerEntry>>,
    poll: &mut Vec<PollRecord>,
) -> rusqlite::Result<()> {
    match record {
        Record::Patient(p) => {
            let row = rows::seal_patient(key, p);
            // (REPLACE gives the row a new rowid: the newest record with a
            // filter is the one a lookup by that filter finds.)
            tx.prepare_cached(
                "INSERT OR REPLACE INTO patients (id_index, bf_index, id_sealed, sealed, updated) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                &row.id_index[..],
                row.bf_index.as_ref().map(|b| &b[..]),
                row.id_sealed,
                row.sealed,
                row.updated
            ])?;
        }
        Record::Pseudonym(p) => {
            let row = rows::seal_pseudonym(key, p);
            tx.prepare_cached(
                "INSERT OR REPLACE INTO pseudonyms (bf_index, study, target, psn_index, received, source, sealed) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                &row.bf_index[..],
                row.study,
                row.target,
                &row.psn_index[..],
                row.received,
                row.source,
                row.sealed
            ])?;
        }
        Record::Ledger(e) => {
            put_ledger(tx, key, e)?;
            staged.insert(e.key.clone(), Some(e.clone()));
        }
        Record::Progress(p) => {
            let current = match staged.get(&p.key) {
                Some(e) => e.clone(),
                None => ledger.get(&p.key).cloned(),
            };
            if let Some(mut e) = current {
                p.apply_to(&mut e);
                update_ledger(tx, key, &e)?;
                staged.insert(e.key.clone(), Some(e));
            }
        }
        Record::Poll(p) => {
            tx.prepare_cached("INSERT OR REPLACE INTO polls (study, sealed) VALUES (?1, ?2)")?
                .execute(params![p.study, rows::seal_poll(key, p)])?;
            poll.push(p.clone());
        }
        Record::Purge { key: k } => {
            tx.prepare_cached("DELETE FROM ledger WHERE key_index = ?1")?
                .execute([&rows::ledger_index(key, k)[..]])?;
            staged.insert(k.clone(), None);
        }
        Record::Forget { local_id } => {
            let index = rows::id_index(key, local_id);
            tx.prepare_cached("DELETE FROM patients WHERE id_index = ?1")?
                .execute([&index[..]])?;
            tx.prepare_cached("DELETE FROM enrolments WHERE id_index = ?1")?
                .execute([&index[..]])?;
        }
        Record::Enrolment(e) => {
            let row = rows::seal_enrolment(
                key,
                &rows::Enrolment {
                    local_id: e.local_id.clone(),
                    study: e.study.clone(),
                    bf_index: rows::bf_index(key, &e.bloomfilter),
                    status: e.status,
                    detail: e.detail.clone(),
                    updated: e.updated,
                },
            );
            put_enrolment(tx, &row)?;
        }
    }
    Ok(())
}

/// The store lock, taken to append to the audit log alone (the log has
/// one writer at a time, the lock's holder), with the store's generation
/// for the log's saved head. Cheaper than opening the store as a writer:
/// nothing but the manifest is read.
pub(crate) struct AuditTurn {
    _lock: File,
    pub generation: u64,
}

impl Store {
    /// Waits for the store lock (a running cycle ends first).
    pub(crate) fn audit_turn(dir: &Path, key: &StoreKey) -> Result<AuditTurn, StoreError> {
        let lock = acquire_lock(dir, LockMode::Wait)?;
        let db = Db::reader(dir)?;
        let path = db.path().to_path_buf();
        let sealed: Option<Vec<u8>> = db
            .connection()
            .query_row("SELECT value FROM meta WHERE key = 'manifest'", [], |r| r.get(0))
            .optional()
            .map_err(sql(&path, "read the manifest"))?;
        let generation = match sealed {
            Some(m) => rows::open_manifest(key, &m).map_err(tampered(&path))?.generation,
            None => 0,
        };
        Ok(AuditTurn {
            _lock: lock,
            generation,
        })
    }
}

/// Whether an agent holds the store's write lock now (`Some`, with its pid
/// when it wrote one), without taking it.
pub fn writer(dir: &Path) -> Option<Option<u32>> {
    let mut file = File::open(dir.join(LOCK)).ok()?;
    match file.try_lock_shared() {
        Ok(()) => None,
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            Some(text.trim().parse().ok())
        }
        Err(std::fs::TryLockError::Error(_)) => None,
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
        LockMode::Try | LockMode::Read => {
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
