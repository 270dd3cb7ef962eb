//! `vsnap serve` as an operator runs it: dynamic VHDs made by qemu-img, a
//! real repository, a rootless `vsnap agent` whose hook is the guest's
//! writer (slow to pause, so runs overlap their schedule), the state in
//! SQLite, and signals: SIGTERM, and SIGKILL with a restart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vsnap_e2e::{
    http, http_answer, http_with, qemu_image, repo_init, start_agent, vsnap_cmd, write_hook,
    AgentProc, Killed,
};
use vsnap_service::state::{Run, State};

/// A service's directory: two VMs (one with no agent, one whose agent's
/// freeze hook takes `hook_secs`), a repository, and `jobs` appended to
/// the configuration.
struct Site {
    dir: tempfile::TempDir,
    config: PathBuf,
    _agent: AgentProc,
}

impl Site {
    fn new(hook_secs: &str, jobs: &str) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        repo_init(&d.join("repo"));
        qemu_image(&d.join("a.vhd"), "dynamic", "16M", &[(0x5a, 0, 1 << 20)]);
        qemu_image(&d.join("slow.vhd"), "dynamic", "16M", &[(0xa5, 0, 1 << 20)]);
        let hooks = d.join("hooks");
        write_hook(
            &hooks,
            "10-app",
            &format!(
                "echo \"$1\" >> {log}\n[ \"$1\" = freeze ] && sleep {hook_secs}\nexit 0",
                log = d.join("hook.log").display()
            ),
        );
        let sock = d.join("agent.sock");
        let agent = start_agent(
            &[
                "--listen",
                &format!("unix:{}", sock.display()),
                "--hooks",
                hooks.to_str().unwrap(),
                "--marker",
                d.join("agent.frozen").to_str().unwrap(),
            ],
            &d.join("agent.log"),
        )
        .unwrap();
        let config = d.join("serve.toml");
        std::fs::write(
            &config,
            format!(
                r#"repository = "repo"
state_dir = "state"
listen = "127.0.0.1:0"

[[vm]]
name = "a"
disks = ["a.vhd"]
agent = "none"

[[vm]]
name = "slow"
disks = ["slow.vhd"]
agent = "unix:{}"
{jobs}"#,
                sock.display()
            ),
        )
        .unwrap();
        Site {
            dir,
            config,
            _agent: agent,
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn serve(&self, log: &str) -> Killed {
        self.serve_with(log, &[])
    }

    fn serve_with(&self, log: &str, env: &[(&str, &str)]) -> Killed {
        self.serve_args(log, env, &[])
    }

    fn serve_args(&self, log: &str, env: &[(&str, &str)], args: &[&str]) -> Killed {
        Killed(
            vsnap_cmd()
                .envs(env.iter().copied())
                .args(["serve", "--config"])
                .arg(&self.config)
                .args(args)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(self.path(log)).unwrap())
                .spawn()
                .unwrap(),
        )
    }

