//! `vsnap agent` against real kernel freezes: ext4 filesystems on loop
//! devices this test made (never `/`, never a mount it did not create),
//! real hooks, real sockets. Tests that freeze need root and say so when
//! they skip.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vsnap_e2e::{
    skip, skip_unless_root, start_agent, write_hook, writes_block, AgentProc, Lack, LoopFs, Wire,
};

const BLOCK: Duration = Duration::from_millis(400);

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// `vsnap agent ARGS`, by default on `dir/a.sock` with its marker at
/// `dir/agent.frozen` (each unless ARGS names its own); stderr goes to
/// `dir/ERR`.
fn spawn_agent(dir: &Path, args: &[&str], err: &str) -> Result<AgentProc, String> {
    let sock = format!("unix:{}", dir.join("a.sock").display());
    let marker = dir.join("agent.frozen");
    let mut all: Vec<&str> = Vec::new();
    if !args.contains(&"--listen") && !args.contains(&"--config") {
        all.extend(["--listen", &sock]);
    }
    if !args.contains(&"--marker") && !args.contains(&"--config") {
        all.extend(["--marker", s(&marker)]);
    }
    all.extend_from_slice(args);
    start_agent(&all, &dir.join(err))
}

/// A new connection that says hello, prepares and sends `freeze` with
/// `args`; returns it and the freeze's whole reply.
fn hello_prepare_freeze(address: &str, args: Value) -> (Wire, Value) {
    let mut w = Wire::connect(address);
    w.ok("hello", json!({"version": 1}));
    w.ok("prepare", json!({}));
    let reply = w.call("freeze", args);
    (w, reply)
}

