//! The vsnap agent protocol (docs/protocol.md): newline-delimited
//! JSON over a unix socket, AF_VSOCK or TCP.
//!
//! A request is `{"id", "op", "args"}`; a reply `{"id", "ok": …}` or
//! `{"id", "err": {"class", "message", "mount"?}}`. Parsing is a pure
//! function over one line, so malformed input is answered, never fatal.

pub mod error;
pub mod replies;
#[cfg(feature = "transport")]
pub mod serial;
#[cfg(feature = "transport")]
pub mod transport;

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use error::{Error, ErrorKind, Result};

/// A connection to a peer, whatever carries it (unix, vsock, TCP, a
/// virtio-serial port): defined here, below both the transports that make
/// one and the serial port's session loop that serves one.
#[cfg(feature = "transport")]
pub trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
#[cfg(feature = "transport")]
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}
#[cfg(feature = "transport")]
pub type BoxStream = Box<dyn Stream>;
pub use replies::*;

/// A duration in whole µs, the unit of every timing the protocol and the
/// reports carry (saturating: no duration here comes near 584,000 years).
pub fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Reads a token file, as both ends of a TCP connection do: its content
/// without surrounding whitespace, at least 16 characters.
pub fn read_token(path: &Path) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::from(e)
            .at(path.display().to_string())
            .during("read token file")
    })?;
    let t = text.trim();
    if t.len() < 16 {
        return Err(Error::from(ErrorKind::Config(
            "the token must be at least 16 characters".into(),
        ))
        .at(path.display().to_string()));
    }
    Ok(t.as_bytes().to_vec())
}

/// Sent in `hello` both ways; a peer with another version is refused.
pub const PROTOCOL_VERSION: u32 = 1;

/// A longer line is refused and the connection closed: no message of this
/// protocol comes near it, and it bounds what a peer can make us buffer.
pub const MAX_LINE: usize = 64 * 1024;

/// The error classes of the VSS model, which decide what the coordinator
/// does next, plus two for the protocol itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Try again (at most 3 tries, with back-off).
    Retryable,
    /// A deadline passed; retried like `retryable`. From the watchdog it
    /// means the snapshot is not application-consistent.
    Timeout,
    OutOfResources,
    /// Retrying will not help.
    NonRetryable,
    InconsistentSnapshot,
    PartialFailure,
    /// The message could not be understood, or is not allowed now.
    Protocol,
    /// TCP without the right token.
    Unauthorized,
}

impl ErrorClass {
    /// Whether the coordinator's retry rule applies.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorClass::Retryable | ErrorClass::Timeout | ErrorClass::OutOfResources
        )
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorClass::Retryable => "retryable",
            ErrorClass::Timeout => "timeout",
            ErrorClass::OutOfResources => "out_of_resources",
            ErrorClass::NonRetryable => "non_retryable",
            ErrorClass::InconsistentSnapshot => "inconsistent_snapshot",
            ErrorClass::PartialFailure => "partial_failure",
            ErrorClass::Protocol => "protocol",
            ErrorClass::Unauthorized => "unauthorized",
        };
        f.write_str(s)
    }
}

/// The steps an agent can fail at, for `FAILED_AT_<STEP>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Prepare,
    Freeze,
    Thaw,
    Complete,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Prepare => "PREPARE",
            Step::Freeze => "FREEZE",
            Step::Thaw => "THAW",
            Step::Complete => "COMPLETE",
        }
    }
}

/// IDLE → PREPARED → FROZEN → THAWED → COMPLETE, with FAILED_AT_<STEP>
/// and ABORTED beside them. On the wire as those upper-case names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum AgentState {
    Idle,
    Prepared,
    Frozen,
    Thawed,
    Complete,
    Aborted,
    FailedAt(Step),
}

impl fmt::Display for AgentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentState::Idle => f.write_str("IDLE"),
            AgentState::Prepared => f.write_str("PREPARED"),
            AgentState::Frozen => f.write_str("FROZEN"),
            AgentState::Thawed => f.write_str("THAWED"),
            AgentState::Complete => f.write_str("COMPLETE"),
            AgentState::Aborted => f.write_str("ABORTED"),
            AgentState::FailedAt(step) => write!(f, "FAILED_AT_{}", step.name()),
        }
    }
}

impl FromStr for AgentState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "IDLE" => AgentState::Idle,
            "PREPARED" => AgentState::Prepared,
            "FROZEN" => AgentState::Frozen,
            "THAWED" => AgentState::Thawed,
            "COMPLETE" => AgentState::Complete,
            "ABORTED" => AgentState::Aborted,
            "FAILED_AT_PREPARE" => AgentState::FailedAt(Step::Prepare),
            "FAILED_AT_FREEZE" => AgentState::FailedAt(Step::Freeze),
            "FAILED_AT_THAW" => AgentState::FailedAt(Step::Thaw),
            "FAILED_AT_COMPLETE" => AgentState::FailedAt(Step::Complete),
            other => return Err(format!("unknown agent state {other:?}")),
        })
    }
}

