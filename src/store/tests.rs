//! The store's own tests: state across opens, the lock, readers beside the
//! writer, what the file holds in clear, re-keying, erasure, backup.

use super::*;
use crate::fhir::idat::Idat;
use crate::types::Pseudonym;
use crate::vocab::Outcome;
use chrono::Utc;

fn key() -> StoreKey {
    StoreKey::from_bytes(&[42; 32])
}

fn bf(tag: &[u8]) -> BloomFilter {
    BloomFilter::from_bytes(tag.repeat(16)).unwrap()
}

fn patient(id: &str, tag: &[u8]) -> Record {
    Record::Patient(PatientRecord {
        local_id: LocalId(id.into()),
        idat: Idat {
            family: Some(format!("Familienname{id}")),
            ..Idat::default()
        },
        bloomfilter: Some(bf(tag)),
        updated: Utc::now(),
    })
}

fn pseudonym(tag: &[u8], value: &str) -> Record {
    Record::Pseudonym(PseudonymRecord {
        bloomfilter: bf(tag),
        study: "mii".into(),
        target: "dic_x".into(),
        pseudonym: Pseudonym {
            system: None,
            value: value.into(),
        },
        received: Utc::now(),
        source: "sha256:1".into(),
    })
}

fn entry(key: &str, status: Status) -> Record {
    let now = Utc::now();
    Record::Ledger(LedgerEntry {
        key: key.into(),
        kind: crate::tasks::TaskKind::SendIdat,
        display_id: key.into(),
        task: None,
        status,
        outcome: Outcome::Received,
        detail: Some("vom Dispatcher".into()),
        expires: Some(now + chrono::Duration::days(1)),
        first_seen: now,
        last_seen: now,
        updated: now,
        attempts: 0,
    })
}

/// Every byte of every file in `dir`.
fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        out.extend(std::fs::read(e.unwrap().path()).unwrap());
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn what_is_written_is_there_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = Store::open(dir.path(), LockMode::Try, key()).unwrap();
        s.write(vec![
            patient("1", b"one"),
            patient("2", b"two"),
            pseudonym(b"one", "PSN-1"),
            entry("task:a", Status::Pending),
            Record::Progress(Progress {
                key: "task:a".into(),
                status: Status::Resolved,
                outcome: Outcome::Sent,
                detail: None,
                last_seen: Utc::now(),
                updated: Utc::now(),
                attempts: 1,
            }),
            entry("task:b", Status::Pending),
            Record::Purge { key: "task:b".into() },
        ])
        .unwrap();
        assert_eq!(s.generation(), 1);
    }
    let s = Store::open(dir.path(), LockMode::Try, key()).unwrap();
    assert_eq!(s.generation(), 1);
    assert_eq!(s.patient_count().unwrap(), 2);
    let found = s.patient_by_pseudonym("mii", "PSN-1").unwrap().unwrap();
    assert_eq!(found.local_id, LocalId("1".into()));
    assert_eq!(
        s.patient_by_pseudonym("other", "PSN-1").unwrap(),
        None,
        "another target"
    );
    assert_eq!(s.ledger("task:a").unwrap().status, Status::Resolved);
    assert_eq!(s.ledger("task:a").unwrap().attempts, 1);
    assert!(s.ledger("task:b").is_none(), "purged");
    assert_eq!(s.without_pseudonym("mii").unwrap(), vec![LocalId("2".into())]);
    assert_eq!(s.local_ids().unwrap().len(), 2);
}

