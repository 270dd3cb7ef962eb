//! One guest, whichever agent speaks for it (a vsnap agent or qemu-ga),
//! with the reference's retry rule applied to every call: retryable and
//! timeout failures are tried again, at most 3 tries in all, with
//! back-off, reconnecting when the connection itself broke.

use std::time::{Duration, Instant};

use vsnap_protocol::{
    Abort, AgentState, Complete, CompleteReply, ErrorClass, Freeze, FreezeReply, IdentifyReply, Op,
    Prepare, PrepareReply, ThawReply,
};
use vsnap_repo::{Failure, GuestMetrics, Writer};

use crate::client::AgentClient;
use crate::error::{Error, ErrorKind, Result};
use crate::inventory::{AgentSpec, Vm};
use crate::qga::QgaClient;

enum Link {
    Vsnap(AgentClient),
    Qga(QgaClient),
}

/// The reference's per-guest metrics: what the manifest records.
pub type Metrics = GuestMetrics;

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

/// A call's answer, typed by the step: a vsnap agent's reply, or what
/// qemu-ga said mapped into the same type.
#[derive(Debug, Clone)]
pub enum Answer {
    Identify(IdentifyReply),
    Prepare(PrepareReply),
    Freeze(FreezeReply),
    /// To `thaw` and to `abort`.
    Thaw(ThawReply),
    Complete(CompleteReply),
}

pub const TRIES: u32 = 3;

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
                    .map(vsnap_protocol::read_token)
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
                if hello.state == AgentState::Frozen {
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
            class: e.class().to_string(),
            message: e.to_string(),
        });
        e
    }

    async fn once(&mut self, call: &Call, limit: Duration) -> Result<Answer> {
        let mounts = self.vm.mounts.clone();
        // qemu-ga cannot tell whose freeze it holds: an abort thaws only
        // what this run froze, never a freeze found in place.
        let froze = self.reported_frozen();
        match self.link.as_mut() {
            None => Err(ErrorKind::Closed.into()),
            Some(Link::Vsnap(c)) => Ok(match call {
                Call::Identify => Answer::Identify(c.call_as(Op::Identify, limit).await?),
                Call::Prepare(t) => {
                    let op = Op::Prepare(Prepare {
                        backup_type: t.clone(),
                    });
                    Answer::Prepare(c.call_as(op, limit).await?)
                }
                Call::Freeze { hold_limit_ms } => {
                    let op = Op::Freeze(Freeze {
                        mounts,
                        hold_limit_ms: Some(*hold_limit_ms),
                    });
                    Answer::Freeze(c.call_as(op, limit).await?)
                }
                Call::Thaw => Answer::Thaw(c.call_as(Op::Thaw, limit).await?),
                Call::Abort(r) => {
                    let op = Op::Abort(Abort { reason: r.clone() });
                    Answer::Thaw(c.call_as(op, limit).await?)
                }
                Call::Complete(s) => {
                    let op = Op::Complete(Complete { success: *s });
                    Answer::Complete(c.call_as(op, limit).await?)
                }
            }),
            Some(Link::Qga(q)) => match call {
                Call::Identify => Ok(Answer::Identify(IdentifyReply {
                    agent: "qemu-ga".into(),
                    writers: vec![Writer {
                        kind: "qemu-ga".into(),
                        mounts: None,
                        hook: None,
                    }],
                    mounts: Vec::new(),
                    skipped: Vec::new(),
                    hooks: Vec::new(),
                    host: None,
                    protocol: None,
                    state: None,
                    hold_limit_ms: None,
                })),
                Call::Prepare(_) => {
                    let st = q.status().await?;
                    if st == "frozen" {
                        return Err(ErrorKind::Agent {
                            class: ErrorClass::NonRetryable,
                            message: "qemu-ga reports this guest frozen already, by a backup still running or by one that died without thawing it (qemu-ga has no watchdog); this run leaves it as it is; if no backup is running, thaw it with guest-fsfreeze-thaw".into(),
                            mount: None,
                        }
                        .into());
                    }
                    Ok(Answer::Prepare(PrepareReply {
                        state: AgentState::Prepared,
                        prepare_hooks_us: None,
                        prepare_sync_us: None,
                    }))
                }
                Call::Freeze { .. } => {
                    let frozen = q.freeze(mounts.as_deref(), limit).await?;
                    Ok(Answer::Freeze(FreezeReply {
                        frozen,
                        expected: mounts.as_ref().map(|m| m.len() as u64),
                        mounts: Vec::new(),
                        skipped: Vec::new(),
                        hold_limit_ms: None,
                        freeze_hooks_us: None,
                        fifreeze_us: None,
                    }))
                }
                Call::Abort(_) if !froze => Ok(Answer::Thaw(ThawReply::default())),
                Call::Thaw | Call::Abort(_) => Ok(Answer::Thaw(ThawReply {
                    thawed: q.thaw().await?,
                    ..ThawReply::default()
                })),
                Call::Complete(_) => Ok(Answer::Complete(CompleteReply {
                    state: AgentState::Complete,
                    complete_hooks_us: None,
                })),
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
    ) -> Result<Answer> {
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

    fn record(&mut self, call: &Call, answer: &Answer) {
        let now = self.now_us();
        let m = &mut self.metrics;
        match (call, answer) {
            (Call::Identify, Answer::Identify(r)) => {
                m.writers = Some(r.writers.clone());
            }
            (Call::Prepare(t), Answer::Prepare(r)) => {
                m.prepare_hooks_us = r.prepare_hooks_us;
                m.prepare_sync_us = r.prepare_sync_us;
                self.backup_type.clone_from(t);
            }
            (Call::Freeze { .. }, Answer::Freeze(r)) => {
                m.frozen = Some(r.frozen);
                m.expected = r.expected;
                m.freeze_hooks_us = r.freeze_hooks_us;
                m.fifreeze_us = r.fifreeze_us;
                m.freeze_ack_at_us = Some(now);
            }
            (Call::Thaw, Answer::Thaw(r)) => {
                m.freeze_window_us = r.freeze_window_us;
                m.stall_us = r.stall_us;
                m.fithaw_us = r.fithaw_us;
                m.thaw_hooks_us = r.thaw_hooks_us;
                m.thaw_ack_at_us = Some(now);
                m.host_window_us = m.freeze_ack_at_us.map(|a| now.saturating_sub(a));
            }
            _ => {}
        }
    }

    /// Identify, then a check that the mounts the inventory names are
    /// ones this agent freezes: a stranger would fail the freeze inside
    /// the barrier, with every other guest frozen.
    pub async fn identify(&mut self) -> Result<()> {
        let answer = self
            .call(Call::Identify, Duration::from_secs(5), None)
            .await?;
        // qemu-ga names no mounts: it freezes what it is told to.
        let (Some(want), Answer::Identify(r)) = (&self.vm.mounts, answer) else {
            return Ok(());
        };
        if r.mounts.is_empty() && r.writers.iter().any(|w| w.kind == "qemu-ga") {
            return Ok(());
        }
        let norm = |m: &str| m.trim_end_matches('/').to_string();
        let have: Vec<String> = r
            .mounts
            .iter()
            .map(|m| norm(&m.mount_point.to_string_lossy()))
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
