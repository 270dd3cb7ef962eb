//! Chaining values of all-zero leaves, kept across runs.
//!
//! A zero leaf's chaining value depends only on its offset, yet costs a
//! full BLAKE3 pass (a 2 TiB sparse disk is 2 TiB of zeros to hash). The
//! values are remembered in memory during a run and in a file between
//! runs, so a sparse disk's digest costs time in proportion to its data.
//!
//! A wrong entry would give a wrong digest without any sign, so the file
//! is trusted only whole: it carries a BLAKE3 of its contents, and on load
//! a few entries chosen at random are recomputed. Any mismatch discards it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use blake3::hazmat::ChainingValue;

use super::{DigestPlan, Leaf};
use crate::error::{Error, Result, ResultExt};
use vsnap_formats::bytes::le64;

const MAGIC: &[u8; 8] = b"VSNZCV01";
/// Entries recomputed on load; each costs one leaf hash (under 1 ms).
const SPOT_CHECKS: usize = 4;
/// Leaves past this index are not cached: a 2040 GiB disk in 4 MiB chunks
/// has about 522,000, and a tiny chunk size on a huge disk must not make
/// the table huge (4 Mi slots are 132 MiB).
const MAX_LEAVES: usize = 4 << 20;

/// Dense by leaf index: the indices a disk uses are 0..n, so a vector
/// costs 33 bytes a leaf (17 MB for 2040 GiB in 4 MiB leaves), where a
/// hash map would cost half as much again and double while growing.
type Known = Vec<Option<ChainingValue>>;

#[derive(Debug)]
pub struct ZeroCache {
    leaf_size: u64,
    file: Option<PathBuf>,
    known: RwLock<Known>,
    dirty: AtomicBool,
}

impl ZeroCache {
    /// The leaf size its chaining values are for.
    pub fn leaf_size(&self) -> u64 {
        self.leaf_size
    }

    /// A cache that lives for one run only.
    pub fn in_memory(leaf_size: u64) -> ZeroCache {
        ZeroCache {
            leaf_size,
            file: None,
            known: RwLock::new(Vec::new()),
            dirty: AtomicBool::new(false),
        }
    }

    /// Loads `dir/zero-leaves-<leaf size>.bin`. A missing, damaged or wrong
    /// file is not an error: the cache starts empty and is rewritten.
    pub fn load(dir: &Path, leaf_size: u64) -> ZeroCache {
        let file = dir.join(format!("zero-leaves-{leaf_size}.bin"));
        let known = std::fs::read(&file)
            .ok()
            .and_then(|bytes| parse(&bytes, leaf_size))
            .filter(|known| spot_check(known, leaf_size))
            .unwrap_or_default();
        ZeroCache {
            leaf_size,
            file: Some(file),
            known: RwLock::new(known),
            dirty: AtomicBool::new(false),
        }
    }

    /// How many leaves are known.
    pub fn len(&self) -> usize {
        self.known.read().map_or(0, |k| k.iter().flatten().count())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The leaf of zeros at leaf `index` of `plan`, from the cache when it
    /// can be. Only full-size leaves of multi-leaf disks are cached: a
    /// short last leaf, or a disk that is one leaf (a root), is computed.
    pub fn zero_leaf(&self, plan: &DigestPlan, index: u64) -> Leaf {
        let (offset, len) = plan.leaf_range(index);
        if len != self.leaf_size
            || plan.leaf_size != self.leaf_size
            || plan.leaves() < 2
            || index as usize >= MAX_LEAVES
        {
            return plan.zero_leaf(offset, len);
        }
        let slot = index as usize;
        if let Some(cv) = self
            .known
            .read()
            .ok()
            .and_then(|k| k.get(slot).copied().flatten())
        {
            return Leaf::Cv(cv);
        }
        let leaf = plan.zero_leaf(offset, len);
        if let (Leaf::Cv(cv), Ok(mut known)) = (leaf, self.known.write()) {
            if known.len() <= slot {
                // Sized for the whole disk at once, so it grows once.
                let want = (plan.leaves() as usize).min(MAX_LEAVES);
                known.resize(want.max(slot + 1), None);
            }
            known[slot] = Some(cv);
            self.dirty.store(true, Ordering::Relaxed);
        }
        leaf
    }

    /// Writes the file if this run learnt anything, atomically.
    pub fn save(&self) -> Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        if !self.dirty.load(Ordering::Relaxed) {
            return Ok(());
        }
        let bytes = {
            let known = self
                .known
                .read()
                .map_err(|_| Error::io(std::io::Error::other("zero cache lock poisoned")))?;
            serialize(&known, self.leaf_size)
        };
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).ctx_file(dir, "create cache directory")?;
        }
        let tmp = file.with_extension("bin.tmp");
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, file)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.ctx_file(file, "write zero-leaf cache")
    }
}

