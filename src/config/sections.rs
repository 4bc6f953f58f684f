//! The sections of the file, one type each, every option documented
//! where it is declared, with its default.

use super::*;

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
pub(super) const MAX_INTERVAL: Duration = Duration::from_secs(31 * 86_400);

fn default_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(6 * 3600))
}
