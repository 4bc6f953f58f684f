//! The local gPAS service (`fttp-agent serve`, issue 23 part 2): the real
//! binary serving a store built by real cycles, called over loopback by a
//! real HTTP client (ureq) and, for hostile input, by raw sockets.

// (A test or benchmark stops at what it cannot set up: the panic is the report.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chrono::{Duration, Utc};
use common::net::Ca;
use common::{STUDY, Site, TARGET, bf, write_private};
use fttp_agent::sim;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};

const PASSWORD: &str = "pw-7c1e9d-local";

/// The pseudonym the store holds for a local id, from the export.
fn exported(site: &Site, local_id: &str) -> String {
    let out = site.run(&["pseudonyms", "--local-id", local_id, "--format", "ndjson"]);
    let row: Value = serde_json::from_slice(&out.stdout).unwrap();
    row["pseudonym"].as_str().unwrap().to_string()
}

struct Service {
    child: Child,
    url: String,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    /// Sends SIGTERM and waits for the exit code.
    fn stop(mut self) -> Option<i32> {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        self.child.wait().unwrap().code()
    }
}

fn add_serve_section(site: &Site, section: &str) {
    let pw = site.dir.path().join("serve.pw");
    write_private(&pw, PASSWORD);
    let text =
        std::fs::read_to_string(&site.config).unwrap() + "\n[serve]\nlisten = \"127.0.0.1:0\"\n" + section + "\n";
    std::fs::write(&site.config, text).unwrap();
}

fn basic_section() -> &'static str {
    "basic_user = \"etl\"\nbasic_password_file = \"serve.pw\""
}

/// Starts `args` (`serve`, or `run` with [serve]) and waits for the
/// service's URL in the log.
fn start(site: &Site, args: &[&str]) -> Service {
    let log = site.dir.path().join("agent.log");
    let before = std::fs::read_to_string(&log).unwrap_or_default().len();
    let mut child = common::agent()
        .arg("--config")
        .arg(&site.config)
        .args(args)
        .env_remove("FTTP_AGENT_API_KEY")
        .env_remove("FTTP_AGENT_CONFIG")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let fresh = text.get(before..).unwrap_or("");
        let marker = if args[0] == "run" {
            "daemon started"
        } else {
            "local service listening on "
        };
        if let Some(at) = fresh.find("local service listening on ")
            && fresh.contains(marker)
        {
            let url = fresh[at + "local service listening on ".len()..]
                .lines()
                .next()
                .unwrap()
                .trim()
                .to_string();
            return Service { child, url };
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the service ended with {status}: {fresh}");
        }
        assert!(started.elapsed().as_secs() < 15, "the service did not start: {fresh}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn client() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(20)))
        .build()
        .into()
}

fn basic() -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("etl:{PASSWORD}"))
    )
}

/// POSTs `body` and returns status, content type and body.
fn post(agent: &ureq::Agent, url: &str, content_type: &str, body: &str, auth: Option<&str>) -> (u16, String, String) {
    let mut req = agent.post(url).header("Content-Type", content_type);
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    let mut resp = req.send(body).unwrap();
    finish(&mut resp)
}

fn get(agent: &ureq::Agent, url: &str, auth: Option<&str>) -> (u16, String, String) {
    let mut req = agent.get(url);
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    let mut resp = req.call().unwrap();
    finish(&mut resp)
}

fn finish(resp: &mut ureq::http::Response<ureq::Body>) -> (u16, String, String) {
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = resp.body_mut().read_to_string().unwrap_or_default();
    (resp.status().as_u16(), ct, body)
}

fn request_json(op_input: &str, target: &str, values: &[&str]) -> String {
    let mut parameter = vec![json!({"name": "target", "valueString": target})];
    parameter.extend(values.iter().map(|v| json!({"name": op_input, "valueString": v})));
    json!({"resourceType": "Parameters", "parameter": parameter}).to_string()
}

