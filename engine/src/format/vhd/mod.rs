//! VHD: Virtual PC and Hyper-V's first disk format (shared/reference/vhd.md).
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
use crate::format::extent::AllocationMap;
use crate::io::Storage;
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
        let id = chain::file_id(&file, path)?;
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
        let mut layers = self.layers.iter().enumerate().rev();
        let Some((_, bottom)) = layers.next() else {
            return Ok(AllocationMap::default());
        };
        let mut map = bottom.own_map()?;
        for (_, layer) in layers {
            map = layer.own_map()?.overlay(&map, 1);
        }
        Ok(map)
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<()> {
        let top = self.top();
        top.storage.sync().ctx_file(top.path(), "flush VHD")
    }
}

/// Reads virtual bytes through a chain, `layers[0]` first.
///
/// Iterative rather than recursive, so the depth of a chain is bounded by
/// open files, not by stack: each layer fills what it holds and hands back
/// the ranges it does not, and the next layer down is asked for those.
/// Ranges past a (smaller) parent's end, or below the bottom of the
/// chain, read as zeros.
fn read_chain(layers: &[VhdLayer], buf: &mut [u8], offset: u64) -> Result<()> {
    let mut pending: Vec<(usize, usize)> = vec![(0, buf.len())];
    for layer in layers {
        if pending.is_empty() {
            break;
        }
        let mut deferred = Vec::new();
        for (start, len) in pending {
            let at = offset + start as u64;
            let inside = layer.size().saturating_sub(at).min(len as u64) as usize;
            buf[start + inside..start + len].fill(0);
            if inside == 0 {
                continue;
            }
            let mut defer = |out: &mut [u8], virt: u64| {
                deferred.push(((virt - offset) as usize, out.len()));
                Ok(())
            };
            layer.read_own(&mut buf[start..start + inside], at, &mut defer)?;
        }
        pending = deferred;
    }
    for (start, len) in pending {
        buf[start..start + len].fill(0);
    }
    Ok(())
}

/// Opens a file for detection without holding it open afterwards.
pub(crate) fn file_looks_like_vhd(path: &Path) -> Result<bool> {
    let f = File::open(path).ctx_file(path, "open image")?;
    looks_like_vhd(&f).ctx_file(path, "read image")
}
