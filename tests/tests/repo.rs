//! The backup repository end to end, through the `vsnap` binary: round
//! trips checked by qemu-img, deduplication, verify against deliberately
//! damaged repositories, killed backups, gc, a full disk, and concurrent
//! backups.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};
use vsnap_e2e::*;

const MIB: u64 = 1 << 20;

fn ok(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{cmd:?}: {}{}", stdout(&o), stderr(&o));
    stdout(&o)
}

fn init(dir: &Path, chunk: &str) -> PathBuf {
    let repo = dir.join("repo");
    ok(vsnap_cmd()
        .args(["repo", "init", "--chunk-size", chunk])
        .arg(&repo));
    repo
}

fn backup(repo: &Path, vm: &str, images: &[&Path]) -> Value {
    let mut cmd = vsnap_cmd();
    cmd.args(["backup", "-q", "--json", "--name", vm, "--repo"])
        .arg(repo)
        .args(images);
    serde_json::from_str(&ok(&mut cmd)).unwrap()
}

fn verify(repo: &Path) -> (Option<i32>, Value) {
    let o = vsnap_cmd()
        .args(["verify", "-q", "--json", "--repo"])
        .arg(repo)
        .output()
        .unwrap();
    let v = serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("{}", stderr(&o)));
    (o.status.code(), v)
}

fn snapshot_ids(repo: &Path) -> Vec<String> {
    let out = ok(vsnap_cmd()
        .args(["snapshots", "--json", "--repo"])
        .arg(repo));
    let v: Vec<Value> = serde_json::from_str(&out).unwrap();
    v.iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect()
}

fn info(path: &Path) -> Value {
    let out = ok(vsnap_cmd().args(["info", "--json"]).arg(path));
    let v: Vec<Value> = serde_json::from_str(&out).unwrap();
    v[0].clone()
}

/// Restores a whole snapshot into `out` and checks that each restored
/// disk's digest is the one its backup recorded; returns each source
/// with its manifest entry and restored path.
fn restore_checked<'a, P: AsRef<Path>>(
    repo: &Path,
    snap: &'a Value,
    sources: &'a [P],
    out: &Path,
) -> Vec<(&'a Path, &'a Value, PathBuf)> {
    std::fs::create_dir(out).unwrap();
    ok(vsnap_cmd()
        .args(["restore", "-q", "--repo"])
        .arg(repo)
        .arg(snap["snapshot"].as_str().unwrap())
        .arg("--to")
        .arg(out));
    let mut done = Vec::new();
    for (src, disk) in sources.iter().zip(snap["disks"].as_array().unwrap()) {
        let restored = out.join(disk["name"].as_str().unwrap());
        let h = ok(vsnap_cmd().args(["hash", "-q"]).arg(&restored));
        assert_eq!(
            h.split_whitespace().next(),
            disk["digest"].as_str(),
            "{:?}",
            src.as_ref()
        );
        done.push((src.as_ref(), disk, restored));
    }
    done
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn every_image_type_round_trips_with_its_identity() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), "64K");
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, random_bytes(1, 3 * MIB as usize + 4096)).unwrap();
    let dynamic = dir.path().join("qemu-dyn.vhd");
    qemu_image(
        &dynamic,
        "dynamic",
        "64M",
        &[
            (0x11, 0, 4096),
            (0x22, 9 * MIB, 3 * MIB),
            (0x00, 30 * MIB, MIB),
        ],
    );
    let fixed = fixtures().join("fixed-qemu.vhd");
    let small_blocks = fixtures().join("dynamic-16k.vhd");
    let chain = fixtures().join("chain/child3.vhd");
    let sources = [&raw, &dynamic, &fixed, &small_blocks, &chain];
    let sources: Vec<&Path> = sources.iter().map(|p| p.as_path()).collect();
    let snap = backup(&repo, "vm1", &sources);
    assert_eq!(snap["consistency"], "crash-consistent");
    let id = snap["snapshot"].as_str().unwrap();
    let out = dir.path().join("restored");
    for (src, _, restored) in restore_checked(&repo, &snap, &sources, &out) {
        let (a, b) = (info(src), info(&restored));
        assert_eq!(a["virtual_size"], b["virtual_size"], "{src:?}");
        assert_eq!(a["format"], b["format"], "{src:?}");
        assert_eq!(a["geometry"], b["geometry"], "{src:?}");
        assert_eq!(a["unique_id"], b["unique_id"], "{src:?}");
        assert_eq!(a["block_size"], b["block_size"], "{src:?}");
        let want_type = if a["disk_type"] == "differencing" {
            Value::from("dynamic")
        } else {
            a["disk_type"].clone()
        };
        assert_eq!(b["disk_type"], want_type, "{src:?}");
        if *src != chain {
            // qemu cannot follow the chain's locators; its digest is
            // checked above.
            let fmt = if *src == raw { "raw" } else { "vpc" };
            ok(Command::new("qemu-img")
                .args(["compare", "-f", fmt, "-F", fmt])
                .arg(src)
                .arg(&restored));
        }
    }
    assert_eq!(
        std::fs::read(&fixed).unwrap(),
        std::fs::read(out.join("fixed-qemu.vhd")).unwrap(),
        "a fixed VHD restores byte for byte"
    );
    // One disk by name, to a file; an existing file needs --force.
    let one = dir.path().join("one.vhd");
    let restore_one = |force: bool| {
        let mut cmd = vsnap_cmd();
        cmd.args(["restore", "-q", "--repo"])
            .arg(&repo)
            .arg(format!("{}:qemu-dyn.vhd", &id[..8]))
            .arg("--to")
            .arg(&one);
        if force {
            cmd.arg("--force");
        }
        cmd.output().unwrap()
    };
    assert!(restore_one(false).status.success());
    let o = restore_one(false);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("exists already"), "{}", stderr(&o));
    assert!(restore_one(true).status.success());
    // Holes stay holes: the restored dynamic VHD allocates no more blocks
    // than the source's data needs.
    let alloc = info(&one)["allocated_bytes"].as_u64().unwrap();
    assert!(alloc <= 8 * MIB, "restored image allocates {alloc} bytes");
    let o = vsnap_cmd()
        .args(["restore", "--repo"])
        .arg(&repo)
        .arg(format!("{id}:nope"))
        .arg("--to")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        stderr(&o).contains("has no disk \"nope\""),
        "{}",
        stderr(&o)
    );
}

