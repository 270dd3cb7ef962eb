//! The S3 client: object_store's, with its retries and back-off, driven
//! from the engine's threads through a runtime of its own.

use std::future::Future;
use std::ops::Range;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, ObjectStore as _, ObjectStoreExt as _, PutMode,
    PutOptions, PutPayload, RetryConfig,
};
use vsnap_repo::{Error, ErrorKind, Result};
use vsnap_repo::{ObjectInfo, ObjectStore};

use crate::errors::{broke_in_flight, describe, no_bucket, Failure};

/// An S3 bucket and prefix.
#[derive(Debug)]
pub struct S3Store {
    client: AmazonS3,
    prefix: String,
    location: String,
    endpoint: String,
    /// `None` only while dropping.
    runtime: Option<tokio::runtime::Runtime>,
}

/// How long one request may take, and how long to wait for a connection:
/// an endpoint that does not answer is reported within seconds.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Room made up front for a ranged read: past it, the buffer grows with
/// what arrives.
const RESERVE_LIMIT: usize = 64 << 20;

/// Retries with exponential back-off and jitter, for 503 SlowDown (the
/// server's request-rate limit), 500s, dropped connections and timeouts:
/// some 20 seconds of trying before a request's failure is final. A 4xx
/// (wrong credentials, no bucket) is not retried.
fn retry() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(4),
            base: 2.0,
        },
        max_retries: 8,
        retry_timeout: Duration::from_secs(60),
    }
}

/// Set to 1 to let object_store fetch credentials from a cloud instance's
/// metadata service when no keys are configured.
const METADATA: &str = "VSNAP_S3_METADATA";

/// Whether the environment names a source of credentials other than keys:
/// a web identity token, a container's credentials endpoint, or the
/// operator's explicit leave to ask the instance metadata service.
fn other_credentials() -> bool {
    [
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some())
        || std::env::var(METADATA).is_ok_and(|v| v == "1")
}

