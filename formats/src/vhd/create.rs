//! Creating fixed, dynamic and differencing VHDs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::bat::{bat_bytes, serialize_bat, UNALLOCATED};
use super::footer::{DiskType, Footer, Geometry, MAX_DISK_SIZE, NO_OFFSET, SECTOR, VHD_EPOCH};
use super::header::{encode_locator_utf16, DynamicHeader, Locator, PlatformCode, HEADER_SIZE};
use super::{VhdImage, VhdLayer};
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::storage::Storage;

/// What vsnap records as the creator; qemu and Hyper-V both size such a
/// disk by `current_size`, and the geometry is chosen so CHS readers agree.
pub const CREATOR_APP: [u8; 4] = *b"vsnp";
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// qemu sizes the sector bitmap as `block_size / 4096` sectors rounded up,
/// which is 0 below 4 KiB, so it misreads smaller blocks (checked with
/// qemu-io 10.0). The spec allows them and vsnap reads them, but does not
/// create what a stock reader would get wrong.
pub const MIN_BLOCK_SIZE: u32 = 4096;

#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub disk_type: DiskType,
    /// Virtual size in bytes, a multiple of 512. Ignored for differencing
    /// disks, which take their parent's.
    pub size: u64,
    pub block_size: u32,
    pub parent: Option<PathBuf>,
    /// Kept from a source image when recreating it; random otherwise.
    pub unique_id: Option<[u8; 16]>,
    pub geometry: Option<Geometry>,
    pub creator_app: [u8; 4],
    pub timestamp: Option<u32>,
}

impl CreateOptions {
    pub fn new(disk_type: DiskType, size: u64) -> Self {
        Self {
            disk_type,
            size,
            block_size: DEFAULT_BLOCK_SIZE,
            parent: None,
            unique_id: None,
            geometry: None,
            creator_app: CREATOR_APP,
            timestamp: None,
        }
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::from(ErrorKind::InvalidArgument(msg.into())).during("create VHD")
}

fn vhd_time(t: SystemTime) -> u32 {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    u32::try_from(secs.saturating_sub(VHD_EPOCH)).unwrap_or(u32::MAX)
}

/// Creates a new image at `path` (which must not exist) and opens it for
/// writing. On failure the partial file is removed.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<VhdImage> {
    // A parent's own errors already name the parent; the rest name `path`.
    let plan = plan(path, opts).map_err(|e| e.in_file(path))?;
    let file = crate::storage::create_new(path).ctx_file(path, "create VHD")?;
    let storage: Arc<dyn Storage> = Arc::new(file);
    let written = write_new(&*storage, path, &plan)
        .and_then(|()| storage.sync().ctx_file(path, "flush VHD"))
        .and_then(|()| VhdImage::open_rw(path));
    if written.is_err() {
        let _ = std::fs::remove_file(path);
    }
    written
}

/// Creates a new image in any storage, for tests and fuzzing.
pub fn create_in(storage: Arc<dyn Storage>, name: &Path, opts: &CreateOptions) -> Result<VhdImage> {
    if opts.disk_type == DiskType::Differencing {
        return Err(invalid(
            "a differencing disk needs a parent on the filesystem",
        ));
    }
    let plan = plan(name, opts)?;
    write_new(&*storage, name, &plan)?;
    VhdImage::from_top(VhdLayer::open(storage, name, true)?, &mut |_| {
        Err(invalid("in-memory images have no parent"))
    })
}

struct Plan {
    footer: Footer,
    header: Option<DynamicHeader>,
    locator_data: Vec<(u64, Vec<u8>)>,
    /// Where the trailing footer goes (for fixed: right after the data).
    footer_at: u64,
}

/// The footer of a new disk without a parent: checks the size and block
/// size, and picks a geometry every reader sizes the same way.
pub fn plan_footer(opts: &CreateOptions) -> Result<Footer> {
    build_footer(opts, opts.size, opts.geometry)
}

fn build_footer(opts: &CreateOptions, size: u64, geometry: Option<Geometry>) -> Result<Footer> {
    if size == 0 || !size.is_multiple_of(SECTOR) || size > MAX_DISK_SIZE {
        return Err(Error::from(ErrorKind::BadSize {
            size,
            reason: "a VHD is a whole number of 512-byte sectors, at most 2040 GiB",
        })
        .during("create VHD"));
    }
    let block_size = opts.block_size;
    if !block_size.is_power_of_two() || u64::from(block_size) < SECTOR {
        return Err(Error::from(ErrorKind::BadBlockSize(block_size.into())).during("create VHD"));
    }
    if block_size < MIN_BLOCK_SIZE {
        return Err(invalid(format!(
            "block size {block_size} is below {MIN_BLOCK_SIZE}: qemu misreads the sector bitmaps of smaller blocks"
        )));
    }
    let geometry = geometry.unwrap_or_else(|| Geometry::for_exact_size(size));
    let now = vhd_time(SystemTime::now());
    let unique_id = opts
        .unique_id
        .unwrap_or_else(|| *uuid::Uuid::new_v4().as_bytes());
    let footer = Footer {
        features: 2,
        format_version: 0x0001_0000,
        data_offset: if opts.disk_type == DiskType::Fixed {
            NO_OFFSET
        } else {
            512
        },
        timestamp: opts.timestamp.unwrap_or(now),
        creator_app: opts.creator_app,
        creator_version: 0x0001_0000,
        creator_host_os: *b"Wi2k",
        original_size: size,
        current_size: size,
        geometry,
        disk_type: opts.disk_type,
        unique_id,
        saved_state: 0,
        reserved: [0; 427],
    };
    if footer.disk_size() != size {
        return Err(invalid(format!(
            "geometry {}/{}/{} with creator {:?} would read as {} bytes, not {size}",
            geometry.cylinders,
            geometry.heads,
            geometry.sectors_per_track,
            footer.creator_app_str(),
            footer.disk_size()
        )));
    }
    Ok(footer)
}

