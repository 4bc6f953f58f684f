//! An attacker who can write the audit files and the store but has no key
//! (security review, issue 18): every edit below must be found by `audit
//! verify`, the agent must refuse to continue a chain that was cut short,
//! and an edited store is a damaged store, never a send for the wrong
//! patient. A store or audit log rolled back alone is refused unless the
//! restore is declared (`--accept-restore`), and then audited.

// (A test or benchmark stops at what it cannot set up: the panic is the report.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chrono::{Duration, Utc};
use common::{Site, TARGET, bf, lines, verify, verify_with, write_lines};
use fttp_agent::fhir::idat::IdatElement;
use fttp_agent::sim;
use std::path::{Path, PathBuf};

/// A site with an HMAC-chained audit log of a few cycles; returns the
/// site, the log and the key.
fn keyed_site() -> (Site, PathBuf, PathBuf) {
    let site = Site::new("xml");
    let key = site.dir.path().join("audit.key");
    fttp_agent::crypto::StoreKey::generate(&key).unwrap();
    let text = std::fs::read_to_string(&site.config)
        .unwrap()
        .replace("[log]\n", "[log]\naudit_hmac_key_file = \"audit.key\"\n");
    std::fs::write(&site.config, text).unwrap();
    site.import_patients();
    let later = Utc::now() + Duration::days(1);
    site.sim
        .add_task(sim::dic_psn_available(&bf(1), TARGET, "mii_K1", None));
    site.sim
        .add_task(sim::send_idat("k1", later, None, Some(&bf(2)), &[IdatElement::Given]));
    assert_eq!(site.cycle().0, 0);
    site.sim
        .add_task(sim::send_idat("k2", later, None, Some(&bf(3)), &[IdatElement::Family]));
    assert_eq!(site.cycle().0, 0);
    let audit = site.dir.path().join("audit.ndjson");
    let (code, out) = verify(&[&audit], Some(&key));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("it ends at the head saved at its last sync"), "{out}");
    (site, audit, key)
}

/// Rechains `records` with plain SHA-256 from `prev`, as a forger without
/// the key would.
fn rechain_sha256(records: &[String], mut prev: String) -> Vec<String> {
    records
        .iter()
        .map(|line| {
            let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line).unwrap();
            v.remove("hash");
            v.insert("prev".into(), prev.clone().into());
            v.insert("chain".into(), "sha256".into());
            let hash = fttp_agent::privacy::sha256_hex(serde_json::to_string(&v).unwrap().as_bytes());
            v.insert("hash".into(), hash.clone().into());
            prev = hash;
            serde_json::to_string(&v).unwrap()
        })
        .collect()
}

fn edited(line: &str, field: &str, value: &str) -> String {
    let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line).unwrap();
    v.insert(field.into(), value.into());
    serde_json::to_string(&v).unwrap()
}

#[test]
fn a_keyed_log_rewritten_as_a_plain_chain_does_not_verify_with_the_key() {
    let (_site, audit, key) = keyed_site();
    let original = lines(&audit);
    // One record edited, one dropped, one inserted; then rechained whole.
    let mut l = original.clone();
    l[1] = edited(&l[1], "outcome", "failed");
    l.remove(3);
    l.insert(2, original[4].clone());
    write_lines(&audit, &rechain_sha256(&l, fttp_agent::audit::GENESIS.into()));
    let (code, out) = verify(&[&audit], Some(&key));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(":1: the log is chained with sha256, but a key was given"),
        "{out}"
    );

    // Keeping the first (keyed) record and rechaining the rest after it.
    let first: serde_json::Value = serde_json::from_str(&original[0]).unwrap();
    let mut rest = original[1..].to_vec();
    rest[0] = edited(&rest[0], "outcome", "failed");
    let mut l = vec![original[0].clone()];
    l.extend(rechain_sha256(&rest, first["hash"].as_str().unwrap().into()));
    write_lines(&audit, &l);
    let (code, out) = verify(&[&audit], Some(&key));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(":2: the chain's algorithm changes here (hmac-sha256 before, sha256 here)"),
        "{out}"
    );
}

