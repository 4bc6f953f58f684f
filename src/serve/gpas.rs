//! The gPAS operations as the TTP-FHIR Gateway defines them
//! (`../shared/fttp-ig/gpas/`): what a request asks, in its POST
//! (`Parameters`) or older GET (query) form, and the `Parameters` answer.
//! Nothing here touches the store: `serve` looks the values up.

use crate::fhir::element::{Node, Resource};
use crate::fhir::{Coding, Identifier, ParamValue, Parameter, Parameters};

/// The identifier system of the gateway's gPAS answers (the guide's
/// examples), for the target and the value asked about.
pub(crate) const GPAS_SYSTEM: &str = "https://ths-greifswald.de/gpas";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Pseudonymize,
    /// Answered like `Pseudonymize`: the agent cannot create pseudonyms
    /// (they come from the fTTP, for Bloom filters it was sent).
    PseudonymizeAllowCreate,
    DePseudonymize,
}

impl Operation {
    pub const ALL: [Operation; 3] = [
        Operation::Pseudonymize,
        Operation::PseudonymizeAllowCreate,
        Operation::DePseudonymize,
    ];

    /// The operation's code (its name in `metadata` and the audit log).
    pub fn name(self) -> &'static str {
        match self {
            Operation::Pseudonymize => "pseudonymize",
            Operation::PseudonymizeAllowCreate => "pseudonymizeAllowCreate",
            Operation::DePseudonymize => "dePseudonymize",
        }
    }

    /// The operation's audit outcome: its name.
    pub fn outcome(self) -> crate::vocab::Outcome {
        match self {
            Operation::Pseudonymize => crate::vocab::Outcome::Pseudonymize,
            Operation::PseudonymizeAllowCreate => crate::vocab::Outcome::PseudonymizeAllowCreate,
            Operation::DePseudonymize => crate::vocab::Outcome::DePseudonymize,
        }
    }

    pub fn definition(self) -> String {
        format!(
            "https://ths-greifswald.de/fhir/OperationDefinition/gpas/{}",
            self.name()
        )
    }

    /// The operation a path segment names: `$name`, or the older hyphenated
    /// form (`$pseudonymize-allow-create`, `$de-pseudonymize`).
    pub(crate) fn from_segment(segment: &str) -> Option<Operation> {
        Some(match segment.strip_prefix('$')? {
            "pseudonymize" => Operation::Pseudonymize,
            "pseudonymizeAllowCreate" | "pseudonymize-allow-create" => Operation::PseudonymizeAllowCreate,
            "dePseudonymize" | "de-pseudonymize" => Operation::DePseudonymize,
            _ => return None,
        })
    }

    /// The name of the values asked about: originals, or pseudonyms.
    pub fn input(self) -> &'static str {
        match self {
            Operation::DePseudonymize => "pseudonym",
            _ => "original",
        }
    }
}

/// One call: the study asked about (the gPAS `target`) and the values.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub op: Operation,
    pub target: String,
    /// Distinct, in the order first asked.
    pub values: Vec<String>,
    /// How many values the request held (duplicates included).
    pub asked: usize,
}

/// Why a request is not a valid call. The text never quotes what was sent.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum CallError {
    Invalid(String),
    TooMany { limit: usize },
}

impl CallError {
    pub(crate) fn describe(&self) -> String {
        match self {
            CallError::Invalid(why) => why.clone(),
            CallError::TooMany { limit } => {
                format!("more values than the service answers in one request (at most {limit}); split the request")
            }
        }
    }
}

fn expected(op: Operation) -> String {
    format!(
        "${} takes one 'target' (valueString) and one or more '{}' (valueString)",
        op.name(),
        op.input()
    )
}

