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
//!
//! Worker 0 also keeps the event-time watermark (SPEC §4): per partition the greatest event time read
//! minus the allowed out-of-orderness; globally the least over partitions that have been active within
//! the idle timeout (all idle: the greatest), as `meterflow_model::watermark` defines it. Each batch
//! carries it; the sink never lets it go back.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use meterflow_model::batch::{DimensionValue, QuarantinedPeriod};
use meterflow_model::watermark::{WatermarkPolicy, Watermarks};
use meterflow_model::{
    Aggregate, AggregateKey, Charge, CompactString, DeadLetter, Duplicate, EpochBatch, Item,
    LateEvent, LineChange, PartitionProgress,
};
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::StreamVec;

use crate::operators::Epoch;

/// One thing the sink must store for an epoch.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SinkUpdate {
    /// Add this change to the row of the key (and, for multiset meters, to the item's count).
    Row(AggregateKey, Option<Item>, Aggregate),
    /// The group row's change overflowed the decimal range: quarantine the row (usage.rs).
    QuarantinedRow(AggregateKey),
    /// A billing period enters (+1) or leaves (−1) quarantine (rating.rs).
    QuarantinedPeriod(QuarantinedPeriod, i64),
    /// A window charge of `(customer_id, meter)` appears (+1) or is withdrawn (−1).
    Charge(CompactString, CompactString, Charge, i64),
    /// An upcoming-invoice line changes by this much.
    Line(LineChange),
    /// Records of this partition before this offset are reflected.
    Offset(PartitionProgress),
    DeadLetter(DeadLetter),
    Duplicate(Duplicate),
    Late(LateEvent),
    /// A meter's `group_by` key admitted this value (admit.rs): store it, so a restart bounds the
    /// same.
    DimensionValue(DimensionValue),
}

