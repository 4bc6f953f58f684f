//! A hostile dispatcher, token endpoint and proxy (security review, issue
//! 18): redirects, echoed credentials, injected newlines, absurd numbers.
//! Each test plays the attack over loopback against the real binary and
//! checks the exact refusal and that nothing reached where it must not.

// (A test or benchmark stops at what it cannot set up: the panic is the report.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use base64::Engine;
use chrono::{Duration as Days, Utc};
use common::hostile::{Hostile, answer};
use common::{Site, bf};
use fttp_agent::fhir::idat::IdatElement;
use fttp_agent::sim::{self, FaultKind, SimOptions};
use fttp_agent::store::Status;
use std::os::unix::fs::PermissionsExt;

const PROVIDE: Option<&str> = Some("$providePatientData");
const RTASKS: Option<&str> = Some("$requestTasks");

fn site_with(options: SimOptions) -> Site {
    let s = Site::with("json", options, "");
    s.import_patients();
    s
}

fn queue_send(site: &Site, id: &str) {
    site.sim.add_task(sim::send_idat(
        id,
        Utc::now() + Days::days(1),
        None,
        Some(&bf(1)),
        &[IdatElement::Given],
    ));
}

/// Writes a private secret file in the site's directory.
fn secret_file(site: &Site, name: &str, value: &str) {
    let path = site.dir.path().join(name);
    std::fs::write(&path, value).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Puts a `[dispatcher.auth]` section into the site's config.
fn auth_section(site: &Site, lines: &str) {
    let text = std::fs::read_to_string(&site.config)
        .unwrap()
        .replace("[site]", &format!("[dispatcher.auth]\n{lines}\n[site]"));
    std::fs::write(&site.config, text).unwrap();
}

/// An OAuth2 `[dispatcher.auth]` section with `token_url`, whose client
/// secret file holds `secret`.
fn oauth_section(site: &Site, token_url: &str, secret: &str) {
    secret_file(site, "client.secret", secret);
    auth_section(
        site,
        &format!("token_url = \"{token_url}\"\nclient_id = \"fttp-agent\"\nclient_secret_file = \"client.secret\"\n"),
    );
}

/// Everything the agent wrote outside the store, and what `status` says.
fn everything_written(site: &Site, cycle_output: &str) -> String {
    let mut all = cycle_output.to_string();
    for name in ["agent.log", "audit.ndjson"] {
        all.push_str(&std::fs::read_to_string(site.dir.path().join(name)).unwrap_or_default());
    }
    let status = site.run(&["status"]);
    all.push_str(&String::from_utf8_lossy(&status.stdout));
    all.push_str(&String::from_utf8_lossy(&status.stderr));
    all
}

fn a_server_that_records_everything() -> Hostile {
    Hostile::start(|_| {
        answer(
            "200 OK",
            &[("Content-Type", "application/fhir+json")],
            br#"{"resourceType":"Parameters"}"#,
        )
    })
}

#[test]
fn a_redirected_send_is_a_failure_and_nothing_reaches_the_other_host() {
    for status in [301, 302, 303, 307, 308] {
        let site = site_with(SimOptions::default());
        let elsewhere = a_server_that_records_everything();
        queue_send(&site, "r1");
        site.sim.push(
            PROVIDE,
            FaultKind::Redirect {
                status,
                location: elsewhere.url("/steal?x=1"),
            },
        );
        let (code, out) = site.cycle();
        assert_eq!(code, 1, "HTTP {status}: {out}");
        let port = elsewhere.port;
        assert!(
            out.contains(&format!("answered HTTP {status}, a redirect to 127.0.0.1:{port}")),
            "HTTP {status}: {out}"
        );
        assert!(!out.contains("/steal"), "only the Location's host is named: {out}");
        assert!(elsewhere.requests().is_empty(), "HTTP {status} was followed");
        let entry = site.store().ledger("mii/task:r1").unwrap().clone();
        assert_eq!(entry.status, Status::Failed, "HTTP {status}: not recorded as sent");
        // Nothing was lost: the next cycle sends it.
        let (code, out) = site.cycle();
        assert_eq!(code, 0, "{out}");
        let entry = site.store().ledger("mii/task:r1").unwrap().clone();
        assert_eq!((entry.status, entry.outcome.as_str()), (Status::Resolved, "sent"));
        assert_eq!(site.sim.state().received("$providePatientData").len(), 2);
    }
}

#[test]
fn a_redirected_poll_is_a_failed_poll_not_an_empty_one() {
    let site = site_with(SimOptions::default());
    let elsewhere = a_server_that_records_everything();
    site.sim.push(
        RTASKS,
        FaultKind::Redirect {
            status: 302,
            location: elsewhere.url("/"),
        },
    );
    let (code, out) = site.cycle();
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("$requestTasks: the dispatcher answered HTTP 302"), "{out}");
    assert!(elsewhere.requests().is_empty());
    assert_eq!(site.audit_outcomes("poll"), ["failed"]);
}

