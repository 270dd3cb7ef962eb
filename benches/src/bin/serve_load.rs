//! Load on `vsnap serve`'s API: a state database of N VMs and their
//! snapshots, the service started as its own process, and C clients on
//! keep-alive connections asking for every read endpoint in turn for a
//! while. Prints each endpoint's latency (p50, p99, max) and the server's
//! resident memory over the run.
//!
//!   serve-load VSNAP WORKDIR [MINUTES] [CLIENTS] [VMS] [SNAPSHOTS]
//!   (defaults: 10 minutes, 50 clients, 50 VMs, 1000 snapshots)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vsnap_service::state::{RunState, State, Trigger, VmResult};

const ENDPOINTS: [&str; 7] = [
    "vms",
    "jobs",
    "runs",
    "run",
    "history",
    "snapshots",
    "metrics",
];

fn arg<T: std::str::FromStr>(n: usize, default: T) -> T {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

/// The configuration and a state database with `snapshots` results over
/// `vms` VMs, one run each.
fn prepare(dir: &Path, vms: usize, snapshots: usize) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    vsnap_repo::Repository::init(&dir.join("repo"), vsnap_repo::DEFAULT_CHUNK_SIZE).unwrap();
    let mut cfg =
        String::from("repository = \"repo\"\nstate_dir = \"state\"\nlisten = \"127.0.0.1:0\"\n\n");
    for i in 0..vms {
        cfg += &format!(
            "[[vm]]\nname = \"vm{i}\"\ndisks = [\"vm{i}.vhd\"]\nagent = \"none\"\n\n[[job]]\nname = \"job{i}\"\nschedule = \"2099-01-01\"\nvms = [\"vm{i}\"]\n\n"
        );
    }
    let config = dir.join("serve.toml");
    std::fs::write(&config, cfg).unwrap();
    let (state, _) = State::open(&dir.join("state")).unwrap();
    for n in 0..snapshots {
        let vm = n % vms;
        let run = state
            .begin(&format!("job{vm}"), "backup", Trigger::Schedule, None)
            .unwrap();
        let r = VmResult {
            vm: format!("vm{vm}"),
            snapshot: Some(format!("{n:016x}")),
            consistency: Some("app-consistent".into()),
            freeze_window_us: Some(2_000 + (n as u64 * 7919) % 200_000),
            stall_us: Some(5_000 + (n as u64 * 104_729) % 400_000),
            host_window_us: Some(3_000),
            virtual_bytes: 1 << 34,
            bytes_read: 1 << 30,
            new_bytes: 1 << 24,
            error: None,
        };
        state
            .finish(run, RunState::Succeeded, None, None, &[r])
            .unwrap();
    }
    config
}

/// A client of its own: one keep-alive connection, as its requests
/// follow one another.
type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Empty<bytes::Bytes>,
>;

/// One GET; the status and the body's length.
async fn get(client: &Client, addr: &str, path: &str, token: &str) -> (u16, usize) {
    use http_body_util::BodyExt;
    let req = hyper::Request::get(format!("http://{addr}{path}"))
        .header("authorization", format!("Bearer {token}"))
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, body.len())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn quantile(v: &[u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i.min(v.len() - 1)]
}