fn request_xml(target: &str, values: &[&str]) -> String {
    let mut s = format!(
        "<Parameters xmlns=\"http://hl7.org/fhir\"><parameter><name value=\"target\"/><valueString value=\"{target}\"/></parameter>"
    );
    for v in values {
        s.push_str(&format!(
            "<parameter><name value=\"original\"/><valueString value=\"{v}\"/></parameter>"
        ));
    }
    s + "</Parameters>"
}

/// Checks an answer against the gPAS OperationDefinition's `out`
/// parameters: names, part names, cardinalities and value types.
fn validate(definition: &str, answer: &Value) {
    let path = format!("../shared/fttp-ig/gpas/OperationDefinition-{definition}.json");
    let def: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(answer["resourceType"], "Parameters");
    let outs: Vec<&Value> = def["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["use"] == "out")
        .collect();
    for p in answer["parameter"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let spec = outs
            .iter()
            .find(|o| o["name"] == name)
            .unwrap_or_else(|| panic!("{name} is not an out parameter of {definition}"));
        let parts = p["part"].as_array().unwrap();
        for part_spec in spec["part"].as_array().unwrap() {
            let part_name = part_spec["name"].as_str().unwrap();
            let found: Vec<&Value> = parts.iter().filter(|x| x["name"] == part_name).collect();
            let min = part_spec["min"].as_u64().unwrap() as usize;
            let max = part_spec["max"].as_str().unwrap();
            assert!(found.len() >= min, "{name}.{part_name}: fewer than {min}");
            if max != "*" {
                assert!(
                    found.len() <= max.parse().unwrap(),
                    "{name}.{part_name}: more than {max}"
                );
            }
            let ty = part_spec["type"].as_str().unwrap();
            for f in found {
                assert!(
                    f.get(format!("value{ty}")).is_some(),
                    "{name}.{part_name} is not a {ty}: {f}"
                );
            }
        }
        for part in parts {
            assert!(
                spec["part"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s["name"] == part["name"]),
                "{name} has a part the definition lacks: {part}"
            );
        }
    }
}

/// What the answer says per original: its pseudonym, or `not-found`.
fn by_original(answer: &Value) -> Vec<(String, String)> {
    answer["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let part = |n: &str| {
                p["part"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|x| x["name"] == n)
                    .cloned()
                    .unwrap_or(Value::Null)
            };
            let original = part("original")["valueIdentifier"]["value"]
                .as_str()
                .unwrap()
                .to_string();
            let result = match p["name"].as_str().unwrap() {
                "pseudonym" => part("pseudonym")["valueIdentifier"]["value"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                _ => part("error-code")["valueCoding"]["code"].as_str().unwrap().to_string(),
            };
            (original, result)
        })
        .collect()
}

