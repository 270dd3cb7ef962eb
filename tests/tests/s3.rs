//! The repository in object storage, end to end through the `vsnap`
//! binary against a real S3 server (s3s-fs on loopback, which checks
//! request signatures): the same backups as a local repository, packs in
//! place of chunk files, conditional creates, clear errors for wrong
//! credentials, a missing bucket and a dead endpoint, and damaged objects
//! refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use vsnap_e2e::s3::{env_for, S3Server, ACCESS_KEY, SECRET_KEY};
use vsnap_e2e::*;

const MIB: u64 = 1 << 20;

fn run(s3: &S3Server, args: &[&str]) -> Output {
    s3.env(&mut vsnap_cmd()).args(args).output().unwrap()
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
    let init = ok(
        &s3,
        &[
            "repo",
            "init",
            "--chunk-size",
            "1M",
            "--pack-size",
            "4M",
            url,
        ],
    );
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
    ok(
        &s3,
        &[
            "repo",
            "init",
            "--chunk-size",
            "1M",
            "--pack-size",
            "2M",
            url,
        ],
    );
    let b = backup(&s3, url, &img);
    let snap = b["snapshot"].as_str().unwrap().to_owned();

    // One flipped byte inside a pack: the blob fails its entry's CRC, on
    // verify and on restore; nothing is written from it.
    let pack = s3.objects("hostile", "packs")[0].clone();
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&pack, &bytes).unwrap();
    let o = run(&s3, &["verify", "-q", "--json", "--repo", url]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let problems = v["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{v}");
    let error = problems[0]["error"].as_str().unwrap();
    assert!(error.contains("bad packed blob checksum"), "{error}");
    assert!(error.contains("s3://vsnap/hostile/packs/"), "{error}");
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
    bytes[100] ^= 0x40;
    std::fs::write(&pack, &bytes).unwrap();

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
    assert_eq!(list.len(), 1);
    assert!(list[0]["error"].as_str().is_some(), "{list:?}");

    // A stray object under the prefix is reported.
    std::fs::write(s3.object_file("hostile", "packs/not-a-pack"), b"x").unwrap();
    let o = run(&s3, &["verify", "-q", "--json", "--repo", url]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v.to_string().contains("packs/not-a-pack"), "{v}");
}
