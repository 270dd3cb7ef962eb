//! Where a repository's backups keep their bases (the reflink clone of
//! each disk kept for the next backup's comparison, see [`crate::cbt`]),
//! and how they are removed: by the backup that replaces one, and by gc
//! for those whose backups died.
//!
//! Both gc and changed-block tracking use these rules, and neither may
//! import the other: gc sits below tracking. A base is removed only where
//! vsnap puts bases (a `.vsnap-base` directory) and only if the file there
//! is the one recorded, so a manifest cannot make vsnap remove anything
//! else.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Result, ResultExt};
use crate::{BaseRecord, Repository};

/// The directory beside a disk where its bases live.
pub const BASE_DIR: &str = ".vsnap-base";

/// Removes the base `record` names, if it is where vsnap keeps bases and
/// still the file recorded; anything else is left alone. Returns whether
/// a file was removed.
pub fn release(record: &BaseRecord) -> Result<bool> {
    if !in_base_dir(&record.path) {
        return Ok(false);
    }
    match std::fs::symlink_metadata(&record.path) {
        Ok(m) if m.is_file() && m.dev() == record.device && m.ino() == record.inode => {
            std::fs::remove_file(&record.path)
                .ctx_file(&record.path, "remove an old base")
                .map(|()| true)
        }
        _ => Ok(false),
    }
}

/// Whether `path` is a file directly inside a `.vsnap-base` directory.
pub(crate) fn in_base_dir(path: &Path) -> bool {
    path.is_absolute()
        && path.file_name().is_some()
        && path
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|d| d == BASE_DIR)
        && !path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
}

/// What names a repository's bases (`NAME.TAG.RANDOM`): the start of its
/// id, so that two repositories backing up one disk never take each
/// other's bases for their own.
pub(crate) fn repo_tag(repo: &Repository) -> String {
    repo.config().id.simple().to_string()[..8].to_owned()
}

/// Whether the base file `name` was made for the repository of `tag`.
pub(crate) fn tagged(name: &std::ffi::OsStr, tag: &str) -> bool {
    name.to_str()
        .and_then(|n| n.rsplit('.').nth(1))
        .is_some_and(|t| t == tag)
}

/// Removes what this repository's backups that died before their commit
/// left in the `.vsnap-base` directories of `kept` (the bases its
/// snapshots record): every other file there made for this repository
/// that no running backup holds locked. Returns how many it removed.
///
/// A backup keeps its new clone locked until its manifest is committed.
/// In a bucket, backups run while gc does, so one may commit after gc's
/// mark and unlock before this sweep: each clone is therefore locked here
/// first, and then checked against the bases `recorded` reads afresh,
/// which then include that backup's.
pub fn sweep_bases(
    repo: &Repository,
    kept: &std::collections::HashSet<PathBuf>,
    recorded: &dyn Fn() -> Result<std::collections::HashSet<PathBuf>>,
) -> Result<u64> {
    let tag = repo_tag(repo);
    let mut dirs: Vec<&Path> = kept
        .iter()
        .filter(|p| in_base_dir(p))
        .filter_map(|p| p.parent())
        .collect();
    dirs.sort();
    dirs.dedup();
    // Unrecorded clones, each with the lock that keeps them ours.
    let mut dead: Vec<(PathBuf, std::fs::File)> = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let is_file = e.file_type().is_ok_and(|t| t.is_file());
            if !is_file || kept.contains(&path) || !tagged(&e.file_name(), &tag) {
                continue;
            }
            use std::os::unix::fs::OpenOptionsExt;
            let Ok(f) = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
            else {
                continue;
            };
            if f.try_lock().is_ok() {
                dead.push((path, f));
            }
        }
    }
    if dead.is_empty() {
        return Ok(0);
    }
    let now = recorded()?;
    let mut removed = 0;
    for (path, _lock) in dead.iter().filter(|(p, _)| !now.contains(p)) {
        std::fs::remove_file(path).ctx_file(path, "gc: remove a dead backup's clone")?;
        removed += 1;
    }
    Ok(removed)
}
