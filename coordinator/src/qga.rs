//! The stock QEMU guest agent, over its unix socket: `guest-sync-delimited`
//! to resynchronise (after a 0xFF byte that makes qga drop any partial
//! input), then the fsfreeze commands: `guest-fsfreeze-freeze-list` with
//! the VM's mounts, or `guest-fsfreeze-freeze` (every filesystem of the
//! guest) when the inventory names none. qga has no watchdog: a thaw that
//! never comes leaves the guest frozen, which is why vsnap agents are
//! preferred.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::{Error, ErrorKind, Result};
use crate::jsonlines::{answer, request, timed_out, Channel};
use vsnap_protocol::ErrorClass;

pub struct QgaClient {
    channel: Channel,
    sync_id: u64,
}

/// A failed connect, said in qemu-ga's terms and named `qga:PATH`. A full
/// backlog (EAGAIN) means another client holds the socket.
fn connect_failure(e: Error, at: &str) -> Error {
    let busy = matches!(&e.kind, ErrorKind::Io(io) if io.raw_os_error() == Some(libc::EAGAIN));
    let kind = if busy {
        ErrorKind::Agent {
            class: ErrorClass::NonRetryable,
            message: "qemu-ga's socket is busy: it takes one client at a time, and another (libvirt, or another backup) holds it".into(),
            mount: None,
        }
    } else {
        e.kind
    };
    Error {
        kind,
        at: Some(at.to_string()),
        during: e.during,
    }
}

/// qga's error classes, in the coordinator's terms.
fn class_of(qga_class: &str) -> ErrorClass {
    match qga_class {
        "CommandNotFound" | "CommandDisabled" => ErrorClass::NonRetryable,
        _ => ErrorClass::Retryable,
    }
}

/// How long qemu-ga has to answer the first `guest-sync-delimited`. It
/// answers in milliseconds; one that does not is serving another client
/// (it takes one at a time) or is not qemu-ga, and either way waiting
/// longer would not help.
pub const SYNC_LIMIT: Duration = Duration::from_millis(1500);

impl QgaClient {
    /// Connects and resynchronises, failing within [`SYNC_LIMIT`] with
    /// what is wrong: the socket busy with another client, a QMP monitor
    /// where qemu-ga was expected, or no qemu-ga at all. Errors name the
    /// agent as the inventory does, `qga:PATH`.
    pub async fn connect(path: &Path) -> Result<QgaClient> {
        Self::open(path, SYNC_LIMIT).await.map_err(|e| match e.kind {
            ErrorKind::Timeout { .. } => Error::from(ErrorKind::Agent {
                class: ErrorClass::NonRetryable,
                message: format!(
                    "qemu-ga did not answer guest-sync-delimited within {} ms: it takes one client at a time, and another (libvirt, or another backup) may hold this socket",
                    SYNC_LIMIT.as_millis()
                ),
                mount: None,
            })
            .at(format!("qga:{}", path.display())),
            _ => e,
        })
    }

    /// Connects and resynchronises, waiting up to 30 s for an answer: for
    /// a guard, whose turn comes when qemu-ga's current client leaves.
    pub async fn connect_patiently(path: &Path) -> Result<QgaClient> {
        Self::open(path, Duration::from_secs(30)).await
    }

    /// Connects (a failure named `qga:PATH`, a busy socket said so) and
    /// resynchronises within `sync_limit`.
    async fn open(path: &Path, sync_limit: Duration) -> Result<QgaClient> {
        let channel = Channel::connect(path, format!("qga:{}", path.display()), "qga reply")
            .await
            .map_err(|(e, at)| connect_failure(e, &at))?;
        let mut c = QgaClient {
            channel,
            sync_id: u64::from(std::process::id()) << 20,
        };
        c.sync_within(sync_limit).await?;
        Ok(c)
    }

    fn at(&self) -> String {
        self.channel.at().to_owned()
    }

    /// `guest-sync-delimited`, within the usual 5 s.
    pub async fn sync(&mut self) -> Result<()> {
        self.sync_within(Duration::from_secs(5)).await
    }

    /// `guest-sync-delimited`: qga answers with a 0xFF byte, then the id
    /// echoed; every line before that answer is stale and dropped. A QMP
    /// monitor greets with `{"QMP": ...}` instead, and is named as such.
    async fn sync_within(&mut self, limit: Duration) -> Result<()> {
        self.sync_id += 1;
        let id = self.sync_id;
        let at = self.at();
        let work = async {
            let sync = request("guest-sync-delimited", Some(json!({ "id": id })), None);
            self.channel.send(&[0xFF], &sync).await?;
            loop {
                let v = match self.channel.read().await {
                    Ok(v) => v,
                    // Half a stale line, or qga's complaint about our 0xFF.
                    Err(e) if matches!(e.kind, ErrorKind::Protocol(_)) => continue,
                    Err(e) => return Err(e),
                };
                if v.get("QMP").is_some() {
                    return Err(Error::from(ErrorKind::Agent {
                        class: ErrorClass::NonRetryable,
                        message: "this socket is a QMP monitor, not qemu-ga: give the VM's guest-agent channel (the chardev of its org.qemu.guest_agent.0 port); a QMP socket is for the qmp provider".into(),
                        mount: None,
                    }));
                }
                if v.get("return").and_then(Value::as_u64) == Some(id) {
                    return Ok(());
                }
            }
        };
        tokio::time::timeout(limit, work)
            .await
            .map_err(|_| timed_out("guest-sync-delimited", limit))?
            .map_err(|e| e.at(at).during("guest-sync-delimited"))
    }

    /// One command and its `return`, or its `error` as an agent error.
    pub async fn execute(
        &mut self,
        cmd: &str,
        args: Option<Value>,
        limit: Duration,
    ) -> Result<Value> {
        let at = self.at();
        let req = request(cmd, args, None);
        let work = async {
            self.channel.send(&[], &req).await?;
            answer(&self.channel.read().await?, class_of)
        };
        match tokio::time::timeout(limit, work).await {
            Ok(r) => r.map_err(|e| e.at(at).during(cmd.to_string())),
            Err(_) => {
                let e = timed_out(cmd, limit).at(at);
                // The late answer must not be read as the next one's.
                let _ = self.sync().await;
                Err(e)
            }
        }
    }

    /// `thawed` or `frozen`.
    pub async fn status(&mut self) -> Result<String> {
        let v = self
            .execute("guest-fsfreeze-status", None, Duration::from_secs(5))
            .await?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// Freezes `mounts` (freeze-list), or every filesystem the guest has
    /// when `None`. Returns the count qga froze.
    pub async fn freeze(&mut self, mounts: Option<&[String]>, limit: Duration) -> Result<u64> {
        let v = match mounts {
            Some(m) => {
                self.execute(
                    "guest-fsfreeze-freeze-list",
                    Some(json!({"mountpoints": m})),
                    limit,
                )
                .await?
            }
            None => self.execute("guest-fsfreeze-freeze", None, limit).await?,
        };
        Ok(v.as_u64().unwrap_or(0))
    }

    pub async fn thaw(&mut self) -> Result<u64> {
        let v = self
            .execute("guest-fsfreeze-thaw", None, Duration::from_secs(30))
            .await?;
        Ok(v.as_u64().unwrap_or(0))
    }
}
