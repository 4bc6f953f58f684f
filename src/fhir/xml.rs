//! FHIR XML (<https://hl7.org/fhir/R4/xml.html>) <-> element tree.
//!
//! Rules implemented: everything in the `http://hl7.org/fhir` namespace;
//! primitives carry their value in a `value` attribute; element `id` and
//! `Extension.url` are attributes; contained resources are wrapped in an
//! element named after their type; children are written in definition order;
//! narrative `div` is XHTML kept verbatim. DOCTYPE declarations are refused so
//! no entity can ever be expanded.

use super::FhirError;
use super::element::{Child, Node, Primitive, Resource, Value};
use super::limits::MAX_DEPTH;
use super::schema;
use quick_xml::NsReader;
use quick_xml::events::{BytesStart, Event};
use quick_xml::name::{Namespace, ResolveResult};

pub(crate) const FHIR_NS: &str = "http://hl7.org/fhir";
const XHTML_NS: &str = "http://www.w3.org/1999/xhtml";

pub fn parse(bytes: &[u8]) -> Result<Resource, FhirError> {
    let text = std::str::from_utf8(bytes).map_err(|e| FhirError::Xml {
        position: e.valid_up_to() as u64,
        reason: "invalid UTF-8".into(),
    })?;
    let mut reader = NsReader::from_str(text);
    reader.config_mut().trim_text(true);
    let mut p = Parser { reader, text };
    loop {
        let (ns, event) = p.next()?;
        match event {
            Event::Decl(_) | Event::Comment(_) | Event::PI(_) => continue,
            Event::Start(start) => {
                let ns = owned_ns(ns);
                let rt = local(&start)?;
                if rt.eq_ignore_ascii_case("html") {
                    return Err(FhirError::NotFhir("an HTML page".into()));
                }
                p.check_ns(ns.as_ref(), &rt)?;
                let node = p.read_children(resource_ty(&rt), &rt, true, 1)?;
                p.expect_eof()?;
                return Ok(Resource {
                    resource_type: rt,
                    node,
                });
            }
            Event::Empty(start) => {
                let ns = owned_ns(ns);
                let rt = local(&start)?;
                p.check_ns(ns.as_ref(), &rt)?;
                p.expect_eof()?;
                return Ok(Resource::new(rt));
            }
            Event::Eof => return Err(p.err("empty document")),
            Event::DocType(_) => return Err(p.err("DOCTYPE declarations are not allowed")),
            _ => return Err(p.err("unexpected content before the root element")),
        }
    }
}

fn resource_ty(rt: &str) -> &str {
    if schema::is_resource_type(rt) {
        rt
    } else {
        schema::UNKNOWN
    }
}

fn owned_ns(ns: ResolveResult<'_>) -> Option<Vec<u8>> {
    match ns {
        ResolveResult::Bound(Namespace(n)) => Some(n.to_vec()),
        _ => None,
    }
}

fn local(start: &BytesStart<'_>) -> Result<String, FhirError> {
    let name = start.local_name();
    std::str::from_utf8(name.as_ref())
        .map(str::to_string)
        .map_err(|_| FhirError::Xml {
            position: 0,
            reason: "element name is not UTF-8".into(),
        })
}

struct Parser<'a> {
    reader: NsReader<&'a [u8]>,
    text: &'a str,
}

impl<'a> Parser<'a> {
    fn next(&mut self) -> Result<(ResolveResult<'_>, Event<'a>), FhirError> {
        let pos = self.reader.buffer_position();
        match self.reader.read_resolved_event() {
            Ok(pair) => Ok(pair),
            Err(e) => Err(FhirError::Xml {
                position: pos,
                reason: xml_reason(&e),
            }),
        }
    }

    fn err(&self, reason: &str) -> FhirError {
        FhirError::Xml {
            position: self.reader.buffer_position(),
            reason: reason.to_string(),
        }
    }

    fn check_ns(&self, ns: Option<&Vec<u8>>, name: &str) -> Result<(), FhirError> {
        match ns {
            Some(n) if n == FHIR_NS.as_bytes() => Ok(()),
            _ => Err(FhirError::Xml {
                position: self.reader.buffer_position(),
                reason: format!("element <{name}> is not in the FHIR namespace {FHIR_NS}"),
            }),
        }
    }

