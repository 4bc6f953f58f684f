//! What each subcommand does. Every function returns an exit code or an
//! error; only `main` turns them into a process exit.

use crate::agent::{Agent, CycleReport, StudyClient};
use crate::audit::{Audit, AuditRecord};
use crate::client::Client;
use crate::config::Config;
use crate::error::{AppError, exit};
use crate::fhir::Format;
use crate::fhir::idat::Idat;
use crate::import::{ImportReport, import_file};
use crate::report;
use crate::shutdown::Shutdown;
use crate::sim::{SimOptions, Simulator};
use crate::store::Record;
use crate::store::{LockMode, Status, Store, StoreError};
use crate::vocab::{AuditKind, Outcome};
use crate::{demo, tasks::TaskKind};
use chrono::Utc;
use std::path::Path;
use std::time::Duration;

pub(crate) fn open_store(cfg: &Config, mode: LockMode) -> Result<Store, AppError> {
    check_owner(cfg)?;
    let key = cfg.store_key()?;
    let mut store = Store::open(&cfg.store.path, mode, key)?;
    finish_migration(cfg, &mut store)?;
    if store.needs_study() {
        // A store from before several studies: its pseudonyms, enrolments
        // and tasks are the configured study's (the first, if several).
        let study = cfg.study().name.clone();
        if store.adopt_legacy(&study)? {
            let mut audit = open_audit(cfg, &mut store)?;
            let mut rec = AuditRecord::new(AuditKind::Store, Outcome::StudyAssigned, cfg.study().target.as_str())
                .in_study(&study);
            rec.detail = Some(format!(
                "the store's pseudonyms, enrolments and tasks from before several studies belong to study {study}"
            ));
            audit.write(rec)?;
            audit.sync()?;
            log::info!("the store's rows from before several studies now belong to study {study}");
        }
    }
    if mode != LockMode::Read {
        check_restored(cfg, &mut store)?;
    }
    Ok(store)
}

/// The audit log, linked with the store (`Store::link_audit`).
fn open_audit(cfg: &Config, store: &mut Store) -> Result<Audit, AppError> {
    let audit = Audit::open(&cfg.audit_path(), cfg.audit_chain()?)?;
    let links = audit.links();
    store.link_audit(crate::store::AuditLinks {
        store_generation: links.store_generation,
        durable_seq: links.durable_seq,
    });
    Ok(audit)
}

/// A store or audit log restored alone (a backup, a rolled-back disk) is
/// an older copy than the other: tasks done since would be done again, or
/// records the trust centre has seen would be missing. A writer refuses it
/// unless `--accept-restore` says it is meant; then that is audited.
fn check_restored(cfg: &Config, store: &mut Store) -> Result<(), AppError> {
    let head = crate::audit::saved_head(&cfg.audit_path());
    let (generation, seq) = (
        head.as_ref().and_then(|h| h.store_generation),
        head.as_ref().and_then(|h| h.seq),
    );
    let Some(divergence) = store.diverges_from(generation, seq) else {
        return Ok(());
    };
    if !cfg.accept_restore {
        return Err(AppError::Store(StoreError::Diverged {
            path: cfg.store.path.clone(),
            detail: divergence.to_string(),
        }));
    }
    store.accept_restore(generation, seq)?;
    let mut audit = open_audit(cfg, store)?;
    let mut rec = AuditRecord::new(AuditKind::Store, Outcome::RestoreAccepted, cfg.study().target.as_str());
    rec.detail = Some(format!("{divergence}; taken as it is (--accept-restore)"));
    audit.write(rec)?;
    audit.sync()?;
    log::warn!("{divergence}: taken as it is (--accept-restore), and audited");
    Ok(())
}

/// A store just converted from the files of a release before the database
/// (or converted by a run that ended before this): the migration goes into
/// the audit log, and only then are the old files retired (`.v1`).
fn finish_migration(cfg: &Config, store: &mut Store) -> Result<(), AppError> {
    let Some(report) = store.pending_migration().cloned() else {
        return Ok(());
    };
    let mut audit = open_audit(cfg, store)?;
    let mut rec = AuditRecord::new(AuditKind::Store, Outcome::Migrated, cfg.study().target.as_str());
    rec.detail = Some(format!("store files converted to the database: {}", report.describe()));
    audit.write(rec)?;
    audit.sync()?;
    store.finish_migration()?;
    log::info!("store migrated to the database; the old files are kept with a .v1 suffix");
    Ok(())
}

/// Refuses to work on a store or audit log another user owns (see `owner`).
pub(crate) fn check_owner(cfg: &Config) -> Result<(), AppError> {
    let audit = cfg.audit_path();
    let checks = [
        (cfg.store.path.as_path(), "the store"),
        (audit.as_path(), "the audit log"),
    ];
    match checks
        .into_iter()
        .find_map(|(path, what)| crate::owner::foreign_owner(path, what))
    {
        Some(why) => Err(AppError::Usage(why)),
        None => Ok(()),
    }
}

/// One cycle with the store locked for its duration; the first cycle of
/// each day then runs the retention purge on the same open store (the
/// heartbeat remembers the last, so a timer's `run --once` purges too).
/// Then the metrics file (if configured) and the heartbeat are written.
pub fn cycle(cfg: &Config, clients: &[StudyClient], stop: Option<&Shutdown>) -> Result<CycleReport, AppError> {
    cycle_then(cfg, clients, stop, drop)
}

/// `cycle`, then `close` takes the store (everything in it is durable by
/// then): dropping it, or leaving its memory to the OS.
fn cycle_then(
    cfg: &Config,
    clients: &[StudyClient],
    stop: Option<&Shutdown>,
    close: fn(Store),
) -> Result<CycleReport, AppError> {
    let started = std::time::Instant::now();
    let mut store = open_store(cfg, LockMode::Try)?;
    let mut last_purge = report::read_heartbeat(store.dir()).and_then(|h| h.last_purge);
    let mut audit = open_audit(cfg, &mut store)?;
    let mut agent = Agent::new(cfg, clients, &mut store, &mut audit);
    if let Some(s) = stop {
        agent = agent.with_shutdown(s.clone());
    }
    let result = agent.run_cycle();
    if last_purge.is_none_or(|t| Utc::now() - t >= chrono::Duration::days(1)) {
        match purge_old(cfg, &mut store, &mut audit) {
            Ok(_) => last_purge = Some(Utc::now()),
            Err(e) => log::warn!("retention purge skipped: {e}"),
        }
    }
    let pace = result.as_ref().ok().map(|r| r.pace);
    after_cycle(
        cfg,
        &store,
        started.elapsed().as_secs_f64(),
        result.is_ok(),
        last_purge,
        pace,
    );
    close(store);
    Ok(result?)
}

