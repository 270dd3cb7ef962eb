//! An image's index: the disk cut into a fixed grid of chunks aligned to
//! virtual-disk offsets, and for each cell the chunk that holds it, or a
//! marker that it is zeros (allocated or not). Restoring reads it cell by
//! cell; deduplication needs nothing more, because a cell's identity is the
//! BLAKE3 of its bytes.
//!
//! Plaintext layout (little-endian), stored inside an index blob:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | virtual size in bytes |
//! | 8 | 8 | chunk size (a power of two) |
//! | 16 | 8 | entry count, `ceil(virtual size / chunk size)` (at least 1) |
//! | 24 | 33 × count | entries: a kind byte (0 unallocated, 1 zero, 2 data), then a BLAKE3 digest (zeros unless data) |

use crate::error::{ErrorKind, Result};
use crate::pipeline::ChunkKind;

const HEAD: usize = 24;
const ENTRY: usize = 33;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    Unallocated,
    Zero,
    Data(blake3::Hash),
}

impl Entry {
    pub fn kind(&self) -> ChunkKind {
        match self {
            Entry::Unallocated => ChunkKind::Unallocated,
            Entry::Zero => ChunkKind::Zero,
            Entry::Data(_) => ChunkKind::Data,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    pub virtual_size: u64,
    pub chunk_size: u64,
    pub entries: Vec<Entry>,
}

fn corrupt(reason: String) -> crate::Error {
    ErrorKind::Corrupt {
        what: "index",
        reason,
    }
    .into()
}

impl Index {
    /// The cells a disk of `virtual_size` has at `chunk_size`.
    pub fn cells(virtual_size: u64, chunk_size: u64) -> u64 {
        virtual_size.div_ceil(chunk_size.max(1)).max(1)
    }

    /// The plaintext length of the index of a disk of `virtual_size` at
    /// `chunk_size`: what an index of that disk must be, and so the most
    /// a reader allocates for one.
    pub fn plain_len(virtual_size: u64, chunk_size: u64) -> u64 {
        (ENTRY as u64)
            .saturating_mul(Index::cells(virtual_size, chunk_size))
            .saturating_add(HEAD as u64)
    }

    /// The byte range of cell `i`.
    pub fn range(&self, i: usize) -> (u64, u64) {
        let start = i as u64 * self.chunk_size;
        (start, self.chunk_size.min(self.virtual_size - start))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEAD + ENTRY * self.entries.len());
        out.extend_from_slice(&self.virtual_size.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for e in &self.entries {
            let (kind, digest) = match e {
                Entry::Unallocated => (0u8, [0u8; 32]),
                Entry::Zero => (1, [0; 32]),
                Entry::Data(h) => (2, *h.as_bytes()),
            };
            out.push(kind);
            out.extend_from_slice(&digest);
        }
        out
    }

    /// Parses an index's plaintext; never panics, whatever the bytes.
    pub fn parse(bytes: &[u8]) -> Result<Index> {
        if bytes.len() < HEAD {
            return Err(corrupt(format!(
                "{} bytes, shorter than its header",
                bytes.len()
            )));
        }
        let word = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(a)
        };
        let (virtual_size, chunk_size, count) = (word(0), word(8), word(16));
        if !chunk_size.is_power_of_two() || chunk_size < 1024 {
            return Err(corrupt(format!("chunk size {chunk_size}")));
        }
        if count != Index::cells(virtual_size, chunk_size) {
            return Err(corrupt(format!(
                "{count} entries for a disk of {virtual_size} bytes in chunks of {chunk_size}"
            )));
        }
        let body = &bytes[HEAD..];
        if body.len() as u64 != count.saturating_mul(ENTRY as u64) {
            return Err(corrupt(format!(
                "{} bytes of entries where {count} need {}",
                body.len(),
                count.saturating_mul(ENTRY as u64)
            )));
        }
        let entries = body
            .chunks_exact(ENTRY)
            .enumerate()
            .map(|(i, e)| {
                let mut digest = [0u8; 32];
                digest.copy_from_slice(&e[1..]);
                match e[0] {
                    0 | 1 if digest != [0; 32] => {
                        Err(corrupt(format!("entry {i} is zeros but names a chunk")))
                    }
                    0 => Ok(Entry::Unallocated),
                    1 => Ok(Entry::Zero),
                    2 => Ok(Entry::Data(blake3::Hash::from_bytes(digest))),
                    k => Err(corrupt(format!("entry {i} has unknown kind {k}"))),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Index {
            virtual_size,
            chunk_size,
            entries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_damage() {
        let index = Index {
            virtual_size: 5000,
            chunk_size: 1024,
            entries: vec![
                Entry::Data(blake3::hash(b"a")),
                Entry::Zero,
                Entry::Unallocated,
                Entry::Unallocated,
                Entry::Data(blake3::hash(b"b")),
            ],
        };
        let bytes = index.to_bytes();
        assert_eq!(Index::parse(&bytes).unwrap(), index);
        assert_eq!(index.range(4), (4096, 904));
        for cut in [0, 10, 24, bytes.len() - 1] {
            assert!(Index::parse(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = bytes.clone();
        bad[HEAD + ENTRY] = 9;
        assert!(Index::parse(&bad).is_err());
        let mut bad = bytes;
        bad[HEAD + ENTRY + 5] = 1;
        assert!(Index::parse(&bad).is_err(), "a zero entry naming a chunk");
    }
}
