//! A repository is untrusted input. Each case damages a real repository the
//! way a hostile or broken host could (a resealed manifest, a link, a FIFO,
//! an index bomb), runs the real `vsnap` binary on it, and asserts three
//! things: the specific error, that no file outside the repository and the
//! restore target changed (a listing with sizes and mtimes, before and
//! after), and that the child's peak RSS (getrusage, through GNU time)
//! stayed within the engine's default budget plus 64 MiB.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vsnap_e2e::*;

const MIB: u64 = 1 << 20;
/// `--memory`'s default (256 MiB) plus the 64 MiB the issue allows, in KiB.
const RSS_LIMIT_KIB: u64 = (256 + 64) * 1024;
/// No case may take longer; a FIFO must not hang the suite.
const DEADLINE: Duration = Duration::from_secs(120);

/// What one run of vsnap did.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    peak_kib: u64,
}

/// Runs `vsnap ARGS` under GNU time for its peak RSS, killed at the deadline.
fn run(dir: &Path, args: &[&str]) -> Run {
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let rss = dir.join(format!("rss-{}-{n}", std::process::id()));
    let bin = vsnap_bin();
    let mut cmd = Command::new("/usr/bin/time");
    cmd.arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&rss)
        .arg(&bin)
        .args(args)
        .env("VSNAP_CACHE_DIR", dir.join("cache"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .expect("/usr/bin/time (package time) runs vsnap");
    let started = Instant::now();
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output());
    while !waiter.is_finished() {
        if started.elapsed() > DEADLINE {
            let _ = Command::new("pkill")
                .args(["-KILL", "-P", &pid.to_string()])
                .status();
            let _ = waiter.join();
            panic!("vsnap {args:?} still ran after {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = waiter.join().unwrap().unwrap();
    let peak_kib = peak_rss_kib(&rss);
    let r = Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        peak_kib,
    };
    eprintln!(
        "vsnap {}: exit {:?}, peak RSS {} KiB\n  {}",
        args.first().unwrap_or(&""),
        r.code,
        r.peak_kib,
        r.stderr.trim().replace('\n', "\n  ")
    );
    assert!(
        r.peak_kib <= RSS_LIMIT_KIB,
        "vsnap {args:?} peaked at {} KiB, over {RSS_LIMIT_KIB}",
        r.peak_kib
    );
    r
}

/// Asserts a run failed with exit code `code` and a message holding every
/// one of `needles`.
fn fails(r: &Run, code: i32, needles: &[&str]) {
    assert_eq!(r.code, Some(code), "{}{}", r.stdout, r.stderr);
    for n in needles {
        assert!(
            r.stderr.contains(n) || r.stdout.contains(n),
            "expected {n:?} in:\n{}{}",
            r.stdout,
            r.stderr
        );
    }
}

/// Every name under `root` (links not followed), with its kind, size and
/// mtime, except under `skip`.
fn listing(root: &Path, skip: &[&Path]) -> BTreeMap<PathBuf, (char, u64, i64, i64)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if skip.iter().any(|s| p.starts_with(s)) {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let kind = if ft.is_symlink() {
                'l'
            } else if ft.is_dir() {
                todo.push(p.clone());
                'd'
            } else if ft.is_file() {
                'f'
            } else {
                'o'
            };
            out.insert(p, (kind, m.len(), m.mtime(), m.mtime_nsec()));
        }
    }
    out
}

/// A repository with one snapshot of an 8 MiB dynamic VHD in 1 MiB chunks,
/// and beside it a tree of files that nothing may touch.
struct Lab {
    dir: tempfile::TempDir,
    repo: PathBuf,
    image: PathBuf,
    snap: String,
    outside: PathBuf,
    out: PathBuf,
}