/// Metrics and heartbeat; their failure is logged, never fatal.
fn after_cycle(
    cfg: &Config,
    store: &Store,
    seconds: f64,
    ok: bool,
    last_purge: Option<chrono::DateTime<Utc>>,
    pace: Option<crate::pace::PaceReport>,
) {
    if let Some(path) = &cfg.log.metrics
        && let Err(e) = crate::fsutil::write_atomic(
            path,
            report::metrics(
                store,
                &cfg.studies.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
                seconds,
                ok,
                pace,
            )
            .as_bytes(),
            0o644,
        )
    {
        log::warn!("cannot write metrics to {}: {e}", path.display());
    }
    let hb = report::Heartbeat {
        pid: std::process::id(),
        cycle_end: Utc::now(),
        cycle_ok: Some(ok),
        cycle_seconds: Some(seconds),
        pace,
        last_success: store.last_poll().and_then(|p| p.last_ok),
        next_poll: None,
        soonest_expiry: report::soonest_open_expiry(store),
        last_purge,
    };
    if let Err(e) = report::write_heartbeat(store.dir(), &hb) {
        log::warn!("cannot write the heartbeat: {e}");
    }
}

/// Purges finished ledger entries older than `[store] retention`.
pub(crate) fn purge_old(cfg: &Config, store: &mut Store, audit: &mut Audit) -> Result<usize, AppError> {
    let retention = chrono::Duration::from_std(cfg.store.retention.0).unwrap_or(chrono::Duration::days(90));
    let keys = report::purgeable(store, Utc::now() - retention);
    let n = keys.len();
    if n > 0 {
        store.write(keys.into_iter().map(|key| Record::Purge { key }).collect())?;
        let mut rec = AuditRecord::new(AuditKind::Purge, Outcome::Purged, cfg.study().target.as_str());
        rec.tasks = Some(n);
        rec.detail = Some(format!(
            "finished ledger entries older than {}",
            crate::config::format_duration(cfg.store.retention.0)
        ));
        audit.write(rec)?;
        audit.sync()?;
        log::info!(
            "purged {n} finished ledger entr{} past retention",
            if n == 1 { "y" } else { "ies" }
        );
    }
    Ok(n)
}

fn report_exit(report: &CycleReport) -> u8 {
    let open = report.unresolved();
    // One line per condition, not one per task (per task: --log-level debug).
    for (outcome, c) in report.conditions() {
        let kinds: Vec<String> = c.by_kind.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let example = c.example.map(|d| format!("; e.g. {d}")).unwrap_or_default();
        let line = format!("{} task(s) {outcome} ({}){example}", c.count, kinds.join(", "));
        if outcome == Outcome::Duplicate {
            log::info!("{line}");
        } else {
            log::warn!("{line}");
        }
    }
    if report.pace.busy > 0 {
        log::warn!(
            "the dispatcher was busy {} time(s) this cycle (429, 503 or timeouts): down to {} request(s) in flight",
            report.pace.busy,
            report.pace.lowest
        );
    }
    let counts: Vec<String> = report.counts().iter().map(|(k, v)| format!("{k}={v}")).collect();
    // Where a slow cycle spent its time; a quick one just says how long.
    let total: f64 = report.phases.iter().map(|(_, d)| d.as_secs_f64()).sum();
    let phases: Vec<String> = report
        .phases
        .iter()
        .map(|(name, d)| format!("{name} {:.2}", d.as_secs_f64()))
        .collect();
    log::info!(
        "cycle done: {} task(s) received; {} ({total:.2} s{})",
        report.received,
        if counts.is_empty() {
            "nothing to do".into()
        } else {
            counts.join(", ")
        },
        if total >= 1.0 {
            format!(": {}", phases.join(", "))
        } else {
            String::new()
        }
    );
    let mut code = if open > 0 {
        log::warn!("{open} task(s) remain open for the next cycle");
        exit::TASKS_OPEN
    } else {
        exit::OK
    };
    for (study, error, exit) in &report.failed_polls {
        log::error!("study {study}: its poll failed ({error}); the other studies were worked on");
        code = exit::worst(code, *exit);
    }
    code
}

/// The configuration with only `study` (`--study`), or all studies.
pub(crate) fn selected(cfg: &Config, study: Option<&str>) -> Result<Config, AppError> {
    match study {
        None => Ok(cfg.clone()),
        Some(name) => {
            cfg.find_study(name).map_err(AppError::Usage)?;
            cfg.for_study(name)
                .ok_or_else(|| AppError::Usage(format!("no study named '{name}'")))
        }
    }
}

pub fn run_once(cfg: &Config, dry_run: bool, study: Option<&str>) -> Result<u8, AppError> {
    let full = cfg;
    let cfg = &selected(cfg, study)?;
    let clients = StudyClient::for_all(cfg)?;
    if dry_run {
        let store = open_store(cfg, LockMode::Try)?;
        for sc in &clients {
            let Some(one) = cfg.for_study(&sc.study.name) else {
                continue;
            };
            let (received, plans) = crate::agent::dry_run(&one, &sc.client, &store)?;
            println!(
                "dry run, study {}: {received} task(s) received; nothing will be sent or recorded",
                sc.study.name
            );
            println!("{:<18} {:<22} {:<24} why", "KIND", "TASK", "WOULD");
            for p in &plans {
                println!("{:<18} {:<22} {:<24} {}", p.kind.as_str(), p.task, p.action, p.why);
            }
        }
        return Ok(exit::OK);
    }
    // The process ends after this cycle: its ledger and report are left to
    // the OS, as freeing 100,000 ledger entries and task outcomes one by one
    // took about half a second. (Every write is durable before this point.)
    let report = cycle_then(cfg, &clients, None, Store::close_and_exit_soon)?;
    let code = report_exit(&report);
    write_report_file(full);
    std::mem::forget(report);
    Ok(code)
}

/// The file a daemon holds locked for its whole life (the store lock is
/// held only during a cycle): a second daemon, and `rekey`, see it.
fn daemon_lock_path(cfg: &Config) -> std::path::PathBuf {
    cfg.store.path.join("daemon.lock")
}

