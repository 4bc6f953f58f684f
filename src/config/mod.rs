//! Configuration: a TOML file, environment overrides, validation.
//!
//! Every option is documented where it is declared (here; `[bloomfilter]`
//! in `bloom.rs`) and in `config.example.toml`. Values are validated while the file is read, so a
//! bad value is reported with its key and line by the TOML parser.

use crate::fhir::Format;
use serde::{Deserialize, Deserializer};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod bloom;
mod serve;
mod values;
pub use bloom::*;
pub use serve::Serve;
pub use values::*;

pub const ENV_CONFIG: &str = "FTTP_AGENT_CONFIG";
pub const ENV_API_KEY: &str = "FTTP_AGENT_API_KEY";
pub const ENV_STORE_KEY_FILE: &str = "FTTP_AGENT_STORE_KEY_FILE";
pub const DEFAULT_CONFIG: &str = "fttp-agent.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "no config file: neither ./fttp-agent.toml nor /etc/fttp-agent/config.toml exists (give one with \
         --config or FTTP_AGENT_CONFIG; config.example.toml documents every key)"
    )]
    Missing,
    // toml's message names the key and line; values it quotes are ours to
    // see (an inline api_key is never quoted: its type is a plain string).
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error(transparent)]
    Secret(#[from] crate::secret_file::SecretFileError),
}

/// A secret string: never printed by `Debug`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Drop for Secret {
    /// Wiped when no longer needed: a core dump, swap or a later
    /// allocation reusing the memory holds no copy.
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub dispatcher: Dispatcher,
    /// One study, the form before `[[study]]` (still valid).
    #[serde(default)]
    pub site: Option<Site>,
    /// The studies this site takes part in, `[[study]]` each.
    #[serde(default, rename = "study")]
    pub study_entries: Vec<StudyEntry>,
    /// The studies, from `[site]` or `[[study]]`, in the order written
    /// (never empty once loaded).
    #[serde(skip)]
    pub studies: Vec<Study>,
    #[serde(default)]
    pub schedule: Schedule,
    pub store: Store,
    #[serde(default)]
    pub log: Log,
    /// How this site computes Bloom filters (`bloom`, `import`, `enroll`,
    /// `update-bf`). Unset: filters come precomputed with the import.
    #[serde(default)]
    pub bloomfilter: Option<BloomFilterConfig>,
    /// The local gPAS-compatible service. Unset: none (`serve` refuses).
    #[serde(default)]
    pub serve: Option<Serve>,
    /// Problems worth a warning but not a refusal, logged once logging is up.
    #[serde(skip)]
    pub warnings: Vec<String>,
    /// `--accept-restore`: a store or audit log that is an older copy than
    /// the other is taken as it is (and that is audited) instead of refused.
    #[serde(skip)]
    pub accept_restore: bool,
    /// The file this was read from (for messages).
    #[serde(skip)]
    pub path: PathBuf,
}

