//! The one-time conversion of a store written before the database (the v1
//! files, read by `v1`) into the database.
//!
//! The new database is built beside the old files under a temporary name,
//! in one transaction, then read back and compared with what was read
//! (counts, and a digest of every patient, pseudonym and ledger entry),
//! and only then renamed into place. The old files stay untouched until
//! the migration is in the audit log (`Store::finish_migration`), and are
//! then renamed with a `.v1` suffix, never deleted. A crash at any point
//! leaves either the old store (a stale temporary file is discarded and
//! the migration starts over) or the new one complete (the next open
//! audits and retires the old files).

use super::db::{self, Db};
use super::ledger::Ledger;
use super::records::{LedgerEntry, PatientRecord, PatientSecret, PseudonymRecord, Record, encode_pseudonym};
use super::rows::{self, Manifest};
use super::v1;
use super::{StoreError, io, put, put_enrolment, put_ledger, sql};
use crate::crypto::StoreKey;
use crate::types::LocalId;
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What a migration brought over, kept in the database (`meta`) and
/// written to the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    pub patients: usize,
    pub pseudonyms: usize,
    pub ledger: usize,
    pub enrolments: usize,
    pub tombstones: usize,
    /// SHA-256 over every patient, pseudonym and ledger entry, in a fixed
    /// order: the same before and after.
    pub digest: String,
}

impl MigrationReport {
    pub(crate) fn describe(&self) -> String {
        format!(
            "{} patient(s), {} pseudonym(s), {} ledger entr(ies), {} enrolment(s), {} erased patient(s); digest {}",
            self.patients,
            self.pseudonyms,
            self.ledger,
            self.enrolments,
            self.tombstones,
            &self.digest[..16.min(self.digest.len())]
        )
    }
}

const TEMP: &str = "store.sqlite3.migrating";

/// The digest of a store's content: each patient (local id, sealed form of
/// IDAT and filter, time in milliseconds, as the database keeps it), each
/// pseudonym and each ledger entry, sorted.
fn digest(patients: &[PatientRecord], pseudonyms: &[PseudonymRecord], ledger: &[LedgerEntry]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut part = |tag: &[u8], bytes: &[u8]| {
        ctx.update(tag);
        ctx.update(&(bytes.len() as u64).to_le_bytes());
        ctx.update(bytes);
    };
    let mut ps: Vec<&PatientRecord> = patients.iter().collect();
    ps.sort_by(|a, b| a.local_id.cmp(&b.local_id));
    for p in ps {
        part(b"p", p.local_id.0.as_bytes());
        part(
            b"s",
            &zeroize::Zeroizing::new(PatientSecret::encode_parts(&p.idat, p.bloomfilter.as_ref())),
        );
        part(b"u", &rows::ms(p.updated).to_le_bytes());
    }
    let mut qs: Vec<&PseudonymRecord> = pseudonyms.iter().collect();
    qs.sort_by(|a, b| (&a.target, a.bloomfilter.as_bytes()).cmp(&(&b.target, b.bloomfilter.as_bytes())));
    for q in qs {
        part(b"t", q.target.as_bytes());
        part(b"q", &encode_pseudonym(q));
    }
    let mut ls: Vec<&LedgerEntry> = ledger.iter().collect();
    ls.sort_by(|a, b| a.key.cmp(&b.key));
    for e in ls {
        let mut w = super::batch::BatchWriter::new();
        w.push_ledger(e);
        part(b"l", &w.finish());
    }
    crate::privacy::hex(ctx.finish().as_ref())
}

fn failed(dir: &Path, reason: String) -> StoreError {
    StoreError::Migration {
        path: dir.to_path_buf(),
        reason,
    }
}

