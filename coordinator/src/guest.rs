//! One guest, whichever agent speaks for it (a vsnap agent or qemu-ga),
//! with the reference's retry rule applied to every call: retryable and
//! timeout failures are tried again, at most 3 tries in all, with
//! back-off, reconnecting when the connection itself broke.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use crate::client::AgentClient;
use crate::error::{Error, ErrorKind, Result};
use crate::inventory::{AgentSpec, Vm};
use crate::protocol::{Abort, Complete, ErrorClass, Freeze, Op, Prepare};
use crate::qga::QgaClient;

enum Link {
    Vsnap(AgentClient),
    Qga(QgaClient),
}

/// What went wrong with a guest, and at which step.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub step: String,
    pub class: ErrorClass,
    pub message: String,
}

/// The reference's per-guest metrics. Times in µs; `*_at_us` are on the
/// coordinator's monotonic clock, from the session's start.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Metrics {
    pub agent: String,
    /// What identify reported: the agent's writers.
    pub writers: Option<Value>,
    pub frozen: Option<u64>,
    pub expected: Option<u64>,
    /// On the agent's clock: last FIFREEZE returned to first FITHAW.
    pub freeze_window_us: Option<u64>,
    /// On the agent's clock: what the application waited, from the start
    /// of quiescing (freeze hooks, then FIFREEZE) until FITHAW returned.
    pub stall_us: Option<u64>,
    /// From the freeze acknowledgement to the thaw acknowledgement.
    pub host_window_us: Option<u64>,
    pub freeze_sent_at_us: Option<u64>,
    pub freeze_ack_at_us: Option<u64>,
    /// When the coordinator sent this guest's thaw: its snapshots were
    /// all taken then.
    pub thaw_sent_at_us: Option<u64>,
    pub thaw_ack_at_us: Option<u64>,
    pub prepare_hooks_us: Option<u64>,
    /// Prepare's flush of the mounts to freeze.
    pub prepare_sync_us: Option<u64>,
    pub freeze_hooks_us: Option<u64>,
    pub fifreeze_us: Option<u64>,
    pub fithaw_us: Option<u64>,
    pub thaw_hooks_us: Option<u64>,
    pub retries: u32,
    pub failure: Option<Failure>,
}

pub struct Guest {
    pub vm: Vm,
    link: Option<Link>,
    token: Option<String>,
    /// What the last prepare asked for: a freeze retried after a failed
    /// one prepares again for the same.
    backup_type: String,
    pub metrics: Metrics,
    epoch: Instant,
}

/// What the coordinator asks of a guest.
#[derive(Debug, Clone)]
pub enum Call {
    /// The writers: mounts to freeze and hooks, as the agent reports them.
    Identify,
    Prepare(String),
    Freeze {
        hold_limit_ms: u64,
    },
    Thaw,
    Abort(String),
    Complete(bool),
}

impl Call {
    pub fn step(&self) -> &'static str {
        match self {
            Call::Identify => "identify",
            Call::Prepare(_) => "prepare",
            Call::Freeze { .. } => "freeze",
            Call::Thaw => "thaw",
            Call::Abort(_) => "abort",
            Call::Complete(_) => "complete",
        }
    }
}

pub const TRIES: u32 = 3;

fn get_u64(v: &Value, k: &str) -> Option<u64> {
    v.get(k).and_then(Value::as_u64)
}

impl Guest {
    pub fn new(vm: Vm, epoch: Instant) -> Result<Guest> {
        let (agent, token) = match &vm.agent {
            AgentSpec::None => ("none".to_string(), None),
            AgentSpec::Qga(p) => (format!("qga:{}", p.display()), None),
            AgentSpec::Vsnap {
                endpoint,
                token_file,
            } => {
                let token = token_file
                    .as_deref()
                    .map(crate::agent::read_token)
                    .transpose()?
                    .map(|t| String::from_utf8_lossy(&t).into_owned());
                (endpoint.to_string(), token)
            }
        };
        Ok(Guest {
            vm,
            link: None,
            token,
            backup_type: "full".into(),
            metrics: Metrics {
                agent,
                ..Metrics::default()
            },
            epoch,
        })
    }

