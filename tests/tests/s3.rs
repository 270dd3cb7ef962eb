//! The repository in object storage, end to end through the `vsnap`
//! binary against a real S3 server (s3s-fs on loopback, which checks
//! request signatures): the same backups as a local repository, packs in
//! place of chunk files, conditional creates, clear errors for wrong
//! credentials, a missing bucket and a dead endpoint, and damaged objects
//! refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use vsnap_e2e::s3::{env_for, restores_to_its_digest, Impl, S3Server, ACCESS_KEY, SECRET_KEY};
use vsnap_e2e::*;

const MIB: u64 = 1 << 20;

/// `vsnap ARGS` against `s3`; its peak RSS is said on stderr.
fn run(s3: &S3Server, args: &[&str]) -> Output {
    s3.vsnap_measured(args, &[]).0
}

fn ok(s3: &S3Server, args: &[&str]) -> String {
    let o = run(s3, args);
    assert!(o.status.success(), "{args:?}: {}{}", stdout(&o), stderr(&o));
    stdout(&o)
}

fn json(s3: &S3Server, args: &[&str]) -> Value {
    serde_json::from_str(&ok(s3, args)).unwrap()
}

fn backup(s3: &S3Server, repo: &str, image: &Path) -> Value {
    json(
        s3,
        &[
            "backup",
            "-q",
            "--json",
            "--name",
            "vm1",
            "--repo",
            repo,
            image.to_str().unwrap(),
        ],
    )
}

/// `vsnap repo init` of a bucket repository with small chunks and packs.
fn init(s3: &S3Server, url: &str, chunk: &str, pack: &str) -> String {
    ok(
        s3,
        &[
            "repo",
            "init",
            "--chunk-size",
            chunk,
            "--pack-size",
            pack,
            url,
        ],
    )
}

fn count(s3: &S3Server, prefix: &str, dir: &str) -> usize {
    s3.objects(prefix, dir).len()
}

