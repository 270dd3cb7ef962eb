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
