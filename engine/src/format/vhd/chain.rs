//! Finding a differencing disk's parent on this host.
//!
//! Hyper-V records the parent several ways: a relative path, an absolute
//! Windows path, and the bare file name in the header. On a Linux host the
//! absolute path rarely resolves, so each locator is tried in turn, then the
//! recorded name beside the child, and the first file whose unique id
//! matches wins.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::header::{decode_locator, LocatorPath};
use super::layer::VhdLayer;
use crate::error::{Error, ErrorKind, Result, ResultExt};

/// The longest locator we read; real ones are a path, a few hundred bytes.
const MAX_LOCATOR_BYTES: u32 = 64 * 1024;

/// Identifies a file across names (hard links, `..` detours).
pub type FileId = (u64, u64);

pub fn file_id(file: &File, path: &Path) -> Result<FileId> {
    let meta = file.metadata().ctx_file(path, "stat VHD")?;
    Ok((meta.dev(), meta.ino()))
}

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

/// Drops `.` components, so `dir/./base.vhd` reads as `dir/base.vhd`.
fn without_dots(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect()
}

/// Opens the parent of `child`, refusing loops and foreign unique ids.
pub fn open_parent(child: &VhdLayer, chain: &mut HashSet<FileId>) -> Result<VhdLayer> {
    let expected = child
        .sparse()
        .map(|s| s.header.parent_unique_id)
        .unwrap_or_default();
    let mut tried = Vec::new();
    let mut first_error: Option<Error> = None;
    for candidate in parent_candidates(child) {
        let file = match File::open(&candidate) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tried.push(candidate);
                continue;
            }
            Err(e) => {
                first_error.get_or_insert(Error::io(e).in_file(&candidate).during("open parent"));
                continue;
            }
        };
        let id = file_id(&file, &candidate)?;
        if chain.contains(&id) {
            return Err(Error::from(ErrorKind::ParentLoop { path: candidate })
                .in_file(child.path())
                .during("resolve parent"));
        }
        if !super::looks_like_vhd(&file).unwrap_or(false) {
            first_error.get_or_insert(
                Error::from(ErrorKind::ParentNotVhd {
                    path: candidate.clone(),
                })
                .in_file(child.path())
                .during("resolve parent"),
            );
            continue;
        }
        let layer = VhdLayer::open(Arc::new(file), &candidate, false)?;
        if layer.footer().unique_id != expected {
            first_error.get_or_insert(
                Error::from(ErrorKind::ParentIdMismatch {
                    parent: candidate.clone(),
                    expected: uuid::Uuid::from_bytes(expected),
                    found: uuid::Uuid::from_bytes(layer.footer().unique_id),
                })
                .in_file(child.path())
                .during("resolve parent"),
            );
            continue;
        }
        chain.insert(id);
        return Ok(layer);
    }
    Err(first_error.unwrap_or_else(|| {
        Error::from(ErrorKind::MissingParent { tried })
            .in_file(child.path())
            .during("resolve parent")
    }))
}