/// Where an API key travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ApiKeyIn {
    /// In the request header named by `api_key_header` (the guide's form).
    #[default]
    Header,
    /// As a Parameters entry `apikey` (valueString): older gateways.
    Body,
    /// Both, for gateways in transition.
    Both,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dispatcher {
    /// Base URL of the dispatcher endpoint, e.g.
    /// `https://fttp.example.org/ttp-fhir/fhir/dispatcher`; operations are
    /// called as `[url]/$requestTasks` and so on.
    pub url: BaseUrl,
    /// The API key, inline. Prefer `api_key_file` or the environment
    /// variable FTTP_AGENT_API_KEY, which overrides both.
    #[serde(default)]
    pub api_key: Option<Secret>,
    /// A file holding the API key (surrounding whitespace is ignored).
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// Request header carrying the API key. The guide says only "in the
    /// request header", so the name is configurable.
    #[serde(default = "default_api_key_header")]
    pub api_key_header: HeaderName,
    /// `header`, `body` (older gateways: a Parameters entry `apikey`) or `both`.
    #[serde(default)]
    pub api_key_in: ApiKeyIn,
    /// `xml` or `json`: what we send and ask for in Accept. Answers are
    /// parsed in whatever format their Content-Type says.
    #[serde(default)]
    pub format: Format,
    /// Timeout of one HTTP exchange, e.g. `30s`.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// Most Bloom filters sent in one `$requestPsnFromBfWorkflow` call.
    #[serde(default = "default_batch_size")]
    pub batch_size: BatchSize,
    /// Requests in flight at once (send_idat, repeat_request batches,
    /// enroll and update-bf): fewer when the dispatcher says it is busy
    /// (429/503, timeouts), growing back after successes.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: InFlight,
    /// Attempts per call for transient failures (connection errors,
    /// timeouts, 408, 429, 5xx), never past the task's expiry.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: Attempts,
    /// First retry delay; doubled per attempt, capped at 5 minutes.
    #[serde(default = "default_retry_delay")]
    pub retry_delay: HumanDuration,
    /// Largest answer body accepted.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: u64,
    /// Cycles in which an open task without `expires` (or one whose last
    /// answer was an unknown error code) is tried before it is given up.
    #[serde(default = "default_max_task_attempts")]
    pub max_task_attempts: TaskAttempts,
    /// Age after which an open task without `expires` is given up.
    #[serde(default = "default_max_task_age")]
    pub max_task_age: HumanDuration,
    /// How a Bloom filter is sent in `$requestPsnFromBfWorkflow`: `plain`
    /// (a base64Binary value, as the guide's example) or `with_version`
    /// (parts `bloomfilter` and `version`, as its operation definition).
    #[serde(default)]
    pub bloomfilter_form: BloomfilterForm,
    /// PEM bundle of additional CAs to trust (an internal hospital or
    /// trust-centre CA), on top of the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for mutual TLS.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// HTTP(S) proxy, e.g. `http://user:password@proxy.example.org:3128`.
    /// Unset: HTTPS_PROXY / HTTP_PROXY / ALL_PROXY and NO_PROXY from the environment.
    #[serde(default)]
    pub proxy: Option<Secret>,
    /// Allow plain `http://` to a host other than loopback. Never needed in
    /// production: IDAT must not cross a network unencrypted.
    #[serde(default)]
    pub allow_insecure_http: bool,
    /// Authentication besides the API key, where a deployment requires it.
    #[serde(default)]
    pub auth: Auth,
}

/// `[dispatcher.auth]`: HTTP Basic, or OAuth2 bearer tokens from a token
/// endpoint (Keycloak), with the client-credentials grant or, where a
/// deployment uses it, the password grant.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    /// HTTP Basic user name.
    #[serde(default)]
    pub basic_user: Option<String>,
    /// File holding the HTTP Basic password.
    #[serde(default)]
    pub basic_password_file: Option<PathBuf>,
    /// OAuth2 token endpoint, e.g.
    /// `https://keycloak.example.org/realms/ttp/protocol/openid-connect/token`.
    #[serde(default)]
    pub token_url: Option<BaseUrl>,
    /// OAuth2 client id.
    #[serde(default)]
    pub client_id: Option<String>,
    /// File holding the OAuth2 client secret.
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// Password grant: user name (unset: client-credentials grant).
    #[serde(default)]
    pub username: Option<String>,
    /// Password grant: file holding the password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    /// The study, as known to the fTTP (e.g. `mii`).
    pub study: NonEmpty,
    /// This site's target domain (e.g. `dic_muenster`).
    pub target: NonEmpty,
}

/// A `[[study]]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyEntry {
    /// The study as the fTTP knows it (the `study` parameter).
    pub name: NonEmpty,
    /// This site's target domain in that study.
    pub target: NonEmpty,
    /// This study's API key (else `[dispatcher]`'s).
    #[serde(default)]
    pub api_key: Option<Secret>,
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// Another dispatcher for this study (else `[dispatcher] url`).
    #[serde(default)]
    pub url: Option<BaseUrl>,
}

