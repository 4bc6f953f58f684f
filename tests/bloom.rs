//! Bloom filter encoding: the published vector of the Mainzelliste fTTP
//! client, properties of balanced filters, and the `[bloomfilter]` config.

// (A test or benchmark stops at what it cannot set up: the panic is the report.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use fttp_agent::bloom::{Encoder, Params};
use proptest::prelude::*;

/// `RandomRecordBloomFilterGeneratorTest` of medicalinformatics/mainzelliste.client-fttp.
const VOCABULARY: &str = "abcdefghijkalmnoprstuvmxyzABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789";
const EXPECTED: &str = "aFRAty//BwRtDednRgb/Lwx9n6wFvdPhniK3dmEr03b4kcSZ+Jw68m++9h8FO43f+HHsEpk7Zc3YiF7Q9O8Upom5zJKjzUElYlFubVjAAgJMQWCMME6Yp+wkPXjm2bBHckHVs6ZzJASI/vAub/fVVps2dfmhYrA0MGXjd/iFDIZ4bF0xscaz7bzTo+uJTwQg008EVBWnbxr/57bHC309SCdbbWSxZhi3l+neQ7g3RoGxXQVGrRzEQdmsNlw3yUxINQ65LIAcbUA=";

fn published() -> Params {
    Params {
        length: 800,
        positions: 30,
        vocabulary: VOCABULARY.into(),
        balanced_seed: Some(154866848),
        fields: vec![
            ("firstName".into(), 487484864),
            ("lastName".into(), 311296856),
            ("birthDate".into(), 897689196),
            ("gender".into(), 298767897),
        ],
    }
}

#[test]
fn the_published_vector_is_reproduced_bit_for_bit() {
    let e = Encoder::new(&published()).unwrap();
    // The client's normalisation makes "Herr"/"Mustermann" upper case.
    let bytes = e.encode_bytes(&[Some("HERR"), Some("MUSTERMANN"), Some("19200101"), Some("m")]);
    assert_eq!(STANDARD.encode(bytes), EXPECTED);
}

fn ones(words: &[u64]) -> u32 {
    words.iter().map(|w| w.count_ones()).sum()
}

