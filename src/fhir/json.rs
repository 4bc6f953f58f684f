//! FHIR JSON (<https://hl7.org/fhir/R4/json.html>) <-> element tree.

use super::FhirError;
use super::element::{Child, Node, Primitive, Resource, Value};
use super::schema::{self, JsonKind};
use serde_json::{Map, Value as J};

use super::limits::MAX_DEPTH;

pub fn parse(bytes: &[u8]) -> Result<Resource, FhirError> {
    let value: J = parse_strict(bytes).map_err(|e| FhirError::Json {
        line: e.line(),
        column: e.column(),
        reason: classify(&e),
    })?;
    resource_from_json(&value, "", 0)
}

/// JSON as serde_json reads it, but an object with the same key twice is
/// an error: RFC 8259 leaves it undefined, serde_json keeps the last, and
/// another reader may keep the first, so two readers of one document could
/// act on different values (a gateway answer, an audit record).
pub(crate) fn parse_strict(bytes: &[u8]) -> Result<J, serde_json::Error> {
    serde_json::from_slice::<Strict>(bytes).map(|s| s.0)
}

/// What `parse_strict` says of a key given twice.
const DUPLICATE_KEY: &str = "an object has the same key twice";

/// Whether `parse_strict` refused a document for a key given twice.
pub(crate) fn is_duplicate_key(e: &serde_json::Error) -> bool {
    e.to_string().starts_with(DUPLICATE_KEY)
}

