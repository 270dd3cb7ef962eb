//! vsnap's calendar events against systemd's own: for every expression
//! (over a hundred, the shorthands, zones, days from the month's end, and
//! every base around a DST change in three zones), the next elapses that
//! `systemd-analyze calendar --base-time=@T --iterations=N` prints must be
//! vsnap's, to the second; and what systemd refuses, vsnap refuses.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use chrono::{DateTime, NaiveDateTime, Utc};
use vsnap_e2e::{skip, Lack};
use vsnap_service::calendar::{Calendar, Zone};

const ITERATIONS: usize = 8;

/// The expressions: a cross of weekdays, dates and times, thinned, and
/// the forms the manual names.
fn expressions() -> Vec<String> {
    let weekdays = ["", "Mon", "Mon..Fri", "Sat,Sun", "Fri", "Tue,Thu", "Sun"];
    let dates = [
        "",
        "*-*-*",
        "*-*-1..7",
        "*-*-01",
        "*-02-29",
        "*-*~01",
        "*-1/3-15",
        "2027-*-*",
        "*-12-24..26",
        "*-*-28..31",
    ];
    let times = [
        "",
        "02:30",
        "00/4:00",
        "*:0/15",
        "03:00:30",
        "01,02,03:00",
        "*:00:00",
        "02:*:00",
        "23:59:59",
    ];
    let mut out = Vec::new();
    let mut n = 0;
    for w in weekdays {
        for d in dates {
            for t in times {
                n += 1;
                let parts: Vec<&str> = [w, d, t].into_iter().filter(|p| !p.is_empty()).collect();
                if parts.is_empty() || n % 5 != 0 {
                    continue;
                }
                out.push(parts.join(" "));
            }
        }
    }
    for e in [
        "minutely",
        "hourly",
        "daily",
        "weekly",
        "monthly",
        "yearly",
        "annually",
        "quarterly",
        "semiannually",
        "daily UTC",
        "Mon..Fri 02:00",
        "*-*-* 00/4:00",
        "Sat *-*-1..7 03:00",
        "*-02~03",
        "Mon *-05~07/1",
        "*-*~1,3",
        "*-*~01..03",
        "*-*~07/3 12:00",
        "Mon-Fri 10:00",
        "mon..fri 10:00",
        "MONDAY 10:00",
        "0/5:00",
        "*-*-* 8..18/2:00",
        "*-*-* 8..18:00/30",
        "2027..2029-02-29",
        "2027,2030-01-01",
        "*-*-31",
        "27-06-01 12:00",
        "Wed..Sat,Tue 27-10-15 1:2:3",
        "*-1/2-1",
        "*:*:0/7",
        "*:*:*",
        "12,14,13,12:20,10,30",
        "1..3:00",
        "*-*-* 3:4:5",
        "Fri *-*-13",
        "*-*-* *:*",
        "*-01-01",
        "*-*-1/5 10:00 Europe/London",
        "*-*-* 02:30 America/New_York",
        "hourly Australia/Lord_Howe",
        "*-*-* 02:00 UTC",
        "2026-10-25 02:30",
        "2026-03-29 02:30",
        "@1800000000",
        "2020-01-01",
        "*-02-30",
        // What both refuse.
        "today",
        "*-*-* 24:00",
        "*-*-* 23:60",
        "*-13-01",
        "*:*/15",
        "00",
        "*-*-~1",
        "*-*-* 00:00 Europe/Nowhere",
        "*-*-* 10:00 +02:00",
        "Mon..Wed,Fri 2028-05-01..2028-05-31",
        "*-*~03..01",
        "Fri..Mon 06:00",
    ] {
        out.push(e.to_string());
    }
    out
}

/// Bases: before and inside DST changes, and an ordinary day.
fn bases() -> Vec<(&'static str, &'static str)> {
    vec![
        ("Europe/Berlin", "2026-03-28 22:30:00"),
        ("Europe/Berlin", "2026-10-24 22:30:00"),
        ("Europe/Berlin", "2026-10-25 00:10:00"),
        ("Europe/Berlin", "2026-10-25 01:10:00"),
        ("Europe/Berlin", "2027-01-10 12:00:00"),
        ("Europe/Berlin", "2026-01-10 12:00:00"),
        ("America/New_York", "2026-03-08 06:30:00"),
        ("America/New_York", "2026-11-01 05:10:00"),
        ("Australia/Lord_Howe", "2027-04-03 14:20:00"),
    ]
}

fn utc(s: &str) -> DateTime<Utc> {
    NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S")
        .unwrap()
        .and_utc()
}

/// systemd's elapses (UTC, to the second), or `None` when it refuses.
fn systemd(expr: &str, tz: &str, base: DateTime<Utc>) -> Option<Vec<String>> {
    let o = Command::new("systemd-analyze")
        .env("TZ", tz)
        .arg("calendar")
        .arg(format!("--base-time=@{}", base.timestamp()))
        .arg(format!("--iterations={ITERATIONS}"))
        .arg("--")
        .arg(expr)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    if !o.status.success() {
        return None;
    }
    Some(
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("(in UTC): "))
            .map(|l| {
                // "Sat 2026-12-05 02:00:00 UTC"
                let mut w = l.split_whitespace().skip(1);
                format!("{} {}", w.next().unwrap(), w.next().unwrap())
            })
            .collect(),
    )
}

fn vsnap(expr: &str, tz: &str, base: DateTime<Utc>) -> Option<Vec<String>> {
    let cal: Calendar = expr.parse().ok()?;
    let zone = Zone::Named(tz.parse().unwrap());
    Some(
        cal.elapses(base, zone, ITERATIONS)
            .iter()
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .collect(),
    )
}

#[test]
fn next_elapses_agree_with_systemd_analyze_across_dst_changes() {
    let test = "next_elapses_agree_with_systemd_analyze_across_dst_changes";
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        skip(
            test,
            "no systemd-analyze (Debian package systemd; the test command installs it)",
            Lack::Host,
        );
        return;
    }
    let exprs = expressions();
    assert!(exprs.len() >= 100, "{} expressions", exprs.len());
    let (mut compared, mut refused, mut elapses) = (0, 0, 0);
    let mut disagreements = Vec::new();
    for expr in &exprs {
        for (tz, base) in bases() {
            let base = utc(base);
            let theirs = systemd(expr, tz, base);
            let ours = vsnap(expr, tz, base);
            match (&theirs, &ours) {
                (None, None) => refused += 1,
                (Some(t), Some(o)) if t == o => {
                    compared += 1;
                    elapses += t.len();
                }
                _ => disagreements.push(format!(
                    "{expr:?} in {tz} after {base}: systemd {theirs:?}, vsnap {ours:?}"
                )),
            }
        }
    }
    eprintln!(
        "{} expressions × {} bases: {compared} agreed on {elapses} elapses, {refused} refused by both",
        exprs.len(),
        bases().len()
    );
    assert!(
        disagreements.is_empty(),
        "{} disagreements:\n{}",
        disagreements.len(),
        disagreements.join("\n")
    );
}
