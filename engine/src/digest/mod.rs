//! The virtual-disk digest: BLAKE3 over every byte of the virtual disk,
//! equal to `b3sum` of `qemu-img convert -O raw`, so auditors can check it
//! with stock tools.
//!
//! BLAKE3 is a tree. With a power-of-two leaf size of at least one BLAKE3
//! chunk (1 KiB), the leaves of the whole-disk tree are exactly the
//! leaf-aligned pieces of the disk, the last one possibly shorter. Each
//! leaf's chaining value depends only on its bytes and its offset, so
//! leaves are hashed in any order, on any thread, unallocated ones without
//! reading anything, and [`root`] folds them with blake3's `hazmat` merges.

mod file_tree;
mod zero_cache;

use blake3::hazmat::{self, ChainingValue, HasherExt, Mode};

pub use file_tree::{FileTree, Span};
pub use zero_cache::ZeroCache;

use crate::error::{ErrorKind, Result};

/// How a leaf's chaining value is computed depends on whether the disk is
/// a single leaf: then the leaf is the root and needs root finalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DigestPlan {
    pub disk_size: u64,
    pub leaf_size: u64,
}

/// One leaf's contribution to the digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaf {
    /// The disk is a single leaf: this is already the digest.
    Root(blake3::Hash),
    /// An interior chaining value, to be merged by [`root`].
    Cv(ChainingValue),
}

impl Leaf {
    /// The leaf's 32 bytes, as an index stores them.
    pub fn to_bytes(self) -> [u8; 32] {
        match self {
            Leaf::Root(h) => *h.as_bytes(),
            Leaf::Cv(cv) => cv,
        }
    }

    /// A stored leaf of the disk `plan` describes: the digest itself when
    /// the disk is one leaf, a chaining value otherwise.
    pub fn from_bytes(plan: &DigestPlan, bytes: [u8; 32]) -> Leaf {
        if plan.leaves() == 1 {
            Leaf::Root(blake3::Hash::from_bytes(bytes))
        } else {
            Leaf::Cv(bytes)
        }
    }
}

impl DigestPlan {
    pub fn new(disk_size: u64, leaf_size: u64) -> Result<Self> {
        if !leaf_size.is_power_of_two() || leaf_size < blake3::CHUNK_LEN as u64 {
            return Err(ErrorKind::InvalidArgument(format!(
                "chunk size {leaf_size} must be a power of two of at least 1 KiB"
            ))
            .into());
        }
        Ok(Self {
            disk_size,
            leaf_size,
        })
    }

    pub fn leaves(&self) -> u64 {
        self.disk_size.div_ceil(self.leaf_size).max(1)
    }

    /// The byte range of leaf `index`.
    pub fn leaf_range(&self, index: u64) -> (u64, u64) {
        let start = index * self.leaf_size;
        (start, self.leaf_size.min(self.disk_size - start))
    }

    /// Hashes one leaf's bytes, which start at `offset` in the disk.
    pub fn leaf(&self, offset: u64, data: &[u8]) -> Leaf {
        let mut h = self.leaf_hasher(offset);
        h.update(data);
        self.finish_leaf(h)
    }

    /// A hasher for the leaf at `offset`, to be fed its bytes in order (a
    /// slice at a time, say, with other work on each slice between) and
    /// handed to [`DigestPlan::finish_leaf`].
    pub fn leaf_hasher(&self, offset: u64) -> blake3::Hasher {
        let mut hasher = blake3::Hasher::new();
        if self.disk_size > self.leaf_size {
            hasher.set_input_offset(offset);
        }
        hasher
    }

    pub fn finish_leaf(&self, hasher: blake3::Hasher) -> Leaf {
        if self.disk_size <= self.leaf_size {
            Leaf::Root(hasher.finalize())
        } else {
            Leaf::Cv(hasher.finalize_non_root())
        }
    }

    /// A leaf of `len` zero bytes at `offset`, hashed without reading.
    pub fn zero_leaf(&self, offset: u64, len: u64) -> Leaf {
        let mut hasher = self.leaf_hasher(offset);
        update_zeros(&mut hasher, len);
        self.finish_leaf(hasher)
    }

