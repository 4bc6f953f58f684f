//! Command line: parse, set up logging, dispatch, map errors to exit codes.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand, ValueEnum};
use fttp_agent::commands;
use fttp_agent::config::{self, Config, LogLevel};
use fttp_agent::error::AppError;
use fttp_agent::fhir::Format;
use fttp_agent::sim::SimOptions;
use fttp_agent::store::Status;
use fttp_agent::tasks::TaskKind;
use std::path::PathBuf;
use std::process::ExitCode;

/// The version and the git commit it was built from.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("FTTP_AGENT_COMMIT"), ")");

/// Site agent for the fTTP dispatcher (THS Greifswald TTP-FHIR Gateway):
/// fetches record-linkage tasks and resolves them before they expire.
#[derive(Parser)]
#[command(version = VERSION, about, long_about = None)]
struct Cli {
    /// Config file [default: $FTTP_AGENT_CONFIG, then ./fttp-agent.toml]
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Log level, overriding [log] level: error, warn, info, debug, trace
    #[arg(long, global = true)]
    log_level: Option<LogLevel>,
    /// Take a store or audit log restored from a backup as it is, though
    /// the other is newer (otherwise refused); audited
    #[arg(long, global = true)]
    accept_restore: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Poll and resolve tasks: one cycle with --once (cron, systemd timer), else a daemon loop
    Run {
        /// Run one cycle and exit (exit code: 0 done, 1 tasks open, 3 dispatcher unreachable)
        #[arg(long)]
        once: bool,
        /// With --once: poll and show what would be done with each task and
        /// why, sending nothing and changing nothing
        #[arg(long, requires = "once")]
        dry_run: bool,
        /// With --once: poll and work on this study only (default: all)
        #[arg(long, requires = "once")]
        study: Option<String>,
    },
    /// Health for people and monitoring: last and next poll, open tasks and
    /// time left, warnings (exit 0 ok, 1 warning, 2 critical)
    Status {
        /// text or json
        #[arg(long, value_enum, default_value = "text")]
        format: StatusFormat,
        /// List every open task (by default the 20 that expire soonest)
        #[arg(long)]
        all: bool,
        /// Exit 1 only when critical, else 0: for container health checks,
        /// which take any non-zero exit as unhealthy (a warning is not)
        #[arg(long)]
        healthcheck: bool,
    },
    /// Remove finished ledger entries older than [store] retention (the daemon does this daily)
    Purge,
    /// Right to erasure: remove one patient's IDAT and Bloom filter from the
    /// store, and keep her from being imported again
    Forget {
        local_id: String,
        /// Take a mistaken erasure back: the next import may bring the patient back
        #[arg(long)]
        undo: bool,
    },
    /// Copy the store, consistently, into the new directory DEST (also while
    /// the daemon runs); point [store] path at it to restore. The store key
    /// is not in the copy: back it up separately
    Backup { dest: PathBuf },
    /// Validate config and store, and check that the dispatcher accepts our API key
    Check {
        /// Check config, keys, store, audit log and permissions without
        /// contacting the dispatcher or creating anything
        #[arg(long)]
        offline: bool,
    },
    /// Load patients from CSV or NDJSON (FHIR Patient per line) into the store
    Import { file: PathBuf },
    /// Print the Bloom filter of each row of an import file (CSV
    /// `local_id,bloomfilter`, balanced, base64), computed with
    /// [bloomfilter], to compare with the filters of another tool.
    Bloom { file: PathBuf },
    /// Enrol stored patients that have no pseudonym yet: send their Bloom
    /// filters with $requestPsnFromBfWorkflow in batches and store the
    /// pseudonyms; patients in clearing get theirs later as a task.
    /// Computes missing filters first when [bloomfilter] is configured.
    Enroll {
        /// Enrol at most this many patients in this run.
        #[arg(long)]
        limit: Option<usize>,
        /// Send again the filters an earlier run saw refused with an error.
        #[arg(long)]
        retry_errors: bool,
        /// Enrol in this study only (default: each configured study in turn)
        #[arg(long)]
        study: Option<String>,
    },
    /// Recompute every patient's Bloom filter with the current [bloomfilter]
    /// and send $updateBf for those that changed and have a pseudonym.
    UpdateBf {
        /// Send at most this many updates in this run.
        #[arg(long)]
        limit: Option<usize>,
        /// Update in this study only (default: each configured study in turn)
        #[arg(long)]
        study: Option<String>,
    },
    /// Export the pseudonyms received, by local patient, for the site's
    /// data pipeline (CSV, NDJSON, or FHIR Parameters as gPAS $pseudonymize answers)
    Pseudonyms {
        /// Only this study's
        #[arg(long)]
        study: Option<String>,
        /// Only this local patient's
        #[arg(long)]
        local_id: Option<String>,
        /// Only those received since T: RFC 3339 time, YYYY-MM-DD, or a duration back (24h, 7d)
        #[arg(long, value_parser = since_arg)]
        since: Option<String>,
        /// csv, ndjson or fhir
        #[arg(long, value_enum, default_value = "csv")]
        format: PseudonymFormatArg,
        /// Pseudonyms whose Bloom filter matches no local patient (named by the filter's fingerprint)
        #[arg(long)]
        unmatched: bool,
    },
    /// Answer the gPAS operations ($pseudonymize, ...) from the store, as
    /// configured in [serve], until SIGTERM (`run` serves too when [serve] is set)
    Serve,
    /// Write the status page (one self-contained HTML file) atomically
    Report {
        /// Where to write it
        #[arg(long, value_name = "FILE")]
        html: PathBuf,
    },
    /// Write the man pages (fttp-agent.1 and one per subcommand) into DIR
    #[command(hide = true)]
    Man { dir: PathBuf },
    /// Write the shell completions (bash, zsh, fish) into DIR
    #[command(hide = true)]
    Completions { dir: PathBuf },
    /// Show the task ledger
    Tasks {
        /// pending, in_flight, resolved, failed, expired or rejected
        #[arg(long)]
        status: Option<Status>,
        /// dic_psn_available, send_idat, repeat_request or unknown
        #[arg(long)]
        kind: Option<TaskKind>,
        /// Only entries changed since T: RFC 3339 time, YYYY-MM-DD, or a duration back (24h, 7d)
        #[arg(long, value_parser = since_arg)]
        since: Option<String>,
        /// table (terminal), json (one object per line) or fhir (a FHIR R4 Bundle of Task)
        #[arg(long, value_enum, default_value = "table")]
        format: TasksFormatArg,
        /// Only this study's tasks
        #[arg(long)]
        study: Option<String>,
    },
    /// Work with the audit log
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Write a new random 256-bit key to PATH (mode 0600; never overwrites):
    /// for [store] key_file or [log] audit_hmac_key_file
    Keygen { path: PathBuf },
    /// Re-encrypt the store under a new key, atomically
    Rekey {
        /// The new key file (made with `keygen`)
        #[arg(long)]
        new_key: PathBuf,
    },
    /// Try it: one cycle against the built-in simulated dispatcher, with sample data
    Demo {
        /// Wire format to speak
        #[arg(long, value_enum, default_value = "xml")]
        format: FormatArg,
        /// Where to keep the demo's config, store and audit log [default: a temp directory]
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Start the simulated dispatcher alone, for trying a configured agent against it
    Sim {
        #[arg(long, default_value_t = 8089)]
        port: u16,
        #[arg(long, default_value = fttp_agent::demo::API_KEY)]
        api_key: String,
        #[arg(long, default_value = "apikey")]
        api_key_header: String,
        /// Start with no tasks instead of the demo's sample tasks
        #[arg(long)]
        empty: bool,
        /// Send every n-th newly enrolled Bloom filter to clearing (its
        /// pseudonym then comes as a dic_psn_available task)
        #[arg(long)]
        clearing_every: Option<u32>,
        /// The study it serves: a poll for another is refused (404), as the
        /// gateway does
        #[arg(long, default_value = fttp_agent::demo::STUDY)]
        study: String,
        /// This site's target domain in that study
        #[arg(long, default_value = fttp_agent::demo::TARGET)]
        target: String,
        /// Delay every answer by this much (e.g. 20ms): a gateway a WAN away
        #[arg(long, value_parser = fttp_agent::config::parse_duration)]
        latency: Option<std::time::Duration>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain; name the first edited, removed, inserted or
    /// reordered record. Exit 0 only for an intact log. Give rotated files
    /// oldest first to check them as one chain.
    Verify {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The audit HMAC key, for a log written with [log] audit_hmac_key_file
        #[arg(long)]
        key: Option<PathBuf>,
        /// Accept a chain that starts mid-way (its older rotated files are
        /// gone): check from the first record given
        #[arg(long)]
        partial: bool,
    },
    /// The audit records as NDJSON (one record per line)
    Export {
        /// Only records since T: RFC 3339 time, YYYY-MM-DD, or a duration back (24h, 7d)
        #[arg(long, value_parser = since_arg)]
        since: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum PseudonymFormatArg {
    Csv,
    Ndjson,
    Fhir,
}

#[derive(Clone, Copy, ValueEnum)]
enum TasksFormatArg {
    Table,
    Json,
    Fhir,
}

#[derive(Clone, Copy, ValueEnum)]
enum StatusFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Xml,
    Json,
}

/// A reader that stops early (`tasks | head -1`) closes the pipe: printing
/// then fails, and `println!` panics. That is not an error of the agent's:
/// end quietly, as Unix tools do.
fn quiet_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.contains("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info);
    }));
}

