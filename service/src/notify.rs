//! Webhooks: after a run, a POST of a JSON summary to each of its job's
//! targets: always when it failed or was cancelled, when it succeeded only
//! for targets with `on_success`. A target that does not answer 2xx is
//! tried again (1 s, 2 s, 4 s, … apart, up to its `retries`). Plain
//! HTTP/1.1 over TCP: TLS, where wanted, is a local proxy's job.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Notify;
use crate::core::Service;

/// How long one attempt may take, connect to answer.
const ATTEMPT: Duration = Duration::from_secs(10);

/// `http://HOST[:PORT][/PATH]` as host, port and path.
fn split(url: &str) -> Option<(String, u16, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, rest) = v6.split_once(']')?;
        let port = match rest.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if rest.is_empty() => 80,
            None => return None,
        };
        (h, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().ok()?),
            None => (authority, 80),
        }
    };
    if host.is_empty() || path.contains(['\r', '\n', ' ']) {
        return None;
    }
    Some((host.to_string(), port, path.to_string()))
}

/// One POST; the status code the receiver answered.
async fn post(url: &str, body: &str) -> Result<u16, String> {
    let (host, port, path) = split(url).ok_or_else(|| format!("{url:?} is not an http:// URL"))?;
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: vsnap-serve\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut head = Vec::new();
        let mut buf = [0u8; 512];
        // The status line is all we need.
        while !head.contains(&b'\n') && head.len() < 4096 {
            let n = s.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        let line = String::from_utf8_lossy(&head);
        line.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("no HTTP status in {:?}", line.lines().next().unwrap_or("")))
    };
    tokio::time::timeout(ATTEMPT, attempt)
        .await
        .map_err(|_| format!("no answer within {} s", ATTEMPT.as_secs()))?
}

/// Sends `body` to `target`, retrying; what became of it, for the log.
pub async fn deliver(target: &Notify, body: &str) -> Result<u32, String> {
    let mut last = String::new();
    for attempt in 0..=target.retries {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(1 << (attempt - 1).min(5))).await;
        }
        match post(&target.url, body).await {
            Ok(code) if (200..300).contains(&code) => return Ok(attempt + 1),
            Ok(code) => last = format!("HTTP {code}"),
            Err(e) => last = e,
        }
    }
    Err(format!(
        "{} attempt(s), the last: {last}",
        target.retries + 1
    ))
}

/// After run `run` ended: tells each of `targets` that should hear of it.
pub async fn after_run(svc: &Service, targets: &[String], run: i64) {
    if targets.is_empty() {
        return;
    }
    let Ok(Some((run, vms))) = svc.state.run(run) else {
        return;
    };
    let body = json!({
        "event": "vsnap.run",
        "host": vsnap_repo::host_name(),
        "run": run,
        "vms": vms,
    })
    .to_string();
    for name in targets {
        let Some(t) = svc.config.notify.iter().find(|n| &n.name == name) else {
            continue;
        };
        if run.state == "succeeded" && !t.on_success {
            continue;
        }
        match deliver(t, &body).await {
            Ok(n) => eprintln!(
                "vsnap serve: run {}: told {} ({} attempt(s))",
                run.id, t.name, n
            ),
            Err(e) => eprintln!(
                "vsnap serve: run {}: could not tell {} at {}: {e}",
                run.id, t.name, t.url
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_host_port_and_path() {
        assert_eq!(
            split("http://127.0.0.1:9000/hook?x=1"),
            Some(("127.0.0.1".into(), 9000, "/hook?x=1".into()))
        );
        assert_eq!(
            split("http://alerts.example"),
            Some(("alerts.example".into(), 80, "/".into()))
        );
        assert_eq!(
            split("http://[::1]:81/a"),
            Some(("::1".into(), 81, "/a".into()))
        );
        assert_eq!(split("https://x/"), None);
        assert_eq!(split("http:///x"), None);
        assert_eq!(split("http://h/a b"), None);
        assert_eq!(split("http://h:notaport/"), None);
    }
}
