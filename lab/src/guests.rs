//! Throw-away guests: an XFS scratch filesystem with reflink on a loop
//! device, and on it one fixed VHD per guest, in a directory of its own
//! (XFS puts each directory in its own allocation group, so the guests'
//! clones do not contend), whose data area is an ext4 mounted from a loop
//! device. Each guest gets a vsnap agent freezing its mount: in this
//! process ([`Guest::serve_agent`]), or a `vsnap agent` child
//! ([`Guest::spawn_agent`]). Everything is undone when the lab is
//! dropped, on success, error or unwinding alike: agents stopped, then
//! thaw, unmount, detach, remove.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vsnap_agent::{Agent, AgentConfig, FreezeSet};
use vsnap_formats::vhd::{self, CreateOptions, DiskType};
use vsnap_protocol::transport::Endpoint;

use crate::loopfs::LoopFs;
use crate::{io, Error, Result};

/// A `vsnap agent` child process, killed when dropped.
#[derive(Debug)]
pub struct AgentProc {
    pub child: Child,
    /// Where it listens, as it printed it: `listening on ADDRESS`.
    pub address: String,
    pub stderr_path: PathBuf,
}

impl AgentProc {
    /// Starts `cmd` (a `vsnap agent ...` command), its stderr going to
    /// `stderr_path`, and waits until it listens. If it exits first, the
    /// error is what it said.
    pub fn start(mut cmd: Command, stderr_path: &Path) -> Result<AgentProc> {
        let err = std::fs::File::create(stderr_path).map_err(io("create", stderr_path))?;
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .map_err(|e| Error::Command {
                command: format!("{cmd:?}"),
                stderr: e.to_string(),
            })?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = std::io::BufReader::new(out).read_line(&mut line);
        }
        match line.trim().strip_prefix("listening on ") {
            Some(address) => Ok(AgentProc {
                address: address.to_string(),
                child,
                stderr_path: stderr_path.to_path_buf(),
            }),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(Error::Command {
                    command: format!("{cmd:?}"),
                    stderr: std::fs::read_to_string(stderr_path).unwrap_or_default(),
                })
            }
        }
    }

    /// What it has written to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How the lab's in-process agents quiesce: the two things that shrink
/// the application's stall, each on by default in `vsnap agent`, and
/// switched off by a benchmark to measure what it saves.
#[derive(Debug, Clone, Copy)]
pub struct Quiesce {
    /// Prepare flushes each mount (`syncfs`).
    pub prepare_sync: bool,
    /// FIFREEZE runs with expedited RCU grace periods.
    pub expedite_freeze: bool,
}

impl Default for Quiesce {
    fn default() -> Self {
        Quiesce {
            prepare_sync: true,
            expedite_freeze: true,
        }
    }
}

enum AgentRun {
    InProcess(tokio::task::JoinHandle<()>),
    Process(AgentProc),
}

pub struct Guest {
    pub name: String,
    /// The fixed VHD on the scratch filesystem.
    pub disk: PathBuf,
    /// Where the agent listens.
    pub socket: PathBuf,
    /// The agent's freeze marker.
    pub marker: PathBuf,
    /// The agent's hooks directory (empty until a caller adds hooks).
    pub hooks: PathBuf,
    agent: Option<AgentRun>,
    /// Declared last: dropped after the agent, so the filesystem is
    /// thawed and unmounted once nothing uses it.
    pub fs: LoopFs,
}

impl Guest {
    /// The guest's mounted filesystem.
    pub fn mount(&self) -> &Path {
        &self.fs.mount
    }

    /// The agent's configuration for this guest: listen on its socket,
    /// freeze its mount, run its hooks.
    pub fn agent_config(&self, hold_limit: Duration, quiesce: Quiesce) -> AgentConfig {
        AgentConfig {
            listen: Endpoint::Unix(self.socket.clone()),
            freeze: FreezeSet::List(vec![self.fs.mount.clone()]),
            hooks: Some(self.hooks.clone()),
            hold_limit,
            hook_timeout: Duration::from_secs(30),
            token_file: None,
            marker: self.marker.clone(),
            max_connections: vsnap_agent::DEFAULT_MAX_CONNECTIONS,
            hello_timeout: vsnap_agent::DEFAULT_HELLO_TIMEOUT,
            prepare_sync: quiesce.prepare_sync,
            expedite_freeze: quiesce.expedite_freeze,
        }
    }

    /// Runs an agent in this process (on the current tokio runtime),
    /// replacing any agent the guest had.
    pub async fn serve_agent(&mut self, cfg: AgentConfig) -> Result<()> {
        self.agent = None;
        let agent = Agent::start(cfg).await?;
        self.agent = Some(AgentRun::InProcess(tokio::spawn(async move {
            if let Err(e) = agent.serve().await {
                eprintln!("vsnap lab: agent: {e}");
            }
        })));
        Ok(())
    }