/// A study this site takes part in, resolved: its own API key and URL, if
/// any, are folded into the configuration `Config::for_study` gives.
#[derive(Debug, Clone, PartialEq)]
pub struct Study {
    pub name: String,
    pub target: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Time between polls in daemon mode (`run` without `--once`). The guide
    /// recommends several polls a week; tasks expire.
    #[serde(default = "default_interval")]
    pub interval: HumanDuration,
    /// `status` warns about every open task expiring within this time.
    #[serde(default = "default_warn_before")]
    pub warn_before: HumanDuration,
    /// `status` is critical after this many failed polls in a row.
    #[serde(default = "default_critical_failed_polls")]
    pub critical_failed_polls: u32,
    /// `status` is critical when the last successful poll is older than
    /// this (an agent that stopped polling). Unset: 2 x interval + 1h.
    #[serde(default)]
    pub stale_after: Option<HumanDuration>,
}

impl Schedule {
    /// `stale_after`, or its default from the interval.
    pub fn stale_after(&self) -> Duration {
        self.stale_after
            .map_or_else(|| self.interval.0 * 2 + Duration::from_secs(3600), |d| d.0)
    }
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            interval: default_interval(),
            warn_before: default_warn_before(),
            critical_failed_polls: default_critical_failed_polls(),
            stale_after: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Store {
    /// Directory of the local store (patients, pseudonyms, task ledger).
    /// Created with mode 0700.
    pub path: PathBuf,
    /// The 256-bit key that encrypts IDAT, Bloom filters and pseudonyms in
    /// the store (`fttp-agent keygen PATH` makes one, mode 0600). The
    /// environment variable FTTP_AGENT_STORE_KEY_FILE overrides it.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Finished (resolved, expired, rejected) ledger entries older than this
    /// are purged daily by the daemon and by `fttp-agent purge`. Open tasks
    /// never are.
    #[serde(default = "default_retention")]
    pub retention: HumanDuration,
    /// Read and ignored: the store before the database compacted its journal
    /// after this many records. An old config that sets it gets a warning.
    #[serde(default)]
    pub compact_after: Option<toml::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[derive(Default)]
pub struct Log {
    /// Human-readable log file, in addition to stderr. Unset: stderr only.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// `error`, `warn`, `info`, `debug` or `trace`.
    #[serde(default)]
    pub level: LogLevel,
    /// `text` for people, `json` (one object per line: ts, level, message,
    /// and the task's kind and id where there is one) for ELK/Graylog.
    #[serde(default)]
    pub format: crate::logger::LogFormat,
    /// Prometheus text-format metrics file written after every cycle (for
    /// node_exporter's textfile collector). Unset: no metrics.
    #[serde(default)]
    pub metrics: Option<PathBuf>,
    /// The audit log (NDJSON, one record per task outcome and per poll).
    /// Unset: `audit.ndjson` in the store directory.
    #[serde(default)]
    pub audit: Option<PathBuf>,
    /// A key (made with `fttp-agent keygen`) that makes the audit log's hash
    /// chain an HMAC-SHA256 chain: then whoever can write the log cannot
    /// forge it. Unset: a plain SHA-256 chain (detects edits, not forgery).
    #[serde(default)]
    pub audit_hmac_key_file: Option<PathBuf>,
    /// The status page (HTML), written after every cycle (as `report
    /// --html` writes it). Unset: none.
    #[serde(default)]
    pub report: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

impl std::str::FromStr for LogLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "error" => LogLevel::Error,
            "warn" => LogLevel::Warn,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            _ => return Err(format!("unknown log level '{s}'")),
        })
    }
}

fn default_api_key_header() -> HeaderName {
    HeaderName("apikey".into())
}
fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_max_in_flight() -> InFlight {
    InFlight(4)
}

