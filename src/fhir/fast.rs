//! Fast paths for the common shape of dispatcher `Parameters`: no
//! extensions, element ids, contained resources or namespace prefixes.
//! They read straight into the typed model; for anything else they return
//! `None` and the generic element-tree reader takes the document, so both
//! give the same result on every input (a property test checks this).

use super::parameters::{Coding, Identifier, ParamValue, Parameter, Parameters};
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

/// A tag as the scanner sees it: its name and its only attribute, if any.
enum Tag<'a> {
    Empty(&'a str, Option<(&'a str, &'a str)>),
    Start(&'a str, Option<(&'a str, &'a str)>),
    End(&'a str),
}

/// A minimal scanner for the XML that Parameters documents are made of:
/// elements with at most one attribute, comments and whitespace between
/// tags. Anything else makes it give up (`None`), and the generic reader,
/// which reports errors properly, takes the document.
struct Scanner<'a> {
    s: &'a str,
    b: &'a [u8],
    pos: usize,
}

impl<'a> Scanner<'a> {
    fn new(s: &'a str) -> Self {
        Scanner {
            s,
            b: s.as_bytes(),
            pos: 0,
        }
    }

    fn skip_ws(&mut self) {
        while self.pos < self.b.len() && matches!(self.b[self.pos], b' ' | b'\t' | b'\n' | b'\r') {
            self.pos += 1;
        }
    }

    fn starts(&self, lit: &[u8]) -> bool {
        self.b[self.pos..].starts_with(lit)
    }

    fn skip_past(&mut self, lit: &str) -> Option<()> {
        let i = self.s[self.pos..].find(lit)?;
        self.pos += i + lit.len();
        Some(())
    }

    fn name(&mut self) -> Option<&'a str> {
        let start = self.pos;
        while self.pos < self.b.len() && (self.b[self.pos].is_ascii_alphanumeric() || self.b[self.pos] == b'_') {
            self.pos += 1;
        }
        (self.pos > start).then(|| &self.s[start..self.pos])
    }

    fn expect(&mut self, c: u8) -> Option<()> {
        (self.b.get(self.pos) == Some(&c)).then(|| self.pos += 1)
    }

    /// `name="raw value"` (or single quotes).
    fn attribute(&mut self) -> Option<(&'a str, &'a str)> {
        let attr = self.name()?;
        self.skip_ws();
        self.expect(b'=')?;
        self.skip_ws();
        let quote = *self.b.get(self.pos)?;
        if quote != b'"' && quote != b'\'' {
            return None;
        }
        self.pos += 1;
        let start = self.pos;
        // Two memchr passes (std's `find` of one ASCII char) beat one
        // byte-by-byte scan for two characters on long values (Bloom filters).
        let len = self.s[start..].find(char::from(quote))?;
        let value = &self.s[start..start + len];
        if value.contains('<') {
            return None;
        }
        self.pos = start + len + 1;
        Some((attr, value))
    }

    /// The next tag, past whitespace and comments; `None` at anything else.
    fn tag(&mut self) -> Option<Tag<'a>> {
        loop {
            self.skip_ws();
            if self.starts(b"<!--") {
                self.skip_past("-->")?;
                continue;
            }
            break;
        }
        self.expect(b'<')?;
        if self.expect(b'/').is_some() {
            let name = self.name()?;
            self.skip_ws();
            self.expect(b'>')?;
            return Some(Tag::End(name));
        }
        let name = self.name()?;
        let mut attr = None;
        loop {
            let had_space = self.b.get(self.pos).is_some_and(|c| c.is_ascii_whitespace());
            self.skip_ws();
            match self.b.get(self.pos)? {
                b'/' => {
                    self.pos += 1;
                    self.expect(b'>')?;
                    return Some(Tag::Empty(name, attr));
                }
                b'>' => {
                    self.pos += 1;
                    return Some(Tag::Start(name, attr));
                }
                // One attribute per element, after whitespace.
                _ if attr.is_some() || !had_space => return None,
                _ => attr = Some(self.attribute()?),
            }
        }
    }

    /// After the root element: only whitespace and comments.
    fn at_end(&mut self) -> bool {
        loop {
            self.skip_ws();
            if self.starts(b"<!--") {
                if self.skip_past("-->").is_none() {
                    return false;
                }
                continue;
            }
            return self.pos == self.b.len();
        }
    }
}

