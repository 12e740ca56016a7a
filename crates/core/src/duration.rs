//! Durations as users write them in options: `10s`, `5 minutes`, `250ms`, `1h30m`.

use std::time::Duration;

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration '{input}': {reason} (examples: '500ms', '10s', '5 minutes', '1h30m')")]
pub struct DurationParseError {
    /// The text as given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Parses a duration such as `10s`, `10 seconds`, `1.5m`, `1h30m`; a bare number is seconds.
pub fn parse_duration(input: &str) -> Result<Duration, DurationParseError> {
    let err = |reason: &str| DurationParseError { input: input.to_string(), reason: reason.to_string() };
    let text = input.trim();
    if text.is_empty() {
        return Err(err("empty"));
    }
    if let Ok(secs) = text.parse::<f64>() {
        return secs_to_duration(secs).ok_or_else(|| err("must be a finite, non-negative number"));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        rest = rest.trim_start();
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if num_len == 0 {
            return Err(err("expected a number"));
        }
        let value: f64 = rest[..num_len].parse().map_err(|_| err("bad number"))?;
        rest = rest[num_len..].trim_start();
        let unit_len = rest.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(rest.len());
        let unit = rest[..unit_len].to_ascii_lowercase();
        rest = &rest[unit_len..];
        let scale = match unit.as_str() {
            "us" | "µs" | "micro" | "micros" | "microsecond" | "microseconds" => 1e-6,
            "ms" | "milli" | "millis" | "millisecond" | "milliseconds" => 1e-3,
            "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
            "m" | "min" | "mins" | "minute" | "minutes" => 60.0,
            "h" | "hr" | "hrs" | "hour" | "hours" => 3600.0,
            "d" | "day" | "days" => 86400.0,
            "" => return Err(err("missing unit after number")),
            _ => return Err(err(&format!("unknown unit '{unit}'"))),
        };
        total += secs_to_duration(value * scale).ok_or_else(|| err("out of range"))?;
    }
    Ok(total)
}

fn secs_to_duration(secs: f64) -> Option<Duration> {
    (secs.is_finite() && (0.0..1e12).contains(&secs)).then(|| Duration::from_secs_f64(secs))
}

/// Formats a duration the way `parse_duration` reads it back, choosing the largest exact unit.
pub fn format_duration(d: Duration) -> String {
    let us = d.as_micros();
    for (unit, size) in
        [("d", 86_400_000_000u128), ("h", 3_600_000_000), ("m", 60_000_000), ("s", 1_000_000), ("ms", 1_000)]
    {
        if us >= size && us.is_multiple_of(size) {
            return format!("{}{unit}", us / size);
        }
    }
    format!("{us}us")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10 minutes"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
    }

    #[test]
    fn rejects_garbage_with_reason() {
        let e = parse_duration("10 parsecs").unwrap_err();
        assert!(e.to_string().contains("unknown unit 'parsecs'"), "{e}");
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("5 5").is_err());
    }

    #[test]
    fn formats_round_trip() {
        for s in ["10s", "10m", "250ms", "2h", "1d"] {
            assert_eq!(format_duration(parse_duration(s).unwrap()), s);
        }
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
    }
}
