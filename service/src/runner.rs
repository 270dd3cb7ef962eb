//! Running jobs: one run per job at a time (a run that finds its job's
//! previous one still going is recorded as skipped), each in its own task
//! so that a panic fails that run and not the service, progress written to
//! the state as it goes, and the retention and gc that follow a backup.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use vsnap_engine::pipeline::Progress;

use crate::error::{ErrorKind, Result};
use crate::state::Trigger;

use crate::core::Ended;
pub use crate::core::{Active, Service, Started};

impl Service {
    /// Starts job `name` (backup or verify) now, unless its previous run
    /// is still going (then the skip is recorded). Must be called inside a
    /// multi-threaded tokio runtime.
    pub fn start(
        self: &Arc<Self>,
        name: &str,
        trigger: Trigger,
        scheduled_for: Option<DateTime<Utc>>,
    ) -> Result<Started> {
        if let Some(job) = self.job(name).cloned() {
            let notify = job.notify.clone();
            return self.launch(
                name,
                "backup",
                trigger,
                scheduled_for,
                notify,
                move |svc, a| crate::work::backup(svc, job, a),
            );
        }
        if let Some(job) = self.verify_job(name).cloned() {
            let notify = job.notify.clone();
            return self.launch(
                name,
                "verify",
                trigger,
                scheduled_for,
                notify,
                move |svc, a| crate::work::verify(svc, job.vms, job.outdated_after, None, a),
            );
        }
        Err(ErrorKind::NotFound(format!("no job {name:?}")).into())
    }

    /// Verifies `snapshots` now (all, when empty), as run `verify`.
    pub fn verify_now(self: &Arc<Self>, snapshots: Vec<String>) -> Result<Started> {
        let vms: Vec<String> = self.config.vms.iter().map(|v| v.name.clone()).collect();
        self.launch(
            "verify",
            "verify",
            Trigger::Manual,
            None,
            Vec::new(),
            move |svc, a| crate::work::verify(svc, vms, None, Some(snapshots), a),
        )
    }

    /// Records run `name` and runs `work` in its own task, unless `name`'s
    /// previous run is still going; then writes how it ended, and tells
    /// the `notify` targets.
    fn launch<F, Fut>(
        self: &Arc<Self>,
        name: &str,
        kind: &str,
        trigger: Trigger,
        scheduled_for: Option<DateTime<Utc>>,
        notify: Vec<String>,
        work: F,
    ) -> Result<Started>
    where
        F: FnOnce(Arc<Service>, Active) -> Fut,
        Fut: std::future::Future<Output = Result<Ended>> + Send + 'static,
    {
        let mut active = self.active_map();
        if let Some(a) = active.get(name) {
            let why = format!("its previous run ({}) is still going", a.run);
            return Ok(Started::Skipped(self.state.skip(
                name,
                kind,
                trigger,
                scheduled_for,
                &why,
            )?));
        }
        let run = self.state.begin(name, kind, trigger, scheduled_for)?;
        // One line at each end of a run, for journald and for grep.
        let due = scheduled_for.map_or(String::new(), |d| format!(", due {d}"));
        crate::log::event(
            crate::log::Level::Info,
            &format!(
                "job {name}: run {run} started ({} {kind}{due})",
                crate::state::name(trigger)
            ),
            &[
                ("event", "run-started".into()),
                ("job", name.into()),
                ("run", run.into()),
                ("trigger", crate::state::name(trigger).into()),
                ("kind", kind.to_string().into()),
                ("due", scheduled_for.map(|d| d.to_string()).into()),
            ],
        );
        let started = std::time::Instant::now();
        let a = Active {
            run,
            job: name.to_string(),
            cancel: Arc::new(AtomicBool::new(false)),
            progress: Arc::new(Progress::default()),
        };
        active.insert(name.to_string(), a.clone());
        drop(active);
        let svc = Arc::clone(self);
        let fut = work(Arc::clone(&svc), a.clone());
        tokio::spawn(async move {
            let ticker = {
                let (svc, a) = (Arc::clone(&svc), a.clone());
                tokio::spawn(async move {
                    let mut every = tokio::time::interval(Duration::from_secs(1));
                    loop {
                        every.tick().await;
                        let (done, total) = (
                            Progress::get(&a.progress.done),
                            Progress::get(&a.progress.total),
                        );
                        let _ = svc.state.progress(a.run, done, total);
                    }
                })
            };
            // Its own task: a panic in it fails this run, and only it.
            let ended = match tokio::spawn(fut).await {
                Ok(Ok(e)) => e,
                // Stopped by its cancel: cancelled, with where it stopped.
                Ok(Err(e)) if a.cancel.load(std::sync::atomic::Ordering::Relaxed) => Ended {
                    state: crate::state::RunState::Cancelled,
                    ..Ended::failed(crate::error::chain(&e), Vec::new())
                },
                Ok(Err(e)) => Ended::failed(crate::error::chain(&e), Vec::new()),
                Err(j) => Ended::failed(
                    format!("the run stopped unexpectedly: {}", panic_text(j)),
                    Vec::new(),
                ),
            };
            ticker.abort();
            let (done, total) = (
                Progress::get(&a.progress.done),
                Progress::get(&a.progress.total),
            );
            let _ = svc.state.progress(a.run, done, total);
            {
                // Recorded as ended and no longer active at once, under
                // the lock a start takes: whoever sees the run ended may
                // start its job again. Its webhooks are told after, and a
                // service that stops (SIGTERM) waits for them (counted
                // before the run leaves the active ones, so one of the two
                // always holds it).
                let mut active = svc.active_map();
                if let Err(e) = svc.state.finish(
                    a.run,
                    ended.state,
                    ended.error.as_deref(),
                    ended.note.as_deref(),
                    &ended.vms,
                ) {
                    crate::log::error(&format!("run {}: {}", a.run, crate::error::chain(&e)));
                }
                let state = crate::state::name(ended.state);
                let mut line = format!("job {}: run {} {state}", a.job, a.run);
                if let Some(e) = &ended.error {
                    line.push_str(&format!(": {e}"));
                }
                if let Some(n) = &ended.note {
                    line.push_str(&format!(" ({n})"));
                }
                let level = match ended.state {
                    crate::state::RunState::Failed => crate::log::Level::Error,
                    crate::state::RunState::Succeeded => crate::log::Level::Info,
                    _ => crate::log::Level::Warn,
                };
                crate::log::event(
                    level,
                    &line,
                    &[
                        ("event", "run-ended".into()),
                        ("job", a.job.as_str().into()),
                        ("run", a.run.into()),
                        ("state", state.into()),
                        ("error", ended.error.as_deref().into()),
                        ("note", ended.note.as_deref().into()),
                        ("took_s", started.elapsed().as_secs_f64().into()),
                    ],
                );
                svc.telling
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                active.remove(&a.job);
            }
            crate::notify::after_run(&svc, &notify, a.run).await;
            svc.telling
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            svc.idle.notify_waiters();
        });
        Ok(Started::Run(run))
    }
}

fn panic_text(j: tokio::task::JoinError) -> String {
    match j.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into()),
        Err(j) => j.to_string(),
    }
}
