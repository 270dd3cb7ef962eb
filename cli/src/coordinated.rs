//! `vsnap backup --inventory`: a coordinated, application-consistent
//! backup of many VMs inside one short freeze window. The operation is
//! the coordinator's ([`vsnap_coordinator::backup::run`]); this module
//! turns arguments into its plan, owns the runtime and Ctrl-C, and
//! prints the report.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use vsnap_coordinator::backup::{self, Plan, Report};
use vsnap_coordinator::inventory::Inventory;
use vsnap_coordinator::ErrorKind;
use vsnap_engine::pipeline::Progress;
use vsnap_repo::Repository;

use crate::backup::Args;
use crate::progress::ProgressArgs;
use crate::units::human;

fn ms(us: Option<u64>) -> String {
    us.map_or("-".into(), |u| format!("{:.1} ms", u as f64 / 1000.0))
}

/// The plan `vsnap backup --inventory FILE` asks for.
pub fn plan(args: &Args, inventory: &Path) -> Result<Plan> {
    let vms = Inventory::load(inventory)?.select(&args.vms)?;
    Ok(Plan {
        chunk_size: args.chunk_size,
        window: args.window,
        provider: args.provider,
        level: args.level,
        tuning: args.engine.tuning(),
        // This binary guards qemu-ga guests' freezes (`vsnap __qga-guard`).
        guard: std::env::current_exe().ok(),
        track: !args.no_track,
        ..Plan::new(vms)
    })
}

/// Runs `plan` on `rt` (a runtime of its own when `None`), with progress
/// as `output` says. The first Ctrl-C stops the backup by its abort rules
/// (every guest thawed at once, no manifest); a second one quits at once.
pub fn run_plan(
    plan: &Plan,
    repo: &Repository,
    rt: Option<&tokio::runtime::Runtime>,
    output: &ProgressArgs,
) -> Result<Report> {
    let own;
    let rt = match rt {
        Some(rt) => rt,
        None => {
            own = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            &own
        }
    };
    let cancel = Arc::new(AtomicBool::new(false));
    // Registered before any guest is contacted, not when the task first
    // runs: a signal in between would otherwise kill the process.
    let mut sigint = {
        let _in_rt = rt.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?
    };
    let progress = Arc::new(Progress::default());
    let handler = {
        let cancel = Arc::clone(&cancel);
        let progress = Arc::clone(&progress);
        rt.spawn(async move {
            while sigint.recv().await.is_some() {
                if cancel.swap(true, Ordering::Relaxed) {
                    std::process::exit(130);
                }
                // The streaming too: no snapshot not read whole is
                // committed.
                progress.request_stop();
                say!("vsnap: interrupted: thawing every guest and stopping (Ctrl-C again to quit now)");
            }
        })
    };
    let report = output.run(&progress, || {
        rt.block_on(backup::run(plan, repo, &progress, Arc::clone(&cancel)))
    });
    handler.abort();
    let report = report.map_err(|e| match &e.kind {
        ErrorKind::ChunkSize { repo, have, want } => crate::usage::chunk_size(*want, *have, repo),
        ErrorKind::Engine(inner) => match inner.kind() {
            vsnap_repo::ErrorKind::Engine(k) => crate::engine_args::memory_usage(k),
            _ => None,
        }
        .unwrap_or_else(|| {
            anyhow::Error::new(e).context("coordinated backup failed before any guest was frozen")
        }),
        _ => anyhow::Error::new(e).context("coordinated backup failed before any guest was frozen"),
    })?;
    for w in &report.warnings {
        say!("vsnap: warning: {w}");
    }
    Ok(report)
}

pub fn run(args: &Args, inventory: &Path, out: &mut dyn Write) -> Result<ExitCode> {
    let plan = plan(args, inventory)?;
    // Slow work first, before any guest is contacted: a repository that
    // cannot be opened stops the backup here.
    let repo = args
        .repo
        .open()
        .context("coordinated backup failed before any guest was frozen")?;
    args.engine.report_fallback();
    let report = run_plan(&plan, &repo, None, &args.output)?;
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        print_report(&report, out)?;
    }
    Ok(exit_code(&report))
}

/// Says on stderr what went wrong, if anything; the exit code follows.
pub fn exit_code(report: &Report) -> ExitCode {
    if let Some(why) = report.failure() {
        say!("vsnap: error: {why}");
        return ExitCode::FAILURE;
    }
    if let Some(e) = &report.session.release_error {
        say!("vsnap: warning: {e} (the next run finishes what is left)");
    }
    ExitCode::SUCCESS
}

pub fn print_report(report: &Report, out: &mut dyn Write) -> Result<()> {
    let (r, streamed) = (&report.session, &report.streamed);
    let mut p: Vec<&str> = r.snapshots.iter().map(|s| s.provider.name()).collect();
    p.dedup();
    writeln!(
        out,
        "{} VM(s): window {} (limit {} ms), barrier skew {}, snapshot {} ({})",
        r.vms.len(),
        ms(r.window_us),
        r.window_limit_ms,
        ms(r.barrier_skew_us),
        ms(r.snapshot_us),
        if p.is_empty() {
            "none".into()
        } else {
            p.join("+")
        }
    )?;
    writeln!(
        out,
        "{:<16} {:<17} {:<17} {:>11} {:>10} {:>14} {:>14}",
        "VM", "CONSISTENCY", "SNAPSHOT", "FILESYSTEMS", "STALL", "FREEZE WINDOW", "HOST WINDOW"
    )?;
    for v in &r.vms {
        let m = &v.metrics;
        let frozen = match (m.frozen, m.expected) {
            (Some(f), Some(e)) => format!("{f}/{e}"),
            (Some(f), None) => f.to_string(),
            _ => "-".into(),
        };
        writeln!(
            out,
            "{:<16} {:<17} {:<17} {:>11} {:>10} {:>14} {:>14}",
            v.vm,
            v.consistency.unwrap_or("failed"),
            v.snapshot.as_deref().unwrap_or("-"),
            frozen,
            ms(m.stall_us),
            ms(m.freeze_window_us),
            ms(m.host_window_us),
        )?;
        if let Some(d) = &v.degraded {
            writeln!(out, "  {}: {d}", v.vm)?;
        }
        if let Some(e) = &v.error {
            writeln!(out, "  {}: {e}", v.vm)?;
        }
    }
    if let Some(a) = &r.aborted {
        writeln!(out, "aborted: {a}")?;
    } else if streamed.seconds > 0.0 {
        writeln!(
            out,
            "streamed after the thaw: {} virtual, {} read, {} new, in {:.2} s ({}/s)",
            human(streamed.virtual_bytes),
            human(streamed.bytes_read),
            human(streamed.new_bytes),
            streamed.seconds,
            human((streamed.virtual_bytes as f64 / streamed.seconds) as u64)
        )?;
        if streamed.reused_chunks > 0 {
            writeln!(
                out,
                "changed-block tracking: {} chunk(s) unchanged since the last backup, taken unread",
                streamed.reused_chunks
            )?;
        }
    }
    if r.overlays_recovered > 0 {
        writeln!(
            out,
            "merged back {} overlay(s) an earlier run left, before the freeze",
            r.overlays_recovered
        )?;
    }
    if let Some(c) = r.commit_us {
        writeln!(out, "overlays merged back (qmp) in {}", ms(Some(c)))?;
    }
    Ok(())
}
