//! VHD: Virtual PC and Hyper-V's first disk format (Microsoft's Virtual Hard Disk Image Format Specification).
//!
//! The byte-level structures ([`footer`], [`header`], [`bat`]) are pure
//! parsers and serialisers. [`VhdLayer`] is one file over positional
//! storage; [`VhdImage`] is a chain of them, child first, which reads through
//! the sector bitmaps to the parents.

pub mod bat;
mod chain;
pub mod create;
pub mod footer;
pub mod header;
mod layer;
pub mod prealloc;
mod write;

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::Arc;

pub use create::{create, CreateOptions};
pub use footer::{DiskType, Footer, Geometry};
pub use header::DynamicHeader;
pub use layer::{Sparse, VhdLayer};
pub use prealloc::PreallocatedVhd;

use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::extent::AllocationMap;
use crate::layered::{chain_map, file_id, read_chain};
use crate::storage::Storage;
use footer::{FOOTER_COOKIE, FOOTER_SIZE};

/// A VHD and its parents, child first.
#[derive(Debug)]
pub struct VhdImage {
    layers: Vec<VhdLayer>,
}

/// Whether a file carries a VHD footer at its end or a footer copy at its
/// start; cheap enough for format detection.
pub fn looks_like_vhd(storage: &dyn Storage) -> Result<bool> {
    let len = storage.len()?;
    if len < FOOTER_SIZE as u64 {
        return Ok(false);
    }
    let mut cookie = [0u8; 8];
    for at in [len - FOOTER_SIZE as u64, len - FOOTER_SIZE as u64 + 1, 0] {
        storage.read_exact_at(&mut cookie, at)?;
        if &cookie == FOOTER_COOKIE {
            return Ok(true);
        }
    }
    Ok(false)
}

impl VhdImage {
    /// Opens an image and its whole parent chain, read-only.
    pub fn open(path: &Path) -> Result<VhdImage> {
        Self::open_with(path, false)
    }

    /// Opens an image for writing; its parents stay read-only.
    pub fn open_rw(path: &Path) -> Result<VhdImage> {
        Self::open_with(path, true)
    }

    fn open_with(path: &Path, writable: bool) -> Result<VhdImage> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .ctx_file(path, "open VHD")?;
        let id = file_id(&file, path)?;
        let top = VhdLayer::open(Arc::new(file), path, writable)?;
        let mut seen = HashSet::from([id]);
        Self::from_top(top, &mut |child| chain::open_parent(child, &mut seen))
    }

    /// Builds a chain over any storage, asking `parent_of` for each
    /// differencing layer's parent. The fuzzer uses this with in-memory
    /// storage and no parents.
    pub fn from_top(
        top: VhdLayer,
        parent_of: &mut dyn FnMut(&VhdLayer) -> Result<VhdLayer>,
    ) -> Result<VhdImage> {
        let mut layers = vec![top];
        while let Some(last) = layers.last() {
            if last.disk_type() != DiskType::Differencing {
                break;
            }
            let parent = parent_of(last)?;
            layers.push(parent);
        }
        Ok(VhdImage { layers })
    }

    /// Opens one VHD held in memory, with no parents.
    pub fn from_storage(storage: Arc<dyn Storage>, name: &Path) -> Result<VhdImage> {
        let top = VhdLayer::open(storage, name, true)?;
        Self::from_top(top, &mut |child| {
            Err(Error::from(ErrorKind::MissingParent { tried: Vec::new() })
                .in_file(child.path())
                .during("resolve parent"))
        })
    }

    pub fn layers(&self) -> &[VhdLayer] {
        &self.layers
    }

    pub fn top(&self) -> &VhdLayer {
        &self.layers[0]
    }

    pub fn virtual_size(&self) -> u64 {
        self.top().size()
    }

    pub(crate) fn check_range(&self, offset: u64, len: usize) -> Result<()> {
        let size = self.virtual_size();
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::from(ErrorKind::OutOfRange {
                offset,
                len: len as u64,
                size,
            })
            .in_file(self.top().path())),
        }
    }

    /// Reads virtual-disk bytes, resolving each sector down the chain.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len())?;
        read_chain(&self.layers, buf, offset)
    }

    /// The merged map of the whole chain, naming the layer of each extent.
    pub fn allocation_map(&self) -> Result<AllocationMap> {
        chain_map(&self.layers)
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<()> {
        let top = self.top();
        top.storage.sync().ctx_file(top.path(), "flush VHD")
    }
}

/// Opens a file for detection without holding it open afterwards.
pub(crate) fn file_looks_like_vhd(path: &Path) -> Result<bool> {
    let f = File::open(path).ctx_file(path, "open image")?;
    looks_like_vhd(&f).ctx_file(path, "read image")
}
