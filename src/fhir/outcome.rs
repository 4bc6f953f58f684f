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
