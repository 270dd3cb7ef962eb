//! The 1024-byte dynamic-disk header, and the parent locators it points to.

use std::path::PathBuf;

use zerocopy::big_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::footer::{checksum, Layout, SECTOR};
use crate::error::{Error, ErrorKind, Result};

pub const HEADER_SIZE: usize = 1024;
pub const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
const CHECKSUM_AT: usize = 36;
const HEADER_LAYOUT: Layout = Layout {
    what: "VHD dynamic header",
    size: HEADER_SIZE,
    cookie: HEADER_COOKIE,
    checksum_at: CHECKSUM_AT,
    version_at: 24,
};
const LOCATOR_AT: usize = 576;
const LOCATOR_SIZE: usize = 24;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
struct RawLocator {
    platform_code: [u8; 4],
    data_space: U32,
    data_length: U32,
    reserved: U32,
    data_offset: U64,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawHeader {
    cookie: [u8; 8],
    data_offset: U64,
    table_offset: U64,
    header_version: U32,
    max_table_entries: U32,
    block_size: U32,
    checksum: U32,
    parent_unique_id: [u8; 16],
    parent_timestamp: U32,
    reserved1: [u8; 4],
    parent_unicode_name: [u8; 512],
    locators: [RawLocator; 8],
    reserved2: [u8; 256],
}

/// How a locator encodes the parent's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformCode {
    /// `W2ru`: a path relative to the child, UTF-16LE.
    RelativeW2ru,
    /// `W2ku`: an absolute path, UTF-16LE.
    AbsoluteW2ku,
    /// `MacX`: a UTF-8 `file://` URL.
    MacX,
    /// `Mac `, `Wi2r`, `Wi2k` or anything else we cannot turn into a path.
    Other([u8; 4]),
}

impl PlatformCode {
    fn from_bytes(b: [u8; 4]) -> Self {
        match &b {
            b"W2ru" => Self::RelativeW2ru,
            b"W2ku" => Self::AbsoluteW2ku,
            b"MacX" => Self::MacX,
            _ => Self::Other(b),
        }
    }

    fn to_bytes(self) -> [u8; 4] {
        match self {
            Self::RelativeW2ru => *b"W2ru",
            Self::AbsoluteW2ku => *b"W2ku",
            Self::MacX => *b"MacX",
            Self::Other(b) => b,
        }
    }
}

/// One parent-locator entry: where its path bytes sit in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Locator {
    pub code: PlatformCode,
    /// Space reserved for the data, in sectors (some writers put bytes here;
    /// readers only need `data_length`).
    pub data_space: u32,
    pub data_length: u32,
    pub data_offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicHeader {
    pub table_offset: u64,
    pub header_version: u32,
    pub max_table_entries: u32,
    pub block_size: u32,
    pub parent_unique_id: [u8; 16],
    pub parent_timestamp: u32,
    /// The parent's file name, as stored (UTF-16BE, decoded).
    pub parent_name: String,
    pub locators: Vec<Locator>,
}

impl DynamicHeader {
    /// Parses and checks a header. Offsets in errors are relative to it.
    pub fn parse(bytes: &[u8]) -> Result<DynamicHeader> {
        let raw = RawHeader::ref_from_prefix(bytes)
            .map_err(|_| HEADER_LAYOUT.truncated(bytes.len()))?
            .0;
        HEADER_LAYOUT.check(raw.as_bytes())?;
        let block_size = raw.block_size.get();
        if !block_size.is_power_of_two() || u64::from(block_size) < SECTOR {
            return Err(Error::from(ErrorKind::BadBlockSize(block_size.into())).at(32));
        }
        let locators = raw
            .locators
            .iter()
            .filter(|l| l.platform_code != [0; 4] && l.data_length.get() != 0)
            .map(|l| Locator {
                code: PlatformCode::from_bytes(l.platform_code),
                data_space: l.data_space.get(),
                data_length: l.data_length.get(),
                data_offset: l.data_offset.get(),
            })
            .collect();
        Ok(DynamicHeader {
            table_offset: raw.table_offset.get(),
            header_version: raw.header_version.get(),
            max_table_entries: raw.max_table_entries.get(),
            block_size,
            parent_unique_id: raw.parent_unique_id,
            parent_timestamp: raw.parent_timestamp.get(),
            parent_name: decode_utf16(&raw.parent_unicode_name, u16::from_be_bytes),
            locators,
        })
    }

