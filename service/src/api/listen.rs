//! The API's accept loop, built so that no local user can starve it.
//!
//! axum's own `serve` keeps every connection for as long as the client
//! likes: 1,100 idle connections took the open-files limit, and a client
//! with the token then waited in vain. Here:
//! - a request's head must arrive within [`HEADER_TIMEOUT`] of the
//!   connection's start or of the previous answer (hyper's header-read
//!   timeout, which also bounds an idle kept-alive connection), so slow
//!   or silent clients are closed;
//! - at most [`MAX_CONNECTIONS`] are open; one more closes the oldest
//!   connection with no request in flight (a client that sends nothing,
//!   or a header a byte at a time), so a new client is always served;
//! - a failed accept (out of file descriptors) closes the oldest idle
//!   connection and goes on, instead of spinning or stopping.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::{watch, Notify};

/// How long a client has to send a request's head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections open at once: well under the open-files limit the service
/// raises itself to, and far past what an operator's tools open.
pub const MAX_CONNECTIONS: usize = 512;

/// One open connection: whether a request is in flight, and how to close it.
struct Slot {
    busy: Arc<AtomicUsize>,
    close: Arc<Notify>,
}

#[derive(Default)]
struct Open {
    next: u64,
    /// By id, so the first is the oldest.
    slots: BTreeMap<u64, Slot>,
}

fn lock(open: &Mutex<Open>) -> MutexGuard<'_, Open> {
    // A slot table is plain data: a panic elsewhere leaves it usable.
    open.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Open {
    /// Closes the oldest connection with no request in flight; false when
    /// every one is busy.
    fn close_oldest_idle(&mut self) -> bool {
        let idle = self
            .slots
            .iter()
            .find(|(_, s)| s.busy.load(Ordering::Acquire) == 0)
            .map(|(&id, _)| id);
        match idle.and_then(|id| self.slots.remove(&id)) {
            Some(s) => {
                s.close.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Serves `app` on `listener` until `stop` turns true, then lets the
/// requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let open = Arc::new(Mutex::new(Open::default()));
    let mut tasks = tokio::task::JoinSet::new();
    let (closing, closed) = watch::channel(false);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Most often out of descriptors: make room, and breathe.
                lock(&open).close_oldest_idle();
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (id, busy, close) = {
            let mut o = lock(&open);
            if o.slots.len() >= MAX_CONNECTIONS && !o.close_oldest_idle() {
                // Every connection is answering a request: this one waits
                // for none of them.
                continue;
            }
            let (id, busy, close) = (o.next, Arc::default(), Arc::default());
            o.next += 1;
            let slot = Slot {
                busy: Arc::clone(&busy),
                close: Arc::clone(&close),
            };
            o.slots.insert(id, slot);
            (id, busy, close)
        };
        let app = TowerToHyperService::new(app.clone());
        let open = Arc::clone(&open);
        let mut closed = closed.clone();
        tasks.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let busy = Arc::clone(&busy);
                busy.fetch_add(1, Ordering::AcqRel);
                let call = hyper::service::Service::call(&app, req);
                async move {
                    let answer = call.await;
                    busy.fetch_sub(1, Ordering::AcqRel);
                    answer
                }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(true);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                // Closed to make room: dropped at once.
                _ = close.notified() => {}
                _ = closed.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            lock(&open).slots.remove(&id);
        });
        // Reap what ended, so the set does not grow with the service's life.
        while tasks.try_join_next().is_some() {}
    }
    let _ = closing.send(true);
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Raises this process's soft limit on open files to its hard limit, so
/// that the connection cap, not the limit, decides: 1,024 is many
/// distributions' default, and systemd's `LimitNOFILE` may not be set.
pub fn raise_open_files_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
    }
}