#[test]
fn records_cut_off_the_end_are_found_and_the_agent_will_not_continue() {
    let (site, audit, key) = keyed_site();
    let original = lines(&audit);
    let n = original.len();
    write_lines(&audit, &original[..n - 2]);
    let (code, out) = verify(&[&audit], Some(&key));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            ":{}: the log ends here, but the head saved at its last sync is record {n}",
            n - 1
        )),
        "{out}"
    );
    assert!(out.contains("records were cut off the end"), "{out}");
    // The agent refuses to append to it (which would hide the cut).
    let before = std::fs::read(&audit).unwrap();
    let (code, out) = site.cycle();
    assert_eq!(code, 5, "{out}");
    assert!(
        out.contains("cannot continue its chain: it does not hold its saved head"),
        "{out}"
    );
    assert_eq!(std::fs::read(&audit).unwrap(), before, "nothing appended");
    assert_eq!(site.sim.state().received("$requestTasks").len(), 2, "no poll");
    // Restored from a backup, it goes on.
    write_lines(&audit, &original);
    assert_eq!(site.cycle().0, 0);
    assert_eq!(verify(&[&audit], Some(&key)).0, 0);
}

#[test]
fn an_emptied_log_or_one_cut_at_the_start_does_not_verify() {
    let (_site, audit, key) = keyed_site();
    let original = lines(&audit);
    write_lines(&audit, &original[2..]);
    let (code, out) = verify(&[&audit], Some(&key));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(":1: the chain starts mid-way at record 3"), "{out}");

    std::fs::write(&audit, "").unwrap();
    let (code, out) = verify(&[&audit], Some(&key));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("records were cut off the end"), "{out}");
    // Without the saved head too.
    std::fs::remove_file(head_of(&audit)).unwrap();
    let (code, out) = verify(&[&audit], Some(&key));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no records"), "{out}");
    // --partial does not make an empty log intact.
    assert_eq!(verify_with(&[&audit], Some(&key), &["--partial"]).0, 1);
}

fn head_of(audit: &Path) -> PathBuf {
    audit.with_file_name("audit.ndjson.head")
}

#[test]
fn a_record_with_a_field_twice_is_a_break() {
    let (_site, audit, key) = keyed_site();
    let mut l = lines(&audit);
    // Readers that keep the first of two equal keys would see "forged";
    // serde_json keeps the last, which the hash covers.
    l[1] = l[1].replacen("\"outcome\":", "\"outcome\":\"forged\",\"outcome\":", 1);
    write_lines(&audit, &l);
    let (code, out) = verify(&[&audit], Some(&key));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(":2: a field appears twice in this record"), "{out}");
}

/// A `send_idat` for patient 1's given name, by her Bloom filter.
fn ask_for_patient_1(site: &Site, task_id: &str) {
    site.sim.add_task(sim::send_idat(
        task_id,
        Utc::now() + Duration::days(1),
        None,
        Some(&bf(1)),
        &[IdatElement::Given],
    ));
}

/// The store's database, opened as an attacker without the key would:
/// plain SQL on the file.
fn database(site: &Site) -> rusqlite::Connection {
    rusqlite::Connection::open(site.dir.path().join("store/store.sqlite3")).unwrap()
}

/// Swaps a column's values between two rows of a table (by rowid).
fn swap(db: &rusqlite::Connection, table: &str, column: &str) {
    let rows: Vec<(i64, Vec<u8>)> = db
        .prepare(&format!("SELECT rowid, {column} FROM {table} ORDER BY rowid LIMIT 2"))
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows.len(), 2);
    let set = format!("UPDATE {table} SET {column} = ?1 WHERE rowid = ?2");
    // (Through a value no row has: the column may be unique.)
    db.execute(&set, rusqlite::params![vec![0u8; 3], rows[0].0]).unwrap();
    db.execute(&set, rusqlite::params![rows[0].1, rows[1].0]).unwrap();
    db.execute(&set, rusqlite::params![rows[1].1, rows[0].0]).unwrap();
}