    /// Serialises with a fresh checksum. At most eight locators are kept.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut raw = RawHeader {
            cookie: *HEADER_COOKIE,
            data_offset: u64::MAX.into(),
            table_offset: self.table_offset.into(),
            header_version: self.header_version.into(),
            max_table_entries: self.max_table_entries.into(),
            block_size: self.block_size.into(),
            checksum: 0.into(),
            parent_unique_id: self.parent_unique_id,
            parent_timestamp: self.parent_timestamp.into(),
            reserved1: [0; 4],
            parent_unicode_name: [0; 512],
            locators: [RawLocator::new_zeroed(); 8],
            reserved2: [0; 256],
        };
        let name: Vec<u8> = self
            .parent_name
            .encode_utf16()
            .take(256)
            .flat_map(u16::to_be_bytes)
            .collect();
        raw.parent_unicode_name[..name.len()].copy_from_slice(&name);
        for (slot, l) in raw.locators.iter_mut().zip(&self.locators) {
            *slot = RawLocator {
                platform_code: l.code.to_bytes(),
                data_space: l.data_space.into(),
                data_length: l.data_length.into(),
                reserved: 0.into(),
                data_offset: l.data_offset.into(),
            };
        }
        raw.checksum = checksum(raw.as_bytes(), CHECKSUM_AT).into();
        let mut out = [0u8; HEADER_SIZE];
        out.copy_from_slice(raw.as_bytes());
        out
    }

    /// Where each locator entry sits inside the header, for error offsets.
    pub fn locator_entry_offset(index: usize) -> u64 {
        (LOCATOR_AT + index * LOCATOR_SIZE) as u64
    }
}

fn decode_utf16(bytes: &[u8], word: fn([u8; 2]) -> u16) -> String {
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| word([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

/// A parent path as a locator records it, before it is resolved against
/// the filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocatorPath {
    Relative(PathBuf),
    Absolute(PathBuf),
}

/// Decodes a locator's data into a path. Windows separators become `/`; a
/// drive-letter path is kept as it is (it cannot resolve here, but its file
/// name still can, next to the child).
pub fn decode_locator(code: PlatformCode, data: &[u8]) -> Option<LocatorPath> {
    let text = match code {
        PlatformCode::RelativeW2ru | PlatformCode::AbsoluteW2ku => {
            decode_utf16(data, u16::from_le_bytes)
        }
        PlatformCode::MacX => {
            let s = String::from_utf8_lossy(data);
            let s = s.trim_end_matches('\0');
            let path = s.strip_prefix("file://")?;
            // `file://localhost/x` and `file:///x` both name `/x`.
            let path = path.strip_prefix("localhost").unwrap_or(path);
            percent_decode(path)?
        }
        PlatformCode::Other(_) => return None,
    };
    if text.is_empty() {
        return None;
    }
    let unix = text.replace('\\', "/");
    Some(match code {
        PlatformCode::RelativeW2ru => LocatorPath::Relative(PathBuf::from(unix)),
        _ => LocatorPath::Absolute(PathBuf::from(unix)),
    })
}

/// Encodes a path for a `W2ru`/`W2ku` locator.
pub fn encode_locator_utf16(path: &str) -> Vec<u8> {
    path.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> DynamicHeader {
        DynamicHeader {
            table_offset: 1536,
            header_version: 0x0001_0000,
            max_table_entries: 50,
            block_size: 2 << 20,
            parent_unique_id: [3; 16],
            parent_timestamp: 99,
            parent_name: "base.vhd".into(),
            locators: vec![Locator {
                code: PlatformCode::RelativeW2ru,
                data_space: 1,
                data_length: 22,
                data_offset: 2048,
            }],
        }
    }

    #[test]
    fn header_round_trips() {
        let h = header();
        assert_eq!(DynamicHeader::parse(&h.to_bytes()).unwrap(), h);
    }

    #[test]
    fn block_size_must_be_a_power_of_two() {
        let mut h = header();
        h.block_size = 3 << 20;
        let err = DynamicHeader::parse(&h.to_bytes()).unwrap_err();
        assert!(matches!(err.kind(), ErrorKind::BadBlockSize(n) if *n == 3 << 20));
        assert_eq!(err.offset(), Some(32));
    }

    #[test]
    fn locators_decode_windows_and_mac_paths() {
        let rel = encode_locator_utf16(".\\dir\\base.vhd");
        assert_eq!(
            decode_locator(PlatformCode::RelativeW2ru, &rel),
            Some(LocatorPath::Relative("./dir/base.vhd".into()))
        );
        assert_eq!(
            decode_locator(PlatformCode::MacX, b"file:///srv/my%20vm/base.vhd\0"),
            Some(LocatorPath::Absolute("/srv/my vm/base.vhd".into()))
        );
        assert_eq!(decode_locator(PlatformCode::MacX, b"http://x"), None);
        assert_eq!(
            decode_locator(PlatformCode::Other(*b"Mac "), b"alias"),
            None
        );
    }
}
