//! The dispatcher's answers and what the agent does with each (issue 19;
//! README "What the agent does with each answer"): final answers are not
//! asked again, transient ones are, bounded; each rule end to end against
//! the simulator in XML and JSON, counting the requests it received.

// (A test or benchmark stops at what it cannot set up: the panic is the report.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chrono::{Duration, Utc};
use common::{STUDY, Site, TARGET, bf};
use fttp_agent::fhir::idat::IdatElement;
use fttp_agent::sim::{self, FaultKind, SimOptions};
use fttp_agent::store::Status;

const FORMATS: [&str; 2] = ["xml", "json"];

fn psn_requests(site: &Site) -> usize {
    site.sim.state().received("$requestPsnFromBfWorkflow").len()
}

fn sends(site: &Site) -> usize {
    site.sim.state().received("$providePatientData").len()
}

fn status_of(site: &Site, n: u32) -> (Status, String) {
    let store = site.store();
    let e = store
        .ledger_entries()
        .find(|e| matches!(&e.task, Some(fttp_agent::tasks::Task::RepeatRequest { bloomfilter, .. }) if bloomfilter.to_base64() == bf(n)))
        .unwrap()
        .clone();
    (e.status, e.outcome.as_str().to_string())
}

#[test]
fn error_codes_are_final_transient_or_unknown_by_issue_type() {
    for format in FORMATS {
        let site = Site::with(format, SimOptions::default(), "max_task_attempts = 3");
        site.queue_repeat_requests(1..=4);
        {
            let mut st = site.sim.state();
            st.bf_errors.insert(bf(1), "not-found".into());
            st.bf_errors.insert(bf(2), "forbidden".into());
            st.bf_errors.insert(bf(3), "throttled".into());
            st.bf_errors.insert(bf(4), "urn:example:codes#E42".into());
        }
        let (code, out) = site.cycle();
        assert_eq!(code, 1, "{format}: {out}");
        assert_eq!(status_of(&site, 1), (Status::Closed, "dispatcher_error".into()));
        assert_eq!(status_of(&site, 2), (Status::Closed, "dispatcher_error".into()));
        assert!(out.contains("refused on security grounds (forbidden)"), "{out}");
        assert_eq!(status_of(&site, 3), (Status::Failed, "transient_error".into()));
        assert_eq!(status_of(&site, 4), (Status::Failed, "unknown_error".into()));
        assert_eq!(psn_requests(&site), 1);

        // The transient one goes through next time; the unknown one is
        // tried until max_task_attempts; the final ones never again.
        site.sim.state().bf_errors.remove(&bf(3));
        // (Past the backoff: retry_delay is 10 ms in tests, doubling.)
        let later = || std::thread::sleep(std::time::Duration::from_millis(150));
        later();
        let (code, out) = site.cycle();
        assert_eq!(code, 1, "{out}");
        assert_eq!(status_of(&site, 3), (Status::Resolved, "stored".into()));
        let sent: Vec<Vec<String>> = site
            .sim
            .state()
            .received("$requestPsnFromBfWorkflow")
            .iter()
            .map(|r| {
                let p = r.parameters.as_ref().unwrap();
                p.get("bloomfilter")
                    .filter_map(|x| x.value.as_ref().and_then(|v| v.as_str()).map(str::to_string))
                    .collect()
            })
            .collect();
        assert_eq!(
            sent[1],
            vec![bf(3), bf(4)],
            "{format}: only the retryable ones are resent"
        );
        later();
        site.cycle();
        later();
        let (code, out) = site.cycle();
        assert_eq!(code, 0, "{out}");
        assert_eq!(status_of(&site, 4), (Status::Closed, "gave_up".into()));
        assert_eq!(
            psn_requests(&site),
            3,
            "{format}: the unknown code was tried 3 times, then given up"
        );
        assert_eq!(site.cycle().0, 0);
        assert_eq!(psn_requests(&site), 3);
    }
}

