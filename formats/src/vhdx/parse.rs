//! Pure parsers of VHDX structures. Offsets in errors are relative to the
//! structure parsed; the open path rebases them onto the file.

use crate::error::{Error, ErrorKind, Result};

/// The header section's layout: fixed by the format.
pub const HEADER_1_OFFSET: u64 = 64 << 10;
pub const HEADER_2_OFFSET: u64 = 128 << 10;
pub const REGION_TABLE_OFFSET: u64 = 192 << 10;
pub const REGION_TABLE_2_OFFSET: u64 = 256 << 10;
pub const HEADER_SIZE: usize = 4096;
pub const REGION_TABLE_SIZE: usize = 64 << 10;
pub(super) const MIB: u64 = 1 << 20;

pub use super::guid::*;

pub(super) fn need(bytes: &[u8], at: usize, len: usize, what: &'static str) -> Result<()> {
    if at.checked_add(len).is_none_or(|end| end > bytes.len()) {
        return Err(ErrorKind::Truncated {
            what,
            needed: len as u64,
            at: at as u64,
            available: bytes.len().saturating_sub(at) as u64,
        }
        .into());
    }
    Ok(())
}

pub(super) use crate::bytes::{le16 as u16_at, le32 as u32_at, le64 as u64_at};

pub(super) fn guid_at(b: &[u8], at: usize) -> Guid {
    let mut g = [0u8; 16];
    g.copy_from_slice(&b[at..at + 16]);
    Guid(g)
}

pub(super) fn magic(b: &[u8], expected: &'static str, what: &'static str) -> Result<()> {
    let found = &b[..expected.len()];
    if found != expected.as_bytes() {
        return Err(ErrorKind::BadMagic {
            what,
            expected,
            found: String::from_utf8_lossy(found).into_owned(),
        }
        .into());
    }
    Ok(())
}

/// CRC-32C of `bytes` with the 4-byte checksum field at `at` read as zero.
pub fn crc_with_field_zeroed(bytes: &[u8], at: usize) -> u32 {
    let crc = crc32c::crc32c(&bytes[..at]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &bytes[at + 4..])
}

pub(super) fn check_crc(bytes: &[u8], at: usize, what: &'static str) -> Result<()> {
    let stored = u32_at(bytes, at);
    let computed = crc_with_field_zeroed(bytes, at);
    if stored != computed {
        return Err(ErrorKind::BadChecksum {
            what,
            stored,
            computed,
        }
        .into());
    }
    Ok(())
}

