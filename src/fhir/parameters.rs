//! The FHIR `Parameters` resource (<https://hl7.org/fhir/R4/parameters.html>).

use super::element::{Node, Primitive, Resource, Value};
use super::intern::{intern, intern_name};
use super::{FhirError, schema};
use std::borrow::Cow;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Parameters {
    pub id: Option<String>,
    pub parameter: Vec<Parameter>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Parameter {
    /// Static for the names the dispatcher uses (no allocation per part).
    pub name: Cow<'static, str>,
    pub value: Option<ParamValue>,
    /// Boxed: rare in dispatcher answers, large, and a Parameter is moved a lot.
    pub resource: Option<Box<Resource>>,
    pub part: Vec<Parameter>,
}

/// `Parameters.parameter.value[x]`. The types the dispatcher uses are typed;
/// anything else is kept as the element tree so it still round-trips.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    /// string, id, code, uri, instant, dateTime, base64Binary, boolean, ... by FHIR type name.
    Primitive {
        ty: Cow<'static, str>,
        value: String,
    },
    Identifier(Identifier),
    Coding(Coding),
    Other {
        ty: String,
        value: Box<Value>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
pub struct Identifier {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Coding {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
}

impl Identifier {
    pub fn new(system: Option<&str>, value: &str) -> Self {
        Identifier {
            system: system.map(str::to_string),
            value: Some(value.to_string()),
        }
    }
}

impl Parameter {
    pub fn new(name: &str) -> Self {
        Parameter {
            name: intern_name(name),
            ..Default::default()
        }
    }

    pub fn primitive(name: &str, ty: &str, value: &str) -> Self {
        Parameter {
            value: Some(ParamValue::Primitive {
                ty: intern(ty),
                value: value.to_string(),
            }),
            ..Parameter::new(name)
        }
    }

    pub fn string(name: &str, value: &str) -> Self {
        Parameter::primitive(name, "string", value)
    }

    pub fn identifier(name: &str, id: Identifier) -> Self {
        Parameter {
            value: Some(ParamValue::Identifier(id)),
            ..Parameter::new(name)
        }
    }

    pub fn coding(name: &str, coding: Coding) -> Self {
        Parameter {
            value: Some(ParamValue::Coding(coding)),
            ..Parameter::new(name)
        }
    }

    pub fn resource(name: &str, resource: Resource) -> Self {
        Parameter {
            resource: Some(Box::new(resource)),
            ..Parameter::new(name)
        }
    }

    pub fn with_parts(name: &str, part: Vec<Parameter>) -> Self {
        Parameter {
            part,
            ..Parameter::new(name)
        }
    }

    /// FHIR type name of the value, if any (`string`, `Identifier`, ...).
    pub(crate) fn value_type(&self) -> Option<&str> {
        match self.value.as_ref()? {
            ParamValue::Primitive { ty, .. } => Some(ty),
            ParamValue::Other { ty, .. } => Some(ty),
            ParamValue::Identifier(_) => Some("Identifier"),
            ParamValue::Coding(_) => Some("Coding"),
        }
    }

    pub fn parts<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Parameter> + 'a {
        self.part.iter().filter(move |p| p.name == name)
    }
}

impl Parameters {
    pub fn new(parameter: Vec<Parameter>) -> Self {
        Parameters { id: None, parameter }
    }

    pub fn get<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Parameter> + 'a {
        self.parameter.iter().filter(move |p| p.name == name)
    }

    pub fn first_string(&self, name: &str) -> Option<&str> {
        self.parameter
            .iter()
            .filter(|p| p.name == name)
            .find_map(|p| match &p.value {
                Some(ParamValue::Primitive { value, .. }) => Some(value.as_str()),
                _ => None,
            })
    }

    pub fn from_resource(r: &Resource) -> Result<Parameters, FhirError> {
        if r.resource_type != "Parameters" {
            return Err(FhirError::WrongResource {
                expected: "Parameters",
                got: r.resource_type.clone(),
            });
        }
        let mut out = Parameters {
            id: r.node.str("id").map(str::to_string),
            parameter: Vec::new(),
        };
        for n in r.node.nodes("parameter") {
            out.parameter.push(parameter_from_node(n, "Parameters.parameter", 0)?);
        }
        Ok(out)
    }

    pub fn to_resource(&self) -> Resource {
        let mut r = Resource::new("Parameters");
        if let Some(id) = &self.id {
            r.node.push_primitive("id", id);
        }
        for p in &self.parameter {
            r.node.push_complex("parameter", parameter_to_node(p));
        }
        r
    }
}

fn parameter_from_node(n: &Node, path: &str, depth: usize) -> Result<Parameter, FhirError> {
    if depth > super::limits::MAX_DEPTH {
        return Err(FhirError::TooDeep { path: path.to_string() });
    }
    let name = n
        .str("name")
        .ok_or_else(|| FhirError::structure(path, "parameter without name"))?
        .to_string();
    let name = intern_name(&name);
    let mut p = Parameter::new(&name);
    let here = format!("{path}[{name}]");
    for c in &n.children {
        if let Some(suffix) = c.name.strip_prefix("value") {
            if suffix.is_empty() {
                continue;
            }
            let ty = schema::child("ParametersParameter", &c.name)
                .map(|i| i.ty.into_owned())
                .ok_or_else(|| FhirError::structure(&here, "unknown value type"))?;
            if p.value.is_some() {
                return Err(FhirError::structure(&here, "more than one value[x]"));
            }
            p.value = Some(value_from(&ty, &c.value));
        }
    }
    if let Some(Value::Resource(r)) = n.first("resource") {
        p.resource = Some(Box::new(r.clone()));
    }
    for part in n.nodes("part") {
        p.part
            .push(parameter_from_node(part, &format!("{here}.part"), depth + 1)?);
    }
    Ok(p)
}

fn plain(p: &Primitive) -> Option<&str> {
    if p.id.is_none() && p.extension.is_empty() {
        p.value.as_deref()
    } else {
        None
    }
}

fn value_from(ty: &str, v: &Value) -> ParamValue {
    let other = || ParamValue::Other {
        ty: ty.to_string(),
        value: Box::new(v.clone()),
    };
    match v {
        Value::Primitive(prim) => match plain(prim) {
            Some(s) => ParamValue::Primitive {
                ty: intern(ty),
                value: s.to_string(),
            },
            None => other(),
        },
        Value::Complex(node) => {
            let allowed: &[&str] = match ty {
                "Identifier" => &["system", "value"],
                "Coding" => &["system", "code", "display"],
                _ => return other(),
            };
            let simple = node.children.iter().all(|c| {
                allowed.contains(&c.name.as_str())
                    && c.value.as_primitive().is_some_and(|p| plain(p).is_some())
                    && node.all(&c.name).count() == 1
            });
            if !simple {
                return other();
            }
            let get = |k: &str| node.str(k).map(str::to_string);
            if ty == "Identifier" {
                ParamValue::Identifier(Identifier {
                    system: get("system"),
                    value: get("value"),
                })
            } else {
                ParamValue::Coding(Coding {
                    system: get("system"),
                    code: get("code"),
                    display: get("display"),
                })
            }
        }
        Value::Resource(_) => other(),
    }
}

fn parameter_to_node(p: &Parameter) -> Node {
    let mut n = Node::new();
    n.push_primitive("name", p.name.as_ref());
    if let Some(v) = &p.value {
        let (ty, value) = match v {
            ParamValue::Primitive { ty, value } => (ty.as_ref(), Value::Primitive(Primitive::new(value.clone()))),
            ParamValue::Identifier(id) => {
                let mut node = Node::new();
                if let Some(s) = &id.system {
                    node.push_primitive("system", s);
                }
                if let Some(s) = &id.value {
                    node.push_primitive("value", s);
                }
                ("Identifier", Value::Complex(node))
            }
            ParamValue::Coding(c) => {
                let mut node = Node::new();
                for (k, val) in [("system", &c.system), ("code", &c.code), ("display", &c.display)] {
                    if let Some(s) = val {
                        node.push_primitive(k, s);
                    }
                }
                ("Coding", Value::Complex(node))
            }
            ParamValue::Other { ty, value } => (ty.as_str(), (**value).clone()),
        };
        n.push(schema::choice_name("value", ty), value);
    }
    if let Some(r) = &p.resource {
        n.push("resource", Value::Resource((**r).clone()));
    }
    for part in &p.part {
        n.push_complex("part", parameter_to_node(part));
    }
    n
}

impl ParamValue {
    /// The lexical value of a primitive.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            ParamValue::Primitive { value, .. } => Some(value),
            _ => None,
        }
    }
}
