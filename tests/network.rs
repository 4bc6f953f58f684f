//! The network as hospitals run it, on loopback: TLS with an internal CA,
//! mutual TLS, certificate problems, proxies, HTTP Basic and OAuth2.

// (A test or benchmark stops at what it cannot set up: the panic is the report.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chrono::{Duration, Utc};
use common::net::{Ca, Proxy, TlsFront};
use common::{Site, bf};
use fttp_agent::fhir::idat::IdatElement;
use fttp_agent::sim::{self, FaultKind, SimOAuth, SimOptions};
use std::net::SocketAddr;
use std::time::Duration as StdDuration;

fn backend(site: &Site) -> SocketAddr {
    let rest = site.sim.url().trim_start_matches("http://");
    rest.split('/').next().unwrap().parse().unwrap()
}

/// Points the site at `host_port` (keeping the dispatcher path) with
/// `extra` settings, replacing those of an earlier call.
fn reconfigure(site: &Site, host_port: &str, scheme: &str, extra: &str) {
    let text = std::fs::read_to_string(&site.config).unwrap();
    let mut out = String::new();
    for line in text.lines().filter(|l| !l.ends_with(" # test")) {
        if line.starts_with("url = ") {
            out.push_str(&format!("url = \"{scheme}://{host_port}/ttp-fhir/fhir/dispatcher\"\n"));
            for e in extra.lines() {
                out.push_str(&format!("{e} # test\n"));
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    std::fs::write(&site.config, out).unwrap();
}

fn tls_site(client_ca: bool, names: &[&str], expired: bool) -> (Site, Ca, TlsFront) {
    let site = Site::new("xml");
    site.import_patients();
    let ca = Ca::new("Test Hospital CA");
    let server = ca.leaf(names, expired);
    let front = TlsFront::start(&server, client_ca.then_some(&ca), backend(&site));
    ca.write(&site.dir.path().join("ca.pem"));
    (site, ca, front)
}

#[test]
fn tls_with_an_internal_ca_works_and_an_unknown_ca_is_explained() {
    let (site, _ca, front) = tls_site(false, &["localhost"], false);
    site.sim.add_task(sim::send_idat(
        "tls-1",
        Utc::now() + Duration::days(1),
        None,
        Some(&bf(1)),
        &[IdatElement::Given],
    ));
    reconfigure(&site, &format!("localhost:{}", front.port), "https", "");
    let (code, out) = site.cycle();
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("not trusted") && out.contains("ca_file"), "{out}");
    reconfigure(
        &site,
        &format!("localhost:{}", front.port),
        "https",
        "ca_file = \"ca.pem\"",
    );
    let (code, out) = site.cycle();
    assert_eq!(code, 0, "{out}");
    assert_eq!(site.sim.state().received("$providePatientData").len(), 1);
    assert!(*front.handshakes.lock().unwrap() >= 2);
}

#[test]
fn a_certificate_for_another_host_or_an_expired_one_is_explained() {
    let (site, _ca, front) = tls_site(false, &["gateway.example.org"], false);
    reconfigure(
        &site,
        &format!("localhost:{}", front.port),
        "https",
        "ca_file = \"ca.pem\"",
    );
    let (code, out) = site.cycle();
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("for another host name"), "{out}");

    let (site, _ca, front) = tls_site(false, &["localhost"], true);
    reconfigure(
        &site,
        &format!("localhost:{}", front.port),
        "https",
        "ca_file = \"ca.pem\"",
    );
    let (code, out) = site.cycle();
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("has expired"), "{out}");
}

#[test]
fn mutual_tls_presents_the_client_certificate() {
    let (site, ca, front) = tls_site(true, &["localhost"], false);
    let client = ca.leaf(&["dic-test"], false);
    std::fs::write(site.dir.path().join("client.pem"), &client.cert_pem).unwrap();
    common::write_private(site.dir.path().join("client.key"), &client.key_pem);
    reconfigure(
        &site,
        &format!("localhost:{}", front.port),
        "https",
        "ca_file = \"ca.pem\"",
    );
    let (code, out) = site.cycle();
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("client_cert"), "the admin is told what to set: {out}");
    reconfigure(
        &site,
        &format!("localhost:{}", front.port),
        "https",
        "ca_file = \"ca.pem\"\nclient_cert = \"client.pem\"\nclient_key = \"client.key\"",
    );
    let (code, out) = site.cycle();
    assert_eq!(code, 0, "{out}");
}

