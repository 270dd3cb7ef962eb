//! Recognising what a file is before anything reads it as a disk. vsnap
//! reads VHD, VHDX and raw; a file in another disk format would otherwise
//! be taken as raw, and its container backed up as if it were the disk,
//! under a digest that is not the disk's. Those formats are recognised by
//! their magic and refused, saying what to do.
//!
//! A pure function over the file's first bytes.

/// A disk format vsnap recognises and does not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Foreign {
    pub name: &'static str,
    pub hint: &'static str,
}

const CONVERT: &str = "convert it first: `qemu-img convert -O vpc` (VHD) or `qemu-img convert -O vhdx`, or `-O raw` and pass --source-format raw";

/// The first bytes a caller should read for [`foreign`].
pub const HEAD: usize = 512;

/// What `info` says of a file taken as raw because nothing was recognised.
pub const GUESSED_RAW: &str =
    "no VHD or VHDX structure found: the file is taken as a raw disk (say --source-format raw to make that explicit)";

/// The foreign format whose magic `head` (a file's first bytes) carries.
pub fn foreign(head: &[u8]) -> Option<Foreign> {
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    let name = if at(0, b"QFI\xfb") {
        "qcow2"
    } else if at(0, b"QED\0") {
        "QED"
    } else if at(0, b"KDMV") || at(0, b"COWD") || at(0, b"# Disk DescriptorFile") {
        "VMDK"
    } else if at(0x40, &0xbeda_107f_u32.to_le_bytes()) {
        "VDI"
    } else if at(0, b"LUKS\xba\xbe") {
        "LUKS (an encrypted volume)"
    } else {
        return None;
    };
    Some(Foreign {
        name,
        hint: if name.starts_with("LUKS") {
            "open it with cryptsetup and back up the mapped device, or the image that holds it"
        } else {
            CONVERT
        },
    })
}

/// Whether a file's name says it is a VHD or VHDX, so that holding no
/// such structure is an error rather than a raw disk.
pub fn named_like_vhd(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    [".vhd", ".vhdx", ".avhd", ".avhdx"]
        .iter()
        .any(|ext| lower.ends_with(ext))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_foreign_magic_is_named() {
        let mut vdi = vec![0u8; 0x44];
        vdi[0x40..].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        for (head, name) in [
            (&b"QFI\xfb\0\0\0\x03"[..], "qcow2"),
            (b"QED\0", "QED"),
            (b"KDMV\x01\0\0\0", "VMDK"),
            (b"# Disk DescriptorFile\nversion=1", "VMDK"),
            (&vdi, "VDI"),
            (b"LUKS\xba\xbe\0\x02", "LUKS (an encrypted volume)"),
        ] {
            assert_eq!(foreign(head).map(|f| f.name), Some(name));
        }
        assert_eq!(foreign(b""), None);
        assert_eq!(foreign(b"conectix"), None);
        assert_eq!(foreign(&[0u8; 512]), None);
        assert!(named_like_vhd("a.VHD") && named_like_vhd("b.avhdx") && !named_like_vhd("c.raw"));
    }
}
