//! What a site admin meets (issue 20): no silent data loss, and every
//! failure visible to monitoring. Each case was first reproduced here.

// (A test or benchmark stops at what it cannot set up: the panic is the report.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Site;
use std::path::Path;
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = common::agent();
    c.env_remove("FTTP_AGENT_API_KEY")
        .env_remove("FTTP_AGENT_CONFIG")
        .env_remove("FTTP_AGENT_STORE_KEY_FILE");
    c
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn demo_never_touches_a_directory_it_did_not_make_nor_deletes_a_store() {
    // A site's config directory.
    let site_dir = tempfile::tempdir().unwrap();
    let config = site_dir.path().join("fttp-agent.toml");
    std::fs::write(&config, "# the site's own config\n").unwrap();
    std::fs::create_dir(site_dir.path().join("store")).unwrap();
    std::fs::write(site_dir.path().join("store/journal"), "precious").unwrap();
    let out = bin().arg("demo").arg("--dir").arg(site_dir.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("is not empty and was not made by `demo`"),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), "# the site's own config\n");
    assert_eq!(
        std::fs::read_to_string(site_dir.path().join("store/journal")).unwrap(),
        "precious"
    );

    // An empty directory is fine, once; its store is then never deleted.
    let empty = tempfile::tempdir().unwrap();
    let out = bin().arg("demo").arg("--dir").arg(empty.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = bin().arg("demo").arg("--dir").arg(empty.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("holds the store of an earlier demo"),
        "{}",
        text(&out)
    );
    assert!(empty.path().join("store").exists());
}

