//! The store format of releases before the SQLite store (store format v4:
//! a `snapshot` and a `journal` of checksummed lines, sealed batches), kept
//! read-only and only so that `Store::open` can migrate such a store once
//! (see `super::migrate`). Nothing here writes.
//!
//! A torn last journal line (a crash mid-append) was never acknowledged
//! and is left out; damage anywhere else refuses the migration, and the
//! old files are left as they are.

mod disk;
mod forgotten;
mod state;

use super::batch;
use super::records::{
    self, EnrolmentStatus, LedgerEntry, PatientRecord, PatientSecret, PollRecord, PseudonymRecord, Record,
};
use super::{StoreError, io};
use crate::crypto::{OpenError, StoreKey};
use crate::privacy::sha256_hex;
use crate::types::LocalId;
use chrono::{DateTime, Utc};
use disk::load;
use serde::{Deserialize, Serialize};
use state::*;
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

pub(super) const SNAPSHOT: &str = "snapshot";
pub(super) const JOURNAL: &str = "journal";
const FORMAT: &str = "fttp-agent-store";
const VERSION: u32 = 4;

/// The files of a v1 store (each present or not), renamed with a `.v1`
/// suffix once the migration is complete and audited.
pub(super) fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let old = [
                SNAPSHOT,
                JOURNAL,
                "snapshot.prev",
                "journal.prev",
                "snapshot.tmp",
                "journal.tmp",
            ]
            .contains(&name.as_str())
                || name.starts_with("journal.torn-")
                || (name.starts_with("forgotten.") && !name.ends_with(".v1"));
            if old {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// Whether `dir` holds a v1 store (a snapshot or a journal).
pub(super) fn present(dir: &Path) -> bool {
    dir.join(SNAPSHOT).exists() || dir.join(JOURNAL).exists()
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
    generation: u64,
    key_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    counts: Option<Counts>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Counts {
    patients: usize,
    pseudonyms: usize,
    ledger: usize,
}

type Index = [u8; 16];

fn parse_index(hex: &str) -> Result<Index, OpenError> {
    let bad = OpenError::layout("index");
    if hex.len() != 32 {
        return Err(bad);
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or(bad.clone())?, 16).map_err(|_| bad.clone())?;
    }
    Ok(out)
}

fn index_hex(i: &Index) -> String {
    crate::privacy::hex(i)
}

/// Decodes into a buffer of exactly the decoded size.
fn decode_sealed(b64: &str, what: &'static str) -> Result<Box<[u8]>, OpenError> {
    use base64::Engine;
    let padding = b64.bytes().rev().take_while(|b| *b == b'=').count();
    let exact = (b64.len() / 4 * 3).saturating_sub(padding);
    let mut out = vec![0u8; exact].into_boxed_slice();
    match base64::engine::general_purpose::STANDARD.decode_slice(b64, &mut out) {
        Ok(n) if n == exact => Ok(out),
        _ => Err(OpenError::auth(what)),
    }
}

/// What the store files hold, line by line. IDAT, Bloom filters,
/// pseudonyms and task contents are sealed (AES-256-GCM); Bloom filters and
/// pseudonyms appear only as keyed HMAC indexes, for lookups without
/// decryption. A snapshot holds patients, pseudonyms and enrolments one per
/// line (a million patients are read in parallel and never re-sealed) and
/// the ledger in batches; the journal holds batches only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub(crate) enum DiskRecord {
    Patient {
        id: LocalId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bf: Option<String>,
        data: String,
        /// Milliseconds since the epoch: a million of these are read at open.
        #[serde(with = "chrono::serde::ts_milliseconds")]
        updated: DateTime<Utc>,
    },
    Pseudonym {
        bf: String,
        target: String,
        psn: String,
        data: String,
    },
    Poll(PollRecord),
    Enrolment {
        id: LocalId,
        bf: String,
        status: EnrolmentStatus,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
        updated: DateTime<Utc>,
    },
    /// Plain `Record`s in order, sealed together: one seal, one checksum and
    /// one line for a whole write (or a few thousand ledger entries of a
    /// snapshot), where one line per record cost most of a large cycle.
    Batch {
        data: String,
    },
}

/// An enrolment as v1 kept it: the Bloom filter only as its keyed index
/// (the same index the new store keeps).
pub(super) struct V1Enrolment {
    pub local_id: LocalId,
    pub bf_index: [u8; 16],
    pub status: EnrolmentStatus,
    pub detail: Option<String>,
    pub updated: DateTime<Utc>,
}

