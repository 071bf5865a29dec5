//! Money (SPEC §5): amounts are `rust_decimal::Decimal`, kept unrounded through rating; arithmetic is
//! checked (an overflow is a [`MoneyError`], never a panic); rounding happens once, on invoice lines, to
//! the currency's ISO 4217 minor unit, half away from zero, through [`round_to_minor_unit`].

use rust_decimal::{Decimal, RoundingStrategy};

/// An amount or quantity left the range of a 96-bit decimal (about 7.9 × 10²⁸).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("an amount overflowed the 96-bit decimal range")]
pub struct MoneyError;

/// `a + b`, or an error on overflow.
pub fn add(a: Decimal, b: Decimal) -> Result<Decimal, MoneyError> {
    a.checked_add(b).ok_or(MoneyError)
}

/// `a − b`, or an error on overflow.
pub fn sub(a: Decimal, b: Decimal) -> Result<Decimal, MoneyError> {
    a.checked_sub(b).ok_or(MoneyError)
}

/// `a × b`, or an error on overflow. A product with more than 28 fractional digits is rounded to 28
/// (rust_decimal's precision), which is far below any currency's minor unit.
pub fn mul(a: Decimal, b: Decimal) -> Result<Decimal, MoneyError> {
    a.checked_mul(b).ok_or(MoneyError)
}

/// ISO 4217 currencies whose minor unit is not two digits (the active codes of the standard).
const ZERO_DIGITS: &[&str] = &[
    "BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI", "VND",
    "VUV", "XAF", "XOF", "XPF",
];
const THREE_DIGITS: &[&str] = &["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"];
const FOUR_DIGITS: &[&str] = &["CLF", "UYW"];

/// Active ISO 4217 codes (2024), alphabetical.
const CODES: &str = "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BOV \
BRL BSD BTN BWP BYN BZD CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN \
ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES \
KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN \
MXV MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG \
SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD USN UYI UYU \
UYW UZS VED VES VND VUV WST XAF XCD XOF XPF YER ZAR ZMW ZWG";

/// Is `code` an active ISO 4217 currency code (upper case, as the standard writes it)?
pub fn is_currency(code: &str) -> bool {
    code.len() == 3 && CODES.split_ascii_whitespace().any(|c| c == code)
}

/// The number of digits of the currency's minor unit (JPY 0, USD 2, KWD 3); 2 for unknown codes.
pub fn minor_unit_digits(currency: &str) -> u32 {
    if ZERO_DIGITS.contains(&currency) {
        0
    } else if THREE_DIGITS.contains(&currency) {
        3
    } else if FOUR_DIGITS.contains(&currency) {
        4
    } else {
        2
    }
}

/// The one rounding of money: to the currency's minor unit, half away from zero. Used on invoice lines
/// only; charges stay unrounded.
pub fn round_to_minor_unit(amount: Decimal, currency: &str) -> Decimal {
    amount.round_dp_with_strategy(
        minor_unit_digits(currency),
        RoundingStrategy::MidpointAwayFromZero,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn rounding_follows_the_minor_unit_half_away_from_zero() {
        assert_eq!(round_to_minor_unit(d("1.005"), "USD"), d("1.01"));
        assert_eq!(round_to_minor_unit(d("-1.005"), "USD"), d("-1.01"));
        assert_eq!(round_to_minor_unit(d("2.5"), "JPY"), d("3"));
        assert_eq!(round_to_minor_unit(d("1.0005"), "KWD"), d("1.001"));
        assert_eq!(round_to_minor_unit(d("1.004"), "USD"), d("1.00"));
    }

    #[test]
    fn overflow_is_an_error_not_a_panic() {
        assert_eq!(mul(Decimal::MAX, d("2")), Err(MoneyError));
        assert_eq!(add(Decimal::MAX, Decimal::ONE), Err(MoneyError));
        assert_eq!(sub(Decimal::MIN, Decimal::ONE), Err(MoneyError));
    }

    #[test]
    fn currencies_are_iso_4217_codes() {
        assert!(is_currency("USD") && is_currency("JPY") && is_currency("KWD"));
        assert!(!is_currency("usd") && !is_currency("XYZ") && !is_currency("US"));
    }
}
