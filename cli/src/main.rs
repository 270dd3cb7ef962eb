//! The `vsnap` command line.

#[macro_use]
mod plain;
mod backup;
mod bench;
mod coordinated;
mod copy;
mod create;
mod demo;
mod docs;
mod engine_args;
mod hash;
mod info;
mod map;
mod progress;
mod repo;
mod restore;
mod serve;
mod sync;
mod units;
mod usage;
mod verify;

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use vsnap_formats::ImageFormat;

/// jemalloc, not glibc's malloc: under 50 API clients `vsnap serve`'s
/// resident size grew for 15 minutes under glibc (each thread's arena
/// keeping its own fragments, +8.5 % in 10 minutes even with two arenas)
/// and stayed within 2 % under jemalloc; the engine's commands are as
/// fast or faster under it (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit code when verify or gc finds damage in the repository.
pub const DAMAGED: u8 = 3;

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  an image could not be opened, read or written (the message says which file, where, and why)
  2  bad command-line usage";

/// vsnap: snapshot and VHD copy engine for virtualization hosts.
///
/// vsnap reads and writes VHD (Virtual PC, Hyper-V), VHDX (Hyper-V) and
/// raw disk images, maps which ranges hold data, streams them into
/// deduplicating backups, and coordinates application-consistent
/// snapshots of many guests through their agents (`vsnap demo` shows it
/// all). Formats are detected from file contents; other disk formats
/// (qcow2, VMDK, VDI, QED, LUKS), empty files and files named like a VHD
/// that hold none are refused, not taken as raw.
#[derive(Debug, Parser)]
#[command(name = "vsnap", version, after_help = EXIT_CODES, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Describe images: format, type, virtual size, geometry, creator,
    /// block size, allocated bytes, parent chain.
    #[command(after_help = EXIT_CODES)]
    Info(info::Args),
    /// Show which ranges of an image hold data, and where, like `qemu-img map`.
    #[command(after_help = EXIT_CODES)]
    Map(map::Args),
    /// Create a fixed, dynamic or differencing VHD, or a VHDX (.vhdx,
    /// .avhdx).
    #[command(after_help = EXIT_CODES)]
    Create(create::Args),
    /// Print each image's virtual-disk BLAKE3 digest, in b3sum's format:
    /// what b3sum prints for the image converted to raw.
    Hash(hash::Args),
    /// Copy images into a directory in parallel, with each image's digest
    /// computed in the same pass and a B3SUMS file for `b3sum -c`.
    Copy(copy::Args),
    /// Manage repositories: `vsnap repo init DIR`, `vsnap repo sync SRC DST`.
    #[command(subcommand)]
    Repo(repo::RepoCommand),
    /// Back up images into a repository as one snapshot, storing each
    /// distinct chunk once.
    Backup(backup::Args),
    /// List a repository's snapshots.
    Snapshots(repo::SnapshotsArgs),
    /// Restore a snapshot's disks, or one of them, with their containers.
    Restore(restore::Args),
    /// Check a repository for rot (or a backed-up disk against an image).
    Verify(verify::Args),
    /// Remove snapshots; their chunks stay until gc.
    Forget(repo::ForgetArgs),
    /// Remove chunks and indexes that no snapshot references. Where a
    /// manifest or index cannot be read, it deletes nothing and exits 3.
    Gc(repo::GcArgs),
    /// Run the guest agent: quiesce this guest's writers (hooks, then
    /// fsfreeze) when the coordinator asks, and thaw within a hold limit.
    Agent(vsnap_agent::cli::Args),
    /// Run the service: coordinated backups on calendar-event schedules,
    /// with retention and gc, state kept in SQLite, until SIGTERM.
    Serve(serve::Args),
    /// Print a sign-in link for the service's dashboard: it works once,
    /// within a minute, and leaves the browser a session cookie, never
    /// the token.
    Dashboard(serve::DashboardArgs),
    /// Build throw-away VMs (ext4 in dynamic VHDs, an agent each, a
    /// simulated application), back them all up app-consistently in one
    /// freeze window, verify and restore. Needs no root.
    Demo(demo::Args),
    /// Benchmarks: `vsnap bench engine` (this host's MB/s per stage) and
    /// `vsnap bench freeze` (what a freeze costs the guests).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Print shell completions: bash, zsh, fish or elvish.
    Completions(docs::CompletionsArgs),
    /// Write man pages for vsnap and every subcommand into a directory.
    Man(docs::ManArgs),
    /// The guard a coordinated backup starts for each qemu-ga guest it
    /// freezes (not for people: see vsnap_coordinator::qga_guard).
    #[command(name = "__qga-guard", hide = true)]
    QgaGuard {
        socket: std::path::PathBuf,
        window_ms: u64,
    },
}

