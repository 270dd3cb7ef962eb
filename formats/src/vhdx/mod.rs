//! VHDX, Hyper-V's format since Windows Server 2012 ([MS-VHDX]).
//!
//! [`parse`] holds the pure parsers of the on-disk structures (the file
//! identifier, the two headers and the choice between them, the region
//! table, the metadata items, BAT entries and their interleaving with
//! sector bitmaps), every CRC-32C checked, and [`log`] the log's entries
//! and their replay. They take bytes and return values or the specific
//! error, so they are fuzzed and tested without files. [`VhdxLayer`] is
//! one file over positional storage; [`VhdxImage`] is a chain of them,
//! child first (an `.avhdx` over its parents). [`write`] creates them.

pub mod guid;
mod layer;
pub mod log;
pub mod parse;
pub mod write;

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use layer::VhdxLayer;
pub use write::{NewVhdx, VhdxIdentity, VhdxWriter};

use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::extent::AllocationMap;
use crate::layered::{
    chain_map, file_id, open_parent, read_chain, without_dots, FileId, Layer, ParentRules,
};
use crate::storage::Storage;

/// A VHDX and its parents, child first.
#[derive(Debug)]
pub struct VhdxImage {
    layers: Vec<VhdxLayer>,
}

/// Whether a file starts with the VHDX file identifier.
pub fn looks_like_vhdx(storage: &dyn Storage) -> Result<bool> {
    if storage.len()? < 8 {
        return Ok(false);
    }
    let mut sig = [0u8; 8];
    storage.read_exact_at(&mut sig, 0)?;
    Ok(&sig == b"vhdxfile")
}

pub(crate) fn file_looks_like_vhdx(path: &Path) -> Result<bool> {
    let f = File::open(path).ctx_file(path, "open image")?;
    looks_like_vhdx(&f).ctx_file(path, "read image")
}

impl VhdxImage {
    /// Opens an image and its whole parent chain, read-only.
    pub fn open(path: &Path) -> Result<VhdxImage> {
        let file = File::open(path).ctx_file(path, "open VHDX")?;
        let mut seen = HashSet::from([file_id(&file, path)?]);
        let mut layers = vec![VhdxLayer::open(Arc::new(file), path)?];
        while let Some(last) = layers.last() {
            if !last.is_differencing() {
                break;
            }
            let parent = open_vhdx_parent(last, &mut seen)?;
            layers.push(parent);
        }
        Ok(VhdxImage { layers })
    }

    /// Opens one VHDX held in memory, with no parents (the fuzzer's way in).
    pub fn from_storage(storage: Arc<dyn Storage>, name: &Path) -> Result<VhdxImage> {
        let top = VhdxLayer::open(storage, name)?;
        if top.is_differencing() {
            return Err(Error::from(ErrorKind::MissingParent { tried: Vec::new() })
                .in_file(name)
                .during("resolve parent"));
        }
        Ok(VhdxImage { layers: vec![top] })
    }

    pub fn layers(&self) -> &[VhdxLayer] {
        &self.layers
    }

    pub fn top(&self) -> &VhdxLayer {
        &self.layers[0]
    }

    pub fn virtual_size(&self) -> u64 {
        self.top().size()
    }

    /// Reads virtual-disk bytes, resolving each sector down the chain.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.virtual_size();
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > size)
        {
            return Err(Error::from(ErrorKind::OutOfRange {
                offset,
                len: buf.len() as u64,
                size,
            })
            .in_file(self.top().path()));
        }
        read_chain(&self.layers, buf, offset)
    }

    /// The merged map of the whole chain, naming the layer of each extent.
    pub fn allocation_map(&self) -> Result<AllocationMap> {
        chain_map(&self.layers)
    }

    /// Whether any layer had its log replayed: its file then is not what
    /// the disk reads as, so data must come through [`Self::read_at`].
    pub fn replayed(&self) -> bool {
        self.layers.iter().any(|l| l.replayed_entries() > 0)
    }
}

/// A Windows path's last component, whichever separator it uses.
fn file_name_of(path: &str) -> Option<&str> {
    path.rsplit(['\\', '/']).next().filter(|n| !n.is_empty())
}