impl S3Store {
    /// A client for `s3://bucket/prefix`, configured from the AWS
    /// environment and credentials file. Nothing is sent yet.
    pub fn connect(bucket: &str, prefix: &str) -> Result<S3Store> {
        // reqwest's TLS needs a process-wide crypto provider; a second
        // install (another store, or the host program's) is refused
        // harmlessly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let location = if prefix.is_empty() {
            format!("s3://{bucket}")
        } else {
            format!("s3://{bucket}/{prefix}")
        };
        let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
        if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
            match crate::credentials::from_file() {
                Some(c) => {
                    b = b
                        .with_access_key_id(c.access_key_id)
                        .with_secret_access_key(c.secret_access_key);
                    if let Some(t) = c.session_token {
                        b = b.with_token(t);
                    }
                }
                // Without keys, object_store asks the cloud's metadata
                // service, which on an ordinary host refuses (a confusing
                // 403) or hangs first: an operator who forgot the keys is
                // told so, unless the environment names another source.
                None if !other_credentials() => {
                    return Err(Error::from(ErrorKind::InvalidArgument(format!(
                        "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or write them to ~/.aws/credentials (AWS_PROFILE picks a profile); on a cloud instance with a role, set {METADATA}=1 to use its metadata service"
                    )))
                    .in_file(&PathBuf::from(&location)));
                }
                None => {}
            }
        }
        if std::env::var_os("AWS_REGION").is_none()
            && std::env::var_os("AWS_DEFAULT_REGION").is_none()
        {
            b = b.with_region("us-east-1");
        }
        let endpoint = std::env::var("AWS_ENDPOINT_URL")
            .or_else(|_| std::env::var("AWS_ENDPOINT"))
            .unwrap_or_else(|_| "https://s3.amazonaws.com".into());
        let plain = endpoint.starts_with("http://");
        // A payload left unsigned is checked in transit by TLS alone; over
        // plain HTTP nothing would check it, so that is refused.
        let unsigned = b
            .get_config_value(&AmazonS3ConfigKey::UnsignedPayload)
            .is_some_and(|v| {
                matches!(
                    v.to_ascii_lowercase().as_str(),
                    "1" | "true" | "on" | "yes" | "y"
                )
            });
        if unsigned && plain {
            return Err(Error::from(ErrorKind::InvalidArgument(format!(
                "AWS_UNSIGNED_PAYLOAD is on, but {endpoint} is plain HTTP: nothing would check the bodies in transit; use an https:// endpoint, or leave payloads signed"
            )))
            .in_file(&PathBuf::from(&location)));
        }
        let mut options = ClientOptions::new()
            .with_allow_http(plain)
            .with_timeout(REQUEST_TIMEOUT)
            .with_connect_timeout(CONNECT_TIMEOUT);
        for cert in crate::tls::ca_bundle()? {
            options = options.with_root_certificate(cert);
        }
        let client = b
            .with_retry(retry())
            .with_client_options(options)
            .build()
            .map_err(|e| describe(e, &location, "", "configure the S3 client", &endpoint))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vsnap-s3")
            .enable_all()
            .build()
            .map_err(|e| Error::from(e).during("start the S3 client"))?;
        Ok(S3Store {
            client,
            prefix: prefix.to_owned(),
            location,
            endpoint,
            runtime: Some(runtime),
        })
    }

    fn path(&self, key: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.prefix))
        }
    }

    /// Runs a request on the client's runtime and waits for it, from any
    /// thread: an engine worker, or a service's blocking task.
    fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = object_store::Result<T>> + Send + 'static,
    ) -> std::result::Result<T, Failure> {
        let Some(rt) = &self.runtime else {
            return Err(Failure::Stopped);
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        match rx.recv() {
            Ok(r) => r.map_err(Failure::Store),
            Err(_) => Err(Failure::Stopped),
        }
    }

    /// [`Self::run`] for a request object_store does not retry once it
    /// went out (a conditional create, a delete): a connection that broke
    /// under it is retried here, with the client's own back-off, on a
    /// fresh request each time.
    fn run_resent<T: Send + 'static, F>(
        &self,
        make: impl Fn() -> F,
    ) -> std::result::Result<T, Failure>
    where
        F: Future<Output = object_store::Result<T>> + Send + 'static,
    {
        let config = retry();
        let mut wait = config.backoff.init_backoff;
        let start = std::time::Instant::now();
        let mut tries = 0;
        loop {
            match self.run(make()) {
                Err(Failure::Store(e))
                    if broke_in_flight(&e)
                        && tries < config.max_retries
                        && start.elapsed() < config.retry_timeout =>
                {
                    tries += 1;
                    std::thread::sleep(wait);
                    wait = wait
                        .mul_f64(config.backoff.base)
                        .min(config.backoff.max_backoff);
                }
                r => return r,
            }
        }
    }

    fn fail(&self, f: Failure, key: &str, op: &'static str) -> Error {
        match f {
            Failure::Store(e) => describe(e, &self.location, key, op, &self.endpoint),
            Failure::Stopped => Error::from(ErrorKind::Remote {
                reason: "the S3 client stopped".into(),
                cause: None,
            })
            .during(op),
            Failure::Limit(limit, size) => Error::from(ErrorKind::TooLarge {
                what: "object",
                claimed: size,
                limit,
            })
            .in_file(&PathBuf::from(format!("{}/{key}", self.location)))
            .during(op),
        }
    }
}