impl Lab {
    fn new() -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(outside.join("loot")).unwrap();
        std::fs::write(outside.join("victim"), b"original").unwrap();
        std::fs::write(outside.join("victim.json"), b"{}").unwrap();
        for i in 0..3 {
            std::fs::write(outside.join("loot").join(format!("f{i}")), b"keep me").unwrap();
        }
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let image = src.join("disk.vhd");
        random_vhd(&image, 8 * MIB, 7, &[(0, 3 * MIB), (5 * MIB, 2 * MIB)]);
        let repo = dir.path().join("repo");
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let o = vsnap_cmd()
            .args(["repo", "init", "--chunk-size", "1M"])
            .arg(&repo)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let snap = backup(&repo, &image, "vm");
        Lab {
            dir,
            repo,
            image,
            snap,
            outside,
            out,
        }
    }

    fn p(&self) -> &Path {
        self.dir.path()
    }

    /// Everything but the repository, the restore target and the sources.
    fn surroundings(&self) -> BTreeMap<PathBuf, (char, u64, i64, i64)> {
        listing(self.p(), &[&self.repo, &self.out, &self.p().join("cache")])
    }

    fn manifest(&self, id: &str) -> PathBuf {
        self.repo.join("snapshots").join(format!("{id}.json"))
    }

    fn vsnap(&self, args: &[&str]) -> Run {
        let repo = self.repo.to_str().unwrap();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--repo", repo]);
        run(self.p(), &all)
    }

    fn restore(&self, what: &str, extra: &[&str]) -> Run {
        let out = self.out.to_str().unwrap();
        let mut args = vec!["restore", "-q", what, "--to", out];
        args.extend(extra);
        self.vsnap(&args)
    }

    fn verify(&self) -> (Run, Value) {
        let r = self.vsnap(&["verify", "-q", "--json"]);
        let v = serde_json::from_str(&r.stdout).unwrap_or(Value::Null);
        (r, v)
    }

    /// The chunk files of the repository, sorted.
    fn chunks(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for d in std::fs::read_dir(self.repo.join("chunks")).unwrap() {
            let d = d.unwrap().path();
            if d.is_dir() {
                out.extend(std::fs::read_dir(d).unwrap().map(|e| e.unwrap().path()));
            }
        }
        out.sort();
        out
    }

    fn index_of(&self, id: &str) -> PathBuf {
        let m: Value = serde_json::from_slice(&std::fs::read(self.manifest(id)).unwrap()).unwrap();
        self.repo
            .join("indexes")
            .join(m["disks"][0]["index"].as_str().unwrap())
    }
}

fn backup(repo: &Path, image: &Path, vm: &str) -> String {
    let o = vsnap_cmd()
        .args(["backup", "-q", "--json", "--name", vm, "--repo"])
        .arg(repo)
        .arg(image)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v["snapshot"].as_str().unwrap().to_owned()
}

/// Rewrites a manifest with `edit` applied and its self-digest recomputed,
/// as a hostile writer would: the digest is no defence, the names are.
fn reseal(path: &Path, edit: impl FnOnce(&mut Value)) {
    // The digest is over the file with the digest's first occurrence set
    // to zeros; a marker that occurs once stands in for it meanwhile (the
    // footer's hex holds runs of zeros, so zeros cannot).
    let marker = "x".repeat(64);
    let zeros = "0".repeat(64);
    let mut v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    edit(&mut v);
    v["self_blake3"] = marker.clone().into();
    let text = serde_json::to_string_pretty(&v).unwrap() + "\n";
    let digest = blake3::hash(text.replacen(&marker, &zeros, 1).as_bytes()).to_hex();
    std::fs::write(path, text.replacen(&marker, digest.as_str(), 1)).unwrap();
}

fn problems(v: &Value) -> Vec<Value> {
    v["problems"].as_array().cloned().unwrap_or_default()
}

/// Asserts verify found damage of kind `what` whose error holds `needle`.
fn verify_finds(lab: &Lab, what: &str, needle: &str) {
    let (r, v) = lab.verify();
    assert_eq!(r.code, Some(3), "verify must report damage: {}", r.stdout);
    assert!(
        problems(&v)
            .iter()
            .any(|p| p["what"] == what && p["error"].as_str().unwrap_or("").contains(needle)),
        "no {what} problem with {needle:?}: {v}"
    );
}

