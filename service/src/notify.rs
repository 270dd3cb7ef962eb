//! Webhooks: after a run, a POST of a JSON summary to each of its job's
//! targets: always when it failed or was cancelled, when it succeeded only
//! for targets with `on_success`. A target that does not answer 2xx is
//! tried again (1 s, 2 s, 4 s, … apart, up to its `retries`). HTTP or
//! HTTPS (rustls; the system's CAs, and a target's own `ca` bundle), to a
//! name, an IPv4 or an IPv6 address.

use std::time::Duration;

use serde_json::json;

use crate::config::Notify;
use crate::core::Service;
use crate::error::chain;

/// How long one attempt may take, connect to answer.
const ATTEMPT: Duration = Duration::from_secs(10);

/// The client for `target`: rustls with ring, the system's roots and the
/// target's own CAs, no redirects (a webhook's answer is its status).
fn client(target: &Notify) -> Result<reqwest::Client, String> {
    // The process's rustls provider; installed once, by whoever is first.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = reqwest::Client::builder()
        .timeout(ATTEMPT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent("vsnap-serve");
    if let Some(ca) = &target.ca {
        b = b.tls_certs_merge(crate::config::read_ca(ca)?);
    }
    b.build()
        .map_err(|e| format!("cannot make an HTTP client: {}", chain(&e)))
}

/// One POST; the status code the receiver answered.
async fn post(client: &reqwest::Client, url: &str, body: &str) -> Result<u16, String> {
    let r = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_owned())
        .send()
        .await
        .map_err(|e| chain(&e))?;
    Ok(r.status().as_u16())
}

/// Sends `body` to `target`, retrying; what became of it, for the log.
pub async fn deliver(target: &Notify, body: &str) -> Result<u32, String> {
    let client = client(target)?;
    let mut last = String::new();
    for attempt in 0..=target.retries {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(1 << (attempt - 1).min(5))).await;
        }
        match post(&client, &target.url, body).await {
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
            Ok(n) => crate::log::info(&format!(
                "run {}: told {} ({} attempt(s))",
                run.id, t.name, n
            )),
            Err(e) => crate::log::error(&format!(
                "run {}: could not tell {} at {}: {e}",
                run.id, t.name, t.url
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn only_http_and_https_urls_with_a_host_and_no_credentials_are_targets() {
        for ok in [
            "http://127.0.0.1:9000/hook?x=1",
            "https://alerts.example",
            "http://[::1]:81/a",
        ] {
            assert_eq!(crate::config::check_url(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("ftp://x/", "an http:// or https:// URL"),
            ("http://", "not a URL"),
            ("http://h:notaport/", "not a URL"),
            ("https://user:secret@h/", "credentials in the URL"),
        ] {
            let e = crate::config::check_url(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    /// A receiver on `addr` that answers `status` to one request and
    /// hands back what it got.
    async fn receive_one(
        addr: &str,
        status: &'static str,
    ) -> (String, tokio::task::JoinHandle<String>) {
        let l = tokio::net::TcpListener::bind(addr).await.unwrap();
        let at = l.local_addr().unwrap();
        let got = tokio::spawn(async move {
            let (mut c, _) = l.accept().await.unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            // The body is small: headers and body come in a read or two.
            while !String::from_utf8_lossy(&req).contains("\"event\"") {
                let n = c.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
            }
            let reply =
                format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            c.write_all(reply.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&req).into_owned()
        });
        (format!("http://{at}/hook"), got)
    }

    fn target(url: String) -> Notify {
        Notify {
            name: "t".into(),
            url,
            on_success: true,
            retries: 0,
            ca: None,
        }
    }

    #[tokio::test]
    async fn an_ipv6_target_gets_its_post_with_a_bracketed_host() {
        let (url, got) = receive_one("[::1]:0", "204 No Content").await;
        assert_eq!(deliver(&target(url.clone()), r#"{"event":1}"#).await, Ok(1));
        let req = got.await.unwrap();
        let port = url.rsplit(':').next().unwrap().trim_end_matches("/hook");
        assert!(req.starts_with("POST /hook HTTP/1.1\r\n"), "{req}");
        assert!(
            req.to_ascii_lowercase()
                .contains(&format!("host: [::1]:{port}\r\n")),
            "{req}"
        );
        assert!(req.ends_with(r#"{"event":1}"#), "{req}");
    }

    #[tokio::test]
    async fn a_refusing_target_is_reported_with_its_status() {
        let (url, got) = receive_one("127.0.0.1:0", "503 Service Unavailable").await;
        let e = deliver(&target(url), r#"{"event":1}"#).await.unwrap_err();
        got.await.unwrap();
        assert_eq!(e, "1 attempt(s), the last: HTTP 503");
    }
}
