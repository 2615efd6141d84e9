//! Human-friendly durations ("500ms", "5m", "1h30m") and sizes ("2GiB"),
//! as written in the config file and on the command line.

use std::time::Duration;

const UNITS: [(&str, u64); 5] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

/// Parses `"500ms"`, `"30s"`, `"5m"`, `"2h"`, `"1d"`, or a sum such as
/// `"1h30m"`. A bare `"0"` is zero.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let problem = || {
        format!("invalid duration {text:?}: expected a number followed by ms, s, m, h or d, such as \"30s\" or \"1h30m\"")
    };
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = text;
    let mut total: u64 = 0;
    if rest.is_empty() {
        return Err(problem());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(problem());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| problem())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        let (_, millis) = UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .ok_or_else(problem)?;
        total = number
            .checked_mul(*millis)
            .and_then(|ms| total.checked_add(ms))
            .ok_or_else(|| format!("duration {text:?} is too long"))?;
        rest = &rest[unit_len..];
    }
    Ok(Duration::from_millis(total))
}

/// Formats milliseconds the way [`parse_duration`] reads them: `"1h30m"`.
pub fn format_duration_ms(millis: u64) -> String {
    if millis == 0 {
        return "0s".to_owned();
    }
    let mut rest = millis;
    let mut out = String::new();
    for (name, unit) in UNITS {
        if rest >= unit {
            out.push_str(&format!("{}{name}", rest / unit));
            rest %= unit;
        }
    }
    out
}

const SIZES: [(&str, u64); 9] = [
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("TB", 1_000_000_000_000),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("KB", 1_000),
    ("B", 1),
];

/// Parses `"16MiB"`, `"2GiB"`, `"1.5GiB"`, `"500MB"` or a plain number of bytes.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let problem = || {
        format!("invalid size {text:?}: expected a number with B, KiB, MiB, GiB or TiB (or KB, MB, GB, TB), such as \"2GiB\"")
    };
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit = unit.trim();
    let multiplier = if unit.is_empty() {
        1
    } else {
        SIZES
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(unit))
            .ok_or_else(problem)?
            .1
    };
    let value: f64 = number.parse().map_err(|_| problem())?;
    let bytes = value * multiplier as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(problem());
    }
    Ok(bytes.round() as u64)
}

/// Formats bytes with a binary unit: `"2.0 GiB"`, `"512 B"`.
pub fn format_bytes(bytes: u64) -> String {
    for (name, unit) in &SIZES[..4] {
        if bytes >= *unit {
            return format!("{:.1} {name}", bytes as f64 / *unit as f64);
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in ["", "5", "m", "5x", "-1s", "1.5s", "s5"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
        assert!(parse_duration("99999999999999999d")
            .unwrap_err()
            .contains("too long"));
        for ms in [0, 1, 500, 1000, 90_000, 5_400_000, 86_400_000 + 1] {
            assert_eq!(
                parse_duration(&format_duration_ms(ms)),
                Ok(Duration::from_millis(ms))
            );
        }
        assert_eq!(format_duration_ms(5_400_000), "1h30m");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("16MiB"), Ok(16 << 20));
        assert_eq!(parse_bytes("2 GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("1.5gib"), Ok(3 << 29));
        assert_eq!(parse_bytes("500MB"), Ok(500_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        for bad in ["", "GiB", "2XB", "1.2.3MiB", "-1GiB"] {
            assert!(parse_bytes(bad).is_err(), "{bad:?} parsed");
        }
        assert_eq!(format_bytes(2 << 30), "2.0 GiB");
        assert_eq!(format_bytes(512), "512 B");
    }
}
