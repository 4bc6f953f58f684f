//! Several requests at once (issue 25), against the simulator with a
//! latency on every answer: never more than `max_in_flight` at once (the
//! simulator counts), started soonest expiry first, fewer when the
//! dispatcher says it is busy and more again after successes.

// (A test or benchmark stops at what it cannot set up: the panic is the report.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chrono::{Duration, Utc};
use common::{Site, bf};
use fttp_agent::fhir::idat::IdatElement;
use fttp_agent::sim::{self, FaultKind, SimOptions};

fn site(max_in_flight: usize, latency_ms: u64, extra: &str) -> Site {
    let options = SimOptions {
        latency: std::time::Duration::from_millis(latency_ms),
        ..SimOptions::default()
    };
    let site = Site::with("json", options, &format!("max_in_flight = {max_in_flight}\n{extra}"));
    site.import_patients();
    site
}

/// `n` send_idat tasks `s-00`.. expiring in that order, queued out of order.
fn queue_sends(site: &Site, n: usize) {
    let base = Utc::now() + Duration::hours(1);
    for k in 0..n {
        let i = (k * 7) % n; // (n not a multiple of 7)
        site.sim.add_task(sim::send_idat(
            &format!("s-{i:02}"),
            base + Duration::minutes(i as i64),
            None,
            Some(&bf(1 + (i as u32 % 3))),
            &[IdatElement::Given],
        ));
    }
}

fn sent_order(site: &Site) -> Vec<String> {
    site.sim
        .state()
        .received("$providePatientData")
        .iter()
        .filter_map(|r| Some(r.task_id()?.to_string()))
        .collect()
}

#[test]
fn never_more_than_max_in_flight_at_once_and_soonest_expiry_starts_first() {
    for max in [1usize, 4] {
        let site = site(max, 40, "");
        queue_sends(&site, 24);
        let (code, out) = site.cycle();
        assert_eq!(code, 0, "{out}");
        let st = site.sim.state();
        // (The poll is alone; the sends overlap up to the limit.)
        assert_eq!(st.max_in_flight, max, "max_in_flight {max}");
        // Kept-alive connections: one per request in flight, not per request.
        assert!(st.connections <= max + 1, "{} connections", st.connections);
        drop(st);
        // Started in expiry order: one at a time exactly; with several, a
        // request arrives at most as many places early or late as were in
        // flight with it.
        let order = sent_order(&site);
        assert_eq!(order.len(), 24);
        for (place, id) in order.iter().enumerate() {
            let rank: usize = id[2..].parse().unwrap();
            assert!(
                rank.abs_diff(place) < max.max(1),
                "max {max}: {id} arrived as number {place}: {order:?}"
            );
        }
        let store = site.store();
        assert!(
            store
                .ledger_entries()
                .all(|e| e.status == fttp_agent::store::Status::Resolved)
        );
    }
}

#[test]
fn batches_and_enrolment_stay_within_max_in_flight_too() {
    let site = site(3, 30, "batch_size = 1");
    site.queue_repeat_requests(1..=12);
    let (code, out) = site.cycle();
    assert_eq!(code, 0, "{out}");
    assert_eq!(site.sim.state().max_in_flight, 3);
    assert_eq!(site.store().pseudonym_count().unwrap(), 12);

    let site = self::site(2, 30, "batch_size = 1");
    let out = site.run(&["enroll"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let st = site.sim.state();
    assert_eq!(st.received("$requestPsnFromBfWorkflow").len(), 3);
    assert_eq!(st.max_in_flight, 2);
}

#[test]
fn busy_answers_halve_the_requests_in_flight_and_successes_grow_them_back() {
    let site = site(4, 20, "max_attempts = 3\nretry_delay = \"10ms\"\n");
    let metrics = site.dir.path().join("metrics.prom");
    let text = std::fs::read_to_string(&site.config)
        .unwrap()
        .replace("[log]\n", "[log]\nmetrics = \"metrics.prom\"\n");
    std::fs::write(&site.config, text).unwrap();
    queue_sends(&site, 40);
    // Two "busy" answers, the first asking for a second's rest.
    site.sim.push(
        Some("$providePatientData"),
        FaultKind::Status {
            status: 429,
            diagnostics: "slow down".into(),
            retry_after: Some(1),
        },
    );
    site.sim.push(
        Some("$providePatientData"),
        FaultKind::Status {
            status: 503,
            diagnostics: "busy".into(),
            retry_after: None,
        },
    );
    let started = std::time::Instant::now();
    let (code, out) = site.cycle();
    assert_eq!(code, 0, "{out}");
    // The Retry-After was honoured by the request that got it.
    assert!(started.elapsed() >= std::time::Duration::from_secs(1));
    let log = std::fs::read_to_string(site.dir.path().join("agent.log")).unwrap();
    assert!(
        log.contains("dispatcher busy: down to 2 request(s) in flight (from 4)"),
        "{log}"
    );
    // (From 2, or from 3 if a success came between the two.)
    assert!(
        log.contains("dispatcher busy: down to 1 request(s) in flight (from "),
        "{log}"
    );
    for n in 2..=4 {
        assert!(
            log.contains(&format!("dispatcher answering again: up to {n} request(s) in flight")),
            "{log}"
        );
    }
    assert!(
        log.contains("the dispatcher was busy 2 time(s) this cycle (429, 503 or timeouts): down to 1"),
        "{log}"
    );
    let prom = std::fs::read_to_string(metrics).unwrap();
    assert!(prom.contains("fttp_agent_requests_in_flight_lowest 1"), "{prom}");
    assert!(prom.contains("fttp_agent_busy_answers 2"), "{prom}");
    // Every task was delivered once, all the same.
    assert_eq!(
        site.sim
            .state()
            .received("$providePatientData")
            .iter()
            .filter(|r| r.status == 200)
            .count(),
        40
    );
}
