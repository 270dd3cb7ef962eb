//! The coordinator's end of one agent connection: requests with ids and
//! deadlines. A reply that arrives after its request timed out carries an
//! old id and is skipped, which is what `sync` after a time-out is for.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::io::{AsyncWriteExt, BufReader, ReadHalf, WriteHalf};

use crate::error::{Error, ErrorKind, Result};
use vsnap_protocol::transport::{self, BoxStream, Endpoint};
use vsnap_protocol::{self as protocol, Hello, HelloReply, Op, Reply, Request, PROTOCOL_VERSION};

/// How long a serial channel has to answer the resynchronising `sync`.
pub const RESYNC_LIMIT: Duration = Duration::from_secs(2);

pub struct AgentClient {
    endpoint: Endpoint,
    reader: BufReader<ReadHalf<BoxStream>>,
    writer: WriteHalf<BoxStream>,
    next_id: u64,
}

impl AgentClient {
    /// Connects and says hello (with the token, over TCP). Returns the
    /// client and the agent's hello reply.
    pub async fn connect(endpoint: &Endpoint, token: Option<String>) -> Result<(Self, HelloReply)> {
        let stream = transport::connect(endpoint).await?;
        let (r, w) = tokio::io::split(stream);
        let mut client = AgentClient {
            endpoint: endpoint.clone(),
            reader: BufReader::new(r),
            writer: w,
            next_id: 1,
        };
        if endpoint.is_serial() {
            client.resync().await?;
        }
        let op = Op::Hello(Hello {
            version: PROTOCOL_VERSION,
            token,
        });
        let limit = Duration::from_millis(op.default_timeout_ms());
        // The version first: another version's hello may differ in shape.
        let raw = client.call_within(op, limit).await?;
        let version = raw.get("version").and_then(Value::as_u64).unwrap_or(0);
        if version != u64::from(PROTOCOL_VERSION) {
            return Err(Error::from(ErrorKind::VersionMismatch {
                found: u32::try_from(version).unwrap_or(u32::MAX),
                expected: PROTOCOL_VERSION,
            })
            .at(endpoint.to_string()));
        }
        let hello = decode("hello", raw).map_err(|e| e.at(endpoint.to_string()))?;
        Ok((client, hello))
    }

    /// Over a serial channel the agent's end outlives every client: the
    /// last one may have left half a request in it, or replies nobody
    /// read. A newline ends any such line; a `sync` with an id no earlier
    /// client used, and everything before its reply skipped, leaves the
    /// channel clean. Within [`RESYNC_LIMIT`], or the channel is not
    /// answering (another client may hold QEMU's chardev, which takes one
    /// at a time).
    async fn resync(&mut self) -> Result<()> {
        let id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1 << 40, |d| d.as_nanos() as u64 | 1 << 40);
        let at = self.endpoint.to_string();
        let work = async {
            let mut line = b"\n".to_vec();
            line.extend(protocol::to_line(&Request { id, op: Op::Sync }));
            self.writer.write_all(&line).await?;
            self.writer.flush().await?;
            loop {
                let text = match transport::read_line(&mut self.reader).await {
                    Ok(Some(t)) => t,
                    Ok(None) => return Err(Error::from(ErrorKind::Closed)),
                    // A stale line cut short, or not text: skipped.
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidData => continue,
                    Err(e) => return Err(e.into()),
                };
                if serde_json::from_str::<Reply>(&text).is_ok_and(|r| r.id == Some(id)) {
                    return Ok(());
                }
            }
        };
        match tokio::time::timeout(RESYNC_LIMIT, work).await {
            Ok(r) => r.map_err(|e| e.at(at).during("resynchronise")),
            Err(_) => Err(Error::from(ErrorKind::Timeout {
                op: "sync".into(),
                ms: RESYNC_LIMIT.as_millis() as u64,
            })
            .at(at)
            .during("resynchronise (is another client holding the chardev?)")),
        }?;
        self.next_id = id + 1;
        Ok(())
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Sends `op` and reads its reply as `R`, the reply type of that op.
    pub async fn call_as<R: DeserializeOwned>(&mut self, op: Op, limit: Duration) -> Result<R> {
        let name = op.name();
        let v = self.call_within(op, limit).await?;
        decode(name, v).map_err(|e| e.at(self.endpoint.to_string()))
    }

