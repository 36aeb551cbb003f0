//! Exact resource quantities in the notation users know from Kubernetes: `500m`, `2Gi`, `1.5`, `1e3`.

use std::cmp::Ordering;
use std::fmt;
use std::ops::{Add, Sub};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const NANO: i128 = 1_000_000_000;
/// Largest magnitude accepted, in whole units (as Kubernetes: it must fit an i64).
const MAX_UNITS: i128 = i64::MAX as i128;

/// How a quantity is written back out; parsing remembers the family of the suffix used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Powers of 1000: `n u m k M G T P E`, or no suffix.
    DecimalSi,
    /// Powers of 1024: `Ki Mi Gi Ti Pi Ei`.
    BinarySi,
    /// `1e3`, `5E-3`.
    DecimalExponent,
}

/// An exact amount of a resource, stored as an integer number of nano-units.
///
/// Parsing never rounds: a value finer than one nano-unit, or larger than `i64::MAX` units, is
/// refused. Printing picks the largest suffix of the parsed family that represents the value
/// exactly, so `parse(print(q)) == q` always holds (`1.5Gi` prints as `1536Mi`).
///
/// Equality and ordering compare amounts only: `1Ki == 1024`.
#[derive(Debug, Clone, Copy)]
pub struct Quantity {
    nanos: i128,
    format: Format,
}

/// Why a string is not a quantity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid quantity {input:?}: {reason}")]
pub struct QuantityError {
    /// The text that was refused.
    pub input: String,
    /// Why.
    pub reason: &'static str,
}

impl Quantity {
    /// Zero, printed as `0`.
    pub const ZERO: Quantity = Quantity { nanos: 0, format: Format::DecimalSi };

    /// A whole number of units (`4` cpus, `1` gpu).
    pub fn from_units(units: i64) -> Self {
        Quantity { nanos: units as i128 * NANO, format: Format::DecimalSi }
    }

    /// Thousandths of a unit (`500` millis = `500m`).
    pub fn from_milli(milli: i64) -> Self {
        Quantity { nanos: milli as i128 * 1_000_000, format: Format::DecimalSi }
    }

    /// Bytes, printed in binary suffixes (`Mi`, `Gi`) when exact.
    pub fn from_bytes(bytes: i64) -> Self {
        Quantity { nanos: bytes as i128 * NANO, format: Format::BinarySi }
    }

    /// The amount in nano-units, exactly.
    pub fn nanos(&self) -> i128 {
        self.nanos
    }

    /// The amount in thousandths, rounded up (as a scheduler must: `1n` of cpu still needs `1m`).
    pub fn milli_ceil(&self) -> i64 {
        let m = self.nanos.div_euclid(1_000_000) + i128::from(self.nanos.rem_euclid(1_000_000) != 0);
        m.clamp(i64::MIN as i128, i64::MAX as i128) as i64
    }

    /// The amount in whole units, rounded up.
    pub fn units_ceil(&self) -> i64 {
        let u = self.nanos.div_euclid(NANO) + i128::from(self.nanos.rem_euclid(NANO) != 0);
        u.clamp(i64::MIN as i128, i64::MAX as i128) as i64
    }

    /// The amount as a float, for scoring and display only.
    pub fn as_f64(&self) -> f64 {
        self.nanos as f64 / NANO as f64
    }

    /// True when below zero.
    pub fn is_negative(&self) -> bool {
        self.nanos < 0
    }

    /// True when zero.
    pub fn is_zero(&self) -> bool {
        self.nanos == 0
    }

    /// The family of suffixes this quantity prints with.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Sum, or `None` past the representable range.
    pub fn checked_add(self, other: Quantity) -> Option<Quantity> {
        let nanos = self.nanos.checked_add(other.nanos)?;
        (nanos.abs() <= MAX_UNITS * NANO).then_some(Quantity { nanos, format: self.format })
    }