impl Call {
    /// From a POSTed `Parameters` resource.
    pub(crate) fn from_parameters(op: Operation, params: &Parameters, max: usize) -> Result<Call, CallError> {
        let mut target = None;
        let mut values = Vec::new();
        for (i, p) in params.parameter.iter().enumerate() {
            let is_target = p.name == "target";
            if !is_target && p.name != op.input() {
                return Err(CallError::Invalid(format!(
                    "parameter {} is not one this operation defines: {}",
                    i + 1,
                    expected(op)
                )));
            }
            let string = match (&p.value, &p.resource, p.part.is_empty()) {
                (Some(ParamValue::Primitive { ty, value }), None, true) if ty == "string" && !value.is_empty() => value,
                _ => {
                    return Err(CallError::Invalid(format!(
                        "parameter {} ('{}') must be a non-empty valueString: {}",
                        i + 1,
                        if is_target { "target" } else { op.input() },
                        expected(op)
                    )));
                }
            };
            if is_target {
                if target.replace(string.clone()).is_some() {
                    return Err(CallError::Invalid(format!("more than one 'target': {}", expected(op))));
                }
            } else {
                if values.len() >= max {
                    return Err(CallError::TooMany { limit: max });
                }
                values.push(string.clone());
            }
        }
        Call::new(op, target, values)
    }

    /// From the query of the older GET form (`target` or `domain`, and the
    /// values repeated).
    pub(crate) fn from_query(op: Operation, query: &[(String, String)], max: usize) -> Result<Call, CallError> {
        let mut target = None;
        let mut values = Vec::new();
        for (name, value) in query {
            match name.as_str() {
                "target" | "domain" => {
                    if target.replace(value.clone()).is_some() {
                        return Err(CallError::Invalid(format!(
                            "more than one target/domain: {}",
                            expected(op)
                        )));
                    }
                }
                "_format" => {}
                n if n == op.input() => {
                    if values.len() >= max {
                        return Err(CallError::TooMany { limit: max });
                    }
                    values.push(value.clone());
                }
                _ => {
                    return Err(CallError::Invalid(format!(
                        "a query parameter this operation does not define: {}",
                        expected(op)
                    )));
                }
            }
        }
        if values.iter().any(String::is_empty) || target.as_deref() == Some("") {
            return Err(CallError::Invalid(format!("an empty value: {}", expected(op))));
        }
        Call::new(op, target, values)
    }

    fn new(op: Operation, target: Option<String>, values: Vec<String>) -> Result<Call, CallError> {
        let Some(target) = target else {
            return Err(CallError::Invalid(format!("no 'target': {}", expected(op))));
        };
        if values.is_empty() {
            return Err(CallError::Invalid(format!("no '{}': {}", op.input(), expected(op))));
        }
        let asked = values.len();
        let mut seen = std::collections::HashSet::with_capacity(values.len());
        let values = values.into_iter().filter(|v| seen.insert(v.clone())).collect();
        Ok(Call {
            op,
            target,
            values,
            asked,
        })
    }
}

fn gpas_identifier(name: &'static str, value: &str) -> Parameter {
    Parameter::identifier(name, Identifier::new(Some(GPAS_SYSTEM), value))
}

/// The answer: per value, its match (`pseudonym` parts target, original,
/// pseudonym; for `$dePseudonymize` an `original` parameter), or an
/// `error` with `error-code` `not-found`.
pub fn answer(call: &Call, found: &[Option<Identifier>]) -> Parameters {
    let mut out = Vec::with_capacity(call.values.len());
    for (value, hit) in call.values.iter().zip(found) {
        let target = gpas_identifier("target", &call.target);
        out.push(match (call.op, hit) {
            (Operation::DePseudonymize, Some(original)) => Parameter::with_parts(
                "original",
                vec![
                    target,
                    Parameter::identifier("original", original.clone()),
                    gpas_identifier("pseudonym", value),
                ],
            ),
            (_, Some(pseudonym)) => Parameter::with_parts(
                "pseudonym",
                vec![
                    target,
                    gpas_identifier("original", value),
                    Parameter::identifier("pseudonym", pseudonym.clone()),
                ],
            ),
            (op, None) => Parameter::with_parts(
                "error",
                vec![
                    target,
                    gpas_identifier(op.input(), value),
                    Parameter::coding(
                        "error-code",
                        Coding {
                            system: Some("http://hl7.org/fhir/issue-type".into()),
                            code: Some("not-found".into()),
                            display: Some("Not Found".into()),
                        },
                    ),
                ],
            ),
        });
    }
    Parameters::new(out)
}