#[test]
fn a_redirecting_token_endpoint_gets_no_secret_followed() {
    let site = site_with(SimOptions::default());
    let elsewhere = a_server_that_records_everything();
    let target = elsewhere.url("/token");
    let token = Hostile::start(move |_| answer("307 Temporary Redirect", &[("Location", &target)], b""));
    oauth_section(&site, &token.url("/token"), "client-secret-4711");
    let (code, out) = site.cycle();
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("HTTP 307, a redirect to 127.0.0.1:"), "{out}");
    assert_eq!(token.requests().len(), 1);
    assert!(elsewhere.requests().is_empty(), "the redirect was followed");
}

#[test]
fn a_token_endpoint_echoing_the_secret_with_a_newline_is_cleaned() {
    let secret = "client-secret 4711/&x";
    let encoded = fttp_agent::privacy::percent_encode(secret);
    let b64 = base64::engine::general_purpose::STANDARD.encode(secret);
    for echo in [secret.to_string(), encoded.clone(), b64.clone()] {
        let site = site_with(SimOptions::default());
        let body = format!(
            r#"{{"error":"bad {}\nFORGED 2026-01-01 INFO all is well"}}"#,
            echo.replace('"', "")
        );
        let token = Hostile::start(move |_| {
            answer(
                "400 Bad Request",
                &[("Content-Type", "application/json")],
                body.as_bytes(),
            )
        });
        oauth_section(&site, &token.url("/token"), secret);
        let (code, out) = site.cycle();
        assert_eq!(code, 3, "{out}");
        assert!(out.contains("token endpoint: HTTP 400 (bad [redacted]"), "{out}");
        let all = everything_written(&site, &out);
        for form in [secret, &encoded, &b64] {
            assert!(!all.contains(form), "{form} leaked: {all}");
        }
        assert!(
            !all.lines().any(|l| l.starts_with("FORGED")),
            "a forged log line: {all}"
        );
    }
}

#[test]
fn an_absurd_token_lifetime_does_not_crash_the_agent() {
    let site = site_with(SimOptions::default());
    let token = Hostile::start(|_| {
        answer(
            "200 OK",
            &[("Content-Type", "application/json")],
            br#"{"access_token":"tok-huge-lifetime","token_type":"Bearer","expires_in":18446744073709551615}"#,
        )
    });
    oauth_section(&site, &token.url("/token"), "client-secret-4711");
    queue_send(&site, "t1");
    let (code, out) = site.cycle();
    assert_eq!(code, 0, "{out}");
    assert_eq!(token.requests().len(), 1);
}

#[test]
fn a_dispatcher_echoing_basic_credentials_or_a_bearer_token_is_redacted() {
    // HTTP Basic: the password, `user:password` and its base64.
    let options = SimOptions {
        basic: Some(("dic".into(), "basic-pw-4711".into())),
        ..SimOptions::default()
    };
    let site = site_with(options);
    secret_file(&site, "basic.pw", "basic-pw-4711");
    auth_section(&site, "basic_user = \"dic\"\nbasic_password_file = \"basic.pw\"\n");
    let b64 = base64::engine::general_purpose::STANDARD.encode("dic:basic-pw-4711");
    queue_send(&site, "b1");
    site.sim.push(
        PROVIDE,
        FaultKind::Status {
            status: 500,
            diagnostics: format!("you sent basic-pw-4711, i.e. Basic {b64}, dic:basic-pw-4711"),
            retry_after: None,
        },
    );
    let (code, out) = site.cycle();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("you sent [redacted]"), "{out}");
    let all = everything_written(&site, &out);
    for form in ["basic-pw-4711", &b64] {
        assert!(!all.contains(form), "{form} leaked: {all}");
    }

    // A bearer token, fetched in the very cycle whose answer echoes it.
    let site = site_with(SimOptions::default());
    let token = Hostile::start(|_| {
        answer(
            "200 OK",
            &[("Content-Type", "application/json")],
            br#"{"access_token":"tok-7f3e-echoed-9a","token_type":"Bearer","expires_in":300}"#,
        )
    });
    oauth_section(&site, &token.url("/token"), "client-secret-4711");
    site.sim.push(
        RTASKS,
        FaultKind::Status {
            status: 403,
            diagnostics: "token tok-7f3e-echoed-9a is not allowed\nFORGED line".into(),
            retry_after: None,
        },
    );
    let (code, out) = site.cycle();
    assert_eq!(code, 3, "{out}");
    let all = everything_written(&site, &out);
    assert!(!all.contains("tok-7f3e-echoed-9a"), "{all}");
    assert!(!all.lines().any(|l| l.starts_with("FORGED")), "{all}");
}

