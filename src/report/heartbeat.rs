//! The daemon's heartbeat: written after every cycle, read by `status`,
//! the page and `/metrics` between cycles.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Written by the agent after every cycle, read by `status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Heartbeat {
    pub pid: u32,
    pub cycle_end: DateTime<Utc>,
    /// Whether that cycle succeeded (absent in heartbeats before it was
    /// recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cycle_ok: Option<bool>,
    /// How long that cycle took (for `/metrics` between cycles).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cycle_seconds: Option<f64>,
    /// How far that cycle's pace backed off, and the busy answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pace: Option<crate::pace::PaceReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success: Option<DateTime<Utc>>,
    /// When the daemon will poll next (absent for `run --once`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_poll: Option<DateTime<Utc>>,
    /// When the first still-open task expires: the daemon polls sooner for
    /// it without opening the store again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soonest_expiry: Option<DateTime<Utc>>,
    /// When the retention purge last ran (daily, from any cycle).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_purge: Option<DateTime<Utc>>,
}

pub fn heartbeat_path(store_dir: &Path) -> std::path::PathBuf {
    store_dir.join("heartbeat.json")
}

pub fn write_heartbeat(store_dir: &Path, hb: &Heartbeat) -> std::io::Result<()> {
    crate::fsutil::write_atomic(
        &heartbeat_path(store_dir),
        serde_json::to_string(hb).unwrap_or_default().as_bytes(),
        0o600,
    )
}

pub fn read_heartbeat(store_dir: &Path) -> Option<Heartbeat> {
    serde_json::from_slice(&std::fs::read(heartbeat_path(store_dir)).ok()?).ok()
}
