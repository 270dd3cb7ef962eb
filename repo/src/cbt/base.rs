//! Bases: the reflink clone each backup keeps of each disk for the next.
//!
//! A backup of `DIR/disk.vhd` clones it to `DIR/.vsnap-base/disk.vhd.ID`
//! (FICLONE: the extents are shared, nothing is copied) and reads the
//! clone, a point-in-time copy, instead of the live file. The clone's
//! identity (device, inode, size, change time) goes into the snapshot's
//! manifest. The next backup finds the newest snapshot of the same VM and
//! disk with a base, checks the file is still the one recorded, compares
//! the two clones ([`super::changed_ranges`], [`super::changed_cells`]),
//! and takes every unchanged cell from that snapshot's index unread. Once
//! the new snapshot is committed, the old base is removed: one base per
//! disk. A base costs the blocks overwritten in the disk since it was
//! made, which it alone still holds.
//!
//! Whatever cannot be checked falls back to reading the disk whole, and
//! the reason is kept in the manifest. A base is removed only where vsnap
//! puts bases (a `.vsnap-base` directory) and only if the file there is the
//! one recorded, so a manifest cannot make vsnap remove anything else.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::backup::{DiskTracking, Reuse};
use crate::bases::{in_base_dir, release, repo_tag, BASE_DIR};
use crate::error::{Error, Result, ResultExt};
use crate::{BaseRecord, Manifest, Repository};
use vsnap_engine::io::fiemap::fiemap;
use vsnap_formats::{DiskImage, ImageFormat};

/// The filesystems (statfs magic) that may clone files: XFS (if made with
/// reflink, which FICLONE then tells), btrfs, OCFS2 and bcachefs.
const CLONING: [i64; 4] = [0x5846_5342, 0x9123_683e, 0x7461_636f, 0xca45_1a4e];

/// A disk being backed up with tracking: the clone the backup reads (or
/// the source itself, where it cannot be cloned), and what tracking found.
#[derive(Debug)]
pub struct Tracked {
    /// What the backup reads: the new clone, or the source.
    pub image: Box<dyn DiskImage>,
    pub tracking: DiskTracking,
    /// The new clone, removed if the backup fails.
    clone: Option<PathBuf>,
    /// The base before, removed once the new snapshot is committed.
    previous: Option<BaseRecord>,
    /// A lock on the new clone while the backup runs, so that gc, which
    /// removes clones no snapshot records, leaves it alone.
    _lock: Option<std::fs::File>,
}

/// Clones `source` for a backup as disk `name` of a VM whose readable
/// snapshots are `history` (oldest first), and works out from the last
/// such snapshot's base which cells changed. A source that cannot
/// be cloned is read as it is, with the reason as the fallback. Errors are
/// those that stop the backup: the source cannot be opened or parsed.
pub fn track(
    repo: &Repository,
    history: &[Manifest],
    name: &str,
    source: &Path,
    format: Option<ImageFormat>,
) -> Result<Tracked> {
    match make_clone(source, &repo_tag(repo)) {
        Ok((clone, lock)) => track_clone(repo, history, name, clone, lock, format),
        Err(why) => Ok(Tracked::untracked(
            vsnap_formats::open(source, format)?,
            why,
        )),
    }
}

/// [`track`] for a disk whose point-in-time clone a snapshot provider
/// made already (the coordinator's reflink provider, inside the freeze):
/// `snapshot` is moved into the base directory beside `source` (a rename,
/// so its blocks stay shared with the disk) and becomes the backup's clone
/// and next base. A snapshot that cannot be moved is read where it is,
/// whole, with the reason as the fallback.
pub fn adopt(
    repo: &Repository,
    history: &[Manifest],
    name: &str,
    source: &Path,
    snapshot: &Path,
    format: Option<ImageFormat>,
) -> Result<Tracked> {
    match move_clone(source, snapshot, &repo_tag(repo)) {
        Ok((clone, lock)) => track_clone(repo, history, name, clone, lock, format),
        Err(why) => Ok(Tracked::untracked(
            vsnap_formats::open(snapshot, format)?,
            why,
        )),
    }
}

