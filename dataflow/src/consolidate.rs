//! [`per_epoch`]: adds up a stream's updates per record and epoch in a hash table, without
//! differential's `consolidate` (which sorts and merges every update, and builds a batch to read out).
//!
//! ```text
//!  (record, epoch, diff) ──exchange by record──► table[epoch]: record → Σ diff
//!            the input frontier passes the epoch ──► (record, epoch, Σ diff) for each non-zero sum
//! ```
//! Exchange contract: every update of a record goes to the worker its hash picks (differential's
//! `Hashable`, the same in every process), so within an epoch a record leaves once, from one worker,
//! with the sum of all its updates; a sum of zero does not leave. The output is in no order.
//!
//! Epochs are totally ordered and nothing here is kept between epochs, which is what lets a hash table
//! stand in for an arrangement: the pipeline's row changes and quarantines need the sum per epoch
//! only (operators.rs). Invoice lines need no table: rating adds up each period's (rating.rs).

use std::collections::BTreeMap;
use std::hash::Hash;

use differential_dataflow::difference::Semigroup;
use differential_dataflow::hashable::Hashable;
use differential_dataflow::ExchangeData;
use hashbrown::hash_map::Entry;
use hashbrown::HashMap;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::StreamVec;

use crate::operators::Epoch;

/// Sums `updates` per record and epoch: at most one update per record and epoch leaves, once the
/// input has passed the epoch (see the module docs).
pub fn per_epoch<'scope, D, R>(
    updates: StreamVec<'scope, Epoch, (D, Epoch, R)>,
    name: &str,
) -> StreamVec<'scope, Epoch, (D, Epoch, R)>
where
    D: ExchangeData + Hash + Eq,
    R: ExchangeData + Semigroup,
{
    updates.unary_frontier::<CapacityContainerBuilder<Vec<(D, Epoch, R)>>, _, _, _>(
        Exchange::new(|(record, _, _): &(D, Epoch, R)| record.hashed()),
        name,
        |_cap, _info| {
            let mut open: BTreeMap<Epoch, (Capability<Epoch>, HashMap<D, R>)> = BTreeMap::new();
            // How many records the last epoch summed: the next epoch's table starts that large, so
            // it does not grow (and rehash every record) step by step.
            let mut last_len = 0;
            move |(input, frontier), output| {
                input.for_each_stamp(|cap, data| {
                    // Epochs are totally ordered: a stamp always has a least time.
                    let Some(&least) = cap.least() else {
                        return;
                    };
                    for batch in data {
                        for (record, epoch, diff) in batch.drain(..) {
                            // The epoch in the data, never before its message's: differential may
                            // send a later epoch's updates under an earlier capability.
                            let held = epoch.max(least);
                            let (_, sums) = open.entry(epoch).or_insert_with(|| {
                                let sums = HashMap::with_capacity(last_len);
                                (cap.delayed(&held, output.output_index()), sums)
                            });
                            add(sums, record, diff);
                        }
                    }
                });
                while let Some(entry) = open.first_entry() {
                    if frontier.less_equal(entry.key()) {
                        break;
                    }
                    let (epoch, (cap, sums)) = entry.remove_entry();
                    last_len = sums.len();
                    let mut session = output.session(&cap);
                    session.give_iterator(
                        sums.into_iter()
                            .filter(|(_, diff)| !diff.is_zero())
                            .map(|(record, diff)| (record, epoch, diff)),
                    );
                }
            }
        },
    )
}

fn add<D: Hash + Eq, R: Semigroup>(sums: &mut HashMap<D, R>, record: D, diff: R) {
    match sums.entry(record) {
        Entry::Occupied(mut sum) => sum.get_mut().plus_equals(&diff),
        Entry::Vacant(slot) => {
            slot.insert(diff);
        }
    }
}

#[cfg(test)]
mod tests {
    use timely::dataflow::operators::capture::Extract;
    use timely::dataflow::operators::vec::ToStream;
    use timely::dataflow::operators::Capture;

    use super::*;

    /// An epoch's updates of one record leave as one sum; a sum of zero does not leave; each epoch
    /// is summed apart.
    #[test]
    fn sums_each_record_per_epoch_and_drops_zeros() {
        let receiver = timely::example(|scope| {
            let updates = [
                ("a", 0, 1isize),
                ("b", 0, 2),
                ("a", 0, 3),
                ("b", 0, -2),
                ("a", 1, 5),
            ]
            .map(|(record, epoch, diff)| (record.to_string(), epoch as Epoch, diff))
            .to_stream(scope);
            per_epoch(updates, "Test").capture()
        });
        let mut got: Vec<_> = receiver
            .extract()
            .into_iter()
            .flat_map(|(_, d)| d)
            .collect();
        got.sort();
        assert_eq!(got, vec![("a".to_string(), 0, 4), ("a".to_string(), 1, 5)]);
    }
}
