//! Durations as people write them (`500ms`, `30s`, `6h`, `1h30m`, `14d`),
//! read and written back: for the configuration, `--since` and the
//! operators' views alike.

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