#[test]
fn vhdx_disks_back_up_and_restore_as_vhdx_with_their_identity() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), "1M");
    let x = fixtures().join("vhdx");
    // The dirty-log image is copied: reading it must not change it, and
    // the test checks that on its own copy.
    let dirty = dir.path().join("dirty-log.vhdx");
    std::fs::copy(x.join("dirty-log.vhdx"), &dirty).unwrap();
    let dirty_bytes = std::fs::read(&dirty).unwrap();
    let sources = [
        x.join("dynamic-qemu.vhdx"),
        x.join("fixed-qemu.vhdx"),
        dirty.clone(),
        x.join("chain/grandchild.avhdx"),
        fixtures().join("dynamic-16k.vhd"),
    ];
    let refs: Vec<&Path> = sources.iter().map(PathBuf::as_path).collect();
    let snap = backup(&repo, "hyperv", &refs);
    let id = snap["snapshot"].as_str().unwrap();
    let out = dir.path().join("restored");
    for (src, disk, restored) in restore_checked(&repo, &snap, &sources, &out) {
        let (a, b) = (info(src), info(&restored));
        for field in ["format", "virtual_size", "unique_id", "block_size"] {
            assert_eq!(a[field], b[field], "{src:?}: {field}");
        }
        if a["format"] != "vhdx" {
            continue;
        }
        for field in [
            "logical_sector_size",
            "physical_sector_size",
            "data_write_guid",
        ] {
            assert_eq!(a["vhdx"][field], b["vhdx"][field], "{src:?}: {field}");
        }
        let want_type = if a["disk_type"] == "differencing" {
            "dynamic"
        } else {
            a["disk_type"].as_str().unwrap()
        };
        assert_eq!(b["disk_type"], want_type, "{src:?}");
        let check = ok(Command::new("qemu-img")
            .args(["check", "-f", "vhdx"])
            .arg(&restored));
        assert!(check.contains("No errors"), "{check}");
        // qemu cannot open the differencing chain, nor the dirty log
        // read-only; their digests are checked above.
        if a["disk_type"] != "differencing" && *src != dirty {
            ok(Command::new("qemu-img")
                .arg("compare")
                .arg(src)
                .arg(&restored));
        }
        // A backed-up disk checks against its live image by digest.
        ok(vsnap_cmd()
            .args(["verify", "-q", "--repo"])
            .arg(&repo)
            .arg(format!("{id}:{}", disk["name"].as_str().unwrap()))
            .arg("--against")
            .arg(src));
    }
    assert_eq!(
        std::fs::read(&dirty).unwrap(),
        dirty_bytes,
        "the source is never written"
    );
    assert_eq!(info(&dirty)["vhdx"]["replayed_log_entries"], 1);
    // A VHD restored as a VHDX, and the other way round: same contents.
    for (disk, format, name) in [
        ("dynamic-16k.vhd", "vhdx", "as.vhdx"),
        ("dynamic-qemu.vhdx", "dynamic", "as.vhd"),
    ] {
        let target = dir.path().join(name);
        ok(vsnap_cmd()
            .args(["restore", "-q", "--format", format, "--repo"])
            .arg(&repo)
            .arg(format!("{id}:{disk}"))
            .arg("--to")
            .arg(&target));
        let src = sources.iter().find(|s| s.ends_with(disk)).unwrap();
        ok(Command::new("qemu-img")
            .arg("compare")
            .arg(src)
            .arg(&target));
    }
    let (code, _) = verify(&repo);
    assert_eq!(code, Some(0));
}