/// Takes the daemon lock, or says which process holds it.
fn daemon_lock(cfg: &Config) -> Result<std::fs::File, AppError> {
    use std::io::{Seek, Write as _};
    use std::os::unix::fs::OpenOptionsExt;
    // (In the store directory, which `run_daemon` has just opened.)
    let path = daemon_lock_path(cfg);
    let io = |e: std::io::Error| AppError::Other(format!("cannot take the daemon lock {}: {e}", path.display()));
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    if file.try_lock().is_err() {
        return Err(AppError::Busy(format!(
            "a daemon{} already runs on the store {}",
            daemon_pid(&path).map(|p| format!(" (pid {p})")).unwrap_or_default(),
            cfg.store.path.display()
        )));
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    Ok(file)
}

fn daemon_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The pid of a daemon running on this store, if one is (`Some(None)`:
/// running, pid unknown).
fn running_daemon(cfg: &Config) -> Option<Option<u32>> {
    let path = daemon_lock_path(cfg);
    let file = std::fs::File::open(&path).ok()?;
    match file.try_lock_shared() {
        Ok(()) => None,
        Err(_) => Some(daemon_pid(&path)),
    }
}

/// The daemon loop: a cycle every `[schedule] interval`, sooner when an
/// open task would otherwise expire before the next poll. A failed cycle is
/// logged and does not end the loop; SIGTERM/SIGINT end it between cycles.
pub fn run_daemon(cfg: &Config) -> Result<u8, AppError> {
    // (First: a SIGTERM while the store opens ends the daemon cleanly.)
    let shutdown = Shutdown::install().map_err(|e| AppError::Other(format!("cannot install signal handlers: {e}")))?;
    // A store this configuration cannot open (wrong key, newer format)
    // ends the daemon before it leaves any trace in the store directory.
    drop(open_store(cfg, LockMode::Wait)?);
    let _running = daemon_lock(cfg)?;
    if let Err(e) = crate::logger::reopen_on_sighup() {
        log::warn!("cannot install the SIGHUP handler (log files will not reopen): {e}");
    }
    let clients = StudyClient::for_all(cfg)?;
    let service = start_service(cfg)?;
    let interval = cfg.schedule.interval.0;
    log::info!(
        "daemon started; polling every {}",
        crate::config::format_duration(interval)
    );
    while !shutdown.requested() {
        match cycle(cfg, &clients, Some(&shutdown)) {
            Ok(report) => {
                report_exit(&report);
            }
            Err(AppError::Store(e @ StoreError::Locked { .. })) => log::warn!("skipping this cycle: {e}"),
            Err(
                e @ (AppError::Config(_)
                | AppError::Key(_)
                | AppError::Store(
                    StoreError::WrongKey { .. } | StoreError::Newer { .. } | StoreError::Diverged { .. },
                )),
            ) => {
                // Nothing a later cycle could fix by itself.
                return Err(e);
            }
            Err(e) => log::error!("cycle failed: {e}"),
        }
        let heartbeat = report::read_heartbeat(&cfg.store.path);
        let left = heartbeat
            .as_ref()
            .and_then(|h| h.soonest_expiry)
            .and_then(|x| (x - Utc::now()).to_std().ok());
        let next = poll_delay(interval, left, crate::retry::jitter());
        log::info!("next poll in {}", crate::duration::format_rounded(next));
        if let Some(mut hb) = heartbeat {
            hb.next_poll = chrono::Duration::from_std(next).ok().map(|d| Utc::now() + d);
            if let Err(e) = report::write_heartbeat(&cfg.store.path, &hb) {
                log::warn!("cannot write the heartbeat: {e}");
            }
        }
        write_report_file(cfg);
        if !shutdown.sleep(next) {
            break;
        }
    }
    log::info!("shutting down");
    if let Some(service) = service {
        service.stop();
    }
    Ok(exit::OK)
}

/// `serve`: the local gPAS service alone, until SIGTERM/SIGINT.
pub fn serve(cfg: &Config) -> Result<u8, AppError> {
    let shutdown = Shutdown::install().map_err(|e| AppError::Other(format!("cannot install signal handlers: {e}")))?;
    let Some(service) = start_service(cfg)? else {
        return Err(AppError::Usage(format!(
            "{} has no [serve] section: nothing to serve (config.example.toml shows one)",
            cfg.path.display()
        )));
    };
    while shutdown.sleep(Duration::from_secs(3600)) {}
    log::info!("local service stopping");
    service.stop();
    Ok(exit::OK)
}

/// The local service of `[serve]`, started (`None` without the section).
/// The store is opened once first: a wrong key ends here, not per request.
fn start_service(cfg: &Config) -> Result<Option<crate::serve::Server>, AppError> {
    use crate::serve::{Basic, ServeError, Server, Settings, StudyName};
    use std::sync::Arc;
    let Some(s) = &cfg.serve else { return Ok(None) };
    drop(open_store(cfg, LockMode::Read)?);
    let tls = match (&s.tls_cert, &s.tls_key) {
        (Some(cert), Some(key)) => {
            Some(crate::serve::tls::server_config(cert, key, s.client_ca.as_deref()).map_err(ServeError::Tls)?)
        }
        _ => None,
    };
    let basic = match (&s.basic_user, &s.basic_password) {
        (Some(user), Some(password)) => Some(Basic::new(user, password.expose()).map_err(ServeError::Tls)?),
        _ => None,
    };
    let settings = Settings {
        listen: s.addr().map_err(AppError::Usage)?,
        base_path: s.base_path.clone(),
        tls,
        client_cert: s.client_ca.is_some(),
        basic,
        allow_depseudonymize: s.allow_depseudonymize,
        max_values: s.max_originals,
        max_body: s.max_body_bytes,
        threads: s.threads,
        studies: cfg
            .studies
            .iter()
            .map(|st| StudyName {
                name: st.name.clone(),
                target: st.target.clone(),
            })
            .collect(),
        views: Some(Arc::new(ConfigViews(cfg.clone()))),
        status_page: s.status_page,
        health_public: s.health_public,
    };
    let reader = cfg.clone();
    let open = Arc::new(move || {
        let key = reader.store_key().map_err(|e| e.to_string())?;
        Store::open_lookups(&reader.store.path, key).map_err(|e| e.to_string())
    });
    let writer = cfg.clone();
    let sink = Arc::new(move |records: &[AuditRecord]| audit_batch(&writer, records).map_err(|e| e.to_string()));
    let server = Server::start(settings, open, sink)?;
    log::info!("local service listening on {}", server.url());
    Ok(Some(server))
}

/// The operators' views of the local service, from this configuration.
struct ConfigViews(Config);

impl crate::serve::Views for ConfigViews {
    fn page(&self) -> String {
        status_page(&self.0)
    }

    fn health(&self) -> report::Health {
        status_report(&self.0, false).map_or(report::Health::Critical, |r| r.health)
    }

    fn metrics(&self) -> Result<String, String> {
        let cfg = &self.0;
        let store = open_store(cfg, LockMode::Read).map_err(|e| e.to_string())?;
        let heartbeat = report::read_heartbeat(&cfg.store.path);
        let names: Vec<&str> = cfg.studies.iter().map(|s| s.name.as_str()).collect();
        Ok(report::metrics(
            &store,
            &names,
            heartbeat.as_ref().and_then(|h| h.cycle_seconds).unwrap_or(0.0),
            heartbeat.as_ref().and_then(|h| h.cycle_ok).unwrap_or(false),
            heartbeat.as_ref().and_then(|h| h.pace),
        ))
    }
}

/// Appends records to the audit log as the holder of the store lock
/// (taken for that alone: see `Store::audit_turn`).
fn audit_batch(cfg: &Config, records: &[AuditRecord]) -> Result<(), AppError> {
    let turn = Store::audit_turn(&cfg.store.path, &cfg.store_key()?)?;
    let mut audit = Audit::open(&cfg.audit_path(), cfg.audit_chain()?)?;
    audit
        .links()
        .store_generation
        .fetch_max(turn.generation, std::sync::atomic::Ordering::AcqRel);
    for rec in records {
        audit.write(rec.clone())?;
    }
    audit.sync()?;
    Ok(())
}

/// The interval with up to ±10% jitter (`jitter` in [0, 1)), so that many
/// sites on one schedule do not hit the gateway at once; shortened so that
/// an open task expiring in `left` is tried again first (after half its
/// remaining time, at least a minute, never beyond the interval).
pub(crate) fn poll_delay(interval: Duration, left: Option<Duration>, jitter: f64) -> Duration {
    let interval = interval.mul_f64(0.9 + 0.2 * jitter);
    match left {
        Some(left) if left < interval => (left / 2).max(Duration::from_secs(60)).min(interval),
        _ => interval,
    }
}

pub fn check(cfg: &Config, offline: bool) -> Result<u8, AppError> {
    println!("configuration: ok");
    for (k, v) in cfg.describe() {
        println!("  {k:<30} {v}");
    }
    if let Some(serve) = &cfg.serve
        && let (Some(cert), Some(key)) = (&serve.tls_cert, &serve.tls_key)
    {
        // (The rest of [serve] was checked with the configuration.)
        crate::serve::tls::server_config(cert, key, serve.client_ca.as_deref())
            .map_err(crate::serve::ServeError::Tls)?;
        println!("local service TLS: ok (certificate and key load)");
    }
    if offline {
        return check_offline(cfg);
    }
    let store = open_store(cfg, LockMode::Read)?;
    let patients = store.patient_count()?;
    let with_bf = store.patients_with_bloomfilter()?;
    let open = store.ledger_entries().filter(|e| !e.status.is_terminal()).count();
    println!(
        "store: ok ({patients} patient(s), {with_bf} with a Bloom filter, {} pseudonym(s), {} task(s) in the ledger, {open} open)",
        store.pseudonym_count()?,
        store.ledger_entries().count()
    );
    drop(store);
    Audit::open(&cfg.audit_path(), cfg.audit_chain()?)?;
    println!("audit log: writable");
    if let Some(e) = cfg.bloom_encoder()? {
        println!(
            "bloomfilter: ok (seeds file readable and complete; {} fields, {} bits)",
            e.encoder().field_names().len(),
            e.encoder().bits()
        );
    }
    // Each study with its own key and dispatcher. $requestTasks does not
    // change state on the dispatcher (affectsState: false).
    let mut code = exit::OK;
    let clients = StudyClient::for_all(cfg)?;
    let several = clients.len() > 1;
    for sc in clients {
        let (study, target) = (sc.study.name.as_str(), sc.study.target.as_str());
        let label = if several {
            format!(", study {study}")
        } else {
            String::new()
        };
        match sc.client.request_tasks(study, target) {
            Ok(tasks) => println!(
                "dispatcher{label}: reachable, API key accepted, {} task(s) waiting",
                tasks.len()
            ),
            Err(e) => {
                println!("dispatcher{label}: FAILED: {e}");
                let this = if e.is_auth() || e.is_unreachable() {
                    exit::DISPATCHER
                } else {
                    exit::CONFIG
                };
                code = exit::worst(code, this);
            }
        }
    }
    Ok(code)
}

/// `check --offline`: keys, store, audit log and permissions, without
/// contacting the dispatcher or creating anything (a container image, a
/// package's post-install check, a site without network yet).
fn check_offline(cfg: &Config) -> Result<u8, AppError> {
    let key = cfg.store_key()?;
    println!("store key: ok (key {})", key.id());
    if cfg.log.audit_hmac_key_file.is_some() {
        cfg.audit_chain()?;
        println!("audit HMAC key: ok");
    }
    if cfg.store.path.exists() {
        let store = Store::open(&cfg.store.path, LockMode::Read, key)?;
        println!(
            "store: ok ({} patient(s), {} pseudonym(s), {} task(s) in the ledger)",
            store.patient_count()?,
            store.pseudonym_count()?,
            store.ledger_entries().count()
        );
    } else {
        println!(
            "store: not created yet ({}: the first run creates it)",
            cfg.store.path.display()
        );
    }
    let audit = cfg.audit_path();
    match std::fs::OpenOptions::new().append(true).open(&audit) {
        Ok(_) => println!("audit log: writable"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!(
                "audit log: not created yet ({}: the first run creates it)",
                audit.display()
            );
        }
        Err(e) => {
            return Err(crate::audit::AuditError {
                path: audit,
                op: "open",
                source: e,
            }
            .into());
        }
    }
    if let Some(e) = cfg.bloom_encoder()? {
        println!(
            "bloomfilter: ok (seeds file readable and complete; {} fields, {} bits)",
            e.encoder().field_names().len(),
            e.encoder().bits()
        );
    }
    // The TLS material and secrets the client reads, without a request.
    Client::new(cfg)?;
    println!("dispatcher: not contacted (--offline)");
    Ok(exit::OK)
}

pub fn import(cfg: &Config, file: &Path) -> Result<u8, AppError> {
    let encoder = cfg.bloom_encoder()?;
    let mut store = open_store(cfg, LockMode::Wait)?;
    let report = import_file(&mut store, file, encoder.as_ref())?;
    print_import(file, &report);
    Ok(if report.errors.is_empty() && report.without_filter.is_empty() {
        exit::OK
    } else {
        exit::TASKS_OPEN
    })
}

fn print_import(file: &Path, r: &ImportReport) {
    for (line, reason) in &r.errors {
        eprintln!("{}:{line}: skipped: {reason}", file.display());
    }
    for (line, earlier) in &r.repeated {
        eprintln!(
            "{}:{line}: the same local_id as line {earlier}; this later row wins",
            file.display()
        );
    }
    for (line, reason) in &r.without_filter {
        eprintln!("{}:{line}: imported without a Bloom filter: {reason}", file.display());
    }
    if r.computed > 0 {
        println!("computed {} Bloom filter(s) from IDAT ([bloomfilter])", r.computed);
    }
    println!(
        "import {}: {} added, {} updated, {} unchanged, {} skipped ({} line(s) not imported)",
        file.display(),
        r.added,
        r.updated,
        r.unchanged,
        r.errors.len(),
        r.lines_skipped
    );
    if r.forgotten > 0 {
        println!(
            "{} row(s) of erased patients left out (`forget`; `forget --undo LOCAL_ID` takes an erasure back)",
            r.forgotten
        );
    }
}

fn need_encoder(cfg: &Config) -> Result<crate::bloom::RecordEncoder, AppError> {
    cfg.bloom_encoder()?.ok_or_else(|| {
        AppError::Config(crate::config::ConfigError::Invalid {
            path: cfg.path.clone(),
            message: "no [bloomfilter] section; README \"Bloom filters\" shows how to configure the encoding".into(),
        })
    })
}

/// `bloom FILE`: the filter of each row, as CSV on standard output.
pub fn bloom(cfg: &Config, file: &Path) -> Result<u8, AppError> {
    let encoder = need_encoder(cfg)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let (written, errors) = crate::import::bloom_file(file, &encoder, &mut out)?;
    drop(out);
    for (line, reason) in &errors {
        eprintln!("{}:{line}: no Bloom filter: {reason}", file.display());
    }
    eprintln!("{written} Bloom filter(s), {} row(s) without", errors.len());
    Ok(if errors.is_empty() { exit::OK } else { exit::TASKS_OPEN })
}

/// One study's configuration (its key and URL folded in) and client.
type StudyJob = (Config, Client);

/// What `enroll` and `update-bf` work with: each selected study's
/// configuration and client, signals, the store (waiting for a running
/// cycle, like `import`) and the audit log.
fn dispatcher_job(cfg: &Config, study: Option<&str>) -> Result<(Vec<StudyJob>, Shutdown, Store, Audit), AppError> {
    let chosen = selected(cfg, study)?;
    let mut jobs = Vec::new();
    for s in &chosen.studies {
        if let Some(one) = chosen.for_study(&s.name) {
            let client = Client::new(&one)?;
            jobs.push((one, client));
        }
    }
    let stop = Shutdown::install().map_err(|e| AppError::Other(format!("cannot install signal handlers: {e}")))?;
    let mut store = open_store(cfg, LockMode::Wait)?;
    let audit = open_audit(cfg, &mut store)?;
    Ok((jobs, stop, store, audit))
}

/// The exit code of a run that stopped early, after saying why.
fn stopped_exit(what: &str, stopped: &crate::enroll::Stopped) -> u8 {
    match stopped {
        crate::enroll::Stopped::Signal => {
            eprintln!("{what} stopped by a signal; the next run does the rest");
            exit::TASKS_OPEN
        }
        crate::enroll::Stopped::Dispatcher { reason, exit } => {
            eprintln!("{what} stopped early: {reason}");
            *exit
        }
    }
}

/// How a per-study command names the study in its summary: not at all
/// with one study.
fn study_label(jobs: &[StudyJob], one: &Config) -> String {
    if jobs.len() > 1 {
        format!(" (study {})", one.study().name)
    } else {
        String::new()
    }
}

/// `enroll`: sends the filters of patients without a pseudonym, in each
/// selected study in turn.
pub fn enroll(cfg: &Config, limit: Option<usize>, retry_errors: bool, study: Option<&str>) -> Result<u8, AppError> {
    let encoder = cfg.bloom_encoder()?;
    let (jobs, stop, mut store, mut audit) = dispatcher_job(cfg, study)?;
    let opts = crate::enroll::EnrollOptions { limit, retry_errors };
    let mut code = exit::OK;
    for (one, client) in &jobs {
        let label = study_label(&jobs, one);
        let r = crate::enroll::enroll(
            one,
            client,
            &mut store,
            &mut audit,
            encoder.as_ref(),
            &opts,
            Some(&stop),
        )?;
        for (id, reason) in &r.no_filter {
            eprintln!("patient {}: no Bloom filter: {reason}", id.fingerprint());
        }
        if r.computed > 0 {
            println!("computed {} Bloom filter(s) from IDAT", r.computed);
        }
        println!(
            "enroll{label}: {} sent: {} enrolled, {} in clearing (pseudonym follows as a task), {} refused with an \
             error, {} busy (sent again by the next run), {} not answered",
            r.sent, r.enrolled, r.clearing, r.errors, r.retry, r.failed
        );
        if r.waiting + r.earlier_errors + r.changed > 0 {
            println!(
                "left alone: {} in clearing from earlier runs, {} refused earlier (--retry-errors sends them \
                 again), {} enrolled earlier with a filter they no longer have (see update-bf)",
                r.waiting, r.earlier_errors, r.changed
            );
        }
        if let Some(stopped) = &r.stopped {
            code = exit::worst(code, stopped_exit("enroll", stopped));
            if matches!(stopped, crate::enroll::Stopped::Signal) {
                break;
            }
            continue;
        }
        if r.errors + r.retry + r.failed > 0 || !r.no_filter.is_empty() {
            code = exit::worst(code, exit::TASKS_OPEN);
        }
    }
    Ok(code)
}

/// `update-bf`: sends `$updateBf` for patients whose filter changed, in
/// each selected study in turn.
pub fn update_bf(cfg: &Config, limit: Option<usize>, study: Option<&str>) -> Result<u8, AppError> {
    let encoder = need_encoder(cfg)?;
    let (jobs, stop, mut store, mut audit) = dispatcher_job(cfg, study)?;
    let mut code = exit::OK;
    for (one, client) in &jobs {
        let label = study_label(&jobs, one);
        let r = crate::enroll::update_bf(one, client, &mut store, &mut audit, &encoder, limit, Some(&stop))?;
        for (id, reason) in &r.no_filter {
            eprintln!("patient {}: no Bloom filter: {reason}", id.fingerprint());
        }
        for (fp, reason) in &r.refused {
            eprintln!("patient {fp}: $updateBf refused: {reason}");
        }
        println!(
            "update-bf{label}: {} updated at the fTTP, {} changed locally only (never sent), {} unchanged, \
             {} waiting for a pseudonym, {} refused, {} not answered",
            r.updated,
            r.local,
            r.unchanged,
            r.waiting,
            r.refused.len(),
            r.failed
        );
        if let Some(stopped) = &r.stopped {
            code = exit::worst(code, stopped_exit("update-bf", stopped));
            if matches!(stopped, crate::enroll::Stopped::Signal) {
                break;
            }
            continue;
        }
        if !r.refused.is_empty() || r.failed > 0 || !r.no_filter.is_empty() {
            code = exit::worst(code, exit::TASKS_OPEN);
        }
    }
    Ok(code)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TasksFormat {
    Table,
    Json,
    Fhir,
}

pub fn tasks(
    cfg: &Config,
    status: Option<Status>,
    kind: Option<TaskKind>,
    since: Option<&str>,
    study: Option<&str>,
    format: TasksFormat,
) -> Result<u8, AppError> {
    let since = since
        .map(crate::duration::parse_since)
        .transpose()
        .map_err(AppError::Usage)?;
    if let Some(name) = study {
        cfg.find_study(name).map_err(AppError::Usage)?;
    }
    let store = open_store(cfg, LockMode::Read)?;
    let mut entries: Vec<_> = store
        .ledger_entries()
        .filter(|e| status.is_none_or(|s| e.status == s))
        .filter(|e| kind.is_none_or(|k| e.kind == k))
        .filter(|e| since.is_none_or(|t| e.updated >= t))
        .filter(|e| study.is_none_or(|s| e.study() == s))
        .collect();
    entries.sort_by_key(|e| (e.first_seen, e.key.clone()));
    match format {
        TasksFormat::Table => print!("{}", report::table(&entries)),
        TasksFormat::Json => {
            for e in &entries {
                println!(
                    "{}",
                    serde_json::to_string(&report::TaskLine::from(*e)).unwrap_or_default()
                );
            }
        }
        TasksFormat::Fhir => println!(
            "{}",
            crate::fhir::json::to_string_pretty(&report::fhir_bundle(&entries))
        ),
    }
    Ok(exit::OK)
}

/// Health for people and for monitoring (Nagios/Icinga, systemd):
/// exit 0 ok, 1 warning, 2 critical.
/// What `status` reports on an open store (also the page's and `/health`'s).
fn status_of(cfg: &Config, store: &Store, heartbeat: Option<&report::Heartbeat>, all: bool) -> report::StatusReport {
    let rules = report::StatusRules {
        stale_after: cfg.schedule.stale_after(),
        list_at_most: (!all).then_some(20),
        warn_before: cfg.schedule.warn_before.0,
        critical_failed_polls: cfg.schedule.critical_failed_polls,
    };
    let mut report = report::status(store, heartbeat, &rules);
    let names: Vec<&str> = cfg.studies.iter().map(|s| s.name.as_str()).collect();
    report.studies = report::study_status(store, &names);
    let head = crate::audit::saved_head(&cfg.audit_path());
    if let Some(d) = store.diverges_from(
        head.as_ref().and_then(|h| h.store_generation),
        head.as_ref().and_then(|h| h.seq),
    ) {
        report.health = report.health.max(report::Health::Critical);
        report.warnings.insert(
            0,
            format!("{d}: the agent refuses to run until it is resolved (--accept-restore)"),
        );
    }
    if let Some(pid) = crate::store::writer(&cfg.store.path) {
        report.warnings.insert(
            0,
            format!(
                "a cycle is running{}: figures as of its last committed write",
                pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
            ),
        );
    }
    report
}

/// The status report, or the critical message of a store that cannot be
/// read. Never waits for a running cycle (monitoring wants an answer within
/// seconds): a reader sees its last committed write.
fn status_report(cfg: &Config, all: bool) -> Result<report::StatusReport, String> {
    let heartbeat = report::read_heartbeat(&cfg.store.path);
    match open_store(cfg, LockMode::Read) {
        Ok(store) => Ok(status_of(cfg, &store, heartbeat.as_ref(), all)),
        Err(e) => Err(format!("CRITICAL: cannot read the store: {e}")),
    }
}

pub fn status(cfg: &Config, json: bool, all: bool) -> Result<u8, AppError> {
    let report = match status_report(cfg, all) {
        Ok(report) => report,
        Err(message) => {
            if json {
                println!("{}", serde_json::json!({"health": "critical", "warnings": [message]}));
            } else {
                println!("fttp-agent status: CRITICAL\n{message}");
            }
            return Ok(report::Health::Critical.exit_code());
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        print!("{}", report::status_text(&report));
    }
    Ok(report.health.exit_code())
}

/// The status page (`report --html`, `GET /`): gathered from a reader of
/// the store, the status report and the audit log.
pub(crate) fn status_page(cfg: &Config) -> String {
    let heartbeat = report::read_heartbeat(&cfg.store.path);
    let opened = open_store(cfg, LockMode::Read).map_err(|e| e.to_string());
    let report = opened
        .as_ref()
        .ok()
        .map(|store| status_of(cfg, store, heartbeat.as_ref(), true));
    let (files, compressed) = crate::audit::rotated_files(&cfg.audit_path());
    let chain = cfg
        .log
        .audit_hmac_key_file
        .as_ref()
        .map(|_| cfg.audit_chain())
        .transpose();
    let studies: Vec<(String, String)> = cfg.studies.iter().map(|s| (s.name.clone(), s.target.clone())).collect();
    let (chain, chain_error) = match chain {
        Ok(c) => (c, None),
        Err(e) => (None, Some(e.to_string())),
    };
    let mut page = crate::page::gather(&crate::page::Sources {
        store: opened.as_ref().map_err(Clone::clone),
        studies: &studies,
        report: report.as_ref(),
        heartbeat: heartbeat.as_ref(),
        store_dir: &cfg.store.path,
        audit_files: files.into_iter().filter(|f| f.exists()).collect(),
        audit_partial: !compressed.is_empty(),
        audit_chain: chain.as_ref(),
    });
    if let Some(e) = chain_error {
        page.audit.intact = false;
        page.audit.verdict = format!("not checked: the audit key cannot be read ({e})");
    }
    crate::page::render(&page)
}

/// `report --html FILE`: the status page, written atomically.
pub fn report_html(cfg: &Config, file: &Path) -> Result<u8, AppError> {
    crate::fsutil::write_atomic(file, status_page(cfg).as_bytes(), 0o640)
        .map_err(|e| AppError::Other(format!("cannot write the report {}: {e}", file.display())))?;
    Ok(exit::OK)
}

/// The page of `[log] report`, after a cycle; a failure is logged.
fn write_report_file(cfg: &Config) {
    if let Some(path) = &cfg.log.report
        && let Err(e) = report_html(cfg, path)
    {
        log::warn!("{e}");
    }
}

/// The audit records as NDJSON (one record per line), from `since` on.
pub fn audit_export(cfg: &Config, since: Option<&str>) -> Result<u8, AppError> {
    let since = since
        .map(crate::duration::parse_since)
        .transpose()
        .map_err(AppError::Usage)?;
    // The rotated files first, oldest first, then the current one.
    let (files, compressed) = crate::audit::rotated_files(&cfg.audit_path());
    for gz in &compressed {
        log::warn!(
            "skipping {}: compressed (decompress it to export its records)",
            gz.display()
        );
    }
    if files.is_empty() {
        return Err(crate::audit::AuditError {
            path: cfg.audit_path(),
            op: "read",
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        }
        .into());
    }
    let mut out = std::io::stdout().lock();
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(|source| crate::audit::AuditError {
            path: path.clone(),
            op: "read",
            source,
        })?;
        export_lines(&text, &path, since, &mut out);
    }
    Ok(exit::OK)
}

/// The records of one audit file from `since` on, as they are.
fn export_lines(text: &str, path: &Path, since: Option<chrono::DateTime<Utc>>, out: &mut impl std::io::Write) {
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            log::warn!("skipping a line of {} that is not a JSON record", path.display());
            continue;
        };
        let ts = v
            .get("ts")
            .and_then(|t| t.as_str())
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
        if since.is_some_and(|s| ts.is_none_or(|t| t < s)) {
            continue;
        }
        let _ = writeln!(out, "{line}");
    }
}

pub fn purge(cfg: &Config) -> Result<u8, AppError> {
    let mut store = open_store(cfg, LockMode::Wait)?;
    let mut audit = open_audit(cfg, &mut store)?;
    let n = purge_old(cfg, &mut store, &mut audit)?;
    println!("purged {n} finished ledger entr{}", if n == 1 { "y" } else { "ies" });
    Ok(exit::OK)
}

pub enum PseudonymFormat {
    Csv,
    Ndjson,
    Fhir,
}

/// What `pseudonyms` exports.
pub struct PseudonymFilter<'a> {
    pub study: Option<&'a str>,
    pub local_id: Option<&'a str>,
    pub since: Option<&'a str>,
    pub unmatched: bool,
}

