//! The local service: the gPAS operations a site's pseudonymisation
//! pipeline already calls (`$pseudonymize`, ...), answered from the
//! pseudonyms in the store, so the pipeline uses fTTP pseudonyms by
//! changing one URL.
//!
//! Threads: one accepts connections and queues them (bounded; beyond the
//! queue a client gets 503 at once), `threads` workers each serve one
//! connection at a time with their own read-only store handle (no lock:
//! cycles and imports write meanwhile), and one writes the audit records
//! (`audit`). Every read on a connection has a deadline, so a client that
//! stalls holds one worker for seconds, never the service.

pub mod gpas;
pub mod http;
pub mod tls;

use crate::audit::AuditRecord;
use crate::fhir::element::Resource;
use crate::fhir::outcome::OperationOutcome;
use crate::fhir::{Format, Identifier, Parameters};
use crate::store::Store;
use crate::types::LocalId;
use crate::vocab::{AuditKind, Outcome};
use gpas::{Call, Operation};
use http::{Conn, Limits, ReadError, Request, Response, Stream};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Why the service cannot start. Both are the configuration's to fix (a
/// certificate that does not load, an address already in use).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("local service: {0}")]
    Tls(String),
    #[error("local service: {0}")]
    Listen(String),
}

impl ServeError {
    pub fn exit_code(&self) -> u8 {
        crate::exit::CONFIG
    }
}

/// A study the service answers for: the gPAS `target` a client sends is
/// its `name`; `target` is the dispatcher's (for the audit record).
#[derive(Debug, Clone)]
pub(crate) struct StudyName {
    pub name: String,
    pub target: String,
}

/// HTTP Basic credentials, held as an HMAC tag under a key made at start:
/// a presented pair is checked in constant time, and the password itself
/// is not kept in memory.
pub struct Basic {
    user: String,
    key: ring::hmac::Key,
    tag: ring::hmac::Tag,
}

impl Basic {
    pub fn new(user: &str, password: &str) -> Result<Basic, String> {
        let rng = ring::rand::SystemRandom::new();
        let key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
            .map_err(|_| "no randomness for the service's credential check".to_string())?;
        let tag = ring::hmac::sign(&key, format!("{user}:{password}").as_bytes());
        Ok(Basic {
            user: user.to_string(),
            key,
            tag,
        })
    }

    /// The user, if `header` (an `Authorization` value) carries this user
    /// and password.
    fn check(&self, header: Option<&str>) -> Result<&str, &'static str> {
        use base64::Engine as _;
        let Some(header) = header else {
            return Err("no credentials");
        };
        let Some((scheme, encoded)) = header.split_once(' ') else {
            return Err("malformed Authorization header");
        };
        if !scheme.eq_ignore_ascii_case("basic") {
            return Err("not HTTP Basic");
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| "malformed Authorization header")?;
        ring::hmac::verify(&self.key, &decoded, self.tag.as_ref()).map_err(|_| "wrong user or password")?;
        Ok(&self.user)
    }
}

/// The operators' views the service shows besides the gPAS operations:
/// the status page (`GET /`), `/health` and `/metrics`, each computed
/// from the live state when asked.
pub(crate) trait Views: Send + Sync {
    /// The status page's HTML (see `page`).
    fn page(&self) -> String;
    /// The health `status` decides.
    fn health(&self) -> crate::report::Health;
    /// The Prometheus text the metrics file holds.
    fn metrics(&self) -> Result<String, String>;
}

/// What the service is told at start (from `[serve]` and the studies).
pub(crate) struct Settings {
    pub listen: SocketAddr,
    /// Without a trailing slash.
    pub base_path: String,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// A client certificate (verified against the client CA) is required.
    pub client_cert: bool,
    pub basic: Option<Basic>,
    pub allow_depseudonymize: bool,
    pub max_values: usize,
    pub max_body: usize,
    pub threads: usize,
    pub studies: Vec<StudyName>,
    pub views: Option<Arc<dyn Views>>,
    /// `GET /` shows the status page.
    pub status_page: bool,
    /// `GET /health` answers without authentication.
    pub health_public: bool,
}

