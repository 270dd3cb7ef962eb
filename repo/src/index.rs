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
//! | after the piece map | 32 × count | the leaves, when the manifest says the index has them: for each data cell, the BLAKE3 chaining value of its bytes at its offset in the disk (the digest itself for a disk of one cell); zeros for other cells |
//!
//! The piece map lets a restore allocate a dynamic target's blocks where
//! the disk holds data, not wherever a chunk does: a 4 MiB chunk with 512
//! bytes written would otherwise allocate every block it spans. Pieces are
//! a power of two from 4 KiB up to the chunk size; the backup takes the
//! source's block size, at most 64 KiB. Indexes written before the map
//! (no piece size in their manifest) have none, and restore as before.
//!
//! The leaves let an incremental backup (see [`crate::cbt`]) fold the
//! disk's digest, `b3sum` of the whole disk, from the cells it did not
//! read: a leaf's value depends on its offset as well as its bytes, so the
//! chunk's name alone does not give it. Zero cells need none: their leaf
//! is computed without reading.

use crate::error::{ErrorKind, Result};
use vsnap_engine::digest::is_zero;
use vsnap_engine::pipeline::ChunkKind;
use vsnap_formats::bytes::le64;

const HEAD: usize = 24;
const ENTRY: usize = 33;
const LEAF: usize = 32;

