//! `vsnap serve`'s configuration: one TOML file with the repository, the
//! VMs (inline `[[vm]]` tables as in an inventory, or `inventory = FILE`),
//! the backup jobs, the verify jobs, the notification targets and the
//! listen address. Every error names the file, the line and the key.
//!
//! ```toml
//! repository = "/backups/repo"    # or "s3://BUCKET/PREFIX"
//! inventory = "/etc/vsnap/inventory.toml"
//! listen = "127.0.0.1:8420"
//! state_dir = "/var/lib/vsnap"
//!
//! [[job]]
//! name = "nightly"
//! schedule = "Mon..Fri 02:00"
//! vms = ["web1", "db"]         # all when left out
//! keep = { daily = 7, weekly = 4, monthly = 6 }
//! gc = true
//! notify = ["ops"]
//!
//! [[verify]]
//! name = "weekly"
//! schedule = "Sun 04:00"
//! outdated_after = "30d"
//!
//! [[notify]]
//! name = "ops"
//! url = "https://alerts.example:9000/vsnap"   # http:// too; IPv6 as [::1]
//! on_success = false
//! # ca = "/etc/vsnap/alerts-ca.pem"   # trust a private CA for this target
//! ```

use std::collections::HashSet;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use vsnap_coordinator::inventory::{Inventory, Vm, VmEntry};
use vsnap_coordinator::provider::Choice;
use vsnap_repo::retention::{KeepPolicy, Within};

use crate::calendar::Calendar;
use crate::error::{ErrorKind, Result};

/// Where the API listens unless the file says otherwise: this host only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8420";

#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub repository: PathBuf,
    pub vms: Vec<Vm>,
    pub listen: SocketAddr,
    /// The state database and the API token live here.
    pub state_dir: PathBuf,
    pub jobs: Vec<Job>,
    pub verifies: Vec<VerifyJob>,
    pub notify: Vec<Notify>,
}

/// A backup job.
#[derive(Debug, Clone)]
pub struct Job {
    pub name: String,
    /// The VMs it backs up, as one consistency group.
    pub vms: Vec<String>,
    pub schedule: Calendar,
    /// The schedule as written, for the API and the dashboard.
    pub schedule_text: String,
    pub provider: Choice,
    pub window: Duration,
    /// Runs missed while the service was down run once at start-up
    /// (systemd's `Persistent=`).
    pub persistent: bool,
    /// Retention after each successful run, per VM.
    pub keep: Option<KeepPolicy>,
    /// gc after the retention.
    pub gc: bool,
    pub notify: Vec<String>,
}

/// A verify job: re-reads every chunk of the snapshots it covers.
#[derive(Debug, Clone)]
pub struct VerifyJob {
    pub name: String,
    pub schedule: Calendar,
    pub schedule_text: String,
    /// Snapshots verified more recently than this are skipped (PBS's
    /// `outdated-after`); `None` verifies all.
    pub outdated_after: Option<Duration>,
    pub vms: Vec<String>,
    pub notify: Vec<String>,
}

