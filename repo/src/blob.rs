//! The one on-disk envelope for everything the repository stores in
//! binary: chunks and indexes. A fixed header says what the blob is, how
//! it is encoded and how long it is, and carries a CRC32C, so rot is found
//! by reading the file once, before any decompression.
//!
//! Layout (little-endian), 40 bytes of header then the payload:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic: `VSNAPCHK` (chunk) or `VSNAPIDX` (index) |
//! | 8 | 2 | format version, 1 |
//! | 10 | 1 | encoding: 0 raw, 1 zstd (one frame) |
//! | 11 | 5 | zero |
//! | 16 | 8 | payload length (the stored bytes) |
//! | 24 | 8 | plaintext length |
//! | 32 | 4 | CRC32C of bytes 0..32, then of the payload |
//! | 36 | 4 | zero (checked) |
//!
//! The CRC covers the header too, so a flipped length or encoding byte is
//! caught like a flipped payload byte.

use crate::error::{ErrorKind, Result};
use vsnap_formats::bytes::{le16, le32, le64};

pub const HEADER_LEN: usize = 40;
pub const VERSION: u16 = 1;

/// What a blob holds; each kind has its own magic, so a chunk can never
/// be mistaken for an index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobKind {
    Chunk,
    Index,
}

impl BlobKind {
    fn magic(self) -> &'static [u8; 8] {
        match self {
            BlobKind::Chunk => b"VSNAPCHK",
            BlobKind::Index => b"VSNAPIDX",
        }
    }

    fn name(self) -> &'static str {
        match self {
            BlobKind::Chunk => "chunk",
            BlobKind::Index => "index",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Raw,
    Zstd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub encoding: Encoding,
    pub stored_len: u64,
    pub plain_len: u64,
    pub crc: u32,
}

impl Header {
    /// The whole blob's size on disk (saturating: a header may claim any
    /// length, and no file is that long).
    pub fn blob_len(&self) -> u64 {
        (HEADER_LEN as u64).saturating_add(self.stored_len)
    }
}

/// The header for `payload`, which decodes to `plain_len` bytes.
pub fn encode_header(
    kind: BlobKind,
    encoding: Encoding,
    payload: &[u8],
    plain_len: u64,
) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(kind.magic());
    h[8..10].copy_from_slice(&VERSION.to_le_bytes());
    h[10] = match encoding {
        Encoding::Raw => 0,
        Encoding::Zstd => 1,
    };
    h[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    h[24..32].copy_from_slice(&plain_len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h[..32]), payload);
    h[32..36].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Refuses `bytes` shorter than the `needed` a header named `what`
/// takes, before a field of it is read.
pub(crate) fn need(what: &'static str, bytes: &[u8], needed: usize) -> Result<()> {
    if bytes.len() < needed {
        return Err(ErrorKind::Truncated {
            what,
            needed: needed as u64,
            at: 0,
            available: bytes.len() as u64,
        }
        .into());
    }
    Ok(())
}

/// Checks the first ten bytes every on-disk structure of the repository
/// opens with (blob headers, pack tails, pack indexes): an 8-byte magic,
/// named `what` when it is wrong, then a little-endian version, which
/// must be `version` (`versioned` names the format refused). `bytes` is at
/// least ten bytes long: the caller checked its length first.
pub(crate) fn magic_and_version(
    bytes: &[u8],
    magic: &'static [u8; 8],
    what: &'static str,
    versioned: &'static str,
    version: u16,
) -> Result<()> {
    let found = bytes.get(..8).unwrap_or_default();
    if found != magic {
        return Err(ErrorKind::BadMagic {
            what,
            expected: std::str::from_utf8(magic).unwrap_or_default(),
            found: String::from_utf8_lossy(found).into_owned(),
        }
        .into());
    }
    let have = le16(bytes, 8);
    if have != version {
        return Err(ErrorKind::UnsupportedVersion {
            what: versioned,
            found: u32::from(have),
            expected: u32::from(version),
        }
        .into());
    }
    Ok(())
}

/// Parses a header without the payload: enough to check a blob's length
/// against its file's, cheaply, before trusting it.
pub fn parse_header(kind: BlobKind, bytes: &[u8]) -> Result<Header> {
    need("blob header", bytes, HEADER_LEN)?;
    magic_and_version(bytes, kind.magic(), kind.name(), kind.name(), VERSION)?;
    let encoding = match bytes[10] {
        0 => Encoding::Raw,
        1 => Encoding::Zstd,
        other => {
            return Err(ErrorKind::Corrupt {
                what: kind.name(),
                reason: format!("unknown encoding {other}"),
            }
            .into())
        }
    };
    if bytes[36..40] != [0; 4] {
        return Err(ErrorKind::Corrupt {
            what: kind.name(),
            reason: "reserved header bytes are not zero".into(),
        }
        .into());
    }
    let crc = le32(bytes, 32);
    Ok(Header {
        encoding,
        stored_len: le64(bytes, 16),
        plain_len: le64(bytes, 24),
        crc,
    })
}