#[test]
fn a_clearing_ends_the_repeat_request_and_the_pseudonym_follows() {
    for format in FORMATS {
        let site = Site::new(format);
        site.import_patients();
        site.queue_repeat_requests(1..=1);
        site.sim.state().clearing.insert(bf(1));
        let (code, out) = site.cycle();
        assert_eq!(code, 0, "{out}");
        assert_eq!(status_of(&site, 1), (Status::Resolved, "clearing".into()));
        // The next poll brings the pseudonym as a task; nothing is resent.
        let (code, out) = site.cycle();
        assert_eq!(code, 0, "{out}");
        assert_eq!(psn_requests(&site), 1, "{format}");
        assert_eq!(site.store().pseudonym_count().unwrap(), 1);
    }
}

#[test]
fn an_error_without_a_bloomfilter_answers_the_whole_request() {
    for (format, code, open) in [("xml", "processing", false), ("json", "timeout", true)] {
        let site = Site::with(format, SimOptions::default(), "batch_size = 10");
        site.queue_repeat_requests(1..=3);
        site.sim.state().bare_error = Some(code.into());
        let (exit, out) = site.cycle();
        assert_eq!(exit, i32::from(open), "{code}: {out}");
        let outcomes = site.audit_outcomes("repeat_request");
        let expected = if open { "transient_error" } else { "dispatcher_error" };
        assert_eq!(outcomes, [expected; 3], "{code}");
        // (Past the backoff: retry_delay is 10 ms in tests.)
        std::thread::sleep(std::time::Duration::from_millis(150));
        site.cycle();
        assert_eq!(psn_requests(&site), if open { 2 } else { 1 }, "{code}");
        assert_eq!(site.store().pseudonym_count().unwrap(), if open { 3 } else { 0 });
    }
}

#[test]
fn a_repeat_request_without_expiry_is_given_up_after_its_attempts() {
    for format in FORMATS {
        let site = Site::with(format, SimOptions::default(), "max_task_attempts = 2");
        site.sim.add_task(sim::repeat_request(STUDY, &bf(1), TARGET, None));
        site.sim.state().bf_errors.insert(bf(1), "exception".into());
        let later = || std::thread::sleep(std::time::Duration::from_millis(150));
        assert_eq!(site.cycle().0, 1);
        later();
        assert_eq!(site.cycle().0, 1);
        later();
        let (code, out) = site.cycle();
        assert_eq!(code, 0, "{out}");
        assert!(
            out.contains("gave up: 2 attempts without a result and no expiry"),
            "{out}"
        );
        assert_eq!(status_of(&site, 1), (Status::Closed, "gave_up".into()));
        assert_eq!(psn_requests(&site), 2);
        assert_eq!(site.audit_outcomes("repeat_request").last().unwrap(), "gave_up");
        let tasks = site.run(&["tasks", "--status", "closed"]);
        assert!(String::from_utf8_lossy(&tasks.stdout).contains("gave_up"));
        let status = site.run(&["status"]);
        assert_eq!(status.status.code(), Some(1), "a warning");
        assert!(String::from_utf8_lossy(&status.stdout).contains("1 task(s) given up in the last 7 days"));
    }
}

fn queue_send(site: &Site, id: &str, elements: &[IdatElement]) {
    site.sim.add_task(sim::send_idat(
        id,
        Utc::now() + Duration::days(1),
        None,
        Some(&bf(1)),
        elements,
    ));
}

#[test]
fn a_send_that_timed_out_and_then_meets_a_404_was_delivered() {
    for format in FORMATS {
        let site = Site::with(
            format,
            SimOptions::default(),
            "timeout = \"1s\"\nmax_attempts = 2\nretry_delay = \"2s\"",
        );
        site.import_patients();
        queue_send(&site, "late", &[IdatElement::Given]);
        // The first attempt arrives but its answer comes after the timeout.
        site.sim.push(
            Some("$providePatientData"),
            FaultKind::Delay(std::time::Duration::from_millis(1500)),
        );
        let (code, out) = site.cycle();
        assert_eq!(code, 0, "{format}: {out}");
        let e = site.store().ledger("mii/task:late").unwrap().clone();
        assert_eq!((e.status, e.outcome.as_str()), (Status::Resolved, "delivered"));
        let statuses: Vec<u16> = site
            .sim
            .state()
            .received("$providePatientData")
            .iter()
            .map(|r| r.status)
            .collect();
        assert_eq!(statuses, [200, 404], "{format}");
    }
}

