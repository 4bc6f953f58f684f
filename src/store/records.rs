//! What the store holds. Every record is a complete "upsert", so replaying a
//! record twice (a journal that overlaps a snapshot) changes nothing.

use crate::fhir::idat::Idat;
use crate::tasks::{Task, TaskKind};
use crate::types::{BloomFilter, LocalId, Pseudonym};
pub use crate::vocab::Outcome;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatientRecord {
    pub local_id: LocalId,
    pub idat: Idat,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bloomfilter: Option<BloomFilter>,
    pub updated: DateTime<Utc>,
}

/// A pseudonym received from the fTTP, keyed by the Bloom filter it answers
/// and the target domain. Kept even when no local patient has that filter
/// yet, so an import that arrives later links it and nothing is lost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PseudonymRecord {
    pub bloomfilter: BloomFilter,
    /// The study it was issued in ("" in a store from before several
    /// studies, until `Store::adopt_legacy` gives it the configured one).
    #[serde(default)]
    pub study: String,
    pub target: String,
    pub pseudonym: Pseudonym,
    pub received: DateTime<Utc>,
    /// Ledger key of the task that delivered it.
    pub source: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Seen, not yet done (or waiting for local data, e.g. an unknown patient).
    Pending,
    /// A request for it is being sent; after a crash it is sent again.
    InFlight,
    /// Done.
    Resolved,
    /// The last attempt failed; retried next cycle until it expires.
    Failed,
    /// Its expiry passed before it could be done.
    Expired,
    /// Malformed or not for this site; never acted on.
    Rejected,
    /// Ended without a result and never sent again: the dispatcher refused
    /// it for good (a final error code, a 4xx to a first send), or the
    /// agent gave it up (no expiry and too many attempts or too old). The
    /// dispatcher issues a new task if it wants another try.
    Closed,
}

impl Status {
    /// Terminal states are never worked on again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Resolved | Status::Expired | Status::Rejected | Status::Closed
        )
    }

    pub const ALL: [Status; 7] = [
        Status::Pending,
        Status::InFlight,
        Status::Resolved,
        Status::Failed,
        Status::Expired,
        Status::Rejected,
        Status::Closed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::InFlight => "in_flight",
            Status::Resolved => "resolved",
            Status::Failed => "failed",
            Status::Expired => "expired",
            Status::Rejected => "rejected",
            Status::Closed => "closed",
        }
    }
}

/// One task as the ledger remembers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub key: String,
    pub kind: TaskKind,
    /// taskId, or a prefix of the content hash.
    pub display_id: String,
    /// The task itself, so it can be retried from the ledger even if the
    /// dispatcher does not hand it out again. `None` for rejected tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<Task>,
    pub status: Status,
    /// Last outcome: stored, sent, unknown_patient, expired, rejected, failed, ...
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<DateTime<Utc>>,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub updated: DateTime<Utc>,
    pub attempts: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PollRecord {
    /// The study polled.
    #[serde(default)]
    pub study: String,
    pub at: DateTime<Utc>,
    pub ok: bool,
    pub tasks: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The last poll that succeeded (this one, if it did).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ok: Option<DateTime<Utc>>,
    /// Polls failed in a row, up to and including this one.
    #[serde(default)]
    pub failures: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Record {
    Patient(PatientRecord),
    Pseudonym(PseudonymRecord),
    Ledger(LedgerEntry),
    Poll(PollRecord),
    /// Removes a finished ledger entry (retention).
    Purge {
        key: String,
    },
    /// Removes a patient's IDAT and Bloom filter (right to erasure).
    Forget {
        local_id: LocalId,
    },
    /// A new state of a ledger entry already recorded: the task's content
    /// does not change after it is first seen, so it is not written again.
    Progress(Progress),
    /// What `enroll` sent for a patient and what came of it.
    Enrolment(EnrolmentRecord),
}

/// Where a patient's enrolment (`$requestPsnFromBfWorkflow` by `enroll`) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnrolmentStatus {
    /// Written before the request: after a crash the same filter is sent again.
    Sending,
    /// The fTTP answered with a pseudonym (stored).
    Enrolled,
    /// The fTTP answered with neither pseudonym nor error: the record went
    /// to clearing, and the pseudonym comes later as a task.
    Clearing,
    /// The fTTP answered with an error for this filter.
    Error,
    /// The fTTP answered with a transient error (busy, timeout): the next
    /// `enroll` sends the same filter again.
    Retry,
}

impl EnrolmentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EnrolmentStatus::Sending => "sending",
            EnrolmentStatus::Enrolled => "enrolled",
            EnrolmentStatus::Clearing => "clearing",
            EnrolmentStatus::Error => "error",
            EnrolmentStatus::Retry => "retry",
        }
    }
}

