//! Guests for a machine without root, as `vsnap demo` builds them:
//! nothing can be mounted, so each guest's disk is an ext4 made from a
//! seed tree by `mkfs.ext4 -d` and converted to a dynamic VHD, and its
//! writer is an application that a hook pauses (flush, acknowledge,
//! wait) instead of a filesystem freeze.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vsnap_engine::pipeline::{copy_images, CopySpec, Options, Progress, TargetFormat};
use vsnap_engine::units::human;
use vsnap_formats::{DiskImage, ImageFormat};

use crate::workload::Background;
use crate::{io, AgentProc, Error, Result};

/// A guest disk in `dir/disk0.vhd`: an ext4 filesystem of `size` bytes
/// labelled `name`, holding a little text and a little noise, made by
/// `mkfs.ext4 -d` (e2fsprogs 1.43 or later) and converted to a dynamic
/// VHD by vsnap's own writer.
pub fn ext4_disk(dir: &Path, name: &str, size: u64) -> Result<PathBuf> {
    let seed = dir.join("seed");
    let data = seed.join("srv/data");
    std::fs::create_dir_all(seed.join("etc")).map_err(io("create", &seed))?;
    std::fs::create_dir_all(&data).map_err(io("create", &data))?;
    let write = |p: PathBuf, bytes: &[u8]| std::fs::write(&p, bytes).map_err(io("write", p));
    write(seed.join("etc/hostname"), format!("{name}\n").as_bytes())?;
    let mut text = String::new();
    for i in 0..60_000 {
        text += &format!("{name} order {i} shipped to warehouse {}\n", i % 17);
    }
    write(data.join("orders.csv"), text.as_bytes())?;
    let noise: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    write(data.join("blob.bin"), &noise)?;
    let raw = dir.join("build.img");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(size))
        .map_err(io("create", &raw))?;
    let mut mkfs = Command::new(crate::sbin("mkfs.ext4"));
    mkfs.args(["-q", "-F", "-L", name, "-d"])
        .arg(&seed)
        .arg(&raw);
    crate::run(&mut mkfs).map_err(|e| match e {
        Error::Command { command, stderr } => Error::Command {
            command,
            stderr: format!("{stderr} (it needs e2fsprogs 1.43 or later, for -d)"),
        },
        other => other,
    })?;
    let disk = dir.join("disk0.vhd");
    let image = vsnap_formats::open(&raw, Some(ImageFormat::Raw))?;
    let refs: Vec<&dyn DiskImage> = vec![&*image];
    let spec = CopySpec {
        target: disk.clone(),
        format: TargetFormat::DynamicVhd,
        replace: false,
        expect: None,
        durable: true,
    };
    copy_images(&refs, &[spec], &Options::default(), &Progress::default())?;
    std::fs::remove_file(&raw).map_err(io("remove", &raw))?;
    std::fs::remove_dir_all(&seed).map_err(io("remove", &seed))?;
    Ok(disk)
}

/// The hook that is the application's writer: `freeze` asks it to pause
/// and waits (up to 5 s) for it to say it has flushed; `thaw` and `abort`
/// let it go on.
pub fn pause_hook(app: &Path) -> String {
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

/// An application in `dir`: appends records to its log and fsyncs, and
/// honours [`pause_hook`]'s request (flush, acknowledge, wait). Its
/// result: how many records it wrote, and the longest it was held.
pub fn start_app(dir: &Path) -> Result<Background<(u64, Duration)>> {
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let dir = dir.to_path_buf();
    Ok(Background::spawn("the demo application", move |stop| {
        let log_path = dir.join("records.log");
        let (pause, paused) = (dir.join("pause"), dir.join("paused"));
        let work = || -> std::io::Result<(u64, Duration)> {
            let mut log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)?;
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
        };
        work().map_err(io("write", &log_path))
    }))
}

/// An application, running until finished: records written, longest hold.
pub type App = Background<(u64, Duration)>;

/// The demo's VMs, running: each one's agent and application, and the
/// inventory that names them.
pub struct Vms {
    pub inventory: PathBuf,
    pub agents: Vec<AgentProc>,
    pub apps: Vec<App>,
}

/// Says which step the demo is at.
pub fn step(out: &mut dyn Write, what: &str) -> std::io::Result<()> {
    writeln!(out, "== {what}")?;
    out.flush()
}

/// The VM's agent: a `vsnap agent` child (of `vsnap`, the binary at
/// `exe`), whose writer is the application's hook (it freezes no
/// filesystem here).
fn start_agent(exe: &Path, vm_dir: &Path) -> Result<AgentProc> {
    let mut cmd = Command::new(exe);
    cmd.arg("agent")
        .arg("--listen")
        .arg(format!("unix:{}", vm_dir.join("agent.sock").display()))
        .arg("--hooks")
        .arg(vm_dir.join("hooks"))
        .arg("--marker")
        .arg(vm_dir.join("agent.frozen"));
    AgentProc::start(cmd, &vm_dir.join("agent.log"))
}