#[test]
fn a_send_refused_as_invalid_is_not_resent_until_the_data_change() {
    for format in FORMATS {
        let site = Site::new(format);
        site.import_patients();
        queue_send(&site, "bad", &[IdatElement::Given]);
        site.sim.push(
            Some("$providePatientData"),
            FaultKind::Status {
                status: 422,
                diagnostics: "given name not acceptable".into(),
                retry_after: None,
            },
        );
        let (code, out) = site.cycle();
        assert_eq!(code, 0, "{out}");
        let e = site.store().ledger("mii/task:bad").unwrap().clone();
        assert_eq!((e.status, e.outcome.as_str()), (Status::Closed, "dispatcher_error"));
        assert_eq!(site.cycle().0, 0);
        assert_eq!(sends(&site), 1, "{format}: not resent unchanged");
        // The site corrects the patient's data: the task is reopened and sent.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let file = site.dir.path().join("fixed.csv");
        std::fs::write(&file, common::patients_csv().replace("Erika", "Erica")).unwrap();
        let out = site.run(&["import", file.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0));
        let (code, out) = site.cycle();
        assert_eq!(code, 0, "{out}");
        assert_eq!(sends(&site), 2, "{format}");
        let e = site.store().ledger("mii/task:bad").unwrap().clone();
        assert_eq!((e.status, e.outcome.as_str()), (Status::Resolved, "sent"));
        assert!(site.audit_outcomes("send_idat").contains(&"reopened".to_string()));
    }
}

#[test]
fn a_new_optional_part_in_a_known_task_is_ignored() {
    for format in FORMATS {
        let site = Site::new(format);
        site.import_patients();
        let mut task = sim::send_idat(
            "newer",
            Utc::now() + Duration::days(1),
            None,
            Some(&bf(1)),
            &[IdatElement::Family],
        );
        task.part.push(fttp_agent::fhir::Parameter::string("priority", "high"));
        site.sim.add_task(task);
        let (code, out) = site.cycle();
        assert_eq!(code, 0, "{format}: {out}");
        assert_eq!(site.store().ledger("mii/task:newer").unwrap().outcome.as_str(), "sent");
        assert_eq!(sends(&site), 1);
    }
}

#[test]
fn a_send_for_which_nothing_requested_is_on_file_sends_nothing() {
    for format in FORMATS {
        let site = Site::new(format);
        site.import_patients();
        // The sample patients have no name prefix or suffix.
        queue_send(&site, "empty", &[IdatElement::Prefix, IdatElement::Suffix]);
        let (code, out) = site.cycle();
        assert_eq!(code, 1, "{out}");
        assert!(out.contains("none of the 2 requested element(s) is on file"), "{out}");
        let e = site.store().ledger("mii/task:empty").unwrap().clone();
        assert_eq!((e.status, e.outcome.as_str()), (Status::Pending, "unknown_patient"));
        assert_eq!(sends(&site), 0, "{format}: no empty Patient sent");
    }
}

#[test]
fn an_error_parameter_answering_the_poll_is_a_refused_poll() {
    for (format, mime) in [("xml", "application/fhir+xml"), ("json", "application/fhir+json")] {
        let site = Site::new(format);
        let answer = fttp_agent::fhir::Parameters::new(vec![fttp_agent::fhir::Parameter::with_parts(
            "error",
            vec![fttp_agent::fhir::Parameter::coding(
                "error-code",
                fttp_agent::fhir::Coding {
                    system: Some("http://hl7.org/fhir/issue-type".into()),
                    code: Some("forbidden".into()),
                    display: None,
                },
            )],
        )]);
        let fmt = if format == "xml" {
            fttp_agent::fhir::Format::Xml
        } else {
            fttp_agent::fhir::Format::Json
        };
        site.sim.push(
            Some("$requestTasks"),
            FaultKind::Raw {
                status: 200,
                content_type: mime.into(),
                body: answer.write(fmt).into_bytes(),
            },
        );
        let (code, out) = site.cycle();
        assert_eq!(code, 3, "{format}: {out}");
        assert!(out.contains("refused: an error parameter (forbidden)"), "{out}");
        assert_eq!(site.audit_outcomes("poll"), ["failed"]);
        assert_eq!(site.store().ledger_entries().count(), 0, "no task of kind error");
    }
}

