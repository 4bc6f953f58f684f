//! The JSON fast path: serde straight into Parameters, with no
//! intermediate struct per parameter (one with a field per value[x] type
//! took three times the memory of the Parameter it became, for every
//! parameter of a 100,000-task answer at once).

use super::MAX_DEPTH;
use crate::fhir::parameters::{Coding, Identifier, ParamValue, Parameter, Parameters};
use serde::Deserialize;
use serde::de::{Error, MapAccess, Visitor};
use std::borrow::Cow;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JParameters {
    #[serde(rename = "resourceType")]
    resource_type: String,
    id: Option<String>,
    #[serde(default)]
    parameter: Vec<Param>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JIdentifier {
    system: Option<String>,
    value: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JCoding {
    system: Option<String>,
    code: Option<String>,
    display: Option<String>,
}

/// A parameter read straight into the model. Any key but `name`, `part`
/// and the value[x] types below is an error, which sends the document to
/// the generic reader.
struct Param(Parameter);

impl<'de> Deserialize<'de> for Param {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(ParamVisitor)
    }
}

struct ParamVisitor;

/// The value[x] types read as text, by key suffix: the ones the fast path
/// has always read (any other type sends the document to the generic
/// reader, so both readers agree).
fn string_type(suffix: &str) -> Option<&'static str> {
    matches!(
        suffix,
        "String" | "Id" | "Instant" | "Base64Binary" | "Code" | "Uri" | "Url" | "Canonical" | "DateTime" | "Date"
    )
    .then(|| super::primitive_type(suffix))
    .flatten()
}

impl<'de> Visitor<'de> for ParamVisitor {
    type Value = Param;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a parameter")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Param, A::Error> {
        let mut name: Option<String> = None;
        let mut value: Option<ParamValue> = None;
        let mut part: Option<Vec<Param>> = None;
        let prim = |ty: &'static str, value: String| ParamValue::Primitive {
            ty: Cow::Borrowed(ty),
            value,
        };
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match key.as_ref() {
                "name" if name.is_none() => name = Some(map.next_value()?),
                "part" if part.is_none() => part = Some(map.next_value()?),
                k if value.is_none() && k.starts_with("value") => {
                    let suffix = &k["value".len()..];
                    value = Some(match suffix {
                        "Boolean" => prim("boolean", map.next_value::<bool>()?.to_string()),
                        "Integer" => prim("integer", map.next_value::<serde_json::Number>()?.to_string()),
                        "Decimal" => prim("decimal", map.next_value::<serde_json::Number>()?.to_string()),
                        "Identifier" => {
                            let i: JIdentifier = map.next_value()?;
                            ParamValue::Identifier(Identifier {
                                system: i.system,
                                value: i.value,
                            })
                        }
                        "Coding" => {
                            let c: JCoding = map.next_value()?;
                            ParamValue::Coding(Coding {
                                system: c.system,
                                code: c.code,
                                display: c.display,
                            })
                        }
                        s => match string_type(s) {
                            Some(ty) => prim(ty, map.next_value()?),
                            None => return Err(A::Error::custom("a value type the fast path does not read")),
                        },
                    });
                }
                _ => return Err(A::Error::custom("not the common shape")),
            }
        }
        let name = name.ok_or_else(|| A::Error::custom("a parameter without name"))?;
        Ok(Param(Parameter {
            name: crate::fhir::intern::intern_name(&name),
            value,
            resource: None,
            // (Same size as Parameter: collected in place, not copied.)
            part: part.unwrap_or_default().into_iter().map(|p| p.0).collect(),
        }))
    }
}

fn depth_ok(p: &Parameter, depth: usize) -> bool {
    depth <= MAX_DEPTH && p.part.iter().all(|q| depth_ok(q, depth + 1))
}

pub fn parameters_json(bytes: &[u8]) -> Option<Parameters> {
    // A JSON null is an error for the generic reader; an absent field here.
    if bytes.windows(4).any(|w| w == b"null") {
        return None;
    }
    let j: JParameters = serde_json::from_slice(bytes).ok()?;
    if j.resource_type != "Parameters" {
        return None;
    }
    let parameter: Vec<Parameter> = j.parameter.into_iter().map(|p| p.0).collect();
    parameter
        .iter()
        .all(|p| depth_ok(p, 0))
        .then_some(Parameters { id: j.id, parameter })
}
