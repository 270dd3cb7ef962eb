//! The 512-byte VHD footer: geometry, the size rule, the checksum.

use serde::{Deserialize, Serialize};
use zerocopy::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{ErrorKind, Result};

pub const FOOTER_SIZE: usize = 512;
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
pub const SECTOR: u64 = 512;
/// Seconds between the Unix epoch and the VHD epoch, 2000-01-01T00:00:00Z.
pub const VHD_EPOCH: u64 = 946_684_800;
/// The spec's ceiling, which qemu enforces too: 0xFF000000 sectors.
pub const MAX_DISK_SIZE: u64 = 0xFF00_0000 * SECTOR;
/// All ones: the data offset of a fixed disk, and "no block" in the BAT.
pub const NO_OFFSET: u64 = u64::MAX;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawFooter {
    cookie: [u8; 8],
    features: U32,
    format_version: U32,
    data_offset: U64,
    timestamp: U32,
    creator_app: [u8; 4],
    creator_version: U32,
    creator_host_os: [u8; 4],
    original_size: U64,
    current_size: U64,
    cylinders: U16,
    heads: u8,
    sectors_per_track: u8,
    disk_type: U32,
    checksum: U32,
    unique_id: [u8; 16],
    saved_state: u8,
    reserved: [u8; 427],
}

const CHECKSUM_AT: usize = 64;

const FOOTER_LAYOUT: Layout = Layout {
    what: "VHD footer",
    size: FOOTER_SIZE,
    cookie: FOOTER_COOKIE,
    checksum_at: CHECKSUM_AT,
    version_at: 12,
};

/// Where a checksummed VHD structure (footer, dynamic header) keeps the
/// fields every reader checks first.
pub(super) struct Layout {
    pub what: &'static str,
    pub size: usize,
    pub cookie: &'static [u8; 8],
    pub checksum_at: usize,
    pub version_at: usize,
}

