//! `vsnap repo sync`: a local repository copied into a bucket on a real
//! S3 server (s3s-fs on loopback) and back, only what is missing, resumed
//! after a kill -9, and never carrying damage over.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vsnap_e2e::fault_proxy::{FaultProxy, Faults};
use vsnap_e2e::s3::{env_for, S3Server, ACCESS_KEY, SECRET_KEY};
use vsnap_e2e::*;

const MIB: u64 = 1 << 20;

/// Runs vsnap against `endpoint` (the server or a proxy before it).
fn cmd(endpoint: &str) -> Command {
    let mut c = vsnap_cmd();
    env_for(&mut c, endpoint, ACCESS_KEY, SECRET_KEY);
    c
}

fn run(endpoint: &str, args: &[&str]) -> Output {
    cmd(endpoint).args(args).output().unwrap()
}

fn ok(endpoint: &str, args: &[&str]) -> String {
    let o = run(endpoint, args);
    assert!(o.status.success(), "{args:?}: {}{}", stdout(&o), stderr(&o));
    stdout(&o)
}

fn json(endpoint: &str, args: &[&str]) -> Value {
    serde_json::from_str(&ok(endpoint, args)).unwrap()
}

/// A local repository with 1 MiB chunks and three snapshots: an image,
/// the same image with 2 MiB rewritten (sharing most chunks), and another
/// image of 8 MiB of its own. Returns the backups' JSON reports.
fn three_snapshots(endpoint: &str, dir: &Path, repo: &Path) -> Vec<Value> {
    let repo = repo.to_str().unwrap();
    ok(endpoint, &["repo", "init", "--chunk-size", "1M", repo]);
    let a = dir.join("a.vhd");
    let b = dir.join("b.vhd");
    random_vhd(&a, 32 * MIB, 31, &[(0, 10 * MIB), (16 * MIB, 4 * MIB)]);
    random_vhd(&b, 16 * MIB, 32, &[(0, 8 * MIB)]);
    let backup = |img: &Path| -> Value {
        let args = ["backup", "-q", "--json", "--name", "vm1", "--repo", repo];
        let img = img.to_str().unwrap();
        json(endpoint, &[&args[..], &[img]].concat())
    };
    let first = backup(&a);
    rewrite_vhd(&a, 33, 2 * MIB, 2 * MIB);
    let second = backup(&a);
    let third = backup(&b);
    vec![first, second, third]
}

/// A bucket repository on the local one's grid, with small packs.
fn init_bucket(endpoint: &str, url: &str) {
    let args = ["repo", "init", "--chunk-size", "1M", "--pack-size", "4M"];
    ok(endpoint, &[&args[..], &[url]].concat());
}

/// Restores each snapshot from `repo` and checks its digest is the
/// backup's.
fn restores(endpoint: &str, repo: &str, snaps: &[Value], dir: &Path) {
    for snap in snaps {
        let id = snap["snapshot"].as_str().unwrap();
        let to = dir.join(format!("r-{id}.vhd"));
        let to_s = to.to_str().unwrap();
        let o = ok(
            endpoint,
            &["restore", "--json", "--repo", repo, id, "--to", to_s],
        );
        let digest = snap["disks"][0]["digest"].as_str().unwrap();
        assert!(o.contains(digest), "{id} from {repo}: {o}");
        std::fs::remove_file(&to).unwrap();
    }
}