    fn expect_eof(&mut self) -> Result<(), FhirError> {
        loop {
            let (_, ev) = self.next()?;
            match ev {
                Event::Eof => return Ok(()),
                Event::Comment(_) | Event::PI(_) => continue,
                _ => return Err(self.err("content after the root element")),
            }
        }
    }

    /// Reads the children of an element of type `ty` up to its end tag.
    fn read_children(&mut self, ty: &str, path: &str, is_resource: bool, depth: usize) -> Result<Node, FhirError> {
        if depth > MAX_DEPTH {
            return Err(FhirError::TooDeep { path: path.to_string() });
        }
        let mut children: Vec<(usize, Child)> = Vec::new();
        let _ = is_resource;
        loop {
            let (ns, event) = self.next()?;
            let ns = owned_ns(ns);
            let (start, empty) = match event {
                Event::End(_) => break,
                Event::Start(s) => (s, false),
                Event::Empty(s) => (s, true),
                Event::Comment(_) | Event::PI(_) => continue,
                Event::Eof => return Err(self.err("truncated document")),
                Event::DocType(_) => return Err(self.err("DOCTYPE declarations are not allowed")),
                Event::Text(_) | Event::CData(_) | Event::GeneralRef(_) => {
                    return Err(FhirError::structure(path, "unexpected text content"));
                }
                Event::Decl(_) => return Err(self.err("misplaced XML declaration")),
            };
            let name = local(&start)?;
            let child_path = format!("{path}.{name}");
            let info = schema::child(ty, &name);
            let order = info.as_ref().map_or(usize::MAX, |i| i.order);
            let elem_ty = info
                .as_ref()
                .map(|i| i.ty.to_string())
                .unwrap_or_else(|| schema::UNKNOWN.to_string());

            if elem_ty == "xhtml" {
                let value = if empty {
                    String::new()
                } else {
                    let span = self.reader.read_to_end(start.name()).map_err(|e| FhirError::Xml {
                        position: self.reader.buffer_position(),
                        reason: xml_reason(&e),
                    })?;
                    let inner = self.text.get(span.start as usize..span.end as usize).unwrap_or("");
                    // Keep the div element itself, with its namespace, as FHIR JSON does.
                    format!("<div xmlns=\"{XHTML_NS}\">{inner}</div>")
                };
                children.push((order, child(name, Value::Primitive(Primitive::new(value)))));
                continue;
            }
            self.check_ns(ns.as_ref(), &name)?;
            let attrs = Attrs::read(&start, path)?;
            let value = if elem_ty == schema::RESOURCE || (elem_ty == schema::UNKNOWN && is_resource_wrapper(&name)) {
                if empty {
                    return Err(FhirError::structure(&child_path, "empty resource wrapper"));
                }
                Value::Resource(self.read_wrapped_resource(&child_path, depth + 1)?)
            } else if schema::is_primitive(&elem_ty) || (elem_ty == schema::UNKNOWN && attrs.value.is_some()) {
                let mut prim = Primitive {
                    value: attrs.value,
                    id: attrs.id,
                    extension: Vec::new(),
                };
                if !empty {
                    let inner = self.read_children("Element", &child_path, false, depth + 1)?;
                    for c in inner.children {
                        match (c.name.as_str(), c.value) {
                            ("extension", Value::Complex(n)) => prim.extension.push(n),
                            _ => {
                                return Err(FhirError::structure(
                                    &child_path,
                                    "a primitive may only contain extensions",
                                ));
                            }
                        }
                    }
                }
                if prim.value.is_none() && prim.id.is_none() && prim.extension.is_empty() {
                    return Err(FhirError::structure(&child_path, "primitive without value attribute"));
                }
                Value::Primitive(prim)
            } else {
                let mut node = if empty {
                    Node::default()
                } else {
                    self.read_children(&elem_ty, &child_path, false, depth + 1)?
                };
                // Attributes become ordinary children in front, as in JSON.
                if let Some(url) = attrs.url {
                    node.children
                        .insert(0, child("url".into(), Value::Primitive(Primitive::new(url))));
                }
                if let Some(id) = attrs.id {
                    node.children
                        .insert(0, child("id".into(), Value::Primitive(Primitive::new(id))));
                }
                let mut indexed: Vec<(usize, Child)> = node
                    .children
                    .into_iter()
                    .map(|c| (schema::child(&elem_ty, &c.name).map_or(usize::MAX, |i| i.order), c))
                    .collect();
                indexed.sort_by_key(|(o, _)| *o);
                Value::Complex(Node {
                    children: indexed.into_iter().map(|(_, c)| c).collect(),
                })
            };
            children.push((order, child(name, value)));
        }
        children.sort_by_key(|(o, _)| *o);
        Ok(Node {
            children: children.into_iter().map(|(_, c)| c).collect(),
        })
    }

