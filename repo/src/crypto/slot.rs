//! Key slots: the repository's master key, wrapped once per way in
//! (a passphrase, a key file), each slot a small JSON object of its own
//! under `keys/`, so a passphrase changes without re-sealing a byte of
//! data and an appliance holds a key file instead of a passphrase.
//!
//! ```json
//! {"version": 1, "kind": "passphrase", "created": "2026-12-08T02:00:00Z",
//!  "kdf": {"name": "argon2id", "m_kib": 65536, "t": 3, "p": 1},
//!  "salt": "<32 bytes, hex>", "wrapped": "<48 bytes, hex>"}
//! ```
//!
//! The key that wraps (KEK) is Argon2id (version 0x13, 32 bytes out) of
//! the passphrase and the salt, or, for a key file, BLAKE3's `derive_key`
//! with the context [`KEY_FILE_CONTEXT`] of the salt followed by the
//! file's bytes. `wrapped` is the master key sealed with AES-256-GCM
//! under the KEK, nonce zero (each slot's salt makes its KEK its own),
//! the authenticated data [`WRAP_AAD`] followed by the slot's kind.
//!
//! A slot is hostile input like any object of the repository: its size,
//! and its Argon2 parameters (which decide how much memory unwrapping
//! allocates), are bounded before anything is computed.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::MasterKey;
use crate::error::{ErrorKind, Result};

/// The most bytes a key slot object may hold.
pub const SLOT_LIMIT: u64 = 4096;
/// The BLAKE3 context that turns a key file and a salt into a KEK.
pub const KEY_FILE_CONTEXT: &str = "vsnap 2026-12-08 key file slot";
/// The authenticated data's prefix for a wrapped master key.
pub const WRAP_AAD: &[u8] = b"vsnap key slot 1 ";
/// The most memory a slot may ask Argon2id for: unwrapping runs before
/// anything else, within the engine's default budget (256 MiB).
pub const MAX_M_KIB: u32 = 256 * 1024;
/// The most passes a slot may ask for (each costs `m_kib` of work).
pub const MAX_T: u32 = 32;
/// The most lanes a slot may ask for.
pub const MAX_P: u32 = 8;

/// The costs of a new passphrase slot: 128 MiB and 3 passes, 0.52 s
/// on this project's 2-vCPU EPYC test machine (benches/aead.rs), inside
/// the 0.5 to 1 s that makes guessing dear and opening still quick.
pub fn default_kdf() -> Kdf {
    Kdf {
        name: "argon2id".into(),
        m_kib: 128 * 1024,
        t: 3,
        p: 1,
    }
}

/// How a slot opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlotKind {
    Passphrase,
    KeyFile,
}

/// Argon2id's cost parameters, as a slot stores them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kdf {
    /// Always `argon2id`.
    pub name: String,
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
}

/// One key slot, as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySlot {
    pub version: u32,
    pub kind: SlotKind,
    pub created: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kdf: Option<Kdf>,
    pub salt: String,
    pub wrapped: String,
}

/// What the operator gives to open a slot.
#[derive(Debug, Clone, Copy)]
pub enum Unlock<'a> {
    Passphrase(&'a [u8]),
    KeyFile(&'a [u8]),
}

impl Unlock<'_> {
    fn kind(&self) -> SlotKind {
        match self {
            Unlock::Passphrase(_) => SlotKind::Passphrase,
            Unlock::KeyFile(_) => SlotKind::KeyFile,
        }
    }
}

fn bad_slot(reason: String) -> ErrorKind {
    ErrorKind::Corrupt {
        what: "key slot",
        reason,
    }
}

impl Kdf {
    /// Argon2id with these costs, once they are checked against the
    /// bounds: a slot asking for more is refused before a byte of it is
    /// allocated.
    fn checked(&self) -> Result<argon2::Argon2<'static>> {
        if self.name != "argon2id" {
            return Err(bad_slot(format!(
                "its key derivation is {:?}; vsnap reads argon2id",
                self.name
            ))
            .into());
        }
        for (what, value, most) in [
            ("memory", self.m_kib, MAX_M_KIB),
            ("passes", self.t, MAX_T),
            ("lanes", self.p, MAX_P),
        ] {
            if value > most {
                let unit = if what == "memory" { " KiB" } else { "" };
                return Err(bad_slot(format!(
                    "it asks Argon2id for {value}{unit} of {what}; vsnap allows at most {most}{unit}"
                ))
                .into());
            }
        }
        let params = argon2::Params::new(self.m_kib, self.t, self.p, Some(32))
            .map_err(|e| bad_slot(format!("its Argon2id parameters: {e}")))?;
        Ok(argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            params,
        ))
    }
}

