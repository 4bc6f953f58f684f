//! The status page (issue 24): written by `report --html` and served by the
//! local service, for stores built by real cycles against the simulator;
//! parsed as HTML (scraper, html5ever's parser) and, where Chromium is
//! installed, rendered by it headless.

// (A test or benchmark stops at what it cannot set up: the panic is the report.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chrono::{Duration, Utc};
use common::{OTHER_KEY, STUDY, Site, TARGET, bf, other_sim, with_studies};
use fttp_agent::fhir::idat::IdatElement;
use fttp_agent::sim::{self, Simulator};
use scraper::{Html, Selector};

/// Two studies: mii with a stored pseudonym, an expired task, a send that
/// fails and stays open (expiring before the next poll) and one that waits
/// well beyond it; napkon with a pseudonym, and then a failed poll.
fn busy_site() -> (Site, Simulator) {
    let site = Site::new("json");
    site.import_patients();
    let napkon = other_sim();
    with_studies(&site, &[("napkon", "dic_napkon", &napkon, OTHER_KEY)]);
    let now = Utc::now();
    site.sim
        .add_task(sim::dic_psn_available(&bf(1), TARGET, "mii_PAGE_P1", None));
    site.sim.add_task(sim::repeat_request(
        STUDY,
        &bf(3),
        TARGET,
        Some(now - Duration::minutes(5)),
    ));
    site.sim.add_task(sim::send_idat(
        "mii-soon",
        now + Duration::hours(2),
        None,
        Some(&bf(2)),
        &[IdatElement::Given],
    ));
    site.sim.push_fault(Some("$providePatientData"), 500, "busy");
    napkon.add_task(sim::dic_psn_available(&bf(2), "dic_napkon", "napkon_PAGE_P2", None));
    let (code, out) = site.cycle();
    assert_eq!(code, 1, "{out}");
    napkon.push_fault(Some("$requestTasks"), 503, "maintenance");
    site.sim.push_fault(Some("$providePatientData"), 500, "busy");
    let (code, out) = site.cycle();
    assert!(code >= 1, "{out}");
    // A daemon's heartbeat: the next poll in a day, after mii-soon expires.
    let hb_path = site.dir.path().join("store/heartbeat.json");
    let mut hb: serde_json::Value = serde_json::from_slice(&std::fs::read(&hb_path).unwrap()).unwrap();
    hb["next_poll"] = serde_json::json!((now + Duration::days(1)).to_rfc3339());
    std::fs::write(&hb_path, hb.to_string()).unwrap();
    (site, napkon)
}

fn report(site: &Site) -> String {
    let file = site.dir.path().join("status.html");
    let out = site.run(&["report", "--html", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o640);
    std::fs::read_to_string(file).unwrap()
}

fn select<'a>(doc: &'a Html, css: &str) -> Vec<scraper::ElementRef<'a>> {
    doc.select(&Selector::parse(css).unwrap()).collect()
}

fn text(e: &scraper::ElementRef<'_>) -> String {
    e.text().collect::<Vec<_>>().join(" ")
}

/// Nothing identifying: no name, birth date, Bloom filter or API key (the
/// site's secrets), no pseudonym, no local id.
fn assert_nothing_identifying(html: &str, site: &Site) {
    for s in common::secrets() {
        assert!(!html.contains(&s), "the page holds {s}");
    }
    for s in ["mii_PAGE_P1", "napkon_PAGE_P2", OTHER_KEY] {
        assert!(!html.contains(s), "the page holds {s}");
    }
    let ids = regex::Regex::new(r"\bp[1-5]\b").unwrap();
    assert!(!ids.is_match(html), "the page names a local id");
    // (And the pseudonyms the store holds, whatever they are.)
    let out = site.run(&["pseudonyms", "--format", "ndjson"]);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let p = row["pseudonym"].as_str().unwrap();
        assert!(!html.contains(p), "the page holds pseudonym {p}");
    }
}

