//! A test site: a temp directory with config, store and logs, the real
//! simulator on loopback, and the real binary.
#![allow(dead_code)]

use fttp_agent::demo::sample_bloomfilter;
use fttp_agent::sim::{SimOptions, Simulator};
use fttp_agent::store::{LockMode, Store};
use std::path::PathBuf;
use std::process::{Command, Output};

pub mod hostile;
pub mod net;

pub const KEY: &str = "test-key-8f3a1c";
pub const STUDY: &str = "mii";
pub const TARGET: &str = "dic_test";

pub struct Site {
    pub dir: tempfile::TempDir,
    pub sim: Simulator,
    pub config: PathBuf,
}

/// Patients 1..=4 of the sample set, with these names (all invented).
pub const PATIENTS: &str = "local_id,bloomfilter,given,family,prefix,suffix,birthdate,gender,address_line,address_city,address_postalcode,birthplace,maidenname,degree,language,nationality,maritalstatus
p1,{bf1},Erika,Mustermann,,,1964-08-12,f,Heidestr. 17,Koeln,51147,Berlin,Gabler,,de,DE,M
p2,{bf2},Maximilian,Musterfrau,,,1962-03-01,m,Hauptweg 9,Bonn,53111,Bonn,,Dr. rer. nat.,de,DE,M
p3,{bf3},Annabell,Schmidtke,,,1990-11-23,w,Lindenweg 3,Greifswald,17489,Rostock,,,de,DE,S
";

/// Writes a secret file readable by its owner only, as the agent demands.
pub fn write_private(path: impl AsRef<std::path::Path>, contents: impl AsRef<[u8]>) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path.as_ref(), contents).unwrap();
    std::fs::set_permissions(path.as_ref(), std::fs::Permissions::from_mode(0o600)).unwrap();
}

pub fn bf(n: u32) -> String {
    sample_bloomfilter(n).to_base64()
}

pub fn patients_csv() -> String {
    PATIENTS
        .replace("{bf1}", &bf(1))
        .replace("{bf2}", &bf(2))
        .replace("{bf3}", &bf(3))
}

/// Every identifying value of the sample patients, their Bloom filters and
/// the API key: none may appear in logs, audit records or output.
pub fn secrets() -> Vec<String> {
    let mut v: Vec<String> = [
        "Erika",
        "Mustermann",
        "1964-08-12",
        "Heidestr",
        "Gabler",
        "Maximilian",
        "Musterfrau",
        "1962-03-01",
        "Hauptweg",
        "Dr. rer. nat.",
        "Annabell",
        "Schmidtke",
        "1990-11-23",
        "Lindenweg",
        KEY,
    ]
    .iter()
    .map(std::string::ToString::to_string)
    .collect();
    v.extend((1..=5).map(bf));
    v
}

impl Site {
    pub fn new(format: &str) -> Site {
        Site::with(format, SimOptions::default(), "")
    }

    /// `extra` is appended to the [dispatcher] section.
    pub fn with(format: &str, mut options: SimOptions, extra: &str) -> Site {
        options.api_key = KEY.into();
        let sim = Simulator::start(options).expect("simulator starts");
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("fttp-agent.toml");
        let site = Site { dir, sim, config };
        site.write_config(format, KEY, extra);
        site
    }

