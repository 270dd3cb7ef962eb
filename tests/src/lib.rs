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
