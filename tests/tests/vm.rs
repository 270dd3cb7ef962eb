//! A real VM: a stock Debian kernel under QEMU (TCG), busybox, an ext4
//! on a dynamic VHD attached through virtio-blk (and a second disk of
//! random data it does not mount), a writer appending a record every
//! 10 ms, and two agents on the VM's own virtio-serial ports: the static
//! vsnap-agent and the stock qemu-ga (scripts/vm-assets.sh and
//! scripts/vm-initramfs.sh build it; the test command runs both). Each
//! case backs the running VM up, restores the disk, and checks the
//! restored ext4 with `e2fsck -fn`: clean, without `needs_recovery`. The
//! qmp provider overlays and merges back through the VM's QMP monitor, and
//! the coordinator is killed at each of its steps (the `failpoints` build's
//! kill points); the VM runs on, the next run finishes what the dead one
//! left, and no record the guest wrote is lost.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vsnap_coordinator::qmp::QmpClient;
use vsnap_e2e::{repo_init, restore_ext4, skip, vsnap_cmd, Lack};

fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/vm")
}

/// Converts `raw` into a dynamic VHD at `vhd`, and removes it.
fn to_vhd(raw: &Path, vhd: &Path) {
    assert!(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "vpc", "-o"])
        .arg("subformat=dynamic,force_size=on")
        .arg(raw)
        .arg(vhd)
        .status()
        .unwrap()
        .success());
    std::fs::remove_file(raw).unwrap();
}

/// A running guest, stopped when dropped.
struct Vm {
    qemu: Child,
    dir: PathBuf,
    disk: PathBuf,
    /// A second disk, 256 MiB of random data the guest does not mount:
    /// what a copy inside the freeze costs, and an overlay does not.
    big: PathBuf,
}

impl Vm {
    /// Boots the guest on a new 256 MiB ext4 in a dynamic VHD in `dir`;
    /// `None` (after recording the skip) where this machine cannot.
    fn boot(test: &str, dir: &Path) -> Option<Vm> {
        let vm = assets();
        let qemu_bin = vm.join("qemu/usr/bin/qemu-system-x86_64");
        let kernel = std::fs::read_dir(vm.join("kernel/boot"))
            .ok()
            .and_then(|d| {
                d.flatten().map(|e| e.path()).find(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz"))
                })
            });
        let (Some(kernel), true, true) =
            (kernel, qemu_bin.exists(), vm.join("initramfs.gz").exists())
        else {
            skip(
                test,
                "no guest to boot: run scripts/vm-assets.sh and scripts/vm-initramfs.sh (the test command does)",
                Lack::Host,
            );
            return None;
        };
        let raw = dir.join("raw.img");
        std::fs::File::create(&raw)
            .unwrap()
            .set_len(256 << 20)
            .unwrap();
        assert!(Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&raw)
            .status()
            .unwrap()
            .success());
        let disk = dir.join("disk.vhd");
        to_vhd(&raw, &disk);
        let big = dir.join("big.vhd");
        assert!(Command::new("dd")
            .args(["if=/dev/urandom", "bs=1M", "count=256", "status=none"])
            .arg(format!("of={}", raw.display()))
            .status()
            .unwrap()
            .success());
        to_vhd(&raw, &big);
        let share = |p: &str| vm.join("qemu").join(p);
        let chardev = |id: &str, sock: &str| {
            format!(
                "socket,id={id},path={},server=on,wait=off",
                dir.join(sock).display()
            )
        };
        // KVM here cannot run a stock kernel; TCG boots it in seconds.
        let qemu = Command::new(&qemu_bin)
            .arg("-L")
            .arg(share("usr/share/qemu"))
            .arg("-L")
            .arg(share("usr/share/seabios"))
            .arg("-L")
            .arg(share("usr/lib/ipxe/qemu"))
            .args([
                "-accel", "tcg", "-m", "512", "-smp", "2", "-display", "none",
            ])
            .args(["-no-reboot", "-kernel"])
            .arg(&kernel)
            .arg("-initrd")
            .arg(vm.join("initramfs.gz"))
            .args(["-append", "console=ttyS0 panic=-1", "-serial"])
            .arg(format!("file:{}", dir.join("console.log").display()))
            .arg("-drive")
            .arg(format!(
                "file={},format=vpc,if=virtio,cache=none",
                disk.display()
            ))
            .arg("-drive")
            .arg(format!(
                "file={},format=vpc,if=virtio,cache=none",
                big.display()
            ))
            .args(["-device", "virtio-serial", "-chardev"])
            .arg(chardev("c0", "agent.sock"))
            .args([
                "-device",
                "virtserialport,chardev=c0,name=org.vsnap.agent.0",
            ])
            .arg("-chardev")
            .arg(chardev("c1", "qga.sock"))
            .args([
                "-device",
                "virtserialport,chardev=c1,name=org.qemu.guest_agent.0",
            ])
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                dir.join("qmp.sock").display()
            ))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("qemu.err")).unwrap())
            .spawn()
            .unwrap();
        let vm = Vm {
            qemu,
            dir: dir.to_path_buf(),
            disk,
            big,
        };
        let t = Instant::now();
        while !vm.console().contains("vsnap-guest: ready") {
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "the guest did not boot: {}\n{}",
                vm.console(),
                std::fs::read_to_string(dir.join("qemu.err")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("the guest booted in {:?}", t.elapsed());
        Some(vm)
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }

    /// An inventory of this VM's ext4 disk on `agent` (a socket in its
    /// directory).
    fn inventory(&self, name: &str, agent: &str, extra: &str) -> PathBuf {
        self.inventory_of(name, &[&self.disk], agent, extra)
    }

    fn inventory_of(&self, name: &str, disks: &[&Path], agent: &str, extra: &str) -> PathBuf {
        let p = self.dir.join(format!("{name}.toml"));
        let disks: Vec<String> = disks.iter().map(|d| format!("{d:?}")).collect();
        std::fs::write(
            &p,
            format!(
                "[[vm]]\nname = \"{name}\"\ndisks = [{}]\nagent = \"{agent}\"\n{extra}\n",
                disks.join(", ")
            ),
        )
        .unwrap();
        p
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
    }
}

