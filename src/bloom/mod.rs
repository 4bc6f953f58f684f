//! Record-level Bloom filters as the NUM fTTP expects them: random hashing
//! of bigrams, one seed per field, balanced (complement appended and the
//! bits permuted), serialised like Java's `BitSet.toByteArray()` in base64.
//!
//! The encoding must agree bit for bit with the Mainzelliste fTTP client
//! (`RandomRecordBloomFilterGenerator`), which most sites use today: the
//! fTTP links records by comparing filters, so a filter that differs in one
//! bit is a different person. Everything that decides a bit is therefore
//! done the Java way: `java.util.Random`, UTF-16 code units, the order in
//! which Java's `LinkedHashMap` first saw each bigram.

pub mod normalize;
pub mod seeds;
pub mod settings;

use crate::fhir::idat::Idat;
use crate::types::BloomFilter;
use normalize::FieldRule;
use std::fmt;

/// `java.util.Random`: a 48-bit linear congruential generator. Only what
/// the encoding draws from it is reproduced.
#[derive(Debug, Clone)]
pub(crate) struct JavaRandom {
    state: u64,
}

impl JavaRandom {
    const MULTIPLIER: u64 = 0x5_DEEC_E66D;
    const ADDEND: u64 = 0xB;
    const MASK: u64 = (1 << 48) - 1;

    pub fn new(seed: i64) -> JavaRandom {
        JavaRandom {
            state: (seed as u64 ^ Self::MULTIPLIER) & Self::MASK,
        }
    }

    /// Java's `next(bits)`: the top `bits` bits of the new state, as an int.
    fn next(&mut self, bits: u32) -> i32 {
        self.state = self.state.wrapping_mul(Self::MULTIPLIER).wrapping_add(Self::ADDEND) & Self::MASK;
        (self.state >> (48 - bits)) as i32
    }

    /// Java's `nextInt()`.
    #[cfg(test)]
    pub(crate) fn next_i32(&mut self) -> i32 {
        self.next(32)
    }

    /// Java's `nextInt(bound)` for `bound > 0`, including its rejection
    /// loop (whose test relies on int overflow).
    pub(crate) fn next_below(&mut self, bound: i32) -> i32 {
        debug_assert!(bound > 0);
        let mut r = self.next(31);
        let m = bound - 1;
        if bound & m == 0 {
            return ((i64::from(bound) * i64::from(r)) >> 31) as i32;
        }
        let mut u = r;
        loop {
            r = u % bound;
            if u.wrapping_sub(r).wrapping_add(m) >= 0 {
                return r;
            }
            u = self.next(31);
        }
    }
}

/// What the encoder needs, seeds included; built from `[bloomfilter]` and
/// the seeds file (see `config::BloomFilterConfig`).
#[derive(Clone)]
pub struct Params {
    /// Bits before balancing.
    pub length: usize,
    /// Bit positions per bigram.
    pub positions: u32,
    pub vocabulary: String,
    /// `Some(seed)`: balanced filter of 2 x length bits.
    pub balanced_seed: Option<i64>,
    /// (field name, seed), in the order the record's values are given.
    pub fields: Vec<(String, i64)>,
}

