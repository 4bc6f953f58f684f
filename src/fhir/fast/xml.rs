//! The XML fast path: a minimal scanner, Parameters read with it, and a
//! `$requestTasks` answer scanned straight into each task's parts.

use super::{MAX_DEPTH, primitive_type};
use crate::fhir::parameters::{Coding, Identifier, ParamValue, Parameter, Parameters};

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
    /// Parameters and parts read into the model so far: past the caps of
    /// `limits`, the document goes to the generic reader, which counts its
    /// structure and refuses it (memory stays bounded without a second
    /// pass over every usual document).
    nodes: usize,
}

impl<'a> Scanner<'a> {
    fn new(s: &'a str) -> Self {
        Scanner {
            s,
            b: s.as_bytes(),
            pos: 0,
            nodes: 0,
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
            let had_space = self.b.get(self.pos).is_some_and(u8::is_ascii_whitespace);
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
            Tag::Start("Parameters", Some(("xmlns", ns))) if ns == crate::fhir::xml::FHIR_NS => Some(sc),
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
            Tag::Start("parameter", None) if out.parameter.len() < crate::fhir::limits::MAX_PARAMETERS => {
                out.parameter.push(xml_parameter(&mut sc, "parameter", 0)?);
            }
            Tag::End("Parameters") => break,
            _ => return None,
        }
    }
    sc.at_end().then_some(out)
}

fn xml_parameter(sc: &mut Scanner<'_>, tag: &str, depth: usize) -> Option<Parameter> {
    sc.nodes += 1;
    if depth > MAX_DEPTH || sc.nodes > crate::fhir::limits::MAX_XML_ELEMENTS / 2 {
        return None;
    }
    let mut name: Option<std::borrow::Cow<'static, str>> = None;
    // (Parts are sized at the first one: a hostile answer of 250,000
    // parameters without parts, refused in the end, does not hold room
    // for 1.5 million parts meanwhile.)
    let mut p = Parameter::default();
    loop {
        match sc.tag()? {
            Tag::Empty("name", attr) => {
                if name.is_some() {
                    return None;
                }
                name = Some(match attr {
                    // The usual case: a known name, no escapes, no allocation.
                    Some(("value", raw)) if !raw.contains('&') => crate::fhir::intern::intern_name(raw),
                    other => crate::fhir::intern::intern_name(&value_of(other)??),
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
            Tag::Start("part", None) => {
                if depth == 0 && p.part.is_empty() {
                    p.part.reserve_exact(6);
                }
                p.part.push(xml_parameter(sc, "part", depth + 1)?);
            }
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
    // (Empty breaks FHIR's rule that a parameter has a value, a resource or
    // parts: left to the generic reader, which counts the document first,
    // so that 250,000 of them are refused before they are built.)
    if p.value.is_none() && p.part.is_empty() {
        return None;
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

// ------------------------------------------------- straight to tasks

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