fn serialize(known: &Known, leaf_size: u64) -> Vec<u8> {
    let count = known.iter().flatten().count();
    let mut out = Vec::with_capacity(24 + count * 40 + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&leaf_size.to_le_bytes());
    out.extend_from_slice(&(count as u64).to_le_bytes());
    for (index, cv) in known.iter().enumerate() {
        if let Some(cv) = cv {
            out.extend_from_slice(&(index as u64).to_le_bytes());
            out.extend_from_slice(cv);
        }
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

fn parse(bytes: &[u8], leaf_size: u64) -> Option<Known> {
    let (body, sum) = bytes.split_at_checked(bytes.len().checked_sub(32)?)?;
    if blake3::hash(body).as_bytes() != sum {
        return None;
    }
    let (head, rest) = body.split_at_checked(24)?;
    if head[..8] != *MAGIC || le64(head, 8) != leaf_size {
        return None;
    }
    let count = usize::try_from(le64(head, 16)).ok()?;
    if rest.len() != count.checked_mul(40)? {
        return None;
    }
    // Entries are written in index order, so the last one sizes the
    // table; past the cap the file is not one of ours.
    let Some(at) = rest.len().checked_sub(40) else {
        return Some(Vec::new());
    };
    let last = usize::try_from(le64(rest, at)).ok()?;
    if last >= MAX_LEAVES {
        return None;
    }
    let mut known: Known = vec![None; last + 1];
    for entry in rest.chunks_exact(40) {
        let index = usize::try_from(le64(entry, 0)).ok()?;
        *known.get_mut(index)? = Some(entry[8..].try_into().ok()?);
    }
    Some(known)
}

/// Recomputes a few entries, chosen by the clock, and requires a match.
fn spot_check(known: &Known, leaf_size: u64) -> bool {
    let indices: Vec<u64> = known
        .iter()
        .enumerate()
        .filter(|(_, cv)| cv.is_some())
        .map(|(i, _)| i as u64)
        .collect();
    if indices.is_empty() {
        return true;
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as usize);
    (0..SPOT_CHECKS.min(indices.len())).all(|k| {
        let index = indices[(seed.wrapping_mul(2654435761).wrapping_add(k * 7919)) % indices.len()];
        // A disk of two leaves or more: interior, as cached.
        let Ok(plan) = DigestPlan::new(leaf_size.saturating_mul(index + 2), leaf_size) else {
            return false;
        };
        let expected = known.get(index as usize).copied().flatten();
        matches!(plan.zero_leaf(index * leaf_size, leaf_size), Leaf::Cv(cv) if Some(cv) == expected)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_leaves_equal_computed_ones_and_survive_a_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let plan = DigestPlan::new(10 * 4096, 4096).unwrap();
        let cache = ZeroCache::load(dir.path(), 4096);
        assert!(cache.is_empty());
        for i in 0..10 {
            assert_eq!(cache.zero_leaf(&plan, i), plan.zero_leaf(i * 4096, 4096));
        }
        cache.save().unwrap();
        let again = ZeroCache::load(dir.path(), 4096);
        assert_eq!(again.len(), 10);
        assert_eq!(again.zero_leaf(&plan, 7), plan.zero_leaf(7 * 4096, 4096));
    }

    #[test]
    fn a_damaged_or_forged_file_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let plan = DigestPlan::new(8 * 4096, 4096).unwrap();
        let cache = ZeroCache::load(dir.path(), 4096);
        for i in 0..8 {
            cache.zero_leaf(&plan, i);
        }
        cache.save().unwrap();
        let path = dir.path().join("zero-leaves-4096.bin");
        let good = std::fs::read(&path).unwrap();
        // A flipped bit: the checksum catches it.
        let mut bad = good.clone();
        bad[40] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(ZeroCache::load(dir.path(), 4096).is_empty());
        // Every value wrong but the checksum recomputed: the spot checks
        // catch it.
        let mut forged = good[..good.len() - 32].to_vec();
        for e in 0..8 {
            forged[24 + e * 40 + 8] ^= 0xFF;
        }
        let sum = blake3::hash(&forged);
        forged.extend_from_slice(sum.as_bytes());
        std::fs::write(&path, &forged).unwrap();
        assert!(ZeroCache::load(dir.path(), 4096).is_empty());
        // Another leaf size's file is not used.
        std::fs::write(&path, &good).unwrap();
        assert!(ZeroCache::load(dir.path(), 8192).is_empty());
    }
}
