//! A fault-injecting HTTP proxy for an S3 server on loopback: it drops
//! connections (before the request reaches the server, or after, so the
//! request took effect and its answer was lost), answers 503 SlowDown and
//! 500 InternalError, closes a kept-alive connection in the middle of a
//! request's body, truncates response bodies, flips a byte in ranged
//! reads' bodies, and adds latency, each at a rate of its own, drawn from a
//! seeded generator. It counts requests by kind, so benchmarks read PUT and
//! GET counts off it too.
//!
//! Requests pass through unchanged, their `Host` header included, so the
//! server checks the signatures the client made for the proxy's address.
//! The proxy answers with Nagle off, as the S3 services do, and so serves
//! benchmarks too: s3s-fs itself keeps Nagle on, which costs a kept-alive
//! client 40 ms a request (see `FaultProxy::start`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

use vsnap_lab::rng::Rng;

/// How often each fault happens, as a fraction of requests (0 to 1).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// The connection is closed without an answer.
    pub drop: f64,
    /// 503 SlowDown, the server's request-rate limit.
    pub slow_down: f64,
    /// 500 InternalError.
    pub internal: f64,
    /// The answer's body is cut short of its Content-Length.
    pub truncate: f64,
    /// One byte of a ranged read's body is flipped.
    pub corrupt_ranges: f64,
    /// A kept-alive connection, on a request after its first, is closed
    /// once the first piece of the request's body is in: the client,
    /// still sending, meets a broken pipe or a reset, as it does when a
    /// real endpoint closes a connection it kept idle.
    pub cut_reused: f64,
    /// Answers as a server that ignores `If-None-Match: *` does: a
    /// conditional create the server refused (412 or 304) is answered
    /// 200, as if it had been written. (The object is left as it was; the
    /// client cannot tell, which is the danger.)
    pub ignore_conditions: bool,
    /// Added to every request.
    pub latency: Duration,
}

/// Requests seen and faults made.
#[derive(Debug, Default)]
pub struct Counts {
    pub get: AtomicU64,
    pub put: AtomicU64,
    pub list: AtomicU64,
    pub delete: AtomicU64,
    pub other: AtomicU64,
    pub faults: AtomicU64,
    /// PUTs whose body the signature leaves out (`UNSIGNED-PAYLOAD`).
    pub unsigned_puts: AtomicU64,
}

/// A snapshot of [`Counts`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Tally {
    pub get: u64,
    pub put: u64,
    pub list: u64,
    pub delete: u64,
    pub other: u64,
    pub faults: u64,
    pub unsigned_puts: u64,
}

struct Shared {
    upstream: SocketAddr,
    faults: Mutex<Faults>,
    rng: Mutex<Rng>,
    counts: Counts,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

/// The proxy, serving on 127.0.0.1 until dropped.
pub struct FaultProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .finish()
    }
}

enum Fault {
    None,
    DropBefore,
    DropAfter,
    SlowDown,
    Internal,
    Truncate,
    Corrupt,
    CutReused,
}

