//! The `qmp` provider: QEMU makes the cut itself. Inside the freeze, one
//! QMP `transaction` puts a qcow2 overlay over each of a VM's disks, so
//! the guest's writes go there and the base images stop changing; the
//! base images are then streamed as they are, with no copy and no clone.
//! After the stream, each overlay is merged back with an active
//! `block-commit` and removed (the AVHDX-checkpoint flow of Hyper-V).
//!
//! No guest write may be lost, whenever the coordinator dies:
//! - before the overlay, nothing changed;
//! - between the overlay and the commit, the VM runs on the overlay, and
//!   the next run commits it before it takes its own;
//! - during the commit, QEMU's job runs on without us, and the next run
//!   finishes it.
//!
//! An overlay file is removed only once QEMU no longer uses it: after its
//! commit completed, or when the VM's chain shows the disk written to
//! directly again. Overlays live in `DIR/.vsnap-overlay/`, beside their
//! disks, apart from the file providers' run directories, which a later
//! run removes whole.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::files::io_at;
use crate::error::{Error, ErrorKind, Result};
use crate::failpoint::kill_point;
use crate::micros;
use crate::qmp::{BlockDevice, QmpClient};

pub const OVERLAY_DIR: &str = ".vsnap-overlay";

/// The prefix of every block job vsnap starts: a later run finishes the
/// ones a dead run left, and no one else's.
const JOB_PREFIX: &str = "vsnap-commit-";

/// How long a commit may take to copy an overlay back; an overlay holds
/// what the guest wrote during the stream.
const COMMIT_LIMIT: Duration = Duration::from_secs(3600);

/// One VM's disks under one QEMU, overlaid together.
pub(super) struct Group {
    pub(super) vm: String,
    disks: Vec<Disk>,
    state: tokio::sync::Mutex<State>,
}

struct Disk {
    path: PathBuf,
    device: BlockDevice,
    overlay: PathBuf,
    node: String,
    /// `DIR/.vsnap-overlay/NAME.lock`, locked for the run's life: a second
    /// run would take the first one's overlay for a dead run's, and
    /// commit it under its stream. A dead run's lock is free again.
    _lock: std::fs::File,
}

struct State {
    client: QmpClient,
    /// The transaction's outcome once tried: how long it took, or why it
    /// failed.
    taken: Option<std::result::Result<u64, String>>,
    committed: bool,
}

/// What finishing a group did.
#[derive(Debug, Default)]
pub(super) struct Merged {
    pub(super) commit_us: u64,
    pub(super) errors: Vec<String>,
}

fn same_file(a: &Path, b: &Path) -> bool {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    canon(a) == canon(b)
}

fn overlay_dir(disk: &Path) -> PathBuf {
    disk.parent().unwrap_or(Path::new(".")).join(OVERLAY_DIR)
}

/// `DIR/.vsnap-overlay/NAME.*.qcow2` for disk `DIR/NAME`: the overlays
/// vsnap makes for this disk, and no other file.
fn is_overlay_of(disk: &Path, file: &Path) -> bool {
    let (Some(name), Some(f)) = (
        disk.file_name().and_then(|n| n.to_str()),
        file.file_name().and_then(|n| n.to_str()),
    ) else {
        return false;
    };
    file.parent() == Some(overlay_dir(disk).as_path())
        && f.strip_prefix(name)
            .and_then(|r| r.strip_prefix('.'))
            .is_some_and(|r| r.ends_with(".qcow2"))
}

