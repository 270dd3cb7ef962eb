//! The guest side: vsnap's Backup integration service. It answers the
//! coordinator's operations, runs the guest's writers (exec hooks, then
//! fsfreeze) and guarantees that a freeze never outlives its hold limit:
//! the watchdog thaws by itself, a marker lets a restarted agent thaw what
//! a dead one left, and nothing is written to disk while frozen (log lines
//! wait in memory until the thaw).

pub mod cli;
mod config;
mod freezer;
mod fsctl;
mod hooks;
pub mod mounts;
pub mod rcu;
mod session;

pub use config::{
    parse_duration, AgentConfig, FileConfig, Flags, FreezeSet, DEFAULT_HELLO_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
};
pub use hooks::{Action, Hooks};

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncWriteExt, BufReader};

use session::Session;
use vsnap_protocol::serial as transport_serial;
use vsnap_protocol::transport::{self, BoxStream, Listener};
use vsnap_protocol::{
    self as protocol, read_token, ErrorClass, Op, Reply, WireError, PROTOCOL_VERSION,
};
pub use vsnap_protocol::{Error, ErrorKind, Result};

/// Lines held while frozen, at most; a peer that makes the agent log
/// (a flood of bad connections, say) cannot grow its memory without bound.
pub const JOURNAL_HELD_LINES: usize = 10_000;

/// Log lines, held while frozen: stderr may be a file on a frozen disk.
#[derive(Debug, Default)]
pub struct Journal {
    inner: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    holding: bool,
    lines: Vec<String>,
    dropped: u64,
}

impl Journal {
    pub fn log(&self, line: impl Into<String>) {
        let line = format!("vsnap agent: {}", line.into());
        match self.inner.lock() {
            Ok(mut g) if g.holding => {
                if g.lines.len() < JOURNAL_HELD_LINES {
                    g.lines.push(line);
                } else {
                    g.dropped += 1;
                }
            }
            _ => eprintln!("{line}"),
        }
    }

    fn hold(&self) {
        if let Ok(mut g) = self.inner.lock() {
            g.holding = true;
        }
    }

    fn release(&self) {
        let (held, dropped) = match self.inner.lock() {
            Ok(mut g) => {
                g.holding = false;
                (std::mem::take(&mut g.lines), std::mem::take(&mut g.dropped))
            }
            Err(_) => (Vec::new(), 0),
        };
        for l in held {
            eprintln!("{l}");
        }
        if dropped > 0 {
            eprintln!(
                "vsnap agent: {dropped} log lines dropped while frozen (at most {JOURNAL_HELD_LINES} are held)"
            );
        }
    }
}

/// A running agent: the listener and the one session every connection
/// shares (a coordinator that reconnects after a time-out finds the
/// freeze it left).
pub struct Agent {
    listener: Listener,
    token: Option<Vec<u8>>,
    session: Arc<Session>,
    max_connections: usize,
    hello_timeout: std::time::Duration,
}

impl Agent {
    /// Checks the configuration, thaws whatever a dead agent's marker
    /// names, and binds. Nothing is frozen yet.
    pub async fn start(cfg: AgentConfig) -> Result<Agent> {
        let journal = Arc::new(Journal::default());
        let marker = freezer::Marker {
            path: cfg.marker.clone(),
        };
        match marker.recover() {
            Ok(recovered) => {
                match recovered.rcu {
                    Some(Ok(())) => journal.log(format!(
                        "reset {} (a previous agent died while it was on)",
                        rcu::KNOB
                    )),
                    Some(Err(e)) => journal.log(format!("could not reset {}: {e}", rcu::KNOB)),
                    None => {}
                }
                for (m, r) in recovered.thawed {
                    match r {
                        Ok(()) => journal.log(format!(
                            "thawed {} (a previous agent died while it was frozen)",
                            m.display()
                        )),
                        Err(e) => journal.log(format!("could not thaw {}: {e}", m.display())),
                    }
                }
            }
            Err(e) => {
                return Err(Error::from(e)
                    .at(cfg.marker.display().to_string())
                    .during("recover from the freeze marker"))
            }
        }
        let selection = cfg.select()?;
        cfg.check_marker_outside(&selection)?;
        let listener = Listener::bind(&cfg.listen).await?;
        let token = match (&cfg.token_file, listener.needs_token()) {
            (Some(f), _) => Some(read_token(f)?),
            (None, true) => {
                return Err(ErrorKind::Config(
                    "a tcp listener needs --token-file: TCP is refused without a token".into(),
                )
                .into())
            }
            (None, false) => None,
        };
        for s in &selection.skipped {
            journal.log(format!(
                "will not freeze {}: {}",
                s.mount.display(),
                s.reason
            ));
        }
        let (max_connections, hello_timeout) = (cfg.max_connections, cfg.hello_timeout);
        let session = Arc::new(Session::new(cfg, marker, journal));
        Ok(Agent {
            listener,
            token,
            session,
            max_connections,
            hello_timeout,
        })
    }