/// The file identifier: `vhdxfile`, then who made it (UTF-16LE).
pub fn parse_identifier(bytes: &[u8]) -> Result<String> {
    need(bytes, 0, 8 + 512, "VHDX file identifier")?;
    magic(bytes, "vhdxfile", "VHDX file identifier")?;
    let units: Vec<u16> = bytes[8..8 + 512]
        .chunks_exact(2)
        .map(|c| u16_at(c, 0))
        .take_while(|&u| u != 0)
        .collect();
    Ok(String::from_utf16_lossy(&units))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub sequence: u64,
    pub file_write_guid: Guid,
    pub data_write_guid: Guid,
    /// Non-zero: the log holds entries to replay before the BAT and
    /// metadata can be trusted.
    pub log_guid: Guid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

/// One header (4 KiB, its CRC over all of it).
pub fn parse_header(bytes: &[u8], what: &'static str) -> Result<Header> {
    need(bytes, 0, HEADER_SIZE, what)?;
    let b = &bytes[..HEADER_SIZE];
    magic(b, "head", what)?;
    check_crc(b, 4, what)?;
    let h = Header {
        sequence: u64_at(b, 8),
        file_write_guid: guid_at(b, 16),
        data_write_guid: guid_at(b, 32),
        log_guid: guid_at(b, 48),
        log_version: u16_at(b, 64),
        version: u16_at(b, 66),
        log_length: u32_at(b, 68),
        log_offset: u64_at(b, 72),
    };
    if h.version != 1 {
        return Err(ErrorKind::UnsupportedVersion {
            what,
            found: u32::from(h.version),
            expected: 1,
        }
        .into());
    }
    if h.log_version != 0 {
        return Err(ErrorKind::UnsupportedVersion {
            what: "VHDX log",
            found: u32::from(h.log_version),
            expected: 0,
        }
        .into());
    }
    if !u64::from(h.log_length).is_multiple_of(MIB) || !h.log_offset.is_multiple_of(MIB) {
        return Err(ErrorKind::Corrupt {
            what,
            reason: format!(
                "the log's offset {} and length {} must be multiples of 1 MiB",
                h.log_offset, h.log_length
            ),
        }
        .into());
    }
    Ok(h)
}

/// The current header: the valid one with the higher sequence number.
/// Returns which (1 or 2) with it.
pub fn choose_header(first: Result<Header>, second: Result<Header>) -> Result<(u8, Header)> {
    match (first, second) {
        (Ok(a), Ok(b)) if b.sequence > a.sequence => Ok((2, b)),
        (Ok(a), _) => Ok((1, a)),
        (Err(_), Ok(b)) => Ok((2, b)),
        (Err(a), Err(b)) => Err(ErrorKind::NoValidHeader {
            first: a.to_string(),
            second: b.to_string(),
        }
        .into()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub offset: u64,
    pub length: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Regions {
    pub bat: Region,
    pub metadata: Region,
}

/// The region table (64 KiB, its CRC over all of it). Both the BAT and
/// the metadata region must be there; an unknown region marked required
/// refuses the file.
pub fn parse_region_table(bytes: &[u8]) -> Result<Regions> {
    const WHAT: &str = "VHDX region table";
    need(bytes, 0, REGION_TABLE_SIZE, WHAT)?;
    let b = &bytes[..REGION_TABLE_SIZE];
    magic(b, "regi", WHAT)?;
    check_crc(b, 4, WHAT)?;
    let count = u32_at(b, 8) as usize;
    if count > 2047 {
        return Err(ErrorKind::Corrupt {
            what: WHAT,
            reason: format!("{count} entries, more than the 2047 allowed"),
        }
        .into());
    }
    let (mut bat, mut metadata) = (None, None);
    for i in 0..count {
        let at = 16 + i * 32;
        let guid = guid_at(b, at);
        let region = Region {
            offset: u64_at(b, at + 16),
            length: u32_at(b, at + 24),
        };
        let required = u32_at(b, at + 28) & 1 != 0;
        if !region.offset.is_multiple_of(MIB)
            || region.offset < MIB
            || !u64::from(region.length).is_multiple_of(MIB)
        {
            return Err(ErrorKind::Corrupt {
                what: WHAT,
                reason: format!(
                    "region {guid} at {} of {} bytes is not 1 MiB-aligned past the header section",
                    region.offset, region.length
                ),
            }
            .into());
        }
        let slot = match guid {
            g if g == BAT_REGION => &mut bat,
            g if g == METADATA_REGION => &mut metadata,
            _ if required => {
                return Err(ErrorKind::UnknownRequired {
                    what: "region",
                    guid: guid.to_string(),
                }
                .into())
            }
            _ => continue,
        };
        if slot.replace(region).is_some() {
            return Err(ErrorKind::Corrupt {
                what: WHAT,
                reason: format!("region {guid} is listed twice"),
            }
            .into());
        }
    }
    match (bat, metadata) {
        (Some(bat), Some(metadata)) => Ok(Regions { bat, metadata }),
        (None, _) => Err(ErrorKind::Corrupt {
            what: WHAT,
            reason: "no BAT region".into(),
        }
        .into()),
        (_, None) => Err(ErrorKind::Corrupt {
            what: WHAT,
            reason: "no metadata region".into(),
        }
        .into()),
    }
}

/// The metadata items vsnap needs, parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub block_size: u32,
    pub leave_blocks_allocated: bool,
    pub has_parent: bool,
    pub virtual_size: u64,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    pub page83: Option<Guid>,
    /// Key and value pairs of the parent locator (a differencing disk's).
    pub parent_locator: Option<Vec<(String, String)>>,
}

fn bad_metadata(reason: String) -> Error {
    ErrorKind::Corrupt {
        what: "VHDX metadata",
        reason,
    }
    .into()
}

fn required<'a>(v: Option<&'a [u8]>, name: &str) -> Result<&'a [u8]> {
    v.ok_or_else(|| bad_metadata(format!("no {name} item")))
}

fn utf16(bytes: &[u8]) -> String {
    let units: Vec<u16> = bytes.chunks_exact(2).map(|c| u16_at(c, 0)).collect();
    String::from_utf16_lossy(&units)
}

fn parse_locator(item: &[u8]) -> Result<Vec<(String, String)>> {
    if item.len() < 20 {
        return Err(bad_metadata(format!(
            "the parent locator is {} bytes, under its 20-byte header",
            item.len()
        )));
    }
    let count = usize::from(u16_at(item, 18));
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let at = 20 + i * 12;
        if at + 12 > item.len() {
            return Err(bad_metadata(format!(
                "parent locator entry {i} is past the item's end"
            )));
        }
        let (ko, vo) = (u32_at(item, at) as usize, u32_at(item, at + 4) as usize);
        let (kl, vl) = (
            usize::from(u16_at(item, at + 8)),
            usize::from(u16_at(item, at + 10)),
        );
        let slice = |o: usize, l: usize| {
            o.checked_add(l)
                .filter(|&e| e <= item.len())
                .map(|e| &item[o..e])
                .ok_or_else(|| {
                    bad_metadata(format!(
                        "parent locator entry {i} points past the item's end"
                    ))
                })
        };
        out.push((utf16(slice(ko, kl)?), utf16(slice(vo, vl)?)));
    }
    Ok(out)
}

