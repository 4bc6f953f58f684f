//! Typed tasks, parsed and validated from a `$requestTasks` answer against
//! the cardinalities and types of OperationDefinition-RequestTasks.json.
//!
//! A task that does not fit becomes a [`Rejected`] with a reason; the other
//! tasks of the same answer are unaffected.

use crate::fhir::fast::{RawPart, RawValue};
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
                let digest = crate::privacy::sha256_of_json(other);
                format!("sha256:{}", crate::privacy::hex(&digest.as_ref()[..16]))
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
    pub(crate) fn display_id_of(&self, key: &str) -> String {
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
    // The XML scanner bounds what it builds itself (`typed_xml`), so the
    // usual answer is read in one pass; anything else goes through
    // `Parameters::parse`, which counts the structure first.
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
    use crate::fhir::limits::{MAX_PARAMETERS, MAX_XML_ELEMENTS};
    // A task takes some 550 bytes of XML or more: sized once, not regrown.
    let mut out = Vec::with_capacity((body.len() / 550 + 1).min(MAX_PARAMETERS));
    // More tasks or parts than any answer holds: left to the Parameters
    // path, whose structure count refuses the document.
    let mut parts_seen = 0usize;
    crate::fhir::fast::scan_tasks_xml(body, |name, parts| {
        parts_seen += parts.len();
        if out.len() >= MAX_PARAMETERS || parts_seen > MAX_XML_ELEMENTS / 2 {
            return None;
        }
        // A task the Parameters path would reject goes back to it, which
        // words and keys the rejection.
        let task = typed(name, &Raw(parts)).and_then(|t| in_scope(t, scope)).ok()?;
        out.push(Ok(task));
        Some(())
    })?;
    Some(out)
}

pub fn parse_response(params: &Parameters, scope: &Scope<'_>) -> Vec<Result<Task, Rejected>> {
    params.parameter.iter().map(|p| parse_task(p, scope)).collect()
}

pub(crate) fn parse_task(p: &Parameter, scope: &Scope<'_>) -> Result<Task, Rejected> {
    let reject = |reason: String| Rejected {
        name: sanitize(&p.name),
        reason,
        key: format!(
            "sha256:{}",
            &sha256_hex(Parameters::new(vec![p.clone()]).to_json().as_bytes())[..32]
        ),
    };
    if p.value.is_some() || p.resource.is_some() {
        return Err(reject("task parameter must carry only parts".into()));
    }
    typed(&p.name, p).and_then(|t| in_scope(t, scope)).map_err(reject)
}

fn typed(name: &str, parts: &impl Parts) -> Result<Task, String> {
    match name {
        "dic_psn_available" => dic_psn_available(parts),
        "send_idat" => send_idat(parts),
        "repeat_request" => repeat_request(parts),
        other => Err(format!("unknown task kind '{}'", sanitize(other))),
    }
}

fn in_scope(task: Task, scope: &Scope<'_>) -> Result<Task, String> {
    match &task {
        Task::DicPsnAvailable { target, .. } | Task::RepeatRequest { target, .. }
            if target.value.as_deref() != Some(scope.target) =>
        {
            Err("task is for another target".into())
        }
        Task::RepeatRequest { study, .. } if study.value.as_deref() != Some(scope.study) => {
            Err("task is for another study".into())
        }
        _ => Ok(task),
    }
}

/// A task's parts as typing reads them: from the Parameters model, or
/// borrowed straight from the XML scanner, so that both readers are typed
/// by the same code.
trait Parts {
    /// (name, value type) of each part; "none" for a part without a value.
    fn shape(&self) -> impl Iterator<Item = (&str, &str)>;
    /// The primitive value of the first part so named.
    fn text(&self, name: &str) -> Option<&str>;
    /// (system, value) of the first part so named, if it is an Identifier.
    fn identifier(&self, name: &str) -> Option<(Option<&str>, Option<&str>)>;
    /// (system, code) of each part so named, `None` where it is not a Coding.
    fn codings<'s>(&'s self, name: &'s str) -> impl Iterator<Item = Option<(Option<&'s str>, Option<&'s str>)>>;
}