/// A webhook: a POST of a JSON summary after a run.
#[derive(Debug, Clone)]
pub struct Notify {
    pub name: String,
    pub url: String,
    pub on_success: bool,
    pub retries: u32,
    /// A PEM bundle of CAs to trust for this target beyond the system's
    /// (a receiver whose certificate a private CA issued).
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    repository: Spanned<PathBuf>,
    inventory: Option<Spanned<PathBuf>>,
    #[serde(default)]
    vm: Vec<VmEntry>,
    listen: Option<Spanned<String>>,
    state_dir: Option<PathBuf>,
    #[serde(default)]
    job: Vec<Spanned<FileJob>>,
    #[serde(default)]
    verify: Vec<Spanned<FileVerify>>,
    #[serde(default)]
    notify: Vec<Spanned<FileNotify>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileJob {
    name: String,
    schedule: Spanned<String>,
    vms: Option<Spanned<Vec<String>>>,
    provider: Option<Spanned<String>>,
    window: Option<Spanned<String>>,
    #[serde(default = "yes")]
    persistent: bool,
    keep: Option<Spanned<FileKeep>>,
    #[serde(default)]
    gc: bool,
    notify: Option<Spanned<Vec<String>>>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKeep {
    #[serde(default)]
    last: u32,
    #[serde(default)]
    hourly: u32,
    #[serde(default)]
    daily: u32,
    #[serde(default)]
    weekly: u32,
    #[serde(default)]
    monthly: u32,
    #[serde(default)]
    yearly: u32,
    within: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileVerify {
    name: String,
    schedule: Spanned<String>,
    outdated_after: Option<Spanned<String>>,
    vms: Option<Spanned<Vec<String>>>,
    notify: Option<Spanned<Vec<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNotify {
    name: String,
    url: Spanned<String>,
    #[serde(default)]
    on_success: bool,
    #[serde(default = "three")]
    retries: u32,
    ca: Option<Spanned<PathBuf>>,
}

fn three() -> u32 {
    3
}

/// Builds errors that name the file, the line and the key.
struct Here<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Here<'_> {
    fn line(&self, span: &Range<usize>) -> usize {
        self.text
            .get(..span.start)
            .map_or(0, |t| t.matches('\n').count())
            + 1
    }

    fn err(&self, span: &Range<usize>, key: &str, why: impl std::fmt::Display) -> crate::Error {
        crate::Error::from(ErrorKind::Config(format!("{key}: {why}"))).at(format!(
            "{}:{}",
            self.path.display(),
            self.line(span)
        ))
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            crate::Error::from(ErrorKind::Io(e))
                .at(format!("{}: read the configuration", path.display()))
        })?;
        Config::parse(&text, path)
    }

    /// Relative paths are taken from the file's directory.
    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let here = Here { path, text };
        let base = path.parent().unwrap_or(Path::new("."));
        let rel = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let file: File = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            here.err(&span, "toml", e.message())
        })?;
        let vms = match (&file.inventory, file.vm.is_empty()) {
            (Some(inv), true) => {
                Inventory::load(&rel(inv.get_ref()))
                    .map_err(|e| here.err(&inv.span(), "inventory", e))?
                    .vms
            }
            (None, false) => {
                Inventory::from_entries(file.vm, base)
                    .map_err(|e| here.err(&(0..0), "vm", e))?
                    .vms
            }
            (Some(inv), false) => {
                return Err(here.err(
                    &inv.span(),
                    "inventory",
                    "give the VMs as inventory = FILE or as [[vm]] tables, not both",
                ))
            }
            (None, true) => {
                return Err(here.err(
                    &(0..0),
                    "vm",
                    "no VMs: add inventory = FILE, or [[vm]] tables",
                ))
            }
        };
        let names: Vec<String> = vms.iter().map(|v| v.name.clone()).collect();
        let listen = match &file.listen {
            Some(l) => l
                .get_ref()
                .parse()
                .map_err(|e| here.err(&l.span(), "listen", format!("{:?}: {e}", l.get_ref())))?,
            None => DEFAULT_LISTEN
                .parse()
                .map_err(|e| here.err(&(0..0), "listen", e))?,
        };
        let state_dir = file.state_dir.as_deref().map(rel).unwrap_or_else(|| {
            std::env::var_os("STATE_DIRECTORY")
                .map_or_else(|| PathBuf::from("/var/lib/vsnap"), PathBuf::from)
        });
        let notify = notify_targets(&here, &rel, file.notify)?;
        let notify_names: Vec<&str> = notify.iter().map(|n| n.name.as_str()).collect();
        let mut seen = HashSet::new();
        let mut jobs = Vec::new();
        for (i, j) in file.job.into_iter().enumerate() {
            let span = j.span();
            let j = j.into_inner();
            let key = format!("job[{i}] ({:?})", j.name);
            unique(&here, &mut seen, &j.name, &span, &key)?;
            let schedule = calendar(&here, &j.schedule, &format!("{key}.schedule"))?;
            let vms = select(&here, j.vms.as_ref(), &names, &format!("{key}.vms"))?;
            let provider = match &j.provider {
                Some(p) => p
                    .get_ref()
                    .parse()
                    .map_err(|e: String| here.err(&p.span(), &format!("{key}.provider"), e))?,
                None => Choice::Auto,
            };
            let window = match &j.window {
                Some(w) => duration(&here, w, &format!("{key}.window"))?,
                None => Duration::from_secs(10),
            };
            let keep = match j.keep {
                None => None,
                Some(k) => {
                    let kspan = k.span();
                    let k = k.into_inner();
                    let within = match &k.within {
                        Some(w) => Some(
                            w.parse::<Within>()
                                .map_err(|e| here.err(&kspan, &format!("{key}.keep.within"), e))?,
                        ),
                        None => None,
                    };
                    let policy = KeepPolicy {
                        last: k.last,
                        hourly: k.hourly,
                        daily: k.daily,
                        weekly: k.weekly,
                        monthly: k.monthly,
                        yearly: k.yearly,
                        within,
                    };
                    if policy.is_empty() {
                        return Err(here.err(&kspan, &format!("{key}.keep"), "keeps everything: name at least one rule (last, hourly, daily, weekly, monthly, yearly, within), or leave keep out"));
                    }
                    Some(policy)
                }
            };
            let targets = targets(&here, j.notify, &notify_names, &format!("{key}.notify"))?;
            jobs.push(Job {
                name: j.name,
                vms,
                schedule,
                schedule_text: j.schedule.into_inner(),
                provider,
                window,
                persistent: j.persistent,
                keep,
                gc: j.gc,
                notify: targets,
            });
        }
        let mut verifies = Vec::new();
        for (i, v) in file.verify.into_iter().enumerate() {
            let span = v.span();
            let v = v.into_inner();
            let key = format!("verify[{i}] ({:?})", v.name);
            unique(&here, &mut seen, &v.name, &span, &key)?;
            verifies.push(VerifyJob {
                schedule: calendar(&here, &v.schedule, &format!("{key}.schedule"))?,
                schedule_text: v.schedule.get_ref().clone(),
                outdated_after: match &v.outdated_after {
                    Some(o) => Some(duration(&here, o, &format!("{key}.outdated_after"))?),
                    None => None,
                },
                vms: select(&here, v.vms.as_ref(), &names, &format!("{key}.vms"))?,
                notify: targets(&here, v.notify, &notify_names, &format!("{key}.notify"))?,
                name: v.name,
            });
        }
        Ok(Config {
            path: path.to_path_buf(),
            // A bucket's address is not a path to resolve.
            repository: match file.repository.get_ref() {
                r if r.to_str().is_some_and(|t| t.starts_with("s3://")) => r.clone(),
                r => rel(r),
            },
            vms,
            listen,
            state_dir,
            jobs,
            verifies,
            notify,
        })
    }
}