    /// The address bound, with a TCP port 0 resolved.
    pub fn local(&self) -> String {
        self.listener.local()
    }

    /// Serves until SIGINT or SIGTERM; a freeze still held then is thawed
    /// before returning.
    ///
    /// Connections are accepted at once, so the kernel's backlog never
    /// fills behind idle peers, but at most `max_connections` stay open:
    /// when another arrives at the cap, the oldest connection that has not
    /// authenticated yet is closed to make room (a coordinator says hello
    /// as soon as it connects, so it is never the oldest for long), and if
    /// every open one has authenticated, the newcomer is told the agent is
    /// busy. When accept fails for want of descriptors (EMFILE, ENFILE) or
    /// memory, the agent waits before it tries again, and logs the first
    /// failure and then only how many followed, instead of spinning.
    pub async fn serve(self) -> Result<()> {
        if let Listener::Serial(path) = &self.listener {
            let path = path.clone();
            return self.serve_serial(path).await;
        }
        let token = Arc::new(self.token);
        let conns = Arc::new(Mutex::new(Conns::default()));
        let (max, hello_timeout) = (self.max_connections, self.hello_timeout);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut failures = 0u64;
        loop {
            tokio::select! {
                conn = self.listener.accept() => match conn {
                    Ok((stream, peer)) => {
                        if failures > 1 {
                            self.session
                                .journal()
                                .log(format!("accept: {} more failures before this one", failures - 1));
                        }
                        failures = 0;
                        let Some(admitted) = Conns::admit(&conns, max, token.is_some()) else {
                            tokio::spawn(refuse_busy(stream, max));
                            continue;
                        };
                        let session = Arc::clone(&self.session);
                        let token = Arc::clone(&token);
                        tokio::spawn(async move {
                            let r = handle(stream, &session, token.as_deref(), hello_timeout, &admitted).await;
                            if let Err(e) = r {
                                session.journal().log(format!("{peer}: {e}"));
                            }
                        });
                    }
                    Err(e) => {
                        failures += 1;
                        if failures == 1 {
                            self.session.journal().log(format!("accept: {e}; backing off"));
                        }
                        tokio::time::sleep(accept_backoff(failures)).await;
                    }
                },
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
            }
        }
        self.session.shutdown().await;
        Ok(())
    }
}

impl Agent {
    /// Serves a virtio-serial port: one session after another over the
    /// same device, as host clients come and go. The port belongs to the
    /// VM, so there is no token, and no cap (one host end at a time).
    async fn serve_serial(self, path: std::path::PathBuf) -> Result<()> {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let session = Arc::clone(&self.session);
        let hello_timeout = self.hello_timeout;
        let conns = Arc::new(Mutex::new(Conns::default()));
        let served = transport_serial::serve(&path, move |stream| {
            let session = Arc::clone(&session);
            let conns = Arc::clone(&conns);
            async move {
                let Some(admitted) = Conns::admit(&conns, 1, false) else {
                    return;
                };
                if let Err(e) = handle(stream, &session, None, hello_timeout, &admitted).await {
                    session.journal().log(format!("serial: {e}"));
                }
            }
        });
        let outcome = tokio::select! {
            r = served => r.map_err(|e| Error::from(e).at(format!("serial:{}", path.display()))),
            _ = tokio::signal::ctrl_c() => Ok(()),
            _ = term.recv() => Ok(()),
        };
        self.session.shutdown().await;
        outcome
    }
}

/// The open connections: how many, and those still waiting to
/// authenticate, oldest first, each with the signal that closes it.
#[derive(Default)]
struct Conns {
    open: usize,
    next: u64,
    unauthenticated: std::collections::BTreeMap<u64, Arc<tokio::sync::Notify>>,
}

/// One admitted connection's place in [`Conns`], given back when dropped.
struct Admitted {
    conns: Arc<Mutex<Conns>>,
    id: u64,
    /// Notified when the connection must close to make room.
    evict: Option<Arc<tokio::sync::Notify>>,
}

impl Conns {
    /// Admits a connection, evicting the oldest unauthenticated one at the
    /// cap; `None` when every open connection has authenticated.
    fn admit(conns: &Arc<Mutex<Conns>>, max: usize, needs_auth: bool) -> Option<Admitted> {
        let mut c = conns.lock().ok()?;
        if c.open >= max {
            let (_, oldest) = c.unauthenticated.pop_first()?;
            oldest.notify_one();
        }
        c.open += 1;
        c.next += 1;
        let id = c.next;
        let evict = needs_auth.then(|| {
            let n = Arc::new(tokio::sync::Notify::new());
            c.unauthenticated.insert(id, Arc::clone(&n));
            n
        });
        Some(Admitted {
            conns: Arc::clone(conns),
            id,
            evict,
        })
    }
}

