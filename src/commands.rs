//! What each subcommand does. Every function returns an exit code or an
//! error; only `main` turns them into a process exit.

use crate::agent::{Agent, CycleReport};
use crate::audit::Audit;
use crate::client::Client;
use crate::config::Config;
use crate::error::{AppError, exit};
use crate::fhir::Format;
use crate::fhir::idat::Idat;
use crate::import::{ImportReport, import_file};
use crate::shutdown::Shutdown;
use crate::sim::{SimOptions, Simulator};
use crate::store::{LockMode, Status, Store, StoreError};
use crate::{demo, tasks::TaskKind};
use chrono::Utc;
use std::path::Path;
use std::time::Duration;

pub fn open_store(cfg: &Config, mode: LockMode) -> Result<Store, AppError> {
    let key = cfg.store_key()?;
    let mut store = Store::open(&cfg.store.path, mode, key)?;
    store.set_compact_after(cfg.store.compact_after);
    Ok(store)
}

/// One cycle with the store locked for its duration.
pub fn cycle(cfg: &Config, client: &Client, stop: Option<&Shutdown>) -> Result<CycleReport, AppError> {
    let mut store = open_store(cfg, LockMode::Try)?;
    let mut audit = Audit::open(&cfg.audit_path(), cfg.audit_chain()?)?;
    let mut agent = Agent::new(cfg, client, &mut store, &mut audit);
    if let Some(s) = stop {
        agent = agent.with_shutdown(s.clone());
    }
    Ok(agent.run_cycle()?)
}

fn report_exit(report: &CycleReport) -> u8 {
    let open = report.unresolved();
    let counts: Vec<String> = report.counts().iter().map(|(k, v)| format!("{k}={v}")).collect();
    log::info!(
        "cycle done: {} task(s) received; {}",
        report.received,
        if counts.is_empty() {
            "nothing to do".into()
        } else {
            counts.join(", ")
        }
    );
    if open > 0 {
        log::warn!("{open} task(s) remain open for the next cycle");
        exit::TASKS_OPEN
    } else {
        exit::OK
    }
}

pub fn run_once(cfg: &Config) -> Result<u8, AppError> {
    let client = Client::new(cfg)?;
    let report = cycle(cfg, &client, None)?;
    Ok(report_exit(&report))
}

/// The daemon loop: a cycle every `[schedule] interval`, sooner when an
/// open task would otherwise expire before the next poll. A failed cycle is
/// logged and does not end the loop; SIGTERM/SIGINT end it between cycles.
pub fn run_daemon(cfg: &Config) -> Result<u8, AppError> {
    let shutdown = Shutdown::install().map_err(|e| AppError::Other(format!("cannot install signal handlers: {e}")))?;
    let client = Client::new(cfg)?;
    let interval = cfg.schedule.interval.0;
    log::info!("daemon started; polling every {}", humanize(interval));
    while !shutdown.requested() {
        match cycle(cfg, &client, Some(&shutdown)) {
            Ok(report) => {
                report_exit(&report);
            }
            Err(AppError::Store(e @ StoreError::Locked { .. })) => log::warn!("skipping this cycle: {e}"),
            Err(e @ AppError::Config(_) | e @ AppError::Key(_) | e @ AppError::Store(StoreError::WrongKey { .. })) => {
                // Nothing a later cycle could fix by itself.
                return Err(e);
            }
            Err(e) => log::error!("cycle failed: {e}"),
        }
        let next = next_poll(cfg, interval);
        log::info!("next poll in {}", humanize(next));
        if !shutdown.sleep(next) {
            break;
        }
    }
    log::info!("shutting down");
    Ok(exit::OK)
}

fn next_poll(cfg: &Config, interval: Duration) -> Duration {
    let soonest = open_store(cfg, LockMode::Try).ok().and_then(|s| {
        s.ledger_entries()
            .filter(|e| !e.status.is_terminal())
            .filter_map(|e| e.expires)
            .min()
    });
    let left = soonest.and_then(|x| (x - Utc::now()).to_std().ok());
    poll_delay(interval, left, crate::retry::jitter())
}

/// The interval with up to ±10% jitter (`jitter` in [0, 1)), so that many
/// sites on one schedule do not hit the gateway at once; shortened so that
/// an open task expiring in `left` is tried again first (after half its
/// remaining time, at least a minute, never beyond the interval).
pub fn poll_delay(interval: Duration, left: Option<Duration>, jitter: f64) -> Duration {
    let interval = interval.mul_f64(0.9 + 0.2 * jitter);
    match left {
        Some(left) if left < interval => (left / 2).max(Duration::from_secs(60)).min(interval),
        _ => interval,
    }
}

fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        1..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

pub fn check(cfg: &Config) -> Result<u8, AppError> {
    println!("configuration: ok");
    for (k, v) in cfg.describe() {
        println!("  {k:<30} {v}");
    }
    let store = open_store(cfg, LockMode::Try)?;
    let patients = store.patient_count();
    let with_bf = store.patients_with_bloomfilter();
    let open = store.ledger_entries().filter(|e| !e.status.is_terminal()).count();
    println!(
        "store: ok ({patients} patient(s), {with_bf} with a Bloom filter, {} pseudonym(s), {} task(s) in the ledger, {open} open)",
        store.pseudonym_count(),
        store.ledger_entries().count()
    );
    drop(store);
    Audit::open(&cfg.audit_path(), cfg.audit_chain()?)?;
    println!("audit log: writable");
    let client = Client::new(cfg)?;
    // $requestTasks does not change state on the dispatcher (affectsState: false).
    match client.request_tasks(cfg.site.study.as_str(), cfg.site.target.as_str()) {
        Ok(p) => {
            println!(
                "dispatcher: reachable, API key accepted, {} task(s) waiting",
                p.parameter.len()
            );
            Ok(exit::OK)
        }
        Err(e) => {
            println!("dispatcher: FAILED: {e}");
            Ok(if e.is_auth() || e.is_unreachable() {
                exit::DISPATCHER
            } else {
                exit::CONFIG
            })
        }
    }
}

pub fn import(cfg: &Config, file: &Path) -> Result<u8, AppError> {
    let mut store = open_store(cfg, LockMode::Wait)?;
    let report = import_file(&mut store, file)?;
    print_import(file, &report);
    Ok(if report.errors.is_empty() {
        exit::OK
    } else {
        exit::TASKS_OPEN
    })
}

fn print_import(file: &Path, r: &ImportReport) {
    for (line, reason) in &r.errors {
        eprintln!("{}:{line}: skipped: {reason}", file.display());
    }
    println!(
        "import {}: {} added, {} updated, {} unchanged, {} skipped",
        file.display(),
        r.added,
        r.updated,
        r.unchanged,
        r.errors.len()
    );
}

pub fn tasks(cfg: &Config, status: Option<Status>, kind: Option<TaskKind>) -> Result<u8, AppError> {
    let store = open_store(cfg, LockMode::Wait)?;
    let mut entries: Vec<_> = store
        .ledger_entries()
        .filter(|e| status.is_none_or(|s| e.status == s))
        .filter(|e| kind.is_none_or(|k| e.kind == k))
        .collect();
    entries.sort_by_key(|e| (e.first_seen, e.key.clone()));
    println!(
        "{:<18} {:<38} {:<10} {:<16} {:<21} {:<21} detail",
        "kind", "task", "status", "outcome", "expires", "first seen"
    );
    let t = |d: chrono::DateTime<Utc>| d.format("%Y-%m-%d %H:%M:%SZ").to_string();
    for e in &entries {
        println!(
            "{:<18} {:<38} {:<10} {:<16} {:<21} {:<21} {}",
            e.kind.as_str(),
            e.display_id,
            e.status.as_str(),
            e.outcome,
            e.expires.map(t).unwrap_or_else(|| "-".into()),
            t(e.first_seen),
            e.detail.as_deref().unwrap_or("")
        );
    }
    println!("{} task(s)", entries.len());
    Ok(exit::OK)
}

