//! Snapshot providers: a point-in-time image of every disk, taken inside
//! the freeze. `reflink` clones each file (FICLONE: O(1) in the disk's
//! size, XFS with reflink and btrfs); `copy` copies the bytes, the baseline
//! that shows what reflink buys.
//!
//! A snapshot of `DIR/disk.vhd` is `DIR/.vsnap-snap/RUN/disk.vhd`, beside
//! its disk so a clone stays on one filesystem. `DIR/.vsnap-snap/RUN.lock`
//! is locked for the run's whole life; a later run that can take the lock
//! knows its owner died, and removes what it left.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use vsnap_engine::io::fsctl;

use crate::error::{Error, ErrorKind, Result};
use crate::micros;

pub const SNAP_DIR: &str = ".vsnap-snap";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Reflink,
    Copy,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Reflink => "reflink",
            Kind::Copy => "copy",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// Reflink where the disk's filesystem can, copy elsewhere.
    Auto,
    Force(Kind),
}

impl std::str::FromStr for Choice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Choice::Auto),
            "reflink" => Ok(Choice::Force(Kind::Reflink)),
            "copy" => Ok(Choice::Force(Kind::Copy)),
            _ => Err(format!("provider {s:?}: expected auto, reflink or copy")),
        }
    }
}

/// One disk's snapshot, once taken.
#[derive(Debug, Clone, Serialize)]
pub struct Snap {
    pub source: PathBuf,
    pub path: PathBuf,
    pub provider: Kind,
    pub took_us: u64,
}

/// A run's snapshot directories, locked; released (removed) on
/// [`Prepared::release`] or when dropped, so an abort leaves nothing.
#[derive(Debug)]
struct RunDir {
    dir: PathBuf,
    lock_path: PathBuf,
    _lock: File,
}

/// Everything decided before the freeze, so that inside it only the
/// clones or copies remain.
#[derive(Debug)]
pub struct Prepared {
    plan: Vec<(PathBuf, PathBuf, Kind)>,
    runs: Vec<RunDir>,
    /// Snapshot directories of dead runs that were removed.
    pub stale_removed: usize,
}

fn io_at(e: std::io::Error, p: &Path, what: &str) -> Error {
    Error::from(e)
        .at(p.display().to_string())
        .during(what.to_string())
}

/// Removes what dead runs left in `dir/.vsnap-snap`: a run whose lock can
/// be taken has no owner.
fn clean_stale(snap_root: &Path) -> Result<usize> {
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
fn can_reflink(dir: &Path) -> std::result::Result<(), std::io::Error> {
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
        fsctl::clone_file(&src, &dst)
    })();
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    r
}

