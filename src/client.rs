//! The dispatcher's operations over HTTP: authentication, format
//! negotiation, bounded bodies, retries.

use crate::config::{ApiKeyIn, Config};
use crate::fhir::outcome::OperationOutcome;
use crate::fhir::{FhirError, Format, Parameter, Parameters, Resource};
use crate::privacy::Redactor;
use crate::retry::{RetryPolicy, Retryable, with_backoff};
use crate::tasks::{Rejected, Scope, Task};
use crate::types::{BloomFilter, TaskId};
use std::fmt;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    RequestTasks,
    ProvidePatientData,
    RequestPsnFromBfWorkflow,
    UpdateBf,
}

impl Operation {
    pub fn name(self) -> &'static str {
        match self {
            Operation::RequestTasks => "$requestTasks",
            Operation::ProvidePatientData => "$providePatientData",
            Operation::RequestPsnFromBfWorkflow => "$requestPsnFromBfWorkflow",
            Operation::UpdateBf => "$updateBf",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What went wrong talking to the dispatcher. Messages carry the operation,
/// the HTTP status and the gateway's diagnostics with every secret of the
/// request removed; never a request or response body.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{op}: cannot reach the dispatcher ({reason})")]
    Unreachable { op: Operation, reason: String },
    #[error("{op}: no complete answer within the timeout")]
    Timeout { op: Operation },
    #[error("{op}: dispatcher answered HTTP {status}{}", outcome.as_ref().map(|o| format!(": {o}")).unwrap_or_default())]
    Status {
        op: Operation,
        status: u16,
        outcome: Option<String>,
        retry_after: Option<Duration>,
    },
    #[error(
        "{op}: the dispatcher answered HTTP {status}, a redirect to {location}; redirects are not followed \
         (they would carry the API key elsewhere): check [dispatcher] url"
    )]
    Redirected {
        op: Operation,
        status: u16,
        /// The Location's host only.
        location: String,
    },
    #[error("{op}: the dispatcher answered 2xx but refused: {outcome}")]
    Refused { op: Operation, outcome: String },
    #[error("{op}: unreadable answer: {source}")]
    Decode { op: Operation, source: FhirError },
    #[error("{op}: answer larger than the limit of {limit} bytes")]
    TooLarge { op: Operation, limit: u64 },
    #[error("{op}: {reason}")]
    Tls { op: Operation, reason: String },
    #[error("{op}: authentication failed: {source}")]
    Token {
        op: Operation,
        source: crate::auth::TokenError,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ClientSetupError {
    #[error(transparent)]
    Net(#[from] crate::net::NetSetupError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

impl ClientSetupError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientSetupError::Net(e) => e.exit_code(),
            ClientSetupError::Config(e) => e.exit_code(),
        }
    }
}

impl ClientError {
    /// The dispatcher refused our credentials.
    pub(crate) fn is_auth(&self) -> bool {
        matches!(
            self,
            ClientError::Status { status: 401 | 403, .. } | ClientError::Token { .. } | ClientError::Tls { .. }
        )
    }

    /// The dispatcher refused the request as it is, for good: sending the
    /// same again cannot help.
    pub(crate) fn is_final_refusal(&self) -> bool {
        matches!(
            self,
            ClientError::Status {
                status: 400 | 404 | 409 | 410 | 422,
                ..
            } | ClientError::Refused { .. }
        )
    }

    /// The dispatcher says it does not know (any more) what we refer to.
    pub(crate) fn task_unknown(&self) -> bool {
        matches!(
            self,
            ClientError::Status {
                status: 404 | 409 | 410,
                ..
            }
        )
    }

    /// An answer came, but it is not the protocol (unreadable, too large).
    /// The exit code for a dispatcher that refused or did not answer.
    pub fn exit_code(&self) -> u8 {
        match self {
            // The gateway understood us and said the request is wrong:
            // study or target unknown, a configuration problem.
            ClientError::Status {
                status: 400 | 404 | 422,
                ..
            } => crate::exit::CONFIG,
            e if e.is_protocol() => crate::exit::PROTOCOL,
            _ => crate::exit::DISPATCHER,
        }
    }