/// An enrolment. On disk the Bloom filter is kept only as its keyed index:
/// all that is ever asked is whether a patient's filter is the one sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrolmentRecord {
    pub local_id: LocalId,
    /// The study the patient was enrolled in.
    #[serde(default)]
    pub study: String,
    pub bloomfilter: BloomFilter,
    pub status: EnrolmentStatus,
    /// The error code, for `Error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub updated: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub key: String,
    pub status: Status,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub last_seen: DateTime<Utc>,
    pub updated: DateTime<Utc>,
    pub attempts: u32,
}

impl Progress {
    pub fn of(e: &LedgerEntry) -> Progress {
        Progress {
            key: e.key.clone(),
            status: e.status,
            outcome: e.outcome,
            detail: e.detail.clone(),
            last_seen: e.last_seen,
            updated: e.updated,
            attempts: e.attempts,
        }
    }

    pub(crate) fn apply_to(&self, e: &mut LedgerEntry) {
        e.status = self.status;
        e.outcome = self.outcome;
        e.detail.clone_from(&self.detail);
        e.last_seen = self.last_seen;
        e.updated = self.updated;
        e.attempts = self.attempts;
    }
}

/// The ledger key of a task in a study: the study, a slash, the task's own
/// key (study names hold no slash). Keys written before several studies
/// have no study part until `Store::adopt_legacy`.
pub(crate) fn ledger_key(study: &str, task_key: &str) -> String {
    format!("{study}/{task_key}")
}

impl LedgerEntry {
    /// The study the task came from.
    pub fn study(&self) -> &str {
        self.key.split_once('/').map_or("", |(study, _)| study)
    }
}

impl std::str::FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Status::ALL.into_iter().find(|x| x.as_str() == s).ok_or_else(|| {
            format!("unknown status '{s}' (pending, in_flight, resolved, failed, expired, rejected, closed)")
        })
    }
}

/// The sealed part of a patient record.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PatientSecret {
    pub idat: Idat,
    pub bloomfilter: Option<BloomFilter>,
}

/// Marks an absent field in the binary forms.
const ABSENT: u16 = u16::MAX;
/// Marks a field of 65,534 bytes or more: a u64 length follows. (A Bloom
/// filter may be 64 KiB, and nothing may be cut short or dropped.)
const LONG: u16 = u16::MAX - 1;

/// Writes the binary forms' fields: each a u16 length (ABSENT, or LONG and
/// a u64 length) and its bytes.
pub(super) struct Fields(Vec<u8>);

impl Fields {
    pub(super) fn new(version: u8) -> Fields {
        Fields::continuing(Vec::with_capacity(160), version)
    }

    /// Continues `out` (a batch being written).
    pub(super) fn continuing(mut out: Vec<u8>, version: u8) -> Fields {
        out.push(version);
        Fields(out)
    }

    pub(super) fn field(&mut self, v: Option<&[u8]>) {
        match v {
            Some(b) if b.len() < usize::from(LONG) => {
                self.0.extend_from_slice(&(b.len() as u16).to_le_bytes());
                self.0.extend_from_slice(b);
            }
            Some(b) => {
                self.0.extend_from_slice(&LONG.to_le_bytes());
                self.0.extend_from_slice(&(b.len() as u64).to_le_bytes());
                self.0.extend_from_slice(b);
            }
            None => self.0.extend_from_slice(&ABSENT.to_le_bytes()),
        }
    }

    pub(super) fn text(&mut self, v: Option<&str>) {
        self.field(v.map(str::as_bytes));
    }

    pub(super) fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    /// A time as seconds and nanoseconds: every `DateTime` fits (an
    /// `expires` from the fTTP may be far outside nanoseconds' range).
    pub(super) fn time(&mut self, t: Option<DateTime<Utc>>) {
        match t {
            Some(t) => {
                let mut b = [0u8; 12];
                b[..8].copy_from_slice(&t.timestamp().to_le_bytes());
                b[8..].copy_from_slice(&t.timestamp_subsec_nanos().to_le_bytes());
                self.field(Some(&b));
            }
            None => self.field(None),
        }
    }
}

/// Reads what `Fields` wrote; `None` on any malformation.
pub(super) struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    pub(super) fn new(bytes: &'a [u8], version: u8) -> Option<Reader<'a>> {
        match bytes.split_first() {
            Some((&v, rest)) if v == version => Some(Reader(rest)),
            _ => None,
        }
    }

    pub(super) fn field(&mut self) -> Option<Option<&'a [u8]>> {
        let (len, tail) = self.0.split_at_checked(2)?;
        let len = match u16::from_le_bytes([len[0], len[1]]) {
            ABSENT => {
                self.0 = tail;
                return Some(None);
            }
            LONG => {
                let (len, rest) = tail.split_at_checked(8)?;
                let len = usize::try_from(u64::from_le_bytes(len.try_into().ok()?)).ok()?;
                let (v, rest) = rest.split_at_checked(len)?;
                self.0 = rest;
                return Some(Some(v));
            }
            n => usize::from(n),
        };
        let (v, tail) = tail.split_at_checked(len)?;
        self.0 = tail;
        Some(Some(v))
    }

    /// Whether everything has been read.
    pub(super) fn is_done(&self) -> bool {
        self.0.is_empty()
    }

    pub(super) fn text(&mut self) -> Option<Option<String>> {
        match self.field()? {
            Some(v) => Some(Some(String::from_utf8(v.to_vec()).ok()?)),
            None => Some(None),
        }
    }

    pub(super) fn time(&mut self) -> Option<Option<DateTime<Utc>>> {
        match self.field()? {
            Some(b) if b.len() == 12 => {
                let secs = i64::from_le_bytes(b[..8].try_into().ok()?);
                let nanos = u32::from_le_bytes(b[8..].try_into().ok()?);
                Some(Some(DateTime::from_timestamp(secs, nanos)?))
            }
            Some(_) => None,
            None => Some(None),
        }
    }
}

