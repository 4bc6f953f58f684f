//! The operators' commands, each checked against a store built by real
//! cycles against the simulator.

// (A test or benchmark stops at what it cannot set up: the panic is the report.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chrono::{Duration, Utc};
use common::{Site, TARGET, bf, secrets, stop_daemon};
use fttp_agent::fhir::element::Value;
use fttp_agent::fhir::idat::IdatElement;
use fttp_agent::report::TaskLine;
use fttp_agent::sim::{self, FaultKind};
use fttp_agent::store::Status;
use std::time::Duration as StdDuration;

fn stdout(site: &Site, args: &[&str]) -> (i32, String) {
    let out = site.run(args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

fn append(site: &Site, section: &str, line: &str) {
    let text = std::fs::read_to_string(&site.config)
        .unwrap()
        .replace(&format!("[{section}]\n"), &format!("[{section}]\n{line}\n"));
    let text = if text.contains(&format!("[{section}]")) {
        text
    } else {
        format!("{text}\n[{section}]\n{line}\n")
    };
    std::fs::write(&site.config, text).unwrap();
}

/// A ledger with one entry in every status.
fn every_status() -> Site {
    // (One request at a time: the faults below meet the sends in order.)
    let site = Site::with("xml", fttp_agent::sim::SimOptions::default(), "max_in_flight = 1");
    site.import_patients();
    let later = Utc::now() + Duration::days(2);
    site.sim.add_task(sim::send_idat(
        "t-resolved",
        later,
        None,
        Some(&bf(1)),
        &[IdatElement::Given],
    ));
    site.sim.add_task(sim::send_idat(
        "t-failed",
        later + Duration::hours(1),
        None,
        Some(&bf(2)),
        &[IdatElement::Family],
    ));
    site.sim.add_task(sim::send_idat(
        "t-inflight",
        later + Duration::hours(2),
        None,
        Some(&bf(3)),
        &[IdatElement::Gender],
    ));
    site.sim.add_task(sim::send_idat(
        "t-expired",
        Utc::now() - Duration::hours(1),
        None,
        Some(&bf(1)),
        &[IdatElement::Given],
    ));
    site.sim
        .add_task(sim::dic_psn_available(&bf(5), TARGET, "mii_PENDING", None));
    let mut broken = sim::send_idat("t-rejected", later, None, Some(&bf(1)), &[IdatElement::Given]);
    broken.part.retain(|p| p.name != "expires");
    site.sim.add_task(broken);
    // Closed: a final error code for its Bloom filter.
    site.sim
        .add_task(sim::repeat_request(common::STUDY, &bf(4), TARGET, Some(later)));
    site.sim.state().bf_errors.insert(bf(4), "not-found".into());
    site.sim.push(
        Some("$providePatientData"),
        FaultKind::Delay(StdDuration::from_millis(1)),
    );
    site.sim.push(
        Some("$providePatientData"),
        FaultKind::Status {
            status: 503,
            diagnostics: "busy".into(),
            retry_after: None,
        },
    );
    site.sim.push(Some("$providePatientData"), FaultKind::ResetMidBody);
    assert_eq!(site.cycle().0, 1);
    site
}

#[test]
fn the_fhir_export_maps_every_ledger_status_and_is_valid_r4() {
    let site = every_status();
    {
        let store = site.store();
        let mut statuses: Vec<Status> = store.ledger_entries().map(|e| e.status).collect();
        statuses.sort();
        statuses.dedup();
        assert_eq!(statuses, Status::ALL.to_vec(), "the ledger holds every status");
    }
    let (code, out) = stdout(&site, &["tasks", "--format", "fhir"]);
    assert_eq!(code, 0);
    for s in secrets() {
        assert!(!out.contains(&s), "the FHIR export holds a secret");
    }
    // Parses as FHIR R4 JSON with our reader, and as plain JSON for shape.
    let bundle = fttp_agent::fhir::json::parse(out.as_bytes()).unwrap();
    assert_eq!(bundle.resource_type, "Bundle");
    assert_eq!(bundle.node.str("type"), Some("searchset"));
    assert_eq!(bundle.node.str("total"), Some("7"));
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(json["entry"].is_array() && json["total"].is_number());
    let mut seen = std::collections::BTreeMap::new();
    for entry in bundle.node.nodes("entry") {
        let Some(Value::Resource(task)) = entry.first("resource") else {
            panic!("entry without resource")
        };
        assert_eq!(task.resource_type, "Task");
        let n = &task.node;
        // Task's required elements (R4): status and intent.
        let status = n.str("status").expect("Task.status");
        assert!(n.str("intent").is_some(), "Task.intent");
        assert!(n.str("authoredOn").is_some() && n.str("lastModified").is_some());
        let business = n
            .node("businessStatus")
            .and_then(|b| b.str("text"))
            .unwrap()
            .to_string();
        let id = n
            .nodes("identifier")
            .next()
            .and_then(|i| i.str("value"))
            .unwrap()
            .to_string();
        seen.insert(id, (status.to_string(), business));
    }
    let want = [
        ("t-resolved", "completed", "sent"),
        ("t-failed", "failed", "failed"),
        ("t-inflight", "in-progress", "failed"),
        ("t-expired", "cancelled", "expired"),
    ];
    for (id, status, business) in want {
        assert_eq!(
            seen.get(id),
            Some(&(status.to_string(), business.to_string())),
            "{id}: {seen:?}"
        );
    }
    assert!(
        seen.values().any(|(s, b)| s == "requested" && b == "unknown_patient"),
        "{seen:?}"
    );
    assert!(
        seen.values().any(|(s, b)| s == "rejected" && b == "rejected"),
        "{seen:?}"
    );
    // The task's parts are there, as fingerprints where they identify.
    let task = &json["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["resource"]["identifier"][0]["value"] == "t-resolved")
        .unwrap()["resource"];
    assert!(task["restriction"]["period"]["end"].is_string());
    let inputs: Vec<String> = task["input"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["type"]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(inputs, vec!["expires", "taskId", "bloomfilter", "element"]);
    assert!(task["input"][2]["valueString"].as_str().unwrap().starts_with("bf:"));
}

#[test]
fn tasks_as_json_lines_and_filters() {
    let site = every_status();
    let (_, out) = stdout(&site, &["tasks", "--format", "json"]);
    let lines: Vec<TaskLine> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 7);
    assert!(
        lines
            .iter()
            .any(|l| l.task == "t-resolved" && l.status == "resolved" && l.outcome.as_str() == "sent")
    );
    let (_, out) = stdout(&site, &["tasks", "--format", "json", "--status", "failed"]);
    assert_eq!(out.lines().count(), 1);
    let tomorrow = (Utc::now() + Duration::days(1)).to_rfc3339();
    let (_, out) = stdout(&site, &["tasks", "--format", "json", "--since", &tomorrow]);
    assert_eq!(out.lines().count(), 0);
    let (_, out) = stdout(&site, &["tasks", "--since", "1h"]);
    assert!(out.contains("7 task(s)"), "{out}");
    // The table is aligned: every row's STATUS column starts at the same place.
    let col = out.lines().next().unwrap().find("STATUS").unwrap();
    for line in out.lines().skip(1).take(7) {
        let status = &line[col..];
        assert!(Status::ALL.iter().any(|s| status.starts_with(s.as_str())), "{line}");
    }
}

#[test]
fn status_reports_health_for_monitoring() {
    let site = Site::new("xml");
    site.import_patients();
    let (code, out) = stdout(&site, &["status"]);
    assert_eq!(code, 1, "never polled is a warning: {out}");
    assert!(out.contains("last poll:            never"));
    assert_eq!(site.cycle().0, 0);
    let (code, out) = stdout(&site, &["status"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("fttp-agent status: OK"));

    // A task waiting for a patient, expiring in 12 h: after the next poll
    // (6 h), but within warn_before (24 h).
    site.sim.add_task(sim::send_idat(
        "soonish",
        Utc::now() + Duration::hours(12),
        None,
        Some(&bf(5)),
        &[IdatElement::Given],
    ));
    assert_eq!(site.cycle().0, 1);
    let (code, out) = stdout(&site, &["status"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("WARNING: send_idat soonish expires in 11h")
            || out.contains("WARNING: send_idat soonish expires in 12h"),
        "{out}"
    );

    // One expiring within the hour: run by a timer, the next poll is not
    // the agent's to know, so it warns (a daemon, knowing its next poll,
    // says critical: admin::status_*).
    site.sim.add_task(sim::send_idat(
        "urgent",
        Utc::now() + Duration::hours(1),
        None,
        Some(&bf(5)),
        &[IdatElement::Given],
    ));
    assert_eq!(site.cycle().0, 1);
    let (code, out) = stdout(&site, &["status", "--format", "json"]);
    assert_eq!(code, 1);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["health"], "warning");
    assert_eq!(json["pending"].as_array().unwrap().len(), 2);
    assert_eq!(json["open_tasks"], 2);
    assert_eq!(json["pending"][0]["task"], "urgent", "soonest first");
    assert!(json["pending"][0]["seconds_left"].as_i64().unwrap() <= 3600);
    assert!(json["warnings"][0].as_str().unwrap().contains("urgent expires in"));
}

#[test]
fn repeated_poll_failures_are_critical() {
    let site = Site::new("xml");
    for _ in 0..3 {
        site.sim.push_fault(Some("$requestTasks"), 503, "down");
        assert_eq!(site.cycle().0, 3);
    }
    let (code, out) = stdout(&site, &["status"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("CRITICAL: the last 3 polls failed"), "{out}");
    assert!(out.contains("failed, 3 in a row"), "{out}");
}

#[test]
fn audit_export_is_ndjson_and_filters_by_time() {
    let site = every_status();
    let (code, out) = stdout(&site, &["audit", "export"]);
    assert_eq!(code, 0);
    let all: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(all.len(), site.audit().len());
    assert!(all.iter().all(|r| r["hash"].is_string()));
    let (_, out) = stdout(
        &site,
        &[
            "audit",
            "export",
            "--since",
            &(Utc::now() + Duration::minutes(1)).to_rfc3339(),
        ],
    );
    assert_eq!(out.lines().count(), 0);
    let (_, out) = stdout(&site, &["audit", "export", "--since", "1h"]);
    assert_eq!(out.lines().count(), all.len());
}

#[test]
fn purge_removes_only_finished_entries_past_retention() {
    let site = every_status();
    append(&site, "store", "retention = \"1s\"");
    std::thread::sleep(StdDuration::from_millis(1200));
    let (code, out) = stdout(&site, &["purge"]);
    assert_eq!(code, 0);
    assert!(out.contains("purged 4 finished ledger entries"), "{out}");
    let store = site.store();
    let left: Vec<Status> = store.ledger_entries().map(|e| e.status).collect();
    assert_eq!(left.len(), 3);
    assert!(
        left.iter().all(|s| !s.is_terminal()),
        "open tasks are never purged: {left:?}"
    );
    drop(store);
    assert!(site.audit().iter().any(|r| r["kind"] == "purge" && r["tasks"] == 4));
}

#[test]
fn forget_erases_one_patient_and_records_it() {
    let site = Site::new("xml");
    site.import_patients();
    let (code, out) = stdout(&site, &["forget", "p2"]);
    assert_eq!(code, 0, "{out}");
    let store = site.store();
    assert_eq!(store.patient_count().unwrap(), 2);
    assert!(
        store
            .patient(&fttp_agent::types::LocalId("p2".into()))
            .unwrap()
            .is_none()
    );
    drop(store);
    // The write-ahead log is emptied: no older copy of her row is kept in
    // it (the store's own tests scan the files for her bytes).
    let wal = site.dir.path().join("store/store.sqlite3-wal");
    assert!(
        wal.metadata().map_or(true, |m| m.len() == 0),
        "the WAL still holds pages"
    );
    let rec = site.audit().into_iter().find(|r| r["kind"] == "forget").unwrap();
    assert_eq!(rec["outcome"], "erased");
    assert!(rec["patient"].as_str().unwrap().starts_with("pat:"));
    let (code, _) = stdout(&site, &["forget", "p2"]);
    assert_eq!(code, 1);
}

#[test]
fn dry_run_says_what_it_would_do_and_changes_nothing() {
    let site = Site::new("json");
    site.import_patients();
    let later = Utc::now() + Duration::days(1);
    site.sim.add_task(sim::send_idat(
        "dry-1",
        later,
        None,
        Some(&bf(2)),
        &[IdatElement::Given, IdatElement::Suffix],
    ));
    site.sim
        .add_task(sim::dic_psn_available(&bf(1), TARGET, "mii_DRY", None));
    site.sim
        .add_task(sim::repeat_request("mii", &bf(3), TARGET, Some(later)));
    site.sim.add_task(sim::send_idat(
        "dry-old",
        Utc::now() - Duration::hours(1),
        None,
        Some(&bf(2)),
        &[IdatElement::Given],
    ));
    let audit_before = std::fs::read(site.dir.path().join("audit.ndjson")).ok();
    let (code, out) = stdout(&site, &["run", "--once", "--dry-run"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("4 task(s) received; nothing will be sent or recorded"),
        "{out}"
    );
    assert!(
        out.contains("send 1 element(s)") && out.contains("not on file: suffix"),
        "{out}"
    );
    assert!(out.contains("store pseudonym"), "{out}");
    assert!(out.contains("resend Bloom filter"), "{out}");
    assert!(out.contains("skip (expired)"), "{out}");
    let st = site.sim.state();
    assert_eq!(st.received.len(), 1, "only the poll");
    drop(st);
    assert_eq!(site.store().ledger_entries().count(), 0);
    assert_eq!(std::fs::read(site.dir.path().join("audit.ndjson")).ok(), audit_before);
}

#[test]
fn metrics_are_written_for_the_textfile_collector() {
    let site = Site::new("xml");
    site.import_patients();
    append(&site, "log", "metrics = \"fttp_agent.prom\"");
    let later = Utc::now() + Duration::hours(5);
    site.sim
        .add_task(sim::send_idat("m-1", later, None, Some(&bf(1)), &[IdatElement::Given]));
    site.sim
        .add_task(sim::send_idat("m-2", later, None, Some(&bf(5)), &[IdatElement::Given]));
    assert_eq!(site.cycle().0, 1);
    let text = std::fs::read_to_string(site.dir.path().join("fttp_agent.prom")).unwrap();
    assert!(
        text.contains("fttp_agent_tasks{study=\"mii\",kind=\"send_idat\",status=\"resolved\",outcome=\"sent\"} 1"),
        "{text}"
    );
    assert!(text.contains(
        "fttp_agent_tasks{study=\"mii\",kind=\"send_idat\",status=\"pending\",outcome=\"unknown_patient\"} 1"
    ));
    assert!(text.contains("fttp_agent_pending_tasks{study=\"mii\"} 1\n"));
    let secs: i64 = text
        .lines()
        .find_map(|l| l.strip_prefix("fttp_agent_seconds_until_soonest_expiry "))
        .unwrap()
        .parse()
        .unwrap();
    assert!((5 * 3600 - 120..=5 * 3600).contains(&secs), "{secs}");
    let last: i64 = text
        .lines()
        .find_map(|l| l.strip_prefix("fttp_agent_last_successful_poll_timestamp_seconds{study=\"mii\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert!((Utc::now().timestamp() - last).abs() < 60);
    assert!(text.contains("fttp_agent_cycle_success 1"));
    assert!(text.contains("# TYPE fttp_agent_cycle_duration_seconds gauge"));
}

#[test]
fn json_logs_carry_level_message_and_task_context() {
    let site = Site::new("xml");
    site.import_patients();
    append(&site, "log", "format = \"json\"");
    std::fs::remove_file(site.dir.path().join("agent.log")).unwrap(); // text lines of the import
    site.sim.add_task(sim::send_idat(
        "j-1",
        Utc::now() + Duration::days(1),
        None,
        Some(&bf(1)),
        &[IdatElement::Given],
    ));
    let out = site.run(&["run", "--once"]);
    let err = String::from_utf8_lossy(&out.stderr);
    let records: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert!(
        records
            .iter()
            .all(|r| r["level"].is_string() && r["message"].is_string() && r["ts"].is_string())
    );
    let task = records.iter().find(|r| r["task"] == "j-1").expect("a task line");
    assert_eq!(task["kind"], "send_idat");
    assert_eq!(task["message"], "sent");
    let file = std::fs::read_to_string(site.dir.path().join("agent.log")).unwrap();
    assert!(
        file.lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
    );
}

#[test]
fn the_daemon_writes_a_heartbeat_and_reopens_its_log_on_sighup() {
    let site = Site::new("xml");
    let daemon = site.daemon("1s");
    let log = site.dir.path().join("agent.log");
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        let start = std::time::Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < StdDuration::from_secs(20),
                "timed out waiting for {what}"
            );
            std::thread::sleep(StdDuration::from_millis(50));
        }
    };
    let hb_path = site.dir.path().join("store/heartbeat.json");
    wait("heartbeat with next poll", &|| {
        std::fs::read_to_string(&hb_path).is_ok_and(|t| t.contains("next_poll"))
    });
    let hb: fttp_agent::report::Heartbeat = serde_json::from_str(&std::fs::read_to_string(&hb_path).unwrap()).unwrap();
    assert_eq!(hb.pid, daemon.id());
    assert!(hb.last_success.is_some());
    // logrotate moves the file away and sends SIGHUP.
    std::fs::rename(&log, site.dir.path().join("agent.log.1")).unwrap();
    std::process::Command::new("kill")
        .args(["-HUP", &daemon.id().to_string()])
        .status()
        .unwrap();
    wait("a new log file", &|| {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("polling"))
    });
    stop_daemon(daemon);
    let (_, out) = stdout(&site, &["status"]);
    assert!(
        out.contains("next poll:") && !out.contains("next poll:            unknown"),
        "{out}"
    );
}

#[test]
fn import_shows_no_progress_when_not_on_a_terminal() {
    let site = Site::new("xml");
    let path = site.dir.path().join("many.csv");
    let mut csv = String::from("local_id,given\n");
    for i in 0..3000 {
        csv.push_str(&format!("id-{i},N{i}\n"));
    }
    std::fs::write(&path, csv).unwrap();
    let out = site.run(&["import", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&out.stderr).contains('\r'));
    assert!(String::from_utf8_lossy(&out.stdout).contains("3000 added"));
}

#[test]
fn status_healthcheck_exits_nonzero_only_when_critical() {
    let site = Site::new("json");
    // Never polled: a warning, which a container health check must not
    // take for a failure.
    assert_eq!(site.run(&["status"]).status.code(), Some(1));
    assert_eq!(site.run(&["status", "--healthcheck"]).status.code(), Some(0));
    // A store that cannot be read (another key): critical, unhealthy.
    assert_eq!(site.cycle().0, 0);
    fttp_agent::crypto::StoreKey::generate(&site.dir.path().join("other.key")).unwrap();
    let text = std::fs::read_to_string(&site.config)
        .unwrap()
        .replace("key_file = \"store.key\"", "key_file = \"other.key\"");
    std::fs::write(&site.config, text).unwrap();
    assert_eq!(site.run(&["status"]).status.code(), Some(2));
    assert_eq!(site.run(&["status", "--healthcheck"]).status.code(), Some(1));
}

#[test]
fn every_usage_error_says_what_was_wrong_on_stderr_and_exits_2() {
    let site = Site::new("json");
    // (Each: the arguments, and what stderr must name.)
    let cases: &[(&[&str], &[&str])] = &[
        (&["tasks", "--since", "garbage"], &["--since", "YYYY-MM-DD", "24h"]),
        (&["audit", "export", "--since", "nope"], &["--since", "RFC 3339"]),
        (&["pseudonyms", "--since", "x"], &["--since", "7d"]),
        (&["pseudonyms", "--format", "xlsx"], &["--format", "csv"]),
        (&["tasks", "--status", "done"], &["--status", "pending"]),
        (&["status", "--format", "yaml"], &["--format", "json"]),
        (&["enroll", "--limit", "many"], &["--limit"]),
        (&["run", "--once", "--study", "gecco"], &["gecco", "mii"]),
        (&["pseudonyms", "--study", "gecco"], &["gecco", "mii"]),
        (&["no-such-command"], &["no-such-command"]),
    ];
    for (args, names) in cases {
        let out = site.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        for n in *names {
            assert!(stderr.contains(n), "{args:?}: stderr does not name {n}: {stderr}");
        }
    }
    // A configuration that cannot be read: the file and why.
    let out = common::agent()
        .args(["--config", "/nonexistent/fttp-agent.toml", "status"])
        .env_remove("FTTP_AGENT_CONFIG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("/nonexistent/fttp-agent.toml"), "{stderr}");
}

#[test]
fn the_final_error_is_printed_once() {
    let site = Site::new("json");
    // (The dispatcher gone: the cycle fails; its error ends the command.)
    let text = std::fs::read_to_string(&site.config)
        .unwrap()
        .replace(site.sim.url(), "http://127.0.0.1:9/ttp-fhir/fhir/dispatcher");
    std::fs::write(&site.config, text).unwrap();
    let out = site.run(&["run", "--once"]);
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default().to_string();
    assert!(last.contains("polling failed"), "{stderr}");
    assert_eq!(stderr.matches("polling failed").count(), 1, "{stderr}");
}
