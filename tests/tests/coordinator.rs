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
    skip_unless_root, vsnap_cmd, write_hook, writes_block, AgentProc, LoopFs, Workload,
};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// One guest: its disk, its mounted filesystem, its agent.
struct Guest {
    name: String,
    vhd: PathBuf,
    agent: Option<AgentProc>,
    hooks: PathBuf,
    marker: PathBuf,
    sock: PathBuf,
    // Declared last: dropped after the agent, so the filesystem is thawed
    // and unmounted once nothing uses it.
    fs: LoopFs,
}

/// The scratch filesystem and the guests on it. Fields drop in order:
/// workloads, guests (agents, then their filesystems), then scratch.
struct Lab {
    dir: PathBuf,
    workloads: Vec<Workload>,
    guests: Vec<Guest>,
    scratch: LoopFs,
    _tmp: tempfile::TempDir,
}

impl Lab {
    /// `n` guests of `size_mib` each, agents started, writers running.
    fn new(n: usize, size_mib: u64) -> Lab {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let scratch = LoopFs::made_with(
            &dir.join("scratch.img"),
            &dir.join("scratch"),
            (n as u64 * size_mib) + 512,
            &["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
        );
        let mut guests = Vec::new();
        for i in 0..n {
            let name = format!("g{i}");
            let vhd = scratch.mount.join(format!("{name}.vhd"));
            let fs = LoopFs::in_fixed_vhd(&vhd, &dir.join(&name), size_mib);
            std::fs::write(
                fs.mount.join("data.txt"),
                format!("guest {name}\n").repeat(1000),
            )
            .unwrap();
            let hooks = dir.join(format!("{name}.hooks"));
            std::fs::create_dir_all(&hooks).unwrap();
            let mut g = Guest {
                sock: dir.join(format!("{name}.sock")),
                marker: dir.join(format!("{name}.frozen")),
                name,
                vhd,
                agent: None,
                hooks,
                fs,
            };
            g.start_agent(&[]);
            guests.push(g);
        }
        let workloads = guests
            .iter()
            .map(|g| Workload::start(&g.fs.mount))
            .collect();
        Lab {
            dir,
            workloads,
            guests,
            scratch,
            _tmp: tmp,
        }
    }

    fn repo(&self) -> PathBuf {
        let repo = self.dir.join("repo");
        if !repo.exists() {
            let o = vsnap_cmd()
                .args(["repo", "init"])
                .arg(&repo)
                .output()
                .unwrap();
            assert!(o.status.success());
        }
        repo
    }

    /// An inventory of every guest; `extra` adds lines to each [[vm]].
    fn inventory(&self, extra: impl Fn(&Guest) -> String) -> PathBuf {
        let mut t = String::new();
        for g in &self.guests {
            t += &format!(
                "[[vm]]\nname = \"{}\"\ndisks = [\"{}\"]\nagent = \"unix:{}\"\n{}\n",
                g.name,
                g.vhd.display(),
                g.sock.display(),
                extra(g)
            );
        }
        let p = self.dir.join("inventory.toml");
        std::fs::write(&p, t).unwrap();
        p
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
    fn restored_ext4(&self, id: &str) -> (PathBuf, String) {
        let out = self.dir.join(format!("restored-{id}.raw"));
        let o = vsnap_cmd()
            .args(["restore", "-q", "--format", "raw", "--repo"])
            .arg(self.repo())
            .arg(format!("{id}:1"))
            .arg("--to")
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let fsck = Command::new("e2fsck")
            .args(["-fn"])
            .arg(&out)
            .output()
            .unwrap();
        let features = Command::new("dumpe2fs")
            .arg("-h")
            .arg(&out)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&features.stdout).into_owned();
        assert!(
            fsck.status.success(),
            "e2fsck -fn {}: {}{}",
            out.display(),
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        );
        (out, text)
    }

    fn all_writable(&self) -> bool {
        self.guests
            .iter()
            .all(|g| !writes_block(&g.fs.mount, Duration::from_secs(10)))
    }
}

impl Guest {
    fn start_agent(&mut self, extra: &[&str]) {
        self.agent = None;
        let mut args = vec![
            "--listen".to_string(),
            format!("unix:{}", self.sock.display()),
            "--freeze".into(),
            s(&self.fs.mount).into(),
            "--hooks".into(),
            s(&self.hooks).into(),
            "--marker".into(),
            s(&self.marker).into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = self.sock.with_extension("err");
        self.agent = Some(AgentProc::start(&args, &err).unwrap());
    }

    fn agent_log(&self) -> String {
        self.agent
            .as_ref()
            .map(AgentProc::stderr)
            .unwrap_or_default()
    }
}

fn features_line(dumpe2fs: &str) -> &str {
    dumpe2fs
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap_or("")
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
    let stalls: Vec<Duration> = lab.workloads.drain(..).map(|w| w.finish().1).collect();
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
    assert!(!lab.scratch.mount.join(".vsnap-snap").exists());
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
        let (_, sb) = lab.restored_ext4(id);
        assert!(
            !features_line(&sb).contains("needs_recovery"),
            "{}",
            features_line(&sb)
        );
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
            g.vhd.display()
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
    let (_, sb) = lab.restored_ext4(v["snapshot"].as_str().unwrap());
    assert!(
        features_line(&sb).contains("needs_recovery"),
        "{}",
        features_line(&sb)
    );
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
    assert!(!lab.scratch.mount.join(".vsnap-snap").exists());
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
    lab.guests[1].start_agent(&["--hold-limit", "20ms"]);
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
    while !lab.guests[0].marker.exists() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(50));
    // Frozen now, with no coordinator.
    assert!(writes_block(
        &lab.guests[0].fs.mount,
        Duration::from_millis(300)
    ));
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
    assert!(lab.scratch.mount.join(".vsnap-snap").exists());
    std::fs::remove_file(lab.guests[0].hooks.join("10-signal-coordinator")).unwrap();
    let inv = lab.inventory(|_| String::new());
    let (code, r, err) = lab.backup(&inv, &[]);
    assert_eq!(code, Some(0), "{err}\n{r:#}");
    assert_eq!(r["stale_snapshots_removed"], 1, "{r:#}");
    assert!(!lab.scratch.mount.join(".vsnap-snap").exists());
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
    let g = &mut lab.guests[0];
    g.agent = None;
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
    g.agent = Some(AgentProc::start(&args, &lab.dir.join("tcp.err")).unwrap());
    let addr = g.agent.as_ref().unwrap().address.clone();
    let vhd = g.vhd.clone();
    let inv = lab.dir.join("tcp.toml");
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

impl Drop for Qga {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_stock_qemu_guest_agent_quiesces_through_freeze_list() {
    if skip_unless_root("the_stock_qemu_guest_agent_quiesces_through_freeze_list") {
        return;
    }
    let mut lab = Lab::new(1, 64);
    lab.guests[0].agent = None;
    let (_qga, sock) = Qga::start(&lab.dir);
    let g = &lab.guests[0];
    let inv = lab.dir.join("qga.toml");
    std::fs::write(
        &inv,
        format!(
            "[[vm]]\nname = \"q\"\ndisks = [\"{}\"]\nagent = \"qga:{}\"\nmounts = [\"{}\"]\n",
            g.vhd.display(),
            sock.display(),
            g.fs.mount.display()
        ),
    )
    .unwrap();
    let (code, r, err) = lab.backup(&inv, &[]);
    assert_eq!(code, Some(0), "{err}\n{r:#}");
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
    let (_, sb) = lab.restored_ext4(v["snapshot"].as_str().unwrap());
    assert!(
        !features_line(&sb).contains("needs_recovery"),
        "{}",
        features_line(&sb)
    );
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
    assert!(vsnap_cmd()
        .args(["repo", "init"])
        .arg(&repo)
        .status()
        .unwrap()
        .success());
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
    assert!(String::from_utf8_lossy(&o.stderr).contains("--window \"soon\" is not a duration"));
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
    // an agent that crashed and restarts would.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
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
    assert!(vsnap_cmd()
        .args(["repo", "init"])
        .arg(&repo)
        .output()
        .unwrap()
        .status
        .success());
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
    let _agent = AgentProc::start(&args, &dir.path().join("agent.err")).unwrap();
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
        assert!(std::os::unix::net::UnixStream::connect(&g.sock).is_ok());
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
    assert!(!lab.scratch.mount.join(".vsnap-snap").exists());
    for g in &lab.guests {
        assert!(!g.marker.exists(), "{}", g.agent_log());
    }
}
