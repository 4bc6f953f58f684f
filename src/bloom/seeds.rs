//! The seeds file: study secrets, kept apart from the config.
//!
//! Its lines are the Mainzelliste client's seed properties as they are,
//! which happen to be valid TOML:
//!
//! ```toml
//! balanced.seed = 154866848
//! field.firstName.seed = 487484864
//! ```
//!
//! Errors name the file and line, never a value.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub(crate) enum SeedsError {
    #[error("cannot read the Bloom filter seeds file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "the Bloom filter seeds file {path} can be read by group or others (mode {mode:o}); the seeds are study secrets: chmod 600 it"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error(
        "Bloom filter seeds file {path}{at}: expected lines `balanced.seed = <integer>` and `field.<name>.seed = <integer>` (integers between -2^63 and 2^63-1)"
    )]
    Syntax { path: PathBuf, at: String },
    #[error("Bloom filter seeds file {path}: no seed for field {field} (add `field.{field}.seed = <integer>`)")]
    MissingField { path: PathBuf, field: String },
    #[error("Bloom filter seeds file {path}: no `balanced.seed` (needed for balanced filters)")]
    MissingBalanced { path: PathBuf },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    seed: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    balanced: Option<Entry>,
    #[serde(default)]
    field: BTreeMap<String, Entry>,
}

/// The seeds, parsed. `Debug` shows only which seeds there are.
pub(crate) struct Seeds {
    pub balanced: Option<i64>,
    pub fields: BTreeMap<String, i64>,
    path: PathBuf,
}

impl std::fmt::Debug for Seeds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seeds")
            .field("balanced", &self.balanced.is_some())
            .field("fields", &self.fields.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Seeds {
    pub fn load(path: &Path) -> Result<Seeds, SeedsError> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|source| SeedsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SeedsError::Exposed {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| SeedsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Seeds::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Seeds, SeedsError> {
        // toml's own message may quote the offending value: only its line is kept.
        let file: File = toml::from_str(text).map_err(|e: toml::de::Error| SeedsError::Syntax {
            path: path.to_path_buf(),
            at: e
                .span()
                .map(|s| {
                    let before = &text.as_bytes()[..s.start.min(text.len())];
                    format!(" line {}", before.iter().filter(|b| **b == b'\n').count() + 1)
                })
                .unwrap_or_default(),
        })?;
        Ok(Seeds {
            balanced: file.balanced.map(|e| e.seed),
            fields: file.field.into_iter().map(|(k, v)| (k, v.seed)).collect(),
            path: path.to_path_buf(),
        })
    }

    pub fn field(&self, name: &str) -> Result<i64, SeedsError> {
        self.fields.get(name).copied().ok_or_else(|| SeedsError::MissingField {
            path: self.path.clone(),
            field: name.to_string(),
        })
    }

    pub fn balanced(&self) -> Result<i64, SeedsError> {
        self.balanced.ok_or_else(|| SeedsError::MissingBalanced {
            path: self.path.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mainzelliste_property_lines_parse_as_they_are() {
        let s = Seeds::parse(
            "# from mainzelliste.properties\nbalanced.seed = 154866848\nfield.firstName.seed=487484864\nfield.lastName.seed = -311296856\nfield.big.seed = 9223372036854775807\n",
            Path::new("seeds.toml"),
        )
        .unwrap();
        assert_eq!(s.balanced().unwrap(), 154866848);
        assert_eq!(s.field("firstName").unwrap(), 487484864);
        assert_eq!(s.field("lastName").unwrap(), -311296856);
        assert_eq!(s.field("big").unwrap(), i64::MAX);
        let err = s.field("gender").unwrap_err().to_string();
        assert!(err.contains("field.gender.seed"), "{err}");
        assert!(!format!("{s:?}").contains("154866848"));
    }

    #[test]
    fn syntax_errors_name_the_line_but_never_the_value() {
        for text in [
            "balanced.seed = 154866848\nfield.x.seed = \"314159265\"\n",
            "balanced.seed = 154866848\nfield.x.seed = 99999999999999999999314159265\n",
            "balanced.seed = 154866848\nfield.x.sed = 314159265\n",
        ] {
            let err = Seeds::parse(text, Path::new("s.toml")).unwrap_err().to_string();
            assert!(err.contains("line 2"), "{err}");
            assert!(!err.contains("314159265") && !err.contains("154866848"), "{err}");
        }
    }

    #[test]
    fn a_readable_seeds_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("seeds.toml");
        std::fs::write(&p, "balanced.seed = 1\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(Seeds::load(&p), Err(SeedsError::Exposed { .. })));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Seeds::load(&p).unwrap().balanced, Some(1));
    }
}
