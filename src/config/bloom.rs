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

pub use crate::bloom::settings::{BloomField, BloomSource, BloomTransformer, Replacements};

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
