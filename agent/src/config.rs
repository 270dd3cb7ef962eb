//! The agent's settings, from flags or from a TOML file (`--config`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::mounts::{self, Selection};
use vsnap_protocol::transport::Endpoint;
use vsnap_protocol::{Error, ErrorKind, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FreezeSet {
    /// The mount-selection rules over every mount of the guest.
    Auto,
    /// These mounts only (none: the agent runs hooks and freezes nothing).
    List(Vec<PathBuf>),
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub listen: Endpoint,
    pub freeze: FreezeSet,
    pub hooks: Option<PathBuf>,
    /// The longest a freeze may last before the watchdog thaws; a
    /// coordinator can ask for less, never for more.
    pub hold_limit: Duration,
    pub hook_timeout: Duration,
    pub token_file: Option<PathBuf>,
    /// On a filesystem that is never frozen.
    pub marker: PathBuf,
    /// Connections open at once; at the cap a new one closes the oldest
    /// that has not authenticated, so idle peers cannot use up the agent's
    /// descriptors or lock a coordinator out.
    pub max_connections: usize,
    /// How long a connection that must authenticate may take to send its
    /// `hello` before it is closed.
    pub hello_timeout: Duration,
    /// Flush the mounts to freeze (`syncfs`) in Prepare, so that the
    /// freeze, and the application's stall, find little left to write.
    pub prepare_sync: bool,
    /// Expedite RCU grace periods while FIFREEZE runs ([`crate::rcu`]).
    pub expedite_freeze: bool,
}

pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
pub const DEFAULT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_HOLD_LIMIT: Duration = Duration::from_secs(60);
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MARKER: &str = "/run/vsnap/agent.frozen";

pub type Flags = FileConfig;

/// The TOML file: the same settings as the flags, by the same names.
/// Flags fill the same struct; each one set overrides the file's.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub listen: Option<String>,
    /// `["auto"]` or mount points.
    #[serde(default)]
    pub freeze: Vec<String>,
    pub hooks: Option<PathBuf>,
    pub hold_limit: Option<String>,
    pub hook_timeout: Option<String>,
    pub token_file: Option<PathBuf>,
    pub marker: Option<PathBuf>,
    pub max_connections: Option<usize>,
    pub hello_timeout: Option<String>,
    /// `false` to skip Prepare's flush (default true).
    pub prepare_sync: Option<bool>,
    /// `false` to freeze with normal RCU grace periods (default true).
    pub expedite_freeze: Option<bool>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::from(e)
                .at(path.display().to_string())
                .during("read config")
        })?;
        toml::from_str(&text).map_err(|e| {
            Error::from(ErrorKind::Config(e.to_string())).at(path.display().to_string())
        })
    }
}

pub fn parse_duration(what: &str, s: &str) -> Result<Duration> {
    let d = humantime::parse_duration(s).map_err(|e| {
        Error::from(ErrorKind::Config(format!(
            "{what} {s:?} is not a duration ({e}; say 500ms, 10s or 2m)"
        )))
    })?;
    if d.is_zero() {
        return Err(ErrorKind::Config(format!("{what} must be more than zero")).into());
    }
    Ok(d)
}

pub fn freeze_set(items: &[String]) -> Result<FreezeSet> {
    if items.iter().any(|i| i == "auto") {
        if items.len() > 1 {
            return Err(ErrorKind::Config(
                "--freeze auto cannot be combined with mount points".into(),
            )
            .into());
        }
        return Ok(FreezeSet::Auto);
    }
    Ok(FreezeSet::List(items.iter().map(PathBuf::from).collect()))
}

impl AgentConfig {
    /// What would be frozen now, by the configured rule.
    pub fn select(&self) -> Result<Selection> {
        let requested = match &self.freeze {
            FreezeSet::Auto => None,
            FreezeSet::List(l) => Some(l.as_slice()),
        };
        mounts::select_here(requested).map_err(|e| ErrorKind::Config(e).into())
    }

    /// Refuses a marker on a filesystem the agent would freeze: the marker
    /// is written right before the freeze and removed after the thaw.
    pub fn check_marker_outside(&self, sel: &Selection) -> Result<()> {
        let dir = self.marker.parent().unwrap_or(Path::new("/"));
        let mut probe = dir.to_path_buf();
        while !probe.exists() {
            match probe.parent() {
                Some(p) => probe = p.to_path_buf(),
                None => break,
            }
        }
        let dev = device_of(&probe)?;
        if let Some(m) = sel.freeze.iter().find(|m| m.device == dev) {
            return Err(ErrorKind::Config(format!(
                "the marker {} is on {}, which this agent freezes; put it on a tmpfs such as /run (--marker)",
                self.marker.display(),
                m.mount_point.display()
            ))
            .into());
        }
        Ok(())
    }
}