    /// `extra`: `key = value` lines overriding the [dispatcher] defaults
    /// (`compact_after` goes to [store]).
    pub fn write_config(&self, format: &str, key: &str, extra: &str) {
        let mut dispatcher: Vec<(String, String)> = vec![
            ("url".into(), format!("\"{}\"", self.sim.url())),
            ("api_key".into(), format!("\"{key}\"")),
            ("format".into(), format!("\"{format}\"")),
            ("timeout".into(), "\"5s\"".into()),
            ("max_attempts".into(), "1".into()),
            ("retry_delay".into(), "\"10ms\"".into()),
        ];
        let key_file = self.dir.path().join("store.key");
        if !key_file.exists() {
            fttp_agent::crypto::StoreKey::generate(&key_file).unwrap();
        }
        let mut store = vec![
            ("path".to_string(), "\"store\"".to_string()),
            ("key_file".to_string(), "\"store.key\"".to_string()),
        ];
        for line in extra.lines().filter(|l| l.contains('=')) {
            let (k, v) = line.split_once('=').unwrap();
            let (k, v) = (k.trim().to_string(), v.trim().to_string());
            let section = if k == "compact_after" {
                &mut store
            } else {
                &mut dispatcher
            };
            section.retain(|(key, _)| *key != k);
            section.push((k, v));
        }
        let body = |kv: &[(String, String)]| kv.iter().map(|(k, v)| format!("{k} = {v}\n")).collect::<String>();
        let text = format!(
            "[dispatcher]\n{}\n[site]\nstudy = \"{STUDY}\"\ntarget = \"{TARGET}\"\n\n[store]\n{}\n\
             [log]\nfile = \"agent.log\"\nlevel = \"debug\"\naudit = \"audit.ndjson\"\n",
            body(&dispatcher),
            body(&store)
        );
        std::fs::write(&self.config, text).unwrap();
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let out = agent()
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("FTTP_AGENT_API_KEY")
            .env_remove("FTTP_AGENT_CONFIG")
            .output()
            .expect("binary runs");
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for s in secrets() {
            assert!(!all.contains(&s), "output of {args:?} leaks a secret: {all}");
        }
        out
    }

