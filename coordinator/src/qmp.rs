//! QEMU's monitor (QMP), for the snapshot a hypervisor takes itself: an
//! external overlay per disk while the guest is frozen, so the base image
//! stops changing and can be streamed, then the overlay merged back with
//! an active `block-commit` (the AVHDX-checkpoint flow of Hyper-V).
//!
//! One client at a time, like every QEMU chardev; commands carry an id,
//! and events (`BLOCK_JOB_READY`, `BLOCK_JOB_COMPLETED`, …) arrive between
//! replies, so they are kept for whoever waits for them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::{Error, ErrorKind, Result};
use crate::jsonlines::{answer, request, timed_out, Channel};
use vsnap_protocol::ErrorClass;

/// How long QEMU has to greet a new client.
pub const GREETING_LIMIT: Duration = Duration::from_secs(2);

pub struct QmpClient {
    channel: Channel,
    next_id: u64,
    events: Vec<Value>,
}

/// One of the VM's block devices, as `query-block` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    /// The drive's id (`device`), or its qdev path when it has none.
    pub device: String,
    /// The node the guest writes to.
    pub node: String,
    /// The file of that node: the image, or an overlay on it.
    pub file: PathBuf,
    /// What that file's backing file is, when it has one.
    pub backing: Option<PathBuf>,
}

impl QmpClient {
    /// Connects, reads QEMU's greeting (a qemu-ga socket is named as
    /// such), and negotiates capabilities.
    pub async fn connect(path: &Path) -> Result<QmpClient> {
        let at = format!("qmp:{}", path.display());
        let channel = Channel::connect(path, at.clone(), "QMP message")
            .await
            .map_err(|(e, at)| Error { at: Some(at), ..e })?;
        let mut c = QmpClient {
            channel,
            next_id: 1,
            events: Vec::new(),
        };
        let greeting = tokio::time::timeout(GREETING_LIMIT, c.channel.read())
            .await
            .map_err(|_| {
                Error::from(ErrorKind::Agent {
                    class: ErrorClass::NonRetryable,
                    message: format!(
                        "no QMP greeting within {} ms: not a QMP monitor (qemu-ga waits to be spoken to), or another client holds it",
                        GREETING_LIMIT.as_millis()
                    ),
                    mount: None,
                })
                .at(at.clone())
            })??;
        if greeting.get("QMP").is_none() {
            return Err(Error::from(ErrorKind::Protocol(format!(
                "expected QEMU's greeting, got {greeting}"
            )))
            .at(at));
        }
        c.execute("qmp_capabilities", None, Duration::from_secs(5))
            .await?;
        Ok(c)
    }

    fn at(&self) -> String {
        self.channel.at().to_owned()
    }

