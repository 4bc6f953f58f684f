//! End-to-end: the built binary against the simulated dispatcher on
//! loopback, in FHIR XML and FHIR JSON.

// (A test or benchmark stops at what it cannot set up: the panic is the report.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chrono::{Duration, Utc};
use common::{STUDY, Site, TARGET, bf, stop_daemon};
use fttp_agent::fhir::idat::{Idat, IdatElement};
use fttp_agent::sim::{self, SimOptions};
use fttp_agent::store::Status;
use fttp_agent::types::BloomFilter;

fn bfv(n: u32) -> BloomFilter {
    BloomFilter::from_base64(&bf(n)).unwrap()
}

#[test]
fn every_task_kind_resolves_in_xml_and_in_json() {
    for format in ["xml", "json"] {
        let site = Site::new(format);
        site.import_patients();
        let later = Utc::now() + Duration::days(2);
        let requested = [
            IdatElement::Given,
            IdatElement::Birthdate,
            IdatElement::Degree,
            IdatElement::Suffix,
        ];
        site.sim
            .add_task(sim::dic_psn_available(&bf(1), TARGET, "mii_PSN1", None));
        site.sim
            .add_task(sim::send_idat("task-bf-2", later, None, Some(&bf(2)), &requested));
        site.sim
            .add_task(sim::repeat_request(STUDY, &bf(3), TARGET, Some(later)));

        let (code, out) = site.cycle();
        assert_eq!(code, 0, "{format}: {out}");

        let st = site.sim.state();
        let mime = format!("application/fhir+{format}");
        for r in &st.received {
            assert!(
                r.content_type.as_deref().unwrap_or("").starts_with(&mime),
                "{format}: {r:?}"
            );
            assert_eq!(r.accept.as_deref(), Some(mime.as_str()));
            assert!(r.key_in_header);
        }
        let sent = st.received("$providePatientData");
        assert_eq!(sent.len(), 1);
        let params = sent[0].parameters.as_ref().unwrap();
        assert_eq!(
            params.get("taskId").next().unwrap().value.as_ref().unwrap().as_str(),
            Some("task-bf-2")
        );
        assert_eq!(params.first_string("target"), Some(TARGET));
        let patient = Idat::from_patient(sent[0].patient().unwrap());
        // Exactly what was asked for and is on file: suffix is not on file.
        assert_eq!(
            patient.present(),
            vec![IdatElement::Given, IdatElement::Birthdate, IdatElement::Degree]
        );
        assert_eq!(patient.given.as_deref(), Some("Maximilian"));
        assert_eq!(patient.degree.as_deref(), Some("Dr. rer. nat."));
        let psn_call = st.received("$requestPsnFromBfWorkflow");
        assert_eq!(psn_call.len(), 1);
        let p = psn_call[0].parameters.as_ref().unwrap();
        assert_eq!(p.first_string("study"), Some(STUDY));
        assert_eq!(p.get("bloomfilter").count(), 1);
        let issued = st.registry.get(&bf(3)).unwrap().clone();
        // Keep-alive: the poll's connection is reused; the send and the
        // batch may go at once (max_in_flight), on two connections at most.
        assert_eq!(st.received.len(), 3);
        assert!(st.connections <= 2, "{format}: {} connections", st.connections);
        drop(st);

        let store = site.store();
        assert_eq!(
            store.pseudonym(&bfv(1), STUDY).unwrap().unwrap().pseudonym.value,
            "mii_PSN1"
        );
        assert_eq!(
            store.pseudonym(&bfv(3), STUDY).unwrap().unwrap().pseudonym.value,
            issued.value.unwrap()
        );
        // The system is stored as given, whatever it is.
        assert_eq!(
            store
                .pseudonym(&bfv(3), STUDY)
                .unwrap()
                .unwrap()
                .pseudonym
                .system
                .as_deref(),
            Some(sim::DISPATCHER)
        );
        assert!(store.ledger_entries().all(|e| e.status == Status::Resolved));
        assert_eq!(store.ledger_entries().count(), 3);
        drop(store);

        let mut outcomes: Vec<String> = site
            .audit()
            .iter()
            .filter(|r| r["kind"] != "poll")
            .map(|r| r["outcome"].as_str().unwrap().to_string())
            .collect();
        outcomes.sort();
        assert_eq!(outcomes, vec!["sent", "stored", "stored"]);
        let sent_rec = site.audit().into_iter().find(|r| r["outcome"] == "sent").unwrap();
        assert_eq!(sent_rec["task"], "task-bf-2");
        assert_eq!(sent_rec["missing"], serde_json::json!(["suffix"]));
        assert!(sent_rec["ts"].as_str().unwrap().ends_with('Z'));

        // Next poll: the dispatcher now asks for IDAT by the pseudonym it issued.
        site.sim.add_task(sim::send_idat(
            "task-psn-1",
            later,
            Some("mii_PSN1"),
            None,
            &[IdatElement::Family, IdatElement::Maidenname],
        ));
        let (code, out) = site.cycle();
        assert_eq!(code, 0, "{out}");
        let st = site.sim.state();
        let sent = st.received("$providePatientData");
        let patient = Idat::from_patient(sent[1].patient().unwrap());
        assert_eq!(patient.present(), vec![IdatElement::Family, IdatElement::Maidenname]);
        assert_eq!(patient.maidenname.as_deref(), Some("Gabler"));
        drop(st);
        site.assert_no_leaks();
    }
}

