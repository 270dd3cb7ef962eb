//! The rules a manifest's names and sizes must follow before anything is
//! done with them. A manifest is read from a repository that other hosts
//! may write, so its disk names become file names only once they are one
//! plain path component, its id must be the one its file is named by,
//! and its digests must be digests. Breaking a rule is damage: verify
//! reports it, and restore, forget and gc refuse the manifest.
//!
//! Pure functions over the parsed manifest, so the fuzz target and the
//! tests run them without a repository.

use super::manifest::Manifest;
use crate::error::{ErrorKind, Result};

/// The largest virtual disk a manifest may describe: a VHDX's 64 TiB, the
/// largest either format allows. It bounds the index a manifest can make
/// vsnap read.
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

/// A disk name's longest length, as a file name's on Linux.
pub const MAX_NAME: usize = 255;

/// Why `name` cannot name a restored file, if it cannot.
pub fn disk_name_rule(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("a disk name must not be empty");
    }
    if name.len() > MAX_NAME {
        return Some("a disk name must be at most 255 bytes");
    }
    if name == "." || name == ".." {
        return Some("a disk name must not be . or ..");
    }
    if name.contains(['/', '\\', '\0']) {
        return Some("a disk name is one plain path component: no /, \\ or NUL");
    }
    if name.chars().any(char::is_control) {
        return Some("a disk name is plain text: no control characters (C0, DEL, C1)");
    }
    None
}

/// Why `name` cannot name a VM or a host, if it cannot: names are printed
/// to operators' terminals and written into file names, so they are plain
/// text, without the control characters (C0, DEL, C1) that move a cursor,
/// retitle a window or fake a line of output.
pub fn label_rule(name: &str) -> Option<&'static str> {
    if name.chars().any(char::is_control) {
        return Some("a VM or host name is plain text: no control characters (C0, DEL, C1)");
    }
    if name.len() > MAX_NAME {
        return Some("a VM or host name is at most 255 bytes");
    }
    None
}

/// Why `id` is not a snapshot id, if it is not: 16 lowercase hex digits,
/// as backups make them.
pub fn snapshot_id_rule(id: &str) -> Option<&'static str> {
    if id.len() == 16 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        None
    } else {
        Some("a snapshot id is 16 lowercase hex digits")
    }
}

/// Whether `s` is a BLAKE3 digest as the repository writes them: 64
/// lowercase hex digits.
pub fn is_digest_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn bad(field: String, value: &str, rule: &'static str) -> crate::Error {
    let mut value = value.to_owned();
    if value.len() > 80 {
        let mut cut = 80;
        while !value.is_char_boundary(cut) {
            cut -= 1;
        }
        value.truncate(cut);
        value.push('…');
    }
    ErrorKind::BadField {
        field: field.into(),
        value: value.into(),
        rule,
    }
    .into()
}

impl Manifest {
    /// Checks what the manifest names against the rules above: `file_id`
    /// is the id its file name gives, `chunk_size` the repository's.
    pub fn validate(&self, file_id: &str, chunk_size: u64) -> Result<()> {
        if let Some(rule) = snapshot_id_rule(&self.id) {
            return Err(bad("id".into(), &self.id, rule));
        }
        if self.id != file_id {
            return Err(bad(
                "id".into(),
                &self.id,
                "a manifest's id must be the one its file is named by",
            ));
        }
        if self.chunk_size != chunk_size {
            return Err(bad(
                "chunk_size".into(),
                &self.chunk_size.to_string(),
                "a manifest's chunk size must be the repository's",
            ));
        }
        for (field, value) in [("vm", &self.vm), ("host", &self.host)] {
            if let Some(rule) = label_rule(value) {
                return Err(bad(field.into(), value, rule));
            }
        }
        if self.disks.is_empty() {
            return Err(bad(
                "disks".into(),
                "[]",
                "a snapshot holds at least one disk",
            ));
        }
        for (i, d) in self.disks.iter().enumerate() {
            if let Some(rule) = disk_name_rule(&d.name) {
                return Err(bad(format!("disks[{i}].name"), &d.name, rule));
            }
            if self.disks[..i].iter().any(|o| o.name == d.name) {
                return Err(bad(
                    format!("disks[{i}].name"),
                    &d.name,
                    "disk names within a snapshot must differ",
                ));
            }
            if !is_digest_hex(&d.index) {
                return Err(bad(
                    format!("disks[{i}].index"),
                    &d.index,
                    "an index is named by 64 lowercase hex digits",
                ));
            }
            if !is_digest_hex(&d.digest) {
                return Err(bad(
                    format!("disks[{i}].digest"),
                    &d.digest,
                    "a disk digest is 64 lowercase hex digits",
                ));
            }
            if let Some(p) = d.piece_size {
                if !super::index::valid_piece(p, chunk_size) {
                    return Err(bad(
                        format!("disks[{i}].piece_size"),
                        &p.to_string(),
                        "a piece size is a power of two from 1 KiB to the chunk size",
                    ));
                }
            }
            if d.virtual_size > MAX_VIRTUAL_SIZE {
                return Err(bad(
                    format!("disks[{i}].virtual_size"),
                    &d.virtual_size.to_string(),
                    "a disk is at most 64 TiB, the largest VHDX",
                ));
            }
            if let Err(e) = d.identity.footer() {
                return Err(bad(
                    format!("disks[{i}].identity.vhd_footer"),
                    &e.to_string(),
                    "the VHD footer must parse",
                ));
            }
        }
        Ok(())
    }
}