    /// Runs `cmd` and returns its `return`; an `error` is the command's
    /// failure, with QEMU's description. Events that arrive meanwhile are
    /// kept for [`QmpClient::wait_event`].
    pub async fn execute(
        &mut self,
        cmd: &str,
        args: Option<Value>,
        limit: Duration,
    ) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let req = request(cmd, args, Some(id));
        let at = self.at();
        let work = async {
            self.channel.send(&[], &req).await?;
            loop {
                let v = self.channel.read().await?;
                if v.get("event").is_some() {
                    self.events.push(v);
                    continue;
                }
                if v.get("id").and_then(Value::as_u64) == Some(id) {
                    return answer(&v, |_| ErrorClass::NonRetryable);
                }
            }
        };
        match tokio::time::timeout(limit, work).await {
            Ok(r) => r.map_err(|e| e.at(at).during(cmd.to_string())),
            Err(_) => Err(timed_out(cmd, limit).at(at)),
        }
    }

    /// Waits for the event `name` whose `data.device` is `job`.
    pub async fn wait_event(&mut self, name: &str, job: &str, limit: Duration) -> Result<Value> {
        let matches = |v: &Value| v["event"] == name && v["data"]["device"] == job;
        if let Some(i) = self.events.iter().position(matches) {
            return Ok(self.events.remove(i));
        }
        let at = self.at();
        let work = async {
            loop {
                let v = self.channel.read().await?;
                if matches(&v) {
                    return Ok::<Value, Error>(v);
                }
                if v.get("event").is_some() {
                    self.events.push(v);
                }
            }
        };
        tokio::time::timeout(limit, work)
            .await
            .map_err(|_| timed_out(format!("{name} of {job}"), limit).at(at.clone()))?
            .map_err(|e| e.at(at))
    }

    /// The VM's block devices with media.
    pub async fn block_devices(&mut self) -> Result<Vec<BlockDevice>> {
        let v = self
            .execute("query-block", None, Duration::from_secs(5))
            .await?;
        let list = v.as_array().cloned().unwrap_or_default();
        Ok(list
            .iter()
            .filter_map(|b| {
                let inserted = b.get("inserted")?;
                let device = b["device"]
                    .as_str()
                    .filter(|d| !d.is_empty())
                    .or_else(|| b["qdev"].as_str())?
                    .to_string();
                Some(BlockDevice {
                    device,
                    node: inserted["node-name"].as_str()?.to_string(),
                    file: PathBuf::from(inserted["file"].as_str()?),
                    backing: inserted["backing_file"].as_str().map(PathBuf::from),
                })
            })
            .collect())
    }

    /// The device whose image (or whose overlay's backing file) is `disk`.
    pub async fn device_of(&mut self, disk: &Path) -> Result<BlockDevice> {
        let want = std::fs::canonicalize(disk).unwrap_or_else(|_| disk.to_path_buf());
        let same = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()) == want;
        let devices = self.block_devices().await?;
        devices
            .iter()
            .find(|d| same(&d.file) || d.backing.as_deref().is_some_and(same))
            .cloned()
            .ok_or_else(|| {
                Error::from(ErrorKind::Config(format!(
                    "the VM has no disk {} (its disks: {})",
                    disk.display(),
                    devices
                        .iter()
                        .map(|d| d.file.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
                .at(self.at())
            })
    }

    /// Redirects the guest's writes on every disk listed to a new qcow2
    /// overlay (the file, and the node name QEMU gives it) over each one's
    /// current image, in one `transaction`: all at the same instant, or
    /// none. Each base then only changes again when its overlay is
    /// committed back.
    pub async fn overlay(&mut self, disks: &[(&BlockDevice, &Path, &str)]) -> Result<()> {
        let actions: Vec<Value> = disks
            .iter()
            .map(|(dev, file, node)| {
                json!({
                    "type": "blockdev-snapshot-sync",
                    "data": {
                        "node-name": dev.node,
                        "snapshot-file": file,
                        "snapshot-node-name": node,
                        "format": "qcow2",
                    }
                })
            })
            .collect();
        self.execute(
            "transaction",
            Some(json!({ "actions": actions })),
            Duration::from_secs(30),
        )
        .await
        .map(drop)
    }

    /// Starts merging `dev`'s active overlay back into its base (an
    /// active commit) as block job `job`. QEMU runs the job whatever
    /// becomes of this client; [`QmpClient::finish_commit`] ends it.
    pub async fn start_commit(&mut self, dev: &BlockDevice, job: &str) -> Result<()> {
        self.execute(
            "block-commit",
            Some(json!({"job-id": job, "device": dev.node})),
            Duration::from_secs(30),
        )
        .await
        .map(drop)
    }

    /// Waits until commit job `job` has copied everything (it is then
    /// ready, mirroring each new write to both layers), pivots the drive
    /// back onto the base, and waits until QEMU says the job is done. Only
    /// then may the overlay file go.
    pub async fn finish_commit(&mut self, job: &str, ready: bool, limit: Duration) -> Result<()> {
        if !ready {
            self.wait_event("BLOCK_JOB_READY", job, limit).await?;
        }
        self.execute(
            "block-job-complete",
            Some(json!({"device": job})),
            Duration::from_secs(30),
        )
        .await?;
        let done = self.wait_event("BLOCK_JOB_COMPLETED", job, limit).await?;
        if let Some(e) = done["data"]["error"].as_str() {
            return Err(Error::from(ErrorKind::Agent {
                class: ErrorClass::NonRetryable,
                message: format!("block-commit job {job} failed: {e}"),
                mount: None,
            })
            .at(self.at()));
        }
        Ok(())
    }

    /// The block jobs QEMU is running, with whether each is ready.
    pub async fn block_jobs(&mut self) -> Result<Vec<BlockJob>> {
        let v = self
            .execute("query-block-jobs", None, Duration::from_secs(5))
            .await?;
        Ok(v.as_array()
            .map(|jobs| {
                jobs.iter()
                    .filter_map(|j| {
                        Some(BlockJob {
                            id: j["device"].as_str()?.to_string(),
                            kind: j["type"].as_str().unwrap_or("").to_string(),
                            status: j["status"].as_str().unwrap_or("").to_string(),
                            ready: j["ready"].as_bool().unwrap_or(false),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// A block job, as `query-block-jobs` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockJob {
    pub id: String,
    /// `commit`, `mirror`, `stream`, …
    pub kind: String,
    /// `running`, `ready`, `paused`, …
    pub status: String,
    pub ready: bool,
}
