//! `commit_epochs`: the hand-over from the dataflow to the sink.
//!
//! ```text
//!  SinkUpdate (all workers) ──exchange: everything to worker 0──► stash per epoch
//!        frontier passes e ──► EpochBatch(e) ──bounded channel──► sink thread ──COMMIT──► ack(e)
//!        output capability for e is held until ack(e) ──► probe: workers read no further ahead
//! ```
//! Exchange contract: a sink commits results and source offsets of all workers in one transaction, so
//! every update goes to worker 0 (after per-key consolidation there is at most one change per key and
//! epoch, so this is small). Holding the output capability until the sink acknowledges makes the sink's
//! progress visible to every worker's probe, in every process: that is the pipeline's backpressure.

use std::collections::BTreeMap;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use meterflow_model::{Aggregate, AggregateKey, DeadLetter, EpochBatch};
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::StreamVec;

use crate::operators::Epoch;

/// One thing the sink must store for an epoch.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SinkUpdate {
    /// Add this change to the aggregate row of the key.
    Aggregate(AggregateKey, Aggregate),
    /// Records of this partition before this offset are reflected: `(partition, next_offset)`.
    Offset(i32, i64),
    DeadLetter(DeadLetter),
}

/// The sink's end of the hand-over, given to worker 0 only.
pub struct SinkChannels {
    /// Completed epochs, in order.
    pub batches: Sender<EpochBatch>,
    /// The sink's acknowledgements: every epoch up to this one is committed.
    pub acks: Receiver<Epoch>,
}

/// Gathers each completed epoch on worker 0 and hands it to the sink; the output (empty data) holds each
/// epoch open until the sink has committed it.
pub fn commit_epochs<'scope>(
    updates: StreamVec<'scope, Epoch, (Epoch, SinkUpdate)>,
    sink: Option<SinkChannels>,
) -> StreamVec<'scope, Epoch, ()> {
    let scope = updates.scope();
    updates.unary_frontier::<CapacityContainerBuilder<Vec<()>>, _, _, _>(
        Exchange::new(|_: &(Epoch, SinkUpdate)| 0u64),
        "CommitEpochs",
        move |_cap, info| {
            let activator = scope.activator_for(info.address);
            let mut stash: BTreeMap<Epoch, (Capability<Epoch>, EpochBatch)> = BTreeMap::new();
            let mut in_flight: BTreeMap<Epoch, Capability<Epoch>> = BTreeMap::new();
            move |(input, frontier), output| {
                // Stash by the epoch in the data: differential may deliver an epoch's updates under the
                // capability of an earlier one.
                input.for_each_stamp(|cap, data| {
                    for batch in data {
                        for (epoch, update) in batch.drain(..) {
                            let entry = stash.entry(epoch).or_insert_with(|| {
                                let held = cap.delayed(&epoch, output.output_index());
                                (
                                    held,
                                    EpochBatch {
                                        epoch,
                                        ..EpochBatch::default()
                                    },
                                )
                            });
                            match update {
                                SinkUpdate::Aggregate(key, agg) => {
                                    entry.1.aggregates.push((key, agg))
                                }
                                SinkUpdate::Offset(p, next) => entry.1.offsets.push((p, next)),
                                SinkUpdate::DeadLetter(d) => entry.1.dead_letters.push(d),
                            }
                        }
                    }
                });
                let Some(sink) = &sink else {
                    stash.clear(); // only worker 0 receives updates; nothing to hold elsewhere.
                    return;
                };
                // Hand over completed epochs in order, as long as the sink's channel has room.
                while let Some(entry) = stash.first_entry() {
                    if frontier.less_equal(entry.key()) {
                        break;
                    }
                    let (epoch, (cap, batch)) = entry.remove_entry();
                    match sink.batches.try_send(batch) {
                        Ok(()) => {
                            in_flight.insert(epoch, cap);
                        }
                        // Full: retry on a later activation. Disconnected: the sink has stopped and
                        // reports why; keep holding the epoch so no worker runs ahead.
                        Err(TrySendError::Full(batch) | TrySendError::Disconnected(batch)) => {
                            stash.insert(epoch, (cap, batch));
                            break;
                        }
                    }
                }
                while let Ok(committed) = sink.acks.try_recv() {
                    in_flight.retain(|epoch, _| *epoch > committed);
                }
                if !stash.is_empty() || !in_flight.is_empty() {
                    activator.activate_after(Duration::from_millis(2));
                }
            }
        },
    )
}
