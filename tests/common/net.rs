//! Loopback network pieces for tests: a test CA (rcgen), a TLS front that
//! terminates TLS (optionally requiring a client certificate) and forwards
//! to the simulator, and an HTTP CONNECT proxy with optional credentials.
#![allow(dead_code)]

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

pub struct Ca {
    pub pem: String,
    params: CertificateParams,
    key: KeyPair,
}

pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
    pub key_der: Vec<u8>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            params,
            key,
        }
    }

    /// A certificate for `names`, valid now, or expired if `expired`.
    pub fn leaf(&self, names: &[&str], expired: bool) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(std::string::ToString::to_string).collect::<Vec<_>>()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or("client"));
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }

    pub fn der(&self) -> CertificateDer<'static> {
        rustls::pki_types::pem::PemObject::from_pem_slice(self.pem.as_bytes()).unwrap()
    }

    pub fn write(&self, path: &Path) {
        std::fs::write(path, &self.pem).unwrap();
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS server on 127.0.0.1 forwarding each request to `backend`.
pub struct TlsFront {
    pub port: u16,
    /// Client certificates' subjects seen (mTLS).
    pub handshakes: Arc<Mutex<usize>>,
}

impl TlsFront {
    pub fn start(server: &Leaf, client_ca: Option<&Ca>, backend: SocketAddr) -> TlsFront {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(ca.der()).unwrap();
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                    .build()
                    .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server.key_der.clone()));
        let config = Arc::new(builder.with_single_cert(vec![server.der.clone()], key).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let handshakes = Arc::new(Mutex::new(0));
        let hs = Arc::clone(&handshakes);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let config = Arc::clone(&config);
                let hs = Arc::clone(&hs);
                std::thread::spawn(move || {
                    let _ = serve_tls(stream, config, backend, hs);
                });
            }
        });
        TlsFront { port, handshakes }
    }
}

/// Reads one HTTP/1.1 message head and body (Content-Length) from `r`.
fn read_message(r: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        if line.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        if line == "\r\n" {
            head.extend_from_slice(b"Connection: close\r\n\r\n");
            break;
        }
        head.extend_from_slice(line.as_bytes());
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    head.extend(body);
    Ok(head)
}

fn serve_tls(
    stream: TcpStream,
    config: Arc<rustls::ServerConfig>,
    backend: SocketAddr,
    handshakes: Arc<Mutex<usize>>,
) -> std::io::Result<()> {
    let conn = rustls::ServerConnection::new(config).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, stream);
    let mut reader = BufReader::new(&mut tls);
    let request = read_message(&mut reader)?;
    drop(reader);
    *handshakes.lock().unwrap() += 1;
    let mut up = TcpStream::connect(backend)?;
    up.write_all(&request)?;
    let mut reader = BufReader::new(up);
    let response = read_message(&mut reader)?;
    tls.write_all(&response)?;
    tls.flush()?;
    tls.conn.send_close_notify();
    let _ = tls.flush();
    Ok(())
}

/// An HTTP CONNECT proxy on 127.0.0.1; records each tunnel's target.
pub struct Proxy {
    pub port: u16,
    pub tunnels: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    /// `credentials`: required `Proxy-Authorization: Basic` user and password.
    pub fn start(credentials: Option<(&str, &str)>) -> Proxy {
        use base64::Engine;
        let want = credentials.map(|(u, p)| {
            format!(
                "basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let tunnels = Arc::new(Mutex::new(Vec::new()));
        let t = Arc::clone(&tunnels);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let want = want.clone();
                let t = Arc::clone(&t);
                std::thread::spawn(move || {
                    let _ = tunnel(stream, want, t);
                });
            }
        });
        Proxy { port, tunnels }
    }
}

fn tunnel(client: TcpStream, want: Option<String>, tunnels: Arc<Mutex<Vec<String>>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    let mut auth = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("proxy-authorization:") {
            auth = Some(v.trim().to_string());
        }
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    let mut client_w = client.try_clone()?;
    let target = first.split_whitespace().nth(1).unwrap_or("").to_string();
    if !first.starts_with("CONNECT ") {
        client_w.write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")?;
        return Ok(());
    }
    if want.is_some() && auth.map(|a| a.to_ascii_lowercase()) != want.map(|w| w.to_ascii_lowercase()) {
        client_w.write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")?;
        return Ok(());
    }
    tunnels.lock().unwrap().push(target.clone());
    let upstream = TcpStream::connect(&target)?;
    client_w.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
    let mut up_r = upstream.try_clone()?;
    let mut up_w = upstream;
    let mut client_r = reader;
    let pump = std::thread::spawn(move || {
        let _ = std::io::copy(&mut client_r, &mut up_w);
        let _ = up_w.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut up_r, &mut client_w);
    let _ = client_w.shutdown(std::net::Shutdown::Write);
    let _ = pump.join();
    Ok(())
}
