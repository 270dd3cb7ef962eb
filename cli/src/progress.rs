//! A progress bar on a terminal, fed from the engine's counters.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use vsnap_engine::pipeline::Progress;

/// Runs `work` while a bar on stderr shows `progress`, when stderr is a
/// terminal and `quiet` is off; otherwise just runs it.
pub fn with_bar<T>(progress: &Progress, quiet: bool, work: impl FnOnce() -> T) -> T {
    if quiet || !std::io::stderr().is_terminal() {
        return work();
    }
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            while !stop.load(Ordering::Relaxed) {
                bar.set_length(Progress::get(&progress.total));
                bar.set_position(Progress::get(&progress.done));
                std::thread::sleep(Duration::from_millis(100));
            }
            bar.finish_and_clear();
        });
        let out = work();
        stop.store(true, Ordering::Relaxed);
        out
    })
}