#[test]
fn a_second_writer_is_refused_with_the_holders_pid_and_a_reader_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = Store::open(dir.path(), LockMode::Try, key()).unwrap();
    writer.put(patient("1", b"one")).unwrap();
    match Store::open(dir.path(), LockMode::Try, key()) {
        Err(StoreError::Locked { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert_eq!(writer::pid_of(dir.path()), Some(Some(std::process::id())));
    // A reader sees the last committed write, takes no lock, writes nothing.
    let mut reader = Store::open(dir.path(), LockMode::Read, key()).unwrap();
    assert_eq!(reader.patient_count().unwrap(), 1);
    assert!(matches!(
        reader.put(patient("9", b"nine")),
        Err(StoreError::ReadOnly { .. })
    ));
    writer.put(patient("2", b"two")).unwrap();
    let later = Store::open(dir.path(), LockMode::Read, key()).unwrap();
    assert_eq!(later.patient_count().unwrap(), 2);
    drop(writer);
    assert_eq!(writer::pid_of(dir.path()), None);
}

/// (A name for `super::writer` that reads as what it asks.)
mod writer {
    pub(crate) fn pid_of(dir: &std::path::Path) -> Option<Option<u32>> {
        super::super::writer(dir)
    }
}

#[test]
fn nothing_that_names_a_person_is_in_the_files_in_clear() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), LockMode::Try, key()).unwrap();
    s.write(vec![
        patient("local-4711", b"filter-bytes"),
        pseudonym(b"filter-bytes", "PSN-SECRET"),
        entry("task:T-0815", Status::Pending),
    ])
    .unwrap();
    s.put(Record::Poll(PollRecord {
        study: "mii".into(),
        at: Utc::now(),
        ok: false,
        tasks: 0,
        detail: Some("Antwort-Text".into()),
        last_ok: None,
        failures: 1,
    }))
    .unwrap();
    let files = all_bytes(dir.path());
    for secret in [
        &b"local-4711"[..],
        b"Familienname",
        b"filter-bytesfilter-bytes",
        b"PSN-SECRET",
        b"T-0815",
        b"vom Dispatcher",
        b"Antwort-Text",
    ] {
        assert!(!contains(&files, secret), "{}", String::from_utf8_lossy(secret));
    }
    drop(s);
    match Store::open(dir.path(), LockMode::Try, StoreKey::from_bytes(&[7; 32])) {
        Err(e @ StoreError::WrongKey { .. }) => assert_eq!(e.exit_code(), crate::exit::CONFIG),
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[test]
fn rekey_reencrypts_everything_and_keeps_which_filter_an_enrolment_sent() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), LockMode::Try, key()).unwrap();
    s.write(vec![
        patient("1", b"one"),
        patient("2", b"two"),
        pseudonym(b"one", "PSN-1"),
        entry("task:a", Status::Pending),
        Record::Enrolment(EnrolmentRecord {
            study: "mii".into(),
            local_id: LocalId("1".into()),
            bloomfilter: bf(b"one"),
            status: EnrolmentStatus::Clearing,
            detail: None,
            updated: Utc::now(),
        }),
        // Patient 2's enrolment sent a filter she no longer has.
        Record::Enrolment(EnrolmentRecord {
            study: "mii".into(),
            local_id: LocalId("2".into()),
            bloomfilter: bf(b"old"),
            status: EnrolmentStatus::Error,
            detail: Some("E1".into()),
            updated: Utc::now(),
        }),
    ])
    .unwrap();
    s.forget(&LocalId("3".into())).unwrap();
    let new = StoreKey::from_bytes(&[9; 32]);
    let new_id = new.id().to_string();
    s.rekey(new).unwrap();
    assert_eq!(s.key_id(), new_id);
    drop(s);
    assert!(matches!(
        Store::open(dir.path(), LockMode::Try, key()),
        Err(StoreError::WrongKey { .. })
    ));
    let s = Store::open(dir.path(), LockMode::Try, StoreKey::from_bytes(&[9; 32])).unwrap();
    assert_eq!(s.patient_by_pseudonym("mii", "PSN-1").unwrap().unwrap().local_id.0, "1");
    assert_eq!(s.ledger("task:a").unwrap().status, Status::Pending);
    assert!(s.is_forgotten(&LocalId("3".into())));
    let e1 = s
        .enrolment(&LocalId("1".into()), "mii", Some(&bf(b"one")))
        .unwrap()
        .unwrap();
    assert_eq!((e1.status, e1.same_filter), (EnrolmentStatus::Clearing, true));
    let e2 = s
        .enrolment(&LocalId("2".into()), "mii", Some(&bf(b"two")))
        .unwrap()
        .unwrap();
    assert_eq!(
        (e2.status, e2.same_filter, e2.detail.as_deref()),
        (EnrolmentStatus::Error, false, Some("E1"))
    );
}