/// Polls `status` until the agent leaves FROZEN (the watchdog's work).
fn wait_unfrozen(w: &mut Wire, limit: Duration) -> Value {
    let t = Instant::now();
    loop {
        let st = w.ok("status", Value::Null);
        if st["state"] != "FROZEN" || t.elapsed() > limit {
            return st;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_cycle_freezes_nested_mounts_inner_first_holds_writers_and_thaws() {
    if skip_unless_root("a_cycle_freezes_nested_mounts_inner_first_holds_writers_and_thaws") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let outer = LoopFs::ext4(&dir.path().join("outer.img"), &dir.path().join("outer"), 16).unwrap();
    let inner = LoopFs::ext4(
        &dir.path().join("inner.img"),
        &outer.mount.join("inner"),
        16,
    )
    .unwrap();
    let log = dir.path().join("hooks.log");
    // The application writer flushes into its filesystem on `freeze`,
    // which only works because hooks run before FIFREEZE.
    write_hook(
        &dir.path().join("hooks"),
        "10-app",
        &format!(
            "echo \"app $1 $VSNAP_BACKUP_TYPE\" >> {log}\n[ \"$1\" = freeze ] && echo flushed > {}/app.flush\nexit 0",
            inner.mount.display(),
            log = log.display()
        ),
    );
    let marker = dir.path().join("run/agent.frozen");
    let agent = spawn_agent(
        dir.path(),
        &[
            // Given outer first: the agent must still freeze inner first.
            "--freeze",
            s(&outer.mount),
            "--freeze",
            s(&inner.mount),
            "--hooks",
            s(&dir.path().join("hooks")),
            "--marker",
            s(&marker),
        ],
        "agent.err",
    )
    .unwrap();
    let mut w = Wire::connect(&agent.address);
    let hello = w.ok("hello", json!({"version": 1}));
    assert_eq!(hello["version"], 1);
    assert_eq!(hello["state"], "IDLE");

    let id = w.ok("identify", Value::Null);
    let mounts: Vec<&str> = id["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mount_point"].as_str().unwrap())
        .collect();
    assert_eq!(mounts, [s(&inner.mount), s(&outer.mount)], "{id}");
    assert_eq!(id["hooks"].as_array().unwrap().len(), 1, "{id}");

    let prep = w.ok("prepare", json!({"backup_type": "copy"}));
    assert_eq!(prep["state"], "PREPARED");
    // Prepare flushed the mounts it will freeze.
    assert!(prep["prepare_sync_us"].as_u64().is_some(), "{prep}");
    let fr = w.ok("freeze", json!({}));
    assert_eq!(fr["frozen"], 2, "{fr}");
    assert_eq!(fr["expected"], 2, "{fr}");
    assert_eq!(
        fr["mounts"],
        json!([s(&inner.mount), s(&outer.mount)]),
        "{fr}"
    );

    // Frozen for real: writers on both filesystems are held.
    assert!(
        writes_block(&outer.mount, BLOCK),
        "outer accepts writes while frozen"
    );
    assert!(
        writes_block(&inner.mount, BLOCK),
        "inner accepts writes while frozen"
    );
    let recorded: Value = serde_json::from_slice(&std::fs::read(&marker).unwrap()).unwrap();
    assert_eq!(
        recorded["mounts"],
        json!([s(&inner.mount), s(&outer.mount)])
    );

    // Only the safe operations while frozen.
    let refused = w.err("identify", Value::Null);
    assert_eq!(refused["class"], "protocol", "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("while frozen"),
        "{refused}"
    );
    let st = w.ok("status", Value::Null);
    assert_eq!(st["state"], "FROZEN");
    assert_eq!(st["frozen_mounts"].as_array().unwrap().len(), 2);

    std::thread::sleep(Duration::from_millis(50));
    let th = w.ok("thaw", Value::Null);
    assert_eq!(th["thawed"], 2, "{th}");
    let window = th["freeze_window_us"].as_u64().unwrap();
    // It spans at least the two blocked-write probes and the pause.
    assert!((850_000..30_000_000).contains(&window), "{th}");
    // The stall holds the frozen window, the freeze hook and FIFREEZE.
    let stall = th["stall_us"].as_u64().unwrap();
    assert!(stall >= window, "{th}");
    assert!(!writes_block(&outer.mount, Duration::from_secs(10)));
    assert!(!writes_block(&inner.mount, Duration::from_secs(10)));
    assert!(!marker.exists(), "the marker outlived the thaw");
    // The thaw is idempotent.
    assert_eq!(w.ok("thaw", Value::Null)["thawed"], 0);

    let done = w.ok("complete", json!({"success": true}));
    assert_eq!(done["state"], "COMPLETE");
    assert_eq!(
        w.ok("status", Value::Null)["timings"]["freeze_window_us"],
        window
    );
    assert_eq!(
        lines(&log),
        [
            "app prepare copy",
            "app freeze ",
            "app thaw ",
            "app complete "
        ],
        "{}",
        agent.stderr()
    );
    assert_eq!(
        std::fs::read_to_string(inner.mount.join("app.flush")).unwrap(),
        "flushed\n"
    );
}

#[test]
fn a_failing_freeze_hook_freezes_nothing_and_thaws_the_hooks_before_it() {
    if skip_unless_root("a_failing_freeze_hook_freezes_nothing_and_thaws_the_hooks_before_it") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = LoopFs::ext4(&dir.path().join("g.img"), &dir.path().join("g"), 16).unwrap();
    let log = dir.path().join("hooks.log");
    let hooks = dir.path().join("hooks");
    write_hook(
        &hooks,
        "10-db",
        &format!("echo \"db $1\" >> {}", log.display()),
    );
    write_hook(
        &hooks,
        "20-veto",
        &format!(
            "echo \"veto $1\" >> {}\n[ \"$1\" = freeze ] && {{ echo 'cannot quiesce' >&2; exit 3; }}\nexit 0",
            log.display()
        ),
    );
    let marker = dir.path().join("agent.frozen");
    let agent = spawn_agent(
        dir.path(),
        &[
            "--freeze",
            s(&fs.mount),
            "--hooks",
            s(&hooks),
            "--marker",
            s(&marker),
        ],
        "agent.err",
    )
    .unwrap();
    let (mut w, r) = hello_prepare_freeze(&agent.address, json!({}));
    let e = &r["err"];
    assert_eq!(e["class"], "non_retryable", "{e}");
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("20-veto") && msg.contains("nothing was frozen"),
        "{e}"
    );
    assert!(
        !writes_block(&fs.mount, Duration::from_secs(10)),
        "frozen after a veto"
    );
    assert!(!marker.exists());
    let st = w.ok("status", Value::Null);
    assert_eq!(st["state"], "FAILED_AT_FREEZE", "{st}");
    assert_eq!(st["failure"]["class"], "non_retryable");
    // 10-db froze, so it is thawed; 20-veto never froze and gets no thaw.
    assert_eq!(
        lines(&log),
        [
            "db prepare",
            "veto prepare",
            "db freeze",
            "veto freeze",
            "db thaw"
        ]
    );
    assert!(
        agent.stderr().contains("cannot quiesce"),
        "{}",
        agent.stderr()
    );
}

#[test]
fn the_watchdog_thaws_at_the_hold_limit_and_the_thaw_reports_timeout() {
    if skip_unless_root("the_watchdog_thaws_at_the_hold_limit_and_the_thaw_reports_timeout") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = LoopFs::ext4(&dir.path().join("g.img"), &dir.path().join("g"), 16).unwrap();
    let agent = spawn_agent(
        dir.path(),
        &["--freeze", s(&fs.mount), "--hold-limit", "20s"],
        "agent.err",
    )
    .unwrap();
    // The coordinator asks for less than the agent's own limit: it wins.
    let (mut w, r) = hello_prepare_freeze(&agent.address, json!({"hold_limit_ms": 300}));
    let fr = &r["ok"];
    assert_eq!(fr["hold_limit_ms"], 300, "{fr}");
    assert!(writes_block(&fs.mount, Duration::from_millis(100)));
    let st = wait_unfrozen(&mut w, Duration::from_secs(10));
    assert_eq!(st["state"], "ABORTED", "{st}");
    assert_eq!(st["watchdog_fired"], true);
    assert_eq!(st["failure"]["class"], "timeout", "{st}");
    let window = st["timings"]["freeze_window_us"].as_u64().unwrap();
    assert!((300_000..5_000_000).contains(&window), "{st}");
    assert!(
        !writes_block(&fs.mount, Duration::from_secs(10)),
        "still frozen"
    );
    let e = w.err("thaw", Value::Null);
    assert_eq!(e["class"], "timeout", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("not application-consistent"),
        "{e}"
    );
    assert!(!dir.path().join("agent.frozen").exists());
    // A hold limit above the agent's own is cut to it.
    w.ok("prepare", json!({}));
    let fr = w.ok("freeze", json!({"hold_limit_ms": 3_600_000}));
    assert_eq!(fr["hold_limit_ms"], 20_000, "{fr}");
    assert_eq!(w.ok("thaw", Value::Null)["thawed"], 1);
}

/// The RCU knob is the whole machine's: this test sets it, so it restores
/// what it found whatever happens.
struct Knob(String);

impl Drop for Knob {
    fn drop(&mut self) {
        let _ = std::fs::write(vsnap_agent::rcu::KNOB, &self.0);
    }
}

#[test]
fn a_restarted_agent_turns_off_the_expedited_grace_periods_a_killed_one_left_on() {
    let test = "a_restarted_agent_turns_off_the_expedited_grace_periods_a_killed_one_left_on";
    if skip_unless_root(test) {
        return;
    }
    let Ok(found) = std::fs::read_to_string(vsnap_agent::rcu::KNOB) else {
        skip(
            test,
            "this kernel has no /sys/kernel/rcu_expedited",
            Lack::Host,
        );
        return;
    };
    let _restore = Knob(found.trim().to_string());
    let dir = tempfile::tempdir().unwrap();
    // What an agent killed inside FIFREEZE leaves: its marker, saying it
    // had turned expedited grace periods on, and the knob still on.
    let marker = dir.path().join("agent.frozen");
    std::fs::write(&marker, r#"{"pid":1,"mounts":[],"rcu_expedited":true}"#).unwrap();
    std::fs::write(vsnap_agent::rcu::KNOB, "1").unwrap();
    let agent = spawn_agent(dir.path(), &[], "agent.err").unwrap();
    assert_eq!(
        std::fs::read_to_string(vsnap_agent::rcu::KNOB)
            .unwrap()
            .trim(),
        "0"
    );
    assert!(!marker.exists());
    assert!(
        agent
            .stderr()
            .contains("reset /sys/kernel/rcu_expedited (a previous agent died while it was on)"),
        "{}",
        agent.stderr()
    );
}

#[test]
fn a_restarted_agent_thaws_what_a_killed_one_left_frozen() {
    if skip_unless_root("a_restarted_agent_thaws_what_a_killed_one_left_frozen") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = LoopFs::ext4(&dir.path().join("g.img"), &dir.path().join("g"), 16).unwrap();
    let marker = dir.path().join("agent.frozen");
    let mut first = spawn_agent(dir.path(), &["--freeze", s(&fs.mount)], "first.err").unwrap();
    let (_w, r) = hello_prepare_freeze(&first.address, json!({}));
    assert_eq!(r["ok"]["frozen"], 1, "{r}");
    // SIGKILL: no handler runs, so the filesystem stays frozen.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    assert!(writes_block(&fs.mount, BLOCK), "the kill thawed by itself?");
    assert!(marker.exists());

    let second = spawn_agent(dir.path(), &["--freeze", s(&fs.mount)], "second.err").unwrap();
    assert!(
        !writes_block(&fs.mount, Duration::from_secs(10)),
        "the restart did not thaw"
    );
    assert!(!marker.exists());
    assert!(
        second
            .stderr()
            .contains("a previous agent died while it was frozen"),
        "{}",
        second.stderr()
    );
    let mut w = Wire::connect(&second.address);
    w.ok("hello", json!({"version": 1}));
    assert_eq!(w.ok("status", Value::Null)["state"], "IDLE");
}

#[test]
fn sigterm_thaws_before_the_agent_exits() {
    if skip_unless_root("sigterm_thaws_before_the_agent_exits") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = LoopFs::ext4(&dir.path().join("g.img"), &dir.path().join("g"), 16).unwrap();
    let mut agent = spawn_agent(dir.path(), &["--freeze", s(&fs.mount)], "agent.err").unwrap();
    let (_w, r) = hello_prepare_freeze(&agent.address, json!({}));
    assert_eq!(r["ok"]["frozen"], 1, "{r}");
    let pid = agent.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = agent.child.wait().unwrap();
    assert!(status.success(), "{status:?}: {}", agent.stderr());
    assert!(!writes_block(&fs.mount, Duration::from_secs(10)));
    assert!(!dir.path().join("agent.frozen").exists());
    assert!(
        agent.stderr().contains("stopping while frozen"),
        "{}",
        agent.stderr()
    );
}

#[test]
fn the_agent_refuses_a_marker_on_a_filesystem_it_freezes() {
    if skip_unless_root("the_agent_refuses_a_marker_on_a_filesystem_it_freezes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = LoopFs::ext4(&dir.path().join("g.img"), &dir.path().join("g"), 16).unwrap();
    let e = spawn_agent(
        dir.path(),
        &[
            "--freeze",
            s(&fs.mount),
            "--marker",
            s(&fs.mount.join("run/agent.frozen")),
        ],
        "agent.err",
    )
    .expect_err("an agent with its marker on a frozen filesystem started");
    assert!(
        e.contains("which this agent freezes") && e.contains("--marker"),
        "{e}"
    );
}

#[test]
fn tcp_needs_the_token_before_any_operation() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("agent.frozen");
    // Without a token file, TCP does not start at all.
    let e = spawn_agent(
        dir.path(),
        &["--listen", "tcp:127.0.0.1:0", "--marker", s(&marker)],
        "none.err",
    )
    .expect_err("a TCP agent started without a token");
    assert!(e.contains("--token-file"), "{e}");

    let short = dir.path().join("short");
    std::fs::write(&short, "abc\n").unwrap();
    let e = spawn_agent(
        dir.path(),
        &[
            "--listen",
            "tcp:127.0.0.1:0",
            "--token-file",
            s(&short),
            "--marker",
            s(&marker),
        ],
        "short.err",
    )
    .expect_err("a 3-character token was accepted");
    assert!(e.contains("16"), "{e}");

    let token = "correct-horse-battery-staple";
    let tf = dir.path().join("token");
    std::fs::write(&tf, format!("{token}\n")).unwrap();
    let agent = spawn_agent(
        dir.path(),
        &[
            "--listen",
            "tcp:127.0.0.1:0",
            "--token-file",
            s(&tf),
            "--marker",
            s(&marker),
        ],
        "agent.err",
    )
    .unwrap();
    assert!(
        agent.address.starts_with("tcp:127.0.0.1:"),
        "{}",
        agent.address
    );

    // Before hello, everything is refused, and the connection stays open.
    let mut w = Wire::connect(&agent.address);
    for op in ["identify", "status", "thaw"] {
        let e = w.err(op, Value::Null);
        assert_eq!(e["class"], "unauthorized", "{op}: {e}");
    }
    let e = w.err("prepare", json!({}));
    assert_eq!(e["class"], "unauthorized");
    // A wrong token: refused, and the agent hangs up.
    let r = w.hello(Some("correct-horse-battery-stapler"));
    assert_eq!(r["err"]["class"], "unauthorized", "{r}");
    assert!(
        w.raw(r#"{"id":99,"op":"status"}"#).is_none(),
        "still connected after a wrong token"
    );
    // No token at all: the same.
    let mut w = Wire::connect(&agent.address);
    assert_eq!(w.hello(None)["err"]["class"], "unauthorized");

    let mut w = Wire::connect(&agent.address);
    let r = w.hello(Some(token));
    assert_eq!(r["ok"]["version"], 1, "{r}");
    let id = w.ok("identify", Value::Null);
    assert_eq!(id["protocol"], 1);
    assert_eq!(id["mounts"], json!([]), "{id}");
}

#[test]
fn malformed_and_out_of_order_requests_get_protocol_errors() {
    let dir = tempfile::tempdir().unwrap();
    let agent = spawn_agent(dir.path(), &[], "agent.err").unwrap();
    let mut w = Wire::connect(&agent.address);
    let r = w.raw("this is not json").unwrap();
    assert_eq!(r["err"]["class"], "protocol", "{r}");
    assert!(r["id"].is_null(), "{r}");
    let r = w.raw(r#"{"op":"status"}"#).unwrap();
    assert!(
        r["err"]["message"].as_str().unwrap().contains("\"id\""),
        "{r}"
    );
    let e = w.err("explode", json!({}));
    assert!(e["message"].as_str().unwrap().contains("unknown op"), "{e}");
    let e = w.err("freeze", json!({"hold_limit_ms": "soon"}));
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("bad arguments for freeze"),
        "{e}"
    );
    let e = w.err("hello", json!({"version": 2}));
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("protocol version 2"),
        "{e}"
    );
    // Steps out of order.
    let e = w.err("freeze", json!({}));
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("send prepare first"),
        "{e}"
    );
    let e = w.err("complete", json!({"success": true}));
    assert_eq!(e["class"], "protocol", "{e}");
    // A line longer than the protocol allows is refused, not buffered.
    let long = format!(
        r#"{{"id":5,"op":"status","pad":"{}"}}"#,
        "x".repeat(70 * 1024)
    );
    let r = w.raw(&long);
    assert!(
        r.as_ref().is_none_or(|r| r["err"]["class"] == "protocol"),
        "{r:?}"
    );
    // The agent itself is unharmed.
    let mut w = Wire::connect(&agent.address);
    assert_eq!(w.ok("status", Value::Null)["state"], "IDLE");
}

#[test]
fn a_config_file_gives_the_same_settings_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = dir.path().join("hooks");
    write_hook(&hooks, "50-app", "exit 0");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"unix:{}\"\nhooks = \"{}\"\nhold-limit = \"90s\"\nmarker = \"{}\"\n",
            dir.path().join("a.sock").display(),
            hooks.display(),
            dir.path().join("agent.frozen").display()
        ),
    )
    .unwrap();
    let agent = spawn_agent(
        dir.path(),
        &["--config", s(&cfg), "--hold-limit", "45s"],
        "agent.err",
    )
    .unwrap();
    let mut w = Wire::connect(&agent.address);
    w.ok("hello", json!({"version": 1}));
    let id = w.ok("identify", Value::Null);
    assert_eq!(id["hold_limit_ms"], 45_000, "{id}");
    assert_eq!(id["hooks"], json!([s(&hooks.join("50-app"))]), "{id}");

    std::fs::write(&cfg, "listen = \"unix:/tmp/x\"\nhold_limit = \"90s\"\n").unwrap();
    let e = spawn_agent(dir.path(), &["--config", s(&cfg)], "bad.err")
        .expect_err("an unknown key was accepted");
    assert!(e.contains("hold_limit"), "{e}");
}

