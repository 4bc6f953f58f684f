//! Domain types: what a value is, not just its representation.

use crate::privacy::tagged_fingerprint;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A record-level Bloom filter as sent to the fTTP, held as raw bytes so
/// that two encodings of the same filter compare equal.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BloomFilter(Vec<u8>);

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BloomFilterError {
    #[error("Bloom filter is not valid base64")]
    NotBase64,
    #[error("Bloom filter is empty")]
    Empty,
    #[error("Bloom filter is larger than {} bytes", BloomFilter::MAX_BYTES)]
    TooLarge,
}

impl BloomFilter {
    /// Record-level filters are a few hundred bits; anything this large is
    /// not a Bloom filter and is refused before it is decoded.
    pub(crate) const MAX_BYTES: usize = 64 * 1024;

    pub fn from_base64(s: &str) -> Result<Self, BloomFilterError> {
        // (Twice the base64 length: room for whitespace between groups.)
        if s.len() > (BloomFilter::MAX_BYTES / 3 * 4 + 4) * 2 {
            return Err(BloomFilterError::TooLarge);
        }
        // FHIR allows whitespace inside base64Binary (between groups).
        let bytes = if s.bytes().any(|b| b.is_ascii_whitespace()) {
            let compact: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
            STANDARD.decode(compact)
        } else {
            STANDARD.decode(s)
        }
        .map_err(|_| BloomFilterError::NotBase64)?;
        Self::from_bytes(bytes)
    }

    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, BloomFilterError> {
        if bytes.is_empty() {
            return Err(BloomFilterError::Empty);
        }
        if bytes.len() > BloomFilter::MAX_BYTES {
            return Err(BloomFilterError::TooLarge);
        }
        Ok(BloomFilter(bytes))
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(&self.0)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// What logs and audit records show instead of the filter.
    pub fn fingerprint(&self) -> String {
        tagged_fingerprint("bf:", &self.0)
    }
}

// Debug must not print the filter: it identifies a person.
impl fmt::Debug for BloomFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.fingerprint())
    }
}

impl Serialize for BloomFilter {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for BloomFilter {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        BloomFilter::from_base64(&s).map_err(serde::de::Error::custom)
    }
}

/// A study pseudonym issued by the fTTP. The identifier system differs
/// between deployments, so it is stored as given and never used to filter.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Pseudonym {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    pub value: String,
}

impl Pseudonym {
    pub fn fingerprint(&self) -> String {
        tagged_fingerprint("psn:", self.value.as_bytes())
    }
}

impl fmt::Debug for Pseudonym {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.fingerprint())
    }
}

/// A dispatcher task id: a FHIR `id` (1-64 of `[A-Za-z0-9.-]`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TaskId(String);

impl TaskId {
    pub fn parse(s: &str) -> Option<TaskId> {
        let ok = !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        ok.then(|| TaskId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TaskId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        TaskId::parse(&s).ok_or_else(|| "invalid task id".to_string())
    }
}

impl From<TaskId> for String {
    fn from(t: TaskId) -> String {
        t.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The site's own key for a patient (the `local_id` column of an import).
/// Not IDAT by itself, but only meaningful inside the hospital.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LocalId(pub String);

impl LocalId {
    pub fn fingerprint(&self) -> String {
        tagged_fingerprint("pat:", self.0.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_with_whitespace_between_groups_is_a_bloom_filter() {
        let plain = BloomFilter::from_base64("SWNoIGJpbiBlaW4gQmxvb21maWx0ZXIu").unwrap();
        let spaced = BloomFilter::from_base64("SWNo IGJp\nbiBl aW4g\r\nQmxv b21m aWx0 ZXIu").unwrap();
        assert_eq!(plain, spaced);
    }

    #[test]
    fn bloom_filter_debug_hides_content() {
        let bf = BloomFilter::from_base64("SWNoIGJpbiBlaW4gQmxvb21maWx0ZXIu").unwrap();
        let shown = format!("{bf:?}");
        assert!(shown.starts_with("bf:"));
        assert!(!shown.contains("SWNo"));
        assert_eq!(BloomFilter::from_base64("***"), Err(BloomFilterError::NotBase64));
        assert_eq!(BloomFilter::from_base64(""), Err(BloomFilterError::Empty));
    }

    #[test]
    fn task_ids_follow_fhir_id_rules() {
        assert!(TaskId::parse("064ddebf-b20e-468a-97fd-88097bcdbc11").is_some());
        assert!(TaskId::parse("a b").is_none());
        assert!(TaskId::parse(&"a".repeat(65)).is_none());
    }
}
