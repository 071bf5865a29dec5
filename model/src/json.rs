//! Exact decimals in JSON. Responses write a decimal as a JSON number with exactly its digits (serde_json's
//! `arbitrary_precision` keeps them); requests accept a number or a string, parsed without f64.

use rust_decimal::Decimal;
use serde::Serializer;
use std::str::FromStr;

/// The decimal as a JSON number with its exact digits.
pub fn decimal_number(d: &Decimal) -> serde_json::Number {
    // A Decimal's Display is always a valid JSON number ("-12.340"); zero stands in were it not.
    serde_json::Number::from_str(&d.to_string()).unwrap_or_else(|_| serde_json::Number::from(0))
}

/// `#[serde(serialize_with = "meterflow_model::json::serialize_decimal")]`
pub fn serialize_decimal<S: Serializer>(d: &Decimal, s: S) -> Result<S::Ok, S::Error> {
    serde::Serialize::serialize(&decimal_number(d), s)
}

/// Parses the digits of a JSON number or string exactly. Refuses NaN, infinities and anything a 96-bit
/// decimal cannot hold without rounding (more than 28 significant digits, or 1e400).
pub fn parse_decimal(text: &str) -> Result<Decimal, &'static str> {
    let text = text.trim();
    let numeric = |b: u8| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E');
    if text.is_empty() || !text.bytes().all(numeric) {
        let lower = text.to_ascii_lowercase();
        if lower.contains("nan") || lower.contains("inf") {
            return Err("must be finite");
        }
        return Err("must be a decimal number");
    }
    if text.bytes().any(|b| b == b'e' || b == b'E') {
        // `from_scientific` rounds a long mantissa; refuse it instead, as the plain form does.
        if significant_digits(text) > 28 {
            return Err("must be a decimal number with at most 28 significant digits");
        }
        Decimal::from_scientific(text)
            .map_err(|_| "is out of range or has more than 28 significant digits")
    } else {
        Decimal::from_str_exact(text)
            .map_err(|_| "must be a decimal number with at most 28 significant digits")
    }
}

/// The significant digits of a number's mantissa (`0.00120e5` has 3).
fn significant_digits(text: &str) -> usize {
    let mantissa = text.split(['e', 'E']).next().unwrap_or_default();
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    digits.trim_start_matches('0').trim_end_matches('0').len()
}

/// The largest value one event (or one property a meter reads) may carry: 10^20. Bounding the input
/// keeps sums of ordinary traffic far from the 96-bit decimal limit (7.9 × 10^28); a sum that still gets
/// there is quarantined by the pipeline, never a crash.
pub const MAX_EVENT_VALUE: Decimal = Decimal::from_parts(1_661_992_960, 1_808_227_885, 5, false, 0);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_round_trip_through_json_with_their_digits() {
        let d = Decimal::from_str("12345678901234567890.12345678").unwrap();
        let json = serde_json::to_string(&decimal_number(&d)).unwrap();
        assert_eq!(json, "12345678901234567890.12345678");
    }

    #[test]
    fn nan_infinity_and_huge_exponents_are_refused() {
        for bad in ["NaN", "Infinity", "-inf", "1e400", "", "abc", "1.2.3"] {
            assert!(parse_decimal(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn too_many_significant_digits_are_refused_rather_than_rounded() {
        assert!(parse_decimal("1.23456789012345678901234567891").is_err());
        assert_eq!(
            parse_decimal("1.5").unwrap(),
            Decimal::from_str("1.5").unwrap()
        );
        assert_eq!(parse_decimal("2E3").unwrap(), Decimal::from(2000));
        assert!(parse_decimal("1.23456789012345678901234567891e1").is_err());
        assert_eq!(
            parse_decimal("1.000000000000000000000000000000e2").unwrap(),
            Decimal::from(100)
        );
    }

    #[test]
    fn the_value_cap_is_ten_to_the_twentieth() {
        assert_eq!(
            MAX_EVENT_VALUE,
            Decimal::from_str("100000000000000000000").unwrap()
        );
    }
}
