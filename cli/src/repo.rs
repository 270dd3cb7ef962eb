//! `vsnap repo init`, `snapshots`, `forget` and `gc`: the repository's
//! housekeeping. Backup, restore and verify have modules of their own.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use vsnap_repo::retention::{self, KeepPolicy, Within};
use vsnap_repo::Repository;

use crate::units::human;

/// `--repo DIR|s3://BUCKET/PREFIX`, or `$VSNAP_REPO`.
#[derive(Debug, Clone, clap::Args)]
pub struct RepoArg {
    /// The repository (made by `vsnap repo init`): a directory, or
    /// s3://BUCKET/PREFIX in S3-compatible object storage, with the
    /// credentials and endpoint of the AWS environment (AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL) or of
    /// ~/.aws/credentials.
    #[arg(long, env = "VSNAP_REPO", value_name = "DIR|s3://BUCKET/PREFIX")]
    pub repo: PathBuf,
}

impl RepoArg {
    pub fn open(&self) -> Result<Repository> {
        let repo = vsnap_s3::open(&self.repo)?;
        crate::warn_caveats(&repo);
        Ok(repo)
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum RepoCommand {
    /// Create an empty repository: in DIR (new, or empty), or in a bucket
    /// under s3://BUCKET/PREFIX (a prefix that holds no repository).
    Init(InitArgs),
    /// Copy the snapshots one repository lacks from another, and only the
    /// chunks it lacks: the off-site copy, directory to bucket or back.
    /// Resumable, and checked chunk by chunk.
    Sync(crate::sync::Args),
    /// Move a damaged snapshot's manifest (by its id; a snapshot whose
    /// index is damaged too), or in a bucket a damaged pack index (by its
    /// name), aside under quarantine/, so that gc can run again.
    Quarantine(QuarantineArgs),
}

#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
gc deletes nothing while a manifest, an index or a pack index cannot be \
read: what it references is unknown, and any chunk might be its. verify \
and gc name the damage. Quarantining moves the object under quarantine/ \
in the repository (nothing is deleted; moving it back undoes it), and \
the next gc collects what only it referenced. A quarantined pack index \
leaves its packs unindexed: gc removes them after the grace period, and \
the snapshots that used their chunks show as damaged in verify until a \
backup of the same data stores those chunks again.")]
pub struct QuarantineArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// Snapshot ids (or prefixes only one has), or pack index names.
    #[arg(required = true, value_name = "ID")]
    names: Vec<String>,
    #[arg(long)]
    json: bool,
}

fn run_quarantine(a: &QuarantineArgs, out: &mut dyn Write) -> Result<ExitCode> {
    let repo = a.repo.open()?;
    let mut moved = Vec::new();
    for name in &a.names {
        let q =
            vsnap_repo::quarantine(&repo, name).with_context(|| format!("quarantine {name}"))?;
        if !a.json {
            writeln!(out, "{} {}: moved to {}", q.what, q.name, q.to.display())?;
        }
        moved.push(q);
    }
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&moved)?)?;
    } else {
        writeln!(out, "run gc to collect what only they referenced")?;
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// A directory, or s3://BUCKET/PREFIX (the bucket must exist).
    #[arg(value_name = "DIR|s3://BUCKET/PREFIX")]
    dir: PathBuf,
    /// The chunk grid every backup into this repository uses: a power of
    /// two from 1K to 64M. Smaller finds more duplicates and makes an
    /// incremental backup read less, and costs a bigger index and more
    /// chunk files. The default is a dynamic VHD's block.
    #[arg(long, value_name = "SIZE", value_parser = crate::units::parse_chunk_size, default_value = "2M")]
    chunk_size: u64,
    /// In object storage, new chunks go into packs of about this size, one
    /// PUT each, from 1M to 1G. Bigger packs mean
    /// fewer requests; smaller ones less to re-send when an upload fails.
    /// A local repository keeps a file per chunk and ignores it.
    #[arg(long, value_name = "SIZE", value_parser = crate::units::parse_pack_size, default_value = "32M")]
    pack_size: u64,
    /// In object storage, init tries whether the server refuses a second
    /// create of one object (If-None-Match: *), which is what lets hosts
    /// share a bucket with no lock, and refuses a server that does not.
    /// This takes the weaker guarantee instead: the config records it,
    /// and every command warns to run one writer at a time.
    #[arg(long)]
    accept_unconditional_writes: bool,
    /// In object storage, the most memory a process may give the pack
    /// indexes (every backup, verify, restore and gc holds them all): up
    /// to 144 bytes a chunk, so 4G (the default) holds about 30 million
    /// chunks, 57 TiB of unique data in 2M chunks. A bucket whose indexes
    /// need more is refused before they are read.
    #[arg(long, value_name = "SIZE", value_parser = crate::units::parse_index_memory)]
    index_memory: Option<u64>,
}

