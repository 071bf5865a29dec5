//! [`Usage`]: the default meter's aggregate as a differential-dataflow difference. Because sums and counts
//! form a group, an event is simply the update `(key, Usage(value, 1))`; consolidation adds them up per key
//! and epoch with no per-key state kept between epochs.

use differential_dataflow::difference::{Abelian, IsZero, Monoid, Semigroup};
use meterflow_model::Aggregate;
use serde::{Deserialize, Serialize};

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Usage(pub Aggregate);

impl IsZero for Usage {
    fn is_zero(&self) -> bool {
        self.0.is_zero()
    }
}

impl Semigroup for Usage {
    fn plus_equals(&mut self, rhs: &Self) {
        // Validation caps each value at 28 significant digits; a sum past 7.9e28 within one key is a
        // broken invariant of the input domain, not a runtime condition we can represent.
        self.0
            .checked_add(&rhs.0)
            .expect("usage sum exceeds the 96-bit decimal range");
    }
}

impl Monoid for Usage {
    fn zero() -> Self {
        Usage(Aggregate::default())
    }
}

impl Abelian for Usage {
    fn negate(&mut self) {
        self.0.value = -self.0.value;
        self.0.event_count = -self.0.event_count;
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
        self.windows += rhs.windows;
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
        self.windows = -self.windows;
    }
}
