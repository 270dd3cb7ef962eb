//! The freeze benchmark behind `vsnap bench freeze`: what a coordinated
//! freeze costs the guests, per snapshot provider, on the lab's throw-away
//! guests (or on an inventory's real ones): freeze windows, stalls, the
//! host's view, barrier skew, snapshot time, and what a writer inside each
//! guest saw during backups and outside them. Each round is one
//! coordinated backup through [`vsnap_coordinator::backup::run`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use vsnap_coordinator::backup::{Plan, Streamed};
use vsnap_coordinator::inventory::Inventory;
use vsnap_coordinator::provider::{Choice, Kind as Provider};
use vsnap_coordinator::session::Report;
use vsnap_engine::pipeline::Progress;
use vsnap_engine::units::human;

use crate::guests::Quiesce;
use crate::workload::{self, Kind, Sample};
use crate::{is_root, Error, Lab, Result};

/// What to measure.
#[derive(Debug, Clone)]
pub struct Study {
    pub guests: usize,
    /// Each guest's virtual disk size (sparse); several for a scaling run.
    pub disk_sizes: Vec<u64>,
    pub providers: Vec<Provider>,
    /// What runs in every guest.
    pub workload: Kind,
    /// Backups per provider (and per disk size).
    pub rounds: usize,
    /// Measure these existing guests instead of building any.
    pub inventory: Option<PathBuf>,
    /// Where the throw-away guests go (a sparse scratch image is made
    /// there), or the inventory run's repository.
    pub scratch: PathBuf,
    /// The coordinator's window and the agents' hold limit.
    pub window: Duration,
    /// Quiet time before and between rounds, for the `outside` figures.
    pub pause: Duration,
    /// How the throw-away guests' agents quiesce.
    pub quiesce: Quiesce,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Spread {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
    pub n: usize,
}

/// Nearest-rank percentiles of `v` (sorted here).
pub fn spread(mut v: Vec<u64>) -> Spread {
    if v.is_empty() {
        return Spread::default();
    }
    v.sort_unstable();
    let at = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Spread {
        p50: at(0.50),
        p99: at(0.99),
        max: v[v.len() - 1],
        n: v.len(),
    }
}

/// One coordinated backup.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub disk_size: u64,
    pub provider: &'static str,
    pub round: usize,
    /// On the bench's clock, µs: when the backup command started and ended.
    pub started_us: u64,
    pub ended_us: u64,
    pub report: Report,
    pub streamed: Streamed,
}