/// The service's audit records once there are `expected` of them (they are
/// written in batches just after the answers), or whatever there is after
/// ten seconds, for the caller's assertion to show.
fn audit_of(site: &Site, expected: usize) -> Vec<Value> {
    let start = std::time::Instant::now();
    loop {
        let records: Vec<Value> = site.audit().into_iter().filter(|r| r["kind"] == "gpas").collect();
        if records.len() >= expected || start.elapsed() > std::time::Duration::from_secs(10) {
            // (A moment more: a record beyond those expected would show.)
            std::thread::sleep(std::time::Duration::from_millis(100));
            return site.audit().into_iter().filter(|r| r["kind"] == "gpas").collect();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn pseudonymize_answers_known_and_unknown_originals_in_json_and_xml() {
    let site = common::site_with_pseudonyms();
    add_serve_section(&site, basic_section());
    let (p1, p2, p3) = (exported(&site, "p1"), exported(&site, "p2"), exported(&site, "p3"));
    assert_eq!(p1, "mii_CLEARED");
    let service = start(&site, &["serve"]);
    let agent = client();
    let auth = Some(basic());

    // POST, JSON, with every source of pseudonyms and an unknown original.
    let url = format!("{}/$pseudonymize", service.url);
    let body = request_json("original", STUDY, &["p1", "p2", "p3", "p9"]);
    let (status, ct, text) = post(&agent, &url, "application/fhir+json", &body, auth.as_deref());
    assert_eq!(status, 200, "{text}");
    assert!(ct.starts_with("application/fhir+json"), "{ct}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    validate("Pseudonymize", &answer);
    assert_eq!(
        by_original(&answer),
        [
            ("p1".to_string(), p1.clone()),
            ("p2".to_string(), p2.clone()),
            ("p3".to_string(), p3.clone()),
            ("p9".to_string(), "not-found".to_string()),
        ]
    );
    // Every answer part names the study as its target.
    assert!(text.contains(&format!("\"value\":\"{STUDY}\"")), "{text}");

    // POST, XML in and out; AllowCreate answers the same (it cannot create).
    let url = format!("{}/$pseudonymizeAllowCreate", service.url);
    let (status, ct, xml) = post(
        &agent,
        &url,
        "application/fhir+xml",
        &request_xml(STUDY, &["p3", "p9"]),
        auth.as_deref(),
    );
    assert_eq!(status, 200, "{xml}");
    assert!(ct.starts_with("application/fhir+xml"), "{ct}");
    let parsed = fttp_agent::fhir::Parameters::parse(fttp_agent::fhir::Format::Xml, xml.as_bytes()).unwrap();
    let as_json: Value = serde_json::from_str(&parsed.to_json()).unwrap();
    validate("PseudonymizeAllowCreate", &as_json);
    assert_eq!(
        by_original(&as_json),
        [
            ("p3".to_string(), p3.clone()),
            ("p9".to_string(), "not-found".to_string())
        ]
    );

    // The older GET forms, as older clients send them; _format picks XML.
    let (status, _, text) = get(
        &agent,
        &format!("{}/$pseudonymize-allow-create?domain={STUDY}&original=p2", service.url),
        auth.as_deref(),
    );
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        by_original(&serde_json::from_str(&text).unwrap()),
        [("p2".to_string(), p2)]
    );
    let (status, ct, text) = get(
        &agent,
        &format!(
            "{}/$pseudonymize?target={STUDY}&original=p1&original=p9&_format=xml",
            service.url
        ),
        auth.as_deref(),
    );
    assert_eq!(status, 200, "{text}");
    assert!(ct.starts_with("application/fhir+xml") && text.contains(&p1), "{text}");

    // An unknown target: 404 with an OperationOutcome naming no value sent.
    let (status, _, text) = post(
        &agent,
        &format!("{}/$pseudonymize", service.url),
        "application/fhir+json",
        &request_json("original", "gecco", &["p1"]),
        auth.as_deref(),
    );
    assert_eq!(status, 404, "{text}");
    assert!(
        text.contains("OperationOutcome") && text.contains("unknown target"),
        "{text}"
    );
    assert!(!text.contains("gecco") && !text.contains("p1"), "{text}");

    // Every call is audited: operation, client, study, counts; no value.
    let records = audit_of(&site, 5);
    assert_eq!(records.len(), 5, "{records:?}");
    let detail = records[0]["detail"].as_str().unwrap();
    assert_eq!(records[0]["outcome"], "pseudonymize");
    assert_eq!(records[0]["study"], STUDY);
    assert!(
        detail.contains("user etl") && detail.contains("4 asked (4 distinct), 3 found"),
        "{detail}"
    );
    assert_eq!(records[4]["outcome"], "refused");
    let all = serde_json::to_string(&records).unwrap();
    for value in ["p1", "p2", "p3", "p9", "mii_CLEARED", PASSWORD] {
        assert!(!all.contains(value), "the audit records name {value}: {all}");
    }
    assert_eq!(service.stop(), Some(0));
    // The chain stays whole with the service's records in it.
    let audit = site.dir.path().join("audit.ndjson");
    assert_eq!(common::verify(&[&audit], None).0, 0);
    site.assert_no_leaks();
}

#[test]
fn metadata_lists_exactly_the_operations_enabled_and_depseudonymize_is_gated() {
    let site = common::site_with_pseudonyms();
    add_serve_section(&site, basic_section());
    let agent = client();
    let auth = Some(basic());
    let p3 = exported(&site, "p3");
    let service = start(&site, &["serve"]);
    let (status, _, text) = get(&agent, &format!("{}/metadata", service.url), auth.as_deref());
    assert_eq!(status, 200, "{text}");
    let statement: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(statement["resourceType"], "CapabilityStatement");
    let names: Vec<&str> = statement["rest"][0]["operation"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["pseudonymize", "pseudonymizeAllowCreate"]);
    let body = request_json("pseudonym", STUDY, &[&p3]);
    let url = format!("{}/$dePseudonymize", service.url);
    let (status, _, text) = post(&agent, &url, "application/fhir+json", &body, auth.as_deref());
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("OperationOutcome") && !text.contains(&p3), "{text}");
    assert_eq!(service.stop(), Some(0));

    // Enabled: metadata says so, and a pseudonym leads back to its patient.
    let text = std::fs::read_to_string(&site.config).unwrap() + "allow_depseudonymize = true\n";
    std::fs::write(&site.config, text).unwrap();
    let service = start(&site, &["serve"]);
    let (_, _, text) = get(
        &agent,
        &format!("{}/metadata?_format=xml", service.url),
        auth.as_deref(),
    );
    assert!(text.contains("<name value=\"dePseudonymize\"/>"), "{text}");
    let url = format!("{}/$dePseudonymize", service.url);
    let body = request_json("pseudonym", STUDY, &[&p3, "mii_NOBODY", "nonexistent"]);
    let (status, _, text) = post(&agent, &url, "application/fhir+json", &body, auth.as_deref());
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    validate("DePseudonymize", &answer);
    let params = answer["parameter"].as_array().unwrap();
    assert_eq!(params[0]["name"], "original");
    assert!(params[0].to_string().contains("\"p3\""), "{text}");
    // A pseudonym whose filter matches no local patient has no original.
    assert_eq!(params[1]["name"], "error");
    assert_eq!(params[2]["name"], "error");
    // The older GET form.
    let (status, _, text) = get(
        &agent,
        &format!("{}/$de-pseudonymize?domain={STUDY}&pseudonym={p3}", service.url),
        auth.as_deref(),
    );
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"p3\""), "{text}");
    let records = audit_of(&site, 3);
    let outcomes: Vec<&str> = records.iter().map(|r| r["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes, ["refused", "dePseudonymize", "dePseudonymize"]);
    assert_eq!(service.stop(), Some(0));
}

#[test]
fn missing_or_wrong_credentials_get_401_and_are_logged_without_them() {
    let site = common::site_with_pseudonyms();
    add_serve_section(&site, basic_section());
    let service = start(&site, &["serve"]);
    let agent = client();
    let url = format!("{}/$pseudonymize", service.url);
    let body = request_json("original", STUDY, &["p1"]);
    use base64::Engine as _;
    let wrong = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("etl:guessed-Passw0rd")
    );
    for auth in [None, Some(wrong.as_str()), Some("Bearer abc"), Some("Basic !!!")] {
        let (status, _, text) = post(&agent, &url, "application/fhir+json", &body, auth);
        assert_eq!(status, 401, "{text}");
        assert!(text.contains("OperationOutcome") && !text.contains("mii_"), "{text}");
    }
    let (status, _, _) = get(&agent, &format!("{}/metadata", service.url), None);
    assert_eq!(status, 401);
    assert_eq!(service.stop(), Some(0));
    let log = std::fs::read_to_string(site.dir.path().join("agent.log")).unwrap();
    assert!(log.contains("authentication failed from 127.0.0.1"), "{log}");
    assert!(!log.contains("guessed-Passw0rd") && !log.contains(PASSWORD), "{log}");
    // Refused calls never reached the store: nothing audited as answered.
    assert!(
        site.audit()
            .iter()
            .all(|r| r["kind"] != "gpas" || r["outcome"] != "pseudonymize")
    );
}

#[test]
fn tls_with_client_certificates_names_the_client_and_refuses_others() {
    let site = common::site_with_pseudonyms();
    let dir = site.dir.path();
    let server_ca = Ca::new("Site CA");
    let server = server_ca.leaf(&["localhost", "127.0.0.1"], false);
    std::fs::write(dir.join("serve.crt"), &server.cert_pem).unwrap();
    write_private(dir.join("serve.key"), &server.key_pem);
    let client_ca = Ca::new("Pipeline CA");
    client_ca.write(&dir.join("clients.pem"));
    add_serve_section(
        &site,
        "tls_cert = \"serve.crt\"\ntls_key = \"serve.key\"\nclient_ca = \"clients.pem\"",
    );
    let out = site.run(&["check", "--offline"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("local service TLS: ok"),
        "{out:?}"
    );
    let service = start(&site, &["serve"]);
    assert!(service.url.starts_with("https://127.0.0.1:"), "{}", service.url);
    let url = format!("{}/$pseudonymize", service.url.replace("127.0.0.1", "localhost"));
    let body = request_json("original", STUDY, &["p1"]);
    let tls_agent = |client: Option<&common::net::Leaf>| -> ureq::Agent {
        use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig};
        let mut tls = TlsConfig::builder().root_certs(RootCerts::new_with_certs(&[Certificate::from_der(
            server_ca.der().as_ref(),
        )
        .to_owned()]));
        if let Some(c) = client {
            let key = PrivateKey::from_pem(c.key_pem.as_bytes()).unwrap();
            tls = tls.client_cert(Some(ClientCert::new_with_certs(
                &[Certificate::from_der(c.der.as_ref()).to_owned()],
                key,
            )));
        }
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .tls_config(tls.build())
            .build()
            .into()
    };
    // A certificate the client CA signed: answered, and audited by subject.
    let pipeline = client_ca.leaf(&["etl-pipeline"], false);
    let (status, _, text) = post(&tls_agent(Some(&pipeline)), &url, "application/fhir+json", &body, None);
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("mii_CLEARED"), "{text}");
    // No certificate: 401 with an OperationOutcome.
    let (status, _, text) = post(&tls_agent(None), &url, "application/fhir+json", &body, None);
    assert_eq!(status, 401, "{text}");
    // A certificate of another CA: the handshake fails.
    let stranger = Ca::new("Elsewhere").leaf(&["etl-pipeline"], false);
    let refused = tls_agent(Some(&stranger))
        .post(&url)
        .header("Content-Type", "application/fhir+json")
        .send(&body);
    assert!(refused.is_err(), "a foreign certificate was let in");
    // Plain HTTP to the TLS port gets no answer.
    let mut plain = TcpStream::connect(service.url.trim_start_matches("https://").split('/').next().unwrap()).unwrap();
    plain.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    let _ = plain.write_all(b"GET /ttp-fhir/fhir/gpas/metadata HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut got = Vec::new();
    let _ = plain.read_to_end(&mut got);
    assert!(!String::from_utf8_lossy(&got).contains("CapabilityStatement"));
    let records = audit_of(&site, 1);
    assert_eq!(records.len(), 1, "{records:?}");
    let detail = records[0]["detail"].as_str().unwrap();
    assert!(detail.contains("certificate CN=etl-pipeline"), "{detail}");
    assert_eq!(service.stop(), Some(0));
}

/// Sends raw bytes and returns the status line and body of the answer.
fn raw(addr: &str, bytes: &[u8]) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(40))).unwrap();
    let _ = s.write_all(bytes);
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got).to_string();
    let status = text.lines().next().unwrap_or("").to_string();
    let body = text.split_once("\r\n\r\n").map(|x| x.1.to_string()).unwrap_or_default();
    (status, body)
}

