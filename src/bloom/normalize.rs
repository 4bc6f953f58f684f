//! Normalisation of IDAT into the study's Bloom filter fields, as the
//! Mainzelliste fTTP client's `FieldsNormalization` does it: per field a
//! chain of transformers, each doing (in this order) regex replacements,
//! dropping characters outside an allowed pattern, upper case, trim.

use super::settings::{BloomField, BloomTransformer};
use crate::bloom::EncodeError;
use crate::fhir::idat::{Idat, IdatElement};
use regex::{Regex, RegexBuilder};

/// Java's regex classes (`\s`, `\d`, `\w`) are ASCII unless asked
/// otherwise; the `regex` crate's are Unicode. ASCII mode is tried first so
/// that e.g. a no-break space is not kept by `[A-Z\s]` where Java drops it;
/// a pattern that needs Unicode mode (`.`, negated classes) gets it.
fn java_regex(pattern: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(pattern)
        .unicode(false)
        .build()
        .or_else(|_| RegexBuilder::new(pattern).build())
}

#[derive(Debug, Clone)]
struct Allowed {
    re: Regex,
    /// Answers for ASCII characters, looked up instead of matched.
    ascii: [bool; 128],
}

impl Allowed {
    fn new(pattern: &str) -> Result<Allowed, regex::Error> {
        // Java's Pattern.matches: the whole one-character string must match.
        let re = java_regex(&format!("^(?:{pattern})$"))?;
        let mut ascii = [false; 128];
        let mut buf = [0u8; 4];
        for (c, slot) in (0u8..128).zip(ascii.iter_mut()) {
            *slot = re.is_match(char::from(c).encode_utf8(&mut buf));
        }
        Ok(Allowed { re, ascii })
    }

    fn keeps(&self, c: char) -> bool {
        match self.ascii.get(c as usize) {
            Some(&yes) => yes,
            None => self.re.is_match(c.encode_utf8(&mut [0u8; 4])),
        }
    }
}

#[derive(Debug, Clone)]
struct Step {
    replacements: Vec<(Regex, String)>,
    allowed: Option<Allowed>,
    upper_case: bool,
    trim: bool,
}

impl Step {
    fn apply(&self, mut s: String) -> String {
        for (re, with) in &self.replacements {
            if let std::borrow::Cow::Owned(changed) = re.replace_all(&s, with.as_str()) {
                s = changed;
            }
        }
        if let Some(allowed) = &self.allowed {
            s.retain(|c| allowed.keeps(c));
        }
        if self.upper_case {
            s = s.to_uppercase();
        }
        if self.trim {
            // Java's String.trim(): code points up to U+0020, not Unicode whitespace.
            let t = s.trim_matches(|c: char| c <= ' ');
            if t.len() != s.len() {
                s = t.to_string();
            }
        }
        s
    }
}

/// A date pattern in Java's SimpleDateFormat letters, for the parts a
/// birth date has: `yyyy`/`yy`, `MM`/`M`, `dd`/`d`; anything else not a
/// letter, or quoted with '...', is copied.
#[derive(Debug, Clone, PartialEq)]
enum DatePart {
    Year4,
    Year2,
    Month { pad: bool },
    Day { pad: bool },
    Text(String),
}

fn parse_date_pattern(p: &str) -> Result<Vec<DatePart>, String> {
    let chars: Vec<char> = p.chars().collect();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\'' {
            let end = chars[i + 1..]
                .iter()
                .position(|&x| x == '\'')
                .ok_or("unclosed quote in date_format")?;
            let text: String = chars[i + 1..i + 1 + end].iter().collect();
            parts.push(DatePart::Text(if text.is_empty() { "'".into() } else { text }));
            i += end + 2;
            continue;
        }
        let run = chars[i..].iter().take_while(|&&x| x == c).count();
        let part = match (c, run) {
            ('y', 4) => DatePart::Year4,
            ('y', 2) => DatePart::Year2,
            ('M', 1 | 2) => DatePart::Month { pad: run == 2 },
            ('d', 1 | 2) => DatePart::Day { pad: run == 2 },
            (c, _) if c.is_ascii_alphabetic() => {
                return Err(format!(
                    "date_format: '{}' is not supported (use yyyy, yy, MM, M, dd, d and literal text)",
                    chars[i..i + run].iter().collect::<String>()
                ));
            }
            _ => DatePart::Text(chars[i..i + run].iter().collect()),
        };
        parts.push(part);
        i += run;
    }
    Ok(parts)
}