/// What an index holds beyond its entries, as its manifest announces it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Layout {
    /// The piece map's piece size, if it has one.
    pub piece_size: Option<u64>,
    /// Whether it holds its data cells' leaves.
    pub leaves: bool,
}

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

    /// The pieces set in the cell of `cell_size` bytes at `offset`.
    pub fn set_in(&self, offset: u64, cell_size: u64) -> Vec<u64> {
        let size = self.size.max(1);
        let first = offset / size;
        (first..first + cell_size.div_ceil(size))
            .filter(|&p| self.get(p))
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
    /// Each cell's leaf (chaining value) where it is data; zeros elsewhere.
    pub leaves: Option<Vec<[u8; 32]>>,
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
    /// `chunk_size`, laid out as `layout` says: what an index of that disk
    /// must be, and so the most a reader allocates for one.
    pub fn plain_len(virtual_size: u64, chunk_size: u64, layout: Layout) -> u64 {
        let cells = Index::cells(virtual_size, chunk_size);
        let leaves = if layout.leaves { LEAF as u64 } else { 0 };
        (ENTRY as u64 + leaves)
            .saturating_mul(cells)
            .saturating_add(HEAD as u64)
            .saturating_add(
                layout
                    .piece_size
                    .map_or(0, |p| Pieces::bytes(p, virtual_size)),
            )
    }

    /// The layout of this index, for its manifest.
    pub fn layout(&self) -> Layout {
        Layout {
            piece_size: self.pieces.as_ref().map(|p| p.size),
            leaves: self.leaves.is_some(),
        }
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
        for leaf in self.leaves.iter().flatten() {
            out.extend_from_slice(leaf);
        }
        out
    }

    /// Parses an index's plaintext, with a piece map of `piece_size` when
    /// its manifest gives one; never panics, whatever the bytes.
    pub fn parse(bytes: &[u8], layout: Layout) -> Result<Index> {
        let piece_size = layout.piece_size;
        if bytes.len() < HEAD {
            return Err(corrupt(format!(
                "{} bytes, shorter than its header",
                bytes.len()
            )));
        }
        let word = |at: usize| le64(bytes, at);
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
        let want = Index::plain_len(virtual_size, chunk_size, layout);
        if bytes.len() as u64 != want {
            return Err(corrupt(format!(
                "{} bytes where {count} entries{}{} need {want}",
                bytes.len(),
                if piece_size.is_some() {
                    ", their piece map"
                } else {
                    ""
                },
                if layout.leaves {
                    " and their leaves"
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
        let leaves_at = bytes.len()
            - if layout.leaves {
                count as usize * LEAF
            } else {
                0
            };
        let pieces = piece_size.map(|size| Pieces {
            size,
            bits: bytes[map_at..leaves_at].to_vec(),
        });
        let leaves = if layout.leaves {
            let mut out = Vec::with_capacity(count as usize);
            for (i, (leaf, e)) in bytes[leaves_at..]
                .chunks_exact(LEAF)
                .zip(&entries)
                .enumerate()
            {
                let mut a = [0u8; LEAF];
                a.copy_from_slice(leaf);
                match (e, a == [0; LEAF]) {
                    (Entry::Data(_), true) => {
                        return Err(corrupt(format!("entry {i} is data but has no leaf")))
                    }
                    (Entry::Zero | Entry::Unallocated, false) => {
                        return Err(corrupt(format!("entry {i} is zeros but has a leaf")))
                    }
                    _ => {}
                }
                out.push(a);
            }
            Some(out)
        } else {
            None
        };
        let index = Index {
            virtual_size,
            chunk_size,
            entries,
            pieces,
            leaves,
        };
        index.check_pieces()?;
        Ok(index)
    }

    /// Cell `i`'s leaf in the digest of the disk `plan` describes, if the
    /// index holds it (a data cell of an index with leaves).
    pub fn leaf(
        &self,
        i: usize,
        plan: &vsnap_engine::digest::DigestPlan,
    ) -> Option<vsnap_engine::digest::Leaf> {
        match (self.entries.get(i), self.leaves.as_ref()?.get(i)) {
            (Some(Entry::Data(_)), Some(bytes)) => {
                Some(vsnap_engine::digest::Leaf::from_bytes(plan, *bytes))
            }
            _ => None,
        }
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

    const NONE: Layout = Layout {
        piece_size: None,
        leaves: false,
    };

    fn pieces_of(size: u64) -> Layout {
        Layout {
            piece_size: Some(size),
            leaves: false,
        }
    }

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
            leaves: None,
        };
        let bytes = index.to_bytes();
        assert_eq!(Index::parse(&bytes, NONE).unwrap(), index);
        assert_eq!(index.range(4), (4096, 904));
        for cut in [0, 10, 24, bytes.len() - 1] {
            assert!(Index::parse(&bytes[..cut], NONE).is_err(), "cut at {cut}");
        }
        let mut bad = bytes.clone();
        bad[HEAD + ENTRY] = 9;
        assert!(Index::parse(&bad, NONE).is_err());
        let mut bad = bytes;
        bad[HEAD + ENTRY + 5] = 1;
        assert!(
            Index::parse(&bad, NONE).is_err(),
            "a zero entry naming a chunk"
        );
    }

    #[test]
    fn leaves_round_trip_and_only_data_cells_have_them() {
        let a = [7u8; 100];
        let plan = vsnap_engine::digest::DigestPlan::new(3000, 1024).unwrap();
        let leaf = plan.leaf(2048, &a);
        let index = Index {
            virtual_size: 3000,
            chunk_size: 1024,
            entries: vec![
                Entry::Zero,
                Entry::Unallocated,
                Entry::Data(blake3::hash(&a)),
            ],
            pieces: None,
            leaves: Some(vec![[0; 32], [0; 32], leaf.to_bytes()]),
        };
        let layout = index.layout();
        assert_eq!(
            layout,
            Layout {
                piece_size: None,
                leaves: true
            }
        );
        let bytes = index.to_bytes();
        assert_eq!(bytes.len() as u64, Index::plain_len(3000, 1024, layout));
        let back = Index::parse(&bytes, layout).unwrap();
        assert_eq!(back, index);
        assert_eq!(back.leaf(2, &plan), Some(leaf));
        assert_eq!(back.leaf(0, &plan), None);
        let e = Index::parse(&bytes, NONE).unwrap_err().to_string();
        assert!(e.contains("need 123"), "{e}");
        let mut bad = bytes.clone();
        bad[HEAD + 3 * ENTRY] = 1;
        let e = Index::parse(&bad, layout).unwrap_err().to_string();
        assert!(e.contains("entry 0 is zeros but has a leaf"), "{e}");
        let mut bad = bytes;
        let at = bad.len() - 32;
        bad[at..].fill(0);
        let e = Index::parse(&bad, layout).unwrap_err().to_string();
        assert!(e.contains("entry 2 is data but has no leaf"), "{e}");
        // A disk of one leaf: the stored leaf is the digest itself.
        let one = vsnap_engine::digest::DigestPlan::new(100, 1024).unwrap();
        let root = one.leaf(0, &a);
        assert_eq!(
            vsnap_engine::digest::Leaf::from_bytes(&one, root.to_bytes()),
            root
        );
        assert!(matches!(root, vsnap_engine::digest::Leaf::Root(h) if h == blake3::hash(&a)));
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
            leaves: None,
        };
        assert_eq!(pieces.bits, vec![0b0000_0010, 0b0000_0001]);
        assert_eq!(pieces.check(0, &data), None);
        let mut other = data.clone();
        other[0] = 9;
        assert_eq!(pieces.check(0, &other), Some(0), "piece 0 is not clear");
        let bytes = index.to_bytes();
        assert_eq!(Index::parse(&bytes, pieces_of(16 << 10)).unwrap(), index);
        assert!(
            Index::parse(&bytes, NONE).is_err(),
            "a map the manifest does not announce"
        );
        assert!(
            Index::parse(&bytes, pieces_of(32 << 10)).is_err(),
            "the wrong piece size"
        );
        let mut bad = bytes.clone();
        let map = bad.len() - 2;
        bad[map] = 0; // the first data cell has no piece set
        assert!(Index::parse(&bad, pieces_of(16 << 10)).is_err());
        let mut bad = bytes.clone();
        bad[map] |= 0b0001_0000; // piece 4 is in the zero cell
        assert!(Index::parse(&bad, pieces_of(16 << 10)).is_err());
        let mut bad = bytes;
        let last = bad.len() - 1;
        bad[last] |= 0b0000_0010; // piece 9 is past the disk
        assert!(Index::parse(&bad, pieces_of(16 << 10)).is_err());
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
