//! What a failed request means for the operator: each failure an
//! operator can fix (credentials, bucket, endpoint) gets its own message,
//! and object_store's error stays reachable as the source.

use std::path::PathBuf;

use object_store::client::{HttpError, HttpErrorKind};
use vsnap_error::chain;
use vsnap_repo::{Error, ErrorKind};

/// Why a request did not succeed.
#[derive(Debug)]
pub(crate) enum Failure {
    Store(object_store::Error),
    /// The client was shut down under the request.
    Stopped,
    /// An object larger than the reader's limit (limit, size).
    Limit(u64, u64),
}

/// The innermost message of the client's error: what the server or the
/// network said. object_store's errors repeat their sources in their own
/// messages, so a printed chain of them says the same thing four times.
#[derive(Debug)]
struct Said(String);

impl std::fmt::Display for Said {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Said {}

fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// What the transport said went wrong, when it was the transport: the
/// kind object_store's HTTP layer gave the failure, found down the chain.
pub(crate) fn transport(e: &object_store::Error) -> Option<HttpErrorKind> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<HttpError>() {
            return Some(h.kind());
        }
        cur = err.source();
    }
    None
}

/// A connection that broke, or an answer that did not come, after the
/// request went out: object_store retries these only for requests it
/// knows are idempotent, and a conditional create is not one. Retrying
/// one is safe here, because every caller checks a refused create for
/// the bytes it sent (the lost-answer check).
pub(crate) fn broke_in_flight(e: &object_store::Error) -> bool {
    matches!(
        transport(e),
        Some(HttpErrorKind::Interrupted | HttpErrorKind::Timeout | HttpErrorKind::Request)
    )
}

/// Whether the server said the bucket does not exist.
pub(crate) fn no_bucket(e: &object_store::Error) -> bool {
    chain(e).contains("NoSuchBucket")
}

/// The error for a failed request on `key` (relative to `location`).
pub(crate) fn describe(
    e: object_store::Error,
    location: &str,
    key: &str,
    op: &'static str,
    endpoint: &str,
) -> Error {
    let text = chain(&e);
    let kind = transport(&e);
    let bucket = location
        .strip_prefix("s3://")
        .and_then(|r| r.split('/').next())
        .unwrap_or(location);
    let reason = if text.contains("NoSuchBucket") {
        format!("the bucket {bucket:?} does not exist at {endpoint}; create it first (vsnap does not create buckets)")
    } else if matches!(
        e,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }
    ) || text.contains("SignatureDoesNotMatch")
        || text.contains("InvalidAccessKeyId")
        || text.contains("AccessDenied")
    {
        format!(
            "{endpoint} refused the credentials for bucket {bucket:?}; check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or the profile in ~/.aws/credentials)"
        )
    } else if text.contains("certificate") {
        format!(
            "the TLS certificate of {endpoint} is not trusted here; if a private CA issued it, set {} to that CA's PEM file",
            crate::tls::CA_BUNDLE
        )
    } else if matches!(
        kind,
        Some(HttpErrorKind::Interrupted | HttpErrorKind::Request)
    ) {
        // Connected, then lost: the endpoint is there.
        format!("the connection to the S3 endpoint {endpoint} broke during the request, retries included")
    } else if kind == Some(HttpErrorKind::Timeout) {
        format!("the S3 endpoint {endpoint} did not answer in time, retries included")
    } else if text.contains("error sending request")
        || text.contains("Connection refused")
        || text.contains("dns error")
        || text.contains("connect")
    {
        format!("cannot reach the S3 endpoint {endpoint}; check AWS_ENDPOINT_URL and the network")
    } else if text.contains("timed out") || text.contains("Timeout") {
        format!("the S3 endpoint {endpoint} did not answer in time, retries included")
    } else {
        format!("the S3 request failed at {endpoint}")
    };
    let path = if key.is_empty() {
        PathBuf::from(location)
    } else {
        PathBuf::from(format!("{location}/{key}"))
    };
    Error::from(ErrorKind::Remote {
        reason,
        cause: Some(Box::new(Said(innermost(&e)))),
    })
    .in_file(&path)
    .during(op)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn failed(kind: HttpErrorKind, io: std::io::ErrorKind) -> object_store::Error {
        object_store::Error::Generic {
            store: "S3",
            source: Box::new(HttpError::new(kind, std::io::Error::from(io))),
        }
    }

    fn reason(e: object_store::Error) -> String {
        describe(e, "s3://b/p", "packs/ab", "create object", "http://h:1").to_string()
    }

    /// A connection that broke mid-request is retried, and named as
    /// broken, not as an endpoint that cannot be reached; one that never
    /// opened is neither retried here nor called broken.
    #[test]
    fn a_broken_connection_is_resent_and_told_apart_from_an_unreachable_endpoint() {
        let broke = failed(HttpErrorKind::Interrupted, std::io::ErrorKind::BrokenPipe);
        assert!(broke_in_flight(&broke));
        let text = reason(broke);
        assert!(
            text.contains("the connection to the S3 endpoint http://h:1 broke during the request"),
            "{text}"
        );
        assert!(!text.contains("cannot reach"), "{text}");
        let refused = failed(
            HttpErrorKind::Connect,
            std::io::ErrorKind::ConnectionRefused,
        );
        assert!(!broke_in_flight(&refused));
        let text = reason(refused);
        assert!(
            text.contains("cannot reach the S3 endpoint http://h:1"),
            "{text}"
        );
        let slow = failed(HttpErrorKind::Timeout, std::io::ErrorKind::TimedOut);
        assert!(broke_in_flight(&slow));
        assert!(reason(slow).contains("did not answer in time"));
    }
}
