//! Snapshot providers: a point-in-time image of every disk, taken inside
//! the freeze.
//! - `reflink` clones each disk file (FICLONE: O(1) in the disk's size,
//!   XFS with reflink and btrfs); `copy` copies the bytes, the baseline
//!   that shows what reflink buys ([`files`]).
//! - `qmp` has the VM's QEMU redirect its writes to an overlay, streams
//!   the base as it stands, and merges the overlay back after
//!   ([`overlay`]): O(1) in the disk's size on any filesystem, and the cut
//!   is QEMU's own, whatever the image format and cache mode.
//!
//! `auto` takes `qmp` for a VM whose inventory names its QMP socket, and
//! otherwise reflink where the disk's filesystem can clone, copy elsewhere.

mod files;
mod overlay;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, ErrorKind, Result};
use crate::inventory::Vm;
use crate::micros;
pub use files::SNAP_DIR;
use files::{io_at, RunDir};
pub use overlay::OVERLAY_DIR;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Reflink,
    Copy,
    Qmp,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Reflink => "reflink",
            Kind::Copy => "copy",
            Kind::Qmp => "qmp",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// `qmp` where the VM's monitor is known; else reflink where the
    /// disk's filesystem can, copy elsewhere.
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
            "qmp" => Ok(Choice::Force(Kind::Qmp)),
            _ => Err(format!(
                "provider {s:?}: expected auto, reflink, copy or qmp"
            )),
        }
    }
}

/// One disk's snapshot, once taken.
#[derive(Debug, Clone, Serialize)]
pub struct Snap {
    pub source: PathBuf,
    /// What to stream: a clone or copy, or (`qmp`) the disk itself, which
    /// stands still under its overlay.
    pub path: PathBuf,
    pub provider: Kind,
    pub took_us: u64,
}

/// How one disk (in plan order) is snapshotted.
#[derive(Debug)]
enum Step {
    File {
        source: PathBuf,
        target: PathBuf,
        kind: Kind,
    },
    /// Through QMP group `group`.
    Overlay { group: usize, source: PathBuf },
}

/// What merging the overlays back did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Merged {
    /// From the first commit's start to the last one's end.
    pub commit_us: Option<u64>,
    /// Overlays that stay, with the VM running on them, for the next run
    /// to merge; and overlay files that could not be removed.
    pub errors: Vec<String>,
}