impl Drop for S3Store {
    fn drop(&mut self) {
        // A runtime dropped inside another (a service's task) would panic;
        // this lets its threads go without waiting.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl ObjectStore for S3Store {
    fn location(&self) -> &str {
        &self.location
    }

    fn get(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        let client = self.client.clone();
        let path = self.path(key);
        let got = self.run(async move {
            let r = match client.get(&path).await {
                Ok(r) => r,
                // A missing bucket is an error of its own, not a
                // missing object.
                Err(e @ object_store::Error::NotFound { .. }) if !no_bucket(&e) => {
                    return Ok(Err(None))
                }
                Err(e) => return Err(e),
            };
            if r.meta.size > limit {
                return Ok(Err(Some(r.meta.size)));
            }
            let mut out = Vec::with_capacity(r.meta.size as usize);
            let mut body = r.into_stream();
            while let Some(piece) = body.next().await {
                let piece = piece?;
                if (out.len() + piece.len()) as u64 > limit {
                    return Ok(Err(Some((out.len() + piece.len()) as u64)));
                }
                out.extend_from_slice(&piece);
            }
            Ok(Ok(out))
        });
        match got {
            Ok(Ok(bytes)) => Ok(Some(bytes)),
            Ok(Err(None)) => Ok(None),
            Ok(Err(Some(size))) => Err(self.fail(Failure::Limit(limit, size), key, "read object")),
            Err(f) => Err(self.fail(f, key, "read object")),
        }
    }

    fn get_range_into(&self, key: &str, range: Range<u64>, buf: &mut Vec<u8>) -> Result<()> {
        let client = self.client.clone();
        let path = self.path(key);
        let want = range.end.saturating_sub(range.start);
        let from = range.start;
        let mut out = std::mem::take(buf);
        out.clear();
        // The range is the caller's, from a pack index; the body streams
        // in, so memory follows what arrives, up to the range's length.
        out.reserve(
            usize::try_from(want)
                .unwrap_or(usize::MAX)
                .min(RESERVE_LIMIT),
        );
        let got = self.run(async move {
            let opts = GetOptions {
                range: Some(range.into()),
                ..GetOptions::default()
            };
            let mut body = client.get_opts(&path, opts).await?.into_stream();
            while let Some(piece) = body.next().await {
                let piece = piece?;
                let had = (out.len() + piece.len()) as u64;
                if had > want {
                    return Ok(Err(had));
                }
                out.extend_from_slice(&piece);
            }
            Ok(Ok(out))
        });
        match got {
            Ok(Ok(out)) if out.len() as u64 == want => {
                *buf = out;
                Ok(())
            }
            Ok(Ok(out)) => Err(Error::from(ErrorKind::Truncated {
                what: "ranged read",
                needed: want,
                at: from,
                available: out.len() as u64,
            })
            .in_file(&PathBuf::from(format!("{}/{key}", self.location)))),
            Ok(Err(had)) => Err(self.fail(Failure::Limit(want, had), key, "read object range")),
            Err(f) => Err(self.fail(f, key, "read object range")),
        }
    }

    fn put_new(&self, key: &str, bytes: Vec<u8>) -> Result<bool> {
        let path = self.path(key);
        // Shared, so a retry sends the same bytes without a copy.
        let payload = PutPayload::from(bytes);
        let put = self.run_resent(|| {
            let (client, path, payload) = (self.client.clone(), path.clone(), payload.clone());
            async move {
                let opts = PutOptions {
                    mode: PutMode::Create,
                    ..PutOptions::default()
                };
                match client.put_opts(&path, payload, opts).await {
                    Ok(_) => Ok(true),
                    Err(
                        object_store::Error::AlreadyExists { .. }
                        | object_store::Error::Precondition { .. },
                    ) => Ok(false),
                    Err(e) => Err(e),
                }
            }
        });
        put.map_err(|f| self.fail(f, key, "create object"))
    }

    fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        let client = self.client.clone();
        let path = self.path(key);
        self.run(async move { client.put(&path, PutPayload::from(bytes)).await.map(|_| ()) })
            .map_err(|f| self.fail(f, key, "write object"))
    }

    fn copy(&self, from: &str, to: &str) -> Result<bool> {
        let (src, dst) = (self.path(from), self.path(to));
        self.run_resent(|| {
            let (client, src, dst) = (self.client.clone(), src.clone(), dst.clone());
            async move {
                match client.copy(&src, &dst).await {
                    Ok(()) => Ok(true),
                    Err(e @ object_store::Error::NotFound { .. }) if !no_bucket(&e) => Ok(false),
                    Err(e) => Err(e),
                }
            }
        })
        .map_err(|f| self.fail(f, from, "copy object"))
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key);
        self.run_resent(|| {
            let (client, path) = (self.client.clone(), path.clone());
            async move {
                match client.delete(&path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(e),
                }
            }
        })
        .map_err(|f| self.fail(f, key, "delete object"))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let client = self.client.clone();
        let root = self.prefix.clone();
        let path = self.path(prefix.trim_end_matches('/'));
        let whole = prefix.is_empty();
        let listing = self.run(async move {
            let mut out = Vec::new();
            let base = (!root.is_empty()).then(|| ObjectPath::from(root));
            let at = if whole { base.as_ref() } else { Some(&path) };
            let mut s = client.list(at);
            while let Some(meta) = s.next().await {
                let meta = meta?;
                let full = meta.location.as_ref();
                let key = match &base {
                    Some(b) => full
                        .strip_prefix(b.as_ref())
                        .and_then(|k| k.strip_prefix('/'))
                        .unwrap_or(full),
                    None => full,
                };
                out.push(ObjectInfo {
                    key: key.to_owned(),
                    size: meta.size,
                    modified: SystemTime::from(meta.last_modified),
                });
            }
            Ok(out)
        });
        listing.map_err(|f| self.fail(f, prefix, "list objects"))
    }

    fn probe(&self) -> Result<()> {
        let client = self.client.clone();
        let base = (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.clone()));
        self.run(async move {
            let mut s = client.list(base.as_ref());
            match s.next().await {
                Some(Err(e)) => Err(e),
                _ => Ok(()),
            }
        })
        .map_err(|f| self.fail(f, "", "list the bucket"))
    }
}