    pub fn connected(&self) -> bool {
        self.link.is_some()
    }

    /// Whether this guest takes part in the quiesce at all.
    pub fn has_agent(&self) -> bool {
        !matches!(self.vm.agent, AgentSpec::None)
    }

    pub fn now_us(&self) -> u64 {
        crate::micros(self.epoch.elapsed())
    }

    async fn connect_once(&mut self) -> Result<()> {
        self.link = match &self.vm.agent {
            AgentSpec::None => None,
            AgentSpec::Qga(p) => Some(Link::Qga(QgaClient::connect(p).await?)),
            AgentSpec::Vsnap { endpoint, .. } => {
                let (c, hello) = AgentClient::connect(endpoint, self.token.clone()).await?;
                let state = hello.get("state").and_then(Value::as_str).unwrap_or("");
                if state == "FROZEN" {
                    return Err(Error::from(ErrorKind::Agent {
                        class: ErrorClass::Retryable,
                        message: "the guest is frozen by another backup; its watchdog will thaw it"
                            .into(),
                        mount: None,
                    })
                    .at(endpoint.to_string()));
                }
                Some(Link::Vsnap(c))
            }
        };
        Ok(())
    }

    /// Connects, with retries.
    pub async fn connect(&mut self) -> Result<()> {
        let mut tries = 0;
        loop {
            tries += 1;
            match self.connect_once().await {
                Ok(()) => return Ok(()),
                Err(e) if tries < TRIES && e.class().is_retryable() => {
                    self.metrics.retries += 1;
                    tokio::time::sleep(backoff(tries)).await;
                }
                Err(e) => return Err(self.fail("connect", e)),
            }
        }
    }

    /// Records the first failure: what went wrong later (an abort that
    /// cannot reach a guest that never connected) is its consequence.
    fn fail(&mut self, step: &str, e: Error) -> Error {
        self.metrics.failure.get_or_insert(Failure {
            step: step.to_string(),
            class: e.class(),
            message: e.to_string(),
        });
        e
    }

    async fn once(&mut self, call: &Call, limit: Duration) -> Result<Value> {
        let mounts = self.vm.mounts.clone();
        match self.link.as_mut() {
            None => Err(ErrorKind::Closed.into()),
            Some(Link::Vsnap(c)) => {
                let op = match call {
                    Call::Identify => Op::Identify,
                    Call::Prepare(t) => Op::Prepare(Prepare {
                        backup_type: t.clone(),
                    }),
                    Call::Freeze { hold_limit_ms } => Op::Freeze(Freeze {
                        mounts,
                        hold_limit_ms: Some(*hold_limit_ms),
                    }),
                    Call::Thaw => Op::Thaw,
                    Call::Abort(r) => Op::Abort(Abort { reason: r.clone() }),
                    Call::Complete(s) => Op::Complete(Complete { success: *s }),
                };
                c.call_within(op, limit).await
            }
            Some(Link::Qga(q)) => match call {
                Call::Identify => Ok(json!({"writers": [{"kind": "qemu-ga"}]})),
                Call::Prepare(_) => {
                    let st = q.status().await?;
                    if st == "frozen" {
                        return Err(ErrorKind::Agent {
                            class: ErrorClass::NonRetryable,
                            message: "qemu-ga reports the guest frozen already; thaw it (guest-fsfreeze-thaw) before a backup".into(),
                            mount: None,
                        }
                        .into());
                    }
                    Ok(json!({}))
                }
                Call::Freeze { .. } => {
                    let n = q.freeze(mounts.as_deref(), limit).await?;
                    let expected = mounts.as_ref().map(|m| m.len() as u64);
                    Ok(json!({"frozen": n, "expected": expected}))
                }
                Call::Thaw | Call::Abort(_) => Ok(json!({"thawed": q.thaw().await?})),
                Call::Complete(_) => Ok(json!({})),
            },
        }
    }