pub fn run_repo(cmd: &RepoCommand, out: &mut dyn Write) -> Result<ExitCode> {
    match cmd {
        RepoCommand::Sync(a) => return crate::sync::run(a, out),
        RepoCommand::Quarantine(a) => return run_quarantine(a, out),
        RepoCommand::Init(a) => {
            let r = vsnap_s3::init(
                &a.dir,
                a.chunk_size,
                a.pack_size,
                a.accept_unconditional_writes,
                a.index_memory,
            )?;
            crate::warn_caveats(&r);
            let packs = match r.config().pack_size {
                Some(p) => format!(", packs of {}", human(p)),
                None => String::new(),
            };
            writeln!(
                out,
                "created repository {} (id {}, chunks of {}{packs})",
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

/// The guest's figures the coordinator recorded in the manifest, when a
/// coordinator took the snapshot.
pub fn run_snapshots(args: &SnapshotsArgs, out: &mut dyn Write) -> Result<ExitCode> {
    let repo = args.repo.open()?;
    let listed = repo.list()?;
    let mut damaged = false;
    if args.json {
        let items: Vec<vsnap_repo::report::SnapshotEntry> =
            listed.into_iter().map(Into::into).collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&items)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:<16}  {:<20}  {:<12}  {:<16}  {:>9}  {:>13}  {:>5}  {:>10}  disks",
        "ID", "TIME", "VM", "CONSISTENCY", "STALL", "FREEZE WINDOW", "DISKS", "SIZE"
    )?;
    for l in listed {
        match l.manifest {
            Ok(m) => {
                let size: u64 = m.disks.iter().map(|d| d.virtual_size).sum();
                let names: Vec<&str> = m.disks.iter().map(|d| d.name.as_str()).collect();
                writeln!(
                    out,
                    "{:<16}  {:<20}  {:<12}  {:<16}  {:>9}  {:>13}  {:>5}  {:>10}  {}",
                    m.id,
                    m.time,
                    m.vm,
                    m.consistency.name(),
                    m.guest()
                        .and_then(|g| g.stall_us)
                        .map_or("-".into(), |us| format!("{:.1} ms", us as f64 / 1000.0)),
                    m.guest()
                        .and_then(|g| g.freeze_window_us)
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
        say!("vsnap: some manifests are damaged; `vsnap verify` reports what they hit");
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
With a policy instead of ids, each VM's snapshots are judged apart, with
restic's rules: --keep-last N keeps the newest N; --keep-hourly, -daily,
-weekly (ISO weeks), -monthly and -yearly N each keep the newest snapshot
of each of the last N such periods that have one, in this host's local
time; --keep-within 2y5m7d3h keeps every snapshot taken that long before
the VM's newest one. A snapshot any rule keeps stays. --dry-run prints what
would go and the rules that keep the rest, and removes nothing. A snapshot
whose manifest cannot be read is never removed by a policy.

Forgotten snapshots' chunks stay until `vsnap gc`.")]
pub struct ForgetArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// Snapshot ids (or unique prefixes) to forget.
    #[arg(value_name = "SNAPSHOT", required_unless_present_any = ["keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly", "keep_within"])]
    snapshots: Vec<String>,
    /// Keep the newest N snapshots of each VM.
    #[arg(long, value_name = "N", conflicts_with = "snapshots")]
    keep_last: Option<u32>,
    /// Keep the newest snapshot of each of the last N hours that have one.
    #[arg(long, value_name = "N", conflicts_with = "snapshots")]
    keep_hourly: Option<u32>,
    /// ... of each of the last N days.
    #[arg(long, value_name = "N", conflicts_with = "snapshots")]
    keep_daily: Option<u32>,
    /// ... of each of the last N ISO weeks.
    #[arg(long, value_name = "N", conflicts_with = "snapshots")]
    keep_weekly: Option<u32>,
    /// ... of each of the last N months.
    #[arg(long, value_name = "N", conflicts_with = "snapshots")]
    keep_monthly: Option<u32>,
    /// ... of each of the last N years.
    #[arg(long, value_name = "N", conflicts_with = "snapshots")]
    keep_yearly: Option<u32>,
    /// Keep every snapshot this long before the VM's newest (restic's
    /// form: 2y5m7d3h).
    #[arg(long, value_name = "DURATION", conflicts_with = "snapshots", value_parser = parse_within)]
    keep_within: Option<Within>,
    /// Only these VMs (repeatable); every VM without it.
    #[arg(long = "vm", value_name = "NAME", conflicts_with = "snapshots")]
    vms: Vec<String>,
    /// Print what a policy keeps and removes, and remove nothing.
    #[arg(long, conflicts_with = "snapshots")]
    dry_run: bool,
    /// Print the decisions as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_within(s: &str) -> std::result::Result<Within, String> {
    s.parse().map_err(|e: vsnap_repo::Error| e.to_string())
}

pub fn run_forget(args: &ForgetArgs, out: &mut dyn Write) -> Result<ExitCode> {
    let repo = args.repo.open()?;
    if !args.snapshots.is_empty() {
        let gone = vsnap_repo::forget(&repo, &args.snapshots)?;
        if args.json {
            writeln!(out, "{}", serde_json::to_string_pretty(&gone)?)?;
        } else {
            for id in gone {
                writeln!(out, "forgot {id}")?;
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let policy = KeepPolicy {
        last: args.keep_last.unwrap_or(0),
        hourly: args.keep_hourly.unwrap_or(0),
        daily: args.keep_daily.unwrap_or(0),
        weekly: args.keep_weekly.unwrap_or(0),
        monthly: args.keep_monthly.unwrap_or(0),
        yearly: args.keep_yearly.unwrap_or(0),
        within: args.keep_within,
    };
    let planned = retention::forget_by_policy(&repo, &policy, &args.vms, args.dry_run)?;
    let removed = planned.iter().filter(|p| !p.keep).count();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&planned)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    for p in &planned {
        let what = match (p.keep, args.dry_run) {
            (true, _) => format!("keep    ({})", p.reasons.join(", ")),
            (false, true) => "would remove".to_string(),
            (false, false) => "removed".to_string(),
        };
        writeln!(out, "{}  {:<20}  {:<12}  {what}", p.id, p.time, p.vm)?;
    }
    writeln!(
        out,
        "{} kept, {} {}",
        planned.len() - removed,
        removed,
        if args.dry_run {
            "would be removed (dry run)"
        } else {
            "removed; their chunks stay until `vsnap gc`"
        }
    )?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
gc deletes only while no backup runs: backups hold the repository's lock
shared, and gc waits to hold it alone (or, with --no-wait, fails at once).
It then reads every manifest, so snapshots committed while it waited are
kept, and removes chunks and indexes no snapshot references, chunks that
verify moved aside (*.bad), temporary files of backups that died, and the
clones such backups left in the .vsnap-base directories beside the disks
(bases no snapshot of this repository records).
gc refuses to run while a manifest is damaged: it cannot tell what that
snapshot references. Run `vsnap verify`, then forget or repair it.")]
pub struct GcArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// Fail at once if a backup is running, instead of waiting for it (in
    /// a directory; in a bucket gc runs beside backups).
    #[arg(long)]
    no_wait: bool,
    /// In a bucket: nothing younger than this is removed, and packs found
    /// dead are condemned first and deleted by a gc run at least this much
    /// later, once every backup that began before the condemnation ended.
    #[arg(long, value_name = "DURATION", value_parser = crate::units::parse_duration_or_zero, default_value = "1h")]
    grace: std::time::Duration,
    /// In a bucket: a pack whose live chunks fill less than this percent
    /// of it has them copied into new packs and is condemned with the dead
    /// ones; 0 never repacks.
    #[arg(long, value_name = "PERCENT", default_value_t = vsnap_repo::DEFAULT_REPACK_BELOW, value_parser = clap::value_parser!(u8).range(0..=100))]
    repack_below: u8,
    #[arg(long)]
    json: bool,
    /// Print nothing on success.
    #[arg(long, short = 'q')]
    quiet: bool,
}

pub fn run_gc(args: &GcArgs, out: &mut dyn Write) -> Result<ExitCode> {
    let repo = args.repo.open()?;
    let opts = vsnap_repo::GcOptions {
        wait: !args.no_wait,
        grace: args.grace,
        repack_below: args.repack_below,
    };
    let report = vsnap_repo::gc(&repo, &opts).context("gc failed")?;
    if !report.damaged.is_empty() {
        if args.json {
            writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
        }
        say!(
            "gc deleted no chunk, index or pack: {} object(s) could not be read, and what they reference is unknown:",
            report.damaged.len()
        );
        for d in &report.damaged {
            say!("  {d}");
        }
        say!(
            "check with vsnap verify; then `vsnap repo quarantine --repo {} ID` moves each damaged snapshot (or pack index) aside, and gc runs again",
            args.repo.repo.display()
        );
        return Ok(ExitCode::from(crate::DAMAGED));
    }
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else if !args.quiet && repo.is_bucket() {
        writeln!(
            out,
            "{} snapshot(s) kept; repacked {} pack(s) ({} chunk(s), {}), condemned {} pack(s) ({} duplicate(s)), removed {} pack(s) and {} index(es), freed {}; {} condemned pack(s) wait for {} running backup(s) or the grace period",
            report.snapshots,
            report.packs_repacked,
            report.chunks_repacked,
            human(report.bytes_repacked),
            report.packs_condemned,
            report.packs_duplicate,
            report.packs_removed,
            report.indexes_removed,
            human(report.bytes_freed),
            report.packs_waiting,
            report.running_backups
        )?;
        if report.packs_lost > 0 {
            writeln!(
                out,
                "{} pack(s) the pack indexes named were gone from the bucket: their records are dropped; run vsnap verify to see which snapshots the loss hits",
                report.packs_lost
            )?;
        }
    } else if !args.quiet {
        writeln!(
            out,
            "{} snapshot(s) kept; removed {} chunk(s), {} index(es), {} temporary file(s), {} dead base(s); freed {}; {} chunk(s) remain",
            report.snapshots,
            report.chunks_removed,
            report.indexes_removed,
            report.temporary_removed,
            report.bases_removed,
            human(report.bytes_freed),
            report.chunks_kept
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
