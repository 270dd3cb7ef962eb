//! A thread that runs until told to stop: the demo's simulated
//! applications and the freeze benchmark's workloads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Result};

pub struct Background<T> {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<T>>>,
    what: &'static str,
}

impl<T: Send + 'static> Background<T> {
    /// Runs `work`, which checks the flag it is given and returns once it
    /// is set. `what` names it if it dies.
    pub fn spawn(
        what: &'static str,
        work: impl FnOnce(&AtomicBool) -> Result<T> + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        Background {
            stop,
            handle: Some(std::thread::spawn(move || work(&flag))),
            what,
        }
    }

    /// Stops it and waits for its result.
    pub fn finish(mut self) -> Result<T> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            _ => bail!("{} stopped unexpectedly", self.what),
        }
    }
}

impl<T> Drop for Background<T> {
    /// Only tells it to stop: a writer held by a frozen filesystem ends
    /// after the thaw, which whoever froze it guarantees.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
