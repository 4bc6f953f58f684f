//! The dispatcher's operations: a request as the front read it, checked
//! (API key, Basic, bearer token, study and target) and answered from the
//! simulator's state, with the faults queued for it.

use super::*;

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
            st.delayed += 1;
            drop(st);
            std::thread::sleep(d);
            st = crate::lock(state);
            st.delayed -= 1;
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
pub(super) fn identity(t: &Parameter) -> Option<String> {
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