/// The paths a child's parent locator points at, most specific first:
/// the relative path, then absolute paths as given (a Linux host writes
/// them so), then each recorded name beside the child.
pub fn parent_candidates(child: &VhdxLayer) -> Vec<PathBuf> {
    let dir = child.path().parent().unwrap_or(Path::new(""));
    let entries = child.metadata().parent_locator.as_deref().unwrap_or(&[]);
    candidates_from(dir, entries)
}

/// [`parent_candidates`] over the locator's key and value pairs, for a
/// child in `dir`.
fn candidates_from(dir: &Path, entries: &[(String, String)]) -> Vec<PathBuf> {
    let value = |key: &str| {
        entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let mut out: Vec<PathBuf> = Vec::new();
    let mut names: Vec<PathBuf> = Vec::new();
    if let Some(rel) = value("relative_path") {
        out.push(without_dots(&dir.join(rel.replace('\\', "/"))));
    }
    for key in ["absolute_win32_path", "volume_path", "relative_path"] {
        let Some(v) = value(key) else { continue };
        if v.starts_with('/') {
            out.push(PathBuf::from(v));
        }
        if let Some(name) = file_name_of(v) {
            names.push(dir.join(name));
        }
    }
    out.extend(names);
    let mut seen = HashSet::new();
    out.retain(|p| seen.insert(p.clone()));
    out
}

/// The parent's DataWriteGuid, as the child's `parent_linkage` records it.
fn parent_linkage(child: &VhdxLayer) -> Result<uuid::Uuid> {
    let entries = child.metadata().parent_locator.as_deref().unwrap_or(&[]);
    let text = entries
        .iter()
        .find(|(k, _)| k == "parent_linkage")
        .map(|(_, v)| v.as_str())
        .ok_or_else(|| {
            Error::from(ErrorKind::Corrupt {
                what: "VHDX parent locator",
                reason: "no parent_linkage entry".into(),
            })
        })?;
    uuid::Uuid::parse_str(text.trim()).map_err(|_| {
        Error::from(ErrorKind::Corrupt {
            what: "VHDX parent locator",
            reason: format!("parent_linkage {text:?} is not a GUID"),
        })
    })
}

fn open_vhdx_parent(child: &VhdxLayer, chain: &mut HashSet<FileId>) -> Result<VhdxLayer> {
    let expected = parent_linkage(child).map_err(|e| e.in_file(child.path()))?;
    let rules = ParentRules {
        format: "VHDX",
        looks_like: &|f: &File| looks_like_vhdx(f).unwrap_or(false),
        open: &|f: File, p: &Path| VhdxLayer::open(Arc::new(f), p),
        expected,
        identity: &|l: &VhdxLayer| l.header().data_write_guid.to_uuid(),
    };
    open_parent(child.path(), parent_candidates(child), chain, &rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect()
    }

    #[test]
    fn windows_locators_resolve_beside_the_child() {
        // As Hyper-V writes them: a relative path with `.\`, a drive path
        // and a volume path, none of which exist on a Linux host as given.
        let got = candidates_from(
            Path::new("/vm"),
            &pairs(&[
                ("parent_linkage", "{00000000-0000-0000-0000-000000000001}"),
                ("relative_path", ".\\disks\\base.vhdx"),
                ("absolute_win32_path", "C:\\VMs\\disks\\base.vhdx"),
                ("volume_path", "\\\\?\\Volume{1234}\\VMs\\disks\\base.vhdx"),
            ]),
        );
        assert_eq!(
            got,
            vec![
                PathBuf::from("/vm/disks/base.vhdx"),
                PathBuf::from("/vm/base.vhdx")
            ]
        );
    }

    #[test]
    fn linux_absolute_paths_are_tried_as_given() {
        let got = candidates_from(
            Path::new("/vm/snap"),
            &pairs(&[
                ("relative_path", "../base.vhdx"),
                ("absolute_win32_path", "/srv/base.vhdx"),
            ]),
        );
        assert_eq!(
            got,
            vec![
                PathBuf::from("/vm/snap/../base.vhdx"),
                PathBuf::from("/srv/base.vhdx"),
                PathBuf::from("/vm/snap/base.vhdx"),
            ]
        );
    }
}
