//! The store key: AES-256-GCM for records at rest, HMAC-SHA256 for the
//! lookup indexes, both derived (HKDF-SHA256) from one 256-bit key file.
//!
//! Lookups by Bloom filter or pseudonym go through keyed HMAC indexes, so the
//! agent finds one patient without decrypting the store, and the indexes
//! reveal nothing to whoever reads the files without the key.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use ring::{hkdf, hmac};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use zeroize::{Zeroize, Zeroizing};

/// Random bytes drawn from the system in one call and handed out as nonces:
/// a re-keying cycle seals some 200,000 records, and one `getrandom` call
/// per nonce was a measurable share of it. Every byte still comes from the
/// system's source and is used once; the pool is per thread, and this
/// process never forks, so no two seals can share a nonce.
const NONCE_POOL: usize = NONCE_LEN * 341;

struct NoncePool {
    bytes: [u8; NONCE_POOL],
    used: usize,
}

thread_local! {
    static NONCES: std::cell::RefCell<NoncePool> = const {
        std::cell::RefCell::new(NoncePool {
            bytes: [0; NONCE_POOL],
            used: NONCE_POOL,
        })
    };
}

fn fresh_nonce() -> [u8; NONCE_LEN] {
    NONCES.with_borrow_mut(|pool| {
        if pool.used + NONCE_LEN > NONCE_POOL {
            // Without randomness no record can be written safely: fail loudly.
            if SystemRandom::new().fill(&mut pool.bytes).is_err() {
                panic!("the system's random source failed");
            }
            pool.used = 0;
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&pool.bytes[pool.used..pool.used + NONCE_LEN]);
        // Spent bytes are wiped so that none can be handed out twice.
        pool.bytes[pool.used..pool.used + NONCE_LEN].fill(0);
        pool.used += NONCE_LEN;
        nonce
    })
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the key file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the key file {path} does not hold a 256-bit key (44 characters of base64)")]
    Format { path: PathBuf },
    #[error("cannot create the key file {path}: {source}")]
    Create { path: PathBuf, source: std::io::Error },
    #[error("the system's random source failed")]
    Random,
    #[error(transparent)]
    Exposed(#[from] crate::secret_file::SecretFileError),
}

impl KeyError {
    /// A key file is the configuration's (the store key, the audit key).
    pub fn exit_code(&self) -> u8 {
        match self {
            KeyError::Exposed(e) => e.exit_code(),
            _ => crate::exit::CONFIG,
        }
    }
}

/// A sealed record that cannot be used: it failed to decrypt (tampered
/// with, or another key), or it decrypted but is not in the layout this
/// version writes.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum OpenError {
    #[error("a {what} record fails authentication: it was altered, or written with another key")]
    Authentication { what: &'static str },
    #[error("a {what} record is intact but not in the layout this version writes (a bug: please report it)")]
    Layout { what: &'static str },
    #[error(
        "a {what} record is not the one its index names: the store's indexes were altered (nothing is sent \
         for it)"
    )]
    Mismatch { what: &'static str },
}

impl OpenError {
    pub fn auth(what: &'static str) -> OpenError {
        OpenError::Authentication { what }
    }

    pub(crate) fn layout(what: &'static str) -> OpenError {
        OpenError::Layout { what }
    }
}

#[derive(Clone)]
pub struct StoreKey {
    aead: LessSafeKey,
    mac: hmac::Key,
    id: String,
}

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreKey({})", self.id)
    }
}

/// Reads a 256-bit key written by `keygen` (base64); refuses a key file that
/// group or others can read.
pub(crate) fn read_key_bytes(path: &Path) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    crate::secret_file::check_private(path, "the key file")?;
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    })?);
    let bytes = Zeroizing::new(STANDARD.decode(text.trim()).map_err(|_| KeyError::Format {
        path: path.to_path_buf(),
    })?);
    let mut secret = Zeroizing::new([0u8; 32]);
    if bytes.len() != secret.len() {
        return Err(KeyError::Format {
            path: path.to_path_buf(),
        });
    }
    secret.copy_from_slice(&bytes);
    Ok(secret)
}

struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

