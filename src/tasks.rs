//! Typed tasks, parsed and validated from a `$requestTasks` answer against
//! the cardinalities and types of OperationDefinition-RequestTasks.json.
//!
//! A task that does not fit becomes a [`Rejected`] with a reason; the other
//! tasks of the same answer are unaffected.

use crate::fhir::idat::{ELEMENTS_SYSTEM, IdatElement};
use crate::fhir::{FhirError, Format, Identifier, ParamValue, Parameter, Parameters};
use crate::privacy::sha256_hex;
use crate::types::{BloomFilter, Pseudonym, TaskId};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    DicPsnAvailable,
    SendIdat,
    RepeatRequest,
    /// A parameter the agent does not know; only ever `rejected`.
    Unknown,
}

impl TaskKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::DicPsnAvailable => "dic_psn_available",
            TaskKind::SendIdat => "send_idat",
            TaskKind::RepeatRequest => "repeat_request",
            TaskKind::Unknown => "unknown",
        }
    }
}

impl std::str::FromStr for TaskKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [
            TaskKind::DicPsnAvailable,
            TaskKind::SendIdat,
            TaskKind::RepeatRequest,
            TaskKind::Unknown,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
        .ok_or_else(|| format!("unknown task kind '{s}' (dic_psn_available, send_idat, repeat_request, unknown)"))
    }
}

impl fmt::Display for TaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Task {
    /// A clearing finished: store `pseudonym` for the patient with `bloomfilter`.
    DicPsnAvailable {
        expires: Option<DateTime<Utc>>,
        bloomfilter: BloomFilter,
        target: Identifier,
        pseudonym: Pseudonym,
    },
    /// Send the requested IDAT elements of one patient.
    SendIdat {
        expires: DateTime<Utc>,
        task_id: TaskId,
        pseudonym: Option<Pseudonym>,
        bloomfilter: Option<BloomFilter>,
        elements: Vec<IdatElement>,
    },
    /// Resend a Bloom filter through `$requestPsnFromBfWorkflow`.
    RepeatRequest {
        expires: Option<DateTime<Utc>>,
        study: Identifier,
        bloomfilter: BloomFilter,
        target: Identifier,
    },
}

impl Task {
    pub fn kind(&self) -> TaskKind {
        match self {
            Task::DicPsnAvailable { .. } => TaskKind::DicPsnAvailable,
            Task::SendIdat { .. } => TaskKind::SendIdat,
            Task::RepeatRequest { .. } => TaskKind::RepeatRequest,
        }
    }

    pub fn expires(&self) -> Option<DateTime<Utc>> {
        match self {
            Task::DicPsnAvailable { expires, .. } | Task::RepeatRequest { expires, .. } => *expires,
            Task::SendIdat { expires, .. } => Some(*expires),
        }
    }

    pub fn target(&self) -> Option<&str> {
        match self {
            Task::DicPsnAvailable { target, .. } | Task::RepeatRequest { target, .. } => target.value.as_deref(),
            Task::SendIdat { .. } => None,
        }
    }

    /// The ledger key: the taskId where the dispatcher gives one, otherwise a
    /// SHA-256 over the task's canonical content, so the same task seen in
    /// two polls is recognised.
    pub fn key(&self) -> String {
        match self {
            Task::SendIdat { task_id, .. } => format!("task:{task_id}"),
            other => {
                let canonical = serde_json::to_string(other).unwrap_or_default();
                format!("sha256:{}", &sha256_hex(canonical.as_bytes())[..32])
            }
        }
    }

    /// What the audit log and `tasks` show as the task's name: the taskId,
    /// or a prefix of the content hash.
    pub fn display_id(&self) -> String {
        self.display_id_of(&self.key())
    }

    /// `display_id` from a key already computed (hashing is not free when
    /// 100,000 tasks arrive at once).
    pub fn display_id_of(&self, key: &str) -> String {
        match self {
            Task::SendIdat { task_id, .. } => task_id.to_string(),
            _ => key.chars().take(19).collect(),
        }
    }
}

