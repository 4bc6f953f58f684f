//! Security and privacy: the encrypted store, the audit chain, file modes,
//! no leaks anywhere, and exactly the requested IDAT elements on the wire.

// (A test or benchmark stops at what it cannot set up: the panic is the report.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chrono::{Duration, Utc};
use common::{Site, TARGET, bf, lines, secrets, verify, verify_with, write_lines};
use fttp_agent::fhir::idat::{Idat, IdatElement};
use fttp_agent::sim::{self, FaultKind, SimOptions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    let mut c = common::agent();
    c.env_remove("FTTP_AGENT_API_KEY")
        .env_remove("FTTP_AGENT_STORE_KEY_FILE");
    c
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// A site with a few cycles of history in its audit log.
fn site_with_history() -> Site {
    let site = Site::new("xml");
    site.import_patients();
    let later = Utc::now() + Duration::days(1);
    site.sim
        .add_task(sim::dic_psn_available(&bf(1), TARGET, "mii_A1", None));
    site.sim
        .add_task(sim::send_idat("s1", later, None, Some(&bf(2)), &[IdatElement::Given]));
    assert_eq!(site.cycle().0, 0);
    site.sim
        .add_task(sim::send_idat("s2", later, None, Some(&bf(3)), &[IdatElement::Family]));
    assert_eq!(site.cycle().0, 0);
    site
}

#[test]
fn audit_verify_names_the_first_edited_removed_inserted_or_reordered_line() {
    let site = site_with_history();
    let audit = site.dir.path().join("audit.ndjson");
    let (code, out) = verify(&[&audit], None);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("intact: 6 record(s)"), "{out}");
    let original = lines(&audit);

    // Edited.
    let mut l = original.clone();
    l[2] = l[2].replace("\"outcome\":\"", "\"outcome\":\"x");
    write_lines(&audit, &l);
    let (code, out) = verify(&[&audit], None);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("audit.ndjson:3: this record was edited"), "{out}");

    // Removed.
    let mut l = original.clone();
    l.remove(3);
    write_lines(&audit, &l);
    let (code, out) = verify(&[&audit], None);
    assert_eq!(code, 1);
    assert!(
        out.contains(":4: this record was inserted, or records before it were removed"),
        "{out}"
    );

    // Inserted (a copy of an earlier record).
    let mut l = original.clone();
    l.insert(4, original[1].clone());
    write_lines(&audit, &l);
    let (code, out) = verify(&[&audit], None);
    assert_eq!(code, 1);
    assert!(
        out.contains(":5: records before this line were removed or reordered"),
        "{out}"
    );

    // Reordered.
    let mut l = original.clone();
    l.swap(2, 3);
    write_lines(&audit, &l);
    let (code, out) = verify(&[&audit], None);
    assert_eq!(code, 1);
    assert!(out.contains(":3: "), "{out}");

    // Truncated mid-record.
    let mut l = original.clone();
    let cut = l[5].len() / 2;
    l[5].truncate(cut);
    write_lines(&audit, &l);
    let (code, out) = verify(&[&audit], None);
    assert_eq!(code, 1);
    assert!(out.contains(":6: not a JSON record"), "{out}");
}

#[test]
fn an_hmac_chain_cannot_be_forged_without_the_key() {
    let site = Site::new("xml");
    let key = site.dir.path().join("audit.key");
    assert_eq!(bin().arg("keygen").arg(&key).status().unwrap().code(), Some(0));
    let text = std::fs::read_to_string(&site.config)
        .unwrap()
        .replace("[log]\n", "[log]\naudit_hmac_key_file = \"audit.key\"\n");
    std::fs::write(&site.config, text).unwrap();
    site.import_patients();
    site.sim
        .add_task(sim::dic_psn_available(&bf(1), TARGET, "mii_H1", None));
    assert_eq!(site.cycle().0, 0);
    assert_eq!(site.cycle().0, 0);
    let audit = site.dir.path().join("audit.ndjson");
    assert_eq!(verify(&[&audit], Some(&key)).0, 0);
    let (code, out) = verify(&[&audit], None);
    assert_eq!(code, 1);
    assert!(out.contains("give the audit HMAC key"), "{out}");

    // A forger who can write the file edits a record and recomputes the
    // chain with plain SHA-256, keeping every link consistent.
    let mut prev = fttp_agent::audit::GENESIS.to_string();
    let mut forged = Vec::new();
    for (i, line) in lines(&audit).iter().enumerate() {
        let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line).unwrap();
        v.remove("hash");
        v.insert("prev".into(), prev.clone().into());
        if i == 1 {
            v.insert("outcome".into(), "failed".into());
        }
        let canonical = serde_json::to_string(&v).unwrap();
        let hash = fttp_agent::privacy::sha256_hex(canonical.as_bytes());
        v.insert("hash".into(), hash.clone().into());
        forged.push(serde_json::to_string(&v).unwrap());
        prev = hash;
    }
    write_lines(&audit, &forged);
    let (code, out) = verify(&[&audit], Some(&key));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(":1: this record was edited"), "{out}");
}