impl Round {
    /// First freeze sent to last thaw acknowledged, on the bench's clock.
    pub fn frozen_span(&self) -> Option<(u64, u64)> {
        let vms = &self.report.vms;
        let a = vms
            .iter()
            .filter_map(|v| v.metrics.freeze_sent_at_us)
            .min()?;
        let b = vms.iter().filter_map(|v| v.metrics.thaw_ack_at_us).max()?;
        Some((a, b))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct WriteStats {
    /// Latency of one write + fdatasync, µs.
    pub during: Spread,
    pub outside: Spread,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub disk_size: u64,
    pub provider: &'static str,
    pub guests: usize,
    pub rounds: usize,
    pub freeze_window_us: Spread,
    /// What the application waited: quiescing's start to FITHAW's return.
    pub stall_us: Spread,
    pub host_window_us: Spread,
    pub barrier_skew_us: Spread,
    pub snapshot_us: Spread,
    pub app_consistent: usize,
    pub writes: Option<WriteStats>,
    /// Virtual bytes of every disk over the time the engine streamed them.
    pub backup_bytes_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Results {
    pub machine: String,
    pub guests: usize,
    pub workload: Kind,
    pub rounds: Vec<Round>,
    pub summary: Vec<Summary>,
    /// Every write of the last disk size's run (for the timeline), µs.
    #[serde(skip)]
    pub samples: Vec<Vec<Sample>>,
}

/// This machine, as a results file names it.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores, {cpu}, Linux {}", kernel.trim())
}

/// The figures of one disk size and provider, over its rounds.
pub fn summarize(
    rounds: &[Round],
    samples: &[Vec<Sample>],
    disk_size: u64,
    provider: &'static str,
    guests: usize,
    all_spans: &[(u64, u64)],
) -> Summary {
    let mine: Vec<&Round> = rounds
        .iter()
        .filter(|r| r.disk_size == disk_size && r.provider == provider)
        .collect();
    let per_vm = |f: &dyn Fn(&vsnap_coordinator::session::VmReport) -> Option<u64>| {
        spread(
            mine.iter()
                .flat_map(|r| r.report.vms.iter().filter_map(f))
                .collect(),
        )
    };
    let per_round = |f: &dyn Fn(&Report) -> Option<u64>| {
        spread(mine.iter().filter_map(|r| f(&r.report)).collect())
    };
    let writes = (!samples.is_empty()).then(|| {
        let spans: Vec<(u64, u64)> = mine.iter().map(|r| (r.started_us, r.ended_us)).collect();
        let mut during = Vec::new();
        let mut outside = Vec::new();
        for &(at, took) in samples.iter().flatten() {
            if spans.iter().any(|&(a, b)| at >= a && at < b) {
                during.push(u64::from(took));
            } else if !all_spans.iter().any(|&(a, b)| at >= a && at < b) {
                outside.push(u64::from(took));
            }
        }
        WriteStats {
            during: spread(during),
            outside: spread(outside),
        }
    });
    let bytes: u64 = mine.iter().map(|r| r.streamed.virtual_bytes).sum();
    let secs: f64 = mine.iter().map(|r| r.streamed.seconds).sum();
    Summary {
        disk_size,
        provider,
        guests,
        rounds: mine.len(),
        freeze_window_us: per_vm(&|v| v.metrics.freeze_window_us),
        stall_us: per_vm(&|v| v.metrics.stall_us),
        host_window_us: per_vm(&|v| v.metrics.host_window_us),
        barrier_skew_us: per_round(&|r| r.barrier_skew_us),
        snapshot_us: per_round(&|r| r.snapshot_us),
        app_consistent: mine
            .iter()
            .flat_map(|r| &r.report.vms)
            .filter(|v| v.consistency == Some("app-consistent"))
            .count(),
        writes,
        backup_bytes_per_s: if secs > 0.0 { bytes as f64 / secs } else { 0.0 },
    }
}

/// What every round of one run shares.
struct Bench<'a> {
    study: &'a Study,
    rt: &'a tokio::runtime::Runtime,
    stop: &'a Arc<AtomicBool>,
    /// The clock of every `*_us` figure: the workloads' and the metrics'.
    epoch: Instant,
}

/// Runs the rounds of every provider against one set of guests.
fn measure(
    b: &Bench<'_>,
    inventory: &Path,
    repo: &Path,
    disk_size: u64,
    rounds: &mut Vec<Round>,
) -> Result<()> {
    let (study, rt, stop, epoch) = (b.study, b.rt, b.stop, b.epoch);
    let vms = Inventory::load(inventory).map_err(Box::new)?.vms;
    let repository = vsnap_repo::Repository::open(repo)?;
    for &provider in &study.providers {
        for round in 0..study.rounds {
            std::thread::sleep(study.pause);
            if stop.load(Ordering::Relaxed) {
                return Err(interrupted());
            }
            let plan = Plan {
                window: study.window,
                provider: Choice::Force(provider),
                epoch: Some(epoch),
                // Every round reads its disks whole, whatever the provider,
                // so that rounds and providers stream alike and only the
                // snapshot differs.
                track: false,
                ..Plan::new(vms.clone())
            };
            let started = epoch.elapsed();
            let progress = Progress::default();
            let report = rt
                .block_on(vsnap_coordinator::backup::run(
                    &plan,
                    &repository,
                    &progress,
                    Arc::clone(stop),
                ))
                .map_err(Box::new)?;
            let ended = epoch.elapsed();
            if let Some(why) = &report.session.aborted {
                return Err(Error::Refused {
                    what: format!("{} round {round}", provider.name()),
                    reason: format!("the backup aborted: {why}"),
                });
            }
            rounds.push(Round {
                disk_size,
                provider: provider.name(),
                round,
                started_us: vsnap_protocol::micros(started),
                ended_us: vsnap_protocol::micros(ended),
                report: report.session,
                streamed: report.streamed,
            });
        }
    }
    std::thread::sleep(study.pause);
    Ok(())
}

fn interrupted() -> Error {
    Error::Refused {
        what: "the benchmark".into(),
        reason: "interrupted: the guests are thawed and taken down".into(),
    }
}

/// Runs `study` on `rt`. `stop`, once set (by a signal handler), ends it
/// after the current round, or aborts that round by the abort rules; the
/// lab is taken down either way. `note` hears what is being built.
pub fn run(
    study: &Study,
    rt: &tokio::runtime::Runtime,
    stop: &Arc<AtomicBool>,
    note: &dyn Fn(&str),
) -> Result<Results> {
    if study.guests == 0 || study.rounds == 0 {
        return Err(Error::Refused {
            what: "the benchmark".into(),
            reason: "it needs at least one guest and one round".into(),
        });
    }
    if study.inventory.is_none() && !is_root() {
        return Err(Error::Refused {
            what: "vsnap bench freeze".into(),
            reason: "it builds throw-away guests (loop devices, mounts, FIFREEZE): run it as root, or measure existing guests with --inventory FILE".into(),
        });
    }
    let epoch = Instant::now();
    let bench = Bench {
        study,
        rt,
        stop,
        epoch,
    };
    let mut rounds = Vec::new();
    let mut summary = Vec::new();
    let mut samples = Vec::new();
    let names: Vec<&'static str> = study.providers.iter().map(|p| p.name()).collect();
    if let Some(inv) = &study.inventory {
        let repo = study
            .scratch
            .join(format!("vsnap-bench-repo-{}", std::process::id()));
        vsnap_repo::Repository::init(&repo, vsnap_repo::DEFAULT_CHUNK_SIZE)?;
        let guests = Inventory::load(inv).map_err(Box::new)?.vms.len();
        let measured = measure(&bench, inv, &repo, 0, &mut rounds);
        let _ = std::fs::remove_dir_all(&repo);
        measured?;
        let spans: Vec<(u64, u64)> = rounds.iter().map(|r| (r.started_us, r.ended_us)).collect();
        for p in &names {
            summary.push(summarize(&rounds, &[], 0, p, guests, &spans));
        }
    } else {
        for &size in &study.disk_sizes {
            note(&format!(
                "building {} guest(s) of {} MiB under {}",
                study.guests,
                size >> 20,
                study.scratch.display()
            ));
            let dir = study.scratch.join(format!(
                "vsnap-bench-{}-{}",
                std::process::id(),
                study.guests
            ));
            let mut lab = Lab::build(&dir, study.guests, size)?;
            rt.block_on(lab.serve_agents(study.window, study.quiesce))?;
            let inv = lab.inventory(|_| String::new())?;
            let repo = lab.dir.join("repo");
            vsnap_repo::Repository::init(&repo, vsnap_repo::DEFAULT_CHUNK_SIZE)?;
            let mut loads = Vec::new();
            for (i, g) in lab.guests.iter().enumerate() {
                loads.push(workload::start(
                    study.workload,
                    g.mount(),
                    (64 << 20).min(size / 4),
                    epoch,
                    0x9e37_79b9 + i as u64,
                )?);
            }
            let first = rounds.len();
            let measured = measure(&bench, &inv, &repo, size, &mut rounds);
            let mut these = Vec::new();
            for w in loads.into_iter().flatten() {
                these.push(w.finish()?);
            }
            drop(lab);
            measured?;
            let spans: Vec<(u64, u64)> = rounds[first..]
                .iter()
                .map(|r| (r.started_us, r.ended_us))
                .collect();
            for p in &names {
                summary.push(summarize(&rounds, &these, size, p, study.guests, &spans));
            }
            samples = these;
        }
    }
    Ok(Results {
        machine: machine(),
        guests: summary.first().map_or(study.guests, |s| s.guests),
        workload: if study.inventory.is_some() {
            Kind::None
        } else {
            study.workload
        },
        rounds,
        summary,
        samples,
    })
}

fn ms(us: u64) -> String {
    format!("{:.1}", us as f64 / 1000.0)
}

/// The summary as a table: a line per disk size and provider, times in
/// ms.
pub fn table(r: &Results, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(out, "machine: {}", r.machine)?;
    writeln!(
        out,
        "{} guest(s), workload {}; times in ms (p50 / p99 / max)",
        r.guests,
        r.workload.name()
    )?;
    writeln!(
        out,
        "{:>9} {:<8} {:>22} {:>22} {:>16} {:>14} {:>14} {:>22} {:>16} {:>10}",
        "DISK",
        "PROVIDER",
        "STALL",
        "FREEZE WINDOW",
        "HOST WINDOW",
        "BARRIER SKEW",
        "SNAPSHOT",
        "WRITE DURING p99/max",
        "WRITE OUTSIDE p99",
        "BACKUP/s"
    )?;
    for s in &r.summary {
        let f = &s.freeze_window_us;
        let st = &s.stall_us;
        let (during, outside) = match &s.writes {
            Some(w) => (
                format!("{} / {}", ms(w.during.p99), ms(w.during.max)),
                ms(w.outside.p99),
            ),
            None => ("-".into(), "-".into()),
        };
        writeln!(
            out,
            "{:>9} {:<8} {:>22} {:>22} {:>16} {:>14} {:>14} {:>22} {:>16} {:>10}",
            if s.disk_size == 0 {
                "-".into()
            } else {
                human(s.disk_size)
            },
            s.provider,
            format!("{} / {} / {}", ms(st.p50), ms(st.p99), ms(st.max)),
            format!("{} / {} / {}", ms(f.p50), ms(f.p99), ms(f.max)),
            format!(
                "{} / {}",
                ms(s.host_window_us.p50),
                ms(s.host_window_us.max)
            ),
            format!(
                "{} / {}",
                ms(s.barrier_skew_us.p50),
                ms(s.barrier_skew_us.max)
            ),
            format!("{} / {}", ms(s.snapshot_us.p50), ms(s.snapshot_us.max)),
            during,
            outside,
            human(s.backup_bytes_per_s as u64),
        )?;
        let total = s.rounds * s.guests;
        if s.app_consistent < total {
            writeln!(
                out,
                "          {} of {} guest backups were app-consistent (a freeze outlived the window?)",
                s.app_consistent, total
            )?;
        }
    }
    Ok(())
}
