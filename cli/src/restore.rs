//! `vsnap restore`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use serde::Serialize;
use vsnap_engine::pipeline::Progress;
use vsnap_repo::restore::restore;

use crate::copy::OutFormat;
use crate::engine_args::EngineArgs;
use crate::repo::RepoArg;
use crate::units::human;

#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
SNAPSHOT is a snapshot id or a unique prefix of one. With :DISK one disk is
restored: DISK is a disk's name as `vsnap snapshots` shows it, or its
position in the snapshot counted from 1 (SNAP:1 is the first disk). PATH is
then the file to write, or a directory to write it into under its own name.
Without :DISK every disk of the snapshot is restored into the directory
PATH, under its own name; a snapshot of one disk may also be restored to a
file path. With --format other than same, names in a directory take the
format's extension (.vhd, .vhdx, .raw), as `vsnap copy` names copies.

Disks are restored in parallel, chunks straight from the repository, holes
left sparse. With --format same (the default) each image gets back its
container: a fixed VHD byte for byte, a dynamic one with its block size,
geometry and unique id, raw as raw. The digest of what was written is
checked against the one the backup recorded before the file is renamed
into place.

Exit codes:
  0  restored and checked
  1  the repository or a target could not be read or written, or the
     restored digest differs (the message says which disk)
  2  bad command-line usage")]
pub struct Args {
    /// SNAPSHOT or SNAPSHOT:DISK: a snapshot id or a prefix of one that
    /// names one snapshot, or `latest` for the newest.
    #[arg(value_name = "SNAPSHOT[:DISK]")]
    what: String,
    /// The directory to restore into, or the file to write (one disk).
    #[arg(long, value_name = "PATH")]
    to: PathBuf,
    #[arg(long = "format", value_enum, default_value_t)]
    out_format: OutFormat,
    /// Replace files that exist (each only once its replacement is whole).
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    repo: RepoArg,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    output: crate::progress::ProgressArgs,
}

#[derive(Serialize)]
struct JsonRestore {
    disk: String,
    target: PathBuf,
    format: &'static str,
    digest: String,
    virtual_size: u64,
    bytes_written: u64,
}

pub fn run(args: &Args, out: &mut dyn Write) -> Result<ExitCode> {
    let repo = args.repo.open()?;
    let plan = vsnap_repo::restore::plan(
        &repo,
        &args.what,
        &args.to,
        args.out_format.target(),
        args.force,
    )?;
    let opts = args.engine.options(false, repo.config().chunk_size)?;
    let progress = Progress::default();
    let started = std::time::Instant::now();
    let results = args
        .output
        .run(&progress, || restore(&repo, &plan.specs, &opts, &progress))
        .context("restore failed")?;
    args.engine.save_cache(&opts);
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    let reports: Vec<JsonRestore> = results
        .iter()
        .zip(&plan.specs)
        .map(|(r, s)| JsonRestore {
            disk: s.disk.name.clone(),
            target: r.target.clone(),
            format: r.format.name(),
            digest: r.source.digest.to_hex().to_string(),
            virtual_size: r.source.virtual_size,
            bytes_written: r.bytes_written,
        })
        .collect();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&reports)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    for r in &reports {
        writeln!(out, "{}  {}", r.digest, r.target.display())?;
    }
    let total: u64 = reports.iter().map(|r| r.virtual_size).sum();
    say!(
        "restored {} disk(s) of snapshot {}: {} virtual in {:.2} s ({}/s), digests match the backup",
        reports.len(),
        plan.snapshot,
        human(total),
        secs,
        human((total as f64 / secs) as u64)
    );
    Ok(ExitCode::SUCCESS)
}
