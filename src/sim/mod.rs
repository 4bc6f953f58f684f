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
mod front;
mod handle;
mod tasks;

use handle::{Action, identity};
pub(crate) use handle::{HttpRequest, handle};
use tasks::bf_part;
pub use tasks::{dic_psn_available, repeat_request, send_idat};

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
    /// Requests held by a `Delay` fault now: tests wait on it to act while
    /// a slow request is surely out, not after a guessed sleep.
    pub delayed: usize,
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