#[test]
fn a_bucket_repository_backs_up_restores_and_verifies_as_a_local_one_does() {
    let test = "a_bucket_repository_backs_up_restores_and_verifies_as_a_local_one_does";
    let Some(s3) = S3Server::start(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.vhd");
    // 14 MiB of distinct random chunks, holes elsewhere.
    random_vhd(&img, 32 * MIB, 1, &[(0, 10 * MIB), (20 * MIB, 4 * MIB)]);
    let url = "s3://vsnap/site-a";
    let init = init(&s3, url, "1M", "4M");
    assert!(init.contains("packs of 4 MiB"), "{init}");
    let local = dir.path().join("local");
    ok(
        &s3,
        &[
            "repo",
            "init",
            "--chunk-size",
            "1M",
            local.to_str().unwrap(),
        ],
    );

    let remote = backup(&s3, url, &img);
    let here = backup(&s3, local.to_str().unwrap(), &img);
    assert_eq!(remote["disks"][0]["digest"], here["disks"][0]["digest"]);
    assert_eq!(remote["disks"][0]["new_chunks"], 14);
    // 14 MiB of incompressible chunks in packs closed at 4 MiB: 4 packs
    // (three full, the last flushed before the manifest), one pack index.
    assert_eq!(count(&s3, "site-a", "packs"), 4);
    assert_eq!(count(&s3, "site-a", "packindex"), 1);
    assert_eq!(count(&s3, "site-a", "snapshots"), 1);

    // Unchanged: nothing new is stored, and no pack is written.
    let again = backup(&s3, url, &img);
    assert_eq!(again["disks"][0]["new_chunks"], 0);
    assert_eq!(count(&s3, "site-a", "packs"), 4);

    // Restored from the bucket, the image is the local restore's, byte
    // for byte, and its digests match the backup's.
    let from_s3 = dir.path().join("from-s3.vhd");
    let from_dir = dir.path().join("from-dir.vhd");
    let snap = remote["snapshot"].as_str().unwrap();
    ok(
        &s3,
        &[
            "restore",
            "--repo",
            url,
            snap,
            "--to",
            from_s3.to_str().unwrap(),
        ],
    );
    ok(
        &s3,
        &[
            "restore",
            "--repo",
            local.to_str().unwrap(),
            here["snapshot"].as_str().unwrap(),
            "--to",
            from_dir.to_str().unwrap(),
        ],
    );
    assert!(std::fs::read(&from_s3).unwrap() == std::fs::read(&from_dir).unwrap());

    let v = json(&s3, &["verify", "-q", "--json", "--repo", url]);
    assert_eq!(v["problems"], serde_json::json!([]), "{v}");
    assert_eq!(v["snapshots"], 2);
    assert_eq!(v["chunks"], 14);

    // A changed region: only its chunks are new, in one more pack.
    let status = Command::new("qemu-io")
        .args(["-f", "vpc", "-c", "write -P 0x5a 2M 1M"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(status.status.success());
    // A manifest's time has whole seconds, and `latest` below refuses two
    // newest ones as ambiguous: this backup begins a second later.
    std::thread::sleep(Duration::from_millis(1100));
    let changed = backup(&s3, url, &img);
    assert_eq!(changed["disks"][0]["new_chunks"], 1);
    assert_eq!(count(&s3, "site-a", "packs"), 5);
    assert_eq!(count(&s3, "site-a", "packindex"), 2);

    // forget and latest work by the same rules as in a directory.
    let gone = ok(&s3, &["forget", "--repo", url, snap]);
    assert!(gone.contains(snap), "{gone}");
    let list: Vec<Value> =
        serde_json::from_str(&ok(&s3, &["snapshots", "--json", "--repo", url])).unwrap();
    assert_eq!(list.len(), 2);
    let latest = dir.path().join("latest.vhd");
    ok(
        &s3,
        &[
            "restore",
            "--repo",
            url,
            "latest",
            "--to",
            latest.to_str().unwrap(),
        ],
    );
    let v = json(&s3, &["verify", "-q", "--json", "--repo", url]);
    assert_eq!(v["problems"], serde_json::json!([]), "{v}");
}

#[test]
fn objects_are_created_once_and_bad_addresses_and_servers_fail_fast() {
    let test = "objects_are_created_once_and_bad_addresses_and_servers_fail_fast";
    let Some(s3) = S3Server::start(test) else {
        return;
    };
    let url = "s3://vsnap/once";
    ok(&s3, &["repo", "init", url]);
    let o = run(&s3, &["repo", "init", url]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("s3://vsnap/once: invalid argument: a repository is there already"),
        "{}",
        stderr(&o)
    );

    // Each failure an operator can fix says which it is, within seconds.
    let timed = |cmd: &mut Command| {
        let t = Instant::now();
        let o = cmd.output().unwrap();
        assert!(!o.status.success());
        (stderr(&o), t.elapsed())
    };
    let (err, took) = timed(
        env_for(
            &mut vsnap_cmd(),
            &s3.endpoint(),
            ACCESS_KEY,
            "not-the-secret",
        )
        .args(["snapshots", "--repo", url]),
    );
    assert!(
        err.contains("refused the credentials for bucket \"vsnap\""),
        "{err}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    let (err, took) = timed(
        env_for(&mut vsnap_cmd(), &s3.endpoint(), "nobody", SECRET_KEY).args([
            "snapshots",
            "--repo",
            url,
        ]),
    );
    assert!(err.contains("refused the credentials"), "{err}");
    assert!(took < Duration::from_secs(10), "{took:?}");

    let (err, _) =
        timed(
            s3.env(&mut vsnap_cmd())
                .args(["snapshots", "--repo", "s3://no-such-bucket/x"]),
        );
    assert!(
        err.contains("the bucket \"no-such-bucket\" does not exist"),
        "{err}"
    );

    // No keys at all: said so at once, with no metadata service asked.
    let (err, took) = timed(
        env_for(&mut vsnap_cmd(), &s3.endpoint(), "", "")
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .args(["snapshots", "--repo", url]),
    );
    assert!(
        err.contains("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        "{err}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");

    let dead = format!("http://127.0.0.1:{}", free_port());
    let (err, took) = timed(
        env_for(&mut vsnap_cmd(), &dead, ACCESS_KEY, SECRET_KEY).args(["snapshots", "--repo", url]),
    );
    assert!(
        err.contains(&format!("cannot reach the S3 endpoint {dead}")),
        "{err}"
    );
    assert!(took < Duration::from_secs(30), "{took:?}");

    let (err, _) =
        timed(
            s3.env(&mut vsnap_cmd())
                .args(["snapshots", "--repo", "s3://vsnap/empty"]),
        );
    assert!(err.contains("s3://vsnap/empty"), "{err}");
    assert!(err.contains("vsnap-repository"), "{err}");

    let (err, _) = timed(
        s3.env(&mut vsnap_cmd())
            .args(["snapshots", "--repo", "s3://Vsnap/x"]),
    );
    assert!(err.contains("\"Vsnap\" is not a bucket name"), "{err}");
}

#[test]
fn damaged_objects_in_the_bucket_are_refused() {
    let test = "damaged_objects_in_the_bucket_are_refused";
    let Some(s3) = S3Server::start(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.vhd");
    random_vhd(&img, 8 * MIB, 2, &[(0, 6 * MIB)]);
    let url = "s3://vsnap/hostile";
    init(&s3, url, "1M", "2M");
    let b = backup(&s3, url, &img);
    let snap = b["snapshot"].as_str().unwrap().to_owned();

    // One flipped byte inside each of two packs: each blob fails its
    // entry's CRC, on verify and on restore; nothing is written from it.
    let packs = s3.objects("hostile", "packs");
    assert!(packs.len() >= 2, "{packs:?}");
    let flip = |pack: &Path| {
        let mut bytes = std::fs::read(pack).unwrap();
        bytes[100] ^= 0x40;
        std::fs::write(pack, &bytes).unwrap();
    };
    flip(&packs[0]);
    flip(&packs[1]);
    let o = run(&s3, &["verify", "-q", "--json", "--repo", url]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let problems = v["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 2, "{v}");
    for p in problems {
        let error = p["error"].as_str().unwrap();
        assert!(error.contains("bad packed blob checksum"), "{error}");
        assert!(error.contains("s3://vsnap/hostile/packs/"), "{error}");
    }
    // Verify recorded both bad copies in one object, as a directory's
    // moves them aside; a second verify records nothing more.
    assert_eq!(v["moved_aside"], 2, "{v}");
    let records = s3.objects("hostile", "bad");
    assert_eq!(records.len(), 1);
    let record: Value = serde_json::from_slice(&std::fs::read(&records[0]).unwrap()).unwrap();
    assert_eq!(record["copies"].as_array().unwrap().len(), 2, "{record}");
    let o = run(&s3, &["verify", "-q", "--json", "--repo", url]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["moved_aside"], 0, "{v}");
    assert_eq!(s3.objects("hostile", "bad").len(), 1);
    let out = dir.path().join("out.vhd");
    let o = run(
        &s3,
        &[
            "restore",
            "--repo",
            url,
            &snap,
            "--to",
            out.to_str().unwrap(),
        ],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("bad packed blob checksum"),
        "{}",
        stderr(&o)
    );
    // The next backup of the same disk stores that chunk again rather
    // than reuse the bad copy; the first snapshot then reads the new copy,
    // verifies clean and restores to its digest, the bad byte still there.
    let again = backup(&s3, url, &img);
    assert_eq!(again["disks"][0]["new_chunks"], 2, "{again}");
    let v = json(&s3, &["verify", "-q", "--json", "--repo", url]);
    assert_eq!(v["problems"], serde_json::json!([]), "{v}");
    restores_to_its_digest(&|a| ok(&s3, a), url, &b, dir.path());
    // gc keeps the pack with the bad copy (its other chunks are live), and
    // the record with it.
    ok(&s3, &["gc", "--grace", "0s", "--repo", url]);
    assert_eq!(s3.objects("hostile", "bad").len(), 1);
    let v = json(&s3, &["verify", "-q", "--json", "--repo", url]);
    assert_eq!(v["problems"], serde_json::json!([]), "{v}");
    for pack in &packs[..2] {
        if pack.exists() {
            flip(pack);
        }
    }

    // A pack index whose content is not one, and one that is not what its
    // name says: verify names each; its chunks would count as absent.
    let pack_index_problem = |name: &str| {
        let o = run(&s3, &["verify", "-q", "--json", "--repo", url]);
        assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        let p = v["problems"].as_array().unwrap();
        assert_eq!(p.len(), 1, "{v}");
        assert_eq!(p[0]["what"], "pack index");
        assert_eq!(p[0]["name"], format!("s3://vsnap/hostile/packindex/{name}"));
        p[0]["error"].as_str().unwrap().to_owned()
    };
    let junk = b"not a pack index".to_vec();
    let junk_name = blake3::hash(&junk).to_hex().to_string();
    let junk_file = s3.object_file("hostile", &format!("packindex/{junk_name}"));
    std::fs::write(&junk_file, &junk).unwrap();
    let err = pack_index_problem(&junk_name);
    assert!(
        err.contains("truncated: pack index header needs 24 bytes"),
        "{err}"
    );
    std::fs::remove_file(&junk_file).unwrap();
    let liar_name = "ab".repeat(32);
    let liar = s3.object_file("hostile", &format!("packindex/{liar_name}"));
    std::fs::write(&liar, &junk).unwrap();
    let err = pack_index_problem(&liar_name);
    assert!(err.contains("pack index digest mismatch"), "{err}");
    std::fs::remove_file(&liar).unwrap();

    // A manifest that is not one is listed as damaged, not trusted.
    let manifest = s3.object_file("hostile", &format!("snapshots/{snap}.json"));
    std::fs::write(&manifest, b"{\"id\": 1}").unwrap();
    let list: Vec<Value> =
        serde_json::from_str(&ok(&s3, &["snapshots", "--json", "--repo", url])).unwrap();
    assert_eq!(list.len(), 2);
    let damaged: Vec<&Value> = list.iter().filter(|m| m["error"].is_string()).collect();
    assert_eq!(damaged.len(), 1, "{list:?}");

    // A stray object under the prefix is reported.
    std::fs::write(s3.object_file("hostile", "packs/not-a-pack"), b"x").unwrap();
    let o = run(&s3, &["verify", "-q", "--json", "--repo", url]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v.to_string().contains("packs/not-a-pack"), "{v}");
}

#[test]
fn gc_in_a_bucket_steps_around_damage_and_collects_once_it_is_quarantined() {
    let test = "gc_in_a_bucket_steps_around_damage_and_collects_once_it_is_quarantined";
    let Some(s3) = S3Server::start(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.vhd"), dir.path().join("b.vhd"));
    random_vhd(&a, 8 * MIB, 21, &[(0, 4 * MIB)]);
    random_vhd(&b, 8 * MIB, 22, &[(0, 4 * MIB)]);
    let url = "s3://vsnap/quarantine";
    init(&s3, url, "1M", "2M");
    let first = backup(&s3, url, &a)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let second = backup(&s3, url, &b);
    let packs = count(&s3, "quarantine", "packs");
    let gc = || run(&s3, &["gc", "--json", "--grace", "0s", "--repo", url]);
    let damaged = |o: &Output, what: &str| {
        assert_eq!(o.status.code(), Some(3), "{}", stderr(o));
        assert!(
            stderr(o).contains("deleted no chunk, index or pack"),
            "{}",
            stderr(o)
        );
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["damaged"].as_array().unwrap().len(), 1, "{v}");
        assert_eq!(v["damaged"][0]["what"], what, "{v}");
        assert_eq!(v["packs_removed"], 0, "{v}");
        assert_eq!(v["packs_condemned"], 0, "{v}");
    };

    // A pack index that does not parse: its packs' fate is unknown, so
    // gc removes nothing.
    let junk = b"not a pack index".to_vec();
    let junk_name = blake3::hash(&junk).to_hex().to_string();
    let junk_file = s3.object_file("quarantine", &format!("packindex/{junk_name}"));
    std::fs::write(&junk_file, &junk).unwrap();
    damaged(&gc(), "pack index");
    let moved = json(
        &s3,
        &["repo", "quarantine", "--json", "--repo", url, &junk_name],
    );
    assert_eq!(moved[0]["what"], "pack index", "{moved}");
    assert!(!junk_file.exists());
    let aside = s3.object_file("quarantine", &format!("quarantine/packindex.{junk_name}"));
    assert_eq!(std::fs::read(&aside).unwrap(), junk);

    // The first snapshot's manifest, cut short: the same, then moved
    // aside by a prefix of its id.
    let manifest = s3.object_file("quarantine", &format!("snapshots/{first}.json"));
    let bytes = std::fs::read(&manifest).unwrap();
    std::fs::write(&manifest, &bytes[..bytes.len() / 2]).unwrap();
    damaged(&gc(), "manifest");
    assert_eq!(count(&s3, "quarantine", "packs"), packs);
    ok(&s3, &["repo", "quarantine", "--repo", url, &first[..10]]);
    assert!(!manifest.exists());

    // gc runs again: it condemns what only the first snapshot used, and a
    // later run deletes it; the second snapshot restores, and verify
    // finds nothing wrong (quarantine/ is no stray).
    for _ in 0..2 {
        // S3 times have whole seconds: a condemnation settles in the next.
        std::thread::sleep(Duration::from_millis(1100));
        let o = gc();
        assert!(o.status.success(), "{}", stderr(&o));
    }
    assert!(count(&s3, "quarantine", "packs") < packs);
    let v = json(&s3, &["verify", "-q", "--json", "--repo", url]);
    assert_eq!(v["problems"], serde_json::json!([]), "{v}");
    restores_to_its_digest(&|a| ok(&s3, a), url, &second, dir.path());
    assert_eq!(count(&s3, "quarantine", "quarantine"), 2);
}

#[test]
fn gc_collects_the_duplicate_packs_of_backups_that_raced() {
    let test = "gc_collects_the_duplicate_packs_of_backups_that_raced";
    let Some(s3) = S3Server::start(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // b holds a's data where a does (the same seed and range), and a
    // chunk of its own before it.
    let (a, b) = (dir.path().join("a.vhd"), dir.path().join("b.vhd"));
    random_vhd(&a, 8 * MIB, 31, &[(MIB, 4 * MIB)]);
    random_vhd(&b, 8 * MIB, 31, &[(MIB, 4 * MIB), (0, MIB)]);
    let url = "s3://vsnap/dups";
    init(&s3, url, "1M", "2M");
    let first = backup(&s3, url, &a);
    // The second backup ran before the first's pack index was up: it
    // sees none, and stores every chunk again, in packs of its own.
    let hidden = dir.path().join("hidden");
    std::fs::create_dir(&hidden).unwrap();
    let indexes = s3.objects("dups", "packindex");
    for f in &indexes {
        std::fs::rename(f, hidden.join(f.file_name().unwrap())).unwrap();
    }
    let second = backup(&s3, url, &b);
    assert_eq!(second["disks"][0]["new_chunks"], 5, "{second}");
    for f in &indexes {
        std::fs::rename(hidden.join(f.file_name().unwrap()), f).unwrap();
    }
    let bytes = |s3: &S3Server| -> u64 {
        s3.objects("dups", "packs")
            .iter()
            .map(|p| p.metadata().unwrap().len())
            .sum()
    };
    let before = bytes(&s3);

    // The newer copies go, by the two steps of every condemnation (S3
    // times have whole seconds: each step waits for the next).
    let gc = || {
        std::thread::sleep(Duration::from_millis(1100));
        let args = ["gc", "--json", "--grace", "0s", "--repack-below", "0"];
        json(&s3, &[&args[..], &["--repo", url]].concat())
    };
    let first_gc = gc();
    assert!(
        first_gc["packs_duplicate"].as_u64().unwrap() >= 1,
        "{first_gc:#}"
    );
    assert_eq!(
        first_gc["packs_condemned"], first_gc["packs_duplicate"],
        "{first_gc:#}"
    );
    let gc = gc();
    assert!(gc["packs_removed"].as_u64().unwrap() >= 1, "{gc:#}");
    assert!(bytes(&s3) < before, "{} of {before} bytes", bytes(&s3));
    let v = json(&s3, &["verify", "-q", "--json", "--repo", url]);
    assert_eq!(v["problems"], serde_json::json!([]), "{v}");
    restores_to_its_digest(&|a| ok(&s3, a), url, &first, dir.path());
    restores_to_its_digest(&|a| ok(&s3, a), url, &second, dir.path());
}

#[test]
fn two_hosts_back_up_into_one_bucket_while_gc_runs_and_nothing_is_lost() {
    let test = "two_hosts_back_up_into_one_bucket_while_gc_runs_and_nothing_is_lost";
    let Some(s3) = S3Server::start(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = "s3://vsnap/fleet";
    init(&s3, url, "256K", "1M");
    // Two hosts' disks; a shared region makes them deduplicate into each
    // other's packs.
    let images: Vec<_> = ["a", "b"]
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let img = dir.path().join(format!("{n}.vhd"));
            random_vhd(&img, 8 * MIB, 10 + i as u64, &[(0, 3 * MIB)]);
            rewrite_vhd(&img, 99, 4 * MIB, MIB);
            img
        })
        .collect();
    let spawn_backup = |host: &str, img: &Path| {
        s3.env(&mut vsnap_cmd())
            .env("VSNAP_HOST", host)
            .args(["backup", "-q", "--json", "--name", host, "--repo", url])
            .arg(img)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Repacking any pack with a dead chunk in it: gc copies while the
    // backups reuse.
    let gc = || {
        s3.env(&mut vsnap_cmd())
            .args(["gc", "--json", "--grace", "0s", "--repack-below", "90"])
            .args(["--repo", url])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let finish = |c: std::process::Child| -> Value {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    // Each host's snapshots, as their backups reported them.
    let mut kept: Vec<(String, Value)> = Vec::new();
    let mut removed = 0;
    let mut condemned = 0;
    let mut repacked = 0;
    const HALF: u64 = MIB / 2;
    for round in 0..10u64 {
        // Each host rewrites two half-MiB regions of its disk: the four
        // chunks go into one pack, and since one region comes round again
        // every 3 rounds and the other every 2, forget kills the pack's
        // halves a round apart: a pack half dead, for gc to repack,
        // whatever order the backup's workers stored them in.
        for (i, img) in images.iter().enumerate() {
            let seed = round * 4 + i as u64 * 2 + 1000;
            rewrite_vhd(img, seed, HALF * (round % 3), HALF);
            rewrite_vhd(img, seed + 1, 3 * HALF + HALF * (round % 2), HALF);
        }
        let a = spawn_backup("host-a", &images[0]);
        let b = spawn_backup("host-b", &images[1]);
        let g = gc();
        for (host, out) in [("host-a", finish(a)), ("host-b", finish(b))] {
            kept.push((host.to_owned(), out));
        }
        let report = finish(g);
        removed += report["packs_removed"].as_u64().unwrap();
        condemned += report["packs_condemned"].as_u64().unwrap();
        repacked += report["packs_repacked"].as_u64().unwrap();
        // Keep each host's last two snapshots.
        for host in ["host-a", "host-b"] {
            let mine: Vec<usize> = (0..kept.len()).filter(|&i| kept[i].0 == host).collect();
            if mine.len() > 2 {
                let (_, gone) = kept.remove(mine[0]);
                ok(
                    &s3,
                    &["forget", "--repo", url, gone["snapshot"].as_str().unwrap()],
                );
            }
        }
        let list: Vec<Value> =
            serde_json::from_str(&ok(&s3, &["snapshots", "--json", "--repo", url])).unwrap();
        let mut have: Vec<(String, String)> = list
            .iter()
            .map(|m| {
                (
                    m["host"].as_str().unwrap().to_owned(),
                    m["id"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        have.sort();
        let mut want: Vec<(String, String)> = kept
            .iter()
            .map(|(h, v)| (h.clone(), v["snapshot"].as_str().unwrap().to_owned()))
            .collect();
        want.sort();
        assert_eq!(have, want, "round {round}: snapshots lost or left");
        let v = json(&s3, &["verify", "-q", "--json", "--repo", url]);
        assert_eq!(v["problems"], serde_json::json!([]), "round {round}: {v}");
    }
    // With the backups over, two more runs a second apart delete what
    // the last rounds condemned.
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(2100));
        let report = finish(gc());
        removed += report["packs_removed"].as_u64().unwrap();
        condemned += report["packs_condemned"].as_u64().unwrap();
        repacked += report["packs_repacked"].as_u64().unwrap();
    }
    // The half-dead packs were repacked beside the backups: the pack of
    // round r is half dead from the forget of round r + 3, so gc repacked
    // at least those of rounds 1 to 5 for each host.
    eprintln!("{test}: condemned {condemned}, repacked {repacked}, removed {removed}");
    assert!(
        condemned > 0 && removed > 0 && repacked >= 10,
        "condemned {condemned}, repacked {repacked}, removed {removed}"
    );
    let v = json(&s3, &["verify", "-q", "--json", "--repo", url]);
    assert_eq!(v["problems"], serde_json::json!([]), "{v}");
    assert!(
        s3.objects("fleet", "leases").is_empty(),
        "leases left behind"
    );
    // Every snapshot kept restores to the digest its backup reported.
    for (_, snap) in &kept {
        restores_to_its_digest(&|a| ok(&s3, a), url, snap, dir.path());
    }
}

#[test]
fn gc_condemns_first_and_deletes_only_after_every_older_backup_ends() {
    let test = "gc_condemns_first_and_deletes_only_after_every_older_backup_ends";
    let Some(s3) = S3Server::start(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = "s3://vsnap/leases";
    init(&s3, url, "256K", "1M");
    let img = dir.path().join("a.vhd");
    random_vhd(&img, 4 * MIB, 5, &[(0, 2 * MIB)]);
    let first = backup(&s3, url, &img);
    let first_id = first["snapshot"].as_str().unwrap().to_owned();
    rewrite_vhd(&img, 6, 0, 2 * MIB);
    let second = backup(&s3, url, &img);
    ok(&s3, &["forget", "--repo", url, &first_id]);
    let packs_before = count(&s3, "leases", "packs");

    // A backup on another host, begun now and still running: its lease.
    let lease = s3.object_file("leases", "leases/backup.other.1.0.json");
    std::fs::create_dir_all(lease.parent().unwrap()).unwrap();
    std::fs::write(&lease, br#"{"kind":"backup","host":"other","pid":1}"#).unwrap();
    let gc = || -> Value {
        std::thread::sleep(Duration::from_millis(1100));
        json(&s3, &["gc", "--json", "--grace", "0s", "--repo", url])
    };
    let r = gc();
    let condemned = r["packs_condemned"].as_u64().unwrap();
    assert!(condemned >= 2, "{r}");
    assert_eq!(r["packs_removed"], 0, "{r}");
    assert_eq!(r["running_backups"], 1, "{r}");
    assert_eq!(count(&s3, "leases", "condemned"), 1);

    // A backup begun after the condemnation does not reuse its packs: the
    // first snapshot's content is stored again.
    rewrite_vhd(&img, 5, 0, 2 * MIB);
    let again = backup(&s3, url, &img);
    assert!(
        again["disks"][0]["new_chunks"].as_u64().unwrap() >= 8,
        "{again}"
    );

    // The other backup began before the condemnation: nothing goes while
    // it runs.
    let r = gc();
    assert_eq!(r["packs_removed"], 0, "{r}");
    assert_eq!(r["packs_waiting"], condemned, "{r}");
    assert_eq!(count(&s3, "leases", "packs"), packs_before + 2);

    // It ends; the condemned packs go, and every snapshot still verifies.
    std::fs::remove_file(&lease).unwrap();
    let r = gc();
    assert_eq!(r["packs_removed"], condemned, "{r}");
    assert_eq!(count(&s3, "leases", "condemned"), 0);
    let v = json(&s3, &["verify", "-q", "--json", "--repo", url]);
    assert_eq!(v["problems"], serde_json::json!([]), "{v}");
    assert_eq!(v["snapshots"], 2);
    for snap in [&second, &again] {
        restores_to_its_digest(&|a| ok(&s3, a), url, snap, dir.path());
    }
}

#[test]
fn gc_repacks_a_mostly_dead_pack_and_deletes_it_only_later() {
    let test = "gc_repacks_a_mostly_dead_pack_and_deletes_it_only_later";
    let Some(s3) = S3Server::start(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = "s3://vsnap/repack";
    init(&s3, url, "1M", "4M");
    let img = dir.path().join("a.vhd");
    random_vhd(&img, 16 * MIB, 8, &[(0, 12 * MIB)]);
    // One worker: chunks go into packs in disk order, 4 a pack.
    let backup1 = |img: &Path| -> Value {
        let args = ["backup", "-q", "--json", "--threads", "1", "--name", "vm1"];
        json(
            &s3,
            &[&args[..], &["--repo", url, img.to_str().unwrap()]].concat(),
        )
    };
    let first = backup1(&img);
    assert_eq!(count(&s3, "repack", "packs"), 3);
    // Three of the first pack's four chunks are rewritten, and the only
    // snapshot that named them forgotten: that pack is a quarter live.
    rewrite_vhd(&img, 9, 0, 3 * MIB);
    let second = backup1(&img);
    ok(
        &s3,
        &["forget", "--repo", url, first["snapshot"].as_str().unwrap()],
    );
    let gc = || -> Value {
        std::thread::sleep(Duration::from_millis(1100));
        json(&s3, &["gc", "--json", "--grace", "0s", "--repo", url])
    };
    let old_packs = s3.objects("repack", "packs");

    let r = gc();
    assert_eq!(r["packs_repacked"], 1, "{r}");
    assert_eq!(r["chunks_repacked"], 1, "{r}");
    assert_eq!(r["packs_condemned"], 1, "{r}");
    assert_eq!(r["packs_removed"], 0, "{r}");
    let v = json(&s3, &["verify", "-q", "--json", "--repo", url]);
    assert_eq!(v["problems"], serde_json::json!([]), "{v}");

    // A backup now finds the live chunk in its new pack, not the
    // condemned one, and stores nothing again.
    let third = backup1(&img);
    assert_eq!(third["disks"][0]["new_chunks"], 0, "{third}");

    // The next run deletes the condemned pack; nothing else goes.
    let r = gc();
    assert_eq!(r["packs_removed"], 1, "{r}");
    assert_eq!(r["packs_repacked"], 0, "{r}");
    let now = s3.objects("repack", "packs");
    let gone: Vec<_> = old_packs.iter().filter(|p| !now.contains(p)).collect();
    assert_eq!(gone.len(), 1, "{gone:?}");
    let v = json(&s3, &["verify", "-q", "--json", "--repo", url]);
    assert_eq!(v["problems"], serde_json::json!([]), "{v}");
    assert_eq!(v["snapshots"], 2);
    for snap in [&second, &third] {
        restores_to_its_digest(&|a| ok(&s3, a), url, snap, dir.path());
    }
    // --repack-below 0 never repacks.
    let o = ok(
        &s3,
        &["gc", "--repack-below", "0", "--grace", "0s", "--repo", url],
    );
    assert!(o.contains("repacked 0 pack(s)"), "{o}");
}

/// A pack lost from the bucket (deleted by hand, lost by a provider): the
/// next backup never trusts the pack indexes alone. It stores the chunks
/// the lost pack held again, says what it met (stderr, and `damage_met`
/// in --json), and its snapshot restores equal to the disk.
#[test]
fn a_backup_after_a_pack_went_missing_stores_its_chunks_again() {
    lost_pack(
        "a_backup_after_a_pack_went_missing_stores_its_chunks_again",
        Impl::S3sFs,
    );
}

#[test]
fn a_backup_after_a_pack_went_missing_stores_its_chunks_again_on_moto() {
    lost_pack(
        "a_backup_after_a_pack_went_missing_stores_its_chunks_again_on_moto",
        Impl::Moto,
    );
}

fn lost_pack(test: &str, kind: Impl) {
    let Some(s3) = S3Server::start_impl(test, kind) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = "s3://vsnap/lost";
    let img = dir.path().join("a.vhd");
    random_vhd(&img, 16 * MIB, 41, &[(0, 12 * MIB)]);
    ok(
        &s3,
        &[
            "repo",
            "init",
            "--chunk-size",
            "512K",
            "--pack-size",
            "1M",
            url,
        ],
    );
    ok(
        &s3,
        &[
            "backup",
            "-q",
            "--name",
            "vm",
            "--repo",
            url,
            img.to_str().unwrap(),
        ],
    );
    let packs = s3.keys("lost", "packs");
    assert!(packs.len() >= 4, "{packs:?}");
    s3.remove("lost", &packs[1]);
    let lost = packs[1].strip_prefix("packs/").unwrap().to_owned();
    let o = run(
        &s3,
        &[
            "backup",
            "-q",
            "--json",
            "--name",
            "vm",
            "--repo",
            url,
            img.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let report: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(report["new_bytes"].as_u64().unwrap() > 0, "{report}");
    let met = report["damage_met"].as_array().unwrap();
    assert_eq!(met.len(), 1, "{report}");
    let met = met[0].as_str().unwrap();
    assert!(
        met.starts_with(&format!(
            "pack s3://vsnap/lost/packs/{lost}: the pack index packindex/"
        )),
        "{met}"
    );
    assert!(
        met.ends_with("names it, but the bucket does not hold it"),
        "{met}"
    );
    assert!(
        stderr(&o).contains("vsnap: warning: 1 object(s) of the repository could not be used"),
        "{}",
        stderr(&o)
    );
    let id = report["snapshot"].as_str().unwrap();
    let out = dir.path().join("r.vhd");
    ok(
        &s3,
        &["restore", "--repo", url, id, "--to", out.to_str().unwrap()],
    );
    let cmp = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "vpc", "-F", "vpc"])
        .arg(&img)
        .arg(&out)
        .status()
        .unwrap();
    assert!(
        cmp.success(),
        "qemu-img compare: the restore differs from the disk"
    );
    // The snapshots are whole; the record of the lost pack is reported.
    let o = run(&s3, &["verify", "-q", "--json", "--repo", url]);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let problems = v["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{v}");
    assert_eq!(problems[0]["what"], "pack", "{v}");
    assert_eq!(problems[0]["affects"], serde_json::json!([]), "{v}");
    assert_eq!(o.status.code(), Some(3), "{v}");
    // gc drops the lost pack's record; then verify is clean.
    let gc: Value = serde_json::from_str(&ok(&s3, &["gc", "--json", "--repo", url])).unwrap();
    assert_eq!(gc["packs_lost"], 1, "{gc}");
    assert_eq!(gc["pack_indexes_rewritten"], 1, "{gc}");
    let v: Value =
        serde_json::from_str(&ok(&s3, &["verify", "-q", "--json", "--repo", url])).unwrap();
    assert_eq!(v["problems"], serde_json::json!([]), "{v}");
    assert_eq!(v["snapshots"], 2, "{v}");
}

/// The same against moto's server, which honours conditional writes
/// itself, behind the proxy that strips them.
#[test]
fn a_server_that_ignores_conditional_writes_is_found_and_named_on_moto() {
    let test = "a_server_that_ignores_conditional_writes_is_found_and_named_on_moto";
    if let Some(s3) = S3Server::start_impl(test, Impl::Moto) {
        conditional_writes_checked(&s3);
    }
}

/// What `repo init` and the commands after it do with `s3`, honouring
/// conditional writes itself, and behind a proxy that strips them (which
/// it returns, with s3://vsnap/second made through it).
fn conditional_writes_checked(s3: &S3Server) -> fault_proxy::FaultProxy {
    use vsnap_e2e::fault_proxy::{FaultProxy, Faults};
    ok(
        s3,
        &["repo", "init", "--chunk-size", "2M", "s3://vsnap/first"],
    );
    let config = s3.read("first", "vsnap-repository").unwrap();
    let parsed: Value = serde_json::from_slice(&config).unwrap();
    assert!(parsed.get("conditional_writes").is_none(), "{parsed}");
    let faults = Faults {
        ignore_conditions: true,
        ..Faults::default()
    };
    let proxy = FaultProxy::start(([127, 0, 0, 1], s3.port).into(), faults, 3).unwrap();
    let via = |args: &[&str]| through(&proxy, args);
    // Over an existing repository: refused, and its config untouched.
    let o = via(&["repo", "init", "--chunk-size", "4M", "s3://vsnap/first"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("a repository is there already"),
        "{}",
        stderr(&o)
    );
    assert_eq!(s3.read("first", "vsnap-repository").unwrap(), config);
    // A new one: the probe finds the server out, and is removed.
    let o = via(&["repo", "init", "s3://vsnap/second"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("the server ignores conditional writes (If-None-Match: *)"),
        "{}",
        stderr(&o)
    );
    assert!(
        stderr(&o).contains("--accept-unconditional-writes"),
        "{}",
        stderr(&o)
    );
    let left = s3.keys("second", "");
    assert!(left.is_empty(), "the probe is removed: {left:?}");
    // Accepted: recorded, and every command that opens it warns.
    let o = via(&[
        "repo",
        "init",
        "--accept-unconditional-writes",
        "s3://vsnap/second",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let config: Value =
        serde_json::from_slice(&s3.read("second", "vsnap-repository").unwrap()).unwrap();
    assert_eq!(config["conditional_writes"], false, "{config}");
    let o = via(&["snapshots", "--repo", "s3://vsnap/second"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o)
            .contains("vsnap: warning: the server of s3://vsnap/second ignores conditional writes"),
        "{}",
        stderr(&o)
    );
    proxy
}

/// A server that ignores `If-None-Match: *` (simulated by the proxy):
/// `repo init` looks first and never overwrites a repository, refuses the
/// server unless told to accept it, and a repository made so warns every
/// command that opens it.
#[test]
fn a_server_that_ignores_conditional_writes_is_found_and_named() {
    let test = "a_server_that_ignores_conditional_writes_is_found_and_named";
    let Some(s3) = S3Server::start(test) else {
        return;
    };
    let proxy = conditional_writes_checked(&s3);
    // The service warns too, once, in its log.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("serve.toml");
    std::fs::write(
        &config,
        r#"repository = "s3://vsnap/second"
state_dir = "state"
listen = "127.0.0.1:0"

[[vm]]
name = "a"
disks = ["a.vhd"]
agent = "none"
"#,
    )
    .unwrap();
    let log = dir.path().join("serve.log");
    let mut serve = Killed(
        env_for(&mut vsnap_cmd(), &proxy.endpoint(), ACCESS_KEY, SECRET_KEY)
            .args(["serve", "--log-format", "json", "--config"])
            .arg(&config)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    let t = Instant::now();
    while !text().contains("API on http://") {
        assert!(t.elapsed() < Duration::from_secs(20), "{}", text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let addr = text()
        .split("API on http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap()
        .to_owned();
    let token = std::fs::read_to_string(dir.path().join("state/api.token")).unwrap();
    for _ in 0..2 {
        let (status, body) = http(&addr, "GET", "/api/v1/snapshots", Some(token.trim()), None);
        assert_eq!(status, 200, "{body}");
    }
    let _ = Command::new("kill").arg(serve.id().to_string()).status();
    let _ = serve.wait();
    let warned: Vec<Value> = text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|l: &Value| l["event"] == "repository-caveat")
        .collect();
    assert_eq!(warned.len(), 1, "{}", text());
    assert_eq!(warned[0]["level"], "warn");
    assert!(
        warned[0]["message"]
            .as_str()
            .unwrap()
            .contains("ignores conditional writes"),
        "{}",
        text()
    );

    // A server that honours them: no warning, nothing recorded.
    let first: Value = serde_json::from_slice(&config_bytes(&s3, "first")).unwrap();
    assert!(first.get("conditional_writes").is_none(), "{first}");
    assert!(!stderr(&run(&s3, &["snapshots", "--repo", "s3://vsnap/first"])).contains("warning"));
}

/// `vsnap ARGS` against the S3 server behind `proxy`.
fn through(proxy: &fault_proxy::FaultProxy, args: &[&str]) -> Output {
    env_for(&mut vsnap_cmd(), &proxy.endpoint(), ACCESS_KEY, SECRET_KEY)
        .args(args)
        .output()
        .unwrap()
}

fn config_bytes(s3: &S3Server, prefix: &str) -> Vec<u8> {
    std::fs::read(s3.object_file(prefix, "vsnap-repository")).unwrap()
}

/// Endpoints close connections they kept idle, and a client that reuses
/// one meets a broken pipe or a reset while it sends: retried for every
/// request, conditional creates included (packs, pack indexes, manifests),
/// and never called an endpoint that cannot be reached.
#[test]
fn a_kept_alive_connection_closed_mid_upload_is_retried() {
    // Against s3s-fs only: through moto's server no connection was
    // reused (the proxy cut none of 253 requests), so none can be cut.
    use vsnap_e2e::fault_proxy::{FaultProxy, Faults};
    let test = "a_kept_alive_connection_closed_mid_upload_is_retried";
    let Some(s3) = S3Server::start(test) else {
        return;
    };
    let faults = Faults {
        cut_reused: 0.3,
        ..Faults::default()
    };
    let proxy = FaultProxy::start(([127, 0, 0, 1], s3.port).into(), faults, 11).unwrap();
    let dir = tempfile::tempdir().unwrap();
    backups_through(&proxy, "s3://vsnap/cut", dir.path(), 32 * MIB, 4 * MIB);
    let t = proxy.tally();
    assert!(t.faults >= 5, "too few connections cut to tell: {t:?}");
}

/// Through `proxy`: a repository at `url` of 512 KiB chunks in 1 MiB
/// packs, and three backups of a VHD of `size` bytes in `dir`, each
/// after `changed` bytes are rewritten. The repository verifies clean and
/// each snapshot restores to its digest. Returns the disk and the
/// backups' reports.
fn backups_through(
    proxy: &fault_proxy::FaultProxy,
    url: &str,
    dir: &Path,
    size: u64,
    changed: u64,
) -> (PathBuf, Vec<Value>) {
    let via_ok = |args: &[&str]| -> String {
        let o = through(proxy, args);
        assert!(o.status.success(), "{args:?}: {}{}", stdout(&o), stderr(&o));
        stdout(&o)
    };
    let img = dir.join("a.vhd");
    random_vhd(&img, size, size / MIB, &[(0, size * 3 / 4)]);
    via_ok(&[
        "repo",
        "init",
        "--chunk-size",
        "512K",
        "--pack-size",
        "1M",
        url,
    ]);
    let mut snaps = Vec::new();
    for round in 0..3u64 {
        rewrite_vhd(&img, 300 + round, round * changed, changed);
        let out = via_ok(&[
            "backup",
            "-q",
            "--json",
            "--name",
            "vm1",
            "--repo",
            url,
            img.to_str().unwrap(),
        ]);
        snaps.push(serde_json::from_str::<Value>(&out).unwrap());
    }
    let v: Value =
        serde_json::from_str(&via_ok(&["verify", "-q", "--json", "--repo", url])).unwrap();
    assert_eq!(v["problems"], serde_json::json!([]), "{v}");
    assert_eq!(v["snapshots"], 3, "{v}");
    for snap in &snaps {
        restores_to_its_digest(&via_ok, url, snap, dir);
    }
    (img, snaps)
}

#[test]
fn a_faulty_network_is_survived_and_damage_in_transit_never_accepted() {
    use vsnap_e2e::fault_proxy::{FaultProxy, Faults};
    use vsnap_e2e::s3::ACCESS_KEY as KEY;
    let test = "a_faulty_network_is_survived_and_damage_in_transit_never_accepted";
    let Some(s3) = S3Server::start(test) else {
        return;
    };
    let flaky = Faults {
        drop: 0.03,
        slow_down: 0.03,
        internal: 0.03,
        truncate: 0.03,
        corrupt_ranges: 0.0,
        cut_reused: 0.03,
        ignore_conditions: false,
        latency: Duration::from_millis(1),
    };
    let proxy = FaultProxy::start(([127, 0, 0, 1], s3.port).into(), flaky.clone(), 7).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = "s3://vsnap/faulty";
    // Drops, SlowDowns, 500s, cut requests and cut bodies: every command
    // retries through them, and the results are exact.
    let (img, snaps) = backups_through(&proxy, url, dir.path(), 16 * MIB, MIB);
    let via = |args: &[&str]| through(&proxy, args);
    let via_ok = |args: &[&str]| -> String {
        let o = via(args);
        assert!(o.status.success(), "{args:?}: {}{}", stdout(&o), stderr(&o));
        stdout(&o)
    };
    let t = proxy.tally();
    assert!(t.faults >= 10, "{t:?}");

    // A byte flipped in a fifth of the ranged reads: each damaged blob
    // fails its CRC and is fetched again; the restore is exact.
    proxy.set_faults(Faults {
        corrupt_ranges: 0.2,
        ..Faults::default()
    });
    let before = proxy.tally().faults;
    let last = &snaps[2];
    let id = last["snapshot"].as_str().unwrap();
    restores_to_its_digest(&via_ok, url, last, dir.path());
    assert!(proxy.tally().faults > before);

    // Every ranged read damaged: refused, never written out.
    proxy.set_faults(Faults {
        corrupt_ranges: 1.0,
        ..Faults::default()
    });
    let out = dir.path().join("never.vhd");
    let o = via(&["restore", "--repo", url, id, "--to", out.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("bad packed blob checksum"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
    let o = via(&["verify", "-q", "--json", "--repo", url]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));

    // A backup killed while it uploads leaves no snapshot, and the
    // repository verifies clean.
    proxy.set_faults(Faults {
        latency: Duration::from_millis(60),
        ..Faults::default()
    });
    rewrite_vhd(&img, 400, 0, 8 * MIB);
    let mut child = env_for(&mut vsnap_cmd(), &proxy.endpoint(), KEY, SECRET_KEY)
        .args(["backup", "-q", "--name", "vm1", "--repo", url])
        .arg(&img)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(900));
    child.kill().unwrap();
    child.wait().unwrap();
    let list: Vec<Value> =
        serde_json::from_str(&ok(&s3, &["snapshots", "--json", "--repo", url])).unwrap();
    assert_eq!(list.len(), 3);
    let v = json(&s3, &["verify", "-q", "--json", "--repo", url]);
    assert_eq!(v["problems"], serde_json::json!([]), "{v}");

    // A server that only fails: the backup gives up with the server's
    // answer, and leaves no snapshot.
    proxy.set_faults(Faults {
        internal: 1.0,
        ..Faults::default()
    });
    let t0 = Instant::now();
    let o = via(&[
        "backup",
        "-q",
        "--name",
        "vm1",
        "--repo",
        url,
        img.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("InternalError"), "{}", stderr(&o));
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
    let list: Vec<Value> =
        serde_json::from_str(&ok(&s3, &["snapshots", "--json", "--repo", url])).unwrap();
    assert_eq!(list.len(), 3);
}
