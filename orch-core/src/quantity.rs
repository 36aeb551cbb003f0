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
/// The text form is an optional sign, decimal digits with at most one decimal point (any
/// number of digits, leading and trailing zeros included), then an optional suffix: a decimal
/// one (`n u m k M G T P E`), a binary one (`Ki Mi Gi Ti Pi Ei`) or an exponent (`e3`, `E-6`).
/// Surrounding whitespace is ignored.
///
/// Parsing is exact and never rounds: a value that is not a whole number of nano-units
/// (`0.1n`) is refused as "finer than one nano-unit", one beyond `i64::MAX` units as "too
/// large", and everything between is accepted however it is written (`0.1` followed by forty
/// zeros is `100m`). Printing picks the largest suffix of the parsed family that represents the value
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
        let (exp10, exp2, format): (i64, u32, Format) = match suffix {
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
                (parse_exponent(&other[1..]).ok_or_else(|| err("bad exponent"))?, 0, Format::DecimalExponent)
            }
            _ => return Err(err("unknown suffix")),
        };
        let nanos = scale_to_nanos(int_part, frac_part, exp10, exp2).map_err(err)?;
        Ok(Quantity { nanos: if negative { -nanos } else { nanos }, format })
    }
}

/// The exponent of `1e3`-style text: an optional sign and at least one digit. Its magnitude
/// saturates far beyond any exponent a value that fits can need (with a non-zero mantissa the
/// value is then too large or too fine whatever the exact exponent was; with a zero one, zero).
fn parse_exponent(text: &str) -> Option<i64> {
    let (negative, digits) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let magnitude = digits.bytes().fold(0i64, |e, b| (e * 10 + i64::from(b - b'0')).min(1 << 40));
    Some(if negative { -magnitude } else { magnitude })
}