/// The CapabilityStatement `GET metadata` answers: exactly the operations
/// enabled, each with its gPAS definition.
pub(crate) fn capability_statement(ops: &[Operation], version: &str, base: &str, now: &str) -> Resource {
    let mut r = Resource::new("CapabilityStatement");
    r.node.push_primitive("status", "active");
    r.node.push_primitive("date", now);
    r.node.push_primitive("kind", "instance");
    r.node.push_complex(
        "software",
        Node::new().with("name", "fttp-agent").with("version", version),
    );
    r.node.push_complex(
        "implementation",
        Node::new().with(
            "description",
            "fttp-agent: gPAS operations answered from the pseudonyms this site received from the fTTP",
        ),
    );
    r.node.push_primitive("fhirVersion", "4.0.1");
    for f in ["application/fhir+json", "application/fhir+xml"] {
        r.node.push_primitive("format", f);
    }
    let mut rest = Node::new().with("mode", "server").with(
        "documentation",
        format!("gPAS operations under {base}; the target is the study's name in the agent's configuration"),
    );
    for op in ops {
        rest.push_complex(
            "operation",
            Node::new().with("name", op.name()).with("definition", op.definition()),
        );
    }
    r.node.push_complex("rest", rest);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::Format;

    fn params(json: &str) -> Parameters {
        Parameters::parse(Format::Json, json.as_bytes()).unwrap()
    }

    #[test]
    fn the_guides_request_example_is_a_call() {
        let body = std::fs::read("../shared/fttp-ig/gpas/Parameters-Parameters-Pseudonymize-request-example-1.json");
        let Ok(body) = body else { return };
        let p = Parameters::parse(Format::Json, &body).unwrap();
        let call = Call::from_parameters(Operation::Pseudonymize, &p, 10).unwrap();
        assert_eq!(call.target, "MIRACUM");
        assert_eq!(call.values, ["1001000000022", "1001000000033"]);
    }

    #[test]
    fn wrong_shapes_are_refused_without_quoting_them() {
        let refused = |json: &str| {
            let e = Call::from_parameters(Operation::Pseudonymize, &params(json), 3).unwrap_err();
            let text = e.describe();
            assert!(!text.contains("SECRET"), "{text}");
            text
        };
        let p = |s: &str| format!(r#"{{"resourceType":"Parameters","parameter":[{s}]}}"#);
        assert!(refused(&p(r#"{"name":"original","valueString":"SECRET"}"#)).contains("no 'target'"));
        assert!(refused(&p(r#"{"name":"target","valueString":"mii"}"#)).contains("no 'original'"));
        assert!(
            refused(&p(
                r#"{"name":"target","valueString":"mii"},{"name":"original","valueInteger":7}"#
            ))
            .contains("valueString")
        );
        assert!(
            refused(&p(
                r#"{"name":"target","valueString":"mii"},{"name":"SECRET","valueString":"x"}"#
            ))
            .contains("not one this operation defines")
        );
        assert!(refused(&p(r#"{"name":"target","valueString":"mii"},{"name":"target","valueString":"SECRET"},{"name":"original","valueString":"x"}"#)).contains("more than one"));
        let four = p(
            r#"{"name":"target","valueString":"mii"},{"name":"original","valueString":"1"},{"name":"original","valueString":"2"},{"name":"original","valueString":"3"},{"name":"original","valueString":"4"}"#,
        );
        assert_eq!(
            Call::from_parameters(Operation::Pseudonymize, &params(&four), 3),
            Err(CallError::TooMany { limit: 3 })
        );
    }

    #[test]
    fn duplicates_are_answered_once_and_counted() {
        let q = [
            ("domain".to_string(), "mii".to_string()),
            ("original".to_string(), "a".to_string()),
            ("original".to_string(), "a".to_string()),
            ("original".to_string(), "b".to_string()),
        ];
        let call = Call::from_query(Operation::PseudonymizeAllowCreate, &q, 10).unwrap();
        assert_eq!((call.values.len(), call.asked), (2, 3));
        let answer = answer(&call, &[Some(Identifier::new(None, "P1")), None]);
        let names: Vec<&str> = answer.parameter.iter().map(|p| p.name.as_ref()).collect();
        assert_eq!(names, ["pseudonym", "error"]);
    }

    #[test]
    fn segments_name_the_current_and_the_older_forms() {
        assert_eq!(
            Operation::from_segment("$pseudonymize-allow-create"),
            Some(Operation::PseudonymizeAllowCreate)
        );
        assert_eq!(
            Operation::from_segment("$de-pseudonymize"),
            Some(Operation::DePseudonymize)
        );
        assert_eq!(Operation::from_segment("pseudonymize"), None);
    }
}
