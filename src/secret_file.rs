//! Files that hold a secret (store key, API key, passwords, client secret,
//! TLS client key): they must be readable by their owner alone. A secret
//! the group or others can read is refused, not warned about: a warning
//! in a log nobody reads leaves the key exposed for years.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("cannot read {what} from {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{what} {path} can be read or changed by group or others (mode {mode:o}): `chmod 600` it, owned by \
         the user the agent runs as"
    )]
    Exposed {
        what: &'static str,
        path: PathBuf,
        mode: u32,
    },
}

impl SecretFileError {
    /// A secret file that is missing or open to others is the set-up's to fix.
    pub fn exit_code(&self) -> u8 {
        crate::exit::CONFIG
    }
}

/// Refuses a file that group or others can access at all.
pub(crate) fn check_private(path: &Path, what: &'static str) -> Result<(), SecretFileError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| SecretFileError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretFileError::Exposed {
            what,
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// The whole text of a private file.
pub(crate) fn read_private(path: &Path, what: &'static str) -> Result<String, SecretFileError> {
    check_private(path, what)?;
    std::fs::read_to_string(path).map_err(|source| SecretFileError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_secret_anyone_else_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "x").unwrap();
        for (mode, ok) in [
            (0o600, true),
            (0o400, true),
            (0o640, false),
            (0o604, false),
            (0o620, false),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let r = read_private(&path, "the API key");
            assert_eq!(r.is_ok(), ok, "mode {mode:o}: {r:?}");
            if let Err(e) = r {
                assert!(e.to_string().contains("chmod 600"), "{e}");
            }
        }
    }
}
