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
