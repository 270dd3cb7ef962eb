//! The block allocation table and the per-block sector bitmaps.

use super::footer::SECTOR;
use crate::error::{Error, ErrorKind, Result};

/// A BAT entry for a block that is not stored.
pub const UNALLOCATED: u32 = u32::MAX;

/// The BAT entry for a block placed at file offset `offset` (a sector
/// boundary), or `None` past the 2 TiB a u32 sector number can address.
pub fn entry_for(offset: u64) -> Option<u32> {
    u32::try_from(offset / SECTOR)
        .ok()
        .filter(|&e| e != UNALLOCATED)
}

/// Decodes `entries` big-endian u32 entries.
pub fn parse_bat(bytes: &[u8], entries: u32) -> Result<Vec<u32>> {
    let needed = u64::from(entries) * 4;
    if (bytes.len() as u64) < needed {
        return Err(ErrorKind::Truncated {
            what: "VHD BAT",
            needed,
            at: 0,
            available: bytes.len() as u64,
        }
        .into());
    }
    Ok(bytes
        .chunks_exact(4)
        .take(entries as usize)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Encodes a BAT padded to a whole sector with 0xFF, as qemu writes it.
pub fn serialize_bat(bat: &[u32]) -> Vec<u8> {
    let mut out: Vec<u8> = bat.iter().flat_map(|e| e.to_be_bytes()).collect();
    out.resize(bat_bytes(bat.len() as u32) as usize, 0xFF);
    out
}

/// Bytes the BAT takes on disk, a whole number of sectors.
pub fn bat_bytes(entries: u32) -> u64 {
    (u64::from(entries) * 4).div_ceil(SECTOR) * SECTOR
}

/// Bytes of the sector bitmap in front of each block, a whole number of
/// sectors (512 for 2 MiB blocks).
pub fn bitmap_bytes(block_size: u32) -> u64 {
    (u64::from(block_size) / SECTOR)
        .div_ceil(8)
        .div_ceil(SECTOR)
        * SECTOR
}

/// Whether sector `index` of a block is stored here. Bits are MSB first.
pub fn bit(bitmap: &[u8], index: u64) -> bool {
    bitmap
        .get((index / 8) as usize)
        .is_some_and(|b| b & (0x80 >> (index % 8)) != 0)
}

pub fn set_bits(bitmap: &mut [u8], range: std::ops::Range<u64>) -> bool {
    let mut changed = false;
    for i in range {
        if let Some(b) = bitmap.get_mut((i / 8) as usize) {
            let mask = 0x80 >> (i % 8);
            changed |= *b & mask == 0;
            *b |= mask;
        }
    }
    changed
}

/// The length of the run of sectors from `start` (below `end`) that share
/// `start`'s bit, and that bit.
pub fn run_at(bitmap: &[u8], start: u64, end: u64) -> (bool, u64) {
    let value = bit(bitmap, start);
    let mut i = start + 1;
    while i < end {
        // Whole bytes at once where the run is long.
        if i.is_multiple_of(8) && i + 8 <= end {
            let full = if value { 0xFF } else { 0x00 };
            if bitmap.get((i / 8) as usize) == Some(&full) {
                i += 8;
                continue;
            }
        }
        if bit(bitmap, i) != value {
            break;
        }
        i += 1;
    }
    (value, i - start)
}

/// The file areas a block may not overlap.
pub struct Reserved {
    pub what: &'static str,
    pub start: u64,
    pub end: u64,
}

/// Checks that every allocated block lies inside the data area and that no
/// two blocks, nor a block and the metadata, share a byte.
///
/// Sorting the allocated entries makes this O(n log n) in allocated blocks,
/// cheap even for a 2 TiB disk's million-entry BAT.
pub fn validate_bat(
    bat: &[u32],
    block_size: u32,
    data_limit: u64,
    reserved: &[Reserved],
) -> Result<()> {
    let span = bitmap_bytes(block_size) + u64::from(block_size);
    let mut blocks: Vec<(u64, u32)> = Vec::new();
    for (index, &entry) in bat.iter().enumerate() {
        if entry == UNALLOCATED {
            continue;
        }
        let index = index as u32;
        let start = u64::from(entry) * SECTOR;
        let end = start + span;
        if end > data_limit {
            return Err(Error::from(ErrorKind::BatEntryPastEnd {
                index,
                start,
                end,
                limit: data_limit,
            })
            .at(u64::from(index) * 4));
        }
        if let Some(r) = reserved.iter().find(|r| start < r.end && r.start < end) {
            return Err(Error::from(ErrorKind::BlockOverlapsMetadata {
                index,
                offset: start,
                what: r.what,
            })
            .at(u64::from(index) * 4));
        }
        blocks.push((start, index));
    }
    blocks.sort_unstable();
    for pair in blocks.windows(2) {
        let [(a_start, a), (b_start, b)] = [pair[0], pair[1]];
        if a_start + span > b_start {
            let (first, second) = (a.min(b), a.max(b));
            return Err(Error::from(ErrorKind::OverlappingBlocks {
                first,
                second,
                offset: b_start,
            })
            .at(u64::from(second) * 4));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_sizes_round_to_sectors() {
        assert_eq!(bitmap_bytes(2 << 20), 512);
        assert_eq!(bitmap_bytes(512), 512);
        assert_eq!(bitmap_bytes(4 << 20), 1024);
        assert_eq!(bat_bytes(1), 512);
        assert_eq!(bat_bytes(129), 1024);
    }

    #[test]
    fn runs_follow_msb_first_bits() {
        let bm = [0b1110_0000u8, 0xFF, 0x00, 0x01];
        assert_eq!(run_at(&bm, 0, 32), (true, 3));
        assert_eq!(run_at(&bm, 3, 32), (false, 5));
        assert_eq!(run_at(&bm, 8, 32), (true, 8));
        assert_eq!(run_at(&bm, 16, 32), (false, 15));
        assert_eq!(run_at(&bm, 31, 32), (true, 1));
    }

    #[test]
    fn overlapping_and_out_of_bounds_blocks_are_refused() {
        let bs = 4096;
        let span = 512 + 4096;
        let ok = [3, UNALLOCATED, 3 + span / 512];
        validate_bat(&ok, bs, 100_000, &[]).unwrap();
        let overlap = [3, 4];
        let err = validate_bat(&overlap, bs, 100_000, &[]).unwrap_err();
        assert!(matches!(
            err.kind(),
            ErrorKind::OverlappingBlocks {
                first: 0,
                second: 1,
                ..
            }
        ));
        let past = [190];
        let err = validate_bat(&past, bs, 100_000, &[]).unwrap_err();
        assert!(matches!(
            err.kind(),
            ErrorKind::BatEntryPastEnd { index: 0, .. }
        ));
        let meta = [Reserved {
            what: "BAT",
            start: 1536,
            end: 2048,
        }];
        let err = validate_bat(&[2], bs, 100_000, &meta).unwrap_err();
        assert!(matches!(
            err.kind(),
            ErrorKind::BlockOverlapsMetadata { .. }
        ));
    }
}