/// A task that could not be accepted, and why. Holds no raw content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rejected {
    /// The parameter name, sanitised.
    pub name: String,
    pub reason: String,
    /// `sha256:` of the parameter's canonical JSON.
    pub key: String,
}

/// What this site is: tasks for another study or target are rejected.
#[derive(Debug, Clone)]
pub struct Scope<'a> {
    pub study: &'a str,
    pub target: &'a str,
}

/// A `$requestTasks` answer, typed. An XML answer in the usual shape whose
/// tasks are all valid is read straight into tasks (`typed_xml`); anything
/// else goes through the Parameters model, which also words the
/// rejections. Both give the same tasks (a property test checks this).
pub fn parse_answer(format: Format, body: &[u8], scope: &Scope<'_>) -> Result<Vec<Result<Task, Rejected>>, FhirError> {
    if format == Format::Xml
        && let Some(tasks) = typed_xml(body, scope)
    {
        return Ok(tasks);
    }
    Ok(parse_response(&Parameters::parse(format, body)?, scope))
}

/// The XML fast path alone: `None` where it leaves the document to the
/// Parameters path (tests compare the two).
pub fn typed_xml(body: &[u8], scope: &Scope<'_>) -> Option<Vec<Result<Task, Rejected>>> {
    // A task takes some 550 bytes of XML or more: sized once, not regrown.
    let mut out = Vec::with_capacity(body.len() / 550 + 1);
    crate::fhir::fast::scan_tasks_xml(body, |name, parts| {
        out.push(Ok(raw::task(name, parts, scope)?));
        Some(())
    })?;
    Some(out)
}

/// Typing from the borrowed parts of the XML scanner. Every function gives
/// up (`None`) where the Parameters path would reject, so that rejections
/// are always worded, and keyed, by that path.
mod raw {
    use super::*;
    use crate::fhir::fast::{RawPart, RawValue};

