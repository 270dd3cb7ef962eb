//! The inventory: which VMs a coordinated backup covers, their disks,
//! how to reach each one's agent, and what to do when a guest cannot be
//! quiesced. Parsing is a pure function of the text, so every rule is
//! tested without files.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, ErrorKind, Result};
use vsnap_protocol::transport::Endpoint;

/// What a VM's snapshot may be when its guest cannot be quiesced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Fail the VM; with it, the whole coordinated backup aborts before the
    /// snapshot (VSS: a writer's veto aborts the backup).
    AppConsistentOnly,
    /// Drop the guest from the barrier and back it up, labelled
    /// `crash-consistent`.
    AllowCrashConsistent,
}

impl Policy {
    /// As the inventory and the manifest spell it.
    pub fn name(self) -> &'static str {
        match self {
            Policy::AppConsistentOnly => "app-consistent-only",
            Policy::AllowCrashConsistent => "allow-crash-consistent",
        }
    }
}

/// How the coordinator reaches a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentSpec {
    /// A `vsnap agent`.
    Vsnap {
        endpoint: Endpoint,
        token_file: Option<PathBuf>,
    },
    /// The stock QEMU guest agent on a unix socket.
    Qga(PathBuf),
    /// No agent: the snapshot can only be crash-consistent.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vm {
    pub name: String,
    pub disks: Vec<PathBuf>,
    pub agent: AgentSpec,
    pub policy: Policy,
    /// The mounts to freeze; `None`: whatever the agent freezes.
    pub mounts: Option<Vec<String>>,
    /// The QEMU monitor (QMP) of the process that runs this VM: with it,
    /// the snapshot is an external overlay QEMU takes and merges back
    /// (the `qmp` provider), whatever the disks' filesystem.
    pub qmp: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inventory {
    pub vms: Vec<Vm>,
}

/// One `[[vm]]` table as written, before its checks: the inventory's, or
/// one inline in another file (`vsnap serve`'s configuration).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmEntry {
    name: String,
    disks: Vec<PathBuf>,
    agent: String,
    #[serde(default)]
    policy: Option<Policy>,
    #[serde(default)]
    mounts: Option<Vec<String>>,
    #[serde(default)]
    token_file: Option<PathBuf>,
    #[serde(default)]
    qmp: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    vm: Vec<VmEntry>,
}

