//! How each record becomes a row and back. What names a person (local ids,
//! IDAT, Bloom filters, pseudonyms, task contents, the dispatcher's text)
//! is sealed with AES-256-GCM; what lookups need stands beside it as a keyed
//! HMAC index; what queries need (statuses, kinds, times) stands in clear.
//!
//! Every seal takes the row's other columns as associated data, so a row is
//! opened only with the very index values, status and times it was written
//! with: an attacker without the key who swaps two patients' indexes, moves
//! a sealed value to another row or edits a status makes that row fail to
//! open (a damaged store), never a send for the wrong patient. After
//! opening, the plaintext is checked against the index it was found by.

use super::batch;
use super::records::{EnrolmentStatus, Fields, LedgerEntry, PatientRecord, PatientSecret, PollRecord};
use super::records::{PseudonymRecord, Reader, Record, decode_pseudonym, encode_pseudonym};
use crate::crypto::{OpenError, StoreKey};
use crate::types::{BloomFilter, LocalId};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A keyed HMAC index (128 bits).
pub type Index = [u8; 16];

/// An index no Bloom filter has (HMAC outputs of all ones: 2^-128): an
/// enrolment's filter after a re-keying when it is no longer the patient's.
pub(crate) const NO_FILTER: Index = [0xff; 16];

pub(crate) fn id_index(key: &StoreKey, id: &LocalId) -> Index {
    key.index_bytes("id", id.0.as_bytes())
}

/// A tombstone's index: another domain than the patient's `id_index`, so
/// that an erased patient's index is gone from the file with her row.
pub(crate) fn tombstone_index(key: &StoreKey, id: &LocalId) -> Index {
    key.index_bytes("tombstone", id.0.as_bytes())
}

pub fn bf_index(key: &StoreKey, bf: &BloomFilter) -> Index {
    key.index_bytes("bf", bf.as_bytes())
}

pub fn psn_index(key: &StoreKey, value: &str) -> Index {
    key.index_bytes("psn", value.as_bytes())
}

pub(crate) fn ledger_index(key: &StoreKey, ledger_key: &str) -> Index {
    key.index_bytes("ledger", ledger_key.as_bytes())
}

/// Milliseconds since the epoch: what the time columns hold. (Every
/// `DateTime` chrono can hold fits an i64 of milliseconds.)
pub fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub(crate) fn from_ms(ms: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms)
}

/// The associated data of a seal: the table, then each column, length-
/// prefixed so that no two rows' columns run into the same bytes.
struct Aad(Vec<u8>);

