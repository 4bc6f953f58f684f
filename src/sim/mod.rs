//! A simulated fTTP dispatcher: a real HTTP server on 127.0.0.1 that speaks
//! the three operations the agent uses, in JSON and XML, with state.
//!
//! It checks the API key (401 with an OperationOutcome otherwise), validates
//! requests (400/404/422 with an OperationOutcome), answers in the format
//! the Accept header asks for, and records what it received so tests can
//! assert on it. Faults can be queued to test recovery. Used by `demo`,
//! `sim` and the test suite; never by a production cycle.

use crate::fhir::idat::{ELEMENTS_SYSTEM, IdatElement};
use crate::fhir::outcome::OperationOutcome;
use crate::fhir::{Coding, Format, Identifier, ParamValue, Parameter, Parameters, Resource};
use crate::fxhash::Fx;
use chrono::{DateTime, SecondsFormat, Utc};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

pub const GPAS: &str = "https://ths-greifswald.de/gpas";
pub const DISPATCHER: &str = "https://ths-greifswald.de/dispatcher";
const MAX_BODY: u64 = 16 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct SimOptions {
    pub api_key: String,
    pub api_key_header: String,
    /// Also accept the key as a Parameters entry `apikey` (older gateways).
    pub accept_body_key: bool,
    pub port: u16,
    /// Require HTTP Basic with this user and password.
    pub basic: Option<(String, String)>,
    /// The study and target it serves, as a gateway knows its own: a poll
    /// for any other is refused (404), so that the documented refusal can
    /// be rehearsed. `None` accepts any.
    pub study_target: Option<(String, String)>,
    /// Require a bearer token from the simulator's token endpoint
    /// (`/token`, Keycloak-style form POST).
    pub oauth: Option<SimOAuth>,
    /// Added to every answer: a gateway a WAN away (measurements at
    /// realistic latency on loopback).
    pub latency: std::time::Duration,
}

#[derive(Debug, Clone)]
pub struct SimOAuth {
    pub client_id: String,
    pub client_secret: String,
    /// For the password grant; `None` accepts only client credentials.
    pub user: Option<(String, String)>,
    pub lifetime_secs: u64,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            api_key: "sim-api-key".into(),
            api_key_header: "apikey".into(),
            accept_body_key: false,
            port: 0,
            basic: None,
            oauth: None,
            study_target: None,
            latency: std::time::Duration::ZERO,
        }
    }
}

/// One request as the simulator saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub operation: String,
    pub content_type: Option<String>,
    pub accept: Option<String>,
    pub authorized: bool,
    /// Whether the API key came in the header (as opposed to the body).
    pub key_in_header: bool,
    pub parameters: Option<Parameters>,
    pub status: u16,
}

impl Received {
    /// The taskId of a `$providePatientData` request.
    pub fn task_id(&self) -> Option<&str> {
        self.parameters.as_ref()?.get("taskId").next()?.value.as_ref()?.as_str()
    }

    /// The Patient of a `$providePatientData` request.
    pub fn patient(&self) -> Option<&Resource> {
        self.parameters
            .as_ref()?
            .get("patient")
            .find_map(|p| p.resource.as_deref())
    }
}

/// A queued failure for the next request to `operation` (any, if `None`).
#[derive(Debug, Clone)]
pub struct Fault {
    pub operation: Option<String>,
    pub kind: FaultKind,
}

#[derive(Debug, Clone)]
pub enum FaultKind {
    /// An HTTP error with an OperationOutcome, and optionally Retry-After (seconds).
    Status {
        status: u16,
        diagnostics: String,
        retry_after: Option<u64>,
    },
    /// The headers promise a body that stops half-way; the connection closes.
    ResetMidBody,
    /// The headers, then nothing for this long (the agent's read times out).
    Stall(std::time::Duration),
    /// Close the connection without answering at all.
    Drop,
    /// Answer normally, but only after this long (a slow gateway).
    Delay(std::time::Duration),
    /// A redirect (301, 302, 303, 307, 308) to `location`, as a hostile
    /// or misconfigured front would send.
    Redirect { status: u16, location: String },
    /// An arbitrary answer: e.g. a proxy's HTML page or a truncated document.
    Raw {
        status: u16,
        content_type: String,
        body: Vec<u8>,
    },
}

