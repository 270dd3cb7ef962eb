//! Firing jobs on their calendar events.
//!
//! Each job's next elapse is computed from the last time it fired, and the
//! scheduler sleeps until the earliest (waking at least every minute, so a
//! wall clock that jumps is noticed). A job fires at its elapse; several
//! elapses that passed while it could not fire (the machine suspended, the
//! service busy) fire once.
//!
//! After a restart, systemd's `Persistent=` rule: a persistent job (the
//! default) whose next elapse after its last firing has passed while the
//! service was down runs once at start-up, marked `missed`; a job that has
//! never fired starts counting from the service's first start, and a job
//! with `persistent = false` waits for its next elapse.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::calendar::Zone;
use crate::runner::{Service, Started};
use crate::state::Trigger;

/// The longest the scheduler sleeps before it looks at the clock again.
const RECHECK: Duration = Duration::from_secs(60);

/// When each job is next due, as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct Due {
    pub job: String,
    pub at: Option<DateTime<Utc>>,
}

fn log(what: &str) {
    crate::log::error(what);
}

/// Runs until `stop` says so. Start-up first: missed runs of persistent
/// jobs.
pub async fn run(svc: Arc<Service>, zone: Zone, mut stop: tokio::sync::watch::Receiver<bool>) {
    let now = Utc::now();
    let mut due: Vec<(String, Option<DateTime<Utc>>)> = Vec::new();
    for job in scheduled(&svc) {
        let last = match svc.state.last_fired(job.name) {
            Ok(l) => l,
            Err(e) => {
                log(&crate::error::chain(&e));
                None
            }
        };
        let from = match last {
            Some(l) if job.persistent => {
                if let Some(missed) = job.schedule.next_after(l, zone).filter(|m| *m <= now) {
                    fire(&svc, job.name, Trigger::Missed, missed, now);
                }
                now
            }
            Some(_) => now,
            None => {
                if let Err(e) = svc.state.set_fired(job.name, now) {
                    log(&crate::error::chain(&e));
                }
                now
            }
        };
        due.push((job.name.to_string(), job.schedule.next_after(from, zone)));
    }
    loop {
        let now = Utc::now();
        for (name, at) in due.iter_mut() {
            let Some(t) = *at else { continue };
            if t <= now {
                fire(&svc, name, Trigger::Schedule, t, now);
                let next_from = if now > t { now } else { t };
                *at = svc
                    .schedule(name)
                    .and_then(|c| c.next_after(next_from, zone));
            }
        }
        let soonest = due.iter().filter_map(|d| d.1).min();
        let wait = soonest
            .map(|t| (t - Utc::now()).to_std().unwrap_or(Duration::ZERO))
            .unwrap_or(RECHECK)
            .min(RECHECK);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}

fn fire(svc: &Arc<Service>, job: &str, trigger: Trigger, due: DateTime<Utc>, now: DateTime<Utc>) {
    if let Err(e) = svc.state.set_fired(job, now.max(due)) {
        log(&crate::error::chain(&e));
    }
    match svc.start(job, trigger, Some(due)) {
        // The run's own start and end are logged where it runs.
        Ok(Started::Run(_)) => {}
        Ok(Started::Skipped(id)) => crate::log::event(
            crate::log::Level::Warn,
            &format!("job {job}: skipped (run {id}): its previous run is still going"),
            &[
                ("event", "run-skipped".into()),
                ("job", job.into()),
                ("run", id.into()),
            ],
        ),
        Err(e) => log(&format!("job {job}: {}", crate::error::chain(&e))),
    }
}

/// A job on a schedule, backup or verify.
struct Scheduled<'a> {
    name: &'a str,
    schedule: &'a crate::calendar::Calendar,
    persistent: bool,
}

/// Every job with a schedule: the backups, then the verifies (always
/// persistent).
fn scheduled(svc: &Service) -> Vec<Scheduled<'_>> {
    let backups = svc.config.jobs.iter().map(|j| Scheduled {
        name: &j.name,
        schedule: &j.schedule,
        persistent: j.persistent,
    });
    let verifies = svc.config.verifies.iter().map(|v| Scheduled {
        name: &v.name,
        schedule: &v.schedule,
        persistent: true,
    });
    backups.chain(verifies).collect()
}

/// Each job's next elapse after now.
pub fn upcoming(svc: &Service, zone: Zone) -> Vec<Due> {
    let now = Utc::now();
    scheduled(svc)
        .iter()
        .map(|j| Due {
            job: j.name.to_string(),
            at: j.schedule.next_after(now, zone),
        })
        .collect()
}
