//! `vsnap repo sync SRC DST`: the off-site copy.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use serde::Serialize;
use vsnap_engine::pipeline::Progress;
use vsnap_repo::verify::VerifyReport;
use vsnap_repo::SyncOptions;

use crate::units::human;

/// Exit code when a snapshot could not be copied, or the copy failed its
/// verify.
const INCOMPLETE: u8 = 3;

#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Copies every snapshot of SRC that DST lacks, with only the chunks DST does
not hold already: a directory into a bucket (the off-site copy), a bucket
into a directory, or bucket to bucket. Both must have the same chunk size
(`vsnap repo init --chunk-size`); their pack sizes may differ.

Each chunk is checked as a restore checks it (CRC32C, decompression, the
BLAKE3 of its plaintext against its name) before it is written, as stored,
so damage in SRC is never carried into DST: a snapshot that cannot be read
whole is reported and not copied, and the others are. Each snapshot is
committed as a backup is, its manifest last and byte for byte SRC's. A sync
that is killed leaves whole snapshots and reusable chunks; run it again and
it goes on where it stopped. --verify then reads every copied snapshot back
from DST as `vsnap verify` does.

Exit codes:
  0  every snapshot asked for is in DST (and verified, with --verify)
  1  a repository could not be read or written
  2  bad command-line usage
  3  some snapshots were not copied, or failed --verify")]
pub struct Args {
    /// The repository to copy from: a directory or s3://BUCKET/PREFIX.
    #[arg(value_name = "SRC")]
    src: PathBuf,
    /// The repository to copy into (made by `vsnap repo init`, with SRC's
    /// chunk size).
    #[arg(value_name = "DST")]
    dst: PathBuf,
    /// Copy only these snapshots (ids or unique prefixes); all when none.
    #[arg(long = "snapshot", value_name = "ID")]
    snapshots: Vec<String>,
    /// Chunks copied at once. Reads from and uploads to a bucket wait on
    /// the network, so more than the cores pays.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: u16,
    /// Read every copied snapshot back from DST and check it, as
    /// `vsnap verify` does.
    #[arg(long)]
    verify: bool,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    output: crate::progress::ProgressArgs,
}

#[derive(Serialize)]
struct JsonOut<'a> {
    #[serde(flatten)]
    sync: &'a vsnap_repo::SyncReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    verify: Option<&'a VerifyReport>,
}

pub fn run(args: &Args, out: &mut dyn Write) -> Result<ExitCode> {
    let src = vsnap_s3::open(&args.src).context("cannot open the source")?;
    let dst = vsnap_s3::open(&args.dst).context("cannot open the destination")?;
    crate::warn_caveats(&dst);
    let opts = SyncOptions {
        only: args.snapshots.clone(),
        threads: usize::from(args.threads),
    };
    let progress = Progress::default();
    let started = std::time::Instant::now();
    let report = args
        .output
        .run(&progress, || vsnap_repo::sync(&src, &dst, &opts, &progress))
        .context("sync failed")?;
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    crate::warn_damage_met(&report.damage_met, "the snapshots copied");
    let verified = if args.verify && !report.copied.is_empty() {
        let progress = Progress::default();
        let threads = usize::from(args.threads);
        Some(
            args.output
                .run(&progress, || {
                    vsnap_repo::verify::verify(&dst, &report.copied, threads, None, &progress)
                })
                .context("verify of the copy failed")?,
        )
    } else {
        None
    };
    if args.json {
        let j = JsonOut {
            sync: &report,
            verify: verified.as_ref(),
        };
        writeln!(out, "{}", serde_json::to_string_pretty(&j)?)?;
    } else {
        for f in &report.failed {
            writeln!(out, "NOT COPIED {}: {}", f.snapshot, f.error)?;
        }
        writeln!(
            out,
            "{}: copied {} of {} snapshot(s) in {:.2} s ({} present already); {} chunk(s), {} ({} stored) written, {} chunk(s) found in the destination",
            if report.ok() { "ok" } else { "INCOMPLETE" },
            report.copied.len(),
            report.snapshots,
            secs,
            report.present,
            report.chunks_copied,
            human(report.plain_bytes_copied),
            human(report.bytes_copied),
            report.chunks_present,
        )?;
        if let Some(v) = &verified {
            for p in &v.problems {
                writeln!(out, "BAD {} {}: {}", p.what, p.name, p.error)?;
            }
            writeln!(
                out,
                "verify of the copy: {}, {} chunk(s) ({}) read back",
                if v.ok() { "ok" } else { "DAMAGED" },
                v.chunks,
                human(v.bytes)
            )?;
        }
    }
    let sound = report.ok() && verified.as_ref().is_none_or(VerifyReport::ok);
    Ok(if sound {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(INCOMPLETE)
    })
}