/// One exported row.
#[derive(serde::Serialize)]
struct PseudonymRow {
    /// The local patient; for `--unmatched`, absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    local_id: Option<String>,
    /// For `--unmatched`: the fingerprint of the Bloom filter.
    #[serde(skip_serializing_if = "Option::is_none")]
    bloomfilter: Option<String>,
    study: String,
    target: String,
    pseudonym_system: String,
    pseudonym: String,
    received_at: String,
    source: String,
}

/// `pseudonyms`: the pseudonyms received, by local patient, for the
/// site's data pipeline; audited with the count and the filters used.
pub fn pseudonyms(cfg: &Config, filter: &PseudonymFilter<'_>, format: PseudonymFormat) -> Result<u8, AppError> {
    let since = filter
        .since
        .map(crate::duration::parse_since)
        .transpose()
        .map_err(AppError::Usage)?;
    if let Some(name) = filter.study {
        cfg.find_study(name).map_err(AppError::Usage)?;
    }
    let store = open_store(cfg, LockMode::Read)?;
    let mut rows = Vec::new();
    for (p, id) in store.pseudonyms_with_patients()? {
        if filter.study.is_some_and(|s| p.study != s)
            || since.is_some_and(|t| p.received < t)
            || filter.unmatched == id.is_some()
            || filter
                .local_id
                .is_some_and(|want| id.as_ref().is_none_or(|id| id.0 != want))
        {
            continue;
        }
        // What delivered it: the ledger entry's kind (by its key, in the
        // study or as written before several studies), or `enroll`.
        let source = if p.source == "enroll" {
            "enroll".to_string()
        } else {
            store
                .ledger(&p.source)
                .or_else(|| store.ledger(&crate::store::records::ledger_key(&p.study, &p.source)))
                .map_or("unknown".to_string(), |e| e.kind.as_str().to_string())
        };
        rows.push(PseudonymRow {
            bloomfilter: id.is_none().then(|| p.bloomfilter.fingerprint()),
            local_id: id.map(|id| id.0),
            study: p.study,
            target: p.target,
            pseudonym_system: p.pseudonym.system.unwrap_or_default(),
            pseudonym: p.pseudonym.value,
            received_at: crate::duration::ts(p.received),
            source,
        });
    }
    rows.sort_by(|a, b| (&a.local_id, &a.bloomfilter, &a.study).cmp(&(&b.local_id, &b.bloomfilter, &b.study)));
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let written = match format {
        PseudonymFormat::Csv => {
            let mut w = csv::Writer::from_writer(&mut out);
            let first = if filter.unmatched { "bloomfilter" } else { "local_id" };
            let header = [
                first,
                "study",
                "target",
                "pseudonym_system",
                "pseudonym",
                "received_at",
                "source",
            ];
            let mut result = w.write_record(header);
            for r in &rows {
                let first = r.local_id.as_deref().or(r.bloomfilter.as_deref()).unwrap_or_default();
                result = result.and_then(|()| {
                    w.write_record([
                        first,
                        &r.study,
                        &r.target,
                        &r.pseudonym_system,
                        &r.pseudonym,
                        &r.received_at,
                        &r.source,
                    ])
                });
            }
            result
                .and_then(|()| w.flush().map_err(csv::Error::from))
                .map_err(|e| e.to_string())
        }
        PseudonymFormat::Ndjson => rows
            .iter()
            .try_for_each(|r| writeln!(out, "{}", serde_json::to_string(r).unwrap_or_default()))
            .map_err(|e| e.to_string()),
        PseudonymFormat::Fhir => {
            use crate::fhir::{Identifier, Parameter, Parameters};
            let params = Parameters::new(
                rows.iter()
                    .map(|r| {
                        let original = r.local_id.as_deref().or(r.bloomfilter.as_deref()).unwrap_or_default();
                        let system = (!r.pseudonym_system.is_empty()).then_some(r.pseudonym_system.as_str());
                        Parameter::with_parts(
                            "pseudonym",
                            vec![
                                Parameter::identifier("original", Identifier::new(None, original)),
                                Parameter::identifier("target", Identifier::new(None, &r.study)),
                                Parameter::identifier("pseudonym", Identifier::new(system, &r.pseudonym)),
                            ],
                        )
                    })
                    .collect(),
            );
            writeln!(out, "{}", params.write(Format::Json)).map_err(|e| e.to_string())
        }
    };
    if let Err(e) = written {
        return Err(AppError::Other(format!("cannot write the export: {e}")));
    }
    drop(out);
    drop(store);
    let mut rec = AuditRecord::new(AuditKind::Export, Outcome::Pseudonyms, cfg.study().target.as_str());
    let mut used = Vec::new();
    if let Some(s) = filter.study {
        used.push(format!("study {s}"));
    }
    if filter.local_id.is_some() {
        used.push("one local id".to_string());
    }
    if let Some(t) = since {
        used.push(format!("since {}", crate::duration::ts(t)));
    }
    if filter.unmatched {
        used.push("unmatched".to_string());
    }
    rec.detail = Some(format!(
        "{} row(s) exported; filters: {}",
        rows.len(),
        if used.is_empty() {
            "none".to_string()
        } else {
            used.join(", ")
        }
    ));
    audit_after_reading(cfg, rec)?;
    Ok(exit::OK)
}