/// Job names (backup and verify alike) are unique, and safe in a URL.
fn unique(
    here: &Here<'_>,
    seen: &mut HashSet<String>,
    name: &str,
    span: &Range<usize>,
    key: &str,
) -> Result<()> {
    if !seen.insert(name.to_string()) || !valid_name(name) {
        return Err(here.err(
            span,
            &format!("{key}.name"),
            "a job's name must be unique, of letters, digits, '-' and '_'",
        ));
    }
    Ok(())
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn calendar(here: &Here<'_>, s: &Spanned<String>, key: &str) -> Result<Calendar> {
    s.get_ref().parse().map_err(|e| here.err(&s.span(), key, e))
}

fn duration(here: &Here<'_>, s: &Spanned<String>, key: &str) -> Result<Duration> {
    humantime::parse_duration(s.get_ref())
        .map_err(|e| here.err(&s.span(), key, format!("{:?}: {e}", s.get_ref())))
}

/// The VMs a job names, all when it names none; an unknown one is an
/// error that lists the known.
fn select(
    here: &Here<'_>,
    given: Option<&Spanned<Vec<String>>>,
    names: &[String],
    key: &str,
) -> Result<Vec<String>> {
    let Some(given) = given else {
        return Ok(names.to_vec());
    };
    if given.get_ref().is_empty() {
        return Err(here.err(&given.span(), key, "names no VM; leave it out for all"));
    }
    if let Some(n) = given.get_ref().iter().find(|n| !names.contains(n)) {
        return Err(here.err(
            &given.span(),
            key,
            format!("no VM {n:?}; the VMs are {}", names.join(", ")),
        ));
    }
    Ok(given.get_ref().clone())
}

/// A job's `notify` list: every name a `[[notify]]` target's.
fn targets(
    here: &Here<'_>,
    given: Option<Spanned<Vec<String>>>,
    known: &[&str],
    key: &str,
) -> Result<Vec<String>> {
    let Some(t) = given else {
        return Ok(Vec::new());
    };
    if let Some(n) = t.get_ref().iter().find(|n| !known.contains(&n.as_str())) {
        return Err(here.err(&t.span(), key, format!("no [[notify]] named {n:?}")));
    }
    Ok(t.into_inner())
}

fn notify_targets(
    here: &Here<'_>,
    rel: &dyn Fn(&Path) -> PathBuf,
    list: Vec<Spanned<FileNotify>>,
) -> Result<Vec<Notify>> {
    let mut out: Vec<Notify> = Vec::new();
    for (i, n) in list.into_iter().enumerate() {
        let span = n.span();
        let n = n.into_inner();
        let key = format!("notify[{i}] ({:?})", n.name);
        if out.iter().any(|o| o.name == n.name) || !valid_name(&n.name) {
            return Err(here.err(
                &span,
                &format!("{key}.name"),
                "a target's name must be unique, of letters, digits, '-' and '_'",
            ));
        }
        let url = n.url.get_ref();
        if let Err(why) = check_url(url) {
            return Err(here.err(
                &n.url.span(),
                &format!("{key}.url"),
                format!("{url:?}: {why}"),
            ));
        }
        let ca = match n.ca {
            Some(ca) => {
                let path = rel(ca.get_ref());
                if let Err(why) = read_ca(&path) {
                    return Err(here.err(&ca.span(), &format!("{key}.ca"), why));
                }
                Some(path)
            }
            None => None,
        };
        out.push(Notify {
            name: n.name,
            url: url.clone(),
            on_success: n.on_success,
            retries: n.retries.min(10),
            ca,
        });
    }
    Ok(out)
}

// What a webhook's target may be: checked here, where the configuration
// is read before anything runs and a bad target names its line; `notify`
// reads the bundle again when it sends.

/// A CA bundle is a few certificates; a system bundle some 200 KiB.
const CA_LIMIT: u64 = 16 << 20;

/// Why `url` cannot be a webhook's target, if it cannot.
pub fn check_url(url: &str) -> Result<(), String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("not a URL ({e})"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host().is_none() {
        return Err("an http:// or https:// URL".into());
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err("credentials in the URL would be logged; put a token in its path".into());
    }
    Ok(())
}

/// The certificates of the PEM bundle at `path`, or why there are none.
pub fn read_ca(path: &Path) -> Result<Vec<reqwest::Certificate>, String> {
    let bad = |why: String| format!("{}: {why}", path.display());
    let size = std::fs::metadata(path)
        .map_err(|e| bad(format!("cannot read it ({e})")))?
        .len();
    if size > CA_LIMIT {
        return Err(bad(format!(
            "{size} bytes is past the {CA_LIMIT} a PEM bundle may have"
        )));
    }
    let pem = std::fs::read(path).map_err(|e| bad(format!("cannot read it ({e})")))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| bad(format!("not a PEM certificate bundle ({e})")))?;
    if certs.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests;
