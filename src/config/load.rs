//! Loading: the file's path, TOML with errors that name the line and
//! suggest the key meant, environment overrides, paths relative to the
//! file, and validation.

use super::sections::MAX_INTERVAL;
use super::*;

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
