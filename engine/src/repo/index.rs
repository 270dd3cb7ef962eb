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
//! | 24 + 33 × count | ⌈⌈virtual size / piece size⌉ / 8⌉ | the piece map, when the manifest gives the disk a piece size: bit `i` (LSB first) set when piece `i` holds a non-zero byte |
//!
//! The piece map lets a restore allocate a dynamic target's blocks where
//! the disk holds data, not wherever a chunk does: a 4 MiB chunk with 512
//! bytes written would otherwise allocate every block it spans. Pieces are
//! a power of two from 4 KiB up to the chunk size; the backup takes the
//! source's block size, at most 64 KiB. Indexes written before the map
//! (no piece size in their manifest) have none, and restore as before.

use crate::digest::is_zero;
use crate::error::{ErrorKind, Result};
use crate::pipeline::ChunkKind;

const HEAD: usize = 24;
const ENTRY: usize = 33;

/// The smallest and the largest piece a backup chooses (never more than
/// the chunk size, so a repository of 1 or 2 KiB chunks has pieces of its
/// chunk size).
pub const MIN_PIECE: u64 = 4 << 10;
pub const MAX_PIECE: u64 = 64 << 10;

/// The smallest piece an index may have: the smallest chunk.
pub const LEAST_PIECE: u64 = 1 << 10;

/// Whether `piece` is a piece size an index at `chunk_size` may have.
pub fn valid_piece(piece: u64, chunk_size: u64) -> bool {
    piece.is_power_of_two() && (LEAST_PIECE..=chunk_size).contains(&piece)
}

/// Which pieces of a disk hold non-zero bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pieces {
    pub size: u64,
    pub bits: Vec<u8>,
}

impl Pieces {
    /// An all-clear map for a disk of `virtual_size`.
    pub fn new(size: u64, virtual_size: u64) -> Pieces {
        Pieces {
            size,
            bits: vec![0; Pieces::bytes(size, virtual_size) as usize],
        }
    }

    /// The map's length in bytes.
    pub fn bytes(size: u64, virtual_size: u64) -> u64 {
        virtual_size.div_ceil(size.max(1)).div_ceil(8)
    }

    pub fn get(&self, piece: u64) -> bool {
        self.bits
            .get((piece / 8) as usize)
            .is_some_and(|b| b & (1 << (piece % 8)) != 0)
    }

    fn set(&mut self, piece: u64) {
        if let Some(b) = self.bits.get_mut((piece / 8) as usize) {
            *b |= 1 << (piece % 8);
        }
    }

    /// The pieces of `data` (which starts at disk offset `offset`, a
    /// multiple of `size`) that hold a non-zero byte. Computed apart from
    /// [`Pieces::set_all`], so workers scan their chunks in parallel and
    /// share the map only to set a few bits.
    pub fn nonzero(size: u64, offset: u64, data: &[u8]) -> Vec<u64> {
        data.chunks(size.max(1) as usize)
            .enumerate()
            .filter(|(_, piece)| !is_zero(piece))
            .map(|(i, _)| offset / size.max(1) + i as u64)
            .collect()
    }

    pub fn set_all(&mut self, pieces: &[u64]) {
        for &p in pieces {
            self.set(p);
        }
    }

    /// Marks the pieces of `data` at `offset` that hold a non-zero byte.
    pub fn mark(&mut self, offset: u64, data: &[u8]) {
        let set = Pieces::nonzero(self.size, offset, data);
        self.set_all(&set);
    }

    /// Whether the pieces of `data` at `offset` are marked exactly as its
    /// content says; `Some(piece)` names the first that is not.
    pub fn check(&self, offset: u64, data: &[u8]) -> Option<u64> {
        data.chunks(self.size as usize)
            .enumerate()
            .map(|(i, piece)| (offset / self.size + i as u64, !is_zero(piece)))
            .find(|&(at, nonzero)| self.get(at) != nonzero)
            .map(|(at, _)| at)
    }