/// The audit record of a command that read the store without its lock
/// (`backup`, `pseudonyms`). The audit log has one writer at a time, the
/// holder of the store lock: two processes appending would fork its chain.
/// So the record waits for a running cycle to end; what was read did not.
fn audit_after_reading(cfg: &Config, rec: AuditRecord) -> Result<(), AppError> {
    let mut store = open_store(cfg, LockMode::Wait)?;
    let mut audit = open_audit(cfg, &mut store)?;
    audit.write(rec)?;
    audit.sync()?;
    Ok(())
}

/// An online copy of the store (see `Store::backup`), audited.
pub fn backup(cfg: &Config, dest: &Path) -> Result<u8, AppError> {
    let store = open_store(cfg, LockMode::Read)?;
    let file = store.backup(dest)?;
    drop(store);
    println!(
        "store copied to {} ({} bytes); the store key is not in it: keep a copy of [store] key_file apart",
        file.display(),
        std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0)
    );
    let mut rec = AuditRecord::new(AuditKind::Store, Outcome::BackedUp, cfg.study().target.as_str());
    rec.detail = Some(format!("a copy of the store was written to {}", dest.display()));
    audit_after_reading(cfg, rec)?;
    Ok(exit::OK)
}

/// Right to erasure: removes one patient's IDAT and Bloom filter, and
/// keeps a tombstone so that no later import brings her back; `undo`
/// takes the tombstone back.
pub fn forget(cfg: &Config, local_id: &str, undo: bool) -> Result<u8, AppError> {
    let mut store = open_store(cfg, LockMode::Wait)?;
    let mut audit = open_audit(cfg, &mut store)?;
    let id = crate::types::LocalId(local_id.to_string());
    if undo {
        let taken_back = store.unforget(&id)?;
        let mut rec = AuditRecord::new(
            AuditKind::Forget,
            if taken_back {
                Outcome::Undone
            } else {
                Outcome::NotForgotten
            },
            cfg.study().target.as_str(),
        );
        rec.patient = Some(id.fingerprint());
        audit.write(rec)?;
        audit.sync()?;
        if taken_back {
            println!(
                "patient {} may be imported again (her data was erased: it comes back only with an import)",
                id.fingerprint()
            );
            return Ok(exit::OK);
        }
        println!("no erased patient with that local id");
        return Ok(exit::TASKS_OPEN);
    }
    let erased = store.forget(&id)?;
    let mut rec = AuditRecord::new(
        AuditKind::Forget,
        if erased { Outcome::Erased } else { Outcome::NotFound },
        cfg.study().target.as_str(),
    );
    rec.patient = Some(id.fingerprint());
    audit.write(rec)?;
    audit.sync()?;
    if erased {
        println!("erased the IDAT and Bloom filter of patient {}", id.fingerprint());
        Ok(exit::OK)
    } else {
        println!("no patient with that local id");
        Ok(exit::TASKS_OPEN)
    }
}

