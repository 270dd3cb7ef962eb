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

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vsnap_engine::format::{DiskImage, ImageFormat};
use vsnap_engine::pipeline::{copy_images, CopySpec, Options, Progress, TargetFormat};

use crate::background::Background;
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
}

/// A VM's application: appends records to its log and fsyncs, and honours
/// the hook's pause request (flush, acknowledge, wait). Its result: how
/// many records it wrote, and the longest it was held.
fn start_app(dir: &Path) -> Result<Background<(u64, Duration)>> {
    std::fs::create_dir_all(dir)?;
    let dir = dir.to_path_buf();
    Ok(Background::spawn("the demo application", move |stop| {
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("records.log"))?;
        let (pause, paused) = (dir.join("pause"), dir.join("paused"));
        let mut n = 0u64;
        let mut held = Duration::ZERO;
        while !stop.load(Ordering::Relaxed) {
            if pause.exists() {
                log.sync_all()?;
                std::fs::write(&paused, b"")?;
                let t = Instant::now();
                while pause.exists() && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                held = held.max(t.elapsed());
                let _ = std::fs::remove_file(&paused);
            }
            writeln!(log, "record {n}")?;
            log.sync_data()?;
            n += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok((n, held))
    }))
}

/// The hook: `freeze` asks the application to pause and waits (up to 5 s)
/// for it to say it has flushed; `thaw` and `abort` let it go on.
fn hook_script(app: &Path) -> String {
    let app = app.display();
    format!(
        r#"#!/bin/sh
# The demo application's writer: pause it for the freeze, resume it after.
case "$1" in
  freeze)
    touch "{app}/pause"
    i=0
    while [ ! -e "{app}/paused" ]; do
      i=$((i + 1)); [ $i -gt 500 ] && {{ echo "the application did not pause" >&2; rm -f "{app}/pause"; exit 1; }}
      sleep 0.01
    done ;;
  thaw|abort) rm -f "{app}/pause" ;;
esac
exit 0
"#
    )
}

struct AgentChild(Child);

impl Drop for AgentChild {
    fn drop(&mut self) {
        // SIGTERM would be kinder, but nothing is frozen between backups
        // and the agent freezes no filesystem here.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(vm_dir: &Path) -> Result<(AgentChild, String)> {
    let exe = std::env::current_exe()?;
    let sock = vm_dir.join("agent.sock");
    let mut child = Command::new(exe)
        .arg("agent")
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .arg("--hooks")
        .arg(vm_dir.join("hooks"))
        .arg("--marker")
        .arg(vm_dir.join("agent.frozen"))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(vm_dir.join("agent.log"))?)
        .spawn()
        .context("start vsnap agent")?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        std::io::BufReader::new(out).read_line(&mut line)?;
    }
    let child = AgentChild(child);
    match line.trim().strip_prefix("listening on ") {
        Some(a) => Ok((child, a.to_string())),
        None => bail!(
            "the agent of {} did not start: {}",
            vm_dir.display(),
            std::fs::read_to_string(vm_dir.join("agent.log")).unwrap_or_default()
        ),
    }
}

/// A guest disk: an ext4 filesystem made from a seed tree by
/// `mkfs.ext4 -d`, converted to a dynamic VHD by vsnap's own writer.
fn make_disk(vm_dir: &Path, name: &str, size: u64) -> Result<PathBuf> {
    let seed = vm_dir.join("seed");
    std::fs::create_dir_all(seed.join("etc"))?;
    std::fs::create_dir_all(seed.join("srv/data"))?;
    std::fs::write(seed.join("etc/hostname"), format!("{name}\n"))?;
    let mut text = String::new();
    for i in 0..60_000 {
        text += &format!("{name} order {i} shipped to warehouse {}\n", i % 17);
    }
    std::fs::write(seed.join("srv/data/orders.csv"), &text)?;
    let noise: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(seed.join("srv/data/blob.bin"), noise)?;
    let raw = vm_dir.join("build.img");
    std::fs::File::create(&raw)?.set_len(size)?;
    let out = Command::new(mkfs_ext4())
        .args(["-q", "-F", "-L", name, "-d"])
        .arg(&seed)
        .arg(&raw)
        .output()
        .context("run mkfs.ext4 (install e2fsprogs)")?;
    if !out.status.success() {
        bail!(
            "mkfs.ext4 -d failed (it needs e2fsprogs 1.43 or later): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let disk = vm_dir.join("disk0.vhd");
    let image = vsnap_engine::format::open(&raw, Some(ImageFormat::Raw))?;
    let refs: Vec<&dyn DiskImage> = vec![&*image];
    let spec = CopySpec {
        target: disk.clone(),
        format: TargetFormat::DynamicVhd,
        replace: false,
        expect: None,
        durable: true,
    };
    copy_images(&refs, &[spec], &Options::default(), &Progress::default())?;
    std::fs::remove_file(&raw)?;
    std::fs::remove_dir_all(&seed)?;
    Ok(disk)
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

/// `mkfs.ext4` from PATH, or from the sbin directories a user's PATH
/// often lacks.
fn mkfs_ext4() -> PathBuf {
    let name = "mkfs.ext4";
    let from_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    from_path
        .into_iter()
        .chain(
            ["/usr/sbin", "/sbin"]
                .iter()
                .map(|d| Path::new(d).join(name)),
        )
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
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
        let disk = make_disk(&vm_dir, &name, args.disk_size)?;
        let hook = vm_dir.join("hooks/10-app");
        std::fs::write(&hook, hook_script(&vm_dir.join("app")))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755))?;
        apps.push(start_app(&vm_dir.join("app"))?);
        let (agent, address) = start_agent(&vm_dir)?;
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
    vsnap_engine::repo::Repository::init(&repo, 4 << 20)?;
    // Let the applications write for a moment: there is something to hold.
    std::thread::sleep(Duration::from_millis(200));

    step(
        out,
        "coordinated backup: prepare, freeze all, snapshot, thaw, stream",
    )?;
    let words = [
        "-q".as_ref(),
        "--inventory".as_ref(),
        inv.as_os_str(),
        "--repo".as_ref(),
        repo.as_os_str(),
    ];
    let backup = crate::coordinated::args_from(words)?;
    let (report, streamed) = crate::coordinated::backup_inventory(&backup, &inv, None, None)?;
    crate::coordinated::print_report(&report, &streamed, out)?;
    if report.snapshots.iter().any(|s| s.provider.name() == "copy") {
        writeln!(
            out,
            "(the copy provider: {}'s filesystem cannot clone files, so each disk was copied inside the freeze; on XFS with reflink or btrfs a snapshot is O(1))",
            dir.display()
        )?;
    }
    let code = crate::coordinated::exit_code(&report);
    let mut held = Vec::new();
    for app in apps {
        held.push(app.finish()?);
    }
    drop(agents);
    if code != ExitCode::SUCCESS {
        return Ok(code);
    }
    for (v, (records, longest)) in report.vms.iter().zip(&held) {
        writeln!(
            out,
            "{}: its application wrote {records} records and was held at most {:.1} ms",
            v.vm,
            longest.as_secs_f64() * 1000.0
        )?;
    }

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
    Ok(ExitCode::SUCCESS)
}
