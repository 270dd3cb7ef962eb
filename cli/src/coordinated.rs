//! `vsnap backup --inventory`: a coordinated, application-consistent
//! backup of many VMs inside one short freeze window.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use vsnap_coordinator::inventory::Inventory;
use vsnap_coordinator::session::{self, Options, Report, VmSnapshot};
use vsnap_engine::format::DiskImage;
use vsnap_engine::pipeline::Progress;
use vsnap_engine::repo::{backup_all, BackupOptions, SnapshotPlan};

use crate::backup::Args;
use crate::units::human;
use crate::FormatArg;

fn ms(us: Option<u64>) -> String {
    us.map_or("-".into(), |u| format!("{:.1} ms", u as f64 / 1000.0))
}

/// What the engine did for the VMs it streamed.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Streamed {
    /// Chunks known before the freeze, from each VM's last snapshot.
    pub preloaded_chunks: u64,
    pub virtual_bytes: u64,
    pub bytes_read: u64,
    pub new_bytes: u64,
    pub seconds: f64,
}

/// `vsnap backup ARGS...` parsed from words, for commands that run a
/// coordinated backup as part of their own work (`demo`, `bench`).
pub fn args_from<I, T>(words: I) -> Result<Args>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    #[derive(clap::Parser)]
    struct Backup {
        #[command(flatten)]
        args: Args,
    }
    use clap::Parser;
    let words = std::iter::once(std::ffi::OsString::from("backup"))
        .chain(words.into_iter().map(Into::into));
    Ok(Backup::try_parse_from(words)?.args)
}

/// Runs the coordinated backup of `inventory` as `args` say: the
/// session's report, and what the engine streamed. `rt` runs it (a new
/// runtime when `None`); `epoch` is the clock the metrics count from.
pub fn backup_inventory(
    args: &Args,
    inventory: &Path,
    rt: Option<&tokio::runtime::Runtime>,
    epoch: Option<std::time::Instant>,
) -> Result<(Report, Streamed)> {
    let inv = Inventory::load(inventory)?;
    let vms = inv.select(&args.vms)?;
    let window = vsnap_coordinator::agent::parse_duration("--window", &args.window)?;
    // Slow work first: the repository is open, and each VM's last
    // snapshot's chunks are known, before any guest freezes.
    let repo = args.repo.open()?;
    crate::backup::check_chunk_size(args, &repo)?;
    let names: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
    let preloaded = repo.preload(&names)?;
    let opts = args.engine.options(false, repo.config().chunk_size)?;
    args.engine.report_fallback(&opts);
    let host = crate::repo::host_name();
    let cancel = Arc::new(AtomicBool::new(false));
    let mut streamed = Streamed {
        preloaded_chunks: preloaded.known.values().map(|k| k.len() as u64).sum(),
        ..Streamed::default()
    };
    // Every disk of every VM streams in one engine run: a VM does not wait
    // for the one before it, and each VM's manifest is written as soon as
    // its own disks are done.
    let stream = |items: &[VmSnapshot]| {
        let t = std::time::Instant::now();
        let mut results: Vec<Option<Result<String, String>>> = vec![None; items.len()];
        let mut opened = Vec::new();
        let mut which = Vec::new();
        for (k, it) in items.iter().enumerate() {
            if cancel.load(Ordering::Relaxed) {
                results[k] = Some(Err("interrupted before its backup".to_string()));
                continue;
            }
            match crate::open_all(&it.snapshots, FormatArg::Auto) {
                Ok(images) => {
                    opened.push(images);
                    which.push(k);
                }
                Err(e) => results[k] = Some(Err(format!("{e:#}"))),
            }
        }
        let plans: Vec<SnapshotPlan<'_>> = which
            .iter()
            .zip(&opened)
            .map(|(&k, images)| {
                let it = &items[k];
                SnapshotPlan {
                    images: images.iter().map(|b| &**b as &dyn DiskImage).collect(),
                    sources: it.sources.clone(),
                    options: BackupOptions {
                        known: preloaded.known.get(&it.vm).cloned().unwrap_or_default(),
                        vm: it.vm.clone(),
                        host: host.clone(),
                        consistency: it.consistency,
                        freeze: Some(it.freeze.clone()),
                        level: args.level,
                    },
                }
            })
            .collect();
        if !plans.is_empty() {
            let progress = Progress::default();
            let outcomes = args
                .output
                .run(&progress, || {
                    backup_all(&repo, &plans, &opts, &progress, &|_, _| {})
                })
                .map_err(|e| e.to_string());
            match outcomes {
                Ok(outcomes) => {
                    for (&k, outcome) in which.iter().zip(outcomes) {
                        results[k] = Some(match outcome {
                            Ok(o) => {
                                for d in &o.manifest.disks {
                                    streamed.virtual_bytes += d.virtual_size;
                                    streamed.bytes_read += d.stats.bytes_read;
                                    streamed.new_bytes += d.stats.new_bytes;
                                }
                                Ok(o.manifest.id)
                            }
                            Err(e) => Err(e.to_string()),
                        });
                    }
                }
                Err(e) => {
                    for &k in &which {
                        results[k] = Some(Err(e.clone()));
                    }
                }
            }
        }
        streamed.seconds = t.elapsed().as_secs_f64();
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err("not streamed".to_string())))
            .collect::<Vec<_>>()
    };
    let sopts = Options {
        window,
        provider: args.provider,
        backup_type: "full".into(),
        epoch,
        cancel: Some(Arc::clone(&cancel)),
    };
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
    // The first Ctrl-C stops the session by its abort rules (every guest
    // thawed at once, no manifest); a second one quits at once.
    // Registered here, before any guest is contacted, not when the task
    // first runs: a signal in between would otherwise kill the process.
    let mut sigint = {
        let _in_rt = rt.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?
    };
    let handler = {
        let cancel = Arc::clone(&cancel);
        rt.spawn(async move {
            while sigint.recv().await.is_some() {
                if cancel.swap(true, Ordering::Relaxed) {
                    std::process::exit(130);
                }
                eprintln!("vsnap: interrupted: thawing every guest and stopping (Ctrl-C again to quit now)");
            }
        })
    };
    let report = rt.block_on(session::run(vms, &sopts, stream));
    handler.abort();
    let report = report.context("coordinated backup failed before any guest was frozen")?;
    args.engine.save_cache(&opts);
    Ok((report, streamed))
}

