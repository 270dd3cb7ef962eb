//! `vsnap copy`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use vsnap_engine::pipeline::report::CopyReport;
use vsnap_engine::pipeline::{self, copy_images, update_b3sums, CopySpec, Progress, TargetFormat};
use vsnap_formats::DiskImage;

use crate::engine_args::{ChunkArg, EngineArgs};
use crate::units::human;
use crate::FormatArg;

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum OutFormat {
    /// Keep the source's format: raw stays raw, a fixed VHD is copied byte
    /// for byte, dynamic and differencing become a dynamic VHD (a chain is
    /// flattened), a VHDX stays a VHDX (fixed or dynamic).
    #[default]
    Same,
    /// A raw image, sparse where the source is unallocated or zero.
    Raw,
    /// A fixed VHD.
    Fixed,
    /// A dynamic VHD with blocks only where the source holds data.
    Dynamic,
    /// A dynamic VHDX with blocks only where the source holds data.
    Vhdx,
    /// A fixed VHDX: every block allocated (unwritten ones as holes).
    VhdxFixed,
}

#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Each target is DIR/NAME, written as DIR/.NAME.vsnap-tmp and renamed when
every copy is complete and flushed to disk (not flushed with --no-sync);
on failure no partial file is left.
NAME is the source's file name, with .raw, .vhd or .vhdx when the format
changes.
DIR/B3SUMS gets one line per copied file, in b3sum's format, so
  cd DIR && b3sum -c B3SUMS
checks the copy with a stock tool. The digest printed for each image is its
virtual-disk digest (as `vsnap hash` prints it), computed in the same pass.

Exit codes:
  0  success
  1  a source could not be read, a target could not be written, or
     --verify found a difference (the message names the image)
  2  bad command-line usage")]
pub struct Args {
    /// Images to copy.
    #[arg(required = true, value_name = "SRC")]
    sources: Vec<PathBuf>,
    /// The directory to copy into; it must exist.
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
    /// The format of the copies.
    #[arg(long = "format", value_enum, default_value_t)]
    out_format: OutFormat,
    /// Read every copy back and check its virtual-disk digest.
    #[arg(long)]
    verify: bool,
    /// Do not flush the copies to disk before renaming them into place.
    /// Faster where the disk is slower than the copy, but a crash soon
    /// after can leave a copy whose name is there and whose data is not,
    /// as `cp` and `qemu-img convert` can.
    #[arg(long)]
    no_sync: bool,
    /// Print a JSON array, one object per image.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    chunk: ChunkArg,
    #[command(flatten)]
    engine: EngineArgs,
    /// The source format; `auto` detects it from the file's contents.
    #[arg(long = "source-format", value_enum, default_value_t)]
    source_format: FormatArg,
    /// How to report progress: a bar on a terminal (auto), JSON lines on
    /// stderr for scripts, or none.
    #[arg(long, value_enum, default_value_t)]
    progress: crate::progress::ProgressArg,
    /// No progress output and no summary line on stderr; the digests (or
    /// the JSON) still go to stdout.
    #[arg(long, short = 'q')]
    quiet: bool,
}

impl OutFormat {
    /// `None` for `same`: the source decides.
    pub fn target(self) -> Option<TargetFormat> {
        match self {
            OutFormat::Same => None,
            OutFormat::Raw => Some(TargetFormat::Raw),
            OutFormat::Fixed => Some(TargetFormat::FixedVhd),
            OutFormat::Dynamic => Some(TargetFormat::DynamicVhd),
            OutFormat::Vhdx => Some(TargetFormat::DynamicVhdx),
            OutFormat::VhdxFixed => Some(TargetFormat::FixedVhdx),
        }
    }
}

pub fn run(args: &Args, out: &mut dyn Write) -> Result<ExitCode> {
    if !args.to.is_dir() {
        bail!("--to {}: not a directory", args.to.display());
    }
    let images = crate::open_all(&args.sources, args.source_format)?;
    let refs: Vec<&dyn DiskImage> = images.iter().map(|b| &**b).collect();
    let mut specs = Vec::new();
    let mut names = Vec::new();
    for (src, image) in args.sources.iter().zip(&refs) {
        let format = args
            .out_format
            .target()
            .unwrap_or_else(|| TargetFormat::same_as(*image));
        let name = format.file_name(src, matches!(args.out_format, OutFormat::Same))?;
        if names.contains(&name) {
            bail!(
                "two sources would both be copied to {name}; copy them into different directories"
            );
        }
        specs.push(CopySpec {
            target: args.to.join(&name),
            format,
            replace: false,
            expect: None,
            durable: !args.no_sync,
        });
        names.push(name);
    }
    let opts = args.engine.options(false, args.chunk.chunk_size)?;
    args.engine.report_fallback();
    let progress = Progress::default();
    let started = Instant::now();
    let results = crate::progress::with_progress(&progress, args.progress, args.quiet, || {
        copy_images(&refs, &specs, &opts, &progress)
    })
    .context("copy failed")?;
    args.engine.save_cache(&opts);
    let entries: Vec<(String, blake3::Hash)> = names
        .iter()
        .cloned()
        .zip(results.iter().map(|r| r.file_digest))
        .collect();
    update_b3sums(&args.to, &entries)?;
    let elapsed = started.elapsed();
    let verified = if args.verify {
        pipeline::verify_copies(&results, &opts)?;
        true
    } else {
        false
    };
    let reports: Vec<CopyReport> = results
        .iter()
        .zip(&args.sources)
        .map(|(r, src)| CopyReport::new(src, r, verified))
        .collect();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&reports)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    for r in &reports {
        writeln!(out, "{}  {}", r.digest, r.source.display())?;
    }
    if args.quiet {
        return Ok(ExitCode::SUCCESS);
    }
    let total: u64 = reports.iter().map(|r| r.virtual_size).sum();
    let read: u64 = reports.iter().map(|r| r.bytes_read).sum();
    let written: u64 = reports.iter().map(|r| r.bytes_written).sum();
    let secs = elapsed.as_secs_f64().max(1e-9);
    say!(
        "copied {} image(s): {} virtual, {} read, {} written in {:.2} s ({}/s){}",
        reports.len(),
        human(total),
        human(read),
        human(written),
        secs,
        human((total as f64 / secs) as u64),
        if verified { ", verified" } else { "" }
    );
    Ok(ExitCode::SUCCESS)
}
