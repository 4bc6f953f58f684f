//! Just enough of the FHIR R4 type system for the dispatcher operations.
//!
//! The codecs need three facts per element that neither wire format carries
//! on its own: its position (XML requires definition order), whether it
//! repeats (JSON arrays), and its type (JSON primitives are strings, numbers or
//! booleans by type; resources nest differently in XML). Elements of types not
//! listed here are still read, with their shape inferred, so an unexpected
//! field in a gateway answer is tolerated rather than fatal.

/// One element definition: name (`value[x]` for a choice), type, repeats.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Def {
    pub name: &'static str,
    pub ty: &'static str,
    pub array: bool,
}

const fn one(name: &'static str, ty: &'static str) -> Def {
    Def { name, ty, array: false }
}

const fn many(name: &'static str, ty: &'static str) -> Def {
    Def { name, ty, array: true }
}

/// Type name used for an element whose type is unknown: shape is inferred.
pub(crate) const UNKNOWN: &str = "?";
/// Type name for "any resource" (Parameters.parameter.resource, Bundle.entry.resource).
pub(crate) const RESOURCE: &str = "Resource";

const PRIMITIVES: &[&str] = &[
    "base64Binary",
    "boolean",
    "canonical",
    "code",
    "date",
    "dateTime",
    "decimal",
    "id",
    "instant",
    "integer",
    "integer64",
    "markdown",
    "oid",
    "positiveInt",
    "string",
    "time",
    "unsignedInt",
    "uri",
    "url",
    "uuid",
    "xhtml",
];

pub(crate) fn is_primitive(ty: &str) -> bool {
    PRIMITIVES.contains(&ty)
}

/// Resource types this agent reads or writes with full fidelity.
pub(crate) fn is_resource_type(ty: &str) -> bool {
    matches!(
        ty,
        "Parameters" | "Patient" | "OperationOutcome" | "Bundle" | "Task" | "CapabilityStatement"
    )
}

const PARAMETERS: &[Def] = &[
    one("id", "id"),
    one("meta", "Meta"),
    one("implicitRules", "uri"),
    one("language", "code"),
    many("parameter", "ParametersParameter"),
];

const PARAMETERS_PARAMETER: &[Def] = &[
    one("id", "string"),
    many("extension", "Extension"),
    many("modifierExtension", "Extension"),
    one("name", "string"),
    one("value[x]", "*"),
    one("resource", RESOURCE),
    many("part", "ParametersParameter"),
];

const PATIENT: &[Def] = &[
    one("id", "id"),
    one("meta", "Meta"),
    one("implicitRules", "uri"),
    one("language", "code"),
    one("text", "Narrative"),
    many("contained", RESOURCE),
    many("extension", "Extension"),
    many("modifierExtension", "Extension"),
    many("identifier", "Identifier"),
    one("active", "boolean"),
    many("name", "HumanName"),
    many("telecom", "ContactPoint"),
    one("gender", "code"),
    one("birthDate", "date"),
    one("deceased[x]", "*"),
    many("address", "Address"),
    one("maritalStatus", "CodeableConcept"),
    one("multipleBirth[x]", "*"),
    many("photo", "Attachment"),
    many("contact", UNKNOWN),
    many("communication", "PatientCommunication"),
    many("generalPractitioner", "Reference"),
    one("managingOrganization", "Reference"),
    many("link", UNKNOWN),
];

const PATIENT_COMMUNICATION: &[Def] = &[
    one("id", "string"),
    many("extension", "Extension"),
    many("modifierExtension", "Extension"),
    one("language", "CodeableConcept"),
    one("preferred", "boolean"),
];

const OPERATION_OUTCOME: &[Def] = &[
    one("id", "id"),
    one("meta", "Meta"),
    one("implicitRules", "uri"),
    one("language", "code"),
    one("text", "Narrative"),
    many("contained", RESOURCE),
    many("extension", "Extension"),
    many("modifierExtension", "Extension"),
    many("issue", "OperationOutcomeIssue"),
];

const OPERATION_OUTCOME_ISSUE: &[Def] = &[
    one("id", "string"),
    many("extension", "Extension"),
    many("modifierExtension", "Extension"),
    one("severity", "code"),
    one("code", "code"),
    one("details", "CodeableConcept"),
    one("diagnostics", "string"),
    many("location", "string"),
    many("expression", "string"),
];

const BUNDLE: &[Def] = &[
    one("id", "id"),
    one("meta", "Meta"),
    one("implicitRules", "uri"),
    one("language", "code"),
    one("identifier", "Identifier"),
    one("type", "code"),
    one("timestamp", "instant"),
    one("total", "unsignedInt"),
    many("link", "BundleLink"),
    many("entry", "BundleEntry"),
    one("signature", UNKNOWN),
];

