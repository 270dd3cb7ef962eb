//! A repository in a bucket against one in a directory, measured in one
//! run: backup, restore and verify of the same dynamic VHD into a local
//! repository and into s3s-fs on loopback (through a counting proxy, which
//! injects no fault), rounds interleaved, medians reported with the
//! ratios, and the requests each operation made per GiB.
//!
//! Usage: s3_bench WORKDIR SIZE_GIB RUNS
//! (benches/s3.sh builds everything and calls it.)

use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use vsnap_e2e::fault_proxy::{FaultProxy, Faults, Tally};

const KEY: &str = "bench-key";
const SECRET: &str = "bench-secret-0123456789";

fn run(cmd: &mut Command) -> Result<(Duration, String), String> {
    let t = Instant::now();
    let o = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok((t.elapsed(), String::from_utf8_lossy(&o.stdout).into_owned()))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn diff(a: Tally, b: Tally) -> Tally {
    Tally {
        get: b.get - a.get,
        put: b.put - a.put,
        list: b.list - a.list,
        delete: b.delete - a.delete,
        other: b.other - a.other,
        faults: b.faults - a.faults,
        unsigned_puts: b.unsigned_puts - a.unsigned_puts,
    }
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> ExitCode {
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("s3_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let [_, work, size_gib, runs] = &args[..] else {
        return Err("usage: s3_bench WORKDIR SIZE_GIB RUNS".into());
    };
    let work = PathBuf::from(work);
    let runs: usize = runs.parse().map_err(|_| "RUNS is a number")?;
    let size_gib: f64 = size_gib.parse().map_err(|_| "SIZE_GIB is a number")?;
    let vsnap = std::env::var("VSNAP").map_err(|_| "set VSNAP to the vsnap binary")?;
    let s3s = std::env::var("S3S_FS").unwrap_or_else(|_| "s3s-fs".into());
    let img = work.join("d.vhd");
    let data = work.join("s3data");
    std::fs::create_dir_all(data.join("vsnap")).map_err(|e| e.to_string())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let _server = Server(
        Command::new(&s3s)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", KEY, "--secret-key", SECRET])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{s3s}: {e}"))?,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err("s3s-fs did not listen".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let proxy = FaultProxy::start(([127, 0, 0, 1], port).into(), Faults::default(), 1)
        .map_err(|e| e.to_string())?;
    let server_pid = _server.0.id();
    let direct = format!("http://127.0.0.1:{port}");
    let cmd = |repo: &str, endpoint: &str| {
        let mut c = Command::new(&vsnap);
        c.env("AWS_ACCESS_KEY_ID", KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT_URL", endpoint)
            .env("VSNAP_CACHE_DIR", work.join("cache"))
            .env("VSNAP_REPO", repo);
        c
    };
    // [kind][op] -> seconds per run; ops: backup, restore, verify. Kinds:
    // a directory, the bucket directly, the bucket through the counting
    // proxy (which costs a store-and-forward of every body).
    let mut secs = [
        [vec![], vec![], vec![]],
        [vec![], vec![], vec![]],
        [vec![], vec![], vec![]],
    ];
    // s3s-fs's own CPU seconds per op, in the direct rounds.
    let mut server_cpu = [vec![], vec![], vec![]];
    let mut requests = [Tally::default(); 3];
    let mut new_bytes = 0u64;
    for round in 0..runs {
        for (k, kind) in ["dir", "s3", "s3-proxy"].iter().enumerate() {
            let (repo, endpoint) = match *kind {
                "dir" => (
                    work.join(format!("repo-{round}")).display().to_string(),
                    direct.clone(),
                ),
                "s3" => (format!("s3://vsnap/repo-{round}"), direct.clone()),
                _ => (format!("s3://vsnap/proxied-{round}"), proxy.endpoint()),
            };
            let cmd = |repo: &str| cmd(repo, &endpoint);
            run(cmd(&repo).args(["repo", "init", &repo]))?;
            let c0 = cpu_secs(server_pid);
            let t0 = proxy.tally();
            let (b, out) = run(cmd(&repo)
                .args(["backup", "-q", "--json", "--no-track", "--name", "d"])
                .arg(&img))?;
            let c1 = cpu_secs(server_pid);
            let t1 = proxy.tally();
            let id = out
                .split("\"snapshot\": \"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .ok_or("no snapshot id in backup's output")?
                .to_owned();
            if *kind != "dir" {
                new_bytes = out
                    .split("\"new_bytes\": ")
                    .last()
                    .and_then(|r| r.split([',', '\n']).next())
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0);
            }
            let to = work.join("out.vhd");
            let _ = std::fs::remove_file(&to);
            let (r, _) = run(cmd(&repo).args(["restore", "-q", &id, "--to"]).arg(&to))?;
            let c2 = cpu_secs(server_pid);
            let t2 = proxy.tally();
            let (v, _) = run(cmd(&repo).args(["verify", "-q"]))?;
            let c3 = cpu_secs(server_pid);
            let t3 = proxy.tally();
            secs[k][0].push(b.as_secs_f64());
            secs[k][1].push(r.as_secs_f64());
            secs[k][2].push(v.as_secs_f64());
            if *kind == "s3" {
                server_cpu[0].push(c1 - c0);
                server_cpu[1].push(c2 - c1);
                server_cpu[2].push(c3 - c2);
            }
            if *kind == "s3-proxy" {
                requests = [diff(t0, t1), diff(t1, t2), diff(t2, t3)];
            }
            let _ = std::fs::remove_file(&to);
            if *kind == "dir" {
                let _ = std::fs::remove_dir_all(&repo);
            }
        }
        // The bucket's round is removed by the server's files.
        for name in [format!("repo-{round}"), format!("proxied-{round}")] {
            let _ = std::fs::remove_dir_all(data.join("vsnap").join(name));
        }
    }
    let gib = size_gib;
    let new_gib = new_bytes as f64 / f64::from(1u32 << 30);
    println!(
        "dynamic VHD, {gib} GiB allocated ({new_gib:.2} GiB stored after zstd), warm cache, medians of {runs}"
    );
    println!(
        "  {:<8} {:>10} {:>10} {:>8} {:>12} {:>14} {:>16}",
        "op", "directory", "bucket", "ratio", "MiB/s bucket", "s3s-fs CPU", "via proxy, ratio"
    );
    for (i, op) in ["backup", "restore", "verify"].iter().enumerate() {
        let d = median(&mut secs[0][i]);
        let s = median(&mut secs[1][i]);
        let p = median(&mut secs[2][i]);
        let cpu = median(&mut server_cpu[i]);
        println!(
            "  {op:<8} {:>8.0} ms {:>8.0} ms {:>7.0}% {:>12.0} {:>12.0} ms {:>8.0} ms {:>4.0}%",
            d * 1000.0,
            s * 1000.0,
            d / s * 100.0,
            gib * 1024.0 / s,
            cpu * 1000.0,
            p * 1000.0,
            d / p * 100.0
        );
    }
    println!("requests to the bucket (last round, through the proxy), per GiB allocated / per GiB stored:");
    for (i, op) in ["backup", "restore", "verify"].iter().enumerate() {
        let t = requests[i];
        println!(
            "  {op:<8} PUT {:>5} ({:.1} / {:.1})  GET {:>5} ({:.1} / {:.1})  LIST {:>3}  DELETE {:>3}",
            t.put,
            t.put as f64 / gib,
            t.put as f64 / new_gib.max(1e-9),
            t.get,
            t.get as f64 / gib,
            t.get as f64 / new_gib.max(1e-9),
            t.list,
            t.delete
        );
    }
    Ok(())
}

/// A process's user and system CPU time so far, in seconds, from
/// /proc/PID/stat (fields 14 and 15, in the kernel's USER_HZ of 100).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name, in parentheses, may hold spaces: count from after it.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}