#[test]
fn unchanged_data_is_stored_once_and_a_changed_block_costs_one_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), "4M");
    let img = dir.path().join("d.vhd");
    random_vhd(&img, 64 * MIB, 7, &[(0, 24 * MIB), (40 * MIB, 8 * MIB)]);
    let first = backup(&repo, "vm", &[&img]);
    assert_eq!(first["disks"][0]["new_chunks"], 8);
    let second = backup(&repo, "vm", &[&img]);
    let read = second["bytes_read"].as_u64().unwrap();
    let new = second["new_bytes"].as_u64().unwrap();
    assert!(read >= 32 * MIB);
    assert!(
        new * 100 <= read,
        "second backup stored {new} of {read} bytes"
    );
    // The same data under another VM's name dedups too.
    assert_eq!(backup(&repo, "other", &[&img])["new_chunks"], Value::Null);
    let st = Command::new("qemu-io")
        .args(["-f", "vpc", "-c", "write -P 0x5a 5246976 4096"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(st.status.success());
    // The live image now differs from the first snapshot, and matches
    // the next one.
    let against = |snap: &Value| {
        vsnap_cmd()
            .args(["verify", "-q", "--json", "--repo"])
            .arg(&repo)
            .arg(format!("{}:d.vhd", snap["snapshot"].as_str().unwrap()))
            .arg("--against")
            .arg(&img)
            .output()
            .unwrap()
    };
    let o = against(&first);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["matches"], false);
    let third = backup(&repo, "vm", &[&img]);
    assert_eq!(third["disks"][0]["new_chunks"], 1, "{third}");
    assert_eq!(against(&third).status.code(), Some(0));
    let (code, report) = verify(&repo);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["snapshots"], 4);
}

/// A repository with snapshot A (one image) and B (another), and the
/// chunks and index that belong to A alone.
struct Damaged {
    _dir: tempfile::TempDir,
    repo: PathBuf,
    a: String,
    b: String,
    a_image: PathBuf,
    a_chunks: Vec<PathBuf>,
    a_index: PathBuf,
}

fn two_snapshots() -> Damaged {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), "1M");
    let a_image = dir.path().join("a.vhd");
    let b_image = dir.path().join("b.vhd");
    random_vhd(&a_image, 8 * MIB, 1, &[(0, 4 * MIB)]);
    random_vhd(&b_image, 8 * MIB, 2, &[(2 * MIB, 4 * MIB)]);
    let a = backup(&repo, "a", &[&a_image])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let a_chunks = files_under(&repo.join("chunks"));
    let a_index = files_under(&repo.join("indexes")).remove(0);
    let b = backup(&repo, "b", &[&b_image])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(a_chunks.len(), 4);
    Damaged {
        _dir: dir,
        repo,
        a,
        b,
        a_image,
        a_chunks,
        a_index,
    }
}