    /// Starts `run` as a daemon polling every `interval` (its stderr
    /// discarded); `stop_daemon` ends it.
    pub fn daemon(&self, interval: &str) -> std::process::Child {
        let text =
            std::fs::read_to_string(&self.config).unwrap() + &format!("\n[schedule]\ninterval = \"{interval}\"\n");
        std::fs::write(&self.config, text).unwrap();
        let log = self.dir.path().join("agent.log");
        let logged = || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .matches("daemon started")
                .count()
        };
        let before = logged();
        let mut child = agent()
            .arg("--config")
            .arg(&self.config)
            .arg("run")
            .env_remove("FTTP_AGENT_API_KEY")
            .env_remove("FTTP_AGENT_CONFIG")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Returned once it is up (its signal handlers installed): a SIGTERM
        // sent before then would end it as the default action does.
        let start = std::time::Instant::now();
        while logged() == before && start.elapsed() < std::time::Duration::from_secs(10) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child
    }

    pub fn cycle(&self) -> (i32, String) {
        let out = self.run(&["run", "--once"]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    }

    /// Queues a `repeat_request` for each `bf(n)`, expiring a day from now
    /// plus n minutes, so the agent works them in the order of n.
    pub fn queue_repeat_requests(&self, filters: std::ops::RangeInclusive<u32>) {
        let later = chrono::Utc::now() + chrono::Duration::days(1);
        for n in filters {
            self.sim.add_task(fttp_agent::sim::repeat_request(
                STUDY,
                &bf(n),
                TARGET,
                Some(later + chrono::Duration::minutes(i64::from(n))),
            ));
        }
    }

    pub fn import_patients(&self) {
        let path = self.dir.path().join("patients.csv");
        std::fs::write(&path, patients_csv()).unwrap();
        let out = self.run(&["import", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    }

    /// The site's store, as the test process sees it. Waits for the lock:
    /// another test thread's child may share the descriptor between fork
    /// and exec.
    pub fn store(&self) -> Store {
        let key = fttp_agent::crypto::StoreKey::load(&self.dir.path().join("store.key")).unwrap();
        Store::open(&self.dir.path().join("store"), LockMode::Wait, key).expect("store opens")
    }

    pub fn audit(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir.path().join("audit.ndjson")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }

    pub fn audit_outcomes(&self, kind: &str) -> Vec<String> {
        self.audit()
            .iter()
            .filter(|r| r["kind"] == kind)
            .map(|r| r["outcome"].as_str().unwrap_or("").to_string())
            .collect()
    }

    /// Asserts that nothing the agent wrote outside the store holds a secret.
    pub fn assert_no_leaks(&self) {
        for name in ["audit.ndjson", "agent.log"] {
            let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
            for s in secrets() {
                assert!(!text.contains(&s), "{name} leaks a secret");
            }
        }
    }
}

/// Stops a daemon with SIGTERM; checks that it exits 0 and returns how long
/// that took.
pub fn stop_daemon(mut daemon: std::process::Child) -> std::time::Duration {
    let stopping = std::time::Instant::now();
    let kill = Command::new("kill").arg(daemon.id().to_string()).status().unwrap();
    assert!(kill.success());
    assert_eq!(daemon.wait().unwrap().code(), Some(0));
    stopping.elapsed()
}

/// `fttp-agent audit verify FILES [--key K]`: exit code and all output.
pub fn verify(files: &[&std::path::Path], key: Option<&std::path::Path>) -> (i32, String) {
    verify_with(files, key, &[])
}

pub fn verify_with(files: &[&std::path::Path], key: Option<&std::path::Path>, flags: &[&str]) -> (i32, String) {
    let mut c = agent();
    c.env_remove("FTTP_AGENT_API_KEY")
        .env_remove("FTTP_AGENT_STORE_KEY_FILE");
    c.args(["audit", "verify"]).args(flags).args(files);
    if let Some(k) = key {
        c.arg("--key").arg(k);
    }
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

pub fn lines(p: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

pub fn write_lines(p: &std::path::Path, l: &[String]) {
    std::fs::write(p, l.join("\n") + "\n").unwrap();
}

pub const OTHER_KEY: &str = "napkon-key-2b7c";

/// Another study's dispatcher.
pub fn other_sim() -> Simulator {
    Simulator::start(SimOptions {
        api_key: OTHER_KEY.into(),
        ..SimOptions::default()
    })
    .unwrap()
}

/// The site's config rewritten to `[[study]]` form: `mii` at the site's
/// simulator, and each `(name, target, simulator, key)` after it.
pub fn with_studies(site: &Site, others: &[(&str, &str, &Simulator, &str)]) {
    let text = std::fs::read_to_string(&site.config).unwrap();
    let mut studies = format!("[[study]]\nname = \"{STUDY}\"\ntarget = \"{TARGET}\"\n\n");
    for (name, target, sim, key) in others {
        studies.push_str(&format!(
            "[[study]]\nname = \"{name}\"\ntarget = \"{target}\"\nurl = \"{}\"\napi_key = \"{key}\"\n\n",
            sim.url()
        ));
    }
    let site_section = format!("[site]\nstudy = \"{STUDY}\"\ntarget = \"{TARGET}\"\n");
    assert!(text.contains(&site_section));
    std::fs::write(&site.config, text.replace(&site_section, &studies)).unwrap();
}

/// A store built by real cycles with a pseudonym from every source: p1 by
/// a finished clearing (`mii_CLEARED`), p3 by a repeated request, p2 by
/// `enroll`; and `mii_NOBODY` for a filter no local patient has.
pub fn site_with_pseudonyms() -> Site {
    use fttp_agent::sim;
    let site = Site::new("json");
    site.import_patients();
    site.sim
        .add_task(sim::dic_psn_available(&bf(1), TARGET, "mii_CLEARED", None));
    site.sim.add_task(sim::repeat_request(
        STUDY,
        &bf(3),
        TARGET,
        Some(chrono::Utc::now() + chrono::Duration::days(1)),
    ));
    site.sim
        .add_task(sim::dic_psn_available(&bf(5), TARGET, "mii_NOBODY", None));
    assert!(site.cycle().0 <= 1);
    assert_eq!(site.run(&["enroll"]).status.code(), Some(0));
    site
}

/// The agent's binary, to be given its arguments: every test launches it
/// through this, with no `FTTP_AGENT_*` variable of the developer's shell
/// (a config, an API key, a key file) leaking into the run.
pub fn agent() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fttp-agent"));
    without_agent_env(&mut cmd);
    cmd
}

/// `cmd` without the `FTTP_AGENT_*` variables of the test's environment
/// (for a shell that starts the agent itself).
pub fn without_agent_env(cmd: &mut Command) -> &mut Command {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("FTTP_AGENT_") {
            cmd.env_remove(name);
        }
    }
    cmd
}