/// Everything a v1 store holds, opened.
pub(super) struct V1Store {
    pub patients: Vec<PatientRecord>,
    pub pseudonyms: Vec<PseudonymRecord>,
    pub ledger: Vec<LedgerEntry>,
    pub enrolments: Vec<V1Enrolment>,
    pub last_poll: Option<PollRecord>,
    pub forgotten: BTreeSet<String>,
}

fn check_key(path: &Path, header: &Header, key: &StoreKey) -> Result<(), StoreError> {
    if header.key_id != key.id() {
        return Err(StoreError::WrongKey {
            path: path.to_path_buf(),
            stored: header.key_id.clone(),
            given: key.id().to_string(),
        });
    }
    Ok(())
}

fn tampered(path: &Path, line: Option<usize>) -> impl Fn(OpenError) -> StoreError + '_ {
    move |source| StoreError::Tampered {
        path: path.to_path_buf(),
        what: line.map_or_else(String::new, |l| format!(" at line {l}")),
        source,
    }
}

fn corrupt(path: &Path, line: usize, reason: String) -> StoreError {
    StoreError::Damaged {
        path: path.to_path_buf(),
        reason: format!("line {line}: {reason}"),
    }
}

/// Reads the v1 store in `dir` (which `present` said is there).
pub(super) fn read(dir: &Path, key: &StoreKey) -> Result<V1Store, StoreError> {
    let snap_path = dir.join(SNAPSHOT);
    let cell = std::cell::RefCell::new(State::default());
    let snapshot = load(
        &snap_path,
        false,
        |h| {
            check_key(&snap_path, h, key)?;
            if let Some(c) = h.counts {
                cell.borrow_mut().reserve(c);
            }
            Ok(true)
        },
        |line, r| {
            cell.borrow_mut()
                .apply_ready(r, key)
                .map(drop)
                .map_err(tampered(&snap_path, Some(line)))
        },
    )?;
    let mut state = cell.into_inner();
    let generation = snapshot.map_or(0, |l| l.header.generation);
    let journal_path = dir.join(JOURNAL);
    load(
        &journal_path,
        true,
        |h| {
            if h.generation > generation {
                return Err(corrupt(
                    &journal_path,
                    1,
                    format!(
                        "journal generation {} is newer than snapshot generation {generation}",
                        h.generation
                    ),
                ));
            }
            // An older journal: its records are already in the snapshot.
            if h.generation < generation {
                return Ok(false);
            }
            check_key(&journal_path, h, key)?;
            Ok(true)
        },
        |line, r| {
            state
                .apply_ready(r, key)
                .map(drop)
                .map_err(tampered(&journal_path, Some(line)))
        },
    )?;
    let forgotten = forgotten::load(dir, key)?;
    open_all(dir, state, forgotten, key)
}

fn open_all(dir: &Path, state: State, forgotten: BTreeSet<String>, key: &StoreKey) -> Result<V1Store, StoreError> {
    let bad = tampered(dir, None);
    let mut patients = Vec::with_capacity(state.patients.len());
    for (id, p) in &state.patients {
        // A patient erased but back in the files (an interrupted forget)
        // stays erased.
        if forgotten.contains(&**id) {
            continue;
        }
        let plain = key.open_raw("patient", &patient_context(id), &p.data).map_err(&bad)?;
        let secret = PatientSecret::decode(&plain).ok_or_else(|| bad(OpenError::layout("patient")))?;
        patients.push(PatientRecord {
            local_id: LocalId(id.to_string()),
            idat: secret.idat,
            bloomfilter: secret.bloomfilter,
            updated: p.updated,
        });
    }
    let mut pseudonyms = Vec::with_capacity(state.pseudonyms.len());
    for ((bf, target), p) in &state.pseudonyms {
        let plain = key
            .open_raw("pseudonym", &pseudonym_context(&index_hex(bf), target), &p.data)
            .map_err(&bad)?;
        pseudonyms.push(records::decode_pseudonym(&plain, target).ok_or_else(|| bad(OpenError::layout("pseudonym")))?);
    }
    let enrolments = state
        .enrolments
        .into_iter()
        .filter(|(id, _)| !forgotten.contains(&id.0))
        .map(|(local_id, e)| V1Enrolment {
            local_id,
            bf_index: e.bf,
            status: e.status,
            detail: e.detail,
            updated: e.updated,
        })
        .collect();
    Ok(V1Store {
        patients,
        pseudonyms,
        ledger: state.ledger.into_values().collect(),
        enrolments,
        last_poll: state.last_poll,
        forgotten,
    })
}
