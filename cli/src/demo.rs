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
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use vsnap_coordinator::backup::Plan;
use vsnap_coordinator::inventory::Inventory;
use vsnap_lab::demo::{self, step};

use crate::progress::{ProgressArg, ProgressArgs};
use crate::units::parse_size;

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

pub fn run(args: &Args, out: &mut dyn Write) -> Result<ExitCode> {
    if args.vms == 0 {
        bail!("--vms must be at least 1");
    }
    // The port first: a demo that built and backed up every VM and then
    // found its port taken would have printed a link to another service.
    // (Bound and released; a service that takes it in the minutes between
    // is told by the service's own error.)
    if args.serve {
        std::net::TcpListener::bind(args.listen).with_context(|| {
            format!(
                "cannot listen on {}: another service has it; pick another with --listen",
                args.listen
            )
        })?;
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
    let exe = std::env::current_exe()?;
    let vms = demo::build(&dir, args.vms, args.disk_size, &exe, out)?;
    let (inv, agents, apps) = (vms.inventory, vms.agents, vms.apps);
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

    let first = report
        .session
        .vms
        .first()
        .and_then(|v| v.snapshot.clone())
        .context("no snapshot")?;
    demo::check(&exe, &dir, &repo, &first, out)?;
    writeln!(out, "done; everything is in {}", dir.display())?;
    let Some((agents, apps)) = running else {
        return Ok(ExitCode::SUCCESS);
    };
    let config = demo::serve_config(&dir, args.listen)?;
    let state = dir.join("state");
    let token_path = state.join(vsnap_service::api::token::FILE);
    vsnap_service::api::token::load_or_create(&state)?;
    let link = vsnap_service::api::session::sign_in_link(args.listen, &state)?;
    step(
        out,
        "the service: the VMs stay up, backed up every 5 minutes",
    )?;
    writeln!(
        out,
        "config:    {config}\ndashboard: {link}\n           (works once, within {life} s; `vsnap dashboard --config {config}` prints another)\nAPI:       curl -H \"Authorization: Bearer $(cat {token})\" http://{listen}/api/v1/jobs\nCtrl-C stops the service and the demo VMs.",
        config = config.display(),
        life = vsnap_service::api::session::CODE_LIFE,
        token = token_path.display(),
        listen = args.listen,
    )?;
    out.flush()?;
    let served = crate::serve::run(&crate::serve::Args::of(config), out);
    for app in apps {
        let _ = app.finish();
    }
    drop(agents);
    served
}