impl Aad {
    fn new(table: &str) -> Aad {
        let mut a = Aad(Vec::with_capacity(128));
        a.bytes(table.as_bytes());
        a
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Aad {
        self.0.extend_from_slice(&(b.len() as u64).to_le_bytes());
        self.0.extend_from_slice(b);
        self
    }

    fn opt(&mut self, b: Option<&[u8]>) -> &mut Aad {
        match b {
            Some(b) => {
                self.0.push(1);
                self.bytes(b)
            }
            None => {
                self.0.push(0);
                self
            }
        }
    }

    fn int(&mut self, i: i64) -> &mut Aad {
        self.bytes(&i.to_le_bytes())
    }

    /// The study a row belongs to; rows written before several studies
    /// (study "") were sealed without it and open so.
    fn study(&mut self, study: &str) -> &mut Aad {
        if study.is_empty() {
            self
        } else {
            self.bytes(study.as_bytes())
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct PatientRow {
    pub id_index: Index,
    pub bf_index: Option<Index>,
    /// The local id, alone (listing ids opens no IDAT).
    pub id_sealed: Vec<u8>,
    /// IDAT and Bloom filter.
    pub sealed: Vec<u8>,
    pub updated: i64,
}

fn id_aad(table: &str, id_index: &Index) -> Vec<u8> {
    Aad::new(table).bytes(id_index).0.clone()
}

fn patient_aad(id_index: &Index, bf_index: Option<&Index>, updated: i64) -> Vec<u8> {
    Aad::new("patient")
        .bytes(id_index)
        .opt(bf_index.map(|b| &b[..]))
        .int(updated)
        .0
        .clone()
}

pub(crate) fn seal_patient(key: &StoreKey, p: &PatientRecord) -> PatientRow {
    let id_index = id_index(key, &p.local_id);
    let bf_index = p.bloomfilter.as_ref().map(|bf| bf_index(key, bf));
    let updated = ms(p.updated);
    let plain = zeroize::Zeroizing::new(PatientSecret::encode_parts(&p.idat, p.bloomfilter.as_ref()));
    PatientRow {
        id_index,
        bf_index,
        id_sealed: key.seal_raw(&id_aad("local id", &id_index), p.local_id.0.as_bytes()),
        sealed: key.seal_raw(&patient_aad(&id_index, bf_index.as_ref(), updated), &plain),
        updated,
    }
}

/// The local id of a patient row, checked against its index.
pub(crate) fn open_local_id(key: &StoreKey, id_index: &Index, id_sealed: &[u8]) -> Result<LocalId, OpenError> {
    let plain = key.open_raw("local id", &id_aad("local id", id_index), id_sealed)?;
    let id = LocalId(String::from_utf8(plain.to_vec()).map_err(|_| OpenError::layout("local id"))?);
    if self::id_index(key, &id) != *id_index {
        return Err(OpenError::Mismatch { what: "local id" });
    }
    Ok(id)
}

pub(crate) fn open_patient(key: &StoreKey, row: &PatientRow) -> Result<PatientRecord, OpenError> {
    let local_id = open_local_id(key, &row.id_index, &row.id_sealed)?;
    let plain = key.open_raw(
        "patient",
        &patient_aad(&row.id_index, row.bf_index.as_ref(), row.updated),
        &row.sealed,
    )?;
    let secret = PatientSecret::decode(&plain).ok_or(OpenError::layout("patient"))?;
    if secret.bloomfilter.as_ref().map(|bf| bf_index(key, bf)) != row.bf_index {
        return Err(OpenError::Mismatch { what: "patient" });
    }
    Ok(PatientRecord {
        local_id,
        idat: secret.idat,
        bloomfilter: secret.bloomfilter,
        updated: from_ms(row.updated).ok_or(OpenError::layout("patient"))?,
    })
}

#[derive(Debug, Clone)]
pub(crate) struct PseudonymRow {
    pub bf_index: Index,
    pub study: String,
    pub target: String,
    pub psn_index: Index,
    pub received: i64,
    pub source: String,
    pub sealed: Vec<u8>,
}

fn pseudonym_aad(row: &PseudonymRow) -> Vec<u8> {
    Aad::new("pseudonym")
        .bytes(&row.bf_index)
        .bytes(row.target.as_bytes())
        .bytes(&row.psn_index)
        .int(row.received)
        .bytes(row.source.as_bytes())
        .study(&row.study)
        .0
        .clone()
}

pub(crate) fn seal_pseudonym(key: &StoreKey, p: &PseudonymRecord) -> PseudonymRow {
    let bf_index = bf_index(key, &p.bloomfilter);
    let psn_index = psn_index(key, &p.pseudonym.value);
    let mut row = PseudonymRow {
        bf_index,
        psn_index,
        received: ms(p.received),
        sealed: Vec::new(),
        study: p.study.clone(),
        target: p.target.clone(),
        source: p.source.clone(),
    };
    row.sealed = key.seal_raw(&pseudonym_aad(&row), &encode_pseudonym(p));
    row
}

pub(crate) fn open_pseudonym(key: &StoreKey, row: &PseudonymRow) -> Result<PseudonymRecord, OpenError> {
    let plain = key.open_raw("pseudonym", &pseudonym_aad(row), &row.sealed)?;
    let mut p = decode_pseudonym(&plain, &row.target).ok_or(OpenError::layout("pseudonym"))?;
    p.study.clone_from(&row.study);
    if bf_index(key, &p.bloomfilter) != row.bf_index || psn_index(key, &p.pseudonym.value) != row.psn_index {
        return Err(OpenError::Mismatch { what: "pseudonym" });
    }
    Ok(p)
}

#[derive(Debug, Clone)]
pub(crate) struct LedgerRow {
    pub key_index: Index,
    pub kind: String,
    pub status: String,
    pub outcome: String,
    pub expires: Option<i64>,
    pub first_seen: i64,
    pub last_seen: i64,
    pub updated: i64,
    pub attempts: i64,
    pub sealed: Vec<u8>,
}

impl LedgerRow {
    fn aad(&self) -> Vec<u8> {
        let mut a = Aad::new("ledger");
        a.bytes(&self.key_index)
            .bytes(self.kind.as_bytes())
            .bytes(self.status.as_bytes())
            .bytes(self.outcome.as_bytes())
            .opt(self.expires.map(i64::to_le_bytes).as_ref().map(|b| &b[..]))
            .int(self.first_seen)
            .int(self.last_seen)
            .int(self.updated)
            .int(self.attempts);
        a.0
    }
}

/// A ledger entry: the entry without its task sealed in the row, the
/// columns `tasks`, `status` and retention query beside it; the task (the
/// bulk: a Bloom filter) sealed once, in `ledger_tasks`, bound to the
/// entry's key. A progress rewrites only the small row: rows written in
/// arrival order share pages, so a batch's marks touch a few pages, not one
/// per task.
pub(crate) fn seal_ledger(key: &StoreKey, e: &LedgerEntry) -> LedgerRow {
    let mut row = LedgerRow {
        key_index: ledger_index(key, &e.key),
        kind: e.kind.as_str().to_string(),
        status: e.status.as_str().to_string(),
        outcome: e.outcome.as_str().to_string(),
        expires: e.expires.map(ms),
        first_seen: ms(e.first_seen),
        last_seen: ms(e.last_seen),
        updated: ms(e.updated),
        attempts: i64::from(e.attempts),
        sealed: Vec::new(),
    };
    let mut w = batch::BatchWriter::new();
    w.push_ledger_without_task(e);
    row.sealed = key.seal_raw(&row.aad(), &w.finish());
    row
}

fn task_aad(key_index: &Index) -> Vec<u8> {
    Aad::new("ledger task").bytes(key_index).0.clone()
}

/// The task of a ledger entry, sealed under the entry's key index.
pub(crate) fn seal_task(key: &StoreKey, key_index: &Index, task: &crate::tasks::Task) -> Vec<u8> {
    key.seal_raw(&task_aad(key_index), &batch::encode_task_alone(task))
}

pub(crate) fn open_ledger(key: &StoreKey, row: &LedgerRow, task: Option<&[u8]>) -> Result<LedgerEntry, OpenError> {
    let plain = key.open_raw("ledger entry", &row.aad(), &row.sealed)?;
    let mut records = batch::decode(&plain).ok_or(OpenError::layout("ledger entry"))?;
    let (Some(Record::Ledger(mut entry)), true) = (records.pop(), records.is_empty()) else {
        return Err(OpenError::layout("ledger entry"));
    };
    if ledger_index(key, &entry.key) != row.key_index {
        return Err(OpenError::Mismatch { what: "ledger entry" });
    }
    if let Some(sealed) = task {
        let plain = key.open_raw("ledger task", &task_aad(&row.key_index), sealed)?;
        entry.task = Some(batch::decode_task(&plain).ok_or(OpenError::layout("ledger task"))?);
    }
    Ok(entry)
}

#[derive(Debug, Clone)]
pub(crate) struct EnrolmentRow {
    pub id_index: Index,
    pub study: String,
    pub bf_index: Index,
    pub status: String,
    pub updated: i64,
    pub sealed: Vec<u8>,
}

fn enrolment_aad(id: &Index, bf: &Index, status: &str, updated: i64, study: &str) -> Vec<u8> {
    Aad::new("enrolment")
        .bytes(id)
        .bytes(bf)
        .bytes(status.as_bytes())
        .int(updated)
        .study(study)
        .0
        .clone()
}

/// An enrolment keeps the filter sent only as its index: all that is ever
/// asked is whether a patient's filter is the one sent.
pub(crate) struct Enrolment {
    pub local_id: LocalId,
    pub study: String,
    pub bf_index: Index,
    pub status: EnrolmentStatus,
    pub detail: Option<String>,
    pub updated: DateTime<Utc>,
}

pub(crate) fn seal_enrolment(key: &StoreKey, e: &Enrolment) -> EnrolmentRow {
    let id_index = id_index(key, &e.local_id);
    let status = e.status.as_str().to_string();
    let updated = ms(e.updated);
    let mut plain = Fields::new(1);
    plain.text(Some(&e.local_id.0));
    plain.text(e.detail.as_deref());
    EnrolmentRow {
        sealed: key.seal_raw(
            &enrolment_aad(&id_index, &e.bf_index, &status, updated, &e.study),
            &plain.into_bytes(),
        ),
        id_index,
        study: e.study.clone(),
        bf_index: e.bf_index,
        status,
        updated,
    }
}

pub(crate) fn open_enrolment(key: &StoreKey, row: &EnrolmentRow) -> Result<Enrolment, OpenError> {
    let bad = OpenError::layout("enrolment");
    let aad = enrolment_aad(&row.id_index, &row.bf_index, &row.status, row.updated, &row.study);
    let plain = key.open_raw("enrolment", &aad, &row.sealed)?;
    let mut r = Reader::new(&plain, 1).ok_or(bad.clone())?;
    let local_id = LocalId(r.text().flatten().ok_or(bad.clone())?);
    let detail = r.text().ok_or(bad.clone())?;
    if !r.is_done() {
        return Err(bad);
    }
    if id_index(key, &local_id) != row.id_index {
        return Err(OpenError::Mismatch { what: "enrolment" });
    }
    Ok(Enrolment {
        local_id,
        study: row.study.clone(),
        bf_index: row.bf_index,
        status: enrolment_status(&row.status).ok_or(bad.clone())?,
        detail,
        updated: from_ms(row.updated).ok_or(bad)?,
    })
}

pub(crate) fn enrolment_status(s: &str) -> Option<EnrolmentStatus> {
    use EnrolmentStatus::*;
    [Sending, Enrolled, Clearing, Error, Retry]
        .into_iter()
        .find(|e| e.as_str() == s)
}

/// A tombstone: the local id `forget` erased, sealed under its index.
pub(crate) fn seal_tombstone(key: &StoreKey, id: &LocalId) -> (Index, Vec<u8>) {
    let index = tombstone_index(key, id);
    (index, key.seal_raw(&id_aad("tombstone", &index), id.0.as_bytes()))
}

pub(crate) fn open_tombstone(key: &StoreKey, index: &Index, sealed: &[u8]) -> Result<LocalId, OpenError> {
    let plain = key.open_raw("tombstone", &id_aad("tombstone", index), sealed)?;
    let id = LocalId(String::from_utf8(plain.to_vec()).map_err(|_| OpenError::layout("tombstone"))?);
    if tombstone_index(key, &id) != *index {
        return Err(OpenError::Mismatch { what: "tombstone" });
    }
    Ok(id)
}

/// The last poll of a study, sealed (the row is keyed by the study).
pub(crate) fn seal_poll(key: &StoreKey, p: &PollRecord) -> Vec<u8> {
    // Serialising our own plain data type cannot fail.
    key.seal_raw(
        &Aad::new("poll").study(&p.study).0,
        &serde_json::to_vec(p).unwrap_or_default(),
    )
}

pub(crate) fn open_poll(key: &StoreKey, study: &str, sealed: &[u8]) -> Result<PollRecord, OpenError> {
    let plain = key.open_raw("poll", &Aad::new("poll").study(study).0, sealed)?;
    let mut p: PollRecord = serde_json::from_slice(&plain).map_err(|_| OpenError::layout("poll"))?;
    p.study = study.to_string();
    Ok(p)
}

/// What every write seals last: the store's generation (one more per
/// write) and the tombstones it holds. A write replayed from an older copy
/// of the database cannot bring a tombstone back or take one away without
/// the manifest saying otherwise, and a store rolled back to an older copy
/// says so by its generation (checked against the audit log's head).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Manifest {
    pub generation: u64,
    pub tombstones: u64,
    /// SHA-256 of the sorted tombstone indexes, hex.
    pub tombstone_digest: String,
    /// The audit log's last durable record number when this was written
    /// (0: not known).
    #[serde(default)]
    pub audit_seq: u64,
}

pub(crate) fn tombstone_digest<'a>(indexes: impl Iterator<Item = &'a Index>) -> String {
    let mut all: Vec<&Index> = indexes.collect();
    all.sort();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for i in all {
        ctx.update(i);
    }
    crate::privacy::hex(ctx.finish().as_ref())
}

fn manifest_aad(key_id: &str) -> Vec<u8> {
    Aad::new("manifest").bytes(key_id.as_bytes()).0.clone()
}

pub(crate) fn seal_manifest(key: &StoreKey, m: &Manifest) -> Vec<u8> {
    key.seal_raw(&manifest_aad(key.id()), &serde_json::to_vec(m).unwrap_or_default())
}

pub(crate) fn open_manifest(key: &StoreKey, sealed: &[u8]) -> Result<Manifest, OpenError> {
    let plain = key.open_raw("manifest", &manifest_aad(key.id()), sealed)?;
    serde_json::from_slice(&plain).map_err(|_| OpenError::layout("manifest"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::idat::{Idat, IdatElement};
    use crate::store::Status;
    use crate::vocab::Outcome;

    fn key(n: u8) -> StoreKey {
        StoreKey::from_bytes(&[n; 32])
    }

    fn patient(id: &str, bf: u8) -> PatientRecord {
        let mut idat = Idat::default();
        idat.set(IdatElement::ALL[0], Some(format!("Name {id}")));
        PatientRecord {
            local_id: LocalId(id.into()),
            idat,
            bloomfilter: Some(BloomFilter::from_bytes(vec![bf; 64]).unwrap()),
            updated: from_ms(1_700_000_000_123).unwrap(),
        }
    }

    #[test]
    fn a_patient_row_opens_as_written_and_only_with_its_own_columns() {
        let k = key(1);
        let (a, b) = (seal_patient(&k, &patient("a", 1)), seal_patient(&k, &patient("b", 2)));
        assert_eq!(open_patient(&k, &a).unwrap(), patient("a", 1));
        // Swapped indexes, a moved seal, another time, another key: refused.
        let mut swapped = a.clone();
        swapped.bf_index = b.bf_index;
        assert!(open_patient(&k, &swapped).is_err());
        let mut moved = a.clone();
        moved.sealed = b.sealed.clone();
        assert!(open_patient(&k, &moved).is_err());
        let mut moved = a.clone();
        moved.id_sealed = b.id_sealed.clone();
        assert!(open_patient(&k, &moved).is_err());
        let mut later = a.clone();
        later.updated += 1;
        assert!(open_patient(&k, &later).is_err());
        assert!(open_patient(&key(2), &a).is_err());
    }

    #[test]
    fn a_ledger_row_is_bound_to_its_status() {
        let k = key(1);
        let now = Utc::now();
        let e = LedgerEntry {
            key: "task:1".into(),
            kind: crate::tasks::TaskKind::SendIdat,
            display_id: "1".into(),
            task: None,
            status: Status::Resolved,
            outcome: Outcome::Sent,
            detail: Some("x".into()),
            expires: None,
            first_seen: now,
            last_seen: now,
            updated: now,
            attempts: 1,
        };
        let row = seal_ledger(&k, &e);
        assert_eq!(open_ledger(&k, &row, None).unwrap(), e);
        let mut reopened = row.clone();
        reopened.status = "pending".into();
        assert!(open_ledger(&k, &reopened, None).is_err());
    }
}