#[test]
fn hostile_requests_get_an_operation_outcome_that_echoes_nothing() {
    let site = common::site_with_pseudonyms();
    add_serve_section(
        &site,
        &format!(
            "{}\nmax_originals = 5\nmax_body_bytes = 65536\nthreads = 2",
            basic_section()
        ),
    );
    let service = start(&site, &["serve"]);
    let addr = service
        .url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let path = "/ttp-fhir/fhir/gpas/$pseudonymize";
    let post_raw = |body: &str, ct: &str| {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nContent-Type: {ct}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            basic(),
            body.len()
        );
        raw(&addr, req.as_bytes())
    };
    let marker = "ZZ-SUBMITTED-VALUE";
    let cases: Vec<(String, &str, &str)> = vec![
        // Deep nesting.
        (
            format!(
                "{{\"resourceType\":\"Parameters\",\"parameter\":[{}{}]}}",
                "{\"name\":\"x\",\"part\":[".repeat(400),
                "]}".repeat(400)
            ),
            "application/fhir+json",
            "400",
        ),
        // Wrong types.
        (
            format!(
                "{{\"resourceType\":\"Parameters\",\"parameter\":[{{\"name\":\"target\",\"valueString\":\"mii\"}},{{\"name\":\"original\",\"valueInteger\":{}}}]}}",
                42
            ),
            "application/fhir+json",
            "400",
        ),
        (
            format!(
                "{{\"resourceType\":\"Parameters\",\"parameter\":[{{\"name\":\"target\",\"valueString\":\"mii\"}},{{\"name\":\"original\",\"valueIdentifier\":{{\"value\":\"{marker}\"}}}}]}}"
            ),
            "application/fhir+json",
            "400",
        ),
        // Not FHIR, broken JSON, broken XML, another resource.
        (format!("{marker} plain text"), "text/plain", "415"),
        (
            format!("{{\"resourceType\":\"Parameters\",\"parameter\":[{{\"name\":\"{marker}\""),
            "application/fhir+json",
            "400",
        ),
        (
            format!("<Parameters xmlns=\"http://hl7.org/fhir\"><{marker}>"),
            "application/fhir+xml",
            "400",
        ),
        (
            format!("{{\"resourceType\":\"Patient\",\"id\":\"{marker}\"}}"),
            "application/fhir+json",
            "400",
        ),
        // More originals than max_originals.
        (
            request_json("original", STUDY, &[marker, "b", "c", "d", "e", "f"]),
            "application/fhir+json",
            "400",
        ),
        // Larger than max_body_bytes.
        (
            request_json("original", STUDY, &[&marker.repeat(5000)]),
            "application/fhir+json",
            "413",
        ),
    ];
    for (body, ct, want) in &cases {
        let (status, answer) = post_raw(body, ct);
        assert!(status.contains(want), "{want} expected, got {status}: {answer}");
        assert!(answer.contains("OperationOutcome"), "{status}: {answer}");
        assert!(
            !answer.contains(marker),
            "the answer echoes a submitted value: {answer}"
        );
    }
    // Garbage instead of HTTP, and a huge head.
    let (status, _) = raw(&addr, b"\x16\x03\x01garbage\r\n\r\n");
    assert!(status.contains("400"), "{status}");
    let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(40_000));
    let (status, _) = raw(&addr, long.as_bytes());
    assert!(status.contains("431"), "{status}");
    // A stalled client holds one worker, never the service: a second,
    // normal client is answered meanwhile.
    let mut stalled = TcpStream::connect(&addr).unwrap();
    stalled
        .write_all(b"POST /ttp-fhir/fhir/gpas/$pseudonymize HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        .unwrap();
    let started = std::time::Instant::now();
    let (status, _, text) = get(
        &client(),
        &format!("{}/$pseudonymize?target={STUDY}&original=p1", service.url),
        Some(&basic()),
    );
    assert_eq!(status, 200, "{text}");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    drop(stalled);
    assert_eq!(service.stop(), Some(0));
    site.assert_no_leaks();
}