    /// Folds the leaves, in disk order, into the digest.
    pub fn root(&self, leaves: &[Leaf]) -> Result<blake3::Hash> {
        let mut folder = Folder::new(*self);
        for (index, leaf) in leaves.iter().enumerate() {
            folder.add(index as u64, *leaf)?;
        }
        folder.finish()
    }
}

/// Folds leaves into the digest as they arrive, so a run holds O(log n)
/// chaining values whatever the disk's size, plus the leaves that arrive
/// ahead of their turn (a handful: workers claim chunks in order, and the
/// buffer pool bounds how many are in flight).
///
/// This is BLAKE3's own chaining-value stack, one level up: every leaf but
/// the last is pushed, merging each completed power-of-two subtree at
/// once; the last folds down the stack, and the top merge is the root. It
/// builds the same left-balanced tree as hashing the disk in one go.
#[derive(Debug)]
pub struct Folder {
    plan: DigestPlan,
    next: u64,
    stack: Vec<ChainingValue>,
    pending: std::collections::BTreeMap<u64, Leaf>,
    root: Option<blake3::Hash>,
}

impl Folder {
    pub fn new(plan: DigestPlan) -> Folder {
        Folder {
            plan,
            next: 0,
            stack: Vec::new(),
            pending: std::collections::BTreeMap::new(),
            root: None,
        }
    }

    /// Leaves held until the ones before them arrive.
    pub fn waiting(&self) -> usize {
        self.pending.len()
    }

    pub fn add(&mut self, index: u64, leaf: Leaf) -> Result<()> {
        let n = self.plan.leaves();
        if index >= n || index < self.next || self.pending.contains_key(&index) {
            return Err(ErrorKind::InvalidArgument(format!(
                "leaf {index} given twice or out of range for a disk of {n}"
            ))
            .into());
        }
        self.pending.insert(index, leaf);
        while let Some(leaf) = self.pending.remove(&self.next) {
            self.push(leaf)?;
            self.next += 1;
        }
        Ok(())
    }

    fn push(&mut self, leaf: Leaf) -> Result<()> {
        let n = self.plan.leaves();
        let cv = match (leaf, n) {
            (Leaf::Root(h), 1) => {
                self.root = Some(h);
                return Ok(());
            }
            (Leaf::Cv(cv), n) if n > 1 => cv,
            _ => {
                return Err(ErrorKind::InvalidArgument(
                    "a root leaf in a multi-leaf disk, or the reverse".into(),
                )
                .into())
            }
        };
        if self.next + 1 < n {
            let mut cv = cv;
            let mut done = self.next + 1;
            while done & 1 == 0 {
                let Some(left) = self.stack.pop() else { break };
                cv = hazmat::merge_subtrees_non_root(&left, &cv, Mode::Hash);
                done >>= 1;
            }
            self.stack.push(cv);
            return Ok(());
        }
        // The last leaf: fold down the stack; the top merge is the root.
        match fold_to_root(&mut self.stack, cv) {
            Some(root) => {
                self.root = Some(root);
                Ok(())
            }
            None => {
                Err(ErrorKind::InvalidArgument("a multi-leaf disk folded to no root".into()).into())
            }
        }
    }

    /// The digest, once every leaf has arrived.
    pub fn finish(self) -> Result<blake3::Hash> {
        match self.root {
            Some(h) if self.pending.is_empty() => Ok(h),
            _ => Err(ErrorKind::InvalidArgument(format!(
                "{} of {} leaves given",
                self.next,
                self.plan.leaves()
            ))
            .into()),
        }
    }
}

/// Folds a chaining-value stack down onto the tree's last subtree,
/// `right`: each entry is the left sibling of everything after it, and the
/// top merge is the root. `None` when the stack is empty, as the root of a
/// lone subtree cannot be had from its chaining value.
fn fold_to_root(stack: &mut Vec<ChainingValue>, mut right: ChainingValue) -> Option<blake3::Hash> {
    while let Some(left) = stack.pop() {
        if stack.is_empty() {
            return Some(hazmat::merge_subtrees_root(&left, &right, Mode::Hash));
        }
        right = hazmat::merge_subtrees_non_root(&left, &right, Mode::Hash);
    }
    None
}

