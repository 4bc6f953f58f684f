//! The service's TLS side (rustls): its certificate and key, the client
//! CA that client certificates must chain to, and the subject of the
//! certificate a client presented (its identity in the audit log).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

/// The server's TLS configuration. With `client_ca`, a client that presents
/// a certificate must present one that CA signed (else the handshake
/// fails); whether a request without one is let in is decided per request
/// (401 with an OperationOutcome, not a bare TLS alert).
pub(crate) fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("[serve] tls_cert {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("[serve] tls_cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "[serve] tls_cert {}: no certificate in the file",
            cert.display()
        ));
    }
    crate::secret_file::check_private(key, "[serve] tls_key").map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("[serve] tls_key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in
                CertificateDer::pem_file_iter(ca).map_err(|e| format!("[serve] client_ca {}: {e}", ca.display()))?
            {
                let c = c.map_err(|e| format!("[serve] client_ca {}: {e}", ca.display()))?;
                roots
                    .add(c)
                    .map_err(|e| format!("[serve] client_ca {}: {e}", ca.display()))?;
            }
            if roots.is_empty() {
                return Err(format!(
                    "[serve] client_ca {}: no certificate in the file",
                    ca.display()
                ));
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("[serve] client_ca {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("[serve] tls_cert/tls_key: {e}"))?;
    Ok(Arc::new(config))
}

/// The subject of a verified client certificate, as `CN=..,O=..` (the
/// attributes that name a client; others left out), else its SHA-256
/// fingerprint. Read from the DER with bounds checks only: the
/// certificate has already been verified against the client CA.
pub fn subject(cert: &[u8]) -> String {
    match subject_attributes(cert) {
        Some(attrs) if !attrs.is_empty() => attrs.join(","),
        _ => {
            let digest = ring::digest::digest(&ring::digest::SHA256, cert);
            let hex: String = digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
            format!("sha256:{hex}")
        }
    }
}

/// One DER element: its tag, its contents and what follows it.
fn element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *der.first()?;
    let first = *der.get(1)?;
    let (len, head) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *der.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = head.checked_add(len)?;
    Some((tag, der.get(head..end)?, der.get(end..)?))
}

fn subject_attributes(cert: &[u8]) -> Option<Vec<String>> {
    const SEQUENCE: u8 = 0x30;
    let (SEQUENCE, certificate, _) = element(cert)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = element(certificate)? else {
        return None;
    };
    let mut rest = tbs;
    // version [0] (optional), serialNumber, signature, issuer, validity, subject
    let (tag, _, after) = element(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    for _ in 0..4 {
        rest = element(rest)?.2;
    }
    let (SEQUENCE, mut name, _) = element(rest)? else {
        return None;
    };
    let mut out = Vec::new();
    while !name.is_empty() {
        let (_set, rdn, next) = element(name)?;
        name = next;
        let (_seq, pair, _) = element(rdn)?;
        let (_oid_tag, oid, value) = element(pair)?;
        let label = match oid {
            [0x55, 0x04, 0x03] => "CN",
            [0x55, 0x04, 0x0a] => "O",
            [0x55, 0x04, 0x0b] => "OU",
            [0x55, 0x04, 0x06] => "C",
            _ => continue,
        };
        let (tag, text, _) = element(value)?;
        // UTF8String, PrintableString, IA5String
        if !matches!(tag, 0x0c | 0x13 | 0x16) {
            continue;
        }
        let text: String = String::from_utf8_lossy(text)
            .chars()
            .filter(|c| !c.is_control() && *c != ',')
            .take(64)
            .collect();
        out.push(format!("{label}={text}"));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subject_of_a_certificate_names_the_client() {
        let mut params = rcgen::CertificateParams::new(vec!["etl.example".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "etl-pipeline");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Uniklinik");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(subject(cert.der()), "CN=etl-pipeline,O=Uniklinik");
        // Garbage is named by its fingerprint, never read past its end.
        assert!(subject(&[0x30, 0x82, 0xff]).starts_with("sha256:"));
        assert!(subject(&[]).starts_with("sha256:"));
    }
}