    /// The API's address, as the service logged it, and its token.
    fn api(&self, log: &str) -> (String, String) {
        self.wait_for("the API", Duration::from_secs(10), || {
            self.log(log).contains("API on http://")
        });
        let text = self.log(log);
        let addr = text
            .split("API on http://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .unwrap()
            .to_string();
        let token = std::fs::read_to_string(self.path("state/api.token")).unwrap();
        (addr, token.trim().to_string())
    }

    fn runs(&self, job: &str) -> Vec<Run> {
        if !self.path("state/state.sqlite").exists() {
            return Vec::new();
        }
        let state = State::observe(&self.path("state")).unwrap();
        let mut runs = state.runs(Some(job), 1000).unwrap();
        runs.reverse();
        runs
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// How late each run started after its scheduled time.
fn lateness(runs: &[Run]) -> Vec<Duration> {
    runs.iter()
        .filter(|r| r.state != "skipped")
        .filter_map(|r| {
            Some(
                (r.started_at - r.scheduled_for?)
                    .to_std()
                    .unwrap_or_default(),
            )
        })
        .collect()
}

impl Site {
    /// Waits up to `limit` for `done`; on failure, says what the service
    /// logged and what its state holds.
    fn wait_for(&self, what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
        let t = Instant::now();
        while !done() {
            if t.elapsed() > limit {
                let runs = State::observe(&self.path("state")).map(|s| s.runs(None, 50));
                panic!(
                    "no {what} within {limit:?}\nruns: {runs:#?}\nlogs: {}{}{}",
                    self.log("serve.log"),
                    self.log("serve1.log"),
                    self.log("agent.log")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits up to `limit` for run `id` to end; its record, as the API
    /// at `addr` answers it.
    fn run_ended(&self, addr: &str, token: &str, id: i64, limit: Duration) -> serde_json::Value {
        let mut run = serde_json::Value::Null;
        self.wait_for("the run's end", limit, || {
            let (_, body) = http(
                addr,
                "GET",
                &format!("/api/v1/runs/{id}"),
                Some(token),
                None,
            );
            run = json(&body)["run"].clone();
            run["state"] != "running"
        });
        run
    }
}

#[test]
fn jobs_fire_on_time_skip_while_running_keep_what_retention_keeps_and_stop_on_sigterm() {
    let site = Site::new(
        "2.5",
        r#"
[[job]]
name = "quick"
schedule = "*:*:0/2"
vms = ["a"]
provider = "copy"
keep = { last = 2 }
gc = true

[[job]]
name = "slow"
schedule = "*:*:*"
vms = ["slow"]
provider = "copy"
"#,
    );
    // The configuration checks, and says when each job runs next.
    let o = vsnap_cmd()
        .args(["serve", "--check", "--config"])
        .arg(&site.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("job quick (*:*:0/2; a): next "), "{text}");

    let mut serve = site.serve("serve.log");
    site.wait_for("four quick runs", Duration::from_secs(30), || {
        site.runs("quick")
            .iter()
            .filter(|r| r.state == "succeeded")
            .count()
            >= 4
    });
    // A slow run is going: SIGTERM aborts it by the rules, and the service
    // exits.
    site.wait_for("a slow run in progress", Duration::from_secs(10), || {
        site.runs("slow")
            .last()
            .is_some_and(|r| r.state == "running")
    });
    // The metrics, as Prometheus' own checker reads them.
    let (addr, token) = site.api("serve.log");
    let (code, text) = http(&addr, "GET", "/metrics", Some(&token), None);
    assert_eq!(code, 200, "{text}");
    promtool_accepts(&text);
    let chunks = std::fs::read_dir(site.path("repo/chunks"))
        .unwrap()
        .flatten()
        .map(|d| std::fs::read_dir(d.path()).unwrap().count())
        .sum::<usize>();
    assert!(
        text.contains(&format!("\nvsnap_repository_chunks {chunks}\n")),
        "{text}"
    );
    assert!(
        text.contains("vsnap_vm_failures_total{vm=\"a\"} 0\n"),
        "{text}"
    );
    assert!(
        text.contains("vsnap_vm_last_success_timestamp_seconds{vm=\"a\"} "),
        "{text}"
    );
    // The slow VM's guest was quiesced (its writer's hook): each run's
    // window is in the histogram, and its application waited out the
    // hook's 2.5 s.
    let count = |name: &str| -> u64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name}: {text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let frozen = count("vsnap_vm_freeze_window_seconds_count{vm=\"slow\"}");
    let succeeded = site
        .runs("slow")
        .iter()
        .filter(|r| r.state == "succeeded")
        .count() as u64;
    assert_eq!(frozen, succeeded, "{text}");
    let stall: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("vsnap_vm_last_stall_seconds{vm=\"slow\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(stall >= 2.5, "{text}");
    // A ratio where there is one; never +Inf (a run that stored nothing
    // new has none). Histograms' le="+Inf" buckets are labels, not values.
    assert!(text.contains("# TYPE vsnap_vm_dedup_ratio gauge"), "{text}");
    assert!(
        !text
            .lines()
            .any(|l| l.ends_with(" +Inf") || l.ends_with(" NaN")),
        "{text}"
    );
    // The slow run waited for above is going; a quick one may be too.
    let active = count("vsnap_runs_active");
    assert!((1..=2).contains(&active), "{text}");

    signal(&serve, "TERM");
    let status = serve.wait().unwrap();
    let log = site.log("serve.log");
    assert!(status.success(), "{status:?}\n{log}");
    assert!(log.contains("SIGTERM: stopping"), "{log}");

    let quick = site.runs("quick");
    let late = lateness(&quick);
    let worst = late.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{} quick runs, started after their time by at most {worst:?} ({late:?})",
        late.len()
    );
    assert!(worst < Duration::from_secs(1), "{late:?}");
    // A quick run's gc waits while the slow job's backup holds the
    // repository, so a quick run may still be going at its next time.
    assert!(
        quick
            .iter()
            .all(|r| r.state == "succeeded" || r.state == "skipped"),
        "{quick:#?}"
    );
    let notes: Vec<String> = quick.iter().filter_map(|r| r.note.clone()).collect();
    assert!(
        notes.iter().any(|n| n.contains("retention removed 1")),
        "{notes:?}"
    );

    let slow = site.runs("slow");
    let skipped: Vec<&Run> = slow.iter().filter(|r| r.state == "skipped").collect();
    assert!(!skipped.is_empty(), "{slow:#?}");
    assert!(skipped.iter().all(|r| r
        .error
        .as_deref()
        .is_some_and(|e| e.contains("is still going"))));
    let last = slow.last().unwrap();
    assert_eq!(last.state, "cancelled", "{slow:#?}");
    assert!(slow.iter().all(|r| r.state != "running"));
    // Every freeze of the guest's writer was undone.
    let hook = site.log("hook.log");
    let froze = hook.lines().filter(|l| *l == "freeze").count();
    let undone = hook
        .lines()
        .filter(|l| *l == "thaw" || *l == "abort")
        .count();
    assert!(froze > 0 && froze == undone, "{hook}");

    // Retention kept the last two of VM a.
    let o = vsnap_cmd()
        .args(["snapshots", "--json", "--repo"])
        .arg(site.path("repo"))
        .output()
        .unwrap();
    let snaps: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let of_a = snaps
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["vm"] == "a")
        .count();
    assert_eq!(of_a, 2, "{snaps:#}");
}

#[test]
fn a_killed_service_marks_its_run_failed_and_a_persistent_job_catches_up() {
    let site = Site::new(
        "30",
        r#"
[[job]]
name = "slow"
schedule = "*:*:0/2"
vms = ["slow"]
provider = "copy"
window = "60s"

[[job]]
name = "persistent"
schedule = "*:*:0/4"
vms = ["a"]
provider = "copy"

[[job]]
name = "forgetful"
schedule = "*:*:0/4"
vms = ["a"]
provider = "copy"
persistent = false
"#,
    );
    let mut serve = site.serve("serve1.log");
    site.wait_for("a slow run in progress", Duration::from_secs(10), || {
        site.runs("slow").iter().any(|r| r.state == "running")
    });
    site.wait_for("both quick jobs fired", Duration::from_secs(10), || {
        !site.runs("persistent").is_empty() && !site.runs("forgetful").is_empty()
    });
    serve.kill().unwrap();
    let _ = serve.wait();
    let killed_at = chrono::Utc::now();
    // While it is down, the 4-second jobs' next elapse passes.
    std::thread::sleep(Duration::from_secs(5));
    let (p0, f0) = (site.runs("persistent").len(), site.runs("forgetful").len());

    let mut serve = site.serve("serve2.log");
    // At start-up, the interrupted run is marked failed, with the reason.
    site.wait_for("the restart", Duration::from_secs(10), || {
        site.log("serve2.log").contains("next run")
    });
    let slow = site.runs("slow");
    let cut = slow
        .iter()
        .find(|r| r.state == "failed")
        .expect("the run the kill cut short");
    assert!(
        cut.error
            .as_deref()
            .unwrap()
            .contains("stopped while this run was in progress"),
        "{cut:#?}"
    );
    assert!(site.log("serve2.log").contains(&format!(
        "run {} was in progress when the service stopped",
        cut.id
    )));
    // The persistent job runs what it missed at once; the other does not.
    site.wait_for("the missed run", Duration::from_secs(3), || {
        site.runs("persistent")
            .iter()
            .any(|r| r.trigger == "missed")
    });
    let missed = site
        .runs("persistent")
        .into_iter()
        .find(|r| r.trigger == "missed")
        .unwrap();
    assert!(missed.scheduled_for.unwrap() > killed_at, "{missed:#?}");
    assert_eq!(site.runs("persistent").len(), p0 + 1);
    assert!(site.runs("forgetful")[f0..]
        .iter()
        .all(|r| r.trigger != "missed"));
    signal(&serve, "TERM");
    assert!(serve.wait().unwrap().success());
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[test]
fn the_api_needs_its_token_says_what_is_wrong_runs_and_cancels_jobs_and_streams_progress() {
    let site = Site::new(
        "4",
        r#"
[[job]]
name = "slow"
schedule = "2099-01-01"
vms = ["slow"]
provider = "copy"
window = "60s"
"#,
    );
    let mut serve = site.serve("serve.log");
    let (addr, token) = site.api("serve.log");
    let t = Some(token.as_str());
    let get = |path: &str, token: Option<&str>| http(&addr, "GET", path, token, None);
    let post = |path: &str| http(&addr, "POST", path, t, None);

    // The token: made 0600, needed everywhere but /healthz.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(site.path("state/api.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(get("/healthz", None), (200, r#"{"ok":true}"#.to_string()));
    for (path, tok) in [
        ("/api/v1/vms", None),
        ("/api/v1/vms", Some("wrong")),
        ("/metrics-nope", None),
    ] {
        let (code, body) = get(path, tok);
        if path.starts_with("/api") {
            assert_eq!(code, 401, "{body}");
            assert!(
                json(&body)["error"]
                    .as_str()
                    .unwrap()
                    .contains("bearer token"),
                "{body}"
            );
        } else {
            assert_eq!(code, 404, "{body}");
        }
    }
    // A wrong token is told apart from a missing one; the scheme's case
    // does not matter (RFC 7235).
    let (_, body) = get("/api/v1/vms", Some("wrong"));
    assert!(body.contains("is not this service's"), "{body}");
    for scheme in ["bearer", "BEARER"] {
        let auth = format!("{scheme} {token}");
        let (code, body) = http_with(
            &addr,
            "GET",
            "/api/v1/vms",
            &[("authorization", &auth)],
            None,
        );
        assert_eq!(code, 200, "{scheme}: {body}");
    }
    // The state database is the owner's alone, as the token is.
    let mode = std::fs::metadata(site.path("state/state.sqlite"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // A method a route does not take, and a body past the limit: JSON
    // errors with their own status.
    let (code, body) = get("/api/v1/jobs/slow/run", t);
    assert_eq!(code, 405, "{body}");
    assert!(
        json(&body)["error"]
            .as_str()
            .unwrap()
            .contains("does not take that method"),
        "{body}"
    );
    // The 10 MB body is declared, not sent: the server answers 413 from
    // the length alone and closes, and a client still sending the body
    // would meet a reset that can swallow the answer (it did, 1 run in
    // 20, under load).
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "POST /api/v1/verify HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            10 << 20
        )
        .unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
        assert!(json(body)["error"].is_string(), "{answer}");
    }
    // Bad input: named, as JSON.
    let (code, body) = get("/api/v1/runs?limit=many", t);
    assert_eq!(code, 400, "{body}");
    assert!(
        json(&body)["error"].as_str().unwrap().contains("limit"),
        "{body}"
    );
    let (code, body) = get("/api/v1/runs?colour=red", t);
    assert_eq!(code, 400, "{body}");
    assert!(
        json(&body)["error"].as_str().unwrap().contains("colour"),
        "{body}"
    );
    assert_eq!(get("/api/v1/runs/xyz", t).0, 400);
    assert_eq!(get("/api/v1/runs/424242", t).0, 404);
    assert_eq!(get("/api/v1/snapshots?vm=nobody", t).0, 404);
    assert_eq!(post("/api/v1/jobs/nope/run").0, 404);
    assert_eq!(post("/api/v1/runs/424242/cancel").0, 404);

    // What it serves.
    let (code, body) = get("/api/v1/vms", t);
    assert_eq!(code, 200, "{body}");
    let vms = json(&body);
    assert_eq!(vms[1]["name"], "slow");
    assert_eq!(vms[1]["agent"], "vsnap");
    // 2099-01-01 local time, whatever this machine's zone.
    let next = vms[1]["jobs"][0]["next_run"].as_str().unwrap();
    assert!(
        next.starts_with("2098-12-31") || next.starts_with("2099-01-01"),
        "{next}"
    );
    let (_, body) = get("/api/v1/openapi.json", t);
    let doc = json(&body);
    for p in [
        "/healthz",
        "/api/v1/vms",
        "/api/v1/snapshots",
        "/api/v1/jobs",
        "/api/v1/jobs/{name}/run",
        "/api/v1/runs",
        "/api/v1/runs/{id}",
        "/api/v1/runs/{id}/events",
        "/api/v1/runs/{id}/cancel",
    ] {
        assert!(
            doc["paths"].get(p).is_some(),
            "{p} is not in the OpenAPI document"
        );
    }

    // Run now; a second request while it runs is refused and recorded.
    let (code, body) = post("/api/v1/jobs/slow/run");
    assert_eq!(code, 202, "{body}");
    let id = json(&body)["run"].as_i64().unwrap();
    let (code, body) = post("/api/v1/jobs/slow/run");
    assert_eq!(code, 409, "{body}");
    let (_, body) = get("/api/v1/jobs", t);
    assert_eq!(json(&body)[0]["running"], id, "{body}");
    // Progress streams while it runs; cancel it (its freeze hook is still
    // sleeping), and the stream ends with the run cancelled.
    let events = {
        let addr = addr.clone();
        let token = token.clone();
        std::thread::spawn(move || {
            http(
                &addr,
                "GET",
                &format!("/api/v1/runs/{id}/events"),
                Some(&token),
                None,
            )
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    let (code, body) = post(&format!("/api/v1/runs/{id}/cancel"));
    assert_eq!(code, 202, "{body}");
    let (code, stream) = events.join().unwrap();
    assert_eq!(code, 200);
    assert!(stream.contains("event: progress"), "{stream}");
    let end = stream
        .split("event: end\ndata: ")
        .nth(1)
        .unwrap()
        .lines()
        .next()
        .unwrap();
    assert_eq!(json(end)["run"]["state"], "cancelled", "{stream}");
    let (code, body) = post(&format!("/api/v1/runs/{id}/cancel"));
    assert_eq!(code, 409, "{body}");
    let (_, body) = get(&format!("/api/v1/runs/{id}"), t);
    let run = json(&body);
    assert_eq!(run["run"]["trigger"], "manual");
    assert_eq!(run["run"]["state"], "cancelled");
    let (_, body) = get("/api/v1/runs?job=slow", t);
    let states: Vec<String> = json(&body)
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(states, ["skipped", "cancelled"], "{body}");
    let hook = site.log("hook.log");
    assert!(hook.contains("freeze") && hook.contains("abort"), "{hook}");

    // Many clients at once: SQLite's C allocations on the service's
    // threads share glibc's capped arenas instead of each thread keeping
    // one (vsnap_service::alloc).
    std::thread::scope(|s| {
        for c in 0..16 {
            let get = &get;
            s.spawn(move || {
                for n in 0..25 {
                    let path =
                        ["/api/v1/vms", "/api/v1/runs", "/api/v1/jobs", "/metrics"][(c + n) % 4];
                    assert_eq!(get(path, t).0, 200, "{path}");
                }
            });
        }
    });
    let arenas = malloc_arenas(serve.id());
    assert!(
        arenas < vsnap_service::alloc::SERVICE_ARENAS as usize,
        "{arenas} arenas beside the main one"
    );
    signal(&serve, "TERM");
    assert!(serve.wait().unwrap().success());
}

/// The malloc arenas a process made beside glibc's main one: each is an
/// anonymous read-write mapping at a 64 MiB boundary, the start of the
/// 64 MiB glibc reserves for an arena's heap, followed by the reserve's
/// inaccessible rest (or filling all of it).
fn malloc_arenas(pid: u32) -> usize {
    const HEAP_MAX: u64 = 64 << 20;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let rows: Vec<(u64, u64, &str, bool)> = maps
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (a, b) = f[0].split_once('-').unwrap();
            let range = (
                u64::from_str_radix(a, 16).unwrap(),
                u64::from_str_radix(b, 16).unwrap(),
            );
            (range.0, range.1, f[1], f.len() < 6 && f[4] == "0")
        })
        .collect();
    rows.iter()
        .enumerate()
        .filter(|(i, &(start, end, perms, anon))| {
            anon && perms == "rw-p"
                && start % HEAP_MAX == 0
                && (end - start == HEAP_MAX
                    || rows
                        .get(i + 1)
                        .is_some_and(|n| n.0 == end && n.2 == "---p" && n.3))
        })
        .count()
}

/// `promtool check metrics` (Debian package prometheus; the test command
/// installs it) on `text`: no error, no lint.
fn promtool_accepts(text: &str) {
    use std::io::Write;
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/test.sh installs it)");
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let o = p.wait_with_output().unwrap();
    assert!(
        o.status.success() && o.stdout.is_empty() && o.stderr.is_empty(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A local webhook receiver: answers 500 to its first `fail_first`
/// requests, 200 after; keeps each request's path and body.
struct Receiver {
    addr: String,
    got: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
}

impl Receiver {
    fn start(fail_first: usize) -> Receiver {
        use std::io::{BufRead, Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = std::sync::Arc::clone(&got);
        std::thread::spawn(move || {
            for (n, conn) in l.incoming().enumerate() {
                let Ok(mut c) = conn else { continue };
                let mut r = std::io::BufReader::new(c.try_clone().unwrap());
                let mut first = String::new();
                r.read_line(&mut first).unwrap();
                let mut len = 0;
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    if h.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0u8; len];
                r.read_exact(&mut body).unwrap();
                let path = first.split_whitespace().nth(1).unwrap_or("").to_string();
                seen.lock()
                    .unwrap()
                    .push((path, String::from_utf8_lossy(&body).into_owned()));
                let status = if n < fail_first {
                    "500 Internal Server Error"
                } else {
                    "200 OK"
                };
                let _ = c.write_all(
                    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                );
            }
        });
        Receiver { addr, got }
    }

    fn bodies(&self, path: &str) -> Vec<serde_json::Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, b)| json(b))
            .collect()
    }
}

#[test]
fn webhooks_tell_of_failures_with_retries_and_verify_jobs_skip_what_is_fresh() {
    let hooks = Receiver::start(1);
    // "chatty" is told over HTTPS, by a certificate of a CA of the test's
    // own, which its `ca` bundle makes trusted.
    let tls_dir = tempfile::tempdir().unwrap();
    let front = vsnap_e2e::tls::TlsFront::start(hooks.addr.parse().unwrap(), tls_dir.path());
    let site = Site::new(
        "0",
        &format!(
            r#"
[[vm]]
name = "gone"
disks = ["a.vhd"]
agent = "unix:/nonexistent/agent.sock"

[[notify]]
name = "ops"
url = "http://{addr}/hook"
retries = 3

[[notify]]
name = "chatty"
url = "{https}/ok"
ca = "{ca}"
on_success = true

[[job]]
name = "broken"
schedule = "2099-01-01"
vms = ["gone"]
notify = ["ops"]

[[job]]
name = "fine"
schedule = "2099-01-01"
vms = ["a"]
provider = "copy"
notify = ["ops", "chatty"]

[[verify]]
name = "check"
schedule = "2099-01-01"
vms = ["a"]
outdated_after = "1h"
notify = ["chatty"]
"#,
            addr = hooks.addr,
            https = front.endpoint(),
            ca = front.ca.display()
        ),
    );
    let mut serve = site.serve("serve.log");
    let (addr, token) = site.api("serve.log");
    let t = Some(token.as_str());
    let post = |path: &str, body: Option<&str>| http(&addr, "POST", path, t, body);
    let ended = |id: i64| -> serde_json::Value {
        let mut run = serde_json::Value::Null;
        site.wait_for("the run's end", Duration::from_secs(60), || {
            run = json(&http(&addr, "GET", &format!("/api/v1/runs/{id}"), t, None).1);
            run["run"]["state"] != "running"
        });
        run
    };
    let run_of = |(code, body): (u16, String)| -> i64 {
        assert_eq!(code, 202, "{body}");
        json(&body)["run"].as_i64().unwrap()
    };

    // A failure: "ops" answers 500 once, then 200; told on the retry.
    let id = run_of(post("/api/v1/jobs/broken/run", None));
    let run = ended(id);
    assert_eq!(run["run"]["state"], "failed", "{run:#}");
    site.wait_for("the webhook", Duration::from_secs(10), || {
        hooks.bodies("/hook").len() == 2
    });
    let told = hooks.bodies("/hook");
    assert_eq!(told[1]["event"], "vsnap.run");
    assert_eq!(told[1]["run"]["id"], id);
    assert_eq!(told[1]["run"]["state"], "failed");
    assert!(
        told[1]["run"]["error"].as_str().unwrap().contains("gone"),
        "{told:#?}"
    );
    assert!(site
        .log("serve.log")
        .contains(&format!("run {id}: told ops (2 attempt(s))")));

    // A success: only the target that asked for successes hears of it.
    let id = run_of(post("/api/v1/jobs/fine/run", None));
    assert_eq!(ended(id)["run"]["state"], "succeeded");
    site.wait_for("the success webhook", Duration::from_secs(10), || {
        hooks.bodies("/ok").len() == 1
    });
    assert_eq!(hooks.bodies("/hook").len(), 2);
    assert_eq!(hooks.bodies("/ok")[0]["vms"][0]["vm"], "a");

    // A verify job; run again within outdated_after, it has nothing to do.
    let id = run_of(post("/api/v1/jobs/check/run", None));
    let run = ended(id);
    assert_eq!(run["run"]["state"], "succeeded", "{run:#}");
    assert!(
        run["run"]["note"]
            .as_str()
            .unwrap()
            .starts_with("verified 1 snapshot(s)"),
        "{run:#}"
    );
    let id = run_of(post("/api/v1/jobs/check/run", None));
    assert!(ended(id)["run"]["note"]
        .as_str()
        .unwrap()
        .starts_with("nothing to verify"));

    // An ad hoc verify: a malformed body is named; a damaged chunk fails it.
    for (body, says) in [
        (r#"{"snapshots": 5}"#, "snapshots"),
        (r#"{"colour": 1}"#, "colour"),
        (r#"{"snapshots": ["../x"]}"#, "is not a snapshot id"),
        ("{", "the body"),
    ] {
        let (code, text) = post("/api/v1/verify", Some(body));
        assert_eq!(code, 400, "{body}: {text}");
        assert!(
            json(&text)["error"].as_str().unwrap().contains(says),
            "{body}: {text}"
        );
    }
    let id = run_of(post("/api/v1/verify", Some("{}")));
    assert_eq!(ended(id)["run"]["state"], "succeeded");
    let chunk = std::fs::read_dir(site.path("repo/chunks"))
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).unwrap().flatten())
        .map(|e| e.path())
        .next()
        .unwrap();
    let mut bytes = std::fs::read(&chunk).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&chunk, bytes).unwrap();
    let id = run_of(post("/api/v1/verify", Some("{}")));
    let run = ended(id);
    assert_eq!(run["run"]["state"], "failed", "{run:#}");
    assert!(
        run["run"]["error"].as_str().unwrap().contains("problem(s)"),
        "{run:#}"
    );
    // The address a port-0 service recorded goes when it stops.
    assert!(site.path("state/api.address").exists());
    signal(&serve, "TERM");
    assert!(serve.wait().unwrap().success());
    assert!(!site.path("state/api.address").exists());
}

#[test]
fn a_job_whose_gc_meets_a_damaged_snapshot_fails_and_says_so_in_a_json_log() {
    let site = Site::new(
        "0",
        r#"
[[job]]
name = "tidy"
schedule = "2099-01-01"
vms = ["a"]
provider = "copy"
gc = true
"#,
    );
    let mut serve = site.serve_args("serve.log", &[], &["--log-format", "json"]);
    let (addr, token) = site.api("serve.log");
    let run = |site: &Site| {
        let (status, body) = http(&addr, "POST", "/api/v1/jobs/tidy/run", Some(&token), None);
        assert_eq!(status, 202, "{body}");
        let id = json(&body)["run"].as_i64().unwrap();
        site.run_ended(&addr, &token, id, Duration::from_secs(60))
    };
    let first = run(&site);
    assert_eq!(first["state"], "succeeded", "{first:#}");
    // The snapshot it made, cut short: the next run's gc deletes nothing,
    // and the run fails naming it.
    let snapshots: Vec<PathBuf> = std::fs::read_dir(site.path("repo/snapshots"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(snapshots.len(), 1);
    std::fs::write(&snapshots[0], b"{").unwrap();
    let second = run(&site);
    assert_eq!(second["state"], "failed", "{second:#}");
    let error = second["error"].as_str().unwrap();
    assert!(
        error.contains("the backup succeeded, gc deleted nothing")
            && error.contains(snapshots[0].to_str().unwrap())
            && error.contains("vsnap repo quarantine"),
        "{error}"
    );
    signal(&serve, "TERM");
    assert!(serve.wait().unwrap().success());
    // Every line of the log is one JSON object; each run's end says its
    // outcome, its error and how long it took.
    let log = site.log("serve.log");
    let lines: Vec<serde_json::Value> = log.lines().map(json).collect();
    assert!(
        lines
            .iter()
            .all(|l| l["time"].is_string() && l["message"].is_string()),
        "{log}"
    );
    assert!(lines.iter().any(|l| l["message"] == "stopped"), "{log}");
    let ends: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["event"] == "run-ended").collect();
    assert_eq!(ends.len(), 2, "{log}");
    assert_eq!(
        (&ends[0]["state"], &ends[0]["level"]),
        (&"succeeded".into(), &"info".into())
    );
    assert_eq!(
        (&ends[1]["state"], &ends[1]["level"]),
        (&"failed".into(), &"error".into())
    );
    assert_eq!(ends[1]["job"], "tidy");
    assert_eq!(ends[1]["run"], second["id"]);
    assert_eq!(ends[1]["error"], second["error"]);
    assert!(ends[1]["took_s"].as_f64().unwrap() > 0.0, "{log}");
    let starts = lines
        .iter()
        .filter(|l| l["event"] == "run-started" && l["trigger"] == "manual");
    assert_eq!(starts.count(), 2, "{log}");
}

/// `vsnap dashboard --config`'s link, as it prints it.
fn sign_in_link(site: &Site) -> String {
    let out = vsnap_cmd()
        .args(["dashboard", "--json", "--config"])
        .arg(&site.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(v["expires_in_s"], 60);
    v["url"].as_str().unwrap().to_owned()
}

#[test]
fn the_dashboard_signs_in_once_with_a_code_for_a_strict_cookie_that_needs_its_header() {
    let site = Site::new(
        "0.2",
        r#"
[[job]]
name = "fine"
schedule = "2099-01-01"
vms = ["a"]
provider = "copy"
"#,
    );
    // Before the service's first start there is no token to make a link.
    let out = vsnap_cmd()
        .args(["dashboard", "--config"])
        .arg(&site.config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no API token") && err.contains("api.token"),
        "{err}"
    );

    let mut serve = site.serve("serve.log");
    let (addr, token) = site.api("serve.log");
    assert!(site.log("serve.log").contains("vsnap dashboard --config"));
    let link = sign_in_link(&site);
    let (host, code) = link
        .strip_prefix("http://")
        .and_then(|l| l.split_once("/login?code="))
        .unwrap();
    assert_eq!(host, addr, "the link reaches the port the service chose");
    assert!(!link.contains(&token), "the token is never in a URL");

    let login = |code: &str| http_answer(&addr, "GET", &format!("/login?code={code}"), &[], None);
    // A code changed by one digit was not made with the token.
    let mut forged = code.to_owned().into_bytes();
    let last = forged.len() - 1;
    forged[last] = if forged[last] == b'0' { b'1' } else { b'0' };
    let (status, _, body) = login(std::str::from_utf8(&forged).unwrap());
    assert_eq!(status, 401, "{body}");
    assert!(
        json(&body)["error"]
            .as_str()
            .unwrap()
            .contains("not made with this service's token"),
        "{body}"
    );

    let (status, headers, body) = login(code);
    assert_eq!(status, 303, "{body}");
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {name} in {headers:?}"))
    };
    assert_eq!(header("location"), "/");
    let set = header("set-cookie");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(set.contains(attr), "{set}");
    }
    let session = set.split(';').next().unwrap().to_owned();
    assert!(
        session.starts_with("vsnap_session=") && !session.contains(&token),
        "{set}"
    );
    // Once only.
    let (status, _, body) = login(code);
    assert_eq!(status, 401, "{body}");
    assert!(
        json(&body)["error"]
            .as_str()
            .unwrap()
            .contains("used already"),
        "{body}"
    );

    // The cookie alone: refused, as a form on another site would send it.
    let cookie = [("cookie", session.as_str())];
    let (status, body) = http_with(&addr, "GET", "/api/v1/jobs", &cookie, None);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("X-Vsnap-Dashboard"), "{body}");
    let (status, body) = http_with(&addr, "POST", "/api/v1/jobs/fine/run", &cookie, None);
    assert_eq!(status, 403, "{body}");
    // With the header the page sets: read and run.
    let page = [("cookie", session.as_str()), ("x-vsnap-dashboard", "1")];
    let (status, body) = http_with(&addr, "GET", "/api/v1/jobs", &page, None);
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_with(&addr, "POST", "/api/v1/jobs/fine/run", &page, None);
    assert_eq!(status, 202, "{body}");
    let id = json(&body)["run"].as_i64().unwrap();
    site.run_ended(&addr, &token, id, Duration::from_secs(60));

    // Signing out ends the session in the service, not just the browser.
    let (status, headers, body) = http_answer(&addr, "POST", "/logout", &page, None);
    assert_eq!(status, 200, "{body}");
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "set-cookie" && v.contains("Max-Age=0")),
        "{headers:?}"
    );
    let (status, body) = http_with(&addr, "GET", "/api/v1/jobs", &page, None);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("session has ended"), "{body}");
    signal(&serve, "TERM");
    assert!(serve.wait().unwrap().success());
}

#[test]
fn the_dashboard_in_a_real_browser_shows_the_vms_runs_a_job_and_charts_it() {
    let test = "the_dashboard_in_a_real_browser_shows_the_vms_runs_a_job_and_charts_it";
    let (Ok(driver), true) = (
        Command::new("chromedriver").arg("--version").output(),
        std::path::Path::new("/usr/bin/chromium").exists(),
    ) else {
        vsnap_e2e::skip(
            test,
            "no chromium and chromedriver (Debian packages chromium, chromium-driver; the test command installs them)",
            vsnap_e2e::Lack::Host,
        );
        return;
    };
    eprintln!("{}", String::from_utf8_lossy(&driver.stdout).trim());
    // Nothing comes from elsewhere: no CDN, no remote font.
    let page = vsnap_service::api::DASHBOARD;
    for remote in ["<script src", "<link", "@import", "url("] {
        assert!(!page.contains(remote), "the dashboard loads {remote}");
    }
    let site = Site::new(
        "0.2",
        r#"
[[job]]
name = "fine"
schedule = "2099-01-01"
vms = ["a", "slow"]
provider = "copy"
"#,
    );
    let mut serve = site.serve("serve.log");
    let (addr, token) = site.api("serve.log");
    let port = vsnap_e2e::free_port();
    let tmp = site.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let _driver = Killed(
        Command::new("chromedriver")
            .arg(format!("--port={port}"))
            // Chromium's scoped directories go into the test's own
            // directory, removed with it, not /tmp (where a browser that
            // is killed leaves them).
            .env("TMPDIR", &tmp)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(site.path("chromedriver.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    site.wait_for("chromedriver", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let artifacts =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    // The browser's profile is the test's, to be read once it closes.
    let profile = site.path("chromium");
    let link = sign_in_link(&site);
    let code = link.split_once("code=").unwrap().1.to_owned();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use fantoccini::Locator::Css;
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1100",
                         format!("--user-data-dir={}", profile.display()),
                         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let b = fantoccini::ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .unwrap();
        b.goto(&link).await.unwrap();
        let wait = Duration::from_secs(60);
        b.wait().at_most(wait).for_element(Css("tr[data-vm='slow']")).await.unwrap();
        // Signed in, and on to the page: the code left the address bar.
        assert_eq!(b.current_url().await.unwrap().path(), "/");
        assert_eq!(b.current_url().await.unwrap().query(), None);
        // No script reads the session (HttpOnly).
        let seen = b.execute("return document.cookie", vec![]).await.unwrap();
        assert_eq!(seen, serde_json::json!(""));
        let points = |b: &fantoccini::Client| {
            let b = b.clone();
            async move {
                b.find_all(Css("svg[data-vm='slow'] circle.window"))
                    .await
                    .map(|v| v.len())
                    .unwrap_or(0)
            }
        };
        let before = points(&b).await;
        b.find(Css("button[data-run-job='fine']")).await.unwrap().click().await.unwrap();
        // The run shows, goes through, and the chart gains its point.
        let t = Instant::now();
        loop {
            let state = match b.find(Css("#runs tr[data-job='fine'] td.state")).await {
                Ok(e) => e.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            // Told by the run's event stream, not found by a poll.
            let followed = b
                .find(Css("body[data-followed-end]"))
                .await
                .is_ok();
            if state == "succeeded" && followed && points(&b).await == before + 1 {
                break;
            }
            assert!(
                t.elapsed() < wait,
                "the dashboard shows the run as {state:?} with {} point(s)",
                points(&b).await
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let row = b.find(Css("tr[data-vm='slow']")).await.unwrap().text().await.unwrap();
        assert!(row.contains("app-consistent") && row.contains(" ms"), "{row}");
        let png = b.screenshot().await.unwrap();
        assert!(png.starts_with(b"\x89PNG"));
        std::fs::write(artifacts.join("dashboard.png"), png).unwrap();
        eprintln!("dashboard screenshot: {}", artifacts.join("dashboard.png").display());
        b.close().await.unwrap();
    });
    // The browser wrote its history as it closed: the sign-in link is
    // there, spent; the token is nowhere in the profile (history,
    // session restore, storage, cache).
    let history = profile.join("Default/History");
    site.wait_for(
        "the closed browser's history",
        Duration::from_secs(20),
        || history.exists() && std::fs::symlink_metadata(profile.join("SingletonLock")).is_err(),
    );
    let db =
        rusqlite::Connection::open_with_flags(&history, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let urls: Vec<String> = db
        .prepare("SELECT url FROM urls")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        urls.iter().any(|u| u.contains(&code)),
        "the history holds {urls:?}"
    );
    assert!(urls.iter().all(|u| !u.contains(&token)), "{urls:?}");
    let (status, body) = http(&addr, "GET", &format!("/login?code={code}"), None, None);
    assert_eq!(status, 401, "the link in the history is spent: {body}");
    let mut files = 0;
    let mut stack = vec![profile.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let (p, t) = (e.path(), e.file_type().unwrap());
            if t.is_dir() {
                stack.push(p);
            } else if t.is_file() {
                files += 1;
                let bytes = std::fs::read(&p).unwrap();
                let found = bytes.windows(token.len()).any(|w| w == token.as_bytes());
                assert!(!found, "the token is in {}", p.display());
            }
        }
    }
    assert!(files > 10, "the profile has {files} file(s)");
    signal(&serve, "TERM");
    assert!(serve.wait().unwrap().success());
}

#[test]
fn demo_serve_leaves_its_vms_under_a_running_service_and_says_how_to_open_it() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    let port = vsnap_e2e::free_port();
    let out = dir.path().join("demo.out");
    let mut child = Killed(
        vsnap_cmd()
            .arg("demo")
            .arg(&demo)
            .args(["--vms", "2", "--disk-size", "32M", "--serve", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let read = || std::fs::read_to_string(&out).unwrap_or_default();
    let t = Instant::now();
    while !read().contains("dashboard: http://") {
        assert!(t.elapsed() < Duration::from_secs(120), "{}", read());
        assert!(child.try_wait().unwrap().is_none(), "{}", read());
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = read();
    let url = text
        .lines()
        .find_map(|l| l.strip_prefix("dashboard: "))
        .unwrap()
        .to_string();
    let (addr, code) = url
        .strip_prefix("http://")
        .and_then(|u| u.split_once("/login?code="))
        .unwrap();
    assert!(
        text.contains("works once, within 60 s; `vsnap dashboard --config"),
        "{text}"
    );
    let token = std::fs::read_to_string(demo.join("state/api.token")).unwrap();
    let token = token.trim();
    assert!(!text.contains(token), "the demo printed the token: {text}");
    let t = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(50));
    }
    // The link the demo printed signs in.
    let (status, body) = http(addr, "GET", &format!("/login?code={code}"), None, None);
    assert_eq!(status, 303, "{body}");
    let (code, page) = http(addr, "GET", "/", None, None);
    assert_eq!(code, 200);
    assert!(page.contains("<title>vsnap</title>"));
    let (code, body) = http(addr, "POST", "/api/v1/jobs/demo/run", Some(token), None);
    assert_eq!(code, 202, "{body}");
    let id = json(&body)["run"].as_i64().unwrap();
    let t = Instant::now();
    let run = loop {
        let run = json(
            &http(
                addr,
                "GET",
                &format!("/api/v1/runs/{id}"),
                Some(token),
                None,
            )
            .1,
        );
        if run["run"]["state"] != "running" {
            break run;
        }
        assert!(t.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(run["run"]["state"], "succeeded", "{run:#}");
    assert_eq!(run["vms"][0]["consistency"], "app-consistent", "{run:#}");
    signal(&child, "INT");
    assert!(child.wait().unwrap().success(), "{}", read());
    // Its VMs' agents went with it.
    let left = Command::new("pgrep")
        .args(["-f", &format!("agent --listen unix:{}", demo.display())])
        .output()
        .unwrap();
    assert!(
        !left.status.success(),
        "{}",
        String::from_utf8_lossy(&left.stdout)
    );
}

#[test]
fn a_job_that_panics_fails_its_run_and_the_service_serves_on() {
    let site = Site::new(
        "0",
        r#"
[[job]]
name = "fine"
schedule = "2099-01-01"
vms = ["a"]
provider = "copy"
"#,
    );
    // The build's panic point panics the first run's task, once.
    let mut serve = site.serve_with(
        "serve.log",
        &[("FAILPOINTS", "serve-job-panic=1*panic(a test panic)")],
    );
    let (addr, token) = site.api("serve.log");
    let t = Some(token.as_str());
    let ended = |want: &str| {
        let (code, body) = http(&addr, "POST", "/api/v1/jobs/fine/run", t, None);
        assert_eq!(code, 202, "{body}");
        let id = json(&body)["run"].as_i64().unwrap();
        let run = site.run_ended(&addr, &token, id, Duration::from_secs(30));
        assert_eq!(run["state"], want, "{run:#}");
        run
    };
    let run = ended("failed");
    let error = run["error"].as_str().unwrap();
    assert!(
        error.contains("stopped unexpectedly") && error.contains("a test panic"),
        "{error} (a vsnap built without the failpoints feature does not panic)"
    );
    assert_eq!(http(&addr, "GET", "/healthz", None, None).0, 200);
    ended("succeeded");
    signal(&serve, "TERM");
    assert!(serve.wait().unwrap().success());
}

/// A cancel stops a run at its next safe point: while it streams, each
/// disk not yet read whole fails, nothing is committed, and the run is
/// recorded cancelled with why; once a run has ended, a cancel is told
/// it came too late. (FAILPOINTS slows each chunk, so the run streams
/// long enough to be cancelled midway.)
#[test]
fn a_cancel_while_a_run_streams_commits_nothing_and_a_late_one_is_told() {
    let site = Site::new(
        "0",
        r#"
[[job]]
name = "stream"
schedule = "2099-01-01"
vms = ["a"]
provider = "copy"
"#,
    );
    let _serve = site.serve_with("serve.log", &[("FAILPOINTS", "engine-chunk=sleep(800)")]);
    let (addr, token) = site.api("serve.log");
    let t = Some(token.as_str());
    let (code, body) = http(&addr, "POST", "/api/v1/jobs/stream/run", t, None);
    assert_eq!(code, 202, "{body}");
    let id = json(&body)["run"].as_i64().unwrap();
    let run = |id: i64| json(&http(&addr, "GET", &format!("/api/v1/runs/{id}"), t, None).1);
    // Streaming: some bytes done, not all.
    site.wait_for("streaming", Duration::from_secs(30), || {
        let r = run(id);
        r["run"]["done_bytes"].as_u64().unwrap_or(0) > 0
    });
    let (code, body) = http(&addr, "POST", &format!("/api/v1/runs/{id}/cancel"), t, None);
    assert_eq!(code, 202, "{body}");
    let mut r = serde_json::Value::Null;
    site.wait_for("the run's end", Duration::from_secs(60), || {
        r = run(id);
        r["run"]["state"] != "running"
    });
    assert_eq!(r["run"]["state"], "cancelled", "{r:#}");
    assert!(
        r["run"]["done_bytes"].as_u64() < r["run"]["total_bytes"].as_u64(),
        "it stopped midway: {r:#}"
    );
    assert!(r.to_string().contains("stopped on request"), "{r:#}");
    assert!(r["vms"][0]["snapshot"].is_null(), "{r:#}");
    let (_, body) = http(&addr, "GET", "/api/v1/snapshots?vm=a", t, None);
    assert_eq!(json(&body).as_array().map(Vec::len), Some(0), "{body}");
    // Too late.
    let (code, body) = http(&addr, "POST", &format!("/api/v1/runs/{id}/cancel"), t, None);
    assert_eq!(code, 409, "{body}");
    assert!(
        body.contains("has ended (cancelled): too late to cancel"),
        "{body}"
    );
    // The service's log: one line as the run starts, one as it ends.
    let log = site.log("serve.log");
    assert!(
        log.contains(&format!("job stream: run {id} started (manual backup)")),
        "{log}"
    );
    assert!(
        log.contains(&format!("job stream: run {id} cancelled: ")),
        "{log}"
    );
}

/// A cancel that comes once every snapshot is committed stops the run
/// at its next safe point: the snapshots stand, retention does not run,
/// and the run is recorded cancelled with a note saying so.
/// (FAILPOINTS pauses the third run between its commit and its
/// retention.)
#[test]
fn a_cancel_after_the_commit_leaves_the_snapshots_and_skips_retention() {
    let site = Site::new(
        "0",
        r#"
[[job]]
name = "kept"
schedule = "2099-01-01"
vms = ["a"]
provider = "copy"
keep = { last = 1 }
"#,
    );
    let env = [("FAILPOINTS", "serve-after-commit=2*off->sleep(5000)")];
    let _serve = site.serve_with("serve.log", &env);
    let (addr, token) = site.api("serve.log");
    let t = Some(token.as_str());
    let start = || {
        let (code, body) = http(&addr, "POST", "/api/v1/jobs/kept/run", t, None);
        assert_eq!(code, 202, "{body}");
        json(&body)["run"].as_i64().unwrap()
    };
    let snapshots = || {
        let (_, body) = http(&addr, "GET", "/api/v1/snapshots?vm=a", t, None);
        json(&body).as_array().map_or(0, Vec::len)
    };
    // Two runs: retention keeps one snapshot.
    for _ in 0..2 {
        let id = start();
        let run = site.run_ended(&addr, &token, id, Duration::from_secs(60));
        assert_eq!(run["state"], "succeeded", "{run:#}");
    }
    assert_eq!(snapshots(), 1);
    // The third: cancelled once its snapshot is committed.
    let id = start();
    site.wait_for("the third snapshot", Duration::from_secs(60), || {
        snapshots() == 2
    });
    let (code, body) = http(&addr, "POST", &format!("/api/v1/runs/{id}/cancel"), t, None);
    assert_eq!(code, 202, "{body}");
    let run = site.run_ended(&addr, &token, id, Duration::from_secs(60));
    assert_eq!(run["state"], "cancelled", "{run:#}");
    assert_eq!(
        run["note"],
        "cancelled after every snapshot was committed (they stand); retention and gc did not run",
        "{run:#}"
    );
    assert!(run["error"].is_null(), "{run:#}");
    let (_, body) = http(&addr, "GET", &format!("/api/v1/runs/{id}"), t, None);
    assert!(
        json(&body)["vms"][0]["snapshot"].is_string(),
        "the committed snapshot is the run's: {body}"
    );
    assert_eq!(snapshots(), 2, "retention did not run");
}

/// A verify run stops at its next chunk when cancelled: recorded
/// cancelled, midway, and nothing it did not finish counts as verified
/// (the next run of the job verifies every snapshot again). (FAILPOINTS
/// slows each chunk verify reads.)
#[test]
fn a_cancelled_verify_run_stops_midway_and_marks_nothing_verified() {
    let site = Site::new(
        "0",
        r#"
[[vm]]
name = "big"
disks = ["big.vhd"]
agent = "none"

[[job]]
name = "back"
schedule = "2099-01-01"
vms = ["big"]
provider = "copy"

[[verify]]
name = "check"
schedule = "2099-01-01"
vms = ["big"]
outdated_after = "1h"
"#,
    );
    // Twelve chunks of their own (the repository's chunks are 2 MiB).
    let writes: Vec<(u8, u64, u64)> = (0..12u8)
        .map(|i| (0x20 + i, u64::from(i) * (4 << 20), 1 << 20))
        .collect();
    qemu_image(&site.path("big.vhd"), "dynamic", "48M", &writes);
    let _serve = site.serve_with("serve.log", &[("FAILPOINTS", "verify-chunk=sleep(1000)")]);
    let (addr, token) = site.api("serve.log");
    let t = Some(token.as_str());
    let start = |job: &str| {
        let (code, body) = http(&addr, "POST", &format!("/api/v1/jobs/{job}/run"), t, None);
        assert_eq!(code, 202, "{body}");
        json(&body)["run"].as_i64().unwrap()
    };
    let id = start("back");
    let run = site.run_ended(&addr, &token, id, Duration::from_secs(60));
    assert_eq!(run["state"], "succeeded", "{run:#}");

    let id = start("check");
    site.wait_for("verify under way", Duration::from_secs(30), || {
        let (_, body) = http(&addr, "GET", &format!("/api/v1/runs/{id}"), t, None);
        json(&body)["run"]["done_bytes"].as_u64().unwrap_or(0) > 0
    });
    let (code, body) = http(&addr, "POST", &format!("/api/v1/runs/{id}/cancel"), t, None);
    assert_eq!(code, 202, "{body}");
    let run = site.run_ended(&addr, &token, id, Duration::from_secs(60));
    assert_eq!(run["state"], "cancelled", "{run:#}");
    assert!(
        run["done_bytes"].as_u64() < run["total_bytes"].as_u64(),
        "it stopped midway: {run:#}"
    );
    assert!(
        run["error"]
            .as_str()
            .unwrap()
            .contains("stopped on request"),
        "{run:#}"
    );
    // Nothing was marked verified: the next run verifies the snapshot.
    let id = start("check");
    let run = site.run_ended(&addr, &token, id, Duration::from_secs(120));
    assert_eq!(run["state"], "succeeded", "{run:#}");
    assert!(
        run["note"]
            .as_str()
            .unwrap()
            .starts_with("verified 1 snapshot(s)"),
        "{run:#}"
    );
    let log = site.log("serve.log");
    assert!(
        log.contains(&format!("job check: run {} cancelled: ", id - 1)),
        "{log}"
    );
}

/// Any local user can connect to the API; none can starve it. With 2,000
/// idle connections and 200 clients sending a header a byte at a time,
/// a client with the token is answered within 100 ms (p99 of 100
/// requests) and a run is accepted; a silent connection is closed within
/// the header timeout.
#[test]
fn idle_and_slow_connections_never_starve_the_api() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    // This test's own descriptors: 2,200 sockets.
    let mut limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    limit.current = limit.maximum;
    let _ = rustix::process::setrlimit(rustix::process::Resource::Nofile, limit);
    let site = Site::new(
        "0",
        r#"
[[job]]
name = "quick"
schedule = "2099-01-01"
vms = ["a"]
provider = "copy"
"#,
    );
    let _serve = site.serve("serve.log");
    let (addr, token) = site.api("serve.log");
    let t = Some(token.as_str());
    let silent = TcpStream::connect(&addr).unwrap();
    let opened = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..2000 {
        if let Ok(s) = TcpStream::connect(&addr) {
            idle.push(s);
        }
    }
    assert!(idle.len() >= 1900, "only {} connections opened", idle.len());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slow = {
        let (addr, stop) = (addr.clone(), std::sync::Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut socks: Vec<TcpStream> = (0..200)
                .filter_map(|_| TcpStream::connect(&addr).ok())
                .collect();
            for s in &mut socks {
                let _ = s.write_all(b"GET /api/v1/jobs HTTP/1.1\r\nHost: x\r\n");
            }
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for s in &mut socks {
                    let _ = s.write_all(b"X");
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let mut times = Vec::new();
    for _ in 0..100 {
        let t0 = Instant::now();
        let (code, body) = http(&addr, "GET", "/api/v1/jobs", t, None);
        times.push(t0.elapsed());
        assert_eq!(code, 200, "{body}");
    }
    times.sort();
    let p99 = times[98];
    eprintln!(
        "GET /api/v1/jobs under 2,200 idle and slow connections: median {:?}, p99 {p99:?}",
        times[50]
    );
    assert!(p99 < Duration::from_millis(100), "p99 {p99:?}: {times:?}");
    let (code, body) = http(&addr, "POST", "/api/v1/jobs/quick/run", t, None);
    assert_eq!(code, 202, "{body}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    slow.join().unwrap();
    // The silent one is closed by the server: its read ends, well within
    // the header timeout and a margin.
    let mut silent = silent;
    silent
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut byte = [0u8; 1];
    let n = silent.read(&mut byte);
    assert!(
        matches!(n, Ok(0))
            || n.as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "{n:?}"
    );
    assert!(
        opened.elapsed() < Duration::from_secs(15),
        "{:?}",
        opened.elapsed()
    );
    drop(idle);
}
