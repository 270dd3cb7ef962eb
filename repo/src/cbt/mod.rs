//! Changed-block tracking without a driver.
//!
//! A reflink clone kept from the last backup (the base) shares every
//! physical block of its disk file that has not been written since: a
//! write to a shared block goes to a new block (copy on write), and the
//! base keeps the old one referenced, so no other file can be given it.
//! Comparing the FIEMAP extents of the base and of a new clone therefore
//! gives the file ranges that may have changed ([`changed_ranges`]), and
//! the images' allocation maps turn those into the cells of the virtual
//! disk that must be read again ([`changed_cells`]). Every other cell is
//! the same as in the base's snapshot.
//!
//! Both steps are pure functions over what the kernel and the image
//! parsers reported. Whatever they cannot vouch for is a [`Fallback`]: the
//! caller reads everything, and says why.

mod base;

pub use crate::bases::{release, BASE_DIR};
pub use base::{adopt, backup_files, track, Tracked};

use std::fmt;
use std::ops::Range;

use vsnap_engine::io::fiemap::{self, FileExtent};
use vsnap_formats::extent::{AllocationMap, Extent, ExtentKind};

/// Why a backup reads the whole disk instead of what changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fallback {
    /// An extent whose place on the device the filesystem does not vouch
    /// for: unknown, delayed, encoded, encrypted, inline, or unaligned.
    Uncertain {
        file: &'static str,
        offset: u64,
        flags: u32,
    },
    /// The same physical blocks at the same offset in both files, but not
    /// marked shared: a clone's blocks are shared, so something other than
    /// a clone made these files.
    NotShared { offset: u64 },
    /// The kernel's extent list is out of order or overlaps itself.
    Malformed { file: &'static str, offset: u64 },
    /// The two images differ in what the comparison relies on.
    Geometry(String),
    /// An extent of the image lies in a parent (a differencing chain),
    /// whose file is not compared.
    Layered { offset: u64 },
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fallback::Uncertain {
                file,
                offset,
                flags,
            } => write!(
                f,
                "the {file}'s extent at byte {offset} has no certain place on the device (FIEMAP flags {flags:#x})"
            ),
            Fallback::NotShared { offset } => write!(
                f,
                "the base and the new clone use the same blocks at byte {offset} without sharing them"
            ),
            Fallback::Malformed { file, offset } => write!(
                f,
                "the {file}'s extents are out of order or overlap at byte {offset}"
            ),
            Fallback::Geometry(why) => f.write_str(why),
            Fallback::Layered { offset } => write!(
                f,
                "the disk's data at virtual byte {offset} lies in a parent image"
            ),
        }
    }
}

/// Flags that leave an extent's device range uncertain.
const UNCERTAIN: u32 = fiemap::FLAG_UNKNOWN
    | fiemap::FLAG_DELALLOC
    | fiemap::FLAG_ENCODED
    | fiemap::FLAG_ENCRYPTED
    | fiemap::FLAG_NOT_ALIGNED
    | fiemap::FLAG_INLINE
    | fiemap::FLAG_TAIL;

/// What one file holds at one offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Hole,
    /// At this device byte, with these flags.
    Block {
        physical: u64,
        flags: u32,
    },
}

/// The extents of a file of `len` bytes, checked and cut at `len` (an
/// extent may reach past the end: a preallocation, or a partial block).
fn checked(
    extents: &[FileExtent],
    len: u64,
    file: &'static str,
) -> Result<Vec<FileExtent>, Fallback> {
    let mut out: Vec<FileExtent> = Vec::with_capacity(extents.len());
    let mut end = 0u64;
    for e in extents {
        let Some(e_end) = e.logical.checked_add(e.length) else {
            return Err(Fallback::Malformed {
                file,
                offset: e.logical,
            });
        };
        if e.logical < end || e.length == 0 || e.physical.checked_add(e.length).is_none() {
            return Err(Fallback::Malformed {
                file,
                offset: e.logical,
            });
        }
        end = e_end;
        if e.logical >= len {
            continue;
        }
        if e.flags & UNCERTAIN != 0 {
            return Err(Fallback::Uncertain {
                file,
                offset: e.logical,
                flags: e.flags,
            });
        }
        out.push(FileExtent {
            length: e_end.min(len) - e.logical,
            ..*e
        });
    }
    Ok(out)
}

/// A cursor over one file's extents, asked in increasing offsets.
struct Walk<'a> {
    extents: &'a [FileExtent],
    next: usize,
}

impl Walk<'_> {
    /// What the file holds at `at`, and where that stops being so.
    fn at(&mut self, at: u64, len: u64) -> (Place, u64) {
        while self
            .extents
            .get(self.next)
            .is_some_and(|e| e.logical + e.length <= at)
        {
            self.next += 1;
        }
        match self.extents.get(self.next) {
            Some(e) if e.logical <= at => (
                Place::Block {
                    physical: e.physical + (at - e.logical),
                    flags: e.flags,
                },
                e.logical + e.length,
            ),
            Some(e) => (Place::Hole, e.logical.min(len)),
            None => (Place::Hole, len),
        }
    }
}