/// The value of a `value` attribute, unescaped; `None` for another
/// attribute or an escape the generic reader would refuse.
fn unescape(raw: &str) -> Option<String> {
    if !raw.contains('&') {
        return Some(raw.to_string());
    }
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let tail = &rest[i + 1..];
        let end = tail.find(';')?;
        let entity = &tail[..end];
        match entity {
            "amp" => out.push('&'),
            "lt" => out.push('<'),
            "gt" => out.push('>'),
            "quot" => out.push('"'),
            "apos" => out.push('\''),
            _ => {
                // Only plain character references; anything unusual is
                // left to the generic reader.
                let code = if let Some(hex) = entity.strip_prefix("#x") {
                    if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return None;
                    }
                    u32::from_str_radix(hex, 16).ok()?
                } else {
                    let dec = entity.strip_prefix('#')?;
                    if dec.is_empty() || !dec.bytes().all(|b| b.is_ascii_digit()) {
                        return None;
                    }
                    dec.parse::<u32>().ok()?
                };
                let c = char::from_u32(code).filter(|c| *c != '\0')?;
                out.push(c);
            }
        }
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

fn value_of(attr: Option<(&str, &str)>) -> Option<Option<String>> {
    match attr {
        None => Some(None),
        Some(("value", raw)) => Some(Some(unescape(raw)?)),
        Some(_) => None,
    }
}

impl<'a> Scanner<'a> {
    /// A scanner past the declaration and the `<Parameters>` start tag.
    fn parameters(bytes: &'a [u8]) -> Option<Scanner<'a>> {
        let mut sc = Scanner::new(std::str::from_utf8(bytes).ok()?);
        // A declaration only at the very start, as XML requires.
        if sc.starts(b"<?xml") {
            sc.skip_past("?>")?;
        }
        match sc.tag()? {
            Tag::Start("Parameters", Some(("xmlns", ns))) if ns == super::xml::FHIR_NS => Some(sc),
            _ => None,
        }
    }
}

pub fn parameters_xml(bytes: &[u8]) -> Option<Parameters> {
    let mut sc = Scanner::parameters(bytes)?;
    let mut out = Parameters::default();
    loop {
        match sc.tag()? {
            Tag::Empty("id", attr) => out.id = Some(value_of(attr)??),
            Tag::Start("parameter", None) => out.parameter.push(xml_parameter(&mut sc, "parameter", 0)?),
            Tag::End("Parameters") => break,
            _ => return None,
        }
    }
    sc.at_end().then_some(out)
}

fn xml_parameter(sc: &mut Scanner<'_>, tag: &str, depth: usize) -> Option<Parameter> {
    if depth > MAX_DEPTH {
        return None;
    }
    let mut name: Option<std::borrow::Cow<'static, str>> = None;
    let mut p = Parameter {
        part: Vec::with_capacity(if depth == 0 { 6 } else { 0 }),
        ..Parameter::default()
    };
    loop {
        match sc.tag()? {
            Tag::Empty("name", attr) => {
                if name.is_some() {
                    return None;
                }
                name = Some(match attr {
                    // The usual case: a known name, no escapes, no allocation.
                    Some(("value", raw)) if !raw.contains('&') => super::parameters::intern_name(raw),
                    other => super::parameters::intern_name(&value_of(other)??),
                });
            }
            Tag::Empty("valueIdentifier", None) if p.value.is_none() => {
                p.value = Some(ParamValue::Identifier(Identifier::default()));
            }
            Tag::Empty("valueCoding", None) if p.value.is_none() => {
                p.value = Some(ParamValue::Coding(Coding::default()));
            }
            Tag::Empty(el, attr) => {
                let ty = el.strip_prefix("value").and_then(primitive_type)?;
                if p.value.is_some() {
                    return None;
                }
                p.value = Some(ParamValue::Primitive {
                    ty: std::borrow::Cow::Borrowed(ty),
                    value: value_of(attr)??,
                });
            }
            Tag::Start("part", None) => p.part.push(xml_parameter(sc, "part", depth + 1)?),
            Tag::Start("valueIdentifier", None) if p.value.is_none() => {
                let [system, value] = xml_fields(sc, "valueIdentifier", ["system", "value"])?;
                p.value = Some(ParamValue::Identifier(Identifier { system, value }));
            }
            Tag::Start("valueCoding", None) if p.value.is_none() => {
                let [system, code, display] = xml_fields(sc, "valueCoding", ["system", "code", "display"])?;
                p.value = Some(ParamValue::Coding(Coding { system, code, display }));
            }
            Tag::End(end) if end == tag => break,
            _ => return None,
        }
    }
    p.name = name?;
    Some(p)
}

/// Reads `<x value=".."/>` children named in `names`, each at most once, up
/// to `</tag>`, each value read by `value` (`None`: give up).
fn fields_with<'a, T, const N: usize>(
    sc: &mut Scanner<'a>,
    tag: &str,
    names: [&str; N],
    value: impl Fn(Option<(&'a str, &'a str)>) -> Option<Option<T>>,
) -> Option<[Option<T>; N]> {
    let mut out: [Option<T>; N] = std::array::from_fn(|_| None);
    loop {
        match sc.tag()? {
            Tag::Empty(el, attr) => {
                let i = names.iter().position(|n| *n == el)?;
                if out[i].is_some() {
                    return None;
                }
                out[i] = Some(value(attr)??);
            }
            Tag::End(end) if end == tag => return Some(out),
            _ => return None,
        }
    }
}