fn ids(snaps: &[Value]) -> Vec<String> {
    snaps
        .iter()
        .map(|s| s["snapshot"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn sync_copies_only_what_is_missing_resumes_after_a_kill_and_comes_back() {
    let test = "sync_copies_only_what_is_missing_resumes_after_a_kill_and_comes_back";
    let Some(s3) = S3Server::start(test) else {
        return;
    };
    // Every request waits 40 ms until the kill, so it lands mid-sync.
    let proxy = FaultProxy::start(
        ([127, 0, 0, 1], s3.port).into(),
        Faults {
            latency: Duration::from_millis(40),
            ..Faults::default()
        },
        3,
    )
    .unwrap();
    let ep = proxy.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    let local_s = local.to_str().unwrap();
    let snaps = three_snapshots(&ep, dir.path(), &local);
    let url = "s3://vsnap/offsite";
    init_bucket(&ep, url);

    // Killed once the first snapshot is committed in the bucket.
    let mut child = cmd(&ep)
        .args(["repo", "sync", "-q", local_s, url])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while s3.objects("offsite", "snapshots").is_empty() {
        assert!(Instant::now() < deadline, "sync committed nothing");
        assert!(child.try_wait().unwrap().is_none(), "sync ended early");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let committed = s3.objects("offsite", "snapshots").len();
    assert!(committed < 3, "the kill came after the whole sync");
    proxy.set_faults(Faults::default());

    // Run again: it goes on, skipping the snapshots and chunks the bucket
    // has, and the copy is exact.
    let r = json(&ep, &["repo", "sync", "-q", "--json", local_s, url]);
    assert_eq!(r["failed"], serde_json::json!([]), "{r}");
    assert_eq!(r["snapshots"], 3, "{r}");
    assert_eq!(r["present"], committed, "{r}");
    assert_eq!(r["copied"].as_array().unwrap().len(), 3 - committed, "{r}");
    // The second snapshot shares 12 of its 14 chunks with the first.
    assert!(r["chunks_present"].as_u64().unwrap() >= 12, "{r}");
    assert_eq!(s3.objects("offsite", "snapshots").len(), 3);
    for (id, file) in ids(&snaps).iter().zip(0..) {
        let ours = std::fs::read(local.join(format!("snapshots/{id}.json"))).unwrap();
        let theirs = std::fs::read(s3.object_file("offsite", &format!("snapshots/{id}.json")));
        assert_eq!(Some(&ours), theirs.as_ref().ok(), "manifest {file} differs");
    }

    // Nothing missing: nothing is written but the run's lease, which it
    // removes.
    let before = proxy.tally();
    let r = json(&ep, &["repo", "sync", "-q", "--json", local_s, url]);
    assert_eq!(r["present"], 3, "{r}");
    assert_eq!(r["chunks_copied"], 0, "{r}");
    let after = proxy.tally();
    assert_eq!(
        after.put,
        before.put + 1,
        "a sync with nothing to copy wrote"
    );
    assert_eq!(after.delete, before.delete + 1, "its lease was not removed");

    let v = json(&ep, &["verify", "-q", "--json", "--repo", url]);
    assert_eq!(v["problems"], serde_json::json!([]), "{v}");
    assert_eq!(v["snapshots"], 3);
    restores(&ep, url, &snaps, dir.path());

    // And back: the bucket into a new local repository, read back whole.
    let home = dir.path().join("home");
    let home_s = home.to_str().unwrap();
    ok(&ep, &["repo", "init", "--chunk-size", "1M", home_s]);
    let r = json(
        &ep,
        &["repo", "sync", "-q", "--json", "--verify", url, home_s],
    );
    assert_eq!(r["copied"].as_array().unwrap().len(), 3, "{r}");
    assert_eq!(r["verify"]["problems"], serde_json::json!([]), "{r}");
    assert_eq!(r["verify"]["snapshots"], 3, "{r}");
    restores(&ep, home_s, &snaps, dir.path());

    // A destination on another chunk grid is refused, with the way out.
    let other = dir.path().join("other");
    let other_s = other.to_str().unwrap();
    ok(&ep, &["repo", "init", "--chunk-size", "2M", other_s]);
    let o = run(&ep, &["repo", "sync", local_s, other_s]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("vsnap repo init --chunk-size 1048576"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn sync_never_carries_a_damaged_chunk_over() {
    let test = "sync_never_carries_a_damaged_chunk_over";
    let Some(s3) = S3Server::start(test) else {
        return;
    };
    let ep = s3.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    let local_s = local.to_str().unwrap();
    let snaps = three_snapshots(&ep, dir.path(), &local);
    let ids = ids(&snaps);

    // A byte flipped in a chunk only the third snapshot has.
    let index = Command::new("find")
        .arg(local.join("chunks"))
        .args(["-type", "f", "-newer"])
        .arg(local.join(format!("snapshots/{}.json", ids[1])))
        .output()
        .unwrap();
    let victim = stdout(&index).lines().next().unwrap().to_owned();
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&victim, bytes).unwrap();

    let url = "s3://vsnap/copy";
    init_bucket(&ep, url);
    let o = run(&ep, &["repo", "sync", "-q", "--json", local_s, url]);
    assert_eq!(o.status.code(), Some(3), "{}{}", stdout(&o), stderr(&o));
    let r: Value = serde_json::from_str(&stdout(&o)).unwrap();
    // (In the order of the manifests' times, which have whole seconds.)
    let mut copied: Vec<&str> = r["copied"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    copied.sort_unstable();
    let mut first_two = [ids[0].as_str(), ids[1].as_str()];
    first_two.sort_unstable();
    assert_eq!(copied, first_two, "{r}");
    assert_eq!(r["failed"][0]["snapshot"], ids[2].as_str(), "{r}");
    let why = r["failed"][0]["error"].as_str().unwrap();
    let chunk = Path::new(&victim).file_name().unwrap().to_str().unwrap();
    assert!(why.contains(chunk), "the error names the chunk: {why}");

    let v = json(&ep, &["verify", "-q", "--json", "--repo", url]);
    assert_eq!(v["problems"], serde_json::json!([]), "{v}");
    assert_eq!(v["snapshots"], 2);
    restores(&ep, url, &snaps[..2], dir.path());
}

#[test]
fn sync_into_a_bucket_that_lost_a_pack_stores_its_chunks_again() {
    let test = "sync_into_a_bucket_that_lost_a_pack_stores_its_chunks_again";
    let Some(s3) = S3Server::start(test) else {
        return;
    };
    let ep = s3.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    let local_s = local.to_str().unwrap();
    ok(&ep, &["repo", "init", "--chunk-size", "1M", local_s]);
    let img = dir.path().join("a.vhd");
    random_vhd(&img, 16 * MIB, 51, &[(0, 12 * MIB)]);
    let backup = || {
        let args = ["backup", "-q", "--json", "--name", "vm1", "--repo", local_s];
        json(&ep, &[&args[..], &[img.to_str().unwrap()]].concat())
    };
    let first = backup();
    let url = "s3://vsnap/lossy";
    init_bucket(&ep, url);
    let r = json(&ep, &["repo", "sync", "-q", "--json", local_s, url]);
    assert_eq!(r["copied"].as_array().unwrap().len(), 1, "{r}");
    // A pack is lost from the bucket; the next snapshot of the same disk
    // shares every chunk with the first.
    let packs = s3.keys("lossy", "packs");
    assert!(packs.len() >= 3, "{packs:?}");
    s3.remove("lossy", &packs[0]);
    let second = backup();
    assert_eq!(second["new_bytes"], 0, "{second}");
    // The sync does not take the lost pack's chunks as there: it copies
    // them again, says so, and the new snapshot restores whole.
    let o = run(&ep, &["repo", "sync", "-q", "--json", local_s, url]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(r["copied"].as_array().unwrap().len(), 1, "{r}");
    assert!(r["chunks_copied"].as_u64().unwrap() >= 1, "{r}");
    let met = r["damage_met"].as_array().unwrap();
    assert_eq!(met.len(), 1, "{r}");
    let lost = format!("pack s3://vsnap/lossy/{}: the pack index", packs[0]);
    assert!(met[0].as_str().unwrap().starts_with(&lost), "{r}");
    assert!(
        stderr(&o).contains("vsnap: warning: 1 object(s) of the repository could not be used"),
        "the loss is named: {}",
        stderr(&o)
    );
    restores(&ep, url, &[first, second], dir.path());
}