    fn read_wrapped_resource(&mut self, path: &str, depth: usize) -> Result<Resource, FhirError> {
        let resource = loop {
            let (ns, event) = self.next()?;
            let ns = owned_ns(ns);
            match event {
                Event::Comment(_) => continue,
                Event::Start(s) => {
                    let rt = local(&s)?;
                    self.check_ns(ns.as_ref(), &rt)?;
                    let node = self.read_children(resource_ty(&rt), &format!("{path}.{rt}"), true, depth + 1)?;
                    break Resource {
                        resource_type: rt,
                        node,
                    };
                }
                Event::Empty(s) => {
                    let rt = local(&s)?;
                    self.check_ns(ns.as_ref(), &rt)?;
                    break Resource::new(rt);
                }
                _ => return Err(FhirError::structure(path, "expected a resource element")),
            }
        };
        loop {
            let (_, event) = self.next()?;
            match event {
                Event::End(_) => return Ok(resource),
                Event::Comment(_) => continue,
                _ => return Err(FhirError::structure(path, "more than one resource in a wrapper")),
            }
        }
    }
}

fn is_resource_wrapper(name: &str) -> bool {
    matches!(name, "resource" | "contained")
}

fn child(name: String, value: Value) -> Child {
    Child { name, value }
}

struct Attrs {
    value: Option<String>,
    id: Option<String>,
    url: Option<String>,
}

impl Attrs {
    fn read(start: &BytesStart<'_>, path: &str) -> Result<Attrs, FhirError> {
        let mut out = Attrs {
            value: None,
            id: None,
            url: None,
        };
        for attr in start.attributes() {
            let attr = attr.map_err(|_| FhirError::structure(path, "malformed attribute"))?;
            let key = attr.key.as_ref();
            if key == b"xmlns" || key.starts_with(b"xmlns:") {
                continue;
            }
            // Unescaped without attribute-value normalisation, as the fast
            // path reads it (both readers must agree on every input).
            let raw = std::str::from_utf8(&attr.value)
                .map_err(|_| FhirError::structure(path, "attribute value that is not UTF-8"))?;
            let value = quick_xml::escape::unescape(raw)
                .map_err(|_| FhirError::structure(path, "attribute value with an invalid escape"))?
                .into_owned();
            match attr.key.local_name().as_ref() {
                b"value" => out.value = Some(value),
                b"id" => out.id = Some(value),
                b"url" => out.url = Some(value),
                _ => return Err(FhirError::structure(path, "unexpected attribute")),
            }
        }
        Ok(out)
    }
}

fn xml_reason(e: &quick_xml::Error) -> String {
    // quick-xml's messages name tags and positions, not attribute or text
    // content, but they can quote a mismatched tag name: keep them short.
    let msg = e.to_string();
    msg.chars().take(160).collect()
}

// ---------------------------------------------------------------- writing

pub fn to_string(resource: &Resource) -> String {
    let mut out = String::with_capacity(1024);
    out.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>");
    write_resource(&mut out, resource, true);
    out
}

fn write_resource(out: &mut String, r: &Resource, root: bool) {
    out.push('<');
    out.push_str(&r.resource_type);
    if root {
        out.push_str(" xmlns=\"");
        out.push_str(FHIR_NS);
        out.push('"');
    }
    let ty = resource_ty(&r.resource_type);
    if r.node.children.is_empty() {
        out.push_str("/>");
        return;
    }
    out.push('>');
    write_children(out, ty, &r.node, true);
    out.push_str("</");
    out.push_str(&r.resource_type);
    out.push('>');
}