#[test]
fn restore_writes_nothing_outside_its_target_whatever_a_disk_is_named() {
    let absolute = Lab::new().outside.join("victim");
    for name in [
        "../../outside/victim",
        absolute.to_str().unwrap(),
        "a/b",
        "..",
        "",
    ] {
        let lab = Lab::new();
        let before = lab.surroundings();
        let victim = lab.outside.join("victim");
        let name = if name.starts_with('/') {
            victim.to_str().unwrap().to_owned()
        } else {
            name.to_owned()
        };
        reseal(&lab.manifest(&lab.snap), |m| {
            m["disks"][0]["name"] = name.clone().into()
        });
        verify_finds(&lab, "manifest", "disks[0].name");
        for extra in [&[][..], &["--force"][..]] {
            let r = lab.restore(&lab.snap, extra);
            fails(
                &r,
                1,
                &["manifest field disks[0].name", &format!("{name:?}")],
            );
            let r = lab.restore(&format!("{}:1", lab.snap), extra);
            fails(&r, 1, &["disks[0].name"]);
        }
        assert_eq!(std::fs::read(&victim).unwrap(), b"original");
        assert_eq!(lab.surroundings(), before, "something outside changed");
        assert_eq!(std::fs::read_dir(&lab.out).unwrap().count(), 0, "{name:?}");
    }
}

/// Whether `text` holds a control character other than newline and tab:
/// what a name must never bring to the operator's terminal.
fn has_control(text: &str) -> bool {
    text.chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
}

#[test]
fn names_with_control_characters_are_refused_and_never_reach_the_terminal() {
    let lab = Lab::new();
    // A backup refuses to record one: as the VM's name, or as a disk's.
    let r = lab.vsnap(&[
        "backup",
        "--name",
        "vm\u{1b}[2J",
        lab.image.to_str().unwrap(),
    ]);
    fails(
        &r,
        1,
        &[
            "the VM name \"vm\\u{1b}[2J\" cannot be recorded",
            "plain text",
        ],
    );
    let odd = lab.p().join("src").join("disk\u{1b}[32mGREEN.vhd");
    std::fs::copy(&lab.image, &odd).unwrap();
    let r = lab.vsnap(&["backup", "--name", "vm", odd.to_str().unwrap()]);
    fails(
        &r,
        1,
        &["the disk name \"disk\\u{1b}[32mGREEN.vhd\" cannot be recorded"],
    );
    assert!(!has_control(&r.stderr), "{:?}", r.stderr);
    // A manifest another host wrote with them (C0, DEL, C1), resealed:
    // damage for verify, refused by restore, escaped by every listing.
    for (field, value) in [
        ("vm", "vm\u{1b}]0;owned\u{7}"),
        ("host", "h\u{7f}"),
        ("disk", "disk\u{9b}1A\r ok.vhd"),
    ] {
        let lab = Lab::new();
        reseal(&lab.manifest(&lab.snap), |m| match field {
            "disk" => m["disks"][0]["name"] = value.into(),
            f => m[f] = value.into(),
        });
        let want = if field == "disk" {
            "disks[0].name"
        } else {
            field
        };
        verify_finds(&lab, "manifest", want);
        let (r, _) = lab.verify();
        assert!(!has_control(&r.stdout) && !has_control(&r.stderr), "{r:?}");
        let r = lab.restore(&lab.snap, &[]);
        fails(&r, 1, &[&format!("manifest field {want}"), "plain text"]);
        assert!(!has_control(&r.stderr), "{:?}", r.stderr);
        assert_eq!(std::fs::read_dir(&lab.out).unwrap().count(), 0);
        for args in [&["snapshots"][..], &["snapshots", "--json"][..]] {
            let r = lab.vsnap(args);
            assert!(
                !has_control(&r.stdout) && !has_control(&r.stderr),
                "{args:?}: {r:?}"
            );
            if args.len() == 2 {
                let _: Value = serde_json::from_str(&r.stdout).unwrap();
            }
        }
    }
}

#[test]
fn forget_deletes_nothing_a_manifest_id_names() {
    for id in ["../../outside/victim", "0000000000000000"] {
        let lab = Lab::new();
        let before = lab.surroundings();
        let manifest = lab.manifest(&lab.snap);
        reseal(&manifest, |m| m["id"] = id.into());
        verify_finds(&lab, "manifest", "field id");
        let r = lab.vsnap(&["forget", &lab.snap]);
        fails(&r, 1, &["manifest field id", &format!("{id:?}")]);
        assert!(
            manifest.exists(),
            "the damaged manifest is left for the operator"
        );
        assert!(lab.outside.join("victim.json").exists());
        let r = lab.vsnap(&["gc"]);
        fails(&r, 3, &["manifest field id", "deleted no chunk"]);
        assert_eq!(lab.surroundings(), before, "something outside changed");
    }
}

