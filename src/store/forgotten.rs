//! Tombstones of erased patients: the local ids `forget` erased, so that
//! the hospital's next regular export does not bring a patient back
//! (`import` skips them) and no later `enroll` sends her Bloom filter.
//! No IDAT: only local ids, sealed as one record under the store key (an
//! edit, or a line removed to undo an erasure, fails to open). The file is
//! named by the key's id, so that `rekey` writes the new one before the
//! switch and a crash in between leaves the one each key reads.

use super::{StoreError, io};
use crate::crypto::StoreKey;
use crate::types::LocalId;
use base64::Engine;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const CONTEXT: &[u8] = b"forgotten local ids";

fn path(dir: &Path, key: &StoreKey) -> PathBuf {
    dir.join(format!("forgotten.{}", key.id()))
}

pub(super) fn load(dir: &Path, key: &StoreKey) -> Result<BTreeSet<String>, StoreError> {
    let file = path(dir, key);
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(io("read the erased patients' tombstones", &file)(e)),
    };
    let tampered = |source| StoreError::Tampered {
        path: file.clone(),
        line: None,
        source,
    };
    let plain = key.open("tombstone", CONTEXT, text.trim()).map_err(tampered)?;
    serde_json::from_slice(&plain).map_err(|_| tampered(crate::crypto::OpenError::layout("tombstone")))
}

pub(super) fn save(dir: &Path, key: &StoreKey, ids: &BTreeSet<String>) -> Result<(), StoreError> {
    let file = path(dir, key);
    let plain = zeroize::Zeroizing::new(serde_json::to_vec(ids).unwrap_or_default());
    let sealed = base64::engine::general_purpose::STANDARD.encode(key.seal_raw(CONTEXT, &plain));
    crate::fsutil::write_atomic(&file, sealed.as_bytes(), 0o600)
        .map_err(io("write the erased patients' tombstones", &file))
}

/// Removes the tombstones written under another key (after a rekey).
pub(super) fn remove_others(dir: &Path, key: &StoreKey) {
    let keep = path(dir, key);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            let ours = p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("forgotten."));
            if ours && p != keep {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// Whether `id` was erased (and not taken back with `forget --undo`).
pub(super) fn holds(ids: &BTreeSet<String>, id: &LocalId) -> bool {
    ids.contains(id.0.as_str())
}
