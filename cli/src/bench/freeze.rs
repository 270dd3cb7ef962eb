//! `vsnap bench freeze`: what a coordinated freeze costs the guests. The
//! benchmark is the lab's ([`vsnap_lab::freeze_bench`]); this module turns
//! arguments into its study, owns the runtime and the signals, and has the
//! table, the JSON or the plot printed.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use vsnap_coordinator::provider::Kind as Provider;
use vsnap_lab::freeze_bench::{self, Study};
use vsnap_lab::guests::Quiesce;
use vsnap_lab::workload::Kind;

use crate::units::{parse_duration, parse_size};

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
measures without it. FIFREEZE waits out three RCU grace periods, which the
agents expedite for its few milliseconds; --no-expedite-freeze measures
without that.
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
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = parse_duration)]
    window: Duration,
    /// Quiet time before and between rounds, for the `outside` figures.
    #[arg(long, default_value = "1s", value_name = "DURATION", value_parser = parse_duration)]
    pause: Duration,
    /// The throw-away guests' agents skip Prepare's flush (syncfs), to
    /// measure what it saves the stall.
    #[arg(long)]
    no_prepare_sync: bool,
    /// The throw-away guests' agents freeze with normal RCU grace periods,
    /// to measure what expediting them saves the stall.
    #[arg(long)]
    no_expedite_freeze: bool,
}

fn providers(sel: ProviderSel) -> Vec<Provider> {
    match sel {
        ProviderSel::Reflink => vec![Provider::Reflink],
        ProviderSel::Copy => vec![Provider::Copy],
        ProviderSel::All => vec![Provider::Reflink, Provider::Copy],
    }
}

pub fn run(args: &Args, out: &mut dyn Write) -> Result<ExitCode> {
    let study = Study {
        guests: args.guests,
        disk_sizes: args.disk_sizes.clone(),
        providers: providers(args.provider),
        workload: args.workload,
        rounds: args.rounds,
        inventory: args.inventory.clone(),
        scratch: args.scratch.clone(),
        window: args.window,
        pause: args.pause,
        quiesce: Quiesce {
            prepare_sync: !args.no_prepare_sync,
            expedite_freeze: !args.no_expedite_freeze,
        },
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // SIGINT or SIGTERM aborts the round under way by the abort rules
    // (every guest thawed at once) and ends the run; the lab is taken
    // down by its drop.
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        rt.spawn(async move {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            stop.store(true, Ordering::Relaxed);
            eprintln!("vsnap bench: interrupted; thawing, then taking the guests down");
        });
    }
    let results = freeze_bench::run(&study, &rt, &stop, &|note| eprintln!("vsnap bench: {note}"))?;
    if let Some(p) = &args.plot {
        vsnap_lab::plot::freeze(&results, p)?;
    }
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&results)?)?;
    } else {
        freeze_bench::table(&results, out)?;
        if let Some(p) = &args.plot {
            writeln!(out, "plot: {}", p.display())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