/// How often an idle worker 0 sends the sink an empty batch with the current watermark.
const HEARTBEAT: Duration = Duration::from_millis(500);

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
    watermarks: WatermarkPolicy,
) -> StreamVec<'scope, Epoch, ()> {
    let scope = updates.scope();
    updates.unary_frontier::<CapacityContainerBuilder<Vec<()>>, _, _, _>(
        Exchange::new(|_: &(Epoch, SinkUpdate)| 0u64),
        "CommitEpochs",
        move |_cap, info| {
            let activator = scope.activator_for(info.address);
            let mut stash: BTreeMap<Epoch, (Capability<Epoch>, EpochBatch)> = BTreeMap::new();
            let mut in_flight: BTreeMap<Epoch, Capability<Epoch>> = BTreeMap::new();
            let mut watermarks = Watermarks::new(watermarks, Instant::now());
            // The last epoch handed over, and when: an idle pipeline still sends a heartbeat now and
            // then, so the watermark moves on idle partitions and the sink can apply a floor. A
            // heartbeat carries that epoch, and its acknowledgement says "every epoch up to it is
            // committed". Before the first hand-over it carries epoch 0, which no batch has reached
            // the sink with: its acknowledgement would release epoch 0 if that epoch's batch were on
            // its way by then. So while such a heartbeat is unacknowledged no batch is handed over
            // (and no second one is sent, so one acknowledgement answers it even if the sink merges).
            let mut last_sent: (Epoch, Instant) = (0, Instant::now());
            let mut handed_over = false;
            let mut early_heartbeat = false;
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
                            let batch = &mut entry.1;
                            match update {
                                SinkUpdate::Row(key, item, agg) => {
                                    batch.aggregates.push((key, item, agg))
                                }
                                SinkUpdate::QuarantinedRow(key) => batch.quarantined_rows.push(key),
                                SinkUpdate::QuarantinedPeriod(period, diff) => {
                                    batch.quarantined_periods.push((period, diff))
                                }
                                SinkUpdate::Charge(customer, meter, charge, diff) => {
                                    batch.charges.push((customer, meter, charge, diff))
                                }
                                SinkUpdate::Line(line) => batch.lines.push(line),
                                SinkUpdate::Offset(p) => batch.offsets.push(p),
                                SinkUpdate::DeadLetter(d) => batch.dead_letters.push(d),
                                SinkUpdate::Duplicate(d) => batch.duplicates.push(d),
                                SinkUpdate::Late(l) => batch.late_events.push(l),
                                SinkUpdate::DimensionValue(v) => batch.dimension_values.push(v),
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
                    if frontier.less_equal(entry.key()) || early_heartbeat {
                        break;
                    }
                    let (epoch, (cap, mut batch)) = entry.remove_entry();
                    if batch.watermark.is_none() {
                        let now = Instant::now();
                        batch
                            .offsets
                            .iter()
                            .for_each(|p| watermarks.observe(p, now));
                        batch.watermark = watermarks.global(now);
                    }
                    batch.sealed_at = Some(Instant::now());
                    match sink.batches.try_send(batch) {
                        Ok(()) => {
                            in_flight.insert(epoch, cap);
                            last_sent = (epoch, Instant::now());
                            handed_over = true;
                        }
                        // Full: retry on a later activation. Disconnected: the sink has stopped and
                        // reports why; keep holding the epoch so no worker runs ahead.
                        Err(TrySendError::Full(batch) | TrySendError::Disconnected(batch)) => {
                            stash.insert(epoch, (cap, batch));
                            break;
                        }
                    }
                }
                if stash.is_empty() && !early_heartbeat && last_sent.1.elapsed() >= HEARTBEAT {
                    let heartbeat = EpochBatch {
                        epoch: last_sent.0,
                        watermark: watermarks.global(Instant::now()),
                        sealed_at: Some(Instant::now()),
                        ..EpochBatch::default()
                    };
                    if sink.batches.try_send(heartbeat).is_ok() {
                        last_sent.1 = Instant::now();
                        early_heartbeat = !handed_over;
                    }
                }
                while let Ok(committed) = sink.acks.try_recv() {
                    // Before the first hand-over only heartbeats are acknowledged.
                    if !handed_over {
                        early_heartbeat = false;
                    }
                    in_flight.retain(|epoch, _| *epoch > committed);
                }
                if !stash.is_empty() || !in_flight.is_empty() {
                    activator.activate_after(Duration::from_millis(2));
                } else if !frontier.is_empty() {
                    activator.activate_after(HEARTBEAT);
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use meterflow_model::PartitionProgress;
    use timely::dataflow::operators::Probe;
    use timely::dataflow::{InputHandleVec, ProbeHandle};

    use super::*;

    /// Review of the control input (helper, this session): before any batch was handed over, an idle
    /// commit sent a heartbeat stamped epoch 0, and the sink's acknowledgement of it ("every epoch up
    /// to 0 is committed") released epoch 0 once its real batch was in flight, before it was stored.
    #[test]
    fn an_epoch_is_released_only_once_its_own_batch_is_acknowledged() {
        let (batch_tx, batch_rx) = crossbeam_channel::bounded::<EpochBatch>(8);
        let (ack_tx, ack_rx) = crossbeam_channel::unbounded::<Epoch>();
        // What the sink has stored: (epoch, empty?), pushed once the batch is acknowledged.
        let stored: Arc<Mutex<Vec<(Epoch, bool)>>> = Arc::default();
        let sink = {
            let stored = stored.clone();
            std::thread::spawn(move || {
                for batch in batch_rx {
                    // A commit takes a while; a heartbeat's too (it stores the watermark).
                    std::thread::sleep(Duration::from_millis(300));
                    stored.lock().unwrap().push((batch.epoch, batch.is_empty()));
                    if ack_tx.send(batch.epoch).is_err() {
                        return;
                    }
                }
            })
        };
        let seen = stored.clone();
        timely::execute_directly(move |worker| {
            let mut input = InputHandleVec::<Epoch, (Epoch, SinkUpdate)>::new();
            let probe = ProbeHandle::new();
            worker.dataflow::<Epoch, _, _>(|scope| {
                let updates = input.to_stream(scope);
                let channels = SinkChannels {
                    batches: batch_tx,
                    acks: ack_rx,
                };
                commit_epochs(updates, Some(channels), WatermarkPolicy::default())
                    .probe_with(&probe);
            });
            // A slow first epoch (a restart's restore): idle for longer than a heartbeat.
            let started = Instant::now();
            while started.elapsed() < HEARTBEAT + Duration::from_millis(100) {
                worker.step_or_park(Some(Duration::from_millis(10)));
            }
            input.send((
                0,
                SinkUpdate::Offset(PartitionProgress {
                    partition: 0,
                    next_offset: 1,
                    max_event_time_micros: None,
                }),
            ));
            input.advance_to(1);
            while probe.less_than(&1) {
                worker.step_or_park(Some(Duration::from_millis(1)));
            }
            let stored = seen.lock().unwrap().clone();
            assert!(
                stored.contains(&(0, false)),
                "epoch 0 was released before its batch was stored: the sink holds {stored:?}"
            );
            drop(input);
            while !probe.done() {
                worker.step_or_park(Some(Duration::from_millis(1)));
            }
        });
        sink.join().unwrap();
    }
}