impl Parts for Parameter {
    fn shape(&self) -> impl Iterator<Item = (&str, &str)> {
        self.part
            .iter()
            .map(|x| (x.name.as_ref(), x.value_type().unwrap_or("none")))
    }
    fn text(&self, name: &str) -> Option<&str> {
        self.part.iter().find(|x| x.name == name)?.value.as_ref()?.as_str()
    }
    fn identifier(&self, name: &str) -> Option<(Option<&str>, Option<&str>)> {
        match &self.part.iter().find(|x| x.name == name)?.value {
            Some(ParamValue::Identifier(id)) => Some((id.system.as_deref(), id.value.as_deref())),
            _ => None,
        }
    }
    fn codings<'s>(&'s self, name: &'s str) -> impl Iterator<Item = Option<(Option<&'s str>, Option<&'s str>)>> {
        self.parts(name).map(|x| match &x.value {
            Some(ParamValue::Coding(c)) => Some((c.system.as_deref(), c.code.as_deref())),
            _ => None,
        })
    }
}

/// The XML scanner's parts of one task.
struct Raw<'p, 'a>(&'p [RawPart<'a>]);

impl Parts for Raw<'_, '_> {
    fn shape(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|p| {
            let ty = match p.value {
                RawValue::Primitive(ty, _) => ty,
                RawValue::Identifier { .. } => "Identifier",
                RawValue::Coding { .. } => "Coding",
            };
            (p.name, ty)
        })
    }
    fn text(&self, name: &str) -> Option<&str> {
        match self.0.iter().find(|p| p.name == name)?.value {
            RawValue::Primitive(_, v) => Some(v),
            _ => None,
        }
    }
    fn identifier(&self, name: &str) -> Option<(Option<&str>, Option<&str>)> {
        match self.0.iter().find(|p| p.name == name)?.value {
            RawValue::Identifier { system, value } => Some((system, value)),
            _ => None,
        }
    }
    fn codings<'s>(&'s self, name: &'s str) -> impl Iterator<Item = Option<(Option<&'s str>, Option<&'s str>)>> {
        self.0.iter().filter(move |p| p.name == name).map(|p| match p.value {
            RawValue::Coding { system, code, .. } => Some((system, code)),
            _ => None,
        })
    }
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