fn flip_byte(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

/// Verify fails (exit 3) with one problem of `what`, naming A and not B.
fn assert_found(d: &Damaged, what: &str) -> Value {
    let (code, report) = verify(&d.repo);
    assert_eq!(code, Some(3), "{what}: {report}");
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{what}: {report}");
    assert_eq!(problems[0]["what"], what, "{report}");
    let hits = problems[0]["affects"].to_string();
    assert!(
        hits.contains(&d.a),
        "{what} should name snapshot A: {report}"
    );
    assert!(!hits.contains(&d.b), "{what} should not name B: {report}");
    problems[0].clone()
}

#[test]
fn verify_names_the_snapshot_each_kind_of_damage_hits() {
    // A flipped bit in a chunk: found, moved aside, and the next backup of
    // the same data stores it again.
    let d = two_snapshots();
    assert_eq!(verify(&d.repo).0, Some(0));
    flip_byte(&d.a_chunks[1], 100);
    let p = assert_found(&d, "chunk");
    assert!(p["error"].as_str().unwrap().contains("checksum"), "{p}");
    let mut aside = d.a_chunks[1].clone().into_os_string();
    aside.push(".bad");
    assert!(Path::new(&aside).exists() && !d.a_chunks[1].exists());
    assert_eq!(
        backup(&d.repo, "a", &[&d.a_image])["disks"][0]["new_chunks"],
        1
    );
    assert_eq!(verify(&d.repo).0, Some(0), "healed by the next backup");

    // A truncated chunk.
    let d = two_snapshots();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&d.a_chunks[0])
        .unwrap();
    f.set_len(f.metadata().unwrap().len() / 2).unwrap();
    let p = assert_found(&d, "chunk");
    assert!(p["error"].as_str().unwrap().contains("truncated"), "{p}");

    // A missing chunk.
    let d = two_snapshots();
    std::fs::remove_file(&d.a_chunks[3]).unwrap();
    let p = assert_found(&d, "chunk");
    assert!(p["error"].as_str().unwrap().contains("No such file"), "{p}");

    // A corrupted index.
    let d = two_snapshots();
    flip_byte(&d.a_index, 50);
    assert_found(&d, "index");

    // A corrupted manifest (one digit of its time changed).
    let d = two_snapshots();
    let path = d.repo.join("snapshots").join(format!("{}.json", d.a));
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replacen("\"time\": \"20", "\"time\": \"19", 1)).unwrap();
    let p = assert_found(&d, "manifest");
    assert!(
        p["error"].as_str().unwrap().contains("digest mismatch"),
        "{p}"
    );
    // It is listed as damaged, not hidden, and gc refuses to guess: it
    // deletes nothing, names it, and exits 3.
    let listed = ok(vsnap_cmd().args(["snapshots", "--repo"]).arg(&d.repo));
    assert!(listed.contains("DAMAGED"), "{listed}");
    let o = vsnap_cmd()
        .args(["gc", "--repo"])
        .arg(&d.repo)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("manifest digest mismatch"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn killed_backups_leave_a_repository_that_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), "1M");
    let small = dir.path().join("small.vhd");
    random_vhd(&small, 4 * MIB, 3, &[(0, 2 * MIB)]);
    let kept = backup(&repo, "kept", &[&small])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let big = dir.path().join("big.vhd");
    random_vhd(&big, 192 * MIB, 4, &[(0, 96 * MIB), (128 * MIB, 32 * MIB)]);
    // How long an uninterrupted backup takes, to spread the kills over it.
    let t = std::time::Instant::now();
    backup(&repo, "timing", &[&big]);
    let full = t.elapsed().as_micros() as u64;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("kill points from seed {seed}, over {full} µs");
    let mut state = seed | 1;
    for trial in 0..20 {
        // Every trial starts from the kept snapshot alone, its orphans
        // gone, so each one writes chunks: none of big's are stored.
        for id in snapshot_ids(&repo).iter().filter(|id| **id != kept) {
            ok(vsnap_cmd().args(["forget", "--repo"]).arg(&repo).arg(id));
        }
        ok(vsnap_cmd().args(["gc", "-q", "--repo"]).arg(&repo));
        assert_eq!(files_under(&repo.join("chunks")).len(), 2, "trial {trial}");
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let delay = state % full.max(1);
        let mut child = vsnap_cmd()
            .args(["backup", "-q", "--name", "victim", "--repo"])
            .arg(&repo)
            .arg(&big)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_micros(delay));
        let _ = child.kill();
        let status = child.wait().unwrap();
        let after = snapshot_ids(&repo);
        // Either the snapshot committed whole (verify reads it below), or
        // it is not listed at all; a backup that exited 0 committed.
        assert!(
            after.len() <= 2 && after.contains(&kept),
            "trial {trial}: {after:?}"
        );
        if status.success() {
            assert_eq!(after.len(), 2, "trial {trial}");
        }
        let (code, report) = verify(&repo);
        assert_eq!(code, Some(0), "trial {trial} (delay {delay} µs): {report}");
        // What a killed backup stored is not hidden: verify counts the
        // chunks no snapshot names (the kept snapshot names 2).
        let orphans = if after.len() == 1 {
            files_under(&repo.join("chunks")).len() as u64 - 2
        } else {
            0
        };
        assert_eq!(
            report["unreferenced_chunks"], orphans,
            "trial {trial}: {report}"
        );
    }
    // gc removes what the last killed one left (a temporary file, if it
    // died mid-write), and everything still verifies.
    let left = files_under(&repo.join("tmp")).len() as u64;
    let gc: Value =
        serde_json::from_str(&ok(vsnap_cmd().args(["gc", "--json", "--repo"]).arg(&repo))).unwrap();
    assert_eq!(gc["temporary_removed"], left, "{gc}");
    assert!(files_under(&repo.join("tmp")).is_empty(), "{gc}");
    assert_eq!(verify(&repo).0, Some(0));
}

