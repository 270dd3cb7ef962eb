//! The `vsnap` binary, end to end, against the real qemu-img.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::Value;
use vsnap_e2e::*;

#[test]
fn info_json_agrees_with_qemu_img_on_every_fixture() {
    let fixtures = valid_fixtures();
    assert!(fixtures.len() >= 8, "{fixtures:?}");
    let args: Vec<&str> = std::iter::once("info")
        .chain(std::iter::once("--json"))
        .chain(fixtures.iter().map(|p| p.to_str().unwrap()))
        .collect();
    let o = vsnap(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let infos: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(infos.len(), fixtures.len());
    for (info, path) in infos.iter().zip(&fixtures) {
        assert_eq!(info["path"].as_str().unwrap(), path.to_str().unwrap());
        assert_eq!(info["format"], "vhd");
        assert!(["fixed", "dynamic", "differencing"].contains(&info["disk_type"].as_str().unwrap()));
        // qemu opens a differencing VHD as a plain dynamic disk, but the
        // size it reports is still the footer's, so it is an oracle for all.
        let name = path.file_name().unwrap().to_string_lossy();
        assert_eq!(
            info["virtual_size"],
            qemu_info(path)["virtual-size"],
            "{name}"
        );
    }
    let child3 = infos
        .iter()
        .find(|i| i["path"].as_str().unwrap().ends_with("child3.vhd"))
        .unwrap();
    assert_eq!(child3["parents"].as_array().unwrap().len(), 3);
    // Each layer reports what its own file stores: the base was written in
    // full, even where its children hide it.
    assert_eq!(child3["parents"][2]["allocated_bytes"], 512 << 10);
    assert_eq!(child3["allocated_bytes"], 1024);
}

#[test]
fn info_describes_a_dynamic_disk_for_people() {
    let o = vsnap(&["info", fixtures().join("dynamic-16k.vhd").to_str().unwrap()]);
    assert!(o.status.success());
    let out = stdout(&o);
    for want in [
        "format:         vhd",
        "disk type:      dynamic",
        "virtual size:   2 MiB (2097152 bytes)",
        "block size:     16 KiB",
        "allocated:      ",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
}

#[test]
fn map_json_lists_data_extents_with_layers_and_offsets() {
    let o = vsnap(&[
        "map",
        "--json",
        fixtures().join("chain/child3.vhd").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let extents: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    let mut pos = 0;
    let mut layers = std::collections::BTreeSet::new();
    for e in &extents {
        assert_eq!(e["start"].as_u64().unwrap(), pos, "extents are contiguous");
        pos += e["length"].as_u64().unwrap();
        if e["data"] == true {
            layers.insert(e["layer"].as_u64().unwrap());
            assert!(e["offset"].is_u64() && e["file"].is_string());
        }
    }
    assert_eq!(pos, 512 << 10);
    assert_eq!(layers.len(), 4, "all four layers hold data: {layers:?}");
}

#[test]
fn create_makes_images_qemu_img_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = |p: &str| d.join(p).to_str().unwrap().to_owned();
    for (args, size) in [
        (
            vec!["create", "--type", "fixed", "--size", "10M", &s("f.vhd")],
            10u64 << 20,
        ),
        (
            vec![
                "create",
                "-t",
                "dynamic",
                "-s",
                "1.5G",
                "--block-size",
                "512K",
                &s("d.vhd"),
            ],
            3 << 29,
        ),
    ] {
        let o = vsnap(&args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        let path = d.join(args.last().unwrap());
        assert_eq!(qemu_info(&path)["virtual-size"].as_u64(), Some(size));
    }
    let o = vsnap(&[
        "create",
        "-t",
        "differencing",
        "--parent",
        &s("d.vhd"),
        "--json",
        &s("c.vhd"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let info: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["disk_type"], "differencing");
    assert_eq!(info["virtual_size"].as_u64(), Some(3 << 29));
    assert_eq!(
        info["parents"][0]["path"].as_str(),
        Some(s("d.vhd").as_str())
    );
}

#[test]
fn usage_and_image_errors_have_distinct_exit_codes_and_clear_messages() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("x.vhd");
    let t = target.to_str().unwrap();
    let o = vsnap(&["create", "-t", "dynamic", t]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--size is required"), "{}", stderr(&o));
    let o = vsnap(&["create", "-t", "dynamic", "-s", "12Q", t]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("unknown unit"), "{}", stderr(&o));
    let o = vsnap(&["create", "-t", "fixed", "-s", "1000", t]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("bad disk size 1000"), "{}", stderr(&o));
    assert!(!target.exists());

    let bad = fixtures().join("bad-bat-past-end.vhd");
    let good = fixtures().join("fixed-qemu.vhd");
    let o = vsnap(&[
        "info",
        "--json",
        good.to_str().unwrap(),
        bad.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "one bad image fails the run");
    let err = stderr(&o);
    assert!(
        err.contains("bad-bat-past-end.vhd") && err.contains("offset 1536"),
        "{err}"
    );
    assert!(err.contains("BAT entry 0"), "{err}");
    let infos: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(infos.len(), 1, "the good image is still reported");

    let o = vsnap(&["map", "/nonexistent/disk.vhd"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("/nonexistent/disk.vhd"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_raw_image_maps_its_holes() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.img");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(32 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[1u8; 65536], 8 << 20).unwrap();
    let o = vsnap(&["info", "--json", raw.to_str().unwrap()]);
    let info: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info[0]["format"], "raw");
    assert_eq!(info[0]["virtual_size"].as_u64(), Some(32 << 20));
    let o = vsnap(&["map", "--json", raw.to_str().unwrap()]);
    let extents: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    let data: u64 = extents
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(
        (65536..32 << 20).contains(&data),
        "holes are reported: {extents:?}"
    );
}

#[test]
fn help_explains_every_command() {
    for cmd in [
        vec!["--help"],
        vec!["info", "--help"],
        vec!["map", "--help"],
        vec!["create", "--help"],
    ] {
        let o = vsnap(&cmd);
        assert!(o.status.success());
        assert!(stdout(&o).contains("Exit codes"), "{cmd:?}");
    }
}

#[test]
fn fixtures_stay_small() {
    fn walk(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, u64)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "vhd") {
                out.push((p.clone(), std::fs::metadata(&p).unwrap().len()));
            }
        }
    }
    let mut files = Vec::new();
    walk(&fixtures(), &mut files);
    for (p, len) in &files {
        assert!(
            *len <= 1 << 20,
            "{} is {len} bytes, over 1 MiB",
            p.display()
        );
    }
    let total: u64 = files.iter().map(|(_, l)| l).sum();
    assert!(total <= 5 << 20, "fixtures total {total} bytes, over 5 MiB");
    // A VHDX carries 4 MiB of structures before its first block, so its
    // fixtures are larger on disk; they are mostly zeros, which git stores
    // in a few KiB each.
    let vhdx: Vec<u64> = std::fs::read_dir(fixtures().join("vhdx"))
        .unwrap()
        .chain(std::fs::read_dir(fixtures().join("vhdx/chain")).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| std::fs::metadata(&p).unwrap().len())
        .collect();
    assert!(vhdx.iter().all(|&l| l <= 16 << 20), "{vhdx:?}");
    assert!(vhdx.iter().sum::<u64>() <= 80 << 20, "{vhdx:?}");
}

#[test]
fn create_makes_vhdx_images_qemu_img_accepts_and_chains_on_them() {
    let dir = tempfile::tempdir().unwrap();
    let s = |p: &str| dir.path().join(p).to_str().unwrap().to_owned();
    for (args, fixed) in [
        (
            vec!["create", "-t", "dynamic", "-s", "3G", &s("d.vhdx")],
            false,
        ),
        (
            vec![
                "create",
                "-t",
                "fixed",
                "-s",
                "20M",
                "--format",
                "vhdx",
                &s("f.img"),
            ],
            true,
        ),
    ] {
        let o = vsnap(&args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        let path = args.last().unwrap();
        let q = std::process::Command::new("qemu-img")
            .args(["info", "--output=json", path])
            .output()
            .unwrap();
        let q: Value = serde_json::from_slice(&q.stdout).unwrap();
        assert_eq!(q["format"], "vhdx", "{path}: qemu-img detects it");
        let check = std::process::Command::new("qemu-img")
            .args(["check", "-f", "vhdx", path])
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stdout)
        );
        let o = vsnap(&["info", "--json", path]);
        let info: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(
            info[0]["disk_type"],
            if fixed { "fixed" } else { "dynamic" }
        );
    }
    let o = vsnap(&[
        "create",
        "-t",
        "differencing",
        "-p",
        &s("d.vhdx"),
        "--json",
        &s("c.avhdx"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let info: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["format"], "vhdx");
    assert_eq!(info["disk_type"], "differencing");
    assert_eq!(info["virtual_size"].as_u64(), Some(3 << 30));
    assert_eq!(
        info["block_size"].as_u64(),
        Some(16 << 20),
        "qemu's default for 3 GiB"
    );
    assert_eq!(
        info["parents"][0]["path"].as_str(),
        Some(s("d.vhdx").as_str())
    );
    let o = vsnap(&[
        "create",
        "-t",
        "dynamic",
        "-s",
        "1G",
        "--block-size",
        "3M",
        &s("x.vhdx"),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("1 MiB to 256 MiB"), "{}", stderr(&o));
}

#[test]
fn hash_prints_what_b3sum_prints_for_the_raw_conversion() {
    let dir = tempfile::tempdir().unwrap();
    let image = fixtures().join("dynamic-16k.vhd");
    let raw = dir.path().join("x.raw");
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(&image)
        .arg(&raw)
        .status()
        .unwrap();
    assert!(st.success());
    let b3 = std::process::Command::new("b3sum")
        .arg("--no-names")
        .arg(&raw)
        .output()
        .unwrap();
    let want = String::from_utf8_lossy(&b3.stdout).trim().to_owned();
    let o = vsnap(&["hash", image.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), format!("{want}  {}\n", image.display()));

    let o = vsnap(&[
        "hash",
        "--json",
        "--chunks",
        "--chunk-size",
        "64K",
        image.to_str().unwrap(),
    ]);
    let v: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["digest"], want.as_str());
    let chunks = v[0]["chunks"].as_array().unwrap();
    assert_eq!(chunks.len(), 32, "2 MiB in 64 KiB chunks");
    assert!(chunks
        .iter()
        .any(|c| c["kind"] == "data" && c["id"].is_string()));
    assert!(chunks
        .iter()
        .any(|c| c["kind"] == "unallocated" && c["id"].is_null()));

    let o = vsnap(&["hash", "--chunk-size", "3000", image.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o)
            .contains("'3000' for '--chunk-size <SIZE>': must be a power of two from 1K to 64M"),
        "{}",
        stderr(&o)
    );
}

/// Every usage error exits 2 and names the flag and the value as typed.
#[test]
fn usage_errors_exit_2_and_name_the_flag_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let image = fixtures().join("dynamic-16k.vhd");
    let repo = dir.path().join("repo");
    let p = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            vec!["repo".into(), "init".into(), "--chunk-size".into(), "3M".into(), p(&repo)],
            vec!["'3M' for '--chunk-size <SIZE>'", "must be a power of two from 1K to 64M"],
        ),
        (
            vec!["hash".into(), "--chunk-size".into(), "128M".into(), p(&image)],
            vec!["'128M' for '--chunk-size <SIZE>'"],
        ),
        (
            vec!["hash".into(), "--memory".into(), "1K".into(), "--threads".into(), "2".into(), p(&image)],
            vec!["--memory 1 KiB: below the floor of 16 MiB (two 4 MiB chunks for each of 2 workers)"],
        ),
        (vec!["agent".into()], vec!["--listen <ADDRESS>"]),
        (
            vec!["restore".into(), "--chunk-size".into(), "4M".into(), "x".into(), "--to".into(), "y".into()],
            vec!["unexpected argument '--chunk-size'"],
        ),
    ];
    for (args, needles) in cases {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = vsnap(&refs);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        for n in needles {
            assert!(
                stderr(&o).contains(n),
                "{args:?}: want {n:?} in {}",
                stderr(&o)
            );
        }
    }
    assert!(!repo.exists(), "a refused init made nothing");
    // Without --memory, the default budget rises to the floor: many
    // workers never make a plain command a usage error.
    let o = vsnap(&["hash", "-q", "--threads", "96", &p(&image)]);
    assert!(o.status.success(), "{}", stderr(&o));

    // A backup's --chunk-size must be the repository's; both are named.
    let o = vsnap(&["repo", "init", &p(&repo)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = vsnap(&[
        "backup",
        "--repo",
        &p(&repo),
        "--name",
        "vm",
        "--chunk-size",
        "1M",
        &p(&image),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--chunk-size 1 MiB: the repository")
            && stderr(&o).contains("uses chunks of 2 MiB"),
        "{}",
        stderr(&o)
    );
    let o = vsnap(&[
        "backup",
        "-q",
        "--repo",
        &p(&repo),
        "--name",
        "vm",
        "--chunk-size",
        "2M",
        &p(&image),
    ]);
    assert!(
        o.status.success(),
        "the repository's own size is accepted: {}",
        stderr(&o)
    );
}

#[test]
fn the_zero_leaf_cache_never_changes_a_digest_and_heals_when_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let image = dir.path().join("sparse.vhd");
    qemu_image(&image, "dynamic", "300M", &[(0x5c, 100 << 20, 1 << 20)]);
    let hash = |extra: &[&str]| {
        let o = std::process::Command::new(vsnap_bin())
            .env("VSNAP_CACHE_DIR", &cache)
            .args(["hash", "-q"])
            .args(extra)
            .arg(&image)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    let plain = hash(&["--no-cache"]);
    assert!(!cache.exists(), "--no-cache writes no cache");
    assert_eq!(hash(&[]), plain, "first run fills the cache");
    let file = cache.join("zero-leaves-4194304.bin");
    let len = std::fs::metadata(&file).unwrap().len();
    // 75 chunks of 4 MiB, one holding data: 74 cached zero leaves.
    assert_eq!(len, 24 + 74 * 40 + 32);
    assert_eq!(hash(&[]), plain, "second run reads the cache");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    assert_eq!(hash(&[]), plain, "a damaged cache is discarded");
    assert_ne!(std::fs::read(&file).unwrap(), bytes, "and rewritten");
}

#[test]
fn progress_json_events_are_json_lines_that_reach_the_total() {
    let image = fixtures().join("dynamic-empty.vhd");
    let o = vsnap(&["hash", "--progress", "json", image.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let events: Vec<Value> = stderr(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert!(!events.is_empty());
    assert!(events.iter().all(|e| e["event"] == "progress"));
    let last = events.last().unwrap();
    assert_eq!(last["done"], last["total"]);
    assert_eq!(last["total"].as_u64(), Some(1_073_995_776));
    // stdout is untouched: still exactly b3sum's format.
    assert_eq!(stdout(&o).lines().count(), 1);
}

#[test]
fn bench_engine_reports_every_stage_on_both_kinds_of_data() {
    let dir = tempfile::tempdir().unwrap();
    let o = vsnap_cmd()
        .args([
            "bench",
            "engine",
            "--json",
            "--time",
            "50ms",
            "--read-size",
            "16M",
            "--dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    for data in ["incompressible", "mixed"] {
        let tests: Vec<&str> = rows
            .iter()
            .filter(|r| r["data"] == data)
            .map(|r| r["test"].as_str().unwrap())
            .collect();
        for want in [
            "blake3",
            "zstd -1 compress",
            "zstd decompress",
            "chunk verify",
            "read sync, page cache",
            "read sync, O_DIRECT",
        ] {
            assert!(
                tests.iter().any(|t| t.starts_with(want)),
                "{data}: {want} missing from {tests:?}"
            );
        }
    }
    assert!(
        rows.iter().all(|r| r["mb_per_s"].as_f64().unwrap() > 0.0),
        "{rows:?}"
    );
    // Incompressible data compresses faster than text: zstd gives up on it.
    let rate = |t: &str, d: &str| {
        rows.iter()
            .find(|r| r["test"] == t && r["data"] == d)
            .unwrap()["mb_per_s"]
            .as_f64()
            .unwrap()
    };
    assert!(rate("zstd -1 compress", "incompressible") > rate("zstd -1 compress", "mixed"));
    // The read file is gone.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// No silent format guess: foreign formats are named and refused with
/// what to do, misnamed and empty files are errors, `--format raw` still
/// forces raw, and a file taken as raw because nothing was recognised is
/// said to be so.
#[test]
fn foreign_misnamed_and_empty_files_are_not_taken_as_raw_disks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let qemu = |args: &[&str]| {
        let o = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "qemu-img {args:?}: {}", stderr(&o));
    };
    let mut foreign = Vec::new();
    for (fmt, name) in [
        ("qcow2", "qcow2"),
        ("vmdk", "VMDK"),
        ("vdi", "VDI"),
        ("qed", "QED"),
    ] {
        let f = d.join(format!("disk.{fmt}"));
        qemu(&["create", "-q", "-f", fmt, &s(&f), "64M"]);
        foreign.push((f, name, "qemu-img convert -O vpc"));
    }
    let luks = d.join("disk.luks");
    qemu(&[
        "create",
        "-q",
        "--object",
        "secret,id=sec0,data=vsnap-test",
        "-f",
        "luks",
        "-o",
        "key-secret=sec0,iter-time=10",
        &s(&luks),
        "16M",
    ]);
    foreign.push((luks, "LUKS (an encrypted volume)", "cryptsetup"));
    for (f, name, hint) in &foreign {
        for cmd in [&["info"][..], &["hash"][..]] {
            let mut args: Vec<String> = cmd.iter().map(|a| a.to_string()).collect();
            args.push(s(f));
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let o = vsnap(&refs);
            assert_eq!(o.status.code(), Some(1), "{args:?}");
            let e = stderr(&o);
            assert!(
                e.contains(&format!(
                    "this is a {name} image, which vsnap does not read"
                )),
                "{e}"
            );
            assert!(e.contains(hint) && e.contains(&s(f)), "{e}");
        }
    }
    // The hint's own commands work: convert to raw, then every command
    // that reads a disk takes the flag the hint names.
    let (qcow2, _, _) = &foreign[0];
    let e = stderr(&vsnap(&["info", &s(qcow2)]));
    assert!(e.contains("`-O raw` and pass --source-format raw"), "{e}");
    let raw = d.join("converted.img");
    qemu(&["convert", "-O", "raw", &s(qcow2), &s(&raw)]);
    let repo = d.join("repo");
    repo_init(&repo);
    for cmd in [
        &["info"][..],
        &["hash"][..],
        &["map"][..],
        &["backup", "-q", "--name", "vm", "--repo", &s(&repo)][..],
    ] {
        let mut args = cmd.to_vec();
        let r = s(&raw);
        args.extend(["--source-format", "raw", &r]);
        let o = vsnap(&args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    }

    // Named like a VHD, holding none: an error, unless --format raw.
    let random = d.join("random.vhd");
    std::fs::write(&random, random_bytes(5, 1 << 20)).unwrap();
    let o = vsnap(&["info", &s(&random)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("named like a VHD or VHDX, but it holds neither"),
        "{}",
        stderr(&o)
    );
    let o = vsnap(&["info", "--format", "raw", &s(&random)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("format:         raw"));
    assert!(
        !stdout(&o).contains("no VHD or VHDX structure found"),
        "forced, not guessed"
    );

    // Empty: an error, whatever its name.
    for name in ["empty.vhd", "empty.img"] {
        let f = d.join(name);
        std::fs::write(&f, b"").unwrap();
        let o = vsnap(&["info", &s(&f)]);
        assert_eq!(o.status.code(), Some(1), "{name}");
        assert!(
            stderr(&o).contains("not a disk image: the file is empty"),
            "{}",
            stderr(&o)
        );
    }

    // Nothing recognised, no VHD name: raw, and info says why.
    let text = d.join("notes.txt");
    std::fs::write(
        &text,
        "not a disk, but nothing says it is not\n".repeat(100),
    )
    .unwrap();
    let o = vsnap(&["info", &s(&text)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("no VHD or VHDX structure found: the file is taken as a raw disk"),
        "{}",
        stdout(&o)
    );
}

/// Disks are chosen by name or by position from 1 (`:0` says so), and a
/// one-disk snapshot restores to a file path without naming its disk.
#[test]
fn restore_picks_disks_by_position_from_1_and_one_disk_snapshots_to_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let repo = dir.path().join("repo");
    let image = fixtures().join("dynamic-16k.vhd");
    assert!(vsnap(&["repo", "init", &s(&repo)]).status.success());
    let o = vsnap(&[
        "backup",
        "-q",
        "--json",
        "--repo",
        &s(&repo),
        "--name",
        "vm",
        &s(&image),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let snap: Value = serde_json::from_slice(&o.stdout).unwrap();
    let id = snap["snapshot"].as_str().unwrap();
    let want = snap["disks"][0]["digest"].as_str().unwrap();

    let file = dir.path().join("one.vhd");
    let o = vsnap(&["restore", "-q", "--repo", &s(&repo), id, "--to", &s(&file)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with(want), "{}", stdout(&o));

    let o = vsnap(&[
        "restore",
        "-q",
        "--repo",
        &s(&repo),
        &format!("{id}:0"),
        "--to",
        &s(&dir.path().join("zero.vhd")),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(
            "has no disk \"0\"; by position from 1, and by name, it has: 1 dynamic-16k.vhd"
        ),
        "{}",
        stderr(&o)
    );
    let o = vsnap(&[
        "restore",
        "-q",
        "--repo",
        &s(&repo),
        &format!("{id}:1"),
        "--to",
        &s(&dir.path().join("first.vhd")),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with(want));
}

/// Completions for every shell clap_complete knows, and a man page for
/// every subcommand, from the same definitions as --help.
#[test]
fn completions_and_man_pages_cover_every_subcommand() {
    for shell in ["bash", "zsh", "fish", "elvish"] {
        let o = vsnap(&["completions", shell]);
        assert!(o.status.success(), "{shell}: {}", stderr(&o));
        let text = stdout(&o);
        for sub in ["backup", "restore", "verify", "agent", "completions"] {
            assert!(text.contains(sub), "{shell} completions lack {sub}");
        }
    }
    let o = vsnap(&["completions", "bash"]);
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("vsnap.bash");
    std::fs::write(&script, &o.stdout).unwrap();
    let st = std::process::Command::new("bash")
        .arg("-n")
        .arg(&script)
        .status()
        .unwrap();
    assert!(st.success(), "bash -n rejects the completion script");
    let o = vsnap(&["completions", "tcsh"]);
    assert_eq!(o.status.code(), Some(2));

    let man = dir.path().join("man1");
    let o = vsnap(&["man", man.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    for page in [
        "vsnap",
        "vsnap-backup",
        "vsnap-repo-init",
        "vsnap-restore",
        "vsnap-bench-freeze",
        "vsnap-agent",
    ] {
        let text = std::fs::read_to_string(man.join(format!("{page}.1"))).unwrap();
        assert!(text.contains(".TH"), "{page}.1 is not a man page");
    }
    let restore = std::fs::read_to_string(man.join("vsnap-restore.1")).unwrap();
    assert!(
        restore.contains("counted from 1"),
        "the page carries the long help"
    );
}

/// `demo --serve` checks its port before it builds anything: a port taken
/// by another service is named at once, and no VM is built.
#[test]
fn demo_serve_names_a_taken_port_before_building_anything() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    vsnap_bin(); // built before the clock starts
    let t = std::time::Instant::now();
    let o = vsnap(&["demo", "--serve", "--listen", &addr, demo.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        stderr(&o).contains(&format!("cannot listen on {addr}: another service has it")),
        "{}",
        stderr(&o)
    );
    assert!(
        t.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        t.elapsed()
    );
    assert!(!demo.exists(), "nothing is built");
}
