//! Keeping identifying data out of every byte the agent writes outside the store.
//!
//! IDAT, API keys and raw Bloom filters are referred to in logs and audit
//! records only by short SHA-256 fingerprints. Text that comes from outside
//! (a gateway's diagnostics) is passed through a [`Redactor`] that knows the
//! secrets of the request it answers, because a server may echo them back.

use ring::digest::{SHA256, digest};

/// First 12 hex digits of SHA-256: enough to correlate records, too short
/// and too one-way to recover a name or a Bloom filter.
pub fn fingerprint(bytes: &[u8]) -> String {
    tagged_fingerprint("", bytes)
}

/// `fingerprint` after a kind's prefix (`bf:`, `psn:`, `pat:`), built in
/// one string: the audit record of every task has one.
pub(crate) fn tagged_fingerprint(prefix: &str, bytes: &[u8]) -> String {
    let mut s = String::with_capacity(prefix.len() + 12);
    s.push_str(prefix);
    push_hex(&mut s, &digest(&SHA256, bytes).as_ref()[..6]);
    s
}

/// SHA-256 over the JSON serde writes for `value`, fed to the digest as
/// it is written (no string of it: 100,000 task keys at a re-keying).
pub(crate) fn sha256_of_json<T: serde::Serialize>(value: &T) -> ring::digest::Digest {
    struct Digest(ring::digest::Context);
    impl std::io::Write for Digest {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.update(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut d = Digest(ring::digest::Context::new(&SHA256));
    // Serialising our own plain data types cannot fail.
    let _ = serde_json::to_writer(&mut d, value);
    d.0.finish()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(digest(&SHA256, bytes).as_ref())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    push_hex(&mut s, bytes);
    s
}

fn push_hex(s: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
}

/// Removes known secrets from untrusted text before it is logged.
#[derive(Debug, Default, Clone)]
pub struct Redactor {
    secrets: Vec<String>,
}

impl Redactor {
    pub fn new() -> Self {
        Redactor::default()
    }

    /// Registers a value that must never be echoed. Very short values (one
    /// character, such as a gender code) would redact half of any sentence
    /// and identify nobody, so they are skipped.
    pub fn add(&mut self, secret: &str) {
        let s = secret.trim();
        if s.chars().count() >= 2 && !self.secrets.iter().any(|x| x == s) {
            self.secrets.push(s.to_string());
        }
    }

    /// A redactor that knows `credentials` in every form a server may echo
    /// them in (see `add_credential`).
    pub(crate) fn with_credentials(credentials: &[String]) -> Self {
        let mut r = Redactor::new();
        for c in credentials {
            r.add_credential(c);
        }
        r
    }

    /// Registers a credential (API key, password, token, client secret)
    /// as it is, base64-encoded (as in a Basic header) and percent-encoded
    /// (as in a form body or URL), since an echoing server may quote it in
    /// any of these.
    pub(crate) fn add_credential(&mut self, secret: &str) {
        use base64::Engine;
        let s = secret.trim();
        self.add(s);
        for engine in [
            &base64::engine::general_purpose::STANDARD,
            &base64::engine::general_purpose::STANDARD_NO_PAD,
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ] {
            self.add(&engine.encode(s));
        }
        let encoded = percent_encode(s);
        self.add(&encoded.replace("%20", "+"));
        self.add(&encoded);
    }

    /// `text` with every registered secret (case-insensitively) replaced by
    /// `[redacted]`, control characters removed, and cut to `max` characters.
    pub fn clean(&self, text: &str, max: usize) -> String {
        let mut out: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
        // Longest first, so a secret that contains another is removed whole.
        let mut secrets: Vec<&String> = self.secrets.iter().collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        for s in secrets {
            out = replace_ci(&out, s, "[redacted]");
        }
        if out.chars().count() > max {
            out = out.chars().take(max).collect::<String>() + "…";
        }
        out
    }
}

/// `text` with control characters written as escapes (`\n`, `\u{1b}`):
/// a value from outside (a gateway's JSON key, a token endpoint's error)
/// must not start a forged line in a text log, `status` or a terminal.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Percent-encoding of everything but unreserved characters (RFC 3986),
/// as form bodies and URLs carry a value.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(b as char),
            _ => {
                out.push('%');
                push_hex_upper(&mut out, b);
            }
        }
    }
    out
}

fn push_hex_upper(s: &mut String, b: u8) {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    s.push(DIGITS[(b >> 4) as usize] as char);
    s.push(DIGITS[(b & 15) as usize] as char);
}

fn replace_ci(haystack: &str, needle: &str, with: &str) -> String {
    let lower_h = haystack.to_lowercase();
    let lower_n = needle.to_lowercase();
    // Lower-casing can change byte lengths outside ASCII; fall back to exact matching then.
    if lower_h.len() != haystack.len() || lower_n.len() != needle.len() {
        return haystack.replace(needle, with);
    }
    let mut out = String::with_capacity(haystack.len());
    let mut rest = 0;
    while let Some(pos) = lower_h[rest..].find(&lower_n) {
        let at = rest + pos;
        out.push_str(&haystack[rest..at]);
        out.push_str(with);
        rest = at + needle.len();
    }
    out.push_str(&haystack[rest..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_secrets_case_insensitively_and_bounds_length() {
        let mut r = Redactor::new();
        r.add("Mustermann");
        r.add("m");
        let out = r.clean("invalid family MUSTERMANN\nfor m", 100);
        assert_eq!(out, "invalid family [redacted] for m");
        assert_eq!(r.clean(&"x".repeat(50), 10).chars().count(), 11);
    }

    #[test]
    fn control_characters_are_escaped_not_passed_on() {
        assert_eq!(
            escape_controls("a\nb\r\u{1b}[31mc\u{85}"),
            "a\\nb\\r\\u{1b}[31mc\\u{85}"
        );
        assert!(matches!(
            escape_controls("plain ä"),
            std::borrow::Cow::Borrowed("plain ä")
        ));
    }

    #[test]
    fn fingerprints_are_short_and_stable() {
        assert_eq!(fingerprint(b"abc"), "ba7816bf8f01");
        assert_eq!(sha256_hex(b"abc").len(), 64);
    }
}
