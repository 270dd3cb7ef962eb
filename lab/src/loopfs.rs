//! A filesystem on a loop device, mounted: a guest's disk that the lab
//! may freeze, because the lab made it. Dropping it thaws, unmounts and
//! detaches the loop device, even after a failure or a panic.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{io, run, Result};

/// How a file is attached and what is made on it.
#[derive(Debug, Clone, Default)]
pub struct Attach<'a> {
    /// Only the file's first bytes (a fixed VHD's data area, without its
    /// footer).
    pub sizelimit: Option<u64>,
    /// Direct I/O on the loop device, as a hypervisor with `cache=none`
    /// does: what the guest's freeze flushes is on the disk, not dirty in
    /// the host's page cache.
    pub direct: bool,
    /// The mkfs command and its flags, run on the device; `None` mounts
    /// the filesystem the file holds.
    pub mkfs: Option<&'a [&'a str]>,
    /// Mount options; `defaults` when `None`.
    pub options: Option<&'a str>,
}

#[derive(Debug)]
pub struct LoopFs {
    pub image: PathBuf,
    pub mount: PathBuf,
    pub device: String,
}

impl LoopFs {
    /// Attaches `image` as `how` says, makes its filesystem if asked, and
    /// mounts it at `mount` (made if missing).
    pub fn attach(image: &Path, mount: &Path, how: &Attach<'_>) -> Result<LoopFs> {
        std::fs::create_dir_all(mount).map_err(io("create", mount))?;
        let mut losetup = Command::new(crate::sbin("losetup"));
        losetup.args(["-f", "--show"]);
        if how.direct {
            losetup.arg("--direct-io=on");
        }
        if let Some(n) = how.sizelimit {
            losetup.args(["--sizelimit", &n.to_string()]);
        }
        let device = run(losetup.arg(image))?;
        // From here on, the drop undoes whatever was done.
        let fs = LoopFs {
            image: image.to_path_buf(),
            mount: mount.to_path_buf(),
            device,
        };
        if let Some(mkfs) = how.mkfs {
            if let Some((tool, flags)) = mkfs.split_first() {
                run(Command::new(crate::sbin(tool)).args(flags).arg(&fs.device))?;
            }
        }
        run(Command::new("mount")
            .args(["-o", how.options.unwrap_or("defaults")])
            .arg(&fs.device)
            .arg(mount))?;
        Ok(fs)
    }

    /// A new sparse file of `size_mib` MiB at `image`, formatted by `mkfs`
    /// (the command and its flags), attached and mounted.
    pub fn made_with(image: &Path, mount: &Path, size_mib: u64, mkfs: &[&str]) -> Result<LoopFs> {
        std::fs::File::create(image)
            .and_then(|f| f.set_len(size_mib << 20))
            .map_err(io("create", image))?;
        LoopFs::attach(
            image,
            mount,
            &Attach {
                mkfs: Some(mkfs),
                ..Attach::default()
            },
        )
    }

    /// An ext4 of `size_mib` MiB in a new file.
    pub fn ext4(image: &Path, mount: &Path, size_mib: u64) -> Result<LoopFs> {
        LoopFs::made_with(image, mount, size_mib, &["mkfs.ext4", "-q", "-F"])
    }

    /// An XFS with reflink of `size_mib` MiB in a new sparse file: where
    /// the lab's guest disks live, so snapshots can clone them.
    pub fn xfs_reflink(image: &Path, mount: &Path, size_mib: u64) -> Result<LoopFs> {
        LoopFs::made_with(
            image,
            mount,
            size_mib,
            &["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
        )
    }

    /// A guest disk: the data area of the fixed VHD `vhd` (the file less
    /// its 512-byte footer), formatted ext4 and mounted. Lazy
    /// initialisation: mkfs of a large guest writes megabytes, not its
    /// inode tables and journal.
    pub fn in_fixed_vhd(vhd: &Path, mount: &Path) -> Result<LoopFs> {
        let len = std::fs::metadata(vhd).map_err(io("stat", vhd))?.len();
        LoopFs::attach(
            vhd,
            mount,
            &Attach {
                sizelimit: Some(len.saturating_sub(512)),
                direct: true,
                mkfs: Some(&[
                    "mkfs.ext4",
                    "-q",
                    "-F",
                    "-E",
                    "lazy_itable_init=1,lazy_journal_init=1",
                ]),
                options: Some("noinit_itable"),
            },
        )
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        // Only ever this lab's own mount: thaw it in case a test or an
        // agent left it frozen, or the unmount would hang.
        let _ = Command::new(crate::sbin("fsfreeze"))
            .arg("-u")
            .arg(&self.mount)
            .output();
        for _ in 0..50 {
            if Command::new("umount")
                .arg(&self.mount)
                .output()
                .is_ok_and(|o| o.status.success())
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new(crate::sbin("losetup"))
            .arg("-d")
            .arg(&self.device)
            .output();
    }
}
