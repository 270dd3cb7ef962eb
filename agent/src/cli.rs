//! The agent's command line, shared by `vsnap agent` and the guest's own
//! `vsnap-agent` binary (which links neither the engine nor the host side).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::{Agent, AgentConfig, FileConfig, Flags, Result};

const AFTER: &str = "\
Writers, in order: every executable in --hooks runs with `freeze` (name
order; a failure means nothing is frozen), then each mount is frozen with
FIFREEZE in reverse mount order, root last. The thaw runs FITHAW, then the
hooks with `thaw` in reverse order. Hooks also get `prepare`, `abort` and
`complete`, and should exit 0 on actions they do not know.

Safety: the watchdog thaws by itself after --hold-limit (or the shorter limit
the coordinator asks for) and reports `timeout`; the marker (on a tmpfs,
never on a frozen filesystem) lets a restarted agent thaw what a dead one
left frozen; SIGTERM and SIGINT thaw before exiting; nothing is logged to
disk while frozen.

A serial port (QEMU: -chardev socket,id=c0,path=SOCK,server=on,wait=off
-device virtio-serial -device virtserialport,chardev=c0,name=org.vsnap.agent.0;
the coordinator's inventory then says agent = \"serial:SOCK\") belongs to its
VM and needs no token. Host clients may come and go; the agent keeps the
device open, waits while no host is connected, and starts each client
clean.

TCP needs --token-file: every operation is refused until `hello` carries the
token, and a connection that sends no `hello` within --hello-timeout is
closed. At most --max-connections are open at once: at the cap a new one
closes the oldest that has not authenticated, so idle peers cannot lock a
coordinator out; when descriptors run out (EMFILE, ENFILE) the agent backs
off instead of spinning. While frozen,
log lines wait in memory, at most 10,000 of them; past that they are
dropped and the count is logged at the thaw. The agent prints `listening on
ADDRESS` on stdout once it is ready.

Exit codes:
  0  stopped by SIGTERM or SIGINT (after thawing)
  1  could not start: bad configuration, the address is taken, a thaw failed
  2  bad command-line usage";

/// Run the guest agent (vsnap's Backup integration service).
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER)]
pub struct Args {
    /// Where to listen: unix:PATH, vsock:PORT, tcp:ADDR:PORT, or
    /// serial:/dev/virtio-ports/NAME, the VM's own channel (or the config
    /// file's `listen`).
    #[arg(long, value_name = "ADDRESS", required_unless_present = "config")]
    listen: Option<String>,
    /// A mount to freeze (repeatable), or `auto` for every writable
    /// block-device filesystem, once per device. None: hooks only.
    #[arg(long, value_name = "MOUNT")]
    freeze: Vec<String>,
    /// A directory of executable hooks (the application writers).
    #[arg(long, value_name = "DIR")]
    hooks: Option<PathBuf>,
    /// The longest a freeze may be held before the watchdog thaws [default: 60s].
    #[arg(long, value_name = "DURATION")]
    hold_limit: Option<String>,
    /// How long one hook may run before it is killed and fails [default: 30s].
    #[arg(long, value_name = "DURATION")]
    hook_timeout: Option<String>,
    /// The token TCP clients must send (at least 16 characters).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Where the agent records what it froze [default: /run/vsnap/agent.frozen].
    #[arg(long, value_name = "FILE")]
    marker: Option<PathBuf>,
    /// Connections open at once. At the cap, a new connection closes the
    /// oldest one that has not said hello yet, or is refused as busy when
    /// all have [default: 64].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=65536))]
    max_connections: Option<u64>,
    /// How long a connection that needs the token may take to send
    /// `hello` before it is closed [default: 10s].
    #[arg(long, value_name = "DURATION")]
    hello_timeout: Option<String>,
    /// Do not flush the mounts in Prepare. By default Prepare runs syncfs
    /// on every mount it will freeze, so that FIFREEZE (which writes back
    /// dirty data first, while the application waits) finds little left.
    #[arg(long)]
    no_prepare_sync: bool,
    /// Freeze with the kernel's normal RCU grace periods. By default the
    /// agent expedites them (/sys/kernel/rcu_expedited) for the
    /// milliseconds FIFREEZE runs: the freeze waits out three grace
    /// periods, 40-60 ms in all otherwise, while the application is held.
    #[arg(long)]
    no_expedite_freeze: bool,
    /// A TOML file with the same settings (listen, freeze, hooks,
    /// hold-limit, hook-timeout, token-file, marker, max-connections,
    /// hello-timeout, prepare-sync, expedite-freeze); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

pub fn run(args: &Args) -> Result<ExitCode> {
    let file = args.config.as_deref().map(FileConfig::load).transpose()?;
    let cfg = AgentConfig::resolve(
        file,
        Flags {
            listen: args.listen.clone(),
            freeze: args.freeze.clone(),
            hooks: args.hooks.clone(),
            hold_limit: args.hold_limit.clone(),
            hook_timeout: args.hook_timeout.clone(),
            token_file: args.token_file.clone(),
            marker: args.marker.clone(),
            max_connections: args.max_connections.map(|n| n as usize),
            hello_timeout: args.hello_timeout.clone(),
            prepare_sync: args.no_prepare_sync.then_some(false),
            expedite_freeze: args.no_expedite_freeze.then_some(false),
        },
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let agent = Agent::start(cfg).await?;
        let mut out = std::io::stdout();
        writeln!(out, "listening on {}", agent.local())?;
        out.flush()?;
        agent.serve().await?;
        Ok::<_, crate::Error>(ExitCode::SUCCESS)
    })
}
