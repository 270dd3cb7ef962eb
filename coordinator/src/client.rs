//! The coordinator's end of one agent connection: requests with ids and
//! deadlines. A reply that arrives after its request timed out carries an
//! old id and is skipped, which is what `sync` after a time-out is for.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncWriteExt, BufReader, ReadHalf, WriteHalf};

use crate::error::{Error, ErrorKind, Result};
use crate::protocol::transport::{self, BoxStream, Endpoint};
use crate::protocol::{self, Hello, Op, Reply, Request, PROTOCOL_VERSION};

pub struct AgentClient {
    endpoint: Endpoint,
    reader: BufReader<ReadHalf<BoxStream>>,
    writer: WriteHalf<BoxStream>,
    next_id: u64,
}

impl AgentClient {
    /// Connects and says hello (with the token, over TCP). Returns the
    /// client and the agent's hello reply.
    pub async fn connect(endpoint: &Endpoint, token: Option<String>) -> Result<(Self, Value)> {
        let stream = transport::connect(endpoint).await?;
        let (r, w) = tokio::io::split(stream);
        let mut client = AgentClient {
            endpoint: endpoint.clone(),
            reader: BufReader::new(r),
            writer: w,
            next_id: 1,
        };
        let hello = client
            .call(Op::Hello(Hello {
                version: PROTOCOL_VERSION,
                token,
            }))
            .await?;
        let version = hello.get("version").and_then(Value::as_u64).unwrap_or(0);
        if version != u64::from(PROTOCOL_VERSION) {
            return Err(Error::from(ErrorKind::VersionMismatch {
                found: version as u32,
                expected: PROTOCOL_VERSION,
            })
            .at(endpoint.to_string()));
        }
        Ok((client, hello))
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Sends `op` and waits for its reply within the reference's default
    /// timeout for that op.
    pub async fn call(&mut self, op: Op) -> Result<Value> {
        let ms = op.default_timeout_ms();
        self.call_within(op, Duration::from_millis(ms)).await
    }

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
