//! The file providers: `reflink` clones each disk file (FICLONE: O(1) in
//! the disk's size, XFS with reflink and btrfs); `copy` copies the bytes,
//! the baseline that shows what reflink buys.
//!
//! A snapshot of `DIR/disk.vhd` is `DIR/.vsnap-snap/RUN/disk.vhd`, beside
//! its disk so a clone stays on one filesystem. `DIR/.vsnap-snap/RUN.lock`
//! is locked for the run's whole life; a later run that can take the lock
//! knows its owner died, and removes what it left.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub const SNAP_DIR: &str = ".vsnap-snap";

/// A run's snapshot directories, locked; released (removed) on
/// [`Prepared::release`] or when dropped, so an abort leaves nothing.
#[derive(Debug)]
pub(super) struct RunDir {
    pub(super) dir: PathBuf,
    lock_path: PathBuf,
    _lock: File,
}

pub(super) fn io_at(e: std::io::Error, p: &Path, what: &str) -> Error {
    Error::from(e)
        .at(p.display().to_string())
        .during(what.to_string())
}

/// Removes what dead runs left in `dir/.vsnap-snap`: a run whose lock can
/// be taken has no owner.
pub(super) fn clean_stale(snap_root: &Path) -> Result<usize> {
    let entries = match std::fs::read_dir(snap_root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_at(e, snap_root, "list snapshots")),
    };
    let mut removed = 0;
    for e in entries {
        let e = e.map_err(|e| io_at(e, snap_root, "list snapshots"))?;
        let p = e.path();
        let Some(name) = p.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        if let Some(run) = name.strip_suffix(".lock") {
            let Ok(f) = File::open(&p) else { continue };
            if f.try_lock().is_ok() {
                let dir = snap_root.join(run);
                if dir.exists() {
                    std::fs::remove_dir_all(&dir)
                        .map_err(|e| io_at(e, &dir, "remove a stale snapshot"))?;
                    removed += 1;
                }
                let _ = std::fs::remove_file(&p);
            }
        } else if p.is_dir() && !snap_root.join(format!("{name}.lock")).exists() {
            // The lock goes first and is removed last, so a directory
            // without one is what a release cut short left.
            std::fs::remove_dir_all(&p).map_err(|e| io_at(e, &p, "remove a stale snapshot"))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Whether `dir`'s filesystem can clone: a real FICLONE of a one-block
/// file made for the purpose.
pub(super) fn can_reflink(dir: &Path) -> std::result::Result<(), std::io::Error> {
    let a = dir.join(".probe-src");
    let b = dir.join(".probe-dst");
    let r = (|| {
        // FICLONE reads the source: it must be open for reading.
        let src = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&a)?;
        src.write_all_at(&[0x5a; 4096], 0)?;
        let dst = File::create(&b)?;
        clone_file(&src, &dst)
    })();
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    r
}

/// Makes `dst` share `src`'s extents (FICLONE): a point-in-time copy
/// that costs O(extents), not O(bytes), on XFS with reflink and btrfs.
pub(super) fn clone_file(src: &File, dst: &File) -> std::io::Result<()> {
    rustix::fs::ioctl_ficlone(dst, src).map_err(std::io::Error::from)
}

/// Makes and locks this run's directory under `root`: locked under
/// another name, then renamed, so another run's clean-up never sees this
/// lock file unlocked.
pub(super) fn lock_run(root: &Path, run_id: &str) -> Result<RunDir> {
    std::fs::create_dir_all(root).map_err(|e| io_at(e, root, "create the snapshot directory"))?;
    let lock_path = root.join(format!("{run_id}.lock"));
    let fresh = root.join(format!(".{run_id}.new"));
    let lock = File::create(&fresh).map_err(|e| io_at(e, &fresh, "create the run lock"))?;
    lock.lock().map_err(|e| io_at(e, &fresh, "lock the run"))?;
    std::fs::rename(&fresh, &lock_path).map_err(|e| io_at(e, &lock_path, "create the run lock"))?;
    let dir = root.join(run_id);
    std::fs::create_dir(&dir).map_err(|e| io_at(e, &dir, "create the snapshot directory"))?;
    Ok(RunDir {
        dir,
        lock_path,
        _lock: lock,
    })
}

pub(super) fn release_run(r: &RunDir) -> Result<()> {
    match std::fs::remove_dir_all(&r.dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io_at(e, &r.dir, "release snapshot"))
        }
        _ => {}
    }
    let _ = std::fs::remove_file(&r.lock_path);
    if let Some(root) = r.dir.parent() {
        // Empty once no other run uses it.
        let _ = std::fs::remove_dir(root);
    }
    Ok(())
}

/// The baseline: every byte read and written again, holes kept (a block
/// of zeros is not written), with positional I/O.
pub(super) fn copy_bytes(src: &File, dst: &File) -> std::io::Result<()> {
    let len = src.metadata()?.len();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        let n = usize::try_from((len - at).min(buf.len() as u64)).unwrap_or(buf.len());
        src.read_exact_at(&mut buf[..n], at)?;
        if !vsnap_engine::digest::is_zero(&buf[..n]) {
            dst.write_all_at(&buf[..n], at)?;
        }
        at += n as u64;
    }
    dst.set_len(len)
}