impl From<AgentState> for String {
    fn from(s: AgentState) -> String {
        s.to_string()
    }
}

impl TryFrom<String> for AgentState {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// The operations, with their arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", content = "args", rename_all = "snake_case")]
pub enum Op {
    Hello(Hello),
    /// Answered at once; its id lets a client skip stale replies.
    Sync,
    Identify,
    Prepare(Prepare),
    Freeze(Freeze),
    Thaw,
    Abort(Abort),
    Complete(Complete),
    Status,
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Hello(_) => "hello",
            Op::Sync => "sync",
            Op::Identify => "identify",
            Op::Prepare(_) => "prepare",
            Op::Freeze(_) => "freeze",
            Op::Thaw => "thaw",
            Op::Abort(_) => "abort",
            Op::Complete(_) => "complete",
            Op::Status => "status",
        }
    }

    /// The reference's default timeout for each operation, in ms.
    pub fn default_timeout_ms(&self) -> u64 {
        match self {
            Op::Hello(_) | Op::Sync | Op::Identify | Op::Status => 5_000,
            Op::Prepare(_) | Op::Freeze(_) => 60_000,
            Op::Thaw | Op::Abort(_) | Op::Complete(_) => 30_000,
        }
    }

    /// What an agent accepts while frozen: nothing that could write.
    pub fn allowed_while_frozen(&self) -> bool {
        matches!(
            self,
            Op::Hello(_) | Op::Sync | Op::Status | Op::Thaw | Op::Abort(_)
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    /// Required over TCP; compared in constant time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Prepare {
    #[serde(default = "full")]
    pub backup_type: String,
}

fn full() -> String {
    "full".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Freeze {
    /// A subset of the agent's mounts; all of them when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mounts: Option<Vec<String>>,
    /// The watchdog's limit for this freeze, capped by the agent's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_limit_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Abort {
    #[serde(default)]
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Complete {
    #[serde(default)]
    pub success: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    #[serde(flatten)]
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireError {
    pub class: ErrorClass,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<String>,
}

impl WireError {
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        WireError {
            class,
            message: message.into(),
            mount: None,
        }
    }

    pub fn on_mount(mut self, mount: impl Into<String>) -> Self {
        self.mount = Some(mount.into());
        self
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Absent only when the request's id could not be read.
    pub id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub err: Option<WireError>,
}

impl Reply {
    pub fn ok(id: u64, value: Value) -> Self {
        Reply {
            id: Some(id),
            ok: Some(value),
            err: None,
        }
    }

    /// A typed reply body; one that cannot be put in JSON (none of this
    /// crate's can't) is answered as a protocol error instead.
    pub fn typed<T: Serialize>(id: u64, body: &T) -> Self {
        match serde_json::to_value(body) {
            Ok(v) => Reply::ok(id, v),
            Err(e) => Reply::err(
                Some(id),
                WireError::new(ErrorClass::Protocol, format!("serialise the reply: {e}")),
            ),
        }
    }

    /// The reply to request `id`: its typed body, or its error.
    pub fn answer<T: Serialize>(id: u64, result: Result<T, WireError>) -> Self {
        match result {
            Ok(body) => Reply::typed(id, &body),
            Err(e) => Reply::err(Some(id), e),
        }
    }

    pub fn err(id: Option<u64>, err: WireError) -> Self {
        Reply {
            id,
            ok: None,
            err: Some(err),
        }
    }
}

/// Parses one request line. A bad line yields the reply to send, carrying
/// the request's id when that much could be read.
pub fn parse_request(line: &str) -> Result<Request, Reply> {
    let value: Value = serde_json::from_str(line).map_err(|e| {
        Reply::err(
            None,
            WireError::new(ErrorClass::Protocol, format!("not a JSON object: {e}")),
        )
    })?;
    let id = value.get("id").and_then(Value::as_u64);
    let Some(id) = id else {
        return Err(Reply::err(
            None,
            WireError::new(ErrorClass::Protocol, "the request has no numeric \"id\""),
        ));
    };
    let op = value
        .get("op")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let op = op.as_str();
    if op.is_empty() {
        return Err(Reply::err(
            Some(id),
            WireError::new(ErrorClass::Protocol, "the request has no \"op\""),
        ));
    }
    // Peers differ on argument-less ops: `"args": {}`, `null` or none at
    // all mean the same, for every op.
    let mut value = value;
    if let Some(obj) = value.as_object_mut() {
        let empty = match obj.get("args") {
            None | Some(Value::Null) => true,
            Some(Value::Object(m)) => m.is_empty(),
            Some(_) => false,
        };
        if ["sync", "identify", "thaw", "status"].contains(&op) {
            if empty {
                obj.remove("args");
            }
        } else if empty {
            obj.insert("args".into(), Value::Object(serde_json::Map::new()));
        }
    }
    serde_json::from_value::<Request>(value).map_err(|e| {
        let known = [
            "hello", "sync", "identify", "prepare", "freeze", "thaw", "abort", "complete", "status",
        ];
        let message = if known.contains(&op) {
            format!("bad arguments for {op}: {e}")
        } else {
            format!("unknown op {op:?}; known: {}", known.join(", "))
        };
        Reply::err(Some(id), WireError::new(ErrorClass::Protocol, message))
    })
}

/// One message as a line, newline included.
pub fn to_line<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut v = serde_json::to_vec(msg).unwrap_or_else(|e| {
        // Our own types always serialise; say so on the wire if not.
        format!("{{\"err\":{{\"class\":\"protocol\",\"message\":\"serialise: {e}\"}}}}")
            .into_bytes()
    });
    v.push(b'\n');
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_unit_ops_need_no_args() {
        let r = parse_request(r#"{"id":7,"op":"thaw"}"#).unwrap();
        assert_eq!(
            r,
            Request {
                id: 7,
                op: Op::Thaw
            }
        );
        let r =
            parse_request(r#"{"id":8,"op":"freeze","args":{"mounts":["/a"],"hold_limit_ms":500}}"#)
                .unwrap();
        assert_eq!(
            r.op,
            Op::Freeze(Freeze {
                mounts: Some(vec!["/a".into()]),
                hold_limit_ms: Some(500)
            })
        );
        let line = to_line(&r);
        let back = parse_request(std::str::from_utf8(&line).unwrap().trim_end()).unwrap();
        assert_eq!(back, r);
        let r = parse_request(r#"{"id":10,"op":"status","args":{}}"#).unwrap();
        assert_eq!(r.op, Op::Status);
        let r = parse_request(r#"{"id":11,"op":"prepare"}"#).unwrap();
        assert_eq!(
            r.op,
            Op::Prepare(Prepare {
                backup_type: "full".into()
            })
        );
        let r = parse_request(r#"{"id":9,"op":"prepare","args":{}}"#).unwrap();
        assert_eq!(
            r.op,
            Op::Prepare(Prepare {
                backup_type: "full".into()
            })
        );
    }

    #[test]
    fn bad_requests_get_specific_errors_with_the_id_when_readable() {
        let e = parse_request("not json").unwrap_err();
        assert_eq!(e.id, None);
        assert_eq!(e.err.as_ref().unwrap().class, ErrorClass::Protocol);
        let e = parse_request(r#"{"op":"thaw"}"#).unwrap_err();
        assert!(e.err.unwrap().message.contains("no numeric \"id\""));
        let e = parse_request(r#"{"id":3,"op":"explode"}"#).unwrap_err();
        assert_eq!(e.id, Some(3));
        assert!(e.err.unwrap().message.contains("unknown op \"explode\""));
        let e =
            parse_request(r#"{"id":4,"op":"freeze","args":{"hold_limit_ms":"soon"}}"#).unwrap_err();
        assert!(e
            .err
            .unwrap()
            .message
            .starts_with("bad arguments for freeze"));
    }

    #[test]
    fn states_have_their_wire_names() {
        for s in [
            AgentState::Idle,
            AgentState::Prepared,
            AgentState::Frozen,
            AgentState::Thawed,
            AgentState::Complete,
            AgentState::Aborted,
            AgentState::FailedAt(Step::Freeze),
        ] {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(serde_json::from_str::<AgentState>(&json).unwrap(), s);
        }
        assert_eq!(
            AgentState::FailedAt(Step::Thaw).to_string(),
            "FAILED_AT_THAW"
        );
        assert!("FROZEN ".parse::<AgentState>().is_err());
    }

    #[test]
    fn only_safe_ops_pass_while_frozen() {
        assert!(Op::Thaw.allowed_while_frozen());
        assert!(Op::Status.allowed_while_frozen());
        assert!(!Op::Identify.allowed_while_frozen());
        assert!(!Op::Prepare(Prepare::default()).allowed_while_frozen());
        assert!(!Op::Complete(Complete::default()).allowed_while_frozen());
        assert!(ErrorClass::Timeout.is_retryable());
        assert!(!ErrorClass::NonRetryable.is_retryable());
    }
}