#[test]
fn rekey_refuses_while_the_daemon_runs_and_a_second_daemon_is_refused() {
    let site = Site::new("xml");
    site.import_patients();
    let daemon = site.daemon("1h");
    // Wait until the daemon has taken its lock (its first cycle polled).
    let started = std::time::Instant::now();
    while site.sim.state().received("$requestTasks").is_empty() {
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let new_key = site.dir.path().join("new.key");
    fttp_agent::crypto::StoreKey::generate(&new_key).unwrap();
    let out = site.run(&["rekey", "--new-key", new_key.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(75), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "a daemon (pid {}) uses this store: stop it first",
            daemon.id()
        )),
        "{}",
        text(&out)
    );
    let second = site.run(&["run"]);
    assert_eq!(second.status.code(), Some(75), "{}", text(&second));
    assert!(text(&second).contains("a daemon (pid"), "{}", text(&second));
    common::stop_daemon(daemon);
    // Stopped: rekey goes through.
    let out = site.run(&["rekey", "--new-key", new_key.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn a_reader_that_stops_early_ends_the_output_quietly() {
    let site = Site::new("xml");
    site.import_patients();
    for n in 0..200 {
        site.sim.add_task(fttp_agent::sim::send_idat(
            &format!("t{n}"),
            chrono::Utc::now() + chrono::Duration::days(1),
            None,
            Some(&common::bf(1 + n % 3)),
            &[fttp_agent::fhir::idat::IdatElement::Given],
        ));
    }
    site.cycle();
    let out = common::without_agent_env(&mut Command::new("bash"))
        .arg("-c")
        .arg("\"$0\" --config \"$1\" tasks --format json | head -1 >/dev/null; echo \"${PIPESTATUS[0]}\"")
        .arg(env!("CARGO_BIN_EXE_fttp-agent"))
        .arg(&site.config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_missing_config_names_both_places_and_a_missing_import_file_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin().current_dir(dir.path()).arg("check").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("neither ./fttp-agent.toml nor /etc/fttp-agent/config.toml exists"),
        "{}",
        text(&out)
    );
    let site = Site::new("xml");
    let out = site.run(&["import", "/nonexistent/patients.csv"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("/nonexistent/patients.csv"), "{}", text(&out));
}

#[test]
fn the_simulator_refuses_a_study_or_target_it_does_not_serve() {
    let options = fttp_agent::sim::SimOptions {
        study_target: Some(("other_study".into(), common::TARGET.into())),
        ..Default::default()
    };
    let site = Site::with("xml", options, "");
    let (code, out) = site.cycle();
    assert_eq!(code, 2, "a 404 to the poll is a configuration error: {out}");
    assert!(out.contains("HTTP 404"), "{out}");
}

#[test]
fn the_metrics_file_is_readable_by_others_and_always_has_the_expiry_gauge() {
    use std::os::unix::fs::PermissionsExt;
    let site = Site::new("xml");
    let config = std::fs::read_to_string(&site.config).unwrap() + "metrics = \"metrics.prom\"\n";
    std::fs::write(&site.config, config).unwrap();
    assert_eq!(site.cycle().0, 0);
    let path = site.dir.path().join("metrics.prom");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
    let metrics = std::fs::read_to_string(&path).unwrap();
    assert!(
        metrics.contains("fttp_agent_seconds_until_soonest_expiry +Inf"),
        "{metrics}"
    );
    // Read as another user (node_exporter's), where setpriv is there.
    if Path::new("/usr/bin/setpriv").exists() {
        std::fs::set_permissions(site.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout), metrics);
    }
}

#[test]
fn check_offline_creates_nothing_and_shows_durations_as_written() {
    let site = Site::new("xml");
    let config = std::fs::read_to_string(&site.config).unwrap() + "\n[schedule]\ninterval = \"6h\"\n";
    std::fs::write(&site.config, config).unwrap();
    let out = site.run(&["check", "--offline"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let shown = text(&out);
    assert!(shown.contains("schedule.interval") && shown.contains(" 6h"), "{shown}");
    assert!(!shown.contains("21600s"), "{shown}");
    assert!(shown.contains("store: not created yet"), "{shown}");
    assert!(shown.contains("dispatcher: not contacted (--offline)"), "{shown}");
    assert!(!site.dir.path().join("store").exists(), "nothing created");
    assert!(!site.dir.path().join("audit.ndjson").exists(), "nothing created");
    assert!(site.sim.state().received.is_empty(), "the dispatcher was contacted");
    // A key others can read fails it, with the fix.
    use std::os::unix::fs::PermissionsExt;
    let key = site.dir.path().join("store.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = site.run(&["check", "--offline"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("chmod 600"));
}

/// Sets the last successful poll in the store `ago` back, as an agent that
/// stopped polling leaves it.
fn stop_polling_since(site: &Site, ago: chrono::Duration) {
    let mut store = site.store();
    let mut poll = store.last_poll().unwrap().clone();
    poll.at = chrono::Utc::now();
    poll.last_ok = Some(chrono::Utc::now() - ago);
    store.put(fttp_agent::store::Record::Poll(poll)).unwrap();
}

#[test]
fn status_sees_an_agent_that_stopped_polling_and_never_waits_for_a_cycle() {
    let site = Site::new("xml");
    assert_eq!(site.cycle().0, 0);
    let out = site.run(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("next poll:            unknown (not a daemon"),
        "{}",
        text(&out)
    );
    // Default stale_after: 2 x 6h + 1h.
    stop_polling_since(&site, chrono::Duration::hours(14));
    let out = site.run(&["status"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("CRITICAL: no successful poll for 14h") && text(&out).contains("stale_after 13h"),
        "{}",
        text(&out)
    );

    // A cycle holding the store (a slow dispatcher): status answers at once.
    site.sim.push(
        Some("$requestTasks"),
        fttp_agent::sim::FaultKind::Delay(std::time::Duration::from_secs(4)),
    );
    let mut cycle = common::agent()
        .arg("--config")
        .arg(&site.config)
        .args(["run", "--once"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // (Once the simulator holds the poll, the cycle holds the store.)
    let start = std::time::Instant::now();
    while site.sim.state().delayed == 0 {
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let asked = std::time::Instant::now();
    let out = site.run(&["status"]);
    let took = asked.elapsed();
    assert!(took < std::time::Duration::from_secs(3), "status waited {took:?}");
    assert!(text(&out).contains("a cycle is running"), "{}", text(&out));
    // Readers of the store do not wait for the cycle either: `tasks` and
    // a backup's copy come from its last committed write. (The backup's
    // audit record waits for the cycle: the audit log has one writer.)
    let asked = std::time::Instant::now();
    let out = site.run(&["tasks"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let backup = site.dir.path().join("backup-during-cycle");
    let mut backing_up = bin()
        .arg("--config")
        .arg(&site.config)
        .args(["backup", backup.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut copied = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(backing_up.stdout.take().unwrap()),
        &mut copied,
    )
    .unwrap();
    assert!(copied.starts_with("store copied to"), "{copied}");
    let took = asked.elapsed();
    assert!(took < std::time::Duration::from_secs(2), "readers waited {took:?}");
    assert!(
        cycle.try_wait().unwrap().is_none(),
        "the cycle was still running while they read"
    );
    cycle.wait().unwrap();
    assert_eq!(backing_up.wait().unwrap().code(), Some(0));
    // One writer at a time: the chain is whole, the backup in it.
    let audit = site.dir.path().join("audit.ndjson");
    let (code, out) = common::verify(&[&audit], None);
    assert_eq!(code, 0, "{out}");
    assert!(std::fs::read_to_string(&audit).unwrap().contains("backed_up"));

    // A store that cannot be read is critical, and says why.
    std::fs::write(site.dir.path().join("store.key"), "not a key\n").unwrap();
    let out = site.run(&["status"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("CRITICAL: cannot read the store"), "{}", text(&out));
}

#[test]
fn status_lists_twenty_open_tasks_unless_asked_for_all() {
    let site = Site::new("xml");
    for n in 0..30 {
        site.sim.add_task(fttp_agent::sim::send_idat(
            &format!("u{n}"),
            chrono::Utc::now() + chrono::Duration::days(3),
            None,
            Some(&common::bf(9)),
            &[fttp_agent::fhir::idat::IdatElement::Given],
        ));
    }
    assert_eq!(site.cycle().0, 1);
    let out = site.run(&["status"]);
    let shown = text(&out);
    assert!(shown.contains("open tasks: 30"), "{shown}");
    assert_eq!(shown.matches("send_idat ").count(), 20, "{shown}");
    assert!(shown.contains("... and 10 more (`status --all`"), "{shown}");
    let out = site.run(&["status", "--all"]);
    assert_eq!(text(&out).matches("send_idat ").count(), 30);
}

#[test]
fn run_once_purges_once_a_day_without_extra_units() {
    let site = Site::new("xml");
    site.import_patients();
    site.sim.add_task(fttp_agent::sim::send_idat(
        "old",
        chrono::Utc::now() + chrono::Duration::days(1),
        None,
        Some(&common::bf(1)),
        &[fttp_agent::fhir::idat::IdatElement::Given],
    ));
    let config = std::fs::read_to_string(&site.config)
        .unwrap()
        .replace("[store]\n", "[store]\nretention = \"1s\"\n");
    std::fs::write(&site.config, config).unwrap();
    assert_eq!(site.cycle().0, 0);
    std::thread::sleep(std::time::Duration::from_millis(1200));
    // The first cycle of the day purged (nothing old yet); the next ones
    // of the same day do not.
    site.cycle();
    assert!(site.store().ledger("mii/task:old").is_some(), "purged twice in one day");
    let purges = site.audit().iter().filter(|r| r["kind"] == "purge").count();
    assert_eq!(purges, 0);
    // A day later (as the heartbeat tells), the next cycle purges.
    let hb_path = site.dir.path().join("store/heartbeat.json");
    let mut hb: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&hb_path).unwrap()).unwrap();
    hb["last_purge"] = (chrono::Utc::now() - chrono::Duration::hours(25)).to_rfc3339().into();
    std::fs::write(&hb_path, hb.to_string()).unwrap();
    site.cycle();
    assert!(site.store().ledger("mii/task:old").is_none(), "not purged");
    assert!(site.audit().iter().any(|r| r["kind"] == "purge" && r["tasks"] == 1));
}

#[test]
fn a_condition_is_one_summary_line_per_cycle_not_one_per_task() {
    let site = Site::new("xml");
    let config = std::fs::read_to_string(&site.config)
        .unwrap()
        .replace("level = \"debug\"", "level = \"info\"");
    std::fs::write(&site.config, config).unwrap();
    for n in 0..40 {
        site.sim.add_task(fttp_agent::sim::send_idat(
            &format!("w{n}"),
            chrono::Utc::now() + chrono::Duration::days(3),
            None,
            Some(&common::bf(9)),
            &[fttp_agent::fhir::idat::IdatElement::Given],
        ));
    }
    for _ in 0..2 {
        assert_eq!(site.cycle().0, 1);
    }
    let log = std::fs::read_to_string(site.dir.path().join("agent.log")).unwrap();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("unknown_patient") && !l.contains("cycle done"))
        .collect();
    assert_eq!(lines.len(), 2, "one per cycle: {lines:#?}");
    assert!(
        lines[0].contains("WARN") && lines[0].contains("40 task(s) unknown_patient (send_idat 40)"),
        "{lines:#?}"
    );
}

#[test]
fn an_unclosed_quote_reports_every_line_it_swallowed_and_a_repeated_id_both_lines() {
    let site = Site::new("xml");
    let b = |n| common::bf(n);
    let csv = format!(
        "local_id,bloomfilter,given,family\n\
         a1,{},Anna,Muster\n\
         a2,{},\"Bert,Muster\n\
         a3,{},Cora,Muster\n\
         a4,{},Dora,Muster\n",
        b(1),
        b(2),
        b(3),
        b(4)
    );
    let file = site.dir.path().join("broken.csv");
    std::fs::write(&file, csv).unwrap();
    let out = site.run(&["import", file.to_str().unwrap()]);
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(
        shown.contains("broken.csv:3: skipped: quoted field not closed at line 3; lines 3-5 not imported"),
        "{shown}"
    );
    assert!(
        shown.contains("1 added, 0 updated, 0 unchanged, 1 skipped (3 line(s) not imported)"),
        "{shown}"
    );

    let csv = format!(
        "local_id,bloomfilter,given,family\nd1,{},Anna,Muster\nd2,{},Bert,Muster\nd1,{},Anna,Mustermann\n",
        b(1),
        b(2),
        b(1)
    );
    let file = site.dir.path().join("twice.csv");
    std::fs::write(&file, csv).unwrap();
    let out = site.run(&["import", file.to_str().unwrap()]);
    let shown = text(&out);
    assert!(
        shown.contains("twice.csv:4: the same local_id as line 2; this later row wins"),
        "{shown}"
    );
    let store = site.store();
    let p = store
        .patient(&fttp_agent::types::LocalId("d1".into()))
        .unwrap()
        .unwrap();
    assert_eq!(p.idat.family.as_deref(), Some("Mustermann"));
}

#[test]
fn an_admin_command_as_another_user_is_refused_before_it_writes() {
    use std::os::unix::fs::MetadataExt;
    let site = Site::new("xml");
    site.import_patients();
    assert_eq!(site.cycle().0, 0);
    // The service user's files (nobody stands in for fttp-agent here).
    let nobody = 65534;
    let store = site.dir.path().join("store");
    let audit = site.dir.path().join("audit.ndjson");
    for entry in std::fs::read_dir(&store).unwrap() {
        std::os::unix::fs::chown(entry.unwrap().path(), Some(nobody), Some(nobody)).unwrap();
    }
    std::os::unix::fs::chown(&store, Some(nobody), Some(nobody)).unwrap();
    std::os::unix::fs::chown(&audit, Some(nobody), Some(nobody)).unwrap();
    // Every file of the store: its owner and size.
    let listing = || -> Vec<(std::path::PathBuf, u32, u64)> {
        let mut files: Vec<_> = std::fs::read_dir(&store)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let m = e.metadata().unwrap();
                (e.path(), m.uid(), m.len())
            })
            .collect();
        files.sort();
        files
    };
    let before = listing();
    // Run as root (the test's user), as an admin might.
    let csv = site.dir.path().join("patients.csv");
    for args in [
        vec!["import", csv.to_str().unwrap()],
        vec!["forget", "p1"],
        vec!["purge"],
        vec!["run", "--once"],
    ] {
        let out = site.run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(
            text(&out).contains("belongs to user nobody, but this command runs as root")
                && text(&out).contains("sudo -u nobody fttp-agent"),
            "{args:?}: {}",
            text(&out)
        );
    }
    assert_eq!(before, listing(), "nothing written, no root-owned file left");
    assert_eq!(std::fs::metadata(&audit).unwrap().uid(), nobody);
}

#[test]
fn a_forgotten_patient_is_not_brought_back_by_the_next_import_nor_enrolled() {
    let site = Site::new("xml");
    site.import_patients();
    let out = site.run(&["forget", "p1"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // The hospital's regular export still holds her.
    let csv = site.dir.path().join("patients.csv");
    let out = site.run(&["import", csv.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("1 row(s) of erased patients left out"),
        "{}",
        text(&out)
    );
    let id = fttp_agent::types::LocalId("p1".into());
    assert!(site.store().patient(&id).unwrap().is_none());
    let out = site.run(&["enroll"]);
    assert!(text(&out).contains("2 sent"), "{}", text(&out));
    let sent: Vec<String> = site
        .sim
        .state()
        .received("$requestPsnFromBfWorkflow")
        .iter()
        .flat_map(|r| {
            r.parameters
                .as_ref()
                .unwrap()
                .get("bloomfilter")
                .filter_map(|x| x.value.as_ref().and_then(|v| v.as_str()).map(str::to_string))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(!sent.contains(&common::bf(1)), "her filter was sent");
    // The tombstone holds no IDAT and no plain local id.
    for entry in std::fs::read_dir(site.dir.path().join("store")).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains("Erika") && !text.contains("Mustermann"));
    }
    // A mistaken erasure is taken back: the next import brings her back.
    let out = site.run(&["forget", "--undo", "p1"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = site.run(&["import", csv.to_str().unwrap()]);
    assert!(text(&out).contains("1 added"), "{}", text(&out));
    assert!(site.store().patient(&id).unwrap().is_some());
    let outcomes = site.audit_outcomes("forget");
    assert_eq!(outcomes, ["erased", "undone"]);
    // The tombstones survive a rekey.
    site.run(&["forget", "p1"]);
    let new_key = site.dir.path().join("new.key");
    fttp_agent::crypto::StoreKey::generate(&new_key).unwrap();
    assert_eq!(
        site.run(&["rekey", "--new-key", new_key.to_str().unwrap()])
            .status
            .code(),
        Some(0)
    );
    std::fs::rename(&new_key, site.dir.path().join("store.key")).unwrap();
    let out = site.run(&["import", csv.to_str().unwrap()]);
    assert!(
        text(&out).contains("1 row(s) of erased patients left out"),
        "{}",
        text(&out)
    );
}

#[test]
fn an_old_config_with_compact_after_gets_a_warning_not_an_error() {
    let site = Site::with("xml", Default::default(), "compact_after = 1");
    assert!(
        std::fs::read_to_string(&site.config)
            .unwrap()
            .contains("compact_after = 1")
    );
    let out = site.run(&["check", "--offline"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("[store] compact_after is no longer used"),
        "{}",
        text(&out)
    );
}
