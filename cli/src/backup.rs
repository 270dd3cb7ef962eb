//! `vsnap backup`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use vsnap_engine::pipeline::Progress;
use vsnap_repo::cbt::backup_files;
use vsnap_repo::BackupOptions;

use vsnap_coordinator::provider::Choice;

use crate::engine_args::EngineArgs;
use crate::repo::RepoArg;
use crate::units::{human, parse_chunk_size, parse_duration};
use crate::FormatArg;

#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Every image is streamed at once: allocated ranges are read, each chunk is
hashed, chunks the repository holds already are neither compressed nor
written, and new ones are stored zstd-compressed (or raw when that is not
smaller). The snapshot becomes visible only when its manifest is written,
after everything it names is on disk; an interrupted backup leaves no
snapshot, only chunks that gc removes. Given images, nothing is quiesced,
so the snapshot is labelled crash-consistent.

With --inventory, vsnap is the coordinator: it connects to every VM's
agent, runs Prepare, freezes all guests at once (hooks, then fsfreeze),
snapshots every disk (reflink, or copy), thaws each guest as soon as its
own disks are snapshotted, and only then streams the snapshots. A guest that cannot be quiesced
aborts the backup (policy app-consistent-only: every guest is thawed,
nothing is written) or is backed up crash-consistent
(allow-crash-consistent). Each manifest records the freeze metrics.

Exit codes:
  0  the snapshot is committed (with --inventory: every VM's)
  1  an image or the repository could not be read or written; with
     --inventory, the backup was aborted or some VM has no snapshot
  2  bad command-line usage")]
pub struct Args {
    /// Images to back up, as one snapshot, crash-consistent.
    #[arg(
        value_name = "IMAGE",
        required_unless_present = "inventory",
        conflicts_with = "inventory"
    )]
    images: Vec<PathBuf>,
    #[command(flatten)]
    pub repo: RepoArg,
    /// The VM's name, recorded in the snapshot.
    #[arg(
        long,
        value_name = "VM",
        required_unless_present = "inventory",
        conflicts_with = "inventory"
    )]
    name: Option<String>,
    /// A TOML inventory of VMs, disks and agents: quiesce every guest
    /// together, snapshot every disk, thaw, then back the snapshots up,
    /// one snapshot per VM, labelled app- or crash-consistent.
    #[arg(long, value_name = "FILE")]
    pub inventory: Option<PathBuf>,
    /// With --inventory: only these VMs (repeatable).
    #[arg(long = "vm", value_name = "NAME", requires = "inventory")]
    pub vms: Vec<String>,
    /// With --inventory: how disks are snapshotted. qmp: the VM's QEMU
    /// redirects its writes to an overlay while the base is streamed, then
    /// merges it back (needs `qmp = SOCKET` in the inventory; any
    /// filesystem). reflink: a clone of each disk file (XFS with reflink,
    /// btrfs). copy: the bytes, inside the freeze. auto: qmp for VMs with a
    /// QMP socket, else reflink where the filesystem can clone, else copy.
    #[arg(
        long,
        default_value = "auto",
        value_name = "auto|qmp|reflink|copy",
        requires = "inventory"
    )]
    pub provider: Choice,
    /// With --inventory: the longest time from the first freeze to the
    /// last thaw; also every agent's hold limit.
    #[arg(
        long,
        default_value = "10s",
        value_name = "DURATION",
        value_parser = parse_duration,
        requires = "inventory"
    )]
    pub window: std::time::Duration,
    /// zstd level for new chunks.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub level: i32,
    /// Read every image whole. By default an image on a filesystem that
    /// can clone files (XFS with reflink, btrfs) is cloned into a
    /// `.vsnap-base` directory beside it, the clone is read, and kept: the
    /// next backup compares it with a new clone and reads only what
    /// changed. A kept clone costs the blocks written to the image since.
    /// With --inventory, the reflink provider's snapshots are kept so.
    #[arg(long)]
    pub no_track: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// The source format; `auto` detects it from the file's contents.
    #[arg(long = "source-format", value_enum, default_value_t)]
    source_format: FormatArg,
    /// The chunk size this backup expects. A repository has one grid,
    /// chosen at `vsnap repo init`; a different size is refused, naming
    /// both. Omit it to use the repository's.
    #[arg(long, value_name = "SIZE", value_parser = parse_chunk_size)]
    pub chunk_size: Option<u64>,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub output: crate::progress::ProgressArgs,
}

/// A `--chunk-size` that is not the repository's is refused: a backup can
/// only cut the repository's grid.
pub fn check_chunk_size(args: &Args, repo: &vsnap_repo::Repository) -> Result<()> {
    let have = repo.config().chunk_size;
    match args.chunk_size {
        Some(want) if want != have => Err(crate::usage::chunk_size(want, have, repo.root())),
        _ => Ok(()),
    }
}

/// `vsnap backup` of image files; with `--inventory`, `main` runs
/// [`crate::coordinated`] instead.
pub fn run(args: &Args, out: &mut dyn Write) -> Result<ExitCode> {
    let name = args.name.clone().unwrap_or_default();
    let repo = args.repo.open()?;
    check_chunk_size(args, &repo)?;
    let opts = args.engine.options(false, repo.config().chunk_size)?;
    args.engine.report_fallback();
    let progress = Progress::default();
    let spec = BackupOptions {
        level: args.level,
        ..BackupOptions::crash_consistent(&name)
    };
    let outcome = args
        .output
        .run(&progress, || {
            backup_files(
                &repo,
                &args.images,
                args.source_format.forced(),
                &opts,
                &spec,
                &progress,
                !args.no_track,
            )
        })
        .context("backup failed")?;
    args.engine.save_cache(&opts);
    let m = &outcome.manifest;
    let totals = m.totals();
    let report = vsnap_repo::report::BackupReport::new(&outcome);
    let secs = report.duration_s;
    // On stderr, with --json too: a script reads the field, an operator
    // running it by hand sees this.
    crate::warn_damage_met(&report.damage_met, "this snapshot");
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "snapshot {} of {} ({}), {} disk(s)",
        m.id,
        m.vm,
        m.consistency.name(),
        m.disks.len()
    )?;
    for d in &m.disks {
        writeln!(out, "{}  {}", d.digest, d.name)?;
        match &d.tracking {
            Some(t) if t.since.is_some() => writeln!(
                out,
                "  {} allocated chunk(s) unchanged since {}, taken unread",
                t.reused_cells,
                t.since.as_deref().unwrap_or_default()
            )?,
            Some(vsnap_repo::Tracking {
                fallback: Some(why),
                ..
            }) => writeln!(out, "  read whole: {why}")?,
            _ => {}
        }
    }
    let dedup = report
        .dedup_ratio
        .map_or("every chunk known already".to_owned(), |r| {
            format!("dedup {r:.2}x")
        });
    writeln!(
        out,
        "read {}, stored {} new in {} chunk(s) ({dedup}), {:.2} s, {}/s",
        human(totals.bytes_read),
        human(totals.new_bytes),
        totals.new_chunks,
        secs,
        human(report.throughput_bytes_per_s as u64)
    )?;
    Ok(ExitCode::SUCCESS)
}