#[test]
fn links_inside_the_repository_are_never_followed() {
    // tmp/ replaced by a link to a directory outside.
    let lab = Lab::new();
    let tmp = lab.repo.join("tmp");
    std::fs::remove_dir(&tmp).unwrap();
    std::os::unix::fs::symlink(lab.outside.join("loot"), &tmp).unwrap();
    let before = lab.surroundings();
    let r = lab.vsnap(&["gc"]);
    fails(&r, 1, &["tmp", "never follows links"]);
    let image = lab.image.to_str().unwrap().to_owned();
    let r = lab.vsnap(&["backup", "-q", "--name", "vm2", &image]);
    fails(&r, 1, &["never follows links"]);
    verify_finds(&lab, "tree", "symbolic link");
    assert_eq!(lab.surroundings(), before, "gc or backup went through tmp/");

    // A manifest that is a link to a file outside: listed as damage,
    // never read through, and forget refuses it (the link stays).
    let lab = Lab::new();
    let manifest = lab.manifest(&lab.snap);
    std::fs::rename(&manifest, lab.outside.join("moved.json")).unwrap();
    std::os::unix::fs::symlink(lab.outside.join("moved.json"), &manifest).unwrap();
    let before = lab.surroundings();
    verify_finds(&lab, "manifest", "found a symbolic link");
    fails(
        &lab.vsnap(&["forget", &lab.snap]),
        1,
        &["found a symbolic link"],
    );
    fails(&lab.restore(&lab.snap, &[]), 1, &["found a symbolic link"]);
    assert!(manifest
        .symlink_metadata()
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(lab.surroundings(), before);

    // A chunk directory replaced by a link to a copy of it outside.
    let lab = Lab::new();
    let chunk = lab.chunks()[0].clone();
    let prefix = chunk.parent().unwrap().to_path_buf();
    let moved = lab.outside.join("moved-prefix");
    std::fs::rename(&prefix, &moved).unwrap();
    std::os::unix::fs::symlink(&moved, &prefix).unwrap();
    let before = lab.surroundings();
    let r = lab.vsnap(&["gc"]);
    assert_eq!(
        r.code,
        Some(0),
        "gc skips what it cannot enter: {}",
        r.stderr
    );
    let r = lab.vsnap(&["backup", "-q", "--name", "vm", lab.image.to_str().unwrap()]);
    fails(&r, 1, &["never follows links"]);
    let r = lab.restore(&lab.snap, &[]);
    fails(&r, 1, &["never follows links"]);
    verify_finds(&lab, "tree", "symbolic link");
    verify_finds(&lab, "chunk", "never follows links");
    assert_eq!(
        lab.surroundings(),
        before,
        "a command went through chunks/{:?}",
        prefix.file_name()
    );
}

#[test]
fn reads_from_the_repository_are_bounded_and_never_block() {
    type Plant = fn(&Path);
    let cases: [(&str, Plant, &[&str]); 3] = [
        (
            "a link to /dev/zero",
            |c| std::os::unix::fs::symlink("/dev/zero", c).unwrap(),
            &["never follows links"],
        ),
        (
            "a FIFO",
            |c| assert!(Command::new("mkfifo").arg(c).status().unwrap().success()),
            &["expected a file, found a special file"],
        ),
        (
            "a 3 GiB file behind a valid header",
            |c| {
                let f = std::fs::File::create(c).unwrap();
                f.set_len(3 << 30).unwrap();
            },
            &["truncated"],
        ),
    ];
    for (what, plant, needles) in cases {
        let lab = Lab::new();
        let chunk = lab.chunks()[0].clone();
        let header = {
            let mut h = [0u8; 40];
            std::fs::File::open(&chunk)
                .unwrap()
                .read_exact_at(&mut h, 0)
                .unwrap();
            h
        };
        std::fs::remove_file(&chunk).unwrap();
        plant(&chunk);
        if chunk.symlink_metadata().unwrap().is_file() {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&chunk)
                .unwrap()
                .write_all_at(&header, 0)
                .unwrap();
        }
        let before = lab.surroundings();
        let started = Instant::now();
        let r = lab.restore(&lab.snap, &[]);
        fails(&r, 1, needles);
        let (r, v) = lab.verify();
        assert_eq!(r.code, Some(3), "{what}: {}", r.stdout);
        assert!(
            problems(&v).iter().any(|p| p["what"] == "chunk"),
            "{what}: {v}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what} took {:?}",
            started.elapsed()
        );
        assert_eq!(lab.surroundings(), before, "{what}");
        eprintln!("{what}: refused");
    }
}