/// Tracking of the new clone `clone` (locked by `lock`): its record, and
/// which cells changed since the last snapshot's base.
fn track_clone(
    repo: &Repository,
    history: &[Manifest],
    name: &str,
    clone: PathBuf,
    lock: std::fs::File,
    format: Option<ImageFormat>,
) -> Result<Tracked> {
    let opened = vsnap_formats::open(&clone, format).and_then(|image| {
        let record = record_of(&clone)?;
        Ok((image, record))
    });
    let (image, record) = match opened {
        Ok(x) => x,
        Err(e) => {
            let _ = std::fs::remove_file(&clone);
            return Err(e.into());
        }
    };
    let previous = last_base(history, name);
    let (reuse, fallback) = match &previous {
        None => (
            None,
            Some("no earlier snapshot of this disk has a base".to_owned()),
        ),
        Some((m, base)) => match compare(repo, m, name, base, &*image, &clone, format) {
            Ok(reuse) => (Some(reuse), None),
            Err(why) => (None, Some(why)),
        },
    };
    Ok(Tracked {
        image,
        tracking: DiskTracking {
            reuse,
            fallback,
            base: Some(record),
        },
        clone: Some(clone),
        previous: previous.map(|(_, b)| b),
        _lock: Some(lock),
    })
}

impl Tracked {
    /// A disk read as it is, whole, for the reason `why`: nothing is kept
    /// and nothing released after it.
    pub fn untracked(image: Box<dyn DiskImage>, why: String) -> Tracked {
        Tracked {
            image,
            tracking: DiskTracking {
                fallback: Some(why),
                ..DiskTracking::default()
            },
            clone: None,
            previous: None,
            _lock: None,
        }
    }

    /// After the backup: on success the base before is released (the new
    /// clone is the base now); on failure the new clone is.
    pub fn finish(self, committed: bool) -> Result<()> {
        if committed {
            if let Some(old) = &self.previous {
                release(old)?;
            }
        } else if let Some(clone) = &self.clone {
            match std::fs::remove_file(clone) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::io(e).in_file(clone).during("remove the new base"))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The base directory beside `source` (made if missing, the owner's
/// alone: clones hold the disks' data, and a disk file is often readable
/// by its owner alone) and the name of a new base of `source` in it, or
/// why there is none. Nothing is made beside a disk on a filesystem that
/// cannot clone.
fn new_base(source: &Path, tag: &str) -> std::result::Result<PathBuf, String> {
    let source = std::path::absolute(source).map_err(|e| format!("{}: {e}", source.display()))?;
    let (Some(dir), Some(file)) = (source.parent(), source.file_name()) else {
        return Err(format!("{}: not a file path", source.display()));
    };
    let fs =
        rustix::fs::statfs(dir).map_err(|e| format!("cannot statfs {}: {e}", dir.display()))?;
    if !CLONING.contains(&(fs.f_type as i64)) {
        return Err(format!(
            "the filesystem of {} cannot clone files (type {:#x}; XFS with reflink and btrfs can); the disk is read whole",
            source.display(),
            fs.f_type
        ));
    }
    let base_dir = dir.join(BASE_DIR);
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(&base_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(format!("cannot create {}: {e}", base_dir.display()))
        }
        _ => {}
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    Ok(base_dir.join(format!("{}.{tag}.{}", file.to_string_lossy(), &id[..16])))
}

/// A new clone of `source` in its base directory, locked, or why there is
/// none.
fn make_clone(source: &Path, tag: &str) -> std::result::Result<(PathBuf, std::fs::File), String> {
    let clone = new_base(source, tag)?;
    let fail = |what: &str, p: &Path, e: std::io::Error| format!("{what} {}: {e}", p.display());
    use std::os::unix::fs::OpenOptionsExt;
    let src = std::fs::File::open(source).map_err(|e| fail("cannot open", source, e))?;
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&clone)
        .map_err(|e| fail("cannot create", &clone, e))?;
    // Locked at once: gc only removes a clone it can lock.
    if let Err(e) = dst.lock() {
        drop(dst);
        let _ = std::fs::remove_file(&clone);
        return Err(fail("cannot lock", &clone, e));
    }
    if let Err(e) = rustix::fs::ioctl_ficlone(&dst, &src) {
        drop(dst);
        let _ = std::fs::remove_file(&clone);
        if let Some(dir) = clone.parent() {
            let _ = std::fs::remove_dir(dir);
        }
        return Err(format!(
            "the filesystem of {} cannot clone files (FICLONE: {e}); the disk is read whole",
            source.display()
        ));
    }
    Ok((clone, dst))
}

/// `snapshot`, a clone of `source` a provider made, moved into the base
/// directory beside `source` and locked, or why it could not be.
fn move_clone(
    source: &Path,
    snapshot: &Path,
    tag: &str,
) -> std::result::Result<(PathBuf, std::fs::File), String> {
    let clone = new_base(source, tag)?;
    let fail = |what: &str, e: std::io::Error| {
        format!(
            "cannot {what} the snapshot {} to keep it as the next base: {e}; the disk is read whole",
            snapshot.display()
        )
    };
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(snapshot)
        .map_err(|e| fail("open", e))?;
    if !f.metadata().map_err(|e| fail("stat", e))?.is_file() {
        return Err(format!(
            "the snapshot {} is not a regular file; the disk is read whole",
            snapshot.display()
        ));
    }
    // Locked first (the lock goes with the file when it moves), so gc,
    // which removes the clones it can lock, never sees it unlocked.
    f.lock().map_err(|e| fail("lock", e))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| fail("restrict", e))?;
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        snapshot,
        rustix::fs::CWD,
        &clone,
        rustix::fs::RenameFlags::NOREPLACE,
    )
    .map_err(|e| fail("move", e.into()))?;
    Ok((clone, f))
}

