//! The store written by the journal-and-snapshot engine (tests/fixtures/
//! store-v1, see its README) opens with this release and shows the same
//! ledger: the reference for the migration to SQLite (issue 21).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

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

#[test]
fn the_v1_fixture_store_opens_and_shows_its_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("site");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-v1"),
        &site,
    );
    for (file, mode) in [("store.key", 0o600), ("store", 0o700), ("audit.ndjson", 0o600)] {
        std::fs::set_permissions(site.join(file), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_fttp-agent"))
            .current_dir(&site)
            .env_remove("FTTP_AGENT_CONFIG")
            .env_remove("FTTP_AGENT_API_KEY")
            .args(["--config", "fttp-agent.toml"])
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["tasks", "--format", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let expected = std::fs::read_to_string(site.join("expected-tasks.ndjson")).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
    let out = run(&["audit", "verify", "audit.ndjson"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    let out = run(&["check", "--offline"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("store: ok (4 patient(s)"), "{text}");
}