fn backup(inv: &Path, repo: &Path) -> Value {
    backup_by(inv, repo, "copy")
}

/// `vsnap backup --inventory` with `--provider provider`: its report.
fn backup_by(inv: &Path, repo: &Path, provider: &str) -> Value {
    let o = vsnap_cmd()
        .args([
            "backup",
            "-q",
            "--json",
            "--provider",
            provider,
            "--inventory",
        ])
        .arg(inv)
        .arg("--repo")
        .arg(repo)
        .output()
        .unwrap();
    let r: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    assert!(
        o.status.success(),
        "{}\n{r:#}",
        String::from_utf8_lossy(&o.stderr)
    );
    r
}

/// Restores `id`'s disk and checks its ext4: clean, and no journal left
/// to replay.
fn restored_clean(repo: &Path, id: &str, dir: &Path) -> PathBuf {
    let (raw, features) = restore_ext4(repo, id, dir);
    assert!(!features.contains("needs_recovery"), "{features}");
    raw
}

fn ms(v: &Value) -> String {
    v.as_u64()
        .map_or("-".into(), |us| format!("{:.1} ms", us as f64 / 1000.0))
}

/// What is between the VM and its disk, through QMP: `None` when QEMU
/// writes the disk directly and runs no job; else the file it writes and
/// its block jobs.
fn on_disk(vm: &Vm, qmp: &Path) -> Option<(PathBuf, Vec<String>)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // A dead coordinator's connection may take a moment to close.
        let mut q = {
            let t = Instant::now();
            loop {
                match QmpClient::connect(qmp).await {
                    Ok(q) => break q,
                    Err(e) if t.elapsed() > Duration::from_secs(10) => panic!("{e}"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        };
        let status = q
            .execute("query-status", None, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(status["running"], true, "{status}");
        let dev = q.device_of(&vm.disk).await.unwrap();
        let jobs: Vec<String> = q
            .block_jobs()
            .await
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect();
        let direct = std::fs::canonicalize(&dev.file).ok() == std::fs::canonicalize(&vm.disk).ok();
        (!direct || !jobs.is_empty()).then_some((dev.file, jobs))
    })
}

/// How many overlay files are in `dir`.
fn qcow2_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| {
        d.flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "qcow2"))
            .count()
    })
}