/// Checks a whole blob (header, length and CRC) and returns its header
/// and payload.
pub fn check(kind: BlobKind, bytes: &[u8]) -> Result<(Header, &[u8])> {
    let header = parse_header(kind, bytes)?;
    if bytes.len() as u64 != header.blob_len() {
        return Err(ErrorKind::Truncated {
            what: kind.name(),
            needed: header.blob_len(),
            at: 0,
            available: bytes.len() as u64,
        }
        .into());
    }
    let payload = &bytes[HEADER_LEN..];
    let computed = crc32c::crc32c_append(crc32c::crc32c(&bytes[..32]), payload);
    if computed != header.crc {
        return Err(ErrorKind::BadChecksum {
            what: kind.name(),
            stored: header.crc,
            computed,
        }
        .into());
    }
    Ok((header, payload))
}

/// Checks a blob and decodes its plaintext into `out`, which must be the
/// plaintext's length.
pub fn decode_into(kind: BlobKind, bytes: &[u8], out: &mut [u8]) -> Result<()> {
    let (header, payload) = check(kind, bytes)?;
    let corrupt = |reason: String| ErrorKind::Corrupt {
        what: kind.name(),
        reason,
    };
    if header.plain_len != out.len() as u64 {
        return Err(corrupt(format!(
            "holds {} bytes of plaintext where {} were expected",
            header.plain_len,
            out.len()
        ))
        .into());
    }
    match header.encoding {
        Encoding::Raw if payload.len() == out.len() => out.copy_from_slice(payload),
        Encoding::Raw => {
            return Err(corrupt("raw payload and plaintext lengths differ".into()).into())
        }
        Encoding::Zstd => {
            let n = zstd::bulk::decompress_to_buffer(payload, out)
                .map_err(|e| corrupt(format!("zstd: {e}")))?;
            if n != out.len() {
                return Err(corrupt(format!("zstd gave {n} bytes, not {}", out.len())).into());
            }
        }
    }
    Ok(())
}

/// Checks and decodes a blob whose plaintext length is not known ahead
/// (an index); the header's length is trusted only up to `limit`.
pub fn decode(kind: BlobKind, bytes: &[u8], limit: u64) -> Result<Vec<u8>> {
    let header = parse_header(kind, bytes)?;
    if header.plain_len > limit {
        return Err(ErrorKind::Corrupt {
            what: kind.name(),
            reason: format!("claims {} bytes of plaintext", header.plain_len),
        }
        .into());
    }
    let mut out = vec![0u8; header.plain_len as usize];
    decode_into(kind, bytes, &mut out)?;
    Ok(out)
}

/// Encodes `plain` whole: zstd at `level` when that is smaller, raw
/// otherwise. Returns the header and the payload to write after it.
pub fn encode(kind: BlobKind, plain: &[u8], level: i32) -> Result<([u8; HEADER_LEN], Vec<u8>)> {
    let z = zstd::bulk::compress(plain, level).map_err(crate::Error::from)?;
    Ok(if z.len() < plain.len() {
        (
            encode_header(kind, Encoding::Zstd, &z, plain.len() as u64),
            z,
        )
    } else {
        (
            encode_header(kind, Encoding::Raw, plain, plain.len() as u64),
            plain.to_vec(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(plain: &[u8]) -> Vec<u8> {
        let (h, p) = encode(BlobKind::Chunk, plain, 1).unwrap();
        [&h[..], &p].concat()
    }

    #[test]
    fn round_trips_compressed_and_raw() {
        let text = b"abcabcabc".repeat(1000);
        let b = blob(&text);
        assert!(b.len() < text.len());
        assert_eq!(decode(BlobKind::Chunk, &b, 1 << 20).unwrap(), text);
        let mut random = vec![0u8; 4096];
        blake3::Hasher::new().finalize_xof().fill(&mut random);
        let b = blob(&random);
        assert_eq!(
            parse_header(BlobKind::Chunk, &b).unwrap().encoding,
            Encoding::Raw
        );
        assert_eq!(decode(BlobKind::Chunk, &b, 1 << 20).unwrap(), random);
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let b = blob(&b"xyz".repeat(100));
        for i in 0..b.len() * 8 {
            let mut bad = b.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(
                decode(BlobKind::Chunk, &bad, 1 << 20).is_err(),
                "bit {i} flipped went unnoticed"
            );
        }
    }

    #[test]
    fn wrong_kind_and_truncation_are_named() {
        let b = blob(b"hello");
        let e = decode(BlobKind::Index, &b, 100).unwrap_err();
        assert!(matches!(
            e.kind(),
            ErrorKind::BadMagic { what: "index", .. }
        ));
        let e = check(BlobKind::Chunk, &b[..b.len() - 1]).unwrap_err();
        assert!(matches!(
            e.kind(),
            ErrorKind::Truncated { what: "chunk", .. }
        ));
    }
}
