//! Pack indexes: which pack holds which chunk, so a reader fetches a
//! chunk with one ranged GET and no listing of packs. Both the bucket's
//! readers and its uploader use this module; it uses neither.
//!
//! A pack index is a header, then a record per pack, little-endian:
//!
//! | part | size | field |
//! |---|---|---|
//! | header | 24 | magic `VSNAPPIX` 8, version u16 (1), zero 6, number of records u64 |
//! | record | 48 + T | pack name 32, the pack's length u64, T u64, then the pack's own trailer (T bytes) |
//!
//! The trailer is the pack's, byte for byte, so a pack index is checked by
//! the same parser as a pack, and its records say all a reader needs to
//! fetch a chunk with one ranged GET. Pack indexes are cached on the host
//! (they are immutable and named by their hash, so a cached copy whose hash
//! matches its name is the object).

use std::collections::HashSet;

use crate::error::{Error, ErrorKind, Result};
use crate::pack::{self, PackEntry};
use vsnap_formats::bytes::le64;

/// Where a bucket keeps its packs and its pack indexes.
pub(super) const PACKS: &str = "packs/";
pub(crate) const PACK_INDEXES: &str = "packindex/";

const MAGIC: &[u8; 8] = b"VSNAPPIX";
const VERSION: u16 = 1;
/// How many bytes of a pack index [`parse_head`] needs.
pub(super) const HEAD_LEN: usize = 24;
const RECORD_HEAD: usize = 48;

/// A pack as a pack index records it: its name, length and trailer.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub name: blake3::Hash,
    pub len: u64,
    pub trailer: Vec<u8>,
}

pub(super) fn write_cache(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().ok_or(std::io::ErrorKind::InvalidInput)?;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.tmp", uuid::Uuid::new_v4().simple()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

pub(super) fn encode_pack_index(packs: &[Record]) -> Vec<u8> {
    let total: usize = packs.iter().map(|p| RECORD_HEAD + p.trailer.len()).sum();
    let mut out = Vec::with_capacity(HEAD_LEN + total);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&(packs.len() as u64).to_le_bytes());
    for p in packs {
        out.extend_from_slice(p.name.as_bytes());
        out.extend_from_slice(&p.len.to_le_bytes());
        out.extend_from_slice(&(p.trailer.len() as u64).to_le_bytes());
        out.extend_from_slice(&p.trailer);
    }
    out
}

/// The pack index a bucket would hold for `packs` (each a whole pack
/// object), as its uploader writes one: for repairs, and for tests that
/// forge a bucket's objects as a hostile writer would.
pub fn pack_index_of(packs: &[&[u8]]) -> Result<Vec<u8>> {
    let mut records = Vec::with_capacity(packs.len());
    for pack in packs {
        let len = pack.len() as u64;
        let trailer = pack::trailer_len(pack, len)?;
        records.push(Record {
            name: blake3::hash(pack),
            len,
            trailer: pack[(len - trailer) as usize..].to_vec(),
        });
    }
    Ok(encode_pack_index(&records))
}

fn corrupt(reason: String) -> Error {
    ErrorKind::Corrupt {
        what: "pack index",
        reason,
    }
    .into()
}

/// The packs a pack index lists, each with its entries; a pure function
/// that trusts nothing: every record's trailer is parsed as its pack's
/// would be, and must be exactly as long as it says.
pub fn parse_pack_index(bytes: &[u8]) -> Result<Vec<(blake3::Hash, Vec<PackEntry>)>> {
    Ok(pack_index_records(bytes)?
        .into_iter()
        .map(|(r, entries)| (r.name, entries))
        .collect())
}

/// The number of packs a pack index of `size` bytes lists, from its first
/// bytes `head` (at least [`HEAD_LEN`]): so that a reader can refuse an
/// object that is no pack index, or claims more packs than its size can
/// hold, before fetching the rest of it.
pub(super) fn parse_head(head: &[u8], size: u64) -> Result<u64> {
    crate::blob::need("pack index header", head, HEAD_LEN)?;
    crate::blob::magic_and_version(head, MAGIC, "pack index", "pack index", VERSION)?;
    if head[10..16].iter().any(|&b| b != 0) {
        return Err(corrupt("reserved bytes of the header are not zero".into()));
    }
    let count = le64(head, 16);
    let most = size.saturating_sub(HEAD_LEN as u64) / (RECORD_HEAD + pack::TAIL_LEN) as u64;
    if count > most {
        return Err(corrupt(format!(
            "it claims {count} packs; {size} bytes hold at most {most}"
        )));
    }
    Ok(count)
}