/// What process hardening could not do (a container may forbid it).
static HARDENING_FAILED: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

fn main() -> ExitCode {
    quiet_on_broken_pipe();
    // Before anything secret is read; what failed is logged by `load`, once
    // the logger is up.
    let _ = HARDENING_FAILED.set(fttp_agent::harden::process());
    let cli = Cli::parse();
    let code = match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            // Once: through the logger when it is up (stderr and the log
            // file), else (config and usage errors) straight to stderr.
            if log::max_level() == log::LevelFilter::Off {
                eprintln!("fttp-agent: {}", fttp_agent::privacy::escape_controls(&e.to_string()));
            } else {
                log::error!("{e}");
            }
            e.exit_code()
        }
    };
    ExitCode::from(code)
}

fn load(cli: &Cli) -> Result<Config, AppError> {
    let path = config::resolve_path(cli.config.as_deref());
    let mut cfg = Config::load(&path)?;
    cfg.accept_restore = cli.accept_restore;
    let level = cli.log_level.unwrap_or(cfg.log.level);
    fttp_agent::logger::init(level.filter(), cfg.log.file.as_deref(), cfg.log.format).map_err(AppError::Other)?;
    for w in cfg.warnings.iter().chain(HARDENING_FAILED.get().into_iter().flatten()) {
        log::warn!("{w}");
    }
    Ok(cfg)
}

