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
            AppError::Config(e) => e.exit_code(),
            AppError::Key(e) => e.exit_code(),
            AppError::ClientSetup(e) => e.exit_code(),
            AppError::Usage(_) => exit::CONFIG,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn locked() -> StoreError {
        StoreError::Locked {
            path: PathBuf::from("/var/lib/fttp-agent"),
            pid: None,
        }
    }

    #[test]
    fn a_held_lock_is_exit_75_through_every_wrapper() {
        assert_eq!(AppError::from(locked()).exit_code(), exit::LOCKED);
        assert_eq!(AppError::from(AgentError::Store(locked())).exit_code(), exit::LOCKED);
        assert_eq!(
            AppError::from(crate::enroll::EnrollError::Store(locked())).exit_code(),
            exit::LOCKED
        );
    }

    #[test]
    fn an_exposed_secret_file_is_a_configuration_error_however_it_is_reached() {
        let exposed = || crate::secret_file::SecretFileError::Exposed {
            what: "store key",
            path: PathBuf::from("/etc/fttp-agent/store.key"),
            mode: 0o644,
        };
        assert_eq!(AppError::from(ConfigError::Secret(exposed())).exit_code(), exit::CONFIG);
        assert_eq!(
            AppError::from(crate::crypto::KeyError::Exposed(exposed())).exit_code(),
            exit::CONFIG
        );
    }
}
