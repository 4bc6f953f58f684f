//! Parameters written straight to XML and JSON, byte for byte what the
//! element-tree writers produce.

use crate::fhir::parameters::{ParamValue, Parameter, Parameters};

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
    out.push_str(crate::fhir::xml::FHIR_NS);
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
    crate::fhir::xml::escape_attr(out, value);
    out.push_str("\"/>");
}

fn xml_param(out: &mut String, tag: &str, p: &Parameter) {
    out.push('<');
    out.push_str(tag);
    out.push('>');
    empty(out, "name", &p.name);
    match &p.value {
        Some(ParamValue::Primitive { ty, value }) => {
            // `value[x]` as `choice_name` spells it, without a String per value.
            let mut chars = ty.chars();
            out.push_str("<value");
            if let Some(first) = chars.next() {
                out.push(first.to_ascii_uppercase());
                out.push_str(chars.as_str());
            }
            out.push_str(" value=\"");
            crate::fhir::xml::escape_attr(out, value);
            out.push_str("\"/>");
        }
        Some(ParamValue::Identifier(i)) => {
            complex(out, "valueIdentifier", &[("system", &i.system), ("value", &i.value)]);
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
        m.insert("name".into(), J::String(p.name.to_string()));
        match &p.value {
            Some(ParamValue::Primitive { ty, value }) => {
                m.insert(
                    crate::fhir::schema::choice_name("value", ty),
                    crate::fhir::json::primitive_value(ty, value),
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
