//! The agent's state machine: one backup cycle at a time, shared by every
//! connection, with the watchdog that bounds a freeze.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vsnap_protocol::{
    AgentState, CompleteReply, Empty, ErrorClass, FreezeReply, HelloReply, IdentifyReply, Op,
    PrepareReply, Reply, Request, StatusReply, Step, ThawReply, Timings, WireError, Writer,
    PROTOCOL_VERSION,
};

use crate::freezer::{self, Frozen, Marker};
use crate::hooks::{Action, Hooks, Ran};
use crate::rcu::{self, Expedite};
use crate::{AgentConfig, Journal};

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn us(d: Duration) -> Option<u64> {
    Some(vsnap_protocol::micros(d))
}

/// Records that the cycle failed at `step`: the state and the failure
/// `status` reports, and the error to answer with.
fn failed_at(inner: &mut Inner, step: Step, e: WireError) -> WireError {
    inner.state = AgentState::FailedAt(step);
    inner.failure = Some(e.clone());
    e
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    Thaw,
    Abort,
    Watchdog,
}

struct Inner {
    state: AgentState,
    frozen: Vec<Frozen>,
    /// Hooks whose freeze succeeded: they get the thaw.
    frozen_hooks: Vec<PathBuf>,
    frozen_since: Option<Instant>,
    /// When quiescing began: the start of the application's stall.
    quiesce_started: Option<Instant>,
    expected: usize,
    generation: u64,
    watchdog: Option<tokio::task::JoinHandle<()>>,
    hold_limit: Duration,
    timings: Timings,
    failure: Option<WireError>,
    watchdog_fired: bool,
}

pub struct Session {
    cfg: AgentConfig,
    hooks: Hooks,
    marker: Marker,
    journal: Arc<Journal>,
    /// The RCU knob, when freezes expedite grace periods.
    expedite: Option<Expedite>,
    inner: tokio::sync::Mutex<Inner>,
}

