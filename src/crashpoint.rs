//! Test-only crash injection, compiled into debug builds only.
//!
//! `FTTP_AGENT_CRASH_AT=point[:n]` makes the process kill itself with
//! SIGKILL the n-th time (default 1st) it reaches `point`, so the tests can
//! prove that a crash at any point of a cycle loses nothing. Release builds
//! contain no trace of it.

/// The points a cycle passes, in order. Kept in one list so the crash test
/// covers every one of them.
pub const POINTS: &[&str] = &[
    "poll:before",
    "poll:after",
    "ledger:merged",
    "send:before",
    "send:after",
    "batch:before",
    "batch:after",
    "store:committing",
    "store:committed",
    "cycle:end",
];

/// The points of a store's migration from the files before the database.
pub const MIGRATION_POINTS: &[&str] = &["migrate:written", "migrate:installed"];

#[cfg(debug_assertions)]
pub fn hit(point: &str) {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicUsize, Ordering};
    static TARGET: OnceLock<Option<(String, usize)>> = OnceLock::new();
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    let target = TARGET.get_or_init(|| {
        let spec = std::env::var("FTTP_AGENT_CRASH_AT").ok()?;
        Some(parse(&spec))
    });
    if let Some((name, n)) = target
        && name == point
        && COUNT.fetch_add(1, Ordering::SeqCst) + 1 == *n
    {
        let _ = signal_hook::low_level::raise(signal_hook::consts::SIGKILL);
        std::process::abort();
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn hit(_point: &str) {}

/// `name[:n]` -> (name, n); point names contain colons themselves.
#[cfg(debug_assertions)]
fn parse(spec: &str) -> (String, usize) {
    match spec.rsplit_once(':') {
        Some((name, n)) if !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()) => {
            (name.to_string(), n.parse().unwrap_or(1))
        }
        _ => (spec.to_string(), 1),
    }
}
