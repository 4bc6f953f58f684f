//! How a study makes each Bloom filter field from IDAT: its sources and
//! normalisation steps, as the `[[bloomfilter.field]]` tables of the
//! configuration give them. Declared here, next to the encoder that uses
//! them, so the domain does not depend on `config` (which re-exports them).

use serde::{Deserialize, Deserializer};
use std::fmt;

/// `[[bloomfilter.field]]`: one field of the record's filter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BloomField {
    /// The study's name of the field (`firstName`, ...): its seed is
    /// `field.<name>.seed` in the seeds file.
    pub name: String,
    /// The IDAT element it is made of (`given`, `family`, `birthdate`,
    /// `gender`, `birthplace`, ...), or a list whose values are concatenated
    /// (the client's `StringFieldConcatenation`). A patient without any of
    /// them has no such field: it adds no bits.
    pub source: BloomSource,
    /// For a date element: its format in Java SimpleDateFormat letters
    /// (`yyyyMMdd`; supported: yyyy, yy, MM, M, dd, d, literal text).
    /// Unset: the date as stored (YYYY-MM-DD).
    #[serde(default)]
    pub date_format: Option<String>,
    /// Normalisation steps in order (`transformer.0`, `transformer.1`, ...).
    /// None: the value is used as it is.
    #[serde(rename = "transformer", default)]
    pub transformers: Vec<BloomTransformer>,
}

#[derive(Debug, Clone)]
pub enum BloomSource {
    One(crate::fhir::idat::IdatElement),
    Many(Vec<crate::fhir::idat::IdatElement>),
}

impl<'de> Deserialize<'de> for BloomSource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use crate::fhir::idat::IdatElement;
        fn element<E: serde::de::Error>(code: &str) -> Result<IdatElement, E> {
            IdatElement::from_code(code).ok_or_else(|| {
                let known: Vec<&str> = IdatElement::ALL.iter().map(|e| e.code()).collect();
                E::custom(format!("unknown IDAT element '{code}' (known: {})", known.join(", ")))
            })
        }
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = BloomSource;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an IDAT element (e.g. \"given\") or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<BloomSource, E> {
                element(v).map(BloomSource::One)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<BloomSource, A::Error> {
                let mut out = Vec::new();
                while let Some(code) = seq.next_element::<String>()? {
                    out.push(element(&code)?);
                }
                Ok(BloomSource::Many(out))
            }
        }
        d.deserialize_any(V)
    }
}

impl BloomSource {
    pub fn elements(&self) -> Vec<crate::fhir::idat::IdatElement> {
        match self {
            BloomSource::One(e) => vec![*e],
            BloomSource::Many(v) => v.clone(),
        }
    }
}

/// `[[bloomfilter.field.transformer]]`: one `StringFieldTransformer`. Its
/// steps run in the client's order: replacement, allowed_chars, upper_case, trim.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BloomTransformer {
    /// Regex -> replacement, applied in the order written (`replacement`,
    /// the client's JSON map); `$1` in a replacement is the first group.
    #[serde(default)]
    pub replacement: Replacements,
    /// A regex each single character must match to be kept (`allowedChars`,
    /// e.g. `[A-Z\s]`); `\s`, `\d`, `\w` are ASCII, as in Java.
    #[serde(default, rename = "allowed_chars")]
    pub allowed_chars: Option<String>,
    /// Upper case (`upperCase`).
    #[serde(default)]
    pub upper_case: bool,
    /// Strip leading and trailing spaces and control characters (`trim`).
    #[serde(default)]
    pub trim: bool,
}

/// An ordered map read from a TOML table (document order matters:
/// replacements apply one after the other).
#[derive(Debug, Clone, Default)]
pub struct Replacements(pub Vec<(String, String)>);

impl<'de> Deserialize<'de> for Replacements {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Replacements;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table of regex = replacement")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Replacements, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, String>()? {
                    out.push((k, v));
                }
                Ok(Replacements(out))
            }
        }
        d.deserialize_map(V)
    }
}

// The client's defaults.
