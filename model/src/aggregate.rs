//! The default meter (SPEC §4): per customer, event type and hourly window, the sum of `value` and the
//! number of events. [`Aggregate`] is a commutative group, so it can serve directly as a differential
//! dataflow difference: an event contributes `(key, Aggregate::of(value))`, a retraction its negation.

use compact_str::CompactString;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::dimensions::Dimensions;
use crate::event::Event;

/// Which aggregate row an event contributes to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AggregateKey {
    pub customer_id: CompactString,
    pub meter: CompactString,
    /// The window's values of the meter's `group_by` keys (`{}` without): part of the key, so each
    /// value has its own windows (issue 17, `docs/dimensions.md`).
    pub dimensions: Dimensions,
    /// Window start, seconds since the epoch (UTC).
    pub window_start: i64,
    /// Window end (exclusive), seconds since the epoch: the start plus the meter's window length.
    pub window_end: i64,
}

impl AggregateKey {
    /// The default meter's key for `event`: the meter is named after the event type, hourly windows.
    pub fn default_meter(event: &Event) -> Self {
        crate::meter::Meter::default_for(&event.event_type).key(event)
    }
}

/// Sum of values and count of events. Adding two aggregates adds both parts.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Aggregate {
    pub value: Decimal,
    pub event_count: i64,
}

impl Aggregate {
    /// One event of the given value.
    pub fn of(value: Decimal) -> Self {
        Aggregate {
            value,
            event_count: 1,
        }
    }

    /// `self += other`, or an error when the sum leaves the range of a 96-bit decimal.
    pub fn checked_add(&mut self, other: &Aggregate) -> Result<(), Overflow> {
        self.value = self.value.checked_add(other.value).ok_or(Overflow)?;
        self.event_count = self
            .event_count
            .checked_add(other.event_count)
            .ok_or(Overflow)?;
        Ok(())
    }

    pub fn is_zero(&self) -> bool {
        self.value.is_zero() && self.event_count == 0
    }
}

/// A sum left the range of `rust_decimal::Decimal` (about 7.9 × 10²⁸).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an aggregate overflowed the 96-bit decimal range")]
pub struct Overflow;

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn aggregates_add_both_parts_exactly() {
        let mut a = Aggregate::of(Decimal::from_str("0.1").unwrap());
        a.checked_add(&Aggregate::of(Decimal::from_str("0.2").unwrap()))
            .unwrap();
        assert_eq!(a.value, Decimal::from_str("0.3").unwrap());
        assert_eq!(a.event_count, 2);
    }

    #[test]
    fn overflow_is_an_error_not_a_panic() {
        let mut a = Aggregate::of(Decimal::MAX);
        assert_eq!(a.checked_add(&Aggregate::of(Decimal::MAX)), Err(Overflow));
    }
}