/// Runs every reader of the repository's own metadata over `data`, as the
/// fuzz target and the mutation test do: the manifest parser (self-digest
/// included) and, whatever the self-digest says, the name rules on the
/// JSON; the blob envelope as an index and as a chunk, with their
/// ceilings; and the index parser. None of them may panic, and none may
/// allocate past the ceiling it is given.
pub fn exercise(data: &[u8]) {
    use super::blob::{self, BlobKind};
    use super::index::{Index, Layout};
    const CHUNK: u64 = 4 << 20;
    let _ = Manifest::parse(data);
    if let Ok(m) = serde_json::from_slice::<Manifest>(data) {
        let _ = m.validate(&m.id, m.chunk_size);
        let _ = m.validate("0123456789abcdef", CHUNK);
        for d in &m.disks {
            let _ = Index::plain_len(d.virtual_size, CHUNK, d.layout());
        }
    }
    let layouts = [None, Some(1 << 10), Some(4 << 10), Some(64 << 10)]
        .into_iter()
        .flat_map(|piece_size| [false, true].map(|leaves| Layout { piece_size, leaves }));
    let ceiling = Index::plain_len(
        64 << 20,
        CHUNK,
        Layout {
            piece_size: Some(super::index::LEAST_PIECE),
            leaves: true,
        },
    );
    if let Ok(plain) = blob::decode(BlobKind::Index, data, ceiling) {
        for layout in layouts.clone() {
            let _ = Index::parse(&plain, layout);
        }
    }
    for layout in layouts {
        let _ = Index::parse(data, layout);
    }
    if let Ok(h) = blob::parse_header(BlobKind::Chunk, data) {
        if h.plain_len <= 64 << 10 {
            let mut out = vec![0u8; h.plain_len as usize];
            let _ = blob::decode_into(BlobKind::Chunk, data, &mut out);
        }
    }
    // A pack's trailer, as the whole object and as its last bytes of a
    // larger one.
    let _ = super::pack::parse_trailer(data, data.len() as u64);
    let _ = super::pack::parse_trailer(data, (data.len() as u64).saturating_mul(3));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_leave_a_directory_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "/etc/passwd",
            "a\\b",
            "a\0b",
            &"x".repeat(256),
        ] {
            assert!(disk_name_rule(bad).is_some(), "{bad:?}");
        }
        for good in ["disk0.vhd", "web#2", "..x", "x..", &"y".repeat(255)] {
            assert_eq!(disk_name_rule(good), None, "{good:?}");
        }
    }

    #[test]
    fn ids_are_sixteen_lowercase_hex_digits() {
        assert_eq!(snapshot_id_rule("0123456789abcdef"), None);
        for bad in [
            "",
            "0123456789ABCDEF",
            "0123456789abcde",
            "../../etc/x",
            "0123456789abcdefa",
        ] {
            assert!(snapshot_id_rule(bad).is_some(), "{bad:?}");
        }
    }
}
