//! Fast paths for the common shape of dispatcher `Parameters`: no
//! extensions, element ids, contained resources or namespace prefixes.
//! They read straight into the typed model; for anything else they return
//! `None` and the generic element-tree reader takes the document, so both
//! give the same result on every input (a property test checks this).

use super::parameters::{Coding, Identifier, ParamValue, Parameter, Parameters};
use quick_xml::Reader;
use quick_xml::events::{BytesStart, Event};
use serde::Deserialize;

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

// ------------------------------------------------------------------ XML

/// The only attribute allowed here; its unescaped value. Exactly one
/// `value` attribute or none: anything else (a duplicate included, which
/// is why quick-xml's own duplicate check can be skipped) is for the
/// generic reader.
fn value_attr(e: &BytesStart<'_>) -> Option<Option<String>> {
    let mut attrs = e.attributes();
    attrs.with_checks(false);
    let Some(first) = attrs.next() else {
        return Some(None);
    };
    let a = first.ok()?;
    if a.key.as_ref() != b"value" || attrs.next().is_some() {
        return None;
    }
    Some(Some(a.unescape_value().ok()?.into_owned()))
}

fn no_attrs(e: &BytesStart<'_>) -> bool {
    let mut attrs = e.attributes();
    attrs.with_checks(false);
    attrs.next().is_none()
}

pub fn parameters_xml(bytes: &[u8]) -> Option<Parameters> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut r = Reader::from_str(text);
    r.config_mut().trim_text(true);
    // Prolog, then <Parameters xmlns="http://hl7.org/fhir">.
    loop {
        match r.read_event().ok()? {
            Event::Decl(_) | Event::Comment(_) => continue,
            Event::Start(e) if e.name().as_ref() == b"Parameters" => {
                let mut ok = false;
                for a in e.attributes() {
                    let a = a.ok()?;
                    if a.key.as_ref() != b"xmlns" || a.value.as_ref() != super::xml::FHIR_NS.as_bytes() {
                        return None;
                    }
                    ok = true;
                }
                if !ok {
                    return None;
                }
                break;
            }
            _ => return None,
        }
    }
    let mut out = Parameters::default();
    loop {
        match r.read_event().ok()? {
            Event::Empty(e) if e.name().as_ref() == b"id" => out.id = Some(value_attr(&e)??),
            Event::Start(e) if e.name().as_ref() == b"parameter" && no_attrs(&e) => {
                out.parameter.push(xml_parameter(&mut r, b"parameter", 0)?)
            }
            Event::Comment(_) => continue,
            Event::End(_) => break,
            _ => return None,
        }
    }
    loop {
        match r.read_event().ok()? {
            Event::Eof => return Some(out),
            Event::Comment(_) => continue,
            _ => return None,
        }
    }
}

fn xml_parameter(r: &mut Reader<&[u8]>, _tag: &[u8], depth: usize) -> Option<Parameter> {
    if depth > MAX_DEPTH {
        return None;
    }
    let mut name: Option<String> = None;
    let mut p = Parameter {
        part: Vec::with_capacity(if depth == 0 { 6 } else { 0 }),
        ..Parameter::default()
    };
    loop {
        match r.read_event().ok()? {
            Event::Empty(e) => {
                let qname = e.name();
                let tag = qname.as_ref();
                if tag == b"name" {
                    if name.is_some() {
                        return None;
                    }
                    name = Some(value_attr(&e)??);
                } else if let Some(ty) = tag
                    .strip_prefix(b"value")
                    .and_then(|t| std::str::from_utf8(t).ok())
                    .and_then(primitive_type)
                {
                    if p.value.is_some() {
                        return None;
                    }
                    p.value = Some(ParamValue::Primitive {
                        ty: std::borrow::Cow::Borrowed(ty),
                        value: value_attr(&e)??,
                    });
                } else if tag == b"valueIdentifier" && no_attrs(&e) {
                    if p.value.is_some() {
                        return None;
                    }
                    p.value = Some(ParamValue::Identifier(Identifier::default()));
                } else if tag == b"valueCoding" && no_attrs(&e) {
                    if p.value.is_some() {
                        return None;
                    }
                    p.value = Some(ParamValue::Coding(Coding::default()));
                } else {
                    return None;
                }
            }
            Event::Start(e) => {
                if !no_attrs(&e) {
                    return None;
                }
                match e.name().as_ref() {
                    b"part" => p.part.push(xml_parameter(r, b"part", depth + 1)?),
                    b"valueIdentifier" if p.value.is_none() => {
                        let [system, value] = xml_fields(r, [b"system".as_slice(), b"value"])?;
                        p.value = Some(ParamValue::Identifier(Identifier { system, value }));
                    }
                    b"valueCoding" if p.value.is_none() => {
                        let [system, code, display] = xml_fields(r, [b"system".as_slice(), b"code", b"display"])?;
                        p.value = Some(ParamValue::Coding(Coding { system, code, display }));
                    }
                    _ => return None,
                }
            }
            Event::End(_) => break,
            Event::Comment(_) => continue,
            _ => return None,
        }
    }
    p.name = name?;
    Some(p)
}