fn xml_fields<const N: usize>(sc: &mut Scanner<'_>, tag: &str, names: [&str; N]) -> Option<[Option<String>; N]> {
    fields_with(sc, tag, names, value_of)
}

// ------------------------------------------------- XML, straight to tasks

/// A part of a task as it stands in the document: borrowed, unescaped
/// (values with an escape make the scanner give up).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum RawValue<'a> {
    Primitive(&'static str, &'a str),
    Identifier {
        system: Option<&'a str>,
        value: Option<&'a str>,
    },
    Coding {
        system: Option<&'a str>,
        code: Option<&'a str>,
        display: Option<&'a str>,
    },
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct RawPart<'a> {
    pub name: &'a str,
    pub value: RawValue<'a>,
}

/// The plain value of a `value` attribute: `None` if it has an escape (the
/// caller then leaves the document to the Parameters reader).
fn plain<'a>(attr: Option<(&'a str, &'a str)>) -> Option<Option<&'a str>> {
    match attr {
        None => Some(None),
        Some(("value", raw)) if !raw.contains('&') => Some(Some(raw)),
        Some(_) => None,
    }
}

/// Scans a `$requestTasks` answer in the usual shape (top-level
/// parameters, each a name and parts with one value each) and hands each
/// task's name and parts to `each`, reusing one buffer: no allocation per
/// task. `None` when the document is anything else, or `each` says so.
pub(crate) fn scan_tasks_xml<'a>(
    bytes: &'a [u8],
    mut each: impl FnMut(&'a str, &[RawPart<'a>]) -> Option<()>,
) -> Option<()> {
    let mut sc = Scanner::parameters(bytes)?;
    let mut parts: Vec<RawPart<'a>> = Vec::with_capacity(8);
    loop {
        match sc.tag()? {
            Tag::Empty("id", attr) => {
                plain(attr)?;
            }
            Tag::Start("parameter", None) => {
                parts.clear();
                let name = match sc.tag()? {
                    Tag::Empty("name", attr) => plain(attr)??,
                    _ => return None,
                };
                loop {
                    match sc.tag()? {
                        Tag::Start("part", None) => parts.push(raw_part(&mut sc)?),
                        Tag::End("parameter") => break,
                        _ => return None,
                    }
                }
                each(name, &parts)?;
            }
            Tag::End("Parameters") => break,
            _ => return None,
        }
    }
    sc.at_end().then_some(())
}

/// One `<part>`: a name, then exactly one value, then `</part>`.
fn raw_part<'a>(sc: &mut Scanner<'a>) -> Option<RawPart<'a>> {
    let name = match sc.tag()? {
        Tag::Empty("name", attr) => plain(attr)??,
        _ => return None,
    };
    let value = match sc.tag()? {
        Tag::Empty(el, attr) if el.starts_with("value") && el != "valueIdentifier" && el != "valueCoding" => {
            RawValue::Primitive(el.strip_prefix("value").and_then(primitive_type)?, plain(attr)??)
        }
        Tag::Start("valueIdentifier", None) => {
            let [system, value] = raw_fields(sc, "valueIdentifier", ["system", "value"])?;
            RawValue::Identifier { system, value }
        }
        Tag::Start("valueCoding", None) => {
            let [system, code, display] = raw_fields(sc, "valueCoding", ["system", "code", "display"])?;
            RawValue::Coding { system, code, display }
        }
        _ => return None,
    };
    match sc.tag()? {
        Tag::End("part") => Some(RawPart { name, value }),
        _ => None,
    }
}

fn raw_fields<'a, const N: usize>(sc: &mut Scanner<'a>, tag: &str, names: [&str; N]) -> Option<[Option<&'a str>; N]> {
    fields_with(sc, tag, names, plain)
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
            name: super::parameters::intern_name(&self.name),
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
            // `value[x]` as `choice_name` spells it, without a String per value.
            let mut chars = ty.chars();
            out.push_str("<value");
            if let Some(first) = chars.next() {
                out.push(first.to_ascii_uppercase());
                out.push_str(chars.as_str());
            }
            out.push_str(" value=\"");
            super::xml::escape_attr(out, value);
            out.push_str("\"/>");
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
        m.insert("name".into(), J::String(p.name.to_string()));
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