/// The file that marks a directory as the demo's own.
const DEMO_MARKER: &str = ".fttp-agent-demo";

pub fn demo(format: Format, dir: Option<&Path>) -> Result<u8, AppError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| AppError::Other(format!("demo: cannot {what}: {e}"))
    };
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => std::env::temp_dir().join(format!("fttp-agent-demo-{}", std::process::id())),
    };
    // Only a directory the demo made, or an empty one: `--dir .` in a
    // config directory, or the site's store directory, must never be
    // overwritten. And a store is never deleted, not even a demo's.
    let marker = dir.join(DEMO_MARKER);
    if dir.exists() {
        let empty = std::fs::read_dir(&dir)
            .map_err(io("read the demo directory"))?
            .next()
            .is_none();
        if !empty && !marker.exists() {
            return Err(AppError::Usage(format!(
                "demo --dir {}: the directory is not empty and was not made by `demo`; give a new or empty \
                 directory (the demo writes a config, a key and a store there)",
                dir.display()
            )));
        }
        if dir.join("store").exists() {
            return Err(AppError::Usage(format!(
                "demo --dir {}: it holds the store of an earlier demo, which the demo never deletes; remove the \
                 directory or give another",
                dir.display()
            )));
        }
    }
    std::fs::create_dir_all(&dir).map_err(io("create the demo directory"))?;
    std::fs::write(&marker, "made by `fttp-agent demo`\n").map_err(io("mark the demo directory"))?;
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
        let report = import_file(&mut store, &csv, None)?;
        print_import(&csv, &report);
    }
    println!("running one cycle against the simulator ({})", format.mime());
    let clients = StudyClient::for_all(&cfg)?;
    let report = cycle(&cfg, &clients, None)?;
    print!("{}", demo::summary(&report));

    let st = sim.state();
    println!("\nThe simulated dispatcher received:");
    for r in &st.received {
        let what = match r.patient() {
            Some(p) => {
                let codes: Vec<&str> = Idat::from_patient(p).present().iter().map(|e| e.code()).collect();
                format!(" (Patient with exactly: {})", codes.join(", "))
            }
            None => match r.parameters.as_ref().and_then(|p| p.first_string("study")) {
                Some(study) => format!(" (study {study})"),
                None => String::new(),
            },
        };
        println!("  {:<28} HTTP {}{what}", r.operation, r.status);
    }
    println!("\nConfig, store and audit log of this demo are in {}", dir.display());
    Ok(report_exit(&report))
}

