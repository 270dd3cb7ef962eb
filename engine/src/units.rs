//! Byte counts as people read them, in binary units like qemu-img: what
//! every report, table and progress line of vsnap's tools prints.

/// `104857600` → `100 MiB`; exact values keep no decimals.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    let mut value = bytes as f64;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value} {}", UNITS[unit])
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes_are_exact_where_they_can_be() {
        assert_eq!(human(100 << 20), "100 MiB");
        assert_eq!(human(104_865_792), "100.01 MiB");
        assert_eq!(human(512), "512 B");
    }
}
