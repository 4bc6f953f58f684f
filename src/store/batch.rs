//! The plain text inside a sealed batch line: records in a compact binary
//! form. At a re-keying a cycle writes 100,000 ledger entries, their
//! progress and their pseudonyms; as JSON (with base64 Bloom filters inside
//! base64 seals) that was about 2 KB a task and most of the cycle's time in
//! serde and in the kernel copying it to disk. Binary, it is about a
//! quarter of that.
//!
//! Layout: a version byte, the record count (u32), then per record a tag
//! byte, the payload's length (u64) and the payload, itself the `Fields` form
//! (a version byte, then fields). The frequent kinds (ledger entries,
//! progress, pseudonyms, patients) have a binary payload; the others are
//! their serde JSON. Decoding is strict: any malformation, a count that does
//! not match, or bytes left over, and the batch is refused (it is sealed, so
//! that means a bug, not a torn write).

#[cfg(test)]
use super::records::encode_pseudonym;
use super::records::{Fields, LedgerEntry, PatientSecret, Progress, Reader, Record, Status};
use super::records::{PatientRecord, decode_pseudonym};
use crate::fhir::Identifier;
use crate::fhir::idat::IdatElement;
use crate::tasks::{Task, TaskKind};
use crate::types::{BloomFilter, LocalId, Pseudonym, TaskId};
use crate::vocab::Outcome;

const VERSION: u8 = 1;

const JSON: u8 = 0;
const LEDGER: u8 = 1;
const PROGRESS: u8 = 2;
const PSEUDONYM: u8 = 3;
const PATIENT: u8 = 4;

/// The version byte of each binary payload.
const PAYLOAD: u8 = 1;

pub(super) struct BatchWriter {
    out: Vec<u8>,
    count: u32,
}

impl BatchWriter {
    pub(super) fn new() -> BatchWriter {
        let mut out = Vec::with_capacity(64 * 1024);
        out.push(VERSION);
        out.extend_from_slice(&0u32.to_le_bytes());
        BatchWriter { out, count: 0 }
    }

    /// (The v1 journal's records; tests write them to check the reader.)
    #[cfg(test)]
    pub(super) fn push(&mut self, r: &Record) {
        match r {
            Record::Ledger(e) => self.push_ledger(e),
            Record::Progress(p) => self.frame(PROGRESS, |f| {
                f.text(Some(&p.key));
                f.text(Some(p.status.as_str()));
                f.text(Some(p.outcome.as_str()));
                f.text(p.detail.as_deref());
                f.time(Some(p.last_seen));
                f.time(Some(p.updated));
                f.field(Some(&p.attempts.to_le_bytes()));
            }),
            Record::Pseudonym(p) => self.frame(PSEUDONYM, |f| {
                f.text(Some(&p.target));
                f.field(Some(&encode_pseudonym(p)));
            }),
            Record::Patient(p) => self.frame(PATIENT, |f| {
                f.text(Some(&p.local_id.0));
                f.time(Some(p.updated));
                f.field(Some(&PatientSecret::encode_parts(&p.idat, p.bloomfilter.as_ref())));
            }),
            other => {
                // Serialising our own plain data types cannot fail.
                let json = serde_json::to_vec(other).unwrap_or_default();
                self.raw_frame(JSON, &json);
            }
        }
    }

    /// A ledger entry (borrowed: a snapshot writes the whole ledger).
    pub(super) fn push_ledger(&mut self, e: &LedgerEntry) {
        self.push_ledger_with(e, e.task.as_ref());
    }

    /// A ledger entry without its task (the database keeps the task apart).
    pub(super) fn push_ledger_without_task(&mut self, e: &LedgerEntry) {
        self.push_ledger_with(e, None);
    }

    fn push_ledger_with(&mut self, e: &LedgerEntry, task: Option<&Task>) {
        self.frame(LEDGER, |f| {
            f.text(Some(&e.key));
            f.text(Some(e.kind.as_str()));
            f.text(Some(&e.display_id));
            f.text(Some(e.status.as_str()));
            f.text(Some(e.outcome.as_str()));
            f.text(e.detail.as_deref());
            f.time(e.expires);
            f.time(Some(e.first_seen));
            f.time(Some(e.last_seen));
            f.time(Some(e.updated));
            f.field(Some(&e.attempts.to_le_bytes()));
            encode_task(f, task);
        });
    }

