//! GUIDs as VHDX stores them, and the ones the format defines.

/// A GUID in Microsoft's mixed-endian layout, kept as its 16 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// From the textual form `2DC27766-F623-4200-9D64-115E9BFD4A08`.
    pub const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ])
    }

    /// From the textual form, at compile time: only ever given literals,
    /// which the tests print back (a bad digit would read as 0).
    pub const fn parse(text: &str) -> Guid {
        const fn hex(c: u8) -> u8 {
            match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                b'A'..=b'F' => c - b'A' + 10,
                _ => 0,
            }
        }
        let t = text.as_bytes();
        // The 32 digits, dashes skipped, in text order.
        let mut d = [0u8; 16];
        let (mut i, mut n) = (0, 0);
        while i < t.len() && n < 32 {
            if t[i] != b'-' {
                let v = hex(t[i]);
                d[n / 2] = if n % 2 == 0 { v << 4 } else { d[n / 2] | v };
                n += 1;
            }
            i += 1;
        }
        // data1..3 are little-endian on disk; data4 is as written.
        Guid([
            d[3], d[2], d[1], d[0], d[5], d[4], d[7], d[6], d[8], d[9], d[10], d[11], d[12], d[13],
            d[14], d[15],
        ])
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// The same GUID as a [`uuid::Uuid`] (which prints the same text).
    pub fn to_uuid(self) -> uuid::Uuid {
        let b = self.0;
        let mut d4 = [0u8; 8];
        d4.copy_from_slice(&b[8..]);
        uuid::Uuid::from_fields(
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u16::from_le_bytes([b[4], b[5]]),
            u16::from_le_bytes([b[6], b[7]]),
            &d4,
        )
    }

    pub fn from_uuid(u: uuid::Uuid) -> Guid {
        let (d1, d2, d3, d4) = u.as_fields();
        Guid::from_fields(d1, d2, d3, *d4)
    }

    /// A new random GUID.
    pub fn random() -> Guid {
        Guid::from_uuid(uuid::Uuid::new_v4())
    }
}

impl std::fmt::Display for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:08X}-{:04X}-{:04X}-",
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u16::from_le_bytes([b[4], b[5]]),
            u16::from_le_bytes([b[6], b[7]])
        )?;
        for (i, x) in b[8..].iter().enumerate() {
            if i == 2 {
                f.write_str("-")?;
            }
            write!(f, "{x:02X}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

pub const BAT_REGION: Guid = Guid::parse("2DC27766-F623-4200-9D64-115E9BFD4A08");
pub const METADATA_REGION: Guid = Guid::parse("8B7CA206-4790-4B9A-B8FE-575F050F886E");
pub const FILE_PARAMETERS: Guid = Guid::parse("CAA16737-FA36-4D43-B3B6-33F0AA44E76B");
pub const VIRTUAL_DISK_SIZE: Guid = Guid::parse("2FA54224-CD1B-4876-B211-5DBED83BF4B8");
pub const PAGE_83_DATA: Guid = Guid::parse("BECA12AB-B2E6-4523-93EF-C309E000C746");
pub const LOGICAL_SECTOR_SIZE: Guid = Guid::parse("8141BF1D-A96F-4709-BA47-F233A8FAAB5F");
pub const PHYSICAL_SECTOR_SIZE: Guid = Guid::parse("CDA348C7-445D-4471-9CC9-E9885251C556");
pub const PARENT_LOCATOR: Guid = Guid::parse("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C");
