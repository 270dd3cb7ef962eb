//! `vsnap copy`, end to end: every output format checked by qemu-img and by
//! `b3sum -c`, and the failure paths leave no partial files.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use vsnap_e2e::*;

fn ok(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{cmd:?}: {}{}", stdout(&o), stderr(&o));
    stdout(&o)
}

fn qemu_compare(a: &Path, fa: &str, b: &Path, fb: &str) {
    ok(Command::new("qemu-img")
        .args(["compare", "-f", fa, "-F", fb])
        .arg(a)
        .arg(b));
}

fn data_extents(path: &Path) -> Vec<(u64, u64)> {
    let out = ok(Command::new("qemu-img")
        .args(["map", "-f", "vpc", "--output=json"])
        .arg(path));
    let v: Vec<Value> = serde_json::from_str(&out).unwrap();
    v.iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn every_format_copies_exactly_and_b3sum_checks_the_copies() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let dynamic = src.join("d.vhd");
    qemu_image(
        &dynamic,
        "dynamic",
        "64M",
        &[
            (0x11, 0, 4096),
            (0x22, 9 << 20, 3 << 20),
            (0x00, 30 << 20, 1 << 20),
            (0x33, (64 << 20) - 8192, 512),
        ],
    );
    let fixed = fixtures().join("fixed-qemu.vhd");
    let chain = fixtures().join("chain/child3.vhd");
    let want: Value = serde_json::from_str(&ok(vsnap_cmd()
        .args(["hash", "--json"])
        .arg(&dynamic)
        .arg(&fixed)
        .arg(&chain)))
    .unwrap();
    for format in ["same", "raw", "fixed", "dynamic"] {
        let out = dir.path().join(format);
        std::fs::create_dir(&out).unwrap();
        let report = ok(vsnap_cmd()
            .args(["copy", "--json", "--verify", "--format", format, "--to"])
            .arg(&out)
            .arg(&dynamic)
            .arg(&fixed)
            .arg(&chain));
        let report: Vec<Value> = serde_json::from_str(&report).unwrap();
        for (r, w) in report.iter().zip(want.as_array().unwrap()) {
            assert_eq!(
                r["digest"], w["digest"],
                "{format}: virtual digest of {}",
                r["source"]
            );
            assert_eq!(r["verified"], true);
        }
        // The stock tool agrees with every line of B3SUMS.
        let check = ok(Command::new("b3sum")
            .args(["-c", "B3SUMS"])
            .current_dir(&out));
        assert_eq!(check.lines().count(), 3, "{check}");
        assert!(check.lines().all(|l| l.ends_with(": OK")), "{check}");
        assert!(!leftovers(&out).iter().any(|n| n.contains("vsnap-tmp")));
        for r in &report {
            let target = Path::new(r["target"].as_str().unwrap());
            let fmt = if r["format"] == "raw" { "raw" } else { "vpc" };
            let source = Path::new(r["source"].as_str().unwrap());
            if source != chain {
                // qemu cannot follow a VHD chain, so the chain is checked by
                // digest above and by b3sum -c; the rest by qemu-img too.
                qemu_compare(source, "vpc", target, fmt);
            }
        }
    }
    // A fixed VHD copied as itself is byte-identical.
    assert_eq!(
        std::fs::read(&fixed).unwrap(),
        std::fs::read(dir.path().join("same/fixed-qemu.vhd")).unwrap()
    );
    // Unallocated stays unallocated: the dynamic copy holds blocks exactly
    // where the source does.
    assert_eq!(
        data_extents(&dir.path().join("same/d.vhd")),
        data_extents(&dynamic)
    );
    // A raw copy is sparse: no more space than the data the source holds.
    let meta = std::fs::metadata(dir.path().join("raw/d.raw")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 <= 8 << 20,
        "raw copy allocates {} bytes",
        meta.blocks() * 512
    );
}

#[test]
fn a_source_truncated_mid_block_fails_naming_it_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("cut.vhd");
    qemu_image(&src, "dynamic", "16M", &[(0x42, 0, 4 << 20)]);
    // The file now ends 1 MiB into its second block (and its trailing
    // footer is gone, as after a crash or a short transfer).
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - 512 - (1 << 20)).unwrap();
    drop(f);
    let good = fixtures().join("dynamic-16k.vhd");
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let o = vsnap_cmd()
        .args(["copy", "-q", "--to"])
        .arg(&out)
        .arg(&good)
        .arg(&src)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("cut.vhd") && err.contains("past the end"),
        "{err}"
    );
    assert!(
        leftovers(&out).is_empty(),
        "left behind: {:?}",
        leftovers(&out)
    );
}