/// Before the freeze: removes dead runs' snapshots, makes and locks this
/// run's directories, and picks a provider for every disk (probing each
/// filesystem with a real clone). Forcing reflink where a filesystem
/// cannot clone is an error that says so.
pub fn prepare(disks: &[PathBuf], choice: Choice, run_id: &str) -> Result<Prepared> {
    let mut prepared = Prepared {
        plan: Vec::new(),
        runs: Vec::new(),
        stale_removed: 0,
    };
    for disk in disks {
        let meta = std::fs::metadata(disk).map_err(|e| io_at(e, disk, "open disk"))?;
        if !meta.is_file() {
            return Err(Error::from(ErrorKind::Config("not a regular file".into()))
                .at(disk.display().to_string()));
        }
        let parent = disk.parent().unwrap_or(Path::new("."));
        let root = parent.join(SNAP_DIR);
        let dir = root.join(run_id);
        let same_dir = prepared
            .plan
            .iter()
            .find(|(_, t, _)| t.parent() == Some(dir.as_path()))
            .map(|p| p.2);
        let kind = if let Some(k) = same_dir {
            k
        } else {
            prepared.stale_removed += clean_stale(&root)?;
            std::fs::create_dir_all(&root)
                .map_err(|e| io_at(e, &root, "create the snapshot directory"))?;
            // Locked under another name, then renamed: another run's clean-up
            // never sees this lock file unlocked.
            let lock_path = root.join(format!("{run_id}.lock"));
            let fresh = root.join(format!(".{run_id}.new"));
            let lock = File::create(&fresh).map_err(|e| io_at(e, &fresh, "create the run lock"))?;
            lock.lock().map_err(|e| io_at(e, &fresh, "lock the run"))?;
            std::fs::rename(&fresh, &lock_path)
                .map_err(|e| io_at(e, &lock_path, "create the run lock"))?;
            std::fs::create_dir(&dir)
                .map_err(|e| io_at(e, &dir, "create the snapshot directory"))?;
            prepared.runs.push(RunDir {
                dir: dir.clone(),
                lock_path,
                _lock: lock,
            });
            match (choice, can_reflink(&dir)) {
                (Choice::Force(Kind::Copy), _) => Kind::Copy,
                (_, Ok(())) => Kind::Reflink,
                (Choice::Auto, Err(_)) => Kind::Copy,
                (Choice::Force(Kind::Reflink), Err(e)) => {
                    return Err(Error::from(ErrorKind::Config(format!(
                        "the reflink provider cannot serve this disk: its filesystem cannot clone files (FICLONE: {e}); use XFS with reflink or btrfs, or --provider copy"
                    )))
                    .at(disk.display().to_string()))
                }
            }
        };
        let name = disk.file_name().unwrap_or_default();
        let target = dir.join(name);
        if prepared.plan.iter().any(|(_, t, _)| t == &target) {
            return Err(
                Error::from(ErrorKind::Config("this disk is listed twice".into()))
                    .at(disk.display().to_string()),
            );
        }
        prepared.plan.push((disk.clone(), target, kind));
    }
    Ok(prepared)
}

impl Prepared {
    /// The providers chosen, disk by disk.
    pub fn kinds(&self) -> Vec<Kind> {
        self.plan.iter().map(|p| p.2).collect()
    }

    /// How many disks there are to snapshot, in plan order.
    pub fn len(&self) -> usize {
        self.plan.len()
    }

    pub fn is_empty(&self) -> bool {
        self.plan.is_empty()
    }

    /// Inside the freeze: the snapshot of disk `i` (in the order given to
    /// [`prepare`]). Safe to call from several threads for different
    /// disks; the session decides how many run at once.
    pub fn take_one(&self, i: usize) -> Result<Snap> {
        let Some((source, target, kind)) = self.plan.get(i) else {
            return Err(ErrorKind::Config(format!("no disk {i} in this snapshot plan")).into());
        };
        let t = Instant::now();
        let src = File::open(source).map_err(|e| io_at(e, source, "open disk"))?;
        let dst = File::create(target).map_err(|e| io_at(e, target, "create snapshot"))?;
        match kind {
            Kind::Reflink => {
                fsctl::clone_file(&src, &dst).map_err(|e| io_at(e, source, "FICLONE"))?
            }
            Kind::Copy => copy_bytes(&src, &dst).map_err(|e| io_at(e, source, "copy"))?,
        }
        Ok(Snap {
            source: source.clone(),
            path: target.clone(),
            provider: *kind,
            took_us: micros(t.elapsed()),
        })
    }

    /// Removes this run's snapshots and unlocks. Also done on drop; this
    /// form reports what could not be removed.
    pub fn release(mut self) -> Result<()> {
        let runs = std::mem::take(&mut self.runs);
        let mut first = None;
        for r in runs {
            if let Err(e) = release_run(&r) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        for r in std::mem::take(&mut self.runs) {
            let _ = release_run(&r);
        }
    }
}

fn release_run(r: &RunDir) -> Result<()> {
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
fn copy_bytes(src: &File, dst: &File) -> std::io::Result<()> {
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
