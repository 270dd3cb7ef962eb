//! The service's one error type: a kind, and where it happened.

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    /// A calendar event that does not parse, and why.
    #[error("calendar event {expr:?}: {why}")]
    Calendar { expr: String, why: String },
    /// A configuration that cannot be used: which key, and why.
    #[error("{0}")]
    Config(String),
    #[error("I/O error")]
    Io(#[source] std::io::Error),
    #[error("state database error")]
    Database(#[source] Box<rusqlite::Error>),
    /// No such job, run or VM.
    #[error("{0}")]
    NotFound(String),
    #[error("the backup could not start")]
    Backup(#[source] Box<vsnap_coordinator::error::Error>),
    #[error("repository error")]
    Engine(#[source] Box<vsnap_repo::Error>),
}

/// An [`ErrorKind`] with its context: the file, line or key it concerns.
/// Its `source()` is the kind's, so the kind's cause is reached (and
/// printed once) under the message that names the context.
#[derive(Debug)]
pub struct Error {
    pub kind: ErrorKind,
    pub at: Option<String>,
}

impl Error {
    /// Says where: a file, a line, a key.
    pub fn at(mut self, at: impl Into<String>) -> Error {
        self.at = Some(at.into());
        self
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(at) = &self.at {
            write!(f, "{at}: ")?;
        }
        write!(f, "{}", self.kind)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.kind)
    }
}

impl From<ErrorKind> for Error {
    fn from(kind: ErrorKind) -> Error {
        Error { kind, at: None }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The error and every cause under it, for a log line or a run's record.
pub use vsnap_error::chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrapped_cause_appears_once_in_the_chain() {
        let io = Error::from(ErrorKind::Io(std::io::Error::other("disk gone"))).at("state.db");
        assert_eq!(chain(&io), "state.db: I/O error: disk gone");
        // A repository error keeps its own context, and its cause is
        // named once however many layers wrap it.
        let repo = vsnap_repo::Error::from(std::io::Error::other("bucket unreachable"))
            .during("list snapshots");
        let e = Error::from(ErrorKind::Engine(Box::new(repo))).at("job nightly");
        let text = chain(&e);
        assert_eq!(text.matches("bucket unreachable").count(), 1, "{text}");
        assert!(
            text.starts_with("job nightly: repository error: list snapshots"),
            "{text}"
        );
    }
}
