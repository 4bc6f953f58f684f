//! `bloom`, `import` with computed filters, `enroll` and `update-bf`: the
//! real binary against the simulator on loopback.

// (A test or benchmark stops at what it cannot set up: the panic is the report.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{STUDY, Site, TARGET, bf};
use fttp_agent::store::EnrolmentStatus;
use fttp_agent::types::{BloomFilter, LocalId};
use std::os::unix::process::ExitStatusExt;

/// The published vector of the Mainzelliste fTTP client's test, for
/// firstName "Herr", lastName "Mustermann", birthDate "19200101", gender "m".
const EXPECTED: &str = "aFRAty//BwRtDednRgb/Lwx9n6wFvdPhniK3dmEr03b4kcSZ+Jw68m++9h8FO43f+HHsEpk7Zc3YiF7Q9O8Upom5zJKjzUElYlFubVjAAgJMQWCMME6Yp+wkPXjm2bBHckHVs6ZzJASI/vAub/fVVps2dfmhYrA0MGXjd/iFDIZ4bF0xscaz7bzTo+uJTwQg008EVBWnbxr/57bHC309SCdbbWSxZhi3l+neQ7g3RoGxXQVGrRzEQdmsNlw3yUxINQ65LIAcbUA=";

const SEEDS: &str = "# the client's properties, as they are\nbalanced.seed = 154866848\nfield.firstName.seed = 487484864\nfield.lastName.seed = 311296856\nfield.birthDate.seed = 897689196\nfield.gender.seed = 298767897\n";

/// The client's test configuration, in `[bloomfilter]` form.
const BLOOM: &str = r#"
[bloomfilter]
length = 800
random_position_number = 30
vocabulary = "abcdefghijkalmnoprstuvmxyzABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789"
seeds_file = "seeds.toml"
version = "2"

[[bloomfilter.field]]
name = "firstName"
source = "given"
[[bloomfilter.field.transformer]]
replacement = { 'Dr\.|Dipl\.' = "", "é" = "e", "ä" = "ae", "Ä" = "AE", "ö" = "oe", "Ö" = "OE", "ü" = "ue", "Ü" = "UE" }
upper_case = true
trim = true
[[bloomfilter.field.transformer]]
allowed_chars = '[A-Z\s]'

[[bloomfilter.field]]
name = "lastName"
source = "family"
[[bloomfilter.field.transformer]]
replacement = { 'Dr\.|Dipl\.' = "", "é" = "e", "ä" = "ae", "Ä" = "AE", "ö" = "oe", "Ö" = "OE", "ü" = "ue", "Ü" = "UE" }
upper_case = true
trim = true
[[bloomfilter.field.transformer]]
allowed_chars = '[A-Z\s]'

[[bloomfilter.field]]
name = "birthDate"
source = "birthdate"
date_format = "yyyyMMdd"

[[bloomfilter.field]]
name = "gender"
source = "gender"
[[bloomfilter.field.transformer]]
replacement = { "^male$" = "m", "^female$" = "f" }
"#;

const SEED_VALUES: [&str; 5] = ["154866848", "487484864", "311296856", "897689196", "298767897"];

fn with_bloom(site: &Site) {
    write_seeds(site, SEEDS);
    let text = std::fs::read_to_string(&site.config).unwrap();
    std::fs::write(&site.config, format!("{text}{BLOOM}")).unwrap();
}

fn write_seeds(site: &Site, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let p = site.dir.path().join("seeds.toml");
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
}

const HEADER: &str = "local_id,bloomfilter,given,family,birthdate,gender";

fn csv(site: &Site, name: &str, rows: &[&str]) -> String {
    let p = site.dir.path().join(name);
    std::fs::write(&p, format!("{HEADER}\n{}\n", rows.join("\n"))).unwrap();
    p.to_str().unwrap().to_string()
}

