//! The store's encryption and sealed format: nothing identifying in clear,
//! wrong keys and swapped records refused, re-keying, batches, versions.

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
