//! A snapshot's manifest: what was backed up, when, from where, and the
//! digests that tie it to its indexes and chunks. It is JSON, so people
//! and scripts can read it, and it carries its own BLAKE3 so that rot in
//! it is found like rot anywhere else.
//!
//! The self-digest: `self_blake3` holds the BLAKE3 of the file's exact
//! bytes with that field's 64 hex digits (their first occurrence in the
//! file) replaced by 64 `0` characters. No canonical JSON is needed to
//! check it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{ErrorKind, Result};
use vsnap_formats::vhd::{DiskType, Footer, Geometry};
use vsnap_formats::{Creator, DiskImage, ImageFormat};

pub const MANIFEST_FORMAT: u32 = 1;
const PLACEHOLDER: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Consistency {
    /// Writers were quiesced and filesystems frozen for the snapshot.
    AppConsistent,
    /// Taken as if the power had been cut: no guest was quiesced.
    CrashConsistent,
}

impl Consistency {
    pub fn name(self) -> &'static str {
        match self {
            Consistency::AppConsistent => "app-consistent",
            Consistency::CrashConsistent => "crash-consistent",
        }
    }
}

/// Everything needed to recreate a disk's container, not only its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub disk_type: Option<DiskType>,
    pub geometry: Option<Geometry>,
    pub creator: Option<Creator>,
    pub unique_id: Option<uuid::Uuid>,
    pub block_size: Option<u32>,
    /// The VHD footer's 512 bytes in hex: a fixed VHD restores byte for
    /// byte from it, and a dynamic one keeps its identity.
    pub vhd_footer: Option<String>,
    /// A VHDX's container identity (absent for other formats, and in
    /// manifests written before vsnap read VHDX).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhdx: Option<vsnap_formats::vhdx::VhdxIdentity>,
}

impl Identity {
    pub fn of(image: &dyn DiskImage) -> Identity {
        let footer = image.vhd_footer();
        Identity {
            disk_type: footer.as_ref().map(|f| f.disk_type),
            geometry: footer.as_ref().map(|f| f.geometry),
            creator: footer.as_ref().map(Creator::of),
            unique_id: footer.as_ref().map(|f| uuid::Uuid::from_bytes(f.unique_id)),
            block_size: image.block_size(),
            vhd_footer: footer.map(|f| hex(&f.to_bytes())),
            vhdx: image.vhdx_identity(),
        }
    }

    /// The footer, parsed back (and so checked).
    pub fn footer(&self) -> Result<Option<Footer>> {
        let Some(h) = &self.vhd_footer else {
            return Ok(None);
        };
        let bytes = unhex(h).ok_or_else(|| corrupt("the VHD footer is not hex".into()))?;
        Ok(Footer::parse(&bytes).map(Some)?)
    }
}

/// The reflink clone a backup kept as the disk's base: the next backup
/// compares its extents with a new clone's (see [`crate::cbt`]). Its
/// content is this snapshot's disk; the next backup checks that the file
/// is still the one recorded before it trusts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseRecord {
    pub path: PathBuf,
    pub device: u64,
    pub inode: u64,
    pub size: u64,
    /// Its change time, in nanoseconds since the epoch: any write or
    /// metadata change to the file moves it.
    pub ctime_ns: i64,
}

/// How a disk's backup used changed-block tracking.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tracking {
    /// The snapshot whose index gave the unchanged cells.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Cells taken from it without reading.
    #[serde(default)]
    pub reused_cells: u64,
    /// Why the disk was read whole where tracking was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// The base kept for the next backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseRecord>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStats {
    pub bytes_read: u64,
    pub data_chunks: u64,
    pub zero_chunks: u64,
    pub unallocated_chunks: u64,
    /// Chunks this backup stored, and their bytes as stored.
    pub new_chunks: u64,
    pub new_bytes: u64,
}

/// What a snapshot's disks add up to: the figures every report of a
/// backup gives (the CLI's, the coordinator's per VM, the service's runs),
/// summed in one place.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub virtual_bytes: u64,
    pub bytes_read: u64,
    pub data_chunks: u64,
    /// Chunks this backup stored, and their bytes as stored.
    pub new_chunks: u64,
    pub new_bytes: u64,
    /// Cells changed-block tracking found unchanged and took unread.
    pub reused_chunks: u64,
}

