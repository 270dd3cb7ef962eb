//! The channel qemu-ga and QMP share: one JSON object a line over a unix
//! socket, `{"execute": CMD, "arguments": …}` out, `{"return": …}` or
//! `{"error": {"class", "desc"}}` back, each line bounded, each exchange
//! within a time limit. What differs (qemu-ga's resynchronisation, QMP's
//! greeting, ids and events) stays with each client.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, ReadHalf, WriteHalf};

use crate::error::{Error, ErrorKind, Result};
use vsnap_protocol::transport::{self, BoxStream, Endpoint};
use vsnap_protocol::ErrorClass;

pub(crate) struct Channel {
    /// The peer as errors name it: `qga:PATH`, `qmp:PATH`.
    at: String,
    /// What one of its lines is, for a message about one that does not
    /// parse: `qga reply`, `QMP message`.
    line_is: &'static str,
    reader: BufReader<ReadHalf<BoxStream>>,
    writer: WriteHalf<BoxStream>,
}

impl Channel {
    /// Connects to the socket at `path`; a failure is named `at`.
    pub(crate) async fn connect(
        path: &Path,
        at: String,
        line_is: &'static str,
    ) -> std::result::Result<Channel, (Error, String)> {
        match transport::connect(&Endpoint::Unix(path.to_path_buf())).await {
            Ok(stream) => {
                let (r, w) = tokio::io::split(stream);
                Ok(Channel {
                    at,
                    line_is,
                    reader: BufReader::new(r),
                    writer: w,
                })
            }
            Err(e) => Err((e.into(), at)),
        }
    }

    pub(crate) fn at(&self) -> &str {
        &self.at
    }

    /// Writes `prefix` (qemu-ga's 0xFF) and `msg` as one line.
    pub(crate) async fn send(&mut self, prefix: &[u8], msg: &Value) -> Result<()> {
        let mut line = prefix.to_vec();
        line.extend_from_slice(msg.to_string().as_bytes());
        line.push(b'\n');
        self.writer.write_all(&line).await?;
        Ok(())
    }

    /// The next line, parsed. A line past the protocol's bound is cut
    /// there (and fails to parse); the end of the stream is `Closed`.
    /// qemu-ga may put its delimiter's 0xFF right before a reply: it is
    /// skipped.
    pub(crate) async fn read(&mut self) -> Result<Value> {
        let mut line = Vec::new();
        let mut limited = (&mut self.reader).take(vsnap_protocol::MAX_LINE as u64);
        if limited.read_until(b'\n', &mut line).await? == 0 {
            return Err(ErrorKind::Closed.into());
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_start_matches('\u{FFFD}').trim();
        serde_json::from_str(text).map_err(|e| {
            ErrorKind::Protocol(format!("unreadable {} {text:?}: {e}", self.line_is)).into()
        })
    }
}

/// `{"execute": cmd, "arguments": args, "id": id}`, without what is
/// `None`.
pub(crate) fn request(cmd: &str, args: Option<Value>, id: Option<u64>) -> Value {
    let mut req = json!({ "execute": cmd });
    if let Some(a) = args {
        req["arguments"] = a;
    }
    if let Some(id) = id {
        req["id"] = id.into();
    }
    req
}

/// A reply's `return`, or its `error` as the peer's failure, classed by
/// `class_of` (the peer's class name, in the retry rules' terms).
pub(crate) fn answer(reply: &Value, class_of: fn(&str) -> ErrorClass) -> Result<Value> {
    if let Some(r) = reply.get("return") {
        return Ok(r.clone());
    }
    let e = reply.get("error").unwrap_or(&Value::Null);
    let class = e
        .get("class")
        .and_then(Value::as_str)
        .unwrap_or("GenericError");
    let desc = e
        .get("desc")
        .and_then(Value::as_str)
        .unwrap_or("no description");
    Err(Error::from(ErrorKind::Agent {
        class: class_of(class),
        message: format!("{class}: {desc}"),
        mount: None,
    }))
}

/// `op` took longer than `limit`.
pub(crate) fn timed_out(op: impl Into<String>, limit: Duration) -> Error {
    Error::from(ErrorKind::Timeout {
        op: op.into(),
        ms: u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
    })
}