    /// Sends `op` and waits, at most `limit`, for its reply's body.
    pub async fn call_within(&mut self, op: Op, limit: Duration) -> Result<Value> {
        let name = op.name();
        let id = self.next_id;
        self.next_id += 1;
        let at = self.endpoint.to_string();
        let line = protocol::to_line(&Request { id, op });
        let exchange = async {
            self.writer.write_all(&line).await?;
            self.writer.flush().await?;
            loop {
                let Some(text) = transport::read_line(&mut self.reader).await? else {
                    return Err(Error::from(ErrorKind::Closed));
                };
                let reply: Reply = serde_json::from_str(&text).map_err(|e| {
                    Error::from(ErrorKind::Protocol(format!("unreadable reply: {e}")))
                })?;
                match reply.id {
                    // A late answer to a request that already timed out.
                    Some(rid) if rid < id => continue,
                    Some(rid) if rid > id => {
                        return Err(ErrorKind::Protocol(format!(
                            "reply to request {rid}, which was never sent"
                        ))
                        .into())
                    }
                    _ => {}
                }
                return match (reply.ok, reply.err) {
                    (_, Some(e)) => Err(Error::from(ErrorKind::Agent {
                        class: e.class,
                        message: e.message,
                        mount: e.mount,
                    })),
                    (Some(v), None) => Ok(v),
                    (None, None) => {
                        Err(ErrorKind::Protocol("a reply with neither ok nor err".into()).into())
                    }
                };
            }
        };
        match tokio::time::timeout(limit, exchange).await {
            Ok(r) => r.map_err(|e| e.at(at).during(name)),
            Err(_) => Err(Error::from(ErrorKind::Timeout {
                op: name.into(),
                ms: limit.as_millis() as u64,
            })
            .at(at)),
        }
    }
}

/// A reply body as its op's type: a missing required field, or one of the
/// wrong type, is a protocol error that names the op and the field.
fn decode<R: DeserializeOwned>(op: &str, v: Value) -> Result<R> {
    serde_json::from_value(v)
        .map_err(|e| ErrorKind::Protocol(format!("the reply to {op}: {e}")).into())
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncBufReadExt;
    use vsnap_protocol::{Freeze, FreezeReply};

    use super::*;

    /// A peer on a real socket whose freeze reply renamed `frozen`: the
    /// call fails naming the op and the field, instead of reading "none
    /// frozen".
    #[tokio::test]
    async fn a_reply_missing_a_required_field_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let peer = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = tokio::io::split(s);
            let mut r = BufReader::new(r);
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            w.write_all(b"{\"id\":1,\"ok\":{\"version\":1,\"agent\":\"peer\",\"state\":\"IDLE\",\"new\":1}}\n")
                .await
                .unwrap();
            line.clear();
            r.read_line(&mut line).await.unwrap();
            w.write_all(b"{\"id\":2,\"ok\":{\"froze\":1,\"expected\":1}}\n")
                .await
                .unwrap();
        });
        let (mut c, hello) = AgentClient::connect(&Endpoint::Unix(path), None)
            .await
            .unwrap();
        assert_eq!(hello.agent, "peer", "an unknown field is tolerated");
        let e = c
            .call_as::<FreezeReply>(Op::Freeze(Freeze::default()), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e.kind, ErrorKind::Protocol(_)), "{e}");
        assert!(
            e.to_string()
                .contains("the reply to freeze: missing field `frozen`"),
            "{e}"
        );
        peer.await.unwrap();
    }
}
