//! `[bloomfilter]`: the record-level Bloom filter's settings.

use super::*;

/// `[bloomfilter]`: the record-level Bloom filter of the NUM fTTP, with the
/// parameters of the Mainzelliste fTTP client (named in brackets), so a
/// site can move its settings over; README "Bloom filters" has an example.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BloomFilterConfig {
    /// Bits per filter before balancing (`length`; the balanced filter has
    /// twice as many). The NUM fTTP's studies use 500 to 1000.
    #[serde(default = "default_bf_length")]
    pub length: usize,
    /// Bit positions drawn per bigram and field (`randomPositionNumber`).
    #[serde(default = "default_bf_positions")]
    pub random_position_number: u32,
    /// The characters bigrams are made of (`vocabulary`); bigrams with any
    /// other character add nothing. A repeated character adds nothing either.
    #[serde(default = "default_bf_vocabulary")]
    pub vocabulary: String,
    /// Only bigrams (2) are defined (`nGramLength`).
    #[serde(default = "default_bf_ngram")]
    pub n_gram_length: u32,
    /// Balanced filter: complement appended, bits permuted with
    /// `balanced.seed` (what `generateBalancedBloomFilter` makes, and what
    /// the NUM fTTP expects).
    #[serde(default = "default_true")]
    pub balanced: bool,
    /// File with the seeds, which are study secrets (mode 0600, never logged
    /// or printed): the client's property lines `balanced.seed = N` and
    /// `field.<name>.seed = N` as they are.
    pub seeds_file: PathBuf,
    /// `bfVersion` sent with `$updateBf` (needed by `update-bf` only).
    #[serde(default)]
    pub version: Option<String>,
    /// The study's fields, each made from IDAT (`field.<name>`).
    #[serde(rename = "field", default)]
    pub fields: Vec<BloomField>,
}

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
fn default_bf_length() -> usize {
    900
}
fn default_bf_positions() -> u32 {
    30
}
fn default_bf_vocabulary() -> String {
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ .-0123456789".into()
}
fn default_bf_ngram() -> u32 {
    2
}
fn default_true() -> bool {
    true
}

impl BloomFilterConfig {
    /// The encoder with its normalisation: reads the seeds file.
    pub fn encoder(&self) -> Result<crate::bloom::RecordEncoder, String> {
        use crate::bloom::{Encoder, Params, RecordEncoder, normalize::FieldRule, seeds::Seeds};
        if self.n_gram_length != 2 {
            return Err("n_gram_length: only bigrams (2) are supported".into());
        }
        if self.fields.is_empty() {
            return Err("no [[bloomfilter.field]] defined".into());
        }
        let mut names = std::collections::HashSet::new();
        if let Some(dup) = self.fields.iter().find(|f| !names.insert(f.name.as_str())) {
            return Err(format!("field {} is defined twice", dup.name));
        }
        let rules = self
            .fields
            .iter()
            .map(FieldRule::from_config)
            .collect::<Result<Vec<_>, _>>()?;
        let seeds = Seeds::load(&self.seeds_file).map_err(|e| e.to_string())?;
        let fields = self
            .fields
            .iter()
            .map(|f| seeds.field(&f.name).map(|s| (f.name.clone(), s)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let balanced_seed = if self.balanced {
            Some(seeds.balanced().map_err(|e| e.to_string())?)
        } else {
            None
        };
        let encoder = Encoder::new(&Params {
            length: self.length,
            positions: self.random_position_number,
            vocabulary: self.vocabulary.clone(),
            balanced_seed,
            fields,
        })?;
        Ok(RecordEncoder::new(encoder, rules))
    }
}