/// The metadata region: its table, then each item vsnap needs. An unknown
/// item marked required refuses the file.
pub fn parse_metadata(region: &[u8]) -> Result<Metadata> {
    need(region, 0, 32, "VHDX metadata table")?;
    magic(region, "metadata", "VHDX metadata table")?;
    let count = usize::from(u16_at(region, 10));
    if count > 2047 {
        return Err(bad_metadata(format!(
            "{count} entries, more than the 2047 allowed"
        )));
    }
    need(region, 32, count * 32, "VHDX metadata table")?;
    let mut items: Vec<(Guid, &[u8])> = Vec::with_capacity(count);
    for i in 0..count {
        let at = 32 + i * 32;
        let guid = guid_at(region, at);
        let offset = u32_at(region, at + 16) as usize;
        let length = u32_at(region, at + 20) as usize;
        let required = u32_at(region, at + 24) & 4 != 0;
        if length == 0 {
            continue;
        }
        if offset < (64 << 10) || offset.checked_add(length).is_none_or(|e| e > region.len()) {
            return Err(bad_metadata(format!(
                "item {guid} at {offset} of {length} bytes is outside the metadata region"
            )));
        }
        let known = [
            FILE_PARAMETERS,
            VIRTUAL_DISK_SIZE,
            PAGE_83_DATA,
            LOGICAL_SECTOR_SIZE,
            PHYSICAL_SECTOR_SIZE,
            PARENT_LOCATOR,
        ];
        if !known.contains(&guid) {
            if required {
                return Err(ErrorKind::UnknownRequired {
                    what: "metadata item",
                    guid: guid.to_string(),
                }
                .into());
            }
            continue;
        }
        items.push((guid, &region[offset..offset + length]));
    }
    let item = |g: Guid, min: usize, name: &str| -> Result<Option<&[u8]>> {
        match items.iter().find(|(k, _)| *k == g) {
            Some((_, b)) if b.len() < min => Err(bad_metadata(format!(
                "{name} is {} bytes, under {min}",
                b.len()
            ))),
            Some((_, b)) => Ok(Some(*b)),
            None => Ok(None),
        }
    };
    let fp = required(
        item(FILE_PARAMETERS, 8, "File Parameters")?,
        "File Parameters",
    )?;
    let block_size = u32_at(fp, 0);
    let flags = u32_at(fp, 4);
    if !block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&u64::from(block_size)) {
        return Err(ErrorKind::BadBlockSize(u64::from(block_size)).into());
    }
    let size = required(
        item(VIRTUAL_DISK_SIZE, 8, "Virtual Disk Size")?,
        "Virtual Disk Size",
    )?;
    let logical = required(
        item(LOGICAL_SECTOR_SIZE, 4, "Logical Sector Size")?,
        "Logical Sector Size",
    )?;
    let physical = required(
        item(PHYSICAL_SECTOR_SIZE, 4, "Physical Sector Size")?,
        "Physical Sector Size",
    )?;
    let logical_sector_size = u32_at(logical, 0);
    let physical_sector_size = u32_at(physical, 0);
    for (name, v) in [
        ("logical", logical_sector_size),
        ("physical", physical_sector_size),
    ] {
        if v != 512 && v != 4096 {
            return Err(bad_metadata(format!(
                "{name} sector size {v}, not 512 or 4096"
            )));
        }
    }
    let virtual_size = u64_at(size, 0);
    if virtual_size == 0 || !virtual_size.is_multiple_of(u64::from(logical_sector_size)) {
        return Err(ErrorKind::BadSize {
            size: virtual_size,
            reason: "a VHDX's size is a non-zero multiple of its logical sector size",
        }
        .into());
    }
    let has_parent = flags & 2 != 0;
    let parent_locator = match item(PARENT_LOCATOR, 20, "Parent Locator")? {
        Some(b) => Some(parse_locator(b)?),
        None if has_parent => {
            return Err(bad_metadata(
                "a differencing disk without a parent locator".into(),
            ))
        }
        None => None,
    };
    Ok(Metadata {
        block_size,
        leave_blocks_allocated: flags & 1 != 0,
        has_parent,
        virtual_size,
        logical_sector_size,
        physical_sector_size,
        page83: item(PAGE_83_DATA, 16, "Page 83 Data")?.map(|b| guid_at(b, 0)),
        parent_locator,
    })
}

