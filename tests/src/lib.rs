//! Helpers shared by the end-to-end tests: the built `vsnap` binary, the
//! fixtures, and the real qemu-img.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub mod fault_proxy;
pub mod s3;
pub mod tls;

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
        // With the coordinator's kill points, for the crash tests; they
        // do nothing unless FAILPOINTS names one.
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "vsnap",
            "--features",
            "failpoints",
            "--target-dir",
        ])
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().unwrap();
        assert!(
            status.success(),
            "cargo build -p vsnap --features failpoints failed"
        );
        profile_dir.join("vsnap")
    })
    .clone()
}

/// A `vsnap` command whose zero-leaf cache lives under `target/`, so the
/// tests never touch the developer's own cache.
pub fn vsnap_cmd() -> Command {
    let mut cmd = Command::new(vsnap_bin());
    cmd.env("VSNAP_CACHE_DIR", test_cache());
    cmd
}

/// The tests' zero-leaf cache, under `target/`.
pub fn test_cache() -> PathBuf {
    vsnap_bin()
        .parent()
        .map(|d| d.join("test-cache"))
        .unwrap_or_default()
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

/// A new repository at `repo`, with the default chunk size.
pub fn repo_init(repo: &Path) {
    let o = vsnap_cmd()
        .args(["repo", "init"])
        .arg(repo)
        .output()
        .unwrap();
    assert!(o.status.success(), "repo init: {}", stderr(&o));
}

/// Restores disk 1 of snapshot `id` in `repo` as raw to
/// `dir/restored-ID.raw`, checks the ext4 on it with `e2fsck -fn`, and
/// returns its path and `dumpe2fs -h`'s "Filesystem features:" line
/// (where `needs_recovery` shows a journal left to replay).
pub fn restore_ext4(repo: &Path, id: &str, dir: &Path) -> (PathBuf, String) {
    let out = dir.join(format!("restored-{id}.raw"));
    let o = vsnap_cmd()
        .args(["restore", "-q", "--format", "raw", "--repo"])
        .arg(repo)
        .arg(format!("{id}:1"))
        .arg("--to")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck -fn {}: {}{}",
        out.display(),
        stdout(&fsck),
        stderr(&fsck)
    );
    let sb = Command::new("dumpe2fs")
        .arg("-h")
        .arg(&out)
        .output()
        .unwrap();
    let features = stdout(&sb)
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap_or("")
        .to_string();
    (out, features)
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

pub use vsnap_lab::{is_root, AgentProc, LoopFs};

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

/// Starts `vsnap agent ARGS` (this build's) and waits until it listens;
/// its stderr goes to `stderr_path`. If it exits first, the error is what
/// it said.
pub fn start_agent(args: &[&str], stderr_path: &Path) -> Result<AgentProc, String> {
    let mut cmd = vsnap_cmd();
    cmd.arg("agent").args(args);
    AgentProc::start(cmd, stderr_path).map_err(|e| match e {
        vsnap_lab::Error::Command { stderr, .. } => stderr,
        other => other.to_string(),
    })
}

/// A `vsnap agent` command of this build, for a lab guest to start with
/// its own `--listen`, `--freeze`, `--hooks` and `--marker`.
pub fn agent_cmd() -> Command {
    let mut cmd = vsnap_cmd();
    cmd.arg("agent");
    cmd
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

/// One HTTP/1.1 request, with a bearer token when given: the status and
/// the whole body (an event stream's too, once it ends). Through hyper's
/// client, so the tests read the service's answers as any client would.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    http_with(addr, method, path, &headers, body)
}

/// [`http`] with the request's headers as given.
pub fn http_with(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, String) {
    let (status, _, body) = http_answer(addr, method, path, headers, body);
    (status, body)
}

/// [`http_with`], with the answer's headers (names in lower case).
pub fn http_answer(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, Vec<(String, String)>, String) {
    let (status, headers, bytes) = http_bytes(addr, method, path, headers, body.map(str::as_bytes));
    (
        status,
        headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

/// [`http_answer`] with bodies of any bytes, both ways.
pub fn http_bytes(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    use http_body_util::{BodyExt, Full};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<bytes::Bytes>>();
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = body.unwrap_or(b"");
        if !body.is_empty() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(bytes::Bytes::copy_from_slice(body)))
            .unwrap();
        let limit = std::time::Duration::from_secs(30);
        let resp = tokio::time::timeout(limit, client.request(req))
            .await
            .unwrap_or_else(|_| panic!("{method} {path}: no answer within 30 s"))
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let answer_headers = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let bytes = tokio::time::timeout(limit, resp.into_body().collect())
            .await
            .unwrap_or_else(|_| panic!("{method} {path}: the body did not end within 30 s"))
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
            .to_bytes();
        (status, answer_headers, bytes.to_vec())
    })
}

/// The peak RSS in KiB that GNU time (`-f %M -o FILE`) wrote to `file`,
/// which is removed. GNU time writes "Command exited with non-zero status
/// N" first when so; the figure is the last line.
pub fn peak_rss_kib(file: &Path) -> u64 {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let _ = std::fs::remove_file(file);
    text.lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .next_back()
        .unwrap_or_else(|| panic!("no peak RSS from time: {text:?}"))
}

/// A TCP port on 127.0.0.1 free now, and below the kernel's ephemeral
/// range (32768 and up), so that no outgoing connection of another test
/// takes it before whoever the caller starts binds it; each call of this
/// process gives another.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 10_000) as u16;
    let _ = NEXT.compare_exchange(0, base, Ordering::Relaxed, Ordering::Relaxed);
    loop {
        let p = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = if p >= 32_000 { 20_000 + p % 12_000 } else { p };
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

/// Writes `len` random bytes at `at` into a dynamic VHD through qemu-io.
pub fn rewrite_vhd(img: &Path, seed: u64, at: u64, len: u64) {
    let dir = img.parent().unwrap();
    let src = dir.join(format!("patch-{seed}.raw"));
    std::fs::write(&src, random_bytes(seed, len as usize)).unwrap();
    let o = Command::new("qemu-io")
        .args(["-f", "vpc", "-c"])
        .arg(format!("write -s {} {at} {len}", src.display()))
        .arg(img)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::remove_file(&src).unwrap();
}

/// A child process killed when dropped, so that a failing test leaves no
/// service, demo or chromedriver running (a child already waited for is
/// not signalled again).
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Killed {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Killed {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}