fn be32(bytes: &[u8], at: usize) -> u32 {
    bytes
        .get(at..at + 4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(0, u32::from_be_bytes)
}

impl Layout {
    pub fn truncated(&self, available: usize) -> crate::Error {
        ErrorKind::Truncated {
            what: self.what,
            needed: self.size as u64,
            at: 0,
            available: available as u64,
        }
        .into()
    }

    /// Cookie, then checksum, then a major version of 1: the order that
    /// gives the most telling error for the usual kinds of damage.
    pub fn check(&self, bytes: &[u8]) -> Result<()> {
        let cookie = bytes.get(..8).unwrap_or_default();
        if cookie != self.cookie {
            return Err(ErrorKind::BadMagic {
                what: self.what,
                expected: std::str::from_utf8(self.cookie).unwrap_or_default(),
                found: String::from_utf8_lossy(cookie).into_owned(),
            }
            .into());
        }
        let stored = be32(bytes, self.checksum_at);
        let computed = checksum(bytes, self.checksum_at);
        if computed != stored {
            return Err(crate::Error::from(ErrorKind::BadChecksum {
                what: self.what,
                stored,
                computed,
            })
            .at(self.checksum_at as u64));
        }
        let version = be32(bytes, self.version_at);
        if version >> 16 != 1 {
            return Err(crate::Error::from(ErrorKind::UnsupportedVersion {
                what: self.what,
                found: version,
                expected: 0x0001_0000,
            })
            .at(self.version_at as u64));
        }
        Ok(())
    }
}

/// The VHD checksum: the ones' complement of the byte sum, with the
/// checksum field itself counted as zeros.
pub fn checksum(bytes: &[u8], checksum_at: usize) -> u32 {
    let sum = bytes.iter().enumerate().fold(0u32, |acc, (i, &b)| {
        if (checksum_at..checksum_at + 4).contains(&i) {
            acc
        } else {
            acc.wrapping_add(u32::from(b))
        }
    });
    !sum
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskType {
    Fixed,
    Dynamic,
    Differencing,
}

impl DiskType {
    pub fn from_code(code: u32) -> Result<Self> {
        match code {
            2 => Ok(Self::Fixed),
            3 => Ok(Self::Dynamic),
            4 => Ok(Self::Differencing),
            other => Err(ErrorKind::UnknownDiskType(other).into()),
        }
    }

    pub fn code(self) -> u32 {
        match self {
            Self::Fixed => 2,
            Self::Dynamic => 3,
            Self::Differencing => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Fixed => "fixed",
            Self::Dynamic => "dynamic",
            Self::Differencing => "differencing",
        }
    }
}

/// Cylinders, heads, sectors per track, as the BIOS saw the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Geometry {
    pub cylinders: u16,
    pub heads: u8,
    pub sectors_per_track: u8,
}

impl Geometry {
    /// What qemu writes with `force_size=on`; readers take `current_size`.
    pub const MAX: Geometry = Geometry {
        cylinders: 65535,
        heads: 16,
        sectors_per_track: 255,
    };

    /// The geometry for a sector count, per the spec's appendix (qemu's
    /// `calculate_geometry` agrees).
    pub fn from_sectors(sectors: u64) -> Geometry {
        let ts = sectors.min(65535 * 16 * 255);
        let (spt, heads, cth);
        if ts >= 65535 * 16 * 63 {
            spt = 255;
            heads = 16;
            cth = ts / spt;
        } else {
            let mut s = 17;
            let mut c = ts / s;
            let mut h = c.div_ceil(1024).max(4);
            if c >= h * 1024 || h > 16 {
                s = 31;
                h = 16;
                c = ts / s;
            }
            if c >= h * 1024 {
                s = 63;
                h = 16;
                c = ts / s;
            }
            (spt, heads, cth) = (s, h, c);
        }
        // Every value is bounded by the clamps above.
        Geometry {
            cylinders: u16::try_from(cth / heads).unwrap_or(u16::MAX),
            heads: u8::try_from(heads).unwrap_or(16),
            sectors_per_track: u8::try_from(spt).unwrap_or(255),
        }
    }

    /// The geometry a writer should record for `size` bytes so that every
    /// reader, CHS-based or size-based, agrees: the CHS geometry when it
    /// represents the size exactly, the maximum geometry otherwise.
    pub fn for_exact_size(size: u64) -> Geometry {
        let g = Geometry::from_sectors(size / SECTOR);
        if g.sectors() * SECTOR == size {
            g
        } else {
            Geometry::MAX
        }
    }

    pub fn sectors(self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors_per_track)
    }
}

/// A parsed footer. `reserved` is kept so a footer round-trips byte for
/// byte, which a fixed-disk restore relies on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub features: u32,
    pub format_version: u32,
    pub data_offset: u64,
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_host_os: [u8; 4],
    pub original_size: u64,
    pub current_size: u64,
    pub geometry: Geometry,
    pub disk_type: DiskType,
    pub unique_id: [u8; 16],
    pub saved_state: u8,
    pub reserved: [u8; 427],
}

impl Footer {
    /// Parses and checks a footer. Offsets in errors are relative to it.
    pub fn parse(bytes: &[u8]) -> Result<Footer> {
        let raw = RawFooter::ref_from_prefix(bytes)
            .map_err(|_| FOOTER_LAYOUT.truncated(bytes.len()))?
            .0;
        FOOTER_LAYOUT.check(raw.as_bytes())?;
        let disk_type = DiskType::from_code(raw.disk_type.get()).map_err(|e| e.at(60))?;
        Ok(Footer {
            features: raw.features.get(),
            format_version: raw.format_version.get(),
            data_offset: raw.data_offset.get(),
            timestamp: raw.timestamp.get(),
            creator_app: raw.creator_app,
            creator_version: raw.creator_version.get(),
            creator_host_os: raw.creator_host_os,
            original_size: raw.original_size.get(),
            current_size: raw.current_size.get(),
            geometry: Geometry {
                cylinders: raw.cylinders.get(),
                heads: raw.heads,
                sectors_per_track: raw.sectors_per_track,
            },
            disk_type,
            unique_id: raw.unique_id,
            saved_state: raw.saved_state,
            reserved: raw.reserved,
        })
    }