/// BAT entry states (bits 0..2) as stored, for code that keeps entries raw.
pub const NOT_PRESENT: u64 = 0;
pub const ZERO: u64 = 2;
pub const FULLY_PRESENT: u64 = 6;
pub const PARTIALLY_PRESENT: u64 = 7;
/// A sector-bitmap entry's state when its bitmap block is in the file.
pub const BITMAP_PRESENT: u64 = 6;

/// A BAT entry's state (bits 0..2).
pub fn entry_state(raw: u64) -> u64 {
    raw & 7
}

/// Where a BAT entry's block starts in the file (bits 20..63, in MiB).
pub fn entry_offset(raw: u64) -> u64 {
    raw & !(MIB - 1)
}

/// A payload block's state, from bits 0..2 of its BAT entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadState {
    /// Zeros; in a differencing disk, the parent's data.
    NotPresent,
    Undefined,
    Zero,
    Unmapped,
    FullyPresent,
    /// Differencing only: the chunk's sector bitmap decides.
    PartiallyPresent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatEntry {
    pub state: PayloadState,
    /// Where the block starts in the file (a multiple of 1 MiB).
    pub file_offset: u64,
}

/// A payload BAT entry. State 4 is reserved, and refused. State 5 is
/// reserved in MS-VHDX 1.0 but was UNMAPPED in the v0.95 draft, and qemu
/// writes and reads it so (`PAYLOAD_BLOCK_UNMAPPED_v095`): it reads as
/// UNMAPPED, zeros, as qemu reads it.
pub fn parse_payload_entry(raw: u64, index: u64) -> Result<BatEntry> {
    let state = match entry_state(raw) {
        0 => PayloadState::NotPresent,
        1 => PayloadState::Undefined,
        2 => PayloadState::Zero,
        3 | 5 => PayloadState::Unmapped,
        6 => PayloadState::FullyPresent,
        7 => PayloadState::PartiallyPresent,
        s => {
            return Err(ErrorKind::Corrupt {
                what: "VHDX BAT",
                reason: format!("entry {index} has the reserved state {s}"),
            }
            .into())
        }
    };
    Ok(BatEntry {
        state,
        file_offset: entry_offset(raw),
    })
}

/// Payload blocks per sector-bitmap block: `2^23 * logical / block_size`.
pub fn chunk_ratio(logical_sector_size: u32, block_size: u32) -> u64 {
    ((1u64 << 23) * u64::from(logical_sector_size)) / u64::from(block_size).max(1)
}

/// Payload block `i`'s index in the BAT, past the sector-bitmap entries
/// interleaved after every `chunk_ratio` payload entries.
pub fn payload_bat_index(block: u64, ratio: u64) -> u64 {
    block + block / ratio.max(1)
}

/// The sector-bitmap entry that covers payload block `i`.
pub fn bitmap_bat_index(block: u64, ratio: u64) -> u64 {
    let ratio = ratio.max(1);
    (block / ratio) * (ratio + 1) + ratio
}

