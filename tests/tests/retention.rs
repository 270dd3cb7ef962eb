//! Retention against restic itself: 50 generated timelines, each backed
//! up as restic snapshots with `restic backup --time` (a host per
//! timeline, in one repository), then the same policy through `restic
//! forget --dry-run --json` and through vsnap's `retention::apply`. The
//! kept sets must be identical. Times are local to Europe/Berlin (restic
//! runs with that TZ), so periods cross DST changes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use chrono::{DateTime, Duration, TimeZone, Utc};
use chrono_tz::Europe::Berlin;
use serde_json::Value;
use vsnap_e2e::{skip, Lack};
use vsnap_lab::Rng;
use vsnap_repo::retention::{apply, KeepPolicy};

const TIMELINES: usize = 50;
const POLICIES: usize = 10;

fn restic(repo: &Path, args: &[&str]) -> std::process::Output {
    Command::new("restic")
        .arg("--repo")
        .arg(repo)
        .args(["--no-cache", "-q"])
        .args(args)
        .env("RESTIC_PASSWORD", "vsnap-test")
        .env("TZ", "Europe/Berlin")
        .output()
        .unwrap()
}

/// A timeline: 6 to 8 times going back from a start, with steps from
/// minutes to months, none on an ambiguous or missing local time.
fn timeline(rng: &mut Rng) -> Vec<DateTime<Utc>> {
    let mut t = Utc.with_ymd_and_hms(2023, 10, 30, 12, 0, 0).unwrap()
        - Duration::minutes(rng.below(60 * 24 * 400) as i64);
    let mut out = Vec::new();
    while out.len() < 6 + rng.below(3) as usize {
        let step = match rng.below(5) {
            0 => Duration::minutes(1 + rng.below(50) as i64),
            1 => Duration::hours(1 + rng.below(20) as i64),
            2 => Duration::days(1 + rng.below(6) as i64),
            3 => Duration::days(7 + rng.below(30) as i64),
            _ => Duration::days(60 + rng.below(300) as i64),
        };
        t -= step;
        let local = t.with_timezone(&Berlin).naive_local();
        if Berlin.from_local_datetime(&local).single().is_some() {
            out.push(t);
        }
    }
    out
}

fn policy(i: usize) -> (KeepPolicy, Vec<String>) {
    let mut p = KeepPolicy::default();
    let mut flags = Vec::new();
    let mut set = |flag: &str, n: u32, field: &mut u32| {
        if n > 0 {
            *field = n;
            flags.push(format!("--keep-{flag}"));
            flags.push(n.to_string());
        }
    };
    let n = |k: usize| ((i * 7 + k * 3) % 4) as u32;
    set("last", n(1), &mut p.last);
    set("hourly", n(2), &mut p.hourly);
    set("daily", n(3), &mut p.daily);
    set("weekly", n(4), &mut p.weekly);
    set("monthly", n(5), &mut p.monthly);
    set("yearly", n(6) % 3, &mut p.yearly);
    if i.is_multiple_of(3) {
        let w = ["5d", "1m", "2d12h", "1y"][i % 4];
        p.within = Some(w.parse().unwrap());
        flags.push("--keep-within".into());
        flags.push(w.into());
    }
    if flags.is_empty() {
        p.last = 2;
        flags.extend(["--keep-last".into(), "2".into()]);
    }
    (p, flags)
}

#[test]
fn forget_keeps_exactly_what_restic_keeps_on_50_timelines() {
    let test = "forget_keeps_exactly_what_restic_keeps_on_50_timelines";
    if Command::new("restic").arg("version").output().is_err() {
        skip(
            test,
            "restic is not installed (Debian package restic; scripts/test.sh installs it)",
            Lack::Host,
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("restic");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("f"), b"x").unwrap();
    let o = restic(&repo, &["init"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The same timelines every run.
    let mut rng = Rng::new(0x5eed_1234_abcd_0001);
    let lines: Vec<Vec<DateTime<Utc>>> = (0..TIMELINES).map(|_| timeline(&mut rng)).collect();
    // Two backups at a time (restic takes a shared lock for them).
    let jobs: Vec<(usize, DateTime<Utc>)> = lines
        .iter()
        .enumerate()
        .flat_map(|(i, ts)| ts.iter().map(move |t| (i, *t)))
        .collect();
    std::thread::scope(|s| {
        for part in jobs.chunks(jobs.len().div_ceil(2)) {
            let (repo, data) = (&repo, &data);
            s.spawn(move || {
                for (i, t) in part {
                    let local = t
                        .with_timezone(&Berlin)
                        .format("%Y-%m-%d %H:%M:%S")
                        .to_string();
                    let host = format!("t{i}");
                    let o = restic(
                        repo,
                        &[
                            "backup",
                            "--host",
                            &host,
                            "--time",
                            &local,
                            data.to_str().unwrap(),
                        ],
                    );
                    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                }
            });
        }
    });
    let (mut compared, mut removed, mut total) = (0, 0, 0);
    for k in 0..POLICIES {
        let (p, flags) = policy(k);
        let hosts: Vec<usize> = (0..TIMELINES).filter(|i| i % POLICIES == k).collect();
        let mut args = vec!["forget", "--dry-run", "--json", "--group-by", "host"];
        let host_args: Vec<String> = hosts.iter().map(|i| format!("t{i}")).collect();
        for h in &host_args {
            args.push("--host");
            args.push(h);
        }
        args.extend(flags.iter().map(String::as_str));
        let o = restic(&repo, &args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let groups: Value = serde_json::from_slice(&o.stdout).unwrap();
        let mut kept: BTreeMap<String, BTreeSet<DateTime<Utc>>> = BTreeMap::new();
        for g in groups.as_array().unwrap() {
            let host = g["host"].as_str().unwrap().to_string();
            let set = kept.entry(host).or_default();
            for s in g["keep"].as_array().unwrap() {
                let t = DateTime::parse_from_rfc3339(s["time"].as_str().unwrap()).unwrap();
                set.insert(t.with_timezone(&Utc));
            }
        }
        for &i in &hosts {
            let ours: BTreeSet<DateTime<Utc>> = apply(&lines[i], &p, &Berlin)
                .iter()
                .filter(|d| d.keep)
                .map(|d| lines[i][d.index])
                .collect();
            let theirs = kept.remove(&format!("t{i}")).unwrap_or_default();
            total += lines[i].len();
            removed += lines[i].len() - theirs.len();
            assert_eq!(
                ours, theirs,
                "timeline {i}, policy {flags:?}, times {:?}",
                lines[i]
            );
            compared += 1;
        }
    }
    assert_eq!(compared, TIMELINES);
    // The policies both keep and remove: the comparison is not trivial.
    eprintln!("{removed} of {total} snapshots removed by both");
    assert!(
        removed > total / 5 && removed < total * 4 / 5,
        "{removed} of {total}"
    );
}
