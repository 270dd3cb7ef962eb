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
#[derive(Debug, thiserror::Error)]
#[error("{}{kind}", at.as_ref().map(|a| format!("{a}: ")).unwrap_or_default())]
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

impl From<ErrorKind> for Error {
    fn from(kind: ErrorKind) -> Error {
        Error { kind, at: None }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The error and every cause under it, for a log line or a run's record.
pub use vsnap_error::chain;
