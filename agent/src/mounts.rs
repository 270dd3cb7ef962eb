//! Which mounts an agent freezes, and in what order. A pure function over
//! the text of `/proc/self/mountinfo`, so the rules are tested without
//! mounting anything.
//!
//! The rules (docs/protocol.md): block-device filesystems only
//! for `auto`; read-only and network filesystems skipped; one freeze per
//! device, however many bind mounts show it; reverse mount order, so a
//! filesystem mounted inside another freezes first, and `/` last.

use std::path::{Path, PathBuf};

use serde::Serialize;
use vsnap_protocol::MountInfo;
pub use vsnap_protocol::Skipped;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mount {
    pub mount_point: PathBuf,
    /// `major:minor`: one superblock, however many places it is mounted.
    pub device: String,
    pub fstype: String,
    pub source: String,
    pub read_only: bool,
    /// Position in mountinfo: later lines were mounted later.
    #[serde(skip)]
    pub order: usize,
}

/// What the agent will freeze: `freeze` in freeze order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Selection {
    pub freeze: Vec<Mount>,
    pub skipped: Vec<Skipped>,
}

impl Mount {
    /// As identify reports it.
    pub fn info(&self) -> MountInfo {
        MountInfo {
            mount_point: self.mount_point.clone(),
            device: self.device.clone(),
            fstype: self.fstype.clone(),
            source: self.source.clone(),
            read_only: self.read_only,
        }
    }
}

const NETWORK: &[&str] = &[
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "ceph",
    "glusterfs",
    "9p",
    "afs",
    "lustre",
    "fuse.sshfs",
    "ncpfs",
    "ocfs2",
    "gfs2",
];

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = std::str::from_utf8(&b[i + 1..i + 4]).ok();
            if let Some(v) = oct.and_then(|o| u8::from_str_radix(o, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo; lines that do not have its shape are ignored.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    for (order, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if dash < 6 || fields.len() < dash + 3 {
            continue;
        }
        let opts = fields[5];
        let super_opts = fields.get(dash + 3).copied().unwrap_or("");
        let ro = |o: &str| o.split(',').any(|x| x == "ro");
        out.push(Mount {
            mount_point: PathBuf::from(unescape(fields[4])),
            device: fields[2].to_string(),
            fstype: fields[dash + 1].to_string(),
            source: unescape(fields[dash + 2]),
            read_only: ro(opts) || ro(super_opts),
            order,
        });
    }
    out
}

fn skip_reason(m: &Mount) -> Option<&'static str> {
    if m.read_only {
        Some("read-only")
    } else if NETWORK.contains(&m.fstype.as_str()) {
        Some("network filesystem")
    } else {
        None
    }
}

/// `requested`: the mount points to freeze, or `None` for `auto`. A
/// requested path that is not a mount point is an error, naming it.
pub fn select(mounts: &[Mount], requested: Option<&[PathBuf]>) -> Result<Selection, String> {
    let mut sel = Selection::default();
    let mut chosen: Vec<Mount> = Vec::new();
    let mut consider = |m: &Mount, sel: &mut Selection| {
        if let Some(reason) = skip_reason(m) {
            sel.skipped.push(Skipped {
                mount: m.mount_point.clone(),
                reason: reason.into(),
            });
        } else if let Some(first) = chosen.iter().find(|c| c.device == m.device) {
            if first.mount_point != m.mount_point {
                sel.skipped.push(Skipped {
                    mount: m.mount_point.clone(),
                    reason: format!(
                        "same filesystem as {} (frozen once)",
                        first.mount_point.display()
                    ),
                });
            }
        } else {
            chosen.push(m.clone());
        }
    };
    match requested {
        None => {
            for m in mounts.iter().filter(|m| m.source.starts_with("/dev/")) {
                consider(m, &mut sel);
            }
        }
        Some(paths) => {
            for p in paths {
                // The last mount on a path is the one that is visible.
                let Some(m) = mounts.iter().rev().find(|m| m.mount_point == *p) else {
                    return Err(format!("{} is not a mount point", p.display()));
                };
                consider(m, &mut sel);
            }
        }
    }
    chosen.sort_by_key(|m| (m.mount_point == Path::new("/"), std::cmp::Reverse(m.order)));
    sel.freeze = chosen;
    Ok(sel)
}

/// The selection on this machine, now.
pub fn select_here(requested: Option<&[PathBuf]>) -> Result<Selection, String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("read /proc/self/mountinfo: {e}"))?;
    let requested: Option<Vec<PathBuf>> = requested.map(|r| {
        r.iter()
            .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
            .collect()
    });
    select(&parse_mountinfo(&text), requested.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
23 22 0:21 / /proc rw,nosuid shared:2 - proc proc rw
24 22 254:2 / /data rw,relatime shared:3 - xfs /dev/vdb rw
25 24 254:3 / /data/db rw,relatime shared:4 - ext4 /dev/vdc rw
26 22 254:2 /sub /srv/bind rw,relatime shared:3 - xfs /dev/vdb rw
27 22 254:4 / /mnt/ro ro,relatime shared:5 - ext4 /dev/vdd ro
28 22 0:40 / /mnt/nfs rw,relatime shared:6 - nfs4 server:/export rw
29 22 0:41 / /boot/efi rw shared:7 - vfat /dev/vda15 rw
30 22 7:0 / /mnt/with\\040space rw shared:8 - ext4 /dev/loop0 rw
";

    #[test]
    fn auto_freezes_block_devices_once_in_reverse_order_root_last() {
        let sel = select(&parse_mountinfo(INFO), None).unwrap();
        let order: Vec<_> = sel.freeze.iter().map(|m| m.mount_point.clone()).collect();
        assert_eq!(
            order,
            ["/mnt/with space", "/boot/efi", "/data/db", "/data", "/"].map(PathBuf::from)
        );
        let skipped: Vec<_> = sel
            .skipped
            .iter()
            .map(|s| (s.mount.to_str().unwrap(), s.reason.as_str()))
            .collect();
        assert_eq!(
            skipped,
            [
                ("/srv/bind", "same filesystem as /data (frozen once)"),
                ("/mnt/ro", "read-only")
            ]
        );
    }

    #[test]
    fn a_requested_list_is_checked_and_ordered_the_same_way() {
        let all = parse_mountinfo(INFO);
        let want = ["/data", "/data/db", "/mnt/nfs", "/srv/bind"].map(PathBuf::from);
        let sel = select(&all, Some(&want)).unwrap();
        let order: Vec<_> = sel.freeze.iter().map(|m| m.mount_point.clone()).collect();
        assert_eq!(order, ["/data/db", "/data"].map(PathBuf::from));
        assert_eq!(sel.skipped[0].reason, "network filesystem");
        assert_eq!(sel.skipped.len(), 2);
        let e = select(&all, Some(&[PathBuf::from("/data/db/x")])).unwrap_err();
        assert_eq!(e, "/data/db/x is not a mount point");
    }

    #[test]
    fn garbage_lines_are_ignored() {
        assert!(parse_mountinfo("nonsense\n1 2 3 - x\n\\\n").is_empty());
        assert_eq!(unescape("a\\040b\\"), "a b\\");
        assert_eq!(unescape("\\04"), "\\04");
    }
}
