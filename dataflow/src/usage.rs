//! [`Usage`]: a row's aggregate as a differential-dataflow difference. Because sums and counts form a
//! group, an event is simply the update `(key, Usage::of(value, 1))`; consolidation adds them up per key
//! and epoch with no per-key state kept between epochs.
//!
//! Overflow is data, not a crash (issue 13): a sum that leaves the 96-bit decimal range does not panic.
//! `plus_equals` cannot return an error, so the sum becomes *overflowed*, a sticky state: its value is
//! unknown (kept as 0), its event count still adds up, and anything added to it or negated stays
//! overflowed, so it never consolidates away. Downstream an overflowed row is quarantined: the sink
//! marks it (`aggregations.quarantined`, its value frozen at the last value in range) and rating gives
//! its period no charge from that window on, but records the period in `rating_quarantine` (rating.rs),
//! so nothing is withdrawn silently. Every other row, window and customer is unaffected.

use differential_dataflow::difference::{Abelian, IsZero, Monoid, Semigroup};
use meterflow_model::Aggregate;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// A row's sum and count, or (sticky) the fact that its sum overflowed.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Usage {
    pub aggregate: Aggregate,
    /// The sum left the decimal range; `aggregate.value` is then 0 and means nothing.
    pub overflowed: bool,
}

impl Usage {
    pub fn of(aggregate: Aggregate) -> Self {
        Usage {
            aggregate,
            overflowed: false,
        }
    }

    /// A row whose stored value is known to have overflowed (restored from a quarantined row).
    pub fn overflowed(event_count: i64) -> Self {
        Usage {
            aggregate: Aggregate {
                value: Decimal::ZERO,
                event_count,
            },
            overflowed: true,
        }
    }
}

impl IsZero for Usage {
    fn is_zero(&self) -> bool {
        !self.overflowed && self.aggregate.is_zero()
    }
}

impl Semigroup for Usage {
    fn plus_equals(&mut self, rhs: &Self) {
        let count = self
            .aggregate
            .event_count
            .checked_add(rhs.aggregate.event_count);
        let value = self.aggregate.value.checked_add(rhs.aggregate.value);
        match (self.overflowed || rhs.overflowed, value, count) {
            (false, Some(value), Some(count)) => {
                self.aggregate = Aggregate {
                    value,
                    event_count: count,
                }
            }
            _ => {
                *self = Usage::overflowed(
                    self.aggregate
                        .event_count
                        .saturating_add(rhs.aggregate.event_count),
                )
            }
        }
    }
}

impl Monoid for Usage {
    fn zero() -> Self {
        Usage::default()
    }
}

impl Abelian for Usage {
    fn negate(&mut self) {
        self.aggregate.value = -self.aggregate.value;
        self.aggregate.event_count = self.aggregate.event_count.saturating_neg();
    }
}

/// An upcoming-invoice line's total as a differential difference: the sum of its windows' charges
/// (amount and quantity) and how many windows it has. A window charge `c` contributes
/// `LineTotal(c.amount, c.quantity, 1)`, its withdrawal the negation.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct LineTotal {
    pub amount: rust_decimal::Decimal,
    pub quantity: rust_decimal::Decimal,
    pub windows: i64,
}

impl IsZero for LineTotal {
    fn is_zero(&self) -> bool {
        self.windows == 0 && self.amount.is_zero() && self.quantity.is_zero()
    }
}

impl Semigroup for LineTotal {
    fn plus_equals(&mut self, rhs: &Self) {
        // Each charge was computed without overflow; a sum past 7.9e28 saturates (and is logged)
        // rather than panicking a worker.
        self.amount = self.amount.checked_add(rhs.amount).unwrap_or_else(|| {
            tracing::error!("an upcoming-invoice line total saturated the decimal range");
            self.amount.saturating_add(rhs.amount)
        });
        self.quantity = self.quantity.checked_add(rhs.quantity).unwrap_or_else(|| {
            tracing::error!("an upcoming-invoice line quantity saturated the decimal range");
            self.quantity.saturating_add(rhs.quantity)
        });
        self.windows = self.windows.saturating_add(rhs.windows);
    }
}

impl Monoid for LineTotal {
    fn zero() -> Self {
        LineTotal::default()
    }
}

impl Abelian for LineTotal {
    fn negate(&mut self) {
        self.amount = -self.amount;
        self.quantity = -self.quantity;
        self.windows = self.windows.saturating_neg();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn usage(value: &str) -> Usage {
        Usage::of(Aggregate::of(Decimal::from_str(value).unwrap()))
    }

    /// Finding 3: ten events of 28 nines in one window used to panic a worker, for good.
    #[test]
    fn finding_03_a_sum_past_the_decimal_range_is_overflowed_not_a_panic() {
        let mut sum = Usage::zero();
        for _ in 0..10 {
            sum.plus_equals(&usage("9999999999999999999999999999"));
        }
        assert!(sum.overflowed);
        assert_eq!(sum.aggregate.event_count, 10);
        assert!(!sum.is_zero(), "an overflowed sum never consolidates away");
        // Sticky: what is added to it or taken from it leaves it overflowed.
        let mut back = sum;
        back.negate();
        sum.plus_equals(&back);
        assert!(sum.overflowed && !sum.is_zero());
        assert_eq!(sum.aggregate.event_count, 0);
    }

    #[test]
    fn sums_in_range_add_exactly_and_cancel() {
        let mut sum = usage("1.5");
        sum.plus_equals(&usage("2.25"));
        assert_eq!(sum.aggregate.value, Decimal::from_str("3.75").unwrap());
        let mut back = sum;
        back.negate();
        sum.plus_equals(&back);
        assert!(sum.is_zero());
    }
}