pub fn demo(format: Format, dir: Option<&Path>) -> Result<u8, AppError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| AppError::Other(format!("demo: cannot {what}: {e}"))
    };
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => std::env::temp_dir().join(format!("fttp-agent-demo-{}", std::process::id())),
    };
    if dir.join("store").exists() {
        std::fs::remove_dir_all(dir.join("store")).map_err(io("clear the previous demo store"))?;
    }
    std::fs::create_dir_all(&dir).map_err(io("create the demo directory"))?;
    let sim = demo::start_simulator().map_err(io("start the simulated dispatcher"))?;
    demo::load_sample_tasks(&sim);
    println!("simulated dispatcher listening at {}", sim.url());

    let key = dir.join("store.key");
    if !key.exists() {
        crate::crypto::StoreKey::generate(&key)?;
    }
    let cfg_path = demo::write_config(&dir, sim.url(), format).map_err(io("write the demo config"))?;
    let cfg = Config::load(&cfg_path)?;
    let csv = dir.join("patients.csv");
    std::fs::write(&csv, demo::sample_csv()).map_err(io("write the sample patients"))?;
    {
        let mut store = open_store(&cfg, LockMode::Try)?;
        let report = import_file(&mut store, &csv)?;
        print_import(&csv, &report);
    }
    println!("running one cycle against the simulator ({})", format.mime());
    let client = Client::new(&cfg)?;
    let report = cycle(&cfg, &client, None)?;
    print!("{}", demo::summary(&report));

    let st = sim.state();
    println!("\nThe simulated dispatcher received:");
    for r in &st.received {
        let what = match r.patient() {
            Some(p) => {
                let codes: Vec<&str> = Idat::from_patient(p).present().iter().map(|e| e.code()).collect();
                format!(" (Patient with exactly: {})", codes.join(", "))
            }
            None => String::new(),
        };
        println!("  {:<28} HTTP {}{what}", r.operation, r.status);
    }
    println!("\nConfig, store and audit log of this demo are in {}", dir.display());
    Ok(report_exit(&report))
}

pub fn sim(options: SimOptions, sample_tasks: bool) -> Result<u8, AppError> {
    let key = options.api_key.clone();
    let header = options.api_key_header.clone();
    let sim = Simulator::start(options).map_err(|e| AppError::Other(format!("cannot start the simulator: {e}")))?;
    if sample_tasks {
        demo::load_sample_tasks(&sim);
    }
    println!("simulated dispatcher at {}", sim.url());
    println!(
        "API key header '{header}', key '{key}'; study '{}', target '{}'",
        demo::STUDY,
        demo::TARGET
    );
    println!("Ctrl-C to stop");
    sim.join();
    Ok(exit::OK)
}

pub fn audit_verify(files: &[std::path::PathBuf], key: Option<&Path>) -> Result<u8, AppError> {
    let chain = key.map(crate::audit::Chain::hmac_from_file).transpose()?;
    match crate::audit::verify(files, chain.as_ref())? {
        crate::audit::Verdict::Intact {
            records,
            continues_from,
        } => {
            println!("intact: {records} record(s), every hash and link checks out");
            if continues_from != crate::audit::GENESIS {
                println!("the first record continues the chain from {continues_from} (a rotated predecessor)");
            }
            Ok(exit::OK)
        }
        crate::audit::Verdict::Broken { file, line, reason } => {
            println!("BROKEN: {}:{line}: {reason}", file.display());
            Ok(exit::TASKS_OPEN)
        }
    }
}

pub fn keygen(path: &Path) -> Result<u8, AppError> {
    crate::crypto::StoreKey::generate(path)?;
    println!("wrote a new 256-bit store key to {} (mode 0600)", path.display());
    println!("keep a copy in a safe place: without it the store cannot be read");
    Ok(exit::OK)
}

pub fn rekey(cfg: &Config, new_key: &Path) -> Result<u8, AppError> {
    let new = crate::crypto::StoreKey::load(new_key)?;
    let mut store = open_store(cfg, LockMode::Wait)?;
    let old_id = store.key_id().to_string();
    store.rekey(new)?;
    println!(
        "store {} re-encrypted: key {old_id} -> {}",
        cfg.store.path.display(),
        store.key_id()
    );
    println!(
        "now set [store] key_file = \"{}\" in the configuration",
        new_key.display()
    );
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::poll_delay;
    use std::time::Duration;

    const H: Duration = Duration::from_secs(3600);

    #[test]
    fn polls_follow_the_interval_with_jitter() {
        assert_eq!(poll_delay(6 * H, None, 0.5), 6 * H);
        assert_eq!(poll_delay(6 * H, None, 0.0), (6 * H).mul_f64(0.9));
        assert!(poll_delay(6 * H, None, 0.999) <= (6 * H).mul_f64(1.1));
    }

    #[test]
    fn a_task_near_expiry_is_retried_sooner() {
        assert_eq!(poll_delay(6 * H, Some(2 * H), 0.5), H);
        assert_eq!(
            poll_delay(6 * H, Some(Duration::from_secs(30)), 0.5),
            Duration::from_secs(60)
        );
        assert_eq!(poll_delay(6 * H, Some(10 * H), 0.5), 6 * H);
    }
}
