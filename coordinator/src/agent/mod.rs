//! The guest side: vsnap's Backup integration service. It answers the
//! coordinator's operations, runs the guest's writers (exec hooks, then
//! fsfreeze) and guarantees that a freeze never outlives its hold limit:
//! the watchdog thaws by itself, a marker lets a restarted agent thaw what
//! a dead one left, and nothing is written to disk while frozen (log lines
//! wait in memory until the thaw).

mod config;
mod freezer;
mod hooks;
pub mod mounts;
mod session;

pub use config::{
    parse_duration, read_token, AgentConfig, FileConfig, Flags, FreezeSet, DEFAULT_HELLO_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
};
pub use hooks::{Action, Hooks};

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncWriteExt, BufReader};

use crate::error::{Error, ErrorKind, Result};
use crate::protocol::transport::{self, BoxStream, Listener};
use crate::protocol::{self, ErrorClass, Op, Reply, WireError, PROTOCOL_VERSION};
use session::Session;

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
            Ok(thawed) => {
                for (m, r) in thawed {
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
    /// A connection is accepted only once a slot is free, so at most
    /// `max_connections` descriptors go to peers. When accept fails for
    /// want of descriptors (EMFILE, ENFILE) or memory, the agent waits
    /// before it tries again, and logs the first failure and then only
    /// how many followed, instead of spinning on the error.
    pub async fn serve(self) -> Result<()> {
        let token = Arc::new(self.token);
        let slots = Arc::new(tokio::sync::Semaphore::new(self.max_connections));
        let hello_timeout = self.hello_timeout;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut failures = 0u64;
        loop {
            let slot = tokio::select! {
                slot = Arc::clone(&slots).acquire_owned() => match slot {
                    Ok(s) => s,
                    Err(_) => break,
                },
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
            };
            tokio::select! {
                conn = self.listener.accept() => match conn {
                    Ok((stream, peer)) => {
                        if failures > 1 {
                            self.session
                                .journal()
                                .log(format!("accept: {} more failures before this one", failures - 1));
                        }
                        failures = 0;
                        let session = Arc::clone(&self.session);
                        let token = Arc::clone(&token);
                        tokio::spawn(async move {
                            let _slot = slot;
                            if let Err(e) = handle(stream, &session, token.as_deref(), hello_timeout).await {
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
) -> Result<()> {
    let (r, mut w) = tokio::io::split(stream);
    let mut r = BufReader::new(r);
    let mut authed = token.is_none();
    let hello_by = tokio::time::Instant::now() + hello_timeout;
    loop {
        // Until it has authenticated, a connection has until `hello_by` to
        // say hello; an idle one is closed then, and its slot freed.
        let read = transport::read_line(&mut r);
        let read = if authed {
            read.await
        } else {
            match tokio::time::timeout_at(hello_by, read).await {
                Ok(r) => r,
                Err(_) => {
                    let e = WireError::new(
                        ErrorClass::Unauthorized,
                        format!(
                            "no hello within {}; closing",
                            humantime::format_duration(hello_timeout)
                        ),
                    );
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