/// [`parse_pack_index`], keeping each record whole, for gc to write the
/// records it keeps into a new pack index.
pub(super) fn pack_index_records(bytes: &[u8]) -> Result<Vec<(Record, Vec<PackEntry>)>> {
    let count = parse_head(bytes, bytes.len() as u64)?;
    let mut out = Vec::with_capacity(count as usize);
    let mut seen = HashSet::new();
    let mut at = HEAD_LEN;
    for i in 0..count {
        let rest = &bytes[at..];
        if rest.len() < RECORD_HEAD {
            return Err(corrupt(format!("record {i} is cut short at byte {at}")));
        }
        let mut name = [0u8; 32];
        name.copy_from_slice(&rest[..32]);
        let name = blake3::Hash::from_bytes(name);
        let pack_len = le64(rest, 32);
        let trailer_len = le64(rest, 40);
        let body = &rest[RECORD_HEAD..];
        if trailer_len > body.len() as u64 {
            return Err(corrupt(format!(
                "record {i} claims a trailer of {trailer_len} bytes; {} remain",
                body.len()
            )));
        }
        let trailer = &body[..trailer_len as usize];
        let wanted = pack::trailer_len(trailer, pack_len)
            .map_err(|e| corrupt(format!("record {i}: {e}")))?;
        if wanted != trailer_len {
            return Err(corrupt(format!(
                "record {i} holds {trailer_len} bytes of trailer; its tail says {wanted}"
            )));
        }
        let entries = pack::parse_trailer(trailer, pack_len)
            .map_err(|e| corrupt(format!("record {i}: {e}")))?;
        if !seen.insert(name) {
            return Err(corrupt(format!("record {i} lists pack {name} again")));
        }
        out.push((
            Record {
                name,
                len: pack_len,
                trailer: trailer.to_vec(),
            },
            entries,
        ));
        at += RECORD_HEAD + trailer_len as usize;
    }
    if at != bytes.len() {
        return Err(corrupt(format!(
            "{} bytes follow the last record",
            bytes.len() - at
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::PackBuilder;

    fn pack_of(blobs: &[(u8, usize)]) -> Record {
        let mut b = PackBuilder::new();
        for &(tag, len) in blobs {
            let blob = vec![tag; len];
            b.push(blake3::hash(&blob), &[&blob]).unwrap();
        }
        let (bytes, name, entries) = b.finish();
        let end = entries.last().map_or(0, |e| e.offset + u64::from(e.length)) as usize;
        Record {
            name,
            len: bytes.len() as u64,
            trailer: bytes[end..].to_vec(),
        }
    }

    #[test]
    fn pack_indexes_round_trip_and_refuse_damage() {
        let packs = [pack_of(&[(1, 100), (2, 50)]), pack_of(&[(3, 64)])];
        let bytes = encode_pack_index(&packs);
        let parsed = parse_pack_index(&bytes).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].0, packs[0].name);
        assert_eq!(parsed[0].1.len(), 2);
        assert_eq!(parsed[0].1[1].offset, 100);
        assert_eq!(parsed[1].1[0].length, 64);

        let kind = |b: &[u8]| parse_pack_index(b).unwrap_err().to_string();
        assert!(kind(&bytes[..10]).contains("truncated"));
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(kind(&bad).contains("bad magic"));
        let mut bad = bytes.clone();
        bad[16] = 200;
        assert!(kind(&bad).contains("claims 200 packs"));
        // A flipped entry byte fails the trailer's CRC.
        let mut bad = bytes.clone();
        bad[HEAD_LEN + RECORD_HEAD + 40] ^= 1;
        assert!(kind(&bad).contains("checksum"), "{}", kind(&bad));
        let mut bad = bytes.clone();
        bad.push(0);
        assert!(kind(&bad).contains("1 bytes follow"));
        let twice = encode_pack_index(&[pack_of(&[(1, 100)]), pack_of(&[(1, 100)])]);
        assert!(kind(&twice).contains("again"));
    }

    proptest::proptest! {
        #[test]
        fn pack_index_parser_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let _ = parse_pack_index(&bytes);
        }
    }
}
