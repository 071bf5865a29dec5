//! The dataflow graph: [`build`] wires small named operators; the worker loop (`worker.rs`) drives it.
//!
//! Contract: given the records and offset markers introduced at epoch `e`, the output at epoch `e` holds
//! exactly the aggregate *changes* those records cause (at most one per key), the dead letters among them,
//! and the markers. Nothing is kept between epochs: sums and counts are a group, so the sink can add each
//! epoch's changes to what it stored.

use differential_dataflow::collection::AsCollection;
use differential_dataflow::VecCollection;
use meterflow_model::{decode_event, Aggregate, AggregateKey, DeadLetter, Limits};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Concatenate, OkErr, Operator};
use timely::dataflow::StreamVec;

use crate::commit::SinkUpdate;
use crate::source::RawRecord;
use crate::usage::Usage;

/// Epoch numbers: each worker advances its inputs to the next epoch every tick.
pub type Epoch = u64;

/// Builds the pipeline from Kafka records and offset markers `(epoch, partition, next_offset)` to sink
/// updates, each with the epoch it belongs to.
///
/// The epoch travels in the data, not only in the message's capability: differential may send updates of
/// a later time under an earlier capability, and the sink must never commit a result with the offsets of
/// an epoch before the one that produced it.
pub fn build<'scope>(
    records: StreamVec<'scope, Epoch, RawRecord>,
    markers: StreamVec<'scope, Epoch, (Epoch, i32, i64)>,
    limits: Limits,
) -> StreamVec<'scope, Epoch, (Epoch, SinkUpdate)> {
    let scope = records.scope();
    let (usage, dead_letters) = decode(records, limits);
    let changes = usage_changes(usage);
    scope.concatenate([
        changes.map(|(key, epoch, usage)| (epoch, SinkUpdate::Aggregate(key, usage.0))),
        dead_letters.map(|(epoch, dead)| (epoch, SinkUpdate::DeadLetter(dead))),
        markers.map(|(epoch, partition, next)| (epoch, SinkUpdate::Offset(partition, next))),
    ])
}

/// A dead letter with the epoch its record was read in.
type EpochDeadLetter = (Epoch, DeadLetter);
/// A record decoded into the default meter's update, or a dead letter.
type Decoded = Result<(AggregateKey, Epoch, Usage), EpochDeadLetter>;

/// Decodes and validates each record where it was read (no exchange: records never cross workers) into
/// the default meter's update `(key, epoch, Usage(value, 1))`, or a dead letter with the reason.
fn decode<'scope>(
    records: StreamVec<'scope, Epoch, RawRecord>,
    limits: Limits,
) -> (
    VecCollection<'scope, Epoch, AggregateKey, Usage>,
    StreamVec<'scope, Epoch, EpochDeadLetter>,
) {
    let decoded: StreamVec<'scope, Epoch, Decoded> =
        records.unary(Pipeline, "Decode", |_cap, _info| {
            move |input, output| {
                input.for_each_stamp(|cap, data| {
                    let epoch = *cap
                        .least()
                        .expect("a stamp of a total order has a least time");
                    let mut session = output.session(&cap);
                    for batch in data {
                        for record in batch.drain(..) {
                            session.give(decode_record(record, epoch, &limits));
                        }
                    }
                });
            }
        });
    let (usage, dead) = decoded.ok_err(|result| result);
    (usage.as_collection(), dead)
}

fn decode_record(record: RawRecord, epoch: Epoch, limits: &Limits) -> Decoded {
    let reference = record.timestamp_ms.saturating_mul(1_000);
    match decode_event(&record.payload, reference, limits) {
        Ok(event) => Ok((
            AggregateKey::default_meter(&event),
            epoch,
            Usage(Aggregate::of(event.value)),
        )),
        Err(e) => Err((
            epoch,
            DeadLetter {
                partition: record.partition,
                offset: record.offset,
                reason: format!("{}: {e}", e.code()),
                payload: record.payload,
            },
        )),
    }
}

/// Adds up each epoch's usage per key. Exchange contract: `consolidate` routes each key to the worker its
/// hash picks, so a key's changes within an epoch meet in one place and leave as one update.
fn usage_changes<'scope>(
    usage: VecCollection<'scope, Epoch, AggregateKey, Usage>,
) -> StreamVec<'scope, Epoch, (AggregateKey, Epoch, Usage)> {
    usage.consolidate().inner
}