    /// Starts `agent` (a `vsnap agent` command) with this guest's
    /// `--listen`, `--freeze`, `--hooks` and `--marker`, then `extra`;
    /// replaces any agent the guest had.
    pub fn spawn_agent(&mut self, mut agent: Command, extra: &[&str]) -> Result<()> {
        self.agent = None;
        agent
            .arg("--listen")
            .arg(format!("unix:{}", self.socket.display()))
            .arg("--freeze")
            .arg(&self.fs.mount)
            .arg("--hooks")
            .arg(&self.hooks)
            .arg("--marker")
            .arg(&self.marker)
            .args(extra);
        let p = AgentProc::start(agent, &self.socket.with_extension("err"))?;
        self.adopt_agent(p);
        Ok(())
    }

    /// Makes `p`, an agent started some other way (on TCP, say), this
    /// guest's: stopped with it. Replaces any agent the guest had.
    pub fn adopt_agent(&mut self, p: AgentProc) {
        self.agent = Some(AgentRun::Process(p));
    }

    /// The guest's `vsnap agent` child, if it has one.
    pub fn agent_proc(&self) -> Option<&AgentProc> {
        match &self.agent {
            Some(AgentRun::Process(p)) => Some(p),
            _ => None,
        }
    }

    /// Stops the guest's agent, if it has one running.
    pub fn stop_agent(&mut self) {
        self.agent = None;
    }

    /// What a `vsnap agent` child has logged.
    pub fn agent_log(&self) -> String {
        self.agent_proc().map(AgentProc::stderr).unwrap_or_default()
    }
}

impl Drop for AgentRun {
    fn drop(&mut self) {
        if let AgentRun::InProcess(h) = self {
            h.abort();
        }
    }
}

/// Fields drop in order: guests (agents stopped, filesystems unmounted),
/// then the scratch filesystem, then the directory.
pub struct Lab {
    pub guests: Vec<Guest>,
    /// Always `Some` until the drop, which unmounts it before the
    /// directory is removed.
    scratch: Option<LoopFs>,
    pub dir: PathBuf,
}

impl Lab {
    /// `n` guests of `size` bytes each under `dir` (new, or empty), no
    /// agents yet. Needs root, mkfs.xfs and mkfs.ext4.
    pub fn build(dir: &Path, n: usize, size: u64) -> Result<Lab> {
        if dir.exists()
            && std::fs::read_dir(dir)
                .map_err(io("read", dir))?
                .next()
                .is_some()
        {
            return Err(Error::Refused {
                what: dir.display().to_string(),
                reason: "not empty; the lab builds in a new or empty directory".into(),
            });
        }
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        // Sparse: only what the guests' filesystems and the snapshots
        // write takes space.
        let scratch_mib = (n as u64).saturating_mul(size >> 20).saturating_add(2048);
        let scratch =
            LoopFs::xfs_reflink(&dir.join("scratch.img"), &dir.join("scratch"), scratch_mib)
                .inspect_err(|_| {
                    let _ = std::fs::remove_dir_all(dir);
                })?;
        let mut lab = Lab {
            guests: Vec::new(),
            scratch: Some(scratch),
            dir: dir.to_path_buf(),
        };
        for i in 0..n {
            let name = format!("g{i}");
            let home = lab.scratch().join(&name);
            std::fs::create_dir_all(&home).map_err(io("create", &home))?;
            let disk = home.join("disk0.vhd");
            let mut opts = CreateOptions::new(DiskType::Fixed, size);
            opts.block_size = 2 << 20;
            drop(vhd::create(&disk, &opts)?);
            let fs = LoopFs::in_fixed_vhd(&disk, &lab.dir.join(&name))?;
            let hooks = lab.dir.join(format!("{name}.hooks"));
            std::fs::create_dir_all(&hooks).map_err(io("create", &hooks))?;
            lab.guests.push(Guest {
                socket: lab.dir.join(format!("{name}.sock")),
                marker: lab.dir.join(format!("{name}.frozen")),
                hooks,
                name,
                disk,
                agent: None,
                fs,
            });
        }
        Ok(lab)
    }

    /// Where the scratch filesystem is mounted.
    pub fn scratch(&self) -> &Path {
        self.scratch
            .as_ref()
            .map_or(&self.dir, |s| s.mount.as_path())
    }

    /// An in-process agent for every guest, with `hold_limit`.
    pub async fn serve_agents(&mut self, hold_limit: Duration, quiesce: Quiesce) -> Result<()> {
        for g in &mut self.guests {
            let cfg = g.agent_config(hold_limit, quiesce);
            g.serve_agent(cfg).await?;
        }
        Ok(())
    }

    /// The inventory of every guest, written beside them; `extra` adds
    /// lines to each `[[vm]]`.
    pub fn inventory(&self, extra: impl Fn(&Guest) -> String) -> Result<PathBuf> {
        let mut t = String::new();
        for g in &self.guests {
            t += &format!(
                "[[vm]]\nname = \"{}\"\ndisks = [\"{}\"]\nagent = \"unix:{}\"\n{}\n",
                g.name,
                g.disk.display(),
                g.socket.display(),
                extra(g)
            );
        }
        let p = self.dir.join("inventory.toml");
        std::fs::write(&p, t).map_err(io("write", &p))?;
        Ok(p)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.guests.clear();
        self.scratch.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