impl Inventory {
    pub fn load(path: &Path) -> Result<Inventory> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::from(e)
                .at(path.display().to_string())
                .during("read the inventory")
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Inventory::parse(&text, base).map_err(|e| e.at(path.display().to_string()))
    }

    /// Relative disk, socket and token paths are taken from `base`, the
    /// inventory's directory, so an inventory can sit beside its VMs.
    pub fn parse(text: &str, base: &Path) -> Result<Inventory> {
        let file: File = toml::from_str(text).map_err(|e| ErrorKind::Config(e.to_string()))?;
        if file.vm.is_empty() {
            return Err(ErrorKind::Config("the inventory lists no [[vm]]".into()).into());
        }
        Inventory::from_entries(file.vm, base)
    }

    /// Checks `[[vm]]` entries and resolves their paths from `base`.
    pub fn from_entries(entries: Vec<VmEntry>, base: &Path) -> Result<Inventory> {
        let rel = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let mut names = HashSet::new();
        let mut vms = Vec::new();
        for v in entries {
            let bad =
                |why: String| Error::from(ErrorKind::Config(format!("vm {:?}: {why}", v.name)));
            if v.name.is_empty() || v.name.contains('/') || v.name.contains(':') {
                return Err(bad("a name must be non-empty, without '/' or ':'".into()));
            }
            // The snapshot's manifest records the name, and the disks' file
            // names: refused here, not after the guests were frozen.
            if let Some(rule) = vsnap_repo::validate::label_rule(&v.name) {
                return Err(bad(rule.into()));
            }
            for (name, disk) in vsnap_repo::disk_names(&v.disks).iter().zip(&v.disks) {
                if let Some(rule) = vsnap_repo::validate::disk_name_rule(name) {
                    return Err(bad(format!("disk {disk:?}: {rule}")));
                }
            }
            if !names.insert(v.name.clone()) {
                return Err(bad("listed twice".into()));
            }
            if v.disks.is_empty() {
                return Err(bad("no disks".into()));
            }
            let agent = match v.agent.as_str() {
                "none" => AgentSpec::None,
                s if s.starts_with("qga:") => AgentSpec::Qga(rel(Path::new(&s[4..]))),
                s => {
                    let endpoint =
                        match Endpoint::connect(s).map_err(|e| bad(format!("agent: {e}")))? {
                            Endpoint::Unix(p) => Endpoint::Unix(rel(&p)),
                            Endpoint::Serial(p) => Endpoint::Serial(rel(&p)),
                            e => e,
                        };
                    if matches!(endpoint, Endpoint::Tcp(_)) && v.token_file.is_none() {
                        return Err(bad("a tcp agent needs token_file".into()));
                    }
                    AgentSpec::Vsnap {
                        endpoint,
                        token_file: v.token_file.as_deref().map(rel),
                    }
                }
            };
            if v.token_file.is_some() && !matches!(agent, AgentSpec::Vsnap { .. }) {
                return Err(bad(
                    "token_file is for vsnap agents (unix:, vsock:, tcp:, serial:)".into(),
                ));
            }
            let policy = match (v.policy, &agent) {
                (Some(Policy::AppConsistentOnly), AgentSpec::None) => {
                    return Err(bad(
                        "agent \"none\" can never be app-consistent; use policy = \"allow-crash-consistent\""
                            .into(),
                    ))
                }
                (Some(p), _) => p,
                (None, AgentSpec::None) => Policy::AllowCrashConsistent,
                (None, _) => Policy::AppConsistentOnly,
            };
            if v.mounts.as_ref().is_some_and(|m| m.is_empty()) {
                return Err(bad(
                    "mounts = [] freezes nothing; leave it out to freeze the agent's own set"
                        .into(),
                ));
            }
            vms.push(Vm {
                disks: v.disks.iter().map(|d| rel(d)).collect(),
                name: v.name,
                agent,
                policy,
                mounts: v.mounts,
                qmp: v.qmp.as_deref().map(rel),
            });
        }
        Ok(Inventory { vms })
    }

    /// The VMs named (all of them for none), in inventory order.
    pub fn select(&self, names: &[String]) -> Result<Vec<Vm>> {
        if let Some(n) = names
            .iter()
            .find(|n| !self.vms.iter().any(|v| &v.name == *n))
        {
            let known: Vec<&str> = self.vms.iter().map(|v| v.name.as_str()).collect();
            return Err(ErrorKind::Config(format!(
                "no vm {n:?} in the inventory; it lists {}",
                known.join(", ")
            ))
            .into());
        }
        Ok(self
            .vms
            .iter()
            .filter(|v| names.is_empty() || names.contains(&v.name))
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Inventory> {
        Inventory::parse(t, Path::new("/inv"))
    }

    #[test]
    fn the_issue_example_parses_with_paths_from_the_inventory_dir() {
        let inv = parse(
            r#"
[[vm]]
name = "web1"
disks = ["/vms/web1/disk0.vhd", "disk1.vhd"]
agent = "unix:/run/vsnap/web1.sock"
policy = "app-consistent-only"
mounts = ["/data"]

[[vm]]
name = "db"
disks = ["db.vhd"]
agent = "tcp:10.0.0.5:5555"
token_file = "db.token"

[[vm]]
name = "legacy"
disks = ["l.vhd"]
agent = "none"

[[vm]]
name = "q"
disks = ["q.vhd"]
agent = "qga:q.sock"
policy = "allow-crash-consistent"
qmp = "q-monitor.sock"
"#,
        )
        .unwrap();
        assert_eq!(inv.vms.len(), 4);
        let web = &inv.vms[0];
        assert_eq!(
            web.disks,
            [
                PathBuf::from("/vms/web1/disk0.vhd"),
                PathBuf::from("/inv/disk1.vhd")
            ]
        );
        assert_eq!(web.mounts.as_deref(), Some(&["/data".to_string()][..]));
        assert_eq!(inv.vms[1].policy, Policy::AppConsistentOnly);
        assert_eq!(
            inv.vms[1].agent,
            AgentSpec::Vsnap {
                endpoint: Endpoint::Tcp("10.0.0.5:5555".into()),
                token_file: Some(PathBuf::from("/inv/db.token"))
            }
        );
        assert_eq!(inv.vms[2].agent, AgentSpec::None);
        assert_eq!(inv.vms[2].qmp, None);
        assert_eq!(inv.vms[3].qmp, Some(PathBuf::from("/inv/q-monitor.sock")));
        assert_eq!(inv.vms[2].policy, Policy::AllowCrashConsistent);
        assert_eq!(
            inv.vms[3].agent,
            AgentSpec::Qga(PathBuf::from("/inv/q.sock"))
        );
        let sel = inv.select(&["db".into()]).unwrap();
        assert_eq!(sel.len(), 1);
        let e = inv.select(&["dB".into()]).unwrap_err().to_string();
        assert!(
            e.contains("no vm \"dB\"") && e.contains("web1, db, legacy, q"),
            "{e}"
        );
    }

    #[test]
    fn each_mistake_is_named() {
        let cases = [
            ("", "lists no [[vm]]"),
            ("[[vm]]\nname='a'\ndisks=[]\nagent='none'", "vm \"a\": no disks"),
            ("[[vm]]\nname='a'\ndisks=['x']\nagent='none'\n[[vm]]\nname='a'\ndisks=['y']\nagent='none'", "listed twice"),
            ("[[vm]]\nname='a'\ndisks=['x']\nagent='tcp:h:1'", "needs token_file"),
            ("[[vm]]\nname='a'\ndisks=['x']\nagent='none'\npolicy='app-consistent-only'", "can never be app-consistent"),
            ("[[vm]]\nname='a'\ndisks=['x']\nagent='smoke:1'", "agent: bad endpoint"),
            ("[[vm]]\nname='a'\ndisks=['x']\nagent='none'\npolicy='sometimes'", "unknown variant"),
            ("[[vm]]\nname='a'\ndisks=['x']\nagent='none'\nmount=['/']", "unknown field"),
            ("[[vm]]\nname='a'\ndisks=['x']\nagent='unix:/s'\nmounts=[]", "freezes nothing"),
            ("[[vm]]\nname='a/b'\ndisks=['x']\nagent='none'", "without '/'"),
            ("[[vm]]\nname=\"a\\u001b[2J\"\ndisks=['x']\nagent='none'", "vm \"a\\u{1b}[2J\": a VM or host name is plain text"),
            ("[[vm]]\nname='a'\ndisks=[\"x\\u009b1A.vhd\"]\nagent='none'", "a disk name is plain text"),
            ("[[vm]]\nname='a'\ndisks=['x']\nagent='none'\ntoken_file='t'", "token_file is for vsnap agents"),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
