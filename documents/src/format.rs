//! How amounts, quantities and dates read on an invoice, for both documents: amounts with exactly the
//! currency's minor-unit digits, thousands separators and the ISO code (`1,234.50 USD`, `−12.00 USD`);
//! quantities exact; dates in UTC, spelled out (`1 – 31 January 2024`).

use chrono::{DateTime, Datelike, NaiveDate};
use meterflow_model::money::{minor_unit_digits, round_to_minor_unit};
use rust_decimal::Decimal;

/// The minus sign (U+2212) of negative amounts and quantities; the PDF prints it as a hyphen.
pub(crate) const MINUS: char = '\u{2212}';

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// `1,234.50 USD`: rounded once more to the minor unit (a no-op on invoice amounts, which are already
/// rounded) and printed with exactly its digits (JPY 0, USD 2, KWD 3); `−12.00 USD` when negative.
pub fn money(amount: Decimal, currency: &str) -> String {
    let mut rounded = round_to_minor_unit(amount, currency);
    rounded.rescale(minor_unit_digits(currency));
    let mut out = grouped(rounded);
    out.push(' ');
    out.push_str(currency);
    out
}

/// A quantity exactly as measured, without trailing zeros, with thousands separators: `1,234,567.125`.
pub fn quantity(quantity: Decimal) -> String {
    grouped(quantity.normalize())
}

/// The digits of `value` as they stand, the integer part grouped by thousands, a leading `−` when
/// negative (never on zero).
fn grouped(value: Decimal) -> String {
    let digits = value.abs().to_string();
    let (int, frac) = match digits.split_once('.') {
        Some((int, frac)) => (int, Some(frac)),
        None => (digits.as_str(), None),
    };
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 8);
    if value.is_sign_negative() && !value.is_zero() {
        out.push(MINUS);
    }
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if let Some(frac) = frac {
        out.push('.');
        out.push_str(frac);
    }
    out
}

fn utc_date(secs: i64) -> Option<NaiveDate> {
    DateTime::from_timestamp(secs, 0).map(|t| t.date_naive())
}

fn month(date: NaiveDate) -> &'static str {
    MONTHS[date.month0() as usize]
}

/// `5 February 2024`.
fn long_date(date: NaiveDate) -> String {
    format!("{} {} {}", date.day(), month(date), date.year())
}

/// The day of a UTC instant in seconds since the epoch: `5 February 2024`.
pub fn day(secs: i64) -> String {
    utc_date(secs).map_or_else(|| format!("{secs} s after the epoch"), long_date)
}

/// The day of a UTC instant in microseconds since the epoch.
pub fn day_micros(micros: i64) -> String {
    day(micros.div_euclid(1_000_000))
}

/// A half-open period `[start, end)` as the days it covers, its last day being the one before `end`:
/// `1 – 31 January 2024`, `15 January – 14 February 2024`, `15 December 2023 – 14 January 2024`, or one
/// day alone.
pub fn period(start: i64, end: i64) -> String {
    let (Some(first), Some(last)) = (utc_date(start), utc_date(end.saturating_sub(1).max(start)))
    else {
        return format!("{start} – {end} (seconds after the epoch)");
    };
    if first == last {
        long_date(first)
    } else if first.year() != last.year() {
        format!("{} – {}", long_date(first), long_date(last))
    } else if first.month() != last.month() {
        format!("{} {} – {}", first.day(), month(first), long_date(last))
    } else {
        format!("{} – {}", first.day(), long_date(last))
    }
}

/// The period an adjustment corrects, known by its start: a calendar month (`January 2024`) when it
/// starts at midnight on the first, else `from 15 January 2024`.
pub fn period_from(start: i64) -> String {
    match utc_date(start) {
        Some(date) if date.day() == 1 && start.rem_euclid(86_400) == 0 => {
            format!("{} {}", month(date), date.year())
        }
        Some(date) => format!("from {}", long_date(date)),
        None => day(start),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    /// 2024-01-01T00:00:00Z.
    const JANUARY: i64 = 1_704_067_200;
    const DAY: i64 = 86_400;

    #[test]
    fn amounts_show_exactly_the_minor_unit_digits_of_their_currency() {
        assert_eq!(money(d("1234.5"), "USD"), "1,234.50 USD");
        assert_eq!(money(d("5"), "USD"), "5.00 USD");
        assert_eq!(money(d("0"), "USD"), "0.00 USD");
        assert_eq!(money(d("1234567"), "JPY"), "1,234,567 JPY");
        assert_eq!(money(d("1234.5"), "JPY"), "1,235 JPY");
        assert_eq!(money(d("12.5"), "KWD"), "12.500 KWD");
        assert_eq!(money(d("1000.0005"), "KWD"), "1,000.001 KWD");
        assert_eq!(money(d("999.999"), "USD"), "1,000.00 USD");
    }

    #[test]
    fn negative_amounts_take_a_minus_sign_and_zero_never_does() {
        assert_eq!(money(d("-12"), "USD"), "\u{2212}12.00 USD");
        assert_eq!(money(d("-1234567.891"), "KWD"), "\u{2212}1,234,567.891 KWD");
        assert_eq!(money(d("-0.001"), "USD"), "0.00 USD");
        assert_eq!(money(d("-0"), "JPY"), "0 JPY");
        assert_eq!(money(d("-7"), "JPY"), "\u{2212}7 JPY");
    }

    #[test]
    fn quantities_are_exact_without_trailing_zeros() {
        assert_eq!(quantity(d("1234567.1250")), "1,234,567.125");
        assert_eq!(quantity(d("1000.000")), "1,000");
        assert_eq!(quantity(d("0.0000001")), "0.0000001");
        assert_eq!(quantity(d("999")), "999");
        assert_eq!(quantity(d("-1500")), "\u{2212}1,500");
        assert_eq!(quantity(d("0.000")), "0");
    }

    #[test]
    fn a_period_shows_its_last_day_not_its_exclusive_end() {
        assert_eq!(period(JANUARY, JANUARY + 31 * DAY), "1 – 31 January 2024");
        assert_eq!(
            period(JANUARY + 14 * DAY, JANUARY + 45 * DAY),
            "15 January – 14 February 2024"
        );
        assert_eq!(
            period(JANUARY - 17 * DAY, JANUARY + 14 * DAY),
            "15 December 2023 – 14 January 2024"
        );
        assert_eq!(period(JANUARY, JANUARY + DAY), "1 January 2024");
        // An end inside a day includes that day.
        assert_eq!(period(JANUARY, JANUARY + DAY + 3600), "1 – 2 January 2024");
    }

    #[test]
    fn dates_are_utc_days_spelled_out() {
        assert_eq!(day(JANUARY + 35 * DAY - 1), "4 February 2024");
        assert_eq!(
            day_micros((JANUARY + 35 * DAY) * 1_000_000 + 5),
            "5 February 2024"
        );
        assert_eq!(period_from(JANUARY), "January 2024");
        assert_eq!(period_from(JANUARY + 14 * DAY), "from 15 January 2024");
    }
}