/// `--format`: what the image is, or `auto` to detect it from its bytes.
#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum FormatArg {
    #[default]
    Auto,
    Vhd,
    Vhdx,
    Raw,
}

/// The source format of the commands that only read images (info, hash,
/// map), where `--format` is unambiguous; `--source-format` is the same,
/// as backup and copy (which also write one) name it.
#[derive(Debug, Clone, clap::Args)]
pub struct SourceFormat {
    /// The image format; `auto` detects it from the file's contents.
    #[arg(
        long = "format",
        short = 'f',
        visible_alias = "source-format",
        value_enum,
        default_value_t
    )]
    pub format: FormatArg,
}

/// Tells of the objects a backup or sync could not use (`damage_met`):
/// on stderr, with --json too, where a script reads the field and an
/// operator running the command by hand sees this.
pub fn warn_damage_met(damage: &[String], stored: &str) {
    if damage.is_empty() {
        return;
    }
    say!(
        "vsnap: warning: {} object(s) of the repository could not be used; {stored} stored again every chunk needed from them, but older snapshots may lack them: run vsnap verify",
        damage.len()
    );
    for d in damage {
        say!("vsnap: warning:   {d}");
    }
}

/// Tells the operator what they must know of a repository before writing
/// to it ([`vsnap_repo::Repository::caveats`]), once per process that
/// opens it.
pub fn warn_caveats(repo: &vsnap_repo::Repository) {
    for c in repo.caveats() {
        say!("vsnap: warning: {c}");
    }
}

/// Opens every image, detecting or forcing the format; the first that
/// fails stops the command with its own error.
pub fn open_all(
    paths: &[std::path::PathBuf],
    format: FormatArg,
) -> anyhow::Result<Vec<Box<dyn vsnap_formats::DiskImage>>> {
    Ok(paths
        .iter()
        .map(|p| vsnap_formats::open(p, format.forced()))
        .collect::<Result<Vec<_>, _>>()?)
}

impl FormatArg {
    pub fn forced(self) -> Option<ImageFormat> {
        match self {
            Self::Auto => None,
            Self::Vhd => Some(ImageFormat::Vhd),
            Self::Vhdx => Some(ImageFormat::Vhdx),
            Self::Raw => Some(ImageFormat::Raw),
        }
    }
}

fn main() -> ExitCode {
    vsnap_coordinator::failpoint::from_env();
    let cli = Cli::parse();
    let stdout = std::io::stdout();
    let mut out = plain::Plain::new(std::io::BufWriter::new(stdout.lock()));
    let result = match cli.command {
        Command::Info(args) => info::run(&args, &mut out),
        Command::Map(args) => map::run(&args, &mut out),
        Command::Create(args) => create::run(&args, &mut out),
        Command::Hash(args) => hash::run(&args, &mut out),
        Command::Copy(args) => copy::run(&args, &mut out),
        Command::Repo(cmd) => repo::run_repo(&cmd, &mut out),
        Command::Backup(args) => match &args.inventory {
            Some(inv) => coordinated::run(&args, inv, &mut out),
            None => backup::run(&args, &mut out),
        },
        Command::Snapshots(args) => repo::run_snapshots(&args, &mut out),
        Command::Restore(args) => restore::run(&args, &mut out),
        Command::Verify(args) => verify::run(&args, &mut out),
        Command::Forget(args) => repo::run_forget(&args, &mut out),
        Command::Gc(args) => repo::run_gc(&args, &mut out),
        Command::Agent(args) => vsnap_agent::cli::run(&args).map_err(Into::into),
        Command::Serve(args) => serve::run(&args, &mut out),
        Command::Dashboard(args) => serve::run_dashboard(&args, &mut out),
        Command::Demo(args) => demo::run(&args, &mut out),
        Command::Bench(cmd) => bench::run(&cmd, &mut out),
        Command::Completions(args) => docs::completions(&args, &mut out),
        Command::Man(args) => docs::man(&args, &mut out),
        Command::QgaGuard { socket, window_ms } => qga_guard(socket, window_ms),
    }
    .and_then(|code| out.flush().map(|()| code).map_err(Into::into));
    match result {
        Ok(code) => code,
        // A reader that stopped early (`vsnap map x | head`) is not an error.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) if usage::is_usage(&err) => {
            say!("vsnap: error: {err:#}");
            ExitCode::from(2)
        }
        Err(err) => {
            say!("vsnap: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn qga_guard(socket: std::path::PathBuf, window_ms: u64) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let window = std::time::Duration::from_millis(window_ms);
    rt.block_on(vsnap_coordinator::qga_guard::serve(socket, window))?;
    Ok(ExitCode::SUCCESS)
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