#[test]
fn a_configured_proxy_with_credentials_carries_the_traffic() {
    let (site, _ca, front) = tls_site(false, &["localhost"], false);
    let proxy = Proxy::start(Some(("proxyuser", "s3cret-proxy")));
    reconfigure(
        &site,
        &format!("localhost:{}", front.port),
        "https",
        &format!(
            "ca_file = \"ca.pem\"\nproxy = \"http://proxyuser:s3cret-proxy@127.0.0.1:{}\"",
            proxy.port
        ),
    );
    let (code, out) = site.cycle();
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("s3cret-proxy"));
    let tunnels = proxy.tunnels.lock().unwrap().clone();
    assert!(!tunnels.is_empty());
    assert!(
        tunnels.iter().all(|t| t == &format!("localhost:{}", front.port)),
        "{tunnels:?}"
    );
    // Wrong credentials: the proxy refuses, and the agent says so.
    let bad = Proxy::start(Some(("proxyuser", "other")));
    reconfigure(
        &site,
        &format!("localhost:{}", front.port),
        "https",
        &format!("proxy = \"http://proxyuser:s3cret-proxy@127.0.0.1:{}\"", bad.port),
    );
    let (code, out) = site.cycle();
    assert_eq!(code, 3, "{out}");
    assert!(bad.tunnels.lock().unwrap().is_empty());
}

#[test]
fn the_environment_proxy_is_used_unless_no_proxy_says_otherwise() {
    let (site, _ca, front) = tls_site(false, &["localhost"], false);
    let proxy = Proxy::start(None);
    reconfigure(
        &site,
        &format!("localhost:{}", front.port),
        "https",
        "ca_file = \"ca.pem\"",
    );
    let run = |no_proxy: &str| {
        common::agent()
            .arg("--config")
            .arg(&site.config)
            .args(["run", "--once"])
            .env("HTTPS_PROXY", format!("http://127.0.0.1:{}", proxy.port))
            .env("NO_PROXY", no_proxy)
            .output()
            .unwrap()
    };
    assert_eq!(run("example.org").status.code(), Some(0));
    let used = proxy.tunnels.lock().unwrap().len();
    assert!(used >= 1);
    assert_eq!(run("localhost").status.code(), Some(0));
    assert_eq!(proxy.tunnels.lock().unwrap().len(), used, "NO_PROXY bypasses the proxy");
}

fn basic_site(password_in_file: &str) -> Site {
    let options = SimOptions {
        basic: Some(("dic".into(), "basic-pw-77".into())),
        ..SimOptions::default()
    };
    let site = Site::with("xml", options, "");
    common::write_private(site.dir.path().join("basic.pw"), format!("{password_in_file}\n"));
    let text = std::fs::read_to_string(&site.config).unwrap().replace(
        "[site]",
        "[dispatcher.auth]\nbasic_user = \"dic\"\nbasic_password_file = \"basic.pw\"\n\n[site]",
    );
    std::fs::write(&site.config, text).unwrap();
    site
}

#[test]
fn http_basic_authentication() {
    let site = basic_site("basic-pw-77");
    let (code, out) = site.cycle();
    assert_eq!(code, 0, "{out}");
    let site = basic_site("wrong");
    let (code, out) = site.cycle();
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("HTTP 401"), "{out}");
}

