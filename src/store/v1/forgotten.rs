//! A v1 store's tombstones of erased patients: the local ids `forget` erased, so that
//! the hospital's next regular export does not bring a patient back
//! (`import` skips them) and no later `enroll` sends her Bloom filter.
//! No IDAT: only local ids, sealed as one record under the store key (an
//! edit, or a line removed to undo an erasure, fails to open). The file is
//! named by the key's id, so that `rekey` writes the new one before the
//! switch and a crash in between leaves the one each key reads.

use super::super::{StoreError, io};
use crate::crypto::StoreKey;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const CONTEXT: &[u8] = b"forgotten local ids";

pub(super) fn path(dir: &Path, key: &StoreKey) -> PathBuf {
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
        what: String::new(),
        source,
    };
    let plain = key.open("tombstone", CONTEXT, text.trim()).map_err(tampered)?;
    serde_json::from_slice(&plain).map_err(|_| tampered(crate::crypto::OpenError::layout("tombstone")))
}
