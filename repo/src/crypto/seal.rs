//! Sealed blobs: what an encrypted repository stores in place of every
//! plaintext blob (chunk, index, pack index, manifest, lease, list).
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `VSNAPSEA` |
//! | 8 | 2 | version (1), little-endian |
//! | 10 | 1 | kind ([`SealKind`]) |
//! | 11 | 5 | zero |
//! | 16 | 32 | salt, random per blob |
//! | 48 | n | ciphertext of the plaintext blob |
//! | 48 + n | 16 | AES-256-GCM tag |
//!
//! Each blob has a key of its own, the BLAKE3 keyed hash of its salt
//! under the repository's sealing key, so the nonce can be fixed (zero):
//! a key is used once unless two salts of 256 random bits meet. That
//! keeps AES-GCM's 96-bit nonce safe however many blobs a repository
//! seals over its lifetime, which random 96-bit nonces under one key are
//! not past about 2^32 blobs.
//!
//! The authenticated data is the header (kind and salt), the ciphertext's
//! length, and the blob's place (its name: a chunk's id, a manifest's
//! path), so a blob moved to another name or kind, cut short or grown
//! does not open.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use vsnap_formats::bytes::le16;

use crate::error::{ErrorKind, Result};

const MAGIC: &[u8; 8] = b"VSNAPSEA";
const VERSION: u16 = 1;
/// The header's length: magic, version, kind, zeros and salt.
pub const HEAD_LEN: usize = 48;
const TAG_LEN: usize = 16;
/// What sealing adds to a blob.
pub const OVERHEAD: usize = HEAD_LEN + TAG_LEN;
/// The salt's length.
pub const SALT_LEN: usize = 32;

/// What a sealed blob holds; bound into its authenticated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SealKind {
    Chunk = 1,
    Index = 2,
    Manifest = 3,
    PackIndex = 4,
    Lease = 5,
    /// A condemnation list or a bad-copies record.
    List = 6,
}

impl SealKind {
    pub fn name(self) -> &'static str {
        match self {
            SealKind::Chunk => "chunk",
            SealKind::Index => "index",
            SealKind::Manifest => "manifest",
            SealKind::PackIndex => "pack index",
            SealKind::Lease => "lease",
            SealKind::List => "list",
        }
    }

    fn from_byte(b: u8) -> Option<SealKind> {
        [
            SealKind::Chunk,
            SealKind::Index,
            SealKind::Manifest,
            SealKind::PackIndex,
            SealKind::Lease,
            SealKind::List,
        ]
        .into_iter()
        .find(|k| *k as u8 == b)
    }
}

/// The AES-256-GCM key of the blob with `salt`.
fn blob_key(seal_key: &[u8; 32], kind: SealKind, salt: &[u8; SALT_LEN]) -> Result<LessSafeKey> {
    let mut k = *blake3::keyed_hash(seal_key, salt).as_bytes();
    let key = UnboundKey::new(&AES_256_GCM, &k);
    zeroize::Zeroize::zeroize(&mut k);
    key.map(LessSafeKey::new)
        .map_err(|_| unsealed(kind, "the AEAD refused the key").into())
}

/// The authenticated data: the header, the ciphertext's length, the place.
fn aad(head: &[u8], ct_len: usize, place: &str) -> Vec<u8> {
    let mut a = Vec::with_capacity(HEAD_LEN + 8 + place.len());
    a.extend_from_slice(head);
    a.extend_from_slice(&(ct_len as u64).to_le_bytes());
    a.extend_from_slice(place.as_bytes());
    a
}

fn unsealed(kind: SealKind, reason: &str) -> ErrorKind {
    ErrorKind::Unsealed {
        what: kind.name(),
        reason: reason.into(),
    }
}

/// `parts`, concatenated, sealed as a blob of `kind` at `place` with the
/// given salt: a pure function, for tests and independent readers to
/// check against; [`super::Keys::seal`] draws the salt.
pub fn seal_with_salt(
    seal_key: &[u8; 32],
    kind: SealKind,
    place: &str,
    salt: &[u8; SALT_LEN],
    parts: &[&[u8]],
) -> Result<Vec<u8>> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(OVERHEAD + len);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(kind as u8);
    out.extend_from_slice(&[0; 5]);
    out.extend_from_slice(salt);
    for p in parts {
        out.extend_from_slice(p);
    }
    let a = aad(&out[..HEAD_LEN], len, place);
    let key = blob_key(seal_key, kind, salt)?;
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(&a),
            &mut out[HEAD_LEN..],
        )
        .map_err(|_| unsealed(kind, "the AEAD refused to seal"))?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Checks a sealed blob's header: that it is one, of `kind`.
