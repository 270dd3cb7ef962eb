//! `vsnap completions SHELL` and `vsnap man DIR`: shell completions and
//! man pages generated from the same clap definitions as `--help`, so they
//! never drift from the flags.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::CommandFactory;

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Install, for example:
  bash: vsnap completions bash > /etc/bash_completion.d/vsnap
        (or ~/.local/share/bash-completion/completions/vsnap)
  zsh:  vsnap completions zsh > \"${fpath[1]}/_vsnap\"
  fish: vsnap completions fish > ~/.config/fish/completions/vsnap.fish
  elvish: vsnap completions elvish >> ~/.config/elvish/rc.elv")]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Writes vsnap.1 and one page per subcommand (vsnap-backup.1, vsnap-repo-init.1,
...) into DIR. Install, for example:
  vsnap man /usr/local/share/man/man1 && mandb
  man vsnap-restore")]
pub struct ManArgs {
    /// The directory to write the pages into (made if missing).
    #[arg(value_name = "DIR")]
    dir: PathBuf,
}

pub fn completions(args: &CompletionsArgs, out: &mut dyn Write) -> Result<ExitCode> {
    let mut cmd = crate::Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "vsnap", out);
    Ok(ExitCode::SUCCESS)
}

pub fn man(args: &ManArgs, out: &mut dyn Write) -> Result<ExitCode> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("{}: create directory", args.dir.display()))?;
    let mut written = 0;
    let mut todo = vec![(String::from("vsnap"), crate::Cli::command())];
    while let Some((name, cmd)) = todo.pop() {
        let cmd = cmd.name(name.clone());
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            todo.push((format!("{name}-{}", sub.get_name()), sub.clone()));
        }
        let path = args.dir.join(format!("{name}.1"));
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut page)?;
        std::fs::write(&path, page).with_context(|| format!("{}: write", path.display()))?;
        written += 1;
    }
    writeln!(out, "wrote {written} man pages to {}", args.dir.display())?;
    Ok(ExitCode::SUCCESS)
}