fn oauth_site(user: Option<(&str, &str)>, secret_in_file: &str, lifetime: u64) -> Site {
    let options = SimOptions {
        oauth: Some(SimOAuth {
            client_id: "fttp-agent".into(),
            client_secret: "client-secret-91".into(),
            user: user.map(|(u, p)| (u.to_string(), p.to_string())),
            lifetime_secs: lifetime,
        }),
        ..SimOptions::default()
    };
    let site = Site::with("json", options, "");
    site.import_patients();
    common::write_private(site.dir.path().join("client.secret"), secret_in_file);
    let mut auth = format!(
        "[dispatcher.auth]\ntoken_url = \"{}\"\nclient_id = \"fttp-agent\"\nclient_secret_file = \"client.secret\"\n",
        site.sim.token_url()
    );
    if let Some((u, p)) = user {
        common::write_private(site.dir.path().join("user.pw"), p);
        auth.push_str(&format!("username = \"{u}\"\npassword_file = \"user.pw\"\n"));
    }
    let text = std::fs::read_to_string(&site.config)
        .unwrap()
        .replace("[site]", &format!("{auth}\n[site]"));
    std::fs::write(&site.config, text).unwrap();
    site
}

#[test]
fn oauth2_client_credentials_token_is_cached_for_the_whole_cycle() {
    let site = oauth_site(None, "client-secret-91", 3600);
    let later = Utc::now() + Duration::days(1);
    site.sim
        .add_task(sim::send_idat("o1", later, None, Some(&bf(1)), &[IdatElement::Given]));
    site.sim
        .add_task(sim::repeat_request("mii", &bf(2), common::TARGET, Some(later)));
    let (code, out) = site.cycle();
    assert_eq!(code, 0, "{out}");
    let st = site.sim.state();
    assert_eq!(st.received.len(), 3);
    assert_eq!(st.token_requests, 1, "one token for poll, send and batch");
}

#[test]
fn oauth2_password_grant() {
    let site = oauth_site(Some(("dic-user", "user-pw-55")), "client-secret-91", 3600);
    let (code, out) = site.cycle();
    assert_eq!(code, 0, "{out}");
    assert_eq!(site.sim.state().token_requests, 1);
}

#[test]
fn a_refused_token_is_refreshed_once() {
    let site = oauth_site(None, "client-secret-91", 3600);
    // One request at a time: the second send leaves after the revocation.
    let text = std::fs::read_to_string(&site.config)
        .unwrap()
        .replace("[dispatcher.auth]", "max_in_flight = 1\n\n[dispatcher.auth]");
    std::fs::write(&site.config, text).unwrap();
    let later = Utc::now() + Duration::days(1);
    site.sim
        .add_task(sim::send_idat("r1", later, None, Some(&bf(1)), &[IdatElement::Given]));
    site.sim.add_task(sim::send_idat(
        "r2",
        later + Duration::hours(1),
        None,
        Some(&bf(2)),
        &[IdatElement::Given],
    ));
    site.sim.push(
        Some("$providePatientData"),
        FaultKind::Delay(StdDuration::from_millis(1500)),
    );
    let handle = {
        let config = site.config.clone();
        std::thread::spawn(move || {
            common::agent()
                .arg("--config")
                .arg(&config)
                .args(["run", "--once"])
                .output()
                .unwrap()
        })
    };
    // While the first send is held up, the identity provider forgets the token.
    let start = std::time::Instant::now();
    while site.sim.state().delayed == 0 {
        assert!(start.elapsed() < StdDuration::from_secs(10));
        std::thread::sleep(StdDuration::from_millis(20));
    }
    site.sim.revoke_tokens();
    let out = handle.join().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("bearer token refused; fetching a new one"), "{text}");
    let st = site.sim.state();
    assert_eq!(st.token_requests, 2);
    let statuses: Vec<u16> = st.received("$providePatientData").iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![200, 401, 200]);
}

#[test]
fn a_wrong_client_secret_is_reported_without_echoing_it() {
    let site = oauth_site(None, "not-the-secret-xyz", 3600);
    let (code, out) = site.cycle();
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("authentication failed: token endpoint: HTTP 401 (invalid_grant)"),
        "{out}"
    );
    assert!(!out.contains("not-the-secret-xyz"));
}