/// Converts `int_part.frac_part * 10^exp10 * 1024^exp2` (ASCII digits) to nano-units exactly.
///
/// Works on the significant digits only: leading zeros change nothing and trailing zeros only
/// move the exponent, so any number of either is accepted, and the refusals are exact: "too
/// large" only for a value beyond `i64::MAX` units, "finer than one nano-unit" only for one that
/// is not a whole number of nano-units.
fn scale_to_nanos(int_part: &str, frac_part: &str, exp10: i64, exp2: u32) -> Result<i128, &'static str> {
    const TOO_LARGE: &str = "too large";
    const TOO_FINE: &str = "finer than one nano-unit";
    let limit = MAX_UNITS * NANO;
    let digits = || int_part.bytes().chain(frac_part.bytes());
    let total = int_part.len() + frac_part.len();
    let leading = digits().take_while(|&b| b == b'0').count();
    if leading == total {
        return Ok(0);
    }
    let trailing = digits().rev().take_while(|&b| b == b'0').count();
    let significant = || digits().skip(leading).take(total - leading - trailing);
    let len = i64::try_from(total - leading - trailing).unwrap_or(i64::MAX);
    let frac_len = i64::try_from(frac_part.len()).unwrap_or(i64::MAX);
    let trailing = i64::try_from(trailing).unwrap_or(i64::MAX);
    // nanos = significant * 10^shift * 1024^exp2
    let shift = exp10.saturating_sub(frac_len).saturating_add(trailing).saturating_add(9);
    if shift >= 0 {
        // The value is at least 10^(len - 1 + shift); the limit is below 10^28.
        if len.saturating_sub(1).saturating_add(shift) >= 28 {
            return Err(TOO_LARGE);
        }
        let mut nanos = significant().fold(0i128, |n, b| n * 10 + i128::from(b - b'0'));
        nanos = nanos.checked_mul(10i128.pow(shift as u32)).ok_or(TOO_LARGE)?;
        nanos = nanos.checked_mul(1i128 << (10 * exp2)).ok_or(TOO_LARGE)?;
        return if nanos > limit { Err(TOO_LARGE) } else { Ok(nanos) };
    }
    // nanos = significant * 2^(10 exp2) / 10^k = significant / 5^k * 2^(10 exp2 - k). The last
    // significant digit is not 0, so `significant` is not divisible by both 2 and 5: a whole
    // result needs k <= 10 exp2 (at most 60), and then the result is at least
    // significant / 10^60, so more than 88 significant digits cannot fit.
    let k = shift.unsigned_abs();
    if k > u64::from(10 * exp2) {
        return Err(TOO_FINE);
    }
    if len > 88 {
        return Err(TOO_LARGE);
    }
    let mut buf = [0u8; 88];
    let buf = &mut buf[..len as usize];
    for (slot, b) in buf.iter_mut().zip(significant()) {
        *slot = b - b'0';
    }
    for _ in 0..k {
        let mut rem = 0u8;
        for d in buf.iter_mut() {
            let cur = rem * 10 + *d;
            *d = cur / 5;
            rem = cur % 5;
        }
        if rem != 0 {
            return Err(TOO_FINE);
        }
    }
    let quotient = &buf[buf.iter().take_while(|&&d| d == 0).count()..];
    if quotient.len() > 28 {
        return Err(TOO_LARGE);
    }
    let mut nanos = quotient.iter().fold(0i128, |n, &d| n * 10 + i128::from(d));
    nanos = nanos.checked_mul(1i128 << (u64::from(10 * exp2) - k)).ok_or(TOO_LARGE)?;
    if nanos > limit { Err(TOO_LARGE) } else { Ok(nanos) }
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

    /// Suffix, power of two and power of ten it stands for (`e` is an exponent, chosen apart).
    const SUFFIXES: [(&str, u32, i32); 17] = [
        ("", 0, 0),
        ("n", 0, -9),
        ("u", 0, -6),
        ("m", 0, -3),
        ("k", 0, 3),
        ("M", 0, 6),
        ("G", 0, 9),
        ("T", 0, 12),
        ("P", 0, 15),
        ("E", 0, 18),
        ("Ki", 10, 0),
        ("Mi", 20, 0),
        ("Gi", 30, 0),
        ("Ti", 40, 0),
        ("Pi", 50, 0),
        ("Ei", 60, 0),
        ("e", 0, 0),
    ];

    /// `n / (2^pow2 * 10^pow10)` as exact decimal digits (integer part, fraction part), by long
    /// division: every such fraction ends.
    fn exact_decimal(n: u128, pow2: u32, pow10: i32) -> (String, String) {
        let d = 1u128 << pow2;
        let mut int = (n / d).to_string();
        let mut frac = String::new();
        let mut r = n % d;
        while r != 0 {
            r *= 10;
            frac.push(char::from(b'0' + (r / d) as u8));
            r %= d;
        }
        // Move the decimal point `pow10` places left (right when negative).
        if pow10 >= 0 {
            let k = pow10 as usize;
            if int.len() <= k {
                int = format!("{}{int}", "0".repeat(k + 1 - int.len()));
            }
            let (i, f) = int.split_at(int.len() - k);
            (i.to_string(), format!("{f}{frac}"))
        } else {
            let k = pow10.unsigned_abs() as usize;
            if frac.len() < k {
                frac.push_str(&"0".repeat(k - frac.len()));
            }
            let (f1, f2) = frac.split_at(k);
            (format!("{int}{f1}"), f2.to_string())
        }
    }

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
            ("9223372036854775808", "too large"),
            ("1e99", "too large"),
            ("1e-99", "finer than one nano-unit"),
            ("0.5e-9", "finer than one nano-unit"),
            ("1e", "bad exponent"),
            ("1e+", "bad exponent"),
            ("1ex", "bad exponent"),
            ("m", "missing digits"),
        ] {
            let e = Quantity::parse(input).unwrap_err();
            assert_eq!(e.reason, reason, "input {input:?}");
        }
    }

    #[test]
    fn any_number_of_digits_is_read_exactly() {
        let tenth = format!("0.1{}", "0".repeat(39));
        assert_eq!(q(&tenth), q("100m"));
        assert_eq!(q(&format!("{}1", "0".repeat(60))), q("1"));
        assert_eq!(q(&format!("{}.{}Ki", "0".repeat(50), "0".repeat(50))), Quantity::ZERO);
        assert_eq!(q(&format!("1{}e-40", "0".repeat(40))), q("1"));
        assert_eq!(q("0.000000001"), q("1n"));
        assert_eq!(q("9223372036854775807"), Quantity::from_units(i64::MAX));
        assert_eq!(q("-9223372036854775807"), Quantity::from_units(-i64::MAX));
        assert_eq!(q("0e99999999999999999999"), Quantity::ZERO);
        // 2^-60 Ei is one unit: 60 fraction digits, all significant.
        assert_eq!(q("0.000000000000000000867361737988403547205962240695953369140625Ei"), q("1"));
        assert_eq!(q("0.0009765625Ki"), q("1"));
        assert_eq!(Quantity::parse("0.00097656251Ki").unwrap_err().reason, "finer than one nano-unit");
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

        /// Any decimal text of a value that fits, whatever its digit count, leading and trailing
        /// zeros, sign and suffix, parses to exactly that value.
        #[test]
        fn every_spelling_of_a_value_parses_exactly(
            nanos in prop_oneof![
                -(MAX_UNITS * NANO)..=(MAX_UNITS * NANO),
                -1_000_000_000_000i128..1_000_000_000_000,
                Just(MAX_UNITS * NANO),
                Just(-MAX_UNITS * NANO),
            ],
            suffix in 0..SUFFIXES.len(),
            exponent in -45i32..45,
            leading in 0..40usize,
            trailing in 0..40usize,
            plus in any::<bool>(),
        ) {
            let (name, pow2, pow10) = SUFFIXES[suffix];
            let (name, pow10) = if name == "e" { (format!("e{exponent}"), exponent) } else { (name.to_string(), pow10) };
            // The text's number is nanos / (2^pow2 * 10^(pow10 + 9)).
            let (int, frac) = exact_decimal(nanos.unsigned_abs(), pow2, pow10 + 9);
            let frac = format!("{frac}{}", "0".repeat(trailing));
            let sign = if nanos < 0 { "-" } else if plus { "+" } else { "" };
            let text = format!("{sign}{}{int}.{frac}{name}", "0".repeat(leading));
            let parsed = Quantity::parse(&text);
            prop_assert_eq!(parsed.as_ref().map(Quantity::nanos), Ok(nanos), "{}", text);
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,24}") {
            let _ = Quantity::parse(&s);
        }
    }
}
