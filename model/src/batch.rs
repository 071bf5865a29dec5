//! What the dataflow hands its sink for each completed epoch: the changes to aggregates, the source
//! positions that produced them and the records that could not be decoded. A sink commits one batch (or
//! several, merged) atomically; that is what makes the pipeline exactly-once.

use serde::{Deserialize, Serialize};

use crate::aggregate::{Aggregate, AggregateKey};

/// A Kafka record that is not a valid event, kept with the reason (SPEC §2).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    pub payload: Vec<u8>,
    /// `MALFORMED_JSON: …` or `VALIDATION_FAILED: field: message; …`.
    pub reason: String,
}

/// Everything one or more completed epochs produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EpochBatch {
    /// The last epoch this batch completes.
    pub epoch: u64,
    /// Changes to add to the stored aggregates, at most one per key.
    pub aggregates: Vec<(AggregateKey, Aggregate)>,
    /// For each partition read, the offset of the next record to read.
    pub offsets: Vec<(i32, i64)>,
    pub dead_letters: Vec<DeadLetter>,
}

impl EpochBatch {
    pub fn is_empty(&self) -> bool {
        self.aggregates.is_empty() && self.offsets.is_empty() && self.dead_letters.is_empty()
    }

    /// Folds a later batch into this one: aggregate changes add up, offsets move forward.
    pub fn absorb(&mut self, later: EpochBatch) -> Result<(), crate::aggregate::Overflow> {
        self.epoch = self.epoch.max(later.epoch);
        self.aggregates.extend(later.aggregates);
        self.aggregates.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut merged: Vec<(AggregateKey, Aggregate)> = Vec::with_capacity(self.aggregates.len());
        for (key, agg) in self.aggregates.drain(..) {
            match merged.last_mut() {
                Some((last, acc)) if *last == key => acc.checked_add(&agg)?,
                _ => merged.push((key, agg)),
            }
        }
        merged.retain(|(_, agg)| !agg.is_zero());
        self.aggregates = merged;
        for (partition, next) in later.offsets {
            match self.offsets.iter_mut().find(|(p, _)| *p == partition) {
                Some((_, n)) => *n = (*n).max(next),
                None => self.offsets.push((partition, next)),
            }
        }
        self.dead_letters.extend(later.dead_letters);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal::Decimal;

    fn key(c: &str) -> AggregateKey {
        AggregateKey {
            customer_id: c.into(),
            meter: "m".into(),
            window_start: 0,
        }
    }

    #[test]
    fn absorbing_a_batch_adds_changes_per_key_and_keeps_the_furthest_offsets() {
        let mut a = EpochBatch {
            epoch: 1,
            aggregates: vec![(key("a"), Aggregate::of(Decimal::ONE))],
            offsets: vec![(0, 10), (1, 5)],
            dead_letters: vec![],
        };
        let b = EpochBatch {
            epoch: 2,
            aggregates: vec![
                (key("a"), Aggregate::of(Decimal::TWO)),
                (key("b"), Aggregate::of(Decimal::ONE)),
            ],
            offsets: vec![(0, 12)],
            dead_letters: vec![],
        };
        a.absorb(b).unwrap();
        assert_eq!(a.epoch, 2);
        assert_eq!(
            a.aggregates[0],
            (
                key("a"),
                Aggregate {
                    value: Decimal::from(3),
                    event_count: 2
                }
            )
        );
        assert_eq!(a.aggregates.len(), 2);
        assert_eq!(a.offsets, vec![(0, 12), (1, 5)]);
    }
}