impl Admitted {
    /// The connection has authenticated: it is no longer evicted.
    fn authenticated(&self) {
        if let Ok(mut c) = self.conns.lock() {
            c.unauthenticated.remove(&self.id);
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Ok(mut c) = self.conns.lock() {
            c.unauthenticated.remove(&self.id);
            c.open = c.open.saturating_sub(1);
        }
    }
}

/// Tells a connection over the cap why it is closed.
async fn refuse_busy(mut stream: BoxStream, max: usize) {
    let e = WireError::new(
        ErrorClass::OutOfResources,
        format!("the agent has {max} connections open, all authenticated; try again later"),
    );
    let _ = stream
        .write_all(&protocol::to_line(&Reply::err(None, e)))
        .await;
}

/// How long to wait after the `n`th failed accept in a row: 10 ms, doubling
/// up to 640 ms, so a passing shortage costs little and a lasting one
/// costs no CPU.
fn accept_backoff(n: u64) -> std::time::Duration {
    std::time::Duration::from_millis(10u64 << (n.clamp(1, 7) - 1))
}

async fn handle(
    stream: BoxStream,
    session: &Arc<Session>,
    token: Option<&[u8]>,
    hello_timeout: std::time::Duration,
    admitted: &Admitted,
) -> Result<()> {
    let (r, mut w) = tokio::io::split(stream);
    let mut r = BufReader::new(r);
    let mut authed = token.is_none();
    let hello_by = tokio::time::Instant::now() + hello_timeout;
    let never = Arc::new(tokio::sync::Notify::new());
    let evict = admitted.evict.as_ref().unwrap_or(&never);
    loop {
        // Until it has authenticated, a connection has until `hello_by` to
        // say hello, and is closed sooner if newer ones need its place.
        let read = transport::read_line(&mut r);
        let read = if authed {
            read.await
        } else {
            let outcome = tokio::select! {
                r = tokio::time::timeout_at(hello_by, read) => r.map_err(|_| {
                    format!(
                        "no hello within {}; closing",
                        humantime::format_duration(hello_timeout)
                    )
                }),
                _ = evict.notified() => Err(
                    "closed to make room for newer connections; say hello first".to_owned(),
                ),
            };
            match outcome {
                Ok(r) => r,
                Err(why) => {
                    let e = WireError::new(ErrorClass::Unauthorized, why);
                    let _ = w.write_all(&protocol::to_line(&Reply::err(None, e))).await;
                    return Ok(());
                }
            }
        };
        let line = match read {
            Ok(Some(l)) => l,
            Ok(None) => return Ok(()),
            Err(e) => {
                let reply = Reply::err(None, WireError::new(ErrorClass::Protocol, e.to_string()));
                let _ = w.write_all(&protocol::to_line(&reply)).await;
                return Err(e.into());
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let (reply, close) = match protocol::parse_request(&line) {
            Err(reply) => (reply, false),
            Ok(req) => match (&req.op, authed) {
                (Op::Hello(h), _) if h.version != PROTOCOL_VERSION => (
                    Reply::err(
                        Some(req.id),
                        WireError::new(
                            ErrorClass::Protocol,
                            format!(
                                "protocol version {} is not supported; this agent speaks {PROTOCOL_VERSION}",
                                h.version
                            ),
                        ),
                    ),
                    false,
                ),
                (Op::Hello(h), false) => {
                    let given = h.token.as_deref().unwrap_or("").as_bytes();
                    if token.is_some_and(|t| config::token_matches(t, given)) {
                        authed = true;
                        admitted.authenticated();
                        (session.dispatch(req).await, false)
                    } else {
                        let e = WireError::new(ErrorClass::Unauthorized, "wrong or missing token");
                        (Reply::err(Some(req.id), e), true)
                    }
                }
                (_, false) => (
                    Reply::err(
                        Some(req.id),
                        WireError::new(
                            ErrorClass::Unauthorized,
                            "send hello with the token first; every operation is refused before it",
                        ),
                    ),
                    false,
                ),
                (_, true) => (session.dispatch(req).await, false),
            },
        };
        w.write_all(&protocol::to_line(&reply)).await?;
        w.flush().await?;
        if close {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_journal_holds_a_bounded_number_of_lines_while_frozen() {
        let j = Journal::default();
        j.hold();
        for i in 0..JOURNAL_HELD_LINES + 25 {
            j.log(format!("line {i}"));
        }
        {
            let g = j.inner.lock().unwrap();
            assert_eq!(g.lines.len(), JOURNAL_HELD_LINES);
            assert_eq!(g.dropped, 25);
            assert_eq!(g.lines[0], "vsnap agent: line 0");
        }
        j.release();
        let g = j.inner.lock().unwrap();
        assert!(!g.holding && g.lines.is_empty() && g.dropped == 0);
    }

    #[test]
    fn accept_backs_off_from_10ms_to_640ms() {
        assert_eq!(accept_backoff(1), std::time::Duration::from_millis(10));
        assert_eq!(accept_backoff(2), std::time::Duration::from_millis(20));
        assert_eq!(accept_backoff(7), std::time::Duration::from_millis(640));
        assert_eq!(accept_backoff(1000), std::time::Duration::from_millis(640));
    }
}
