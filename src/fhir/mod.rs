//! FHIR R4 as the dispatcher speaks it: Parameters, the Idat Patient and
//! OperationOutcome, in JSON and XML.

pub mod codec;
pub mod codes;
pub mod element;
pub mod fast;
pub mod idat;
pub mod intern;
pub mod json;
pub mod limits;
pub mod outcome;
pub mod parameters;
pub mod schema;
pub mod xml;

pub use element::{Node, Primitive, Resource, Value};
pub use parameters::{Coding, Identifier, ParamValue, Parameter, Parameters};

use serde::{Deserialize, Serialize};

/// Why a FHIR document could not be read. Never quotes document content:
/// a dispatcher answer may echo IDAT.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FhirError {
    #[error("invalid FHIR JSON: {reason} at line {line}, column {column}")]
    Json {
        line: usize,
        column: usize,
        reason: &'static str,
    },
    #[error("invalid FHIR XML at byte {position}: {reason}")]
    Xml { position: u64, reason: String },
    #[error("invalid FHIR content at {path}: {reason}")]
    Structure { path: String, reason: String },
    #[error("more than {limit} {what}: far more than any dispatcher answer holds")]
    TooMuch { what: &'static str, limit: usize },
    #[error("nesting too deep at {path}")]
    TooDeep { path: String },
    #[error("not a FHIR document: {0}")]
    NotFhir(String),
    #[error("expected a {expected} resource, got {got}")]
    WrongResource { expected: &'static str, got: String },
}

impl FhirError {
    pub fn structure(path: &str, reason: &str) -> Self {
        FhirError::Structure {
            path: path.to_string(),
            reason: reason.to_string(),
        }
    }
}

/// Wire format: what we send and ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `application/fhir+xml`, what the public clients of the gateway speak.
    #[default]
    Xml,
    /// `application/fhir+json`.
    Json,
}

impl Format {
    pub fn mime(self) -> &'static str {
        match self {
            Format::Xml => "application/fhir+xml",
            Format::Json => "application/fhir+json",
        }
    }

    /// Picks the format of a received body from its Content-Type, falling back
    /// to the first significant byte when the header is missing or generic.
    pub fn detect(content_type: Option<&str>, body: &[u8]) -> Result<Format, FhirError> {
        let ct = content_type.unwrap_or("").to_ascii_lowercase();
        if ct.contains("html") {
            return Err(FhirError::NotFhir(
                "an HTML page (a proxy or server error page?)".into(),
            ));
        }
        if ct.contains("json") {
            return Ok(Format::Json);
        }
        if ct.contains("xml") {
            return Ok(Format::Xml);
        }
        let first = body
            .iter()
            .copied()
            .find(|b| !b.is_ascii_whitespace() && *b != 0xEF && *b != 0xBB && *b != 0xBF);
        match first {
            Some(b'{') => Ok(Format::Json),
            Some(b'<') => Ok(Format::Xml),
            None => Err(FhirError::NotFhir("an empty body".into())),
            Some(_) => Err(FhirError::NotFhir(format!(
                "content type '{}'",
                ct.chars().take(60).collect::<String>()
            ))),
        }
    }
}

pub(crate) fn parse_resource(format: Format, body: &[u8]) -> Result<Resource, FhirError> {
    limits::check(format, body)?;
    match format {
        Format::Json => json::parse(body),
        Format::Xml => xml::parse(body),
    }
}

pub(crate) fn write_resource(format: Format, resource: &Resource) -> String {
    match format {
        Format::Json => json::to_string(resource),
        Format::Xml => xml::to_string(resource),
    }
}
