//! Disk image formats behind one [`DiskImage`] abstraction.
//!
//! The engine needs three things of every disk: its virtual size, which
//! ranges hold data (and where they sit in which file), and `read_at`. Each
//! format supplies them; the format is detected from the file's contents,
//! never from its name.

pub mod bytes;
mod error;
pub mod extent;
mod info;
pub mod layered;
pub mod new_image;
pub mod raw;
pub mod sniff;
pub mod storage;
pub mod vhd;
pub mod vhdx;

use std::path::Path;

use serde::Serialize;

pub use extent::{AllocationMap, Extent, ExtentKind};
pub use info::{Creator, ImageInfo, LayerInfo, VhdxInfo};

pub use error::{Error, ErrorKind, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Vhd,
    Vhdx,
}

impl ImageFormat {
    pub fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Vhd => "vhd",
            Self::Vhdx => "vhdx",
        }
    }
}

/// A virtual disk, whatever its container. Implementations are safe to read
/// from many threads at once: all I/O is positional.
pub trait DiskImage: Send + Sync + std::fmt::Debug {
    fn format(&self) -> ImageFormat;
    fn virtual_size(&self) -> u64;
    /// The whole disk as merged extents, in order, with no gaps.
    fn allocation_map(&self) -> Result<AllocationMap>;
    /// Fills `buf` from virtual offset `offset`; the range must lie inside
    /// the disk.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// What `vsnap info` reports.
    fn info(&self) -> Result<ImageInfo>;
    /// The VHD footer of the image itself (the top of a chain), so a copy
    /// can keep its identity; `None` for other formats.
    fn vhd_footer(&self) -> Option<vhd::Footer> {
        None
    }
    /// The block size of a block-structured image (a dynamic VHD's), so a
    /// copy can keep it without building the image's info.
    fn block_size(&self) -> Option<u32> {
        None
    }
    /// The VHDX container's identity, so a copy or restore to VHDX keeps
    /// it; `None` for other formats.
    fn vhdx_identity(&self) -> Option<vhdx::VhdxIdentity> {
        None
    }
    /// The files behind the image, in the layer order of its allocation
    /// map, so the engine can read data extents straight from them.
    fn layer_paths(&self) -> Vec<std::path::PathBuf>;
}

impl DiskImage for vhd::VhdImage {
    fn format(&self) -> ImageFormat {
        ImageFormat::Vhd
    }

    fn virtual_size(&self) -> u64 {
        vhd::VhdImage::virtual_size(self)
    }

    fn allocation_map(&self) -> Result<AllocationMap> {
        vhd::VhdImage::allocation_map(self)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        vhd::VhdImage::read_at(self, buf, offset)
    }

    fn info(&self) -> Result<ImageInfo> {
        info::vhd_info(self)
    }

    fn vhd_footer(&self) -> Option<vhd::Footer> {
        Some(self.top().footer().clone())
    }

    fn block_size(&self) -> Option<u32> {
        self.top().sparse().map(|s| s.header.block_size)
    }

    fn layer_paths(&self) -> Vec<std::path::PathBuf> {
        self.layers()
            .iter()
            .map(|l| l.path().to_path_buf())
            .collect()
    }
}

impl DiskImage for vhdx::VhdxImage {
    fn format(&self) -> ImageFormat {
        ImageFormat::Vhdx
    }

    fn virtual_size(&self) -> u64 {
        vhdx::VhdxImage::virtual_size(self)
    }

    fn allocation_map(&self) -> Result<AllocationMap> {
        vhdx::VhdxImage::allocation_map(self)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        vhdx::VhdxImage::read_at(self, buf, offset)
    }

    fn info(&self) -> Result<ImageInfo> {
        info::vhdx_info(self)
    }

    fn block_size(&self) -> Option<u32> {
        Some(self.top().metadata().block_size)
    }

    fn vhdx_identity(&self) -> Option<vhdx::VhdxIdentity> {
        Some(vhdx::VhdxIdentity::of(self.top()))
    }

    /// None when a log was replayed: the files then are not what the disk
    /// reads as, so the engine reads through [`DiskImage::read_at`].
    fn layer_paths(&self) -> Vec<std::path::PathBuf> {
        if self.replayed() {
            return Vec::new();
        }
        self.layers()
            .iter()
            .map(|l| l.path().to_path_buf())
            .collect()
    }
}

