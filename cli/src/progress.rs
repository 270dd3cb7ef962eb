//! Progress, fed from the engine's counters: a bar on a terminal, or JSON
//! lines for scripts, on stderr so stdout stays the command's result.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use vsnap_engine::pipeline::Progress;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum ProgressArg {
    /// A bar when stderr is a terminal, nothing otherwise.
    #[default]
    Auto,
    Bar,
    /// One JSON object per line on stderr, about twice a second and once
    /// at the end: {"event":"progress","total":…,"done":…,"read":…,"elapsed_ms":…}.
    Json,
    None,
}

impl ProgressArg {
    fn resolve(self, quiet: bool) -> ProgressArg {
        match self {
            _ if quiet => ProgressArg::None,
            ProgressArg::Auto if std::io::stderr().is_terminal() => ProgressArg::Bar,
            ProgressArg::Auto => ProgressArg::None,
            other => other,
        }
    }
}

fn json_event(progress: &Progress, started: Instant) -> String {
    format!(
        r#"{{"event":"progress","total":{},"done":{},"read":{},"elapsed_ms":{}}}"#,
        Progress::get(&progress.total),
        Progress::get(&progress.done),
        Progress::get(&progress.read),
        started.elapsed().as_millis()
    )
}

/// `--progress` and `-q`, for commands that stream.
#[derive(Debug, Clone, clap::Args)]
pub struct ProgressArgs {
    /// How to report progress: a bar on a terminal (auto), JSON lines on
    /// stderr for scripts, or none.
    #[arg(long, value_enum, default_value_t)]
    pub progress: ProgressArg,
    /// No progress output.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

impl ProgressArgs {
    pub fn run<T>(&self, progress: &Progress, work: impl FnOnce() -> T) -> T {
        with_progress(progress, self.progress, self.quiet, work)
    }
}

/// Runs `work` while progress is reported as `mode` asks.
pub fn with_progress<T>(
    progress: &Progress,
    mode: ProgressArg,
    quiet: bool,
    work: impl FnOnce() -> T,
) -> T {
    let mode = mode.resolve(quiet);
    if mode == ProgressArg::None {
        return work();
    }
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| match mode {
            ProgressArg::Json => {
                let mut err = std::io::stderr();
                while !stop.load(Ordering::Relaxed) {
                    let _ = writeln!(err, "{}", json_event(progress, started));
                    for _ in 0..5 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                let _ = writeln!(err, "{}", json_event(progress, started));
            }
            _ => {
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
            }
        });
        let out = work();
        stop.store(true, Ordering::Relaxed);
        out
    })
}