fn default_batch_size() -> BatchSize {
    BatchSize(100)
}
fn default_max_task_attempts() -> TaskAttempts {
    TaskAttempts(5)
}
fn default_max_task_age() -> HumanDuration {
    HumanDuration(Duration::from_secs(14 * 86_400))
}
fn default_max_attempts() -> Attempts {
    Attempts(3)
}
fn default_retry_delay() -> HumanDuration {
    HumanDuration(Duration::from_secs(2))
}
/// A 100,000-task answer is 57.5 MB in XML and 42 MB in JSON (README,
/// Performance): room for it, and no more.
fn default_max_response_bytes() -> u64 {
    60 * 1024 * 1024
}
/// The studies of a configuration: `[site]`, or the `[[study]]` list, never
/// both and never none; names unique and plain (they name rows of the
/// store and ledger keys).
fn studies(cfg: &Config, text: &str, path: &Path) -> Result<Vec<Study>, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let line_of = |header: &str| {
        text.lines()
            .position(|l| l.trim_start().starts_with(header))
            .map_or(0, |i| i + 1)
    };
    let list: Vec<Study> = match (&cfg.site, cfg.study_entries.is_empty()) {
        (Some(_), false) => {
            return Err(invalid(format!(
                "both [site] (line {}) and [[study]] (line {}) name studies: keep one form ([[study]] for \
                 several studies)",
                line_of("[site]"),
                line_of("[[study]]")
            )));
        }
        (Some(site), true) => vec![Study {
            name: site.study.as_str().to_string(),
            target: site.target.as_str().to_string(),
        }],
        (None, true) => {
            return Err(invalid(
                "no study configured: add [[study]] with name and target (or [site] study and target)".into(),
            ));
        }
        (None, false) => cfg
            .study_entries
            .iter()
            .map(|e| Study {
                name: e.name.as_str().to_string(),
                target: e.target.as_str().to_string(),
            })
            .collect(),
    };
    let mut seen = std::collections::BTreeSet::new();
    for s in &list {
        if !s.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
            return Err(invalid(format!(
                "study name '{}' may hold only letters, digits, '.', '_' and '-'",
                crate::privacy::escape_controls(&s.name)
            )));
        }
        if !seen.insert(s.name.as_str()) {
            return Err(invalid(format!("study '{}' is configured twice", s.name)));
        }
    }
    Ok(list)
}

fn default_warn_before() -> HumanDuration {
    HumanDuration(Duration::from_secs(24 * 3600))
}
fn default_critical_failed_polls() -> u32 {
    3
}
fn default_retention() -> HumanDuration {
    HumanDuration(Duration::from_secs(90 * 86_400))
}
/// Longer than any task lives: a daemon polling less often misses them all.
const MAX_INTERVAL: Duration = Duration::from_secs(31 * 86_400);

fn default_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(6 * 3600))
}

// ------------------------------------------------------------ loading

/// The config file of a package install.
pub const SYSTEM_CONFIG: &str = "/etc/fttp-agent/config.toml";

