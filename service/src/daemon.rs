//! The service as a process runs it: the state opened, the API listening,
//! the scheduler running, until its caller says stop; then what is
//! running aborts by the session's rules (every guest thawed) and is
//! recorded. The caller (`vsnap serve`) owns the runtime and the signals.

use std::future::Future;
use std::sync::Arc;

use crate::api::{self, Api};
use crate::calendar::Zone;
use crate::config::Config;
use crate::core::Service;
use crate::error::{ErrorKind, Result};
use crate::scheduler;
use crate::state::State;

/// Runs the service of `cfg` until `shutdown` resolves (to the name of
/// what stopped it, for the log). `say` hears what an operator should
/// see: where the API listens, each job's next run, runs cut short by a
/// previous stop, the stop.
pub async fn run(
    cfg: Config,
    zone: Zone,
    shutdown: impl Future<Output = &'static str>,
    say: impl Fn(String),
) -> Result<()> {
    let (state, cut) = State::open(&cfg.state_dir)?;
    let token = api::token::load_or_create(&cfg.state_dir)?;
    for id in cut {
        say(format!(
            "run {id} was in progress when the service stopped; it is marked failed"
        ));
    }
    api::listen::raise_open_files_limit();
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| {
            crate::Error::from(ErrorKind::Io(e)).at(format!(
                "listen on {} (listen in {})",
                cfg.listen,
                cfg.path.display()
            ))
        })?;
    let address = listener
        .local_addr()
        .map_err(|e| crate::Error::from(ErrorKind::Io(e)).at("the listening address"))?;
    let token_path = cfg.state_dir.join(api::token::FILE);
    // `vsnap dashboard` finds a port the kernel chose here.
    let recorded = cfg.state_dir.join(api::session::ADDRESS_FILE);
    if let Err(e) = std::fs::write(&recorded, format!("{address}\n")) {
        say(format!(
            "cannot record the API's address in {}: {e}",
            recorded.display()
        ));
    }
    let svc = Service::new(cfg, state, std::env::current_exe().ok());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let sched = tokio::spawn(scheduler::run(Arc::clone(&svc), zone, stopped.clone()));
    let http = tokio::spawn(api::serve(
        listener,
        Api::new(Arc::clone(&svc), token, zone),
        stopped,
    ));
    say(format!(
        "API on http://{address}/ (bearer token in {}); for the dashboard, `vsnap dashboard --config {}` prints a sign-in link",
        token_path.display(),
        svc.config.path.display()
    ));
    for d in scheduler::upcoming(&svc, zone) {
        let at = d.at.map_or("never".into(), local_time);
        say(format!("job {}: next run {at}", d.job));
    }
    let signal = shutdown.await;
    let _ = stop.send(true);
    let running = svc.active().len();
    say(format!(
        "{signal}: stopping; {running} run(s) abort by the session's rules (every guest thawed)"
    ));
    svc.stop_all().await;
    let _ = sched.await;
    if let Ok(Err(e)) = http.await {
        say(format!("the API stopped: {e}"));
    }
    // No longer listening: a sign-in link must not point at whatever
    // takes the port next.
    let _ = std::fs::remove_file(&recorded);
    say("stopped".into());
    Ok(())
}

/// A time as the operator's clock shows it, with its zone.
pub fn local_time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.with_timezone(&chrono::Local)
        .format("%a %Y-%m-%d %H:%M:%S %Z")
        .to_string()
}