#[test]
fn forget_and_gc_reclaim_the_space_and_what_remains_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), "1M");
    let a = dir.path().join("a.vhd");
    let b = dir.path().join("b.vhd");
    random_vhd(&a, 16 * MIB, 5, &[(0, 8 * MIB)]);
    random_vhd(&b, 16 * MIB, 6, &[(0, 4 * MIB)]);
    let sa = backup(&repo, "a", &[&a])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let sb = backup(&repo, "b", &[&b])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let size = |p: &Path| -> u64 {
        files_under(p)
            .iter()
            .map(|f| f.metadata().unwrap().len())
            .sum()
    };
    let before = size(&repo.join("chunks"));
    ok(vsnap_cmd()
        .args(["forget", "--repo"])
        .arg(&repo)
        .arg(&sa[..6]));
    assert_eq!(snapshot_ids(&repo), vec![sb.clone()]);
    let gc: Value =
        serde_json::from_str(&ok(vsnap_cmd().args(["gc", "--json", "--repo"]).arg(&repo))).unwrap();
    assert_eq!(gc["chunks_removed"], 8, "{gc}");
    assert_eq!(gc["chunks_kept"], 4, "{gc}");
    assert_eq!(gc["indexes_removed"], 1, "{gc}");
    let after = size(&repo.join("chunks"));
    assert!(after * 3 < before + 1, "{before} -> {after} bytes");
    assert!(
        gc["bytes_freed"].as_u64().unwrap() >= before - after,
        "{gc}"
    );
    assert_eq!(verify(&repo).0, Some(0));
    let out = dir.path().join("b-restored.vhd");
    ok(vsnap_cmd()
        .args(["restore", "-q", "--repo"])
        .arg(&repo)
        .arg(format!("{sb}:1"))
        .arg("--to")
        .arg(&out));
    ok(Command::new("qemu-img")
        .args(["compare", "-f", "vpc", "-F", "vpc"])
        .arg(&b)
        .arg(&out));
}

#[test]
fn a_full_disk_fails_clearly_and_the_repository_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("big.vhd");
    random_vhd(&img, 32 * MIB, 8, &[(0, 24 * MIB)]);
    let small = dir.path().join("small.vhd");
    random_vhd(&small, 4 * MIB, 9, &[(0, MIB)]);
    let Some(fs) = SmallFs::mount(dir.path(), "8m") else {
        skip(
            "a_full_disk_fails_clearly_and_the_repository_still_verifies",
            "mounting a tmpfs needs root",
            Lack::Privilege,
        );
        return;
    };
    let repo = init(&fs.0, "1M");
    backup(&repo, "small", &[&small]);
    let o: Output = vsnap_cmd()
        .args(["backup", "-q", "--name", "big", "--repo"])
        .arg(&repo)
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("No space left on device"), "{err}");
    assert!(
        err.contains(&repo.display().to_string()),
        "names the file: {err}"
    );
    assert_eq!(snapshot_ids(&repo).len(), 1);
    assert_eq!(
        std::fs::read_dir(repo.join("tmp")).unwrap().count(),
        0,
        "temporary files are removed"
    );
    assert_eq!(verify(&repo).0, Some(0));
    drop(fs);
}

