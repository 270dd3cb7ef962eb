//! The error of the pieces both sides share: endpoints, transports and
//! the token file. A kind plus where it happened (the endpoint or file,
//! and the operation). The guest agent uses it as its own: its failures
//! are of these kinds too (a bad configuration, I/O on a path).

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

vsnap_error::labelled_error!(ErrorKind, Io);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrapped_cause_appears_once_in_the_chain() {
        let e = Error::from(std::io::Error::other("connection reset"))
            .at("vsock:3:5000")
            .during("send Freeze")
            .at("ignored: the first place given wins");
        assert_eq!(
            vsnap_error::chain(&e),
            "vsock:3:5000: send Freeze: I/O error: connection reset"
        );
        let t = Error::new(ErrorKind::Timeout {
            op: "Thaw".into(),
            ms: 500,
        });
        assert_eq!(vsnap_error::chain(&t), "no reply to Thaw within 500 ms");
    }
}