    pub(crate) fn is_protocol(&self) -> bool {
        matches!(self, ClientError::Decode { .. } | ClientError::TooLarge { .. })
    }

    /// No complete answer: the request may or may not have been processed.
    pub(crate) fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Unreachable { .. } | ClientError::Timeout { .. })
    }
}

impl Retryable for ClientError {
    fn is_transient(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } | ClientError::Timeout { .. } => true,
            ClientError::Status { status, .. } => matches!(status, 408 | 429 | 500..=599),
            ClientError::Decode { .. }
            | ClientError::TooLarge { .. }
            | ClientError::Redirected { .. }
            | ClientError::Refused { .. }
            | ClientError::Tls { .. }
            | ClientError::Token { .. } => false,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// How a `$providePatientData` arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// This call's answer accepted it.
    Accepted,
    /// An earlier attempt of this call got no answer, and the dispatcher
    /// now no longer knows the task: that attempt consumed it.
    ByEarlierAttempt,
}

pub struct Client {
    agent: ureq::Agent,
    /// The token endpoint's: its own proxy decision (see `net::agent`).
    token_agent: ureq::Agent,
    /// For the hint when a TLS 1.3 server drops us after the handshake,
    /// which is how a missing client certificate shows.
    mtls_hint: bool,
    auth: crate::auth::Auth,
    base: String,
    api_key: String,
    api_key_header: String,
    api_key_in: ApiKeyIn,
    format: Format,
    /// `Some(version)`: filters go as parts `bloomfilter` and `version`
    /// (`[dispatcher] bloomfilter_form = "with_version"`).
    bf_version: Option<String>,
    max_response_bytes: u64,
    retry: RetryPolicy,
    /// Every credential of the configuration in every form (built once:
    /// each call starts from a copy and adds what it sends).
    redactor: Redactor,
    /// How many requests this dispatcher gets at once (told of every
    /// answer: busy or not).
    pace: std::sync::Arc<crate::pace::Pace>,
}

impl Client {
    pub fn new(cfg: &Config) -> Result<Client, ClientSetupError> {
        let d = &cfg.dispatcher;
        let agent = crate::net::agent(d, &d.url.0)?;
        let token_agent = match &d.auth.token_url {
            Some(url) => crate::net::agent(d, &url.0)?,
            None => agent.clone(),
        };
        let auth = crate::auth::Auth::from_config(d)?;
        let api_key = cfg.api_key().to_string();
        let redactor = base_redactor(&auth, &api_key, d.proxy.as_ref().map(crate::config::Secret::expose));
        Ok(Client {
            redactor,
            agent,
            token_agent,
            mtls_hint: d.url.0.starts_with("https://") && d.client_cert.is_none(),
            auth,
            base: d.url.0.clone(),
            api_key,
            api_key_header: d.api_key_header.0.clone(),
            api_key_in: d.api_key_in,
            format: d.format,
            bf_version: match d.bloomfilter_form {
                crate::config::BloomfilterForm::Plain => None,
                crate::config::BloomfilterForm::WithVersion => cfg.bloomfilter.as_ref().and_then(|b| b.version.clone()),
            },
            max_response_bytes: d.max_response_bytes,
            retry: RetryPolicy {
                max_attempts: d.max_attempts.0,
                base_delay: d.retry_delay.0,
                max_delay: RetryPolicy::MAX_DELAY,
            },
            pace: std::sync::Arc::new(crate::pace::Pace::new(d.max_in_flight.0)),
        })
    }

    /// The dispatcher's pace (see `pace`).
    pub fn pace(&self) -> &crate::pace::Pace {
        &self.pace
    }

    fn redactor(&self) -> Redactor {
        self.redactor.clone()
    }