impl fmt::Debug for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The seeds are study secrets.
        f.debug_struct("Params")
            .field("length", &self.length)
            .field("positions", &self.positions)
            .field("fields", &self.fields.iter().map(|(n, _)| n).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Why a record has no Bloom filter. Names fields, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("none of the Bloom filter fields ({0}) has a value")]
    NoFields(String),
    #[error("no character of the record is in the vocabulary: the filter would be empty")]
    NoBits,
    #[error("field {field}: {element} is not a date as YYYY-MM-DD (needed for date_format)")]
    NotADate { field: String, element: &'static str },
    #[error("field {field}: the date has no {part} (needed for date_format)")]
    PartialDate { field: String, part: &'static str },
}

const NO_CHAR: u32 = u32::MAX;

/// Precomputed bigram tables: encoding a record is table lookups and ORs.
pub struct Encoder {
    length: usize,
    /// u64 words per table row (one row: a bigram's bits in one field).
    words: usize,
    /// UTF-16 code unit -> its index among the vocabulary's distinct characters.
    char_index: Vec<u32>,
    distinct: usize,
    names: Vec<String>,
    /// Per field: `distinct * distinct` rows of `words` words.
    tables: Vec<Vec<u64>>,
    balance: Option<Balance>,
}

/// Balancing, precomputed. The swaps are fixed, so they compose to one
/// permutation: output bit j is bit `source[j]` of the filter followed by
/// its complement. Written as a mask (the output of an all-zero filter)
/// and, per filter bit, the two output bits it flips, it costs two bit
/// flips per set bit instead of a gather per output bit.
#[derive(Debug)]
struct Balance {
    mask: Vec<u64>,
    flips: Vec<[u32; 2]>,
}

impl Balance {
    fn new(length: usize, seed: i64) -> Balance {
        let n = 2 * length;
        let mut rng = JavaRandom::new(seed);
        let mut source: Vec<u32> = (0..n as u32).collect();
        for i in 0..n {
            let j = rng.next_below(n as i32) as usize;
            source.swap(i, j);
        }
        let mut mask = vec![0u64; n.div_ceil(64)];
        let mut flips = vec![[0u32; 2]; length];
        for (j, &s) in source.iter().enumerate() {
            let s = s as usize;
            if s < length {
                flips[s][0] = j as u32;
            } else {
                // The complement half: set while the filter bit is clear.
                mask[j / 64] |= 1 << (j % 64);
                flips[s - length][1] = j as u32;
            }
        }
        Balance { mask, flips }
    }

    fn apply(&self, bits: &[u64]) -> Vec<u64> {
        let mut out = self.mask.clone();
        for (k, &word) in bits.iter().enumerate() {
            let mut w = word;
            while w != 0 {
                let i = k * 64 + w.trailing_zeros() as usize;
                w &= w - 1;
                if let Some(pair) = self.flips.get(i) {
                    for &j in pair {
                        out[j as usize / 64] ^= 1 << (j % 64);
                    }
                }
            }
        }
        out
    }
}

impl fmt::Debug for Encoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The tables are derived from the seeds: never shown.
        f.debug_struct("Encoder")
            .field("length", &self.length)
            .field("fields", &self.names)
            .field("balanced", &self.balance.is_some())
            .finish_non_exhaustive()
    }
}

impl Encoder {
    pub(crate) const MAX_LENGTH: usize = 100_000;

    pub fn new(p: &Params) -> Result<Encoder, String> {
        if p.length == 0 || p.length > Self::MAX_LENGTH {
            return Err(format!("length must be between 1 and {}", Self::MAX_LENGTH));
        }
        if p.positions == 0 {
            return Err("random_position_number must be at least 1".into());
        }
        if p.vocabulary.is_empty() {
            return Err("vocabulary must not be empty".into());
        }
        if p.fields.is_empty() {
            return Err("at least one field is needed".into());
        }
        // Java builds a LinkedHashMap keyed by bigram: a repeated character
        // re-puts keys already present, which keeps their first position.
        // So the bigrams come in the order (x, y) over distinct characters in
        // first-occurrence order.
        let mut char_index = vec![NO_CHAR; 1 << 16];
        let mut distinct = 0usize;
        for unit in p.vocabulary.encode_utf16() {
            let slot = &mut char_index[usize::from(unit)];
            if *slot == NO_CHAR {
                *slot = distinct as u32;
                distinct += 1;
            }
        }
        let words = p.length.div_ceil(64);
        let bound = p.length as i32;
        let mut tables = Vec::with_capacity(p.fields.len());
        for (_, seed) in &p.fields {
            let mut rng = JavaRandom::new(*seed);
            let mut table = vec![0u64; distinct * distinct * words];
            for row in table.chunks_exact_mut(words) {
                for _ in 0..p.positions {
                    let bit = rng.next_below(bound) as usize;
                    row[bit / 64] |= 1 << (bit % 64);
                }
            }
            tables.push(table);
        }
        let balance = p.balanced_seed.map(|seed| Balance::new(p.length, seed));
        Ok(Encoder {
            length: p.length,
            words,
            char_index,
            distinct,
            names: p.fields.iter().map(|(n, _)| n.clone()).collect(),
            tables,
            balance,
        })
    }

    pub(crate) fn field_names(&self) -> &[String] {
        &self.names
    }

    /// Bits of the filter (after balancing).
    pub fn bits(&self) -> usize {
        if self.balance.is_some() {
            2 * self.length
        } else {
            self.length
        }
    }

    fn row(&self, field: usize, a: u16, b: u16) -> Option<&[u64]> {
        let (ia, ib) = (self.char_index[usize::from(a)], self.char_index[usize::from(b)]);
        if ia == NO_CHAR || ib == NO_CHAR {
            return None;
        }
        let start = (ia as usize * self.distinct + ib as usize) * self.words;
        self.tables[field].get(start..start + self.words)
    }

