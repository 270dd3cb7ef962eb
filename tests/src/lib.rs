//! Helpers shared by the end-to-end tests: the built `vsnap` binary, the
//! fixtures, and the real qemu-img.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The workspace's `vsnap` binary, built fresh for this test run.
///
/// `cargo test -p vsnap-e2e` alone would not rebuild another package's
/// binary, and a stale one would test old code, so the first call runs
/// `cargo build` into the same target directory and profile as this test.
pub fn vsnap_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        // target/<profile>/deps/<test> -> target/<profile>
        let profile_dir = exe.parent().and_then(Path::parent).unwrap();
        let target_dir = profile_dir.parent().unwrap();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "vsnap", "--target-dir"])
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().unwrap();
        assert!(status.success(), "cargo build -p vsnap failed");
        profile_dir.join("vsnap")
    })
    .clone()
}

/// A `vsnap` command whose zero-leaf cache lives under `target/`, so the
/// tests never touch the developer's own cache.
pub fn vsnap_cmd() -> Command {
    let bin = vsnap_bin();
    let cache = bin
        .parent()
        .map(|d| d.join("test-cache"))
        .unwrap_or_default();
    let mut cmd = Command::new(bin);
    cmd.env("VSNAP_CACHE_DIR", cache);
    cmd
}

pub fn vsnap(args: &[&str]) -> Output {
    vsnap_cmd().args(args).output().unwrap()
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn qemu_info(path: &Path) -> serde_json::Value {
    let o = Command::new("qemu-img")
        .args(["info", "-f", "vpc", "--output=json"])
        .arg(path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Every valid VHD fixture, nested folders included.
pub fn valid_fixtures() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in [fixtures(), fixtures().join("chain")] {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".vhd") && !name.starts_with("bad-") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// A VHD made by qemu-img (`subformat=SUB`, `SIZE`) with `qemu-io` pattern
/// writes `(byte, offset, length)`: the real tools make every test image.
pub fn qemu_image(path: &Path, sub: &str, size: &str, writes: &[(u8, u64, u64)]) {
    let st = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            &format!("subformat={sub}"),
        ])
        .arg(path)
        .arg(size)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img create {}", path.display());
    for (byte, off, len) in writes {
        let cmd = format!("write -P {byte:#x} {off} {len}");
        let st = Command::new("qemu-io")
            .args(["-f", "vpc", "-c", &cmd])
            .arg(path)
            .output()
            .unwrap();
        assert!(st.status.success(), "qemu-io {cmd}: {}", stderr(&st));
    }
}

/// Bytes no other test image shares: BLAKE3's output stream for `seed`.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

/// A dynamic VHD of `size` bytes made by qemu-img from a raw file holding
/// random bytes in `ranges` (offset, length) and holes elsewhere, so every
/// chunk of it is distinct and incompressible.
pub fn random_vhd(path: &Path, size: u64, seed: u64, ranges: &[(u64, u64)]) {
    use std::os::unix::fs::FileExt;
    let raw = path.with_extension("src.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(size).unwrap();
    for (i, (off, len)) in ranges.iter().enumerate() {
        let bytes = random_bytes(seed * 1000 + i as u64, *len as usize);
        f.write_all_at(&bytes, *off).unwrap();
    }
    drop(f);
    let st = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "vpc", "-o"])
        .arg("subformat=dynamic,force_size=on")
        .arg(&raw)
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img convert {}", path.display());
    std::fs::remove_file(&raw).unwrap();
}

/// A tmpfs of a few MiB at `dir/small`, mounted for one test and always
/// unmounted, even when the test fails. `None` without root.
pub struct SmallFs(pub PathBuf);

impl SmallFs {
    pub fn mount(dir: &Path, size: &str) -> Option<SmallFs> {
        let at = dir.join("small");
        std::fs::create_dir(&at).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "vsnap-test"])
            .arg(&at)
            .output()
            .ok()?;
        st.status.success().then_some(SmallFs(at))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Why a test skips: for lack of privileges (which CI always has, so
/// there it is a failure) or because this host lacks something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lack {
    Privilege,
    Host,
}

/// Records that `test` skips, and why: on stderr as `SKIPPED test: why`,
/// and as a line in the file `$VSNAP_SKIP_LOG` names, which the test
/// command counts into its summary (a skipped test otherwise reports
/// "ok"). With `CI` set, a skip for lack of privileges fails the test.
pub fn skip(test: &str, why: &str, lack: Lack) {
    if lack == Lack::Privilege && std::env::var_os("CI").is_some() {
        panic!("{test} would skip ({why}), but CI runs as root and must run it");
    }
    eprintln!("SKIPPED {test}: {why}");
    if let Some(log) = std::env::var_os("VSNAP_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(f, "{test}: {why}");
        }
    }
}

