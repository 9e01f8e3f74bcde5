//! Byte sizes: parsing what an operator types and printing what they read.
//!
//! Accepted spellings: a plain integer (`1048576`), or a number followed by a
//! unit. Binary units (`KiB`, `MiB`, `GiB`, `TiB`, `PiB`) and their one-letter
//! short forms (`k`, `m`, `g`, `t`, `p`, any case) are powers of 1024; decimal
//! units (`kB`, `MB`, `GB`, `TB`, `PB`) are powers of 1000 — the distinction
//! `qemu-img` and `truncate` users expect. A trailing `B` alone means bytes.
//! Fractions are allowed when the result is a whole number of bytes
//! (`1.5GiB`), never silently rounded.

use std::fmt;
use std::str::FromStr;

/// A number of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

/// Why a size string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeParseError {
    #[error("empty size: write a number with an optional unit, e.g. 10GiB")]
    Empty,
    #[error("`{input}` is not a size: write a number with an optional unit, e.g. 10GiB or 512MiB")]
    Malformed { input: String },
    #[error("unknown unit `{unit}` in `{input}`: use B, KiB, MiB, GiB, TiB (binary) or kB, MB, GB, TB (decimal)")]
    UnknownUnit { input: String, unit: String },
    #[error("`{input}` does not fit in 64 bits of bytes")]
    Overflow { input: String },
    #[error("`{input}` is not a whole number of bytes")]
    Fractional { input: String },
}

const KIB: u64 = 1 << 10;

fn unit_multiplier(unit: &str) -> Option<u64> {
    let m = match unit {
        "" | "b" | "B" => 1,
        "k" | "K" | "KiB" | "kiB" | "Ki" | "ki" => KIB,
        "m" | "M" | "MiB" | "Mi" => KIB.pow(2),
        "g" | "G" | "GiB" | "Gi" => KIB.pow(3),
        "t" | "T" | "TiB" | "Ti" => KIB.pow(4),
        "p" | "P" | "PiB" | "Pi" => KIB.pow(5),
        "kB" | "KB" => 1000,
        "MB" => 1000u64.pow(2),
        "GB" => 1000u64.pow(3),
        "TB" => 1000u64.pow(4),
        "PB" => 1000u64.pow(5),
        _ => return None,
    };
    Some(m)
}

impl FromStr for ByteSize {
    type Err = SizeParseError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let s = input.trim();
        if s.is_empty() {
            return Err(SizeParseError::Empty);
        }
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
            .unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let number: String = number.chars().filter(|&c| c != '_').collect();
        let unit = unit.trim();
        let malformed = || SizeParseError::Malformed {
            input: input.to_string(),
        };
        if number.is_empty() {
            return Err(malformed());
        }
        let multiplier = unit_multiplier(unit).ok_or_else(|| SizeParseError::UnknownUnit {
            input: input.to_string(),
            unit: unit.to_string(),
        })?;
        let overflow = || SizeParseError::Overflow {
            input: input.to_string(),
        };
        let (whole, frac) = match number.split_once('.') {
            Some((w, f)) => (w, f),
            None => (number.as_str(), ""),
        };
        if frac.contains('.') || (whole.is_empty() && frac.is_empty()) {
            return Err(malformed());
        }
        let whole_value: u64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| overflow())?
        };
        let mut bytes = whole_value.checked_mul(multiplier).ok_or_else(overflow)?;
        if !frac.is_empty() {
            // Exact arithmetic: frac_digits / 10^len * multiplier must be whole.
            if frac.len() > 18 {
                return Err(malformed());
            }
            let frac_value: u128 = frac.parse().map_err(|_| malformed())?;
            let denominator = 10u128.pow(frac.len() as u32);
            let numerator = frac_value * u128::from(multiplier);
            if numerator % denominator != 0 {
                return Err(SizeParseError::Fractional {
                    input: input.to_string(),
                });
            }
            let extra = u64::try_from(numerator / denominator).map_err(|_| overflow())?;
            bytes = bytes.checked_add(extra).ok_or_else(overflow)?;
        }
        Ok(ByteSize(bytes))
    }
}

impl fmt::Display for ByteSize {
    /// Prints the largest binary unit that represents the value exactly, or
    /// one decimal place of the largest unit ≥ 1 when none does (`1.5 GiB`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
        let v = self.0;
        let mut idx = 0;
        while idx + 1 < UNITS.len() && v >= KIB.pow(idx as u32 + 1) {
            idx += 1;
        }
        let unit = KIB.pow(idx as u32);
        if v % unit == 0 {
            write!(f, "{} {}", v / unit, UNITS[idx])
        } else {
            write!(f, "{:.1} {}", v as f64 / unit as f64, UNITS[idx])
        }
    }
}

impl ByteSize {
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> Result<u64, SizeParseError> {
        s.parse::<ByteSize>().map(|b| b.0)
    }

    #[test]
    fn parses_operator_spellings() {
        assert_eq!(p("0"), Ok(0));
        assert_eq!(p("4096"), Ok(4096));
        assert_eq!(p("10GiB"), Ok(10 << 30));
        assert_eq!(p("10G"), Ok(10 << 30));
        assert_eq!(p("10 GiB"), Ok(10 << 30));
        assert_eq!(p("512k"), Ok(512 << 10));
        assert_eq!(p("1.5GiB"), Ok(3 << 29));
        assert_eq!(p("1MB"), Ok(1_000_000));
        assert_eq!(p("1_000B"), Ok(1000));
        assert_eq!(
            p("16EiB").unwrap_err(),
            SizeParseError::UnknownUnit {
                input: "16EiB".into(),
                unit: "EiB".into()
            }
        );
    }

    #[test]
    fn refuses_nonsense() {
        assert!(matches!(p(""), Err(SizeParseError::Empty)));
        assert!(matches!(p("GiB"), Err(SizeParseError::Malformed { .. })));
        assert!(matches!(p("1.2.3G"), Err(SizeParseError::Malformed { .. })));
        assert!(matches!(p("-1G"), Err(SizeParseError::Malformed { .. })));
        assert!(matches!(p("1.1B"), Err(SizeParseError::Fractional { .. })));
        assert!(matches!(
            p("17000000PiB"),
            Err(SizeParseError::Overflow { .. })
        ));
        assert!(matches!(
            p("99999999999999999999"),
            Err(SizeParseError::Overflow { .. })
        ));
    }

    #[test]
    fn displays_exact_units() {
        assert_eq!(ByteSize(10 << 30).to_string(), "10 GiB");
        assert_eq!(ByteSize(1536).to_string(), "1.5 KiB");
        assert_eq!(ByteSize(7).to_string(), "7 B");
    }

    proptest! {
        #[test]
        fn plain_integers_round_trip(v in any::<u64>()) {
            prop_assert_eq!(p(&v.to_string()), Ok(v));
        }

        #[test]
        fn exact_display_parses_back(v in any::<u32>(), shift in 0u32..30) {
            let bytes = u64::from(v) << shift;
            let shown = ByteSize(bytes).to_string();
            if !shown.contains('.') {
                prop_assert_eq!(p(&shown), Ok(bytes));
            }
        }

        #[test]
        fn never_panics(s in ".{0,24}") {
            let _ = p(&s);
        }
    }
}
