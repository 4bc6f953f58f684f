//! Time as people write it: durations (`500ms`, `30s`, `6h`, `1h30m`,
//! `14d`) read and written back, instants as RFC 3339, `--since`; for the
//! configuration, the command line and the operators' views alike.

use chrono::{DateTime, SecondsFormat, Utc};
use std::time::Duration;

/// The longest duration any setting takes: ten years.
pub const MAX_DURATION: Duration = Duration::from_secs(3650 * 86_400);

/// A duration as a person writes it (`6h`, `1h30m`, `500ms`, `14d`): the
/// inverse of `parse_duration`, so `check` shows what the file says.
pub fn format_duration(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, size) in [
        ("d", 86_400_000u128),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ] {
        if ms >= size {
            out.push_str(&format!("{}{unit}", ms / size));
            ms %= size;
        }
    }
    out
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("invalid duration '{s}' (use e.g. 30s, 15m, 6h, 1d)"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("number too large in '{s}'"))?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" | "min" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            _ => return Err(format!("invalid duration '{s}': unit must be ms, s, m, h or d")),
        };
        total = total.saturating_add(part);
    }
    // No setting needs more, and a clock plus an absurd duration would
    // overflow (a panic at the first sleep).
    if total > MAX_DURATION {
        return Err(format!("duration '{s}' is too long (at most 3650d)"));
    }
    Ok(total)
}

/// An instant as RFC 3339 in UTC, with at least milliseconds and every
/// fractional digit it came with: `expires` is a FHIR `instant`, and the
/// dispatcher compares it to the millisecond.
pub fn ts(t: DateTime<Utc>) -> String {
    let nanos = t.timestamp_subsec_nanos();
    let format = if nanos.is_multiple_of(1_000_000) {
        SecondsFormat::Millis
    } else if nanos.is_multiple_of(1_000) {
        SecondsFormat::Micros
    } else {
        SecondsFormat::Nanos
    };
    t.to_rfc3339_opts(format, true)
}

/// `T` for `--since`: an RFC 3339 time, a date (`2026-11-01`), or a
/// duration back from now (`24h`, `7d`).
pub fn parse_since(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc());
    }
    let d = parse_duration(s).map_err(|_| {
        format!(
            "'{s}' is neither a time (RFC 3339, e.g. 2026-11-01T10:00:00Z), a date (YYYY-MM-DD) nor a \
                 duration back from now (24h, 7d)"
        )
    })?;
    let d = chrono::Duration::from_std(d).map_err(|_| "duration too large".to_string())?;
    Ok(Utc::now() - d)
}

/// What is left of a time, for people reading a status: the two largest
/// units, rounded down (`1m35s`, `12m`, `2h5m`, `3d4h`).
pub(crate) fn format_left(d: chrono::Duration) -> String {
    d.to_std().map_or_else(|_| "no time (past)".into(), format_rounded)
}

/// A duration in its two largest units, rounded down, written by
/// `format_duration`.
pub(crate) fn format_rounded(d: Duration) -> String {
    let s = d.as_secs();
    let unit = match s {
        0 => return format_duration(Duration::from_millis(d.subsec_millis().into())),
        1..=119 => 1,
        120..=172_799 => 60,
        _ => 3600,
    };
    format_duration(Duration::from_secs(s / unit * unit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_keep_their_precision_and_show_at_least_milliseconds() {
        let at = |s| ts(DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc));
        assert_eq!(at("2026-12-04T10:00:00+01:00"), "2026-12-04T09:00:00.000Z");
        assert_eq!(at("2026-12-04T10:00:00.5Z"), "2026-12-04T10:00:00.500Z");
        assert_eq!(at("2026-12-04T10:00:00.123456Z"), "2026-12-04T10:00:00.123456Z");
        assert_eq!(at("2026-12-04T10:00:00.123456789Z"), "2026-12-04T10:00:00.123456789Z");
    }

    #[test]
    fn since_accepts_times_dates_and_durations() {
        assert_eq!(
            ts(parse_since("2026-11-01T10:00:00+01:00").unwrap()),
            "2026-11-01T09:00:00.000Z"
        );
        assert_eq!(ts(parse_since("2026-11-01").unwrap()), "2026-11-01T00:00:00.000Z");
        let ago = Utc::now() - parse_since("24h").unwrap();
        assert!((ago.num_seconds() - 86_400).abs() < 5);
        assert!(parse_since("yesterday").is_err());
    }

    #[test]
    fn what_is_left_is_rounded_to_two_units() {
        let left = |s: i64| format_left(chrono::Duration::seconds(s));
        assert_eq!(left(-5), "no time (past)");
        assert_eq!(left(95), "1m35s");
        assert_eq!(left(3_599), "59m");
        assert_eq!(left(7_505), "2h5m");
        assert_eq!(left(3 * 86_400 + 4 * 3_600 + 59), "3d4h");
        assert_eq!(format_left(chrono::Duration::milliseconds(250)), "250ms");
    }
}