    /// Parses `text`; see the type docs for the grammar.
    pub fn parse(text: &str) -> Result<Quantity, QuantityError> {
        let err = |reason| QuantityError { input: text.to_string(), reason };
        let s = text.trim();
        if s.is_empty() {
            return Err(err("empty"));
        }
        let (negative, s) = match s.as_bytes()[0] {
            b'-' => (true, &s[1..]),
            b'+' => (false, &s[1..]),
            _ => (false, s),
        };
        let num_end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
        let (number, suffix) = s.split_at(num_end);
        let (int_part, frac_part) = match number.split_once('.') {
            Some((i, f)) => (i, f),
            None => (number, ""),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(err("missing digits"));
        }
        if frac_part.contains('.') {
            return Err(err("more than one decimal point"));
        }
        // value = digits * 10^(exp10 - frac_len) * 1024^exp2
        let (exp10, exp2, format): (i32, u32, Format) = match suffix {
            "" => (0, 0, Format::DecimalSi),
            "n" => (-9, 0, Format::DecimalSi),
            "u" => (-6, 0, Format::DecimalSi),
            "m" => (-3, 0, Format::DecimalSi),
            "k" => (3, 0, Format::DecimalSi),
            "M" => (6, 0, Format::DecimalSi),
            "G" => (9, 0, Format::DecimalSi),
            "T" => (12, 0, Format::DecimalSi),
            "P" => (15, 0, Format::DecimalSi),
            "E" => (18, 0, Format::DecimalSi),
            "Ki" => (0, 1, Format::BinarySi),
            "Mi" => (0, 2, Format::BinarySi),
            "Gi" => (0, 3, Format::BinarySi),
            "Ti" => (0, 4, Format::BinarySi),
            "Pi" => (0, 5, Format::BinarySi),
            "Ei" => (0, 6, Format::BinarySi),
            other if other.starts_with(['e', 'E']) => {
                let e: i32 = other[1..].parse().map_err(|_| err("bad exponent"))?;
                if !(-30..=30).contains(&e) {
                    return Err(err("exponent out of range"));
                }
                (e, 0, Format::DecimalExponent)
            }
            _ => return Err(err("unknown suffix")),
        };
        let mut digits: i128 = 0;
        for c in int_part.bytes().chain(frac_part.bytes()) {
            digits = digits
                .checked_mul(10)
                .and_then(|d| d.checked_add(i128::from(c - b'0')))
                .ok_or_else(|| err("too large"))?;
        }
        // Scale to nanos: digits * 10^(exp10 - frac_len + 9) * 1024^exp2.
        let mut nanos = digits;
        for _ in 0..exp2 {
            nanos = nanos.checked_mul(1024).ok_or_else(|| err("too large"))?;
        }
        let shift = exp10 - frac_part.len() as i32 + 9;
        if shift >= 0 {
            for _ in 0..shift {
                nanos = nanos.checked_mul(10).ok_or_else(|| err("too large"))?;
            }
        } else {
            for _ in 0..(-shift) {
                if nanos % 10 != 0 {
                    return Err(err("finer than one nano-unit"));
                }
                nanos /= 10;
            }
        }
        if nanos > MAX_UNITS * NANO {
            return Err(err("too large"));
        }
        Ok(Quantity { nanos: if negative { -nanos } else { nanos }, format })
    }
}

impl PartialEq for Quantity {
    fn eq(&self, other: &Self) -> bool {
        self.nanos == other.nanos
    }
}
impl Eq for Quantity {}
impl PartialOrd for Quantity {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Quantity {
    fn cmp(&self, other: &Self) -> Ordering {
        self.nanos.cmp(&other.nanos)
    }
}
impl std::hash::Hash for Quantity {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.nanos.hash(state)
    }
}

impl Default for Quantity {
    fn default() -> Self {
        Quantity::ZERO
    }
}

impl Add for Quantity {
    type Output = Quantity;
    /// Saturates at the representable range rather than panicking.
    fn add(self, rhs: Quantity) -> Quantity {
        let limit = MAX_UNITS * NANO;
        // Zero has no format of its own: a sum starting from zero prints like what was added.
        let format = if self.nanos == 0 { rhs.format } else { self.format };
        Quantity { nanos: (self.nanos + rhs.nanos).clamp(-limit, limit), format }
    }
}

impl Sub for Quantity {
    type Output = Quantity;
    /// Saturates at the representable range rather than panicking.
    fn sub(self, rhs: Quantity) -> Quantity {
        let limit = MAX_UNITS * NANO;
        Quantity { nanos: (self.nanos - rhs.nanos).clamp(-limit, limit), format: self.format }
    }
}

impl FromStr for Quantity {
    type Err = QuantityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Quantity::parse(s)
    }
}