/// (The maps keyed by Bloom filter use FxHash: at a re-keying benchmark
/// they hold 100,000 filters, and the simulator shares the agent's cores.)
#[derive(Debug, Default)]
pub struct SimState {
    /// Task parameters handed out by `$requestTasks` until done.
    pub tasks: Vec<Parameter>,
    /// Identities (`task:<taskId>`, `bf:<base64>`) of tasks done since the
    /// last poll; removed from `tasks` in one pass at the next poll, so a
    /// large queue is not rescanned per request.
    done: std::collections::HashSet<String, Fx>,
    /// taskIds of the send_idat tasks handed out by the last poll.
    handed_out: std::collections::HashSet<String>,
    /// Queues of studies with their own tasks (`add_study_task`); every
    /// other study is handed `tasks`.
    studies: std::collections::BTreeMap<String, Vec<Parameter>>,
    pub received: Vec<Received>,
    /// Bloom filters (base64) the fTTP already knows, with their pseudonym.
    pub registry: HashMap<String, Identifier, Fx>,
    /// Bloom filters (base64) answered with an `error` part of this code
    /// (issue-type system; `SYSTEM#CODE` for another system, empty for an
    /// error without `error-code`). Like every answered filter, its
    /// repeat_request is not handed out again: the gateway issues a new
    /// task if it wants another try.
    pub bf_errors: HashMap<String, String, Fx>,
    /// Answer the next `$requestPsnFromBfWorkflow` with an `all` error.
    pub batch_error: Option<String>,
    /// Answer the next `$requestPsnFromBfWorkflow` with an `error` that has
    /// no `bloomfilter` part (and no `all`): it answers the whole request.
    pub bare_error: Option<String>,
    /// Bloom filters (base64) whose first enrolment goes to clearing: the
    /// answer has nothing for them, and the pseudonym follows as a
    /// `dic_psn_available` task on the next `$requestTasks`.
    pub clearing: std::collections::HashSet<String, Fx>,
    /// Also send every n-th new Bloom filter to clearing (the `sim` command's
    /// `--clearing-every`).
    pub clearing_every: Option<u32>,
    new_filters: u32,
    /// `$updateBf` calls accepted: (pseudonym, bfVersion).
    pub updated_bf: Vec<(String, String)>,
    pub faults: VecDeque<Fault>,
    /// Bearer tokens issued and still valid.
    pub tokens: Vec<String>,
    /// TCP connections accepted (keep-alive reuse shows as fewer connections than requests).
    pub connections: usize,
    /// Requests being answered now, and the most there were at once.
    pub in_flight: usize,
    pub max_in_flight: usize,
    /// Token requests answered (granted or not).
    pub token_requests: usize,
    next_psn: u32,
}

impl SimState {
    /// Drops the tasks done since the last poll from the queue.
    fn settle(&mut self) {
        if !self.done.is_empty() {
            let done = std::mem::take(&mut self.done);
            let keep = |t: &Parameter| identity(t).is_none_or(|id| !done.contains(&id));
            self.tasks.retain(keep);
            for queue in self.studies.values_mut() {
                queue.retain(keep);
            }
        }
    }

    pub fn received(&self, operation: &str) -> Vec<&Received> {
        self.received.iter().filter(|r| r.operation == operation).collect()
    }
}