fn params(length: usize, balanced_seed: Option<i64>, seeds: [i64; 2]) -> Params {
    Params {
        length,
        positions: 30,
        vocabulary: VOCABULARY.into(),
        balanced_seed,
        fields: vec![("a".into(), seeds[0]), ("b".into(), seeds[1])],
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A balanced filter is a permutation of the filter and its complement:
    /// exactly `length` of its 2 x length bits are set, whatever the input.
    #[test]
    fn a_balanced_filter_has_exactly_length_bits_set(
        length in prop_oneof![Just(500usize), Just(800), Just(900), Just(1000), 1usize..2000],
        seeds in any::<[i64; 3]>(),
        a in proptest::option::of(".{0,30}"),
        b in proptest::option::of("[A-Za-z0-9 ]{0,30}"),
    ) {
        let e = Encoder::new(&params(length, Some(seeds[0]), [seeds[1], seeds[2]])).unwrap();
        let bits = e.encode_bits(&[a.as_deref(), b.as_deref()]);
        prop_assert_eq!(ones(&bits) as usize, length);
        // Nothing beyond 2 x length bits.
        prop_assert!(bits.len() * 64 - 2 * length < 64);
        for i in 2 * length..bits.len() * 64 {
            prop_assert_eq!(bits[i / 64] >> (i % 64) & 1, 0);
        }
        let bytes = e.encode_bytes(&[a.as_deref(), b.as_deref()]);
        prop_assert!(bytes.len() <= (2 * length).div_ceil(8));
        prop_assert_ne!(bytes.last(), Some(&0));
    }
}

#[test]
fn the_usual_lengths_give_filters_of_twice_their_bits() {
    for length in [500, 800, 900, 1000] {
        let e = Encoder::new(&params(length, Some(154866848), [487484864, 311296856])).unwrap();
        assert_eq!(e.bits(), 2 * length);
        let bits = e.encode_bits(&[Some("HERR"), Some("MUSTERMANN")]);
        assert_eq!(ones(&bits) as usize, length, "length {length}");
        let bytes = e.encode_bytes(&[Some("HERR"), Some("MUSTERMANN")]);
        // The last of 2 x length bits is set with probability 1/2: at most
        // 2 x length / 8 bytes, and a few fewer only if the top bytes are zero.
        assert!(
            bytes.len() <= 2 * length / 8 && bytes.len() > 2 * length / 8 - 4,
            "length {length}: {}",
            bytes.len()
        );
        // Unbalanced: length bits, of which the bigrams set some.
        let plain = Encoder::new(&params(length, None, [487484864, 311296856])).unwrap();
        assert_eq!(plain.bits(), length);
        let set = ones(&plain.encode_bits(&[Some("HERR"), Some("MUSTERMANN")])) as usize;
        assert!(set > 30 && set < length, "length {length}: {set} bits");
    }
}

#[test]
fn negative_and_large_seeds_work_and_every_seed_matters() {
    let values = [Some("HERR"), Some("MUSTERMANN")];
    let mut seen = std::collections::HashSet::new();
    for seed in [0, 1, -1, i64::MIN, i64::MAX, -154866848, 1 << 48, (1 << 48) + 1] {
        let e = Encoder::new(&params(800, Some(seed), [seed, seed.wrapping_add(7)])).unwrap();
        let bits = e.encode_bits(&values);
        assert_eq!(ones(&bits), 800, "seed {seed}");
        seen.insert(e.encode_bytes(&values));
    }
    // Java's Random keeps the low 48 bits of a seed: i64::MIN and 1 << 48
    // act as 0, i64::MAX as -1, (1 << 48) + 1 as 1 (and the field seeds
    // derived from them likewise), so 4 distinct filters, as in Java.
    assert_eq!(seen.len(), 4);
    // Changing one field's seed changes the filter; the balanced seed too.
    let base = Encoder::new(&params(800, Some(5), [1, 2]))
        .unwrap()
        .encode_bytes(&values);
    assert_ne!(
        Encoder::new(&params(800, Some(5), [1, 3]))
            .unwrap()
            .encode_bytes(&values),
        base
    );
    assert_ne!(
        Encoder::new(&params(800, Some(6), [1, 2]))
            .unwrap()
            .encode_bytes(&values),
        base
    );
}

#[test]
fn characters_outside_the_vocabulary_break_bigrams_and_add_nothing() {
    let e = Encoder::new(&params(800, None, [1, 2])).unwrap();
    let bits = |v: &str| e.encode_bits(&[Some(v), None]);
    let or = |a: Vec<u64>, b: Vec<u64>| a.iter().zip(&b).map(|(x, y)| x | y).collect::<Vec<_>>();
    // "§" and "😀" (two UTF-16 units) are not in the vocabulary: alone they add nothing.
    assert_eq!(ones(&bits("§")), 0);
    assert_eq!(ones(&bits("😀")), 0);
    // "A§B" has the bigrams " A" and "B ", not "AB": the same as "A§" with "§B".
    assert_eq!(bits("A§B"), or(bits("A§"), bits("§B")));
    assert_ne!(bits("A§B"), bits("AB"));
    assert_eq!(bits("A😀B"), bits("A§B"));
    // "q" is missing from this vocabulary (it has two a and two m instead).
    assert_eq!(bits("AqB"), bits("A§B"));
    // Lower and upper case are different characters.
    assert_ne!(bits("herr"), bits("HERR"));
}

#[test]
fn an_empty_value_differs_from_a_missing_field() {
    let e = Encoder::new(&params(800, None, [1, 2])).unwrap();
    // Missing: nothing. Empty: the bigram of the two padding spaces.
    assert_eq!(ones(&e.encode_bits(&[None, None])), 0);
    let empty = e.encode_bits(&[Some(""), None]);
    assert!(ones(&empty) > 0 && ones(&empty) <= 30);
    assert_ne!(empty, e.encode_bits(&[None, Some("")]));
    // Without a space in the vocabulary an empty value adds nothing either.
    let mut p = params(800, None, [1, 2]);
    p.vocabulary = "ABC".into();
    assert_eq!(ones(&Encoder::new(&p).unwrap().encode_bits(&[Some(""), None])), 0);
}

#[test]
fn a_repeated_vocabulary_character_does_not_shift_the_bigram_table() {
    // The vocabulary of the published test repeats "a" and "m": dropping the
    // repeats gives the same filter; moving a character gives another.
    let dedup = "abcdefghijklmnoprstuvxyzABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789";
    let mut p = published();
    let values = [Some("HERR"), Some("MUSTERMANN"), Some("19200101"), Some("m")];
    let original = Encoder::new(&p).unwrap().encode_bytes(&values);
    p.vocabulary = dedup.into();
    assert_eq!(Encoder::new(&p).unwrap().encode_bytes(&values), original);
    p.vocabulary = dedup.replacen('a', "", 1) + "a";
    assert_ne!(Encoder::new(&p).unwrap().encode_bytes(&values), original);
}

#[test]
fn bad_parameters_are_refused() {
    for (length, positions, vocabulary) in [(0, 30, "AB"), (800, 0, "AB"), (800, 30, ""), (1_000_000, 30, "AB")] {
        let mut p = params(length, Some(1), [1, 2]);
        p.positions = positions;
        p.vocabulary = vocabulary.into();
        assert!(Encoder::new(&p).is_err(), "{length} {positions} {vocabulary:?}");
    }
}