#[test]
fn concurrent_backups_and_gc_all_succeed_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), "1M");
    let imgs: Vec<PathBuf> = (0..2)
        .map(|i| {
            let p = dir.path().join(format!("vm{i}.vhd"));
            // Half of each image is shared with the other: both backups
            // race to store the same chunks.
            random_vhd(&p, 64 * MIB, 10, &[(0, 16 * MIB)]);
            let cmd = format!("write -P 0x{:x} {} {}", 0x40 + i, 32 * MIB, 16 * MIB);
            ok(Command::new("qemu-io")
                .args(["-f", "vpc", "-c", &cmd])
                .arg(&p));
            p
        })
        .collect();
    // A snapshot gc must keep, and orphans it may remove meanwhile.
    backup(&repo, "before", &[&imgs[0]]);
    let spawn = |args: &[&str]| {
        vsnap_cmd()
            .args(args)
            .arg("--repo")
            .arg(&repo)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let b0 = spawn(&["backup", "-q", "--name", "vm0", imgs[0].to_str().unwrap()]);
    let gc = spawn(&["gc", "-q"]);
    let b1 = spawn(&["backup", "-q", "--name", "vm1", imgs[1].to_str().unwrap()]);
    for child in [b0, gc, b1] {
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    }
    assert_eq!(snapshot_ids(&repo).len(), 3);
    let (code, report) = verify(&repo);
    assert_eq!(code, Some(0), "{report}");
}

/// Bytes `qemu-img map` reports as data: what the file has allocated.
fn qemu_data_bytes(path: &Path) -> u64 {
    let out = ok(Command::new("qemu-img")
        .args(["map", "--output=json"])
        .arg(path));
    let v: Vec<Value> = serde_json::from_str(&out).unwrap();
    v.iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

#[test]
fn restore_allocates_the_blocks_copy_allocates() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    // 512 bytes in a 64 MiB disk: one 2 MiB block, inside one 4 MiB chunk.
    let one = src.join("one-block.vhd");
    qemu_image(&one, "dynamic", "64M", &[(0x5a, 0, 512)]);
    // Five 512 KiB blocks written, spread over chunks.
    let small = src.join("small-blocks.vhd");
    ok(vsnap_cmd()
        .args([
            "create",
            "--type",
            "dynamic",
            "--size",
            "64M",
            "--block-size",
            "512K",
        ])
        .arg(&small));
    for at in [0u64, 3 << 20, (9 << 20) + 4096, 20 << 20, (64 << 20) - 4096] {
        let cmd = format!("write -P 0x33 {at} 4096");
        ok(Command::new("qemu-io")
            .args(["-f", "vpc", "-c", &cmd])
            .arg(&small));
    }
    let sources = [
        one.clone(),
        small.clone(),
        fixtures().join("vhdx/chain/grandchild.avhdx"),
        fixtures().join("vhdx/dynamic-qemu.vhdx"),
    ];
    let repo = init(dir.path(), "4M");
    let refs: Vec<&Path> = sources.iter().map(PathBuf::as_path).collect();
    let snap = backup(&repo, "sparse", &refs);
    let copies = dir.path().join("copies");
    std::fs::create_dir(&copies).unwrap();
    ok(vsnap_cmd()
        .args(["copy", "-q", "--to"])
        .arg(&copies)
        .args(&sources));
    let out = dir.path().join("restored");
    let restored = restore_checked(&repo, &snap, &sources, &out);
    for (src, _, restored) in restored {
        let copy = copies.join(src.file_name().unwrap());
        let (c, r) = (info(&copy), info(&restored));
        // The blocks, as qemu maps them.
        assert_eq!(
            qemu_data_bytes(&copy),
            qemu_data_bytes(&restored),
            "{src:?}: copy and restore allocate different blocks"
        );
        // A VHD's allocated bytes are its blocks too. A VHDX's count the
        // file's holes inside blocks, which a copy keeps at the source's
        // 4 KiB holes and a restore at its 64 KiB pieces.
        if c["format"] == "vhd" {
            assert_eq!(c["allocated_bytes"], r["allocated_bytes"], "{src:?}");
        }
        assert!(
            std::fs::metadata(&restored).unwrap().len() <= std::fs::metadata(&copy).unwrap().len(),
            "{src:?}"
        );
        eprintln!(
            "{}: blocks of {} bytes by copy and by restore ({} and {} in vsnap info)",
            src.display(),
            qemu_data_bytes(&restored),
            c["allocated_bytes"],
            r["allocated_bytes"]
        );
    }
    assert_eq!(info(&out.join("one-block.vhd"))["allocated_bytes"], 2 << 20);
    assert_eq!(
        info(&out.join("small-blocks.vhd"))["allocated_bytes"],
        5 * (512 << 10)
    );
}

