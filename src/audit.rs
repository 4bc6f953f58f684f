//! The audit log: NDJSON, one record per task outcome and one per poll,
//! for trust-centre operators. Records name tasks by taskId or content
//! hash and patients by fingerprint; they never hold IDAT, API keys or raw
//! Bloom filters.

use chrono::{SecondsFormat, Utc};
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("audit log {path}: cannot {op}: {source}")]
pub struct AuditError {
    pub path: PathBuf,
    pub op: &'static str,
    pub source: std::io::Error,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct AuditRecord {
    /// RFC 3339, UTC.
    pub ts: String,
    /// `poll`, or the task kind.
    pub kind: String,
    /// taskId, or the first characters of the task's content hash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    pub outcome: String,
    pub target: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// Fingerprint of the local patient concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    /// Fingerprint of the Bloom filter concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bloomfilter: Option<String>,
    /// IDAT element codes requested (send_idat).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub elements: Vec<String>,
    /// Requested element codes the store had no value for.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
    /// Number of tasks received (poll records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tasks: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl AuditRecord {
    pub fn new(kind: &str, outcome: &str, target: &str) -> Self {
        AuditRecord {
            ts: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            kind: kind.to_string(),
            outcome: outcome.to_string(),
            target: target.to_string(),
            ..Default::default()
        }
    }
}

pub struct Audit {
    path: PathBuf,
    file: File,
}

impl Audit {
    pub fn open(path: &Path) -> Result<Audit, AuditError> {
        let err = |op| {
            move |source| AuditError {
                path: path.to_path_buf(),
                op,
                source,
            }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(err("create its directory"))?;
        }
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(err("open"))?;
        Ok(Audit {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends one record as one line, in one write, so concurrent readers
    /// never see half a record.
    pub fn write(&mut self, record: &AuditRecord) -> Result<(), AuditError> {
        let mut line = serde_json::to_string(record).unwrap_or_default();
        line.push('\n');
        self.file.write_all(line.as_bytes()).map_err(|source| AuditError {
            path: self.path.clone(),
            op: "append",
            source,
        })
    }

    pub fn sync(&mut self) -> Result<(), AuditError> {
        self.file.sync_data().map_err(|source| AuditError {
            path: self.path.clone(),
            op: "sync",
            source,
        })
    }
}