fn dispatch(cli: Cli) -> Result<u8, AppError> {
    match &cli.command {
        Command::Run {
            once: true,
            dry_run,
            study,
        } => commands::run_once(&load(&cli)?, *dry_run, study.as_deref()),
        Command::Run { once: false, .. } => commands::run_daemon(&load(&cli)?),
        Command::Status {
            format,
            all,
            healthcheck,
        } => commands::status(&load(&cli)?, matches!(format, StatusFormat::Json), *all).map(|code| {
            match (*healthcheck, code) {
                (false, code) => code,
                (true, 2) => 1,
                (true, _) => 0,
            }
        }),
        Command::Purge => commands::purge(&load(&cli)?),
        Command::Forget { local_id, undo } => commands::forget(&load(&cli)?, local_id, *undo),
        Command::Backup { dest } => commands::backup(&load(&cli)?, dest),
        Command::Check { offline } => commands::check(&load(&cli)?, *offline),
        Command::Import { file } => commands::import(&load(&cli)?, file),
        Command::Bloom { file } => commands::bloom(&load(&cli)?, file),
        Command::Enroll {
            limit,
            retry_errors,
            study,
        } => commands::enroll(&load(&cli)?, *limit, *retry_errors, study.as_deref()),
        Command::UpdateBf { limit, study } => commands::update_bf(&load(&cli)?, *limit, study.as_deref()),
        Command::Tasks {
            status,
            kind,
            since,
            format,
            study,
        } => {
            let format = match format {
                TasksFormatArg::Table => commands::TasksFormat::Table,
                TasksFormatArg::Json => commands::TasksFormat::Json,
                TasksFormatArg::Fhir => commands::TasksFormat::Fhir,
            };
            commands::tasks(&load(&cli)?, *status, *kind, since.as_deref(), study.as_deref(), format)
        }
        Command::Serve => commands::serve(&load(&cli)?),
        Command::Man { dir } => man_pages(dir),
        Command::Completions { dir } => completions(dir),
        Command::Report { html } => commands::report_html(&load(&cli)?, html),
        Command::Pseudonyms {
            study,
            local_id,
            since,
            format,
            unmatched,
        } => {
            let format = match format {
                PseudonymFormatArg::Csv => commands::PseudonymFormat::Csv,
                PseudonymFormatArg::Ndjson => commands::PseudonymFormat::Ndjson,
                PseudonymFormatArg::Fhir => commands::PseudonymFormat::Fhir,
            };
            let filter = commands::PseudonymFilter {
                study: study.as_deref(),
                local_id: local_id.as_deref(),
                since: since.as_deref(),
                unmatched: *unmatched,
            };
            commands::pseudonyms(&load(&cli)?, &filter, format)
        }
        Command::Keygen { path } => commands::keygen(path),
        Command::Audit {
            command: AuditCommand::Verify { files, key, partial },
        } => commands::audit_verify(files, key.as_deref(), *partial),
        Command::Audit {
            command: AuditCommand::Export { since },
        } => commands::audit_export(&load(&cli)?, since.as_deref()),
        Command::Rekey { new_key } => commands::rekey(&load(&cli)?, new_key),
        Command::Demo { format, dir } => {
            let level = cli.log_level.unwrap_or(LogLevel::Info);
            fttp_agent::logger::init(level.filter(), None, Default::default()).map_err(AppError::Other)?;
            let format = match format {
                FormatArg::Xml => Format::Xml,
                FormatArg::Json => Format::Json,
            };
            commands::demo(format, dir.as_deref())
        }
        Command::Sim {
            port,
            api_key,
            api_key_header,
            empty,
            clearing_every,
            study,
            target,
            latency,
        } => {
            fttp_agent::logger::init(cli.log_level.unwrap_or_default().filter(), None, Default::default())
                .map_err(AppError::Other)?;
            let options = SimOptions {
                api_key: api_key.clone(),
                api_key_header: api_key_header.clone(),
                accept_body_key: true,
                port: *port,
                study_target: Some((study.clone(), target.clone())),
                latency: latency.unwrap_or_default(),
                ..SimOptions::default()
            };
            commands::sim(options, !empty, *clearing_every)
        }
    }
}