#[test]
fn tasks_that_expire_together_are_worked_in_the_order_they_arrived() {
    // (So that a batch's marks and outcomes rewrite neighbouring rows of
    // the store: README, Performance, section 7.)
    let site = Site::with("json", SimOptions::default(), "max_in_flight = 1");
    site.import_patients();
    let expires = Utc::now() + Duration::days(1);
    let arrived = ["t5", "t1", "t4", "t2", "t3", "t0"];
    for (i, id) in arrived.iter().enumerate() {
        site.sim.add_task(sim::send_idat(
            id,
            expires,
            None,
            Some(&bf(i as u32 % 3 + 1)),
            &[IdatElement::Family],
        ));
    }
    let (code, out) = site.cycle();
    assert_eq!(code, 0, "{out}");
    let st = site.sim.state();
    let order: Vec<&str> = st
        .received("$providePatientData")
        .iter()
        .filter_map(|r| r.task_id())
        .collect();
    assert_eq!(order, arrived);
}

#[test]
fn expired_tasks_are_not_acted_on_and_soonest_expiry_goes_first() {
    let site = Site::with(
        "xml",
        SimOptions::default(),
        // (One at a time, the order of arrival is the order of starts; with
        // several: tests/pace.rs.)
        "max_in_flight = 1",
    );
    site.import_patients();
    let now = Utc::now();
    site.sim.add_task(sim::send_idat(
        "late",
        now + Duration::days(5),
        None,
        Some(&bf(1)),
        &[IdatElement::Family],
    ));
    site.sim.add_task(sim::send_idat(
        "gone",
        now - Duration::minutes(1),
        None,
        Some(&bf(2)),
        &[IdatElement::Family],
    ));
    site.sim.add_task(sim::send_idat(
        "soon",
        now + Duration::hours(1),
        None,
        Some(&bf(3)),
        &[IdatElement::Family],
    ));
    let (code, out) = site.cycle();
    assert_eq!(code, 0, "{out}");
    let st = site.sim.state();
    let order: Vec<String> = st
        .received("$providePatientData")
        .iter()
        .map(|r| r.task_id().unwrap().to_string())
        .collect();
    assert_eq!(order, vec!["soon", "late"]);
    drop(st);
    let store = site.store();
    assert_eq!(store.ledger("mii/task:gone").unwrap().status, Status::Expired);
}

#[test]
fn a_malformed_task_is_rejected_and_the_others_still_run() {
    let site = Site::new("json");
    site.import_patients();
    let later = Utc::now() + Duration::days(1);
    let mut broken = sim::send_idat("broken", later, None, Some(&bf(1)), &[IdatElement::Family]);
    broken.part.retain(|p| p.name != "expires");
    site.sim.add_task(broken);
    site.sim
        .add_task(fttp_agent::fhir::Parameter::with_parts("make_coffee", vec![]));
    site.sim.add_task(sim::send_idat(
        "fine",
        later,
        None,
        Some(&bf(2)),
        &[IdatElement::Gender],
    ));
    let (code, out) = site.cycle();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("missing part 'expires'"), "{out}");
    assert_eq!(site.sim.state().received("$providePatientData").len(), 1);
    let rejected: Vec<_> = site
        .audit()
        .into_iter()
        .filter(|r| r["outcome"] == "rejected")
        .collect();
    assert_eq!(rejected.len(), 2);
    assert_eq!(rejected[1]["kind"], "unknown");
    let store = site.store();
    assert_eq!(
        store.ledger_entries().filter(|e| e.status == Status::Rejected).count(),
        2
    );
}