pub struct Simulator {
    url: String,
    port: u16,
    state: Arc<Mutex<SimState>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Simulator {
    /// Starts the simulator on 127.0.0.1 (`options.port`, 0 for any free
    /// port). It speaks HTTP/1.1 with keep-alive itself, one thread per
    /// connection, so that connection-level faults (reset, drop, stall) are
    /// real socket behaviour and connections can be counted.
    pub fn start(options: SimOptions) -> std::io::Result<Simulator> {
        let listener = std::net::TcpListener::bind(("127.0.0.1", options.port))?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(Mutex::new(SimState::default()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (st, stop2, options) = (Arc::clone(&state), Arc::clone(&stop), Arc::new(options));
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (st, options) = (Arc::clone(&st), Arc::clone(&options));
                std::thread::spawn(move || front::serve(conn, &st, &options));
            }
        });
        Ok(Simulator {
            url: format!("http://127.0.0.1:{port}/ttp-fhir/fhir/dispatcher"),
            port,
            state,
            stop,
            thread: Some(thread),
        })
    }

    /// The dispatcher base URL to configure the agent with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The simulator's state; tests read and change it between cycles.
    pub fn state(&self) -> MutexGuard<'_, SimState> {
        crate::lock(&self.state)
    }

    pub fn add_task(&self, task: Parameter) {
        let mut st = self.state();
        st.settle();
        st.tasks.push(task);
    }

    /// Queues a task for `study` alone: its polls get its own queue.
    pub(crate) fn add_study_task(&self, study: &str, task: Parameter) {
        let mut st = self.state();
        st.settle();
        st.studies.entry(study.to_string()).or_default().push(task);
    }

    pub fn push_fault(&self, operation: Option<&str>, status: u16, diagnostics: &str) {
        self.push(
            operation,
            FaultKind::Status {
                status,
                diagnostics: diagnostics.to_string(),
                retry_after: None,
            },
        );
    }

    /// Invalidates every bearer token issued so far (a Keycloak restart).
    pub fn revoke_tokens(&self) {
        self.state().tokens.clear();
    }

    /// The base URL of the simulator's token endpoint.
    pub fn token_url(&self) -> String {
        format!("{}/token", self.url.trim_end_matches("/ttp-fhir/fhir/dispatcher"))
    }

    pub fn push(&self, operation: Option<&str>, kind: FaultKind) {
        self.state().faults.push_back(Fault {
            operation: operation.map(str::to_string),
            kind,
        });
    }

    /// Blocks until the server thread ends (for `fttp-agent sim`).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        // Wake the accept loop so it sees the flag.
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ------------------------------------------------------------ task builders

