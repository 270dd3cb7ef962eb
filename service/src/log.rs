//! The service's log, on stderr: one line per event, which journald
//! stamps and keeps. As text (`vsnap serve: job nightly: run 7 failed:
//! ...`) for people and grep, or with `--log-format json` as one JSON
//! object per line, for log shippers: `time`, `level`, `message`, and
//! the event's fields (`job`, `run`, `state`, `error`, ...).
//!
//! A line holds text from outside (job names, errors that quote a
//! server or a manifest): as text its control characters are escaped, so
//! no line can fake another or drive a terminal; JSON escapes them itself.

use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Map, Value};

/// How lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Text,
    Json,
}

/// How bad an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

static JSON: AtomicBool = AtomicBool::new(false);

/// Chooses the format for the rest of the process.
pub fn set_format(f: Format) {
    JSON.store(f == Format::Json, Ordering::Relaxed);
}

/// `s` with every control character (newlines too) escaped.
fn plain(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// The line for an event, in `format`, at `time`.
pub fn render(
    format: Format,
    time: chrono::DateTime<chrono::Utc>,
    level: Level,
    message: &str,
    fields: &[(&str, Value)],
) -> String {
    match format {
        Format::Text => format!("vsnap serve: {}", plain(message)),
        Format::Json => {
            let mut m = Map::new();
            m.insert(
                "time".into(),
                time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                    .into(),
            );
            m.insert("level".into(), level.name().into());
            m.insert("message".into(), message.into());
            for (k, v) in fields {
                if !v.is_null() {
                    m.insert((*k).into(), v.clone());
                }
            }
            Value::Object(m).to_string()
        }
    }
}

/// Writes an event's line.
pub fn event(level: Level, message: &str, fields: &[(&str, Value)]) {
    let format = if JSON.load(Ordering::Relaxed) {
        Format::Json
    } else {
        Format::Text
    };
    eprintln!(
        "{}",
        render(format, chrono::Utc::now(), level, message, fields)
    );
}

/// An event with nothing but its message.
pub fn info(message: &str) {
    event(Level::Info, message, &[]);
}

/// A failure with nothing but its message.
pub fn error(message: &str) {
    event(Level::Error, message, &[]);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn a_line_is_one_line_whatever_it_quotes() {
        let t = chrono::DateTime::parse_from_rfc3339("2026-12-07T23:00:00Z")
            .unwrap()
            .to_utc();
        let msg = "job x: run 7 failed: disk\u{1b}[32mGREEN\nvsnap serve: run 8 succeeded";
        let text = render(Format::Text, t, Level::Error, msg, &[]);
        assert_eq!(text.lines().count(), 1);
        assert!(!text.contains('\u{1b}'), "{text}");
        assert!(
            text.starts_with("vsnap serve: job x: run 7 failed: disk\\u{1b}[32m"),
            "{text}"
        );
        let line = render(
            Format::Json,
            t,
            Level::Error,
            msg,
            &[
                ("job", json!("x")),
                ("run", json!(7)),
                ("note", Value::Null),
            ],
        );
        assert_eq!(line.lines().count(), 1);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["time"], "2026-12-07T23:00:00.000Z");
        assert_eq!(v["level"], "error");
        assert_eq!(v["message"], msg);
        assert_eq!((v["job"].clone(), v["run"].clone()), (json!("x"), json!(7)));
        assert!(v.get("note").is_none(), "a field with no value is left out");
    }
}