#[test]
fn a_service_reachable_from_other_hosts_needs_tls_and_any_service_needs_authentication() {
    let site = Site::new("json");
    let original = std::fs::read_to_string(&site.config).unwrap();
    std::fs::write(
        &site.config,
        format!("{original}\n[serve]\nlisten = \"0.0.0.0:8686\"\n{}\n", basic_section()),
    )
    .unwrap();
    write_private(site.dir.path().join("serve.pw"), PASSWORD);
    let out = site.run(&["serve"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tls_cert"));
    std::fs::write(&site.config, format!("{original}\n[serve]\nlisten = \"127.0.0.1:0\"\n")).unwrap();
    let out = site.run(&["serve"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs authentication"));
    // A certificate that does not load: `check` and `serve` say which.
    std::fs::write(site.dir.path().join("serve.crt"), "not a certificate").unwrap();
    write_private(site.dir.path().join("serve.key"), "not a key");
    std::fs::write(
        &site.config,
        format!(
            "{original}\n[serve]\nlisten = \"127.0.0.1:0\"\ntls_cert = \"serve.crt\"\ntls_key = \"serve.key\"\n{}\n",
            basic_section()
        ),
    )
    .unwrap();
    for cmd in [&["check", "--offline"][..], &["serve"][..]] {
        let out = site.run(cmd);
        assert_eq!(out.status.code(), Some(2), "{cmd:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("tls_cert"), "{out:?}");
    }
    // Without [serve], `serve` says what is missing.
    std::fs::write(&site.config, &original).unwrap();
    let out = site.run(&["serve"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("[serve]"));
}

#[test]
fn the_daemon_serves_while_its_cycles_and_an_import_write() {
    let site = common::site_with_pseudonyms();
    add_serve_section(&site, basic_section());
    let text = std::fs::read_to_string(&site.config).unwrap() + "\n[schedule]\ninterval = \"1s\"\n";
    std::fs::write(&site.config, text).unwrap();
    let service = start(&site, &["run"]);
    let agent = client();
    let auth = basic();
    let url = format!("{}/$pseudonymize?target={STUDY}&original=p1&original=p3", service.url);
    // Tasks keep arriving, so the daemon's cycles write while we ask;
    // an import writes too.
    let csv = site.dir.path().join("more.csv");
    std::fs::write(&csv, common::patients_csv()).unwrap();
    let started = std::time::Instant::now();
    let mut answered = 0;
    while started.elapsed() < std::time::Duration::from_secs(4) {
        site.sim.add_task(sim::repeat_request(
            STUDY,
            &bf(2),
            TARGET,
            Some(Utc::now() + Duration::days(1)),
        ));
        if answered == 10 {
            assert_eq!(site.run(&["import", csv.to_str().unwrap()]).status.code(), Some(0));
        }
        let (status, _, text) = get(&agent, &url, Some(&auth));
        assert_eq!(status, 200, "{text}");
        assert!(text.contains("mii_CLEARED"), "{text}");
        answered += 1;
    }
    assert!(answered > 10);
    assert_eq!(service.stop(), Some(0));
    let records = audit_of(&site, answered);
    assert_eq!(records.len(), answered, "every call audited");
    let audit = site.dir.path().join("audit.ndjson");
    assert_eq!(
        common::verify(&[&audit], None).0,
        0,
        "one chain despite two writers in one process"
    );
    let polls = site.audit().iter().filter(|r| r["kind"] == "poll").count();
    assert!(polls >= 2, "the daemon kept polling: {polls}");
}