fn record_of(path: &Path) -> Result<BaseRecord> {
    let m = std::fs::symlink_metadata(path).ctx_file(path, "record the new base")?;
    Ok(BaseRecord {
        path: path.to_path_buf(),
        device: m.dev(),
        inode: m.ino(),
        size: m.size(),
        ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
    })
}

/// The snapshot of `vm` whose base for disk `name` is the file on disk:
/// the newest such, since each backup releases the base before it. (A
/// manifest's time has whole seconds, so the listing's order alone cannot
/// tell two backups of one second apart.) Where no base is intact, the
/// newest snapshot with one, so that its base is compared (and refused,
/// saying why) and released.
fn last_base(history: &[Manifest], name: &str) -> Option<(Manifest, BaseRecord)> {
    let with_base: Vec<(Manifest, BaseRecord)> = history
        .iter()
        .rev()
        .filter_map(|m| {
            let base = m
                .disks
                .iter()
                .find(|d| d.name == name)?
                .tracking
                .as_ref()?
                .base
                .clone()?;
            Some((m.clone(), base))
        })
        .collect();
    let now = |b: &BaseRecord| record_of(&b.path).ok().filter(|_| in_base_dir(&b.path));
    let intact = with_base
        .iter()
        .position(|(_, b)| now(b).is_some_and(|n| n == *b));
    // Else one whose file is still there, changed: compared, refused, and
    // released (it is the same file, by device and inode).
    let present = || {
        with_base
            .iter()
            .position(|(_, b)| now(b).is_some_and(|n| n.device == b.device && n.inode == b.inode))
    };
    let at = intact.or_else(present).unwrap_or(0);
    with_base.into_iter().nth(at)
}

/// What the base before and the new clone say changed, as the cells to
/// take from `before`'s index; or why nothing can be taken.
fn compare(
    repo: &Repository,
    before: &Manifest,
    name: &str,
    base: &BaseRecord,
    image: &dyn DiskImage,
    clone: &Path,
    format: Option<ImageFormat>,
) -> std::result::Result<Reuse, String> {
    let disk = before
        .disks
        .iter()
        .find(|d| d.name == name)
        .ok_or("the snapshot before has no such disk")?;
    if !in_base_dir(&base.path) {
        return Err(format!(
            "the base {} is not in a {BASE_DIR} directory",
            base.path.display()
        ));
    }
    let now = record_of(&base.path).map_err(|e| format!("the base is gone: {e}"))?;
    let here = std::fs::symlink_metadata(clone).map_err(|e| e.to_string())?;
    if here.dev() != base.device {
        // Physical addresses on two devices say nothing about each other.
        return Err(format!(
            "the base {} is on another filesystem than the disk",
            base.path.display()
        ));
    }
    if now != *base {
        return Err(format!(
            "the base {} is not the file recorded with snapshot {}",
            base.path.display(),
            before.id
        ));
    }
    let index = repo
        .read_index(disk)
        .map_err(|e| format!("the snapshot before cannot be read: {e}"))?;
    if index.leaves.is_none() {
        return Err("the snapshot before has no leaves in its index".into());
    }
    let old = vsnap_formats::open(&base.path, format).map_err(|e| format!("the base: {e}"))?;
    same_geometry(&*old, image)?;
    let files = |p: &Path| -> std::result::Result<_, String> {
        let f = std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
        let len = f.metadata().map_err(|e| e.to_string())?.len();
        let extents = fiemap(&f).map_err(|e| format!("FIEMAP of {}: {e}", p.display()))?;
        Ok((extents, len))
    };
    let (old_extents, old_len) = files(&base.path)?;
    let (new_extents, new_len) = files(clone)?;
    let changed = super::changed_ranges(&old_extents, old_len, &new_extents, new_len)
        .map_err(|f| f.to_string())?;
    let maps = (old.allocation_map(), image.allocation_map());
    let (Ok(old_map), Ok(new_map)) = maps else {
        return Err("an allocation map cannot be read".into());
    };
    let cells = super::changed_cells(&old_map, &new_map, &changed, index.chunk_size)
        .map_err(|f| f.to_string())?;
    Ok(Reuse {
        since: before.id.clone(),
        index,
        unchanged: cells.into_iter().map(|c| !c).collect(),
    })
}

