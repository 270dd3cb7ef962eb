//! Exec hooks: the application writers of a guest, in the spirit of
//! qemu-ga's fsfreeze-hook.d. Every executable file in the hooks directory
//! runs with one argument, the action (`prepare`, `freeze`, `thaw`,
//! `abort`, `complete`), in name order for `prepare` and `freeze` and in
//! reverse for the others, so the writer paused first resumes last. A hook
//! should exit 0 on actions it does not know.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::process::Command;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Prepare,
    Freeze,
    Thaw,
    Abort,
    Complete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Prepare => "prepare",
            Action::Freeze => "freeze",
            Action::Thaw => "thaw",
            Action::Abort => "abort",
            Action::Complete => "complete",
        }
    }

    fn forward(self) -> bool {
        matches!(self, Action::Prepare | Action::Freeze)
    }
}

/// A hook that failed: which, and what it said.
#[derive(Debug, Clone)]
pub struct HookFailure {
    pub hook: PathBuf,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct Hooks {
    pub dir: Option<PathBuf>,
    pub timeout: Duration,
}

/// What one run of an action did.
#[derive(Debug, Default)]
pub struct Ran {
    /// Hooks that succeeded, in the order they ran.
    pub ok: Vec<PathBuf>,
    pub failed: Vec<HookFailure>,
    /// Lines the hooks printed, to log when logging is safe.
    pub output: Vec<String>,
    pub elapsed: Duration,
}

impl Hooks {
    /// The executables in the directory, sorted by name. Dotfiles and
    /// editor or package-manager leftovers are not hooks.
    pub fn list(&self) -> std::io::Result<Vec<PathBuf>> {
        let Some(dir) = &self.dir else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.ends_with('~') || name.contains(".dpkg-") {
                continue;
            }
            let meta = std::fs::metadata(e.path())?;
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                out.push(e.path());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Runs `action` on `only` (or every hook). For a forward action the
    /// first failure stops the run; the others run every hook whatever
    /// fails, since each must get its chance to resume.
    pub async fn run(
        &self,
        action: Action,
        only: Option<&[PathBuf]>,
        env: &[(&str, String)],
    ) -> Ran {
        let start = Instant::now();
        let mut ran = Ran::default();
        let mut hooks = match only {
            Some(h) => h.to_vec(),
            None => match self.list() {
                Ok(h) => h,
                Err(e) => {
                    ran.failed.push(HookFailure {
                        hook: self.dir.clone().unwrap_or_default(),
                        reason: format!("cannot list the hooks directory: {e}"),
                    });
                    return ran;
                }
            },
        };
        if !action.forward() {
            hooks.reverse();
        }
        for hook in hooks {
            match self.run_one(&hook, action, env).await {
                Ok(lines) => {
                    ran.output.extend(lines);
                    ran.ok.push(hook);
                }
                Err((reason, lines)) => {
                    ran.output.extend(lines);
                    ran.failed.push(HookFailure { hook, reason });
                    if action.forward() {
                        break;
                    }
                }
            }
        }
        ran.elapsed = start.elapsed();
        ran
    }

    async fn run_one(
        &self,
        hook: &Path,
        action: Action,
        env: &[(&str, String)],
    ) -> Result<Vec<String>, (String, Vec<String>)> {
        let mut cmd = Command::new(hook);
        cmd.arg(action.as_str())
            .env("VSNAP_ACTION", action.as_str())
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let name = hook.display().to_string();
        let out = match tokio::time::timeout(self.timeout, cmd.output()).await {
            Err(_) => {
                return Err((
                    format!(
                        "did not finish within {} ms (killed)",
                        self.timeout.as_millis()
                    ),
                    Vec::new(),
                ))
            }
            Ok(Err(e)) => return Err((format!("cannot run: {e}"), Vec::new())),
            Ok(Ok(out)) => out,
        };
        let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .chain(String::from_utf8_lossy(&out.stderr).lines())
            .map(|l| format!("hook {name} {}: {l}", action.as_str()))
            .collect();
        if out.status.success() {
            Ok(lines)
        } else {
            Err((format!("exited with {}", out.status), lines))
        }
    }
}
