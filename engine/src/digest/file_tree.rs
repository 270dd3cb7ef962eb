//! BLAKE3 of a file whose pieces are hashed on different threads: what
//! `b3sum` prints for a copy, computed by the workers while each chunk is
//! still in their cache, not by a second pass over the copy.
//!
//! A copy's blocks sit at file offsets that are not aligned to anything
//! BLAKE3 cares about (a VHD block's data follows a 512-byte bitmap), so a
//! piece cannot be one leaf as in the virtual-disk digest. Instead each
//! piece is hashed as the largest aligned power-of-two subtrees that fit
//! its whole chunks ([`Span`]), and the few bytes at its edges, which share
//! a BLAKE3 chunk with the neighbouring piece, are kept as they are.
//! [`FileTree`] takes spans and plain bytes in file order and builds the
//! same tree that hashing the file in one go builds.

use blake3::hazmat::{self, ChainingValue, HasherExt, Mode};

use crate::error::{ErrorKind, Result};

const CHUNK: u64 = blake3::CHUNK_LEN as u64;

/// A run of a file's bytes, hashed where it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// Where the run starts in the file.
    offset: u64,
    /// The bytes before the first chunk boundary (all of them, for a run
    /// inside one chunk).
    head: Vec<u8>,
    /// From that boundary on: aligned subtrees, (length in bytes, chaining
    /// value), in order.
    subtrees: Vec<(u64, ChainingValue)>,
    /// The bytes after the last whole chunk.
    tail: Vec<u8>,
}

/// The largest power of two at most `n` (`n` > 0).
fn floor_pow2(n: u64) -> u64 {
    1 << (63 - n.leading_zeros())
}