/// How one study field is made from IDAT.
#[derive(Debug, Clone)]
pub struct FieldRule {
    pub name: String,
    sources: Vec<IdatElement>,
    date: Option<Vec<DatePart>>,
    steps: Vec<Step>,
}

impl FieldRule {
    pub(crate) fn from_config(f: &BloomField) -> Result<FieldRule, String> {
        let sources = f.source.elements();
        if sources.is_empty() {
            return Err(format!("field {}: source names no IDAT element", f.name));
        }
        let date = match &f.date_format {
            Some(p) if sources.len() != 1 => {
                return Err(format!(
                    "field {}: date_format ({p}) needs exactly one source element",
                    f.name
                ));
            }
            Some(p) => Some(parse_date_pattern(p).map_err(|e| format!("field {}: {e}", f.name))?),
            None => None,
        };
        let steps = f
            .transformers
            .iter()
            .enumerate()
            .map(|(i, t)| step(t).map_err(|e| format!("field {} transformer {i}: {e}", f.name)))
            .collect::<Result<_, _>>()?;
        Ok(FieldRule {
            name: f.name.clone(),
            sources,
            date,
            steps,
        })
    }

    /// Applies the transformers to a value (what the field's filter is made of).
    pub(crate) fn normalize(&self, value: String) -> String {
        self.steps.iter().fold(value, |v, s| s.apply(v))
    }

    /// The field's normalised value for a patient; `None` when the patient
    /// has none of the source elements.
    pub fn value(&self, idat: &Idat) -> Result<Option<String>, EncodeError> {
        let mut raw: Option<String> = None;
        for e in &self.sources {
            if let Some(v) = idat.get(*e) {
                // Several given names or address lines are one value,
                // separated by spaces, as a Mainzelliste field holds them.
                let buf = raw.get_or_insert_with(String::new);
                for (i, item) in crate::fhir::idat::list_items(v).enumerate() {
                    if i > 0 {
                        buf.push(' ');
                    }
                    buf.push_str(item);
                }
            }
        }
        let Some(raw) = raw else { return Ok(None) };
        let raw = match &self.date {
            Some(parts) => self.format_date(&raw, parts)?,
            None => raw,
        };
        Ok(Some(self.normalize(raw)))
    }

    fn format_date(&self, raw: &str, parts: &[DatePart]) -> Result<String, EncodeError> {
        let element = self.sources.first().map_or("the value", |e| e.code());
        let bad = || EncodeError::NotADate {
            field: self.name.clone(),
            element,
        };
        let mut it = raw.trim().split('-');
        let year = it
            .next()
            .filter(|y| y.len() == 4 && y.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(bad)?;
        let mut number = |max: u32| -> Result<Option<u32>, EncodeError> {
            match it.next() {
                None => Ok(None),
                Some(s) if s.len() == 2 => s
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=max).contains(n))
                    .map(Some)
                    .ok_or_else(bad),
                Some(_) => Err(bad()),
            }
        };
        let (month, day) = (number(12)?, number(31)?);
        let missing = |part| EncodeError::PartialDate {
            field: self.name.clone(),
            part,
        };
        let mut out = String::new();
        for p in parts {
            match p {
                DatePart::Year4 => out.push_str(year),
                DatePart::Year2 => out.push_str(&year[2..]),
                DatePart::Month { pad } => {
                    let m = month.ok_or_else(|| missing("month"))?;
                    out.push_str(&if *pad { format!("{m:02}") } else { m.to_string() });
                }
                DatePart::Day { pad } => {
                    let d = day.ok_or_else(|| missing("day"))?;
                    out.push_str(&if *pad { format!("{d:02}") } else { d.to_string() });
                }
                DatePart::Text(t) => out.push_str(t),
            }
        }
        Ok(out)
    }
}