/// The KEK of a slot of `kind` with `salt`, from what unlocks it.
fn kek(kdf: Option<&Kdf>, salt: &[u8], unlock: Unlock<'_>) -> Result<Zeroizing<[u8; 32]>> {
    let mut out = Zeroizing::new([0u8; 32]);
    match (unlock, kdf) {
        (Unlock::Passphrase(p), Some(kdf)) => kdf
            .checked()?
            .hash_password_into(p, salt, &mut *out)
            .map_err(|e| bad_slot(format!("Argon2id: {e}")))?,
        (Unlock::Passphrase(_), None) => {
            return Err(bad_slot("a passphrase slot without its kdf".into()).into())
        }
        (Unlock::KeyFile(k), _) => {
            let mut material = Zeroizing::new(Vec::with_capacity(salt.len() + k.len()));
            material.extend_from_slice(salt);
            material.extend_from_slice(k);
            *out = blake3::derive_key(KEY_FILE_CONTEXT, &material);
        }
    }
    Ok(out)
}

fn aead_key(kek: &[u8; 32]) -> Result<LessSafeKey> {
    UnboundKey::new(&AES_256_GCM, kek)
        .map(LessSafeKey::new)
        .map_err(|_| bad_slot("the AEAD refused the key".into()).into())
}

fn aad(kind: SlotKind) -> Vec<u8> {
    let name = match kind {
        SlotKind::Passphrase => "passphrase",
        SlotKind::KeyFile => "key-file",
    };
    [WRAP_AAD, name.as_bytes()].concat()
}

/// A new slot wrapping `master` for `unlock`, with `salt` (random, 32
/// bytes) and, for a passphrase, `kdf`'s costs; `created` is RFC 3339.
pub fn make_slot(
    master: &MasterKey,
    unlock: Unlock<'_>,
    kdf: Kdf,
    salt: [u8; 32],
    created: String,
) -> Result<KeySlot> {
    let kdf = matches!(unlock, Unlock::Passphrase(_)).then_some(kdf);
    let kek = kek(kdf.as_ref(), &salt, unlock)?;
    let mut wrapped = master.bytes().to_vec();
    let tag = aead_key(&kek)?
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(aad(unlock.kind())),
            &mut wrapped,
        )
        .map_err(|_| bad_slot("the AEAD refused to seal".into()))?;
    wrapped.extend_from_slice(tag.as_ref());
    Ok(KeySlot {
        version: 1,
        kind: unlock.kind(),
        created,
        kdf,
        salt: hex::encode(salt),
        wrapped: hex::encode(wrapped),
    })
}

/// A slot from its stored bytes: bounded, and every field checked.
pub fn parse_slot(bytes: &[u8]) -> Result<KeySlot> {
    if bytes.len() as u64 > SLOT_LIMIT {
        return Err(ErrorKind::TooLarge {
            what: "key slot",
            claimed: bytes.len() as u64,
            limit: SLOT_LIMIT,
        }
        .into());
    }
    let slot: KeySlot =
        serde_json::from_slice(bytes).map_err(|e| bad_slot(format!("not a key slot: {e}")))?;
    if slot.version != 1 {
        return Err(ErrorKind::UnsupportedVersion {
            what: "key slot",
            found: slot.version,
            expected: 1,
        }
        .into());
    }
    let salt = hex::decode(&slot.salt).map_err(|e| bad_slot(format!("its salt: {e}")))?;
    let wrapped =
        hex::decode(&slot.wrapped).map_err(|e| bad_slot(format!("its wrapped key: {e}")))?;
    if salt.len() != 32 || wrapped.len() != 48 {
        return Err(bad_slot(format!(
            "its salt is {} bytes and its wrapped key {}; a slot holds 32 and 48",
            salt.len(),
            wrapped.len()
        ))
        .into());
    }
    match (slot.kind, &slot.kdf) {
        (SlotKind::Passphrase, Some(kdf)) => {
            kdf.checked()?;
        }
        (SlotKind::Passphrase, None) => {
            return Err(bad_slot("a passphrase slot without its kdf".into()).into())
        }
        (SlotKind::KeyFile, _) => {}
    }
    Ok(slot)
}

