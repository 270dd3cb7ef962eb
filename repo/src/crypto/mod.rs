//! Encryption at rest: the keys of an encrypted repository, the sealed
//! blobs it stores, and the key slots that hold its master key.
//!
//! One random master key; everything else is derived from it with
//! BLAKE3's `derive_key`, each use under a context of its own:
//! - chunk ids are BLAKE3 keyed hashes of the plaintext under
//!   [`ID_CONTEXT`]'s key, so equal chunks still deduplicate across every
//!   host holding the key, and a name tells a bucket's reader nothing
//!   (no one can test whether a known file is in a backup);
//! - blobs are sealed ([`seal`]) under [`SEAL_CONTEXT`]'s key;
//! - [`FINGERPRINT_CONTEXT`]'s key, cut to 16 bytes, names the master key
//!   in the repository's config, so two repositories can tell that they
//!   share one (sync then copies ciphertext as it is) without either
//!   revealing it.

pub mod seal;
pub mod slot;

use zeroize::Zeroizing;

use crate::error::{ErrorKind, Result};
pub use seal::SealKind;
pub use slot::{Kdf, KeySlot, SlotKind, Unlock};

/// The context of the chunk-id key.
pub const ID_CONTEXT: &str = "vsnap 2026-12-08 chunk id";
/// The context of the blob-sealing key.
pub const SEAL_CONTEXT: &str = "vsnap 2026-12-08 blob seal";
/// The context of the master key's fingerprint.
pub const FINGERPRINT_CONTEXT: &str = "vsnap 2026-12-08 key fingerprint";

/// The repository's master key: 32 random bytes, wiped when dropped.
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey({})", self.fingerprint())
    }
}

/// `n` bytes from the operating system's generator.
pub fn random<const N: usize>() -> Result<[u8; N]> {
    let mut out = [0u8; N];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut out).map_err(|_| {
        ErrorKind::Io(std::io::Error::other(
            "the operating system's random generator failed",
        ))
    })?;
    Ok(out)
}

impl MasterKey {
    /// A new master key, from the operating system's generator.
    pub fn generate() -> Result<MasterKey> {
        Ok(MasterKey::from_bytes(random()?))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> MasterKey {
        MasterKey(Zeroizing::new(bytes))
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// 16 bytes that name this key, hex: the same for every repository
    /// that shares it, and nothing about the key itself.
    pub fn fingerprint(&self) -> String {
        let k = blake3::derive_key(FINGERPRINT_CONTEXT, &*self.0);
        hex::encode(&k[..16])
    }

    /// The keys a repository works with.
    pub fn keys(&self) -> Keys {
        Keys {
            id: Zeroizing::new(blake3::derive_key(ID_CONTEXT, &*self.0)),
            seal: Zeroizing::new(blake3::derive_key(SEAL_CONTEXT, &*self.0)),
        }
    }
}

/// The keys derived from a master key, wiped when dropped.
pub struct Keys {
    id: Zeroizing<[u8; 32]>,
    seal: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl Keys {
    /// A chunk's id: the keyed hash of its plaintext.
    pub fn chunk_id(&self, plain: &[u8]) -> blake3::Hash {
        blake3::keyed_hash(&self.id, plain)
    }

    /// A hasher that ends in a chunk id, for plaintext that arrives in
    /// pieces.
    pub fn id_hasher(&self) -> blake3::Hasher {
        blake3::Hasher::new_keyed(&self.id)
    }

    /// `parts` sealed as a blob of `kind` at `place`, under a fresh salt.
    pub fn seal(&self, kind: SealKind, place: &str, parts: &[&[u8]]) -> Result<Vec<u8>> {
        seal::seal_with_salt(&self.seal, kind, place, &random()?, parts)
    }

    /// Opens a sealed blob of `kind` at `place` in place.
    pub fn open_in_place(&self, kind: SealKind, place: &str, sealed: &mut Vec<u8>) -> Result<()> {
        seal::open_in_place(&self.seal, kind, place, sealed)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn ids_are_keyed_and_the_same_for_every_holder_of_the_key() {
        let a = MasterKey::from_bytes([1; 32]);
        let b = MasterKey::from_bytes([1; 32]);
        let c = MasterKey::from_bytes([2; 32]);
        let plain = b"some chunk";
        assert_eq!(a.keys().chunk_id(plain), b.keys().chunk_id(plain));
        assert_ne!(a.keys().chunk_id(plain), c.keys().chunk_id(plain));
        assert_ne!(a.keys().chunk_id(plain), blake3::hash(plain));
        let mut h = a.keys().id_hasher();
        h.update(b"some ");
        h.update(b"chunk");
        assert_eq!(h.finalize(), a.keys().chunk_id(plain));
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
        assert_eq!(a.fingerprint().len(), 32);
    }

    #[test]
    fn two_seals_of_one_blob_differ_and_both_open() {
        let keys = MasterKey::generate().unwrap().keys();
        let mut x = keys
            .seal(SealKind::Manifest, "snapshots/a.json", &[b"{}"])
            .unwrap();
        let mut y = keys
            .seal(SealKind::Manifest, "snapshots/a.json", &[b"{}"])
            .unwrap();
        assert_ne!(x, y);
        keys.open_in_place(SealKind::Manifest, "snapshots/a.json", &mut x)
            .unwrap();
        keys.open_in_place(SealKind::Manifest, "snapshots/a.json", &mut y)
            .unwrap();
        assert_eq!((x.as_slice(), y.as_slice()), (&b"{}"[..], &b"{}"[..]));
    }
}
