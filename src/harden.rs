//! Process hardening at start: the agent holds the store key, API keys
//! and decrypted IDAT in memory, so a crash must not write them to a core
//! file, and no other process of the same user may read its memory.

/// Disables core dumps (RLIMIT_CORE 0, hard limit too) and marks the
/// process non-dumpable (also denies ptrace and /proc/PID/mem to other
/// processes of the same user). Returns what could not be done, for a
/// warning: a container may forbid prctl.
pub fn process() -> Vec<String> {
    use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};
    let mut failed = Vec::new();
    let none = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    if let Err(e) = setrlimit(Resource::Core, none) {
        failed.push(format!("cannot disable core dumps (RLIMIT_CORE): {e}"));
    }
    if let Err(e) = set_dumpable_behavior(DumpableBehavior::NotDumpable) {
        failed.push(format!("cannot mark the process non-dumpable (PR_SET_DUMPABLE): {e}"));
    }
    failed
}