#[test]
fn instants_keep_the_precision_they_came_with() {
    for format in FORMATS {
        let site = Site::new(format);
        site.import_patients();
        let expires = chrono::DateTime::parse_from_rfc3339("2099-01-02T03:04:05.678Z")
            .unwrap()
            .with_timezone(&Utc);
        site.sim
            .add_task(sim::repeat_request(STUDY, &bf(1), TARGET, Some(expires)));
        site.sim.state().bf_errors.insert(bf(1), "throttled".into());
        site.cycle();
        let want = "2099-01-02T03:04:05.678Z";
        let json = site.run(&["tasks", "--format", "json"]);
        assert!(String::from_utf8_lossy(&json.stdout).contains(want), "{format}");
        let table = site.run(&["tasks"]);
        assert!(String::from_utf8_lossy(&table.stdout).contains(want));
        let fhir = String::from_utf8_lossy(&site.run(&["tasks", "--format", "fhir"]).stdout).to_string();
        assert_eq!(
            fhir.matches(want).count(),
            2,
            "restriction.period.end and the input: {fhir}"
        );
        let audit = site.audit();
        assert!(audit.iter().any(|r| r["expires"] == want));
    }
}

#[test]
fn import_checks_coded_values_and_keeps_lists() {
    let site = Site::new("json");
    let csv = format!(
        "local_id,bloomfilter,given,family,address_line,nationality,language,maritalstatus\n\
         q1,{},Anna|Maria,Muster,Hauptstr. 1|Hinterhaus,DE,de-DE,UNK\n\
         q2,{},Bert,Muster,,Germany,de,M\n\
         q3,{},Cora,Muster,,DE,deutsch,M\n\
         q4,{},Dora,Muster,,DE,de,C\n",
        bf(1),
        bf(2),
        bf(3),
        bf(4)
    );
    let file = site.dir.path().join("coded.csv");
    std::fs::write(&file, csv).unwrap();
    let out = site.run(&["import", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("coded.csv:3: skipped: nationality must be an ISO 3166-1 alpha-2 country code"),
        "{stderr}"
    );
    assert!(
        stderr.contains("coded.csv:4: skipped: language must be a BCP-47 language tag"),
        "{stderr}"
    );
    assert!(
        stderr.contains("coded.csv:5: skipped: maritalstatus must be a code of FHIR's marital-status value set"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("Germany") && !stderr.contains("deutsch"),
        "values are not quoted"
    );
    assert_eq!(site.store().patient_count().unwrap(), 1);
    // The lists go out as repeated elements.
    site.sim.add_task(sim::send_idat(
        "lists",
        Utc::now() + Duration::days(1),
        None,
        Some(&bf(1)),
        &[IdatElement::Given, IdatElement::AddressLine, IdatElement::Maritalstatus],
    ));
    let (code, out) = site.cycle();
    assert_eq!(code, 0, "{out}");
    let st = site.sim.state();
    let patient = st.received("$providePatientData")[0].patient().unwrap().clone();
    drop(st);
    let json = fttp_agent::fhir::json::to_string(&patient);
    assert!(json.contains(r#""given":["Anna","Maria"]"#), "{json}");
    assert!(json.contains(r#""line":["Hauptstr. 1","Hinterhaus"]"#), "{json}");
    assert!(json.contains("v3-NullFlavor"), "{json}");
}

#[test]
fn the_dry_run_follows_the_same_rules_as_a_cycle() {
    // retry_delay 1h: a transient error waits out its backoff.
    let site = Site::with("xml", SimOptions::default(), "retry_delay = \"1h\"");
    site.import_patients();
    site.queue_repeat_requests(1..=1);
    site.sim.state().bf_errors.insert(bf(1), "throttled".into());
    queue_send(&site, "nothing-on-file", &[IdatElement::Prefix]);
    assert_eq!(site.cycle().0, 1);
    let out = site.run(&["run", "--once", "--dry-run"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |task: &str| text.lines().find(|l| l.contains(task)).unwrap_or_default().to_string();
    assert!(line("sha256:").contains("wait (backoff)"), "{text}");
    assert!(
        line("nothing-on-file").contains("wait") && line("nothing-on-file").contains("none of the requested"),
        "{text}"
    );
    // And the cycle does what it said: nothing sent.
    let requests = (psn_requests(&site), sends(&site));
    assert_eq!(site.cycle().0, 1);
    assert_eq!((psn_requests(&site), sends(&site)), requests);
}
