//! Usage errors found after clap has parsed: they exit 2, like clap's own,
//! so scripts can tell a bad command line from a failed operation.

use std::fmt;

use crate::units::human;

/// A command line that cannot work, with what to change.
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

pub fn error(message: String) -> anyhow::Error {
    anyhow::Error::new(UsageError(message))
}

/// Whether `err` is a usage error (anywhere in its chain).
pub fn is_usage(err: &anyhow::Error) -> bool {
    err.chain()
        .any(|e| e.downcast_ref::<UsageError>().is_some())
}

/// `--chunk-size WANT` against a repository of `have`: a usage error
/// (exit 2) that says what to do, for plain and coordinated backups.
pub fn chunk_size(want: u64, have: u64, repo: &std::path::Path) -> anyhow::Error {
    error(format!(
        "--chunk-size {}: the repository {} uses chunks of {}, chosen at `vsnap repo init`; omit --chunk-size, or back up into a repository made with --chunk-size {}",
        human(want),
        repo.display(),
        human(have),
        human(want)
    ))
}