fn remove_temp(dir: &Path) -> Result<(), StoreError> {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let p = dir.join(format!("{TEMP}{suffix}"));
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("remove an unfinished migration", &p)(e));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Converts the v1 store in `dir` (the caller holds the lock).
pub(super) fn run(dir: &Path, key: &StoreKey) -> Result<(), StoreError> {
    log::info!("store {}: migrating the store files to the database", dir.display());
    let old = v1::read(dir, key)?;
    let mut patients = old.patients;
    // (A v1 store could keep an erased patient's record if her forget
    // was interrupted; v1::read leaves her out, as the store did.)
    patients.retain(|p| !old.forgotten.contains(&p.local_id.0));
    let before = digest(&patients, &old.pseudonyms, &old.ledger);
    let report = MigrationReport {
        patients: patients.len(),
        pseudonyms: old.pseudonyms.len(),
        ledger: old.ledger.len(),
        enrolments: old.enrolments.len(),
        tombstones: old.forgotten.len(),
        digest: before.clone(),
    };
    remove_temp(dir)?;
    let temp = dir.join(TEMP);
    let mut db = Db::open_file(&temp)?;
    let path = temp.clone();
    let forgotten: Vec<LocalId> = old.forgotten.iter().map(|id| LocalId(id.clone())).collect();
    let indexes: Vec<rows::Index> = forgotten.iter().map(|id| rows::tombstone_index(key, id)).collect();
    let manifest = Manifest {
        generation: 1,
        tombstones: forgotten.len() as u64,
        tombstone_digest: rows::tombstone_digest(indexes.iter()),
        audit_seq: 0,
    };
    let tx = db
        .connection_mut()
        .transaction()
        .map_err(sql(&path, "start the migration"))?;
    (|| {
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('key_id', ?1), ('manifest', ?2), ('migrated_from_v1', ?3), \
             ('needs_study', 1)",
            params![
                key.id(),
                rows::seal_manifest(key, &manifest),
                serde_json::to_string(&report).unwrap_or_default()
            ],
        )?;
        let (mut staged, mut poll) = (HashMap::new(), Vec::new());
        for p in &patients {
            put(
                &tx,
                key,
                &Record::Patient(p.clone()),
                &Ledger::default(),
                &mut staged,
                &mut poll,
            )?;
        }
        for p in &old.pseudonyms {
            put(
                &tx,
                key,
                &Record::Pseudonym(p.clone()),
                &Ledger::default(),
                &mut staged,
                &mut poll,
            )?;
        }
        for e in &old.ledger {
            put_ledger(&tx, key, e)?;
        }
        for e in &old.enrolments {
            let row = rows::seal_enrolment(
                key,
                &rows::Enrolment {
                    local_id: e.local_id.clone(),
                    study: String::new(),
                    bf_index: e.bf_index,
                    status: e.status,
                    detail: e.detail.clone(),
                    updated: e.updated,
                },
            );
            put_enrolment(&tx, &row)?;
        }
        for id in &forgotten {
            let (index, sealed) = rows::seal_tombstone(key, id);
            tx.execute(
                "INSERT INTO tombstones (tombstone_index, sealed) VALUES (?1, ?2)",
                params![&index[..], sealed],
            )?;
        }
        if let Some(p) = &old.last_poll {
            put(
                &tx,
                key,
                &Record::Poll(p.clone()),
                &Ledger::default(),
                &mut staged,
                &mut poll,
            )?;
        }
        tx.commit()
    })()
    .map_err(sql(&path, "write the migrated store"))?;
    crate::crashpoint::hit("migrate:written");

    // Read back through the same code every later open uses.
    drop(db);
    let check = (|| {
        let store = super::Store::load(dir, Db::open_file(&temp)?, key.clone(), None)?;
        let after = digest(
            &store.all_patients()?,
            &store.all_pseudonyms()?,
            &store.ledger.values().cloned().collect::<Vec<_>>(),
        );
        let counts = (
            store.patient_count()?,
            store.pseudonym_count()?,
            store.ledger.len(),
            store.forgotten.len(),
        );
        Ok::<_, StoreError>((after, counts))
    })();
    let (after, counts) = match check {
        Ok(c) => c,
        Err(e) => {
            remove_temp(dir)?;
            return Err(failed(dir, format!("the new database did not read back: {e}")));
        }
    };
    let expected = (report.patients, report.pseudonyms, report.ledger, report.tombstones);
    if after != before || counts != expected {
        remove_temp(dir)?;
        return Err(failed(
            dir,
            format!("the new database differs from the old files (counts {counts:?}, expected {expected:?})"),
        ));
    }
    // Closed, the temporary database is one file (its WAL checkpointed and
    // removed); synced, it is renamed into place.
    let leftover_wal = dir.join(format!("{TEMP}-wal"));
    if leftover_wal.metadata().is_ok_and(|m| m.len() > 0) {
        remove_temp(dir)?;
        return Err(failed(dir, "the new database's log was not emptied".into()));
    }
    std::fs::File::open(&temp)
        .and_then(|f| f.sync_all())
        .map_err(io("sync the migrated store", &temp))?;
    let dest = dir.join(db::FILE);
    std::fs::rename(&temp, &dest).map_err(io("rename the migrated store into place", &dest))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync the store directory", dir))?;
    crate::crashpoint::hit("migrate:installed");
    log::info!("store {}: migrated ({})", dir.display(), report.describe());
    Ok(())
}

/// The report of a migration whose old files are still in place.
pub(super) fn report(db: &Db) -> Result<Option<MigrationReport>, StoreError> {
    let text: Option<String> = db
        .connection()
        .query_row("SELECT value FROM meta WHERE key = 'migrated_from_v1'", [], |r| {
            r.get(0)
        })
        .optional()
        .map_err(sql(db.path(), "read the migration report"))?;
    Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
}

/// Renames the v1 files with a `.v1` suffix (never deleted: the way back
/// to the release before).
pub(super) fn retire_old_files(dir: &Path) -> Result<(), StoreError> {
    for old in v1::files(dir) {
        let mut name = old.clone().into_os_string();
        name.push(".v1");
        std::fs::rename(&old, &name).map_err(io("rename an old store file", &old))?;
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync the store directory", dir))
}

/// The `.v1` files a migration left.
pub(super) fn retired_files(dir: &Path) -> impl Iterator<Item = PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "v1"))
}