pub fn sim(options: SimOptions, sample_tasks: bool, clearing_every: Option<u32>) -> Result<u8, AppError> {
    let key = options.api_key.clone();
    let header = options.api_key_header.clone();
    let (study, target) = options
        .study_target
        .clone()
        .unwrap_or_else(|| (demo::STUDY.to_string(), demo::TARGET.to_string()));
    let sim = Simulator::start(options).map_err(|e| AppError::Other(format!("cannot start the simulator: {e}")))?;
    sim.state().clearing_every = clearing_every;
    if sample_tasks {
        demo::load_sample_tasks(&sim);
    }
    println!("simulated dispatcher at {}", sim.url());
    println!(
        "API key header '{header}', key '{key}'; study '{study}', target '{target}' (a poll for any other is \
         refused with 404)"
    );
    println!("Ctrl-C to stop");
    sim.join();
    Ok(exit::OK)
}

pub fn audit_verify(files: &[std::path::PathBuf], key: Option<&Path>, partial: bool) -> Result<u8, AppError> {
    let chain = key.map(crate::audit::Chain::hmac_from_file).transpose()?;
    match crate::audit::verify(files, chain.as_ref(), partial)? {
        crate::audit::Verdict::Intact {
            records,
            continues_from,
            after_head,
        } => {
            println!("intact: {records} record(s), every hash and link checks out");
            if continues_from != crate::audit::GENESIS {
                println!("the first record continues the chain from {continues_from} (a rotated predecessor)");
            }
            match after_head {
                Some(0) => println!("it ends at the head saved at its last sync"),
                Some(n) => println!("{n} record(s) follow the head saved at its last sync (written since)"),
                None => println!("no saved head beside the last file: records cut off its end cannot be seen"),
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
    // The daemon reads the key file once, at start: re-keying under it
    // would make its next cycle fail.
    if let Some(pid) = running_daemon(cfg) {
        return Err(AppError::Busy(format!(
            "a daemon{} uses this store: stop it first (systemctl stop fttp-agent-daemon), run rekey, point \
             [store] key_file at the new key, then start it again",
            pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
        )));
    }
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