    pub(super) fn finish(mut self) -> Vec<u8> {
        self.out[1..5].copy_from_slice(&self.count.to_le_bytes());
        self.out
    }

    fn frame(&mut self, tag: u8, body: impl FnOnce(&mut Fields)) {
        self.out.push(tag);
        let at = self.out.len();
        self.out.extend_from_slice(&0u64.to_le_bytes());
        let mut f = Fields::continuing(std::mem::take(&mut self.out), PAYLOAD);
        body(&mut f);
        self.out = f.into_bytes();
        let len = (self.out.len() - at - 8) as u64;
        self.out[at..at + 8].copy_from_slice(&len.to_le_bytes());
        self.count += 1;
    }

    #[cfg(test)]
    fn raw_frame(&mut self, tag: u8, payload: &[u8]) {
        self.out.push(tag);
        self.out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        self.out.extend_from_slice(payload);
        self.count += 1;
    }
}

fn identifier(f: &mut Fields, id: &Identifier) {
    f.text(id.system.as_deref());
    f.text(id.value.as_deref());
}

/// The task inline: its kind (absent for none), then its fields.
fn encode_task(f: &mut Fields, task: Option<&Task>) {
    let Some(task) = task else {
        f.field(None);
        return;
    };
    f.text(Some(task.kind().as_str()));
    match task {
        Task::DicPsnAvailable {
            expires,
            bloomfilter,
            target,
            pseudonym,
        } => {
            f.time(*expires);
            f.field(Some(bloomfilter.as_bytes()));
            identifier(f, target);
            f.text(pseudonym.system.as_deref());
            f.text(Some(&pseudonym.value));
        }
        Task::SendIdat {
            expires,
            task_id,
            pseudonym,
            bloomfilter,
            elements,
        } => {
            f.time(Some(*expires));
            f.text(Some(task_id.as_str()));
            f.text(pseudonym.as_ref().and_then(|p| p.system.as_deref()));
            f.text(pseudonym.as_ref().map(|p| p.value.as_str()));
            f.field(bloomfilter.as_ref().map(BloomFilter::as_bytes));
            let codes: Vec<&str> = elements.iter().map(|e| e.code()).collect();
            f.text(Some(&codes.join(" ")));
        }
        Task::RepeatRequest {
            expires,
            study,
            bloomfilter,
            target,
        } => {
            f.time(*expires);
            identifier(f, study);
            f.field(Some(bloomfilter.as_bytes()));
            identifier(f, target);
        }
    }
}

/// A task alone, in the binary form of a ledger entry's task.
pub(super) fn encode_task_alone(task: &Task) -> Vec<u8> {
    let mut f = Fields::new(PAYLOAD);
    encode_task(&mut f, Some(task));
    f.into_bytes()
}

/// What `encode_task_alone` wrote; `None` on anything else.
pub(super) fn decode_task(bytes: &[u8]) -> Option<Task> {
    let mut r = Reader::new(bytes, PAYLOAD)?;
    let task = read_task(&mut r)??;
    r.is_done().then_some(task)
}

fn read_identifier(r: &mut Reader<'_>) -> Option<Identifier> {
    Some(Identifier {
        system: r.text()?,
        value: r.text()?,
    })
}

fn read_bloomfilter(r: &mut Reader<'_>) -> Option<Option<BloomFilter>> {
    match r.field()? {
        Some(b) => Some(Some(BloomFilter::from_bytes(b.to_vec()).ok()?)),
        None => Some(None),
    }
}

