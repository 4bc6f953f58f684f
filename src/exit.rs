//! Exit codes, documented in the README (a table there lists each).

/// Every task resolved or cleanly skipped (expired, duplicate, rejected).
pub const OK: u8 = 0;
/// Some tasks failed or wait for local data; they stay open for the next cycle.
pub(crate) const TASKS_OPEN: u8 = 1;
/// Configuration or usage error.
pub(crate) const CONFIG: u8 = 2;
/// Dispatcher unreachable or authentication refused; nothing changed.
pub const DISPATCHER: u8 = 3;
/// The dispatcher answered, but not in the protocol: an unreadable or
/// oversized document. Nothing was changed; its operators must look.
pub(crate) const PROTOCOL: u8 = 4;
/// The store, the audit log or another file cannot be read or written
/// (I/O failure, full disk, damage, a cut-off audit log): the agent is
/// broken until someone looks. Never counted as success by the units.
pub(crate) const IO: u8 = 5;
/// Another agent holds the store lock (EX_TEMPFAIL).
pub(crate) const LOCKED: u8 = 75;

/// Of two results (several studies in one run), the one to report: a
/// broken file before a configuration problem before a broken protocol
/// before an unreachable dispatcher before open tasks before success.
pub fn worst(a: u8, b: u8) -> u8 {
    let rank = |c: u8| match c {
        OK => 0,
        TASKS_OPEN => 1,
        DISPATCHER => 2,
        PROTOCOL => 3,
        CONFIG => 4,
        IO => 5,
        _ => 6,
    };
    if rank(b) > rank(a) { b } else { a }
}
