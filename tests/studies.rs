//! Several studies in one agent (issue 22), end to end over loopback: each
//! study polled with its own study and target (here each at its own
//! simulated dispatcher, with its own API key), the patients' IDAT once,
//! pseudonyms per study, a study's failure confined to it.

// (A test or benchmark stops at what it cannot set up: the panic is the report.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chrono::{Duration, Utc};
use common::{KEY, OTHER_KEY, STUDY, Site, TARGET, bf, other_sim, with_studies};
use fttp_agent::fhir::idat::IdatElement;
use fttp_agent::sim;
use fttp_agent::types::BloomFilter;

fn bfv(n: u32) -> BloomFilter {
    BloomFilter::from_base64(&bf(n)).unwrap()
}

fn two_studies_end_to_end(format: &str) {
    let site = Site::new(format);
    site.import_patients();
    let napkon = other_sim();
    with_studies(&site, &[("napkon", "dic_napkon", &napkon, OTHER_KEY)]);
    let later = Utc::now() + Duration::days(1);
    // Every kind of task in each study; patient 1 gets a pseudonym in both.
    site.sim
        .add_task(sim::dic_psn_available(&bf(1), TARGET, "mii_P1", None));
    site.sim.add_task(sim::send_idat(
        "mii-1",
        later,
        None,
        Some(&bf(2)),
        &[IdatElement::Given],
    ));
    site.sim
        .add_task(sim::repeat_request(STUDY, &bf(3), TARGET, Some(later)));
    napkon.add_task(sim::dic_psn_available(&bf(1), "dic_napkon", "napkon_P1", None));
    napkon.add_task(sim::send_idat(
        "napkon-1",
        later,
        None,
        Some(&bf(2)),
        &[IdatElement::Family],
    ));
    napkon.add_task(sim::repeat_request("napkon", &bf(3), "dic_napkon", Some(later)));
    let (code, out) = site.cycle();
    assert_eq!(code, 0, "{out}");

    // Each dispatcher was asked for its own study and target, and only it.
    for (sim, study, target) in [(&site.sim, STUDY, TARGET), (&napkon, "napkon", "dic_napkon")] {
        let st = sim.state();
        let polls = st.received("$requestTasks");
        assert_eq!(polls.len(), 1);
        let p = polls[0].parameters.as_ref().unwrap();
        assert_eq!(p.first_string("study"), Some(study));
        assert_eq!(p.first_string("target"), Some(target));
        assert!(polls[0].authorized, "each study's own key");
        let sends = st.received("$providePatientData");
        assert_eq!(sends.len(), 1, "{study}");
        let sent = sends[0].parameters.as_ref().unwrap();
        assert_eq!(sent.first_string("target"), Some(target));
        let batches = st.received("$requestPsnFromBfWorkflow");
        assert_eq!(batches.len(), 1, "{study}: one batch, never mixed");
        let b = batches[0].parameters.as_ref().unwrap();
        assert_eq!(b.first_string("study"), Some(study));
    }
    // The same patient, two pseudonyms, each in its study.
    let store = site.store();
    assert_eq!(
        store.pseudonym(&bfv(1), STUDY).unwrap().unwrap().pseudonym.value,
        "mii_P1"
    );
    assert_eq!(
        store.pseudonym(&bfv(1), "napkon").unwrap().unwrap().pseudonym.value,
        "napkon_P1"
    );
    assert!(store.pseudonym(&bfv(3), STUDY).unwrap().is_some());
    assert!(store.pseudonym(&bfv(3), "napkon").unwrap().is_some());
    assert_eq!(store.patient_count().unwrap(), 3, "the IDAT once");
    assert_eq!(store.ledger("mii/task:mii-1").unwrap().outcome.as_str(), "sent");
    assert_eq!(store.ledger("napkon/task:napkon-1").unwrap().outcome.as_str(), "sent");
    assert_eq!(store.last_polls().len(), 2);
    drop(store);
    // Audit records carry their study.
    let studies: std::collections::BTreeSet<String> = site
        .audit()
        .into_iter()
        .filter(|r| r["kind"] == "send_idat")
        .map(|r| r["study"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(studies.into_iter().collect::<Vec<_>>(), ["mii", "napkon"]);

    // A send_idat by the other study's pseudonym finds no one.
    site.sim.add_task(sim::send_idat(
        "mii-by-napkon-psn",
        later,
        Some("napkon_P1"),
        None,
        &[IdatElement::Given],
    ));
    let (code, out) = site.cycle();
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        site.store()
            .ledger("mii/task:mii-by-napkon-psn")
            .unwrap()
            .outcome
            .as_str(),
        "unknown_patient"
    );
    assert_eq!(
        site.sim.state().received("$providePatientData").len(),
        1,
        "nothing sent"
    );
    // `tasks --study` shows one study's tasks.
    let out = site.run(&["tasks", "--study", "napkon", "--format", "json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        text.lines().count() >= 3 && text.lines().all(|l| l.contains("\"key\":\"napkon/")),
        "{text}"
    );
    let out = site.run(&["tasks", "--study", "gecco"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("configured: mii, napkon"));
}

#[test]
fn two_studies_resolve_every_kind_of_task_in_xml() {
    two_studies_end_to_end("xml");
}

#[test]
fn two_studies_resolve_every_kind_of_task_in_json() {
    two_studies_end_to_end("json");
}

#[test]
fn three_studies_each_get_their_pseudonym_and_run_once_study_polls_one() {
    let site = Site::new("json");
    site.import_patients();
    let (b, c) = (other_sim(), other_sim());
    with_studies(
        &site,
        &[("napkon", "dic_b", &b, OTHER_KEY), ("gecco", "dic_c", &c, OTHER_KEY)],
    );
    site.sim.add_task(sim::dic_psn_available(&bf(2), TARGET, "mii_2", None));
    b.add_task(sim::dic_psn_available(&bf(2), "dic_b", "napkon_2", None));
    c.add_task(sim::dic_psn_available(&bf(2), "dic_c", "gecco_2", None));
    // Only one study polled.
    let out = site.run(&["run", "--once", "--study", "gecco"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(site.sim.state().received("$requestTasks").is_empty());
    assert!(b.state().received("$requestTasks").is_empty());
    assert_eq!(c.state().received("$requestTasks").len(), 1);
    assert_eq!(site.cycle().0, 0);
    let store = site.store();
    for (study, psn) in [(STUDY, "mii_2"), ("napkon", "napkon_2"), ("gecco", "gecco_2")] {
        assert_eq!(store.pseudonym(&bfv(2), study).unwrap().unwrap().pseudonym.value, psn);
        let p = store.patient_by_pseudonym(study, psn).unwrap().unwrap();
        assert_eq!(p.local_id.0, "p2");
    }
}

#[test]
fn one_studys_key_refused_leaves_the_others_working() {
    let site = Site::new("xml");
    site.import_patients();
    let napkon = other_sim();
    // Napkon's dispatcher does not know this key.
    with_studies(&site, &[("napkon", "dic_napkon", &napkon, "wrong-key")]);
    let text = std::fs::read_to_string(&site.config).unwrap();
    std::fs::write(
        &site.config,
        text.replace("[log]\n", "[log]\nmetrics = \"metrics.prom\"\n"),
    )
    .unwrap();
    site.sim
        .add_task(sim::dic_psn_available(&bf(1), TARGET, "mii_OK", None));
    napkon.add_task(sim::dic_psn_available(&bf(1), "dic_napkon", "napkon_NO", None));
    let (code, out) = site.cycle();
    assert_eq!(code, 3, "the worst of the studies' results: {out}");
    assert!(out.contains("study napkon"), "{out}");
    let store = site.store();
    assert_eq!(
        store.pseudonym(&bfv(1), STUDY).unwrap().unwrap().pseudonym.value,
        "mii_OK"
    );
    assert!(store.pseudonym(&bfv(1), "napkon").unwrap().is_none());
    let failed = &store.last_polls()["napkon"];
    assert!(!failed.ok && failed.failures == 1);
    assert!(store.last_polls()[STUDY].ok);
    drop(store);
    let audited = site
        .audit()
        .into_iter()
        .find(|r| r["kind"] == "poll" && r["study"] == "napkon")
        .unwrap();
    assert_eq!(audited["outcome"], "failed");
    // The metrics carry the study.
    let metrics = std::fs::read_to_string(site.dir.path().join("metrics.prom")).unwrap();
    assert!(
        metrics.contains("fttp_agent_pending_tasks{study=\"napkon\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fttp_agent_last_successful_poll_timestamp_seconds{study=\"mii\"}"),
        "{metrics}"
    );
    assert!(!metrics.contains("fttp_agent_last_successful_poll_timestamp_seconds{study=\"napkon\"}"));
    assert!(
        metrics.contains("fttp_agent_tasks{study=\"mii\",kind=\"dic_psn_available\""),
        "{metrics}"
    );
    // `status` shows each study's poll.
    let out = site.run(&["status", "--format", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let studies = json["studies"].as_array().unwrap();
    assert_eq!(studies.len(), 2);
    assert_eq!(studies[0]["study"], "mii");
    assert_eq!(studies[0]["last_poll_ok"], true);
    assert_eq!(studies[1]["study"], "napkon");
    assert_eq!(studies[1]["last_poll_ok"], false);
    assert_eq!(json["last_poll_ok"], false, "the worst study's poll");
    let out = site.run(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("napkon") && text.contains("failed, 1 in a row"), "{text}");
    // `check` reports each study.
    let out = site.run(&["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains("dispatcher, study mii: reachable"), "{text}");
    assert!(text.contains("dispatcher, study napkon: FAILED"), "{text}");
    let _ = KEY;
}

#[test]
fn a_crash_mid_cycle_with_two_studies_loses_nothing_and_answers_nothing_twice() {
    for point in ["send:after", "batch:after", "store:committed:3"] {
        let site = Site::new("json");
        site.import_patients();
        let napkon = other_sim();
        with_studies(&site, &[("napkon", "dic_napkon", &napkon, OTHER_KEY)]);
        let later = Utc::now() + Duration::days(1);
        for (sim, study, target) in [(&site.sim, STUDY, TARGET), (&napkon, "napkon", "dic_napkon")] {
            sim.add_task(sim::send_idat(
                &format!("{study}-s"),
                later,
                None,
                Some(&bf(2)),
                &[IdatElement::Given],
            ));
            sim.add_task(sim::repeat_request(study, &bf(3), target, Some(later)));
            sim.add_task(sim::dic_psn_available(&bf(1), target, &format!("{study}_P1"), None));
        }
        let status = common::agent()
            .arg("--config")
            .arg(&site.config)
            .args(["run", "--once"])
            .env("FTTP_AGENT_CRASH_AT", point)
            .output()
            .unwrap()
            .status;
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "{point} was never reached");
        let (code, out) = site.cycle();
        assert_eq!(code, 0, "{point}: {out}");
        let store = site.store();
        for study in [STUDY, "napkon"] {
            assert!(store.pseudonym(&bfv(1), study).unwrap().is_some(), "{point} {study}");
            assert!(store.pseudonym(&bfv(3), study).unwrap().is_some(), "{point} {study}");
            let e = store.ledger(&format!("{study}/task:{study}-s")).unwrap();
            assert!(e.status.is_terminal(), "{point} {study}: {e:?}");
        }
        drop(store);
        // Each IDAT delivered to its own dispatcher, at most twice (the
        // resend of a task in flight), never to the other.
        for sim in [&site.sim, &napkon] {
            let sends = sim.state().received("$providePatientData").len();
            assert!((1..=2).contains(&sends), "{point}: {sends}");
        }
    }
}

#[test]
fn enroll_enrols_each_patient_in_each_study_with_its_own_pseudonym() {
    let site = Site::new("xml");
    site.import_patients();
    let napkon = other_sim();
    with_studies(&site, &[("napkon", "dic_napkon", &napkon, OTHER_KEY)]);
    let out = site.run(&["enroll"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("enroll (study mii): 3 sent: 3 enrolled"), "{text}");
    assert!(text.contains("enroll (study napkon): 3 sent: 3 enrolled"), "{text}");
    for (sim, study) in [(&site.sim, STUDY), (&napkon, "napkon")] {
        let st = sim.state();
        let sent = st.received("$requestPsnFromBfWorkflow");
        assert!(!sent.is_empty());
        for r in sent {
            assert_eq!(r.parameters.as_ref().unwrap().first_string("study"), Some(study));
        }
    }
    let store = site.store();
    let mii = store.pseudonym(&bfv(1), STUDY).unwrap().unwrap().pseudonym.value;
    let other = store.pseudonym(&bfv(1), "napkon").unwrap().unwrap().pseudonym.value;
    assert!(mii.starts_with("mii_") && other.starts_with("napkon_"), "{mii} {other}");
    drop(store);
    // A second run has nothing left to enrol in either study; --study
    // narrows it to one, and an unknown one is a usage error.
    let out = site.run(&["enroll", "--study", "napkon"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("enroll: 0 sent"), "{text}");
    let out = site.run(&["enroll", "--study", "gecco"]);
    assert_eq!(out.status.code(), Some(2));
}