fn instant(t: DateTime<Utc>) -> Parameter {
    Parameter::primitive("expires", "instant", &t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

fn bf_part(b64: &str) -> Parameter {
    Parameter::primitive("bloomfilter", "base64Binary", b64)
}

pub fn dic_psn_available(bf_b64: &str, target: &str, pseudonym: &str, expires: Option<DateTime<Utc>>) -> Parameter {
    let mut parts = Vec::new();
    if let Some(e) = expires {
        parts.push(instant(e));
    }
    parts.push(bf_part(bf_b64));
    parts.push(Parameter::identifier("target", Identifier::new(Some(GPAS), target)));
    parts.push(Parameter::identifier(
        "pseudonym",
        Identifier::new(Some(GPAS), pseudonym),
    ));
    Parameter::with_parts("dic_psn_available", parts)
}

/// The patient is named by pseudonym if `pseudonym` is given, else by Bloom filter.
pub fn send_idat(
    task_id: &str,
    expires: DateTime<Utc>,
    pseudonym: Option<&str>,
    bf_b64: Option<&str>,
    elements: &[IdatElement],
) -> Parameter {
    let mut parts = vec![instant(expires), Parameter::primitive("taskId", "id", task_id)];
    if let Some(p) = pseudonym {
        parts.push(Parameter::identifier("pseudonym", Identifier::new(Some(GPAS), p)));
    }
    if let Some(b) = bf_b64 {
        parts.push(bf_part(b));
    }
    for e in elements {
        parts.push(Parameter::coding(
            "element",
            Coding {
                system: Some(ELEMENTS_SYSTEM.into()),
                code: Some(e.code().into()),
                display: None,
            },
        ));
    }
    Parameter::with_parts("send_idat", parts)
}

pub fn repeat_request(study: &str, bf_b64: &str, target: &str, expires: Option<DateTime<Utc>>) -> Parameter {
    let mut parts = Vec::new();
    if let Some(e) = expires {
        parts.push(instant(e));
    }
    parts.push(Parameter::identifier("study", Identifier::new(Some(GPAS), study)));
    parts.push(bf_part(bf_b64));
    parts.push(Parameter::identifier("target", Identifier::new(Some(GPAS), target)));
    Parameter::with_parts("repeat_request", parts)
}

// ------------------------------------------------------------ HTTP handling

/// A request as the front read it off the socket.
pub(crate) struct HttpRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpRequest {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }
}

/// What the simulator does with a request.
pub(crate) enum Action {
    Respond {
        status: u16,
        content_type: String,
        body: Vec<u8>,
        retry_after: Option<u64>,
        location: Option<String>,
    },
    /// A connection-level fault, played by the front.
    Misbehave(FaultKind),
}

fn fhir_answer(status: u16, format: Format, answer: Answer, retry_after: Option<u64>) -> Action {
    let body = match answer {
        Answer::Resource(r) => crate::fhir::write_resource(format, &r),
        Answer::Params(p) => p.write(format),
        Answer::Written(body) => body,
    };
    Action::Respond {
        status,
        content_type: format!("{};charset=utf-8", format.mime()),
        body: body.into_bytes(),
        retry_after,
        location: None,
    }
}

/// A simulator answer: an OperationOutcome or a Parameters resource.
pub(crate) enum Answer {
    Resource(Resource),
    Params(Parameters),
    /// Already in the answer's format.
    Written(String),
}

fn outcome(code: &str, diagnostics: &str) -> Answer {
    Answer::Resource(OperationOutcome::error(code, diagnostics).to_resource())
}

pub(crate) fn handle(state: &Mutex<SimState>, options: &SimOptions, req: &HttpRequest) -> Action {
    let path = req.path.split('?').next().unwrap_or("").replace("%24", "$");
    let operation = path.rsplit('/').next().unwrap_or("").to_string();
    let content_type = req.header("Content-Type");
    let accept = req.header("Accept");
    let header_key = req.header(&options.api_key_header);
    let authorization = req.header("Authorization");
    let body = &req.body;
    let read_ok = true;
    if path == "/token" {
        let (status, json) = token_endpoint(state, options, body);
        return Action::Respond {
            status,
            content_type: "application/json".into(),
            body: json.into_bytes(),
            retry_after: None,
            location: None,
        };
    }
    let request_format = Format::detect(content_type.as_deref(), body).unwrap_or(Format::Xml);
    let answer_format = match accept.as_deref() {
        Some(a) if a.contains("json") => Format::Json,
        Some(a) if a.contains("xml") => Format::Xml,
        _ => request_format,
    };
    let parameters = if read_ok {
        Format::detect(content_type.as_deref(), body)
            .ok()
            .and_then(|f| Parameters::parse(f, body).ok())
    } else {
        None
    };
    let mut st = crate::lock(state);
    let key_in_header = header_key.as_deref() == Some(options.api_key.as_str());
    let key_in_body = options.accept_body_key
        && parameters
            .as_ref()
            .and_then(|p| p.first_string("apikey"))
            .is_some_and(|k| k == options.api_key);
    let second_factor = match (&options.basic, &options.oauth) {
        (Some((user, password)), _) => {
            use base64::Engine;
            let want = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            );
            authorization.as_deref() == Some(want.as_str())
        }
        (None, Some(_)) => authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "))
            .is_some_and(|t| st.tokens.iter().any(|x| x == t)),
        (None, None) => true,
    };
    let mut rec = Received {
        operation: operation.clone(),
        content_type,
        accept,
        authorized: (key_in_header || key_in_body) && second_factor,
        key_in_header,
        // (Set when it is recorded: no copy of every request's filters.)
        parameters: None,
        status: 0,
    };

    let fault = st
        .faults
        .iter()
        .position(|f| f.operation.as_deref().is_none_or(|o| o == operation))
        .and_then(|pos| st.faults.remove(pos));
    let mut retry_after = None;
    let fault = match fault {
        Some(Fault {
            kind: FaultKind::Delay(d),
            ..
        }) => {
            // Sleep without holding the state lock.
            drop(st);
            std::thread::sleep(d);
            st = crate::lock(state);
            None
        }
        other => other,
    };
    let (status, resource) = if let Some(fault) = fault {
        match fault.kind {
            FaultKind::Status {
                status,
                diagnostics,
                retry_after: ra,
            } => {
                retry_after = ra;
                (status, outcome("exception", &diagnostics))
            }
            FaultKind::Raw {
                status,
                content_type,
                body,
            } => {
                rec.status = 0;
                rec.parameters = parameters;
                st.received.push(rec);
                return Action::Respond {
                    status,
                    content_type,
                    body,
                    retry_after: None,
                    location: None,
                };
            }
            FaultKind::Redirect { status, location } => {
                rec.status = 0;
                rec.parameters = parameters;
                st.received.push(rec);
                return Action::Respond {
                    status,
                    content_type: "text/html".into(),
                    body: b"<html>moved</html>".to_vec(),
                    retry_after: None,
                    location: Some(location),
                };
            }
            other => {
                rec.status = 0;
                rec.parameters = parameters;
                st.received.push(rec);
                return Action::Misbehave(other);
            }
        }
    } else if req.method != "POST" {
        (405, outcome("not-supported", "only POST is supported"))
    } else if !rec.authorized {
        (401, outcome("security", "missing or invalid API key"))
    } else {
        match &parameters {
            None => (400, outcome("invalid", "body is not a FHIR Parameters resource")),
            Some(p) => match operation.as_str() {
                "$requestTasks" => request_tasks(&mut st, p, answer_format, options),
                "$providePatientData" => provide_patient_data(&mut st, p),
                "$requestPsnFromBfWorkflow" => request_psn(&mut st, p),
                "$updateBf" => update_bf(&mut st, p),
                _ => (404, outcome("not-found", "unknown operation")),
            },
        }
    };
    rec.status = status;
    rec.parameters = parameters;
    st.received.push(rec);
    drop(st);
    fhir_answer(status, answer_format, resource, retry_after)
}

