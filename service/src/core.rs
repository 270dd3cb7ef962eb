//! The service's shared state: its configuration, the state database,
//! the repository handle and the runs going now. The runs ([`crate::runner`]),
//! their bodies (`work`) and the webhooks ([`crate::notify`]) all read
//! it; it names none of them, so none of them import each other round a
//! loop.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vsnap_engine::pipeline::Progress;

use crate::config::{Config, Job, VerifyJob};
use crate::state::{RunState, State, VmResult};

/// A run in progress.
#[derive(Clone)]
pub struct Active {
    pub run: i64,
    pub job: String,
    pub cancel: Arc<AtomicBool>,
    pub progress: Arc<Progress>,
}

impl Active {
    /// Asks the run to stop: the session aborts by its rules (every guest
    /// thawed), and the streaming stops before its next chunk.
    fn stop(&self) {
        self.cancel.store(true, Ordering::Relaxed);
        self.progress.request_stop();
    }
}

/// What asking for a run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    Run(i64),
    /// The job's previous run is still going; this one is recorded as
    /// skipped.
    Skipped(i64),
}

pub struct Service {
    pub config: Config,
    pub state: State,
    /// The repository, opened once and shared by runs and the API.
    pub repo: crate::repository::RepoHandle,
    pub(crate) active: Mutex<HashMap<String, Active>>,
    /// The `vsnap` binary, which guards qemu-ga guests' freezes.
    pub(crate) guard: Option<PathBuf>,
    pub(crate) idle: tokio::sync::Notify,
    /// Webhook deliveries under way: a run's are sent after it has ended
    /// (its job may run again meanwhile), and a service that stops waits
    /// for them too.
    pub(crate) telling: std::sync::atomic::AtomicUsize,
}

/// How a run ended.
pub(crate) struct Ended {
    pub(crate) state: RunState,
    pub(crate) error: Option<String>,
    pub(crate) note: Option<String>,
    pub(crate) vms: Vec<VmResult>,
}

impl Ended {
    pub(crate) fn failed(error: String, vms: Vec<VmResult>) -> Ended {
        Ended {
            state: RunState::Failed,
            error: Some(error),
            note: None,
            vms,
        }
    }
}

impl Service {
    pub fn new(config: Config, state: State, guard: Option<PathBuf>) -> Arc<Service> {
        Arc::new(Service {
            repo: crate::repository::RepoHandle::new(config.repository.clone()),
            config,
            state,
            active: Mutex::new(HashMap::new()),
            guard,
            idle: tokio::sync::Notify::new(),
            telling: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    pub(crate) fn active_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Active>> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The runs in progress.
    pub fn active(&self) -> Vec<Active> {
        self.active_map().values().cloned().collect()
    }

    pub fn job(&self, name: &str) -> Option<&Job> {
        self.config.jobs.iter().find(|j| j.name == name)
    }

    pub fn verify_job(&self, name: &str) -> Option<&VerifyJob> {
        self.config.verifies.iter().find(|j| j.name == name)
    }

    /// The schedule of job `name`, backup or verify.
    pub fn schedule(&self, name: &str) -> Option<&crate::calendar::Calendar> {
        self.job(name)
            .map(|j| &j.schedule)
            .or_else(|| self.verify_job(name).map(|j| &j.schedule))
    }

    /// Asks run `run` to stop by the abort rules (every guest thawed at
    /// once); false when no such run is going.
    pub fn cancel(&self, run: i64) -> bool {
        let active = self.active_map();
        let Some(a) = active.values().find(|a| a.run == run) else {
            return false;
        };
        a.stop();
        true
    }

    /// Asks every run to stop, and waits until none is left and every
    /// webhook is told.
    pub async fn stop_all(&self) {
        loop {
            let notified = self.idle.notified();
            {
                let active = self.active_map();
                if active.is_empty() && self.telling.load(Ordering::SeqCst) == 0 {
                    return;
                }
                for a in active.values() {
                    a.stop();
                }
            }
            notified.await;
        }
    }
}
