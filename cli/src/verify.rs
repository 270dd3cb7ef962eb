//! `vsnap verify`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use vsnap_engine::pipeline::Progress;

use crate::engine_args::EngineArgs;
use crate::repo::RepoArg;
use crate::units::human;

use crate::DAMAGED;

#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Checks every manifest's self-digest, every index's digest, and reads every
chunk the chosen snapshots reference (all snapshots when none is named), in
inode order: its CRC32C, its decompression and the BLAKE3 of its plaintext,
which must equal its name. Each problem is reported with the snapshots and
disks it hits. Bad chunks are moved aside (renamed *.bad; in a bucket,
where objects are never rewritten, recorded under bad/), so the next
backup that meets their content stores it again, and the snapshots that
named them read the new copy.

With SNAPSHOT:DISK --against IMAGE, compares a backed-up disk with a live
image instead: the image's virtual-disk digest against the one recorded.

Exit codes:
  0  everything checked is sound (or the image matches)
  1  the repository could not be read
  2  bad command-line usage
  3  damage found (or the image differs)")]
pub struct Args {
    /// Snapshots to verify (ids, unique prefixes, or `latest` for the
    /// newest); all when none.
    #[arg(value_name = "SNAPSHOT")]
    snapshots: Vec<String>,
    /// Compare SNAPSHOT:DISK with this image by digest.
    #[arg(long, value_name = "IMAGE")]
    against: Option<PathBuf>,
    #[command(flatten)]
    repo: RepoArg,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    output: crate::progress::ProgressArgs,
}

pub fn run(args: &Args, out: &mut dyn Write) -> Result<ExitCode> {
    let repo = args.repo.open()?;
    if let Some(image) = &args.against {
        return against(args, &repo, image, out);
    }
    let opts = args.engine.options(false, repo.config().chunk_size)?;
    let progress = Progress::default();
    let started = std::time::Instant::now();
    let report = args
        .output
        .run(&progress, || {
            vsnap_repo::verify::verify(
                &repo,
                &args.snapshots,
                opts.worker_count(),
                opts.zero_cache.as_deref(),
                &progress,
            )
        })
        .context("verify failed")?;
    args.engine.save_cache(&opts);
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        for p in &report.problems {
            writeln!(
                out,
                "BAD {} {}: {}\n    hits: {}",
                p.what,
                p.name,
                p.error,
                p.affects.join(", ")
            )?;
        }
        writeln!(
            out,
            "{}: {} snapshot(s), {} disk(s), {} chunk(s) ({}) checked in {:.2} s ({}/s){}",
            if report.ok() { "ok" } else { "DAMAGED" },
            report.snapshots,
            report.disks,
            report.chunks,
            human(report.bytes),
            secs,
            human((report.bytes as f64 / secs) as u64),
            if report.moved_aside > 0 {
                format!("; {} bad chunk(s) moved aside", report.moved_aside)
            } else {
                String::new()
            }
        )?;
        if report.unreferenced_chunks > 0 {
            writeln!(
                out,
                "{} chunk(s) that no snapshot names (an interrupted or running backup's, or forgotten snapshots'): `vsnap gc` removes what no running backup holds",
                report.unreferenced_chunks
            )?;
        }
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(DAMAGED)
    })
}

fn against(
    args: &Args,
    repo: &vsnap_repo::Repository,
    image: &std::path::Path,
    out: &mut dyn Write,
) -> Result<ExitCode> {
    let [what] = &args.snapshots[..] else {
        anyhow::bail!("--against compares one SNAPSHOT:DISK with one image");
    };
    let opts = args.engine.options(false, repo.config().chunk_size)?;
    let progress = Progress::default();
    let report = args.output.run(&progress, || {
        vsnap_repo::against::against(repo, what, image, &opts, &progress)
    })?;
    args.engine.save_cache(&opts);
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else if report.matches {
        writeln!(
            out,
            "ok: {} matches {}:{} ({})",
            image.display(),
            report.snapshot,
            report.disk,
            report.recorded
        )?;
    } else {
        writeln!(
            out,
            "DIFFERS: {} has digest {}, {}:{} recorded {}",
            image.display(),
            report.computed,
            report.snapshot,
            report.disk,
            report.recorded
        )?;
    }
    Ok(if report.matches {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(DAMAGED)
    })
}