fn read_task(r: &mut Reader<'_>) -> Option<Option<Task>> {
    let Some(kind) = r.text()? else {
        return Some(None);
    };
    let task = match kind.parse::<TaskKind>().ok()? {
        TaskKind::DicPsnAvailable => Task::DicPsnAvailable {
            expires: r.time()?,
            bloomfilter: read_bloomfilter(r)??,
            target: read_identifier(r)?,
            pseudonym: Pseudonym {
                system: r.text()?,
                value: r.text()??,
            },
        },
        TaskKind::SendIdat => {
            let expires = r.time()??;
            let task_id = TaskId::parse(&r.text()??)?;
            let system = r.text()?;
            let pseudonym = match r.text()? {
                Some(value) => Some(Pseudonym { system, value }),
                None if system.is_none() => None,
                None => return None,
            };
            let bloomfilter = read_bloomfilter(r)?;
            let codes = r.text()??;
            let elements = codes
                .split(' ')
                .filter(|c| !c.is_empty())
                .map(IdatElement::from_code)
                .collect::<Option<Vec<_>>>()?;
            Task::SendIdat {
                expires,
                task_id,
                pseudonym,
                bloomfilter,
                elements,
            }
        }
        TaskKind::RepeatRequest => Task::RepeatRequest {
            expires: r.time()?,
            study: read_identifier(r)?,
            bloomfilter: read_bloomfilter(r)??,
            target: read_identifier(r)?,
        },
        TaskKind::Unknown => return None,
    };
    Some(Some(task))
}

fn read_u32(r: &mut Reader<'_>) -> Option<u32> {
    Some(u32::from_le_bytes(r.field()??.try_into().ok()?))
}

fn read_status(r: &mut Reader<'_>) -> Option<Status> {
    r.text()??.parse().ok()
}

fn decode_frame(tag: u8, payload: &[u8]) -> Option<Record> {
    if tag == JSON {
        return serde_json::from_slice(payload).ok();
    }
    let mut r = Reader::new(payload, PAYLOAD)?;
    let record = match tag {
        LEDGER => Record::Ledger(LedgerEntry {
            key: r.text()??,
            kind: r.text()??.parse().ok()?,
            display_id: r.text()??,
            status: read_status(&mut r)?,
            outcome: Outcome::parse(&r.text()??)?,
            detail: r.text()?,
            expires: r.time()?,
            first_seen: r.time()??,
            last_seen: r.time()??,
            updated: r.time()??,
            attempts: read_u32(&mut r)?,
            task: read_task(&mut r)?,
        }),
        PROGRESS => Record::Progress(Progress {
            key: r.text()??,
            status: read_status(&mut r)?,
            outcome: Outcome::parse(&r.text()??)?,
            detail: r.text()?,
            last_seen: r.time()??,
            updated: r.time()??,
            attempts: read_u32(&mut r)?,
        }),
        PSEUDONYM => {
            let target = r.text()??;
            Record::Pseudonym(decode_pseudonym(r.field()??, &target)?)
        }
        PATIENT => {
            let local_id = LocalId(r.text()??);
            let updated = r.time()??;
            let secret = PatientSecret::decode(r.field()??)?;
            Record::Patient(PatientRecord {
                local_id,
                idat: secret.idat,
                bloomfilter: secret.bloomfilter,
                updated,
            })
        }
        _ => return None,
    };
    // Nothing may be left over: a payload is read exactly as written.
    r.is_done().then_some(record)
}