pub fn check_head(kind: SealKind, sealed: &[u8]) -> Result<()> {
    crate::blob::need("sealed blob", sealed, OVERHEAD)?;
    crate::blob::magic_and_version(sealed, MAGIC, "sealed blob", "sealed blob", VERSION)?;
    let found = sealed[10];
    if found != kind as u8 {
        let name = SealKind::from_byte(found).map_or("unknown kind", SealKind::name);
        return Err(unsealed(
            kind,
            &format!(
                "it is sealed as a {name} (kind {found}), where a {} belongs",
                kind.name()
            ),
        )
        .into());
    }
    if sealed[11..16].iter().any(|&b| b != 0) {
        return Err(unsealed(kind, "reserved bytes of its header are not zero").into());
    }
    debug_assert_eq!(le16(sealed, 8), VERSION);
    Ok(())
}

/// Opens a sealed blob of `kind` at `place` in place: on success `sealed`
/// holds the plaintext blob, and nothing of a blob that fails to open is
/// ever returned.
pub fn open_in_place(
    seal_key: &[u8; 32],
    kind: SealKind,
    place: &str,
    sealed: &mut Vec<u8>,
) -> Result<()> {
    check_head(kind, sealed)?;
    let mut salt = [0u8; SALT_LEN];
    salt.copy_from_slice(&sealed[16..HEAD_LEN]);
    let ct_len = sealed.len() - OVERHEAD;
    let a = aad(&sealed[..HEAD_LEN], ct_len, place);
    let key = blob_key(seal_key, kind, &salt)?;
    let plain_len = key
        .open_in_place(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(&a),
            &mut sealed[HEAD_LEN..],
        )
        .map_err(|_| {
            unsealed(
                kind,
                &format!(
                    "it does not open as the {} at {place}: altered, cut short, moved from another name, or sealed with another key",
                    kind.name()
                ),
            )
        })?
        .len();
    debug_assert_eq!(plain_len, ct_len);
    sealed.copy_within(HEAD_LEN..HEAD_LEN + ct_len, 0);
    sealed.truncate(ct_len);
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const KEY: [u8; 32] = [9; 32];
    const SALT: [u8; SALT_LEN] = [4; SALT_LEN];

    fn sealed(place: &str) -> Vec<u8> {
        seal_with_salt(&KEY, SealKind::Chunk, place, &SALT, &[b"hello ", b"world"]).unwrap()
    }

    #[test]
    fn a_sealed_blob_opens_to_its_plaintext_and_hides_it() {
        let mut s = sealed("abc");
        assert_eq!(s.len(), 11 + OVERHEAD);
        assert!(!s.windows(5).any(|w| w == b"hello"));
        open_in_place(&KEY, SealKind::Chunk, "abc", &mut s).unwrap();
        assert_eq!(s, b"hello world");
    }

    #[test]
    fn a_blob_altered_moved_or_of_another_kind_does_not_open() {
        let fails = |mut s: Vec<u8>, kind: SealKind, place: &str| {
            let e = open_in_place(&KEY, kind, place, &mut s).unwrap_err();
            e.to_string()
        };
        // Every byte flipped, one at a time: header, ciphertext, tag.
        let good = sealed("abc");
        for i in 0..good.len() {
            let mut s = good.clone();
            s[i] ^= 1;
            let e = fails(s, SealKind::Chunk, "abc");
            assert!(
                e.contains("does not open")
                    || e.contains("bad magic")
                    || e.contains("version")
                    || e.contains("sealed as")
                    || e.contains("reserved"),
                "byte {i}: {e}"
            );
        }
        let e = fails(good.clone(), SealKind::Chunk, "abd");
        assert!(e.contains("does not open as the chunk at abd"), "{e}");
        let e = fails(good.clone(), SealKind::Manifest, "abc");
        assert!(
            e.contains("it is sealed as a chunk (kind 1), where a manifest belongs"),
            "{e}"
        );
        let mut short = good.clone();
        short.pop();
        assert!(fails(short, SealKind::Chunk, "abc").contains("does not open"));
        let e = fails(good[..20].to_vec(), SealKind::Chunk, "abc");
        assert!(e.contains("truncated: sealed blob needs 64 bytes"), "{e}");
        let other = [8u8; 32];
        let mut s = good;
        assert!(open_in_place(&other, SealKind::Chunk, "abc", &mut s).is_err());
    }

    #[test]
    fn each_salt_makes_another_ciphertext() {
        let a = sealed("x");
        let b = seal_with_salt(
            &KEY,
            SealKind::Chunk,
            "x",
            &[5; SALT_LEN],
            &[b"hello world"],
        )
        .unwrap();
        assert_ne!(a[HEAD_LEN..], b[HEAD_LEN..]);
    }
}
