//! What a failed request means for the operator: each failure an
//! operator can fix (credentials, bucket, endpoint) gets its own message,
//! and object_store's error stays reachable as the source.

use std::path::PathBuf;

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