    /// `$requestTasks` {study, target}: the open tasks of this site, typed;
    /// a task for another study or target is rejected.
    pub fn request_tasks(&self, study: &str, target: &str) -> Result<Vec<Result<Task, Rejected>>, ClientError> {
        let params = Parameters::new(vec![
            Parameter::string("study", study),
            Parameter::string("target", target),
        ]);
        let op = Operation::RequestTasks;
        let (format, body) = self.call(op, params, &self.redactor(), None)?;
        let tasks = crate::tasks::parse_answer(format, &body, &Scope { study, target })
            .map_err(|source| ClientError::Decode { op, source })?;
        // A top-level `error` parameter is the dispatcher refusing the
        // poll in a 200 answer, not a task of kind "error".
        if tasks.iter().any(|t| matches!(t, Err(r) if r.name == "error")) {
            let answer = Parameters::parse(format, &body).map_err(|source| ClientError::Decode { op, source })?;
            let codes: Vec<String> = crate::tasks::PsnAnswers::from_parameters(&answer)
                .batch_error
                .into_iter()
                .map(|c| c.to_string())
                .collect();
            return Err(ClientError::Refused {
                op,
                outcome: format!("an error parameter ({})", codes.join(", ")),
            });
        }
        Ok(tasks)
    }

    /// `$providePatientData` {taskId, target, patient}. `secrets` are the
    /// IDAT values sent, so an error echoing them is redacted. A 404, 409
    /// or 410 after an attempt of this call that got no complete answer
    /// means that attempt arrived and consumed the task.
    pub(crate) fn provide_patient_data(
        &self,
        task_id: &TaskId,
        target: &str,
        patient: Resource,
        secrets: &[&str],
        deadline: Option<Instant>,
    ) -> Result<Delivery, ClientError> {
        let params = Parameters::new(vec![
            Parameter::primitive("taskId", "id", task_id.as_str()),
            Parameter::string("target", target),
            Parameter::resource("patient", patient),
        ]);
        let mut redactor = self.redactor();
        for s in secrets {
            redactor.add(s);
        }
        let op = Operation::ProvidePatientData;
        let (result, indeterminate) = self.call_noting(op, params, &redactor, deadline);
        match result {
            Err(e) if indeterminate && e.task_unknown() => Ok(Delivery::ByEarlierAttempt),
            Err(e) => Err(e),
            Ok((format, body)) => refusal(op, format, &body, &redactor).map(|()| Delivery::Accepted),
        }
    }

    /// `$requestPsnFromBfWorkflow` {study, bloomfilter 1..*, target}.
    pub(crate) fn request_psn_from_bf(
        &self,
        study: &str,
        target: &str,
        bloomfilters: &[&BloomFilter],
        deadline: Option<Instant>,
    ) -> Result<Parameters, ClientError> {
        let mut list = vec![Parameter::string("study", study)];
        let mut redactor = self.redactor();
        for bf in bloomfilters {
            let b64 = bf.to_base64();
            redactor.add(&b64);
            let value = Parameter::primitive("bloomfilter", "base64Binary", &b64);
            list.push(match &self.bf_version {
                None => value,
                Some(v) => Parameter::with_parts("bloomfilter", vec![value, Parameter::string("version", v)]),
            });
        }
        list.push(Parameter::string("target", target));
        let op = Operation::RequestPsnFromBfWorkflow;
        let (format, body) = self.call(op, Parameters::new(list), &redactor, deadline)?;
        Parameters::parse(format, &body).map_err(|source| ClientError::Decode { op, source })
    }

    /// `$updateBf` {study, bloomfilter, source, pseudonym, bfVersion}: the
    /// fTTP replaces the filter it holds for `pseudonym` (of this site's
    /// domain `source`). The answer is an OperationOutcome; an HTTP error
    /// status is the refusal.
    pub fn update_bf(
        &self,
        study: &str,
        bloomfilter: &BloomFilter,
        source: &str,
        pseudonym: &str,
        version: &str,
    ) -> Result<(), ClientError> {
        let b64 = bloomfilter.to_base64();
        let mut redactor = self.redactor();
        redactor.add(&b64);
        let params = Parameters::new(vec![
            Parameter::string("study", study),
            Parameter::primitive("bloomfilter", "base64Binary", &b64),
            Parameter::string("source", source),
            Parameter::string("pseudonym", pseudonym),
            Parameter::string("bfVersion", version),
        ]);
        let op = Operation::UpdateBf;
        let (format, body) = self.call(op, params, &redactor, None)?;
        refusal(op, format, &body, &redactor)
    }

