//! Raw images: the file is the disk. Holes in a sparse file are reported
//! as unallocated, so a raw source streams as cheaply as a dynamic VHD.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::extent::AllocationMap;
use super::info::{ImageInfo, LayerInfo};
use super::{DiskImage, ImageFormat};
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::storage::Storage;
use crate::vhd::DiskType;

#[derive(Debug)]
pub struct RawImage {
    path: PathBuf,
    file: File,
    size: u64,
    /// Taken as raw because detection recognised nothing (not because the
    /// user said `--format raw`): `info` says so.
    guessed: bool,
}

impl RawImage {
    pub fn open(path: &Path) -> Result<RawImage> {
        let file = File::open(path).ctx_file(path, "open raw image")?;
        let size = Storage::len(&file).ctx_file(path, "stat raw image")?;
        Ok(RawImage {
            path: path.to_path_buf(),
            file,
            size,
            guessed: false,
        })
    }

    /// A file detection found no structure in, taken as a raw disk.
    pub fn open_guessed(path: &Path) -> Result<RawImage> {
        Ok(RawImage {
            guessed: true,
            ..RawImage::open(path)?
        })
    }
}

impl DiskImage for RawImage {
    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn allocation_map(&self) -> Result<AllocationMap> {
        super::plain_file_map(&self.file, &self.path, self.size, "raw image")
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return Err(Error::from(ErrorKind::OutOfRange {
                offset,
                len: buf.len() as u64,
                size: self.size,
            })
            .in_file(&self.path));
        }
        self.file
            .read_exact_at(buf, offset)
            .ctx(&self.path, offset, "read raw image")
    }

    fn layer_paths(&self) -> Vec<PathBuf> {
        vec![self.path.clone()]
    }

    fn info(&self) -> Result<ImageInfo> {
        let allocated = self.allocation_map()?.data_bytes();
        Ok(ImageInfo {
            path: self.path.clone(),
            format: ImageFormat::Raw,
            disk_type: DiskType::Fixed,
            virtual_size: self.size,
            file_size: self.size,
            allocated_bytes: allocated,
            geometry: None,
            creator: None,
            block_size: None,
            unique_id: None,
            timestamp: None,
            saved_state: None,
            parents: Vec::<LayerInfo>::new(),
            warnings: if self.guessed {
                vec![super::sniff::GUESSED_RAW.to_owned()]
            } else {
                Vec::new()
            },
            vhdx: None,
        })
    }
}