fn run(site: &Site, args: &[&str]) -> (i32, String, String) {
    let out = site.run(args);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    for s in SEED_VALUES {
        assert!(!stdout.contains(s) && !stderr.contains(s), "{args:?} shows a seed");
    }
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

fn no_seeds_in_logs(site: &Site) {
    for name in ["audit.ndjson", "agent.log"] {
        let text = std::fs::read_to_string(site.dir.path().join(name)).unwrap_or_default();
        for s in SEED_VALUES.iter().copied().chain([EXPECTED, "Herr", "Mustermann"]) {
            assert!(!text.contains(s), "{name} shows a seed, a filter or IDAT");
        }
    }
}

fn patient_bf(site: &Site, id: &str) -> Option<BloomFilter> {
    site.store()
        .patient(&LocalId(id.into()))
        .unwrap()
        .and_then(|p| p.bloomfilter)
}

fn requests(site: &Site, op: &str) -> Vec<Vec<String>> {
    site.sim
        .state()
        .received(op)
        .iter()
        .map(|r| {
            r.parameters
                .as_ref()
                .map(|p| {
                    p.get("bloomfilter")
                        .filter_map(|x| x.value.as_ref().and_then(|v| v.as_str()))
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect()
}

#[test]
fn bloom_prints_the_published_vector_from_idat() {
    let site = Site::new("xml");
    with_bloom(&site);
    let file = csv(
        &site,
        "in.csv",
        &[
            "x1,,Herr,Mustermann,1920-01-01,m",
            // The client's normalisation: " dr. herr " upper-cased and trimmed, "Dr." removed.
            "x2,,Dr. herr ,Mustermann,1920-01-01,male",
            "x3,,,,,",
            "x4,,Herr,Mustermann,1920-01,m",
        ],
    );
    let (code, stdout, stderr) = run(&site, &["bloom", &file]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stdout, format!("local_id,bloomfilter\nx1,{EXPECTED}\nx2,{EXPECTED}\n"));
    // Rows without a filter are named by line and reason, never by content.
    assert!(
        stderr.contains("in.csv:4: no Bloom filter: none of the Bloom filter fields"),
        "{stderr}"
    );
    assert!(
        stderr.contains("in.csv:5: no Bloom filter: field birthDate: the date has no day"),
        "{stderr}"
    );
    assert!(stderr.contains("2 Bloom filter(s), 2 row(s) without"), "{stderr}");
    // The bloomfilter column may be absent; the output is the same.
    let bare = site.dir.path().join("bare.csv");
    std::fs::write(
        &bare,
        "local_id,given,family,birthdate,gender\nx1,Herr,Mustermann,1920-01-01,m\n",
    )
    .unwrap();
    let (code, stdout, _) = run(&site, &["bloom", bare.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert_eq!(stdout, format!("local_id,bloomfilter\nx1,{EXPECTED}\n"));
    // bloom writes nothing: no store, no audit record.
    assert!(!site.dir.path().join("store").exists());
    no_seeds_in_logs(&site);
}

#[test]
fn the_seeds_file_must_be_private_complete_and_is_never_shown() {
    use std::os::unix::fs::PermissionsExt;
    let site = Site::new("xml");
    with_bloom(&site);
    let file = csv(&site, "in.csv", &["x1,,Herr,Mustermann,1920-01-01,m"]);
    let seeds = site.dir.path().join("seeds.toml");
    std::fs::set_permissions(&seeds, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, stderr) = run(&site, &["bloom", &file]);
    assert_eq!(code, 2);
    assert!(stderr.contains("chmod 600"), "{stderr}");
    write_seeds(&site, &SEEDS.replace("field.gender.seed = 298767897\n", ""));
    let (code, _, stderr) = run(&site, &["bloom", &file]);
    assert_eq!(code, 2);
    assert!(stderr.contains("no seed for field gender"), "{stderr}");
    write_seeds(&site, &SEEDS.replace("= 298767897", "= \"298767897\""));
    let (code, _, stderr) = run(&site, &["bloom", &file]);
    assert_eq!(code, 2);
    assert!(stderr.contains("line 6"), "{stderr}");
    // Without [bloomfilter], bloom says how to configure it.
    let plain = Site::new("xml");
    let (code, _, stderr) = run(&plain, &["bloom", &file]);
    assert_eq!(code, 2);
    assert!(stderr.contains("[bloomfilter]"), "{stderr}");
    // update-bf needs the bfVersion to send.
    let text = std::fs::read_to_string(&site.config).unwrap();
    std::fs::write(&site.config, text.replace("version = \"2\"\n", "")).unwrap();
    write_seeds(&site, SEEDS);
    let (code, _, stderr) = run(&site, &["update-bf"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("[bloomfilter] version"), "{stderr}");
    std::fs::write(&site.config, text).unwrap();
    // `check` shows the section's settings but not the seeds.
    write_seeds(&site, SEEDS);
    let (_, stdout, _) = run(&site, &["check"]);
    assert!(
        stdout.contains("bloomfilter: ok (seeds file readable and complete; 4 fields, 1600 bits)"),
        "{stdout}"
    );
    assert!(stdout.contains("firstName <- given"), "{stdout}");
}

#[test]
fn import_computes_missing_filters_and_keeps_given_ones() {
    let site = Site::new("xml");
    with_bloom(&site);
    let given = bf(7);
    let row_with = format!("y2,{given},Erika,Musterfrau,1964-08-12,f");
    let file = csv(
        &site,
        "in.csv",
        &["y1,,Herr,Mustermann,1920-01-01,m", &row_with, "y3,,,,,"],
    );
    let (code, stdout, stderr) = run(&site, &["import", &file]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stdout.contains("computed 1 Bloom filter(s)"), "{stdout}");
    assert!(stderr.contains("in.csv:4: imported without a Bloom filter"), "{stderr}");
    assert_eq!(patient_bf(&site, "y1").unwrap().to_base64(), EXPECTED);
    assert_eq!(patient_bf(&site, "y2").unwrap().to_base64(), given);
    assert_eq!(patient_bf(&site, "y3"), None);
    // Importing again changes nothing: a stored filter is kept.
    let (_, stdout, _) = run(&site, &["import", &file]);
    assert!(stdout.contains("0 added, 0 updated, 3 unchanged"), "{stdout}");
    no_seeds_in_logs(&site);
}

fn enrolment(site: &Site, id: &str) -> Option<(EnrolmentStatus, bool)> {
    let store = site.store();
    let id = LocalId(id.into());
    let bf = store.patient(&id).unwrap().and_then(|p| p.bloomfilter);
    store
        .enrolment(&id, STUDY, bf.as_ref())
        .unwrap()
        .map(|e| (e.status, e.same_filter))
}

fn pseudonym_of(site: &Site, id: &str) -> Option<String> {
    let bf = patient_bf(site, id)?;
    site.store().pseudonym(&bf, STUDY).unwrap().map(|p| p.pseudonym.value)
}

#[test]
fn enroll_stores_pseudonyms_and_a_clearing_comes_back_as_a_task() {
    let site = Site::with("json", Default::default(), "batch_size = 2");
    site.import_patients();
    site.sim.state().clearing.insert(bf(2));
    site.sim.state().bf_errors.insert(bf(3), "invalid".into());

    let (code, stdout, _) = run(&site, &["enroll"]);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains(
            "3 sent: 1 enrolled, 1 in clearing (pseudonym follows as a task), 1 refused with an error, 0 busy (sent again by the next run), 0 not answered"
        ),
        "{stdout}"
    );
    // Batches of batch_size: three patients in two requests.
    assert_eq!(requests(&site, "$requestPsnFromBfWorkflow").len(), 2);
    assert!(pseudonym_of(&site, "p1").is_some());
    assert_eq!(pseudonym_of(&site, "p2"), None);
    assert_eq!(enrolment(&site, "p1"), Some((EnrolmentStatus::Enrolled, true)));
    assert_eq!(enrolment(&site, "p2"), Some((EnrolmentStatus::Clearing, true)));
    assert_eq!(enrolment(&site, "p3"), Some((EnrolmentStatus::Error, true)));
    let mut outcomes = site.audit_outcomes("enroll");
    outcomes.sort();
    assert_eq!(outcomes, ["clearing", "dispatcher_error", "enrolled"]);

    // A rerun sends nothing: p2 waits for its clearing, p3's error stands.
    let (code, stdout, _) = run(&site, &["enroll"]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("0 sent"), "{stdout}");
    assert!(
        stdout.contains("1 in clearing from earlier runs, 1 refused earlier"),
        "{stdout}"
    );
    assert_eq!(requests(&site, "$requestPsnFromBfWorkflow").len(), 2);

    // The clearing ends: the pseudonym arrives through the usual poll.
    let (code, out) = site.cycle();
    assert_eq!(code, 0, "{out}");
    assert!(pseudonym_of(&site, "p2").is_some());
    assert_ne!(pseudonym_of(&site, "p2"), pseudonym_of(&site, "p1"));
    assert_eq!(enrolment(&site, "p2"), Some((EnrolmentStatus::Enrolled, true)));
    let (_, status, _) = run(&site, &["status", "--format", "json"]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["enrolments"], serde_json::json!({"enrolled": 2, "error": 1}));

    // --retry-errors sends p3's filter again, the same filter.
    site.sim.state().bf_errors.clear();
    let (code, stdout, _) = run(&site, &["enroll", "--retry-errors"]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("1 sent: 1 enrolled"), "{stdout}");
    assert_eq!(
        requests(&site, "$requestPsnFromBfWorkflow").last().unwrap(),
        &vec![bf(3)]
    );
    assert!(pseudonym_of(&site, "p3").is_some());
    site.assert_no_leaks();
}

#[test]
fn enroll_limit_and_an_unreachable_dispatcher_lose_nothing() {
    let site = Site::new("xml");
    site.import_patients();
    let (code, stdout, _) = run(&site, &["enroll", "--limit", "1"]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("1 sent: 1 enrolled"), "{stdout}");
    site.sim
        .push_fault(Some("$requestPsnFromBfWorkflow"), 503, "maintenance");
    let (code, stdout, stderr) = run(&site, &["enroll"]);
    assert_eq!(code, 3, "{stdout}{stderr}");
    assert!(stderr.contains("HTTP 503"), "{stderr}");
    // Recorded as being sent, with the filter: the next run sends the same.
    assert_eq!(enrolment(&site, "p2"), Some((EnrolmentStatus::Sending, true)));
    let (code, stdout, _) = run(&site, &["enroll"]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("2 sent: 2 enrolled"), "{stdout}");
    for id in ["p1", "p2", "p3"] {
        assert!(pseudonym_of(&site, id).is_some(), "{id}");
    }
}

fn crash(site: &Site, args: &[&str], point: &str) {
    let out = common::agent()
        .arg("--config")
        .arg(&site.config)
        .args(args)
        .env("FTTP_AGENT_CRASH_AT", point)
        .output()
        .unwrap();
    assert_eq!(out.status.signal(), Some(9), "{point} was not reached");
}

#[test]
fn a_crash_mid_enrolment_resends_the_same_filter_and_never_another() {
    let site = Site::new("xml");
    site.import_patients();
    // Killed after the fTTP answered, before the answer was stored.
    crash(&site, &["enroll"], "enroll:answered");
    assert_eq!(enrolment(&site, "p1"), Some((EnrolmentStatus::Sending, true)));
    let (code, stdout, _) = run(&site, &["enroll"]);
    assert_eq!(code, 0, "{stdout}");
    let sent = requests(&site, "$requestPsnFromBfWorkflow");
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0], sent[1], "the rerun sends exactly the filters of the first run");
    let registered = site.sim.state().registry.len();
    assert_eq!(registered, 3, "the fTTP knows each patient once");
    assert!(pseudonym_of(&site, "p1").is_some());

    // Killed after recording, before sending; then p4 gets a new filter
    // (say, a corrected import): it is not enrolled with that one.
    let site = Site::new("xml");
    site.import_patients();
    let file = csv(&site, "p4.csv", &[&format!("p4,{},Jonas,Weber,2001-05-30,m", bf(4))]);
    run(&site, &["import", &file]);
    crash(&site, &["enroll"], "enroll:sending");
    let file = csv(&site, "p4b.csv", &[&format!("p4,{},Jonas,Weber,2001-05-30,m", bf(5))]);
    run(&site, &["import", &file]);
    assert_eq!(enrolment(&site, "p4"), Some((EnrolmentStatus::Sending, false)));
    let (code, stdout, _) = run(&site, &["enroll"]);
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.contains("1 enrolled earlier with a filter they no longer have"),
        "{stdout}"
    );
    let all: Vec<String> = requests(&site, "$requestPsnFromBfWorkflow").concat();
    assert!(!all.contains(&bf(5)), "p4's new filter was sent");
    assert_eq!(pseudonym_of(&site, "p4"), None);
}

#[test]
fn update_bf_replaces_changed_filters_under_their_pseudonym() {
    let site = Site::new("xml");
    with_bloom(&site);
    let file = csv(
        &site,
        "in.csv",
        &["z1,,Herr,Mustermann,1920-01-01,m", "z2,,Erika,Musterfrau,1964-08-12,f"],
    );
    run(&site, &["import", &file]);
    let (code, stdout, _) = run(&site, &["enroll", "--limit", "1"]);
    assert_eq!(code, 0, "{stdout}");
    let psn = pseudonym_of(&site, "z1").unwrap();
    // Nothing changed yet: nothing to send.
    let (code, stdout, _) = run(&site, &["update-bf"]);
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.contains("0 updated at the fTTP, 0 changed locally only (never sent), 2 unchanged"),
        "{stdout}"
    );

    // The study changes its seeds: both filters change.
    write_seeds(&site, &SEEDS.replace("487484864", "487484865"));
    let (code, stdout, _) = run(&site, &["update-bf"]);
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.contains("1 updated at the fTTP, 1 changed locally only (never sent)"),
        "{stdout}"
    );
    let new = patient_bf(&site, "z1").unwrap();
    assert_ne!(new.to_base64(), EXPECTED);
    assert_eq!(pseudonym_of(&site, "z1").as_deref(), Some(psn.as_str()));
    assert_eq!(site.sim.state().updated_bf, vec![(psn.clone(), "2".to_string())]);
    // The request is the OperationDefinition's: study, bloomfilter, source, pseudonym, bfVersion.
    let st = site.sim.state();
    let req = st.received("$updateBf")[0].parameters.clone().unwrap();
    drop(st);
    let names: Vec<&str> = req.parameter.iter().map(|p| p.name.as_ref()).collect();
    assert_eq!(names, ["study", "bloomfilter", "source", "pseudonym", "bfVersion"]);
    assert_eq!(req.first_string("source"), Some(TARGET));
    assert_eq!(requests(&site, "$updateBf"), vec![vec![new.to_base64()]]);
    // Rerun: all unchanged now.
    let (_, stdout, _) = run(&site, &["update-bf"]);
    assert!(
        stdout.contains("0 updated at the fTTP, 0 changed locally only (never sent), 2 unchanged"),
        "{stdout}"
    );

    // A pseudonym the fTTP does not know is refused (404): reported, kept.
    write_seeds(&site, &SEEDS.replace("311296856", "311296857"));
    site.sim.state().registry.clear();
    let (code, stdout, stderr) = run(&site, &["update-bf"]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains("$updateBf refused") && stderr.contains("HTTP 404"),
        "{stderr}"
    );
    assert_eq!(patient_bf(&site, "z1"), Some(new));
    let mut outcomes = site.audit_outcomes("update_bf");
    outcomes.sort();
    assert_eq!(outcomes, ["dispatcher_error", "updated"]);
    no_seeds_in_logs(&site);
}

#[test]
fn enroll_computes_the_filters_an_earlier_import_could_not() {
    // Imported before [bloomfilter] was configured: no filters yet.
    let site = Site::new("xml");
    let file = csv(&site, "in.csv", &["w1,,Herr,Mustermann,1920-01-01,m", "w2,,,,,"]);
    let (code, _, _) = run(&site, &["import", &file]);
    assert_eq!(code, 0);
    assert_eq!(patient_bf(&site, "w1"), None);
    with_bloom(&site);
    let (code, stdout, stderr) = run(&site, &["enroll"]);
    // w2 has no field at all: reported by fingerprint, never by content.
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stdout.contains("computed 1 Bloom filter(s) from IDAT"), "{stdout}");
    assert!(stdout.contains("1 sent: 1 enrolled"), "{stdout}");
    assert!(
        stderr.contains("no Bloom filter: none of the Bloom filter fields"),
        "{stderr}"
    );
    assert!(!stderr.contains("w2"), "{stderr}");
    assert_eq!(patient_bf(&site, "w1").unwrap().to_base64(), EXPECTED);
    assert!(pseudonym_of(&site, "w1").is_some());
    assert_eq!(
        requests(&site, "$requestPsnFromBfWorkflow"),
        vec![vec![EXPECTED.to_string()]]
    );
    no_seeds_in_logs(&site);
}

#[test]
fn sigterm_during_enroll_finishes_the_batch_in_hand_and_leaves_the_rest() {
    let site = Site::with("xml", Default::default(), "batch_size = 1\nmax_in_flight = 1");
    site.import_patients();
    let enrolments = || -> i64 {
        rusqlite::Connection::open_with_flags(
            site.dir.path().join("store/store.sqlite3"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .and_then(|db| db.query_row("SELECT count(*) FROM enrolments", [], |r| r.get(0)))
        .unwrap_or(0)
    };
    site.sim.push(
        Some("$requestPsnFromBfWorkflow"),
        fttp_agent::sim::FaultKind::Delay(std::time::Duration::from_millis(1500)),
    );
    let child = common::agent()
        .arg("--config")
        .arg(&site.config)
        .arg("enroll")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    // The first patient is recorded as being sent before its request
    // leaves; a signal between the two rightly keeps it unsent. Wait until
    // the simulator holds the request (answered slowly), then stop.
    while enrolments() == 0 || site.sim.state().delayed == 0 {
        assert!(start.elapsed() < std::time::Duration::from_secs(20));
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Not a dispatcher failure (3): the work left is for the next run (1).
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("enroll stopped by a signal"), "{stderr}");
    assert_eq!(requests(&site, "$requestPsnFromBfWorkflow").len(), 1);
    assert!(pseudonym_of(&site, "p1").is_some());
    // p2 may have been marked as being sent ahead of its request (never
    // sent): the next enroll sends it, like any batch marked so.
    assert!(matches!(
        enrolment(&site, "p2"),
        None | Some((EnrolmentStatus::Sending, true))
    ));
    let (code, stdout, _) = run(&site, &["enroll"]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("2 sent: 2 enrolled"), "{stdout}");
}

/// Audit records of this kind and outcome.
fn audited(site: &Site, kind: &str, outcome: &str) -> usize {
    site.audit()
        .into_iter()
        .filter(|r| r["kind"] == kind && r["outcome"] == outcome)
        .count()
}

#[test]
fn enrolments_the_store_holds_are_in_the_audit_log_after_a_crash() {
    let site = Site::new("xml");
    site.import_patients();
    // Killed right after the answers reached the store (its second write;
    // the first recorded the filters as being sent).
    crash(&site, &["enroll"], "store:committed:2");
    for id in ["p1", "p2", "p3"] {
        assert_eq!(
            enrolment(&site, id).map(|e| e.0),
            Some(EnrolmentStatus::Enrolled),
            "{id}"
        );
    }
    let audited = audited(&site, "enroll", "enrolled");
    assert_eq!(audited, 3, "every enrolment the store holds is audited");
}

#[test]
fn an_update_the_store_holds_is_in_the_audit_log_after_a_crash() {
    let site = Site::new("xml");
    with_bloom(&site);
    let file = csv(&site, "in.csv", &["z1,,Herr,Mustermann,1920-01-01,m"]);
    run(&site, &["import", &file]);
    let (code, stdout, _) = run(&site, &["enroll"]);
    assert_eq!(code, 0, "{stdout}");
    let old = patient_bf(&site, "z1").unwrap();
    write_seeds(&site, &SEEDS.replace("487484864", "487484865"));
    // Killed right after the new filter reached the store.
    crash(&site, &["update-bf"], "store:committed:1");
    assert_ne!(patient_bf(&site, "z1"), Some(old), "the store holds the new filter");
    let audited = audited(&site, "update_bf", "updated");
    assert_eq!(audited, 1, "the update the store holds is audited");
}

#[test]
fn a_transient_error_is_sent_again_by_the_next_enroll_without_retry_errors() {
    let site = Site::new("json");
    site.import_patients();
    site.sim.state().bf_errors.insert(bf(2), "throttled".into());
    let (code, stdout, _) = run(&site, &["enroll"]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("1 busy (sent again by the next run)"), "{stdout}");
    assert_eq!(enrolment(&site, "p2"), Some((EnrolmentStatus::Retry, true)));
    site.sim.state().bf_errors.clear();
    let (code, stdout, _) = run(&site, &["enroll"]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("1 sent: 1 enrolled"), "{stdout}");
    assert_eq!(enrolment(&site, "p2"), Some((EnrolmentStatus::Enrolled, true)));
}

#[test]
fn update_bf_answered_2xx_with_an_error_outcome_is_refused() {
    let site = Site::new("xml");
    with_bloom(&site);
    let file = csv(&site, "in.csv", &["z1,,Herr,Mustermann,1920-01-01,m"]);
    run(&site, &["import", &file]);
    assert_eq!(run(&site, &["enroll"]).0, 0);
    write_seeds(&site, &SEEDS.replace("487484864", "487484865"));
    site.sim.push(
        Some("$updateBf"),
        fttp_agent::sim::FaultKind::Raw {
            status: 200,
            content_type: "application/fhir+xml".into(),
            body: br#"<OperationOutcome xmlns="http://hl7.org/fhir"><issue><severity value="error"/><code value="processing"/><diagnostics value="unknown pseudonym"/></issue></OperationOutcome>"#.to_vec(),
        },
    );
    let (code, stdout, stderr) = run(&site, &["update-bf"]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains("$updateBf refused") && stderr.contains("answered 2xx but refused: error/processing"),
        "{stderr}"
    );
    assert!(site.sim.state().updated_bf.is_empty());
}

#[test]
fn filters_go_with_their_version_when_so_configured() {
    let site = Site::with("json", Default::default(), "bloomfilter_form = \"with_version\"");
    with_bloom(&site);
    let file = csv(&site, "in.csv", &["z1,,Herr,Mustermann,1920-01-01,m"]);
    run(&site, &["import", &file]);
    let (code, stdout, _) = run(&site, &["enroll"]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("1 sent: 1 enrolled"), "{stdout}");
    let st = site.sim.state();
    let req = st.received("$requestPsnFromBfWorkflow")[0].parameters.clone().unwrap();
    let bf = req.get("bloomfilter").next().unwrap();
    assert!(bf.value.is_none(), "the filter is a part, not a value");
    let parts: Vec<&str> = bf.part.iter().map(|p| p.name.as_ref()).collect();
    assert_eq!(parts, ["bloomfilter", "version"]);
    assert_eq!(bf.part[1].value.as_ref().and_then(|v| v.as_str()), Some("2"));
    drop(st);
    // Without [bloomfilter] version, the form is a configuration error.
    let text = std::fs::read_to_string(&site.config)
        .unwrap()
        .replace("version = \"2\"\n", "");
    std::fs::write(&site.config, text).unwrap();
    let (code, _, stderr) = run(&site, &["enroll"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("needs [bloomfilter] version"), "{stderr}");
}
