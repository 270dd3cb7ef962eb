//! Where agents listen and how the coordinator reaches them: a unix socket
//! (the default), AF_VSOCK (KVM's vhost-vsock, Hyper-V sockets), TCP
//! (token required), or the hypervisor's serial channel: a virtio-serial
//! port, a character device in the guest and QEMU's chardev socket on the
//! host. All four carry the same newline-delimited frames.

use std::fmt;
use std::path::PathBuf;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};

use crate::error::{Error, ErrorKind, Result};
use crate::MAX_LINE;

/// An address: `unix:PATH`, `vsock:PORT` to listen (any CID) or
/// `vsock:CID:PORT` to connect, `tcp:HOST:PORT`, or `serial:PATH`: in the
/// guest the virtio-serial port's device (`/dev/virtio-ports/NAME`), on
/// the host the unix socket of QEMU's chardev for that port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Vsock { cid: u32, port: u32 },
    Tcp(String),
    Serial(PathBuf),
}

impl Endpoint {
    /// Parses an address to listen on.
    pub fn listen(spec: &str) -> Result<Endpoint> {
        Self::parse(spec, true)
    }

    /// Parses an address to connect to.
    pub fn connect(spec: &str) -> Result<Endpoint> {
        Self::parse(spec, false)
    }

    fn parse(spec: &str, listen: bool) -> Result<Endpoint> {
        let bad = |reason: &str| {
            Error::from(ErrorKind::BadEndpoint {
                spec: spec.into(),
                reason: reason.into(),
            })
        };
        let (scheme, rest) = spec.split_once(':').ok_or_else(|| {
            bad("expected unix:PATH, vsock:[CID:]PORT, tcp:HOST:PORT or serial:PATH")
        })?;
        match scheme {
            "unix" if !rest.is_empty() => Ok(Endpoint::Unix(PathBuf::from(rest))),
            "unix" => Err(bad("unix: needs a socket path")),
            "serial" if !rest.is_empty() => Ok(Endpoint::Serial(PathBuf::from(rest))),
            "serial" => Err(bad(
                "serial: needs the port's device in the guest (/dev/virtio-ports/NAME) or its chardev socket on the host",
            )),
            "vsock" => {
                let num = |s: &str, what: &str| {
                    s.parse::<u32>()
                        .map_err(|_| bad(&format!("{what} {s:?} is not a number")))
                };
                match (listen, rest.split_once(':')) {
                    (true, None) => Ok(Endpoint::Vsock {
                        cid: tokio_vsock::VMADDR_CID_ANY,
                        port: num(rest, "port")?,
                    }),
                    (_, Some((cid, port))) => Ok(Endpoint::Vsock {
                        cid: num(cid, "CID")?,
                        port: num(port, "port")?,
                    }),
                    (false, None) => Err(bad("connecting needs vsock:CID:PORT")),
                }
            }
            "tcp" => {
                let (host, port) = rest
                    .rsplit_once(':')
                    .ok_or_else(|| bad("tcp: needs HOST:PORT"))?;
                if host.is_empty() || port.parse::<u16>().is_err() {
                    return Err(bad("tcp: needs HOST:PORT with a port from 0 to 65535"));
                }
                Ok(Endpoint::Tcp(rest.into()))
            }
            _ => Err(bad(
                "unknown scheme; expected unix:PATH, vsock:[CID:]PORT, tcp:HOST:PORT or serial:PATH",
            )),
        }
    }

    /// TCP reaches beyond the machine, so it alone requires a token. A
    /// serial port belongs to its VM, like qemu-ga's channel.
    pub fn needs_token(&self) -> bool {
        matches!(self, Endpoint::Tcp(_))
    }

    /// A channel whose host end may change hands mid-exchange: a client
    /// resynchronises before its first request.
    pub fn is_serial(&self) -> bool {
        matches!(self, Endpoint::Serial(_))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
            Endpoint::Serial(p) => write!(f, "serial:{}", p.display()),
        }
    }
}

pub use crate::{BoxStream, Stream};

pub enum Listener {
    Unix(tokio::net::UnixListener, PathBuf),
    Tcp(tokio::net::TcpListener),
    Vsock(tokio_vsock::VsockListener),
    /// A serial port's device, checked to open read-write. It has no
    /// connections to accept: the agent serves it with [`crate::serial`].
    Serial(PathBuf),
}

