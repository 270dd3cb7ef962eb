//! What `vsnap info` reports about an image, for people and for `--json`.

use std::path::PathBuf;

use serde::Serialize;

use super::vhd::footer::VHD_EPOCH;
use super::vhd::{DiskType, Geometry, VhdImage, VhdLayer};
use super::vhdx::{VhdxImage, VhdxLayer};
use super::{DiskImage, ImageFormat};
use crate::error::Result;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Creator {
    pub application: String,
    /// `major.minor`, from the footer's u16 pair.
    pub version: String,
    pub host_os: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    pub path: PathBuf,
    pub format: ImageFormat,
    pub disk_type: DiskType,
    pub virtual_size: u64,
    pub file_size: u64,
    /// Bytes of virtual disk this file itself stores.
    pub allocated_bytes: u64,
    pub geometry: Option<Geometry>,
    pub creator: Option<Creator>,
    pub block_size: Option<u32>,
    pub unique_id: Option<uuid::Uuid>,
    /// Creation time, as Unix seconds.
    pub timestamp: Option<u64>,
    pub saved_state: Option<bool>,
    /// The parent chain, nearest parent first.
    pub parents: Vec<LayerInfo>,
    pub warnings: Vec<String>,
    /// What only a VHDX has.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vhdx: Option<VhdxInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VhdxInfo {
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    pub data_write_guid: uuid::Uuid,
    pub file_write_guid: uuid::Uuid,
    /// Non-nil when the log had to be replayed.
    pub log_guid: uuid::Uuid,
    /// Log entries vsnap replayed in memory to read the image.
    pub replayed_log_entries: usize,
    pub header_sequence: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerInfo {
    pub path: PathBuf,
    pub disk_type: DiskType,
    pub unique_id: uuid::Uuid,
    /// Bytes this file stores, whether or not a child hides them.
    pub allocated_bytes: u64,
}

fn creator(layer: &VhdLayer) -> Creator {
    Creator::of(layer.footer())
}

impl Creator {
    pub fn of(f: &super::vhd::Footer) -> Creator {
        let host = String::from_utf8_lossy(&f.creator_host_os)
            .trim_end_matches(['\0', ' '])
            .to_owned();
        Creator {
            application: f.creator_app_str(),
            version: format!("{}.{}", f.creator_version >> 16, f.creator_version & 0xFFFF),
            host_os: host,
        }
    }
}

/// Each layer's warnings, prefixed with its file.
fn named_warnings<'a>(
    layers: impl Iterator<Item = (&'a std::path::Path, &'a [String])>,
) -> Vec<String> {
    layers
        .flat_map(|(path, ws)| ws.iter().map(move |w| format!("{}: {w}", path.display())))
        .collect()
}

/// Every layer below the top, as `vsnap info` lists the chain.
fn parent_infos<L: super::layered::Layer>(
    layers: &[L],
    describe: impl Fn(&L) -> (&std::path::Path, DiskType, uuid::Uuid),
) -> Result<Vec<LayerInfo>> {
    layers
        .iter()
        .skip(1)
        .map(|l| {
            let (path, disk_type, unique_id) = describe(l);
            Ok(LayerInfo {
                path: path.to_path_buf(),
                disk_type,
                unique_id,
                allocated_bytes: l.own_map()?.data_bytes(),
            })
        })
        .collect()
}

pub(super) fn vhd_info(image: &VhdImage) -> Result<ImageInfo> {
    let top = image.top();
    let footer = top.footer();
    let parents = parent_infos(image.layers(), |l| {
        (
            l.path(),
            l.disk_type(),
            uuid::Uuid::from_bytes(l.footer().unique_id),
        )
    })?;
    let warnings = named_warnings(image.layers().iter().map(|l| (l.path(), l.warnings())));
    Ok(ImageInfo {
        path: top.path().to_path_buf(),
        format: ImageFormat::Vhd,
        disk_type: top.disk_type(),
        virtual_size: image.virtual_size(),
        file_size: top.file_len()?,
        allocated_bytes: top.own_map()?.data_bytes(),
        geometry: Some(footer.geometry),
        creator: Some(creator(top)),
        block_size: DiskImage::block_size(image),
        unique_id: Some(uuid::Uuid::from_bytes(footer.unique_id)),
        timestamp: Some(u64::from(footer.timestamp) + VHD_EPOCH),
        saved_state: Some(footer.saved_state != 0),
        parents,
        warnings,
        vhdx: None,
    })
}

fn vhdx_type(layer: &VhdxLayer) -> DiskType {
    if layer.is_differencing() {
        DiskType::Differencing
    } else if layer.metadata().leave_blocks_allocated {
        DiskType::Fixed
    } else {
        DiskType::Dynamic
    }
}

pub(super) fn vhdx_info(image: &VhdxImage) -> Result<ImageInfo> {
    use super::layered::Layer;
    let top = image.top();
    let m = top.metadata();
    let h = top.header();
    // A parent's id is what a child's parent_linkage names, so a chain
    // can be checked by eye.
    let parents = parent_infos(image.layers(), |l| {
        (l.path(), vhdx_type(l), l.header().data_write_guid.to_uuid())
    })?;
    let warnings = named_warnings(image.layers().iter().map(|l| (l.path(), l.warnings())));
    Ok(ImageInfo {
        path: top.path().to_path_buf(),
        format: ImageFormat::Vhdx,
        disk_type: vhdx_type(top),
        virtual_size: image.virtual_size(),
        file_size: top.file_len()?,
        allocated_bytes: top.own_map()?.data_bytes(),
        geometry: None,
        creator: Some(Creator {
            application: top.creator().to_owned(),
            version: String::new(),
            host_os: String::new(),
        }),
        block_size: Some(m.block_size),
        unique_id: m.page83.map(|g| g.to_uuid()),
        timestamp: None,
        saved_state: None,
        parents,
        warnings,
        vhdx: Some(VhdxInfo {
            logical_sector_size: m.logical_sector_size,
            physical_sector_size: m.physical_sector_size,
            data_write_guid: h.data_write_guid.to_uuid(),
            file_write_guid: h.file_write_guid.to_uuid(),
            log_guid: h.log_guid.to_uuid(),
            replayed_log_entries: top.replayed_entries(),
            header_sequence: h.sequence,
        }),
    })
}
