//! `[serve]`: the local gPAS-compatible service (`fttp-agent serve`, and
//! inside the daemon when the section is present).

use super::Secret;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Serve {
    /// Address and port to listen on. A non-loopback address needs
    /// `tls_cert` and `tls_key`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Path the gPAS operations live under: a client configured for a
    /// gateway's gPAS base URL changes only host and port.
    #[serde(default = "default_base_path")]
    pub base_path: String,
    /// Server certificate chain (PEM) and its private key (PEM, mode 0600):
    /// HTTPS instead of HTTP.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that sign the clients' certificates: a client
    /// must then present one (needs TLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// HTTP Basic authentication: user name, and the file holding the
    /// password (mode 0600). With `client_ca` too, both are required.
    #[serde(default)]
    pub basic_user: Option<String>,
    #[serde(default)]
    pub basic_password_file: Option<PathBuf>,
    /// The password read from `basic_password_file`.
    #[serde(skip)]
    pub basic_password: Option<Secret>,
    /// Answer `$dePseudonymize` (pseudonym -> local id). Off: 403.
    #[serde(default)]
    pub allow_depseudonymize: bool,
    /// Most originals (or pseudonyms) in one request.
    #[serde(default = "default_max_originals")]
    pub max_originals: usize,
    /// Largest request body accepted, in bytes.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Requests handled at once (each on a thread of its own); more
    /// connections wait in a queue, and beyond that get 503.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// `GET /` shows the status page (same authentication).
    #[serde(default = "yes")]
    pub status_page: bool,
    /// `GET /health` answers without authentication (load balancers,
    /// container health checks); it tells only ok, warning or critical.
    #[serde(default)]
    pub health_public: bool,
}

fn yes() -> bool {
    true
}

fn default_listen() -> String {
    "127.0.0.1:8686".into()
}

fn default_base_path() -> String {
    "/ttp-fhir/fhir/gpas".into()
}

fn default_max_originals() -> usize {
    10_000
}

fn default_max_body_bytes() -> usize {
    4 << 20
}

fn default_threads() -> usize {
    8
}

impl Serve {
    /// The listen address (checked by `validate`).
    pub fn addr(&self) -> Result<SocketAddr, String> {
        self.listen
            .parse()
            .map_err(|_| format!("[serve] listen = \"{}\" is not an address and port", self.listen))
    }

    /// The paths of the section, relative to the config file's directory.
    pub(super) fn paths_mut(&mut self) -> [&mut Option<PathBuf>; 4] {
        [
            &mut self.tls_cert,
            &mut self.tls_key,
            &mut self.client_ca,
            &mut self.basic_password_file,
        ]
    }

    /// Refuses a service that would answer without authentication, or in
    /// the clear beyond this host; reads the Basic password.
    pub(super) fn validate(&mut self) -> Result<(), String> {
        let addr = self.addr()?;
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err("[serve] set both tls_cert and tls_key, or neither".into());
        }
        let tls = self.tls_cert.is_some();
        if !addr.ip().is_loopback() && !tls {
            return Err(format!(
                "[serve] listen = \"{}\" is reachable from other hosts: set tls_cert and tls_key (and \
                 preferably client_ca), or listen on 127.0.0.1",
                self.listen
            ));
        }
        if self.client_ca.is_some() && !tls {
            return Err("[serve] client_ca needs tls_cert and tls_key".into());
        }
        if self.basic_user.is_some() != self.basic_password_file.is_some() {
            return Err("[serve] set both basic_user and basic_password_file, or neither".into());
        }
        if self.basic_user.is_none() && self.client_ca.is_none() {
            return Err(
                "[serve] the service needs authentication: set basic_user and basic_password_file, or \
                 client_ca (or both)"
                    .into(),
            );
        }
        if let Some(user) = &self.basic_user
            && (user.is_empty() || user.contains(':') || user.chars().any(char::is_control))
        {
            return Err("[serve] basic_user must be non-empty, without ':' or control characters".into());
        }
        if !self.base_path.starts_with('/') || self.base_path.contains(['?', '#', ' ']) {
            return Err(format!(
                "[serve] base_path = \"{}\" must be a path starting with '/'",
                self.base_path
            ));
        }
        let trimmed = self.base_path.trim_end_matches('/').to_string();
        self.base_path = trimmed;
        if !(1..=100_000).contains(&self.max_originals) {
            return Err("[serve] max_originals must be between 1 and 100000".into());
        }
        if !(1024..=(256 << 20)).contains(&self.max_body_bytes) {
            return Err("[serve] max_body_bytes must be between 1024 and 268435456".into());
        }
        if !(1..=64).contains(&self.threads) {
            return Err("[serve] threads must be between 1 and 64".into());
        }
        if let Some(file) = &self.basic_password_file {
            let password = read_password(file)?;
            self.basic_password = Some(Secret::new(password));
        }
        Ok(())
    }

    /// What `check` prints (secrets as set/unset).
    pub(crate) fn describe(&self) -> Vec<(String, String)> {
        let path = |p: &Option<PathBuf>| p.as_ref().map_or("unset".into(), |p| p.display().to_string());
        vec![
            ("serve.listen".into(), self.listen.clone()),
            ("serve.base_path".into(), self.base_path.clone()),
            ("serve.tls_cert".into(), path(&self.tls_cert)),
            ("serve.tls_key".into(), path(&self.tls_key)),
            ("serve.client_ca".into(), path(&self.client_ca)),
            (
                "serve.basic_user".into(),
                self.basic_user.clone().unwrap_or_else(|| "unset".into()),
            ),
            ("serve.basic_password_file".into(), path(&self.basic_password_file)),
            (
                "serve.allow_depseudonymize".into(),
                self.allow_depseudonymize.to_string(),
            ),
            ("serve.max_originals".into(), self.max_originals.to_string()),
            ("serve.max_body_bytes".into(), self.max_body_bytes.to_string()),
            ("serve.threads".into(), self.threads.to_string()),
            ("serve.status_page".into(), self.status_page.to_string()),
            ("serve.health_public".into(), self.health_public.to_string()),
        ]
    }
}

fn read_password(file: &Path) -> Result<String, String> {
    let text = crate::secret_file::read_private(file, "[serve] basic_password_file").map_err(|e| e.to_string())?;
    let password = text.trim_end_matches(['\r', '\n']).to_string();
    if password.is_empty() {
        return Err(format!("[serve] basic_password_file {} is empty", file.display()));
    }
    Ok(password)
}