#[test]
fn the_page_shows_each_study_its_open_tasks_and_history_and_nothing_identifying() {
    let (site, _napkon) = busy_site();
    let html = report(&site);
    let doc = Html::parse_document(&html);
    assert!(doc.errors.len() < 5, "{:?}", doc.errors);
    // The sections, each headed.
    assert_eq!(select(&doc, "section#summary h2").len(), 1);
    let studies = select(&doc, "section.study");
    assert_eq!(studies.len(), 2);
    assert_eq!(studies[0].value().attr("id"), Some("study-mii"));
    assert_eq!(studies[1].value().attr("id"), Some("study-napkon"));
    let summary = text(&select(&doc, "section#summary")[0]);
    assert!(summary.contains("intact:"), "{summary}");
    assert!(summary.contains("MB") && summary.contains("0.1.0"), "{summary}");
    assert!(summary.contains("UTC") && summary.contains("local"), "{summary}");
    // mii: its open task, late (it expires before the next poll), named by
    // kind, taskId and fingerprint; the expired one counted.
    let mii = &studies[0];
    let late = mii
        .select(&Selector::parse("tr.late").unwrap())
        .map(|r| text(&r))
        .collect::<Vec<_>>();
    assert_eq!(late.len(), 1, "{late:?}");
    assert!(
        late[0].contains("send_idat") && late[0].contains("mii-soon"),
        "{late:?}"
    );
    assert!(
        late[0].contains("bf:") && late[0].contains("before the next poll"),
        "{late:?}"
    );
    let counts = text(&mii.select(&Selector::parse("table").unwrap()).nth(1).unwrap());
    assert!(counts.contains("expired") && counts.contains("stored"), "{counts}");
    // Accessible: column headers, a chart with a title, its figures as a table.
    assert!(!select(&doc, "th[scope=col]").is_empty());
    let titles = select(&doc, "svg[role=img] > title");
    assert_eq!(titles.len(), 2);
    assert!(text(&titles[0]).contains("Task outcomes per day"));
    let rows = mii.select(&Selector::parse("details tbody tr").unwrap()).count();
    assert_eq!(rows, 30);
    // napkon: its failed poll.
    let napkon = text(&studies[1]);
    assert!(napkon.contains("failed") && napkon.contains("1 in a row"), "{napkon}");
    // Self-contained: no script, no external resource, no inline style
    // attribute (the policy allows only the page's own style block).
    assert!(select(&doc, "script, link, img, iframe, object").is_empty());
    assert!(!html.contains("style=\""));
    assert!(!html.contains("src=") && !html.contains("href="));
    assert_nothing_identifying(&html, &site);
}

#[test]
fn an_empty_store_gives_a_page_that_says_so() {
    let site = Site::new("xml");
    let html = report(&site);
    let doc = Html::parse_document(&html);
    let study = text(&select(&doc, "section.study")[0]);
    assert!(study.contains("never"), "{study}");
    assert!(study.contains("None."), "{study}");
    assert!(text(&select(&doc, "section#summary")[0]).contains("never polled"));
    assert_eq!(select(&doc, "tr.late").len(), 0);
}

#[test]
fn the_daemon_writes_the_page_after_every_cycle() {
    let site = Site::new("json");
    let page = site.dir.path().join("page.html");
    let text = std::fs::read_to_string(&site.config)
        .unwrap()
        .replace("[log]\n", "[log]\nreport = \"page.html\"\n");
    std::fs::write(&site.config, text).unwrap();
    let (code, out) = site.cycle();
    assert_eq!(code, 0, "{out}");
    assert!(
        std::fs::read_to_string(&page)
            .unwrap()
            .contains("section class=\"study\"")
    );
}