const BUNDLE_LINK: &[Def] = &[
    one("id", "string"),
    many("extension", "Extension"),
    many("modifierExtension", "Extension"),
    one("relation", "string"),
    one("url", "uri"),
];

const BUNDLE_ENTRY: &[Def] = &[
    one("id", "string"),
    many("extension", "Extension"),
    many("modifierExtension", "Extension"),
    many("link", "BundleLink"),
    one("fullUrl", "uri"),
    one("resource", RESOURCE),
    one("search", "BundleEntrySearch"),
    one("request", "BundleEntryRequest"),
    one("response", "BundleEntryResponse"),
];

const BUNDLE_ENTRY_SEARCH: &[Def] = &[
    one("id", "string"),
    many("extension", "Extension"),
    many("modifierExtension", "Extension"),
    one("mode", "code"),
    one("score", "decimal"),
];

const BUNDLE_ENTRY_REQUEST: &[Def] = &[
    one("id", "string"),
    many("extension", "Extension"),
    many("modifierExtension", "Extension"),
    one("method", "code"),
    one("url", "uri"),
    one("ifNoneMatch", "string"),
    one("ifModifiedSince", "instant"),
    one("ifMatch", "string"),
    one("ifNoneExist", "string"),
];

const BUNDLE_ENTRY_RESPONSE: &[Def] = &[
    one("id", "string"),
    many("extension", "Extension"),
    many("modifierExtension", "Extension"),
    one("status", "string"),
    one("location", "uri"),
    one("etag", "string"),
    one("lastModified", "instant"),
    one("outcome", RESOURCE),
];

const NARRATIVE: &[Def] = &[
    one("id", "string"),
    many("extension", "Extension"),
    one("status", "code"),
    one("div", "xhtml"),
];

const META: &[Def] = &[
    one("id", "string"),
    many("extension", "Extension"),
    one("versionId", "id"),
    one("lastUpdated", "instant"),
    one("source", "uri"),
    many("profile", "canonical"),
    many("security", "Coding"),
    many("tag", "Coding"),
];

const EXTENSION: &[Def] = &[
    one("id", "string"),
    many("extension", "Extension"),
    one("url", "uri"),
    one("value[x]", "*"),
];

const IDENTIFIER: &[Def] = &[
    one("id", "string"),
    many("extension", "Extension"),
    one("use", "code"),
    one("type", "CodeableConcept"),
    one("system", "uri"),
    one("value", "string"),
    one("period", "Period"),
    one("assigner", "Reference"),
];

const CODING: &[Def] = &[
    one("id", "string"),
    many("extension", "Extension"),
    one("system", "uri"),
    one("version", "string"),
    one("code", "code"),
    one("display", "string"),
    one("userSelected", "boolean"),
];

const CODEABLE_CONCEPT: &[Def] = &[
    one("id", "string"),
    many("extension", "Extension"),
    many("coding", "Coding"),
    one("text", "string"),
];

const HUMAN_NAME: &[Def] = &[
    one("id", "string"),
    many("extension", "Extension"),
    one("use", "code"),
    one("text", "string"),
    one("family", "string"),
    many("given", "string"),
    many("prefix", "string"),
    many("suffix", "string"),
    one("period", "Period"),
];

const ADDRESS: &[Def] = &[
    one("id", "string"),
    many("extension", "Extension"),
    one("use", "code"),
    one("type", "code"),
    one("text", "string"),
    many("line", "string"),
    one("city", "string"),
    one("district", "string"),
    one("state", "string"),
    one("postalCode", "string"),
    one("country", "string"),
    one("period", "Period"),
];

const CONTACT_POINT: &[Def] = &[
    one("id", "string"),
    many("extension", "Extension"),
    one("system", "code"),
    one("value", "string"),
    one("use", "code"),
    one("rank", "positiveInt"),
    one("period", "Period"),
];

const PERIOD: &[Def] = &[
    one("id", "string"),
    many("extension", "Extension"),
    one("start", "dateTime"),
    one("end", "dateTime"),
];

const REFERENCE: &[Def] = &[
    one("id", "string"),
    many("extension", "Extension"),
    one("reference", "string"),
    one("type", "uri"),
    one("identifier", "Identifier"),
    one("display", "string"),
];

const ATTACHMENT: &[Def] = &[
    one("id", "string"),
    many("extension", "Extension"),
    one("contentType", "code"),
    one("language", "code"),
    one("data", "base64Binary"),
    one("url", "url"),
    one("size", "unsignedInt"),
    one("hash", "base64Binary"),
    one("title", "string"),
    one("creation", "dateTime"),
];

