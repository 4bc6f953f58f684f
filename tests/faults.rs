//! Network, server and input faults, each injected by the simulator on
//! loopback and survived by the real binary. See tests/FAULTS.md.

// (A test or benchmark stops at what it cannot set up: the panic is the report.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chrono::{Duration as Days, Utc};
use common::{STUDY, Site, TARGET, bf, stop_daemon};
use fttp_agent::fhir::idat::IdatElement;
use fttp_agent::sim::{self, FaultKind, SimOptions};
use fttp_agent::store::Status;
use std::time::{Duration, Instant};

const RTASKS: Option<&str> = Some("$requestTasks");
const PROVIDE: Option<&str> = Some("$providePatientData");

fn site(extra: &str) -> Site {
    let s = Site::with("xml", SimOptions::default(), extra);
    s.import_patients();
    s
}

fn status(code: u16, diag: &str, retry_after: Option<u64>) -> FaultKind {
    FaultKind::Status {
        status: code,
        diagnostics: diag.into(),
        retry_after,
    }
}

fn queue_send(site: &Site, id: &str, expires_in: Days) {
    site.sim.add_task(sim::send_idat(
        id,
        Utc::now() + expires_in,
        None,
        Some(&bf(1)),
        &[IdatElement::Given],
    ));
}

fn polls(site: &Site) -> usize {
    site.sim.state().received("$requestTasks").len()
}

/// Requests the simulator is holding back (a `Delay` fault) right now.
fn delayed(site: &Site) -> usize {
    site.sim.state().delayed
}

/// Runs the daemon, sends it SIGTERM `after` the moment `ready` holds, and
/// returns how long it took to stop cleanly.
fn sigterm_the_daemon(s: &Site, ready: impl Fn() -> bool, after: Duration) -> Duration {
    let daemon = s.daemon("1h");
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(after);
    stop_daemon(daemon)
}

#[test]
fn connection_refused_is_retried_then_reported_as_unreachable() {
    let s = site("max_attempts = 3");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = std::fs::read_to_string(&s.config)
        .unwrap()
        .replace(s.sim.url(), &format!("http://127.0.0.1:{port}/fhir"));
    std::fs::write(&s.config, text).unwrap();
    let (code, out) = s.cycle();
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("cannot reach the dispatcher"), "{out}");
    assert!(
        out.contains("attempt 1 of 3") && out.contains("attempt 2 of 3"),
        "{out}"
    );
    assert_eq!(s.store().ledger_entries().count(), 0);
}

#[test]
fn a_connection_reset_mid_body_is_retried() {
    let s = site("max_attempts = 2");
    queue_send(&s, "reset", Days::days(1));
    s.sim.push(RTASKS, FaultKind::ResetMidBody);
    let (code, out) = s.cycle();
    assert_eq!(code, 0, "{out}");
    assert_eq!(polls(&s), 2);
}

#[test]
fn a_dropped_connection_is_retried() {
    let s = site("max_attempts = 2");
    s.sim.push(RTASKS, FaultKind::Drop);
    let (code, out) = s.cycle();
    assert_eq!(code, 0, "{out}");
    assert_eq!(polls(&s), 2);
}

#[test]
fn an_answer_that_never_finishes_times_out_and_is_retried() {
    let s = site("max_attempts = 2\ntimeout = \"1s\"");
    s.sim.push(RTASKS, FaultKind::Stall(Duration::from_secs(4)));
    let started = Instant::now();
    let (code, out) = s.cycle();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("no complete answer within the timeout"), "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the timeout bounds the wait"
    );
}

#[test]
fn server_errors_and_408_are_retried_with_backoff() {
    let s = site("max_attempts = 5");
    for code in [500, 502, 503, 408] {
        s.sim.push(RTASKS, status(code, "try again", None));
    }
    let (code, out) = s.cycle();
    assert_eq!(code, 0, "{out}");
    assert_eq!(polls(&s), 5);
    for c in ["HTTP 500", "HTTP 502", "HTTP 503", "HTTP 408"] {
        assert!(out.contains(c), "{c}: {out}");
    }
}

