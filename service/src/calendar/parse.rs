//! The calendar-event grammar of systemd.time(7), as systemd 252 reads
//! it: `[WEEKDAYS] [[YEAR-]MONTH-DAY] [HOUR:MINUTE[:SECOND]] [TIMEZONE]`,
//! the shorthands (`daily`, `weekly`, …), and `@EPOCH`. Each field is a
//! list of values, ranges (`A..B`) and repetitions (`A/N`, `A..B/N`), or
//! `*`; `MONTH~DAY` counts days from the month's end. A pure function of
//! the text.

use super::{Calendar, Set, Zone};
use crate::error::{ErrorKind, Result};

const WEEKDAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const WEEKDAY_NAMES: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

/// The earliest and latest year systemd accepts.
pub(super) const YEARS: (u32, u32) = (1970, 2199);

fn shorthand(word: &str) -> Option<&'static str> {
    Some(match word.to_ascii_lowercase().as_str() {
        "minutely" => "*-*-* *:*:00",
        "hourly" => "*-*-* *:00:00",
        "daily" => "*-*-* 00:00:00",
        "monthly" => "*-*-01 00:00:00",
        "weekly" => "Mon *-*-* 00:00:00",
        "yearly" | "annually" => "*-01-01 00:00:00",
        "quarterly" => "*-01,04,07,10-01 00:00:00",
        "semiannually" => "*-01,07-01 00:00:00",
        _ => return None,
    })
}

pub(super) fn parse(text: &str) -> Result<Calendar> {
    let bad = |why: String| ErrorKind::Calendar {
        expr: text.to_string(),
        why,
    };
    let mut words: Vec<&str> = text.split_whitespace().collect();
    if words.is_empty() {
        return Err(bad("empty".into()).into());
    }
    if let Some(epoch) = words[0].strip_prefix('@') {
        if words.len() > 1 {
            return Err(bad("@EPOCH stands alone".into()).into());
        }
        let secs: i64 = epoch
            .parse()
            .map_err(|_| bad(format!("{epoch:?} is not a number of seconds")))?;
        return Calendar::at_epoch(secs).ok_or_else(|| bad("out of range".into()).into());
    }
    let mut zone = Zone::Local;
    if words.len() > 1 {
        if let Some(z) = words.last().and_then(|w| zone_named(w)) {
            zone = z;
            words.pop();
        }
    }
    // A shorthand, then maybe a zone: `daily UTC`.
    let expanded;
    if words.len() == 1 {
        if let Some(s) = shorthand(words[0]) {
            expanded = s;
            words = expanded.split_whitespace().collect();
        }
    }
    let mut cal = Calendar {
        weekdays: 0x7f,
        years: Set::all(YEARS.0, YEARS.1),
        months: Set::all(1, 12),
        days: Set::all(1, 31),
        from_end: Set::none(1, 31),
        hours: Set::none(0, 23),
        minutes: Set::none(0, 59),
        seconds: Set::none(0, 59),
        zone,
        epoch: None,
    };
    cal.hours.add(0);
    cal.minutes.add(0);
    cal.seconds.add(0);
    let mut rest = &words[..];
    if let Some(first) = rest.first() {
        if first.starts_with(|c: char| c.is_ascii_alphabetic()) {
            cal.weekdays = weekdays(first).map_err(bad)?;
            rest = &rest[1..];
        }
    }
    let (mut date, mut time) = (None, None);
    for w in rest {
        if w.contains(':') && time.is_none() {
            time = Some(*w);
        } else if (w.contains('-') || w.contains('~')) && date.is_none() && time.is_none() {
            date = Some(*w);
        } else {
            return Err(bad(format!("unexpected {w:?}")).into());
        }
    }
    if let Some(d) = date {
        parse_date(d, &mut cal).map_err(bad)?;
    }
    if let Some(t) = time {
        parse_time(t, &mut cal).map_err(bad)?;
    }
    if rest.is_empty() && cal.weekdays == 0x7f {
        return Err(bad("no weekday, date or time".into()).into());
    }
    Ok(cal)
}

fn zone_named(w: &str) -> Option<Zone> {
    if w.eq_ignore_ascii_case("utc") {
        return Some(Zone::Utc);
    }
    // A weekday or a shorthand is not a zone; an IANA name is.
    w.parse::<chrono_tz::Tz>().ok().map(Zone::Named)
}

fn weekday(w: &str) -> Option<u32> {
    let l = w.to_ascii_lowercase();
    WEEKDAYS
        .iter()
        .zip(WEEKDAY_NAMES)
        .position(|(a, b)| l == *a || l == b)
        .and_then(|i| u32::try_from(i).ok())
}

/// `Mon,Wed..Fri` (or `Mon-Fri`) as a bit mask, Monday the lowest bit.
fn weekdays(w: &str) -> Result<u8, String> {
    let mut mask = 0u8;
    for item in w.split(',') {
        let (a, b) = item
            .split_once("..")
            .or_else(|| item.split_once('-'))
            .unwrap_or((item, item));
        let (Some(a), Some(b)) = (weekday(a), weekday(b)) else {
            return Err(format!("{item:?} is not a weekday or a range of them"));
        };
        if a > b {
            return Err(format!(
                "{item:?}: a weekday range runs forward within the week (Mon..Sun)"
            ));
        }
        (a..=b).for_each(|d| mask |= 1 << d);
    }
    Ok(mask)
}