/// True (after recording the skip) when `test` must be skipped because
/// this process is not root: it mounts, freezes or attaches loop devices.
pub fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    skip(
        test,
        "it mounts, freezes or attaches loop devices, which needs root",
        Lack::Privilege,
    );
    true
}

/// Whether this process is root; tests that mount, freeze or attach loop
/// devices skip (saying so) without it.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn run_ok(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// An ext4 filesystem in `IMAGE`, on a loop device, mounted at `MOUNT`: a
/// guest disk that a test may freeze, because the test made it. Dropping
/// it thaws, unmounts and detaches the loop device, even after a failed
/// assertion.
pub struct LoopFs {
    pub image: PathBuf,
    pub mount: PathBuf,
    pub device: String,
}

impl LoopFs {
    /// `size` in MiB; ext4 made with `mkfs.ext4` (a few MiB is enough).
    pub fn new(image: &Path, mount: &Path, size_mib: u64) -> LoopFs {
        LoopFs::made_with(image, mount, size_mib, &["mkfs.ext4", "-q", "-F"])
    }

    /// A sparse file of `size_mib` formatted by `mkfs` (the command and
    /// its flags; the image path is appended), attached and mounted.
    pub fn made_with(image: &Path, mount: &Path, size_mib: u64, mkfs: &[&str]) -> LoopFs {
        let f = std::fs::File::create(image).unwrap();
        f.set_len(size_mib << 20).unwrap();
        drop(f);
        run_ok(Command::new(mkfs[0]).args(&mkfs[1..]).arg(image));
        LoopFs::attach(image, mount, None)
    }

    /// A guest disk: a fixed VHD of `size_mib` made by qemu-img, whose
    /// data area (the file less its 512-byte footer) is attached through
    /// `--sizelimit`, formatted ext4 on the loop device, and mounted.
    pub fn in_fixed_vhd(vhd: &Path, mount: &Path, size_mib: u64) -> LoopFs {
        qemu_image(vhd, "fixed,force_size=on", &format!("{size_mib}M"), &[]);
        let data = std::fs::metadata(vhd).unwrap().len() - 512;
        std::fs::create_dir_all(mount).unwrap();
        let device = run_ok(
            Command::new("losetup")
                .args(["-f", "--show", "--sizelimit", &data.to_string()])
                .arg(vhd),
        );
        let fs = LoopFs {
            image: vhd.to_path_buf(),
            mount: mount.to_path_buf(),
            device,
        };
        run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&fs.device));
        run_ok(Command::new("mount").arg(&fs.device).arg(mount));
        fs
    }

    /// Attaches `image` (or its first `sizelimit` bytes) and mounts it.
    pub fn attach(image: &Path, mount: &Path, sizelimit: Option<u64>) -> LoopFs {
        std::fs::create_dir_all(mount).unwrap();
        let mut cmd = Command::new("losetup");
        cmd.args(["-f", "--show"]);
        if let Some(n) = sizelimit {
            cmd.args(["--sizelimit", &n.to_string()]);
        }
        let device = run_ok(cmd.arg(image));
        let fs = LoopFs {
            image: image.to_path_buf(),
            mount: mount.to_path_buf(),
            device,
        };
        run_ok(Command::new("mount").arg(&fs.device).arg(mount));
        fs
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.mount).output();
        for _ in 0..50 {
            let ok = Command::new("umount")
                .arg(&self.mount)
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.device).output();
    }
}

/// Whether a write to `dir` blocks for `wait`: a frozen filesystem holds
/// every writer. The probe thread finishes by itself once thawed.
pub fn writes_block(dir: &Path, wait: std::time::Duration) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = dir.join(format!("probe-{}", random_name()));
    std::thread::spawn(move || {
        let r = std::fs::write(&path, b"probe");
        let _ = std::fs::remove_file(&path);
        let _ = tx.send(r.is_ok());
    });
    rx.recv_timeout(wait).is_err()
}

fn random_name() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A `vsnap agent` process, killed when dropped.
pub struct AgentProc {
    pub child: std::process::Child,
    /// What it printed: `listening on ADDRESS`.
    pub address: String,
    pub stderr_path: PathBuf,
}