/// A task is rejected only for a known part that is missing, repeated or
/// of the wrong type. A part the agent does not know is ignored: the guide
/// adds optional parts between versions, and rejecting every task of a
/// kind for one new part would abort all their clearings.
fn check(p: &impl Parts, rules: &[Rule]) -> Result<(), String> {
    for (name, ty) in p.shape() {
        let Some(rule) = rules.iter().find(|r| r.name == name) else {
            log::debug!("ignoring a part the agent does not know: '{}'", sanitize(name));
            continue;
        };
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
        let n = p.shape().filter(|(name, _)| *name == r.name).count();
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

fn expires(p: &impl Parts) -> Result<Option<DateTime<Utc>>, String> {
    match p.text("expires") {
        None => Ok(None),
        Some(s) => DateTime::parse_from_rfc3339(s)
            .map(|d| Some(d.with_timezone(&Utc)))
            .map_err(|_| "expires is not an instant with a time zone".to_string()),
    }
}

fn bloomfilter(p: &impl Parts) -> Result<Option<BloomFilter>, String> {
    match p.text("bloomfilter") {
        None => Ok(None),
        Some(s) => BloomFilter::from_base64(s).map(Some).map_err(|e| e.to_string()),
    }
}

fn identifier(p: &impl Parts, name: &str) -> Result<Option<Identifier>, String> {
    if !p.shape().any(|(n, _)| n == name) {
        return Ok(None);
    }
    match p.identifier(name) {
        Some((system, Some(value))) if !value.is_empty() => Ok(Some(Identifier {
            system: system.map(str::to_string),
            value: Some(value.to_string()),
        })),
        _ => Err(format!("{name} must be an Identifier with a value")),
    }
}

fn pseudonym(p: &impl Parts) -> Result<Option<Pseudonym>, String> {
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

fn dic_psn_available(p: &impl Parts) -> Result<Task, String> {
    check(p, DIC_PSN_AVAILABLE)?;
    Ok(Task::DicPsnAvailable {
        expires: expires(p)?,
        bloomfilter: required(bloomfilter(p)?, "bloomfilter")?,
        target: required(identifier(p, "target")?, "target")?,
        pseudonym: required(pseudonym(p)?, "pseudonym")?,
    })
}

fn send_idat(p: &impl Parts) -> Result<Task, String> {
    check(p, SEND_IDAT)?;
    let task_id = p
        .text("taskId")
        .and_then(TaskId::parse)
        .ok_or("taskId is not a valid FHIR id")?;
    let pseudonym = pseudonym(p)?;
    let bloomfilter = bloomfilter(p)?;
    if pseudonym.is_none() && bloomfilter.is_none() {
        return Err("send_idat needs a pseudonym or a bloomfilter".into());
    }
    let mut elements = Vec::new();
    for coding in p.codings("element") {
        let Some((system, code)) = coding else {
            return Err("element must be a Coding".into());
        };
        if system.is_some_and(|s| s != ELEMENTS_SYSTEM) {
            return Err("element coding is not from the IdatElements code system".into());
        }
        let code = code.unwrap_or("");
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

fn repeat_request(p: &impl Parts) -> Result<Task, String> {
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
        // Ledgers on disk hold these keys: the derivation stays what it was
        // (the first 32 hex digits of SHA-256 over the canonical JSON).
        for t in [&tasks[0], &tasks[2]] {
            let canonical = serde_json::to_string(t).unwrap();
            assert_eq!(t.key(), format!("sha256:{}", &sha256_hex(canonical.as_bytes())[..32]));
        }
        assert_eq!(tasks[1].key(), "task:064ddebf-b20e-468a-97fd-88097bcdbc11");
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

/// The `error-code` Coding of an `error` answer (either part may be missing).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ErrorCode {
    pub system: Option<String>,
    pub code: Option<String>,
}

impl ErrorCode {
    pub fn class(&self) -> crate::fhir::outcome::ErrorClass {
        crate::fhir::outcome::ErrorClass::of(self.system.as_deref(), self.code.as_deref())
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // (A code from the dispatcher: bounded and cleaned, never trusted.)
        let code = self.code.as_deref().unwrap_or("no error-code");
        let clean: String = code
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            .take(40)
            .collect();
        match &self.system {
            Some(s) if s != crate::fhir::outcome::ISSUE_TYPE => write!(f, "{clean} (another code system)"),
            _ => f.write_str(&clean),
        }
    }
}

/// The answer of `$requestPsnFromBfWorkflow`, typed: a pseudonym per Bloom
/// filter (`pseudonym-bf`), an error code per filter (`error`), or an error
/// for the whole request (an `error` with an `all` part). A filter in
/// neither map went to clearing.
#[derive(Debug, Default)]
pub(crate) struct PsnAnswers {
    pub pseudonyms: std::collections::HashMap<BloomFilter, Pseudonym>,
    pub errors: std::collections::HashMap<BloomFilter, ErrorCode>,
    /// An `error` with an `all` part, or with no `bloomfilter` part: it
    /// answers the whole request.
    pub batch_error: Option<ErrorCode>,
    /// Parts that could not be read (reported, then ignored).
    pub malformed: usize,
}

impl PsnAnswers {
    pub(crate) fn from_parameters(answer: &Parameters) -> PsnAnswers {
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
                            Some(ParamValue::Coding(c)) => Some(ErrorCode {
                                system: c.system.clone(),
                                code: c.code.clone(),
                            }),
                            _ => None,
                        })
                        .unwrap_or_default();
                    let has_bf = p.parts("bloomfilter").next().is_some();
                    if p.parts("all").next().is_some() || !has_bf {
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