/// `--since T`, checked while the command line is read: a wrong form is a
/// usage error naming the option (exit 2), before anything is opened.
fn since_arg(s: &str) -> Result<String, String> {
    fttp_agent::duration::parse_since(s).map(|_| s.to_string())
}

/// The man pages, generated from the command line's own definitions (so
/// they never drift from `--help`): fttp-agent.1, and fttp-agent-NAME.1 per
/// subcommand (hidden ones left out).
fn man_pages(dir: &std::path::Path) -> Result<u8, AppError> {
    use clap::CommandFactory;
    let io = |e: std::io::Error| AppError::Other(format!("cannot write the man pages to {}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let cmd = Cli::command().name("fttp-agent");
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut out).map_err(io)?;
    std::fs::write(dir.join("fttp-agent.1"), &out).map_err(io)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("fttp-agent-{}", sub.get_name());
        let mut out = Vec::new();
        clap_mangen::Man::new(sub.clone().name(name.clone()))
            .render(&mut out)
            .map_err(io)?;
        std::fs::write(dir.join(format!("{name}.1")), &out).map_err(io)?;
    }
    Ok(fttp_agent::exit::OK)
}

/// Completions for bash, zsh and fish, under the names their packaged
/// directories expect (fttp-agent, _fttp-agent, fttp-agent.fish).
fn completions(dir: &std::path::Path) -> Result<u8, AppError> {
    use clap::CommandFactory;
    use clap_complete::Shell;
    let io = |e: std::io::Error| AppError::Other(format!("cannot write the completions to {}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    for (shell, file) in [
        (Shell::Bash, "fttp-agent"),
        (Shell::Zsh, "_fttp-agent"),
        (Shell::Fish, "fttp-agent.fish"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "fttp-agent", &mut out);
        std::fs::write(dir.join(file), &out).map_err(io)?;
    }
    Ok(fttp_agent::exit::OK)
}
