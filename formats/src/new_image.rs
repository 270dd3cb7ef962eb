//! Making a new, empty image of either container, as `vsnap create` (and
//! anything else that lays out a disk) asks for one: the checks that the
//! request makes sense, then the VHD or VHDX writer.

use std::path::{Path, PathBuf};

use crate::error::{ErrorKind, Result};
use crate::vhd::{self, CreateOptions, DiskType};
use crate::vhdx::{NewVhdx, VhdxIdentity, VhdxImage, VhdxWriter};
use crate::{DiskImage, ImageInfo};

/// What to make, checked by the caller for what it means (a size for a
/// fixed or dynamic disk, a parent for a differencing one).
#[derive(Debug, Clone)]
pub struct NewImage {
    pub path: PathBuf,
    pub disk_type: DiskType,
    /// The virtual size; 0 for a differencing disk, which has its
    /// parent's.
    pub size: u64,
    /// The block size; `None`: the container's default.
    pub block_size: Option<u32>,
    pub vhdx: bool,
    /// A differencing disk's parent.
    pub parent: Option<PathBuf>,
}

/// Whether `path` names a VHDX by its extension (`.vhdx`, `.avhdx`).
pub fn is_vhdx_name(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    ext.eq_ignore_ascii_case("vhdx") || ext.eq_ignore_ascii_case("avhdx")
}

impl NewImage {
    /// Makes the image (it must not exist); what it is, as `vsnap info`
    /// would say.
    pub fn create(&self) -> Result<ImageInfo> {
        if self.vhdx {
            return self.create_vhdx();
        }
        let mut opts = CreateOptions::new(self.disk_type, self.size);
        opts.block_size = self.block_size.unwrap_or(2 << 20);
        opts.parent.clone_from(&self.parent);
        vhd::create(&self.path, &opts)?.info()
    }

    fn create_vhdx(&self) -> Result<ImageInfo> {
        let path: &Path = &self.path;
        let new = match (self.disk_type, &self.parent) {
            (DiskType::Differencing, Some(parent)) => {
                let mut new = NewVhdx::child_of(parent, path)?;
                if let Some(b) = self.block_size {
                    new.identity.block_size = b;
                }
                new
            }
            (DiskType::Differencing, None) => {
                return Err(
                    ErrorKind::InvalidArgument("a differencing disk needs a parent".into()).into(),
                )
            }
            _ => {
                let mut id = VhdxIdentity::new(self.size);
                id.fixed = self.disk_type == DiskType::Fixed;
                if let Some(b) = self.block_size {
                    id.block_size = b;
                }
                NewVhdx::new(self.size, id)
            }
        };
        VhdxWriter::create(path, new, &[])?.finish()?;
        VhdxImage::open(path)?.info()
    }
}
