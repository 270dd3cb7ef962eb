//! `vsnap-agent`: the guest agent alone, for installing in guests. The
//! same agent as `vsnap agent`, without the engine or the coordinator.

use std::process::ExitCode;

use clap::Parser;

/// vsnap's guest agent: quiesce this guest's writers (hooks, then
/// fsfreeze) when the coordinator asks, and thaw within a hold limit.
#[derive(Parser)]
#[command(name = "vsnap-agent", version)]
struct Cli {
    #[command(flatten)]
    args: vsnap_agent::cli::Args,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match vsnap_agent::cli::run(&cli.args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vsnap-agent: error: {e}");
            ExitCode::FAILURE
        }
    }
}