/// The config file to use: `--config`, else `$FTTP_AGENT_CONFIG`, else
/// `./fttp-agent.toml` if it exists, else `/etc/fttp-agent/config.toml`.
pub fn resolve_path(cli: Option<&Path>) -> PathBuf {
    if let Some(p) = cli {
        return p.to_path_buf();
    }
    match std::env::var_os(ENV_CONFIG) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ if Path::new(DEFAULT_CONFIG).exists() => PathBuf::from(DEFAULT_CONFIG),
        _ => PathBuf::from(SYSTEM_CONFIG),
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound && path == Path::new(SYSTEM_CONFIG) {
                ConfigError::Missing
            } else {
                ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        let mut cfg = Config::parse(&text, path)?;
        if cfg.store.compact_after.is_some() {
            cfg.warnings.push(format!(
                "{}: [store] compact_after is no longer used (the store is a SQLite database now); \
                 remove it",
                path.display()
            ));
        }
        if cfg.dispatcher.api_key.is_some() && std::env::var_os(ENV_API_KEY).is_none() {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = std::fs::metadata(path)
                && meta.permissions().mode() & 0o044 != 0
            {
                cfg.warnings.push(format!(
                    "{} holds an inline api_key and can be read by group or others (mode {:o}); \
                     chmod 600 it, or use api_key_file",
                    path.display(),
                    meta.permissions().mode() & 0o777
                ));
            }
        }
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve_relative(base);
        cfg.apply_env();
        cfg.validate(path)?;
        cfg.path = path.to_path_buf();
        Ok(cfg)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e: toml::de::Error| ConfigError::Parse {
            path: path.to_path_buf(),
            message: describe_toml_error(text, &e),
        })?;
        cfg.studies = studies(&cfg, text, path)?;
        Ok(cfg)
    }

    /// The study of a configuration that has one (`for_study`'s, or a
    /// site's only one); of several, the first.
    pub fn study(&self) -> &Study {
        // (`parse` refuses a configuration without a study.)
        &self.studies[0]
    }

    /// The configuration as one study sees it: that study alone, with its
    /// own API key and dispatcher URL where it has them.
    pub fn for_study(&self, name: &str) -> Option<Config> {
        let study = self.studies.iter().find(|s| s.name == name)?.clone();
        let mut cfg = self.clone();
        if let Some(entry) = self.study_entries.iter().find(|e| e.name.as_str() == name) {
            if let Some(url) = &entry.url {
                cfg.dispatcher.url = url.clone();
            }
            if let Some(key) = &entry.api_key {
                cfg.dispatcher.api_key = Some(key.clone());
            }
        }
        cfg.studies = vec![study];
        Some(cfg)
    }

    /// The study named `name`, or a usage message listing the configured ones.
    pub fn find_study(&self, name: &str) -> Result<&Study, String> {
        self.studies.iter().find(|s| s.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.studies.iter().map(|s| s.name.as_str()).collect();
            format!(
                "no study named '{name}' is configured (configured: {})",
                names.join(", ")
            )
        })
    }

    /// Relative paths in the file are relative to the file, not to the
    /// working directory of whoever started the agent (cron, systemd).
    fn resolve_relative(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.store.path);
        if let Some(p) = self.store.key_file.as_mut() {
            fix(p);
        }
        let d = &mut self.dispatcher;
        for p in [
            &mut d.api_key_file,
            &mut d.ca_file,
            &mut d.client_cert,
            &mut d.client_key,
            &mut d.auth.basic_password_file,
            &mut d.auth.client_secret_file,
            &mut d.auth.password_file,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
        if let Some(p) = self.log.file.as_mut() {
            fix(p);
        }
        if let Some(p) = self.log.audit.as_mut() {
            fix(p);
        }
        if let Some(p) = self.log.audit_hmac_key_file.as_mut() {
            fix(p);
        }
        if let Some(p) = self.log.metrics.as_mut() {
            fix(p);
        }
        if let Some(p) = self.log.report.as_mut() {
            fix(p);
        }
        if let Some(b) = self.bloomfilter.as_mut() {
            fix(&mut b.seeds_file);
        }
        if let Some(s) = self.serve.as_mut() {
            for p in s.paths_mut().into_iter().flatten() {
                fix(p);
            }
        }
    }

    fn apply_env(&mut self) {
        if let Some(p) = std::env::var_os(ENV_STORE_KEY_FILE).filter(|p| !p.is_empty()) {
            self.store.key_file = Some(PathBuf::from(p));
        }
        if let Ok(key) = std::env::var(ENV_API_KEY)
            && !key.trim().is_empty()
        {
            self.dispatcher.api_key = Some(Secret::new(key.trim()));
            self.dispatcher.api_key_file = None;
        }
    }

    fn validate(&mut self, path: &Path) -> Result<(), ConfigError> {
        if self.dispatcher.api_key.is_some() && self.dispatcher.api_key_file.is_some() {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                message: "[dispatcher] set either api_key or api_key_file, not both".into(),
            });
        }
        if let Some(file) = &self.dispatcher.api_key_file {
            let key = crate::secret_file::read_private(file, "the API key file")?;
            self.dispatcher.api_key = Some(Secret::new(key.trim()));
        }
        for entry in &mut self.study_entries {
            let name = entry.name.as_str().to_string();
            if entry.api_key.is_some() && entry.api_key_file.is_some() {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    message: format!("[[study]] {name}: set either api_key or api_key_file, not both"),
                });
            }
            if let Some(file) = &entry.api_key_file {
                let key = crate::secret_file::read_private(file, "a study's API key file")?;
                entry.api_key = Some(Secret::new(key.trim()));
            }
            if entry.url.as_ref().is_some_and(|u| {
                u.0.starts_with("http://") && !self.dispatcher.allow_insecure_http && !is_loopback_url(&u.0)
            }) {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    message: format!(
                        "[[study]] {name}: url uses plain http:// to a host that is not loopback: IDAT would \
                         cross the network unencrypted. Use https://"
                    ),
                });
            }
        }
        if self.dispatcher.api_key.as_ref().is_none_or(|k| k.expose().is_empty()) {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                message: format!("[dispatcher] no API key: set api_key_file, api_key or {ENV_API_KEY}"),
            });
        }
        // Plain http only to loopback, unless a test setup opts in.
        let insecure =
            |url: &str| url.starts_with("http://") && !self.dispatcher.allow_insecure_http && !is_loopback_url(url);
        if insecure(&self.dispatcher.url.0) {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                message: "[dispatcher] url uses plain http:// to a host that is not loopback: IDAT would cross \
                          the network unencrypted. Use https://, or set allow_insecure_http = true for a test setup"
                    .into(),
            });
        }
        if self.dispatcher.auth.token_url.as_ref().is_some_and(|u| insecure(&u.0)) {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                message: "[dispatcher.auth] token_url uses plain http:// to a host that is not loopback: the \
                          client secret would cross the network unencrypted. Use https://"
                    .into(),
            });
        }
        if self.dispatcher.bloomfilter_form == BloomfilterForm::WithVersion
            && self.bloomfilter.as_ref().and_then(|b| b.version.as_ref()).is_none()
        {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                message: "[dispatcher] bloomfilter_form = \"with_version\" needs [bloomfilter] version (the \
                          version sent with each filter)"
                    .into(),
            });
        }
        if self.dispatcher.client_cert.is_some() != self.dispatcher.client_key.is_some() {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                message: "[dispatcher] client_cert and client_key go together".into(),
            });
        }
        let a = &self.dispatcher.auth;
        if a.basic_user.is_some() != a.basic_password_file.is_some() {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                message: "[dispatcher.auth] basic_user and basic_password_file go together".into(),
            });
        }
        if a.token_url.is_some() && (a.client_id.is_none() || a.client_secret_file.is_none()) {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                message: "[dispatcher.auth] token_url needs client_id and client_secret_file".into(),
            });
        }
        if a.username.is_some() != a.password_file.is_some() {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                message: "[dispatcher.auth] username and password_file go together (password grant)".into(),
            });
        }
        if a.token_url.is_some() && a.basic_user.is_some() {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                message: "[dispatcher.auth] choose HTTP Basic or OAuth2, not both".into(),
            });
        }
        if self.store.key_file.is_none() {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                message: format!(
                    "[store] key_file is required (the store is encrypted); create one with \
                     `fttp-agent keygen PATH`, or set {ENV_STORE_KEY_FILE}"
                ),
            });
        }
        if self.schedule.interval.0 < Duration::from_secs(1) || self.schedule.interval.0 > MAX_INTERVAL {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                message: "[schedule] interval must be between 1s and 31d (tasks expire within days)".into(),
            });
        }
        if let Some(serve) = self.serve.as_mut() {
            serve.validate().map_err(|message| ConfigError::Invalid {
                path: path.to_path_buf(),
                message,
            })?;
        }
        Ok(())
    }

    /// The Bloom filter encoder of `[bloomfilter]` (reads the seeds file);
    /// `None` when the section is absent.
    pub fn bloom_encoder(&self) -> Result<Option<crate::bloom::RecordEncoder>, ConfigError> {
        let Some(b) = &self.bloomfilter else { return Ok(None) };
        b.encoder().map(Some).map_err(|message| ConfigError::Invalid {
            path: self.path.clone(),
            message: format!("[bloomfilter] {message}"),
        })
    }

    /// Loads the store key named by `[store] key_file`.
    pub fn store_key(&self) -> Result<crate::crypto::StoreKey, crate::crypto::KeyError> {
        let path = self.store.key_file.clone().unwrap_or_default();
        crate::crypto::StoreKey::load(&path)
    }

    /// How the audit log is chained: HMAC under `[log] audit_hmac_key_file`, else SHA-256.
    pub fn audit_chain(&self) -> Result<crate::audit::Chain, crate::crypto::KeyError> {
        match &self.log.audit_hmac_key_file {
            Some(p) => crate::audit::Chain::hmac_from_file(p),
            None => Ok(crate::audit::Chain::Sha256),
        }
    }

    pub fn audit_path(&self) -> PathBuf {
        self.log
            .audit
            .clone()
            .unwrap_or_else(|| self.store.path.join("audit.ndjson"))
    }

    pub fn api_key(&self) -> &str {
        self.dispatcher.api_key.as_ref().map_or("", Secret::expose)
    }

    /// What `check` prints: every effective setting, secrets shown only as set/unset.
    pub fn describe(&self) -> Vec<(String, String)> {
        let d = &self.dispatcher;
        let fmt_dur = |h: &HumanDuration| format_duration(h.0);
        let mut out: Vec<(String, String)> = vec![
            ("dispatcher.url".into(), d.url.0.clone()),
            (
                "dispatcher.api_key".into(),
                if d.api_key.is_some() {
                    "set (hidden)".into()
                } else {
                    "unset".into()
                },
            ),
            ("dispatcher.api_key_header".into(), d.api_key_header.0.clone()),
            (
                "dispatcher.api_key_in".into(),
                format!("{:?}", d.api_key_in).to_lowercase(),
            ),
            ("dispatcher.format".into(), format!("{:?}", d.format).to_lowercase()),
            ("dispatcher.timeout".into(), fmt_dur(&d.timeout)),
            ("dispatcher.batch_size".into(), d.batch_size.0.to_string()),
            ("dispatcher.max_in_flight".into(), d.max_in_flight.0.to_string()),
            ("dispatcher.max_attempts".into(), d.max_attempts.0.to_string()),
            ("dispatcher.retry_delay".into(), fmt_dur(&d.retry_delay)),
            ("dispatcher.max_task_attempts".into(), d.max_task_attempts.0.to_string()),
            ("dispatcher.max_task_age".into(), fmt_dur(&d.max_task_age)),
            (
                "dispatcher.bloomfilter_form".into(),
                match d.bloomfilter_form {
                    BloomfilterForm::Plain => "plain".into(),
                    BloomfilterForm::WithVersion => "with_version".into(),
                },
            ),
            ("dispatcher.max_response_bytes".into(), d.max_response_bytes.to_string()),
            (
                "dispatcher.ca_file".into(),
                d.ca_file
                    .as_ref()
                    .map_or("unset (system roots)".into(), |p| p.display().to_string()),
            ),
            (
                "dispatcher.client_cert".into(),
                d.client_cert
                    .as_ref()
                    .map_or("unset".into(), |p| p.display().to_string()),
            ),
            (
                "dispatcher.proxy".into(),
                if d.proxy.is_some() {
                    "set (hidden)".into()
                } else {
                    "from environment, if any".into()
                },
            ),
            (
                "dispatcher.auth".into(),
                if d.auth.token_url.is_some() {
                    if d.auth.username.is_some() {
                        "oauth2 password grant"
                    } else {
                        "oauth2 client credentials"
                    }
                } else if d.auth.basic_user.is_some() {
                    "http basic"
                } else {
                    "api key only"
                }
                .into(),
            ),
            (
                "studies".into(),
                self.studies
                    .iter()
                    .map(|s| format!("{} (target {})", s.name, s.target))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            ("schedule.interval".into(), fmt_dur(&self.schedule.interval)),
            ("schedule.warn_before".into(), fmt_dur(&self.schedule.warn_before)),
            (
                "schedule.critical_failed_polls".into(),
                self.schedule.critical_failed_polls.to_string(),
            ),
            ("store.retention".into(), fmt_dur(&self.store.retention)),
            ("store.path".into(), self.store.path.display().to_string()),
            (
                "store.key_file".into(),
                self.store
                    .key_file
                    .as_ref()
                    .map_or("unset".into(), |p| p.display().to_string()),
            ),
            (
                "log.file".into(),
                self.log
                    .file
                    .as_ref()
                    .map_or("(stderr only)".into(), |p| p.display().to_string()),
            ),
            ("log.level".into(), format!("{:?}", self.log.level).to_lowercase()),
            ("log.format".into(), format!("{:?}", self.log.format).to_lowercase()),
            (
                "log.metrics".into(),
                self.log
                    .metrics
                    .as_ref()
                    .map_or("unset".into(), |p| p.display().to_string()),
            ),
            ("log.audit".into(), self.audit_path().display().to_string()),
            (
                "log.audit_hmac_key_file".into(),
                self.log
                    .audit_hmac_key_file
                    .as_ref()
                    .map_or("unset (SHA-256 chain)".into(), |p| p.display().to_string()),
            ),
            (
                "log.report".into(),
                self.log
                    .report
                    .as_ref()
                    .map_or("unset".into(), |p| p.display().to_string()),
            ),
        ];
        match &self.bloomfilter {
            None => out.push(("bloomfilter".into(), "unset (filters come with the import)".into())),
            Some(b) => {
                let fields: Vec<String> = b
                    .fields
                    .iter()
                    .map(|f| {
                        let src: Vec<&str> = f.source.elements().iter().map(|e| e.code()).collect();
                        format!("{} <- {}", f.name, src.join("+"))
                    })
                    .collect();
                out.extend([
                    (
                        "bloomfilter.length".into(),
                        format!(
                            "{} ({})",
                            b.length,
                            if b.balanced { "balanced" } else { "not balanced" }
                        ),
                    ),
                    (
                        "bloomfilter.random_position_number".into(),
                        b.random_position_number.to_string(),
                    ),
                    (
                        "bloomfilter.vocabulary".into(),
                        format!("{} characters", b.vocabulary.chars().count()),
                    ),
                    ("bloomfilter.fields".into(), fields.join(", ")),
                    (
                        "bloomfilter.seeds_file".into(),
                        format!("{} (seeds hidden)", b.seeds_file.display()),
                    ),
                    (
                        "bloomfilter.version".into(),
                        b.version.clone().unwrap_or_else(|| "unset".into()),
                    ),
                ]);
            }
        }
        match &self.serve {
            None => out.push(("serve".into(), "unset (no local service)".into())),
            Some(s) => out.extend(s.describe()),
        }
        out
    }
}

