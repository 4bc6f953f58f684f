//! The JSON fast path: serde straight into Parameters.

use super::MAX_DEPTH;
use crate::fhir::parameters::{Coding, Identifier, ParamValue, Parameter, Parameters};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JParameters {
    #[serde(rename = "resourceType")]
    resource_type: String,
    id: Option<String>,
    #[serde(default)]
    parameter: Vec<JParameter>,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct JParameter {
    name: String,
    value_string: Option<String>,
    value_id: Option<String>,
    value_instant: Option<String>,
    value_base64_binary: Option<String>,
    value_code: Option<String>,
    value_uri: Option<String>,
    value_url: Option<String>,
    value_canonical: Option<String>,
    value_date_time: Option<String>,
    value_date: Option<String>,
    value_boolean: Option<bool>,
    value_integer: Option<serde_json::Number>,
    value_decimal: Option<serde_json::Number>,
    value_identifier: Option<JIdentifier>,
    value_coding: Option<JCoding>,
    #[serde(default)]
    part: Vec<JParameter>,
}

impl JParameter {
    fn into_typed(self, depth: usize) -> Option<Parameter> {
        if depth > MAX_DEPTH {
            return None;
        }
        let mut values: Vec<ParamValue> = Vec::new();
        let prim = |ty: &'static str, v: String| ParamValue::Primitive {
            ty: std::borrow::Cow::Borrowed(ty),
            value: v,
        };
        for (ty, v) in [
            ("string", self.value_string),
            ("id", self.value_id),
            ("instant", self.value_instant),
            ("base64Binary", self.value_base64_binary),
            ("code", self.value_code),
            ("uri", self.value_uri),
            ("url", self.value_url),
            ("canonical", self.value_canonical),
            ("dateTime", self.value_date_time),
            ("date", self.value_date),
        ] {
            if let Some(v) = v {
                values.push(prim(ty, v));
            }
        }
        if let Some(b) = self.value_boolean {
            values.push(prim("boolean", b.to_string()));
        }
        if let Some(n) = self.value_integer {
            values.push(prim("integer", n.to_string()));
        }
        if let Some(n) = self.value_decimal {
            values.push(prim("decimal", n.to_string()));
        }
        if let Some(i) = self.value_identifier {
            values.push(ParamValue::Identifier(Identifier {
                system: i.system,
                value: i.value,
            }));
        }
        if let Some(c) = self.value_coding {
            values.push(ParamValue::Coding(Coding {
                system: c.system,
                code: c.code,
                display: c.display,
            }));
        }
        if values.len() > 1 {
            return None;
        }
        let mut part = Vec::with_capacity(self.part.len());
        for p in self.part {
            part.push(p.into_typed(depth + 1)?);
        }
        Some(Parameter {
            name: crate::fhir::parameters::intern_name(&self.name),
            value: values.pop(),
            resource: None,
            part,
        })
    }
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
    let mut parameter = Vec::with_capacity(j.parameter.len());
    for p in j.parameter {
        parameter.push(p.into_typed(0)?);
    }
    Some(Parameters { id: j.id, parameter })
}