/// Builds `count` VMs in `dir` (`vmN/`: an ext4 disk of `disk_size`, the
/// hook, the application, the agent) and `dir/inventory.toml`, saying
/// each one to `out`.
pub fn build(
    dir: &Path,
    count: usize,
    disk_size: u64,
    exe: &Path,
    out: &mut dyn Write,
) -> Result<Vms> {
    let mut inventory = String::new();
    let mut agents = Vec::new();
    let mut apps = Vec::new();
    for i in 0..count {
        let name = format!("vm{i}");
        let vm_dir = dir.join(&name);
        let hooks = vm_dir.join("hooks");
        std::fs::create_dir_all(&hooks).map_err(io("create", &hooks))?;
        let disk = ext4_disk(&vm_dir, &name, disk_size)?;
        let hook = hooks.join("10-app");
        std::fs::write(&hook, pause_hook(&vm_dir.join("app"))).map_err(io("write", &hook))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755))
            .map_err(io("make executable", &hook))?;
        apps.push(start_app(&vm_dir.join("app"))?);
        let agent = start_agent(exe, &vm_dir)?;
        let address = agent.address.clone();
        agents.push(agent);
        writeln!(
            out,
            "{name}: {} ({} virtual, ext4), agent on {address}",
            disk.display(),
            human(disk_size)
        )
        .map_err(io("write", "the output"))?;
        inventory += &format!(
            "[[vm]]\nname = \"{name}\"\ndisks = [\"{}\"]\nagent = \"{address}\"\npolicy = \"app-consistent-only\"\n\n",
            disk.display()
        );
    }
    let path = dir.join("inventory.toml");
    std::fs::write(&path, inventory).map_err(io("write", &path))?;
    Ok(Vms {
        inventory: path,
        agents,
        apps,
    })
}

/// Runs `vsnap ARGS` (the binary at `exe`) as a child, its output shown
/// in order with ours; an error where it fails.
fn vsnap(exe: &Path, out: &mut dyn Write, args: &[&std::ffi::OsStr]) -> Result<()> {
    let o = Command::new(exe)
        .args(args)
        .output()
        .map_err(io("run", exe))?;
    out.write_all(&o.stdout)
        .and_then(|()| out.write_all(&o.stderr))
        .map_err(io("write", "the output"))?;
    if o.status.success() {
        return Ok(());
    }
    Err(Error::Command {
        command: format!(
            "vsnap {}",
            args.join(std::ffi::OsStr::new(" ")).to_string_lossy()
        ),
        stderr: format!("exit status {}", o.status),
    })
}

/// What the demo shows after the backup, as an operator would run it:
/// `vsnap verify` of the repository, a restore of VM 0's disk from
/// `snapshot`, and both it and the live disk checked by digest.
pub fn check(
    exe: &Path,
    dir: &Path,
    repo: &Path,
    snapshot: &str,
    out: &mut dyn Write,
) -> Result<()> {
    let say = |out: &mut dyn Write, what: &str| step(out, what).map_err(io("write", "the output"));
    say(
        out,
        "verify the repository: every chunk re-read and re-hashed",
    )?;
    vsnap(
        exe,
        out,
        &[
            "verify".as_ref(),
            "-q".as_ref(),
            "--repo".as_ref(),
            repo.as_os_str(),
        ],
    )?;
    let target = format!("{snapshot}:1");
    let restored = dir.join("restored-vm0.vhd");
    say(
        out,
        &format!("restore {target}, then check it, and the live disk, by digest"),
    )?;
    vsnap(
        exe,
        out,
        &[
            "restore".as_ref(),
            "-q".as_ref(),
            "--repo".as_ref(),
            repo.as_os_str(),
            target.as_ref(),
            "--to".as_ref(),
            restored.as_os_str(),
        ],
    )?;
    for image in [&restored, &dir.join("vm0/disk0.vhd")] {
        vsnap(
            exe,
            out,
            &[
                "verify".as_ref(),
                "--repo".as_ref(),
                repo.as_os_str(),
                target.as_ref(),
                "--against".as_ref(),
                image.as_os_str(),
            ],
        )?;
    }
    Ok(())
}

/// Writes `dir/serve.toml`: the demo VMs under the service, a backup job
/// every 5 minutes keeping the last 5, and a daily verify.
pub fn serve_config(dir: &Path, listen: std::net::SocketAddr) -> Result<PathBuf> {
    let config = dir.join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "# vsnap demo --serve: the demo VMs under the service.\nrepository = \"repo\"\ninventory = \"inventory.toml\"\nstate_dir = \"state\"\nlisten = \"{listen}\"\n\n[[job]]\nname = \"demo\"\nschedule = \"*:0/5\"\nkeep = {{ last = 5 }}\ngc = true\n\n[[verify]]\nname = \"verify\"\nschedule = \"daily\"\noutdated_after = \"7d\"\n"
        ),
    )
    .map_err(io("write", &config))?;
    Ok(config)
}