fn plan(path: &Path, opts: &CreateOptions) -> Result<Plan> {
    let parent = match (&opts.parent, opts.disk_type) {
        (Some(p), DiskType::Differencing) => Some(VhdImage::open(p)?),
        (None, DiskType::Differencing) => {
            return Err(invalid("a differencing disk needs --parent"))
        }
        (Some(_), _) => return Err(invalid("only a differencing disk has a parent")),
        (None, _) => None,
    };
    let size = parent.as_ref().map_or(opts.size, VhdImage::virtual_size);
    let geometry = opts
        .geometry
        .or(parent.as_ref().map(|p| p.top().footer().geometry));
    let footer = build_footer(opts, size, geometry)?;
    let block_size = opts.block_size;
    if opts.disk_type == DiskType::Fixed {
        return Ok(Plan {
            footer,
            header: None,
            locator_data: Vec::new(),
            footer_at: size,
        });
    }
    let entries = u32::try_from(size.div_ceil(u64::from(block_size)))
        .map_err(|_| invalid("too many blocks for a VHD BAT"))?;
    let table_offset = 512 + HEADER_SIZE as u64;
    let mut next = table_offset + bat_bytes(entries);
    let mut header = DynamicHeader {
        table_offset,
        header_version: 0x0001_0000,
        max_table_entries: entries,
        block_size,
        parent_unique_id: [0; 16],
        parent_timestamp: 0,
        parent_name: String::new(),
        locators: Vec::new(),
    };
    let mut locator_data = Vec::new();
    if let (Some(parent), Some(parent_path)) = (&parent, &opts.parent) {
        let top = parent.top();
        header.parent_unique_id = top.footer().unique_id;
        header.parent_timestamp = std::fs::metadata(parent_path)
            .and_then(|m| m.modified())
            .map(vhd_time)
            .unwrap_or(0);
        let (relative, absolute) = parent_paths(path, parent_path)?;
        header.parent_name = parent_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for (code, text) in [
            (PlatformCode::RelativeW2ru, relative),
            (PlatformCode::AbsoluteW2ku, absolute),
        ] {
            let data = encode_locator_utf16(&text);
            let space = (data.len() as u64).div_ceil(SECTOR).max(1);
            header.locators.push(Locator {
                code,
                data_space: u32::try_from(space).unwrap_or(u32::MAX),
                data_length: u32::try_from(data.len())
                    .map_err(|_| invalid("parent path too long"))?,
                data_offset: next,
            });
            locator_data.push((next, data));
            next += space * SECTOR;
        }
    }
    Ok(Plan {
        footer,
        header: Some(header),
        locator_data,
        footer_at: next,
    })
}

/// The parent's path relative to the child's directory, Windows style, and
/// its absolute path.
fn parent_paths(child: &Path, parent: &Path) -> Result<(String, String)> {
    let parent_abs = std::fs::canonicalize(parent).ctx_file(parent, "resolve parent path")?;
    let child_dir = child
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let child_dir =
        std::fs::canonicalize(child_dir).ctx_file(child_dir, "resolve child directory")?;
    let rel = pathdiff::diff_paths(&parent_abs, &child_dir).unwrap_or_else(|| parent_abs.clone());
    let rel = rel.to_string_lossy().replace('/', "\\");
    let rel = if rel.starts_with("..") {
        rel
    } else {
        format!(".\\{rel}")
    };
    Ok((rel, parent_abs.to_string_lossy().into_owned()))
}

fn write_new(storage: &dyn Storage, path: &Path, plan: &Plan) -> Result<()> {
    let footer = plan.footer.to_bytes();
    if let Some(header) = &plan.header {
        storage
            .write_all_at(&footer, 0)
            .ctx(path, 0, "write VHD footer copy")?;
        storage
            .write_all_at(&header.to_bytes(), 512)
            .ctx(path, 512, "write VHD dynamic header")?;
        let bat = vec![UNALLOCATED; header.max_table_entries as usize];
        storage
            .write_all_at(&serialize_bat(&bat), header.table_offset)
            .ctx(path, header.table_offset, "write VHD BAT")?;
        for (at, data) in &plan.locator_data {
            storage
                .write_all_at(data, *at)
                .ctx(path, *at, "write VHD parent locator")?;
        }
    } else {
        // Sparse: the data area is a hole until written.
        storage
            .set_len(plan.footer_at)
            .ctx_file(path, "size fixed VHD")?;
    }
    storage
        .write_all_at(&footer, plan.footer_at)
        .ctx(path, plan.footer_at, "write VHD footer")
}