/// Everything decided before the freeze, so that inside it only the
/// clones, copies or overlays remain.
pub struct Prepared {
    plan: Vec<Step>,
    runs: Vec<RunDir>,
    groups: Vec<overlay::Group>,
    /// Snapshot directories of dead runs that were removed.
    pub stale_removed: usize,
    /// Overlays and commit jobs of dead runs that were merged back.
    pub overlays_recovered: usize,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("plan", &self.plan)
            .field("runs", &self.runs)
            .field(
                "groups",
                &self
                    .groups
                    .iter()
                    .map(|g| g.vm.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Before the freeze: picks a provider for every disk of every VM, removes
/// what dead runs left (their snapshot directories; through QMP, their
/// overlays and commit jobs, merged back), and makes and locks this run's
/// directories (probing each filesystem with a real clone). Forcing a
/// provider that cannot serve a disk is an error that says why.
pub async fn prepare(vms: &[Vm], choice: Choice, run_id: &str) -> Result<Prepared> {
    let mut prepared = Prepared {
        plan: Vec::new(),
        runs: Vec::new(),
        groups: Vec::new(),
        stale_removed: 0,
        overlays_recovered: 0,
    };
    for vm in vms {
        for disk in &vm.disks {
            let meta = std::fs::metadata(disk).map_err(|e| io_at(e, disk, "open disk"))?;
            if !meta.is_file() {
                return Err(Error::from(ErrorKind::Config("not a regular file".into()))
                    .at(disk.display().to_string()));
            }
        }
        let qmp = match (choice, &vm.qmp) {
            (Choice::Force(Kind::Qmp), None) => {
                return Err(Error::from(ErrorKind::Config(format!(
                    "vm {:?}: the qmp provider needs the VM's QEMU monitor: add qmp = \"/path/to/qmp.sock\" (QEMU's -qmp unix:…,server=on,wait=off) to its inventory entry",
                    vm.name
                ))))
            }
            (Choice::Force(Kind::Qmp) | Choice::Auto, Some(socket)) => Some(socket),
            _ => None,
        };
        if let Some(socket) = qmp {
            let (group, recovered) =
                overlay::Group::prepare(&vm.name, socket, &vm.disks, run_id).await?;
            prepared.overlays_recovered += recovered;
            let g = prepared.groups.len();
            prepared.plan.extend(group.disks().map(|d| Step::Overlay {
                group: g,
                source: d.to_path_buf(),
            }));
            prepared.groups.push(group);
        } else {
            tokio::task::block_in_place(|| prepared.add_files(&vm.disks, choice, run_id))?;
        }
    }
    Ok(prepared)
}

impl Prepared {
    fn add_files(&mut self, disks: &[PathBuf], choice: Choice, run_id: &str) -> Result<()> {
        for disk in disks {
            let parent = disk.parent().unwrap_or(Path::new("."));
            let root = parent.join(SNAP_DIR);
            let dir = root.join(run_id);
            let same_dir = self.plan.iter().find_map(|s| match s {
                Step::File { target, kind, .. } if target.parent() == Some(dir.as_path()) => {
                    Some(*kind)
                }
                _ => None,
            });
            let kind = if let Some(k) = same_dir {
                k
            } else {
                self.stale_removed += files::clean_stale(&root)?;
                let run = files::lock_run(&root, run_id)?;
                self.runs.push(run);
                match (choice, files::can_reflink(&dir)) {
                    (Choice::Force(Kind::Copy), _) => Kind::Copy,
                    (_, Ok(())) => Kind::Reflink,
                    (Choice::Auto, Err(_)) => Kind::Copy,
                    (Choice::Force(k), Err(e)) => {
                        return Err(Error::from(ErrorKind::Config(format!(
                            "the {} provider cannot serve this disk: its filesystem cannot clone files (FICLONE: {e}); use XFS with reflink or btrfs, or --provider copy",
                            k.name()
                        )))
                        .at(disk.display().to_string()))
                    }
                }
            };
            let name = disk.file_name().unwrap_or_default();
            let target = dir.join(name);
            if self
                .plan
                .iter()
                .any(|s| matches!(s, Step::File { target: t, .. } if t == &target))
            {
                return Err(
                    Error::from(ErrorKind::Config("this disk is listed twice".into()))
                        .at(disk.display().to_string()),
                );
            }
            self.plan.push(Step::File {
                source: disk.clone(),
                target,
                kind,
            });
        }
        Ok(())
    }

    /// The providers chosen, disk by disk.
    pub fn kinds(&self) -> Vec<Kind> {
        self.plan
            .iter()
            .map(|s| match s {
                Step::File { kind, .. } => *kind,
                Step::Overlay { .. } => Kind::Qmp,
            })
            .collect()
    }

    /// How many disks there are to snapshot, in plan order.
    pub fn len(&self) -> usize {
        self.plan.len()
    }

    pub fn is_empty(&self) -> bool {
        self.plan.is_empty()
    }

    /// Inside the freeze: the snapshot of disk `i` (in inventory order).
    /// Safe to call from several threads for different disks; the
    /// session decides how many run at once. Blocks: call it where a
    /// runtime's blocking work may run (`spawn_blocking`).
    pub fn take_one(&self, i: usize) -> Result<Snap> {
        let t = Instant::now();
        match self.plan.get(i) {
            None => Err(ErrorKind::Config(format!("no disk {i} in this snapshot plan")).into()),
            Some(Step::File {
                source,
                target,
                kind,
            }) => {
                let src = std::fs::File::open(source).map_err(|e| io_at(e, source, "open disk"))?;
                let dst = std::fs::File::create(target)
                    .map_err(|e| io_at(e, target, "create snapshot"))?;
                match kind {
                    Kind::Copy => {
                        files::copy_bytes(&src, &dst).map_err(|e| io_at(e, source, "copy"))?
                    }
                    _ => files::clone_file(&src, &dst).map_err(|e| io_at(e, source, "FICLONE"))?,
                }
                Ok(Snap {
                    source: source.clone(),
                    path: target.clone(),
                    provider: *kind,
                    took_us: micros(t.elapsed()),
                })
            }
            Some(Step::Overlay { group, source }) => {
                let g = self.groups.get(*group).ok_or_else(|| {
                    Error::from(ErrorKind::Config(format!("no QMP group {group}")))
                })?;
                let took_us = tokio::runtime::Handle::current().block_on(g.take())?;
                Ok(Snap {
                    source: source.clone(),
                    path: source.clone(),
                    provider: Kind::Qmp,
                    took_us,
                })
            }
        }
    }

    /// Merges every overlay taken back into its disk, and removes it. Safe
    /// to call when none was taken, and more than once; call it after the
    /// stream, and on every abort after the snapshot step.
    pub async fn merge(&self) -> Merged {
        let mut out = Merged::default();
        let mut total = None;
        for g in &self.groups {
            let m = g.merge().await;
            if m.commit_us > 0 || !m.errors.is_empty() {
                total = Some(total.unwrap_or(0) + m.commit_us);
            }
            out.errors.extend(m.errors);
        }
        out.commit_us = total;
        out
    }

    /// Removes this run's snapshots and unlocks. Also done on drop; this
    /// form reports what could not be removed.
    pub fn release(mut self) -> Result<()> {
        let runs = std::mem::take(&mut self.runs);
        let mut first = None;
        for r in runs {
            if let Err(e) = files::release_run(&r) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        for r in std::mem::take(&mut self.runs) {
            let _ = files::release_run(&r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn providers_are_chosen_by_name() {
        assert_eq!("qmp".parse::<Choice>(), Ok(Choice::Force(Kind::Qmp)));
        assert_eq!("auto".parse::<Choice>(), Ok(Choice::Auto));
        assert_eq!(
            "zfs".parse::<Choice>(),
            Err("provider \"zfs\": expected auto, reflink, copy or qmp".to_string())
        );
        assert_eq!(Kind::Qmp.name(), "qmp");
    }
}
