//! Fast paths for the common shape of dispatcher `Parameters`: no
//! extensions, element ids, contained resources or namespace prefixes.
//! They read straight into the typed model; for anything else they return
//! `None` and the generic element-tree reader takes the document, so both
//! give the same result on every input (a property test checks this).
//!
//! `xml` reads XML (into Parameters, or straight into a task list's
//! parts), `json` reads JSON, `write` writes both.

mod json;
mod write;
mod xml;

pub(crate) use xml::{RawPart, RawValue, scan_tasks_xml};
pub use {json::parameters_json, write::write_json, write::write_xml, xml::parameters_xml};

/// Deeper `part` nesting than this goes to the generic reader (which
/// reports it as an error at 64).
const MAX_DEPTH: usize = 60;

/// `valueString` -> `string` for the primitive value types.
fn primitive_type(suffix: &str) -> Option<&'static str> {
    Some(match suffix {
        "String" => "string",
        "Id" => "id",
        "Instant" => "instant",
        "Base64Binary" => "base64Binary",
        "Code" => "code",
        "Uri" => "uri",
        "Url" => "url",
        "Canonical" => "canonical",
        "DateTime" => "dateTime",
        "Date" => "date",
        "Time" => "time",
        "Boolean" => "boolean",
        "Integer" => "integer",
        "Decimal" => "decimal",
        "PositiveInt" => "positiveInt",
        "UnsignedInt" => "unsignedInt",
        "Markdown" => "markdown",
        "Oid" => "oid",
        "Uuid" => "uuid",
        _ => return None,
    })
}