fn main() {
    let vsnap = PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("usage: serve-load VSNAP WORKDIR [MINUTES] [CLIENTS] [VMS] [SNAPSHOTS]"),
    );
    let dir = PathBuf::from(std::env::args().nth(2).expect("WORKDIR"));
    let minutes: f64 = arg(3, 10.0);
    let clients: usize = arg(4, 50);
    let vms: usize = arg(5, 50);
    let snapshots: usize = arg(6, 1000);
    let config = prepare(&dir, vms, snapshots);
    let mut server = Command::new(&vsnap)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = server.id();
    let mut err = std::io::BufReader::new(server.stderr.take().unwrap());
    let addr = loop {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            panic!("the service exited");
        }
        if let Some(rest) = line.split("API on http://").nth(1) {
            break rest.split('/').next().unwrap().to_string();
        }
    };
    std::thread::spawn(move || for _ in err.lines() {});
    let token = std::fs::read_to_string(dir.join("state/api.token"))
        .unwrap()
        .trim()
        .to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let run_for = Duration::from_secs_f64(minutes * 60.0);
    let started = Instant::now();
    let (samples, rss) = rt.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..clients {
            let (addr, token, stop) = (addr.clone(), token.clone(), Arc::clone(&stop));
            tasks.push(tokio::spawn(async move {
                let client: Client = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .pool_max_idle_per_host(1)
                .build_http();
                let mut out: Vec<Vec<u64>> = vec![Vec::new(); ENDPOINTS.len()];
                let mut n = c;
                while !stop.load(Ordering::Relaxed) {
                    let k = n % ENDPOINTS.len();
                    let vm = n % vms;
                    let path = match ENDPOINTS[k] {
                        "vms" => "/api/v1/vms".to_string(),
                        "jobs" => "/api/v1/jobs".to_string(),
                        "runs" => "/api/v1/runs?limit=50".to_string(),
                        "run" => format!("/api/v1/runs/{}", 1 + n % snapshots),
                        "history" => format!("/api/v1/vms/vm{vm}/history"),
                        "snapshots" => format!("/api/v1/snapshots?vm=vm{vm}"),
                        _ => "/metrics".to_string(),
                    };
                    let t = Instant::now();
                    let (code, _) = get(&client, &addr, &path, &token).await;
                    assert_eq!(code, 200, "{path}");
                    out[k].push(t.elapsed().as_micros() as u64);
                    n += 1;
                }
                out
            }));
        }
        let mut rss = Vec::new();
        while started.elapsed() < run_for {
            rss.push((started.elapsed().as_secs(), rss_kib(pid)));
            tokio::time::sleep(Duration::from_secs(10).min(run_for)).await;
        }
        rss.push((started.elapsed().as_secs(), rss_kib(pid)));
        stop.store(true, Ordering::Relaxed);
        let mut all: Vec<Vec<u64>> = vec![Vec::new(); ENDPOINTS.len()];
        for t in tasks {
            for (k, v) in t.await.unwrap().into_iter().enumerate() {
                all[k].extend(v);
            }
        }
        (all, rss)
    });
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let _ = server.wait();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "vsnap serve under load: {vms} VMs, {snapshots} snapshots in the state, {clients} clients on keep-alive connections, {secs:.0} s"
    );
    println!("| endpoint | requests | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|");
    let mut everything = Vec::new();
    for (k, mut v) in samples.into_iter().enumerate() {
        v.sort_unstable();
        everything.extend_from_slice(&v);
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} |",
            ENDPOINTS[k],
            v.len(),
            quantile(&v, 0.5) as f64 / 1e3,
            quantile(&v, 0.99) as f64 / 1e3,
            v.last().copied().unwrap_or(0) as f64 / 1e3
        );
    }
    everything.sort_unstable();
    println!(
        "| all | {} ({:.0}/s) | {:.2} | {:.2} | {:.2} |",
        everything.len(),
        everything.len() as f64 / secs,
        quantile(&everything, 0.5) as f64 / 1e3,
        quantile(&everything, 0.99) as f64 / 1e3,
        everything.last().copied().unwrap_or(0) as f64 / 1e3
    );
    let after_warmup: Vec<u64> = rss.iter().filter(|(t, _)| *t >= 30).map(|r| r.1).collect();
    println!(
        "server RSS (KiB) every 10 s: {}",
        rss.iter()
            .map(|r| format!("{}s:{}", r.0, r.1))
            .collect::<Vec<_>>()
            .join(" ")
    );
    if let (Some(first), Some(last), Some(max)) = (
        after_warmup.first(),
        after_warmup.last(),
        after_warmup.iter().max(),
    ) {
        println!(
            "after the first 30 s: {first} KiB, at the end {last} KiB, at most {max} KiB ({:+.1}%)",
            (*last as f64 / *first as f64 - 1.0) * 100.0
        );
    }
}