struct Strict(J);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = J;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<J, E> {
        Ok(J::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<J, E> {
        Ok(J::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<J, E> {
        Ok(J::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<J, E> {
        Ok(serde_json::Number::from_f64(v).map_or(J::Null, J::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<J, E> {
        Ok(J::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<J, E> {
        Ok(J::String(v))
    }
    fn visit_unit<E>(self) -> Result<J, E> {
        Ok(J::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<J, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(J::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<J, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                // (The key is not quoted: it may be anything.)
                return Err(serde::de::Error::custom(DUPLICATE_KEY));
            }
            let Strict(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(J::Object(out))
    }
}

// serde_json's messages can quote input ("invalid type: string \"Anna\""),
// so only its category and position leave this module.
fn classify(e: &serde_json::Error) -> &'static str {
    use serde_json::error::Category;
    match e.classify() {
        Category::Io => "read error",
        Category::Syntax => "syntax error",
        Category::Data if is_duplicate_key(e) => DUPLICATE_KEY,
        Category::Data => "unexpected data",
        Category::Eof => "truncated document",
    }
}

pub fn to_string(resource: &Resource) -> String {
    resource_to_json(resource).to_string()
}

pub(crate) fn to_string_pretty(resource: &Resource) -> String {
    serde_json::to_string_pretty(&resource_to_json(resource)).unwrap_or_default()
}

fn resource_from_json(value: &J, path: &str, depth: usize) -> Result<Resource, FhirError> {
    let obj = value
        .as_object()
        .ok_or_else(|| FhirError::structure(path, "expected a resource (a JSON object)"))?;
    let rt = obj
        .get("resourceType")
        .and_then(J::as_str)
        .ok_or_else(|| FhirError::structure(path, "missing resourceType"))?;
    if rt.is_empty() || !rt.chars().all(|c| c.is_ascii_alphabetic()) {
        return Err(FhirError::structure(path, "invalid resourceType"));
    }
    let ty = if schema::is_resource_type(rt) {
        rt
    } else {
        schema::UNKNOWN
    };
    let node = node_from_json(ty, obj, &join(path, rt), depth + 1)?;
    Ok(Resource {
        resource_type: rt.to_string(),
        node,
    })
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

fn node_from_json(ty: &str, obj: &Map<String, J>, path: &str, depth: usize) -> Result<Node, FhirError> {
    if depth > MAX_DEPTH {
        return Err(FhirError::TooDeep { path: path.to_string() });
    }
    let mut children: Vec<(usize, Child)> = Vec::new();
    for (key, val) in obj {
        if key == "resourceType" {
            continue;
        }
        let companion_only = key.strip_prefix('_');
        if let Some(base) = companion_only
            && obj.contains_key(base)
        {
            continue; // read together with its base element
        }
        let name = companion_only.unwrap_or(key);
        let child_path = join(path, name);
        let info = schema::child(ty, name);
        let order = info.as_ref().map_or(usize::MAX, |i| i.order);
        let elem_ty = info.as_ref().map(|i| i.ty.as_ref()).unwrap_or(schema::UNKNOWN);

        let values: Vec<Value> = if companion_only.is_some() {
            // Only `_name` present: primitives that carry only id/extension.
            read_primitives(None, Some(val), &child_path, depth)?
        } else if schema::is_primitive(elem_ty) || (elem_ty == schema::UNKNOWN && looks_primitive(val)) {
            read_primitives(Some(val), obj.get(&format!("_{key}")), &child_path, depth)?
        } else if elem_ty == schema::RESOURCE {
            items(val)
                .iter()
                .map(|v| resource_from_json(v, &child_path, depth + 1).map(Value::Resource))
                .collect::<Result<_, _>>()?
        } else {
            let mut out = Vec::new();
            for item in items(val) {
                let o = item
                    .as_object()
                    .ok_or_else(|| FhirError::structure(&child_path, "expected an object"))?;
                if elem_ty == schema::UNKNOWN && o.contains_key("resourceType") {
                    out.push(Value::Resource(resource_from_json(item, &child_path, depth + 1)?));
                } else {
                    out.push(Value::Complex(node_from_json(elem_ty, o, &child_path, depth + 1)?));
                }
            }
            out
        };
        for value in values {
            children.push((
                order,
                Child {
                    name: name.to_string(),
                    value,
                },
            ));
        }
    }
    // Canonical (definition) order, so a tree read from JSON equals the same
    // tree read from XML whatever order the JSON object's keys came in.
    children.sort_by_key(|(order, _)| *order);
    Ok(Node {
        children: children.into_iter().map(|(_, c)| c).collect(),
    })
}

fn looks_primitive(v: &J) -> bool {
    match v {
        J::Array(a) => a.iter().all(|x| !x.is_object() && !x.is_array()),
        J::Object(_) => false,
        _ => true,
    }
}

fn items(v: &J) -> Vec<&J> {
    match v {
        J::Array(a) => a.iter().collect(),
        other => vec![other],
    }
}

fn read_primitives(
    value: Option<&J>,
    companion: Option<&J>,
    path: &str,
    depth: usize,
) -> Result<Vec<Value>, FhirError> {
    let values: Vec<Option<&J>> = match value {
        Some(J::Array(a)) => a.iter().map(Some).collect(),
        Some(v) => vec![Some(v)],
        None => Vec::new(),
    };
    let companions: Vec<Option<&J>> = match companion {
        Some(J::Array(a)) => a.iter().map(Some).collect(),
        Some(v) => vec![Some(v)],
        None => Vec::new(),
    };
    let n = values.len().max(companions.len());
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let lexical = match values.get(i).copied().flatten() {
            None | Some(J::Null) => None,
            Some(J::String(s)) => Some(s.clone()),
            Some(J::Bool(b)) => Some(b.to_string()),
            Some(J::Number(num)) => Some(num.to_string()),
            Some(_) => return Err(FhirError::structure(path, "expected a primitive value")),
        };
        let mut prim = Primitive {
            value: lexical,
            id: None,
            extension: Vec::new(),
        };
        if let Some(Some(J::Object(meta))) = companions.get(i) {
            prim.id = meta.get("id").and_then(J::as_str).map(str::to_string);
            if let Some(exts) = meta.get("extension") {
                for ext in items(exts) {
                    let o = ext
                        .as_object()
                        .ok_or_else(|| FhirError::structure(path, "extension must be an object"))?;
                    prim.extension.push(node_from_json("Extension", o, path, depth + 1)?);
                }
            }
        }
        if prim.value.is_none() && prim.id.is_none() && prim.extension.is_empty() {
            return Err(FhirError::structure(path, "primitive without value or extension"));
        }
        out.push(Value::Primitive(prim));
    }
    Ok(out)
}

pub(crate) fn resource_to_json(resource: &Resource) -> J {
    let mut map = Map::new();
    map.insert("resourceType".into(), J::String(resource.resource_type.clone()));
    let ty = if schema::is_resource_type(&resource.resource_type) {
        resource.resource_type.as_str()
    } else {
        schema::UNKNOWN
    };
    node_into_map(ty, &resource.node, &mut map);
    J::Object(map)
}

fn node_into_map(ty: &str, node: &Node, map: &mut Map<String, J>) {
    // Group by name, keeping first-appearance order.
    let mut names: Vec<&str> = Vec::new();
    for c in &node.children {
        if !names.contains(&c.name.as_str()) {
            names.push(&c.name);
        }
    }
    for name in names {
        let group: Vec<&Value> = node.all(name).collect();
        let info = schema::child(ty, name);
        let elem_ty = info.as_ref().map(|i| i.ty.as_ref()).unwrap_or(schema::UNKNOWN);
        let array = info.as_ref().map_or(group.len() > 1, |i| i.array);
        let is_prim = group.iter().all(|v| matches!(v, Value::Primitive(_)));
        if is_prim {
            let kind = schema::json_kind(elem_ty);
            let mut vals = Vec::new();
            let mut comps = Vec::new();
            let mut any_comp = false;
            let mut any_val = false;
            for v in &group {
                if let Value::Primitive(p) = v {
                    let jv = p.value.as_deref().map_or(J::Null, |s| primitive_json(kind, s));
                    any_val |= !jv.is_null();
                    vals.push(jv);
                    let comp = companion_json(p);
                    any_comp |= !comp.is_null();
                    comps.push(comp);
                }
            }
            if any_val {
                map.insert(name.to_string(), pack(vals, array));
            }
            if any_comp {
                map.insert(format!("_{name}"), pack(comps, array));
            }
        } else {
            let vals: Vec<J> = group
                .iter()
                .map(|v| match v {
                    Value::Complex(n) => {
                        let mut m = Map::new();
                        node_into_map(elem_ty, n, &mut m);
                        J::Object(m)
                    }
                    Value::Resource(r) => resource_to_json(r),
                    Value::Primitive(p) => p.value.clone().map_or(J::Null, J::String),
                })
                .collect();
            map.insert(name.to_string(), pack(vals, array));
        }
    }
}

fn pack(mut vals: Vec<J>, array: bool) -> J {
    if array || vals.len() != 1 {
        J::Array(vals)
    } else {
        vals.pop().unwrap_or(J::Null)
    }
}

/// A primitive of FHIR type `ty` as a JSON value (bool and number types as such).
pub(crate) fn primitive_value(ty: &str, s: &str) -> J {
    primitive_json(schema::json_kind(ty), s)
}

fn primitive_json(kind: JsonKind, s: &str) -> J {
    match kind {
        JsonKind::Bool => match s {
            "true" => J::Bool(true),
            "false" => J::Bool(false),
            _ => J::String(s.to_string()),
        },
        JsonKind::Number => s
            .parse::<serde_json::Number>()
            .map_or_else(|_| J::String(s.to_string()), J::Number),
        JsonKind::String => J::String(s.to_string()),
    }
}

fn companion_json(p: &Primitive) -> J {
    if p.id.is_none() && p.extension.is_empty() {
        return J::Null;
    }
    let mut m = Map::new();
    if let Some(id) = &p.id {
        m.insert("id".into(), J::String(id.clone()));
    }
    if !p.extension.is_empty() {
        let exts = p
            .extension
            .iter()
            .map(|e| {
                let mut em = Map::new();
                node_into_map("Extension", e, &mut em);
                J::Object(em)
            })
            .collect();
        m.insert("extension".into(), J::Array(exts));
    }
    J::Object(m)
}
