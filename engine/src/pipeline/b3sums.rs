//! `B3SUMS` files: b3sum's own format, so `cd DIR && b3sum -c B3SUMS`
//! checks vsnap's output with a stock tool.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use crate::error::{Error, ErrorKind, Result, ResultExt};

pub const B3SUMS: &str = "B3SUMS";

/// Adds or replaces `entries` (file name, digest) in `dir/B3SUMS`, keeping
/// the lines for other files, and writes it atomically.
pub fn update_b3sums(dir: &Path, entries: &[(String, blake3::Hash)]) -> Result<()> {
    let path = dir.join(B3SUMS);
    let mut lines: BTreeMap<String, String> = BTreeMap::new();
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            for line in text.lines() {
                if let Some((digest, name)) = line.split_once("  ") {
                    lines.insert(name.to_owned(), digest.to_owned());
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(e).in_file(&path).during("read B3SUMS")),
    }
    for (name, digest) in entries {
        if name.contains('\n') || name.contains('\\') {
            return Err(Error::from(ErrorKind::InvalidArgument(format!(
                "{name:?}: b3sum's format cannot hold this file name"
            )))
            .in_file(&path));
        }
        lines.insert(name.clone(), digest.to_hex().to_string());
    }
    let tmp = dir.join(format!(".{B3SUMS}.vsnap-tmp"));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        for (name, digest) in &lines {
            writeln!(f, "{digest}  {name}")?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.ctx_file(&path, "write B3SUMS")
}