/// An index blob whose payload is `payload` (one zstd frame) and whose
/// header claims `plain_len`, with a good CRC.
fn index_blob(payload: &[u8], plain_len: u64) -> Vec<u8> {
    blob_bytes(payload, plain_len, 1)
}

/// An index blob with `encoding` (0 raw, 1 zstd), laid out as the README's
/// format section says, with a good CRC.
fn blob_bytes(payload: &[u8], plain_len: u64, encoding: u8) -> Vec<u8> {
    let mut h = [0u8; 40];
    h[..8].copy_from_slice(b"VSNAPIDX");
    h[8..10].copy_from_slice(&1u16.to_le_bytes());
    h[10] = encoding;
    h[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    h[24..32].copy_from_slice(&plain_len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h[..32]), payload);
    h[32..36].copy_from_slice(&crc.to_le_bytes());
    [&h[..], payload].concat()
}

/// zstd of `len` zero bytes, streamed: a few hundred KiB for gigabytes.
fn zero_bomb(len: u64) -> Vec<u8> {
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 19).unwrap();
    let zeros = vec![0u8; 8 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        std::io::Write::write_all(&mut enc, &zeros[..n]).unwrap();
        left -= n as u64;
    }
    enc.finish().unwrap()
}

#[test]
fn index_bombs_are_refused_before_they_are_allocated() {
    let bomb = zero_bomb(4 << 30);
    eprintln!("bomb: {} bytes of zstd for 4 GiB", bomb.len());
    // An 8 MiB bomb small enough to pass the length check of the largest
    // index this disk can have: only decompression can catch it.
    let small = zero_bomb(8 << 20);
    // 8 cells of 33 bytes after the 24-byte head, 128 pieces of 64 KiB
    // in 16 bytes of piece map, and 8 leaves of 32 bytes.
    let ceiling = 24 + 33 * 8 + 16 + 32 * 8;
    assert!(small.len() < ceiling as usize, "{} bytes", small.len());
    // The header's claim: the bomb's true size, a larger lie, a claim
    // within the ceiling over a payload longer than that claim allows, and
    // one over a payload that fits but would decompress past it.
    for (payload, claim, needle) in [
        (&bomb, 4u64 << 30, "plaintext where 560 were expected"),
        (&bomb, 16 << 30, "plaintext where 560 were expected"),
        (&bomb, ceiling, "more than the"),
        (&small, ceiling, "zstd"),
    ] {
        let lab = Lab::new();
        let index = lab.index_of(&lab.snap);
        std::fs::write(&index, index_blob(payload, claim)).unwrap();
        let before = lab.surroundings();
        let r = lab.restore(&lab.snap, &[]);
        fails(&r, 1, &[needle]);
        verify_finds(&lab, "index", needle);
        let r = lab.vsnap(&["gc"]);
        fails(&r, 3, &[needle, "deleted no chunk"]);
        assert_eq!(lab.surroundings(), before);
    }
}