impl Settings {
    fn operations(&self) -> Vec<Operation> {
        Operation::ALL
            .into_iter()
            .filter(|op| *op != Operation::DePseudonymize || self.allow_depseudonymize)
            .collect()
    }
}

/// Opens a read-only store handle (each worker keeps its own).
pub(crate) type OpenStore = Arc<dyn Fn() -> Result<Store, String> + Send + Sync>;
/// Appends audit records (under the store lock, so the audit log keeps one
/// writer at a time).
pub(crate) type AuditSink = Arc<dyn Fn(&[AuditRecord]) -> Result<(), String> + Send + Sync>;

/// Connections waiting for a worker, per worker.
const QUEUE_PER_THREAD: usize = 16;
/// Requests on one connection before it is closed (a client reconnects).
const MAX_PER_CONNECTION: usize = 1000;
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Audit records waiting to be written before requests wait for them.
const AUDIT_QUEUE: usize = 50_000;

struct Shared {
    settings: Settings,
    open_store: OpenStore,
    limits: Limits,
    stop: AtomicBool,
    /// The audit writer's last attempt failed: calls are refused until it
    /// succeeds (a call that cannot be audited is not answered).
    audit_failing: AtomicBool,
    auth_failures: AuthFailures,
}

/// A running service.
pub(crate) struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
    auditor: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds `settings.listen` and starts serving.
    pub fn start(settings: Settings, open_store: OpenStore, audit: AuditSink) -> Result<Server, ServeError> {
        let cannot = |e: std::io::Error| ServeError::Listen(format!("cannot listen on {}: {e}", settings.listen));
        let listener = TcpListener::bind(settings.listen).map_err(cannot)?;
        let addr = listener.local_addr().map_err(cannot)?;
        let limits = Limits {
            head: 16 * 1024,
            body: settings.max_body,
            idle: Duration::from_secs(5),
            request: Duration::from_secs(30),
        };
        let threads = settings.threads;
        let shared = Arc::new(Shared {
            settings,
            open_store,
            limits,
            stop: AtomicBool::new(false),
            audit_failing: AtomicBool::new(false),
            auth_failures: AuthFailures::default(),
        });
        let (audit_tx, audit_rx) = std::sync::mpsc::sync_channel(AUDIT_QUEUE);
        let auditor = {
            let shared = shared.clone();
            spawn("serve-audit", move || write_audit(audit_rx, audit, &shared))?
        };
        let (conn_tx, conn_rx) = std::sync::mpsc::sync_channel::<TcpStream>(threads * QUEUE_PER_THREAD);
        let conn_rx = Arc::new(Mutex::new(conn_rx));
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let (shared, rx, audit) = (shared.clone(), conn_rx.clone(), audit_tx.clone());
            workers.push(spawn(&format!("serve-{i}"), move || work(&shared, &rx, &audit))?);
        }
        drop(audit_tx);
        let acceptor = {
            let shared = shared.clone();
            spawn("serve-accept", move || accept(&listener, &shared, &conn_tx))?
        };
        Ok(Server {
            addr,
            shared,
            acceptor: Some(acceptor),
            workers,
            auditor: Some(auditor),
        })
    }

    /// The base URL clients are given (`http(s)://addr/base_path`).
    pub fn url(&self) -> String {
        let scheme = if self.shared.settings.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}{}", self.addr, self.shared.settings.base_path)
    }

    /// Stops accepting, lets the requests in hand finish, and writes their
    /// audit records.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wakes the acceptor from `accept` (a wildcard address is reached
        // on loopback).
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        for handle in self.acceptor.take().into_iter().chain(self.workers.drain(..)) {
            let _ = handle.join();
        }
        if let Some(auditor) = self.auditor.take() {
            let _ = auditor.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.acceptor.is_some() {
            self.shutdown();
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, ServeError> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .map_err(|e| ServeError::Listen(format!("cannot start the service's threads: {e}")))
}

fn accept(listener: &TcpListener, shared: &Shared, queue: &SyncSender<TcpStream>) {
    loop {
        let conn = listener.accept();
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        match conn {
            Ok((tcp, _)) => match queue.try_send(tcp) {
                Ok(()) => {}
                Err(TrySendError::Full(tcp)) => busy(tcp, shared.settings.tls.is_none()),
                Err(TrySendError::Disconnected(_)) => return,
            },
            Err(e) => {
                // (Out of file descriptors, say: not a reason to stop.)
                log::warn!("local service: cannot accept a connection: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Every worker busy and the queue full: a plain client hears so at once;
/// a TLS client's connection is closed (there is no handshake to answer in).
fn busy(mut tcp: TcpStream, plain: bool) {
    use std::io::Write as _;
    log::warn!("local service: all workers busy and the queue full; a connection was turned away");
    if plain {
        let _ = tcp.set_write_timeout(Some(Duration::from_secs(1)));
        let _ = tcp.write_all(
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    }
}

fn work(shared: &Shared, queue: &Mutex<Receiver<TcpStream>>, audit: &SyncSender<AuditRecord>) {
    let mut store = None;
    loop {
        let next = crate::lock(queue).recv();
        let Ok(tcp) = next else { return };
        serve_connection(shared, tcp, &mut store, audit);
    }
}

fn serve_connection(shared: &Shared, tcp: TcpStream, store: &mut Option<Store>, audit: &SyncSender<AuditRecord>) {
    let _ = tcp.set_nodelay(true);
    let _ = tcp.set_write_timeout(Some(WRITE_TIMEOUT));
    let peer = tcp.peer_addr().ok();
    let stream = match &shared.settings.tls {
        None => Stream::Plain(tcp),
        Some(config) => match rustls::ServerConnection::new(config.clone()) {
            Ok(tls) => Stream::Tls(Box::new(rustls::StreamOwned::new(tls, tcp))),
            Err(e) => {
                log::warn!("local service: cannot start TLS: {e}");
                return;
            }
        },
    };
    let mut conn = Conn::new(stream);
    for served in 1..=MAX_PER_CONNECTION {
        let request = match conn.read_request(&shared.limits) {
            Ok(r) => r,
            Err(ReadError::Closed) => return,
            Err(e) => {
                let _ = conn.respond(&outcome(e.status(), Format::Json, &e.describe()), false);
                return;
            }
        };
        let cert = client_certificate(&conn.stream);
        let ctx = Ctx {
            shared,
            peer,
            cert: cert.as_deref(),
            store,
            audit,
        };
        let response = ctx.handle(&request);
        let keep = request.keep_alive && served < MAX_PER_CONNECTION && !shared.stop.load(Ordering::SeqCst);
        if conn.respond(&response, keep).is_err() || !keep {
            return;
        }
    }
}

/// The subject of the client's verified certificate, if it sent one.
fn client_certificate(stream: &Stream) -> Option<String> {
    let Stream::Tls(tls) = stream else { return None };
    let first = tls.conn.peer_certificates()?.first()?;
    Some(tls::subject(first.as_ref()))
}

/// One request's context.
struct Ctx<'a> {
    shared: &'a Shared,
    peer: Option<SocketAddr>,
    cert: Option<&'a str>,
    store: &'a mut Option<Store>,
    audit: &'a SyncSender<AuditRecord>,
}

impl Ctx<'_> {
    fn handle(mut self, req: &Request) -> Response {
        let format = response_format(req);
        let settings = &self.shared.settings;
        if let Some(response) = self.view(req) {
            return response;
        }
        let Some(rest) = req
            .path
            .strip_prefix(&settings.base_path)
            .filter(|r| r.is_empty() || r.starts_with('/'))
        else {
            return outcome(
                404,
                format,
                &format!("nothing here: the gPAS operations are under {}", settings.base_path),
            );
        };
        let client = match self.authenticate(req) {
            Ok(client) => client,
            Err(why) => {
                self.shared.auth_failures.note(self.peer, why);
                return outcome(401, format, "authentication required: missing or wrong credentials")
                    .with_header("WWW-Authenticate", "Basic realm=\"fttp-agent\", charset=\"UTF-8\"");
            }
        };
        let segment = rest.trim_start_matches('/');
        if segment == "metadata" {
            if req.method != "GET" {
                return method_not_allowed(format, "GET");
            }
            let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            let statement = gpas::capability_statement(
                &settings.operations(),
                env!("CARGO_PKG_VERSION"),
                &settings.base_path,
                &now,
            );
            return resource(200, format, &statement);
        }
        let Some(op) = Operation::from_segment(segment) else {
            return outcome(
                404,
                format,
                "no such operation: this service answers $pseudonymize, $pseudonymizeAllowCreate, \
                 $dePseudonymize and metadata",
            );
        };
        if req.method != "POST" && req.method != "GET" {
            return method_not_allowed(format, "GET, POST");
        }
        if op == Operation::DePseudonymize && !settings.allow_depseudonymize {
            self.record(op, &client, None, Outcome::Refused, "403: $dePseudonymize is disabled");
            return outcome(
                403,
                format,
                "$dePseudonymize is disabled on this service ([serve] allow_depseudonymize)",
            );
        }
        if self.shared.audit_failing.load(Ordering::SeqCst) {
            return outcome(
                503,
                format,
                "the service cannot write its audit log at the moment; see the agent's log",
            )
            .with_header("Retry-After", "10");
        }
        let call = if req.method == "GET" {
            Call::from_query(op, &req.query, settings.max_values)
        } else {
            match parse_body(req) {
                Ok(params) => Call::from_parameters(op, &params, settings.max_values),
                Err((status, why)) => {
                    self.record(op, &client, None, Outcome::Refused, &format!("{status}: {why}"));
                    return outcome(status, format, &why);
                }
            }
        };
        let call = match call {
            Ok(call) => call,
            Err(e) => {
                let why = e.describe();
                self.record(op, &client, None, Outcome::Refused, &format!("400: {why}"));
                return outcome(400, format, &why);
            }
        };
        let Some(study) = settings.studies.iter().find(|s| s.name == call.target) else {
            self.record(op, &client, None, Outcome::Refused, "404: unknown target");
            let names: Vec<&str> = settings.studies.iter().map(|s| s.name.as_str()).collect();
            return outcome(
                404,
                format,
                &format!("unknown target: the targets here are the studies {}", names.join(", ")),
            );
        };
        let found = match self.look_up(&call) {
            Ok(found) => found,
            Err(e) => {
                log::error!("local service: {e}");
                self.record(
                    op,
                    &client,
                    Some(study),
                    Outcome::Failed,
                    "500: the store could not be read",
                );
                return outcome(500, format, "the store could not be read; see the agent's log");
            }
        };
        let hits = found.iter().filter(|f| f.is_some()).count();
        self.record(
            op,
            &client,
            Some(study),
            op.outcome(),
            &format!("{} asked ({} distinct), {hits} found", call.asked, call.values.len()),
        );
        let answer = gpas::answer(&call, &found);
        Response::new(200, format.mime(), answer.write(format)).with_header("Cache-Control", "no-store")
    }

    /// `/`, `/health` and `/metrics`, where configured (`None`: not one of
    /// them). Authenticated like the operations, except a public `/health`.
    fn view(&self, req: &Request) -> Option<Response> {
        let settings = &self.shared.settings;
        let views = settings.views.as_ref()?;
        let public = match req.path.as_str() {
            "/health" => settings.health_public,
            "/metrics" => false,
            "/" if settings.status_page => false,
            _ => return None,
        };
        if !public && let Err(why) = self.authenticate(req) {
            self.shared.auth_failures.note(self.peer, why);
            return Some(
                Response::new(401, "text/plain; charset=utf-8", "authentication required\n")
                    .with_header("WWW-Authenticate", "Basic realm=\"fttp-agent\", charset=\"UTF-8\""),
            );
        }
        if req.method != "GET" {
            return Some(Response::new(405, "text/plain; charset=utf-8", "use GET\n").with_header("Allow", "GET"));
        }
        let response = match req.path.as_str() {
            "/health" => {
                let health = views.health();
                let word = match health {
                    crate::report::Health::Ok => "ok",
                    crate::report::Health::Warning => "warning",
                    crate::report::Health::Critical => "critical",
                };
                let status = if health == crate::report::Health::Critical {
                    503
                } else {
                    200
                };
                Response::new(
                    status,
                    "application/json",
                    format!(
                        "{{\"health\":\"{word}\",\"version\":\"{}\"}}\n",
                        env!("CARGO_PKG_VERSION")
                    ),
                )
            }
            "/metrics" => match views.metrics() {
                Ok(text) => Response::new(200, "text/plain; version=0.0.4; charset=utf-8", text),
                Err(e) => {
                    log::error!("local service: metrics: {e}");
                    Response::new(
                        503,
                        "text/plain; charset=utf-8",
                        "the store cannot be read; see the agent's log\n",
                    )
                }
            },
            _ => Response::new(200, "text/html; charset=utf-8", views.page())
                .with_header("Content-Security-Policy", crate::page::content_security_policy())
                .with_header("X-Content-Type-Options", "nosniff")
                .with_header("Referrer-Policy", "no-referrer"),
        };
        Some(response.with_header("Cache-Control", "no-store"))
    }

    /// The client's identity: its Basic user and/or certificate subject,
    /// each required where configured.
    fn authenticate(&self, req: &Request) -> Result<String, &'static str> {
        let settings = &self.shared.settings;
        let mut who = Vec::new();
        if let Some(basic) = &settings.basic {
            who.push(format!("user {}", basic.check(req.header("authorization"))?));
        }
        if settings.client_cert {
            match self.cert {
                Some(subject) => who.push(format!("certificate {subject}")),
                None => return Err("no client certificate"),
            }
        }
        Ok(who.join(", "))
    }

    /// Each value's match, with this worker's store handle (reopened once
    /// if it fails: after a re-keying, or a restore, the old one cannot
    /// read the new rows).
    fn look_up(&mut self, call: &Call) -> Result<Vec<Option<Identifier>>, String> {
        for attempt in 0..2 {
            if self.store.is_none() {
                *self.store = Some((self.shared.open_store)()?);
            }
            let Some(store) = self.store.as_ref() else { continue };
            match call.values.iter().map(|v| look_up_one(store, call, v)).collect() {
                Ok(found) => return Ok(found),
                Err(e) if attempt == 0 => {
                    log::debug!("local service: reopening the store after: {e}");
                    *self.store = None;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Err("the store could not be read".into())
    }

    /// Queues the call's audit record: operation, client, study, counts;
    /// never a value.
    fn record(&self, op: Operation, client: &str, study: Option<&StudyName>, outcome: Outcome, detail: &str) {
        let mut rec = AuditRecord::new(AuditKind::Gpas, outcome, study.map_or("", |s| s.target.as_str()));
        if let Some(s) = study {
            rec = rec.in_study(&s.name);
        }
        rec.detail = Some(format!("${} by {client}: {detail}", op.name()));
        // (A full queue makes the request wait for the writer: back-pressure.)
        let _ = self.audit.send(rec);
    }
}

fn look_up_one(store: &Store, call: &Call, value: &str) -> Result<Option<Identifier>, crate::store::StoreError> {
    Ok(match call.op {
        Operation::DePseudonymize => store
            .patient_by_pseudonym(&call.target, value)?
            .map(|p| Identifier::new(Some(gpas::GPAS_SYSTEM), &p.local_id.0)),
        _ => {
            let Some(bf) = store.patient(&LocalId(value.to_string()))?.and_then(|p| p.bloomfilter) else {
                return Ok(None);
            };
            store
                .pseudonym(&bf, &call.target)?
                .map(|p| Identifier::new(p.pseudonym.system.as_deref(), &p.pseudonym.value))
        }
    })
}

/// The request body as `Parameters`, or the status and a message that
/// quotes nothing of it.
fn parse_body(req: &Request) -> Result<Parameters, (u16, String)> {
    let format = Format::detect(req.header("content-type"), &req.body).map_err(|_| {
        (
            415,
            "the body must be a FHIR Parameters resource, as application/fhir+json or application/fhir+xml".to_string(),
        )
    })?;
    Parameters::parse(format, &req.body).map_err(|e| {
        let why = match e {
            crate::fhir::FhirError::Json { line, column, reason } => {
                format!("invalid FHIR JSON: {reason} at line {line}, column {column}")
            }
            crate::fhir::FhirError::TooMuch { .. } => "the body holds too many elements".into(),
            crate::fhir::FhirError::TooDeep { .. } => "the body is nested too deeply".into(),
            crate::fhir::FhirError::WrongResource { .. } => "the body is not a Parameters resource".into(),
            _ => format!("the body is not a valid FHIR Parameters resource in {format:?}"),
        };
        (400, why)
    })
}

/// The answer's format: `_format`, else `Accept`, else the body's, else JSON.
fn response_format(req: &Request) -> Format {
    let pick = |s: &str| {
        let s = s.to_ascii_lowercase();
        let (json, xml) = (s.find("json"), s.find("xml"));
        match (json, xml) {
            (Some(j), Some(x)) => Some(if j < x { Format::Json } else { Format::Xml }),
            (Some(_), None) => Some(Format::Json),
            (None, Some(_)) => Some(Format::Xml),
            (None, None) => None,
        }
    };
    req.query_values("_format")
        .next()
        .and_then(pick)
        .or_else(|| req.header("accept").and_then(pick))
        .or_else(|| req.header("content-type").and_then(pick))
        .unwrap_or(Format::Json)
}

fn resource(status: u16, format: Format, r: &Resource) -> Response {
    Response::new(status, format.mime(), crate::fhir::write_resource(format, r))
        .with_header("Cache-Control", "no-store")
}

/// An OperationOutcome answer, with the issue type that fits the status.
fn outcome(status: u16, format: Format, diagnostics: &str) -> Response {
    let code = match status {
        401 => "login",
        403 => "forbidden",
        404 => "not-found",
        405 | 415 | 501 => "not-supported",
        408 => "timeout",
        413 => "too-costly",
        431 => "too-long",
        500 => "exception",
        503 => "transient",
        _ => "invalid",
    };
    resource(
        status,
        format,
        &OperationOutcome::error(code, diagnostics).to_resource(),
    )
}

fn method_not_allowed(format: Format, allow: &str) -> Response {
    outcome(405, format, &format!("method not allowed here (allowed: {allow})")).with_header("Allow", allow)
}

/// Writes the queued audit records in batches (each batch takes the store
/// lock once: a running cycle delays the records, never the answers).
/// While a batch cannot be written, it is retried and calls are refused;
/// at shutdown, after a few tries, the loss is logged.
fn write_audit(queue: Receiver<AuditRecord>, sink: AuditSink, shared: &Shared) {
    let failing = &shared.audit_failing;
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < 10_000 {
            match queue.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let mut delay = Duration::from_millis(200);
        let mut tries = 0;
        loop {
            match sink(&batch) {
                Ok(()) => {
                    failing.store(false, Ordering::SeqCst);
                    break;
                }
                Err(e) if tries >= 3 && shared.stop.load(Ordering::SeqCst) => {
                    log::error!(
                        "local service: {} audit record(s) of calls answered were not written at shutdown: {e}",
                        batch.len()
                    );
                    break;
                }
                Err(e) => {
                    tries += 1;
                    failing.store(true, Ordering::SeqCst);
                    log::error!(
                        "local service: cannot write {} audit record(s) (try {tries}): {e}; calls are refused \
                         until they are written",
                        batch.len()
                    );
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

/// Failed authentications: each counted, logged at most every ten seconds
/// (with the number not logged), never with what was presented.
#[derive(Default)]
struct AuthFailures {
    count: AtomicU64,
    unlogged: AtomicU64,
    last_logged: Mutex<Option<Instant>>,
}

impl AuthFailures {
    fn note(&self, peer: Option<SocketAddr>, why: &str) {
        let total = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        let mut last = crate::lock(&self.last_logged);
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(10)) {
            self.unlogged.fetch_add(1, Ordering::SeqCst);
            return;
        }
        *last = Some(Instant::now());
        let unlogged = self.unlogged.swap(0, Ordering::SeqCst);
        log::warn!(
            "local service: authentication failed from {} ({why}); {total} failure(s) since start{}",
            peer.map_or("an unknown address".to_string(), |p| p.ip().to_string()),
            if unlogged > 0 {
                format!(", {unlogged} not logged singly")
            } else {
                String::new()
            }
        );
    }
}