#[test]
fn forget_leaves_no_copy_of_the_patient_in_the_database_or_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), LockMode::Try, key()).unwrap();
    s.write(vec![patient("1", b"one"), patient("2", b"two")]).unwrap();
    // Her row as it is on disk: the sealed bytes and the index entries.
    let (id_index, bf_index, id_sealed, sealed): (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>) =
        s.db.connection()
            .query_row(
                "SELECT id_index, bf_index, id_sealed, sealed FROM patients WHERE id_index = ?1",
                [&rows::id_index(&key(), &LocalId("1".into()))[..]],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
    // Updated once more, so that older versions of her row are in the log too.
    s.put(patient("1", b"one")).unwrap();
    assert!(contains(&all_bytes(dir.path()), &sealed), "the test sees the row");
    assert!(s.forget(&LocalId("1".into())).unwrap());
    let files = all_bytes(dir.path());
    for (what, bytes) in [
        ("the sealed IDAT", &sealed),
        ("the sealed local id", &id_sealed),
        ("the local id index", &id_index),
        ("the Bloom filter index", &bf_index),
    ] {
        assert!(!contains(&files, bytes), "{what} is still in a file");
    }
    assert_eq!(s.patient(&LocalId("1".into())).unwrap(), None);
    assert!(s.patient(&LocalId("2".into())).unwrap().is_some());
}

#[test]
fn a_backup_taken_beside_a_writer_opens_as_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let mut writer = Store::open(&store, LockMode::Try, key()).unwrap();
    writer
        .write(vec![
            patient("1", b"one"),
            pseudonym(b"one", "PSN-1"),
            entry("task:a", Status::Pending),
        ])
        .unwrap();
    let reader = Store::open(&store, LockMode::Read, key()).unwrap();
    let dest = dir.path().join("backup");
    let file = reader.backup(&dest).unwrap();
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(reader.backup(&dest).is_err(), "never over an existing directory");
    writer.put(patient("2", b"two")).unwrap();
    drop((reader, writer));
    let restored = Store::open(&dest, LockMode::Try, key()).unwrap();
    assert_eq!(restored.patient_count().unwrap(), 1, "the copy is of its moment");
    assert_eq!(
        restored
            .patient_by_pseudonym("mii", "PSN-1")
            .unwrap()
            .unwrap()
            .local_id
            .0,
        "1"
    );
    assert_eq!(restored.ledger("task:a").unwrap().status, Status::Pending);
}

use std::os::unix::fs::PermissionsExt;

#[test]
fn a_one_study_database_is_migrated_and_its_rows_given_to_the_configured_study() {
    // A store at schema version 1 (before several studies), with a
    // pseudonym, an enrolment, a poll and a task, as that version wrote them.
    let dir = tempfile::tempdir().unwrap();
    {
        let db = db::Db::open_with(&dir.path().join(db::FILE), &db::MIGRATIONS[..1]).unwrap();
        let k = key();
        let c = db.connection();
        let manifest = Manifest {
            generation: 1,
            tombstones: 0,
            tombstone_digest: rows::tombstone_digest(std::iter::empty()),
            audit_seq: 0,
        };
        c.execute(
            "INSERT INTO meta (key, value) VALUES ('key_id', ?1), ('manifest', ?2)",
            params![k.id(), rows::seal_manifest(&k, &manifest)],
        )
        .unwrap();
        let Record::Pseudonym(mut p) = pseudonym(b"one", "PSN-OLD") else {
            unreachable!()
        };
        p.study = String::new();
        let row = rows::seal_pseudonym(&k, &p);
        c.execute(
            "INSERT INTO pseudonyms (bf_index, target, psn_index, sealed, received, source) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![&row.bf_index[..], row.target, &row.psn_index[..], row.sealed, row.received, row.source],
        )
        .unwrap();
        let Record::Ledger(e) = entry("task:old", Status::Pending) else {
            unreachable!()
        };
        let l = rows::seal_ledger(&k, &e);
        c.execute(
            "INSERT INTO ledger (key_index, kind, status, outcome, expires, first_seen, last_seen, updated, attempts, \
             sealed) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                &l.key_index[..],
                l.kind,
                l.status,
                l.outcome,
                l.expires,
                l.first_seen,
                l.last_seen,
                l.updated,
                l.attempts,
                l.sealed
            ],
        )
        .unwrap();
        let poll = PollRecord {
            study: String::new(),
            at: Utc::now(),
            ok: true,
            tasks: 1,
            detail: None,
            last_ok: Some(Utc::now()),
            failures: 0,
        };
        c.execute(
            "INSERT INTO polls (id, sealed) VALUES (1, ?1)",
            [rows::seal_poll(&k, &poll)],
        )
        .unwrap();
    }
    let mut s = Store::open(dir.path(), LockMode::Try, key()).unwrap();
    assert!(s.needs_study(), "schema 2 marks the rows as the study's to be");
    assert!(s.adopt_legacy("mii").unwrap());
    assert!(!s.adopt_legacy("mii").unwrap(), "once");
    drop(s);
    let s = Store::open(dir.path(), LockMode::Read, key()).unwrap();
    assert!(!s.needs_study());
    assert_eq!(
        s.pseudonym(&bf(b"one"), "mii").unwrap().unwrap().pseudonym.value,
        "PSN-OLD"
    );
    assert!(s.pseudonym(&bf(b"one"), "").unwrap().is_none());
    assert_eq!(s.ledger("mii/task:old").unwrap().status, Status::Pending);
    assert!(s.ledger("task:old").is_none());
    assert!(s.last_polls()["mii"].ok);
}