#[test]
fn running_out_of_space_fails_clearly_and_removes_the_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = SmallFs::mount(dir.path(), "4m") else {
        skip(
            "running_out_of_space_fails_clearly_and_removes_the_temporary_files",
            "mounting a tmpfs needs root",
            Lack::Privilege,
        );
        return;
    };
    let src = dir.path().join("big.vhd");
    qemu_image(&src, "dynamic", "64M", &[(0x42, 0, 16 << 20)]);
    let o = vsnap_cmd()
        .args(["copy", "-q", "--to"])
        .arg(&fs.0)
        .arg(&src)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains("big.vhd"), "{err}");
    assert!(
        leftovers(&fs.0).is_empty(),
        "left behind: {:?}",
        leftovers(&fs.0)
    );
}

#[test]
fn io_uring_and_sync_reads_give_identical_digests_and_copies() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.vhd");
    qemu_image(
        &src,
        "dynamic",
        "48M",
        &[
            (0x61, 0, 5 << 20),
            (0x62, 17 << 20, 100_000),
            (0x63, (48 << 20) - 512, 512),
        ],
    );
    let chain = fixtures().join("chain/child3.vhd");
    let mut seen: Option<(String, Vec<u8>)> = None;
    for (io, direct) in [
        ("sync", false),
        ("uring", false),
        ("sync", true),
        ("uring", true),
    ] {
        let mut args = vec!["hash", "-q", "--io", io];
        if direct {
            args.push("--direct");
        }
        let digests = ok(vsnap_cmd().args(&args).arg(&src).arg(&chain));
        let out = dir.path().join(format!("{io}-{direct}"));
        std::fs::create_dir(&out).unwrap();
        let mut copy = vec!["copy", "-q", "--io", io, "--to", out.to_str().unwrap()];
        if direct {
            copy.push("--direct");
        }
        ok(vsnap_cmd().args(&copy).arg(&src));
        let bytes = std::fs::read(out.join("src.vhd")).unwrap();
        match &seen {
            None => seen = Some((digests, bytes)),
            Some((d, b)) => {
                assert_eq!(&digests, d, "{io} direct={direct}: digests");
                assert!(&bytes == b, "{io} direct={direct}: the copies differ");
            }
        }
    }
}

#[test]
fn a_copy_without_the_flush_is_the_same_copy() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.vhd");
    qemu_image(
        &src,
        "dynamic",
        "40M",
        &[(0x71, 1 << 20, 7 << 20), (0x72, 33 << 20, 4096)],
    );
    let mut copies = Vec::new();
    for flag in [None, Some("--no-sync")] {
        let out = dir.path().join(flag.unwrap_or("synced"));
        std::fs::create_dir(&out).unwrap();
        let o = vsnap_cmd()
            .args(["copy", "-q", "--to"])
            .arg(&out)
            .args(flag)
            .arg(&src)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        // -q: the digest line on stdout, nothing at all on stderr.
        assert!(stdout(&o).trim_end().ends_with("src.vhd"), "{}", stdout(&o));
        assert_eq!(stderr(&o), "", "-q printed on stderr");
        ok(Command::new("b3sum")
            .args(["-c", "B3SUMS"])
            .current_dir(&out));
        let mut names = leftovers(&out);
        names.sort();
        assert_eq!(names, ["B3SUMS", "src.vhd"], "no temporary file is left");
        copies.push((
            std::fs::read(out.join("src.vhd")).unwrap(),
            std::fs::read_to_string(out.join("B3SUMS")).unwrap(),
        ));
    }
    assert!(
        copies[0] == copies[1],
        "--no-sync changed the copy or its B3SUMS"
    );
}

/// Workers that find the target busy leave their chunks to the one
/// writing it. With eight workers on 64 KiB chunks and a budget of eight
/// buffers, every chunk must still land, in place: each copy equals the
/// one a single worker makes, and b3sum agrees. (A run that left a chunk
/// queued fails by itself, so a lost chunk cannot pass unseen.)
#[test]
fn many_workers_on_small_chunks_write_every_chunk_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.vhd");
    random_vhd(
        &src,
        24 << 20,
        7,
        &[
            (0, 5 << 20),
            (6 << 20, 9 << 20),
            ((20 << 20) + 512, 3 << 20),
        ],
    );
    let copy = |name: &str, threads: &str, format: &str| {
        let out = dir.path().join(name);
        std::fs::create_dir(&out).unwrap();
        ok(vsnap_cmd()
            .args(["copy", "-q", "--no-sync", "--chunk-size", "64K"])
            .args(["--memory", "1M", "--threads", threads])
            .args(["--format", format, "--to"])
            .arg(&out)
            .arg(&src));
        ok(Command::new("b3sum")
            .args(["-c", "B3SUMS"])
            .current_dir(&out));
        let name = if format == "raw" {
            "src.raw"
        } else {
            "src.vhd"
        };
        std::fs::read(out.join(name)).unwrap()
    };
    for format in ["dynamic", "raw"] {
        let one = copy(&format!("{format}-1"), "1", format);
        let many = copy(&format!("{format}-8"), "8", format);
        assert!(one == many, "{format}: eight workers wrote another copy");
    }
    let raw = dir.path().join("raw-8/src.raw");
    qemu_compare(&src, "vpc", &raw, "raw");
}