#[test]
fn the_same_task_in_two_polls_is_done_once() {
    let site = Site::new("xml");
    site.import_patients();
    let task = sim::send_idat(
        "twice",
        Utc::now() + Duration::days(1),
        None,
        Some(&bf(1)),
        &[IdatElement::Given],
    );
    let psn = sim::dic_psn_available(&bf(2), TARGET, "mii_TWICE", None);
    site.sim.add_task(task.clone());
    site.sim.add_task(psn);
    assert_eq!(site.cycle().0, 0);
    // The send_idat again (as if re-queued); the dic_psn_available is
    // handed out again by the dispatcher itself until it expires.
    site.sim.add_task(task);
    let (code, out) = site.cycle();
    assert_eq!(code, 0, "{out}");
    assert_eq!(site.sim.state().received("$providePatientData").len(), 1);
    let dups = site.audit().into_iter().filter(|r| r["outcome"] == "duplicate").count();
    assert_eq!(dups, 2);
}

#[test]
fn a_refused_api_key_exits_3_and_changes_nothing() {
    let site = Site::new("xml");
    site.import_patients();
    site.sim.add_task(sim::send_idat(
        "t",
        Utc::now() + Duration::days(1),
        None,
        Some(&bf(1)),
        &[IdatElement::Given],
    ));
    site.write_config("xml", "wrong-key", "");
    let (code, out) = site.cycle();
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("HTTP 401") && out.contains("missing or invalid API key"),
        "{out}"
    );
    assert!(!out.contains("wrong-key"));
    assert_eq!(site.store().ledger_entries().count(), 0);
    assert_eq!(site.audit_outcomes("poll"), vec!["failed"]);
}

#[test]
fn a_500_is_reported_and_the_next_cycle_recovers() {
    let site = Site::new("json");
    site.import_patients();
    site.sim.add_task(sim::send_idat(
        "t500",
        Utc::now() + Duration::days(1),
        None,
        Some(&bf(1)),
        &[IdatElement::Given],
    ));
    site.sim.push_fault(Some("$requestTasks"), 500, "database down");
    let (code, out) = site.cycle();
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("HTTP 500") && out.contains("database down"), "{out}");
    let (code, out) = site.cycle();
    assert_eq!(code, 0, "{out}");
    assert_eq!(site.store().ledger("mii/task:t500").unwrap().outcome.as_str(), "sent");
}

#[test]
fn a_failed_send_stays_open_and_is_retried_from_the_ledger() {
    let site = Site::new("xml");
    site.import_patients();
    site.sim.add_task(sim::send_idat(
        "retry",
        Utc::now() + Duration::days(1),
        None,
        Some(&bf(2)),
        &[IdatElement::Family],
    ));
    // The gateway echoes the family name in its diagnostics: it must be redacted.
    site.sim
        .push_fault(Some("$providePatientData"), 503, "cannot store Musterfrau right now");
    let (code, out) = site.cycle();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("HTTP 503") && out.contains("[redacted]"), "{out}");
    assert_eq!(site.store().ledger("mii/task:retry").unwrap().status, Status::Failed);
    // Even if the dispatcher no longer lists it, the ledger has it.
    site.sim.state().tasks.clear();
    site.sim.add_task(sim::send_idat(
        "retry",
        Utc::now() + Duration::days(1),
        None,
        Some(&bf(2)),
        &[IdatElement::Family],
    ));
    let (code, out) = site.cycle();
    assert_eq!(code, 0, "{out}");
    assert_eq!(site.store().ledger("mii/task:retry").unwrap().status, Status::Resolved);
    site.assert_no_leaks();
}