const TASK: &[Def] = &[
    one("id", "id"),
    one("meta", "Meta"),
    one("implicitRules", "uri"),
    one("language", "code"),
    one("text", "Narrative"),
    many("contained", RESOURCE),
    many("extension", "Extension"),
    many("modifierExtension", "Extension"),
    many("identifier", "Identifier"),
    one("instantiatesCanonical", "canonical"),
    one("instantiatesUri", "uri"),
    many("basedOn", "Reference"),
    one("groupIdentifier", "Identifier"),
    many("partOf", "Reference"),
    one("status", "code"),
    one("statusReason", "CodeableConcept"),
    one("businessStatus", "CodeableConcept"),
    one("intent", "code"),
    one("priority", "code"),
    one("code", "CodeableConcept"),
    one("description", "string"),
    one("focus", "Reference"),
    one("for", "Reference"),
    one("encounter", "Reference"),
    one("executionPeriod", "Period"),
    one("authoredOn", "dateTime"),
    one("lastModified", "dateTime"),
    one("requester", "Reference"),
    many("performerType", "CodeableConcept"),
    one("owner", "Reference"),
    one("location", "Reference"),
    one("reasonCode", "CodeableConcept"),
    one("reasonReference", "Reference"),
    many("insurance", "Reference"),
    many("note", UNKNOWN),
    many("relevantHistory", "Reference"),
    one("restriction", "TaskRestriction"),
    many("input", "TaskParameter"),
    many("output", "TaskParameter"),
];

const TASK_RESTRICTION: &[Def] = &[
    one("id", "string"),
    many("extension", "Extension"),
    many("modifierExtension", "Extension"),
    one("repetitions", "positiveInt"),
    one("period", "Period"),
    many("recipient", "Reference"),
];

const TASK_PARAMETER: &[Def] = &[
    one("id", "string"),
    many("extension", "Extension"),
    many("modifierExtension", "Extension"),
    one("type", "CodeableConcept"),
    one("value[x]", "*"),
];

/// What the local service tells clients it offers (`GET metadata`).
const CAPABILITY_STATEMENT: &[Def] = &[
    one("id", "id"),
    one("meta", "Meta"),
    one("implicitRules", "uri"),
    one("language", "code"),
    one("text", "Narrative"),
    many("contained", RESOURCE),
    many("extension", "Extension"),
    many("modifierExtension", "Extension"),
    one("url", "uri"),
    one("version", "string"),
    one("name", "string"),
    one("title", "string"),
    one("status", "code"),
    one("experimental", "boolean"),
    one("date", "dateTime"),
    one("publisher", "string"),
    many("contact", UNKNOWN),
    one("description", "markdown"),
    many("useContext", UNKNOWN),
    many("jurisdiction", "CodeableConcept"),
    one("purpose", "markdown"),
    one("copyright", "markdown"),
    one("kind", "code"),
    many("instantiates", "canonical"),
    many("imports", "canonical"),
    one("software", "CapabilityStatementSoftware"),
    one("implementation", "CapabilityStatementImplementation"),
    one("fhirVersion", "code"),
    many("format", "code"),
    many("patchFormat", "code"),
    many("implementationGuide", "canonical"),
    many("rest", "CapabilityStatementRest"),
    many("messaging", UNKNOWN),
    many("document", UNKNOWN),
];

const CAPABILITY_STATEMENT_SOFTWARE: &[Def] = &[
    one("id", "string"),
    many("extension", "Extension"),
    many("modifierExtension", "Extension"),
    one("name", "string"),
    one("version", "string"),
    one("releaseDate", "dateTime"),
];

const CAPABILITY_STATEMENT_IMPLEMENTATION: &[Def] = &[
    one("id", "string"),
    many("extension", "Extension"),
    many("modifierExtension", "Extension"),
    one("description", "string"),
    one("url", "url"),
    one("custodian", "Reference"),
];

const CAPABILITY_STATEMENT_REST: &[Def] = &[
    one("id", "string"),
    many("extension", "Extension"),
    many("modifierExtension", "Extension"),
    one("mode", "code"),
    one("documentation", "markdown"),
    one("security", UNKNOWN),
    many("resource", UNKNOWN),
    many("interaction", UNKNOWN),
    many("searchParam", UNKNOWN),
    many("operation", "CapabilityStatementRestOperation"),
    many("compartment", "canonical"),
];

const CAPABILITY_STATEMENT_REST_OPERATION: &[Def] = &[
    one("id", "string"),
    many("extension", "Extension"),
    many("modifierExtension", "Extension"),
    one("name", "string"),
    one("definition", "canonical"),
    one("documentation", "markdown"),
];

/// A bare element: what a primitive may contain besides its value.
const ELEMENT: &[Def] = &[one("id", "string"), many("extension", "Extension")];

