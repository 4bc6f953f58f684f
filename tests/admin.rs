//! What a site admin meets (issue 20): no silent data loss, and every
//! failure visible to monitoring. Each case was first reproduced here.

mod common;

use common::Site;
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fttp-agent"));
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