    fn check(parts: &[RawPart<'_>], rules: &[Rule]) -> Option<()> {
        for part in parts {
            let rule = rules.iter().find(|r| r.name == part.name)?;
            let ty = match part.value {
                RawValue::Primitive(ty, _) => ty,
                RawValue::Identifier { .. } => "Identifier",
                RawValue::Coding { .. } => "Coding",
            };
            rule.types.contains(&ty).then_some(())?;
        }
        for r in rules {
            let n = parts.iter().filter(|p| p.name == r.name).count();
            if n < r.min || r.max.is_some_and(|max| n > max) {
                return None;
            }
        }
        Some(())
    }

    fn one<'a>(parts: &[RawPart<'a>], name: &str) -> Option<RawValue<'a>> {
        parts.iter().find(|p| p.name == name).map(|p| p.value)
    }

    fn text<'a>(parts: &[RawPart<'a>], name: &str) -> Option<&'a str> {
        match one(parts, name)? {
            RawValue::Primitive(_, v) => Some(v),
            _ => None,
        }
    }

    fn expires(parts: &[RawPart<'_>]) -> Option<Option<DateTime<Utc>>> {
        match text(parts, "expires") {
            None => Some(None),
            Some(s) => DateTime::parse_from_rfc3339(s)
                .ok()
                .map(|d| Some(d.with_timezone(&Utc))),
        }
    }

    fn bloomfilter(parts: &[RawPart<'_>]) -> Option<Option<BloomFilter>> {
        match text(parts, "bloomfilter") {
            None => Some(None),
            Some(s) => BloomFilter::from_base64(s).ok().map(Some),
        }
    }

    fn identifier(parts: &[RawPart<'_>], name: &str) -> Option<Option<Identifier>> {
        match one(parts, name) {
            None => Some(None),
            Some(RawValue::Identifier {
                system,
                value: Some(value),
            }) if !value.is_empty() => Some(Some(Identifier {
                system: system.map(str::to_string),
                value: Some(value.to_string()),
            })),
            Some(_) => None,
        }
    }

    fn pseudonym(parts: &[RawPart<'_>]) -> Option<Option<Pseudonym>> {
        Some(identifier(parts, "pseudonym")?.map(|id| Pseudonym {
            system: id.system,
            value: id.value.unwrap_or_default(),
        }))
    }

    pub(super) fn task(name: &str, parts: &[RawPart<'_>], scope: &Scope<'_>) -> Option<Task> {
        let task = match name {
            "dic_psn_available" => {
                check(parts, DIC_PSN_AVAILABLE)?;
                Task::DicPsnAvailable {
                    expires: expires(parts)?,
                    bloomfilter: bloomfilter(parts)??,
                    target: identifier(parts, "target")??,
                    pseudonym: pseudonym(parts)??,
                }
            }
            "send_idat" => {
                check(parts, SEND_IDAT)?;
                let task_id = text(parts, "taskId").and_then(TaskId::parse)?;
                let pseudonym = pseudonym(parts)?;
                let bloomfilter = bloomfilter(parts)?;
                if pseudonym.is_none() && bloomfilter.is_none() {
                    return None;
                }
                let mut elements = Vec::new();
                for part in parts.iter().filter(|p| p.name == "element") {
                    let RawValue::Coding { system, code, .. } = part.value else {
                        return None;
                    };
                    if system.is_some_and(|s| s != ELEMENTS_SYSTEM) {
                        return None;
                    }
                    let e = IdatElement::from_code(code.unwrap_or(""))?;
                    if !elements.contains(&e) {
                        elements.push(e);
                    }
                }
                Task::SendIdat {
                    expires: expires(parts)??,
                    task_id,
                    pseudonym,
                    bloomfilter,
                    elements,
                }
            }
            "repeat_request" => {
                check(parts, REPEAT_REQUEST)?;
                Task::RepeatRequest {
                    expires: expires(parts)?,
                    study: identifier(parts, "study")??,
                    bloomfilter: bloomfilter(parts)??,
                    target: identifier(parts, "target")??,
                }
            }
            _ => return None,
        };
        match &task {
            Task::DicPsnAvailable { target, .. } | Task::RepeatRequest { target, .. }
                if target.value.as_deref() != Some(scope.target) =>
            {
                None
            }
            Task::RepeatRequest { study, .. } if study.value.as_deref() != Some(scope.study) => None,
            _ => Some(task),
        }
    }
}

pub fn parse_response(params: &Parameters, scope: &Scope<'_>) -> Vec<Result<Task, Rejected>> {
    params.parameter.iter().map(|p| parse_task(p, scope)).collect()
}

pub fn parse_task(p: &Parameter, scope: &Scope<'_>) -> Result<Task, Rejected> {
    let reject = |reason: String| Rejected {
        name: sanitize(&p.name),
        reason,
        key: format!(
            "sha256:{}",
            &sha256_hex(Parameters::new(vec![p.clone()]).to_json().as_bytes())[..32]
        ),
    };
    let task = match p.name.as_ref() {
        "dic_psn_available" => dic_psn_available(p),
        "send_idat" => send_idat(p),
        "repeat_request" => repeat_request(p),
        other => Err(format!("unknown task kind '{}'", sanitize(other))),
    }
    .map_err(reject)?;
    match &task {
        Task::DicPsnAvailable { target, .. } | Task::RepeatRequest { target, .. }
            if target.value.as_deref() != Some(scope.target) =>
        {
            return Err(reject("task is for another target".into()));
        }
        _ => {}
    }
    if let Task::RepeatRequest { study, .. } = &task
        && study.value.as_deref() != Some(scope.study)
    {
        return Err(reject("task is for another study".into()));
    }
    Ok(task)
}

fn sanitize(s: &str) -> String {
    let clean: String = s
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .take(40)
        .collect();
    if clean.is_empty() { "?".into() } else { clean }
}

/// Part rules: name, min, max (None = *), accepted value types.
struct Rule {
    name: &'static str,
    min: usize,
    max: Option<usize>,
    types: &'static [&'static str],
}

const fn rule(name: &'static str, min: usize, max: Option<usize>, types: &'static [&'static str]) -> Rule {
    Rule { name, min, max, types }
}

// `expires` is an instant; dateTime with a time zone is tolerated because
// some FHIR servers serialise instants that way.
const EXPIRES: &[&str] = &["instant", "dateTime"];

fn check(p: &Parameter, rules: &[Rule]) -> Result<(), String> {
    if p.value.is_some() || p.resource.is_some() {
        return Err("task parameter must carry only parts".into());
    }
    for part in &p.part {
        let Some(rule) = rules.iter().find(|r| r.name == part.name) else {
            return Err(format!("unexpected part '{}'", sanitize(&part.name)));
        };
        let ty = part.value_type().unwrap_or("none");
        if !rule.types.contains(&ty) {
            return Err(format!(
                "part '{}' has type {}, expected {}",
                rule.name,
                sanitize(ty),
                rule.types[0]
            ));
        }
    }
    for r in rules {
        let n = p.parts(r.name).count();
        if n < r.min {
            return Err(format!("missing part '{}'", r.name));
        }
        if r.max.is_some_and(|max| n > max) {
            return Err(format!(
                "part '{}' occurs {n} times, at most {} allowed",
                r.name,
                r.max.unwrap_or(0)
            ));
        }
    }
    Ok(())
}

fn one<'a>(p: &'a Parameter, name: &str) -> Option<&'a ParamValue> {
    p.part.iter().find(|x| x.name == name).and_then(|x| x.value.as_ref())
}

fn expires(p: &Parameter) -> Result<Option<DateTime<Utc>>, String> {
    match one(p, "expires").and_then(ParamValue::as_str) {
        None => Ok(None),
        Some(s) => DateTime::parse_from_rfc3339(s)
            .map(|d| Some(d.with_timezone(&Utc)))
            .map_err(|_| "expires is not an instant with a time zone".to_string()),
    }
}

fn bloomfilter(p: &Parameter) -> Result<Option<BloomFilter>, String> {
    match one(p, "bloomfilter").and_then(ParamValue::as_str) {
        None => Ok(None),
        Some(s) => BloomFilter::from_base64(s).map(Some).map_err(|e| e.to_string()),
    }
}

fn identifier(p: &Parameter, name: &str) -> Result<Option<Identifier>, String> {
    match one(p, name) {
        None => Ok(None),
        Some(ParamValue::Identifier(id)) if id.value.as_deref().is_some_and(|v| !v.is_empty()) => Ok(Some(id.clone())),
        Some(_) => Err(format!("{name} must be an Identifier with a value")),
    }
}

fn pseudonym(p: &Parameter) -> Result<Option<Pseudonym>, String> {
    Ok(identifier(p, "pseudonym")?.map(|id| Pseudonym {
        system: id.system,
        value: id.value.unwrap_or_default(),
    }))
}

fn required<T>(v: Option<T>, name: &str) -> Result<T, String> {
    v.ok_or_else(|| format!("missing part '{name}'"))
}

const DIC_PSN_AVAILABLE: &[Rule] = &[
    rule("expires", 0, Some(1), EXPIRES),
    rule("bloomfilter", 1, Some(1), &["base64Binary"]),
    rule("target", 1, Some(1), &["Identifier"]),
    rule("pseudonym", 1, Some(1), &["Identifier"]),
];

const SEND_IDAT: &[Rule] = &[
    rule("expires", 1, Some(1), EXPIRES),
    rule("taskId", 1, Some(1), &["id", "string"]),
    rule("pseudonym", 0, Some(1), &["Identifier"]),
    rule("bloomfilter", 0, Some(1), &["base64Binary"]),
    rule("element", 1, None, &["Coding"]),
];

const REPEAT_REQUEST: &[Rule] = &[
    rule("expires", 0, Some(1), EXPIRES),
    rule("study", 1, Some(1), &["Identifier"]),
    rule("bloomfilter", 1, Some(1), &["base64Binary"]),
    rule("target", 1, Some(1), &["Identifier"]),
];

fn dic_psn_available(p: &Parameter) -> Result<Task, String> {
    check(p, DIC_PSN_AVAILABLE)?;
    Ok(Task::DicPsnAvailable {
        expires: expires(p)?,
        bloomfilter: required(bloomfilter(p)?, "bloomfilter")?,
        target: required(identifier(p, "target")?, "target")?,
        pseudonym: required(pseudonym(p)?, "pseudonym")?,
    })
}

fn send_idat(p: &Parameter) -> Result<Task, String> {
    check(p, SEND_IDAT)?;
    let task_id = one(p, "taskId")
        .and_then(ParamValue::as_str)
        .and_then(TaskId::parse)
        .ok_or("taskId is not a valid FHIR id")?;
    let pseudonym = pseudonym(p)?;
    let bloomfilter = bloomfilter(p)?;
    if pseudonym.is_none() && bloomfilter.is_none() {
        return Err("send_idat needs a pseudonym or a bloomfilter".into());
    }
    let mut elements = Vec::new();
    for part in p.parts("element") {
        let Some(ParamValue::Coding(c)) = &part.value else {
            return Err("element must be a Coding".into());
        };
        if c.system.as_deref().is_some_and(|s| s != ELEMENTS_SYSTEM) {
            return Err("element coding is not from the IdatElements code system".into());
        }
        let code = c.code.as_deref().unwrap_or("");
        let e = IdatElement::from_code(code).ok_or_else(|| format!("unknown IDAT element '{}'", sanitize(code)))?;
        if !elements.contains(&e) {
            elements.push(e);
        }
    }
    Ok(Task::SendIdat {
        expires: required(expires(p)?, "expires")?,
        task_id,
        pseudonym,
        bloomfilter,
        elements,
    })
}

fn repeat_request(p: &Parameter) -> Result<Task, String> {
    check(p, REPEAT_REQUEST)?;
    Ok(Task::RepeatRequest {
        expires: expires(p)?,
        study: required(identifier(p, "study")?, "study")?,
        bloomfilter: required(bloomfilter(p)?, "bloomfilter")?,
        target: required(identifier(p, "target")?, "target")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::{Coding, Format};

    const SCOPE: Scope<'static> = Scope {
        study: "mii",
        target: "eyematics",
    };

    fn example() -> Parameters {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/resources/fttp-ig/json/Parameters-Parameters-RequestTasks-response-example-1.json"
        );
        Parameters::parse(Format::Json, &std::fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn the_ig_example_yields_one_task_of_each_kind() {
        let tasks: Vec<Task> = parse_response(&example(), &SCOPE)
            .into_iter()
            .map(|t| t.unwrap())
            .collect();
        assert_eq!(tasks.len(), 3);
        match &tasks[1] {
            Task::SendIdat {
                task_id,
                elements,
                pseudonym,
                expires,
                ..
            } => {
                assert_eq!(task_id.as_str(), "064ddebf-b20e-468a-97fd-88097bcdbc11");
                assert_eq!(pseudonym.as_ref().unwrap().value, "mii_1244Q2");
                assert_eq!(elements.len(), 6);
                assert_eq!(expires.to_rfc3339(), "2021-05-28T11:00:00+00:00");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(tasks[0].kind(), TaskKind::DicPsnAvailable);
        assert_eq!(tasks[2].kind(), TaskKind::RepeatRequest);
        assert!(tasks[0].key().starts_with("sha256:"));
        assert_ne!(tasks[0].key(), tasks[2].key());
    }

    #[test]
    fn malformed_tasks_are_rejected_with_reasons_and_others_survive() {
        let mut params = example();
        // send_idat without taskId
        let mut broken = params.parameter[1].clone();
        broken.part.retain(|p| p.name != "taskId");
        // unknown element code
        let mut bad_code = params.parameter[1].clone();
        bad_code.part.push(Parameter::coding(
            "element",
            Coding {
                system: Some(ELEMENTS_SYSTEM.into()),
                code: Some("shoe-size".into()),
                display: None,
            },
        ));
        // two bloomfilters
        let mut twice = params.parameter[0].clone();
        twice.part.push(twice.part[0].clone());
        let unknown = Parameter::with_parts("make_coffee", vec![]);
        let mut other_target = params.parameter[2].clone();
        other_target.part[2] = Parameter::identifier("target", Identifier::new(None, "elsewhere"));
        params
            .parameter
            .extend([broken, bad_code, twice, unknown, other_target]);
        let results = parse_response(&params, &SCOPE);
        let reasons: Vec<String> = results[3..].iter().map(|r| r.clone().unwrap_err().reason).collect();
        assert_eq!(
            reasons,
            vec![
                "missing part 'taskId'",
                "unknown IDAT element 'shoe-size'",
                "part 'bloomfilter' occurs 2 times, at most 1 allowed",
                "unknown task kind 'make_coffee'",
                "task is for another target",
            ]
        );
        assert!(results[..3].iter().all(Result::is_ok));
    }

    #[test]
    fn rejected_reasons_never_quote_content() {
        let p = Parameter::with_parts(
            "send_idat",
            vec![Parameter::primitive(
                "bloomfilter",
                "base64Binary",
                "not base64 Mustermann!",
            )],
        );
        let r = parse_task(&p, &SCOPE).unwrap_err();
        assert!(!r.reason.contains("Mustermann"));
    }
}

/// The answer of `$requestPsnFromBfWorkflow`, typed: a pseudonym per Bloom
/// filter (`pseudonym-bf`), an error code per filter (`error`), or an error
/// for the whole request (an `error` with an `all` part). A filter in
/// neither map went to clearing.
#[derive(Debug, Default)]
pub struct PsnAnswers {
    pub pseudonyms: std::collections::HashMap<BloomFilter, Pseudonym>,
    pub errors: std::collections::HashMap<BloomFilter, String>,
    pub batch_error: Option<String>,
    /// Parts that could not be read (reported, then ignored).
    pub malformed: usize,
}

impl PsnAnswers {
    pub fn from_parameters(answer: &Parameters) -> PsnAnswers {
        let mut out = PsnAnswers::default();
        let bf_of = |p: &Parameter| {
            p.parts("bloomfilter")
                .find_map(|x| x.value.as_ref().and_then(ParamValue::as_str))
                .and_then(|s| BloomFilter::from_base64(s).ok())
        };
        for p in &answer.parameter {
            match p.name.as_ref() {
                "pseudonym-bf" => {
                    let psn = p.parts("pseudonym").find_map(|x| match &x.value {
                        Some(ParamValue::Identifier(id)) => id.value.clone().map(|v| Pseudonym {
                            system: id.system.clone(),
                            value: v,
                        }),
                        _ => None,
                    });
                    match (bf_of(p), psn) {
                        (Some(bf), Some(psn)) => {
                            out.pseudonyms.insert(bf, psn);
                        }
                        _ => out.malformed += 1,
                    }
                }
                "error" => {
                    let code = p
                        .parts("error-code")
                        .find_map(|x| match &x.value {
                            Some(ParamValue::Coding(c)) => c.code.clone(),
                            _ => None,
                        })
                        .unwrap_or_else(|| "unspecified".into());
                    if p.parts("all").next().is_some() {
                        out.batch_error = Some(code);
                    } else if let Some(bf) = bf_of(p) {
                        out.errors.insert(bf, code);
                    } else {
                        out.malformed += 1;
                    }
                }
                _ => {}
            }
        }
        out
    }
}