mod front;

/// A Keycloak-style token endpoint: form-encoded grant in, JSON token out.
fn token_endpoint(state: &Mutex<SimState>, options: &SimOptions, body: &[u8]) -> (u16, String) {
    let mut st = crate::lock(state);
    st.token_requests += 1;
    let form: HashMap<String, String> = String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (form_decode(k), form_decode(v)))
        .collect();
    let get = |k: &str| form.get(k).map(String::as_str);
    let Some(o) = &options.oauth else {
        return (404, "{\"error\":\"not_found\"}".into());
    };
    let client_ok = get("client_id") == Some(o.client_id.as_str()) && get("client_secret") == Some(&o.client_secret);
    let grant_ok = match (get("grant_type"), &o.user) {
        (Some("client_credentials"), None) => true,
        (Some("password"), Some((u, p))) => get("username") == Some(u) && get("password") == Some(p),
        _ => false,
    };
    if !client_ok || !grant_ok {
        return (401, "{\"error\":\"invalid_grant\"}".into());
    }
    st.next_psn += 1;
    let token = format!("tok-{}-{}", st.next_psn, st.token_requests);
    st.tokens.push(token.clone());
    (
        200,
        format!(
            "{{\"access_token\":\"{token}\",\"token_type\":\"Bearer\",\"expires_in\":{}}}",
            o.lifetime_secs
        ),
    )
}

fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(s.get(i + 1..i + 3).unwrap_or(""), 16) {
                Ok(b) => {
                    out.push(b);
                    i += 2;
                }
                Err(_) => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What completes a task: its taskId (send_idat) or its Bloom filter (repeat_request).
fn identity(t: &Parameter) -> Option<String> {
    match t.name.as_ref() {
        "send_idat" => task_id_of(t).map(|id| format!("task:{id}")),
        "repeat_request" => t
            .parts("bloomfilter")
            .find_map(|x| x.value.as_ref().and_then(ParamValue::as_str))
            .map(|b| format!("bf:{b}")),
        _ => None,
    }
}

fn request_tasks(st: &mut SimState, p: &Parameters, format: Format, options: &SimOptions) -> (u16, Answer) {
    let (Some(study), Some(target)) = (p.first_string("study"), p.first_string("target")) else {
        return (400, outcome("required", "study and target are required"));
    };
    if let Some((s, t)) = &options.study_target
        && (study != s || target != t)
    {
        return (404, outcome("not-found", "unknown study or target"));
    }
    // Tasks stay queued until done or expired; a finished clearing
    // (dic_psn_available) has no "done" call, so it is handed out on every
    // poll until it expires and the agent recognises the repeats.
    st.settle();
    // (send_idat tasks of every queue stay answerable.)
    st.handed_out = st
        .tasks
        .iter()
        .chain(st.studies.values().flatten())
        .filter(|t| t.name == "send_idat")
        .filter_map(|t| task_id_of(t).map(str::to_string))
        .collect();
    // Written from the queue itself: a copy of 100,000 tasks to write
    // from cost the simulator more than writing them.
    let own = st.studies.contains_key(study);
    let tasks = match st.studies.get_mut(study) {
        Some(q) => std::mem::take(q),
        None => std::mem::take(&mut st.tasks),
    };
    let queue = Parameters::new(tasks);
    let body = queue.write(format);
    if own {
        st.studies.insert(study.to_string(), queue.parameter);
    } else {
        st.tasks = queue.parameter;
    }
    (200, Answer::Written(body))
}

fn task_id_of(t: &Parameter) -> Option<&str> {
    t.parts("taskId")
        .find_map(|x| x.value.as_ref().and_then(ParamValue::as_str))
}

/// What the Idat profile allows at the top level of the Patient.
const IDAT_ALLOWED: [&str; 8] = [
    "meta",
    "extension",
    "name",
    "gender",
    "birthDate",
    "address",
    "maritalStatus",
    "communication",
];

fn provide_patient_data(st: &mut SimState, p: &Parameters) -> (u16, Answer) {
    let task_id = p
        .get("taskId")
        .find_map(|x| x.value.as_ref().and_then(ParamValue::as_str));
    let Some(task_id) = task_id else {
        return (400, outcome("required", "taskId is required"));
    };
    if p.first_string("target").is_none() {
        return (400, outcome("required", "target is required"));
    }
    let Some(patient) = p.get("patient").find_map(|x| x.resource.as_deref()) else {
        return (400, outcome("required", "patient is required"));
    };
    if patient.resource_type != "Patient" {
        return (422, outcome("invalid", "patient must be a Patient resource"));
    }
    if let Some(bad) = patient.node.names().find(|n| !IDAT_ALLOWED.contains(n)) {
        return (
            422,
            outcome("invalid", &format!("element {bad} is not allowed by the Idat profile")),
        );
    }
    let key = format!("task:{task_id}");
    let outstanding = !st.done.contains(&key) && st.handed_out.contains(task_id);
    if !outstanding {
        return (404, outcome("not-found", "unknown taskId"));
    }
    st.done.insert(key);
    (200, Answer::Params(Parameters::default()))
}

fn request_psn(st: &mut SimState, p: &Parameters) -> (u16, Answer) {
    let (Some(study), Some(target)) = (p.first_string("study"), p.first_string("target")) else {
        return (400, outcome("required", "study and target are required"));
    };
    // Either form the operation definition allows: a plain base64Binary
    // value (its example), or parts `bloomfilter` and `version`.
    let bfs: Vec<String> = p
        .get("bloomfilter")
        .filter_map(|x| {
            x.value.as_ref().and_then(ParamValue::as_str).or_else(|| {
                x.parts("bloomfilter")
                    .find_map(|y| y.value.as_ref().and_then(ParamValue::as_str))
            })
        })
        .map(str::to_string)
        .collect();
    if bfs.is_empty() {
        return (400, outcome("required", "at least one bloomfilter is required"));
    }
    let target_id = Identifier::new(Some(GPAS), target);
    let error_code = |code: &str| -> Vec<Parameter> {
        if code.is_empty() {
            return Vec::new();
        }
        let (system, code) = code.split_once('#').unwrap_or(("http://hl7.org/fhir/issue-type", code));
        vec![Parameter::coding(
            "error-code",
            Coding {
                system: Some(system.into()),
                code: Some(code.into()),
                display: None,
            },
        )]
    };
    if let Some(code) = st.batch_error.take() {
        let mut parts = vec![Parameter::string("all", "all")];
        parts.extend(error_code(&code));
        let err = Parameter::with_parts("error", parts);
        return (200, Answer::Params(Parameters::new(vec![err])));
    }
    if let Some(code) = st.bare_error.take() {
        let err = Parameter::with_parts("error", error_code(&code));
        return (200, Answer::Params(Parameters::new(vec![err])));
    }
    let mut out = Vec::new();
    for bf in bfs {
        if let Some(code) = st.bf_errors.get(&bf).cloned() {
            let mut parts = vec![bf_part(&bf), Parameter::identifier("target", target_id.clone())];
            parts.extend(error_code(&code));
            out.push(Parameter::with_parts("error", parts));
            st.done.insert(format!("bf:{bf}"));
            continue;
        }
        let psn = match st.registry.get(&bf) {
            Some(id) => id.clone(),
            None => {
                st.next_psn += 1;
                let id = Identifier::new(Some(DISPATCHER), &format!("{study}_SIM{:04}", st.next_psn));
                st.registry.insert(bf.clone(), id.clone());
                st.new_filters += 1;
                let nth = st
                    .clearing_every
                    .is_some_and(|n| n > 0 && st.new_filters.is_multiple_of(n));
                if st.clearing.remove(&bf) || nth {
                    // Clearing: nothing now; once "resolved", the pseudonym as a task.
                    let expires = Utc::now() + chrono::Duration::days(7);
                    let value = id.value.clone().unwrap_or_default();
                    st.tasks.push(dic_psn_available(&bf, target, &value, Some(expires)));
                    st.done.insert(format!("bf:{bf}"));
                    continue;
                }
                id
            }
        };
        out.push(Parameter::with_parts(
            "pseudonym-bf",
            vec![
                bf_part(&bf),
                Parameter::identifier("target", target_id.clone()),
                Parameter::identifier("pseudonym", psn),
            ],
        ));
        st.done.insert(format!("bf:{bf}"));
    }
    (200, Answer::Params(Parameters::new(out)))
}

fn update_bf(st: &mut SimState, p: &Parameters) -> (u16, Answer) {
    let get = |name| p.first_string(name);
    let bf = p
        .get("bloomfilter")
        .find_map(|x| x.value.as_ref().and_then(ParamValue::as_str))
        .map(str::to_string);
    let (Some(_study), Some(bf), Some(_source), Some(psn), Some(version)) =
        (get("study"), bf, get("source"), get("pseudonym"), get("bfVersion"))
    else {
        return (
            400,
            outcome(
                "required",
                "study, bloomfilter, source, pseudonym and bfVersion are required",
            ),
        );
    };
    if crate::types::BloomFilter::from_base64(&bf).is_err() {
        return (400, outcome("invalid", "bloomfilter is not a Bloom filter"));
    }
    let old = st
        .registry
        .iter()
        .find(|(_, id)| id.value.as_deref() == Some(psn))
        .map(|(k, id)| (k.clone(), id.clone()));
    let Some((old_bf, id)) = old else {
        return (404, outcome("not-found", "unknown pseudonym"));
    };
    st.registry.remove(&old_bf);
    st.registry.insert(bf, id);
    st.updated_bf.push((psn.to_string(), version.to_string()));
    let ok = OperationOutcome::information("Bloomfilter updated.", "MSG_UPDATED");
    (200, Answer::Resource(ok.to_resource()))
}