#[test]
fn gc_steps_around_a_damaged_snapshot_and_collects_once_it_is_quarantined() {
    let lab = Lab::new();
    let other = lab.p().join("src/other.vhd");
    random_vhd(&other, 8 * MIB, 8, &[(0, 2 * MIB)]);
    let good = backup(&lab.repo, &other, "vm2");
    let chunks = lab.chunks();
    // A backup that died left a temporary file; the first snapshot's
    // manifest is cut short.
    std::fs::write(lab.repo.join("tmp/chunk.1.dead.tmp"), b"half").unwrap();
    let manifest = lab.manifest(&lab.snap);
    let bytes = std::fs::read(&manifest).unwrap();
    std::fs::write(&manifest, &bytes[..bytes.len() / 2]).unwrap();

    // gc reports it, deletes nothing a snapshot could name, and clears
    // the dead backup's file.
    let r = lab.vsnap(&["gc", "--json"]);
    fails(&r, 3, &["deleted no chunk", "vsnap repo quarantine"]);
    let report: Value = serde_json::from_str(&r.stdout).unwrap();
    let damaged = report["damaged"].as_array().unwrap();
    assert_eq!(damaged.len(), 1, "{report:#}");
    assert_eq!(damaged[0]["what"], "manifest");
    assert_eq!(damaged[0]["path"], manifest.to_str().unwrap());
    assert_eq!(report["chunks_removed"], 0);
    assert_eq!(report["temporary_removed"], 1);
    assert_eq!(lab.chunks(), chunks);

    // Unknown names are refused; a prefix names the snapshot.
    fails(
        &lab.vsnap(&["repo", "quarantine", "nosuch"]),
        1,
        &["no snapshot matches \"nosuch\""],
    );
    let r = lab.vsnap(&["repo", "quarantine", "--json", &lab.snap[..12]]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let moved: Value = serde_json::from_str(&r.stdout).unwrap();
    let aside = lab
        .repo
        .join(format!("quarantine/snapshots.{}.json", lab.snap));
    assert_eq!(moved[0]["to"], aside.to_str().unwrap());
    assert_eq!(
        std::fs::read(&aside).unwrap(),
        &bytes[..bytes.len() / 2],
        "kept as it was"
    );
    assert!(!manifest.exists());

    // The repository is sound again: quarantine/ is no stray, and the
    // quarantined snapshot's own chunks go with the next gc.
    let (r, v) = lab.verify();
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    assert!(problems(&v).is_empty(), "{v:#}");
    let r = lab.vsnap(&["gc", "--json"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let report: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(report["snapshots"], 1);
    assert!(
        report["chunks_removed"].as_u64().unwrap() >= 3,
        "{report:#}"
    );
    assert!(lab.chunks().len() < chunks.len());
    assert!(aside.exists(), "gc leaves the quarantine alone");
    let r = lab.restore(&good, &[]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
}

#[test]
fn what_verify_passes_restore_restores() {
    // A wrong disk digest, resealed.
    let lab = Lab::new();
    reseal(&lab.manifest(&lab.snap), |m| {
        let d = m["disks"][0]["digest"].as_str().unwrap().to_owned();
        let flipped = if d.starts_with('0') { "1" } else { "0" };
        m["disks"][0]["digest"] = format!("{flipped}{}", &d[1..]).into();
    });
    verify_finds(&lab, "disk", "the digest rebuilt from its chunks");
    fails(&lab.restore(&lab.snap, &[]), 1, &["digest mismatch"]);

    // Another disk's index, of the same size and of another size.
    for (size, needle, what) in [
        (8 * MIB, "the digest rebuilt from its chunks", "disk"),
        (16 * MIB, "plaintext where 560 were expected", "index"),
    ] {
        let lab = Lab::new();
        let other = lab.p().join("src").join("other.vhd");
        random_vhd(&other, size, 99, &[(MIB, 2 * MIB)]);
        let other_snap = backup(&lab.repo, &other, "other");
        let other_index = lab.index_of(&other_snap);
        let name = other_index
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        reseal(&lab.manifest(&lab.snap), |m| {
            m["disks"][0]["index"] = name.into()
        });
        let (r, v) = lab.verify();
        assert_eq!(r.code, Some(3), "{}", r.stdout);
        let hits: Vec<_> = problems(&v)
            .into_iter()
            .filter(|p| p["what"] == what)
            .collect();
        assert_eq!(hits.len(), 1, "{v}");
        assert!(hits[0]["error"].as_str().unwrap().contains(needle), "{v}");
        assert!(
            hits[0]["affects"][0]
                .as_str()
                .unwrap()
                .starts_with(&lab.snap),
            "{v}"
        );
        let r = lab.restore(&lab.snap, &[]);
        assert_eq!(r.code, Some(1), "restore must refuse too: {}", r.stderr);
    }
}

#[test]
fn a_piece_map_that_hides_data_is_refused() {
    // Piece 0 of the first chunk, which holds data, marked as zeros: a
    // restore would skip writing it while its digest (of what was read)
    // still matched. The index is re-encoded, renamed by its new digest,
    // and the manifest resealed to name it.
    let lab = Lab::new();
    reindex(&lab, |plain, count| {
        let map = 24 + 33 * count;
        assert_eq!(plain[map] & 1, 1, "piece 0 holds data");
        plain[map] &= !1;
    });
    verify_finds(&lab, "index", "piece map disagrees");
    let before = lab.surroundings();
    fails(
        &lab.restore(&lab.snap, &[]),
        1,
        &["piece map marks piece 0", "as zeros"],
    );
    assert_eq!(std::fs::read_dir(&lab.out).unwrap().count(), 0);
    assert_eq!(lab.surroundings(), before);
}

/// Edits the plaintext of the lab snapshot's index (`edit` gets it and
/// its entry count), stores it under its new digest, and reseals the
/// manifest to name it: a consistent forgery, as a hostile host makes.
fn reindex(lab: &Lab, edit: impl FnOnce(&mut Vec<u8>, usize)) {
    let index = lab.index_of(&lab.snap);
    let blob = std::fs::read(&index).unwrap();
    let mut plain = if blob[10] == 1 {
        zstd::decode_all(&blob[40..]).unwrap()
    } else {
        blob[40..].to_vec()
    };
    let count = u64::from_le_bytes(plain[16..24].try_into().unwrap()) as usize;
    edit(&mut plain, count);
    let name = blake3::hash(&plain).to_hex().to_string();
    std::fs::write(
        lab.repo.join("indexes").join(&name),
        blob_bytes(&plain, plain.len() as u64, 0),
    )
    .unwrap();
    reseal(&lab.manifest(&lab.snap), |m| {
        m["disks"][0]["index"] = name.into()
    });
}

#[test]
fn a_leaf_that_is_not_its_chunks_is_found_by_verify() {
    // An incremental backup folds the digest from the index's leaves of
    // the cells it does not read: a wrong one must not survive a verify.
    let lab = Lab::new();
    let mut cell = None;
    reindex(&lab, |plain, count| {
        let leaves = plain.len() - 32 * count;
        let i = (0..count).find(|&i| plain[24 + 33 * i] == 2).unwrap();
        plain[leaves + 32 * i] ^= 1;
        cell = Some(i);
    });
    verify_finds(
        &lab,
        "index",
        &format!(
            "leaf for cell {} is not the one its chunk hashes to",
            cell.unwrap()
        ),
    );
}

fn b3(path: &Path) -> String {
    let o = Command::new("b3sum")
        .arg("--no-names")
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8(o.stdout).unwrap().trim().to_owned()
}

fn disk_digest(lab: &Lab) -> String {
    let m: Value =
        serde_json::from_slice(&std::fs::read(lab.manifest(&lab.snap)).unwrap()).unwrap();
    m["disks"][0]["digest"].as_str().unwrap().to_owned()
}

fn hash(path: &Path) -> String {
    let o = vsnap_cmd()
        .args(["hash", "--no-cache"])
        .arg(path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    stdout(&o).split_whitespace().next().unwrap().to_owned()
}

#[test]
fn a_killed_restore_leaves_nothing_the_next_one_trips_on() {
    // A restore killed with SIGKILL while it writes leaves its temporary
    // file; the next restore --force to the same target succeeds beside
    // it and does not remove it (it is too young to be judged dead).
    let lab = Lab::new();
    let big = lab.p().join("src").join("big.vhd");
    random_vhd(&big, 256 * MIB, 3, &[(0, 200 * MIB)]);
    let snap = backup(&lab.repo, &big, "big");
    let target = lab.out.join("big.vhd");
    let what = format!("{snap}:big.vhd");
    let mut leftover = None;
    for delay_ms in [150u64, 80, 40, 250, 400] {
        let mut child = vsnap_cmd()
            .args(["restore", "-q", "--repo"])
            .arg(&lab.repo)
            .arg(&what)
            .arg("--to")
            .arg(&target)
            .arg("--force")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        leftover = std::fs::read_dir(&lab.out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_string_lossy().ends_with(".vsnap-tmp"));
        if leftover.is_some() {
            break;
        }
    }
    let Some(leftover) = leftover else {
        panic!("no restore was killed while writing, at any of five delays");
    };
    let r = lab.restore(&what, &["--force"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let m: Value = serde_json::from_slice(&std::fs::read(lab.manifest(&snap)).unwrap()).unwrap();
    assert_eq!(hash(&target), m["disks"][0]["digest"].as_str().unwrap());
    assert!(
        leftover.exists(),
        "a young leftover is not this run's to remove"
    );
}

#[test]
fn restore_temporary_files_are_its_own() {
    let lab = Lab::new();
    let target = lab.out.join("disk.vhd");
    // Someone else's files by the old name and by a live-looking new one,
    // and a dead run's file (unlocked and two minutes old).
    let foreign = lab.out.join(".disk.vhd.vsnap-tmp");
    let recent = lab.out.join(".disk.vhd.1.fresh.vsnap-tmp");
    let dead = lab.out.join(".disk.vhd.2.dead.vsnap-tmp");
    for f in [&foreign, &recent, &dead] {
        std::fs::write(f, b"not vsnap's").unwrap();
    }
    let old = std::time::SystemTime::now() - Duration::from_secs(120);
    std::fs::File::options()
        .write(true)
        .open(&dead)
        .unwrap()
        .set_modified(old)
        .unwrap();
    std::fs::write(&target, b"an older restore").unwrap();
    let r = lab.restore(&format!("{}:disk.vhd", lab.snap), &[]);
    fails(&r, 1, &["exists already"]);
    let r = lab.restore(&format!("{}:disk.vhd", lab.snap), &["--force"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(hash(&target), disk_digest(&lab));
    assert_eq!(std::fs::read(&foreign).unwrap(), b"not vsnap's");
    assert_eq!(std::fs::read(&recent).unwrap(), b"not vsnap's");
    assert!(!dead.exists(), "a dead run's temporary file is cleaned up");
    std::fs::remove_file(&foreign).unwrap();
    std::fs::remove_file(&recent).unwrap();

    // Two restores to one target at once, three rounds each way: with
    // --force both succeed whole; without, one succeeds and the other
    // says the target exists. Never a half-written target or a leftover.
    let want = disk_digest(&lab);
    for force in [true, false] {
        for round in 0..3 {
            let _ = std::fs::remove_file(&target);
            let what = format!("{}:disk.vhd", lab.snap);
            let runs: Vec<Run> = std::thread::scope(|s| {
                let a = s.spawn(|| lab.restore(&what, if force { &["--force"] } else { &[] }));
                let b = s.spawn(|| lab.restore(&what, if force { &["--force"] } else { &[] }));
                vec![a.join().unwrap(), b.join().unwrap()]
            });
            let ok = runs.iter().filter(|r| r.code == Some(0)).count();
            if force {
                assert_eq!(ok, 2, "round {round}: {}{}", runs[0].stderr, runs[1].stderr);
            } else {
                assert!(
                    ok >= 1,
                    "round {round}: {}{}",
                    runs[0].stderr,
                    runs[1].stderr
                );
                for r in runs.iter().filter(|r| r.code != Some(0)) {
                    fails(r, 1, &["exists already"]);
                }
            }
            assert_eq!(hash(&target), want, "round {round}");
            let names: Vec<_> = std::fs::read_dir(&lab.out)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(
                names,
                vec![std::ffi::OsString::from("disk.vhd")],
                "round {round}"
            );
        }
    }
}

#[test]
fn restore_names_files_by_the_format_written() {
    let lab = Lab::new();
    let r = lab.restore(&lab.snap, &["--format", "vhdx"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let restored = lab.out.join("disk.vhdx");
    let o = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&restored)
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["format"], "vhdx", "{info}");
    assert!(!lab.out.join("disk.vhd").exists());
    let r = lab.restore(&format!("{}:1", lab.snap), &["--format", "raw"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(b3(&lab.out.join("disk.raw")), disk_digest(&lab));
}