    fn call(
        &self,
        op: Operation,
        params: Parameters,
        redactor: &Redactor,
        deadline: Option<Instant>,
    ) -> Result<(Format, Vec<u8>), ClientError> {
        self.call_noting(op, params, redactor, deadline).0
    }

    /// `call`, also saying whether an attempt got no complete answer (the
    /// dispatcher may have processed it).
    fn call_noting(
        &self,
        op: Operation,
        mut params: Parameters,
        redactor: &Redactor,
        deadline: Option<Instant>,
    ) -> (Result<(Format, Vec<u8>), ClientError>, bool) {
        if matches!(self.api_key_in, ApiKeyIn::Body | ApiKeyIn::Both) {
            params.parameter.insert(0, Parameter::string("apikey", &self.api_key));
        }
        let body = params.write(self.format);
        let mut indeterminate = false;
        let result = with_backoff(&self.retry, deadline, |attempt| {
            log::debug!("{op}: attempt {attempt}, {} bytes", body.len());
            let r = self.exchange(op, &body, redactor);
            indeterminate |= matches!(&r, Err(e) if e.is_unreachable());
            r
        });
        (result, indeterminate)
    }

    fn exchange(&self, op: Operation, body: &str, redactor: &Redactor) -> Result<(Format, Vec<u8>), ClientError> {
        let result = self.exchange_refreshing(op, body, redactor);
        match &result {
            Err(ClientError::Status {
                status: 429 | 503,
                retry_after,
                ..
            }) => self.pace.busy(*retry_after),
            Err(ClientError::Timeout { .. }) => self.pace.busy(None),
            Err(e) if e.is_unreachable() => {}
            _ => self.pace.success(),
        }
        result
    }

    fn exchange_refreshing(
        &self,
        op: Operation,
        body: &str,
        redactor: &Redactor,
    ) -> Result<(Format, Vec<u8>), ClientError> {
        match self.exchange_once(op, body, redactor) {
            // A refused bearer token may just have been revoked or expired
            // early: fetch a fresh one, once.
            Err(ClientError::Status { status: 401, .. }) if self.auth.invalidate() => {
                log::info!("{op}: bearer token refused; fetching a new one");
                self.exchange_once(op, body, redactor)
            }
            other => other,
        }
    }

    fn exchange_once(&self, op: Operation, body: &str, redactor: &Redactor) -> Result<(Format, Vec<u8>), ClientError> {
        let url = format!("{}/{}", self.base, op.name());
        let mime = self.format.mime();
        let mut req = self
            .agent
            .post(&url)
            .header("Content-Type", format!("{mime};charset=utf-8"))
            .header("Accept", mime);
        if matches!(self.api_key_in, ApiKeyIn::Header | ApiKeyIn::Both) {
            req = req.header(self.api_key_header.as_str(), self.api_key.as_str());
        }
        let bearer;
        let mut redactor = redactor;
        if let Some(auth) = self
            .auth
            .header(&self.token_agent)
            .map_err(|source| ClientError::Token { op, source })?
        {
            // A token fetched for this request is a secret the redactor
            // built before it did not know.
            if let Some(token) = auth.strip_prefix("Bearer ") {
                let mut with_token = redactor.clone();
                with_token.add_credential(token);
                bearer = with_token;
                redactor = &bearer;
            }
            req = req.header("Authorization", auth);
        }
        let mut resp = req.send(body.as_bytes()).map_err(|e| self.transport(op, e, redactor))?;
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let content_type = header("content-type");
        let retry_after = header("retry-after").and_then(|v| retry_after(&v, chrono::Utc::now()));
        let location = header("location");
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(self.max_response_bytes)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => ClientError::TooLarge {
                    op,
                    limit: self.max_response_bytes,
                },
                other => self.transport(op, other, redactor),
            })?;
        if (300..400).contains(&status) {
            return Err(ClientError::Redirected {
                op,
                status,
                location: crate::net::location_host(location.as_deref()),
            });
        }
        if (200..300).contains(&status) {
            let format = if bytes.iter().all(u8::is_ascii_whitespace) {
                self.format
            } else {
                Format::detect(content_type.as_deref(), &bytes).map_err(|source| ClientError::Decode { op, source })?
            };
            return Ok((format, bytes));
        }
        let outcome = Format::detect(content_type.as_deref(), &bytes)
            .ok()
            .and_then(|f| OperationOutcome::parse(f, &bytes).ok())
            .map(|o| o.summary(redactor));
        Err(ClientError::Status {
            op,
            status,
            outcome,
            retry_after,
        })
    }
}