    /// The piece size a backup uses for a source with `block_size`: the
    /// block size, within [`MIN_PIECE`]..=[`MAX_PIECE`] and the chunk size.
    pub fn size_for(block_size: Option<u32>, chunk_size: u64) -> u64 {
        let want = block_size.map_or(MAX_PIECE, u64::from);
        let p = want.clamp(MIN_PIECE, MAX_PIECE);
        let p = if p.is_power_of_two() {
            p
        } else {
            p.next_power_of_two() / 2
        };
        p.min(chunk_size)
    }
}

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
    pub pieces: Option<Pieces>,
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
    /// `chunk_size`, with a piece map of `piece_size` if any: what an index
    /// of that disk must be, and so the most a reader allocates for one.
    pub fn plain_len(virtual_size: u64, chunk_size: u64, piece_size: Option<u64>) -> u64 {
        (ENTRY as u64)
            .saturating_mul(Index::cells(virtual_size, chunk_size))
            .saturating_add(HEAD as u64)
            .saturating_add(piece_size.map_or(0, |p| Pieces::bytes(p, virtual_size)))
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
        if let Some(p) = &self.pieces {
            out.extend_from_slice(&p.bits);
        }
        out
    }

    /// Parses an index's plaintext, with a piece map of `piece_size` when
    /// its manifest gives one; never panics, whatever the bytes.
    pub fn parse(bytes: &[u8], piece_size: Option<u64>) -> Result<Index> {
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
        if let Some(p) = piece_size {
            if !valid_piece(p, chunk_size) {
                return Err(corrupt(format!(
                    "piece size {p} for chunks of {chunk_size}"
                )));
            }
        }
        let want = Index::plain_len(virtual_size, chunk_size, piece_size);
        if bytes.len() as u64 != want {
            return Err(corrupt(format!(
                "{} bytes where {count} entries{} need {want}",
                bytes.len(),
                if piece_size.is_some() {
                    " and their piece map"
                } else {
                    ""
                },
            )));
        }
        let map_at = HEAD + count as usize * ENTRY;
        let body = &bytes[HEAD..map_at];
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
        let pieces = piece_size.map(|size| Pieces {
            size,
            bits: bytes[map_at..].to_vec(),
        });
        let index = Index {
            virtual_size,
            chunk_size,
            entries,
            pieces,
        };
        index.check_pieces()?;
        Ok(index)
    }

    /// A piece map agrees with its entries: pieces past the disk and in
    /// zero cells are clear, and a data cell has a piece set (a data chunk
    /// is not all zeros).
    fn check_pieces(&self) -> Result<()> {
        let Some(p) = &self.pieces else {
            return Ok(());
        };
        let per_cell = self.chunk_size / p.size;
        let total = self.virtual_size.div_ceil(p.size);
        for (i, e) in self.entries.iter().enumerate() {
            let first = i as u64 * per_cell;
            let last = (first + per_cell).min(total);
            let any = (first..last).any(|piece| p.get(piece));
            match (e, any) {
                (Entry::Data(_), false) => {
                    return Err(corrupt(format!("entry {i} is data but no piece of it is")))
                }
                (Entry::Zero | Entry::Unallocated, true) => {
                    return Err(corrupt(format!(
                        "entry {i} is zeros but a piece of it is data"
                    )))
                }
                _ => {}
            }
        }
        if (total..p.bits.len() as u64 * 8).any(|piece| p.get(piece)) {
            return Err(corrupt("the piece map marks pieces past the disk".into()));
        }
        Ok(())
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
            pieces: None,
        };
        let bytes = index.to_bytes();
        assert_eq!(Index::parse(&bytes, None).unwrap(), index);
        assert_eq!(index.range(4), (4096, 904));
        for cut in [0, 10, 24, bytes.len() - 1] {
            assert!(Index::parse(&bytes[..cut], None).is_err(), "cut at {cut}");
        }
        let mut bad = bytes.clone();
        bad[HEAD + ENTRY] = 9;
        assert!(Index::parse(&bad, None).is_err());
        let mut bad = bytes;
        bad[HEAD + ENTRY + 5] = 1;
        assert!(
            Index::parse(&bad, None).is_err(),
            "a zero entry naming a chunk"
        );
    }

    #[test]
    fn piece_maps_round_trip_and_must_agree_with_the_entries() {
        // 3 cells of 64 KiB in 16 KiB pieces: data, zero, data (short).
        let mut data = vec![0u8; 64 << 10];
        data[20 << 10] = 1; // piece 1
        let mut pieces = Pieces::new(16 << 10, (128 << 10) + 100);
        pieces.mark(0, &data);
        pieces.mark(128 << 10, &[7u8; 100]); // piece 8
        let index = Index {
            virtual_size: (128 << 10) + 100,
            chunk_size: 64 << 10,
            entries: vec![
                Entry::Data(blake3::hash(&data)),
                Entry::Zero,
                Entry::Data(blake3::hash(&[7u8; 100])),
            ],
            pieces: Some(pieces.clone()),
        };
        assert_eq!(pieces.bits, vec![0b0000_0010, 0b0000_0001]);
        assert_eq!(pieces.check(0, &data), None);
        let mut other = data.clone();
        other[0] = 9;
        assert_eq!(pieces.check(0, &other), Some(0), "piece 0 is not clear");
        let bytes = index.to_bytes();
        assert_eq!(Index::parse(&bytes, Some(16 << 10)).unwrap(), index);
        assert!(
            Index::parse(&bytes, None).is_err(),
            "a map the manifest does not announce"
        );
        assert!(
            Index::parse(&bytes, Some(32 << 10)).is_err(),
            "the wrong piece size"
        );
        let mut bad = bytes.clone();
        let map = bad.len() - 2;
        bad[map] = 0; // the first data cell has no piece set
        assert!(Index::parse(&bad, Some(16 << 10)).is_err());
        let mut bad = bytes.clone();
        bad[map] |= 0b0001_0000; // piece 4 is in the zero cell
        assert!(Index::parse(&bad, Some(16 << 10)).is_err());
        let mut bad = bytes;
        let last = bad.len() - 1;
        bad[last] |= 0b0000_0010; // piece 9 is past the disk
        assert!(Index::parse(&bad, Some(16 << 10)).is_err());
        assert_eq!(Pieces::size_for(Some(2 << 20), 4 << 20), 64 << 10);
        assert_eq!(Pieces::size_for(Some(4096), 4 << 20), 4096);
        assert_eq!(Pieces::size_for(Some(512), 4 << 20), 4096);
        assert_eq!(Pieces::size_for(None, 16 << 10), 16 << 10);
        // A repository of 1 KiB chunks has 1 KiB pieces, and they are valid.
        assert_eq!(Pieces::size_for(Some(2 << 20), 1 << 10), 1 << 10);
        assert!(valid_piece(1 << 10, 1 << 10) && !valid_piece(512, 1 << 10));
        assert!(!valid_piece(8 << 10, 4 << 10) && !valid_piece(3 << 10, 4 << 10));
    }
}