#[test]
fn an_unknown_patient_stays_pending_until_imported() {
    let site = Site::new("xml");
    site.sim
        .add_task(sim::dic_psn_available(&bf(1), TARGET, "mii_LATE", None));
    let (code, out) = site.cycle();
    assert_eq!(code, 1, "{out}");
    let entry = site.store().ledger_entries().next().unwrap().clone();
    assert_eq!(
        (entry.status, entry.outcome.as_str()),
        (Status::Pending, "unknown_patient")
    );
    // The pseudonym is kept even so.
    assert_eq!(
        site.store().pseudonym(&bfv(1), STUDY).unwrap().unwrap().pseudonym.value,
        "mii_LATE"
    );
    site.import_patients();
    let (code, out) = site.cycle();
    assert_eq!(code, 0, "{out}");
    assert_eq!(site.store().ledger(&entry.key).unwrap().outcome.as_str(), "stored");
}

#[test]
fn repeat_requests_are_batched_and_errors_recorded_per_filter() {
    let site = Site::with("json", SimOptions::default(), "batch_size = 2");
    let later = Utc::now() + Duration::days(1);
    for n in 1..=5 {
        site.sim
            .add_task(sim::repeat_request(STUDY, &bf(n), TARGET, Some(later)));
    }
    site.sim.state().bf_errors.insert(bf(4), "not-found".into());
    let (code, out) = site.cycle();
    // not-found is final: the task is closed, nothing stays open.
    assert_eq!(code, 0, "{out}");
    let st = site.sim.state();
    let calls = st.received("$requestPsnFromBfWorkflow");
    assert_eq!(calls.len(), 3);
    let mut sizes: Vec<usize> = calls
        .iter()
        .map(|c| c.parameters.as_ref().unwrap().get("bloomfilter").count())
        .collect();
    // (Sent at once, they may arrive in any order.)
    sizes.sort();
    assert_eq!(sizes, vec![1, 2, 2]);
    drop(st);
    let failed: Vec<_> = site
        .audit()
        .into_iter()
        .filter(|r| r["outcome"] == "dispatcher_error")
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["detail"], "error code not-found");
    assert_eq!(failed[0]["bloomfilter"], bfv(4).fingerprint());
    assert_eq!(site.store().pseudonym_count().unwrap(), 4);
}

