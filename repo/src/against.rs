//! A backed-up disk compared with a live image (`vsnap verify
//! SNAPSHOT:DISK --against IMAGE`): the image's virtual-disk digest
//! against the one the snapshot recorded, so an operator can tell whether
//! a disk changed since its backup, or an auditor that a restore is exact.

use std::path::{Path, PathBuf};

use serde::Serialize;
use vsnap_engine::pipeline::{hash_images, Options, Progress};
use vsnap_formats::DiskImage;

use crate::error::{ErrorKind, Result};
use crate::restore::find_disk;
use crate::Repository;

/// What the comparison found.
#[derive(Debug, Clone, Serialize)]
pub struct Against {
    pub snapshot: String,
    pub disk: String,
    pub image: PathBuf,
    pub recorded: String,
    pub computed: String,
    pub matches: bool,
}

/// Compares disk `target` (`SNAPSHOT:DISK`, or `SNAPSHOT` of a snapshot
/// with one disk) with `image`, read with `opts` (whose chunk size must
/// be the repository's: the digest's leaves are chunks).
pub fn against(
    repo: &Repository,
    target: &str,
    image: &Path,
    opts: &Options,
    progress: &Progress,
) -> Result<Against> {
    let (snap, disk) = match target.split_once(':') {
        Some((snap, disk)) => (snap, Some(disk)),
        None => (target, None),
    };
    let manifest = repo.find(snap)?;
    let disk = match disk {
        Some(d) => find_disk(&manifest, d)?,
        None if manifest.disks.len() == 1 => &manifest.disks[0],
        None => {
            return Err(ErrorKind::InvalidArgument(format!(
                "snapshot {} has several disks; name one as {}:DISK",
                manifest.id, manifest.id
            ))
            .into())
        }
    };
    let opened = vsnap_formats::open(image, None)?;
    let refs: [&dyn DiskImage; 1] = [&*opened];
    let computed = hash_images(&refs, opts, progress)?
        .first()
        .map(|d| d.digest.to_hex().to_string())
        .unwrap_or_default();
    Ok(Against {
        snapshot: manifest.id.clone(),
        disk: disk.name.clone(),
        image: image.to_path_buf(),
        matches: computed == disk.digest,
        recorded: disk.digest.clone(),
        computed,
    })
}
