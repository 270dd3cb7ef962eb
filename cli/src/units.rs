//! Byte sizes as people write them (`64M`, `2G`, `1.5T`, `4096`), in binary
//! units like qemu-img.

use anyhow::{bail, Context, Result};
pub use vsnap_engine::units::human;

/// Parses a duration as people write one (`500ms`, `10s`, `2m`), more
/// than zero.
pub fn parse_duration(text: &str) -> std::result::Result<std::time::Duration, String> {
    let d = parse_duration_or_zero(text)?;
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

/// Parses `N[K|M|G|T|P][i][B]`; suffixes are powers of 1024.
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let unit = suffix.trim().to_ascii_uppercase();
    let unit = unit.trim_end_matches('B').trim_end_matches('I');
    let shift = match unit {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        "P" => 50,
        _ => bail!("{text:?}: unknown unit {suffix:?} (use K, M, G, T or P, powers of 1024)"),
    };
    if num.is_empty() {
        bail!("{text:?}: no number before the unit");
    }
    let bytes = if let Some((int, frac)) = num.split_once('.') {
        let int: u64 = if int.is_empty() { 0 } else { int.parse()? };
        let frac_val: f64 = format!("0.{frac}").parse()?;
        let whole = int.checked_shl(shift).filter(|v| v >> shift == int);
        let part = (frac_val * (1u64 << shift) as f64).round() as u64;
        whole.and_then(|w| w.checked_add(part))
    } else {
        let n: u64 = num
            .parse()
            .with_context(|| format!("{text:?} is not a size"))?;
        n.checked_shl(shift).filter(|v| v >> shift == n)
    };
    bytes.with_context(|| format!("{text:?} is too large"))
}

/// The smallest and largest chunk: BLAKE3's own chunk, and a size past
/// which a chunk no longer fits the buffer pool's budget several times.
pub const MIN_CHUNK: u64 = 1 << 10;
pub const MAX_CHUNK: u64 = 64 << 20;

/// `--chunk-size`, checked as clap parses it, so a bad value is a usage
/// error naming the flag and the value as typed.
pub fn parse_chunk_size(text: &str) -> std::result::Result<u64, String> {
    let n = parse_size(text).map_err(|e| format!("{e:#}"))?;
    if !n.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&n) {
        return Err("must be a power of two from 1K to 64M".into());
    }
    Ok(n)
}

/// [`parse_duration`], where zero means "none".
pub fn parse_duration_or_zero(text: &str) -> std::result::Result<std::time::Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("not a duration ({e}; say 500ms, 10s or 2m)"))
}

/// `--pack-size`, checked as clap parses it.
pub fn parse_pack_size(text: &str) -> std::result::Result<u64, String> {
    let n = parse_size(text).map_err(|e| format!("{e:#}"))?;
    if !vsnap_repo::PACK_SIZE_RANGE.contains(&n) {
        return Err("must be from 1M to 1G".into());
    }
    Ok(n)
}

/// `--index-memory`: at least 16M, so a unit left out by mistake cannot
/// make a bucket unreadable.
pub fn parse_index_memory(text: &str) -> std::result::Result<u64, String> {
    let n = parse_size(text).map_err(|e| format!("{e:#}"))?;
    if n < 16 << 20 {
        return Err("must be at least 16M".into());
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert_eq!(parse_size("2040G").unwrap(), 2040 << 30);
        assert!(parse_size("12X")
            .unwrap_err()
            .to_string()
            .contains("unknown unit"));
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999P")
            .unwrap_err()
            .to_string()
            .contains("too large"));
    }
}
