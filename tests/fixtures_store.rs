//! The store written by the journal-and-snapshot engine before the
//! database (tests/fixtures/store-v1, see its README) is migrated by its
//! first open: same ledger, same patients and pseudonyms, the migration in
//! an intact audit log, the old files kept as *.v1, and the next cycle
//! against the simulator works. A crash at any point of the migration
//! leaves the old store usable or the new one complete.

// (A test or benchmark stops at what it cannot set up: the panic is the report.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use fttp_agent::crypto::StoreKey;
use fttp_agent::sim::{self, SimOptions, Simulator};
use fttp_agent::store::{LockMode, Store};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    site: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let site = dir.path().join("site");
        copy_dir(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-v1"),
            &site,
        );
        for (file, mode) in [("store.key", 0o600), ("store", 0o700), ("audit.ndjson", 0o600)] {
            std::fs::set_permissions(site.join(file), std::fs::Permissions::from_mode(mode)).unwrap();
        }
        Fixture { _dir: dir, site }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = common::agent();
        c.current_dir(&self.site)
            .env_remove("FTTP_AGENT_CONFIG")
            .env_remove("FTTP_AGENT_API_KEY")
            .env_remove("FTTP_AGENT_CRASH_AT")
            .args(["--config", "fttp-agent.toml"])
            .args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn store_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.site.join("store"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "LOCK" && !n.ends_with("-shm") && !n.ends_with("-wal"))
            .collect();
        names.sort();
        names
    }

    /// Patients and pseudonyms as `expected-store.txt` lists them (made with
    /// the release before the database, see the fixture's README).
    fn contents(&self) -> String {
        let key = StoreKey::load(&self.site.join("store.key")).unwrap();
        let store = Store::open(&self.site.join("store"), LockMode::Read, key).unwrap();
        let mut lines = Vec::new();
        for p in store.all_patients().unwrap() {
            let bf = p.bloomfilter.map_or_else(|| "-".into(), |b| b.fingerprint());
            lines.push(format!("patient {} {bf}", p.local_id.0));
        }
        for p in store.all_pseudonyms().unwrap() {
            lines.push(format!(
                "pseudonym {} {} {} {} {}",
                p.target,
                p.bloomfilter.fingerprint(),
                p.pseudonym.system.unwrap_or_default(),
                p.pseudonym.value,
                p.source
            ));
        }
        lines.sort();
        lines.join("\n") + "\n"
    }

    fn audit_records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.site.join("audit.ndjson"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn point_at(&self, sim: &Simulator) {
        let path = self.site.join("fttp-agent.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let url_line = text.lines().find(|l| l.starts_with("url = ")).unwrap().to_string();
        std::fs::write(&path, text.replace(&url_line, &format!("url = \"{}\"", sim.url()))).unwrap();
    }
}

fn expected(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/store-v1")
            .join(name),
    )
    .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// What a migrated fixture must show.
fn assert_migrated(f: &Fixture) {
    let out = f.run(&["tasks", "--format", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // The same tasks, now keyed in the configured study (the store was
    // written before several studies: its tasks are that study's).
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        expected("expected-tasks.ndjson").replace("{\"key\":\"", "{\"key\":\"mii/")
    );
    let key = StoreKey::load(&f.site.join("store.key")).unwrap();
    let store = Store::open(&f.site.join("store"), LockMode::Read, key).unwrap();
    assert!(!store.needs_study());
    let studies: Vec<String> = store.all_pseudonyms().unwrap().into_iter().map(|p| p.study).collect();
    assert_eq!(studies, ["mii", "mii", "mii"]);
    assert_eq!(store.last_polls().keys().collect::<Vec<_>>(), ["mii"]);
    drop(store);
    let assigned = f
        .audit_records()
        .into_iter()
        .filter(|r| r["kind"] == "store" && r["outcome"] == "study_assigned")
        .count();
    assert_eq!(assigned, 1, "the study is assigned once, audited");
    assert_eq!(f.contents(), expected("expected-store.txt"));
    assert_eq!(
        f.store_files(),
        ["journal.v1", "snapshot.v1", "store.sqlite3"],
        "the old files are kept, renamed"
    );
    let migrated: Vec<_> = f
        .audit_records()
        .into_iter()
        .filter(|r| r["kind"] == "store" && r["outcome"] == "migrated")
        .collect();
    assert_eq!(migrated.len(), 1, "the migration is audited once");
    let detail = migrated[0]["detail"].as_str().unwrap();
    assert!(detail.contains("4 patient(s), 3 pseudonym(s)"), "{detail}");
    let out = f.run(&["audit", "verify", "audit.ndjson"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn the_v1_fixture_store_is_migrated_once_and_loses_nothing() {
    let f = Fixture::new();
    assert_eq!(f.store_files(), ["journal", "snapshot"]);
    assert_migrated(&f);
    let out = f.run(&["check", "--offline"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("store: ok (4 patient(s)"), "{}", text(&out));
    // A second open migrates nothing again.
    assert_migrated(&f);

    // The next cycle against the simulator works, on the migrated store.
    let sim = Simulator::start(SimOptions {
        api_key: "demo-api-key".into(),
        ..SimOptions::default()
    })
    .unwrap();
    f.point_at(&sim);
    let bf = f
        .contents()
        .lines()
        .find(|l| l.starts_with("patient p-002"))
        .map(str::to_string)
        .unwrap();
    assert!(bf.contains("bf:"), "{bf}");
    // A pseudonym for a patient the old store held, by its Bloom filter.
    let key = StoreKey::load(&f.site.join("store.key")).unwrap();
    let store = Store::open(&f.site.join("store"), LockMode::Read, key).unwrap();
    let p2 = store
        .patient(&fttp_agent::types::LocalId("p-002".into()))
        .unwrap()
        .unwrap();
    drop(store);
    let b64 = p2.bloomfilter.unwrap().to_base64();
    sim.add_task(sim::dic_psn_available(&b64, "dic_demo", "mii_AFTER", None));
    let out = f.run(&["run", "--once"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(f.contents().contains("mii_AFTER"), "{}", f.contents());
    let out = f.run(&["audit", "verify", "audit.ndjson"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn a_crash_during_the_migration_leaves_the_old_store_or_the_new_one() {
    for point in fttp_agent::crashpoint::MIGRATION_POINTS {
        let f = Fixture::new();
        let status = f
            .command(&["tasks"])
            .env("FTTP_AGENT_CRASH_AT", point)
            .output()
            .unwrap()
            .status;
        assert_eq!(status.signal(), Some(9), "{point} was never reached");
        // Before the rename the old files are the store; after it the new
        // one is complete and the old ones are still there, unaudited.
        let files = f.store_files();
        assert!(files.contains(&"journal".to_string()), "{point}: {files:?}");
        assert!(files.contains(&"snapshot".to_string()), "{point}: {files:?}");
        // The next open finishes the job, exactly once.
        assert_migrated(&f);
    }
}

#[test]
fn a_migration_that_cannot_read_the_old_files_changes_nothing() {
    let f = Fixture::new();
    let snapshot = f.site.join("store/snapshot");
    let mut bytes = std::fs::read(&snapshot).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(&snapshot, &bytes).unwrap();
    let out = f.run(&["tasks"]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(
        text(&out).contains("snapshot") && text(&out).contains("damaged"),
        "{}",
        text(&out)
    );
    assert_eq!(f.store_files(), ["journal", "snapshot"], "no database is left behind");
    assert_eq!(std::fs::read(&snapshot).unwrap(), bytes);
}