fn agent_name() -> String {
    format!("vsnap-agent {}", env!("CARGO_PKG_VERSION"))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

impl Session {
    pub fn new(cfg: AgentConfig, marker: Marker, journal: Arc<Journal>) -> Self {
        let hooks = Hooks {
            dir: cfg.hooks.clone(),
            timeout: cfg.hook_timeout,
        };
        let hold_limit = cfg.hold_limit;
        let expedite = if cfg.expedite_freeze {
            Expedite::probe(Path::new(rcu::KNOB))
                .inspect_err(|why| {
                    journal.log(format!(
                        "freezes will wait out normal RCU grace periods: {why}"
                    ))
                })
                .ok()
        } else {
            None
        };
        Session {
            cfg,
            hooks,
            marker,
            journal,
            expedite,
            inner: tokio::sync::Mutex::new(Inner {
                state: AgentState::Idle,
                frozen: Vec::new(),
                frozen_hooks: Vec::new(),
                frozen_since: None,
                quiesce_started: None,
                expected: 0,
                generation: 0,
                watchdog: None,
                hold_limit,
                timings: Timings::default(),
                failure: None,
                watchdog_fired: false,
            }),
        }
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    pub async fn dispatch(self: &Arc<Self>, req: Request) -> Reply {
        let mut inner = self.inner.lock().await;
        if inner.state == AgentState::Frozen && !req.op.allowed_while_frozen() {
            return Reply::err(
                Some(req.id),
                WireError::new(
                    ErrorClass::Protocol,
                    format!(
                        "{} is not accepted while frozen; only hello, sync, status, thaw and abort are",
                        req.op.name()
                    ),
                ),
            );
        }
        let id = req.id;
        match req.op {
            Op::Hello(_) => Reply::answer(
                id,
                Ok(HelloReply {
                    version: PROTOCOL_VERSION,
                    agent: agent_name(),
                    state: inner.state,
                }),
            ),
            Op::Sync => Reply::answer(id, Ok(Empty {})),
            Op::Identify => Reply::answer(id, self.identify(&inner)),
            Op::Status => Reply::answer(id, Ok(self.status(&inner))),
            Op::Prepare(p) => Reply::answer(id, self.prepare(&mut inner, &p.backup_type).await),
            Op::Freeze(f) => {
                Reply::answer(id, self.freeze(&mut inner, f.mounts, f.hold_limit_ms).await)
            }
            Op::Thaw => Reply::answer(
                id,
                if inner.state == AgentState::Frozen {
                    self.thaw_locked(&mut inner, Cause::Thaw).await
                } else if inner.watchdog_fired {
                    Err(inner.failure.clone().unwrap_or_else(|| {
                        WireError::new(ErrorClass::Timeout, "the watchdog thawed")
                    }))
                } else {
                    Ok(ThawReply {
                        already: true,
                        ..ThawReply::default()
                    })
                },
            ),
            Op::Abort(a) => {
                self.journal.log(format!("abort: {}", a.reason));
                Reply::answer(
                    id,
                    if inner.state == AgentState::Frozen {
                        self.thaw_locked(&mut inner, Cause::Abort).await
                    } else {
                        let ran = self.hooks.run(Action::Abort, None, &[]).await;
                        inner.timings.abort_hooks_us = us(ran.elapsed);
                        self.log_hooks(&ran);
                        inner.state = AgentState::Aborted;
                        Ok(ThawReply {
                            abort_hooks_us: inner.timings.abort_hooks_us,
                            ..ThawReply::default()
                        })
                    },
                )
            }
            Op::Complete(c) => Reply::answer(id, self.complete(&mut inner, c.success).await),
        }
    }

    fn identify(&self, inner: &Inner) -> Result<IdentifyReply, WireError> {
        let sel = self
            .cfg
            .select()
            .map_err(|e| WireError::new(ErrorClass::NonRetryable, e.to_string()))?;
        let hooks = self
            .hooks
            .list()
            .map_err(|e| WireError::new(ErrorClass::NonRetryable, format!("hooks: {e}")))?;
        let mut writers = vec![Writer {
            kind: "fsfreeze".into(),
            mounts: Some(sel.freeze.len() as u64),
            hook: None,
        }];
        writers.extend(hooks.iter().map(|h| Writer {
            kind: "exec".into(),
            mounts: None,
            hook: Some(h.clone()),
        }));
        Ok(IdentifyReply {
            agent: agent_name(),
            writers,
            mounts: sel.freeze.iter().map(|m| m.info()).collect(),
            skipped: sel.skipped,
            hooks,
            host: Some(hostname()),
            protocol: Some(PROTOCOL_VERSION),
            state: Some(inner.state),
            hold_limit_ms: Some(ms(self.cfg.hold_limit)),
        })
    }

    fn status(&self, inner: &Inner) -> StatusReply {
        StatusReply {
            state: inner.state,
            frozen_mounts: inner.frozen.iter().map(|f| f.mount.clone()).collect(),
            expected: inner.expected as u64,
            hold_limit_ms: ms(inner.hold_limit),
            timings: inner.timings.clone(),
            failure: inner.failure.clone(),
            watchdog_fired: inner.watchdog_fired,
            pid: std::process::id(),
        }
    }

    fn log_hooks(&self, ran: &Ran) {
        for l in &ran.output {
            self.journal.log(l.clone());
        }
        for f in &ran.failed {
            self.journal
                .log(format!("hook {} failed: {}", f.hook.display(), f.reason));
        }
    }

    /// A step whose only work is its hooks (prepare, complete): runs them,
    /// records how long they took in `timing`, logs what they said, and
    /// fails the step at the first that failed.
    async fn hook_step(
        &self,
        inner: &mut Inner,
        action: Action,
        env: &[(&str, String)],
        (step, class): (Step, ErrorClass),
        timing: fn(&mut Timings) -> &mut Option<u64>,
    ) -> Result<(), WireError> {
        let ran = self.hooks.run(action, None, env).await;
        *timing(&mut inner.timings) = us(ran.elapsed);
        self.log_hooks(&ran);
        if let Some(f) = ran.failed.first() {
            let e = WireError::new(
                class,
                format!(
                    "{} hook {} failed: {}",
                    action.as_str(),
                    f.hook.display(),
                    f.reason
                ),
            );
            return Err(failed_at(inner, step, e));
        }
        Ok(())
    }

    async fn prepare(
        &self,
        inner: &mut Inner,
        backup_type: &str,
    ) -> Result<PrepareReply, WireError> {
        // A new cycle: what the last one reported is history now.
        inner.timings = Timings::default();
        inner.quiesce_started = None;
        inner.failure = None;
        inner.watchdog_fired = false;
        inner.expected = 0;
        let env = [("VSNAP_BACKUP_TYPE", backup_type.to_string())];
        let fails_as = (Step::Prepare, ErrorClass::NonRetryable);
        self.hook_step(inner, Action::Prepare, &env, fails_as, |t| {
            &mut t.prepare_hooks_us
        })
        .await?;
        if self.cfg.prepare_sync {
            let t = Instant::now();
            let mounts = self.cfg.select().map(|s| s.freeze).unwrap_or_default();
            // A mount that cannot be flushed here is only slower to freeze.
            for m in tokio::task::block_in_place(|| freezer::sync_all(&mounts)) {
                self.journal.log(m);
            }
            inner.timings.prepare_sync_us = us(t.elapsed());
        }
        inner.state = AgentState::Prepared;
        Ok(PrepareReply {
            state: inner.state,
            prepare_hooks_us: inner.timings.prepare_hooks_us,
            prepare_sync_us: inner.timings.prepare_sync_us,
        })
    }

    async fn freeze(
        self: &Arc<Self>,
        inner: &mut Inner,
        mounts: Option<Vec<String>>,
        hold_limit_ms: Option<u64>,
    ) -> Result<FreezeReply, WireError> {
        if inner.state != AgentState::Prepared {
            return Err(WireError::new(
                ErrorClass::Protocol,
                format!(
                    "freeze needs PREPARED, and the agent is {}; send prepare first",
                    inner.state
                ),
            ));
        }
        let fail = |inner: &mut Inner, e: WireError| failed_at(inner, Step::Freeze, e);
        let mut sel = match self.cfg.select() {
            Ok(s) => s,
            Err(e) => {
                return Err(fail(
                    inner,
                    WireError::new(ErrorClass::NonRetryable, e.to_string()),
                ))
            }
        };
        if let Some(want) = mounts {
            let want: Vec<PathBuf> = want
                .iter()
                .map(|m| std::fs::canonicalize(m).unwrap_or_else(|_| PathBuf::from(m)))
                .collect();
            if let Some(stranger) = want
                .iter()
                .find(|w| !sel.freeze.iter().any(|m| &m.mount_point == *w))
            {
                let e = WireError::new(
                    ErrorClass::NonRetryable,
                    "not a mount this agent freezes (see identify)",
                )
                .on_mount(stranger.display().to_string());
                return Err(fail(inner, e));
            }
            sel.freeze.retain(|m| want.contains(&m.mount_point));
        }
        let hold = match hold_limit_ms {
            Some(ms) if ms > 0 => Duration::from_millis(ms).min(self.cfg.hold_limit),
            _ => self.cfg.hold_limit,
        };
        inner.hold_limit = hold;
        inner.expected = sel.freeze.len();

        inner.quiesce_started = Some(Instant::now());
        let ran = self.hooks.run(Action::Freeze, None, &[]).await;
        inner.timings.freeze_hooks_us = us(ran.elapsed);
        self.log_hooks(&ran);
        if let Some(f) = ran.failed.first() {
            let e = WireError::new(
                ErrorClass::NonRetryable,
                format!(
                    "freeze hook {} failed: {}; nothing was frozen",
                    f.hook.display(),
                    f.reason
                ),
            );
            let undo = self.hooks.run(Action::Thaw, Some(&ran.ok), &[]).await;
            self.log_hooks(&undo);
            return Err(fail(inner, e));
        }
        if let Err(e) = self.marker.write(&sel.freeze, self.expedite.is_some()) {
            let undo = self.hooks.run(Action::Thaw, Some(&ran.ok), &[]).await;
            self.log_hooks(&undo);
            let e = WireError::new(
                ErrorClass::Retryable,
                format!(
                    "cannot write the freeze marker {}: {e}",
                    self.marker.path.display()
                ),
            );
            return Err(fail(inner, e));
        }
        self.journal.hold();
        let t = Instant::now();
        let froze = tokio::task::block_in_place(|| {
            let _expedited = self.expedite.as_ref().map(Expedite::begin);
            freezer::freeze_all(&sel.freeze)
        });
        let fifreeze = t.elapsed();
        let (frozen, skipped) = match froze {
            Ok(x) => x,
            Err(e) => {
                let _ = self.marker.clear();
                self.journal.release();
                let undo = self.hooks.run(Action::Thaw, Some(&ran.ok), &[]).await;
                self.log_hooks(&undo);
                return Err(fail(inner, e));
            }
        };
        inner.frozen_since = Some(Instant::now());
        inner.timings.fifreeze_us = us(fifreeze);
        inner.frozen = frozen;
        inner.frozen_hooks = ran.ok;
        inner.state = AgentState::Frozen;
        inner.generation += 1;
        let me = Arc::clone(self);
        let generation = inner.generation;
        inner.watchdog = Some(tokio::spawn(async move {
            tokio::time::sleep(hold).await;
            let mut inner = me.inner.lock().await;
            if inner.state == AgentState::Frozen && inner.generation == generation {
                inner.watchdog = None;
                let _ = me.thaw_locked(&mut inner, Cause::Watchdog).await;
            }
        }));
        let mut all_skipped = sel.skipped;
        all_skipped.extend(skipped);
        Ok(FreezeReply {
            frozen: inner.frozen.len() as u64,
            expected: Some(inner.expected as u64),
            mounts: inner.frozen.iter().map(|f| f.mount.clone()).collect(),
            skipped: all_skipped,
            hold_limit_ms: Some(ms(hold)),
            freeze_hooks_us: inner.timings.freeze_hooks_us,
            fifreeze_us: inner.timings.fifreeze_us,
        })
    }

    /// Thaws every frozen mount, then runs the hooks (thaw, or abort), and
    /// records the freeze window. Called with the session locked.
    async fn thaw_locked(&self, inner: &mut Inner, cause: Cause) -> Result<ThawReply, WireError> {
        if cause != Cause::Watchdog {
            if let Some(w) = inner.watchdog.take() {
                w.abort();
            }
        }
        let window = inner.frozen_since.take().map(|s| s.elapsed());
        let t = Instant::now();
        let thawed = tokio::task::block_in_place(|| freezer::thaw_all(&mut inner.frozen));
        inner.timings.fithaw_us = us(t.elapsed());
        inner.timings.stall_us = inner.quiesce_started.take().and_then(|q| us(q.elapsed()));
        inner.timings.freeze_window_us = window.and_then(us);
        if inner.frozen.is_empty() {
            if let Err(e) = self.marker.clear() {
                self.journal.log(format!("cannot remove the marker: {e}"));
            }
        }
        self.journal.release();
        let hooks = std::mem::take(&mut inner.frozen_hooks);
        let ran = match cause {
            Cause::Abort => self.hooks.run(Action::Abort, None, &[]).await,
            Cause::Thaw | Cause::Watchdog => self.hooks.run(Action::Thaw, Some(&hooks), &[]).await,
        };
        match cause {
            Cause::Abort => inner.timings.abort_hooks_us = us(ran.elapsed),
            _ => inner.timings.thaw_hooks_us = us(ran.elapsed),
        }
        self.log_hooks(&ran);
        let count = match thawed {
            Ok(n) => n,
            Err(e) => {
                self.journal.log(format!("thaw failed: {}", e.message));
                return Err(failed_at(inner, Step::Thaw, e));
            }
        };
        match cause {
            Cause::Thaw => inner.state = AgentState::Thawed,
            Cause::Abort => inner.state = AgentState::Aborted,
            Cause::Watchdog => {
                inner.state = AgentState::Aborted;
                inner.watchdog_fired = true;
                let e = WireError::new(
                    ErrorClass::Timeout,
                    format!(
                        "the watchdog thawed {count} mount(s) after the hold limit of {} ms; this snapshot is not application-consistent",
                        inner.hold_limit.as_millis()
                    ),
                );
                self.journal.log(e.message.clone());
                inner.failure = Some(e.clone());
                return Err(e);
            }
        }
        if let Some(f) = ran.failed.first() {
            self.journal.log(format!(
                "after the thaw, hook {} failed: {}",
                f.hook.display(),
                f.reason
            ));
        }
        Ok(ThawReply {
            thawed: count as u64,
            already: false,
            freeze_window_us: inner.timings.freeze_window_us,
            stall_us: inner.timings.stall_us,
            fithaw_us: inner.timings.fithaw_us,
            thaw_hooks_us: inner.timings.thaw_hooks_us,
            abort_hooks_us: inner.timings.abort_hooks_us,
        })
    }

    async fn complete(&self, inner: &mut Inner, success: bool) -> Result<CompleteReply, WireError> {
        if inner.state == AgentState::Idle || inner.state == AgentState::Prepared {
            return Err(WireError::new(
                ErrorClass::Protocol,
                format!(
                    "complete comes after a freeze, and the agent is {}",
                    inner.state
                ),
            ));
        }
        let env = [("VSNAP_SUCCESS", if success { "1" } else { "0" }.to_string())];
        let fails_as = (Step::Complete, ErrorClass::PartialFailure);
        self.hook_step(inner, Action::Complete, &env, fails_as, |t| {
            &mut t.complete_hooks_us
        })
        .await?;
        inner.state = AgentState::Complete;
        Ok(CompleteReply {
            state: inner.state,
            complete_hooks_us: inner.timings.complete_hooks_us,
        })
    }

    /// On SIGTERM or SIGINT: a held freeze is thawed before the agent exits.
    pub async fn shutdown(&self) {
        let mut inner = self.inner.lock().await;
        if inner.state == AgentState::Frozen {
            self.journal.log("stopping while frozen: thawing first");
            let _ = self.thaw_locked(&mut inner, Cause::Abort).await;
        }
    }
}
