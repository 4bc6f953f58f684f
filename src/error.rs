//! Top-level errors and the exit codes they map to.

use crate::agent::AgentError;
use crate::audit::AuditError;
use crate::config::ConfigError;
use crate::import::ImportError;
use crate::store::StoreError;

pub use crate::exit;

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
    #[error(transparent)]
    Serve(#[from] crate::serve::ServeError),
    #[error("{0}")]
    Usage(String),
    /// Another process is using what this command needs (EX_TEMPFAIL).
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Other(String),
}

impl AppError {
    /// Each error type decides its own code; this only delegates, so a new
    /// wrapper cannot silently turn a lock or a broken disk into exit 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            AppError::Config(_) | AppError::Usage(_) | AppError::Key(_) | AppError::ClientSetup(_) => exit::CONFIG,
            AppError::Store(e) => e.exit_code(),
            AppError::Audit(e) => e.exit_code(),
            AppError::Import(e) => e.exit_code(),
            AppError::Agent(e) => e.exit_code(),
            AppError::Enroll(e) => e.exit_code(),
            AppError::Serve(e) => e.exit_code(),
            AppError::Busy(_) => exit::LOCKED,
            AppError::Other(_) => exit::IO,
        }
    }
}