#[test]
fn a_rotated_log_continues_the_chain() {
    let site = site_with_history();
    let audit = site.dir.path().join("audit.ndjson");
    let old = site.dir.path().join("audit.ndjson.1");
    std::fs::rename(&audit, &old).unwrap();
    site.sim.add_task(sim::send_idat(
        "s3",
        Utc::now() + Duration::days(1),
        None,
        Some(&bf(1)),
        &[IdatElement::Gender],
    ));
    assert_eq!(site.cycle().0, 0);
    // Alone, the new file starts mid-way: the old one must be given too...
    let (code, out) = verify(&[&audit], None);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("the chain starts mid-way at record 7"), "{out}");
    // ...unless the older files are gone for good.
    let (code, out) = verify_with(&[&audit], None, &["--partial"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("continues the chain from"), "{out}");
    let (code, out) = verify(&[&old, &audit], None);
    assert_eq!(code, 0, "{out}");
    // 6 before, then a poll, the send and the repeated dic_psn_available.
    assert!(out.contains("intact: 9 record(s)"), "{out}");
    let (code, out) = verify(&[&audit, &old], None);
    assert_eq!(code, 1, "wrong order is a broken chain");
    assert!(
        out.contains(&format!(
            "the files are given in the wrong order: give them oldest first ({}, {})",
            old.display(),
            audit.display()
        )),
        "{out}"
    );
    // audit export reads the rotated file too, oldest first.
    let out = site.run(&["audit", "export"]);
    let exported: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(exported.len(), 9);
    let seqs: Vec<u64> = exported.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=9).collect::<Vec<u64>>());
}

#[test]
fn the_store_holds_no_idat_in_clear_and_a_wrong_key_changes_nothing() {
    let site = site_with_history();
    let store = site.dir.path().join("store");
    let all_bytes = |dir: &Path| -> Vec<u8> {
        let mut v = Vec::new();
        // LOCK only names the last holder's pid; a reader may leave SQLite's
        // shared-memory index and an empty log.
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| !p.ends_with("LOCK"))
            .filter(|p| !p.to_string_lossy().ends_with("-shm"))
            .filter(|p| !(p.to_string_lossy().ends_with("-wal") && p.metadata().unwrap().len() == 0))
            .collect();
        names.sort();
        for p in names {
            v.extend(std::fs::read(p).unwrap());
        }
        v
    };
    let raw = String::from_utf8_lossy(&all_bytes(&store)).to_string();
    for s in secrets() {
        assert!(!raw.contains(&s), "the store holds a secret in clear");
    }
    assert!(!raw.contains("mii_A1"), "pseudonyms are sealed too");

    // Another key: refused with a clear message, exit 2, nothing touched.
    let before = all_bytes(&store);
    let other = site.dir.path().join("other.key");
    assert_eq!(bin().arg("keygen").arg(&other).status().unwrap().code(), Some(0));
    let out = bin()
        .arg("--config")
        .arg(&site.config)
        .args(["run", "--once"])
        .env("FTTP_AGENT_STORE_KEY_FILE", &other)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("was written with store key") && err.contains("nothing was changed"),
        "{err}"
    );
    assert!(all_bytes(&store) == before);

    // A database of a newer schema (a newer build wrote it): refused the
    // same way, and no later cycle of a daemon retries it.
    let db = rusqlite::Connection::open(store.join("store.sqlite3")).unwrap();
    let current: u32 = db.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
    db.pragma_update(None, "user_version", current + 1).unwrap();
    drop(db);
    let before = all_bytes(&store);
    for args in [&["run", "--once"][..], &["run"][..]] {
        let out = bin().arg("--config").arg(&site.config).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(&format!(
                "has schema version {}, newer than this fttp-agent knows ({current})",
                current + 1
            )) && err.contains("nothing was changed"),
            "{err}"
        );
    }
    assert_eq!(all_bytes(&store), before);
}