impl FaultProxy {
    /// Listens on an ephemeral port of 127.0.0.1 and forwards to `upstream`.
    pub fn start(upstream: SocketAddr, faults: Faults, seed: u64) -> std::io::Result<FaultProxy> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            faults: Mutex::new(faults),
            rng: Mutex::new(Rng::new(seed)),
            counts: Counts::default(),
            client: {
                // A fresh connection to the server for every request, with
                // Nagle off: s3s-fs does not set TCP_NODELAY, so on a kept
                // connection each answer's body waited out the proxy's
                // delayed ACK, 40 ms a request. A new connection starts in
                // quick-ACK mode.
                let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
                http.set_nodelay(true);
                Client::builder(TokioExecutor::new())
                    .pool_max_idle_per_host(0)
                    .build(http)
            },
        });
        let s = Arc::clone(&shared);
        runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let s = Arc::clone(&s);
                tokio::spawn(async move {
                    let served = Arc::new(AtomicU64::new(0));
                    let service = hyper::service::service_fn(move |req| {
                        let reused = served.fetch_add(1, Ordering::Relaxed) > 0;
                        handle(Arc::clone(&s), req, reused)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(FaultProxy {
            addr,
            shared,
            runtime: Some(runtime),
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes the faults from the next request on.
    pub fn set_faults(&self, faults: Faults) {
        if let Ok(mut f) = self.shared.faults.lock() {
            *f = faults;
        }
    }

    pub fn tally(&self) -> Tally {
        let c = &self.shared.counts;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Tally {
            get: l(&c.get),
            put: l(&c.put),
            list: l(&c.list),
            delete: l(&c.delete),
            other: l(&c.other),
            faults: l(&c.faults),
            unsigned_puts: l(&c.unsigned_puts),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// An answer's body, whole or cut short: a cut body ends in an error, so
/// hyper closes the connection short of the Content-Length the headers
/// kept, as a server that died mid-answer would.
struct Answer {
    data: Option<Bytes>,
    cut: bool,
}

impl Answer {
    fn whole(data: impl Into<Bytes>) -> Self {
        Answer {
            data: Some(data.into()),
            cut: false,
        }
    }
}

impl Body for Answer {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let next = match self.data.take() {
            Some(d) => Some(Ok(Frame::data(d))),
            None if self.cut => {
                self.cut = false;
                Some(Err(std::io::Error::other("cut short by the fault proxy")))
            }
            None => None,
        };
        std::task::Poll::Ready(next)
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && !self.cut
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.data, self.cut) {
            (Some(d), false) => SizeHint::with_exact(d.len() as u64),
            (None, false) => SizeHint::with_exact(0),
            // Unknown, so hyper keeps the upstream's Content-Length.
            (_, true) => SizeHint::default(),
        }
    }
}

fn s3_error(status: StatusCode, code: &str) -> Response<Answer> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected by the fault proxy</Message></Error>"
    );
    let mut r = Response::new(Answer::whole(body));
    *r.status_mut() = status;
    r
}

fn pick(s: &Shared, ranged: bool, reused: bool) -> (Fault, Duration) {
    let (Ok(f), Ok(mut rng)) = (s.faults.lock(), s.rng.lock()) else {
        return (Fault::None, Duration::ZERO);
    };
    let roll = rng.below(1_000_000) as f64 / 1_000_000.0;
    let mut edge = 0.0;
    let mut hit = |rate: f64| {
        edge += rate;
        roll < edge
    };
    let fault = if hit(f.drop / 2.0) {
        Fault::DropBefore
    } else if hit(f.drop / 2.0) {
        Fault::DropAfter
    } else if hit(f.slow_down) {
        Fault::SlowDown
    } else if hit(f.internal) {
        Fault::Internal
    } else if hit(f.truncate) {
        Fault::Truncate
    } else if ranged && hit(f.corrupt_ranges) {
        Fault::Corrupt
    } else if reused && hit(f.cut_reused) {
        Fault::CutReused
    } else {
        Fault::None
    };
    (fault, f.latency)
}

/// A dropped connection: hyper closes it when the service fails.
#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by the fault proxy")
    }
}

impl std::error::Error for Dropped {}

async fn handle(
    s: Arc<Shared>,
    req: Request<Incoming>,
    reused: bool,
) -> Result<Response<Answer>, Dropped> {
    let c = &s.counts;
    let counter = match *req.method() {
        hyper::Method::GET if req.uri().query().is_some_and(|q| q.contains("list-type")) => &c.list,
        hyper::Method::GET | hyper::Method::HEAD => &c.get,
        hyper::Method::PUT => &c.put,
        hyper::Method::DELETE => &c.delete,
        // object_store removes objects with S3's DeleteObjects: a POST.
        hyper::Method::POST if req.uri().query().is_some_and(|q| q.contains("delete")) => &c.delete,
        _ => &c.other,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    if req.method() == hyper::Method::PUT
        && req
            .headers()
            .get("x-amz-content-sha256")
            .is_some_and(|v| v.as_bytes() == b"UNSIGNED-PAYLOAD")
    {
        c.unsigned_puts.fetch_add(1, Ordering::Relaxed);
    }
    let ranged = req.headers().contains_key(hyper::header::RANGE);
    let conditional = req.headers().contains_key(hyper::header::IF_NONE_MATCH)
        && s.faults.lock().is_ok_and(|f| f.ignore_conditions);
    let (fault, latency) = pick(&s, ranged, reused);
    if !matches!(fault, Fault::None) {
        c.faults.fetch_add(1, Ordering::Relaxed);
    }
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match fault {
        Fault::DropBefore => return Err(Dropped),
        Fault::CutReused => {
            // The rest of the body is left unread: the kernel answers the
            // client's next segments with a reset.
            let mut body = req.into_body();
            let _ = body.frame().await;
            return Err(Dropped);
        }
        Fault::SlowDown => return Ok(s3_error(StatusCode::SERVICE_UNAVAILABLE, "SlowDown")),
        Fault::Internal => return Ok(s3_error(StatusCode::INTERNAL_SERVER_ERROR, "InternalError")),
        _ => {}
    }
    let (mut parts, body) = req.into_parts();
    let body = body.collect().await.map_err(|_| Dropped)?.to_bytes();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = format!("http://{}{path}", s.upstream)
        .parse()
        .map_err(|_| Dropped)?;
    let answer = s
        .client
        .request(Request::from_parts(parts, Full::new(body)))
        .await
        .map_err(|_| Dropped)?;
    if conditional
        && matches!(
            answer.status(),
            StatusCode::PRECONDITION_FAILED | StatusCode::NOT_MODIFIED
        )
    {
        let mut r = Response::new(Answer::whole(Bytes::new()));
        r.headers_mut().insert(
            hyper::header::ETAG,
            hyper::header::HeaderValue::from_static("\"ignored\""),
        );
        return Ok(r);
    }
    let (parts, body) = answer.into_parts();
    let mut bytes = body
        .collect()
        .await
        .map_err(|_| Dropped)?
        .to_bytes()
        .to_vec();
    let mut cut = false;
    match fault {
        Fault::DropAfter => return Err(Dropped),
        // The headers keep the whole length, and the body stops halfway.
        Fault::Truncate if bytes.len() > 1 => {
            bytes.truncate(bytes.len() / 2);
            cut = true;
        }
        Fault::Corrupt if !bytes.is_empty() => {
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0x20;
        }
        _ => {}
    }
    let body = Answer {
        data: Some(Bytes::from(bytes)),
        cut,
    };
    Ok(Response::from_parts(parts, body))
}
