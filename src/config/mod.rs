//! Configuration: a TOML file, environment overrides, validation.
//!
//! Every option is documented where it is declared (`sections.rs`;
//! `[bloomfilter]` in `bloom.rs`, `[serve]` in `serve.rs`, the value types
//! in `values.rs`) and in `config.example.toml`. `load.rs` reads and
//! validates a file, `describe.rs` shows it back (`check`). Values are
//! validated while the file is read, so a bad value is reported with its
//! key and line by the TOML parser.

use crate::fhir::Format;
use serde::{Deserialize, Deserializer};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod bloom;
mod describe;
mod load;
mod sections;
mod serve;
mod values;
pub use bloom::*;
pub use load::{SYSTEM_CONFIG, resolve_path};
pub use sections::*;
pub use serve::Serve;
pub use values::*;

pub(crate) const ENV_CONFIG: &str = "FTTP_AGENT_CONFIG";
pub(crate) const ENV_API_KEY: &str = "FTTP_AGENT_API_KEY";
pub(crate) const ENV_STORE_KEY_FILE: &str = "FTTP_AGENT_STORE_KEY_FILE";
pub(crate) const DEFAULT_CONFIG: &str = "fttp-agent.toml";

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

impl ConfigError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ConfigError::Secret(e) => e.exit_code(),
            _ => crate::exit::CONFIG,
        }
    }
}

/// A secret string: never printed by `Debug`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub(crate) fn expose(&self) -> &str {
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

impl Config {
    /// The study of a configuration that has one (`for_study`'s, or a
    /// site's only one); of several, the first.
    pub fn study(&self) -> &Study {
        // (`parse` refuses a configuration without a study.)
        &self.studies[0]
    }

    /// The configuration as one study sees it: that study alone, with its
    /// own API key and dispatcher URL where it has them.
    pub(crate) fn for_study(&self, name: &str) -> Option<Config> {
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
    pub(crate) fn find_study(&self, name: &str) -> Result<&Study, String> {
        self.studies.iter().find(|s| s.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.studies.iter().map(|s| s.name.as_str()).collect();
            format!(
                "no study named '{name}' is configured (configured: {})",
                names.join(", ")
            )
        })
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
    pub(crate) fn store_key(&self) -> Result<crate::crypto::StoreKey, crate::crypto::KeyError> {
        let path = self.store.key_file.clone().unwrap_or_default();
        crate::crypto::StoreKey::load(&path)
    }

    /// How the audit log is chained: HMAC under `[log] audit_hmac_key_file`, else SHA-256.
    pub(crate) fn audit_chain(&self) -> Result<crate::audit::Chain, crate::crypto::KeyError> {
        match &self.log.audit_hmac_key_file {
            Some(p) => crate::audit::Chain::hmac_from_file(p),
            None => Ok(crate::audit::Chain::Sha256),
        }
    }

    pub(crate) fn audit_path(&self) -> PathBuf {
        self.log
            .audit
            .clone()
            .unwrap_or_else(|| self.store.path.join("audit.ndjson"))
    }

    pub fn api_key(&self) -> &str {
        self.dispatcher.api_key.as_ref().map_or("", Secret::expose)
    }
}

/// `http://127.x.x.x`, `http://localhost`, `http://[::1]`.
pub(crate) fn is_loopback_url(url: &str) -> bool {
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
pub(crate) fn read_secret(path: &Path, what: &'static str) -> Result<Secret, ConfigError> {
    Ok(Secret::new(crate::secret_file::read_private(path, what)?.trim()))
}

#[cfg(test)]
mod tests;
