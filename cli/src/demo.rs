//! `vsnap demo`: the whole job on throw-away VMs, without root. Each VM
//! has a dynamic VHD holding a real ext4 filesystem (`mkfs.ext4 -d`, no
//! mount needed) and a `vsnap agent` of its own whose writer is an exec
//! hook that pauses the VM's simulated application. One coordinated,
//! application-consistent backup of all of them follows, then a verify
//! and a restore checked by digest.
//!
//! Without root nothing can be mounted, so the agents freeze no
//! filesystem: the hooks are the writers. The real tests do the same with
//! loop-mounted guests and FIFREEZE.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use vsnap_coordinator::backup::Plan;
use vsnap_coordinator::inventory::Inventory;
use vsnap_lab::{demo, AgentProc};

use crate::progress::{ProgressArg, ProgressArgs};
use crate::units::{human, parse_size};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Leaves everything in DIR: vmN/disk0.vhd (each VM's disk), vmN/hooks (its
writer), vmN/app (its application's records), inventory.toml and repo/.
Run `vsnap backup --inventory DIR/inventory.toml --repo DIR/repo` while the
agents run to do it again by hand; the demo stops its agents when it ends.

Needs mkfs.ext4 (e2fsprogs) 1.43 or later, for `mkfs.ext4 -d`.")]
pub struct Args {
    /// Where to build the VMs and the repository (new, or empty)
    /// [default: a fresh directory under the system's temporary directory].
    dir: Option<PathBuf>,
    /// How many VMs.
    #[arg(long, default_value_t = 4)]
    vms: usize,
    /// Each VM's virtual disk size.
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    disk_size: u64,
    /// Then leave the VMs running under `vsnap serve` (a backup job every
    /// 5 minutes, keeping the last 5, and a daily verify), print the
    /// dashboard's address with its token, and serve until Ctrl-C.
    #[arg(long)]
    serve: bool,
    /// With --serve: where the API and the dashboard listen.
    #[arg(long, value_name = "ADDR", default_value = vsnap_service::config::DEFAULT_LISTEN, requires = "serve")]
    listen: std::net::SocketAddr,
}

/// The VM's agent: a `vsnap agent` child of this process, whose writer
/// is the application's hook (it freezes no filesystem here).
fn start_agent(vm_dir: &Path) -> Result<AgentProc> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("agent")
        .arg("--listen")
        .arg(format!("unix:{}", vm_dir.join("agent.sock").display()))
        .arg("--hooks")
        .arg(vm_dir.join("hooks"))
        .arg("--marker")
        .arg(vm_dir.join("agent.frozen"));
    AgentProc::start(cmd, &vm_dir.join("agent.log"))
        .with_context(|| format!("the agent of {} did not start", vm_dir.display()))
}

fn step(out: &mut dyn Write, what: &str) -> Result<()> {
    writeln!(out, "== {what}")?;
    out.flush()?;
    Ok(())
}

/// Runs `vsnap ARGS` as a child, its output shown in order with ours.
fn vsnap(out: &mut dyn Write, args: &[&std::ffi::OsStr]) -> Result<bool> {
    let o = Command::new(std::env::current_exe()?).args(args).output()?;
    out.write_all(&o.stdout)?;
    out.write_all(&o.stderr)?;
    Ok(o.status.success())
}