impl Listener {
    pub async fn bind(at: &Endpoint) -> Result<Listener> {
        let ctx = |e: std::io::Error| Error::from(e).at(at.to_string()).during("listen");
        Ok(match at {
            Endpoint::Unix(path) => {
                remove_stale_socket(path).await.map_err(ctx)?;
                let l = tokio::net::UnixListener::bind(path).map_err(ctx)?;
                Listener::Unix(l, path.clone())
            }
            Endpoint::Tcp(addr) => {
                Listener::Tcp(tokio::net::TcpListener::bind(addr).await.map_err(ctx)?)
            }
            Endpoint::Vsock { cid, port } => Listener::Vsock(
                tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(*cid, *port))
                    .map_err(ctx)?,
            ),
            Endpoint::Serial(path) => {
                crate::serial::open_device(path).map_err(ctx)?;
                Listener::Serial(path.clone())
            }
        })
    }

    /// The address actually bound (a TCP port 0 becomes the real one).
    pub fn local(&self) -> String {
        match self {
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| format!("tcp:{a}"))
                .unwrap_or_else(|_| "tcp:?".into()),
            Listener::Vsock(l) => l
                .local_addr()
                .map(|a| match a.cid() {
                    tokio_vsock::VMADDR_CID_ANY => format!("vsock:{}", a.port()),
                    cid => format!("vsock:{cid}:{}", a.port()),
                })
                .unwrap_or_else(|_| "vsock:?".into()),
            Listener::Serial(p) => format!("serial:{}", p.display()),
        }
    }

    pub fn needs_token(&self) -> bool {
        matches!(self, Listener::Tcp(_))
    }

    pub async fn accept(&self) -> std::io::Result<(BoxStream, String)> {
        Ok(match self {
            Listener::Unix(l, p) => {
                let (s, _) = l.accept().await?;
                (Box::new(s), format!("unix:{}", p.display()))
            }
            Listener::Tcp(l) => {
                let (s, a) = l.accept().await?;
                let _ = s.set_nodelay(true);
                (Box::new(s), format!("tcp:{a}"))
            }
            Listener::Vsock(l) => {
                let (s, a) = l.accept().await?;
                (Box::new(s), format!("vsock:{}:{}", a.cid(), a.port()))
            }
            Listener::Serial(p) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    format!("serial:{} has no connections to accept", p.display()),
                ))
            }
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A socket file left by an agent that died is replaced; a live one, or
/// anything that is not a socket, is not touched.
async fn remove_stale_socket(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket",
        ));
    }
    match tokio::net::UnixStream::connect(path).await {
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another agent is listening on this socket",
        )),
        Err(_) => std::fs::remove_file(path),
    }
}

/// Connects within [`CONNECT_TIMEOUT`]: an agent that does not answer
/// is a timeout (retried), not a hang.
pub async fn connect(to: &Endpoint) -> Result<BoxStream> {
    tokio::time::timeout(CONNECT_TIMEOUT, connect_now(to))
        .await
        .map_err(|_| {
            Error::from(ErrorKind::Timeout {
                op: "connect".into(),
                ms: CONNECT_TIMEOUT.as_millis() as u64,
            })
            .at(to.to_string())
        })?
}

pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

async fn connect_now(to: &Endpoint) -> Result<BoxStream> {
    let ctx = |e: std::io::Error| Error::from(e).at(to.to_string()).during("connect");
    Ok(match to {
        Endpoint::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await.map_err(ctx)?),
        Endpoint::Tcp(a) => {
            let s = tokio::net::TcpStream::connect(a).await.map_err(ctx)?;
            let _ = s.set_nodelay(true);
            Box::new(s)
        }
        Endpoint::Vsock { cid, port } => Box::new(
            tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, *port))
                .await
                .map_err(ctx)?,
        ),
        // QEMU's chardev socket: a unix socket, one client at a time.
        Endpoint::Serial(p) => Box::new(tokio::net::UnixStream::connect(p).await.map_err(ctx)?),
    })
}

/// Reads one line, without its newline. `None` at a clean end of stream;
/// an error for a line over [`MAX_LINE`] or one cut off by the end.
pub async fn read_line<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = r
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        let why = if buf.len() > MAX_LINE {
            format!("a line longer than {MAX_LINE} bytes")
        } else {
            "a line cut off by the end of the stream".into()
        };
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why));
    }
    buf.pop();
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "a line not in UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_bad_ones_say_why() {
        assert_eq!(
            Endpoint::listen("unix:/run/a.sock").unwrap(),
            Endpoint::Unix("/run/a.sock".into())
        );
        assert_eq!(
            Endpoint::listen("vsock:5000").unwrap(),
            Endpoint::Vsock {
                cid: tokio_vsock::VMADDR_CID_ANY,
                port: 5000
            }
        );
        assert_eq!(
            Endpoint::connect("vsock:3:5000").unwrap(),
            Endpoint::Vsock { cid: 3, port: 5000 }
        );
        assert_eq!(
            Endpoint::connect("tcp:127.0.0.1:7000").unwrap(),
            Endpoint::Tcp("127.0.0.1:7000".into())
        );
        assert!(Endpoint::connect("tcp:[::1]:7000").is_ok());
        for (bad, why) in [
            ("/run/a.sock", "expected unix:PATH"),
            ("unix:", "needs a socket path"),
            ("vsock:5000", "needs vsock:CID:PORT"),
            ("vsock:x:1", "CID \"x\" is not a number"),
            ("tcp:host", "needs HOST:PORT"),
            ("tcp:host:99999", "port from 0 to 65535"),
            ("http:x", "unknown scheme"),
            ("serial:", "serial: needs the port's device"),
        ] {
            let e = Endpoint::connect(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(Endpoint::connect("tcp:a:1").unwrap().needs_token());
        assert!(!Endpoint::connect("unix:/a").unwrap().needs_token());
        let s = Endpoint::listen("serial:/dev/virtio-ports/org.vsnap.agent.0").unwrap();
        assert!(s.is_serial() && !s.needs_token());
        assert_eq!(s.to_string(), "serial:/dev/virtio-ports/org.vsnap.agent.0");
    }

    #[tokio::test]
    async fn lines_are_bounded_and_must_end() {
        let long = vec![b'x'; MAX_LINE + 10];
        let mut r = BufReader::new(&long[..]);
        let e = read_line(&mut r).await.unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
        let mut r = BufReader::new(&b"{\"id\":1}\n{\"id\""[..]);
        assert_eq!(
            read_line(&mut r).await.unwrap().as_deref(),
            Some("{\"id\":1}")
        );
        let e = read_line(&mut r).await.unwrap_err();
        assert!(e.to_string().contains("cut off"), "{e}");
        let mut r = BufReader::new(&b""[..]);
        assert_eq!(read_line(&mut r).await.unwrap(), None);
    }
}