/// The master key `slot` wraps, when `unlock` opens it: `None` when it
/// is of another kind or the passphrase (or key file) is not its.
pub fn unwrap_slot(slot: &KeySlot, unlock: Unlock<'_>) -> Result<Option<MasterKey>> {
    if slot.kind != unlock.kind() {
        return Ok(None);
    }
    let salt = hex::decode(&slot.salt).map_err(|e| bad_slot(format!("its salt: {e}")))?;
    let mut wrapped = Zeroizing::new(
        hex::decode(&slot.wrapped).map_err(|e| bad_slot(format!("its wrapped key: {e}")))?,
    );
    let kek = kek(slot.kdf.as_ref(), &salt, unlock)?;
    let Ok(plain) = aead_key(&kek)?.open_in_place(
        Nonce::assume_unique_for_key([0; 12]),
        Aad::from(aad(slot.kind)),
        &mut wrapped,
    ) else {
        return Ok(None);
    };
    let mut key = [0u8; 32];
    if plain.len() != key.len() {
        return Err(bad_slot(format!("its key is {} bytes, not 32", plain.len())).into());
    }
    key.copy_from_slice(plain);
    Ok(Some(MasterKey::from_bytes(key)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn cheap() -> Kdf {
        Kdf {
            name: "argon2id".into(),
            m_kib: 64,
            t: 1,
            p: 1,
        }
    }

    fn slot_for(master: &MasterKey, unlock: Unlock<'_>) -> KeySlot {
        let slot = make_slot(master, unlock, cheap(), [3; 32], "now".into()).unwrap();
        parse_slot(&serde_json::to_vec(&slot).unwrap()).unwrap()
    }

    #[test]
    fn a_slot_opens_with_its_passphrase_or_key_file_and_nothing_else() {
        let master = MasterKey::from_bytes([42; 32]);
        let p = slot_for(&master, Unlock::Passphrase(b"correct horse"));
        let got = unwrap_slot(&p, Unlock::Passphrase(b"correct horse"))
            .unwrap()
            .unwrap();
        assert_eq!(got.bytes(), master.bytes());
        assert!(unwrap_slot(&p, Unlock::Passphrase(b"wrong"))
            .unwrap()
            .is_none());
        assert!(unwrap_slot(&p, Unlock::KeyFile(b"correct horse"))
            .unwrap()
            .is_none());
        let k = slot_for(&master, Unlock::KeyFile(&[7; 32]));
        assert!(k.kdf.is_none());
        let got = unwrap_slot(&k, Unlock::KeyFile(&[7; 32])).unwrap().unwrap();
        assert_eq!(got.bytes(), master.bytes());
        assert!(unwrap_slot(&k, Unlock::KeyFile(&[8; 32]))
            .unwrap()
            .is_none());
    }

    #[test]
    fn absurd_or_damaged_slots_are_refused_before_any_work() {
        let master = MasterKey::from_bytes([1; 32]);
        let good = serde_json::to_value(slot_for(&master, Unlock::Passphrase(b"pw"))).unwrap();
        let refused = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut v = good.clone();
            edit(&mut v);
            parse_slot(&serde_json::to_vec(&v).unwrap())
                .unwrap_err()
                .to_string()
        };
        let e = refused(&|v| v["kdf"]["m_kib"] = 4_194_304.into());
        assert!(
            e.contains(
                "it asks Argon2id for 4194304 KiB of memory; vsnap allows at most 262144 KiB"
            ),
            "{e}"
        );
        let e = refused(&|v| v["kdf"]["t"] = 1_000_000.into());
        assert!(
            e.contains("1000000 of passes; vsnap allows at most 32"),
            "{e}"
        );
        let e = refused(&|v| v["kdf"]["p"] = 255.into());
        assert!(e.contains("255 of lanes; vsnap allows at most 8"), "{e}");
        let e = refused(&|v| v["kdf"]["name"] = "scrypt".into());
        assert!(e.contains("its key derivation is \"scrypt\""), "{e}");
        let e = refused(&|v| v["wrapped"] = "00".into());
        assert!(
            e.contains("its salt is 32 bytes and its wrapped key 1"),
            "{e}"
        );
        let e = refused(&|v| v["version"] = 2.into());
        assert!(e.contains("unsupported key slot version"), "{e}");
        let e = refused(&|v| v["extra"] = 1.into());
        assert!(e.contains("not a key slot"), "{e}");
        let e = refused(&|v| {
            v.as_object_mut().unwrap().remove("kdf");
        });
        assert!(e.contains("a passphrase slot without its kdf"), "{e}");
        let big = vec![b' '; 5000];
        let e = parse_slot(&big).unwrap_err().to_string();
        assert!(
            e.contains("key slot claims 5000 bytes, more than the 4096"),
            "{e}"
        );
    }
}
