//! SIGKILL at every named point of a cycle (and at the 2nd time each is
//! reached), then restart: the store opens and is consistent, every task is
//! resolved by the next run before it expires, and no pseudonym the agent had
//! recorded is lost, and every outcome the store holds is in the audit
//! log. The kill comes from the test-only crash points of debug
//! builds (src/crashpoint.rs), so each point is hit deterministically.

// (A test or benchmark stops at what it cannot set up: the panic is the report.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chrono::{Duration, Utc};
use common::{STUDY, Site, TARGET, bf};
use fttp_agent::crashpoint::POINTS;
use fttp_agent::fhir::idat::IdatElement;
use fttp_agent::sim::{self, SimOptions};
use fttp_agent::store::Status;
use fttp_agent::types::BloomFilter;
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;

/// The scenario with `max_in_flight` requests at once.
fn scenario_with(max_in_flight: usize) -> Site {
    // Small batches and early compaction, so one cycle passes every point.
    let site = Site::with(
        "json",
        SimOptions::default(),
        &format!("batch_size = 1\ncompact_after = 3\nmax_in_flight = {max_in_flight}"),
    );
    site.import_patients();
    let later = Utc::now() + Duration::days(1);
    site.sim
        .add_task(sim::dic_psn_available(&bf(1), TARGET, "mii_CRASH1", None));
    site.sim.add_task(sim::send_idat(
        "send-a",
        later,
        None,
        Some(&bf(2)),
        &[IdatElement::Given],
    ));
    site.sim.add_task(sim::send_idat(
        "send-b",
        later + Duration::hours(1),
        None,
        Some(&bf(3)),
        &[IdatElement::Family],
    ));
    site.sim
        .add_task(sim::repeat_request(STUDY, &bf(2), TARGET, Some(later)));
    site.sim
        .add_task(sim::repeat_request(STUDY, &bf(3), TARGET, Some(later)));
    site
}

/// One `run --once` that kills itself at a crash point (`point[:n]`).
fn run_crashing_at(site: &Site, point: &str) -> std::process::ExitStatus {
    common::agent()
        .arg("--config")
        .arg(&site.config)
        .args(["run", "--once"])
        .env("FTTP_AGENT_CRASH_AT", point)
        .output()
        .unwrap()
        .status
}

/// Every outcome the store holds is in the audit log: an outcome's audit
/// record is written out to the file before the outcome goes to the store.
fn assert_audited(site: &Site, context: &str) {
    let audited: std::collections::HashSet<(String, String)> = site
        .audit()
        .into_iter()
        .filter_map(|r| Some((r["task"].as_str()?.to_string(), r["outcome"].as_str()?.to_string())))
        .collect();
    for e in site.store().ledger_entries() {
        if e.outcome.as_str() != "received" && e.status != Status::InFlight {
            assert!(
                audited.contains(&(e.display_id.clone(), e.outcome.to_string())),
                "{context}: the store holds {} {} ({:?}), the audit log does not",
                e.display_id,
                e.outcome,
                e.status
            );
        }
    }
}

fn pseudonyms(site: &Site) -> BTreeMap<String, String> {
    site.store()
        .all_pseudonyms()
        .unwrap()
        .into_iter()
        .map(|p| (p.bloomfilter.to_base64(), p.pseudonym.value))
        .collect()
}

#[test]
fn a_crash_at_any_point_loses_nothing() {
    let mut crashes = 0;
    // One request at a time, and four at once (the default).
    for (point, max) in POINTS.iter().flat_map(|p| [(p, 1), (p, 4)]) {
        for n in [1, 2] {
            let site = scenario_with(max);
            let status = run_crashing_at(&site, &format!("{point}:{n}"));
            let killed = status.signal() == Some(9);
            if n == 1 {
                assert!(killed, "{point} was never reached: {status:?}");
            }
            crashes += usize::from(killed);

            // (a) the store opens; (c) what it recorded stays recorded.
            let recorded = pseudonyms(&site);
            // (d) every outcome the store holds is in the audit log.
            assert_audited(&site, &format!("{point}:{n}"));

            // (b) the next run(s) finish the job.
            let mut last = (0, String::new());
            for _ in 0..2 {
                last = site.cycle();
                if last.0 == 0 {
                    break;
                }
            }
            assert_eq!(last.0, 0, "{point}:{n}: recovery run: {}", last.1);

            let store = site.store();
            let open: Vec<_> = store
                .ledger_entries()
                .filter(|e| e.status != Status::Resolved)
                .map(|e| (e.display_id.clone(), e.status, e.outcome))
                .collect();
            assert!(open.is_empty(), "{point}:{n}: unresolved {open:?}");
            assert_eq!(store.ledger_entries().count(), 5, "{point}:{n}");
            drop(store);
            let after = pseudonyms(&site);
            for (bf, psn) in &recorded {
                assert_eq!(after.get(bf), Some(psn), "{point}:{n}: a recorded pseudonym was lost");
            }
            let b1 = BloomFilter::from_base64(&bf(1)).unwrap().to_base64();
            assert_eq!(after.get(&b1).map(String::as_str), Some("mii_CRASH1"));
            assert_eq!(after.len(), 3, "{point}:{n}");

            // At-least-once: each send_idat reached the dispatcher.
            let st = site.sim.state();
            for id in ["send-a", "send-b"] {
                let got = st
                    .received("$providePatientData")
                    .iter()
                    .any(|r| r.status == 200 && r.task_id() == Some(id));
                assert!(got, "{point}:{n}: {id} never delivered");
            }
            drop(st);
            // The audit log is whole: every line is one JSON record.
            let audit = std::fs::read_to_string(site.dir.path().join("audit.ndjson")).unwrap();
            for line in audit.lines() {
                serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("{point}:{n}: {e}: {line}"));
            }
        }
    }
    assert!(crashes >= POINTS.len());
}

