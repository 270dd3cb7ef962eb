//! vsnap's lab: everything that builds throw-away guests and runs
//! applications in them, in one place for `vsnap bench`, `vsnap demo` and
//! the tests.
//!
//! - [`loopfs`]: a filesystem on a loop device, always thawed, unmounted
//!   and detached when dropped (on failure and unwinding too).
//! - [`guests`]: an XFS scratch filesystem with reflink, and on it one
//!   fixed VHD per guest whose data area is a mounted ext4, each with a
//!   vsnap agent (in this process, or a `vsnap agent` child).
//! - [`workload`]: writers inside the guests that record every write's
//!   latency, so a freeze shows as a stall.
//! - [`freeze_bench`]: the freeze benchmark (`vsnap bench freeze`), rounds
//!   of coordinated backups of those guests, summarised.
//! - [`demo`]: guests for machines without root: an ext4 made by
//!   `mkfs.ext4 -d` in a dynamic VHD, and an application paused by a hook.
//!
//! Only filesystems the lab made are ever frozen.

pub mod demo;
pub mod engine_bench;
pub mod freeze_bench;
pub mod guests;
pub mod loopfs;
pub mod plot;
pub mod rng;
pub mod workload;

use std::path::PathBuf;
use std::process::Command;

pub use guests::{AgentProc, Guest, Lab};
pub use loopfs::LoopFs;
pub use rng::Rng;
pub use workload::{Background, Kind, Sample};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong building or running the lab.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tool the lab runs (losetup, mkfs, mount) failed; what it said.
    #[error("{command} failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{op} {}", .path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        cause: std::io::Error,
    },
    /// A background writer died (it panicked, or its own error is the
    /// source).
    #[error("{0} stopped unexpectedly")]
    Stopped(&'static str),
    #[error("{what}: {reason}")]
    Refused { what: String, reason: String },
    #[error(transparent)]
    Agent(#[from] vsnap_agent::Error),
    /// A disk image, the engine or the repository failed; the layers
    /// below the repository are lifted into its error, context and all.
    #[error(transparent)]
    Repo(#[from] vsnap_repo::Error),
    #[error(transparent)]
    Coordinator(#[from] Box<vsnap_coordinator::Error>),
}

impl From<vsnap_formats::Error> for Error {
    fn from(e: vsnap_formats::Error) -> Self {
        Error::Repo(e.into())
    }
}

impl From<vsnap_engine::Error> for Error {
    fn from(e: vsnap_engine::Error) -> Self {
        Error::Repo(e.into())
    }
}

/// An I/O error on `path`, while doing `op`.
pub(crate) fn io(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |cause| Error::Io { op, path, cause }
}

/// Runs a command to completion; its stdout, trimmed, or its stderr as
/// the error.
pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let command = format!("{cmd:?}");
    let o = cmd.output().map_err(|e| Error::Command {
        command: command.clone(),
        stderr: e.to_string(),
    })?;
    if !o.status.success() {
        return Err(Error::Command {
            command,
            stderr: String::from_utf8_lossy(&o.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// Whether this process runs as root (uid 0), from /proc: the lab's
/// loop devices, mounts and freezes need it.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}

/// `name` from PATH, or from the sbin directories a user's PATH often
/// lacks (mkfs.ext4, losetup).
pub fn sbin(name: &str) -> PathBuf {
    let from_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    from_path
        .into_iter()
        .chain(
            ["/usr/sbin", "/sbin"]
                .iter()
                .map(|d| std::path::Path::new(d).join(name)),
        )
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrapped_cause_appears_once_in_the_chain() {
        let e = io("create", "/var/tmp/scratch.img")(std::io::Error::other("no space left"));
        assert_eq!(
            vsnap_error::chain(&e),
            "create /var/tmp/scratch.img: no space left"
        );
        let repo =
            vsnap_repo::Error::from(std::io::Error::other("disk gone")).during("write chunk");
        let lifted = Error::from(repo);
        let text = vsnap_error::chain(&lifted);
        assert_eq!(text.matches("disk gone").count(), 1, "{text}");
    }
}
