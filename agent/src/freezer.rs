//! The fsfreeze writer: FIFREEZE and FITHAW with the errno rules of the
//! reference, and the marker that lets a restarted agent thaw what a dead
//! one left frozen.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::fsctl;
use serde::{Deserialize, Serialize};

use crate::mounts::{Mount, Skipped};
use vsnap_protocol::{ErrorClass, WireError};

/// A frozen filesystem, held open so the thaw needs no path lookup (which
/// could block on the frozen filesystem itself).
#[derive(Debug)]
pub struct Frozen {
    pub mount: PathBuf,
    file: File,
}

/// Flushes each mount's filesystem (`syncfs`) before the freeze: FIFREEZE
/// writes back dirty data first, and the application waits through it, so
/// the flush is done in Prepare, outside the barrier. Returns what could
/// not be flushed (only a slower freeze follows).
pub fn sync_all(mounts: &[Mount]) -> Vec<String> {
    let mut failed = Vec::new();
    for m in mounts {
        let flushed = File::open(&m.mount_point)
            .and_then(|f| rustix::fs::syncfs(&f).map_err(std::io::Error::from));
        if let Err(e) = flushed {
            failed.push(format!(
                "prepare: cannot flush {}: {e}",
                m.mount_point.display()
            ));
        }
    }
    failed
}

/// Freezes `mounts` in the order given. `EBUSY` (frozen already) counts
/// as frozen, `EOPNOTSUPP` skips the mount; any other error thaws what was
/// frozen and fails, naming the mount.
pub fn freeze_all(mounts: &[Mount]) -> Result<(Vec<Frozen>, Vec<Skipped>), WireError> {
    // Open everything first: opening reads the path, which must not
    // happen once a parent filesystem is frozen.
    let mut opened = Vec::with_capacity(mounts.len());
    for m in mounts {
        let file = File::open(&m.mount_point).map_err(|e| {
            WireError::new(ErrorClass::NonRetryable, format!("open mount point: {e}"))
                .on_mount(m.mount_point.display().to_string())
        })?;
        opened.push((m.mount_point.clone(), file));
    }
    let mut frozen = Vec::new();
    let mut skipped = Vec::new();
    for (mount, file) in opened {
        match fsctl::freeze(&file) {
            Ok(()) => frozen.push(Frozen { mount, file }),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => frozen.push(Frozen { mount, file }),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => skipped.push(Skipped {
                mount,
                reason: "the filesystem cannot be frozen (EOPNOTSUPP)".into(),
            }),
            Err(e) => {
                let class = match e.raw_os_error() {
                    Some(libc::ENOMEM) | Some(libc::ENOSPC) => ErrorClass::OutOfResources,
                    Some(libc::EPERM) | Some(libc::EACCES) => ErrorClass::NonRetryable,
                    _ => ErrorClass::Retryable,
                };
                let _ = thaw_all(&mut frozen);
                return Err(WireError::new(class, format!("FIFREEZE failed: {e}"))
                    .on_mount(mount.display().to_string()));
            }
        }
    }
    Ok((frozen, skipped))
}

/// Thaws in the reverse of freeze order. `EINVAL` (not frozen) counts as
/// thawed. Every mount gets its thaw whatever the others do; the first
/// failure is returned after, and `frozen` keeps only what stays frozen.
pub fn thaw_all(frozen: &mut Vec<Frozen>) -> Result<usize, WireError> {
    let mut failed = None;
    let mut kept = Vec::new();
    let mut thawed = 0;
    while let Some(f) = frozen.pop() {
        match fsctl::thaw(&f.file) {
            Ok(()) => thawed += 1,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => thawed += 1,
            Err(e) => {
                failed.get_or_insert_with(|| {
                    WireError::new(ErrorClass::PartialFailure, format!("FITHAW failed: {e}"))
                        .on_mount(f.mount.display().to_string())
                });
                kept.push(f);
            }
        }
    }
    *frozen = kept;
    match failed {
        Some(e) => Err(e),
        None => Ok(thawed),
    }
}

/// What the marker file holds.
#[derive(Debug, Serialize, Deserialize)]
struct MarkerFile {
    pid: u32,
    mounts: Vec<PathBuf>,
    /// The agent turned on expedited RCU grace periods for this freeze
    /// ([`crate::rcu`]); a crash may have left them on.
    #[serde(default)]
    rcu_expedited: bool,
}

/// What [`Marker::recover`] found and did.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Each mount a dead agent left frozen, and whether it thawed.
    pub thawed: Vec<(PathBuf, Result<(), String>)>,
    /// Whether the RCU knob a dead agent may have left on was reset.
    pub rcu: Option<Result<(), String>>,
}

/// Records the mounts about to be frozen, before the first FIFREEZE, and
/// forgets them after the last FITHAW. It must live on a filesystem that
/// is never frozen (a tmpfs such as /run).
#[derive(Debug, Clone)]
pub struct Marker {
    pub path: PathBuf,
}

impl Marker {
    pub fn write(&self, mounts: &[Mount], rcu_expedited: bool) -> std::io::Result<()> {
        let body = MarkerFile {
            pid: std::process::id(),
            mounts: mounts.iter().map(|m| m.mount_point.clone()).collect(),
            rcu_expedited,
        };
        let bytes = serde_json::to_vec(&body).map_err(std::io::Error::other)?;
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, bytes)?;
        File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }

    pub fn clear(&self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// At start-up: thaws every mount a previous agent recorded (and
    /// resets the RCU knob it may have left on), then removes the marker.
    pub fn recover(&self) -> std::io::Result<Recovered> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Recovered::default()),
            Err(e) => return Err(e),
        };
        let marker = match serde_json::from_slice::<MarkerFile>(&bytes) {
            Ok(m) => m,
            Err(e) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("unreadable marker {}: {e}", self.path.display()),
                ))
            }
        };
        let mut out = Recovered::default();
        for m in marker.mounts {
            let r = thaw_path(&m);
            out.thawed.push((m, r));
        }
        if marker.rcu_expedited {
            out.rcu = Some(
                crate::rcu::Expedite::reset(Path::new(crate::rcu::KNOB)).map_err(|e| e.to_string()),
            );
        }
        self.clear()?;
        Ok(out)
    }
}

fn thaw_path(mount: &Path) -> Result<(), String> {
    let f = File::open(mount).map_err(|e| format!("open: {e}"))?;
    match fsctl::thaw(&f) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        Err(e) => Err(format!("FITHAW: {e}")),
    }
}
