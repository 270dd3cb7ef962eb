//! `vsnap bench freeze`: what a coordinated freeze costs the guests, per
//! snapshot provider, measured on throw-away guests (or on an inventory's
//! real ones): freeze windows, the host's view, barrier skew, snapshot
//! time, and what a writer inside each guest saw during backups and
//! outside them.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;
use vsnap_coordinator::session::Report;

use super::lab::{is_root, Lab};
use super::workload::{self, Kind, Sample};
use crate::units::{human, parse_size};

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProviderSel {
    Reflink,
    Copy,
    All,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Builds its guests (root only): an XFS scratch filesystem with reflink on a
loop device under --scratch, one fixed VHD per guest on it, its data area
on a loop device, ext4, mounted, a vsnap agent freezing it, and the
workload writing into it. Each round is a coordinated backup of every
guest into a repository beside them. Everything is thawed, unmounted and
detached at the end, on error too. With --inventory it uses existing guests
and builds nothing (no workload then: measure the guests' own).

Stall: the agent's clock, from the start of quiescing (freeze hooks, then
FIFREEZE, which first writes back the filesystem's dirty data) until FITHAW
returned: what the guest's application waits. Prepare flushes each mount
(syncfs) first, so the freeze finds little to write; --no-prepare-sync
measures without it.
Freeze window: the agent's clock, last FIFREEZE returned to first FITHAW:
the time the filesystem is frozen, inside the stall.
Host window: the coordinator's, freeze acknowledged to thaw acknowledged.
Write latency: one write plus fdatasync in a guest; `during` counts the
writes that started while a backup ran.")]
pub struct Args {
    /// How many guests.
    #[arg(long, default_value_t = 4)]
    guests: usize,
    /// Each guest's virtual disk size (sparse); repeat for a scaling run.
    #[arg(long = "disk-size", value_parser = parse_size, default_value = "1G")]
    disk_sizes: Vec<u64>,
    /// Which snapshot providers to measure.
    #[arg(long, value_enum, default_value_t = ProviderSel::All)]
    provider: ProviderSel,
    /// What runs in every guest.
    #[arg(long, value_enum, default_value_t = Kind::Random4kFsync)]
    workload: Kind,
    /// Backups per provider (and per disk size).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// Write an SVG: write latency over time with the freezes shaded, and
    /// the freeze window against disk size for each provider.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Measure these existing guests instead of building any.
    #[arg(long, value_name = "FILE")]
    inventory: Option<PathBuf>,
    /// Where the throw-away guests go (a sparse scratch image is made there).
    #[arg(long, default_value = "/var/tmp")]
    scratch: PathBuf,
    /// The coordinator's window and the agents' hold limit.
    #[arg(long, default_value = "30s")]
    window: String,
    /// Quiet time before and between rounds, for the `outside` figures.
    #[arg(long, default_value = "1s")]
    pause: String,
    /// The throw-away guests' agents skip Prepare's flush (syncfs), to
    /// measure what it saves the stall.
    #[arg(long)]
    no_prepare_sync: bool,
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
    pub streamed: crate::coordinated::Streamed,
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

fn machine() -> String {
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

fn summarize(
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

fn providers(sel: ProviderSel) -> Vec<&'static str> {
    match sel {
        ProviderSel::Reflink => vec!["reflink"],
        ProviderSel::Copy => vec!["copy"],
        ProviderSel::All => vec!["reflink", "copy"],
    }
}

/// Runs the rounds of every provider against one set of guests.
#[allow(clippy::too_many_arguments)]
fn measure(
    args: &Args,
    rt: &tokio::runtime::Runtime,
    inventory: &std::path::Path,
    repo: &std::path::Path,
    disk_size: u64,
    epoch: Instant,
    pause: Duration,
    rounds: &mut Vec<Round>,
) -> Result<()> {
    let window = args.window.clone();
    for provider in providers(args.provider) {
        for round in 0..args.rounds {
            std::thread::sleep(pause);
            if STOP.load(std::sync::atomic::Ordering::Relaxed) {
                bail!("interrupted: the guests are thawed and taken down");
            }
            let words = [
                "-q",
                "--inventory",
                &inventory.display().to_string(),
                "--repo",
                &repo.display().to_string(),
                "--provider",
                provider,
                "--window",
                &window,
            ]
            .map(str::to_string);
            let bargs = crate::coordinated::args_from(words)?;
            let started = epoch.elapsed();
            let (report, streamed) =
                crate::coordinated::backup_inventory(&bargs, inventory, Some(rt), Some(epoch))?;
            let ended = epoch.elapsed();
            if let Some(why) = &report.aborted {
                bail!("{provider} round {round}: the backup aborted: {why}");
            }
            rounds.push(Round {
                disk_size,
                provider,
                round,
                started_us: vsnap_coordinator::micros(started),
                ended_us: vsnap_coordinator::micros(ended),
                report,
                streamed,
            });
        }
    }
    std::thread::sleep(pause);
    Ok(())
}

pub fn run(args: &Args, out: &mut dyn Write) -> Result<ExitCode> {
    if args.guests == 0 || args.rounds == 0 {
        bail!("--guests and --rounds must be at least 1");
    }
    let window = vsnap_coordinator::agent::parse_duration("--window", &args.window)?;
    let pause = vsnap_coordinator::agent::parse_duration("--pause", &args.pause)?;
    if args.inventory.is_none() && !is_root() {
        bail!(
            "vsnap bench freeze builds throw-away guests (loop devices, mounts, FIFREEZE): run it as root, or measure existing guests with --inventory FILE"
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // SIGINT or SIGTERM ends the run after the current round, so the lab
    // is taken down by its drop (the agents thaw on the signal at once).
    rt.spawn(async {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        STOP.store(true, std::sync::atomic::Ordering::Relaxed);
        eprintln!("vsnap bench: interrupted; finishing the round, then taking the guests down");
    });
    let epoch = Instant::now();
    let mut rounds = Vec::new();
    let mut summary = Vec::new();
    let mut samples = Vec::new();
    if let Some(inv) = &args.inventory {
        let repo = args
            .scratch
            .join(format!("vsnap-bench-repo-{}", std::process::id()));
        vsnap_engine::repo::Repository::init(&repo, 4 << 20)?;
        let guests = vsnap_coordinator::inventory::Inventory::load(inv)?
            .vms
            .len();
        let measured = measure(args, &rt, inv, &repo, 0, epoch, pause, &mut rounds);
        let _ = std::fs::remove_dir_all(&repo);
        measured?;
        let spans: Vec<(u64, u64)> = rounds.iter().map(|r| (r.started_us, r.ended_us)).collect();
        for p in providers(args.provider) {
            summary.push(summarize(&rounds, &[], 0, p, guests, &spans));
        }
    } else {
        for &size in &args.disk_sizes {
            eprintln!(
                "vsnap bench: building {} guest(s) of {} under {}",
                args.guests,
                human(size),
                args.scratch.display()
            );
            let lab = rt.block_on(Lab::build(
                &args.scratch,
                args.guests,
                size,
                window,
                !args.no_prepare_sync,
            ))?;
            let inv = lab.inventory()?;
            let repo = lab.dir.join("repo");
            vsnap_engine::repo::Repository::init(&repo, 4 << 20)?;
            let mut loads = Vec::new();
            for (i, g) in lab.guests.iter().enumerate() {
                loads.push(workload::start(
                    args.workload,
                    &g.mount,
                    (64 << 20).min(size / 4),
                    epoch,
                    0x9e37_79b9 + i as u64,
                )?);
            }
            let first = rounds.len();
            let measured = measure(args, &rt, &inv, &repo, size, epoch, pause, &mut rounds);
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
            for p in providers(args.provider) {
                summary.push(summarize(&rounds, &these, size, p, args.guests, &spans));
            }
            samples = these;
        }
    }
    let results = Results {
        machine: machine(),
        guests: summary.first().map_or(args.guests, |s| s.guests),
        workload: if args.inventory.is_some() {
            Kind::None
        } else {
            args.workload
        },
        rounds,
        summary,
        samples,
    };
    if let Some(p) = &args.plot {
        super::plot::freeze(&results, p)?;
    }
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&results)?)?;
    } else {
        table(&results, out)?;
        if let Some(p) = &args.plot {
            writeln!(out, "plot: {}", p.display())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn ms(us: u64) -> String {
    format!("{:.1}", us as f64 / 1000.0)
}

fn table(r: &Results, out: &mut dyn Write) -> Result<()> {
    writeln!(out, "machine: {}", r.machine)?;
    writeln!(
        out,
        "{} guest(s), workload {}; times in ms (p50 / p99 / max)",
        r.guests,
        serde_json::to_value(r.workload)?.as_str().unwrap_or("?")
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