    /// One call, with the retry rule; a freeze is retried only after a
    /// fresh prepare (a failed freeze leaves the agent FAILED_AT_FREEZE),
    /// and only while `deadline` allows.
    pub async fn call(
        &mut self,
        call: Call,
        limit: Duration,
        deadline: Option<Instant>,
    ) -> Result<Value> {
        let step = call.step();
        let mut tries = 0;
        loop {
            tries += 1;
            let limit = match deadline {
                Some(d) => limit.min(d.saturating_duration_since(Instant::now())),
                None => limit,
            };
            let r = if limit.is_zero() {
                Err(Error::from(ErrorKind::Timeout {
                    op: step.into(),
                    ms: 0,
                }))
            } else {
                self.once(&call, limit).await
            };
            match r {
                Ok(v) => {
                    self.record(&call, &v);
                    return Ok(v);
                }
                Err(e) if tries < TRIES && e.class().is_retryable() && self.link.is_some() => {
                    self.metrics.retries += 1;
                    tokio::time::sleep(backoff(tries)).await;
                    if matches!(e.kind, ErrorKind::Io(_) | ErrorKind::Closed) {
                        if let Err(e) = self.connect_once().await {
                            return Err(self.fail(step, e));
                        }
                    }
                    if matches!(call, Call::Freeze { .. }) {
                        let prep = Call::Prepare(self.backup_type.clone());
                        if let Err(e) = self.once(&prep, Duration::from_secs(5)).await {
                            return Err(self.fail(step, e));
                        }
                    }
                }
                Err(e) => return Err(self.fail(step, e)),
            }
        }
    }

    fn record(&mut self, call: &Call, v: &Value) {
        let now = self.now_us();
        let m = &mut self.metrics;
        match call {
            Call::Identify => m.writers = v.get("writers").cloned(),
            Call::Prepare(t) => {
                m.prepare_hooks_us = get_u64(v, "prepare_hooks_us");
                m.prepare_sync_us = get_u64(v, "prepare_sync_us");
                self.backup_type.clone_from(t);
            }
            Call::Freeze { .. } => {
                m.frozen = get_u64(v, "frozen");
                m.expected = get_u64(v, "expected");
                m.freeze_hooks_us = get_u64(v, "freeze_hooks_us");
                m.fifreeze_us = get_u64(v, "fifreeze_us");
                m.freeze_ack_at_us = Some(now);
            }
            Call::Thaw => {
                m.freeze_window_us = get_u64(v, "freeze_window_us");
                m.stall_us = get_u64(v, "stall_us");
                m.fithaw_us = get_u64(v, "fithaw_us");
                m.thaw_hooks_us = get_u64(v, "thaw_hooks_us");
                m.thaw_ack_at_us = Some(now);
                m.host_window_us = m.freeze_ack_at_us.map(|a| now.saturating_sub(a));
            }
            Call::Abort(_) | Call::Complete(_) => {}
        }
    }

    /// Identify, then a check that the mounts the inventory names are
    /// ones this agent freezes: a stranger would fail the freeze inside
    /// the barrier, with every other guest frozen.
    pub async fn identify(&mut self) -> Result<()> {
        let v = self
            .call(Call::Identify, Duration::from_secs(5), None)
            .await?;
        let (Some(want), Some(have)) = (&self.vm.mounts, v.get("mounts").and_then(Value::as_array))
        else {
            return Ok(());
        };
        let norm = |m: &str| m.trim_end_matches('/').to_string();
        let have: Vec<String> = have
            .iter()
            .filter_map(|m| m.get("mount_point").and_then(Value::as_str))
            .map(norm)
            .collect();
        if let Some(stranger) = want.iter().find(|w| !have.contains(&norm(w))) {
            let e = Error::from(ErrorKind::Agent {
                class: ErrorClass::NonRetryable,
                message: format!(
                    "the inventory asks to freeze {stranger}, which this agent does not freeze (it freezes: {})",
                    if have.is_empty() { "nothing".to_string() } else { have.join(", ") }
                ),
                mount: Some(stranger.clone()),
            });
            return Err(self.fail("identify", e));
        }
        Ok(())
    }

    /// Whether the agent said it froze something: abort must thaw it.
    pub fn reported_frozen(&self) -> bool {
        self.metrics.frozen.is_some_and(|n| n > 0)
    }
}

fn backoff(try_no: u32) -> Duration {
    Duration::from_millis(100u64 << try_no.min(6))
}
