//! Names that recur in every document (FHIR type names, the dispatcher's
//! parameter names) as static strings, so parsing a batch of tasks does
//! not allocate each of them again. The bottom of the codecs: it imports
//! nothing, the readers and the schema import it.

use std::borrow::Cow;

/// The FHIR primitive type names as static strings (no allocation per value).
pub(crate) fn intern(ty: &str) -> Cow<'static, str> {
    const NAMES: &[&str] = &[
        "string",
        "id",
        "instant",
        "base64Binary",
        "code",
        "uri",
        "url",
        "canonical",
        "dateTime",
        "date",
        "time",
        "boolean",
        "integer",
        "decimal",
        "positiveInt",
        "unsignedInt",
        "markdown",
        "oid",
        "uuid",
        "integer64",
        "xhtml",
        "Identifier",
        "Coding",
        "CodeableConcept",
        "Reference",
        "Period",
        "Address",
        "HumanName",
        "Quantity",
        "Attachment",
        "ContactPoint",
    ];
    intern_in(NAMES, ty)
}

/// The parameter names of the dispatcher operations as static strings.
pub(crate) fn intern_name(name: &str) -> Cow<'static, str> {
    const NAMES: &[&str] = &[
        "dic_psn_available",
        "send_idat",
        "repeat_request",
        "expires",
        "bloomfilter",
        "target",
        "pseudonym",
        "taskId",
        "element",
        "study",
        "patient",
        "pseudonym-bf",
        "error",
        "error-code",
        "all",
        "apikey",
    ];
    intern_in(NAMES, name)
}

/// `s` as one of the static `known` strings if it is one (no allocation).
fn intern_in(known: &[&'static str], s: &str) -> Cow<'static, str> {
    match known.iter().find(|n| **n == s) {
        Some(n) => Cow::Borrowed(n),
        None => Cow::Owned(s.to_string()),
    }
}