/// Feeds `len` zero bytes to a hasher without allocating them.
pub fn update_zeros(hasher: &mut blake3::Hasher, len: u64) {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROS.len() as u64) as usize;
        hasher.update(&ZEROS[..n]);
        left -= n as u64;
    }
}

/// Whether a buffer is all zeros, eight bytes at a time.
pub fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(64);
    let body = words.by_ref().all(|block| {
        block.chunks_exact(8).fold(0u64, |acc, w| {
            acc | u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]])
        }) == 0
    });
    body && words.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn digest_by_leaves(bytes: &[u8], leaf: u64) -> blake3::Hash {
        let plan = DigestPlan::new(bytes.len() as u64, leaf).unwrap();
        let leaves: Vec<Leaf> = (0..plan.leaves())
            .rev() // any order: each leaf stands alone
            .map(|i| {
                let (off, len) = plan.leaf_range(i);
                let piece = &bytes[off as usize..(off + len) as usize];
                if is_zero(piece) {
                    plan.zero_leaf(off, len)
                } else {
                    plan.leaf(off, piece)
                }
            })
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        plan.root(&leaves).unwrap()
    }

    #[test]
    fn leaf_digests_equal_plain_blake3_for_every_shape() {
        for leaf in [1024u64, 4096, 65536] {
            for len in [
                0usize, 1, 512, 1024, 1025, 4096, 4097, 65536, 65537, 200_000, 262_144, 300_001,
            ] {
                let mut bytes = data(len);
                // Some all-zero leaves, to exercise the zero path.
                if len > 70_000 {
                    bytes[65536..70_000].fill(0);
                    bytes[..leaf as usize].fill(0);
                }
                assert_eq!(
                    digest_by_leaves(&bytes, leaf),
                    blake3::hash(&bytes),
                    "len {len}, leaf {leaf}"
                );
            }
        }
    }

    #[test]
    fn leaves_may_arrive_out_of_order_and_only_a_few_wait() {
        for len in [3 * 1024 + 5, 8 * 1024, 13 * 1024 + 1, 64 * 1024] {
            let bytes = data(len);
            let plan = DigestPlan::new(len as u64, 1024).unwrap();
            let leaf = |i: u64| {
                let (off, n) = plan.leaf_range(i);
                plan.leaf(off, &bytes[off as usize..(off + n) as usize])
            };
            // Pairs swapped: 1, 0, 3, 2, ...
            let mut folder = Folder::new(plan);
            let n = plan.leaves();
            for i in 0..n {
                let j = if i % 2 == 0 {
                    (i + 1).min(n - 1)
                } else {
                    i - 1
                };
                if i % 2 == 0 && j == i {
                    folder.add(i, leaf(i)).unwrap();
                    continue;
                }
                folder.add(j, leaf(j)).unwrap();
                assert!(folder.waiting() <= 1);
            }
            assert_eq!(folder.finish().unwrap(), blake3::hash(&bytes), "len {len}");
        }
        // Twice the same leaf, or too few, is refused.
        let plan = DigestPlan::new(4096, 1024).unwrap();
        let mut folder = Folder::new(plan);
        folder.add(0, plan.zero_leaf(0, 1024)).unwrap();
        assert!(folder.add(0, plan.zero_leaf(0, 1024)).is_err());
        assert!(folder.finish().is_err());
    }

    #[test]
    fn bad_leaf_sizes_and_leaf_counts_are_refused() {
        assert!(DigestPlan::new(10, 1000).is_err());
        assert!(DigestPlan::new(10, 512).is_err());
        let plan = DigestPlan::new(10_000, 1024).unwrap();
        assert!(plan.root(&[]).is_err());
    }

    #[test]
    fn zero_detection_sees_a_single_set_bit_anywhere() {
        let mut buf = vec![0u8; 4099];
        assert!(is_zero(&buf));
        for i in [0, 63, 64, 4095, 4098] {
            buf[i] = 1;
            assert!(!is_zero(&buf), "{i}");
            buf[i] = 0;
        }
    }
}