/// Reads `<x value=".."/>` children named in `names`, each at most once.
fn xml_fields<const N: usize>(r: &mut Reader<&[u8]>, names: [&[u8]; N]) -> Option<[Option<String>; N]> {
    let mut out: [Option<String>; N] = std::array::from_fn(|_| None);
    loop {
        match r.read_event().ok()? {
            Event::Empty(e) => {
                let i = names.iter().position(|n| *n == e.name().as_ref())?;
                if out[i].is_some() {
                    return None;
                }
                out[i] = Some(value_attr(&e)??);
            }
            Event::End(_) => return Some(out),
            Event::Comment(_) => continue,
            _ => return None,
        }
    }
}

// ------------------------------------------------------------------ JSON

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
            name: self.name,
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

// ------------------------------------------------------------------ writing

fn simple(p: &Parameter) -> bool {
    p.resource.is_none() && !matches!(p.value, Some(ParamValue::Other { .. })) && p.part.iter().all(simple)
}

/// `Parameters` straight to FHIR XML, byte for byte what the element-tree
/// writer produces; `None` where a value needs the tree (resources, other types).
pub fn write_xml(p: &Parameters) -> Option<String> {
    if !p.parameter.iter().all(simple) {
        return None;
    }
    let mut out = String::with_capacity(256 + p.parameter.len() * 512);
    out.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Parameters xmlns=\"");
    out.push_str(super::xml::FHIR_NS);
    out.push('"');
    if p.id.is_none() && p.parameter.is_empty() {
        out.push_str("/>");
        return Some(out);
    }
    out.push('>');
    if let Some(id) = &p.id {
        empty(&mut out, "id", id);
    }
    for param in &p.parameter {
        xml_param(&mut out, "parameter", param);
    }
    out.push_str("</Parameters>");
    Some(out)
}

fn empty(out: &mut String, tag: &str, value: &str) {
    out.push('<');
    out.push_str(tag);
    out.push_str(" value=\"");
    super::xml::escape_attr(out, value);
    out.push_str("\"/>");
}

fn xml_param(out: &mut String, tag: &str, p: &Parameter) {
    out.push('<');
    out.push_str(tag);
    out.push('>');
    empty(out, "name", &p.name);
    match &p.value {
        Some(ParamValue::Primitive { ty, value }) => {
            empty(out, &super::schema::choice_name("value", ty), value);
        }
        Some(ParamValue::Identifier(i)) => {
            complex(out, "valueIdentifier", &[("system", &i.system), ("value", &i.value)])
        }
        Some(ParamValue::Coding(c)) => complex(
            out,
            "valueCoding",
            &[("system", &c.system), ("code", &c.code), ("display", &c.display)],
        ),
        _ => {}
    }
    for part in &p.part {
        xml_param(out, "part", part);
    }
    out.push_str("</");
    out.push_str(tag);
    out.push('>');
}

fn complex(out: &mut String, tag: &str, fields: &[(&str, &Option<String>)]) {
    if fields.iter().all(|(_, v)| v.is_none()) {
        out.push('<');
        out.push_str(tag);
        out.push_str("/>");
        return;
    }
    out.push('<');
    out.push_str(tag);
    out.push('>');
    for (name, v) in fields {
        if let Some(v) = v {
            empty(out, name, v);
        }
    }
    out.push_str("</");
    out.push_str(tag);
    out.push('>');
}

/// `Parameters` straight to FHIR JSON, the same as the element-tree writer.
pub fn write_json(p: &Parameters) -> Option<String> {
    use serde_json::{Map, Value as J};
    fn param(p: &Parameter) -> J {
        let mut m = Map::new();
        m.insert("name".into(), J::String(p.name.clone()));
        match &p.value {
            Some(ParamValue::Primitive { ty, value }) => {
                m.insert(
                    super::schema::choice_name("value", ty),
                    super::json::primitive_value(ty, value),
                );
            }
            Some(ParamValue::Identifier(i)) => {
                let mut o = Map::new();
                for (k, v) in [("system", &i.system), ("value", &i.value)] {
                    if let Some(v) = v {
                        o.insert(k.into(), J::String(v.clone()));
                    }
                }
                m.insert("valueIdentifier".into(), J::Object(o));
            }
            Some(ParamValue::Coding(c)) => {
                let mut o = Map::new();
                for (k, v) in [("system", &c.system), ("code", &c.code), ("display", &c.display)] {
                    if let Some(v) = v {
                        o.insert(k.into(), J::String(v.clone()));
                    }
                }
                m.insert("valueCoding".into(), J::Object(o));
            }
            _ => {}
        }
        if !p.part.is_empty() {
            m.insert("part".into(), J::Array(p.part.iter().map(param).collect()));
        }
        J::Object(m)
    }
    if !p.parameter.iter().all(simple) {
        return None;
    }
    let mut m = Map::new();
    m.insert("resourceType".into(), J::String("Parameters".into()));
    if let Some(id) = &p.id {
        m.insert("id".into(), J::String(id.clone()));
    }
    if !p.parameter.is_empty() {
        m.insert("parameter".into(), J::Array(p.parameter.iter().map(param).collect()));
    }
    Some(J::Object(m).to_string())
}