#[test]
fn a_loopback_dispatcher_is_never_reached_through_a_proxy() {
    let site = site_with(SimOptions::default());
    queue_send(&site, "p1");
    let proxy = a_server_that_records_everything();
    // From the environment...
    let out = common::agent()
        .arg("--config")
        .arg(&site.config)
        .args(["run", "--once"])
        .env_remove("FTTP_AGENT_API_KEY")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .env("HTTP_PROXY", proxy.url(""))
        .env("http_proxy", proxy.url(""))
        .env("ALL_PROXY", proxy.url(""))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    // ...and from the config.
    site.sim.add_task(sim::send_idat(
        "p2",
        Utc::now() + Days::days(1),
        None,
        Some(&bf(2)),
        &[IdatElement::Family],
    ));
    let text = std::fs::read_to_string(&site.config)
        .unwrap()
        .replace("[site]", &format!("proxy = \"{}\"\n\n[site]", proxy.url("")));
    // (The line before [site] is the [dispatcher] section's last.)
    std::fs::write(&site.config, text).unwrap();
    let (code, out) = site.cycle();
    assert_eq!(code, 0, "{out}");
    assert!(proxy.requests().is_empty(), "the key went to the proxy in clear");
    assert_eq!(site.sim.state().received("$providePatientData").len(), 2);
}

#[test]
fn a_newline_in_a_json_key_forges_no_log_line() {
    let site = site_with(SimOptions::default());
    for _ in 0..2 {
        site.sim.push(
            RTASKS,
            FaultKind::Raw {
                status: 200,
                content_type: "application/fhir+json".into(),
                body: br#"{"resourceType":"Parameters","parameter":[{"name":"task","_bad\nFORGED 2026-01-01T00:00:00Z INFO all tasks done\r\u001b[2K":{"a":1}}]}"#.to_vec(),
            },
        );
    }
    let (code, out) = site.cycle();
    assert_ne!(code, 0, "{out}");
    let all = everything_written(&site, &out);
    assert!(all.contains("FORGED"), "the key is reported, escaped: {all}");
    assert!(!all.lines().any(|l| l.starts_with("FORGED")), "{all}");
    assert!(!all.contains('\u{1b}'), "{all}");
    // JSON logs escape it too.
    let text = std::fs::read_to_string(&site.config).unwrap() + "format = \"json\"\n";
    std::fs::write(&site.config, text).unwrap();
    let (_, out) = site.cycle();
    let all = everything_written(&site, &out);
    assert!(!all.lines().any(|l| l.starts_with("FORGED")), "{all}");
}

#[test]
fn a_2xx_carrying_an_error_outcome_is_not_a_delivery() {
    let site = site_with(SimOptions::default());
    queue_send(&site, "o1");
    site.sim.push(
        PROVIDE,
        FaultKind::Raw {
            status: 200,
            content_type: "application/fhir+json".into(),
            body: br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"processing","diagnostics":"patient not stored"}]}"#.to_vec(),
        },
    );
    let (code, out) = site.cycle();
    // Refused for good (sent again only if the patient's data change).
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("answered 2xx but refused: error/processing: patient not stored"),
        "{out}"
    );
    let e = site.store().ledger("mii/task:o1").unwrap().clone();
    assert_eq!((e.status, e.outcome.as_str()), (Status::Closed, "dispatcher_error"));
    // An informational outcome is a success.
    queue_send(&site, "o2");
    site.sim.push(
        PROVIDE,
        FaultKind::Raw {
            status: 200,
            content_type: "application/fhir+json".into(),
            body: br#"{"resourceType":"OperationOutcome","issue":[{"severity":"information","code":"informational"}]}"#
                .to_vec(),
        },
    );
    let (code, out) = site.cycle();
    assert_eq!(code, 0, "{out}");
    assert_eq!(site.store().ledger("mii/task:o2").unwrap().status, Status::Resolved);
}