impl Totals {
    /// Adds another snapshot's totals, for a run over many VMs.
    pub fn add(&mut self, other: &Totals) {
        self.virtual_bytes += other.virtual_bytes;
        self.bytes_read += other.bytes_read;
        self.data_chunks += other.data_chunks;
        self.new_chunks += other.new_chunks;
        self.new_bytes += other.new_bytes;
        self.reused_chunks += other.reused_chunks;
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// How the disk is named in `SNAPSHOT:DISK`: the source's file name.
    pub name: String,
    pub source: PathBuf,
    pub format: ImageFormat,
    pub virtual_size: u64,
    pub identity: Identity,
    /// The virtual-disk digest: `b3sum` of `qemu-img convert -O raw`.
    pub digest: String,
    /// BLAKE3 of the index's plaintext, which also names its blob.
    pub index: String,
    /// The piece size of the index's piece map (absent in manifests
    /// written before it, whose indexes have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub piece_size: Option<u64>,
    /// Whether the index holds its data cells' leaves (absent, false, in
    /// manifests written before them).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leaves: bool,
    /// Changed-block tracking, where the backup asked for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<Tracking>,
    pub stats: DiskStats,
}

impl Disk {
    /// How this disk's index is laid out.
    pub fn layout(&self) -> super::index::Layout {
        super::index::Layout {
            piece_size: self.piece_size,
            leaves: self.leaves,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub self_blake3: String,
    pub format: u32,
    pub id: String,
    /// RFC 3339, UTC.
    pub time: String,
    pub host: String,
    pub vm: String,
    pub consistency: Consistency,
    /// The coordinator's freeze metrics, when a coordinator took it.
    pub freeze: Option<super::FreezeRecord>,
    pub chunk_size: u64,
    pub disks: Vec<Disk>,
}

fn corrupt(reason: String) -> crate::Error {
    ErrorKind::Corrupt {
        what: "manifest",
        reason,
    }
    .into()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Manifest {
    /// Its disks' figures, added up.
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for d in &self.disks {
            t.add(&Totals {
                virtual_bytes: d.virtual_size,
                bytes_read: d.stats.bytes_read,
                data_chunks: d.stats.data_chunks,
                new_chunks: d.stats.new_chunks,
                new_bytes: d.stats.new_bytes,
                reused_chunks: d.tracking.as_ref().map_or(0, |t| t.reused_cells),
            });
        }
        t
    }

    /// The file's bytes, with the self-digest filled in.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut m = self.clone();
        m.self_blake3 = PLACEHOLDER.into();
        let mut bytes =
            serde_json::to_vec_pretty(&m).map_err(|e| corrupt(format!("cannot serialise: {e}")))?;
        bytes.push(b'\n');
        let digest = blake3::hash(&bytes).to_hex();
        let at = find(&bytes, PLACEHOLDER.as_bytes())
            .ok_or_else(|| corrupt("no place for the self-digest".into()))?;
        bytes[at..at + 64].copy_from_slice(digest.as_bytes());
        Ok(bytes)
    }

    /// Parses a manifest and checks its self-digest.
    pub fn parse(bytes: &[u8]) -> Result<Manifest> {
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| corrupt(format!("not valid JSON: {e}")))?;
        if m.format != MANIFEST_FORMAT {
            return Err(ErrorKind::UnsupportedVersion {
                what: "manifest",
                found: m.format,
                expected: MANIFEST_FORMAT,
            }
            .into());
        }
        let stated = m.self_blake3.as_bytes();
        if stated.len() != 64 {
            return Err(corrupt("self_blake3 is not 64 hex digits".into()));
        }
        let at = find(bytes, stated).ok_or_else(|| corrupt("self_blake3 not found".into()))?;
        let mut zeroed = bytes.to_vec();
        zeroed[at..at + 64].copy_from_slice(PLACEHOLDER.as_bytes());
        let computed = blake3::hash(&zeroed).to_hex();
        if computed.as_str() != m.self_blake3 {
            return Err(ErrorKind::DigestMismatch {
                what: "manifest",
                expected: m.self_blake3.clone().into(),
                found: computed.to_string().into(),
            }
            .into());
        }
        Ok(m)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            self_blake3: String::new(),
            format: MANIFEST_FORMAT,
            id: "0123456789abcdef".into(),
            time: "2026-11-24T00:00:00Z".into(),
            host: "h".into(),
            vm: "vm".into(),
            consistency: Consistency::CrashConsistent,
            freeze: None,
            chunk_size: 4 << 20,
            disks: vec![],
        }
    }

    #[test]
    fn self_digest_round_trips_and_catches_any_edit() {
        let bytes = sample().to_bytes().unwrap();
        let m = Manifest::parse(&bytes).unwrap();
        assert_eq!(m.vm, "vm");
        let text = String::from_utf8(bytes.clone()).unwrap();
        let edited = text.replace("\"vm\": \"vm\"", "\"vm\": \"vn\"");
        let e = Manifest::parse(edited.as_bytes()).unwrap_err();
        assert!(matches!(e.kind(), ErrorKind::DigestMismatch { .. }), "{e}");
        let e = Manifest::parse(&bytes[..bytes.len() / 2]).unwrap_err();
        assert!(matches!(e.kind(), ErrorKind::Corrupt { .. }), "{e}");
    }
}