fn step(t: &BloomTransformer) -> Result<Step, String> {
    let replacements = t
        .replacement
        .0
        .iter()
        .map(|(pattern, with)| {
            java_regex(pattern)
                .map(|re| (re, with.clone()))
                .map_err(|e| format!("replacement pattern {pattern:?}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let allowed = t
        .allowed_chars
        .as_deref()
        .filter(|p| !p.trim().is_empty())
        .map(|p| Allowed::new(p.trim()).map_err(|e| format!("allowed_chars {p:?}: {e}")))
        .transpose()?;
    Ok(Step {
        replacements,
        allowed,
        upper_case: t.upper_case,
        trim: t.trim,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bloom::settings::{BloomSource, Replacements};

    fn transformer(
        replacement: &[(&str, &str)],
        allowed: Option<&str>,
        upper_case: bool,
        trim: bool,
    ) -> BloomTransformer {
        BloomTransformer {
            replacement: Replacements(
                replacement
                    .iter()
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .collect(),
            ),
            allowed_chars: allowed.map(str::to_string),
            upper_case,
            trim,
        }
    }

    fn rule(source: &[IdatElement], date: Option<&str>, transformers: Vec<BloomTransformer>) -> FieldRule {
        FieldRule::from_config(&BloomField {
            name: "f".into(),
            source: BloomSource::Many(source.to_vec()),
            date_format: date.map(str::to_string),
            transformers,
        })
        .unwrap()
    }

    #[test]
    fn several_given_names_are_one_value_separated_by_spaces() {
        let r = rule(&[IdatElement::Given], None, vec![]);
        let listed = Idat {
            given: Some("Anna|Maria".into()),
            ..Idat::default()
        };
        let spaced = Idat {
            given: Some("Anna Maria".into()),
            ..Idat::default()
        };
        assert_eq!(r.value(&listed).unwrap(), r.value(&spaced).unwrap());
    }

    const UMLAUTS: [(&str, &str); 8] = [
        (r"Dr\.|Dipl\.", ""),
        ("é", "e"),
        ("ä", "ae"),
        ("Ä", "AE"),
        ("ö", "oe"),
        ("Ö", "OE"),
        ("ü", "ue"),
        ("Ü", "UE"),
    ];

    #[test]
    fn each_option_does_one_thing_in_the_clients_order() {
        let n = |t: BloomTransformer, v: &str| rule(&[IdatElement::Given], None, vec![t]).normalize(v.into());
        // Replacements only (regex, titles removed, umlauts spelled out).
        assert_eq!(
            n(transformer(&UMLAUTS, None, false, false), "Dr. Jürgen Émile"),
            " Juergen Émile"
        );
        assert_eq!(n(transformer(&UMLAUTS, None, false, false), "Dipl.Müller"), "Mueller");
        // Upper case only: Java's toUpperCase turns ß into SS, as Rust does.
        assert_eq!(n(transformer(&[], None, true, false), "straße ö"), "STRASSE Ö");
        // Trim only: Java's trim removes control characters too, not a no-break space.
        assert_eq!(n(transformer(&[], None, false, true), "\t Anna \u{1}"), "Anna");
        assert_eq!(n(transformer(&[], None, false, true), "\u{a0}Anna"), "\u{a0}Anna");
        // Allowed characters only: per character, whole-match; ASCII \s as in Java.
        assert_eq!(
            n(transformer(&[], Some(r"[A-Z\s]"), false, false), "AN-NA b\u{a0}C"),
            "ANNA C"
        );
        // Within one transformer: replace, then restrict, then upper case,
        // then trim; so lower-case letters are dropped before upper-casing.
        assert_eq!(n(transformer(&UMLAUTS, Some(r"[A-Z\s]"), true, true), " Jörg "), "J");
        // Chained transformers, as the client's transformer.0 and .1.
        let chained = rule(
            &[IdatElement::Given],
            None,
            vec![
                transformer(&UMLAUTS, None, true, true),
                transformer(&[], Some(r"[A-Z\s]"), false, false),
            ],
        );
        assert_eq!(chained.normalize(" Dr. Jörg-Peter ".into()), "JOERGPETER");
        // No transformer: the value as it is.
        assert_eq!(
            rule(&[IdatElement::Given], None, vec![]).normalize(" x-Y ".into()),
            " x-Y "
        );
    }

    #[test]
    fn replacements_apply_in_the_order_written_and_expand_groups() {
        let t = transformer(&[("a", "b"), ("b", "c")], None, false, false);
        assert_eq!(rule(&[IdatElement::Given], None, vec![t]).normalize("ab".into()), "cc");
        let t = transformer(&[("b", "c"), ("a", "b")], None, false, false);
        assert_eq!(rule(&[IdatElement::Given], None, vec![t]).normalize("ab".into()), "bc");
        let t = transformer(&[(r"(\w+), (\w+)", "$2 $1")], None, false, false);
        assert_eq!(
            rule(&[IdatElement::Given], None, vec![t]).normalize("Doe, Jane".into()),
            "Jane Doe"
        );
    }

    #[test]
    fn dates_are_formatted_from_fhir_dates() {
        let f = |date: &str, p: &str| {
            let idat = Idat {
                birthdate: Some(date.into()),
                ..Idat::default()
            };
            rule(&[IdatElement::Birthdate], Some(p), vec![]).value(&idat)
        };
        let d = "1920-01-05";
        assert_eq!(f(d, "yyyyMMdd").unwrap().as_deref(), Some("19200105"));
        assert_eq!(f(d, "dd.MM.yyyy").unwrap().as_deref(), Some("05.01.1920"));
        assert_eq!(f(d, "d.M.yy").unwrap().as_deref(), Some("5.1.20"));
        assert_eq!(f(d, "yyyy'T'MM").unwrap().as_deref(), Some("1920T01"));
        assert!(matches!(
            f("1920-01", "yyyyMMdd"),
            Err(EncodeError::PartialDate { part: "day", .. })
        ));
        assert_eq!(f("1920-01", "yyyyMM").unwrap().as_deref(), Some("192001"));
        let err = f("01.01.1920", "yyyyMMdd").unwrap_err();
        assert!(!err.to_string().contains("1920"), "{err}");
        assert!(parse_date_pattern("yyyyMMMdd").is_err());
        assert!(parse_date_pattern("EEE").is_err());
    }

    #[test]
    fn sources_are_concatenated_and_a_missing_one_is_skipped() {
        let mut idat = Idat::default();
        let r = rule(&[IdatElement::Given, IdatElement::Family], None, vec![]);
        assert_eq!(r.value(&idat).unwrap(), None);
        idat.family = Some("Muster".into());
        assert_eq!(r.value(&idat).unwrap().as_deref(), Some("Muster"));
        idat.given = Some("Max".into());
        assert_eq!(r.value(&idat).unwrap().as_deref(), Some("MaxMuster"));
    }

    #[test]
    fn bad_patterns_are_refused_with_the_field_named() {
        let bad = BloomField {
            name: "lastName".into(),
            source: BloomSource::One(IdatElement::Family),
            date_format: None,
            transformers: vec![transformer(&[], Some("[A-Z"), false, false)],
        };
        let err = FieldRule::from_config(&bad).unwrap_err();
        assert!(err.contains("lastName") && err.contains("allowed_chars"), "{err}");
    }
}