pub fn run(args: &Args, out: &mut dyn Write) -> Result<ExitCode> {
    if args.vms == 0 {
        bail!("--vms must be at least 1");
    }
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("vsnap-demo-{}", std::process::id())),
    };
    if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
        bail!(
            "{}: not empty; give a new or empty directory",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir)?;
    let dir = std::fs::canonicalize(&dir)?;
    step(
        out,
        &format!("building {} VMs in {}", args.vms, dir.display()),
    )?;
    let mut inventory = String::new();
    let mut agents = Vec::new();
    let mut apps = Vec::new();
    for i in 0..args.vms {
        let name = format!("vm{i}");
        let vm_dir = dir.join(&name);
        std::fs::create_dir_all(vm_dir.join("hooks"))?;
        let disk = demo::ext4_disk(&vm_dir, &name, args.disk_size)?;
        let hook = vm_dir.join("hooks/10-app");
        std::fs::write(&hook, demo::pause_hook(&vm_dir.join("app")))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755))?;
        apps.push(demo::start_app(&vm_dir.join("app"))?);
        let agent = start_agent(&vm_dir)?;
        let address = agent.address.clone();
        agents.push(agent);
        writeln!(
            out,
            "{name}: {} ({} virtual, ext4), agent on {address}",
            disk.display(),
            human(args.disk_size)
        )?;
        inventory += &format!(
            "[[vm]]\nname = \"{name}\"\ndisks = [\"{}\"]\nagent = \"{address}\"\npolicy = \"app-consistent-only\"\n\n",
            disk.display()
        );
    }
    let inv = dir.join("inventory.toml");
    std::fs::write(&inv, inventory)?;
    let repo = dir.join("repo");
    let repository = vsnap_repo::Repository::init(&repo, vsnap_repo::DEFAULT_CHUNK_SIZE)?;
    // Let the applications write for a moment: there is something to hold.
    std::thread::sleep(Duration::from_millis(200));

    step(
        out,
        "coordinated backup: prepare, freeze all, snapshot, thaw, stream",
    )?;
    let plan = Plan::new(Inventory::load(&inv)?.vms);
    let quiet = ProgressArgs {
        progress: ProgressArg::None,
        quiet: true,
    };
    let report = crate::coordinated::run_plan(&plan, &repository, None, &quiet)?;
    crate::coordinated::print_report(&report, out)?;
    if report
        .session
        .snapshots
        .iter()
        .any(|s| s.provider.name() == "copy")
    {
        writeln!(
            out,
            "(the copy provider: {}'s filesystem cannot clone files, so each disk was copied inside the freeze; on XFS with reflink or btrfs a snapshot is O(1))",
            dir.display()
        )?;
    }
    let code = crate::coordinated::exit_code(&report);
    if code != ExitCode::SUCCESS {
        return Ok(code);
    }
    // Under the service the VMs and their applications go on; otherwise
    // they stop here, and say how long they were held.
    let running = if args.serve {
        Some((agents, apps))
    } else {
        let mut held = Vec::new();
        for app in apps {
            held.push(app.finish()?);
        }
        drop(agents);
        for (v, (records, longest)) in report.session.vms.iter().zip(&held) {
            writeln!(
                out,
                "{}: its application wrote {records} records and was held at most {:.1} ms",
                v.vm,
                longest.as_secs_f64() * 1000.0
            )?;
        }
        None
    };

    step(
        out,
        "verify the repository: every chunk re-read and re-hashed",
    )?;
    if !vsnap(
        out,
        &[
            "verify".as_ref(),
            "-q".as_ref(),
            "--repo".as_ref(),
            repo.as_os_str(),
        ],
    )? {
        bail!("verify failed");
    }
    let first = report
        .session
        .vms
        .first()
        .and_then(|v| v.snapshot.clone())
        .context("no snapshot")?;
    let target = format!("{first}:1");
    let restored = dir.join("restored-vm0.vhd");
    step(
        out,
        &format!("restore {target}, then check it, and the live disk, by digest"),
    )?;
    let restore = [
        "restore".as_ref(),
        "-q".as_ref(),
        "--repo".as_ref(),
        repo.as_os_str(),
        target.as_ref(),
        "--to".as_ref(),
        restored.as_os_str(),
    ];
    if !vsnap(out, &restore)? {
        bail!("restore failed");
    }
    let live = dir.join("vm0/disk0.vhd");
    for image in [&restored, &live] {
        let check = [
            "verify".as_ref(),
            "--repo".as_ref(),
            repo.as_os_str(),
            target.as_ref(),
            "--against".as_ref(),
            image.as_os_str(),
        ];
        if !vsnap(out, &check)? {
            bail!("{} does not match the backup", image.display());
        }
    }
    writeln!(out, "done; everything is in {}", dir.display())?;
    let Some((agents, apps)) = running else {
        return Ok(ExitCode::SUCCESS);
    };
    let config = dir.join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "# vsnap demo --serve: the demo VMs under the service.\nrepository = \"repo\"\ninventory = \"inventory.toml\"\nstate_dir = \"state\"\nlisten = \"{}\"\n\n[[job]]\nname = \"demo\"\nschedule = \"*:0/5\"\nkeep = {{ last = 5 }}\ngc = true\n\n[[verify]]\nname = \"verify\"\nschedule = \"daily\"\noutdated_after = \"7d\"\n",
            args.listen
        ),
    )?;
    let token = vsnap_service::api::token::load_or_create(&dir.join("state"))?;
    step(
        out,
        "the service: the VMs stay up, backed up every 5 minutes",
    )?;
    writeln!(
        out,
        "config:    {}\ndashboard: http://{}/?token={token}\nAPI:       curl -H 'Authorization: Bearer {token}' http://{}/api/v1/jobs\nCtrl-C stops the service and the demo VMs.",
        config.display(),
        args.listen,
        args.listen
    )?;
    out.flush()?;
    let served = crate::serve::run(&crate::serve::Args::of(config), out);
    for app in apps {
        let _ = app.finish();
    }
    drop(agents);
    served
}