#[test]
fn duplicate_json_keys_in_an_answer_are_refused() {
    let site = site_with(SimOptions::default());
    let later = (Utc::now() + Days::days(1)).to_rfc3339();
    let body = format!(
        r#"{{"resourceType":"Parameters","parameter":[{{"name":"task","part":[
            {{"name":"type","valueCode":"dic_psn_available"}},
            {{"name":"target","valueString":"dic_test","valueString":"other_site"}},
            {{"name":"expires","valueInstant":"{later}"}}]}}]}}"#
    );
    site.sim.push(
        RTASKS,
        FaultKind::Raw {
            status: 200,
            content_type: "application/fhir+json".into(),
            body: body.into_bytes(),
        },
    );
    let (code, out) = site.cycle();
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("an object has the same key twice"), "{out}");
    assert_eq!(site.audit_outcomes("poll"), ["protocol_error"]);
}

#[test]
fn a_start_tag_with_a_hundred_thousand_attributes_is_refused_at_once() {
    // quick-xml before 0.41 spent quadratic time on repeated attribute
    // names and unbounded memory on namespace declarations (RUSTSEC-2026-0194,
    // -0195): 28 s of CPU past the HTTP timeout for a 2.8 MB answer.
    for (attribute, on_root) in [("xmlns:n", true), ("a", false)] {
        let site = site_with(SimOptions::default());
        let mut attributes = String::new();
        for i in 0..100_000 {
            attributes.push_str(&format!(" {attribute}{i}=\"x\""));
        }
        let body = if on_root {
            format!(
                r#"<Parameters xmlns="http://hl7.org/fhir"{attributes}><parameter><name value="x"/></parameter></Parameters>"#
            )
        } else {
            format!(
                r#"<Parameters xmlns="http://hl7.org/fhir"><parameter><name{attributes} value="x"/></parameter></Parameters>"#
            )
        };
        site.sim.push(
            RTASKS,
            FaultKind::Raw {
                status: 200,
                content_type: "application/fhir+xml".into(),
                body: body.into_bytes(),
            },
        );
        let started = std::time::Instant::now();
        let (code, out) = site.cycle();
        assert_eq!(code, 4, "{attribute}: {out}");
        assert!(out.contains("invalid FHIR"), "{out}");
        // Generous: a debug build on a loaded machine; the quadratic case
        // took minutes.
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
    }
}

#[test]
fn answers_with_millions_of_values_are_refused_before_they_are_read() {
    let cases: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        (
            "application/fhir+json",
            "tiny parameters",
            [
                br#"{"resourceType":"Parameters","parameter":["#.as_slice(),
                &br#"{"name":"a"},"#.repeat(4_600_000),
                br#"{"name":"a"}]}"#,
            ]
            .concat(),
            "more than 250000 parameters",
        ),
        (
            "application/fhir+json",
            "numbers",
            [
                br#"{"resourceType":"Parameters","x":["#.as_slice(),
                &b"0,".repeat(29_000_000),
                b"0]}",
            ]
            .concat(),
            "more than 5000000 JSON values",
        ),
        (
            "application/fhir+xml",
            "tiny XML parameters",
            [
                br#"<Parameters xmlns="http://hl7.org/fhir">"#.as_slice(),
                &br#"<parameter><name value="a"/></parameter>"#.repeat(1_500_000),
                b"</Parameters>",
            ]
            .concat(),
            "more than 250000 parameters",
        ),
    ];
    for (mime, what, body, expected) in cases {
        let site = site_with(SimOptions::default());
        site.sim.push(
            RTASKS,
            FaultKind::Raw {
                status: 200,
                content_type: mime.into(),
                body,
            },
        );
        let (code, out) = site.cycle();
        assert_eq!(code, 4, "{what}: {out}");
        assert!(out.contains(expected), "{what}: {out}");
        assert!(out.contains("far more than any dispatcher answer holds"), "{out}");
        assert_eq!(site.store().ledger_entries().count(), 0);
    }
}
