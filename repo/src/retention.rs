//! Retention: which snapshots a `forget` policy keeps, with restic's
//! semantics so that operators who know restic's `forget` know vsnap's.
//!
//! Snapshots are taken newest first. `last N` keeps the newest N. Each
//! calendar rule (`hourly`, `daily`, `weekly`, `monthly`, `yearly`)
//! keeps the newest snapshot of each of the last N periods that have one,
//! periods counted in the given time zone, weeks as ISO weeks. `within`
//! keeps every snapshot taken within that span before the newest one (not
//! before now). A snapshot kept by any rule stays, with every rule that
//! keeps it named. A policy with no rule keeps everything.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Timelike, Utc};

use crate::{ErrorKind, Result};

/// How many periods each rule keeps; 0 leaves the rule out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeepPolicy {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
    pub within: Option<Within>,
}

/// `--keep-within`: years, months, days and hours, as restic writes it
/// (`1y2m3d4h`, any part left out).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Within {
    pub years: i32,
    pub months: i32,
    pub days: i32,
    pub hours: i32,
}

impl std::str::FromStr for Within {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Within> {
        let bad = |why: &str| -> crate::Error {
            ErrorKind::InvalidArgument(format!(
                "keep-within {s:?}: {why}; write it as restic does, e.g. 2y5m7d3h"
            ))
            .into()
        };
        let mut w = Within::default();
        let mut digits = String::new();
        for c in s.trim().chars() {
            if c.is_ascii_digit() {
                digits.push(c);
                continue;
            }
            let n: i32 = digits.parse().map_err(|_| bad("a unit without a number"))?;
            digits.clear();
            match c {
                'y' => w.years = n,
                'm' => w.months = n,
                'd' => w.days = n,
                'h' => w.hours = n,
                _ => return Err(bad("units are y, m, d and h")),
            }
        }
        if !digits.is_empty() {
            return Err(bad("a number without a unit"));
        }
        if w == Within::default() {
            return Err(bad("it keeps nothing"));
        }
        Ok(w)
    }
}

impl KeepPolicy {
    /// Whether no rule is set: then every snapshot is kept.
    pub fn is_empty(&self) -> bool {
        self.last == 0
            && self.hourly == 0
            && self.daily == 0
            && self.weekly == 0
            && self.monthly == 0
            && self.yearly == 0
            && self.within.is_none()
    }
}

/// One snapshot's fate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Its place in the list given to [`apply`].
    pub index: usize,
    pub keep: bool,
    /// The rules that keep it (`last snapshot`, `daily snapshot`, …).
    pub reasons: Vec<String>,
}

/// `t` moved back by `w` as Go's `AddDate(-y, -m, -d)` then `Add(-h)` do
/// it in `tz` (so "a month before March 31" is March 3, as in restic).
fn back<Tz: TimeZone>(t: &DateTime<Tz>, w: &Within, tz: &Tz) -> Option<DateTime<Utc>> {
    let months = t.year() * 12 + t.month0() as i32 - w.years * 12 - w.months;
    let (y, m0) = (months.div_euclid(12), months.rem_euclid(12));
    let first = NaiveDate::from_ymd_opt(y, m0 as u32 + 1, 1)?;
    let date = first + Duration::days(i64::from(t.day()) - 1 - i64::from(w.days));
    let naive = date.and_hms_opt(t.hour(), t.minute(), t.second())?;
    let local = tz.from_local_datetime(&naive).earliest()?;
    Some(local.with_timezone(&Utc) - Duration::hours(i64::from(w.hours)))
}