#[test]
fn rekey_moves_the_store_to_a_new_key() {
    let site = site_with_history();
    let new_key = site.dir.path().join("new.key");
    assert_eq!(bin().arg("keygen").arg(&new_key).status().unwrap().code(), Some(0));
    // keygen never overwrites.
    assert_ne!(bin().arg("keygen").arg(&new_key).status().unwrap().code(), Some(0));
    assert_eq!(mode(&new_key), 0o600);
    let out = site.run(&["rekey", "--new-key", new_key.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    // The old key no longer opens it...
    let (code, out) = site.cycle();
    assert_eq!(code, 2, "{out}");
    // ...the new one does, with everything in it.
    let text = std::fs::read_to_string(&site.config)
        .unwrap()
        .replace("store.key", "new.key");
    std::fs::write(&site.config, text).unwrap();
    assert_eq!(site.cycle().0, 0);
    std::fs::copy(&new_key, site.dir.path().join("store.key.new")).unwrap();
    std::fs::remove_file(site.dir.path().join("store.key")).unwrap();
    std::fs::rename(site.dir.path().join("store.key.new"), site.dir.path().join("store.key")).unwrap();
    let store = site.store();
    assert_eq!(store.patient_count().unwrap(), 3);
    let p = store
        .patient_by_bloomfilter(&fttp_agent::types::BloomFilter::from_base64(&bf(2)).unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(p.idat.given.as_deref(), Some("Maximilian"));
    assert_eq!(store.all_pseudonyms().unwrap().len(), 1);
}

#[test]
fn files_the_agent_creates_are_private() {
    let site = site_with_history();
    let d = site.dir.path();
    assert_eq!(mode(&d.join("store")), 0o700);
    for f in [
        "store/store.sqlite3",
        "store/LOCK",
        "audit.ndjson",
        "audit.ndjson.head",
        "agent.log",
        "store.key",
    ] {
        assert_eq!(mode(&d.join(f)), 0o600, "{f}");
    }
}

#[test]
fn a_readable_config_with_an_inline_api_key_is_warned_about() {
    let site = Site::new("xml");
    std::fs::set_permissions(&site.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (_, out) = site.cycle();
    assert!(
        out.contains("holds an inline api_key and can be read by group or others"),
        "{out}"
    );
    std::fs::set_permissions(&site.config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (_, out) = site.cycle();
    assert!(!out.contains("inline api_key"), "{out}");
}

#[test]
fn no_secret_reaches_any_byte_written_outside_the_store_even_at_trace_level() {
    // One request at a time, so that the echo below answers the request
    // that sent what it echoes (as a gateway's would; with several at once
    // the simulator's queued fault could meet another patient's request).
    let site = Site::with("json", SimOptions::default(), "max_in_flight = 1");
    site.import_patients();
    let later = Utc::now() + Duration::days(1);
    let every: Vec<IdatElement> = IdatElement::ALL.to_vec();
    // leak-1 (Erika Mustermann) expires first, so it meets the failure below,
    // whose diagnostics echo what was sent in that request.
    site.sim
        .add_task(sim::send_idat("leak-1", later, None, Some(&bf(1)), &every));
    let later = later + Duration::hours(1);
    site.sim
        .add_task(sim::send_idat("leak-2", later, None, Some(&bf(2)), &every));
    site.sim
        .add_task(sim::send_idat("leak-3", later, None, Some(&bf(3)), &every));
    site.sim
        .add_task(sim::repeat_request("mii", &bf(2), TARGET, Some(later)));
    site.sim
        .add_task(sim::dic_psn_available(&bf(5), TARGET, "mii_LEAK", None));
    // Failures whose diagnostics echo what was sent.
    site.sim.push_fault(
        Some("$providePatientData"),
        422,
        "invalid family 'Mustermann' born 1964-08-12",
    );
    site.sim.push(
        Some("$requestPsnFromBfWorkflow"),
        FaultKind::Status {
            status: 400,
            diagnostics: format!("bad bloomfilter {}", bf(2)),
            retry_after: None,
        },
    );
    let mut outputs = String::new();
    for args in [
        vec!["--log-level", "trace", "run", "--once"],
        vec!["--log-level", "trace", "run", "--once"],
        vec!["--log-level", "trace", "tasks"],
        vec!["--log-level", "trace", "check"],
    ] {
        let out = site.run(&args); // Site::run asserts stdout and stderr are clean
        outputs.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    assert!(
        outputs.contains("[redacted]"),
        "the echoes were there to redact: {outputs}"
    );
    site.write_config("json", "wrong-key-ABCDEF", "");
    let out = site.run(&["--log-level", "trace", "run", "--once"]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("wrong-key-ABCDEF"));
    // Every file the agent wrote outside the (encrypted) store.
    for entry in std::fs::read_dir(site.dir.path()).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if p.is_dir() || name.ends_with(".toml") || name.ends_with(".csv") || name.ends_with(".key") {
            continue;
        }
        let text = String::from_utf8_lossy(&std::fs::read(&p).unwrap()).to_string();
        for s in secrets().iter().chain(["wrong-key-ABCDEF".to_string()].iter()) {
            assert!(!text.contains(s.as_str()), "{name} leaks a secret");
        }
    }
    // And inside the store, everything identifying is sealed.
    for entry in std::fs::read_dir(site.dir.path().join("store")).unwrap() {
        let text = String::from_utf8_lossy(&std::fs::read(entry.unwrap().path()).unwrap()).to_string();
        for s in secrets() {
            assert!(!text.contains(&s));
        }
    }
}

#[test]
fn each_idat_element_alone_and_all_together_is_sent_exactly() {
    let site = Site::new("xml");
    let csv = format!(
        "local_id,bloomfilter,given,family,prefix,suffix,birthdate,gender,address_line,address_city,address_postalcode,\
         birthplace,maidenname,degree,language,nationality,maritalstatus\n\
         full,{},Erika,Mustermann,Frau,Jr.,1964-08-12,f,Heidestr. 17,Koeln,51147,Berlin,Gabler,Dr. med.,de,DE,M\n",
        bf(1)
    );
    let path = site.dir.path().join("full.csv");
    std::fs::write(&path, csv).unwrap();
    assert_eq!(site.run(&["import", path.to_str().unwrap()]).status.code(), Some(0));
    let later = Utc::now() + Duration::days(1);
    let mut requests: Vec<Vec<IdatElement>> = IdatElement::ALL.iter().map(|e| vec![*e]).collect();
    requests.push(IdatElement::ALL.to_vec());
    requests.push(vec![
        IdatElement::Family,
        IdatElement::Maidenname,
        IdatElement::Degree,
        IdatElement::Prefix,
    ]);
    requests.push(vec![
        IdatElement::AddressCity,
        IdatElement::Birthplace,
        IdatElement::Nationality,
    ]);
    for (i, els) in requests.iter().enumerate() {
        site.sim
            .add_task(sim::send_idat(&format!("el-{i}"), later, None, Some(&bf(1)), els));
    }
    let (code, out) = site.cycle();
    assert_eq!(code, 0, "{out}");
    let st = site.sim.state();
    let sent = st.received("$providePatientData");
    assert_eq!(sent.len(), requests.len());
    for r in sent {
        let id = r.task_id().unwrap();
        let i: usize = id.trim_start_matches("el-").parse().unwrap();
        let mut want = requests[i].clone();
        want.sort();
        let got = Idat::from_patient(r.patient().unwrap());
        assert_eq!(got.present(), want, "task {id}");
        for e in &want {
            assert!(got.get(*e).is_some());
        }
    }
}

#[test]
fn secret_files_others_can_read_are_refused() {
    let site = Site::new("xml");
    let key_file = site.dir.path().join("api.key");
    common::write_private(&key_file, common::KEY);
    let text = std::fs::read_to_string(&site.config)
        .unwrap()
        .replace(&format!("api_key = \"{}\"", common::KEY), "api_key_file = \"api.key\"");
    std::fs::write(&site.config, text).unwrap();
    assert_eq!(site.cycle().0, 0);
    for (file, what) in [
        (key_file.clone(), "the API key file"),
        (site.dir.path().join("store.key"), "the key file"),
    ] {
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        let (code, out) = site.cycle();
        assert_eq!(code, 2, "{out}");
        assert!(
            out.contains(&format!(
                "{what} {} can be read or changed by group or others (mode 640)",
                file.display()
            )),
            "{out}"
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    assert_eq!(site.cycle().0, 0);
}

#[test]
fn the_running_agent_writes_no_core_dump() {
    let site = Site::new("xml");
    let mut daemon = site.daemon("1h");
    let limits = std::path::PathBuf::from(format!("/proc/{}/limits", daemon.id()));
    let started = std::time::Instant::now();
    // The soft limit may be 0 already (a common default); the hard limit
    // is what only the agent itself lowers.
    let disabled = loop {
        let text = std::fs::read_to_string(&limits).unwrap_or_default();
        let core: Vec<String> = text
            .lines()
            .find(|l| l.starts_with("Max core file size"))
            .map(|l| l.split_whitespace().skip(4).take(2).map(str::to_string).collect())
            .unwrap_or_default();
        if core == ["0", "0"] {
            break true;
        }
        if started.elapsed() > std::time::Duration::from_secs(10) {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    if !disabled {
        let _ = daemon.kill();
        panic!(
            "core dumps stay enabled: {}",
            std::fs::read_to_string(&limits).unwrap_or_default()
        );
    }
    common::stop_daemon(daemon);
}
