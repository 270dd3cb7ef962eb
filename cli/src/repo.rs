//! `vsnap repo init`, `snapshots`, `forget` and `gc`: the repository's
//! housekeeping. Backup, restore and verify have modules of their own.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use serde::Serialize;
use vsnap_engine::repo::{self, Repository};

use crate::units::human;

/// `--repo DIR`, or `$VSNAP_REPO`.
#[derive(Debug, Clone, clap::Args)]
pub struct RepoArg {
    /// The repository directory (made by `vsnap repo init`).
    #[arg(long, env = "VSNAP_REPO", value_name = "DIR")]
    pub repo: PathBuf,
}

impl RepoArg {
    pub fn open(&self) -> Result<Repository> {
        Ok(Repository::open(&self.repo)?)
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum RepoCommand {
    /// Create an empty repository in DIR (new, or empty).
    Init(InitArgs),
}

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    dir: PathBuf,
    /// The chunk grid every backup into this repository uses: a power of
    /// two from 1K to 64M. Smaller finds more duplicates and costs a
    /// bigger index.
    #[arg(long, value_name = "SIZE", value_parser = crate::units::parse_chunk_size, default_value = "4M")]
    chunk_size: u64,
}

pub fn run_repo(cmd: &RepoCommand, out: &mut dyn Write) -> Result<ExitCode> {
    match cmd {
        RepoCommand::Init(a) => {
            let r = Repository::init(&a.dir, a.chunk_size)?;
            writeln!(
                out,
                "created repository {} (id {}, chunks of {})",
                a.dir.display(),
                r.config().id,
                human(a.chunk_size)
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, clap::Args)]
pub struct SnapshotsArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// Print a JSON array of the manifests.
    #[arg(long)]
    json: bool,
}

/// One of the guest's freeze metrics (on its agent's clock), as the
/// coordinator recorded them in the manifest: `freeze_window_us`, the
/// time frozen, or `stall_us`, what the application waited.
fn guest_us(m: &repo::Manifest, key: &str) -> Option<u64> {
    m.freeze.as_ref()?.get("guest")?.get(key)?.as_u64()
}

pub fn run_snapshots(args: &SnapshotsArgs, out: &mut dyn Write) -> Result<ExitCode> {
    let repo = args.repo.open()?;
    let listed = repo.list()?;
    let mut damaged = false;
    if args.json {
        #[derive(Serialize)]
        #[serde(untagged)]
        enum Item {
            Ok {
                #[serde(flatten)]
                manifest: Box<repo::Manifest>,
                /// The guest's freeze window, from the coordinator's
                /// metrics; null for a snapshot taken without one.
                freeze_window_us: Option<u64>,
                /// What the guest's application waited (quiescing's start
                /// to FITHAW's return); null without an agent that says.
                stall_us: Option<u64>,
            },
            Bad {
                id: String,
                error: String,
            },
        }
        let items: Vec<Item> = listed
            .into_iter()
            .map(|l| match l.manifest {
                Ok(m) => Item::Ok {
                    freeze_window_us: guest_us(&m, "freeze_window_us"),
                    stall_us: guest_us(&m, "stall_us"),
                    manifest: Box::new(m),
                },
                Err(e) => Item::Bad {
                    id: l.id,
                    error: e.to_string(),
                },
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&items)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:<16}  {:<20}  {:<12}  {:<16}  {:>9}  {:>9}  {:>5}  {:>10}  disks",
        "ID", "TIME", "VM", "CONSISTENCY", "STALL", "FROZEN", "DISKS", "SIZE"
    )?;
    for l in listed {
        match l.manifest {
            Ok(m) => {
                let size: u64 = m.disks.iter().map(|d| d.virtual_size).sum();
                let names: Vec<&str> = m.disks.iter().map(|d| d.name.as_str()).collect();
                writeln!(
                    out,
                    "{:<16}  {:<20}  {:<12}  {:<16}  {:>9}  {:>9}  {:>5}  {:>10}  {}",
                    m.id,
                    m.time,
                    m.vm,
                    m.consistency.name(),
                    guest_us(&m, "stall_us")
                        .map_or("-".into(), |us| format!("{:.1} ms", us as f64 / 1000.0)),
                    guest_us(&m, "freeze_window_us")
                        .map_or("-".into(), |us| format!("{:.1} ms", us as f64 / 1000.0)),
                    m.disks.len(),
                    human(size),
                    names.join(" ")
                )?;
            }
            Err(e) => {
                damaged = true;
                writeln!(out, "{:<16}  DAMAGED: {e}", l.id)?;
            }
        }
    }
    if damaged {
        eprintln!("vsnap: some manifests are damaged; `vsnap verify` reports what they hit");
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, clap::Args)]
pub struct ForgetArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// Snapshot ids (or unique prefixes) to forget. Their chunks stay
    /// until `vsnap gc`.
    #[arg(required = true, value_name = "SNAPSHOT")]
    snapshots: Vec<String>,
}

pub fn run_forget(args: &ForgetArgs, out: &mut dyn Write) -> Result<ExitCode> {
    let repo = args.repo.open()?;
    for id in repo::forget(&repo, &args.snapshots)? {
        writeln!(out, "forgot {id}")?;
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
gc deletes only while no backup runs: backups hold the repository's lock
shared, and gc waits to hold it alone (or, with --no-wait, fails at once).
It then reads every manifest, so snapshots committed while it waited are
kept, and removes chunks and indexes no snapshot references, chunks that
verify moved aside (*.bad), and temporary files of backups that died.
gc refuses to run while a manifest is damaged: it cannot tell what that
snapshot references. Run `vsnap verify`, then forget or repair it.")]
pub struct GcArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// Fail at once if a backup is running, instead of waiting for it.
    #[arg(long)]
    no_wait: bool,
    #[arg(long)]
    json: bool,
    /// Print nothing on success.
    #[arg(long, short = 'q')]
    quiet: bool,
}

pub fn run_gc(args: &GcArgs, out: &mut dyn Write) -> Result<ExitCode> {
    let repo = args.repo.open()?;
    let report = repo::gc(&repo, !args.no_wait).context("gc failed")?;
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else if !args.quiet {
        writeln!(
            out,
            "{} snapshot(s) kept; removed {} chunk(s), {} index(es), {} temporary file(s); freed {}; {} chunk(s) remain",
            report.snapshots,
            report.chunks_removed,
            report.indexes_removed,
            report.temporary_removed,
            human(report.bytes_freed),
            report.chunks_kept
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// This host's name, for the manifest.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// Splits `SNAPSHOT[:DISK]`.
pub fn split_target(s: &str) -> (&str, Option<&str>) {
    match s.split_once(':') {
        Some((snap, disk)) => (snap, Some(disk)),
        None => (s, None),
    }
}
