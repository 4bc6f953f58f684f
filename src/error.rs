//! Top-level errors and the exit codes they map to.

use crate::agent::AgentError;
use crate::audit::AuditError;
use crate::config::ConfigError;
use crate::import::ImportError;
use crate::store::StoreError;

/// Exit codes, documented in the README.
pub mod exit {
    /// Every task resolved or cleanly skipped (expired, duplicate, rejected).
    pub const OK: u8 = 0;
    /// Some tasks failed or wait for local data; they stay open for the next cycle.
    pub const TASKS_OPEN: u8 = 1;
    /// Configuration or usage error.
    pub const CONFIG: u8 = 2;
    /// Dispatcher unreachable or authentication refused; nothing changed.
    pub const DISPATCHER: u8 = 3;
    /// The dispatcher answered, but not in the protocol: an unreadable or
    /// oversized document. Nothing was changed; its operators must look.
    pub const PROTOCOL: u8 = 4;
    /// Another agent holds the store lock (EX_TEMPFAIL).
    pub const LOCKED: u8 = 75;

    /// The exit code for a dispatcher that refused or did not answer.
    pub fn for_dispatcher(e: &crate::client::ClientError) -> u8 {
        match e {
            // The gateway understood us and said the request is wrong:
            // study or target unknown, a configuration problem.
            crate::client::ClientError::Status {
                status: 400 | 404 | 422,
                ..
            } => CONFIG,
            e if e.is_protocol() => PROTOCOL,
            _ => DISPATCHER,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Import(#[from] ImportError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Enroll(#[from] crate::enroll::EnrollError),
    #[error(transparent)]
    Key(#[from] crate::crypto::KeyError),
    #[error(transparent)]
    ClientSetup(#[from] crate::client::ClientSetupError),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Other(String),
}

impl AppError {
    pub fn exit_code(&self) -> u8 {
        match self {
            AppError::Config(_) | AppError::Usage(_) | AppError::Key(_) | AppError::ClientSetup(_) => exit::CONFIG,
            AppError::Enroll(crate::enroll::EnrollError::NoVersion) => exit::CONFIG,
            AppError::Enroll(crate::enroll::EnrollError::Store(StoreError::Locked { .. })) => exit::LOCKED,
            AppError::Store(StoreError::WrongKey { .. } | StoreError::Version { .. }) => exit::CONFIG,
            AppError::Store(StoreError::Locked { .. }) => exit::LOCKED,
            AppError::Import(ImportError::Store(StoreError::Locked { .. })) => exit::LOCKED,
            AppError::Agent(AgentError::Store(StoreError::Locked { .. })) => exit::LOCKED,
            AppError::Agent(AgentError::Poll(e)) => exit::for_dispatcher(e),
            _ => exit::TASKS_OPEN,
        }
    }
}