#[test]
fn vsock_carries_the_same_protocol_where_the_kernel_has_a_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let port = 20_000 + (std::process::id() % 20_000);
    let listen = format!("vsock:{port}");
    let agent = match spawn_agent(dir.path(), &["--listen", &listen], "agent.err") {
        Ok(a) => a,
        Err(e) => {
            skip(
                "vsock_carries_the_same_protocol_where_the_kernel_has_a_loopback",
                &format!("no AF_VSOCK here ({})", e.trim()),
                Lack::Host,
            );
            return;
        }
    };
    assert_eq!(agent.address, listen);
    // CID 1 is the local machine, served by the vsock_loopback module.
    let endpoint =
        vsnap_coordinator::transport::Endpoint::connect(&format!("vsock:1:{port}")).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let connected = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(3),
            vsnap_coordinator::client::AgentClient::connect(&endpoint, None),
        )
        .await
    });
    match connected {
        Ok(Ok((_, hello))) => assert_eq!(hello.version, 1, "{hello:?}"),
        Ok(Err(e)) => skip(
            "vsock_carries_the_same_protocol_where_the_kernel_has_a_loopback",
            &format!("the vsock loopback (CID 1) is not available here: {e}"),
            Lack::Host,
        ),
        Err(_) => skip(
            "vsock_carries_the_same_protocol_where_the_kernel_has_a_loopback",
            "the vsock loopback (CID 1) did not answer within 3 s",
            Lack::Host,
        ),
    }
}