/// The byte ranges of the new clone (of `new_len` bytes) whose content may
/// differ from the base's (of `base_len` bytes): every range but those
/// where both are holes, or both lie on the same device blocks, shared.
/// Sorted and merged.
pub fn changed_ranges(
    base: &[FileExtent],
    base_len: u64,
    new: &[FileExtent],
    new_len: u64,
) -> Result<Vec<Range<u64>>, Fallback> {
    let base = checked(base, base_len, "base")?;
    let new = checked(new, new_len, "new clone")?;
    let mut b = Walk {
        extents: &base,
        next: 0,
    };
    let mut n = Walk {
        extents: &new,
        next: 0,
    };
    let mut out: Vec<Range<u64>> = Vec::new();
    let mut at = 0u64;
    while at < new_len {
        let (np, n_end) = n.at(at, new_len);
        let (bp, b_end) = if at < base_len {
            b.at(at, base_len)
        } else {
            (Place::Hole, new_len)
        };
        // Both places hold from `at` to the nearer of their ends.
        let end = n_end.min(if at < base_len { b_end } else { new_len });
        let same = match (np, bp) {
            _ if at >= base_len => false,
            (Place::Hole, Place::Hole) => true,
            (
                Place::Block {
                    physical: p,
                    flags: f,
                },
                Place::Block {
                    physical: q,
                    flags: g,
                },
            ) if p == q => {
                if f & g & fiemap::FLAG_SHARED == 0 {
                    return Err(Fallback::NotShared { offset: at });
                }
                // Unwritten or not is part of the content.
                (f ^ g) & fiemap::FLAG_UNWRITTEN == 0
            }
            _ => false,
        };
        if !same {
            match out.last_mut() {
                Some(r) if r.end == at => r.end = end,
                _ => out.push(at..end),
            }
        }
        at = end;
    }
    Ok(out)
}

/// The part of `map` within `cell`, cut at its edges.
fn clip(extents: &[Extent], from: &mut usize, cell: Range<u64>) -> Vec<Extent> {
    while extents.get(*from).is_some_and(|e| e.end() <= cell.start) {
        *from += 1;
    }
    let mut out = Vec::new();
    for e in &extents[*from..] {
        if e.offset >= cell.end {
            break;
        }
        let start = e.offset.max(cell.start);
        let end = e.end().min(cell.end);
        out.push(Extent {
            offset: start,
            length: end - start,
            file_offset: e.file_offset.map(|f| f + (start - e.offset)),
            ..*e
        });
    }
    out
}

/// Which cells of `chunk_size` bytes of the new image must be read again:
/// those whose extents (kind, layer, file offsets) differ from the base
/// image's, and those with data in a changed file range. Both maps must
/// be of one virtual size and hold data in the image file itself.
pub fn changed_cells(
    base: &AllocationMap,
    new: &AllocationMap,
    changed: &[Range<u64>],
    chunk_size: u64,
) -> Result<Vec<bool>, Fallback> {
    if base.size() != new.size() {
        return Err(Fallback::Geometry(format!(
            "the virtual size changed from {} to {} bytes",
            base.size(),
            new.size()
        )));
    }
    for e in base.extents().iter().chain(new.extents()) {
        if e.kind == ExtentKind::Data && e.layer != Some(0) {
            return Err(Fallback::Layered { offset: e.offset });
        }
    }
    let size = new.size();
    let cells = size.div_ceil(chunk_size.max(1));
    let mut out = Vec::with_capacity(cells as usize);
    let (mut bi, mut ni) = (0usize, 0usize);
    for cell in 0..cells {
        let range = cell * chunk_size..((cell + 1) * chunk_size).min(size);
        let b = clip(base.extents(), &mut bi, range.clone());
        let n = clip(new.extents(), &mut ni, range);
        let touched = n.iter().any(|e| {
            let Some(f) = e.file_offset.filter(|_| e.kind == ExtentKind::Data) else {
                return false;
            };
            overlaps(changed, f..f + e.length)
        });
        out.push(b != n || touched);
    }
    Ok(out)
}

/// Whether `r` meets any of the sorted, disjoint ranges `changed`. (File
/// offsets of successive extents are not monotonic: a VHD's blocks lie in
/// the order they were allocated, so each is a binary search.)
fn overlaps(changed: &[Range<u64>], r: Range<u64>) -> bool {
    let i = changed.partition_point(|c| c.end <= r.start);
    changed.get(i).is_some_and(|c| c.start < r.end)
}