fn write_decimal(f: &mut fmt::Formatter<'_>, sign: &str, abs: i128) -> fmt::Result {
    // Largest power-of-1000 suffix that keeps the number whole.
    const SUFFIXES: [(&str, i128); 10] = [
        ("E", 1_000_000_000_000_000_000_000_000_000),
        ("P", 1_000_000_000_000_000_000_000_000),
        ("T", 1_000_000_000_000_000_000_000),
        ("G", 1_000_000_000_000_000_000),
        ("M", 1_000_000_000_000_000),
        ("k", 1_000_000_000_000),
        ("", 1_000_000_000),
        ("m", 1_000_000),
        ("u", 1_000),
        ("n", 1),
    ];
    for (suffix, scale) in SUFFIXES {
        if abs % scale == 0 {
            return write!(f, "{sign}{}{suffix}", abs / scale);
        }
    }
    unreachable!("every integer is a multiple of 1")
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.nanos == 0 {
            return f.write_str("0");
        }
        let sign = if self.nanos < 0 { "-" } else { "" };
        let abs = self.nanos.abs();
        match self.format {
            Format::BinarySi if abs % NANO == 0 => {
                let mut units = abs / NANO;
                let mut i = 0;
                while i < 6 && units % 1024 == 0 {
                    units /= 1024;
                    i += 1;
                }
                let suffix = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"][i];
                write!(f, "{sign}{units}{suffix}")
            }
            Format::DecimalExponent => {
                // Largest exponent (a multiple of 3, as Kubernetes prints) that keeps it whole.
                let mut mantissa = abs;
                let mut exp: i32 = -9;
                while mantissa % 1000 == 0 {
                    mantissa /= 1000;
                    exp += 3;
                }
                if exp == 0 { write!(f, "{sign}{mantissa}") } else { write!(f, "{sign}{mantissa}e{exp}") }
            }
            _ => write_decimal(f, sign, abs),
        }
    }
}

impl Serialize for Quantity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Quantity;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a quantity such as \"500m\", \"2Gi\" or 4")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Quantity, E> {
                Quantity::parse(v).map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Quantity, E> {
                i64::try_from(v).map(Quantity::from_units).map_err(|_| E::custom("quantity too large"))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Quantity, E> {
                Ok(Quantity::from_units(v))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Quantity, E> {
                Quantity::parse(&v.to_string()).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn q(s: &str) -> Quantity {
        Quantity::parse(s).unwrap()
    }

    #[test]
    fn parses_and_prints_canonically() {
        for (input, printed) in [
            ("500m", "500m"),
            ("2Gi", "2Gi"),
            ("1.5Gi", "1536Mi"),
            ("0.5", "500m"),
            ("1500", "1500"),
            ("2000", "2k"),
            ("1.5k", "1500"),
            ("1024Ki", "1Mi"),
            ("1e3", "1e3"),
            ("1E6", "1e6"),
            ("0", "0"),
            ("-250m", "-250m"),
            ("1n", "1n"),
            ("0.1Ki", "102400m"),
            ("  4 ", "4"),
            ("+3", "3"),
        ] {
            assert_eq!(q(input).to_string(), printed, "input {input}");
        }
        assert_eq!(q("1Ki"), q("1024"));
        assert_eq!(q("100m").milli_ceil(), 100);
        assert_eq!(q("1n").milli_ceil(), 1);
        assert_eq!(q("1500m").units_ceil(), 2);
    }

    #[test]
    fn refuses_bad_input_with_reason() {
        for (input, reason) in [
            ("", "empty"),
            ("abc", "missing digits"),
            ("1.2.3", "more than one decimal point"),
            ("5Xi", "unknown suffix"),
            ("0.1n", "finer than one nano-unit"),
            ("99999999999999999999", "too large"),
            ("1e99", "exponent out of range"),
            ("1ex", "bad exponent"),
            ("m", "missing digits"),
        ] {
            let e = Quantity::parse(input).unwrap_err();
            assert_eq!(e.reason, reason, "input {input:?}");
        }
    }

    #[test]
    fn serde_round_trip() {
        let v: Quantity = serde_json::from_str("\"250m\"").unwrap();
        assert_eq!(serde_json::to_string(&v).unwrap(), "\"250m\"");
        let n: Quantity = serde_json::from_str("4").unwrap();
        assert_eq!(n, q("4"));
        assert!(serde_json::from_str::<Quantity>("\"4x\"").is_err());
    }

    proptest! {
        #[test]
        fn print_then_parse_is_identity(nanos in -(1i128 << 80)..(1i128 << 80), fmt in 0..3u8) {
            let format = [Format::DecimalSi, Format::BinarySi, Format::DecimalExponent][fmt as usize];
            let original = Quantity { nanos, format };
            let back = Quantity::parse(&original.to_string()).unwrap();
            prop_assert_eq!(back, original);
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,24}") {
            let _ = Quantity::parse(&s);
        }
    }
}