/// The two images agree in what cell-for-cell comparison relies on.
fn same_geometry(old: &dyn DiskImage, new: &dyn DiskImage) -> std::result::Result<(), String> {
    if old.format() != new.format()
        || old.virtual_size() != new.virtual_size()
        || old.block_size() != new.block_size()
    {
        return Err(format!(
            "the image changed from {} of {} bytes to {} of {} bytes",
            old.format().name(),
            old.virtual_size(),
            new.format().name(),
            new.virtual_size()
        ));
    }
    for image in [old, new] {
        if image.layer_paths().len() > 1 {
            return Err("the disk is a differencing chain, whose parents are not compared".into());
        }
        // A container read with a warning (a VHDX whose log was replayed
        // in memory, say) is more than its file's bytes say. A raw disk
        // is its bytes; its one warning is that it is raw.
        if image.format() != ImageFormat::Raw {
            let warnings = image.info().map(|i| i.warnings).unwrap_or_default();
            if let Some(w) = warnings.first() {
                return Err(format!("the image was read with a warning: {w}"));
            }
        }
    }
    Ok(())
}

/// Backs up `sources` as one crash-consistent snapshot, as
/// [`crate::backup()`] does, with changed-block tracking when `track`
/// is set: each source is cloned and the clone read, unchanged cells come
/// from the snapshot before, and the clone is kept as the next base.
pub fn backup_files(
    repo: &Repository,
    sources: &[PathBuf],
    format: Option<ImageFormat>,
    opts: &vsnap_engine::pipeline::Options,
    spec: &crate::BackupOptions,
    progress: &vsnap_engine::pipeline::Progress,
    track: bool,
) -> Result<crate::BackupOutcome> {
    use crate::backup::{backup_all, disk_names, SnapshotPlan};
    let names = disk_names(sources);
    // The VM's snapshots, read once for all its disks. An unreadable
    // listing only means no base is found: the disks are read whole.
    let history: Vec<Manifest> = if track {
        repo.list()
            .map(|l| {
                l.into_iter()
                    .filter_map(|l| l.manifest.ok())
                    .filter(|m| m.vm == spec.vm)
                    .collect()
            })
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let mut tracked: Vec<Tracked> = Vec::new();
    let mut plain: Vec<Box<dyn DiskImage>> = Vec::new();
    for (source, name) in sources.iter().zip(&names) {
        if track {
            match self::track(repo, &history, name, source, format) {
                Ok(t) => tracked.push(t),
                Err(e) => {
                    for t in tracked {
                        let _ = t.finish(false);
                    }
                    return Err(e);
                }
            }
        } else {
            plain.push(vsnap_formats::open(source, format)?);
        }
    }
    let images: Vec<&dyn DiskImage> = if track {
        tracked.iter().map(|t| &*t.image).collect()
    } else {
        plain.iter().map(|i| &**i).collect()
    };
    let plan = SnapshotPlan {
        images,
        sources: sources.to_vec(),
        options: spec.clone(),
        tracking: tracked.iter().map(|t| t.tracking.clone()).collect(),
    };
    let outcome = backup_all(repo, &[plan], opts, progress, &|_, _| {}).and_then(|mut all| {
        all.pop().unwrap_or_else(|| {
            Err(Error::from(crate::ErrorKind::InvalidArgument(
                "no snapshot was taken".into(),
            )))
        })
    });
    let committed = outcome.is_ok();
    for t in tracked {
        // A file that could not be removed here is only space, and is not
        // lost: an old base is released when its snapshot is forgotten
        // (the next backups compare with the new one), and a failed
        // backup's clone, which no snapshot records, by gc. The backup's
        // outcome is what to report.
        let _ = t.finish(committed);
    }
    outcome
}