#[test]
fn a_batch_lookup_finds_what_the_lookups_one_at_a_time_find() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), LockMode::Try, key()).unwrap();
    store
        .write(vec![
            patient("p1", b"a"),
            patient("p2", b"b"),
            pseudonym(b"a", "mii_A"),
            pseudonym(b"c", "mii_C"),
        ])
        .unwrap();
    assert!(store.forget(&LocalId("p2".into())).unwrap());
    // A patient with a pseudonym, an erased one, a pseudonym without a
    // patient, neither, and the first again.
    let filters = [bf(b"a"), bf(b"b"), bf(b"c"), bf(b"d"), bf(b"a")];
    let refs: Vec<&BloomFilter> = filters.iter().collect();
    let batch = store.patients_and_pseudonyms(&refs, "mii").unwrap();
    assert_eq!(batch.len(), filters.len());
    for (f, found) in filters.iter().zip(&batch) {
        assert_eq!(found, &store.patient_and_pseudonym(f, "mii").unwrap());
    }
    assert_eq!(batch[0].0, Some(LocalId("p1".into())));
    assert_eq!(batch[2].1.as_ref().map(|p| p.pseudonym.value.as_str()), Some("mii_C"));
    assert_eq!(batch[1], (None, None));
    // Another study's pseudonyms are not this one's.
    assert!(
        store
            .patients_and_pseudonyms(&refs, "napkon")
            .unwrap()
            .iter()
            .all(|f| f.1.is_none())
    );
    assert!(store.patients_and_pseudonyms(&[], "mii").unwrap().is_empty());
}

#[test]
fn the_ledger_keeps_the_order_its_entries_arrived_in_across_opens() {
    let dir = tempfile::tempdir().unwrap();
    let keys = ["task:m", "task:c", "task:x", "task:a", "task:q"];
    {
        let mut s = Store::open(dir.path(), LockMode::Try, key()).unwrap();
        s.write(keys[..3].iter().map(|k| entry(k, Status::Pending)).collect())
            .unwrap();
        s.write(keys[3..].iter().map(|k| entry(k, Status::Pending)).collect())
            .unwrap();
        // (A change of an entry keeps its place.)
        s.write(vec![entry("task:c", Status::Failed)]).unwrap();
        let order: Vec<&str> = s.ledger_in_arrival_order().iter().map(|e| e.key.as_str()).collect();
        assert_eq!(order, keys);
    }
    let s = Store::open(dir.path(), LockMode::Try, key()).unwrap();
    let order: Vec<&str> = s.ledger_in_arrival_order().iter().map(|e| e.key.as_str()).collect();
    assert_eq!(order, keys);
    assert_eq!(s.ledger("task:c").map(|e| e.status), Some(Status::Failed));
}
