//! OperationOutcome: how the gateway explains a refusal.

use super::element::{Node, Resource};
use super::{FhirError, Format};
use crate::privacy::Redactor;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Issue {
    pub severity: String,
    pub code: String,
    pub diagnostics: Option<String>,
    /// `details.text`, or the first `details.coding.code`.
    pub details: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct OperationOutcome {
    pub issues: Vec<Issue>,
}

impl OperationOutcome {
    pub fn error(code: &str, diagnostics: &str) -> Self {
        Self::one("error", code, diagnostics, None)
    }

    /// A success report, as `$updateBf` answers (`details` e.g. `MSG_UPDATED`).
    pub fn information(diagnostics: &str, details: &str) -> Self {
        Self::one("information", "informational", diagnostics, Some(details))
    }

    fn one(severity: &str, code: &str, diagnostics: &str, details: Option<&str>) -> Self {
        OperationOutcome {
            issues: vec![Issue {
                severity: severity.into(),
                code: code.into(),
                diagnostics: Some(diagnostics.into()),
                details: details.map(str::to_string),
            }],
        }
    }

    pub fn from_resource(r: &Resource) -> Result<Self, FhirError> {
        if r.resource_type != "OperationOutcome" {
            return Err(FhirError::WrongResource {
                expected: "OperationOutcome",
                got: r.resource_type.clone(),
            });
        }
        let issues = r
            .node
            .nodes("issue")
            .map(|n| Issue {
                severity: n.str("severity").unwrap_or("").to_string(),
                code: n.str("code").unwrap_or("").to_string(),
                diagnostics: n.str("diagnostics").map(str::to_string),
                details: n.node("details").and_then(|d| {
                    d.str("text")
                        .or_else(|| d.nodes("coding").find_map(|c| c.str("code")))
                        .map(str::to_string)
                }),
            })
            .collect();
        Ok(OperationOutcome { issues })
    }

    pub fn parse(format: Format, body: &[u8]) -> Result<Self, FhirError> {
        Self::from_resource(&super::parse_resource(format, body)?)
    }

    pub fn to_resource(&self) -> Resource {
        let mut r = Resource::new("OperationOutcome");
        for i in &self.issues {
            let mut n = Node::new().with("severity", &i.severity).with("code", &i.code);
            if let Some(d) = &i.details {
                n.push_complex("details", Node::new().with("text", d));
            }
            if let Some(d) = &i.diagnostics {
                n.push_primitive("diagnostics", d);
            }
            r.node.push_complex("issue", n);
        }
        r
    }

    /// One line for logs and error messages: the issues' codes and
    /// diagnostics, with everything the redactor knows to be secret removed
    /// and the length bounded.
    pub fn summary(&self, redactor: &Redactor) -> String {
        let parts: Vec<String> = self
            .issues
            .iter()
            .map(|i| {
                let mut s = format!("{}/{}", i.severity, i.code);
                if let Some(d) = &i.details {
                    s.push_str(": ");
                    s.push_str(d);
                }
                if let Some(d) = &i.diagnostics {
                    s.push_str(": ");
                    s.push_str(d);
                }
                s
            })
            .collect();
        redactor.clean(&parts.join("; "), 300)
    }
}

/// The FHIR issue-type code system (<http://hl7.org/fhir/R4/valueset-issue-type.html>).
pub(crate) const ISSUE_TYPE: &str = "http://hl7.org/fhir/issue-type";

/// What an `error-code` of the dispatcher means for the request it
/// answers, by the FHIR issue-type hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorClass {
    /// `transient` and its children: the same request may succeed later.
    Transient,
    /// Any other issue type: this request will never succeed as it is; the
    /// dispatcher issues a new task if it wants another try. `security`
    /// marks the security branch (an operator should look).
    Final { security: bool },
    /// An unknown system or code, or none: retried, but only a few times.
    Unknown,
}

impl ErrorClass {
    pub fn of(system: Option<&str>, code: Option<&str>) -> ErrorClass {
        let Some(code) = code else {
            return ErrorClass::Unknown;
        };
        if system.is_some_and(|s| s != ISSUE_TYPE) {
            return ErrorClass::Unknown;
        }
        match code {
            "transient" | "lock-error" | "no-store" | "exception" | "timeout" | "incomplete" | "throttled" => {
                ErrorClass::Transient
            }
            "security" | "login" | "unknown" | "expired" | "forbidden" | "suppressed" => {
                ErrorClass::Final { security: true }
            }
            "invalid" | "structure" | "required" | "value" | "invariant" | "processing" | "not-supported"
            | "duplicate" | "multiple-matches" | "not-found" | "deleted" | "too-long" | "code-invalid"
            | "extension" | "too-costly" | "business-rule" | "conflict" | "informational" => {
                ErrorClass::Final { security: false }
            }
            _ => ErrorClass::Unknown,
        }
    }
}

#[cfg(test)]
mod class_tests {
    use super::*;

    #[test]
    fn issue_types_are_classified_by_their_branch() {
        let of = |c| ErrorClass::of(Some(ISSUE_TYPE), Some(c));
        for c in [
            "transient",
            "lock-error",
            "no-store",
            "exception",
            "timeout",
            "incomplete",
            "throttled",
        ] {
            assert_eq!(of(c), ErrorClass::Transient, "{c}");
        }
        for c in [
            "not-found",
            "invalid",
            "processing",
            "business-rule",
            "duplicate",
            "conflict",
            "value",
        ] {
            assert_eq!(of(c), ErrorClass::Final { security: false }, "{c}");
        }
        for c in ["security", "login", "forbidden", "expired"] {
            assert_eq!(of(c), ErrorClass::Final { security: true }, "{c}");
        }
        assert_eq!(of("no-such-code"), ErrorClass::Unknown);
        assert_eq!(
            ErrorClass::of(None, Some("not-found")),
            ErrorClass::Final { security: false }
        );
        assert_eq!(
            ErrorClass::of(Some("urn:other"), Some("not-found")),
            ErrorClass::Unknown
        );
        assert_eq!(ErrorClass::of(Some(ISSUE_TYPE), None), ErrorClass::Unknown);
    }
}
