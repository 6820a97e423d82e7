//! Human-friendly durations in config files: `"90s"`, `"5m"`, `"2h"`, `"7d"`, `"250ms"`.

use std::fmt;

/// A span of time in whole milliseconds, parsed from a string such as `"7d"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span(pub u64);

impl Span {
    pub const fn from_secs(s: u64) -> Self {
        Span(s * 1000)
    }
    pub fn as_millis(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 4] = [(86_400_000, "d"), (3_600_000, "h"), (60_000, "m"), (1000, "s")];
        for (ms, unit) in UNITS {
            if self.0 >= ms && self.0.is_multiple_of(ms) {
                return write!(f, "{}{unit}", self.0 / ms);
            }
        }
        write!(f, "{}ms", self.0)
    }
}

/// Parses `"<number><unit>"` with unit one of `ms s m h d`.
pub fn parse_span(text: &str) -> Result<Span, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "'{text}' is not a duration: expected a number then ms, s, m, h or d, e.g. \"30s\""
        ));
    }
    let n: u64 = num.parse().map_err(|_| format!("'{text}': number too large"))?;
    let mult = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "" => return Err(format!("'{text}' has no unit: write e.g. \"{n}s\"")),
        other => return Err(format!("'{text}': unknown unit '{other}' (use ms, s, m, h or d)")),
    };
    n.checked_mul(mult).map(Span).ok_or_else(|| format!("'{text}': too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_rejects_garbage() {
        assert_eq!(parse_span("7d").unwrap(), Span(7 * 86_400_000));
        assert_eq!(parse_span("250ms").unwrap(), Span(250));
        assert_eq!(parse_span(" 90s ").unwrap(), Span(90_000));
        assert!(parse_span("7").unwrap_err().contains("no unit"));
        assert!(parse_span("d").is_err());
        assert!(parse_span("3w").unwrap_err().contains("unknown unit"));
        assert!(parse_span("99999999999999999999s").is_err());
    }

    #[test]
    fn displays_in_largest_whole_unit() {
        assert_eq!(Span(7 * 86_400_000).to_string(), "7d");
        assert_eq!(Span(90_000).to_string(), "90s");
        assert_eq!(Span(1500).to_string(), "1500ms");
    }
}