impl PatientSecret {
    /// A compact binary form (a million of these are held in memory): a
    /// version byte, then each IDAT element in code-system order and the raw
    /// Bloom filter, each as a u16 length (or ABSENT) and its bytes.
    /// (From parts borrowed from a patient record: no copy first.)
    pub(crate) fn encode_parts(idat: &Idat, bloomfilter: Option<&BloomFilter>) -> Vec<u8> {
        let mut out = Fields::new(1);
        for e in crate::fhir::idat::IdatElement::ALL {
            out.field(idat.get(e).map(str::as_bytes));
        }
        out.field(bloomfilter.map(BloomFilter::as_bytes));
        out.into_bytes()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<PatientSecret> {
        let mut r = Reader::new(bytes, 1)?;
        let mut idat = Idat::default();
        for e in crate::fhir::idat::IdatElement::ALL {
            if let Some(v) = r.text()? {
                idat.set(e, Some(v));
            }
        }
        let bloomfilter = match r.field()? {
            Some(b) => Some(BloomFilter::from_bytes(b.to_vec()).ok()?),
            None => None,
        };
        Some(PatientSecret { idat, bloomfilter })
    }
}

/// The sealed part of a pseudonym record, in the same binary form: the raw
/// Bloom filter, the pseudonym's system and value, the time received and
/// the source; the target is the record's key.
pub(crate) fn encode_pseudonym(p: &PseudonymRecord) -> Vec<u8> {
    let mut out = Fields::new(1);
    out.field(Some(p.bloomfilter.as_bytes()));
    out.field(p.pseudonym.system.as_deref().map(str::as_bytes));
    out.field(Some(p.pseudonym.value.as_bytes()));
    out.time(Some(p.received));
    out.field(Some(p.source.as_bytes()));
    out.into_bytes()
}

pub(crate) fn decode_pseudonym(bytes: &[u8], target: &str) -> Option<PseudonymRecord> {
    let mut r = Reader::new(bytes, 1)?;
    let bloomfilter = BloomFilter::from_bytes(r.field()??.to_vec()).ok()?;
    let system = r.text()?;
    let value = r.text()??;
    let received = r.time()??;
    let source = r.text()??;
    Some(PseudonymRecord {
        bloomfilter,
        study: String::new(),
        target: target.to_string(),
        pseudonym: Pseudonym { system, value },
        received,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::idat::IdatElement;

    #[test]
    fn the_binary_secret_round_trips() {
        let mut idat = Idat::default();
        for (i, e) in IdatElement::ALL.into_iter().enumerate() {
            if i % 2 == 0 {
                idat.set(e, Some(format!("Wert {i} äöü")));
            }
        }
        for bf in [None, Some(BloomFilter::from_bytes(vec![1, 2, 3, 255]).unwrap())] {
            let s = PatientSecret {
                idat: idat.clone(),
                bloomfilter: bf,
            };
            assert_eq!(
                PatientSecret::decode(&PatientSecret::encode_parts(&s.idat, s.bloomfilter.as_ref())),
                Some(s.clone())
            );
            let bytes = PatientSecret::encode_parts(&s.idat, s.bloomfilter.as_ref());
            assert_eq!(PatientSecret::decode(&bytes[..bytes.len() - 1]), None, "truncated");
        }
        assert_eq!(PatientSecret::decode(&[]), None);
        assert_eq!(PatientSecret::decode(&[2]), None);
    }

    #[test]
    fn the_binary_pseudonym_round_trips() {
        for system in [None, Some("https://ths-greifswald.de/gpas".to_string())] {
            let p = PseudonymRecord {
                study: String::new(),
                bloomfilter: BloomFilter::from_bytes(vec![9; 125]).unwrap(),
                target: "dic_müenster".into(),
                pseudonym: Pseudonym {
                    system: system.clone(),
                    value: "mii_0001 ä".into(),
                },
                received: Utc::now(),
                source: "sha256:abc".into(),
            };
            let bytes = encode_pseudonym(&p);
            assert_eq!(decode_pseudonym(&bytes, "dic_müenster"), Some(p.clone()));
            for cut in 0..bytes.len() {
                assert_eq!(decode_pseudonym(&bytes[..cut], "t"), None, "truncated at {cut}");
            }
        }
    }
}