    /// Serialises with a fresh checksum.
    pub fn to_bytes(&self) -> [u8; FOOTER_SIZE] {
        let mut raw = RawFooter {
            cookie: *FOOTER_COOKIE,
            features: self.features.into(),
            format_version: self.format_version.into(),
            data_offset: self.data_offset.into(),
            timestamp: self.timestamp.into(),
            creator_app: self.creator_app,
            creator_version: self.creator_version.into(),
            creator_host_os: self.creator_host_os,
            original_size: self.original_size.into(),
            current_size: self.current_size.into(),
            cylinders: self.geometry.cylinders.into(),
            heads: self.geometry.heads,
            sectors_per_track: self.geometry.sectors_per_track,
            disk_type: self.disk_type.code().into(),
            checksum: 0.into(),
            unique_id: self.unique_id,
            saved_state: self.saved_state,
            reserved: self.reserved,
        };
        raw.checksum = checksum(raw.as_bytes(), CHECKSUM_AT).into();
        let mut out = [0u8; FOOTER_SIZE];
        out.copy_from_slice(raw.as_bytes());
        out
    }

    /// Whether this footer's creator sizes the disk by CHS, the rule qemu
    /// follows (checked against qemu-img 10.0): only `vpc ` and `qemu` do,
    /// and not when the geometry is the maximum.
    pub fn sized_by_chs(&self) -> bool {
        matches!(&self.creator_app, b"vpc " | b"qemu")
            && self.geometry.sectors() != Geometry::MAX.sectors()
    }

    /// The virtual disk size in bytes, as qemu and Hyper-V compute it.
    pub fn disk_size(&self) -> u64 {
        if self.sized_by_chs() {
            self.geometry.sectors() * SECTOR
        } else {
            self.current_size / SECTOR * SECTOR
        }
    }

    pub fn creator_app_str(&self) -> String {
        String::from_utf8_lossy(&self.creator_app)
            .trim_end_matches(['\0', ' '])
            .to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_qemu_rounding() {
        // qemu-img create -f vpc 100M rounds up to 104865792 bytes, the
        // first size >= 100 MiB that 1004/12/17 represents exactly.
        let g = Geometry::from_sectors(104_865_792 / 512);
        assert_eq!((g.cylinders, g.heads, g.sectors_per_track), (1004, 12, 17));
        assert_eq!(g.sectors() * 512, 104_865_792);
        assert_eq!(Geometry::for_exact_size(104_865_792), g);
        // 100 MiB itself is not CHS-representable: 1003/12/17 falls short.
        assert_eq!(Geometry::from_sectors(204_800).sectors(), 204_612);
        assert_eq!(Geometry::for_exact_size(100 << 20), Geometry::MAX);
        assert_eq!(Geometry::from_sectors(u64::MAX), Geometry::MAX);
    }

    #[test]
    fn footer_round_trips_and_rejects_a_flipped_byte() {
        let f = Footer {
            features: 2,
            format_version: 0x0001_0000,
            data_offset: NO_OFFSET,
            timestamp: 7,
            creator_app: *b"vsnp",
            creator_version: 1,
            creator_host_os: *b"Wi2k",
            original_size: 1 << 20,
            current_size: 1 << 20,
            geometry: Geometry::for_exact_size(1 << 20),
            disk_type: DiskType::Fixed,
            unique_id: [9; 16],
            saved_state: 0,
            reserved: [0; 427],
        };
        let mut bytes = f.to_bytes();
        assert_eq!(Footer::parse(&bytes).unwrap(), f);
        bytes[100] ^= 1;
        let err = Footer::parse(&bytes).unwrap_err();
        assert!(matches!(err.kind(), ErrorKind::BadChecksum { .. }));
        assert_eq!(err.offset(), Some(64));
    }
}