pub(crate) fn defs(ty: &str) -> Option<&'static [Def]> {
    Some(match ty {
        "Element" => ELEMENT,
        "Task" => TASK,
        "TaskRestriction" => TASK_RESTRICTION,
        "TaskParameter" => TASK_PARAMETER,
        "Parameters" => PARAMETERS,
        "ParametersParameter" => PARAMETERS_PARAMETER,
        "Patient" => PATIENT,
        "PatientCommunication" => PATIENT_COMMUNICATION,
        "OperationOutcome" => OPERATION_OUTCOME,
        "OperationOutcomeIssue" => OPERATION_OUTCOME_ISSUE,
        "CapabilityStatement" => CAPABILITY_STATEMENT,
        "CapabilityStatementSoftware" => CAPABILITY_STATEMENT_SOFTWARE,
        "CapabilityStatementImplementation" => CAPABILITY_STATEMENT_IMPLEMENTATION,
        "CapabilityStatementRest" => CAPABILITY_STATEMENT_REST,
        "CapabilityStatementRestOperation" => CAPABILITY_STATEMENT_REST_OPERATION,
        "Bundle" => BUNDLE,
        "BundleLink" => BUNDLE_LINK,
        "BundleEntry" => BUNDLE_ENTRY,
        "BundleEntrySearch" => BUNDLE_ENTRY_SEARCH,
        "BundleEntryRequest" => BUNDLE_ENTRY_REQUEST,
        "BundleEntryResponse" => BUNDLE_ENTRY_RESPONSE,
        "Narrative" => NARRATIVE,
        "Meta" => META,
        "Extension" => EXTENSION,
        "Identifier" => IDENTIFIER,
        "Coding" => CODING,
        "CodeableConcept" => CODEABLE_CONCEPT,
        "HumanName" => HUMAN_NAME,
        "Address" => ADDRESS,
        "ContactPoint" => CONTACT_POINT,
        "Period" => PERIOD,
        "Reference" => REFERENCE,
        "Attachment" => ATTACHMENT,
        _ => return None,
    })
}

/// What the schema says about child `name` of an element of type `parent`.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildInfo {
    /// Position in definition order (XML element order).
    pub order: usize,
    pub ty: std::borrow::Cow<'static, str>,
    pub array: bool,
}

/// Looks up a child element, resolving choice types (`valueString` ->
/// `value[x]` of type `string`). `None` means the schema does not know it.
pub fn child(parent: &str, name: &str) -> Option<ChildInfo> {
    let defs = defs(parent)?;
    for (order, def) in defs.iter().enumerate() {
        if let Some(prefix) = def.name.strip_suffix("[x]") {
            if let Some(suffix) = name.strip_prefix(prefix)
                && let Some(ty) = choice_type(suffix)
            {
                return Some(ChildInfo {
                    order,
                    ty: super::intern::intern(&ty),
                    array: def.array,
                });
            }
        } else if def.name == name {
            return Some(ChildInfo {
                order,
                ty: std::borrow::Cow::Borrowed(def.ty),
                array: def.array,
            });
        }
    }
    None
}

/// `String` -> `string`, `Base64Binary` -> `base64Binary`, `Identifier` -> `Identifier`.
fn choice_type(suffix: &str) -> Option<String> {
    let mut chars = suffix.chars();
    let first = chars.next()?;
    if !first.is_ascii_uppercase() {
        return None;
    }
    let lowered: String = first.to_ascii_lowercase().to_string() + chars.as_str();
    if is_primitive(&lowered) {
        Some(lowered)
    } else {
        Some(suffix.to_string())
    }
}

/// The element name for a choice value of type `ty`: `value` + `String`.
pub(crate) fn choice_name(prefix: &str, ty: &str) -> String {
    let mut chars = ty.chars();
    match chars.next() {
        Some(first) => format!("{prefix}{}{}", first.to_ascii_uppercase(), chars.as_str()),
        None => prefix.to_string(),
    }
}

/// How a primitive of type `ty` is written in JSON.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum JsonKind {
    String,
    Number,
    Bool,
}

pub(crate) fn json_kind(ty: &str) -> JsonKind {
    match ty {
        "boolean" => JsonKind::Bool,
        "integer" | "integer64" | "positiveInt" | "unsignedInt" | "decimal" => JsonKind::Number,
        _ => JsonKind::String,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_types_resolve_to_fhir_type_names() {
        let info = child("ParametersParameter", "valueBase64Binary").unwrap();
        assert_eq!(info.ty, "base64Binary");
        let info = child("ParametersParameter", "valueIdentifier").unwrap();
        assert_eq!(info.ty, "Identifier");
        assert!(child("ParametersParameter", "valuex").is_none());
        assert_eq!(choice_name("value", "base64Binary"), "valueBase64Binary");
    }

    #[test]
    fn order_follows_definition() {
        let name = child("Coding", "system").unwrap().order;
        let code = child("Coding", "code").unwrap().order;
        assert!(name < code);
    }
}