struct Service {
    child: std::process::Child,
    base: String,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(site: &Site, extra: &str) -> Service {
    common::write_private(site.dir.path().join("serve.pw"), "page-pw-31");
    let text = std::fs::read_to_string(&site.config).unwrap()
        + &format!(
            "\n[serve]\nlisten = \"127.0.0.1:0\"\nbasic_user = \"ops\"\nbasic_password_file = \"serve.pw\"\n{extra}\n"
        );
    std::fs::write(&site.config, text).unwrap();
    let log = site.dir.path().join("agent.log");
    let before = std::fs::read_to_string(&log).unwrap_or_default().len();
    let mut service = Service {
        child: common::agent()
            .arg("--config")
            .arg(&site.config)
            .arg("serve")
            .env_remove("FTTP_AGENT_CONFIG")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
        base: String::new(),
    };
    let started = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(at) = text[before..].find("local service listening on http://") {
            let rest = &text[before + at + "local service listening on http://".len()..];
            service.base = format!("http://{}", rest.split('/').next().unwrap());
            return service;
        }
        assert!(started.elapsed().as_secs() < 15, "no service: {}", &text[before..]);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn get(url: &str, auth: bool) -> (u16, Vec<(String, String)>, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut req = agent.get(url);
    if auth {
        use base64::Engine as _;
        req = req.header(
            "Authorization",
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("ops:page-pw-31")
            ),
        );
    }
    let mut resp = req.call().unwrap();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = resp.body_mut().read_to_string().unwrap_or_default();
    (resp.status().as_u16(), headers, body)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map_or("", |(_, v)| v.as_str())
}

#[test]
fn the_service_shows_the_page_health_and_metrics() {
    let (site, _napkon) = busy_site();
    let service = serve(&site, "");
    // The page: authenticated, with a strict policy.
    assert_eq!(get(&format!("{}/", service.base), false).0, 401);
    let (status, headers, html) = get(&format!("{}/", service.base), true);
    assert_eq!(status, 200);
    let csp = header(&headers, "content-security-policy");
    assert!(
        csp.starts_with("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe-inline"));
    assert!(header(&headers, "content-type").starts_with("text/html"));
    assert!(html.contains("id=\"study-napkon\""));
    assert_nothing_identifying(&html, &site);
    // /health: critical here (a task expires before the next poll): 503.
    let (status, _, body) = get(&format!("{}/health", service.base), true);
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["health"],
        "critical"
    );
    assert_eq!(get(&format!("{}/health", service.base), false).0, 401);
    // /metrics: the live figures, per study.
    let (status, headers, metrics) = get(&format!("{}/metrics", service.base), true);
    assert_eq!(status, 200);
    assert!(header(&headers, "content-type").starts_with("text/plain"));
    assert!(
        metrics.contains("fttp_agent_pending_tasks{study=\"mii\"} 1"),
        "{metrics}"
    );
    // (The last cycle reached a dispatcher, and took its time.)
    assert!(metrics.contains("fttp_agent_cycle_success 1"), "{metrics}");
    assert!(
        !metrics.contains("fttp_agent_cycle_duration_seconds 0.000"),
        "{metrics}"
    );
    drop(service);

    // A healthy store, /health public, the page switched off.
    let site = Site::new("json");
    site.sim.add_task(sim::dic_psn_available(&bf(1), TARGET, "mii_X", None));
    site.import_patients();
    assert_eq!(site.cycle().0, 0);
    let service = serve(&site, "health_public = true\nstatus_page = false");
    let (status, _, body) = get(&format!("{}/health", service.base), false);
    assert_eq!((status, body.contains("\"health\":\"ok\"")), (200, true), "{body}");
    assert_eq!(get(&format!("{}/", service.base), true).0, 404);
    assert_eq!(get(&format!("{}/metrics", service.base), false).0, 401);
}

/// Chromium, if installed (CI installs it and sets FTTP_REQUIRE_CHROMIUM).
fn chromium() -> Option<std::path::PathBuf> {
    let found = ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH")?
                .to_str()?
                .split(':')
                .map(|d| std::path::Path::new(d).join(name))
                .find(|p| p.exists())
        });
    if found.is_none() {
        assert!(
            std::env::var_os("FTTP_REQUIRE_CHROMIUM").is_none(),
            "FTTP_REQUIRE_CHROMIUM is set but no chromium is installed"
        );
        eprintln!("chromium is not installed: the rendering test is skipped");
    }
    found
}

#[test]
fn chromium_renders_the_page_without_errors_on_a_narrow_screen() {
    let Some(chromium) = chromium() else { return };
    let (site, _napkon) = busy_site();
    report(&site);
    let page = site.dir.path().join("status.html");
    let shot = site.dir.path().join("shot.png");
    let profile = site.dir.path().join("chromium-profile");
    let run = |extra: &[&str]| {
        std::process::Command::new(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--enable-logging=stderr",
                "--v=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(format!("file://{}", page.display()))
            .output()
            .unwrap()
    };
    let out = run(&[&format!("--screenshot={}", shot.display()), "--window-size=390,3000"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{} bytes", png.len());
    // The DOM as Chromium built it, and no console message: a violation of
    // the page's own policy, or a script or resource error, would be one.
    let out = run(&["--dump-dom"]);
    assert!(out.status.success());
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(dom.contains("id=\"study-mii\"") && dom.contains("<svg"), "{dom}");
    let log = String::from_utf8_lossy(&out.stderr);
    let console: Vec<&str> = log.lines().filter(|l| l.contains(":CONSOLE")).collect();
    assert!(console.is_empty(), "{console:?}");
}