#[test]
fn swapped_index_values_are_a_damaged_store_never_a_send() {
    let site = Site::new("xml");
    site.import_patients();
    swap(&database(&site), "patients", "bf_index");
    // A send_idat for patient 1's filter: the index now leads to another.
    ask_for_patient_1(&site, "swap");
    let (code, out) = site.cycle();
    assert_eq!(code, 5, "{out}");
    assert!(out.contains("a patient record fails authentication"), "{out}");
    assert!(
        site.sim.state().received("$providePatientData").is_empty(),
        "IDAT was sent for the wrong patient"
    );
}

#[test]
fn swapped_pseudonym_indexes_are_a_damaged_store_never_a_send() {
    let site = Site::new("json");
    site.import_patients();
    site.sim
        .add_task(sim::dic_psn_available(&bf(1), TARGET, "mii_PSN_A", None));
    site.sim
        .add_task(sim::dic_psn_available(&bf(2), TARGET, "mii_PSN_B", None));
    assert_eq!(site.cycle().0, 0);
    swap(&database(&site), "pseudonyms", "psn_index");
    // A send_idat by pseudonym only: the index now leads to the other one.
    site.sim.add_task(sim::send_idat(
        "by-psn",
        Utc::now() + Duration::days(1),
        Some("mii_PSN_A"),
        None,
        &[IdatElement::Family],
    ));
    let (code, out) = site.cycle();
    assert_eq!(code, 5, "{out}");
    assert!(out.contains("a pseudonym record fails authentication"), "{out}");
    assert!(site.sim.state().received("$providePatientData").is_empty());
}

#[test]
fn an_edited_status_is_a_damaged_store() {
    let site = Site::new("json");
    site.import_patients();
    site.sim
        .add_task(sim::dic_psn_available(&bf(1), TARGET, "mii_PSN_A", None));
    assert_eq!(site.cycle().0, 0);
    // Reopening a resolved task would have it done again.
    database(&site)
        .execute("UPDATE ledger SET status = 'pending'", [])
        .unwrap();
    let (code, out) = site.cycle();
    assert_eq!(code, 5, "{out}");
    assert!(out.contains("a ledger entry record fails authentication"), "{out}");
}

/// The patient row of the first patient imported, every column.
fn first_patient_row(db: &rusqlite::Connection) -> Vec<rusqlite::types::Value> {
    db.query_row("SELECT * FROM patients ORDER BY rowid LIMIT 1", [], |r| {
        (0..5).map(|i| r.get(i)).collect()
    })
    .unwrap()
}

#[test]
fn an_old_write_replayed_after_forget_does_not_bring_the_patient_back() {
    let site = Site::new("xml");
    site.import_patients();
    // The row that holds patient 1, as an attacker could have copied it.
    let old = first_patient_row(&database(&site));
    assert_eq!(site.run(&["forget", "p1"]).status.code(), Some(0));
    database(&site)
        .execute(
            "INSERT INTO patients VALUES (?1, ?2, ?3, ?4, ?5)",
            rusqlite::params_from_iter(old),
        )
        .unwrap();
    ask_for_patient_1(&site, "replayed");
    let (code, out) = site.cycle();
    assert!(
        site.sim.state().received("$providePatientData").is_empty(),
        "the erased patient's IDAT was sent: {out}"
    );
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        site.store().ledger("mii/task:replayed").unwrap().outcome.as_str(),
        "unknown_patient"
    );
}