#[cfg(test)]
// A list of one range is what these functions return, not a mistake.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use fiemap::{FLAG_DELALLOC, FLAG_LAST, FLAG_SHARED, FLAG_UNWRITTEN};
    use vsnap_formats::extent::MapBuilder;

    fn ext(logical: u64, physical: u64, length: u64, flags: u32) -> FileExtent {
        FileExtent {
            logical,
            physical,
            length,
            flags,
        }
    }

    const K: u64 = 4096;

    #[test]
    fn shared_blocks_are_unchanged_and_moved_ones_changed() {
        let base = [ext(0, 100 * K, 8 * K, FLAG_SHARED | FLAG_LAST)];
        // Block 2 rewritten (moved), the rest still shared.
        let new = [
            ext(0, 100 * K, 2 * K, FLAG_SHARED),
            ext(2 * K, 900 * K, K, 0),
            ext(3 * K, 103 * K, 5 * K, FLAG_SHARED | FLAG_LAST),
        ];
        assert_eq!(
            changed_ranges(&base, 8 * K, &new, 8 * K).unwrap(),
            [2 * K..3 * K]
        );
    }

    #[test]
    fn holes_growth_and_unwritten_extents() {
        let base = [ext(0, 100 * K, 4 * K, FLAG_SHARED)];
        let new = [
            // Punched: a hole where the base has data.
            ext(0, 100 * K, K, FLAG_SHARED),
            // Zero-range: same blocks cannot be; a new unwritten extent.
            ext(2 * K, 500 * K, K, FLAG_UNWRITTEN),
            ext(3 * K, 103 * K, K, FLAG_SHARED),
            // Grown past the base's end.
            ext(6 * K, 600 * K, 2 * K, FLAG_LAST),
        ];
        assert_eq!(
            changed_ranges(&base, 4 * K, &new, 8 * K).unwrap(),
            [K..3 * K, 4 * K..8 * K]
        );
        // The same blocks, but unwritten in one: zeros against data.
        let unwritten = [ext(0, 100 * K, 4 * K, FLAG_SHARED | FLAG_UNWRITTEN)];
        assert_eq!(
            changed_ranges(&base, 4 * K, &unwritten, 4 * K).unwrap(),
            [0..4 * K]
        );
        // Holes in both: unchanged.
        assert_eq!(changed_ranges(&[], 8 * K, &[], 8 * K).unwrap(), []);
        // Truncated: nothing of the new file changed, it is shorter.
        assert_eq!(changed_ranges(&base, 4 * K, &base, 2 * K).unwrap(), []);
    }

    #[test]
    fn what_cannot_be_vouched_for_falls_back() {
        let base = [ext(0, 100 * K, 4 * K, FLAG_SHARED)];
        let delalloc = [ext(0, 0, 4 * K, FLAG_DELALLOC | fiemap::FLAG_UNKNOWN)];
        assert!(matches!(
            changed_ranges(&base, 4 * K, &delalloc, 4 * K),
            Err(Fallback::Uncertain {
                file: "new clone",
                offset: 0,
                ..
            })
        ));
        let unshared = [ext(0, 100 * K, 4 * K, 0)];
        assert_eq!(
            changed_ranges(&base, 4 * K, &unshared, 4 * K),
            Err(Fallback::NotShared { offset: 0 })
        );
        let overlapping = [ext(0, 1, 2 * K, 0), ext(K, 9, K, 0)];
        assert_eq!(
            changed_ranges(&overlapping, 4 * K, &base, 4 * K),
            Err(Fallback::Malformed {
                file: "base",
                offset: K
            })
        );
        let e = changed_ranges(&base, 4 * K, &unshared, 4 * K).unwrap_err();
        assert!(e.to_string().contains("without sharing"), "{e}");
    }

    fn map(size: u64, data: &[(u64, u64, u64)]) -> AllocationMap {
        let mut b = MapBuilder::new(0);
        let mut at = 0;
        for &(offset, length, file) in data {
            b.unallocated(at, offset - at);
            b.data(offset, length, 0, file);
            at = offset + length;
        }
        b.unallocated(at, size - at);
        b.finish()
    }

    #[test]
    fn cells_change_where_their_data_or_their_map_did() {
        let m = 1 << 20;
        // 4 cells of 1 MiB; data in cells 0, 1 and 3, in file order 3, 0, 1.
        let base = map(4 * m, &[(0, 2 * m, 10 * m), (3 * m, m, 5 * m)]);
        // Nothing changed.
        assert_eq!(
            changed_cells(&base, &base, &[], m).unwrap(),
            [false, false, false, false]
        );
        // A write inside cell 3's data, whose file offset is lowest.
        assert_eq!(
            changed_cells(&base, &base, &[5 * m + 7..5 * m + 9], m).unwrap(),
            [false, false, false, true]
        );
        // A new block for cell 2 (its data appended to the file).
        let grown = map(
            4 * m,
            &[(0, 2 * m, 10 * m), (2 * m, m, 12 * m), (3 * m, m, 5 * m)],
        );
        assert_eq!(
            changed_cells(&base, &grown, &[12 * m..13 * m], m).unwrap(),
            [false, false, true, false]
        );
        // A map change alone is enough.
        assert_eq!(
            changed_cells(&base, &grown, &[], m).unwrap(),
            [false, false, true, false]
        );
        assert!(matches!(
            changed_cells(&base, &map(5 * m, &[]), &[], m),
            Err(Fallback::Geometry(_))
        ));
    }
}