#[test]
fn a_running_vm_backs_up_through_its_channel_and_qemu_ga_is_guarded_and_an_overlay_merges_back() {
    let test = "a_running_vm_backs_up_through_its_channel_and_qemu_ga_is_guarded_and_an_overlay_merges_back";
    let dir = tempfile::tempdir().unwrap();
    let Some(vm) = Vm::boot(test, dir.path()) else {
        return;
    };
    let repo = dir.path().join("repo");
    repo_init(&repo);

    // The vsnap agent on virtio-serial.
    let sock = dir.path().join("agent.sock");
    let inv = vm.inventory("serial", &format!("serial:{}", sock.display()), "");
    for round in 0..3 {
        let r = backup(&inv, &repo);
        let v = &r["vms"][0];
        assert_eq!(v["consistency"], "app-consistent", "{r:#}");
        assert_eq!(v["metrics"]["frozen"], 1, "{v:#}");
        eprintln!(
            "vsnap agent on virtio-serial, round {round}: freeze window {}, stall {}, host window {}",
            ms(&v["metrics"]["freeze_window_us"]),
            ms(&v["metrics"]["stall_us"]),
            ms(&v["metrics"]["host_window_us"])
        );
        restored_clean(&repo, v["snapshot"].as_str().unwrap(), dir.path());
    }

    // The stock qemu-ga on its own port.
    let qga = dir.path().join("qga.sock");
    let inv = vm.inventory(
        "qga",
        &format!("qga:{}", qga.display()),
        "mounts = [\"/data\"]",
    );
    for round in 0..3 {
        let r = backup(&inv, &repo);
        let v = &r["vms"][0];
        assert_eq!(v["consistency"], "app-consistent", "{r:#}");
        eprintln!(
            "qemu-ga, round {round}: host window {} (qemu-ga reports no stall)",
            ms(&v["metrics"]["host_window_us"])
        );
        restored_clean(&repo, v["snapshot"].as_str().unwrap(), dir.path());
    }

    // The guard: the coordinator dies right after qemu-ga starts its
    // freeze (its fsfreeze hook says so on the console).
    let before = vm.console().matches("vsnap-guest: qga thaw").count();
    let froze_before = vm.console().matches("vsnap-guest: qga freeze").count();
    let mut coordinator = vsnap_cmd()
        .args([
            "backup",
            "-q",
            "--provider",
            "copy",
            "--window",
            "30s",
            "--inventory",
        ])
        .arg(&inv)
        .arg("--repo")
        .arg(&repo)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while vm.console().matches("vsnap-guest: qga freeze").count() == froze_before {
        assert!(t.elapsed() < Duration::from_secs(30), "qemu-ga never froze");
        std::thread::sleep(Duration::from_millis(2));
    }
    coordinator.kill().unwrap();
    let killed = Instant::now();
    let _ = coordinator.wait();
    while vm.console().matches("vsnap-guest: qga thaw").count() == before {
        assert!(
            killed.elapsed() < Duration::from_secs(31),
            "nobody thawed the guest: {}",
            vm.console()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let delay = killed.elapsed();
    eprintln!("qemu-ga guard in a real VM: thawed {delay:?} after the coordinator was killed");
    assert!(delay < Duration::from_secs(2), "{delay:?}");
    // And the next backup is a clean one again.
    let r = backup(&inv, &repo);
    assert_eq!(r["vms"][0]["consistency"], "app-consistent", "{r:#}");

    // The qmp provider: QEMU's overlay inside the freeze, the base
    // streamed as it stands, the overlay merged back after.
    let qmp = dir.path().join("qmp.sock");
    let serial = format!("serial:{}", sock.display());
    let with_qmp = format!("qmp = \"{}\"", qmp.display());
    let inv = vm.inventory("qmp", &serial, &with_qmp);
    let overlays = dir.path().join(".vsnap-overlay");
    for round in 0..3 {
        let r = backup_by(&inv, &repo, "auto");
        let v = &r["vms"][0];
        assert_eq!(v["consistency"], "app-consistent", "{r:#}");
        assert_eq!(v["providers"], serde_json::json!(["qmp"]), "{r:#}");
        assert!(r["release_error"].is_null(), "{r:#}");
        eprintln!(
            "qmp provider (vsnap agent on virtio-serial), round {round}: freeze window {}, stall {}, host window {}, overlay {}, merged back after the stream in {}",
            ms(&v["metrics"]["freeze_window_us"]),
            ms(&v["metrics"]["stall_us"]),
            ms(&v["metrics"]["host_window_us"]),
            ms(&r["snapshots"][0]["took_us"]),
            ms(&r["commit_us"])
        );
        restored_clean(&repo, v["snapshot"].as_str().unwrap(), dir.path());
        assert_eq!(on_disk(&vm, &qmp), None, "round {round}");
        assert_eq!(qcow2_in(&overlays), 0, "round {round}");
    }

    // The window does not grow with the disks: 256 MiB more data costs a
    // copy inside the freeze, and an overlay nothing.
    let both = vm.inventory_of("both", &[&vm.disk, &vm.big], &serial, &with_qmp);
    for provider in ["copy", "qmp"] {
        let r = backup_by(&both, &repo, provider);
        let v = &r["vms"][0];
        assert_eq!(v["consistency"], "app-consistent", "{r:#}");
        eprintln!(
            "{provider}, 256 MiB of data and a 256 MiB ext4: snapshot step {}, freeze window {}, host window {}",
            ms(&r["snapshot_us"]),
            ms(&v["metrics"]["freeze_window_us"]),
            ms(&v["metrics"]["host_window_us"])
        );
    }

    // Kill the coordinator at each step; the VM runs on, and the next run
    // finishes or undoes what the dead one left.
    for (point, left) in [
        ("qmp-before-overlay", "nothing"),
        ("qmp-overlay-taken", "an overlay"),
        ("qmp-commit-started", "a commit job"),
    ] {
        let o = vsnap_cmd()
            .args(["backup", "-q", "--window", "2s", "--inventory"])
            .arg(&inv)
            .arg("--repo")
            .arg(&repo)
            .env("FAILPOINTS", format!("{point}=return"))
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            o.status.signal(),
            Some(9),
            "{point}: the coordinator should have died there (a vsnap built without the failpoints feature does not): {:?} {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        let chain = on_disk(&vm, &qmp);
        match left {
            "nothing" => assert_eq!(chain, None, "{point}"),
            "an overlay" => {
                let (file, jobs) = chain.clone().unwrap();
                assert!(file.starts_with(&overlays) && jobs.is_empty(), "{chain:?}");
                // The base stands still under the overlay.
                let digest = || {
                    let o = vsnap_cmd().arg("hash").arg(&vm.disk).output().unwrap();
                    String::from_utf8_lossy(&o.stdout).into_owned()
                };
                let before = digest();
                std::thread::sleep(Duration::from_millis(500));
                assert_eq!(digest(), before, "the base changed under the overlay");
            }
            _ => {
                let (_, jobs) = chain.clone().unwrap();
                assert_eq!(jobs, ["vsnap-commit-0"], "{chain:?}");
            }
        }
        eprintln!("killed at {point}: the VM runs on, leaving {left}: {chain:?}");
        // The guest's agent thaws by itself at the 2 s hold limit.
        std::thread::sleep(Duration::from_secs(3));
        let r = backup_by(&inv, &repo, "auto");
        let v = &r["vms"][0];
        assert_eq!(v["consistency"], "app-consistent", "{point}: {r:#}");
        let recovered = if left == "nothing" { 0 } else { 1 };
        assert_eq!(r["overlays_recovered"], recovered, "{point}: {r:#}");
        assert_eq!(on_disk(&vm, &qmp), None, "{point}");
        assert_eq!(qcow2_in(&overlays), 0, "{point}");
    }

    // Every record the guest wrote, through the overlays, the commits and
    // the dead runs, is on the disk: none missing, in order.
    let r = backup(&vm.inventory("after", &serial, ""), &repo);
    let id = r["vms"][0]["snapshot"].as_str().unwrap().to_string();
    let raw = restored_clean(&repo, &id, dir.path());
    let cat = Command::new("debugfs")
        .args(["-R", "cat /records.log"])
        .arg(&raw)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&cat.stdout);
    let numbers: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("record ")?.parse().ok())
        .collect();
    assert!(numbers.len() > 100, "{} records", numbers.len());
    for (i, n) in numbers.iter().enumerate() {
        assert_eq!(*n, i as u64 + 1, "a record is missing before {n}");
    }
}