/// Cuts the chunk-aligned range `[start, end)` into the aligned
/// power-of-two subtrees BLAKE3's tree is made of, in order.
fn subtrees(mut start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> {
    std::iter::from_fn(move || {
        if start >= end {
            return None;
        }
        // `start` is a multiple of CHUNK here, so max_subtree_len's rule
        // holds; None (offset 0) means any size.
        let aligned = hazmat::max_subtree_len(start).unwrap_or(u64::MAX);
        let len = aligned.min(floor_pow2(end - start));
        let piece = (start, len);
        start += len;
        Some(piece)
    })
}

impl Span {
    /// Hashes `data`, which sits at `offset` in the file.
    pub fn hash(offset: u64, data: &[u8]) -> Span {
        let range = |from: u64, to: u64| &data[from as usize..to as usize];
        Span::build(
            offset,
            data.len() as u64,
            |h, from, to| {
                h.update(range(from, to));
            },
            |from, to| range(from, to).to_vec(),
        )
    }

    /// A run of `len` zero bytes at `offset` (a hole the file reads as
    /// zeros), hashed without a buffer.
    pub fn zeros(offset: u64, len: u64) -> Span {
        Span::build(
            offset,
            len,
            |h, from, to| super::update_zeros(h, to - from),
            |from, to| vec![0; (to - from) as usize],
        )
    }

    /// `feed(hasher, from, to)` hands a hasher the run's bytes `from..to`
    /// and `edge(from, to)` returns them (offsets within the run).
    fn build(
        offset: u64,
        len: u64,
        mut feed: impl FnMut(&mut blake3::Hasher, u64, u64),
        edge: impl Fn(u64, u64) -> Vec<u8>,
    ) -> Span {
        let end = offset + len;
        let first = offset.div_ceil(CHUNK) * CHUNK;
        let last = end / CHUNK * CHUNK;
        if first >= last {
            // No whole chunk: it is all edge, split at the one boundary
            // it may cross.
            let split = first.min(end) - offset;
            return Span {
                offset,
                head: edge(0, split),
                subtrees: Vec::new(),
                tail: edge(split, len),
            };
        }
        let subtrees = subtrees(first, last)
            .map(|(at, n)| {
                let mut h = blake3::Hasher::new();
                h.set_input_offset(at);
                feed(&mut h, at - offset, at + n - offset);
                (n, h.finalize_non_root())
            })
            .collect();
        Span {
            offset,
            head: edge(0, first - offset),
            subtrees,
            tail: edge(last - offset, len),
        }
    }
}

/// Builds a file's BLAKE3 from plain bytes and [`Span`]s given in file
/// order: BLAKE3's own chaining-value stack, fed whole subtrees.
#[derive(Debug, Default)]
pub struct FileTree {
    stack: Vec<ChainingValue>,
    /// Whole chunks pushed onto the stack so far.
    chunks: u64,
    /// The bytes after them: at most one chunk, kept back (even when
    /// full) until more input shows it is not the file's last.
    partial: Vec<u8>,
}

impl FileTree {
    pub fn new() -> FileTree {
        FileTree::default()
    }

    /// Bytes taken so far: where the next input sits in the file.
    pub fn position(&self) -> u64 {
        self.chunks * CHUNK + self.partial.len() as u64
    }

    /// Pushes a subtree of `len` bytes (a power-of-two number of chunks,
    /// aligned) that starts at chunk `self.chunks`, merging first what its
    /// arrival completes (BLAKE3's lazy merge: the stack keeps one entry
    /// per one-bit of the chunk count, plus the newest).
    fn push_cv(&mut self, cv: ChainingValue, len: u64) {
        self.merge_completed();
        self.stack.push(cv);
        self.chunks += len / CHUNK;
    }

    /// Merges the subtrees that more input has shown to be complete: the
    /// stack keeps one entry per one-bit of the chunk count.
    fn merge_completed(&mut self) {
        let keep = self.chunks.count_ones() as usize;
        while self.stack.len() > keep {
            let (Some(right), Some(left)) = (self.stack.pop(), self.stack.pop()) else {
                break;
            };
            self.stack
                .push(hazmat::merge_subtrees_non_root(&left, &right, Mode::Hash));
        }
    }

    /// The kept-back chunk's chaining value, as the chunk after those
    /// on the stack.
    fn partial_cv(&self) -> ChainingValue {
        let mut h = blake3::Hasher::new();
        h.set_input_offset(self.chunks * CHUNK);
        h.update(&self.partial);
        h.finalize_non_root()
    }

    /// Pushes the kept-back chunk, which must be whole.
    fn flush_partial(&mut self) {
        let cv = self.partial_cv();
        self.partial.clear();
        self.push_cv(cv, CHUNK);
    }

    /// Takes plain bytes.
    pub fn push_bytes(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.partial.len() as u64 == CHUNK {
                self.flush_partial();
            }
            let room = CHUNK as usize - self.partial.len();
            if self.partial.is_empty() && bytes.len() > CHUNK as usize {
                // Whole chunks at a chunk boundary: hash them as subtrees,
                // keeping back the last (partial or whole) chunk.
                let body = (bytes.len() - 1) / CHUNK as usize * CHUNK as usize;
                let span = Span::hash(self.position(), &bytes[..body]);
                for (n, cv) in span.subtrees {
                    self.push_cv(cv, n);
                }
                bytes = &bytes[body..];
                continue;
            }
            let n = room.min(bytes.len());
            self.partial.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
        }
    }

    /// Takes a span, which must start where the input so far ends.
    pub fn push_span(&mut self, span: &Span) -> Result<()> {
        if span.offset != self.position() {
            return Err(ErrorKind::InvalidArgument(format!(
                "a span at {} given where the file is at {}",
                span.offset,
                self.position()
            ))
            .into());
        }
        self.push_bytes(&span.head);
        if !span.subtrees.is_empty() {
            if self.partial.len() as u64 == CHUNK {
                self.flush_partial();
            }
            if !self.partial.is_empty() {
                return Err(ErrorKind::InvalidArgument(
                    "a span's subtrees do not start on a chunk boundary".into(),
                )
                .into());
            }
            for &(n, cv) in &span.subtrees {
                self.push_cv(cv, n);
            }
        }
        self.push_bytes(&span.tail);
        Ok(())
    }

    /// The file's BLAKE3: what `b3sum` prints for it.
    pub fn finish(mut self) -> Result<blake3::Hash> {
        let right = if self.partial.is_empty() {
            match self.stack.pop() {
                Some(cv) => cv,
                None => return Ok(blake3::hash(&[])),
            }
        } else if self.stack.is_empty() {
            // The whole file is one chunk: it is the root.
            return Ok(blake3::hash(&self.partial));
        } else {
            // The last chunk follows everything on the stack.
            self.merge_completed();
            self.partial_cv()
        };
        // Only a file that is a single pushed subtree has no root to
        // fold to.
        super::fold_to_root(&mut self.stack, right).ok_or_else(|| {
            ErrorKind::InvalidArgument("a file given as one subtree has no root to finish".into())
                .into()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        use rand::{Rng as _, SeedableRng};
        let mut v = vec![0u8; len];
        rand::rngs::SmallRng::seed_from_u64(seed).fill_bytes(&mut v);
        // Stretches of zeros too, for Span::zeros.
        for (i, b) in v.iter_mut().enumerate() {
            if (i / 3000) % 4 == 3 {
                *b = 0;
            }
        }
        v
    }

    #[test]
    fn subtrees_are_aligned_powers_of_two_that_tile_the_range() {
        for (start, end) in [
            (0, 1 << 20),
            (1024, 9 * 1024),
            (3072, 1 << 22),
            (5 << 20, (7 << 20) + 1024),
        ] {
            let mut at = start;
            for (s, n) in subtrees(start, end) {
                assert_eq!(s, at);
                assert!(n.is_power_of_two() && n >= CHUNK);
                assert_eq!(s % n, 0, "{s} {n}");
                at += n;
            }
            assert_eq!(at, end);
        }
    }

    #[test]
    fn edge_cases_match_b3sum() {
        for len in [
            0usize,
            1,
            1023,
            1024,
            1025,
            2048,
            3000,
            1 << 16,
            (1 << 16) + 1,
        ] {
            let data = bytes(len, 7);
            let mut t = FileTree::new();
            t.push_bytes(&data);
            assert_eq!(t.finish().unwrap(), blake3::hash(&data), "bytes {len}");
            let mut t = FileTree::new();
            t.push_span(&Span::hash(0, &data)).unwrap();
            let got = t.finish();
            if len > 0 && len % 1024 == 0 && len.is_power_of_two() {
                // One whole subtree: no root can come of it.
                assert!(got.is_err(), "span {len}");
            } else {
                assert_eq!(got.unwrap(), blake3::hash(&data), "span {len}");
            }
        }
    }

    #[test]
    fn a_span_out_of_place_is_refused() {
        let mut t = FileTree::new();
        t.push_bytes(&[1; 100]);
        assert!(t.push_span(&Span::hash(99, &[2; 10])).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// A file cut anywhere into runs, each given as bytes, a span or
        /// (where it is zeros) a zero span, hashes as b3sum hashes it.
        #[test]
        fn any_cut_of_a_file_hashes_as_the_whole(
            len in 1usize..600_000,
            seed in any::<u64>(),
            cuts in proptest::collection::vec((0usize..600_000, 0u8..3), 0..12),
        ) {
            let data = bytes(len, seed);
            let mut at: Vec<(usize, u8)> = cuts.into_iter().map(|(c, k)| (c % len, k)).collect();
            at.sort_unstable();
            at.dedup_by_key(|c| c.0);
            let mut bounds: Vec<(usize, usize, u8)> = Vec::new();
            let mut from = 0;
            let mut kind = 1;
            for (c, k) in at {
                if c > from {
                    bounds.push((from, c, kind));
                    from = c;
                }
                kind = k;
            }
            bounds.push((from, len, kind));
            let mut t = FileTree::new();
            // The file's first bytes come as bytes, as a copy's header does.
            for (i, (a, b, k)) in bounds.into_iter().enumerate() {
                let piece = &data[a..b];
                match (k, i) {
                    (_, 0) | (0, _) => t.push_bytes(piece),
                    (1, _) => t.push_span(&Span::hash(a as u64, piece)).unwrap(),
                    _ if piece.iter().all(|&x| x == 0) => {
                        t.push_span(&Span::zeros(a as u64, piece.len() as u64)).unwrap()
                    }
                    _ => t.push_span(&Span::hash(a as u64, piece)).unwrap(),
                }
            }
            prop_assert_eq!(t.finish().unwrap(), blake3::hash(&data));
        }
    }
}
