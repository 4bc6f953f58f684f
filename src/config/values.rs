//! The value types of the configuration: each validates itself while the
//! file is read, so a bad value is reported with its key and line.

use super::*;

/// A duration written for humans: `500ms`, `30s`, `30m`, `6h`, `2d`, `1h30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

pub use crate::duration::{MAX_DURATION, format_duration, parse_duration};

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map(HumanDuration).map_err(serde::de::Error::custom)
    }
}

/// An http(s) URL without trailing slash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl(pub String);

impl<'de> Deserialize<'de> for BaseUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let t = s.trim().trim_end_matches('/');
        let rest = t
            .strip_prefix("https://")
            .or_else(|| t.strip_prefix("http://"))
            .ok_or_else(|| serde::de::Error::custom("url must start with https:// or http://"))?;
        if rest.is_empty() || rest.starts_with('/') {
            return Err(serde::de::Error::custom("url has no host"));
        }
        if t.contains(char::is_whitespace) {
            return Err(serde::de::Error::custom("url contains whitespace"));
        }
        // A base URL needs none of these, and each lets the host a check
        // reads differ from the host a client connects to
        // (`http://evil#@localhost`, `http://user@host`, `http:\\host`).
        if let Some(c) = t
            .chars()
            .find(|c| matches!(c, '#' | '?' | '@' | '\\') || c.is_control())
        {
            return Err(serde::de::Error::custom(format!(
                "url must not contain '{}' (no credentials, query or fragment in a base URL)",
                c.escape_default()
            )));
        }
        Ok(BaseUrl(t.to_string()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NonEmpty(pub String);

impl<'de> Deserialize<'de> for NonEmpty {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim().is_empty() {
            return Err(serde::de::Error::custom("must not be empty"));
        }
        Ok(NonEmpty(s.trim().to_string()))
    }
}

impl NonEmpty {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderName(pub String);

impl<'de> Deserialize<'de> for HeaderName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let ok = !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_!#$%&'*+.^`|~".contains(&b));
        if !ok {
            return Err(serde::de::Error::custom("not a valid HTTP header name"));
        }
        Ok(HeaderName(s))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSize(pub usize);

impl<'de> Deserialize<'de> for BatchSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        in_range(d, "batch_size", 1..=10_000).map(|n| BatchSize(n as usize))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlight(pub usize);

impl<'de> Deserialize<'de> for InFlight {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        in_range(d, "max_in_flight", 1..=16).map(|n| InFlight(n as usize))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempts(pub u32);

impl<'de> Deserialize<'de> for Attempts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        in_range(d, "max_attempts", 1..=20).map(|n| Attempts(n as u32))
    }
}

/// An integer `key` that must lie in `range`.
fn in_range<'de, D: Deserializer<'de>>(d: D, key: &str, range: std::ops::RangeInclusive<i64>) -> Result<i64, D::Error> {
    let n = i64::deserialize(d)?;
    if !range.contains(&n) {
        return Err(serde::de::Error::custom(format!(
            "{key} must be between {} and {}",
            range.start(),
            range.end()
        )));
    }
    Ok(n)
}

/// `[dispatcher] max_task_attempts`: cycles, 1 to 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskAttempts(pub u32);

impl<'de> Deserialize<'de> for TaskAttempts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        in_range(d, "max_task_attempts", 1..=100).map(|n| TaskAttempts(n as u32))
    }
}

/// `[dispatcher] bloomfilter_form`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BloomfilterForm {
    #[default]
    Plain,
    WithVersion,
}