/// User plus system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap()
}

/// Opens `n` TCP connections that never say anything.
fn idle_connections(address: &str, n: usize) -> Vec<std::net::TcpStream> {
    let addr: std::net::SocketAddr = address.strip_prefix("tcp:").unwrap().parse().unwrap();
    (0..n)
        .filter_map(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok())
        .collect()
}

/// An agent on TCP with a token, its descriptors limited to 64 (as
/// systemd's 1024 is to a flood of 1,100), and `extra` flags.
fn limited_agent(dir: &Path, token: &str, extra: &[&str]) -> AgentProc {
    let tf = dir.join("token");
    std::fs::write(&tf, token).unwrap();
    let mut args = vec!["--listen", "tcp:127.0.0.1:0", "--token-file", s(&tf)];
    args.extend_from_slice(extra);
    let agent = spawn_agent(dir, &args, "agent.err").unwrap();
    let st = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", agent.child.id()))
        .arg("--nofile=64:64")
        .status()
        .unwrap();
    assert!(st.success(), "prlimit");
    agent
}

#[test]
fn idle_connections_neither_lock_a_coordinator_out_nor_spin_the_agent() {
    let token = "correct-horse-battery-staple";

    // At the connection cap, each newcomer closes the oldest idle one, so
    // a coordinator arriving behind 300 idle peers is served at once.
    let dir = tempfile::tempdir().unwrap();
    let agent = limited_agent(
        dir.path(),
        token,
        &["--max-connections", "16", "--hello-timeout", "30s"],
    );
    let pid = agent.child.id();
    let cpu0 = cpu_ticks(pid);
    let idle = idle_connections(&agent.address, 300);
    assert!(idle.len() >= 250, "only {} connected", idle.len());
    let t = Instant::now();
    let mut w = Wire::connect(&agent.address);
    assert_eq!(w.hello(Some(token))["ok"]["version"], 1);
    w.ok("identify", Value::Null);
    let waited = t.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "the coordinator waited {waited:?}"
    );
    // The evicted were told why.
    let mut told = 0;
    for mut c in idle.iter().take(200) {
        use std::io::Read;
        c.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 256];
        if let Ok(n) = c.read(&mut buf) {
            told += usize::from(String::from_utf8_lossy(&buf[..n]).contains("make room"));
        }
    }
    assert!(
        told >= 150,
        "{told} of 200 told they were closed to make room"
    );
    std::thread::sleep(Duration::from_secs(2));
    let cpu = cpu_ticks(pid) - cpu0;
    assert!(cpu < 100, "the agent used {cpu} ticks of CPU");
    drop(idle);
    let log = agent.stderr();
    assert!(
        log.lines().count() < 50,
        "{} log lines:\n{log}",
        log.lines().count()
    );
    eprintln!(
        "cap: coordinator served in {waited:?}; agent CPU {cpu} ticks; {told} evictions seen"
    );

    // With a cap above the descriptors it has, accept fails with EMFILE:
    // the agent backs off (no busy loop, a few log lines), the hello
    // deadline frees descriptors, and the coordinator gets in.
    let dir = tempfile::tempdir().unwrap();
    let agent = limited_agent(
        dir.path(),
        token,
        &["--max-connections", "1000", "--hello-timeout", "1s"],
    );
    let pid = agent.child.id();
    let cpu0 = cpu_ticks(pid);
    let idle = idle_connections(&agent.address, 300);
    let t = Instant::now();
    let mut w = Wire::connect(&agent.address);
    assert_eq!(w.hello(Some(token))["ok"]["version"], 1);
    let waited = t.elapsed();
    let cpu = cpu_ticks(pid) - cpu0;
    drop(idle);
    let log = agent.stderr();
    assert!(log.contains("backing off"), "{log}");
    assert!(
        log.lines().count() < 50,
        "{} log lines:\n{log}",
        log.lines().count()
    );
    assert!(cpu < 300, "the agent used {cpu} ticks of CPU in {waited:?}");
    eprintln!(
        "EMFILE: coordinator served in {waited:?}; agent CPU {cpu} ticks; {} log lines",
        log.lines().count()
    );
}
