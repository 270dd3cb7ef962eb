//! Calendar events, as systemd timers and Proxmox Backup Server write job
//! schedules: `daily`, `Mon..Fri 02:00`, `*-*-* 00/4:00`,
//! `Sat *-*-1..7 03:00`. No crate parses the grammar as systemd does, so
//! it is ours, and the tests hold it to `systemd-analyze calendar`.
//!
//! The next elapse follows systemd: the search runs on the local clock
//! (or the event's own zone) from one second after the base; a local time
//! that does not exist (spring forward) is skipped, and one that exists
//! twice (fall back) elapses at its first instance after the base, so a
//! daily job runs once, and the search never steps back into the hour it
//! has passed.

mod parse;

use chrono::{
    DateTime, Datelike, Duration, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Timelike, Utc,
};

use crate::error::Result;

/// Which values of one field match.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Set {
    lo: u32,
    bits: Vec<bool>,
}

impl Set {
    fn none(lo: u32, hi: u32) -> Set {
        Set {
            lo,
            bits: vec![false; (hi - lo + 1) as usize],
        }
    }

    fn all(lo: u32, hi: u32) -> Set {
        Set {
            lo,
            bits: vec![true; (hi - lo + 1) as usize],
        }
    }

    fn add(&mut self, v: u32) {
        if let Some(b) = v
            .checked_sub(self.lo)
            .and_then(|i| self.bits.get_mut(i as usize))
        {
            *b = true;
        }
    }

    fn has(&self, v: u32) -> bool {
        v.checked_sub(self.lo)
            .and_then(|i| self.bits.get(i as usize))
            .copied()
            .unwrap_or(false)
    }

    /// The first value at or above `v`.
    fn first_from(&self, v: u32) -> Option<u32> {
        let start = v.saturating_sub(self.lo) as usize;
        let lo = self.lo;
        self.bits
            .iter()
            .enumerate()
            .skip(start)
            .find(|(_, b)| **b)
            .map(|(i, _)| lo + i as u32)
    }

    fn is_empty(&self) -> bool {
        !self.bits.iter().any(|b| *b)
    }
}

/// The clock an event reads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Zone {
    /// The host's local time (`TZ`, or /etc/localtime).
    Local,
    Utc,
    Named(chrono_tz::Tz),
}

/// A parsed calendar event.
#[derive(Debug, Clone, PartialEq)]
pub struct Calendar {
    /// Bit `i` for weekday `i`, Monday first.
    weekdays: u8,
    years: Set,
    months: Set,
    days: Set,
    /// Days counted from the month's end, `1` the last.
    from_end: Set,
    hours: Set,
    minutes: Set,
    seconds: Set,
    zone: Zone,
    /// `@EPOCH`: one instant.
    epoch: Option<DateTime<Utc>>,
}

impl std::str::FromStr for Calendar {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Calendar> {
        parse::parse(s)
    }
}

/// How far ahead the search looks before it gives up: systemd's last
/// year.
const LAST_YEAR: i32 = parse::YEARS.1 as i32;

impl Calendar {
    fn at_epoch(secs: i64) -> Option<Calendar> {
        let mut c: Calendar = parse::parse("*-*-* 00:00:00").ok()?;
        c.epoch = Some(DateTime::from_timestamp(secs, 0)?);
        Some(c)
    }

    /// The first elapse strictly after `base`, reading local time as
    /// `local` where the event names no zone of its own; `None` when
    /// there is none before the year 2200.
    pub fn next_after(&self, base: DateTime<Utc>, local: Zone) -> Option<DateTime<Utc>> {
        if let Some(at) = self.epoch {
            return (at > base).then_some(at);
        }
        let zone = match self.zone {
            Zone::Local => local,
            z => z,
        };
        match zone {
            Zone::Local => self.search(base, &chrono::Local),
            Zone::Utc => self.search(base, &Utc),
            Zone::Named(tz) => self.search(base, &tz),
        }
    }