pub fn run(args: &Args, inventory: &Path, out: &mut dyn Write) -> Result<ExitCode> {
    let (report, streamed) = backup_inventory(args, inventory, None, None)?;
    if args.json {
        #[derive(serde::Serialize)]
        struct Json<'a> {
            #[serde(flatten)]
            report: &'a Report,
            streamed: Streamed,
        }
        let j = Json {
            report: &report,
            streamed,
        };
        writeln!(out, "{}", serde_json::to_string_pretty(&j)?)?;
    } else {
        print_report(&report, &streamed, out)?;
    }
    Ok(exit_code(&report))
}

/// Says on stderr what went wrong, if anything; the exit code follows.
pub fn exit_code(report: &Report) -> ExitCode {
    if let Some(why) = &report.aborted {
        eprintln!("vsnap: error: backup aborted, every guest thawed, nothing written: {why}");
        return ExitCode::FAILURE;
    }
    let failed: Vec<String> = report
        .vms
        .iter()
        .filter_map(|v| v.error.as_ref().map(|e| format!("vm {}: {e}", v.vm)))
        .collect();
    if !failed.is_empty() {
        eprintln!("vsnap: error: {}", failed.join("; "));
        return ExitCode::FAILURE;
    }
    if let Some(e) = &report.release_error {
        eprintln!("vsnap: warning: {e} (the next run removes what is left)");
    }
    ExitCode::SUCCESS
}

pub fn print_report(r: &Report, streamed: &Streamed, out: &mut dyn Write) -> Result<()> {
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
        "{:<16} {:<17} {:<17} {:>7} {:>10} {:>14} {:>14}",
        "VM", "CONSISTENCY", "SNAPSHOT", "FROZEN", "STALL", "FREEZE WINDOW", "HOST WINDOW"
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
            "{:<16} {:<17} {:<17} {:>7} {:>10} {:>14} {:>14}",
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
    }
    Ok(())
}