impl Group {
    /// Before the freeze: connects to the VM's QEMU, finishes what a dead
    /// run left (its commit jobs, its overlays), removes overlay files
    /// QEMU no longer uses, and finds each disk's block device. Returns
    /// the group and how many leftovers it merged back.
    pub(super) async fn prepare(
        vm: &str,
        socket: &Path,
        disks: &[PathBuf],
        run_id: &str,
    ) -> Result<(Group, usize)> {
        // QEMU's monitor serves one client at a time, which keeps a second
        // run off this VM as long as this one holds it; the locks keep off
        // one that comes through another monitor of the same QEMU.
        let mut client = QmpClient::connect(socket).await?;
        // Every disk is the VM's before anything is made beside one.
        for disk in disks {
            client.device_of(disk).await?;
        }
        let mut locks = Vec::new();
        for disk in disks {
            let dir = overlay_dir(disk);
            make_overlay_dir(disk, &dir)?;
            locks.push(lock_disk(vm, disk, &dir)?);
        }
        let mut recovered = 0;
        for job in client.block_jobs().await? {
            if !job.id.starts_with(JOB_PREFIX) {
                continue;
            }
            if job.kind != "commit" || !(job.ready || job.status == "running") {
                return Err(Error::from(ErrorKind::Config(format!(
                    "vm {vm:?}: block job {} left by an earlier vsnap run is a {} job, {}; vsnap finishes only running commits (see query-block-jobs)",
                    job.id, job.kind, job.status
                ))));
            }
            client
                .finish_commit(&job.id, job.ready, COMMIT_LIMIT)
                .await?;
            recovered += 1;
        }
        let mut members = Vec::new();
        for ((k, disk), lock) in disks.iter().enumerate().zip(locks) {
            let mut device = client.device_of(disk).await?;
            if !same_file(&device.file, disk) {
                let ours = is_overlay_of(disk, &device.file)
                    && device
                        .backing
                        .as_deref()
                        .is_some_and(|b| same_file(b, disk));
                if !ours {
                    return Err(Error::from(ErrorKind::Config(format!(
                        "vm {vm:?}: QEMU writes {} through {}, an overlay vsnap did not make; the qmp provider snapshots a disk only while the VM writes to it directly (commit or remove that overlay first)",
                        disk.display(),
                        device.file.display()
                    ))));
                }
                // A dead run's overlay, still in use: merge it back.
                let job = format!("{JOB_PREFIX}{k}");
                client.start_commit(&device, &job).await?;
                client.finish_commit(&job, false, COMMIT_LIMIT).await?;
                recovered += 1;
                device = client.device_of(disk).await?;
                if !same_file(&device.file, disk) {
                    return Err(Error::from(ErrorKind::Config(format!(
                        "vm {vm:?}: {} still runs on {} after its commit",
                        disk.display(),
                        device.file.display()
                    ))));
                }
            }
            let dir = overlay_dir(disk);
            remove_unused_overlays(disk, &dir)?;
            let name = disk.file_name().unwrap_or_default().to_string_lossy();
            members.push(Disk {
                path: disk.clone(),
                device,
                overlay: dir.join(format!("{name}.{run_id}.qcow2")),
                node: format!("vsnap-overlay-{k}"),
                _lock: lock,
            });
        }
        Ok((
            Group {
                vm: vm.to_string(),
                disks: members,
                state: tokio::sync::Mutex::new(State {
                    client,
                    taken: None,
                    committed: false,
                }),
            },
            recovered,
        ))
    }

    pub(super) fn disks(&self) -> impl Iterator<Item = &Path> {
        self.disks.iter().map(|d| d.path.as_path())
    }

    /// Inside the freeze: every disk's overlay in one transaction, once;
    /// later calls (one per disk) get the same outcome. Returns how long
    /// the transaction took.
    pub(super) async fn take(&self) -> Result<u64> {
        let mut st = self.state.lock().await;
        if let Some(done) = &st.taken {
            return done.clone().map_err(|e| ErrorKind::Config(e).into());
        }
        kill_point!("qmp-before-overlay");
        let t = Instant::now();
        let list: Vec<(&BlockDevice, &Path, &str)> = self
            .disks
            .iter()
            .map(|d| (&d.device, d.overlay.as_path(), d.node.as_str()))
            .collect();
        let r = st.client.overlay(&list).await;
        let took = micros(t.elapsed());
        st.taken = Some(r.as_ref().map(|()| took).map_err(|e| e.to_string()));
        r?;
        kill_point!("qmp-overlay-taken");
        Ok(took)
    }

