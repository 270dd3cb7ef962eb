//! Finding a differencing disk's parent on this host.
//!
//! Hyper-V records the parent several ways: a relative path, an absolute
//! Windows path, and the bare file name in the header. On a Linux host the
//! absolute path rarely resolves, so each locator is tried in turn, then the
//! recorded name beside the child, and the first file whose unique id
//! matches wins.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::header::{decode_locator, LocatorPath};
use super::layer::VhdLayer;
use crate::error::Result;
use crate::layered::{open_parent as open_parent_of, without_dots, FileId, ParentRules};

/// The longest locator we read; real ones are a path, a few hundred bytes.
const MAX_LOCATOR_BYTES: u32 = 64 * 1024;

/// The paths a child's header points at, most specific first.
pub fn parent_candidates(child: &VhdLayer) -> Vec<PathBuf> {
    let Some(sparse) = child.sparse() else {
        return Vec::new();
    };
    let dir = child
        .path()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut out: Vec<PathBuf> = Vec::new();
    let mut names: Vec<PathBuf> = Vec::new();
    for loc in &sparse.header.locators {
        if loc.data_length > MAX_LOCATOR_BYTES {
            continue;
        }
        let mut data = vec![0u8; loc.data_length as usize];
        if child
            .storage
            .read_exact_at(&mut data, loc.data_offset)
            .is_err()
        {
            continue;
        }
        match decode_locator(loc.code, &data) {
            Some(LocatorPath::Relative(p)) => out.push(without_dots(&dir.join(p))),
            Some(LocatorPath::Absolute(p)) => {
                if let Some(name) = p.file_name() {
                    names.push(dir.join(name));
                }
                out.push(p);
            }
            None => {}
        }
    }
    if !sparse.header.parent_name.is_empty() {
        let name = sparse.header.parent_name.replace('\\', "/");
        if let Some(base) = Path::new(&name).file_name() {
            names.push(dir.join(base));
        }
    }
    out.extend(names);
    let mut seen = HashSet::new();
    out.retain(|p| seen.insert(p.clone()));
    out
}

/// Opens the parent of `child`, refusing loops and foreign unique ids.
pub fn open_parent(child: &VhdLayer, chain: &mut HashSet<FileId>) -> Result<VhdLayer> {
    let expected = child
        .sparse()
        .map(|s| s.header.parent_unique_id)
        .unwrap_or_default();
    let rules = ParentRules {
        format: "VHD",
        looks_like: &|f: &File| super::looks_like_vhd(f).unwrap_or(false),
        open: &|f: File, p: &Path| VhdLayer::open(Arc::new(f), p, false),
        expected: uuid::Uuid::from_bytes(expected),
        identity: &|l: &VhdLayer| uuid::Uuid::from_bytes(l.footer().unique_id),
    };
    open_parent_of(child.path(), parent_candidates(child), chain, &rules)
}