#[test]
fn a_resend_of_a_delivered_task_counts_as_done() {
    // (One request at a time: send-a is the one out when it is killed.)
    let site = scenario_with(1);
    assert_eq!(run_crashing_at(&site, "send:after").signal(), Some(9));
    assert_eq!(site.store().ledger("mii/task:send-a").unwrap().status, Status::InFlight);
    let (code, out) = site.cycle();
    assert_eq!(code, 0, "{out}");
    let e = site.store().ledger("mii/task:send-a").unwrap().clone();
    assert_eq!((e.status, e.outcome.as_str()), (Status::Resolved, "delivered"));
    assert!(e.detail.unwrap().contains("interrupted earlier attempt"));
    // The dispatcher got it once for real, and a resend it refused as unknown.
    let st = site.sim.state();
    let statuses: Vec<u16> = st
        .received("$providePatientData")
        .iter()
        .filter(|r| format!("{:?}", r.parameters).contains("send-a"))
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, vec![200, 404]);
}

#[test]
fn a_crash_leaves_at_most_five_times_max_in_flight_batches_in_flight() {
    // The agent marks requests in flight up to four times as many beyond
    // those being sent (src/agent/flights.rs), and a request leaves only
    // once its marks are on disk. Every answer is slow, so the agent marks
    // as far ahead as it may; it is killed as the first answer arrives: at
    // most 5 x max_in_flight batches of one filter are in flight (exactly
    // three with one at a time, as before concurrency), none recorded, the
    // rest as they were, and the next run sends them all.
    for max in [1usize, 4] {
        let site = Site::with(
            "json",
            SimOptions::default(),
            &format!("batch_size = 1\nmax_in_flight = {max}"),
        );
        site.queue_repeat_requests(1..=24);
        for _ in 0..24 {
            site.sim.push(
                Some("$requestPsnFromBfWorkflow"),
                sim::FaultKind::Delay(std::time::Duration::from_millis(300)),
            );
        }
        assert_eq!(run_crashing_at(&site, "batch:after").signal(), Some(9));
        let sent = site.sim.state().received("$requestPsnFromBfWorkflow").len();
        assert!((1..=max).contains(&sent), "max {max}: {sent} sent");
        let store = site.store();
        let count = |status| store.ledger_entries().filter(|e| e.status == status).count();
        let in_flight = count(Status::InFlight);
        assert_eq!(in_flight + count(Status::Pending), 24, "max {max}");
        assert!(
            in_flight >= sent && in_flight <= 5 * max,
            "max {max}: {in_flight} in flight"
        );
        if max == 1 {
            assert_eq!(in_flight, 3);
        }
        drop(store);
        let (code, out) = site.cycle();
        assert_eq!(code, 0, "{out}");
        assert_eq!(pseudonyms(&site).len(), 24);
    }
}

#[test]
fn outcomes_recorded_while_batches_are_out_are_audited_before_they_are_stored() {
    // Batches of one filter, killed before the 2nd to 7th request: the
    // answers recorded by then are in the store only if their audit
    // records are in the audit log, and the next run finishes the rest.
    for n in 2..=7 {
        let site = Site::with("json", SimOptions::default(), "batch_size = 1");
        site.queue_repeat_requests(1..=8);
        assert_eq!(run_crashing_at(&site, &format!("batch:before:{n}")).signal(), Some(9));
        assert_audited(&site, &format!("batch:before:{n}"));
        let (code, out) = site.cycle();
        assert_eq!(code, 0, "{out}");
        assert_audited(&site, &format!("batch:before:{n}, then a run"));
        assert_eq!(pseudonyms(&site).len(), 8);
    }
}