/// The records of a batch, in order; `None` if it is not exactly what
/// `BatchWriter` writes.
pub(super) fn decode(bytes: &[u8]) -> Option<Vec<Record>> {
    let (&version, rest) = bytes.split_first()?;
    if version != VERSION {
        return None;
    }
    let (count, mut rest) = rest.split_at_checked(4)?;
    let count = u32::from_le_bytes(count.try_into().ok()?) as usize;
    // (The count comes from inside the seal; still, it does not size memory
    // beyond what the bytes can hold.)
    let mut records = Vec::with_capacity(count.min(bytes.len() / 10));
    while let Some((&tag, tail)) = rest.split_first() {
        let (len, tail) = tail.split_at_checked(8)?;
        let len = usize::try_from(u64::from_le_bytes(len.try_into().ok()?)).ok()?;
        let (payload, tail) = tail.split_at_checked(len)?;
        records.push(decode_frame(tag, payload)?);
        rest = tail;
    }
    (records.len() == count).then_some(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::idat::Idat;
    use crate::store::records::{EnrolmentRecord, EnrolmentStatus, PollRecord, PseudonymRecord};
    use chrono::{DateTime, TimeZone, Utc};

    fn bf(n: u8, len: usize) -> BloomFilter {
        BloomFilter::from_bytes(vec![n; len]).unwrap()
    }

    fn entry(task: Option<Task>, detail: Option<String>, expires: Option<DateTime<Utc>>) -> LedgerEntry {
        let now = Utc::now();
        LedgerEntry {
            key: "sha256:\"quoted\\key\" ä".into(),
            kind: task.as_ref().map_or(TaskKind::Unknown, Task::kind),
            display_id: "task-7".into(),
            task,
            status: Status::InFlight,
            outcome: Outcome::Failed,
            detail,
            expires,
            first_seen: now,
            last_seen: now + chrono::Duration::seconds(3),
            updated: Utc.timestamp_opt(-5_000_000_000, 999_999_999).unwrap(),
            attempts: u32::MAX,
        }
    }

    /// Every kind of record, with the edge values of each field: absent and
    /// present options, empty and very long strings, the largest Bloom
    /// filter, times far outside nanoseconds' range.
    fn every_record() -> Vec<Record> {
        let far = Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap();
        // A leap second, as an RFC 3339 `expires` of "…23:59:60…" parses.
        let leap: DateTime<Utc> = "2016-12-31T23:59:60.5Z".parse().unwrap();
        assert!(leap.timestamp_subsec_nanos() >= 1_000_000_000);
        let long = "x".repeat(70_000);
        let id = |s: Option<&str>, v: Option<&str>| Identifier {
            system: s.map(str::to_string),
            value: v.map(str::to_string),
        };
        let tasks = vec![
            Task::RepeatRequest {
                expires: Some(far),
                study: id(Some("https://ths-greifswald.de/gpas"), Some("mii")),
                bloomfilter: bf(1, BloomFilter::MAX_BYTES),
                target: id(None, Some("dic_x")),
            },
            Task::RepeatRequest {
                expires: Some(leap),
                study: id(None, None),
                bloomfilter: bf(2, 1),
                target: id(Some(""), None),
            },
            Task::DicPsnAvailable {
                expires: None,
                bloomfilter: bf(3, 64),
                target: id(Some("s"), Some("t")),
                pseudonym: Pseudonym {
                    system: None,
                    value: String::new(),
                },
            },
            Task::SendIdat {
                expires: far,
                task_id: TaskId::parse("task-1.a").unwrap(),
                pseudonym: Some(Pseudonym {
                    system: Some("sys".into()),
                    value: "psn ü".into(),
                }),
                bloomfilter: None,
                elements: IdatElement::ALL.to_vec(),
            },
            Task::SendIdat {
                expires: Utc::now(),
                task_id: TaskId::parse("t").unwrap(),
                pseudonym: None,
                bloomfilter: Some(bf(4, 65_535)),
                elements: vec![],
            },
        ];
        let mut records: Vec<Record> = tasks
            .into_iter()
            .map(|t| Record::Ledger(entry(Some(t), None, Some(far))))
            .collect();
        records.push(Record::Ledger(entry(None, Some(long.clone()), None)));
        records.push(Record::Progress(Progress {
            key: "k".into(),
            status: Status::Resolved,
            outcome: Outcome::Stored,
            detail: Some(long.clone()),
            last_seen: far,
            updated: Utc::now(),
            attempts: 0,
        }));
        records.push(Record::Pseudonym(PseudonymRecord {
            study: String::new(),
            bloomfilter: bf(5, 64),
            target: "dic_müenster".into(),
            pseudonym: Pseudonym {
                system: None,
                value: long.clone(),
            },
            received: Utc::now(),
            source: "sha256:abc".into(),
        }));
        let mut idat = Idat::default();
        idat.set(IdatElement::Given, Some(long));
        idat.set(IdatElement::Family, Some("Müller".into()));
        records.push(Record::Patient(PatientRecord {
            local_id: LocalId("p-1 \"x\"".into()),
            idat,
            bloomfilter: Some(bf(6, 64)),
            updated: Utc::now(),
        }));
        records.push(Record::Patient(PatientRecord {
            local_id: LocalId(String::new()),
            idat: Idat::default(),
            bloomfilter: None,
            updated: Utc::now(),
        }));
        records.push(Record::Poll(PollRecord {
            study: "mii".into(),
            at: Utc::now(),
            ok: false,
            tasks: 3,
            detail: Some("HTTP 503".into()),
            last_ok: None,
            failures: 2,
        }));
        records.push(Record::Purge { key: "k".into() });
        records.push(Record::Forget {
            local_id: LocalId("p-1".into()),
        });
        records.push(Record::Enrolment(EnrolmentRecord {
            study: "mii".into(),
            local_id: LocalId("p-2".into()),
            bloomfilter: bf(7, 64),
            status: EnrolmentStatus::Clearing,
            detail: None,
            updated: Utc::now(),
        }));
        records
    }

    fn encode(records: &[Record]) -> Vec<u8> {
        let mut w = BatchWriter::new();
        for r in records {
            w.push(r);
        }
        w.finish()
    }

    #[test]
    fn every_kind_of_record_round_trips_exactly() {
        let records = every_record();
        assert_eq!(decode(&encode(&records)), Some(records.clone()));
        for r in &records {
            let one = std::slice::from_ref(r);
            assert_eq!(decode(&encode(one)).as_deref(), Some(one), "{r:?}");
        }
        assert_eq!(decode(&encode(&[])), Some(vec![]));
    }

    #[test]
    fn a_ledger_entry_is_a_fraction_of_its_json() {
        let e = entry(
            Some(Task::RepeatRequest {
                expires: Some(Utc::now()),
                study: Identifier::new(Some("https://ths-greifswald.de/gpas"), "mii"),
                bloomfilter: bf(1, 64),
                target: Identifier::new(Some("https://ths-greifswald.de/gpas"), "dic_bench"),
            }),
            None,
            Some(Utc::now()),
        );
        let json = serde_json::to_vec(&Record::Ledger(e.clone())).unwrap().len();
        let binary = encode(&[Record::Ledger(e)]).len();
        assert!(binary * 10 < json * 6, "binary {binary} bytes vs JSON {json}");
    }

    #[test]
    fn anything_but_exactly_what_was_written_is_refused() {
        let records = every_record();
        let bytes = encode(&records[..6]);
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut]), None, "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(&longer), None, "trailing byte");
        let mut wrong_count = bytes.clone();
        wrong_count[1] += 1;
        assert_eq!(decode(&wrong_count), None, "count");
        let mut wrong_version = bytes.clone();
        wrong_version[0] = VERSION + 1;
        assert_eq!(decode(&wrong_version), None, "version");
        let mut unknown_tag = bytes;
        unknown_tag[5] = 9;
        assert_eq!(decode(&unknown_tag), None, "tag");
    }

    #[test]
    fn a_field_that_does_not_parse_is_refused() {
        let mut e = entry(None, None, None);
        e.status = Status::Failed;
        let bytes = encode(&[Record::Ledger(e)]);
        // Turn "failed" into "failex": not a status.
        let at = bytes.windows(6).position(|w| w == b"failed").unwrap();
        let mut broken = bytes.clone();
        broken[at + 5] = b'x';
        assert_eq!(decode(&broken), None);
    }

    mod property {
        use super::*;
        use proptest::prelude::*;

        fn text() -> impl Strategy<Value = String> {
            prop_oneof![
                ".{0,40}",
                Just(String::new()),
                (0usize..3).prop_map(|n| "é".repeat(40_000 * n)),
            ]
        }

        fn time() -> impl Strategy<Value = DateTime<Utc>> {
            // chrono's whole range, and sub-second and leap-second nanoseconds.
            (-8_000_000_000_000i64..8_000_000_000_000, 0u32..2_000_000_000).prop_map(|(s, n)| {
                DateTime::from_timestamp(s, n)
                    .or_else(|| DateTime::from_timestamp(s, n % 1_000_000_000))
                    .unwrap_or_default()
            })
        }

        fn identifier() -> impl Strategy<Value = Identifier> {
            (proptest::option::of(text()), proptest::option::of(text()))
                .prop_map(|(system, value)| Identifier { system, value })
        }

        fn bloomfilter() -> impl Strategy<Value = BloomFilter> {
            proptest::collection::vec(any::<u8>(), 1..200).prop_map(|b| BloomFilter::from_bytes(b).unwrap())
        }

        fn task() -> impl Strategy<Value = Task> {
            prop_oneof![
                (proptest::option::of(time()), identifier(), bloomfilter(), identifier()).prop_map(
                    |(expires, study, bloomfilter, target)| Task::RepeatRequest {
                        expires,
                        study,
                        bloomfilter,
                        target
                    }
                ),
                (
                    proptest::option::of(time()),
                    bloomfilter(),
                    identifier(),
                    proptest::option::of(text()),
                    text()
                )
                    .prop_map(|(expires, bloomfilter, target, system, value)| Task::DicPsnAvailable {
                        expires,
                        bloomfilter,
                        target,
                        pseudonym: Pseudonym { system, value },
                    }),
                (
                    time(),
                    "[A-Za-z0-9.-]{1,64}",
                    proptest::option::of((proptest::option::of(text()), text())),
                    proptest::option::of(bloomfilter()),
                    proptest::sample::subsequence(IdatElement::ALL.to_vec(), 0..IdatElement::ALL.len()),
                )
                    .prop_map(|(expires, id, psn, bloomfilter, elements)| Task::SendIdat {
                        expires,
                        task_id: TaskId::parse(&id).unwrap(),
                        pseudonym: psn.map(|(system, value)| Pseudonym { system, value }),
                        bloomfilter,
                        elements,
                    }),
            ]
        }

        fn record() -> impl Strategy<Value = Record> {
            let status = proptest::sample::select(Status::ALL.to_vec());
            let outcome = proptest::sample::select(Outcome::ALL.to_vec());
            prop_oneof![
                (
                    text(),
                    text(),
                    status.clone(),
                    outcome.clone(),
                    proptest::option::of(text()),
                    proptest::option::of(time()),
                    (time(), time(), time()),
                    any::<u32>(),
                    proptest::option::of(task()),
                )
                    .prop_map(
                        |(key, display_id, status, outcome, detail, expires, (f, l, u), attempts, task)| {
                            Record::Ledger(LedgerEntry {
                                key,
                                kind: task.as_ref().map_or(TaskKind::Unknown, Task::kind),
                                display_id,
                                task,
                                status,
                                outcome,
                                detail,
                                expires,
                                first_seen: f,
                                last_seen: l,
                                updated: u,
                                attempts,
                            })
                        }
                    ),
                (
                    text(),
                    status,
                    outcome,
                    proptest::option::of(text()),
                    time(),
                    time(),
                    any::<u32>()
                )
                    .prop_map(|(key, status, outcome, detail, last_seen, updated, attempts)| {
                        Record::Progress(Progress {
                            key,
                            status,
                            outcome,
                            detail,
                            last_seen,
                            updated,
                            attempts,
                        })
                    }),
                (
                    bloomfilter(),
                    text(),
                    proptest::option::of(text()),
                    text(),
                    time(),
                    text()
                )
                    .prop_map(|(bloomfilter, target, system, value, received, source)| {
                        Record::Pseudonym(PseudonymRecord {
                            study: String::new(),
                            bloomfilter,
                            target,
                            pseudonym: Pseudonym { system, value },
                            received,
                            source,
                        })
                    }),
                text().prop_map(|key| Record::Purge { key }),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            /// Whatever the records hold, a batch gives them back exactly,
            /// and a batch cut short is refused.
            #[test]
            fn any_batch_round_trips(records in proptest::collection::vec(record(), 0..6), cut in any::<prop::sample::Index>()) {
                let bytes = encode(&records);
                prop_assert_eq!(decode(&bytes), Some(records));
                let at = cut.index(bytes.len());
                prop_assert_eq!(decode(&bytes[..at]), None);
            }
        }
    }
}
