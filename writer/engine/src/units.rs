//! Human-readable sizes, rates and times, and parsing of sizes such as `64K`.

use anyhow::{bail, Result};

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// MiB per second: sizes and rates are binary everywhere strata prints them.
pub fn mib_per_s(bytes: u64, seconds: f64) -> f64 {
    if seconds <= 0.0 {
        0.0
    } else {
        bytes as f64 / (1u64 << 20) as f64 / seconds
    }
}

/// A size for a message: `256 MiB` when that is exact, else `255.9 MiB (268435455 bytes)`, so
/// that two sizes that differ are never printed alike.
pub fn size(n: u64) -> String {
    let unit = (0..6).rev().find(|&u| n >= 1u64 << (10 * u)).unwrap_or(0);
    if unit == 0 || n.is_multiple_of(1u64 << (10 * unit)) {
        let names = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
        format!("{} {}", n >> (10 * unit), names[unit])
    } else {
        format!("{} ({n} bytes)", bytes(n))
    }
}

/// Parses `4096`, `64K`, `64KiB`, `1M`, `4MiB` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = match num.parse() {
        Ok(n) => n,
        Err(_) => bail!("{s:?} is not a size (examples: 4096, 64K, 1M)"),
    };
    let mult = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => bail!("{s:?} is not a size (examples: 4096, 64K, 1M)"),
    };
    n.checked_mul(mult).ok_or_else(|| anyhow::anyhow!("{s:?} is too large"))
}

/// RFC 3339 UTC time, seconds precision.
pub fn rfc3339(secs: i64, nanos: u32) -> String {
    // humantime formats years 1970 to 9999; anything else (a damaged or hostile header) is shown
    // as raw seconds rather than trusted.
    if !(0..=253_402_300_799).contains(&secs) {
        return format!("@{secs}");
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::new(secs as u64, nanos.min(999_999_999));
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_outside_the_calendar_do_not_panic() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(253_402_300_800, 0), "@253402300800");
        assert_eq!(rfc3339(-5, 0), "@-5");
    }

    #[test]
    fn sizes_in_messages_are_exact() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(3072), "3 KiB");
        assert_eq!(size(256 << 20), "256 MiB");
        assert_eq!(size((256 << 20) - 1), "256.0 MiB (268435455 bytes)");
        assert_eq!(size(2 << 40), "2 TiB");
        assert_eq!(mib_per_s(3 << 20, 2.0), 1.5);
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("4MiB").unwrap(), 4 << 20);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
    }
}
