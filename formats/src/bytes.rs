//! Little-endian integers at an offset in a byte slice: the one set of
//! readers every parser of vsnap's (VHDX's structures, the repository's
//! blobs, packs and indexes) uses, through zerocopy's unaligned
//! little-endian types. A parser checks its structure's length once, up
//! front; a read past the end of the slice gives 0 rather than a panic,
//! so a missed check reads garbage that the structure's own checks
//! (CRCs, magic, bounds) refuse, and never brings vsnap down.

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::FromBytes;

fn read<T: FromBytes>(b: &[u8], at: usize) -> Option<T> {
    T::read_from_prefix(b.get(at..)?).ok().map(|(v, _)| v)
}

pub fn le16(b: &[u8], at: usize) -> u16 {
    read::<U16>(b, at).map_or(0, |v| v.get())
}

pub fn le32(b: &[u8], at: usize) -> u32 {
    read::<U32>(b, at).map_or(0, |v| v.get())
}

pub fn le64(b: &[u8], at: usize) -> u64 {
    read::<U64>(b, at).map_or(0, |v| v.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_at_any_offset_and_past_the_end_as_zero() {
        let b = [1u8, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(le16(&b, 1), 0x0302);
        assert_eq!(le32(&b, 5), 0x0908_0706);
        assert_eq!(le64(&b, 1), 0x0908_0706_0504_0302);
        assert_eq!(le64(&b, 2), 0);
        assert_eq!(le16(&b, 100), 0);
    }
}