/// The smallest chunks a repository allows (1 KiB) make pieces of 1 KiB:
/// such a repository backs up, verifies and restores like any other.
#[test]
fn a_repository_of_1k_chunks_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), "1K");
    let image = fixtures().join("dynamic-16k.vhd");
    let snap = backup(&repo, "tiny", &[image.as_path()]);
    assert_eq!(verify(&repo).0, Some(0));
    let out = dir.path().join("out");
    for (src, _, restored) in restore_checked(&repo, &snap, std::slice::from_ref(&image), &out) {
        assert_eq!(
            info(src)["allocated_bytes"],
            info(&restored)["allocated_bytes"]
        );
    }
}

#[test]
fn forget_by_policy_judges_each_vm_apart_and_dry_run_removes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    assert!(vsnap(&["repo", "init", repo.to_str().unwrap()])
        .status
        .success());
    let img = dir.path().join("a.vhd");
    random_vhd(&img, 4 << 20, 11, &[(0, 1 << 20)]);
    for (vm, n) in [("a", 3), ("b", 2)] {
        for _ in 0..n {
            let o = vsnap(&[
                "backup",
                "-q",
                "--repo",
                repo.to_str().unwrap(),
                "--name",
                vm,
                img.to_str().unwrap(),
            ]);
            assert!(o.status.success(), "{}", stderr(&o));
        }
    }
    let r = repo.to_str().unwrap();
    let o = vsnap(&[
        "forget",
        "--repo",
        r,
        "--keep-last",
        "1",
        "--vm",
        "a",
        "--dry-run",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let plan: Value = serde_json::from_slice(&o.stdout).unwrap();
    let plan = plan.as_array().unwrap();
    assert_eq!(plan.len(), 3, "only vm a: {plan:?}");
    let kept: Vec<_> = plan.iter().filter(|p| p["keep"] == true).collect();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0]["reasons"], json!(["last snapshot"]));
    let count = |vm: &str| {
        let o = vsnap(&["snapshots", "--json", "--repo", r]);
        let all: Value = serde_json::from_slice(&o.stdout).unwrap();
        all.as_array()
            .unwrap()
            .iter()
            .filter(|s| s["vm"] == vm)
            .count()
    };
    assert_eq!(
        (count("a"), count("b")),
        (3, 2),
        "a dry run removed something"
    );
    let o = vsnap(&["forget", "--repo", r, "--keep-last", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("2 kept, 3 removed"), "{}", stdout(&o));
    assert_eq!((count("a"), count("b")), (1, 1));
    // Bad policies are usage errors that say what is wrong.
    let o = vsnap(&["forget", "--repo", r, "--keep-within", "3x"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("units are y, m, d and h"),
        "{}",
        stderr(&o)
    );
    let o = vsnap(&["forget", "--repo", r]);
    assert_eq!(o.status.code(), Some(2));
    let o = vsnap(&["forget", "--repo", r, "x", "--keep-last", "1"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn latest_names_the_newest_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), "64K");
    let disk = dir.path().join("disk.raw");
    let restore = |to: &Path| {
        vsnap_cmd()
            .args(["restore", "-q", "--repo"])
            .arg(&repo)
            .arg("latest:1")
            .arg("--to")
            .arg(to)
            .output()
            .unwrap()
    };
    let o = restore(&dir.path().join("none.raw"));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no snapshot matches \"latest\""),
        "{}",
        stderr(&o)
    );
    std::fs::write(&disk, random_bytes(1, 256 << 10)).unwrap();
    backup(&repo, "vm", &[disk.as_path()]);
    // A manifest's time has whole seconds.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let second = random_bytes(2, 256 << 10);
    std::fs::write(&disk, &second).unwrap();
    backup(&repo, "vm", &[disk.as_path()]);
    let out = dir.path().join("out.raw");
    let o = restore(&out);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&out).unwrap(), second);
    // verify takes it too: one snapshot of the two.
    let o = vsnap_cmd()
        .args(["verify", "--json", "--repo"])
        .arg(&repo)
        .arg("latest")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["snapshots"], 1, "{v}");
}