    /// The next `n` elapses after `base` (fewer when the event ends).
    pub fn elapses(&self, base: DateTime<Utc>, local: Zone, n: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(n);
        let mut at = base;
        while out.len() < n {
            let Some(next) = self.next_after(at, local) else {
                break;
            };
            out.push(next);
            at = next;
        }
        out
    }

    fn search<Z: TimeZone>(&self, base: DateTime<Utc>, zone: &Z) -> Option<DateTime<Utc>> {
        let local = base.with_timezone(zone).naive_local();
        let mut from = local.with_nanosecond(0)? + Duration::seconds(1);
        loop {
            let candidate = self.next_local(from)?;
            // Fall back: a local time that happens twice elapses at its
            // first instance after the base. Spring forward: one that never
            // happens is skipped.
            let instances = match zone.from_local_datetime(&candidate) {
                chrono::LocalResult::Single(t) => vec![t],
                chrono::LocalResult::Ambiguous(a, b) => vec![a, b],
                chrono::LocalResult::None => Vec::new(),
            };
            if let Some(t) = instances
                .into_iter()
                .map(|t| t.with_timezone(&Utc))
                .find(|t| *t > base)
            {
                return Some(t);
            }
            from = candidate + Duration::seconds(1);
        }
    }

    fn day_matches(&self, d: NaiveDate) -> bool {
        let weekday = d.weekday().num_days_from_monday();
        if self.weekdays & (1 << weekday) == 0 {
            return false;
        }
        if self.days.has(d.day()) {
            return true;
        }
        let last = last_day(d.year(), d.month());
        self.from_end.has(last + 1 - d.day())
    }

    /// The first local date and time at or after `from` that matches
    /// every field.
    fn next_local(&self, from: NaiveDateTime) -> Option<NaiveDateTime> {
        if self.hours.is_empty() || self.minutes.is_empty() || self.seconds.is_empty() {
            return None;
        }
        let mut date = from.date();
        let mut after = Some(from.time());
        loop {
            let year = date.year();
            if year > LAST_YEAR {
                return None;
            }
            let y = u32::try_from(year).ok()?;
            if !self.years.has(y) {
                let next = self.years.first_from(y + 1)?;
                date = NaiveDate::from_ymd_opt(i32::try_from(next).ok()?, 1, 1)?;
                after = None;
                continue;
            }
            if !self.months.has(date.month()) {
                date = match self.months.first_from(date.month() + 1) {
                    Some(m) => NaiveDate::from_ymd_opt(year, m, 1)?,
                    None => NaiveDate::from_ymd_opt(year + 1, 1, 1)?,
                };
                after = None;
                continue;
            }
            if self.day_matches(date) {
                if let Some(t) = self.first_time(after.unwrap_or(NaiveTime::MIN)) {
                    return Some(date.and_time(t));
                }
            }
            date = date.succ_opt()?;
            after = None;
        }
    }

    /// The first time of day at or after `t` that matches.
    fn first_time(&self, t: NaiveTime) -> Option<NaiveTime> {
        let mut h = self.hours.first_from(t.hour())?;
        loop {
            let same_hour = h == t.hour();
            let mut minute = self
                .minutes
                .first_from(if same_hour { t.minute() } else { 0 });
            while let Some(m) = minute {
                let same_minute = same_hour && m == t.minute();
                let from = if same_minute { t.second() } else { 0 };
                if let Some(s) = self.seconds.first_from(from) {
                    return NaiveTime::from_hms_opt(h, m, s);
                }
                minute = self.minutes.first_from(m + 1);
            }
            h = self.hours.first_from(h + 1)?;
        }
    }
}

fn last_day(year: i32, month: u32) -> u32 {
    let next = if month == 12 {
        NaiveDate::from_ymd_opt(year + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(year, month + 1, 1)
    };
    next.and_then(|n| n.pred_opt()).map_or(28, |d| d.day())
}

#[cfg(test)]
mod tests;
