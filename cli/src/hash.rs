//! `vsnap hash`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use vsnap_engine::pipeline::report::DigestReport;
use vsnap_engine::pipeline::{self, ChunkKind, Progress};
use vsnap_formats::DiskImage;

use crate::engine_args::{ChunkArg, EngineArgs};

#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
The digest is BLAKE3 over the virtual disk, so for any image
  vsnap hash x.vhd
prints what
  qemu-img convert -f vpc -O raw x.vhd x.raw && b3sum x.raw
prints (with the image's path in place of x.raw). Unallocated ranges are
hashed as zeros without being read. Images are hashed in parallel.

Exit codes:
  0  success
  1  an image could not be opened or read
  2  bad command-line usage")]
pub struct Args {
    /// Images to hash.
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<PathBuf>,
    /// Print a JSON array, one object per image.
    #[arg(long)]
    json: bool,
    /// Also list every chunk: offset, length, kind and BLAKE3 identity.
    #[arg(long)]
    chunks: bool,
    /// Also compress every data chunk with zstd at LEVEL (1 if no level is
    /// given), in the same pass, and report what a repository would store.
    /// Zero and unallocated chunks are never compressed.
    #[arg(long, value_name = "LEVEL", num_args = 0..=1, default_missing_value = "1", require_equals = true,
          value_parser = clap::value_parser!(i32).range(-7..=22))]
    compress: Option<i32>,
    #[command(flatten)]
    chunk: ChunkArg,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    format: crate::SourceFormat,
    /// How to report progress: a bar on a terminal (auto), JSON lines on
    /// stderr for scripts, or none.
    #[arg(long, value_enum, default_value_t)]
    progress: crate::progress::ProgressArg,
    /// No progress output at all.
    #[arg(long, short = 'q')]
    quiet: bool,
}

pub fn run(args: &Args, out: &mut dyn Write) -> Result<ExitCode> {
    let images = crate::open_all(&args.images, args.format.format)?;
    let refs: Vec<&dyn DiskImage> = images.iter().map(|b| &**b).collect();
    let mut opts = args.engine.options(args.chunks, args.chunk.chunk_size)?;
    opts.compress = args.compress;
    args.engine.report_fallback();
    let progress = Progress::default();
    let digests = crate::progress::with_progress(&progress, args.progress, args.quiet, || {
        pipeline::hash_images(&refs, &opts, &progress)
    })
    .context("hashing failed")?;
    args.engine.save_cache(&opts);
    let reports: Vec<DigestReport> = args
        .images
        .iter()
        .zip(&digests)
        .map(|(path, d)| DigestReport::new(path, d, args.compress.is_some(), args.chunks))
        .collect();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&reports)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    for r in &reports {
        // b3sum's format: digest, two spaces, name.
        writeln!(out, "{}  {}", r.digest, r.path.display())?;
        if let (Some(stored), Some(level)) = (r.stored_bytes, args.compress) {
            // On stderr, so stdout stays in b3sum's format.
            say!(
                "{}: {} of data would be stored as {} with zstd -{level}",
                r.path.display(),
                crate::units::human(r.bytes_read),
                crate::units::human(stored),
            );
        }
        for c in r.chunks.iter().flatten() {
            let kind = match c.kind {
                ChunkKind::Data => "data",
                ChunkKind::Zero => "zero",
                ChunkKind::Unallocated => "unallocated",
            };
            writeln!(
                out,
                "  chunk {:#014x} {:>9} {:<11} {}",
                c.offset,
                c.length,
                kind,
                c.id.as_deref().unwrap_or("-")
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