/// Applies `policy` to one group's snapshots (their times), periods
/// counted in `tz`. Decisions come back in the order given.
pub fn apply<Tz: TimeZone>(times: &[DateTime<Utc>], policy: &KeepPolicy, tz: &Tz) -> Vec<Decision> {
    let mut order: Vec<usize> = (0..times.len()).collect();
    // Newest first; equal times keep their given order.
    order.sort_by(|&a, &b| times[b].cmp(&times[a]));
    let mut out: Vec<Decision> = (0..times.len())
        .map(|index| Decision {
            index,
            keep: policy.is_empty(),
            reasons: Vec::new(),
        })
        .collect();
    if policy.is_empty() {
        return out;
    }
    let bucket = |rule: usize, t: &DateTime<Tz>, nr: usize| -> i64 {
        let (y, m, d, h) = (
            i64::from(t.year()),
            i64::from(t.month()),
            i64::from(t.day()),
            i64::from(t.hour()),
        );
        match rule {
            0 => nr as i64,
            1 => y * 1_000_000 + m * 10_000 + d * 100 + h,
            2 => y * 10_000 + m * 100 + d,
            3 => {
                let w = t.iso_week();
                i64::from(w.year()) * 100 + i64::from(w.week())
            }
            4 => y * 100 + m,
            _ => y,
        }
    };
    let mut counts = [
        policy.last,
        policy.hourly,
        policy.daily,
        policy.weekly,
        policy.monthly,
        policy.yearly,
    ];
    let names = [
        "last snapshot",
        "hourly snapshot",
        "daily snapshot",
        "weekly snapshot",
        "monthly snapshot",
        "yearly snapshot",
    ];
    let mut last = [None::<i64>; 6];
    let newest = order.first().map(|&i| times[i].with_timezone(tz));
    let within_from = match (&policy.within, &newest) {
        (Some(w), Some(n)) => back(n, w, tz),
        _ => None,
    };
    for (nr, &i) in order.iter().enumerate() {
        let t = times[i].with_timezone(tz);
        let d = &mut out[i];
        if let (Some(from), Some(w)) = (within_from, &policy.within) {
            if times[i] > from {
                d.keep = true;
                d.reasons.push(format!(
                    "within {}y{}m{}d{}h",
                    w.years, w.months, w.days, w.hours
                ));
            }
        }
        for rule in 0..6 {
            if counts[rule] == 0 {
                continue;
            }
            let b = bucket(rule, &t, nr);
            if last[rule] != Some(b) {
                last[rule] = Some(b);
                counts[rule] -= 1;
                d.keep = true;
                d.reasons.push(names[rule].to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn rules_keep_the_newest_of_each_period_and_name_themselves() {
        let times = [
            t("2024-01-01T10:00:00Z"),
            t("2024-01-01T11:00:00Z"),
            t("2024-01-02T09:00:00Z"),
            t("2024-01-03T09:00:00Z"),
        ];
        let p = KeepPolicy {
            last: 1,
            daily: 2,
            ..KeepPolicy::default()
        };
        let d = apply(&times, &p, &Utc);
        let kept: Vec<bool> = d.iter().map(|d| d.keep).collect();
        assert_eq!(kept, [false, false, true, true]);
        assert_eq!(d[3].reasons, ["last snapshot", "daily snapshot"]);
        assert_eq!(d[2].reasons, ["daily snapshot"]);
        assert!(apply(&times, &KeepPolicy::default(), &Utc)
            .iter()
            .all(|d| d.keep));
    }

    #[test]
    fn within_counts_back_from_the_newest_like_go() {
        let w: Within = "1m".parse().unwrap();
        let newest = t("2024-03-31T12:00:00Z");
        // Go: March 31 less a month is "February 31", that is March 2 (leap year).
        assert_eq!(back(&newest, &w, &Utc), Some(t("2024-03-02T12:00:00Z")));
        assert!("3x".parse::<Within>().is_err());
        assert!("5".parse::<Within>().is_err());
        assert_eq!(
            "2y5m7d3h".parse::<Within>().unwrap(),
            Within {
                years: 2,
                months: 5,
                days: 7,
                hours: 3
            }
        );
    }
}

/// One snapshot under a policy, for `vsnap forget --keep-*`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Planned {
    pub id: String,
    pub vm: String,
    pub time: String,
    pub keep: bool,
    pub reasons: Vec<String>,
}

/// Applies `policy` to `repo` (the VMs in `vms`, or all): forgets what it
/// does not keep, unless `dry_run`, and returns the whole plan, kept and
/// removed. The one way both `vsnap forget --keep-*` and the service's
/// retention run it.
pub fn forget_by_policy(
    repo: &super::Repository,
    policy: &KeepPolicy,
    vms: &[String],
    dry_run: bool,
) -> Result<Vec<Planned>> {
    let planned = plan(repo, policy, vms)?;
    let remove: Vec<String> = planned
        .iter()
        .filter(|p| !p.keep)
        .map(|p| p.id.clone())
        .collect();
    if !dry_run && !remove.is_empty() {
        super::forget(repo, &remove)?;
    }
    Ok(planned)
}

/// What `policy` keeps and removes in `repo`, VM by VM (only the VMs in
/// `vms`, when it names any), periods in this host's local time. A
/// snapshot whose manifest cannot be read is in no plan: forget never
/// removes what it cannot see (verify reports it).
pub fn plan(repo: &super::Repository, policy: &KeepPolicy, vms: &[String]) -> Result<Vec<Planned>> {
    let mut groups: std::collections::BTreeMap<String, Vec<(super::Manifest, DateTime<Utc>)>> =
        Default::default();
    for listed in repo.list()? {
        let Ok(m) = listed.manifest else { continue };
        if !vms.is_empty() && !vms.contains(&m.vm) {
            continue;
        }
        let time = DateTime::parse_from_rfc3339(&m.time).map_err(|_| {
            crate::Error::from(ErrorKind::BadField {
                field: "time".into(),
                value: m.time.clone().into(),
                rule: "a snapshot's time is RFC 3339",
            })
            .in_file(&listed.path)
        })?;
        groups
            .entry(m.vm.clone())
            .or_default()
            .push((m, time.with_timezone(&Utc)));
    }
    let mut out = Vec::new();
    for snaps in groups.into_values() {
        let times: Vec<DateTime<Utc>> = snaps.iter().map(|s| s.1).collect();
        let mut decided: Vec<(DateTime<Utc>, Planned)> = apply(&times, policy, &chrono::Local)
            .into_iter()
            .map(|d| {
                let (m, t) = &snaps[d.index];
                let p = Planned {
                    id: m.id.clone(),
                    vm: m.vm.clone(),
                    time: m.time.clone(),
                    keep: d.keep,
                    reasons: d.reasons,
                };
                (*t, p)
            })
            .collect();
        decided.sort_by_key(|d| std::cmp::Reverse(d.0));
        out.extend(decided.into_iter().map(|(_, p)| p));
    }
    Ok(out)
}
