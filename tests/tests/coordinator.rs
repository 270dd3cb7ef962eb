//! Coordinated backups of real guests: each guest is an ext4 filesystem in
//! a fixed VHD on a loop-mounted XFS scratch filesystem with reflink, with
//! a `vsnap agent` freezing it and a writer running in it. Every freeze is
//! of a filesystem the test made; every test thaws, unmounts and detaches
//! even when it fails. Root only; skipped, saying so, elsewhere.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use vsnap_e2e::{
    agent_cmd, repo_init, restore_ext4, skip_unless_root, start_agent, vsnap_cmd, write_hook,
    writes_block,
};
use vsnap_lab::workload::{self, Workload};
use vsnap_lab::Guest;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Whose turn it is to freeze. A host-side qemu-ga's `guest-fsfreeze-thaw`
/// (the only thaw it has) thaws every frozen filesystem it can see, not
/// only those it froze: run alongside, it would thaw another test's guest
/// in the middle of that test's freeze. So a test with a host-side qemu-ga
/// runs alone, and the other freezing tests share their turn.
static FREEZERS: std::sync::RwLock<()> = std::sync::RwLock::new(());

enum Turn {
    Shared(#[allow(dead_code)] std::sync::RwLockReadGuard<'static, ()>),
    Alone(#[allow(dead_code)] std::sync::RwLockWriteGuard<'static, ()>),
}

impl Turn {
    fn shared() -> Turn {
        Turn::Shared(FREEZERS.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn alone() -> Turn {
        Turn::Alone(FREEZERS.write().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The lab's guests, each with a `vsnap agent` child and a writer. Fields
/// drop in order: workloads, then the lab (agents, filesystems, scratch),
/// then the turn, once everything this test froze is gone.
struct Lab {
    workloads: Vec<Workload>,
    lab: vsnap_lab::Lab,
    dir: PathBuf,
    _tmp: tempfile::TempDir,
    _turn: Turn,
}

impl std::ops::Deref for Lab {
    type Target = vsnap_lab::Lab;
    fn deref(&self) -> &vsnap_lab::Lab {
        &self.lab
    }
}

impl std::ops::DerefMut for Lab {
    fn deref_mut(&mut self) -> &mut vsnap_lab::Lab {
        &mut self.lab
    }
}

/// Starts the guest's `vsnap agent` with `extra` flags.
fn start_guest_agent(g: &mut Guest, extra: &[&str]) {
    g.spawn_agent(agent_cmd(), extra).unwrap();
}

impl Lab {
    /// `n` guests of `size_mib` each, agents started, writers running.
    fn new(n: usize, size_mib: u64) -> Lab {
        Lab::taking(n, size_mib, Turn::shared())
    }

    fn taking(n: usize, size_mib: u64, turn: Turn) -> Lab {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("lab");
        let mut lab = vsnap_lab::Lab::build(&dir, n, size_mib << 20).unwrap();
        for g in &mut lab.guests {
            std::fs::write(
                g.mount().join("data.txt"),
                format!("guest {}\n", g.name).repeat(1000),
            )
            .unwrap();
            start_guest_agent(g, &[]);
        }
        let epoch = std::time::Instant::now();
        let workloads = lab
            .guests
            .iter()
            .enumerate()
            .filter_map(|(i, g)| {
                workload::start(
                    workload::Kind::Random4kFsync,
                    g.mount(),
                    4 << 20,
                    epoch,
                    i as u64,
                )
                .unwrap()
            })
            .collect();
        Lab {
            workloads,
            lab,
            dir,
            _tmp: tmp,
            _turn: turn,
        }
    }

    /// Whether any guest's directory holds snapshots (`.vsnap-snap`).
    fn snapshots_left(&self) -> bool {
        self.guests
            .iter()
            .any(|g| g.disk.parent().unwrap().join(".vsnap-snap").exists())
    }

    /// An inventory of every guest; `extra` adds lines to each [[vm]].
    fn inventory(&self, extra: impl Fn(&Guest) -> String) -> PathBuf {
        self.lab.inventory(extra).unwrap()
    }

    fn repo(&self) -> PathBuf {
        let repo = self.dir.join("repo");
        if !repo.exists() {
            repo_init(&repo);
        }
        repo
    }

    fn backup(&self, inventory: &Path, args: &[&str]) -> (Option<i32>, Value, String) {
        let o = vsnap_cmd()
            .args(["backup", "--json", "-q", "--inventory"])
            .arg(inventory)
            .arg("--repo")
            .arg(self.repo())
            .args(args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout);
        let v = serde_json::from_str(&stdout).unwrap_or(Value::Null);
        (
            o.status.code(),
            v,
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    /// Starts `vsnap backup --inventory` of every guest with guest 0's
    /// freeze hook signalling the coordinator (`signal`, a kill command),
    /// then sleeping `sleep` seconds: a coordinator hit mid-freeze.
    fn backup_signalled_at_freeze(
        &self,
        signal: &str,
        sleep: &str,
        args: &[&str],
    ) -> std::process::Child {
        let pidfile = self.dir.join("coordinator.pid");
        write_hook(
            &self.guests[0].hooks,
            "10-signal-coordinator",
            &format!(
                "[ \"$1\" = freeze ] && {signal} $(cat {}) && sleep {sleep}\nexit 0",
                pidfile.display()
            ),
        );
        let inv = self.inventory(|_| String::new());
        let child = vsnap_cmd()
            .args(["backup", "-q"])
            .args(args)
            .arg("--inventory")
            .arg(&inv)
            .arg("--repo")
            .arg(self.repo())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::fs::write(&pidfile, child.id().to_string()).unwrap();
        child
    }

    fn snapshots(&self) -> Vec<Value> {
        let o = vsnap_cmd()
            .args(["snapshots", "--json", "--repo"])
            .arg(self.repo())
            .output()
            .unwrap();
        serde_json::from_slice::<Value>(&o.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    /// Restores `id`'s disk to raw and reads its ext4 superblock.
    /// Restores `id`'s disk and checks its ext4: its features line.
    fn restored_ext4(&self, id: &str) -> String {
        restore_ext4(&self.repo(), id, &self.dir).1
    }

    fn all_writable(&self) -> bool {
        self.guests
            .iter()
            .all(|g| !writes_block(&g.fs.mount, Duration::from_secs(10)))
    }
}

#[test]
fn four_guests_freeze_together_snapshot_by_reflink_and_restore_clean() {
    if skip_unless_root("four_guests_freeze_together_snapshot_by_reflink_and_restore_clean") {
        return;
    }
    let mut lab = Lab::new(4, 64);
    for g in &lab.guests {
        write_hook(
            &g.hooks,
            "10-app",
            &format!(
                "echo \"$1\" >> {}",
                lab.dir.join(format!("{}.hooklog", g.name)).display()
            ),
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let inv = lab.inventory(|_| String::new());
    let (code, r, err) = lab.backup(&inv, &[]);
    assert_eq!(code, Some(0), "{err}\n{r:#}");
    assert!(r["aborted"].is_null(), "{r:#}");
    let vms = r["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 4);
    // The barrier: every guest acknowledged its freeze before any thaw
    // was acknowledged, and the snapshot came between.
    let max_ack = vms
        .iter()
        .map(|v| v["metrics"]["freeze_ack_at_us"].as_u64().unwrap())
        .max()
        .unwrap();
    let min_thaw = vms
        .iter()
        .map(|v| v["metrics"]["thaw_ack_at_us"].as_u64().unwrap())
        .min()
        .unwrap();
    assert!(max_ack < min_thaw, "{r:#}");
    // Each guest is thawed once its own disk is snapshotted: after the
    // barrier closed, and at least its own disk's snapshot time later.
    let snaps = r["snapshots"].as_array().unwrap();
    for (v, s) in vms.iter().zip(snaps) {
        let sent = v["metrics"]["thaw_sent_at_us"].as_u64().unwrap();
        assert!(sent - max_ack >= s["took_us"].as_u64().unwrap(), "{r:#}");
    }
    for v in vms {
        assert_eq!(v["consistency"], "app-consistent", "{v:#}");
        assert_eq!(v["providers"], serde_json::json!(["reflink"]), "{v:#}");
        assert_eq!(v["metrics"]["frozen"], 1);
        assert_eq!(v["metrics"]["expected"], 1);
        let w = v["metrics"]["freeze_window_us"].as_u64().unwrap();
        assert!(w > 0 && w < 10_000_000, "{v:#}");
        let stall = v["metrics"]["stall_us"].as_u64().unwrap();
        assert!(stall >= w, "the stall holds the frozen window: {v:#}");
    }
    let windows: Vec<u64> = vms
        .iter()
        .map(|v| v["metrics"]["freeze_window_us"].as_u64().unwrap())
        .collect();
    eprintln!(
        "reflink, 4 guests: freeze windows {windows:?} µs, window {} µs, skew {} µs, snapshot {} µs",
        r["window_us"], r["barrier_skew_us"], r["snapshot_us"]
    );
    assert!(lab.all_writable());
    let stalls: Vec<Duration> = lab
        .workloads
        .drain(..)
        .map(|w| {
            let longest = w.finish().unwrap().iter().map(|&(_, took)| took).max();
            Duration::from_micros(longest.map_or(0, u64::from))
        })
        .collect();
    eprintln!("longest write stalls: {stalls:?}");
    // Hooks ran in VSS order in every guest.
    for g in &lab.guests {
        let log = std::fs::read_to_string(lab.dir.join(format!("{}.hooklog", g.name))).unwrap();
        assert_eq!(
            log,
            "prepare\nfreeze\nthaw\ncomplete\n",
            "{}",
            g.agent_log()
        );
    }
    // Snapshots released.
    assert!(!lab.snapshots_left());
    // Manifests: app-consistent, with the freeze metrics.
    let snaps = lab.snapshots();
    assert_eq!(snaps.len(), 4);
    for v in vms {
        let id = v["snapshot"].as_str().unwrap();
        let snap = snaps.iter().find(|s| s["id"] == id).unwrap();
        assert_eq!(snap["consistency"], "app-consistent", "{snap:#}");
        assert!(snap["freeze_window_us"].as_u64().is_some(), "{snap:#}");
        assert!(
            snap["stall_us"].as_u64() >= snap["freeze_window_us"].as_u64(),
            "{snap:#}"
        );
        let features = lab.restored_ext4(id);
        assert!(!features.contains("needs_recovery"), "{}", features);
    }
}

#[test]
fn without_an_agent_the_snapshot_is_crash_consistent_and_ext4_shows_it() {
    if skip_unless_root("without_an_agent_the_snapshot_is_crash_consistent_and_ext4_shows_it") {
        return;
    }
    let lab = Lab::new(1, 64);
    let g = &lab.guests[0];
    let inv = lab.dir.join("none.toml");
    std::fs::write(
        &inv,
        format!(
            "[[vm]]\nname = \"bare\"\ndisks = [\"{}\"]\nagent = \"none\"\npolicy = \"allow-crash-consistent\"\n",
            g.disk.display()
        ),
    )
    .unwrap();
    let (code, r, err) = lab.backup(&inv, &["--provider", "copy"]);
    assert_eq!(code, Some(0), "{err}\n{r:#}");
    let v = &r["vms"][0];
    assert_eq!(v["consistency"], "crash-consistent", "{v:#}");
    assert_eq!(v["providers"], serde_json::json!(["copy"]));
    // A copy of a mounted ext4 taken without a freeze keeps the journal's
    // needs_recovery flag; the frozen ones above do not.
    let features = lab.restored_ext4(v["snapshot"].as_str().unwrap());
    assert!(features.contains("needs_recovery"), "{}", features);
}

#[test]
fn a_failing_freeze_hook_aborts_thaws_everyone_and_writes_nothing() {
    if skip_unless_root("a_failing_freeze_hook_aborts_thaws_everyone_and_writes_nothing") {
        return;
    }
    let lab = Lab::new(4, 32);
    let bad = &lab.guests[2];
    // The other guests freeze first and hold: the failing one is slow to
    // fail, so they are frozen when it does.
    write_hook(
        &bad.hooks,
        "50-veto",
        "[ \"$1\" = freeze ] && { sleep 0.3; echo 'db will not quiesce' >&2; exit 1; }\nexit 0",
    );
    let inv = lab.inventory(|_| String::new());
    let (code, r, err) = lab.backup(&inv, &[]);
    assert_eq!(code, Some(1), "{err}\n{r:#}");
    let reason = r["aborted"].as_str().unwrap();
    assert!(
        reason.contains("vm g2") && reason.contains("50-veto"),
        "{reason}"
    );
    assert!(err.contains("backup aborted"), "{err}");
    for (i, v) in r["vms"].as_array().unwrap().iter().enumerate() {
        assert!(v["snapshot"].is_null());
        if i != 2 {
            assert_eq!(v["metrics"]["frozen"], 1, "{v:#}");
        }
    }
    assert!(lab.all_writable());
    assert!(lab.snapshots().is_empty(), "a manifest was written");
    assert!(!lab.snapshots_left());
    for g in &lab.guests {
        assert!(!g.marker.exists(), "{}", g.agent_log());
    }
}

#[test]
fn a_thaw_that_comes_too_late_is_not_app_consistent() {
    if skip_unless_root("a_thaw_that_comes_too_late_is_not_app_consistent") {
        return;
    }
    let mut lab = Lab::new(2, 128);
    // Guest 1's agent holds a freeze for 20 ms at most; copying 128 MiB
    // of disk inside the freeze takes longer, so its watchdog thaws
    // before the coordinator's thaw arrives.
    start_guest_agent(&mut lab.guests[1], &["--hold-limit", "20ms"]);
    let inv = lab.inventory(|g| {
        if g.name == "g1" {
            "policy = \"allow-crash-consistent\"".into()
        } else {
            String::new()
        }
    });
    let (code, r, err) = lab.backup(&inv, &["--provider", "copy"]);
    assert_eq!(code, Some(0), "{err}\n{r:#}");
    let v0 = &r["vms"][0];
    let v1 = &r["vms"][1];
    assert_eq!(v0["consistency"], "app-consistent", "{v0:#}");
    assert_eq!(v1["consistency"], "crash-consistent", "{v1:#}");
    assert_eq!(v1["metrics"]["failure"]["class"], "timeout", "{v1:#}");
    assert!(
        v1["degraded"]
            .as_str()
            .unwrap()
            .contains("not application-consistent"),
        "{v1:#}"
    );
    let snaps = lab.snapshots();
    let s1 = snaps.iter().find(|s| s["vm"] == "g1").unwrap();
    assert_eq!(s1["consistency"], "crash-consistent");
    eprintln!(
        "copy, 2 guests of 128 MiB: freeze window {} µs, snapshot {} µs",
        v0["metrics"]["freeze_window_us"], r["snapshot_us"]
    );

    // With app-consistent-only, the same late thaw fails that VM.
    let inv = lab.inventory(|_| String::new());
    let (code, r, _) = lab.backup(&inv, &["--provider", "copy"]);
    assert_eq!(code, Some(1), "{r:#}");
    assert!(r["vms"][1]["snapshot"].is_null());
    assert!(r["vms"][1]["error"]
        .as_str()
        .unwrap()
        .contains("not app-consistent"));
    assert_eq!(r["vms"][0]["consistency"], "app-consistent");
    assert!(lab.all_writable());
}

#[test]
fn a_killed_coordinator_leaves_guests_to_their_watchdogs_and_its_snapshots_to_the_next_run() {
    if skip_unless_root(
        "a_killed_coordinator_leaves_guests_to_their_watchdogs_and_its_snapshots_to_the_next_run",
    ) {
        return;
    }
    let lab = Lab::new(2, 32);
    // The coordinator dies during the freeze step: guest 0's freeze hook
    // kills it, and the agents go on to freeze with nobody to thaw them.
    let child = lab.backup_signalled_at_freeze("kill -9", "0.2", &["--window", "2s"]);
    let status = child.wait_with_output().unwrap().status;
    assert!(!status.success());
    let t = std::time::Instant::now();
    // The agent goes on to freeze once the hook returns: its marker is
    // written right before FIFREEZE.
    while !lab.guests[0].marker.exists() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    // Frozen after that, with no coordinator. How soon is not the point:
    // it depends on the machine's load (FIFREEZE flushes the loop device
    // while the other tests write theirs), and on whether this agent could
    // expedite its grace periods. Writes block for the 2 s hold, which a
    // 300 ms probe cannot miss.
    let t = std::time::Instant::now();
    while !writes_block(&lab.guests[0].fs.mount, Duration::from_millis(300)) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "guest 0 never froze; marker {}; agent log:\n{}",
            lab.guests[0].marker.exists(),
            lab.guests[0].agent_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The watchdog thaws within the 2 s hold limit the coordinator asked for.
    assert!(lab.all_writable());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // Logged once the thaw hooks ran, a moment after the FITHAW.
    let logged = |lab: &Lab| lab.guests[0].agent_log().contains("the watchdog thawed");
    let t = std::time::Instant::now();
    while !logged(&lab) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(logged(&lab), "{}", lab.guests[0].agent_log());
    // Its snapshot directory is still there; the next run removes it.
    assert!(lab.snapshots_left());
    std::fs::remove_file(lab.guests[0].hooks.join("10-signal-coordinator")).unwrap();
    let inv = lab.inventory(|_| String::new());
    let (code, r, err) = lab.backup(&inv, &[]);
    assert_eq!(code, Some(0), "{err}\n{r:#}");
    // One stale run's directory beside each guest's disk.
    assert_eq!(r["stale_snapshots_removed"], 2, "{r:#}");
    assert!(!lab.snapshots_left());
}

#[test]
fn a_tcp_client_without_the_token_cannot_freeze() {
    if skip_unless_root("a_tcp_client_without_the_token_cannot_freeze") {
        return;
    }
    let mut lab = Lab::new(1, 32);
    let token = lab.dir.join("token");
    std::fs::write(&token, "a-long-enough-secret-token\n").unwrap();
    let wrong = lab.dir.join("wrong");
    std::fs::write(&wrong, "a-long-enough-guessed-token\n").unwrap();
    let (err, inv) = (lab.dir.join("tcp.err"), lab.dir.join("tcp.toml"));
    let g = &mut lab.guests[0];
    g.stop_agent();
    let args = [
        "--listen",
        "tcp:127.0.0.1:0",
        "--token-file",
        s(&token),
        "--freeze",
        s(&g.fs.mount),
        "--marker",
        s(&g.marker),
    ];
    let agent = start_agent(&args, &err).unwrap();
    let addr = agent.address.clone();
    g.adopt_agent(agent);
    let vhd = g.disk.clone();
    let write_inv = |tf: &Path| {
        std::fs::write(
            &inv,
            format!(
                "[[vm]]\nname = \"t\"\ndisks = [\"{}\"]\nagent = \"{addr}\"\ntoken_file = \"{}\"\n",
                vhd.display(),
                tf.display()
            ),
        )
        .unwrap();
    };
    write_inv(&wrong);
    let (code, r, err) = lab.backup(&inv, &[]);
    assert_eq!(code, Some(1), "{err}\n{r:#}");
    assert_eq!(
        r["vms"][0]["metrics"]["failure"]["class"], "unauthorized",
        "{r:#}"
    );
    assert!(r["vms"][0]["metrics"]["frozen"].is_null());
    assert!(lab.snapshots().is_empty());
    write_inv(&token);
    let (code, r, err) = lab.backup(&inv, &[]);
    assert_eq!(code, Some(0), "{err}\n{r:#}");
    assert_eq!(r["vms"][0]["consistency"], "app-consistent");
}

/// A stock qemu-ga on a unix socket, with `guest-fsfreeze-freeze` (every
/// filesystem of the machine) blocked, so only freeze-list can run.
/// A child process (qemu-ga, qemu-storage-daemon), killed when dropped.
struct Qga(std::process::Child);

impl Qga {
    fn start(dir: &Path) -> (Qga, PathBuf) {
        let sock = dir.join("qga.sock");
        let state = dir.join("qga-state");
        std::fs::create_dir_all(&state).unwrap();
        let child = Command::new("qemu-ga")
            .args(["-m", "unix-listen", "-b", "guest-fsfreeze-freeze", "-p"])
            .arg(&sock)
            .arg("-t")
            .arg(&state)
            .arg("-f")
            .arg(dir.join("qga.pid"))
            .arg("-l")
            .arg(dir.join("qga.log"))
            .spawn()
            .expect("qemu-ga (Debian package qemu-guest-agent; scripts/test.sh installs it)");
        let t = std::time::Instant::now();
        while !sock.exists() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        (Qga(child), sock)
    }
}

impl Qga {
    /// qemu-storage-daemon with a QMP monitor at `sock`: a real QMP
    /// peer with no VM behind it.
    fn storage_daemon(sock: &Path) -> Qga {
        let daemon = Qga(Command::new("qemu-storage-daemon")
            .arg("--chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=m0",
                sock.display()
            ))
            .args(["--monitor", "chardev=m0"])
            .spawn()
            .unwrap());
        let t = std::time::Instant::now();
        while !sock.exists() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }
}

impl Drop for Qga {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One guest quiesced by the stock qemu-ga instead of a vsnap agent, with
/// `fill_mib` MiB of random data written into it first (so that copying
/// its disk takes a while): the lab, qemu-ga, its socket and the guest's
/// mount. Bound in that order, qemu-ga stops before the lab goes.
fn qga_guest(size_mib: u64, fill_mib: u64) -> (Lab, Qga, PathBuf, PathBuf) {
    let mut lab = Lab::taking(1, size_mib, Turn::alone());
    lab.guests[0].stop_agent();
    let mount = lab.guests[0].fs.mount.clone();
    if fill_mib > 0 {
        // Written through to the disk: a freeze that had to write back
        // hundreds of MiB first would take longer than the short windows
        // these tests keep, on a busy machine.
        let fill = Command::new("dd")
            .args(["if=/dev/urandom", "bs=4M", "status=none", "conv=fsync"])
            .arg(format!("count={}", fill_mib / 4))
            .arg(format!("of={}", mount.join("fill").display()))
            .status()
            .unwrap();
        assert!(fill.success());
    }
    let (qga, sock) = Qga::start(&lab.dir);
    (lab, qga, sock, mount)
}

/// The qemu-ga guest's inventory, freezing its mount, at `lab.dir/file`,
/// with `extra` lines.
fn qga_inventory(lab: &Lab, sock: &Path, file: &str, extra: &str) -> PathBuf {
    let g = &lab.guests[0];
    let p = lab.dir.join(file);
    std::fs::write(
        &p,
        format!(
            "[[vm]]\nname = \"q\"\ndisks = [\"{}\"]\nagent = \"qga:{}\"\nmounts = [\"{}\"]\n{extra}\n",
            g.disk.display(),
            sock.display(),
            g.fs.mount.display()
        ),
    )
    .unwrap();
    p
}

#[test]
fn the_stock_qemu_guest_agent_quiesces_through_freeze_list() {
    if skip_unless_root("the_stock_qemu_guest_agent_quiesces_through_freeze_list") {
        return;
    }
    let (lab, _qga, sock, _) = qga_guest(64, 0);
    let inv = qga_inventory(&lab, &sock, "qga.toml", "");
    let (code, r, err) = lab.backup(&inv, &[]);
    assert_eq!(code, Some(0), "{err}\n{r:#}");
    // The guard stood down once the thaw came.
    let guards = Command::new("pgrep")
        .args(["-f", &format!("__qga-guard {}", sock.display())])
        .output()
        .unwrap();
    assert!(!guards.status.success(), "a guard lingers after the thaw");
    let v = &r["vms"][0];
    assert_eq!(v["consistency"], "app-consistent", "{v:#}");
    assert_eq!(v["metrics"]["frozen"], 1, "{v:#}");
    assert_eq!(v["metrics"]["expected"], 1, "{v:#}");
    assert!(v["metrics"]["host_window_us"].as_u64().unwrap() > 0);
    eprintln!(
        "qemu-ga, 1 guest: host-observed window {} µs, snapshot {} µs",
        v["metrics"]["host_window_us"], r["snapshot_us"]
    );
    assert!(lab.all_writable());
    let features = lab.restored_ext4(v["snapshot"].as_str().unwrap());
    assert!(!features.contains("needs_recovery"), "{}", features);
}

/// One qemu-ga command over a fresh connection (after qga's own resync),
/// as another client would send it; its `return`. qemu-ga serves one
/// client at a time, so a connection may wait for a guard's to close; one
/// that fails is said, and tried again on a new connection.
fn qga_exec(sock: &Path, cmd: Value) -> Value {
    let t = std::time::Instant::now();
    let mut tries = Vec::new();
    while t.elapsed() < Duration::from_secs(30) {
        match qga_exec_once(sock, &cmd) {
            Ok(v) => {
                if !tries.is_empty() {
                    eprintln!("qga_exec {cmd}: answered after {tries:?}");
                }
                return v;
            }
            Err(e) => {
                tries.push(format!("{e} after {:?}", t.elapsed()));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    let log = std::fs::read_to_string(sock.with_file_name("qga.log")).unwrap_or_default();
    let last: Vec<&String> = tries.iter().rev().take(3).collect();
    panic!(
        "qemu-ga at {} never answered {cmd}: {} tries, the last {last:?}\nqga.log:\n{log}",
        sock.display(),
        tries.len()
    );
}

fn qga_exec_once(sock: &Path, cmd: &Value) -> std::io::Result<Value> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut msg = vec![0xFFu8];
    msg.extend(br#"{"execute":"guest-sync-delimited","arguments":{"id":4242}}"#);
    msg.push(b'\n');
    msg.extend(cmd.to_string().bytes());
    msg.push(b'\n');
    s.write_all(&msg)?;
    let mut r = std::io::BufReader::new(s);
    loop {
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_start_matches('\u{FFFD}').trim();
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            continue;
        };
        if v["return"] != 4242 && v.get("error").is_none() {
            return Ok(v["return"].clone());
        }
    }
}

/// An inventory of one VM on `agent`, with a small disk of its own.
fn one_vm(dir: &Path, agent: &str) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let disk = dir.join("d.vhd");
    vsnap_e2e::qemu_image(&disk, "dynamic", "16M", &[(0x5a, 0, 65536)]);
    let inv = dir.join("inv.toml");
    std::fs::write(
        &inv,
        format!(
            "[[vm]]\nname = \"q\"\ndisks = [\"{}\"]\nagent = \"{agent}\"\n",
            disk.display()
        ),
    )
    .unwrap();
    let repo = dir.join("repo");
    repo_init(&repo);
    (inv, repo)
}

/// `vsnap backup --inventory`: its exit code, stderr, and how long it took.
fn timed_backup(inv: &Path, repo: &Path) -> (Option<i32>, String, Duration) {
    let t = std::time::Instant::now();
    let o = vsnap_cmd()
        .args(["backup", "-q", "--provider", "copy", "--inventory"])
        .arg(inv)
        .arg("--repo")
        .arg(repo)
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
        t.elapsed(),
    )
}

#[test]
fn qemu_ga_failures_are_quick_and_say_what_is_wrong_with_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_qga, sock) = Qga::start(d);
    let (inv, repo) = one_vm(d, &format!("qga:{}", sock.display()));

    // Busy: another client holds qemu-ga, which serves one at a time.
    let holder = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    {
        use std::io::{Read, Write};
        let mut h = &holder;
        h.write_all(b"\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":1}}\n")
            .unwrap();
        let mut buf = [0u8; 256];
        let _ = h.read(&mut buf).unwrap();
    }
    let (code, err, took) = timed_backup(&inv, &repo);
    eprintln!("busy qemu-ga: failed in {took:?}");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("qga:{}", sock.display()))
            && err.contains("one client at a time")
            && err.contains("libvirt"),
        "{err}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}: {err}");
    drop(holder);

    // A QMP monitor given as qemu-ga (qemu-storage-daemon's is real QMP).
    let qmp = d.join("qmp.sock");
    let _daemon = Qga::storage_daemon(&qmp);
    let (inv_qmp, _) = one_vm(&d.join("qmp-vm"), &format!("qga:{}", qmp.display()));
    let (code, err, took) = timed_backup(&inv_qmp, &repo);
    eprintln!("QMP given as qemu-ga: failed in {took:?}");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("qga:{}", qmp.display()))
            && err.contains("a QMP monitor, not qemu-ga"),
        "{err}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}: {err}");

    // No socket at all: named as the inventory names it.
    let gone = d.join("gone.sock");
    let (inv_gone, _) = one_vm(&d.join("gone-vm"), &format!("qga:{}", gone.display()));
    let (code, err, took) = timed_backup(&inv_gone, &repo);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("qga:{}: connect:", gone.display())) && !err.contains("unix:"),
        "{err}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}: {err}");
}

#[test]
fn the_qmp_provider_says_what_it_needs_before_any_freeze() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (inv, repo) = one_vm(&d.join("vm"), "none");
    let run = |inv: &Path| {
        let t = std::time::Instant::now();
        let o = vsnap_cmd()
            .args(["backup", "-q", "--provider", "qmp", "--inventory"])
            .arg(inv)
            .arg("--repo")
            .arg(&repo)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{:?}: {err}",
            t.elapsed()
        );
        err
    };
    // No monitor named.
    let err = run(&inv);
    assert!(
        err.contains("needs the VM's QEMU monitor") && err.contains("qmp = "),
        "{err}"
    );
    let with_qmp = |sock: &Path| {
        let text = std::fs::read_to_string(&inv).unwrap();
        let p = d.join(format!(
            "{}.toml",
            sock.file_name().unwrap().to_string_lossy()
        ));
        std::fs::write(&p, format!("{text}qmp = \"{}\"\n", sock.display())).unwrap();
        p
    };
    // No socket.
    let gone = d.join("gone.sock");
    let err = run(&with_qmp(&gone));
    assert!(
        err.contains(&format!("qmp:{}: connect:", gone.display())),
        "{err}"
    );
    // A qemu-ga socket: it never greets.
    let (_qga, qga) = Qga::start(d);
    let err = run(&with_qmp(&qga));
    assert!(
        err.contains(&format!("qmp:{}", qga.display())) && err.contains("not a QMP monitor"),
        "{err}"
    );
    // A real QMP monitor without the disk.
    let qmp = d.join("qsd.sock");
    let _daemon = Qga::storage_daemon(&qmp);
    let err = run(&with_qmp(&qmp));
    assert!(
        err.contains("the VM has no disk") && err.contains("d.vhd"),
        "{err}"
    );
    // Nothing was left beside the disk.
    assert!(!d.join("vm").join(".vsnap-overlay").exists());
    assert!(!d.join("vm").join(".vsnap-snap").exists());
}

#[test]
fn the_window_is_kept_for_qemu_ga_guests_too() {
    if skip_unless_root("the_window_is_kept_for_qemu_ga_guests_too") {
        return;
    }
    // 384 MiB of data: copying the disk takes far longer than the window.
    let (lab, _qga, sock, _) = qga_guest(512, 384);
    let inv = |policy: &str| {
        let file = format!("{policy}.toml");
        qga_inventory(&lab, &sock, &file, &format!("policy = \"{policy}\""))
    };
    let window = ["--window", "400ms", "--provider", "copy"];
    let (code, r, err) = lab.backup(&inv("allow-crash-consistent"), &window);
    assert_eq!(code, Some(0), "{err}\n{r:#}");
    let v = &r["vms"][0];
    assert_eq!(v["consistency"], "crash-consistent", "{v:#}");
    assert!(
        v["degraded"]
            .as_str()
            .unwrap()
            .contains("the 400 ms window passed before its snapshots were taken"),
        "{v:#}"
    );
    // Thawed at the window's end, not when the copy finished.
    let m = &v["metrics"];
    let held = m["thaw_sent_at_us"].as_u64().unwrap() - m["freeze_sent_at_us"].as_u64().unwrap();
    eprintln!(
        "qemu-ga, window 400 ms: thaw sent {held} µs after the freeze, snapshot {} µs",
        r["snapshot_us"]
    );
    assert!(
        held < 1_400_000 && r["snapshot_us"].as_u64().unwrap() > held,
        "{r:#}"
    );
    assert!(lab.all_writable());

    let (code, r, err) = lab.backup(&inv("app-consistent-only"), &window);
    assert_eq!(code, Some(1), "{err}\n{r:#}");
    assert!(
        err.contains("not app-consistent: the 400 ms window passed"),
        "{err}"
    );
    assert!(r["vms"][0]["snapshot"].is_null(), "{r:#}");
    assert!(lab.all_writable());
}

#[test]
fn a_coordinator_killed_while_a_qemu_ga_guest_is_frozen_leaves_its_guard_to_thaw_it() {
    if skip_unless_root(
        "a_coordinator_killed_while_a_qemu_ga_guest_is_frozen_leaves_its_guard_to_thaw_it",
    ) {
        return;
    }
    // Enough data that copying the disk keeps the guest frozen a while.
    let (lab, mut qga, sock, mount) = qga_guest(512, 384);
    let inv = qga_inventory(&lab, &sock, "qga.toml", "");
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
        .arg(lab.repo())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !writes_block(&mount, Duration::from_millis(50)) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the guest never froze"
        );
    }
    // Right after the freeze, the coordinator dies: no thaw from it.
    coordinator.kill().unwrap();
    let killed = std::time::Instant::now();
    let _ = coordinator.wait();
    let t = std::time::Instant::now();
    while writes_block(&mount, Duration::from_millis(20)) {
        assert!(
            t.elapsed() < Duration::from_secs(31),
            "still frozen: no guard thawed it"
        );
    }
    let thawed_after = killed.elapsed();
    eprintln!("qemu-ga guard: thawed {thawed_after:?} after the coordinator was killed");
    assert!(thawed_after < Duration::from_secs(2), "{thawed_after:?}");
    // qemu-ga's own view, once the guard has let go of it. The host's
    // qemu-ga has been seen to exit after such a thaw (its socket then
    // refuses): that is said, not taken for the guard's failure, which
    // the writes above already ruled out.
    let status = serde_json::json!({"execute": "guest-fsfreeze-status"});
    let t = std::time::Instant::now();
    loop {
        if let Some(exit) = qga.0.try_wait().unwrap() {
            eprintln!("the host's qemu-ga exited ({exit}) after the guard's thaw");
            break;
        }
        match qga_exec_once(&sock, &status) {
            Ok(v) => {
                assert_eq!(v, "thawed");
                break;
            }
            Err(e) => assert!(t.elapsed() < Duration::from_secs(30), "qemu-ga: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(lab.all_writable());
    // The guard is gone, its work done.
    let t = std::time::Instant::now();
    loop {
        let o = Command::new("pgrep")
            .args(["-f", &format!("__qga-guard {}", sock.display())])
            .output()
            .unwrap();
        if !o.status.success() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "the guard lingers");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_guest_found_frozen_through_qemu_ga_is_left_as_found_and_said_so_once() {
    if skip_unless_root("a_guest_found_frozen_through_qemu_ga_is_left_as_found_and_said_so_once") {
        return;
    }
    let (lab, _qga, sock, mount) = qga_guest(32, 0);
    // Another backup froze the guest and is gone (or still running).
    let n = qga_exec(
        &sock,
        serde_json::json!({"execute": "guest-fsfreeze-freeze-list",
                           "arguments": {"mountpoints": [mount.to_str().unwrap()]}}),
    );
    assert_eq!(n, 1);
    let inv = qga_inventory(&lab, &sock, "qga.toml", "");
    let (code, r, err) = lab.backup(&inv, &[]);
    assert_eq!(code, Some(1), "{err}\n{r:#}");
    assert!(
        err.contains("frozen already") && err.contains("leaves it as it is"),
        "{err}"
    );
    assert!(!err.contains("every guest thawed"), "{err}");
    assert!(err.contains("every guest this run froze thawed"), "{err}");
    // Not thawed behind the other backup's back.
    assert!(writes_block(&mount, Duration::from_millis(300)));
    assert_eq!(
        qga_exec(
            &sock,
            serde_json::json!({"execute": "guest-fsfreeze-status"})
        ),
        "frozen"
    );
    qga_exec(&sock, serde_json::json!({"execute": "guest-fsfreeze-thaw"}));
    assert!(lab.all_writable());
}

#[test]
fn forcing_reflink_where_the_filesystem_cannot_clone_says_so_before_any_freeze() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.vhd");
    vsnap_e2e::qemu_image(&disk, "dynamic", "16M", &[(0x5a, 0, 65536)]);
    let inv = dir.path().join("inv.toml");
    std::fs::write(
        &inv,
        format!(
            "[[vm]]\nname = \"a\"\ndisks = [\"{}\"]\nagent = \"none\"\n",
            disk.display()
        ),
    )
    .unwrap();
    let repo = dir.path().join("repo");
    repo_init(&repo);
    let run = |args: &[&str]| {
        vsnap_cmd()
            .args(["backup", "-q", "--inventory"])
            .arg(&inv)
            .arg("--repo")
            .arg(&repo)
            .args(args)
            .output()
            .unwrap()
    };
    // The test's own temporary directory is on the machine's root
    // filesystem; where that can clone (XFS, btrfs) there is nothing to
    // refuse, so the test says so and checks the success instead.
    let o = run(&["--provider", "reflink"]);
    let err = String::from_utf8_lossy(&o.stderr);
    if o.status.success() {
        eprintln!(
            "{}: this filesystem can clone; nothing to refuse",
            dir.path().display()
        );
    } else {
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains("cannot clone files") && err.contains("--provider copy"),
            "{err}"
        );
        assert!(
            !dir.path().join(".vsnap-snap").exists(),
            "a refused run left its snapshot directory"
        );
    }
    // An unknown VM, and a bad window, are named.
    let o = run(&["--vm", "b"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("no vm \"b\" in the inventory"));
    let o = run(&["--window", "soon"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("'soon' for '--window <DURATION>': not a duration"),
        "{err}"
    );
    // auto falls back to a copy, and agent "none" is crash-consistent.
    let o = run(&["--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["vms"][0]["consistency"], "crash-consistent", "{r:#}");
    // The snapshot is the same dynamic VHD: one allocated 2 MiB block read.
    assert_eq!(r["streamed"]["bytes_read"], 2 << 20, "{r:#}");
    assert_eq!(r["streamed"]["preloaded_chunks"], 0, "{r:#}");
    // The next backup knows the VM's chunks before it starts (loaded with
    // the last snapshot's index), and stores nothing new.
    let o = run(&["--json"]);
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["streamed"]["preloaded_chunks"], 1, "{r:#}");
    assert_eq!(r["streamed"]["new_bytes"], 0, "{r:#}");
}

#[test]
fn the_demo_backs_up_its_vms_app_consistently_and_cleans_up_its_agents() {
    let _turn = Turn::shared();
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    let o = vsnap_cmd()
        .arg("demo")
        .arg(&demo)
        .args(["--vms", "2", "--disk-size", "32M"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(text.matches("app-consistent").count(), 2, "{text}");
    assert!(text.contains("matches"), "{text}");
    let snaps = vsnap_cmd()
        .args(["snapshots", "--json", "--repo"])
        .arg(demo.join("repo"))
        .output()
        .unwrap();
    let snaps: Value = serde_json::from_slice(&snaps.stdout).unwrap();
    let snaps = snaps.as_array().unwrap();
    assert_eq!(snaps.len(), 2);
    for s in snaps {
        assert_eq!(s["consistency"], "app-consistent");
        assert!(s["freeze_window_us"].as_u64().unwrap() > 0, "{s:#}");
    }
    // Each disk is a real ext4 filesystem.
    let restored = demo.join("restored-vm0.vhd");
    let raw = dir.path().join("vm0.raw");
    let conv = Command::new("qemu-img")
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(&restored)
        .arg(&raw)
        .status()
        .unwrap();
    assert!(conv.success());
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    // The agents are gone: their sockets refuse connections.
    for vm in ["vm0", "vm1"] {
        let sock = demo.join(vm).join("agent.sock");
        assert!(
            std::os::unix::net::UnixStream::connect(&sock).is_err(),
            "{vm}'s agent still runs"
        );
    }
}

#[test]
fn a_connection_that_breaks_is_retried_with_back_off() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.vhd");
    vsnap_e2e::qemu_image(&disk, "dynamic", "16M", &[(0x5a, 0, 65536)]);
    let token = dir.path().join("token");
    std::fs::write(&token, "sixteen-or-more-characters\n").unwrap();
    // A peer that accepts the first connection and drops it at once, as
    // an agent that crashed and restarts would. Its port is below the
    // kernel's ephemeral range: no other test's outgoing connection can
    // take it between the peer's close and the agent's bind.
    let port = vsnap_e2e::free_port();
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let inv = dir.path().join("inv.toml");
    std::fs::write(
        &inv,
        format!(
            "[[vm]]\nname = \"r\"\ndisks = [\"{}\"]\nagent = \"tcp:127.0.0.1:{port}\"\ntoken_file = \"{}\"\n",
            disk.display(),
            token.display()
        ),
    )
    .unwrap();
    let repo = dir.path().join("repo");
    repo_init(&repo);
    let backup = vsnap_cmd()
        .args(["backup", "-q", "--json", "--inventory"])
        .arg(&inv)
        .arg("--repo")
        .arg(&repo)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (first, _) = listener.accept().unwrap();
    drop(first);
    drop(listener);
    // The real agent takes the port over before the retry (200 ms later).
    let listen = format!("tcp:127.0.0.1:{port}");
    let marker = dir.path().join("agent.frozen");
    let args = [
        "--listen",
        listen.as_str(),
        "--token-file",
        s(&token),
        "--marker",
        s(&marker),
    ];
    let _agent = start_agent(&args, &dir.path().join("agent.err")).unwrap();
    let o = backup.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let v = &r["vms"][0];
    assert_eq!(v["consistency"], "app-consistent", "{v:#}");
    assert!(v["metrics"]["retries"].as_u64().unwrap() >= 1, "{v:#}");
    assert!(v["metrics"]["failure"].is_null(), "{v:#}");
}

#[test]
fn a_mount_the_agent_does_not_freeze_fails_before_anyone_is_frozen() {
    if skip_unless_root("a_mount_the_agent_does_not_freeze_fails_before_anyone_is_frozen") {
        return;
    }
    let lab = Lab::new(2, 32);
    let inv = lab.inventory(|g| {
        if g.name == "g1" {
            "mounts = [\"/srv/not-a-mount\"]".into()
        } else {
            String::new()
        }
    });
    let (code, r, err) = lab.backup(&inv, &[]);
    assert_eq!(code, Some(1), "{err}\n{r:#}");
    let reason = r["aborted"].as_str().unwrap();
    assert!(
        reason.contains("/srv/not-a-mount") && reason.contains("does not freeze"),
        "{reason}"
    );
    for v in r["vms"].as_array().unwrap() {
        assert!(v["metrics"]["frozen"].is_null(), "{v:#}");
        assert!(v["metrics"]["freeze_sent_at_us"].is_null(), "{v:#}");
    }
    assert!(lab.snapshots().is_empty());
}

/// Loop devices, mounts and frozen filesystems a run may have left.
fn leftovers(marker: &str) -> (usize, usize) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(marker))
        .count();
    let loops =
        String::from_utf8_lossy(&Command::new("losetup").arg("-a").output().unwrap().stdout)
            .lines()
            .filter(|l| l.contains(marker))
            .count();
    (mounts, loops)
}

#[test]
fn bench_freeze_measures_sane_windows_and_leaves_nothing_behind() {
    if skip_unless_root("bench_freeze_measures_sane_windows_and_leaves_nothing_behind") {
        return;
    }
    let _turn = Turn::shared();
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("freeze.svg");
    let o = vsnap_cmd()
        .args([
            "bench",
            "freeze",
            "--guests",
            "2",
            "--disk-size",
            "64M",
            "--rounds",
            "1",
        ])
        .args(["--pause", "200ms", "--json", "--scratch"])
        .arg(dir.path())
        .arg("--plot")
        .arg(&svg)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["guests"], 2);
    let summary = r["summary"].as_array().unwrap();
    assert_eq!(summary.len(), 2, "{r:#}");
    let hold_limit_us = 30_000_000;
    for s in summary {
        assert_eq!(s["guests"], 2);
        assert_eq!(s["rounds"], 1);
        assert_eq!(s["app_consistent"], 2, "{s:#}");
        let fw = &s["freeze_window_us"];
        assert_eq!(fw["n"], 2, "{s:#}");
        assert_eq!(s["stall_us"]["n"], 2, "{s:#}");
        assert!(s["stall_us"]["max"].as_u64() >= fw["max"].as_u64(), "{s:#}");
        for k in ["p50", "p99", "max"] {
            let v = fw[k].as_u64().unwrap();
            assert!(v > 0 && v < hold_limit_us, "{k}: {s:#}");
        }
        assert!(s["host_window_us"]["max"].as_u64().unwrap() > 0, "{s:#}");
        assert!(s["snapshot_us"]["max"].as_u64().unwrap() > 0);
        assert!(s["writes"]["during"]["n"].as_u64().unwrap() > 0, "{s:#}");
        assert!(s["writes"]["outside"]["n"].as_u64().unwrap() > 0, "{s:#}");
        assert!(s["backup_bytes_per_s"].as_f64().unwrap() > 0.0);
    }
    for round in r["rounds"].as_array().unwrap() {
        for v in round["report"]["vms"].as_array().unwrap() {
            let m = &v["metrics"];
            let w = m["freeze_window_us"].as_u64().unwrap();
            assert!(w > 0 && w < hold_limit_us, "{v:#}");
            // The guest's window lies inside the host's span from sending
            // the freeze to hearing the thaw done. (The host window, ack to
            // ack, need not hold it: it starts one reply late and ends one
            // reply late, and the two replies' delays differ under load.)
            let span =
                m["thaw_ack_at_us"].as_u64().unwrap() - m["freeze_sent_at_us"].as_u64().unwrap();
            assert!(span >= w, "{v:#}");
        }
    }
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("Freeze window per guest"),
        "{}",
        &svg[..200.min(svg.len())]
    );
    // Nothing left: no mount or loop device under the scratch directory,
    // and the scratch directory itself is gone.
    let marker = dir.path().to_str().unwrap();
    assert_eq!(leftovers(marker), (0, 0));
    assert!(std::fs::read_dir(dir.path())
        .unwrap()
        .all(|e| e.unwrap().path() == dir.path().join("freeze.svg")));
}

#[test]
fn bench_freeze_without_root_or_inventory_says_what_it_needs() {
    if vsnap_e2e::is_root() {
        // As root the check cannot be seen; a user without root sees it.
        let o = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(vsnap_e2e::vsnap_bin())
            .args(["bench", "freeze", "--rounds", "1"])
            .output();
        let Ok(o) = o else {
            vsnap_e2e::skip(
                "bench_freeze_without_root_or_inventory_says_what_it_needs",
                "setpriv is not here",
                vsnap_e2e::Lack::Host,
            );
            return;
        };
        if o.status.code() == Some(126) || o.status.code() == Some(127) {
            vsnap_e2e::skip(
                "bench_freeze_without_root_or_inventory_says_what_it_needs",
                "user nobody cannot run the test binary here",
                vsnap_e2e::Lack::Host,
            );
            return;
        }
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("run it as root") && err.contains("--inventory"),
            "{err}"
        );
    } else {
        let o = vsnap_cmd().args(["bench", "freeze"]).output().unwrap();
        assert_eq!(o.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&o.stderr).contains("run it as root"));
    }
}

#[test]
fn bench_freeze_measures_an_inventory_of_existing_guests_without_touching_them() {
    if skip_unless_root(
        "bench_freeze_measures_an_inventory_of_existing_guests_without_touching_them",
    ) {
        return;
    }
    let lab = Lab::new(2, 32);
    let inv = lab.inventory(|_| String::new());
    let o = vsnap_cmd()
        .args([
            "bench",
            "freeze",
            "--provider",
            "reflink",
            "--rounds",
            "2",
            "--pause",
            "100ms",
            "--json",
            "--inventory",
        ])
        .arg(&inv)
        .arg("--scratch")
        .arg(&lab.dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["guests"], 2, "{r:#}");
    assert_eq!(r["workload"], "none");
    let s = &r["summary"][0];
    assert_eq!(s["provider"], "reflink");
    assert_eq!(s["app_consistent"], 4, "{s:#}");
    assert!(s["writes"].is_null(), "{s:#}");
    assert!(s["freeze_window_us"]["max"].as_u64().unwrap() > 0);
    // The guests are as they were: mounted, thawed, their agents running.
    assert!(lab.all_writable());
    for g in &lab.guests {
        assert!(g.fs.mount.join("data.txt").exists());
        assert!(std::os::unix::net::UnixStream::connect(&g.socket).is_ok());
    }
    // Its repository is gone.
    assert!(!std::fs::read_dir(&lab.dir).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("vsnap-bench-repo")));
}

#[test]
fn ctrl_c_on_the_coordinator_thaws_every_guest_at_once() {
    if skip_unless_root("ctrl_c_on_the_coordinator_thaws_every_guest_at_once") {
        return;
    }
    let lab = Lab::new(2, 32);
    // Guest 0's freeze hook interrupts the coordinator, then takes a while,
    // so the signal lands while guest 1 is frozen and the barrier waits.
    let child = lab.backup_signalled_at_freeze("kill -INT", "0.3", &["--json", "--window", "30s"]);
    let t = std::time::Instant::now();
    let o = child.wait_with_output().unwrap();
    // Well inside the 30 s the watchdogs would take.
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("interrupted"), "{err}");
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["aborted"], "interrupted", "{r:#}");
    assert!(lab.all_writable());
    assert!(lab.snapshots().is_empty());
    assert!(!lab.snapshots_left());
    for g in &lab.guests {
        assert!(!g.marker.exists(), "{}", g.agent_log());
    }
}
