#![allow(clippy::unwrap_used)]

use super::*;

fn berlin() -> Zone {
    Zone::Named(chrono_tz::Europe::Berlin)
}

fn utc(s: &str) -> DateTime<Utc> {
    NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S")
        .unwrap()
        .and_utc()
}

/// The next `n` elapses after `base` (UTC), in Berlin time.
fn next(expr: &str, base: &str, n: usize) -> Vec<String> {
    let cal: Calendar = expr.parse().unwrap();
    cal.elapses(utc(base), berlin(), n)
        .iter()
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .collect()
}

// Expected values are systemd-analyze's (systemd 252), TZ=Europe/Berlin.

#[test]
fn the_issue_examples_elapse_as_systemd_says() {
    assert_eq!(
        next("Sat *-*-1..7 03:00", "2026-12-02 04:00:00", 3),
        [
            "2026-12-05 02:00:00",
            "2027-01-02 02:00:00",
            "2027-02-06 02:00:00"
        ]
    );
    assert_eq!(
        next("*-*-* 00/4:00", "2026-12-02 05:20:00", 2),
        ["2026-12-02 07:00:00", "2026-12-02 11:00:00"]
    );
}

#[test]
fn days_from_the_month_end_count_the_last_as_one() {
    assert_eq!(
        next("*-02~03", "2027-01-10 11:00:00", 2),
        ["2027-02-25 23:00:00", "2028-02-26 23:00:00"]
    );
    // The last Monday in May.
    assert_eq!(
        next("Mon *-05~07/1", "2027-01-10 11:00:00", 2),
        ["2027-05-30 22:00:00", "2028-05-28 22:00:00"]
    );
}

#[test]
fn a_missing_local_time_is_skipped_and_a_doubled_one_fires_once() {
    // 2026-03-29 02:30 does not exist in Berlin.
    assert_eq!(
        next("*-*-* 02:30", "2026-03-28 23:00:00", 1),
        ["2026-03-30 00:30:00"]
    );
    // 2026-10-25 02:00–03:00 happens twice; hourly fires at the first.
    assert_eq!(
        next("hourly", "2026-10-24 22:30:00", 4),
        [
            "2026-10-24 23:00:00",
            "2026-10-25 00:00:00",
            "2026-10-25 02:00:00",
            "2026-10-25 03:00:00"
        ]
    );
}

#[test]
fn zones_shorthands_and_epochs() {
    assert_eq!(
        next("00:00 UTC", "2027-01-10 11:00:00", 1),
        ["2027-01-11 00:00:00"]
    );
    assert_eq!(
        next("*-*-1/5 10:00 Europe/London", "2027-01-10 11:00:00", 2),
        ["2027-01-11 10:00:00", "2027-01-16 10:00:00"]
    );
    assert_eq!(
        next("quarterly", "2027-01-10 11:00:00", 1),
        ["2027-03-31 22:00:00"]
    );
    let once: Calendar = "@1700000000".parse().unwrap();
    assert_eq!(
        once.next_after(utc("2023-01-01 00:00:00"), berlin()),
        Some(utc("2023-11-14 22:13:20"))
    );
    assert_eq!(once.next_after(utc("2024-01-01 00:00:00"), berlin()), None);
}

#[test]
fn what_does_not_parse_says_why() {
    for (expr, why) in [
        ("", "empty"),
        ("today", "not a weekday"),
        ("*-*-* 24:00", "hour 24 is out of range"),
        ("*-13-01", "month 13 is out of range"),
        ("*:*/15", "not a minute"),
        (
            "*-*-* 10:00:00.5",
            "fractions of a second are not supported",
        ),
        ("*-*-* 00:00 Europe/Nowhere", "unexpected"),
        ("*-*-5..1", "runs backwards"),
        ("Mon,Blursday 10:00", "not a weekday"),
    ] {
        let e = expr.parse::<Calendar>().unwrap_err().to_string();
        assert!(e.contains(why), "{expr:?}: {e}");
        assert!(e.starts_with(&format!("calendar event {expr:?}")), "{e}");
    }
}

#[test]
fn a_date_that_never_comes_has_no_elapse() {
    let feb30: Calendar = "*-02-30".parse().unwrap();
    assert_eq!(feb30.next_after(utc("2027-01-01 00:00:00"), berlin()), None);
    let past: Calendar = "2020-01-01".parse().unwrap();
    assert_eq!(past.next_after(utc("2027-01-01 00:00:00"), berlin()), None);
}
