//! `vsnap serve --config FILE`: the service, in the foreground (systemd
//! runs it so; see contrib/). It parses, opens the state, runs the
//! scheduler until SIGTERM or SIGINT, then aborts what is running by the
//! session's rules (every guest thawed), records it, and exits.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use chrono::Utc;
use vsnap_service::api::session;
use vsnap_service::calendar::Zone;
use vsnap_service::config::Config;
use vsnap_service::daemon;

#[derive(clap::Args, Debug)]
#[command(after_help = "\
The configuration (TOML) names the repository, the VMs (inline [[vm]] tables, \
or inventory = FILE), the jobs ([[job]]: name, schedule, vms, provider, window, \
persistent, keep, gc, notify), verify jobs, notification targets, the listen \
address and the state directory. Schedules are systemd calendar events: \
`daily`, `Mon..Fri 02:00`, `*-*-* 00/4:00`, `Sat *-*-1..7 03:00`. \
See the README's \"The service\".")]
pub struct Args {
    /// The service's configuration file.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Check the configuration, print each job's next runs, and exit.
    #[arg(long)]
    check: bool,
    /// The log on stderr: `text`, a line per event for people and grep
    /// (journald stamps each), or `json`, an object per line (time,
    /// level, message, and the event's job, run, state, error, took_s).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum LogFormat {
    Text,
    Json,
}

impl Args {
    /// Serving `config`, as `vsnap demo --serve` does.
    pub fn of(config: PathBuf) -> Args {
        Args {
            config,
            check: false,
            log_format: LogFormat::Text,
        }
    }
}

#[derive(clap::Args, Debug)]
#[command(after_help = "\
The link carries a one-time code made with the service's token (so this \
needs read access to state_dir/api.token, as the service's user has). \
The service takes it once, within 60 s, and the browser then holds a \
session cookie for 12 hours; the token itself never enters a URL, the \
browser's history or its storage. A restart of the service ends every \
session.")]
pub struct DashboardArgs {
    /// The service's configuration file (its listen address and state
    /// directory).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Print {"url": ..., "expires_in_s": 60} instead.
    #[arg(long)]
    json: bool,
}

/// `vsnap dashboard`: a sign-in link for the dashboard.
pub fn run_dashboard(args: &DashboardArgs, out: &mut dyn Write) -> Result<ExitCode> {
    let cfg = Config::load(&args.config)?;
    let url = session::sign_in_link(cfg.listen, &cfg.state_dir)?;
    if args.json {
        let v = serde_json::json!({ "url": url, "expires_in_s": session::CODE_LIFE });
        writeln!(out, "{v}")?;
    } else {
        writeln!(out, "{url}")?;
        say!(
            "open it within {} s; it works once (run this again for another)",
            session::CODE_LIFE
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run(args: &Args, out: &mut dyn Write) -> Result<ExitCode> {
    let cfg = Config::load(&args.config)?;
    if args.check {
        writeln!(
            out,
            "{}: {} VM(s), {} job(s)",
            cfg.path.display(),
            cfg.vms.len(),
            cfg.jobs.len()
        )?;
        for j in &cfg.jobs {
            let next: Vec<String> = j
                .schedule
                .elapses(Utc::now(), Zone::Local, 3)
                .iter()
                .map(|t| daemon::local_time(*t))
                .collect();
            writeln!(
                out,
                "job {} ({}; {}): next {}",
                j.name,
                j.schedule_text,
                j.vms.join(", "),
                if next.is_empty() {
                    "never".into()
                } else {
                    next.join(", ")
                }
            )?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    // Before any thread starts: a long-running service must not let each
    // of its threads keep a fragmented malloc arena (vsnap_service::alloc).
    vsnap_service::alloc::limit_arenas(vsnap_service::alloc::SERVICE_ARENAS);
    vsnap_service::log::set_format(match args.log_format {
        LogFormat::Text => vsnap_service::log::Format::Text,
        LogFormat::Json => vsnap_service::log::Format::Json,
    });
    // The API's reads run on the blocking pool: a few threads serve them
    // (four SQLite readers), where tokio's default would grow to 512
    // under load.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(16)
        .enable_all()
        .build()
        .context("start the runtime")?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("listen for SIGTERM")?;
        let signal = async move {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = tokio::signal::ctrl_c() => "SIGINT",
            }
        };
        daemon::run(cfg, Zone::Local, signal, |m| vsnap_service::log::info(&m)).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}