    /// After the stream (or an abort after the overlays): merges each
    /// overlay back and removes it. An overlay whose commit failed stays,
    /// with the VM running on it; the next run commits it.
    pub(super) async fn merge(&self) -> Merged {
        let mut st = self.state.lock().await;
        let mut out = Merged::default();
        if !matches!(st.taken, Some(Ok(_))) || st.committed {
            return out;
        }
        st.committed = true;
        let t = Instant::now();
        for (k, d) in self.disks.iter().enumerate() {
            let job = format!("{JOB_PREFIX}{k}");
            let merged = async {
                let top = st.client.device_of(&d.path).await?;
                st.client.start_commit(&top, &job).await?;
                kill_point!("qmp-commit-started");
                st.client.finish_commit(&job, false, COMMIT_LIMIT).await
            }
            .await;
            match merged {
                Ok(()) => {
                    if let Err(e) = std::fs::remove_file(&d.overlay) {
                        out.errors.push(
                            io_at(e, &d.overlay, "remove the merged overlay").to_string(),
                        );
                    }
                }
                Err(e) => out.errors.push(format!(
                    "vm {}: the overlay {} is not merged back, and the VM runs on it; the next run commits it: {e}",
                    self.vm,
                    d.overlay.display()
                )),
            }
        }
        out.commit_us = micros(t.elapsed());
        out
    }
}

fn lock_disk(vm: &str, disk: &Path, dir: &Path) -> Result<std::fs::File> {
    let name = disk.file_name().unwrap_or_default().to_string_lossy();
    let path = dir.join(format!("{name}.lock"));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io_at(e, &path, "create the disk's overlay lock"))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::from(ErrorKind::Config(format!(
            "vm {vm:?}: another vsnap run is backing up {} through QMP (it holds {})",
            disk.display(),
            path.display()
        )))),
        Err(std::fs::TryLockError::Error(e)) => Err(io_at(e, &path, "lock the disk")),
    }
}

/// Removes `disk`'s overlays in `dir`: called once QEMU writes the disk
/// directly, so none of them is in use.
fn remove_unused_overlays(disk: &Path, dir: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_at(e, dir, "list overlays")),
    };
    for e in entries {
        let p = e.map_err(|e| io_at(e, dir, "list overlays"))?.path();
        if is_overlay_of(disk, &p) {
            std::fs::remove_file(&p).map_err(|e| io_at(e, &p, "remove an unused overlay"))?;
        }
    }
    Ok(())
}

/// QEMU creates the overlay itself, so the directory belongs to the
/// disk's owner: whoever may write the disk may write beside it.
fn make_overlay_dir(disk: &Path, dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().mode(0o750).create(dir) {
        Ok(()) => {
            let meta = std::fs::metadata(disk).map_err(|e| io_at(e, disk, "open disk"))?;
            rustix::fs::chown(
                dir,
                Some(rustix::fs::Uid::from_raw(meta.uid())),
                Some(rustix::fs::Gid::from_raw(meta.gid())),
            )
            .map_err(|e| {
                io_at(
                    e.into(),
                    dir,
                    "give the overlay directory to the disk's owner",
                )
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_at(e, dir, "create the overlay directory")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_disks_overlays_are_its_own() {
        let disk = Path::new("/vms/a.vhd");
        let ovl = |n: &str| Path::new("/vms").join(OVERLAY_DIR).join(n);
        assert!(is_overlay_of(disk, &ovl("a.vhd.123-456.qcow2")));
        assert!(!is_overlay_of(disk, &ovl("a.vhdx.123.qcow2")));
        assert!(!is_overlay_of(disk, &ovl("b.vhd.123.qcow2")));
        assert!(!is_overlay_of(disk, &ovl("a.vhd.123.raw")));
        assert!(!is_overlay_of(
            disk,
            Path::new("/other")
                .join(OVERLAY_DIR)
                .join("a.vhd.1.qcow2")
                .as_path()
        ));
        assert!(!is_overlay_of(disk, Path::new("/vms/a.vhd.1.qcow2")));
    }
}