/// `[YEAR-]MONTH-DAY` or `[YEAR-]MONTH~DAY`.
fn parse_date(d: &str, cal: &mut Calendar) -> Result<(), String> {
    let (head, day, from_end) = match d.rsplit_once('~') {
        Some((h, day)) => (h, day, true),
        None => match d.rsplit_once('-') {
            Some((h, day)) => (h, day, false),
            None => return Err(format!("{d:?} is not a date")),
        },
    };
    let (year, month) = match head.split_once('-') {
        Some((y, m)) => (Some(y), m),
        None => (None, head),
    };
    if let Some(y) = year {
        cal.years = field(y, YEARS.0, YEARS.1, "year", true)?;
    }
    cal.months = field(month, 1, 12, "month", false)?;
    if from_end {
        cal.days = Set::none(1, 31);
        cal.from_end = field_from_end(day)?;
    } else {
        cal.days = field(day, 1, 31, "day", false)?;
    }
    Ok(())
}

/// `HOUR:MINUTE[:SECOND]`.
fn parse_time(t: &str, cal: &mut Calendar) -> Result<(), String> {
    let parts: Vec<&str> = t.split(':').collect();
    let (h, m, s) = match parts[..] {
        [h, m] => (h, m, None),
        [h, m, s] => (h, m, Some(s)),
        _ => return Err(format!("{t:?} is not a time (HOUR:MINUTE[:SECOND])")),
    };
    cal.hours = field(h, 0, 23, "hour", false)?;
    cal.minutes = field(m, 0, 59, "minute", false)?;
    if let Some(s) = s {
        if s.contains('.') {
            return Err(format!(
                "{s:?}: fractions of a second are not supported; jobs run on whole seconds"
            ));
        }
        cal.seconds = field(s, 0, 59, "second", false)?;
    }
    Ok(())
}

fn number(s: &str, what: &str) -> Result<u32, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || s.len() > 4 {
        return Err(format!("{s:?} is not a {what}"));
    }
    s.parse().map_err(|_| format!("{s:?} is not a {what}"))
}

/// A comma list of `*`, `V`, `A..B`, `V/N`, `A..B/N` within `lo..=hi`;
/// two-digit years are taken as systemd takes them (70–99: 19xx, else
/// 20xx).
fn field(s: &str, lo: u32, hi: u32, what: &str, year: bool) -> Result<Set, String> {
    let mut set = Set::none(lo, hi);
    let value = |v: &str| -> Result<u32, String> {
        let n = number(v, what)?;
        let n = match (year, v.len()) {
            (true, 1 | 2) if n >= 70 => n + 1900,
            (true, 1 | 2) => n + 2000,
            _ => n,
        };
        if n < lo || n > hi {
            return Err(format!("{what} {v} is out of range ({lo}..{hi})"));
        }
        Ok(n)
    };
    for item in s.split(',') {
        if item == "*" {
            return if s == "*" {
                Ok(Set::all(lo, hi))
            } else {
                Err(format!("{s:?}: * stands alone in a {what}"))
            };
        }
        let (range, step) = match item.split_once('/') {
            Some((r, n)) => {
                let n = number(n, "repetition")?;
                if n == 0 {
                    return Err(format!("{item:?}: a repetition of 0"));
                }
                (r, Some(n))
            }
            None => (item, None),
        };
        let (a, b) = match range.split_once("..") {
            Some((a, b)) => (value(a)?, value(b)?),
            None => {
                let a = value(range)?;
                (a, if step.is_some() { hi } else { a })
            }
        };
        if a > b {
            return Err(format!("{item:?}: the range runs backwards"));
        }
        let mut v = a;
        while v <= b {
            set.add(v);
            v += step.unwrap_or(1);
        }
    }
    Ok(set)
}

/// Days counted from the month's end (`~1` is the last day); a
/// repetition walks towards the end (`~7/1`: the last seven days).
fn field_from_end(s: &str) -> Result<Set, String> {
    let mut set = Set::none(1, 31);
    for item in s.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, n)) => (r, Some(number(n, "repetition")?.max(1))),
            None => (item, None),
        };
        let (a, b) = match range.split_once("..") {
            Some((a, b)) => (number(a, "day")?, number(b, "day")?),
            None => {
                let a = number(range, "day")?;
                (a, a)
            }
        };
        if !(1..=31).contains(&a) || !(1..=31).contains(&b) || a > b {
            return Err(format!("{item:?}: days from the end run 1..31, upwards"));
        }
        match step {
            // `~A/N`: A, A-N, … down to the last day.
            Some(n) if a == b => {
                let mut v = a;
                loop {
                    set.add(v);
                    if v <= n {
                        break;
                    }
                    v -= n;
                }
            }
            Some(n) => {
                let mut v = a;
                while v <= b {
                    set.add(v);
                    v += n;
                }
            }
            None => (a..=b).for_each(|v| set.add(v)),
        }
    }
    Ok(set)
}