/// toml's error with the line number spelled out, and without echoing the
/// offending line (it may hold an inline API key).
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let mut message = e.message().trim().to_string();
    if let Some(hint) = did_you_mean(&message) {
        message.push_str(&format!(" -- did you mean `{hint}`?"));
    }
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            let key = text
                .lines()
                .nth(line - 1)
                .and_then(|l| l.split('=').next())
                .map(str::trim)
                .filter(|k| !k.is_empty() && !k.starts_with('['))
                .map(|k| format!(" (key `{k}`)"))
                .unwrap_or_default();
            format!("line {line}{key}: {message}")
        }
        None => message,
    }
}

/// For serde's "unknown field `x`, expected one of `a`, `b`": the expected
/// name closest to `x`, if one is close (a typo, not another key).
fn did_you_mean(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (unknown, rest) = rest.split_once('`')?;
    let expected = rest.split_once("expected ")?.1;
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|k| (edit_distance(unknown, k), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k.to_string())
}

/// Levenshtein distance (keys are a few ASCII characters).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// `http://127.x.x.x`, `http://localhost`, `http://[::1]`.
pub fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Reads a one-line secret from a private file (password, client secret).
pub fn read_secret(path: &Path, what: &'static str) -> Result<Secret, ConfigError> {
    Ok(Secret::new(crate::secret_file::read_private(path, what)?.trim()))
}

#[cfg(test)]
mod tests;
