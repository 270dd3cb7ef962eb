//! `vsnap backup --inventory`: a coordinated, application-consistent
//! backup of many VMs inside one short freeze window.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use vsnap_coordinator::inventory::Inventory;
use vsnap_coordinator::session::{self, Options, Report, VmSnapshot};
use vsnap_engine::format::DiskImage;
use vsnap_engine::pipeline::Progress;
use vsnap_engine::repo::{backup, BackupOptions};

use crate::backup::Args;
use crate::FormatArg;

fn ms(us: Option<u64>) -> String {
    us.map_or("-".into(), |u| format!("{:.1} ms", u as f64 / 1000.0))
}

pub fn run(args: &Args, inventory: &Path, out: &mut dyn Write) -> Result<ExitCode> {
    let inv = Inventory::load(inventory)?;
    let vms = inv.select(&args.vms)?;
    let window = vsnap_coordinator::agent::parse_duration("--window", &args.window)?;
    // Slow work first: the repository is open before any guest freezes.
    let repo = args.repo.open()?;
    let opts = args
        .engine
        .options_with_chunk(false, repo.config().chunk_size);
    args.engine.report_fallback(&opts);
    let host = crate::repo::host_name();
    let stream = |items: &[VmSnapshot]| {
        items
            .iter()
            .map(|it| {
                let images = crate::open_all(&it.snapshots, FormatArg::Auto)
                    .map_err(|e| format!("{e:#}"))?;
                let refs: Vec<&dyn DiskImage> = images.iter().map(|b| &**b).collect();
                let spec = BackupOptions {
                    vm: it.vm.clone(),
                    host: host.clone(),
                    consistency: it.consistency,
                    freeze: Some(it.freeze.clone()),
                    level: args.level,
                };
                let progress = Progress::default();
                args.output
                    .run(&progress, || {
                        backup(&repo, &refs, &it.sources, &opts, &spec, &progress)
                    })
                    .map(|o| o.manifest.id)
                    .map_err(|e| e.to_string())
            })
            .collect()
    };
    let sopts = Options {
        window,
        provider: args.provider,
        backup_type: "full".into(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt
        .block_on(session::run(vms, &sopts, stream))
        .context("coordinated backup failed before any guest was frozen")?;
    args.engine.save_cache(&opts);
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        print_report(&report, out)?;
    }
    if let Some(why) = &report.aborted {
        eprintln!("vsnap: error: backup aborted, every guest thawed, nothing written: {why}");
        return Ok(ExitCode::FAILURE);
    }
    let failed: Vec<String> = report
        .vms
        .iter()
        .filter_map(|v| v.error.as_ref().map(|e| format!("vm {}: {e}", v.vm)))
        .collect();
    if !failed.is_empty() {
        eprintln!("vsnap: error: {}", failed.join("; "));
        return Ok(ExitCode::FAILURE);
    }
    if let Some(e) = &report.release_error {
        eprintln!("vsnap: warning: {e} (the next run removes what is left)");
    }
    Ok(ExitCode::SUCCESS)
}

fn print_report(r: &Report, out: &mut dyn Write) -> Result<()> {
    let providers: Vec<&str> = r.snapshots.iter().map(|s| s.provider.name()).collect();
    let mut p = providers.clone();
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
        "{:<16} {:<17} {:<17} {:>7} {:>14} {:>14}",
        "VM", "CONSISTENCY", "SNAPSHOT", "FROZEN", "FREEZE WINDOW", "HOST WINDOW"
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
            "{:<16} {:<17} {:<17} {:>7} {:>14} {:>14}",
            v.vm,
            v.consistency.unwrap_or("failed"),
            v.snapshot.as_deref().unwrap_or("-"),
            frozen,
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
    }
    Ok(())
}
