//! How much structure an answer may hold, counted before it is parsed.
//!
//! A reader's memory grows with the number of values and elements, not
//! with bytes: 60 MB of `{"name":"a"},` is 4.6 million parameters, and
//! 60 MB of `0,` 30 million JSON values, each far larger in memory than
//! in the text (a review measured 9.6 GB for such an answer). A linear
//! count of the document's structure, with no allocation, refuses those
//! before any tree is built. The caps are 2.5 times what a 100,000-task
//! answer holds (700,201 objects, 100,001 arrays and 1,100,300 commas in
//! JSON; 1,800,501 start tags in XML), so a real answer is never refused.

use super::{FhirError, Format};

/// Deeper than any legitimate dispatcher message; bounds recursion on hostile input.
pub(crate) const MAX_DEPTH: usize = 64;

/// JSON objects and arrays.
pub(crate) const MAX_JSON_CONTAINERS: usize = 2_000_000;
/// JSON values of any kind (containers plus scalars).
pub(crate) const MAX_JSON_VALUES: usize = 5_000_000;
/// XML elements (start and empty tags).
pub(crate) const MAX_XML_ELEMENTS: usize = 4_500_000;
/// Top-level parameters (tasks, in a `$requestTasks` answer): each costs
/// the agent far more than its bytes (a ledger entry, an audit record).
pub(crate) const MAX_PARAMETERS: usize = 250_000;

/// Refuses a document with more structure than any dispatcher answer has.
pub fn check(format: Format, body: &[u8]) -> Result<(), FhirError> {
    // (count, cap, what is counted)
    let counts: Vec<(usize, usize, &'static str)> = match format {
        Format::Json => {
            let (containers, values, top) = json_counts(body);
            vec![
                (top, MAX_PARAMETERS, "parameters"),
                (containers, MAX_JSON_CONTAINERS, "JSON objects and arrays"),
                (values, MAX_JSON_VALUES, "JSON values"),
            ]
        }
        Format::Xml => {
            let (elements, top) = xml_counts(body);
            vec![
                (top, MAX_PARAMETERS, "parameters"),
                (elements, MAX_XML_ELEMENTS, "XML elements"),
            ]
        }
    };
    match counts.into_iter().find(|(n, cap, _)| n > cap) {
        Some((_, limit, what)) => Err(FhirError::TooMuch { what, limit }),
        None => Ok(()),
    }
}

/// Objects and arrays; all values (containers, and a scalar before each
/// comma or closing bracket), outside strings; and the objects directly in
/// an array of the root object (`parameter` entries). Exact for valid
/// JSON, an estimate for broken JSON (which the parser refuses anyway).
fn json_counts(body: &[u8]) -> (usize, usize, usize) {
    let (mut containers, mut values, mut top) = (0usize, 0usize, 0usize);
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut scalar = false;
    for &b in body {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => {
                in_string = true;
                scalar = true;
            }
            b'{' | b'[' => {
                top += usize::from(b == b'{' && depth == 2);
                depth += 1;
                containers += 1;
                values += 1;
                scalar = false;
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                values += usize::from(scalar);
                scalar = false;
            }
            b',' | b':' => {
                // A key is counted like a scalar: an object entry costs
                // about as much as an array element.
                values += usize::from(scalar);
                scalar = false;
            }
            b' ' | b'\t' | b'\n' | b'\r' => {}
            _ => scalar = true,
        }
    }
    (containers, values + usize::from(scalar), top)
}

/// Start and empty tags (a `<` not followed by `/`, `!` or `?`), and the
/// elements directly inside the root (`parameter` entries). A `>` inside
/// an attribute value may throw the depth off in a broken document, which
/// the parser refuses anyway.
fn xml_counts(body: &[u8]) -> (usize, usize) {
    let (mut elements, mut top, mut depth) = (0usize, 0usize, 0usize);
    let mut i = 0;
    while let Some(at) = body[i..].iter().position(|&b| b == b'<') {
        let start = i + at;
        let end = body[start..]
            .iter()
            .position(|&b| b == b'>')
            .map_or(body.len(), |e| start + e);
        match body.get(start + 1) {
            Some(b'/') => depth = depth.saturating_sub(1),
            Some(b'!' | b'?') | None => {}
            Some(_) => {
                elements += 1;
                top += usize::from(depth == 1);
                if body.get(end.wrapping_sub(1)) != Some(&b'/') {
                    depth += 1;
                }
            }
        }
        i = end.min(body.len().saturating_sub(1)) + 1;
        if i >= body.len() {
            break;
        }
    }
    (elements, top)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_exact_for_valid_documents() {
        assert_eq!(json_counts(br#"{"a":[1,2,{"b":"x,{"}],"c":null}"#), (3, 10, 1));
        assert_eq!(json_counts(br#""\"{""#), (0, 1, 0));
        assert_eq!(
            xml_counts(b"<?xml version=\"1.0\"?><!-- x --><a><b/><c>t<d/></c></a>"),
            (4, 2)
        );
    }

    #[test]
    fn hostile_shapes_are_refused_before_parsing() {
        let tiny = [
            b"{\"resourceType\":\"Parameters\",\"parameter\":[".as_slice(),
            &b"{\"name\":\"a\"},".repeat(2_100_000),
            b"{}]}",
        ]
        .concat();
        assert!(check(Format::Json, &tiny).is_err());
        let zeros = [b"[".as_slice(), &b"0,".repeat(5_100_000), b"0]"].concat();
        assert!(check(Format::Json, &zeros).is_err());
        let tags = b"<a/>".repeat(4_600_000);
        assert!(check(Format::Xml, &tags).is_err());
        let params = [
            b"<P>".as_slice(),
            &b"<parameter><name value=\"a\"/></parameter>".repeat(250_001),
            b"</P>",
        ]
        .concat();
        assert!(matches!(
            check(Format::Xml, &params),
            Err(FhirError::TooMuch { what: "parameters", .. })
        ));
        assert!(check(Format::Xml, &params[..params.len() / 2]).is_ok());
        assert!(check(Format::Json, br#"{"resourceType":"Parameters"}"#).is_ok());
    }
}
