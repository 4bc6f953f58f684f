//! The HTTP agent as hospital networks need it: the system's CA roots plus
//! an internal CA, mutual TLS, an HTTP(S) proxy from the config or the
//! environment; and TLS failures explained in words an admin can act on.

use crate::config::Dispatcher;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use ureq::http::Uri;
use ureq::tls::{Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig};
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};

#[derive(Debug, thiserror::Error)]
pub enum NetSetupError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} holds no usable PEM {expected}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error(transparent)]
    Exposed(crate::secret_file::SecretFileError),
    #[error("[dispatcher] proxy is not a usable proxy URL (e.g. http://user:password@proxy:3128)")]
    Proxy,
}

impl NetSetupError {
    /// Certificates, keys and proxies come from the configuration.
    pub fn exit_code(&self) -> u8 {
        crate::exit::CONFIG
    }
}

/// Where Debian, RHEL and others keep the system's CA bundle.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, NetSetupError> {
    std::fs::read(path).map_err(|source| NetSetupError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn certs_of(pem: &[u8]) -> Vec<Certificate<'static>> {
    ureq::tls::parse_pem(pem)
        .filter_map(|item| match item {
            Ok(PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect()
}

/// The system roots (SSL_CERT_FILE, else the distribution's bundle) plus
/// `ca_file`. `None` when neither exists: then ureq's bundled roots apply.
fn roots(ca_file: Option<&Path>) -> Result<Option<Vec<Certificate<'static>>>, NetSetupError> {
    let mut certs = Vec::new();
    let env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    let system = env
        .into_iter()
        .chain(SYSTEM_BUNDLES.iter().map(PathBuf::from))
        .find(|p| p.is_file());
    if let Some(p) = system
        && let Ok(pem) = std::fs::read(&p)
    {
        certs.extend(certs_of(&pem));
    }
    if let Some(ca) = ca_file {
        let extra = certs_of(&read(ca, "[dispatcher] ca_file")?);
        if extra.is_empty() {
            return Err(NetSetupError::Pem {
                what: "[dispatcher] ca_file",
                path: ca.to_path_buf(),
                expected: "certificate",
            });
        }
        certs.extend(extra);
    }
    Ok((!certs.is_empty()).then_some(certs))
}

fn client_cert(cert: &Path, key: &Path) -> Result<ClientCert, NetSetupError> {
    let chain = certs_of(&read(cert, "[dispatcher] client_cert")?);
    if chain.is_empty() {
        return Err(NetSetupError::Pem {
            what: "[dispatcher] client_cert",
            path: cert.to_path_buf(),
            expected: "certificate",
        });
    }
    crate::secret_file::check_private(key, "[dispatcher] client_key").map_err(NetSetupError::Exposed)?;
    let key_pem = read(key, "[dispatcher] client_key")?;
    let key = PrivateKey::from_pem(&key_pem).map_err(|_| NetSetupError::Pem {
        what: "[dispatcher] client_key",
        path: key.to_path_buf(),
        expected: "private key",
    })?;
    Ok(ClientCert::new_with_certs(&chain, key))
}

/// The HTTP agent for requests to `url` (the dispatcher's, or the token
/// endpoint's). A plain-http loopback URL is always connected to directly:
/// through a proxy (`[dispatcher] proxy` or `HTTP_PROXY`) the request, API
/// key and IDAT included, would cross the network in clear to the proxy.
pub fn agent(d: &Dispatcher, url: &str) -> Result<ureq::Agent, NetSetupError> {
    let mut tls = TlsConfig::builder();
    if let Some(certs) = roots(d.ca_file.as_deref())? {
        tls = tls.root_certs(RootCerts::new_with_certs(&certs));
    }
    if let (Some(cert), Some(key)) = (&d.client_cert, &d.client_key) {
        tls = tls.client_cert(Some(client_cert(cert, key)?));
    }
    let mut config = ureq::Agent::config_builder()
        .timeout_global(Some(d.timeout.0))
        .http_status_as_error(false)
        // The dispatcher's operations and the token endpoint never
        // redirect. Following one would carry the API key to another host
        // (ureq strips only Authorization), possibly over plain http, and a
        // 303 would turn a POST into a bodiless GET whose 2xx looks like
        // success: a 3xx is a failed call instead (`ClientError::Redirected`).
        .max_redirects(0)
        // Kept-alive connections for every request in flight: one TLS
        // handshake per connection, not per request.
        .max_idle_connections_per_host(d.max_in_flight.0.max(3))
        .max_idle_connections(64)
        .user_agent(concat!("fttp-agent/", env!("CARGO_PKG_VERSION")))
        .tls_config(tls.build());
    if url.starts_with("http://") && crate::config::is_loopback_url(url) {
        config = config.proxy(None);
    } else if let Some(p) = &d.proxy {
        let proxy = ureq::Proxy::new(p.expose()).map_err(|_| NetSetupError::Proxy)?;
        config = config.proxy(Some(proxy));
    }
    Ok(ureq::Agent::with_parts(
        config.build(),
        DefaultConnector::default(),
        CachedResolver::default(),
    ))
}

/// How long a resolved dispatcher address is reused. ureq resolves the
/// host before every request, even one that goes out on a kept-alive
/// connection, and with a timeout set it starts a thread for each lookup:
/// a re-keying cycle of 1,000 requests started 1,000 threads for the same
/// answer. A DNS change still takes effect within this time.
const RESOLVED_FOR: Duration = Duration::from_secs(30);

/// ureq's resolver (timeout and all) behind a short cache of the last answer.
#[derive(Debug, Default)]
struct CachedResolver {
    inner: DefaultResolver,
    last: Mutex<Option<(String, Instant, ResolvedSocketAddrs)>>,
}

impl Resolver for CachedResolver {
    fn resolve(
        &self,
        uri: &Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let key = format!("{:?}://{:?}", uri.scheme(), uri.authority());
        // (A poisoned lock only means another thread panicked mid-lookup: resolve afresh.)
        if let Ok(last) = self.last.lock()
            && let Some((k, at, addrs)) = last.as_ref()
            && *k == key
            && at.elapsed() < RESOLVED_FOR
        {
            return Ok(addrs.clone());
        }
        let addrs = self.inner.resolve(uri, config, timeout)?;
        if let Ok(mut last) = self.last.lock() {
            *last = Some((key, Instant::now(), addrs.clone()));
        }
        Ok(addrs)
    }
}

/// The host (and port) of a `Location` header, for a message: never its
/// path or query, which may carry anything.
pub(crate) fn location_host(location: Option<&str>) -> String {
    let Some(loc) = location else {
        return "no Location header".into();
    };
    let Some((_, rest)) = loc.split_once("://") else {
        return "a relative Location on the same host".into();
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let clean: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        .take(100)
        .collect();
    if clean.is_empty() {
        "an unreadable Location".into()
    } else {
        clean
    }
}

/// Explains a TLS failure for an admin, or `None` if `e` is not one.
pub(crate) fn explain_tls(e: &ureq::Error) -> Option<String> {
    let rustls_err: &rustls::Error = match e {
        ureq::Error::Rustls(r) => r,
        ureq::Error::Io(io) => io.get_ref()?.downcast_ref::<rustls::Error>()?,
        _ => return None,
    };
    use rustls::CertificateError as C;
    Some(match rustls_err {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer | C::BadSignature | C::UnhandledCriticalExtension => {
                "the dispatcher's TLS certificate is not trusted: it is issued by a CA this machine does not \
                 know. If the gateway uses an internal CA, put its PEM certificate in [dispatcher] ca_file"
                    .into()
            }
            C::Expired | C::ExpiredContext { .. } => {
                "the dispatcher's TLS certificate has expired (or this machine's clock is wrong): \
                 tell the gateway's operators, and check the clock"
                    .into()
            }
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "the dispatcher's TLS certificate is not valid yet: check this machine's clock".into()
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "the dispatcher's TLS certificate is for another host name: check [dispatcher] url \
                 (use the name in the certificate)"
                    .into()
            }
            C::Revoked => "the dispatcher's TLS certificate has been revoked".into(),
            other => format!("the dispatcher's TLS certificate was refused ({other:?})"),
        },
        rustls::Error::AlertReceived(alert) => format!(
            "the dispatcher refused the TLS handshake ({alert:?}); if it requires a client certificate, \
             set [dispatcher] client_cert and client_key, and check that the gateway trusts its CA"
        ),
        other => format!("TLS failed: {other}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resolver_reuses_a_fresh_answer_for_the_same_host_only() {
        let r = CachedResolver::default();
        let config = ureq::config::Config::default();
        let resolve = |u: &str| {
            let uri: Uri = u.parse().unwrap();
            let addrs = r.resolve(&uri, &config, NextTimeout::default()).unwrap();
            addrs.iter().map(std::string::ToString::to_string).collect::<Vec<_>>()
        };
        assert_eq!(resolve("http://127.0.0.1:8081/fhir/$requestTasks"), ["127.0.0.1:8081"]);
        // Another port is another answer, not the cached one.
        assert_eq!(resolve("http://127.0.0.1:8082/fhir"), ["127.0.0.1:8082"]);
        // What the cache holds is what comes back while it is fresh...
        let mut planted = r.empty();
        planted.push("10.0.0.9:8082".parse().unwrap());
        let stale = {
            let mut last = r.last.lock().unwrap();
            let entry = last.as_mut().unwrap();
            entry.2 = planted;
            entry.1
        };
        assert_eq!(resolve("http://127.0.0.1:8082/other"), ["10.0.0.9:8082"]);
        // ...and no longer once it is older than RESOLVED_FOR.
        r.last.lock().unwrap().as_mut().unwrap().1 = stale - RESOLVED_FOR;
        assert_eq!(resolve("http://127.0.0.1:8082/fhir"), ["127.0.0.1:8082"]);
    }
}
