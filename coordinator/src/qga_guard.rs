//! A guard for a qemu-ga guest's freeze. qemu-ga has no watchdog: a
//! coordinator that dies between `guest-fsfreeze-freeze` and the thaw
//! leaves the guest frozen until somebody thaws it. So before it freezes
//! a qemu-ga guest, the coordinator arms a guard: a small process of its
//! own (the `vsnap` binary, run as `vsnap __qga-guard`), detached into its
//! own process group so a terminal's Ctrl-C does not reach it, holding the
//! read end of a pipe from the coordinator.
//!
//! - The coordinator thaws, and writes `disarm`: the guard exits.
//! - The coordinator dies: the kernel closes the pipe, the guard reads its
//!   end, and thaws the guest through qemu-ga. qemu-ga serves one client at
//!   a time; the dead coordinator's connection is closed by then, so the
//!   guard is served at once.
//! - Neither by the window's end plus a grace second: the guard thaws
//!   (its connection waits in qemu-ga's queue until the coordinator's
//!   closes).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use tokio::io::AsyncBufReadExt;

use crate::error::{Error, ErrorKind, Result};
use crate::qga::QgaClient;

/// The hidden subcommand of the `vsnap` binary that runs [`serve`].
pub const SUBCOMMAND: &str = "__qga-guard";

/// What the guard waits beyond the window before it thaws by itself.
pub const GRACE: Duration = Duration::from_secs(1);

/// An armed guard: dropping it without [`Guard::disarm`] closes the pipe,
/// which the guard takes as the coordinator's death, and thaws.
#[derive(Debug)]
pub struct Guard {
    child: Child,
    pipe: Option<ChildStdin>,
}

impl Guard {
    /// Starts `program __qga-guard SOCKET WINDOW_MS` (`program` is the
    /// `vsnap` binary) for the qemu-ga at `socket`.
    pub fn arm(program: &Path, socket: &Path, window: Duration) -> Result<Guard> {
        use std::os::unix::process::CommandExt;
        let mut child = Command::new(program)
            .arg(SUBCOMMAND)
            .arg(socket)
            .arg(window.as_millis().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| {
                Error::from(e)
                    .at(program.display().to_string())
                    .during("start the qemu-ga guard")
            })?;
        let pipe = child.stdin.take();
        Ok(Guard { child, pipe })
    }

    /// The guest is thawed: the guard exits without touching it.
    pub fn disarm(mut self) {
        if let Some(mut p) = self.pipe.take() {
            let _ = p.write_all(b"disarm\n");
        }
        // It exits at once; reap it so no zombie stays behind.
        let _ = self.child.wait();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Closing the pipe arms the guard's thaw; it runs on by itself.
        self.pipe.take();
        let _ = self.child.try_wait();
    }
}

/// The guard itself: reads its standard input until `disarm` (exit), its
/// end (the coordinator died: thaw now), or `window` plus [`GRACE`] (thaw).
pub async fn serve(socket: PathBuf, window: Duration) -> Result<()> {
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let why = tokio::select! {
        line = lines.next_line() => match line {
            Ok(Some(l)) if l.trim() == "disarm" => return Ok(()),
            _ => "the coordinator is gone",
        },
        () = tokio::time::sleep(window + GRACE) => "the window passed without a thaw",
    };
    let at = format!("qga:{}", socket.display());
    // Waits, if need be, for qemu-ga to finish with the coordinator.
    let thawed = async {
        let mut q = QgaClient::connect_patiently(&socket).await?;
        q.thaw().await
    };
    match tokio::time::timeout(Duration::from_secs(60), thawed).await {
        Ok(Ok(n)) => {
            eprintln!("vsnap qga guard: {why}: thawed {n} filesystem(s) through {at}");
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::from(ErrorKind::Timeout {
            op: "guest-fsfreeze-thaw".into(),
            ms: 60_000,
        })
        .at(at)),
    }
}