#[test]
fn a_tombstone_removed_without_the_key_is_found() {
    let site = Site::new("xml");
    site.import_patients();
    let old = first_patient_row(&database(&site));
    assert_eq!(site.run(&["forget", "p1"]).status.code(), Some(0));
    // The erasure undone by hand: the tombstone gone, the row back.
    let db = database(&site);
    db.execute("DELETE FROM tombstones", []).unwrap();
    db.execute(
        "INSERT INTO patients VALUES (?1, ?2, ?3, ?4, ?5)",
        rusqlite::params_from_iter(old),
    )
    .unwrap();
    drop(db);
    ask_for_patient_1(&site, "undone");
    let (code, out) = site.cycle();
    assert_eq!(code, 5, "{out}");
    assert!(out.contains("set of erased patients"), "{out}");
    assert!(site.sim.state().received("$providePatientData").is_empty());
}

/// A copy of the store's database or of the audit log (with its head), as
/// a backup would hold it.
fn snapshot(site: &Site, files: &[&str]) -> Vec<(PathBuf, Vec<u8>)> {
    files
        .iter()
        .map(|f| {
            let p = site.dir.path().join(f);
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

fn restore(copy: &[(PathBuf, Vec<u8>)]) {
    for (p, bytes) in copy {
        std::fs::write(p, bytes).unwrap();
    }
}

fn cycle_with(site: &Site, extra: &[&str]) -> (Option<i32>, String) {
    let out = site.run(&[extra, &["run", "--once"]].concat());
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn a_store_rolled_back_alone_is_refused_until_the_restore_is_declared() {
    let site = Site::new("json");
    site.import_patients();
    assert_eq!(site.cycle().0, 0);
    let old = snapshot(&site, &["store/store.sqlite3"]);
    // Work done after the copy: a pseudonym stored, a task resolved.
    site.sim
        .add_task(sim::dic_psn_available(&bf(1), TARGET, "mii_LATER", None));
    assert_eq!(site.cycle().0, 0);
    restore(&old);
    let polls = site.sim.state().received("$requestTasks").len();
    let (code, out) = cycle_with(&site, &[]);
    assert_eq!(code, Some(5), "{out}");
    assert!(out.contains("the store is older than its audit log"), "{out}");
    assert!(out.contains("--accept-restore"), "{out}");
    assert_eq!(site.sim.state().received("$requestTasks").len(), polls, "no poll");
    let out = site.run(&["status"]);
    assert_eq!(out.status.code(), Some(2), "critical");
    assert!(String::from_utf8_lossy(&out.stdout).contains("the store is older than its audit log"));
    // Declared: taken as it is, audited, and it stays accepted.
    let (code, out) = cycle_with(&site, &["--accept-restore"]);
    assert_eq!(code, Some(0), "{out}");
    let accepted: Vec<_> = site
        .audit()
        .into_iter()
        .filter(|r| r["kind"] == "store" && r["outcome"] == "restore_accepted")
        .collect();
    assert_eq!(accepted.len(), 1);
    assert!(
        accepted[0]["detail"]
            .as_str()
            .unwrap()
            .contains("older than its audit log")
    );
    assert_eq!(site.cycle().0, 0);
}

#[test]
fn an_audit_log_rolled_back_alone_is_refused_until_the_restore_is_declared() {
    let site = Site::new("json");
    site.import_patients();
    assert_eq!(site.cycle().0, 0);
    let old = snapshot(&site, &["audit.ndjson", "audit.ndjson.head"]);
    for n in 0..2 {
        site.sim
            .add_task(sim::dic_psn_available(&bf(n + 1), TARGET, &format!("mii_L{n}"), None));
        assert_eq!(site.cycle().0, 0);
    }
    restore(&old);
    let (code, out) = cycle_with(&site, &[]);
    assert_eq!(code, Some(5), "{out}");
    assert!(out.contains("the audit log is older than the store"), "{out}");
    let (code, out) = cycle_with(&site, &["--accept-restore"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(site.cycle().0, 0);
}