fn device_of(path: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)
        .map_err(|e| Error::from(e).at(path.display().to_string()).during("stat"))?;
    let dev = m.dev();
    Ok(format!("{}:{}", libc::major(dev), libc::minor(dev)))
}

/// Constant time in the token's content, so timing tells an attacker
/// nothing about how much of a guess was right.
pub fn token_matches(expected: &[u8], given: &[u8]) -> bool {
    expected.ct_eq(given).into()
}

impl AgentConfig {
    /// Merges the file (if any) and the flags, then checks the result.
    pub fn resolve(file: Option<FileConfig>, flags: Flags) -> Result<AgentConfig> {
        let file = file.unwrap_or_default();
        let listen = flags.listen.or(file.listen).ok_or_else(|| {
            Error::from(ErrorKind::Config(
                "where to listen is required: --listen unix:PATH|vsock:PORT|tcp:ADDR:PORT|serial:DEVICE".into(),
            ))
        })?;
        let freeze = if flags.freeze.is_empty() {
            file.freeze
        } else {
            flags.freeze
        };
        let hold_limit = match flags.hold_limit.or(file.hold_limit) {
            Some(s) => parse_duration("hold limit", &s)?,
            None => DEFAULT_HOLD_LIMIT,
        };
        let hook_timeout = match flags.hook_timeout.or(file.hook_timeout) {
            Some(s) => parse_duration("hook timeout", &s)?,
            None => DEFAULT_HOOK_TIMEOUT,
        };
        let hello_timeout = match flags.hello_timeout.or(file.hello_timeout) {
            Some(s) => parse_duration("hello timeout", &s)?,
            None => DEFAULT_HELLO_TIMEOUT,
        };
        let max_connections = flags
            .max_connections
            .or(file.max_connections)
            .unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if max_connections == 0 {
            return Err(ErrorKind::Config("max-connections must be at least 1".into()).into());
        }
        let hooks = flags.hooks.or(file.hooks);
        if let Some(h) = &hooks {
            if !h.is_dir() {
                return Err(Error::from(ErrorKind::Config(
                    "the hooks directory does not exist".into(),
                ))
                .at(h.display().to_string()));
            }
        }
        Ok(AgentConfig {
            listen: Endpoint::listen(&listen)?,
            freeze: freeze_set(&freeze)?,
            hooks,
            hold_limit,
            hook_timeout,
            token_file: flags.token_file.or(file.token_file),
            marker: flags
                .marker
                .or(file.marker)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_MARKER)),
            max_connections,
            hello_timeout,
            prepare_sync: flags.prepare_sync.or(file.prepare_sync).unwrap_or(true),
            expedite_freeze: flags
                .expedite_freeze
                .or(file.expedite_freeze)
                .unwrap_or(true),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_freeze_sets_parse_or_say_why() {
        assert_eq!(
            parse_duration("x", "500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(parse_duration("x", "2m").unwrap(), Duration::from_secs(120));
        let e = parse_duration("--hold-limit", "soon")
            .unwrap_err()
            .to_string();
        assert!(e.contains("--hold-limit \"soon\" is not a duration"), "{e}");
        assert!(parse_duration("x", "0s").is_err());
        assert_eq!(freeze_set(&["auto".into()]).unwrap(), FreezeSet::Auto);
        assert!(freeze_set(&["auto".into(), "/a".into()]).is_err());
        assert_eq!(freeze_set(&[]).unwrap(), FreezeSet::List(vec![]));
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(token_matches(b"abcdefghijklmnop", b"abcdefghijklmnop"));
        assert!(!token_matches(b"abcdefghijklmnop", b"abcdefghijklmno"));
        assert!(!token_matches(b"abcdefghijklmnop", b""));
    }

    #[test]
    fn the_config_file_rejects_unknown_keys() {
        let c: FileConfig = toml::from_str(
            "listen = \"unix:/run/a.sock\"\nfreeze = [\"/data\"]\nhold-limit = \"5s\"\n",
        )
        .unwrap();
        assert_eq!(c.freeze, vec!["/data".to_string()]);
        let e = toml::from_str::<FileConfig>("lisen = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let c: FileConfig = toml::from_str(include_str!("../../contrib/agent.toml")).unwrap();
        assert_eq!(freeze_set(&c.freeze).unwrap(), FreezeSet::Auto);
        Endpoint::listen(c.listen.as_deref().unwrap()).unwrap();
        parse_duration("hold-limit", c.hold_limit.as_deref().unwrap()).unwrap();
        parse_duration("hook-timeout", c.hook_timeout.as_deref().unwrap()).unwrap();
        assert_eq!(c.marker.unwrap(), PathBuf::from(DEFAULT_MARKER));
    }
}