#[test]
fn an_all_error_answers_the_whole_batch() {
    // A final code closes every task of the batch; nothing is resent.
    let site = Site::new("xml");
    let later = Utc::now() + Duration::days(1);
    site.queue_repeat_requests(1..=3);
    site.sim.state().batch_error = Some("processing".into());
    let (code, out) = site.cycle();
    assert_eq!(code, 0, "{out}");
    assert_eq!(site.audit_outcomes("repeat_request"), ["dispatcher_error"; 3]);
    assert_eq!(site.cycle().0, 0);
    assert_eq!(site.sim.state().received("$requestPsnFromBfWorkflow").len(), 1);
    // A transient one leaves them open, resent from the ledger next cycle.
    let site = Site::new("xml");
    for n in 1..=3 {
        site.sim
            .add_task(sim::repeat_request(STUDY, &bf(n), TARGET, Some(later)));
    }
    site.sim.state().batch_error = Some("throttled".into());
    let (code, _) = site.cycle();
    assert_eq!(code, 1);
    let details: Vec<String> = site
        .audit()
        .into_iter()
        .filter(|r| r["kind"] == "repeat_request")
        .map(|r| r["detail"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(details, vec!["whole batch refused: throttled"; 3]);
    assert_eq!(site.store().pseudonym_count().unwrap(), 0);
    // Next cycle: resent from the ledger, and now accepted.
    let (code, out) = site.cycle();
    assert_eq!(code, 0, "{out}");
    assert_eq!(site.store().pseudonym_count().unwrap(), 3);
}

#[test]
fn the_api_key_can_travel_in_the_body_for_older_gateways() {
    let options = SimOptions {
        accept_body_key: true,
        ..SimOptions::default()
    };
    let site = Site::with("xml", options, "api_key_in = \"body\"");
    let (code, out) = site.cycle();
    assert_eq!(code, 0, "{out}");
    let st = site.sim.state();
    let r = &st.received[0];
    assert!(r.authorized && !r.key_in_header);
}

#[test]
fn a_second_agent_on_the_same_store_exits_75() {
    let site = Site::new("xml");
    let _held = site.store();
    let (code, out) = site.cycle();
    assert_eq!(code, 75, "{out}");
    assert!(
        out.contains("in use by another fttp-agent") && out.contains(&format!("pid {}", std::process::id())),
        "{out}"
    );
}

#[test]
fn a_config_error_names_key_and_line_and_exits_2() {
    let site = Site::new("xml");
    let text = std::fs::read_to_string(&site.config)
        .unwrap()
        .replace("timeout = \"5s\"", "timeout = \"soon\"");
    std::fs::write(&site.config, text).unwrap();
    let out = site.run(&["run", "--once"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 5") && err.contains("timeout"), "{err}");
}

#[test]
fn import_reports_bad_rows_by_line_and_keeps_the_good_ones() {
    let site = Site::new("xml");
    let csv = format!(
        "{}p4,,Jonas,Weber,,,1999-02-30,m,,,,,,,,,\np5,,Lena,Vogel,,,2001-05-30,x,,,,,,,,,\np6,not-base64!,A,B,,,,,,,,,,,,,\n",
        common::patients_csv()
    );
    let path = site.dir.path().join("p.csv");
    std::fs::write(&path, csv).unwrap();
    let out = site.run(&["import", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("p.csv:5: skipped: birthdate"), "{err}");
    assert!(
        err.contains("p.csv:7: skipped: Bloom filter is not valid base64"),
        "{err}"
    );
    assert!(!err.contains("1999-02-30") && !err.contains("Weber"), "{err}");
    let out = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.contains("4 added, 0 updated, 0 unchanged, 2 skipped"), "{out}");
    assert_eq!(site.store().patient_count().unwrap(), 4);
    // Again: updates, never duplicates.
    let out = site.run(&["import", path.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 added, 0 updated, 4 unchanged"));
    assert_eq!(site.store().patient_count().unwrap(), 4);
}

#[test]
fn import_reads_ndjson_patients_with_their_bloom_filter() {
    let site = Site::new("xml");
    let (patient, _) = Idat {
        family: Some("Mustermann".into()),
        given: Some("Erika".into()),
        birthdate: Some("1964-08-12".into()),
        ..Idat::default()
    }
    .to_patient(&IdatElement::ALL);
    let mut patient = patient;
    patient.node.push_primitive("id", "nd-1");
    patient.node.push_complex(
        "identifier",
        fttp_agent::fhir::Node::new()
            .with("system", fttp_agent::fhir::idat::BLOOMFILTER_SYSTEM)
            .with("value", bf(1)),
    );
    let line = fttp_agent::fhir::json::to_string(&patient);
    let path = site.dir.path().join("p.ndjson");
    std::fs::write(&path, format!("{line}\n{{\"resourceType\":\"Patient\"}}\n")).unwrap();
    let out = site.run(&["import", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("p.ndjson:2: skipped: Patient without id"), "{err}");
    let store = site.store();
    let p = store.patient_by_bloomfilter(&bfv(1)).unwrap().unwrap();
    assert_eq!(p.local_id.0, "nd-1");
    assert_eq!(p.idat.family.as_deref(), Some("Mustermann"));
}

#[test]
fn tasks_and_check_show_what_the_agent_knows() {
    let site = Site::new("xml");
    site.import_patients();
    site.sim.add_task(sim::send_idat(
        "shown-task",
        Utc::now() + Duration::days(1),
        None,
        Some(&bf(1)),
        &[IdatElement::Given],
    ));
    assert_eq!(site.cycle().0, 0);
    let out = site.run(&["tasks"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("send_idat") && text.contains("shown-task") && text.contains("resolved"),
        "{text}"
    );
    assert!(text.contains("1 task(s)"));
    let out = site.run(&["tasks", "--status", "expired"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 task(s)"));
    let out = site.run(&["tasks", "--kind", "send_idat", "--status", "resolved"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 task(s)"));
    let out = site.run(&["tasks", "--status", "done"]);
    assert_eq!(out.status.code(), Some(2));
    let out = site.run(&["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("dispatcher: reachable, API key accepted, 0 task(s) waiting"),
        "{text}"
    );
    assert!(text.contains("3 patient(s)"), "{text}");
    assert!(text.contains("set (hidden)"));
}

#[test]
fn demo_runs_the_whole_job_on_the_embedded_default() {
    for format in ["xml", "json"] {
        let dir = tempfile::tempdir().unwrap();
        let out = common::agent()
            .args(["demo", "--format", format, "--dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for outcome in [
            "expired          1",
            "rejected         1",
            "sent             1",
            "stored           5",
            "$requestTasks                HTTP 200 (study mii)",
            "$requestTasks                HTTP 200 (study napkon)",
        ] {
            assert!(text.contains(outcome), "{format}: {text}");
        }
        assert!(
            text.contains("Patient with exactly: given, family, birthdate, gender"),
            "{text}"
        );
        let audit = std::fs::read_to_string(dir.path().join("audit.ndjson")).unwrap();
        // A poll and its tasks for each of the two studies.
        assert_eq!(audit.lines().count(), 10);
        assert_eq!(audit.matches("\"study\":\"napkon\"").count(), 3, "{audit}");
    }
}

#[test]
fn the_example_config_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml")).unwrap();
    let key = dir.path().join("api-key");
    common::write_private(&key, "k\n");
    let path = dir.path().join("config.toml");
    let seeds = dir.path().join("seeds.toml");
    std::fs::write(
        &seeds,
        "balanced.seed = 1\nfield.firstName.seed = 2\nfield.lastName.seed = 3\nfield.birthDate.seed = 4\nfield.gender.seed = 5\n",
    )
    .unwrap();
    std::fs::set_permissions(&seeds, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    std::fs::write(
        &path,
        example
            .replace("/etc/fttp-agent/api-key", key.to_str().unwrap())
            .replace("/etc/fttp-agent/store.key", "store.key")
            .replace("/etc/fttp-agent/bloom-seeds.toml", "seeds.toml"),
    )
    .unwrap();
    let cfg = fttp_agent::config::Config::load(&path).unwrap();
    assert_eq!(cfg.api_key(), "k");
    assert_eq!(cfg.study().target.as_str(), "dic_example");
    assert_eq!(cfg.schedule.interval.0, std::time::Duration::from_secs(6 * 3600));
    // Its [bloomfilter] section builds, and normalises as it says.
    let encoder = cfg.bloom_encoder().unwrap().unwrap();
    let idat = fttp_agent::fhir::idat::Idat {
        given: Some(" Dr. Jürgen-Maß ".into()),
        family: Some("Müller".into()),
        birthdate: Some("1920-01-05".into()),
        gender: Some("female".into()),
        ..Default::default()
    };
    let fields = encoder.fields(&idat).unwrap();
    let fields: Vec<&str> = fields.iter().map(|f| f.as_deref().unwrap_or("-")).collect();
    assert_eq!(fields, ["JUERGENMASS", "MUELLER", "19200105", "f"]);
    assert_eq!(encoder.encoder().bits(), 1000);
    assert!(encoder.encode(&idat).is_ok());
    // Its [serve] section, uncommented, is valid too.
    assert!(cfg.serve.is_none());
    let password = dir.path().join("serve.password");
    common::write_private(&password, "pw\n");
    let serve: String = example
        .lines()
        .skip_while(|l| *l != "# [serve]")
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| l.starts_with('[') || l.contains(" = "))
        // (Certificates are tested in tests/serve.rs.)
        .filter(|l| !l.starts_with("tls_") && !l.starts_with("client_ca"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(serve.contains("basic_user"), "{serve}");
    let with_serve = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\n[bloomfilter]", &format!("\n{serve}\n[bloomfilter]"))
        .replace("/etc/fttp-agent/serve.password", password.to_str().unwrap());
    std::fs::write(&path, with_serve).unwrap();
    let cfg = fttp_agent::config::Config::load(&path).unwrap();
    let serve = cfg.serve.unwrap();
    assert_eq!(
        (serve.listen.as_str(), serve.base_path.as_str()),
        ("127.0.0.1:8686", "/ttp-fhir/fhir/gpas")
    );
    assert_eq!((serve.max_originals, serve.threads), (10_000, 8));
}

#[test]
fn the_daemon_polls_on_schedule_and_stops_cleanly_on_sigterm() {
    let site = Site::new("xml");
    let child = site.daemon("1s");
    let start = std::time::Instant::now();
    while site.sim.state().received("$requestTasks").len() < 2 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "daemon did not poll twice"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(stop_daemon(child) < std::time::Duration::from_secs(10));
    assert!(site.audit_outcomes("poll").len() >= 2);
}

#[test]
fn the_summary_line_says_where_a_slow_cycle_spent_its_time() {
    let site = Site::new("xml");
    site.import_patients();
    site.sim.add_task(sim::repeat_request(STUDY, &bf(1), TARGET, None));
    let (code, err) = site.cycle();
    assert_eq!(code, 0, "{err}");
    // A quick cycle: just its duration.
    let quick = err.lines().find(|l| l.contains("cycle done:")).unwrap();
    assert!(quick.ends_with(" s)") && !quick.contains("poll"), "{quick}");
    // A slow answer to the poll shows up in the poll phase.
    site.sim.push(
        Some("$requestTasks"),
        sim::FaultKind::Delay(std::time::Duration::from_millis(1100)),
    );
    let (code, err) = site.cycle();
    assert_eq!(code, 0, "{err}");
    let slow = err.lines().find(|l| l.contains("cycle done:")).unwrap();
    let poll: f64 = slow
        .split("poll ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no poll phase in {slow}"));
    assert!(poll >= 1.1, "{slow}");
    for phase in ["ledger ", "tasks ", "end "] {
        assert!(slow.contains(phase), "{slow}");
    }
}

#[test]
fn each_batch_is_recorded_while_the_next_request_is_out_even_when_that_one_fails() {
    // Three batches, marked in flight ahead of their requests (the agent's
    // pipeline); the first answer is recorded while the second request is
    // out; the second request fails for good (the connection drops on
    // every retry), so the third, already marked, is not attempted.
    for size in [1u32, 16] {
        let site = Site::with(
            "xml",
            SimOptions::default(),
            &format!("batch_size = {size}\nmax_in_flight = 1"),
        );
        site.queue_repeat_requests(1..=3 * size);
        let psn = Some("$requestPsnFromBfWorkflow");
        site.sim.push(psn, sim::FaultKind::Delay(std::time::Duration::ZERO));
        for _ in 0..10 {
            site.sim.push(psn, sim::FaultKind::Drop);
        }
        let (code, out) = site.cycle();
        assert_ne!(code, 0, "{out}");
        let outcome_of: std::collections::HashMap<String, String> = site
            .audit()
            .into_iter()
            .filter(|r| r["kind"] == "repeat_request")
            .map(|r| {
                (
                    r["bloomfilter"].as_str().unwrap().to_string(),
                    r["outcome"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        for n in 1..=3 * size {
            let expected = ["stored", "failed", "not_attempted"][((n - 1) / size) as usize];
            assert_eq!(
                outcome_of.get(&bfv(n).fingerprint()).map(String::as_str),
                Some(expected),
                "batch size {size}, filter {n}"
            );
        }
        let store = site.store();
        assert_eq!(store.pseudonym_count().unwrap(), size as usize);
        for e in store.ledger_entries() {
            let first = matches!(&e.task, Some(fttp_agent::tasks::Task::RepeatRequest { bloomfilter, .. })
                if (1..=size).any(|n| *bloomfilter == bfv(n)));
            assert_eq!(e.status.is_terminal(), first, "{} {:?}", e.display_id, e.status);
            // The third batch was marked in flight before the second failed;
            // not sent after all, it is as it was: pending, never attempted.
            let third = matches!(&e.task, Some(fttp_agent::tasks::Task::RepeatRequest { bloomfilter, .. })
                if (2 * size + 1..=3 * size).any(|n| *bloomfilter == bfv(n)));
            if third {
                assert_eq!((e.status, e.attempts), (Status::Pending, 0), "{}", e.display_id);
            } else {
                assert_eq!(e.attempts, 1, "{}", e.display_id);
            }
        }
        drop(store);
        // The dispatcher is back: the rest is done from the ledger.
        site.sim.state().faults.clear();
        let (code, out) = site.cycle();
        assert_eq!(code, 0, "{out}");
        assert_eq!(site.store().pseudonym_count().unwrap(), 3 * size as usize);
    }
}