    /// The filter's bits for `values[i]` of field i (`None`: the record has
    /// no such field, which adds nothing; `Some("")` adds the bigram of two
    /// spaces, as in Java). Bit j is bit j % 64 of word j / 64.
    pub fn encode_bits(&self, values: &[Option<&str>]) -> Vec<u64> {
        let mut bits = vec![0u64; self.words];
        for (field, value) in values.iter().enumerate().take(self.tables.len()) {
            let Some(value) = value else { continue };
            // Padded with a space on both sides, in UTF-16 code units.
            let mut last = u16::from(b' ');
            for unit in value.encode_utf16().chain(std::iter::once(u16::from(b' '))) {
                if let Some(row) = self.row(field, last, unit) {
                    for (w, r) in bits.iter_mut().zip(row) {
                        *w |= r;
                    }
                }
                last = unit;
            }
        }
        match &self.balance {
            None => bits,
            Some(b) => b.apply(&bits),
        }
    }

    /// `encode_bits` as Java's `BitSet.toByteArray()`: little-endian,
    /// trailing zero bytes dropped.
    pub fn encode_bytes(&self, values: &[Option<&str>]) -> Vec<u8> {
        let mut bytes: Vec<u8> = self.encode_bits(values).iter().flat_map(|w| w.to_le_bytes()).collect();
        while bytes.last() == Some(&0) {
            bytes.pop();
        }
        bytes
    }
}

/// The encoder with the site's normalisation: IDAT in, Bloom filter out.
#[derive(Debug)]
pub struct RecordEncoder {
    encoder: Encoder,
    rules: Vec<FieldRule>,
}

impl RecordEncoder {
    pub fn new(encoder: Encoder, rules: Vec<FieldRule>) -> RecordEncoder {
        RecordEncoder { encoder, rules }
    }

    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    /// The normalised field values of a record, in field order.
    pub fn fields(&self, idat: &Idat) -> Result<Vec<Option<String>>, EncodeError> {
        self.rules.iter().map(|r| r.value(idat)).collect()
    }

    pub fn encode(&self, idat: &Idat) -> Result<BloomFilter, EncodeError> {
        let values = self.fields(idat)?;
        if values.iter().all(Option::is_none) {
            // Java would send the filter of an empty record, which links
            // every empty record to every other: refused instead.
            return Err(EncodeError::NoFields(self.encoder.names.join(", ")));
        }
        let refs: Vec<Option<&str>> = values.iter().map(Option::as_deref).collect();
        // Only an unbalanced filter can be empty (or, absurdly, too large).
        BloomFilter::from_bytes(self.encoder.encode_bytes(&refs)).map_err(|_| EncodeError::NoBits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;

    #[test]
    fn java_random_matches_the_jdk() {
        // `new Random(0).nextInt()` and `new Random(42).nextInt()`, from the JDK.
        assert_eq!(JavaRandom::new(0).next_i32(), -1155484576);
        assert_eq!(JavaRandom::new(0).next_i32(), -1155484576);
        let mut r = JavaRandom::new(0);
        r.next_i32();
        assert_eq!(r.next_i32(), -723955400);
        assert_eq!(JavaRandom::new(42).next_i32(), -1170105035);
    }

    #[test]
    fn next_below_stays_in_bounds_for_every_kind_of_bound() {
        for seed in [0i64, -1, i64::MIN, i64::MAX, 154866848] {
            let mut r = JavaRandom::new(seed);
            for bound in [1, 2, 3, 64, 800, 1000, 1600, 1 << 30, i32::MAX] {
                let v = r.next_below(bound);
                assert!((0..bound).contains(&v), "{v} not below {bound}");
            }
        }
    }

    fn params(length: usize, vocabulary: &str, balanced: Option<i64>) -> Params {
        Params {
            length,
            positions: 30,
            vocabulary: vocabulary.into(),
            balanced_seed: balanced,
            fields: vec![("a".into(), 1), ("b".into(), -2)],
        }
    }

    #[test]
    fn bytes_are_javas_bitset_to_byte_array() {
        // One field, one bigram: its bits, low bit first, trailing zeros dropped.
        let e = Encoder::new(&params(64, "A ", None)).unwrap();
        let words = e.encode_bits(&[Some(""), None]);
        let bytes = e.encode_bytes(&[Some(""), None]);
        assert!(words[0] != 0);
        let expect: Vec<u8> = words[0].to_le_bytes().to_vec();
        let trimmed = expect.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        assert_eq!(bytes, expect[..trimmed]);
        // No value at all: no bits, no bytes (Java's empty array).
        assert!(e.encode_bytes(&[None, None]).is_empty());
        assert_eq!(STANDARD.encode(e.encode_bytes(&[None, None])), "");
    }
}
