//! The error of the pieces both sides share: endpoints, transports and
//! the token file. A kind plus where it happened (the endpoint or file,
//! and the operation). The guest agent uses it as its own: its failures
//! are of these kinds too (a bad configuration, I/O on a path).

use std::fmt;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The message carries the cause, so it is not also given as
    /// `source()`, which would print it twice.
    #[error("I/O error: {0}")]
    Io(std::io::Error),
    #[error("bad endpoint {spec:?}: {reason}")]
    BadEndpoint { spec: String, reason: String },
    #[error("bad configuration: {0}")]
    Config(String),
    #[error("no reply to {op} within {ms} ms")]
    Timeout { op: String, ms: u64 },
}

#[derive(Debug)]
pub struct Error {
    pub kind: ErrorKind,
    /// The endpoint, mount or file the error concerns.
    pub at: Option<String>,
    /// What was being done.
    pub during: Option<String>,
}

impl Error {
    pub fn new(kind: ErrorKind) -> Self {
        Error {
            kind,
            at: None,
            during: None,
        }
    }

    pub fn at(mut self, at: impl Into<String>) -> Self {
        self.at.get_or_insert_with(|| at.into());
        self
    }

    pub fn during(mut self, what: impl Into<String>) -> Self {
        self.during.get_or_insert_with(|| what.into());
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(at) = &self.at {
            write!(f, "{at}: ")?;
        }
        if let Some(during) = &self.during {
            write!(f, "{during}: ")?;
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
    fn from(kind: ErrorKind) -> Self {
        Error::new(kind)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::new(ErrorKind::Io(e))
    }
}