impl StoreKey {
    pub fn from_bytes(secret: &[u8; 32]) -> StoreKey {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"fttp-agent store key v1").extract(secret);
        // Expanding 32 bytes with HKDF-SHA256 cannot fail (limit: 255 * 32).
        let mut enc = [0u8; 32];
        let mut mac = [0u8; 32];
        let _ = prk.expand(&[b"aes-256-gcm"], Len(32)).and_then(|o| o.fill(&mut enc));
        let _ = prk.expand(&[b"hmac-sha256"], Len(32)).and_then(|o| o.fill(&mut mac));
        let aead = UnboundKey::new(&AES_256_GCM, &enc).map(LessSafeKey::new);
        let mac_key = hmac::Key::new(hmac::HMAC_SHA256, &mac);
        // (ring holds its own copies; ours leave no trace on the stack.)
        enc.zeroize();
        mac.zeroize();
        let mac = mac_key;
        let id = crate::privacy::hex(&hmac::sign(&mac, b"key id").as_ref()[..6]);
        StoreKey {
            // A 32-byte key is always a valid AES-256 key.
            aead: aead.unwrap_or_else(|_| unreachable!()),
            mac,
            id,
        }
    }

    /// Reads a key file: 32 bytes as base64 (what `keygen` writes).
    pub fn load(path: &Path) -> Result<StoreKey, KeyError> {
        Ok(StoreKey::from_bytes(&*read_key_bytes(path)?))
    }

    /// Writes a new random key to `path` (mode 0600); never overwrites.
    pub fn generate(path: &Path) -> Result<(), KeyError> {
        let mut secret = Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(secret.as_mut())
            .map_err(|_| KeyError::Random)?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| KeyError::Create {
                path: path.to_path_buf(),
                source,
            })?;
        writeln!(f, "{}", Zeroizing::new(STANDARD.encode(secret.as_ref())).as_str())
            .and_then(|_| f.sync_all())
            .map_err(|source| KeyError::Create {
                path: path.to_path_buf(),
                source,
            })
    }

    /// A short public name of the key, stored in the store's header so a
    /// wrong key is reported as such before anything is decrypted.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Encrypts `plaintext`, bound to `context` (the record it belongs to, so
    /// that a ciphertext moved to another record fails to open).
    /// Returns nonce, ciphertext and tag as bytes (the store files carry
    /// them as base64, which `open` reads).
    pub(crate) fn seal_raw(&self, context: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let nonce = fresh_nonce();
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + self.aead.algorithm().tag_len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = self.aead.seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(context),
            &mut out[NONCE_LEN..],
        );
        match tag {
            Ok(tag) => out.extend_from_slice(tag.as_ref()),
            Err(_) => panic!("AES-GCM refused a record"),
        }
        out
    }

    /// The plaintext of a sealed record, wiped from memory when dropped.
    pub fn open(&self, what: &'static str, context: &[u8], sealed: &str) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        let raw = STANDARD.decode(sealed).map_err(|_| OpenError::auth(what))?;
        self.open_raw(what, context, &raw)
    }

    /// `open` for the sealed bytes without their base64 form.
    pub(crate) fn open_raw(
        &self,
        what: &'static str,
        context: &[u8],
        raw: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        let err = OpenError::auth(what);
        if raw.len() < NONCE_LEN {
            return Err(err);
        }
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| err.clone())?;
        let mut buf = Zeroizing::new(ct.to_vec());
        let len = self
            .aead
            .open_in_place(nonce, Aad::from(context), &mut buf)
            .map_err(|_| err)?
            .len();
        buf.truncate(len);
        Ok(buf)
    }

    /// Keyed index of a value in a domain ("bf", "psn"): 128 bits of HMAC, as hex.
    pub fn index(&self, domain: &str, value: &[u8]) -> String {
        crate::privacy::hex(&self.index_bytes(domain, value))
    }

    /// The same index as bytes.
    pub(crate) fn index_bytes(&self, domain: &str, value: &[u8]) -> [u8; 16] {
        let mut ctx = hmac::Context::with_key(&self.mac);
        ctx.update(domain.as_bytes());
        ctx.update(&[0]);
        ctx.update(value);
        let mut out = [0u8; 16];
        out.copy_from_slice(&ctx.sign().as_ref()[..16]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn seal_open_and_tamper_detection() {
        let k = StoreKey::from_bytes(&[7; 32]);
        let s = STANDARD.encode(k.seal_raw(b"patient\0p1", b"Mustermann"));
        assert!(!s.contains("Mustermann"));
        assert_eq!(k.open("patient", b"patient\0p1", &s).unwrap().as_slice(), b"Mustermann");
        // Moved to another record, or altered, or another key: refused.
        assert!(k.open("patient", b"patient\0p2", &s).is_err());
        let mut bytes = STANDARD.decode(&s).unwrap();
        bytes[20] ^= 1;
        assert!(k.open("patient", b"patient\0p1", &STANDARD.encode(bytes)).is_err());
        let other = StoreKey::from_bytes(&[8; 32]);
        assert!(other.open("patient", b"patient\0p1", &s).is_err());
        assert_ne!(k.id(), other.id());
        assert_eq!(k.index("bf", b"x"), k.index("bf", b"x"));
        assert_ne!(k.index("bf", b"x"), other.index("bf", b"x"));
        assert_ne!(k.index("bf", b"x"), k.index("psn", b"x"));
    }

    #[test]
    fn nonces_from_the_pool_never_repeat_across_refills_or_threads() {
        let k = StoreKey::from_bytes(&[7; 32]);
        let seal_many = || -> Vec<Vec<u8>> {
            (0..3 * NONCE_POOL / NONCE_LEN)
                .map(|_| k.seal_raw(b"c", b"same")[..NONCE_LEN].to_vec())
                .collect()
        };
        let (a, b) = std::thread::scope(|s| {
            let other = s.spawn(seal_many);
            (seal_many(), other.join().unwrap())
        });
        let all: std::collections::HashSet<Vec<u8>> = a.iter().chain(&b).cloned().collect();
        assert_eq!(all.len(), a.len() + b.len());
        assert!(!all.contains(&vec![0u8; NONCE_LEN]), "a wiped slot was handed out");
    }

    #[test]
    fn keygen_writes_a_private_key_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        StoreKey::generate(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(StoreKey::generate(&p).is_err(), "never overwrites");
        let a = StoreKey::load(&p).unwrap();
        let b = StoreKey::load(&p).unwrap();
        assert_eq!(a.id(), b.id());
        std::fs::write(&p, "short").unwrap();
        assert!(matches!(StoreKey::load(&p), Err(KeyError::Format { .. })));
    }
}
