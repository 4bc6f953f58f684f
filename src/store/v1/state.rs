//! A v1 store as read into memory: sealed patients and pseudonyms under
//! their HMAC indexes, the ledger, enrolments; how each record read changes
//! it.

use super::*;

/// Hashes HMAC indexes by their first eight bytes: they are uniformly
/// random and unknown without the store key, so SipHash's protection
/// against chosen keys buys nothing here and costs a fifth of the open time.
#[derive(Default, Clone, Copy)]
pub(super) struct IndexHasher(u64);

impl std::hash::Hasher for IndexHasher {
    fn write(&mut self, bytes: &[u8]) {
        if let Some(first) = bytes.first_chunk::<8>() {
            self.0 = self.0.rotate_left(17) ^ u64::from_le_bytes(*first);
        } else {
            for b in bytes {
                self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
            }
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

pub(super) type ByIndex = std::hash::BuildHasherDefault<IndexHasher>;

/// FxHash for local ids: they come from the site's own registry, not from
/// the network, so a fast hash is safe and a million lookups at open are
/// cheaper.
pub(super) type ById = crate::fxhash::Fx;

/// A record as the loader's reading thread hands it over: patients already
/// decoded, so the indexing thread only inserts.
pub(super) enum Ready {
    Patient {
        id: std::sync::Arc<str>,
        bf: Option<Index>,
        data: Box<[u8]>,
        updated: chrono::DateTime<chrono::Utc>,
    },
    Other(DiskRecord),
}

impl Ready {
    pub(super) fn from_disk(r: DiskRecord) -> Result<Ready, OpenError> {
        Ok(match r {
            DiskRecord::Patient { id, bf, data, updated } => Ready::Patient {
                id: std::sync::Arc::from(id.0),
                bf: bf.as_deref().map(parse_index).transpose()?,
                data: decode_sealed(&data, "patient")?,
                updated,
            },
            other => Ready::Other(other),
        })
    }
}

/// A patient as held in memory: sealed bytes, opened on lookup.
#[derive(Debug)]
pub(super) struct SealedPatient {
    pub(super) bf: Option<Index>,
    pub(super) data: Box<[u8]>,
    pub(super) updated: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug)]
pub(super) struct SealedPseudonym {
    pub(super) data: Box<[u8]>,
}

/// The store in memory: patients and pseudonyms stay sealed and are opened
/// one at a time on lookup; the (small) ledger is held decrypted.
#[derive(Debug, Default)]
pub(super) struct State {
    /// Local ids are shared between the two tables (one allocation each).
    pub(super) patients: HashMap<std::sync::Arc<str>, SealedPatient, ById>,
    /// HMAC index of a Bloom filter -> patient.
    pub(super) by_bf: HashMap<Index, std::sync::Arc<str>, ByIndex>,
    /// (HMAC index of the Bloom filter, target) -> pseudonym.
    pub(super) pseudonyms: HashMap<(Index, String), SealedPseudonym, ByIndex>,
    /// HMAC index of a pseudonym value -> HMAC index of its Bloom filter.
    pub(super) by_psn: HashMap<Index, Index, ByIndex>,
    pub(super) ledger: HashMap<String, LedgerEntry>,
    pub(super) last_poll: Option<PollRecord>,
    pub(super) enrolments: HashMap<LocalId, Enrolment>,
}

#[derive(Debug, Clone)]
pub(super) struct Enrolment {
    pub(super) bf: Index,
    pub(super) status: EnrolmentStatus,
    pub(super) detail: Option<String>,
    pub(super) updated: chrono::DateTime<chrono::Utc>,
}

pub(super) fn patient_context(id: &str) -> Vec<u8> {
    format!("patient\0{id}").into_bytes()
}

pub(super) fn pseudonym_context(bf: &str, target: &str) -> Vec<u8> {
    format!("pseudonym\0{bf}\0{target}").into_bytes()
}

/// The associated data of a batch line (its records, keys and all, are
/// inside the seal).
pub(super) const BATCH_CONTEXT: &[u8] = b"batch";

impl State {
    pub(super) fn insert_patient(
        &mut self,
        id: std::sync::Arc<str>,
        bf: Option<Index>,
        data: Box<[u8]>,
        updated: chrono::DateTime<chrono::Utc>,
    ) {
        // One probe: insert, then tidy up after a replaced record.
        if let Some(old) = self.patients.insert(id.clone(), SealedPatient { bf, data, updated })
            && let Some(old_bf) = old.bf
            && Some(old_bf) != bf
            && self.by_bf.get(&old_bf).is_some_and(|x| *x == id)
        {
            self.by_bf.remove(&old_bf);
        }
        if let Some(bf) = bf {
            self.by_bf.insert(bf, id);
        }
    }

    pub(super) fn forget(&mut self, id: &LocalId) {
        self.enrolments.remove(id);
        if let Some(old) = self.patients.remove(id.0.as_str())
            && let Some(bf) = old.bf
            && self.by_bf.get(&bf).is_some_and(|x| **x == *id.0)
        {
            self.by_bf.remove(&bf);
        }
    }

    pub(super) fn insert_pseudonym(&mut self, bf: Index, target: String, psn: Index, data: Box<[u8]>) {
        self.by_psn.insert(psn, bf);
        self.pseudonyms.insert((bf, target), SealedPseudonym { data });
    }

    /// Applies a line of a snapshot or journal; returns how many records it held.
    pub(super) fn apply_ready(&mut self, r: Ready, key: &StoreKey) -> Result<usize, OpenError> {
        let r = match r {
            Ready::Patient { id, bf, data, updated } => {
                self.insert_patient(id, bf, data, updated);
                return Ok(1);
            }
            Ready::Other(r) => r,
        };
        match r {
            // (from_disk turns every patient into Ready::Patient)
            patient @ DiskRecord::Patient { .. } => return self.apply_ready(Ready::from_disk(patient)?, key),
            DiskRecord::Pseudonym { bf, target, psn, data } => {
                let (bf, psn) = (parse_index(&bf)?, parse_index(&psn)?);
                let data = decode_sealed(&data, "pseudonym")?;
                self.insert_pseudonym(bf, target, psn, data);
            }
            DiskRecord::Poll(p) => self.last_poll = Some(p),
            DiskRecord::Enrolment {
                id,
                bf,
                status,
                detail,
                updated,
            } => {
                let bf = parse_index(&bf)?;
                self.enrolments.insert(
                    id,
                    Enrolment {
                        bf,
                        status,
                        detail,
                        updated,
                    },
                );
            }
            DiskRecord::Batch { data } => {
                let what = "batch of records";
                let plain = key.open(what, BATCH_CONTEXT, &data)?;
                let records = batch::decode(&plain).ok_or(OpenError::layout(what))?;
                let n = records.len();
                for r in records {
                    self.apply_record(r, key);
                }
                return Ok(n);
            }
        }
        Ok(1)
    }

    /// Applies a record in plain text (just written, or read from a batch);
    /// what memory holds sealed is sealed here.
    pub(super) fn apply_record(&mut self, r: Record, key: &StoreKey) {
        match r {
            Record::Patient(p) => {
                let bf = p.bloomfilter.as_ref().map(|bf| key.index_bytes("bf", bf.as_bytes()));
                let plain = PatientSecret::encode_parts(&p.idat, p.bloomfilter.as_ref());
                let data = key.seal_raw(&patient_context(&p.local_id.0), &plain);
                self.insert_patient(std::sync::Arc::from(p.local_id.0), bf, data.into(), p.updated);
            }
            Record::Pseudonym(p) => {
                let bf = key.index_bytes("bf", p.bloomfilter.as_bytes());
                let psn = key.index_bytes("psn", p.pseudonym.value.as_bytes());
                let plain = records::encode_pseudonym(&p);
                let data = key.seal_raw(&pseudonym_context(&index_hex(&bf), &p.target), &plain);
                self.insert_pseudonym(bf, p.target, psn, data.into());
            }
            Record::Ledger(e) => {
                self.ledger.insert(e.key.clone(), e);
            }
            Record::Poll(p) => self.last_poll = Some(p),
            Record::Purge { key: k } => {
                self.ledger.remove(&k);
            }
            Record::Forget { local_id } => self.forget(&local_id),
            Record::Progress(p) => {
                if let Some(e) = self.ledger.get_mut(&p.key) {
                    p.apply_to(e);
                }
            }
            Record::Enrolment(e) => {
                let bf = key.index_bytes("bf", e.bloomfilter.as_bytes());
                self.enrolments.insert(
                    e.local_id,
                    Enrolment {
                        bf,
                        status: e.status,
                        detail: e.detail,
                        updated: e.updated,
                    },
                );
            }
        }
    }

    pub(super) fn reserve(&mut self, c: Counts) {
        self.patients.reserve(c.patients);
        self.by_bf.reserve(c.patients);
        self.pseudonyms.reserve(c.pseudonyms);
        self.by_psn.reserve(c.pseudonyms);
        self.ledger.reserve(c.ledger);
    }
}
