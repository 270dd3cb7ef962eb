//! What vsnap prints reaches a terminal as plain text. Names come from
//! outside (a manifest another host wrote, a key in a bucket, a server's
//! answer), and a control character in one could move the cursor, erase
//! a line, retitle the window or fake an "ok". Every byte vsnap writes to
//! stdout, and every error and warning on stderr, passes through here:
//! control characters other than newline and tab (C0, DEL, and C1 in
//! UTF-8) are written as `\u001b`, which is also a valid JSON escape, so
//! `--json` output stays valid (serde escapes C0 in strings already; DEL
//! and C1 it leaves raw).

use std::borrow::Cow;
use std::io::{self, Write};

/// The escape for one control character.
fn escape(c: u32) -> String {
    format!("\\u{c:04x}")
}

/// `s` with its control characters escaped, by [`Plain`]'s one rule; as
/// it was when it has none (an escape is longer than what it stands for,
/// so an unchanged length is an unchanged string).
pub fn plain(s: &str) -> Cow<'_, str> {
    let mut out = Plain::new(Vec::with_capacity(s.len()));
    // Writing to a vector cannot fail.
    let _ = out.write_all(s.as_bytes());
    if out.inner.len() == s.len() {
        return Cow::Borrowed(s);
    }
    // Escapes are ASCII put in place of whole characters: still UTF-8.
    Cow::Owned(String::from_utf8_lossy(&out.inner).into_owned())
}

/// A writer that passes bytes through [`plain`]'s rule. It works on bytes,
/// not text, so output that is not UTF-8 passes as it is, but for its
/// control bytes: a C1 character is the two bytes `C2 80`..`C2 9F`,
/// which a formatted write never splits.
pub struct Plain<W: Write> {
    inner: W,
}

impl<W: Write> Plain<W> {
    pub fn new(inner: W) -> Self {
        Plain { inner }
    }
}

impl<W: Write> Write for Plain<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut start = 0;
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            let (control, len) = match b {
                b'\n' | b'\t' => (None, 1),
                0..=0x1f | 0x7f => (Some(u32::from(b)), 1),
                0xc2 if buf.get(i + 1).is_some_and(|n| (0x80..=0x9f).contains(n)) => {
                    (Some(u32::from(buf[i + 1])), 2)
                }
                _ => (None, 1),
            };
            if let Some(c) = control {
                self.inner.write_all(&buf[start..i])?;
                self.inner.write_all(escape(c).as_bytes())?;
                start = i + len;
            }
            i += len;
        }
        self.inner.write_all(&buf[start..])?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// `eprintln!` through [`plain`]: every line vsnap writes to stderr.
macro_rules! say {
    ($($arg:tt)*) => {
        eprintln!("{}", $crate::plain::plain(&format!($($arg)*)))
    };
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn is_control(c: char) -> bool {
        c.is_control() && c != '\n' && c != '\t'
    }

    #[test]
    fn control_characters_are_shown_escaped_and_json_stays_json() {
        assert_eq!(plain("disk.vhd"), "disk.vhd");
        assert!(matches!(plain("a\tb\n"), Cow::Borrowed(_)));
        assert_eq!(
            plain("disk\u{1b}[32mGREEN\u{7}\u{7f}\u{9b}1A.vhd\r"),
            "disk\\u001b[32mGREEN\\u0007\\u007f\\u009b1A.vhd\\u000d"
        );
        let mut out = Plain::new(Vec::new());
        let v = serde_json::json!({ "vm": "a\u{1b}]0;owned\u{7}\u{85}é", "n": 1 });
        writeln!(out, "{}", serde_json::to_string_pretty(&v).unwrap()).unwrap();
        let text = String::from_utf8(out.inner).unwrap();
        assert!(!text.chars().any(is_control), "{text:?}");
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, v, "the escapes are JSON's own");
        // Bytes that are not UTF-8 pass, but for control bytes.
        let mut out = Plain::new(Vec::new());
        out.write_all(b"\xff\xc2\x9b\xc2\xa0\x1b").unwrap();
        assert_eq!(out.inner, b"\xff\\u009b\xc2\xa0\\u001b");
    }
}