/// `Retry-After` as seconds or as an HTTP-date (RFC 9110, 10.2.3); a date
/// in the past means now.
fn retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    Some((at.with_timezone(&chrono::Utc) - now).to_std().unwrap_or_default())
}

/// A 2xx answer that is an OperationOutcome with an `error` or `fatal`
/// issue is a refusal, not a success: the gateway's status code is not
/// the only place it says no.
fn refusal(op: Operation, format: Format, body: &[u8], redactor: &Redactor) -> Result<(), ClientError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    match OperationOutcome::parse(format, body) {
        Ok(o)
            if o.issues
                .iter()
                .any(|i| matches!(i.severity.as_str(), "error" | "fatal")) =>
        {
            Err(ClientError::Refused {
                op,
                outcome: o.summary(redactor),
            })
        }
        _ => Ok(()),
    }
}

/// A redactor for every credential of the configuration: the API key, the
/// authentication's secrets, and the proxy's (a transport error may quote
/// the proxy URL, and a proxy may echo its Basic credentials).
fn base_redactor(auth: &crate::auth::Auth, api_key: &str, proxy: Option<&str>) -> Redactor {
    let mut r = Redactor::with_credentials(&auth.secrets());
    r.add_credential(api_key);
    if let Some(proxy) = proxy {
        r.add(proxy);
        if let Some((userinfo, password)) = proxy_credentials(proxy) {
            r.add_credential(userinfo);
            r.add_credential(password);
        }
    }
    r
}

/// `user:password` and the password in `scheme://user:password@host`.
fn proxy_credentials(url: &str) -> Option<(&str, &str)> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let userinfo = authority.rsplit_once('@')?.0;
    userinfo.split_once(':').map(|(_, p)| (userinfo, p))
}

impl Client {
    fn transport(&self, op: Operation, e: ureq::Error, redactor: &Redactor) -> ClientError {
        if let Some(reason) = crate::net::explain_tls(&e) {
            return ClientError::Tls { op, reason };
        }
        let dropped = matches!(&e, ureq::Error::Io(io) if matches!(
            io.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
        ));
        match e {
            ureq::Error::Timeout(_) => ClientError::Timeout { op },
            other => {
                let mut reason = redactor.clean(&other.to_string(), 200);
                if dropped && self.mtls_hint {
                    reason.push_str(
                        "; if the gateway requires a client certificate, set [dispatcher] client_cert and client_key",
                    );
                }
                ClientError::Unreachable { op, reason }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn retry_after_is_read_as_seconds_or_as_an_http_date() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-04T10:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let secs = |v| super::retry_after(v, now).map(|d| d.as_secs());
        assert_eq!(secs("120"), Some(120));
        assert_eq!(secs("Fri, 04 Dec 2026 10:02:30 GMT"), Some(150));
        assert_eq!(secs("Fri, 04 Dec 2026 09:00:00 GMT"), Some(0));
        assert_eq!(secs("soon"), None);
    }

    #[test]
    fn the_proxy_password_is_found_for_redaction() {
        assert_eq!(
            super::proxy_credentials("http://u:s3cret@proxy:3128"),
            Some(("u:s3cret", "s3cret"))
        );
        assert_eq!(super::proxy_credentials("http://proxy:3128"), None);
    }
}
