//! Throw-away guests for `vsnap bench freeze`: an XFS scratch filesystem
//! with reflink on a loop device, and on it one fixed VHD per guest whose
//! data area (the file less its footer) is attached through `--sizelimit`,
//! formatted ext4 and mounted, with a `vsnap agent` (in this process)
//! freezing it. Everything is undone when the lab is dropped, on success,
//! error or unwinding alike: thaw, unmount, detach, remove.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use vsnap_coordinator::agent::{Agent, AgentConfig, FreezeSet};
use vsnap_coordinator::protocol::transport::Endpoint;
use vsnap_engine::format::vhd::{self, CreateOptions, DiskType};

fn run(cmd: &mut Command) -> Result<String> {
    let o = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !o.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// A loop device with a filesystem mounted from it.
struct Mounted {
    device: String,
    mount: PathBuf,
}

impl Mounted {
    /// Attaches `file` (its first `limit` bytes, if given), formats it
    /// with `mkfs` (the device path appended) and mounts it at `mount`.
    fn new(
        file: &Path,
        limit: Option<u64>,
        direct: bool,
        mkfs: &[&str],
        opts: &str,
        mount: &Path,
    ) -> Result<Mounted> {
        std::fs::create_dir_all(mount)?;
        let mut losetup = Command::new("losetup");
        losetup.args(["-f", "--show"]);
        if direct {
            losetup.arg("--direct-io=on");
        }
        if let Some(n) = limit {
            losetup.args(["--sizelimit", &n.to_string()]);
        }
        let device = run(losetup.arg(file))?;
        let m = Mounted {
            device,
            mount: mount.to_path_buf(),
        };
        run(Command::new(mkfs[0]).args(&mkfs[1..]).arg(&m.device))?;
        run(Command::new("mount")
            .args(["-o", opts])
            .arg(&m.device)
            .arg(mount))?;
        Ok(m)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.mount).output();
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
        let _ = Command::new("losetup").arg("-d").arg(&self.device).output();
    }
}

pub struct Guest {
    pub name: String,
    pub disk: PathBuf,
    pub mount: PathBuf,
    pub socket: PathBuf,
    agent: Option<tokio::task::JoinHandle<()>>,
    fs: Option<Mounted>,
}

/// Fields drop in order: guests (agents stopped, filesystems unmounted),
/// then the scratch filesystem, then the directory.
pub struct Lab {
    pub dir: PathBuf,
    pub guests: Vec<Guest>,
    pub scratch: PathBuf,
    scratch_fs: Option<Mounted>,
}

/// Whether this process runs as root (uid 0), from /proc.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}

impl Lab {
    /// `n` guests of `size` bytes each under a new directory in `parent`,
    /// agents listening with `hold_limit`. Needs root, mkfs.xfs and
    /// mkfs.ext4.
    pub async fn build(
        parent: &Path,
        n: usize,
        size: u64,
        hold_limit: Duration,
        prepare_sync: bool,
    ) -> Result<Lab> {
        let dir = parent.join(format!("vsnap-bench-{}-{}", std::process::id(), n));
        if dir.exists() {
            bail!("{} exists; remove it first", dir.display());
        }
        std::fs::create_dir_all(&dir)?;
        let mut lab = Lab {
            scratch: dir.join("scratch"),
            dir,
            guests: Vec::new(),
            scratch_fs: None,
        };
        // Sparse: only what the guests' filesystems write takes space.
        let img = lab.dir.join("scratch.img");
        let scratch_size = (n as u64).saturating_mul(size).saturating_add(2 << 30);
        std::fs::File::create(&img)?.set_len(scratch_size)?;
        lab.scratch_fs = Some(Mounted::new(
            &img,
            None,
            false,
            &["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
            "defaults",
            &lab.scratch,
        )?);
        for i in 0..n {
            let name = format!("g{i}");
            // A directory per guest, as hosts keep VMs: XFS places each in
            // its own allocation group, so their clones do not contend.
            let disk = lab.scratch.join(&name).join("disk0.vhd");
            std::fs::create_dir_all(lab.scratch.join(&name))?;
            let mut opts = CreateOptions::new(DiskType::Fixed, size);
            opts.block_size = 2 << 20;
            drop(vhd::create(&disk, &opts)?);
            let data = std::fs::metadata(&disk)?.len() - 512;
            let mount = lab.dir.join(&name);
            // Lazy initialisation: mkfs of a 16 GiB guest writes megabytes,
            // not its inode tables and journal. The loop device does direct
            // I/O, as a hypervisor with cache=none does: what the guest's
            // freeze flushes is on the disk, not dirty in the host's page
            // cache for the snapshot to flush.
            let fs = Mounted::new(
                &disk,
                Some(data),
                true,
                &[
                    "mkfs.ext4",
                    "-q",
                    "-F",
                    "-E",
                    "lazy_itable_init=1,lazy_journal_init=1",
                ],
                "noinit_itable",
                &mount,
            )?;
            let socket = lab.dir.join(format!("{name}.sock"));
            let cfg = AgentConfig {
                listen: Endpoint::Unix(socket.clone()),
                freeze: FreezeSet::List(vec![mount.clone()]),
                hooks: None,
                hold_limit,
                hook_timeout: Duration::from_secs(30),
                token_file: None,
                marker: lab.dir.join(format!("{name}.frozen")),
                max_connections: vsnap_coordinator::agent::DEFAULT_MAX_CONNECTIONS,
                hello_timeout: vsnap_coordinator::agent::DEFAULT_HELLO_TIMEOUT,
                prepare_sync,
            };
            let agent = Agent::start(cfg).await?;
            let handle = tokio::spawn(async move {
                if let Err(e) = agent.serve().await {
                    eprintln!("vsnap bench: agent: {e}");
                }
            });
            lab.guests.push(Guest {
                name,
                disk,
                mount,
                socket,
                agent: Some(handle),
                fs: Some(fs),
            });
        }
        Ok(lab)
    }

    /// The inventory of every guest, written beside them.
    pub fn inventory(&self) -> Result<PathBuf> {
        let mut t = String::new();
        for g in &self.guests {
            t += &format!(
                "[[vm]]\nname = \"{}\"\ndisks = [\"{}\"]\nagent = \"unix:{}\"\n\n",
                g.name,
                g.disk.display(),
                g.socket.display()
            );
        }
        let p = self.dir.join("inventory.toml");
        std::fs::write(&p, t)?;
        Ok(p)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(a) = self.agent.take() {
            a.abort();
        }
        // Thawed, unmounted, detached by the filesystem's own drop.
        self.fs.take();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.guests.clear();
        self.scratch_fs.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
