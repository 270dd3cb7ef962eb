//! The coordinator crate's one error type: a [`ErrorKind`] plus where it
//! happened (the endpoint or file, and the operation), so an operator sees
//! which guest and which step failed.

use vsnap_protocol::ErrorClass;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// As in the engine's error: the message carries the cause, so it is
    /// not also given as `source()`, which would print it twice.
    #[error("I/O error: {0}")]
    Io(std::io::Error),
    #[error("bad endpoint {spec:?}: {reason}")]
    BadEndpoint { spec: String, reason: String },
    #[error("bad configuration: {0}")]
    Config(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("the agent speaks protocol version {found}, this vsnap speaks {expected}")]
    VersionMismatch { found: u32, expected: u32 },
    /// The agent answered with an error; its class decides retries.
    #[error("{class}: {message}{}", .mount.as_deref().map(|m| format!(" (mount {m})")).unwrap_or_default())]
    Agent {
        class: ErrorClass,
        message: String,
        mount: Option<String>,
    },
    #[error("no reply to {op} within {ms} ms")]
    Timeout { op: String, ms: u64 },
    #[error("the agent closed the connection")]
    Closed,
    /// Stopped on request (SIGINT): the abort rules apply.
    #[error("interrupted")]
    Interrupted,
    /// The engine's own error, with its context; its cause through
    /// `source()`.
    #[error(transparent)]
    Engine(Box<vsnap_repo::Error>),
    /// A repository cuts one chunk grid, chosen when it was made.
    #[error("the repository {} uses chunks of {have} bytes, not the {want} asked for", .repo.display())]
    ChunkSize {
        repo: std::path::PathBuf,
        have: u64,
        want: u64,
    },
}

vsnap_error::labelled_error!(ErrorKind, Io);

impl Error {
    /// The class the retry rules look at: the agent's own, or the one a
    /// transport failure falls in.
    pub fn class(&self) -> ErrorClass {
        match &self.kind {
            ErrorKind::Agent { class, .. } => *class,
            ErrorKind::Timeout { .. } => ErrorClass::Timeout,
            ErrorKind::Io(_) | ErrorKind::Closed => ErrorClass::Retryable,
            ErrorKind::VersionMismatch { .. }
            | ErrorKind::BadEndpoint { .. }
            | ErrorKind::Config(_)
            | ErrorKind::Engine(_)
            | ErrorKind::ChunkSize { .. } => ErrorClass::NonRetryable,
            ErrorKind::Protocol(_) => ErrorClass::Protocol,
            ErrorKind::Interrupted => ErrorClass::NonRetryable,
        }
    }
}

/// The shared pieces' errors (endpoints, transports, the token file)
/// become the coordinator's own kinds, with their context kept.
impl From<vsnap_protocol::Error> for Error {
    fn from(e: vsnap_protocol::Error) -> Self {
        use vsnap_protocol::ErrorKind as P;
        let kind = match e.kind {
            P::Io(io) => ErrorKind::Io(io),
            P::BadEndpoint { spec, reason } => ErrorKind::BadEndpoint { spec, reason },
            P::Config(c) => ErrorKind::Config(c),
            P::Timeout { op, ms } => ErrorKind::Timeout { op, ms },
            other => ErrorKind::Protocol(other.to_string()),
        };
        Error {
            kind,
            at: e.at,
            during: e.during,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_error_is_printed_once() {
        let e = Error::from(std::io::Error::from_raw_os_error(2))
            .at("unix:/run/x.sock")
            .during("connect");
        assert_eq!(
            e.to_string(),
            "unix:/run/x.sock: connect: I/O error: No such file or directory (os error 2)"
        );
        assert!(
            std::error::Error::source(&e).is_none(),
            "the cause is in the message, not again in source()"
        );
    }
}