#[test]
fn a_429_waits_for_retry_after() {
    let s = site("max_attempts = 2");
    s.sim.push(RTASKS, status(429, "slow down", Some(1)));
    let started = Instant::now();
    let (code, out) = s.cycle();
    assert_eq!(code, 0, "{out}");
    assert!(started.elapsed() >= Duration::from_secs(1), "Retry-After was honoured");
    assert!(out.contains("retrying in 1.0s"), "{out}");
}

#[test]
fn client_errors_are_not_retried_and_their_diagnostics_are_reported() {
    for (code, exit) in [(400, 2), (401, 3), (403, 3), (404, 2), (422, 2)] {
        let s = site("max_attempts = 3");
        s.sim.push(RTASKS, status(code, &format!("refused with {code}"), None));
        let (got, out) = s.cycle();
        assert_eq!(got, exit, "{code}: {out}");
        assert_eq!(polls(&s), 1, "{code} must not be retried");
        assert!(
            out.contains(&format!("HTTP {code}: error/exception: refused with {code}")),
            "{out}"
        );
    }
}

#[test]
fn retries_never_run_past_the_tasks_expiry() {
    let s = site("max_attempts = 5\nretry_delay = \"60s\""); // 30-60 s with jitter
    queue_send(&s, "short-lived", Days::seconds(20));
    s.sim.push(PROVIDE, status(503, "busy", None));
    let started = Instant::now();
    let (code, out) = s.cycle();
    assert_eq!(code, 1, "{out}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(out.contains("not retrying: the task would expire first"), "{out}");
    assert_eq!(s.sim.state().received("$providePatientData").len(), 1);
    assert_eq!(s.store().ledger("mii/task:short-lived").unwrap().status, Status::Failed);
}

#[test]
fn a_reset_during_a_send_leaves_it_in_flight_and_the_next_cycle_delivers_it() {
    let s = site("max_attempts = 1");
    queue_send(&s, "flaky", Days::days(1));
    s.sim.push(PROVIDE, FaultKind::ResetMidBody);
    let (code, out) = s.cycle();
    assert_eq!(code, 1, "{out}");
    assert_eq!(s.store().ledger("mii/task:flaky").unwrap().status, Status::InFlight);
    let (code, out) = s.cycle();
    assert_eq!(code, 0, "{out}");
    let e = s.store().ledger("mii/task:flaky").unwrap().clone();
    assert_eq!((e.status, e.outcome.as_str()), (Status::Resolved, "sent"));
}

fn raw(ct: &str, body: &[u8]) -> FaultKind {
    FaultKind::Raw {
        status: 200,
        content_type: ct.into(),
        body: body.to_vec(),
    }
}

#[test]
fn broken_answers_are_reported_and_change_nothing() {
    let mut deep_json = String::new();
    for _ in 0..5000 {
        deep_json.push_str("{\"a\":");
    }
    let mut deep_xml = String::from(r#"<Parameters xmlns="http://hl7.org/fhir"><parameter><name value="x"/>"#);
    for _ in 0..5000 {
        deep_xml.push_str(r#"<part><name value="x"/>"#);
    }
    let cases: Vec<(FaultKind, &str)> = vec![
        (raw("application/fhir+json", br#"{"resourceType":"Parameters","parameter":[{"na"#), "truncated document"),
        (raw("application/fhir+xml", br#"<Parameters xmlns="http://hl7.org/fhir"><parameter><name value="x"/>"#), "truncated document"),
        (raw("text/html", b"<html><body>Bad gateway</body></html>"), "an HTML page"),
        (raw("application/fhir+xml", b"<html><body>Login</body></html>"), "an HTML page"),
        (raw("application/octet-stream", b"\x00\x01binary"), "not a FHIR document"),
        (raw("application/fhir+json", b"\xff\xfe{}"), "invalid FHIR JSON"),
        (raw("application/fhir+xml", b"<Parameters xmlns=\"http://hl7.org/fhir\"><id value=\"\xff\"/></Parameters>"), "invalid UTF-8"),
        (raw("application/fhir+json", deep_json.as_bytes()), "invalid FHIR JSON"),
        (raw("application/fhir+xml", deep_xml.as_bytes()), "nesting too deep"),
        (
            raw(
                "application/fhir+xml",
                br#"<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><Parameters xmlns="http://hl7.org/fhir"/>"#,
            ),
            "DOCTYPE declarations are not allowed",
        ),
        (raw("application/fhir+json", br#"{"resourceType":"Patient"}"#), "expected a Parameters resource"),
    ];
    for (fault, expected) in cases {
        let s = site("max_attempts = 1");
        queue_send(&s, "t1", Days::days(1));
        s.sim.push(RTASKS, fault);
        let (code, out) = s.cycle();
        // A protocol error, not "unreachable": the gateway answered.
        assert_eq!(code, 4, "{expected}: {out}");
        assert!(out.contains(expected), "expected '{expected}' in: {out}");
        assert!(out.contains("not readable FHIR: tell its operators"), "{out}");
        assert_eq!(s.audit_outcomes("poll"), ["protocol_error"]);
        assert_eq!(s.store().ledger_entries().count(), 0);
        // And the next, healthy poll works.
        assert_eq!(s.cycle().0, 0);
    }
}

#[test]
fn an_oversized_answer_is_refused_without_reading_it_all() {
    let s = site("max_attempts = 1\nmax_response_bytes = 10000");
    let big = format!(
        "<Parameters xmlns=\"http://hl7.org/fhir\"><id value=\"{}\"/></Parameters>",
        "x".repeat(50_000)
    );
    s.sim.push(RTASKS, raw("application/fhir+xml", big.as_bytes()));
    let (code, out) = s.cycle();
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("larger than the limit of 10000 bytes"), "{out}");
}

#[test]
fn hostile_tasks_are_rejected_one_by_one() {
    let s = site("");
    let later = Utc::now() + Days::days(1);
    let huge = base64_of_len(100_000);
    s.sim.add_task(sim::dic_psn_available(&huge, TARGET, "mii_HUGE", None));
    s.sim
        .add_task(sim::dic_psn_available(&bf(1), "another_site", "mii_OTHER", None));
    s.sim
        .add_task(sim::repeat_request("another_study", &bf(2), TARGET, Some(later)));
    // The same taskId twice in one answer, with different content.
    s.sim
        .add_task(sim::send_idat("dup", later, None, Some(&bf(1)), &[IdatElement::Given]));
    s.sim
        .add_task(sim::send_idat("dup", later, None, Some(&bf(2)), &[IdatElement::Family]));
    let (code, out) = s.cycle();
    assert_eq!(code, 0, "{out}");
    let reasons: Vec<String> = s
        .audit()
        .iter()
        .filter(|r| r["outcome"] == "rejected")
        .map(|r| r["detail"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        reasons,
        vec![
            "Bloom filter is larger than 65536 bytes",
            "task is for another target",
            "task is for another study"
        ]
    );
    assert_eq!(s.sim.state().received("$providePatientData").len(), 1);
    assert!(
        s.audit()
            .iter()
            .any(|r| r["outcome"] == "duplicate" && r["task"] == "dup")
    );
    assert_eq!(s.store().pseudonym_count().unwrap(), 0);
}

fn base64_of_len(bytes: usize) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(vec![7u8; bytes])
}

/// `run --once` with the file size limit at `kib` KiB: a write past it
/// fails with EFBIG, exactly as on a full disk (SIGXFSZ ignored so that
/// the write returns the error).
fn cycle_with_file_limit(s: &Site, kib: u64) -> (Option<i32>, String) {
    let out = common::without_agent_env(&mut std::process::Command::new("bash"))
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit -f {kib}; exec \"$0\" --config \"$1\" run --once"
        ))
        .arg(env!("CARGO_BIN_EXE_fttp-agent"))
        .arg(&s.config)
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string())
}

#[test]
fn a_full_disk_fails_the_write_keeps_the_previous_store_and_exits_nonzero() {
    let s = site("");
    queue_send(&s, "before", Days::days(1));
    assert_eq!(s.cycle().0, 0);
    let db = s.dir.path().join("store/store.sqlite3");
    queue_send(&s, "after", Days::days(1));
    s.sim.state().registry.clear();
    // No room for a single page of the write-ahead log.
    let (code, err) = cycle_with_file_limit(&s, 1);
    assert_eq!(code, Some(5), "a broken disk has its own code: {err}");
    assert!(
        err.contains("store database") && err.contains(&db.display().to_string()),
        "{err}"
    );
    // The store still opens, with everything from before.
    let store = s.store();
    assert_eq!(store.ledger("mii/task:before").unwrap().status, Status::Resolved);
    assert_eq!(store.patient_count().unwrap(), 3);
    drop(store);
    // With space again, the task is done.
    let (code, out) = s.cycle();
    assert_eq!(code, 0, "{out}");
    assert_eq!(s.store().ledger("mii/task:after").unwrap().status, Status::Resolved);
}

#[test]
fn a_damaged_store_is_refused_by_name_and_left_for_recovery() {
    let s = site("");
    queue_send(&s, "x", Days::days(1));
    assert_eq!(s.cycle().0, 0);
    let backup = s.dir.path().join("backup");
    let out = s.run(&["backup", backup.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let file = s.dir.path().join("store/store.sqlite3");
    let good = std::fs::read(&file).unwrap();
    // A bit flipped in a page's header, then the file cut in half: each
    // refused with the file named, never reset or rewritten.
    let mut flipped = good.clone();
    flipped[4096] ^= 0xff;
    for damaged in [flipped, good[..good.len() / 2].to_vec()] {
        std::fs::write(&file, &damaged).unwrap();
        let polls = s.sim.state().received("$requestTasks").len();
        let (code, out) = s.cycle();
        assert_eq!(code, 5, "{out}");
        assert!(out.contains(&file.display().to_string()), "{out}");
        assert!(out.contains("malformed") || out.contains("not a database"), "{out}");
        assert!(out.contains("restore the last backup"), "{out}");
        assert_eq!(std::fs::read(&file).unwrap(), damaged, "never reset or rewritten");
        assert_eq!(
            s.sim.state().received("$requestTasks").len(),
            polls,
            "no poll with a damaged store"
        );
    }
    // Restored from the backup, the next run works and the task is done.
    std::fs::copy(backup.join("store.sqlite3"), &file).unwrap();
    let (code, out) = s.cycle();
    assert_eq!(code, 0, "{out}");
    assert_eq!(s.store().ledger("mii/task:x").unwrap().status, Status::Resolved);
}

#[test]
fn a_store_directory_that_cannot_be_written_is_a_clear_error_and_loses_nothing() {
    let s = site("");
    queue_send(&s, "ro", Days::days(1));
    let config = std::fs::read_to_string(&s.config).unwrap();
    // /proc takes no new files, whoever asks (root included).
    let (from, to) = ("\"store\"", "\"/proc/self/fttp-store\"");
    let broken = config.replacen(&format!("path = {from}"), &format!("path = {to}"), 1);
    assert_ne!(broken, config, "the test's config names its store as expected");
    std::fs::write(&s.config, broken).unwrap();
    let (code, out) = s.cycle();
    assert_eq!(code, 5, "{out}");
    assert!(
        out.contains("/proc/self/fttp-store") && out.contains("cannot create the store directory"),
        "{out}"
    );
    assert!(
        s.sim.state().received("$requestTasks").is_empty(),
        "no poll without a store"
    );
    // Fixed, the next run does the task.
    std::fs::write(&s.config, config).unwrap();
    let (code, out) = s.cycle();
    assert_eq!(code, 0, "{out}");
    assert_eq!(s.store().ledger("mii/task:ro").unwrap().status, Status::Resolved);
}

#[test]
fn two_agents_started_together_exactly_one_runs() {
    let s = site("");
    queue_send(&s, "once", Days::days(1));
    s.sim.push(RTASKS, FaultKind::Delay(Duration::from_millis(1500)));
    let spawn = || {
        common::agent()
            .arg("--config")
            .arg(&s.config)
            .args(["run", "--once"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let first = spawn();
    std::thread::sleep(Duration::from_millis(400));
    let second = spawn();
    let codes = [
        first.wait_with_output().unwrap().status.code(),
        second.wait_with_output().unwrap().status.code(),
    ];
    let mut sorted = codes;
    sorted.sort();
    assert_eq!(sorted, [Some(0), Some(75)], "{codes:?}");
    assert_eq!(s.sim.state().received("$providePatientData").len(), 1);
}

#[test]
fn import_while_the_daemon_runs_is_safe() {
    let s = site("");
    for _ in 0..3 {
        s.sim.push(RTASKS, FaultKind::Delay(Duration::from_millis(300)));
    }
    let daemon = s.daemon("1s");
    let path = s.dir.path().join("more.csv");
    let mut csv = String::from("local_id,given\n");
    for i in 0..200 {
        csv.push_str(&format!("extra-{i},Name{i}\n"));
    }
    std::fs::write(&path, csv).unwrap();
    for _ in 0..3 {
        let out = s.run(&["import", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(200));
    }
    let start = Instant::now();
    while polls(&s) < 2 {
        assert!(start.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(50));
    }
    stop_daemon(daemon);
    assert_eq!(s.store().patient_count().unwrap(), 203);
}

#[test]
fn sigterm_finishes_the_task_in_hand_and_leaves_the_rest_open() {
    // (One request at a time; the same with several: the next test.)
    let s = site("max_in_flight = 1");
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        queue_send(&s, id, Days::hours(10 + i as i64));
        s.sim.push(PROVIDE, FaultKind::Delay(Duration::from_millis(1500)));
    }
    // While the first (slow) send is out.
    let stopped_in = sigterm_the_daemon(&s, || delayed(&s) >= 1, Duration::ZERO);
    assert!(stopped_in < Duration::from_secs(10));
    let store = s.store();
    assert_eq!(
        store.ledger("mii/task:a").unwrap().status,
        Status::Resolved,
        "the task in hand is finished"
    );
    assert_eq!(
        store.ledger("mii/task:b").unwrap().status,
        Status::Pending,
        "the rest waits"
    );
    assert_eq!(store.ledger("mii/task:c").unwrap().status, Status::Pending);
}

#[test]
fn sigterm_during_a_burst_finishes_the_requests_out_and_leaves_the_rest_open() {
    // Six sends, four at once (the default): the stop comes while the
    // first four are out; they are finished, the other two wait.
    let s = site("");
    for (i, id) in ["a", "b", "c", "d", "e", "f"].iter().enumerate() {
        queue_send(&s, id, Days::hours(10 + i as i64));
        s.sim.push(PROVIDE, FaultKind::Delay(Duration::from_millis(1500)));
    }
    sigterm_the_daemon(&s, || delayed(&s) >= 4, Duration::ZERO);
    assert_eq!(s.sim.state().received("$providePatientData").len(), 4);
    let store = s.store();
    let status = |id: &str| store.ledger(&format!("mii/task:{id}")).unwrap().status;
    for id in ["a", "b", "c", "d"] {
        assert_eq!(status(id), Status::Resolved, "{id} was out: finished");
    }
    for id in ["e", "f"] {
        assert_eq!(status(id), Status::Pending, "{id} waits");
        assert_eq!(store.ledger(&format!("mii/task:{id}")).unwrap().attempts, 0);
    }
}

#[test]
fn sigterm_during_a_batch_leaves_the_batch_marked_meanwhile_as_it_was() {
    // One filter a batch, one request at a time: while the first request
    // is out, the second batch is marked in flight; the stop comes before
    // it is sent.
    let s = site("batch_size = 1\nmax_in_flight = 1");
    s.queue_repeat_requests(1..=3);
    for _ in 1..=3 {
        s.sim.push(
            Some("$requestPsnFromBfWorkflow"),
            FaultKind::Delay(Duration::from_millis(1500)),
        );
    }
    // While the first request is out; the second batch is marked by then
    // or soon after (it is handed over ahead), never sent.
    sigterm_the_daemon(&s, || delayed(&s) >= 1, Duration::from_millis(200));
    assert_eq!(s.sim.state().received("$requestPsnFromBfWorkflow").len(), 1);
    let store = s.store();
    let state = |n: u32| {
        let e = store
            .ledger_entries()
            .find(|e| {
                matches!(&e.task, Some(fttp_agent::tasks::Task::RepeatRequest { bloomfilter, .. })
                if bloomfilter.to_base64() == bf(n))
            })
            .unwrap();
        (e.status, e.attempts)
    };
    assert_eq!(state(1), (Status::Resolved, 1), "the batch in hand is finished");
    assert_eq!(state(2), (Status::Pending, 0), "marked meanwhile, not sent: as it was");
    assert_eq!(state(3), (Status::Pending, 0));
}

#[test]
fn a_failed_poll_does_not_end_the_daemon() {
    let s = site("");
    s.sim.push(RTASKS, status(500, "down", None));
    queue_send(&s, "later", Days::days(1));
    let daemon = s.daemon("1s");
    let start = Instant::now();
    while s.sim.state().received("$providePatientData").is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the daemon stopped after a failed poll"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    stop_daemon(daemon);
    assert_eq!(s.audit_outcomes("poll")[0], "failed");
}

#[test]
fn repeat_requests_to_the_same_study_survive_a_batch_failure() {
    let s = site("max_attempts = 1");
    let later = Utc::now() + Days::days(1);
    s.sim.add_task(sim::repeat_request(STUDY, &bf(1), TARGET, Some(later)));
    s.sim.push(Some("$requestPsnFromBfWorkflow"), FaultKind::ResetMidBody);
    assert_eq!(s.cycle().0, 1);
    assert_eq!(s.cycle().0, 0);
    assert_eq!(s.store().pseudonym_count().unwrap(), 1);
}

#[test]
fn a_read_only_location_is_reported_clearly() {
    let s = site("");
    let text = std::fs::read_to_string(&s.config)
        .unwrap()
        .replace("path = \"store\"", "path = \"/proc/fttp-agent-store\"");
    std::fs::write(&s.config, text).unwrap();
    let (code, out) = s.cycle();
    assert_eq!(code, 5, "{out}");
    assert!(
        out.contains("store /proc/fttp-agent-store: cannot create the store directory"),
        "{out}"
    );
}

#[test]
fn sigterm_during_a_retry_wait_stops_promptly() {
    let s = site("max_attempts = 5\nretry_delay = \"40s\"");
    queue_send(&s, "waiting", Days::days(1));
    s.sim.push(PROVIDE, status(503, "busy", None));
    // 300 ms after the first send: waiting 20-40 s to retry.
    let sent = || !s.sim.state().received("$providePatientData").is_empty();
    let stopped_in = sigterm_the_daemon(&s, sent, Duration::from_millis(300));
    assert!(stopped_in < Duration::from_secs(3), "{stopped_in:?}");
    let e = s.store().ledger("mii/task:waiting").unwrap().clone();
    assert_eq!(
        (e.status, e.outcome.as_str()),
        (Status::Failed, "failed"),
        "recorded before exit"
    );
}