fn sorted<'n>(ty: &str, node: &'n Node) -> Vec<&'n Child> {
    let mut v: Vec<(usize, &Child)> = node
        .children
        .iter()
        .map(|c| (schema::child(ty, &c.name).map_or(usize::MAX, |i| i.order), c))
        .collect();
    v.sort_by_key(|(o, _)| *o);
    v.into_iter().map(|(_, c)| c).collect()
}

fn write_children(out: &mut String, ty: &str, node: &Node, is_resource: bool) {
    for c in sorted(ty, node) {
        // Element id and Extension.url are attributes of the parent, written there.
        if !is_resource && (c.name == "id" || (ty == "Extension" && c.name == "url")) {
            continue;
        }
        let elem_ty = schema::child(ty, &c.name).map_or(std::borrow::Cow::Borrowed(schema::UNKNOWN), |i| i.ty);
        match &c.value {
            Value::Primitive(p) if elem_ty == "xhtml" => {
                out.push_str(p.value.as_deref().unwrap_or(""));
            }
            Value::Primitive(p) => {
                out.push('<');
                out.push_str(&c.name);
                if let Some(id) = &p.id {
                    attr(out, "id", id);
                }
                if let Some(v) = &p.value {
                    attr(out, "value", v);
                }
                if p.extension.is_empty() {
                    out.push_str("/>");
                } else {
                    out.push('>');
                    for ext in &p.extension {
                        write_complex(out, "extension", "Extension", ext);
                    }
                    close(out, &c.name);
                }
            }
            Value::Complex(n) => write_complex(out, &c.name, &elem_ty, n),
            Value::Resource(r) => {
                out.push('<');
                out.push_str(&c.name);
                out.push('>');
                write_resource(out, r, false);
                close(out, &c.name);
            }
        }
    }
}

fn write_complex(out: &mut String, name: &str, ty: &str, node: &Node) {
    out.push('<');
    out.push_str(name);
    if let Some(id) = node.str("id") {
        attr(out, "id", id);
    }
    if ty == "Extension"
        && let Some(url) = node.str("url")
    {
        attr(out, "url", url);
    }
    let has_elements = node
        .children
        .iter()
        .any(|c| !(c.name == "id" || (ty == "Extension" && c.name == "url")));
    if !has_elements {
        out.push_str("/>");
        return;
    }
    out.push('>');
    write_children(out, ty, node, false);
    close(out, name);
}

fn close(out: &mut String, name: &str) {
    out.push_str("</");
    out.push_str(name);
    out.push('>');
}

fn attr(out: &mut String, key: &str, value: &str) {
    out.push(' ');
    out.push_str(key);
    out.push_str("=\"");
    escape_attr(out, value);
    out.push('"');
}

/// Escapes for a double-quoted attribute. Whitespace control characters are
/// written as character references because XML attribute-value normalisation
/// would otherwise turn them into spaces and break the round trip.
pub(crate) fn escape_attr(out: &mut String, value: &str) {
    // Runs without a special character (nearly all of a Bloom filter or a
    // pseudonym) are copied whole, found by a table lookup per byte; the
    // specials are ASCII, so a byte position next to one is always a
    // character boundary.
    const SPECIAL: [bool; 256] = {
        let mut t = [false; 256];
        let mut i = 0;
        while i < ATTR_ESCAPES.len() {
            t[ATTR_ESCAPES[i].0 as usize] = true;
            i += 1;
        }
        t
    };
    let bytes = value.as_bytes();
    let mut start = 0;
    while let Some(n) = bytes[start..].iter().position(|b| SPECIAL[usize::from(*b)]) {
        let i = start + n;
        out.push_str(&value[start..i]);
        if let Some((_, esc)) = ATTR_ESCAPES.iter().find(|(c, _)| *c == bytes[i]) {
            out.push_str(esc);
        }
        start = i + 1;
    }
    out.push_str(&value[start..]);
}

/// The characters escaped in a double-quoted attribute, and how.
const ATTR_ESCAPES: [(u8, &str); 7] = [
    (b'&', "&amp;"),
    (b'<', "&lt;"),
    (b'>', "&gt;"),
    (b'"', "&quot;"),
    (b'\n', "&#xA;"),
    (b'\r', "&#xD;"),
    (b'\t', "&#x9;"),
];
