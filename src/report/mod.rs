//! The operators' view: the ledger as a table, NDJSON or a FHIR Task
//! Bundle; health status for monitoring; Prometheus metrics; the daemon's
//! heartbeat; retention. Nothing here shows IDAT, raw Bloom filters or
//! pseudonyms: they appear as fingerprints.

mod heartbeat;
mod ledger;
mod metrics;
mod status;

pub use heartbeat::{Heartbeat, heartbeat_path, read_heartbeat, write_heartbeat};
pub use ledger::{TASK_ID_SYSTEM, TaskLine, fhir_bundle, fhir_status, fhir_task, purgeable, table};
pub use metrics::metrics;
pub use status::*;