/// How many BAT entries a disk has, as [MS-VHDX] counts them: a
/// differencing disk has a sector-bitmap entry after every chunk of
/// payload entries, the last chunk included; any other disk only between
/// chunks, so none follows its last payload entry.
pub fn bat_entries(
    virtual_size: u64,
    block_size: u32,
    logical_sector_size: u32,
    has_parent: bool,
) -> u64 {
    let blocks = virtual_size.div_ceil(u64::from(block_size).max(1));
    let ratio = chunk_ratio(logical_sector_size, block_size).max(1);
    if has_parent {
        blocks.div_ceil(ratio) * (ratio + 1)
    } else {
        blocks + blocks.saturating_sub(1) / ratio
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn header(seq: u64) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[..4].copy_from_slice(b"head");
        b[8..16].copy_from_slice(&seq.to_le_bytes());
        b[66..68].copy_from_slice(&1u16.to_le_bytes());
        b[68..72].copy_from_slice(&(1u32 << 20).to_le_bytes());
        b[72..80].copy_from_slice(&(1u64 << 20).to_le_bytes());
        let crc = crc_with_field_zeroed(&b, 4);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn regions(entries: &[(Guid, u64, u32, u32)]) -> Vec<u8> {
        let mut b = vec![0u8; REGION_TABLE_SIZE];
        b[..4].copy_from_slice(b"regi");
        b[8..12].copy_from_slice(&(entries.len() as u32).to_le_bytes());
        for (i, (g, off, len, flags)) in entries.iter().enumerate() {
            let at = 16 + i * 32;
            b[at..at + 16].copy_from_slice(&g.0);
            b[at + 16..at + 24].copy_from_slice(&off.to_le_bytes());
            b[at + 24..at + 28].copy_from_slice(&len.to_le_bytes());
            b[at + 28..at + 32].copy_from_slice(&flags.to_le_bytes());
        }
        let crc = crc_with_field_zeroed(&b, 4);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn guids_print_as_microsoft_writes_them() {
        assert_eq!(
            BAT_REGION.to_string(),
            "2DC27766-F623-4200-9D64-115E9BFD4A08"
        );
        assert_eq!(
            METADATA_REGION.to_string(),
            "8B7CA206-4790-4B9A-B8FE-575F050F886E"
        );
    }

    #[test]
    fn the_valid_header_with_the_higher_sequence_wins() {
        let (a, b) = (header(5), header(9));
        assert_eq!(
            choose_header(parse_header(&a, "1"), parse_header(&b, "2"))
                .unwrap()
                .0,
            2
        );
        let mut bad = b.clone();
        bad[100] ^= 1;
        let e = parse_header(&bad, "VHDX header 2").unwrap_err();
        assert!(
            matches!(
                e.kind(),
                ErrorKind::BadChecksum {
                    what: "VHDX header 2",
                    ..
                }
            ),
            "{e}"
        );
        let (which, h) = choose_header(parse_header(&a, "1"), parse_header(&bad, "2")).unwrap();
        assert_eq!((which, h.sequence), (1, 5));
        let mut bad1 = a.clone();
        bad1[0] = b'x';
        let e = choose_header(
            parse_header(&bad1, "VHDX header 1"),
            parse_header(&bad, "VHDX header 2"),
        )
        .unwrap_err();
        assert!(matches!(e.kind(), ErrorKind::NoValidHeader { .. }), "{e}");
        assert!(
            e.to_string().contains("bad magic") && e.to_string().contains("checksum"),
            "{e}"
        );
    }

    #[test]
    fn region_tables_need_both_regions_and_refuse_unknown_required_ones() {
        let ok = regions(&[
            (BAT_REGION, 2 << 20, 1 << 20, 1),
            (METADATA_REGION, 3 << 20, 1 << 20, 1),
        ]);
        let r = parse_region_table(&ok).unwrap();
        assert_eq!(
            r.bat,
            Region {
                offset: 2 << 20,
                length: 1 << 20
            }
        );
        let mut bad = ok.clone();
        bad[200] = 1;
        assert!(matches!(
            parse_region_table(&bad).unwrap_err().kind(),
            ErrorKind::BadChecksum { .. }
        ));
        let unknown = Guid::from_fields(1, 2, 3, [4; 8]);
        let t = regions(&[
            (BAT_REGION, 2 << 20, 1 << 20, 1),
            (METADATA_REGION, 3 << 20, 1 << 20, 1),
            (unknown, 4 << 20, 1 << 20, 1),
        ]);
        let e = parse_region_table(&t).unwrap_err();
        assert!(
            matches!(e.kind(), ErrorKind::UnknownRequired { what: "region", .. }),
            "{e}"
        );
        // Not required: ignored.
        let t = regions(&[
            (BAT_REGION, 2 << 20, 1 << 20, 1),
            (METADATA_REGION, 3 << 20, 1 << 20, 1),
            (unknown, 4 << 20, 1 << 20, 0),
        ]);
        parse_region_table(&t).unwrap();
        let e = parse_region_table(&regions(&[(BAT_REGION, 2 << 20, 1 << 20, 1)])).unwrap_err();
        assert!(e.to_string().contains("no metadata region"), "{e}");
    }

    #[test]
    fn bat_interleaving_follows_the_chunk_ratio() {
        assert_eq!(chunk_ratio(512, 8 << 20), 512);
        assert_eq!(chunk_ratio(512, 32 << 20), 128);
        assert_eq!(chunk_ratio(512, 1 << 20), 4096);
        // Block 512 with ratio 512 comes after the first bitmap entry.
        assert_eq!(payload_bat_index(511, 512), 511);
        assert_eq!(payload_bat_index(512, 512), 513);
        assert_eq!(bitmap_bat_index(0, 512), 512);
        assert_eq!(bitmap_bat_index(512, 512), 1025);
        assert_eq!(bat_entries(1 << 30, 8 << 20, 512, false), 128);
        assert_eq!(bat_entries(1 << 30, 8 << 20, 512, true), 512 + 1);
        assert_eq!(bat_entries(5 << 30, 8 << 20, 512, false), 640 + 1);
        let e = parse_payload_entry((5 << 20) | 4, 3).unwrap_err();
        assert!(e.to_string().contains("reserved state 4"), "{e}");
        let v095 = parse_payload_entry((5 << 20) | 5, 0).unwrap();
        assert_eq!(v095.state, PayloadState::Unmapped);
        let ok = parse_payload_entry((5 << 20) | 6, 0).unwrap();
        assert_eq!(
            ok,
            BatEntry {
                state: PayloadState::FullyPresent,
                file_offset: 5 << 20
            }
        );
    }

    /// A bounded mutation run in the suite, as the fuzz target does
    /// unbounded: valid structures with bytes flipped (and their CRCs
    /// patched, so the parsers behind the checksum are reached) must
    /// return an error or a value, never panic.
    #[test]
    fn mutated_structures_never_panic() {
        use rand::{Rng as _, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(0x9e37_79b9_7f4a_7c15);
        let mut rand = move || rng.next_u64();
        let base_regions = regions(&[
            (BAT_REGION, 2 << 20, 1 << 20, 1),
            (METADATA_REGION, 3 << 20, 1 << 20, 1),
        ]);
        for _ in 0..3000 {
            let mut h = header(rand());
            let mut r = base_regions.clone();
            for _ in 0..(rand() % 8 + 1) {
                let i = (rand() % 128) as usize;
                h[i] = rand() as u8;
                let j = (rand() % (16 + 3 * 32)) as usize;
                r[j] = rand() as u8;
            }
            let hc = crc_with_field_zeroed(&h, 4);
            h[4..8].copy_from_slice(&hc.to_le_bytes());
            let rc = crc_with_field_zeroed(&r, 4);
            r[4..8].copy_from_slice(&rc.to_le_bytes());
            let _ = parse_header(&h, "h");
            let _ = parse_region_table(&r);
            // A metadata region of random items pointing anywhere.
            let mut md = vec![0u8; 96 << 10];
            md[..8].copy_from_slice(b"metadata");
            md[10..12].copy_from_slice(&((rand() % 8) as u16).to_le_bytes());
            for k in 0..8 {
                let at = 32 + k * 32;
                let g = [
                    FILE_PARAMETERS,
                    VIRTUAL_DISK_SIZE,
                    LOGICAL_SECTOR_SIZE,
                    PHYSICAL_SECTOR_SIZE,
                    PARENT_LOCATOR,
                    PAGE_83_DATA,
                ][(rand() % 6) as usize];
                md[at..at + 16].copy_from_slice(&g.0);
                md[at + 16..at + 20]
                    .copy_from_slice(&(((64 << 10) + rand() % (40 << 10)) as u32).to_le_bytes());
                md[at + 20..at + 24].copy_from_slice(&((rand() % 64) as u32).to_le_bytes());
                md[at + 24..at + 28].copy_from_slice(&((rand() % 8) as u32).to_le_bytes());
            }
            for _ in 0..64 {
                let i = (64 << 10) + (rand() % (32 << 10)) as usize;
                md[i] = rand() as u8;
            }
            let _ = parse_metadata(&md);
            let _ = parse_payload_entry(rand(), 0);
            let _ = parse_identifier(&h);
        }
    }
}
