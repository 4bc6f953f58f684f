//! The store's own tests: state, files, crash atomicity, batches.

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

/// A store in `dir` with patients 1 and 2, closed again.
fn two_patients(dir: &Path) {
    let mut s = Store::open(dir, LockMode::Try, key()).unwrap();
    s.put(patient("1", b"one")).unwrap();
    s.put(patient("2", b"two")).unwrap();
}

#[test]
fn state_survives_reopen_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    two_patients(dir.path());
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
    two_patients(dir.path());
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