/// Works out an image's format from its bytes: `vhdxfile` at the start
/// means VHDX; a VHD footer at the end (or its copy at the start) means
/// VHD; anything else is raw.
///
/// Never a silent guess: an empty file, a file in a disk format vsnap
/// does not read (qcow2, VMDK, VDI, QED, LUKS), and a file named `.vhd`,
/// `.vhdx` or `.avhdx` that holds no such structure are errors that say
/// what the file is and what to do. Anything else is raw.
pub fn detect(path: &Path) -> Result<ImageFormat> {
    use crate::error::{ErrorKind, ResultExt};
    if vhdx::file_looks_like_vhdx(path)? {
        return Ok(ImageFormat::Vhdx);
    }
    if vhd::file_looks_like_vhd(path)? {
        return Ok(ImageFormat::Vhd);
    }
    let file = std::fs::File::open(path).ctx_file(path, "open image")?;
    let len = storage::Storage::len(&file).ctx_file(path, "stat image")?;
    if len == 0 {
        return Err(Error::from(ErrorKind::NotAnImage(
            "the file is empty: an image holds at least its disk's bytes",
        ))
        .in_file(path));
    }
    let mut head = vec![0u8; (sniff::HEAD as u64).min(len) as usize];
    storage::Storage::read_exact_at(&file, &mut head, 0).ctx(path, 0, "read image")?;
    if let Some(f) = sniff::foreign(&head) {
        return Err(Error::from(ErrorKind::ForeignFormat {
            format: f.name,
            hint: f.hint,
        })
        .in_file(path));
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    if name.as_deref().is_some_and(sniff::named_like_vhd) {
        return Err(Error::from(ErrorKind::NotAnImage(
            "named like a VHD or VHDX, but it holds neither a VHD footer nor a VHDX identifier; if it really is a raw disk, say --source-format raw",
        ))
        .in_file(path));
    }
    Ok(ImageFormat::Raw)
}

/// Opens an image read-only, detecting its format unless one is given.
///
/// A file that looks like a VHD or VHDX but fails to parse is an error, never
/// silently treated as raw: that would back up a corrupt image's container
/// bytes as if they were the disk.
pub fn open(path: &Path, format: Option<ImageFormat>) -> Result<Box<dyn DiskImage>> {
    Ok(match (format, format.map_or_else(|| detect(path), Ok)?) {
        (_, ImageFormat::Vhd) => Box::new(vhd::VhdImage::open(path)?),
        (_, ImageFormat::Vhdx) => Box::new(vhdx::VhdxImage::open(path)?),
        (Some(_), ImageFormat::Raw) => Box::new(raw::RawImage::open(path)?),
        (None, ImageFormat::Raw) => Box::new(raw::RawImage::open_guessed(path)?),
    })
}

/// The map of a disk stored as-is in the first `size` bytes of a file (a
/// raw image, a fixed VHD's data area): the file's holes are unallocated,
/// since they read as zeros. A file cut short since it was opened has
/// lost data, which fails here rather than reading as zeros.
pub(crate) fn plain_file_map(
    storage: &dyn storage::Storage,
    path: &Path,
    size: u64,
    what: &'static str,
) -> Result<AllocationMap> {
    use crate::error::ResultExt;
    let len = storage.len().ctx_file(path, "stat image")?;
    if len < size {
        return Err(Error::from(ErrorKind::Truncated {
            what,
            needed: size,
            at: 0,
            available: len,
        })
        .in_file(path));
    }
    let ranges = storage.data_ranges(0..size).ctx_file(path, "find holes")?;
    Ok(extent::map_from_data_ranges(size, ranges))
}

/// Uses an image the way every consumer will: builds its map and reads its
/// first and last 8 KiB, ignoring errors. The fuzz targets and mutation
/// tests run it on damaged images, where an error is the right answer and
/// only a panic is a bug.
#[doc(hidden)]
pub fn exercise(image: &dyn DiskImage) {
    let _ = image.allocation_map();
    let size = image.virtual_size();
    let mut buf = vec![0u8; 8192];
    for at in [0, size.saturating_sub(8192) / 512 * 512] {
        let len = 8192.min(size - at) as usize;
        let _ = image.read_at(&mut buf[..len], at);
    }
}