impl AgentProc {
    /// Starts `vsnap agent ARGS` and waits until it listens. Its stderr
    /// goes to `stderr_path`.
    pub fn start(args: &[&str], stderr_path: &Path) -> Result<AgentProc, String> {
        use std::io::BufRead;
        let err = std::fs::File::create(stderr_path).unwrap();
        let mut child = vsnap_cmd()
            .arg("agent")
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(err)
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line).unwrap();
        let Some(address) = line.trim().strip_prefix("listening on ") else {
            let _ = child.wait();
            return Err(std::fs::read_to_string(stderr_path).unwrap_or_default());
        };
        Ok(AgentProc {
            address: address.to_string(),
            child,
            stderr_path: stderr_path.to_path_buf(),
        })
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain line-at-a-time client of the agent protocol over a real
/// socket, independent of the coordinator's own client, so a test checks
/// the wire format itself.
pub struct Wire {
    reader: std::io::BufReader<Box<dyn std::io::Read + Send>>,
    writer: Box<dyn std::io::Write + Send>,
    next_id: u64,
}

impl Wire {
    /// `address` as the agent prints it: `unix:PATH` or `tcp:HOST:PORT`.
    pub fn connect(address: &str) -> Wire {
        let timeout = Some(std::time::Duration::from_secs(30));
        let (r, w): (
            Box<dyn std::io::Read + Send>,
            Box<dyn std::io::Write + Send>,
        ) = if let Some(p) = address.strip_prefix("unix:") {
            let s = std::os::unix::net::UnixStream::connect(p).unwrap();
            s.set_read_timeout(timeout).unwrap();
            (Box::new(s.try_clone().unwrap()), Box::new(s))
        } else if let Some(a) = address.strip_prefix("tcp:") {
            let s = std::net::TcpStream::connect(a).unwrap();
            s.set_read_timeout(timeout).unwrap();
            (Box::new(s.try_clone().unwrap()), Box::new(s))
        } else {
            panic!("unknown address {address}")
        };
        Wire {
            reader: std::io::BufReader::new(r),
            writer: w,
            next_id: 1,
        }
    }

    /// Sends one raw line; returns the reply line parsed, or `None` when
    /// the agent closed the connection.
    pub fn raw(&mut self, line: &str) -> Option<serde_json::Value> {
        use std::io::{BufRead, Write};
        // A write to a peer that hung up fails (EPIPE): closed, too.
        let sent = self.writer.write_all(format!("{line}\n").as_bytes());
        if sent.and_then(|()| self.writer.flush()).is_err() {
            return None;
        }
        let mut reply = String::new();
        match self.reader.read_line(&mut reply) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(serde_json::from_str(&reply).unwrap()),
        }
    }

    /// `{"id", "op", "args"}`; returns the whole reply (`ok` or `err`).
    pub fn call(&mut self, op: &str, args: serde_json::Value) -> serde_json::Value {
        let id = self.next_id;
        self.next_id += 1;
        let req = serde_json::json!({"id": id, "op": op, "args": args});
        let reply = self
            .raw(&req.to_string())
            .unwrap_or_else(|| panic!("{op}: the agent closed the connection"));
        assert_eq!(reply["id"], id, "{reply}");
        reply
    }

    /// `call`, asserting success; returns `ok`.
    pub fn ok(&mut self, op: &str, args: serde_json::Value) -> serde_json::Value {
        let r = self.call(op, args);
        assert!(r.get("err").is_none(), "{op}: {r}");
        r["ok"].clone()
    }

    /// `call`, asserting failure; returns `err`.
    pub fn err(&mut self, op: &str, args: serde_json::Value) -> serde_json::Value {
        let r = self.call(op, args);
        assert!(r.get("ok").is_none(), "{op} should fail: {r}");
        r["err"].clone()
    }

    /// `hello` at this protocol version, with an optional token.
    pub fn hello(&mut self, token: Option<&str>) -> serde_json::Value {
        let mut args = serde_json::json!({"version": 1});
        if let Some(t) = token {
            args["token"] = t.into();
        }
        self.call("hello", args)
    }
}

/// Writes an executable hook script into `dir`.
pub fn write_hook(dir: &Path, name: &str, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A guest's application: writes 4 KiB and fsyncs, over and over, into
/// its filesystem, recording the slowest write (a freeze shows as a
/// stall).
pub struct Workload {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<(u64, std::time::Duration)>>,
}

impl Workload {
    pub fn start(dir: &Path) -> Workload {
        use std::io::Write;
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let path = dir.join("app.log");
        let handle = std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap();
            let mut writes = 0u64;
            let mut worst = std::time::Duration::ZERO;
            let block = [0x61u8; 4096];
            while !flag.load(Ordering::Relaxed) {
                let t = std::time::Instant::now();
                f.write_all(&block).unwrap();
                f.sync_data().unwrap();
                worst = worst.max(t.elapsed());
                writes += 1;
                if writes.is_multiple_of(256) {
                    f.set_len(0).unwrap();
                }
            }
            (writes, worst)
        });
        Workload {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops the writer; returns how many writes it made and its longest.
    pub fn finish(mut self) -> (u64, std::time::Duration) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Not joined: a writer held by a frozen filesystem finishes after
        // the thaw (which LoopFs's drop guarantees).
    }
}
