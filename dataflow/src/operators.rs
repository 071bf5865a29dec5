//! The dataflow graph: [`build`] wires small named operators; the worker loop (`worker.rs`) drives it.
//!
//! Contract: given the classified items and offset markers introduced at epoch `e`, the output at epoch
//! `e` holds exactly the row changes those items cause under the meters and watermark in force at `e`
//! (the control input, `control.rs`), at most one per row and item, the late events,
//! duplicates and dead letters among them, the markers, and the changes of window charges (rating.rs)
//! that these items and the price-book changes of epoch `e` cause. Aggregates need no state between
//! epochs: each is a sum of contributions (a group) or a multiset of items the sink keeps. Rating does:
//! it needs each period's whole usage, so a restart feeds the stored rows and charges back in at epoch 0
//! ([`RatingInputs`]); the stored charges are subtracted, so only what changed while the pipeline was
//! down (a price book edited) reaches the sink.

use std::collections::BTreeMap;

use differential_dataflow::collection::AsCollection;
use differential_dataflow::VecCollection;
use meterflow_model::batch::QuarantinedPeriod;
use meterflow_model::{Aggregate, Contribution, Event, LateEvent, LineChange};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::vec::{Broadcast, Map};
use timely::dataflow::operators::{Capability, Concatenate, OkErr, Operator};
use timely::dataflow::StreamVec;

use crate::admit::{admit, Candidate};
use crate::classify::{Classified, SourceItem};
use crate::commit::SinkUpdate;
use crate::consolidate;
use crate::control::{Control, InForce};
use crate::inputs::{Inputs, RatingInputs};
use crate::meters::Meters;
use crate::rating::{self, ChargeRow, RowKey};
use crate::usage::Usage;

/// Epoch numbers: each worker advances its inputs to the next epoch every tick.
pub type Epoch = u64;

/// What the graph is built with besides its inputs: fixed for the run.
#[derive(Clone, Debug)]
pub struct GraphContext {
    /// How long after its end a window still takes events before it is finalized (SPEC §4).
    pub allowed_lateness_micros: i64,
}

/// Builds the pipeline from its [`Inputs`] to sink updates, each with the epoch it belongs to.
///
/// The epoch travels in the data, not only in the message's capability: differential may send updates of
/// a later time under an earlier capability, and the sink must never commit a result with the offsets of
/// an epoch before the one that produced it.
pub fn build<'scope>(
    inputs: Inputs<'scope>,
    context: GraphContext,
) -> StreamVec<'scope, Epoch, (Epoch, SinkUpdate)> {
    let scope = inputs.items.scope();
    let (plain, candidates, other) = meter(inputs.items, inputs.control, context);
    let (admitted, refused) = admit(candidates, inputs.admitted);
    let contributions = plain.concat(admitted);
    // Rating reads the row changes, not the contributions: the same collection, already added up per
    // row and epoch (one update where there were as many as the row's events in the epoch).
    let changes = row_changes(contributions);
    let Charging {
        charges,
        lines,
        quarantined,
    } = charge_changes(changes.clone().as_collection(), inputs.rating);
    scope.concatenate([
        changes.flat_map(|((key, item), epoch, usage)| {
            // An overflowed change carries only its event count; the sink quarantines the row.
            let quarantine = (usage.overflowed && item.is_none())
                .then(|| (epoch, SinkUpdate::QuarantinedRow(key.clone())));
            [
                Some((epoch, SinkUpdate::Row(key, item, usage.aggregate))),
                quarantine,
            ]
            .into_iter()
            .flatten()
        }),
        quarantined.map(|(period, epoch, diff)| {
            (epoch, SinkUpdate::QuarantinedPeriod(period, diff as i64))
        }),
        charges.map(|((customer, meter, charge), epoch, diff)| {
            (
                epoch,
                SinkUpdate::Charge(customer, meter, charge, diff as i64),
            )
        }),
        lines.map(|(epoch, line)| (epoch, SinkUpdate::Line(line))),
        other,
        refused,
        inputs
            .markers
            .map(|(epoch, progress)| (epoch, SinkUpdate::Offset(progress))),
    ])
}

/// What metering produces: contributions to rows of meters without `group_by`, those of meters with
/// (which admission decides, admit.rs), and everything else for the sink.
type Metering<'scope> = (
    VecCollection<'scope, Epoch, RowKey, Usage>,
    StreamVec<'scope, Epoch, Candidate>,
    StreamVec<'scope, Epoch, (Epoch, SinkUpdate)>,
);

/// A contribution to a row of a meter without `group_by` (the hot path: one split), or else.
type Metered = Result<(RowKey, Epoch, Usage), Aside>;

/// What metering sets aside from the plain contributions: the few things for the sink, and the
/// contributions whose dimension values admission decides.
#[derive(Clone, Debug)]
enum Aside {
    Sink((Epoch, SinkUpdate)),
    Candidate(Box<Candidate>),
}

/// Applies the meters where the items were read (no exchange): each counted event becomes its
/// contributions to every meter reading its type, each retracted (voided) one their negation; a
/// contribution to a window the committed watermark has closed is also reported as a late event.
///
/// The meters are those in force at the items' epoch, and the watermark the greatest committed one
/// received (`control.rs`): the items of an epoch wait until the control input has passed it, which
/// the worker loop keeps an epoch ahead of the oldest one still read, so metering keeps pace with it.
// The `Result` is a routing tag for `ok_err` (contributions one way, everything else the other), not an
// error, so the size of its `Err` side is no concern.
#[allow(clippy::result_large_err)]
fn meter<'scope>(
    items: StreamVec<'scope, Epoch, SourceItem>,
    control: StreamVec<'scope, Epoch, Control>,
    context: GraphContext,
) -> Metering<'scope> {
    let metered: StreamVec<'scope, Epoch, Metered> = items.binary_frontier(
        control.broadcast(),
        Pipeline,
        Pipeline,
        "Meter",
        move |_cap, _info| {
            let mut in_force = InForce::default();
            let mut waiting: BTreeMap<Epoch, (Capability<Epoch>, Vec<SourceItem>)> =
                BTreeMap::new();
            move |(items, items_frontier), (control, control_frontier), output| {
                control.for_each_stamp(|cap, data| {
                    let Some(&epoch) = cap.least() else {
                        return;
                    };
                    for batch in data {
                        for change in batch.drain(..) {
                            in_force.record(epoch, change);
                        }
                    }
                });
                items.for_each_stamp(|cap, data| {
                    // Epochs are totally ordered: a stamp always has a least time.
                    let Some(&epoch) = cap.least() else {
                        return;
                    };
                    // The common case: the control input has passed the epoch (the worker loop keeps
                    // it ahead), so the items are metered as they come, without being copied aside.
                    if !control_frontier.frontier().less_equal(&epoch) {
                        let mut session = output.session(&cap);
                        let items = data.flat_map(|batch| batch.drain(..));
                        meter_epoch(items, epoch, &in_force, &context, |m| session.give(m));
                        return;
                    }
                    let Some(held) = cap.retain_least(output.output_index()) else {
                        return;
                    };
                    let (_, stash) = waiting.entry(epoch).or_insert_with(|| (held, Vec::new()));
                    for batch in data {
                        stash.append(batch);
                    }
                });
                while let Some(entry) = waiting.first_entry() {
                    let epoch = *entry.key();
                    if control_frontier.frontier().less_equal(&epoch) {
                        break;
                    }
                    let (cap, stash) = entry.remove();
                    let mut session = output.session(&cap);
                    meter_epoch(stash, epoch, &in_force, &context, |m| session.give(m));
                }
                let oldest = waiting
                    .keys()
                    .next()
                    .copied()
                    .or_else(|| items_frontier.frontier().first().copied());
                if let Some(oldest) = oldest {
                    in_force.forget_before(oldest);
                }
            }
        },
    );
    let (plain, aside): (_, StreamVec<'scope, Epoch, Aside>) = metered.ok_err(|m| m);
    let (candidates, other) = aside.ok_err(|a| match a {
        Aside::Candidate(c) => Ok(*c),
        Aside::Sink(s) => Err(s),
    });
    (plain.as_collection(), candidates, other)
}

/// Meters items of `epoch` under what is in force for it: the epoch's meter set and the greatest
/// watermark received.
fn meter_epoch(
    items: impl IntoIterator<Item = SourceItem>,
    epoch: Epoch,
    in_force: &InForce,
    context: &GraphContext,
    mut give: impl FnMut(Metered),
) {
    let meters = in_force.meters_at(epoch);
    let watermark = in_force.watermark();
    for item in items {
        meter_item(item, epoch, &meters, watermark, context, &mut give);
    }
}

/// One item's contributions (and its late events), or the item itself for the sink.
#[allow(clippy::result_large_err)]
fn meter_item(
    item: SourceItem,
    epoch: Epoch,
    meters: &Meters,
    watermark: Option<i64>,
    context: &GraphContext,
    mut give: impl FnMut(Metered),
) {
    let (event, sign) = match item.what {
        Classified::Count(event) => (event, 1),
        Classified::Retract(event) => (event, -1),
        Classified::Duplicate(d) => {
            return give(Err(Aside::Sink((epoch, SinkUpdate::Duplicate(d)))))
        }
        Classified::Dead(d) => return give(Err(Aside::Sink((epoch, SinkUpdate::DeadLetter(d))))),
        Classified::Ignored => return,
    };
    if meters.by_default(&event.event_type) {
        // The hot path: one contribution, made of the event's own strings (no copies).
        let Event {
            event_id,
            customer_id,
            event_type,
            event_time_micros,
            value,
            ..
        } = event;
        let c = Contribution::by_default_meter(customer_id, event_type, event_time_micros, value);
        if sign > 0 {
            if let Some(late) = late(&event_id, event_time_micros, &c, watermark, context) {
                give(Err(Aside::Sink((epoch, SinkUpdate::Late(late)))));
            }
        }
        let usage = if sign > 0 { c.usage } else { negate(c.usage) };
        return give(Ok(((c.key, c.item), epoch, Usage::of(usage))));
    }
    let (contributions, _skipped) = meters.contributions(&event);
    for c in contributions {
        if sign > 0 {
            let at = event.event_time_micros;
            if let Some(late) = late(&event.event_id, at, &c, watermark, context) {
                give(Err(Aside::Sink((epoch, SinkUpdate::Late(late)))));
            }
        }
        let usage = if sign > 0 { c.usage } else { negate(c.usage) };
        if c.key.dimensions.is_empty() {
            give(Ok(((c.key, c.item), epoch, Usage::of(usage))));
        } else {
            give(Err(Aside::Candidate(Box::new(Candidate {
                bound: meters.dimension_bound(&c.key.meter),
                row: (c.key, c.item),
                usage: Usage::of(usage),
                retraction: sign < 0,
                partition: item.partition,
                offset: item.offset,
                event: event.clone(),
            }))));
        }
    }
}

/// The late event of the contribution `c` of event `event_id` (at `event_time_micros`), if the
/// committed `watermark` has closed its window.
fn late(
    event_id: &str,
    event_time_micros: i64,
    c: &Contribution,
    watermark: Option<i64>,
    context: &GraphContext,
) -> Option<LateEvent> {
    let watermark = watermark?;
    let closes = c
        .key
        .window_end
        .saturating_mul(1_000_000)
        .saturating_add(context.allowed_lateness_micros);
    (closes <= watermark).then(|| LateEvent {
        event_id: event_id.to_owned(),
        customer_id: c.key.customer_id.clone(),
        meter: c.key.meter.clone(),
        window_start: c.key.window_start,
        event_time_micros,
        watermark_micros: watermark,
    })
}

fn negate(a: Aggregate) -> Aggregate {
    Aggregate {
        value: -a.value,
        event_count: a.event_count.saturating_neg(),
    }
}

/// Each epoch's changes of window charges: rating over everything committed before plus this run's
/// row changes, minus the charges committed before; the changes of the upcoming-invoice lines they
/// add up to (SPEC §6); and likewise the changes of the periods in quarantine. Exchange contract: one
/// update per charge row, line (or period) and epoch: the rating operator routes by period,
/// subtracts the period's committed charges itself and adds up its lines (rating.rs); the
/// quarantines are consolidated as in `row_changes`.
fn charge_changes<'scope>(
    row_changes: VecCollection<'scope, Epoch, RowKey, Usage>,
    inputs: RatingInputs<'scope>,
) -> Charging<'scope> {
    let usage = row_changes.concat(inputs.restored_rows.as_collection());
    let rating = rating::rate(
        usage,
        inputs.books.as_collection(),
        inputs.restored_charges.as_collection(),
    );
    let quarantined = consolidate::per_epoch(
        rating
            .quarantined
            .concat(inputs.restored_quarantines.as_collection().negate())
            .inner,
        "QuarantineChanges",
    );
    Charging {
        charges: rating.charges.inner,
        lines: rating.lines,
        quarantined,
    }
}

/// What `charge_changes` gives, each update with its epoch.
struct Charging<'scope> {
    charges: StreamVec<'scope, Epoch, (ChargeRow, Epoch, isize)>,
    lines: StreamVec<'scope, Epoch, (Epoch, LineChange)>,
    quarantined: StreamVec<'scope, Epoch, (QuarantinedPeriod, Epoch, isize)>,
}

/// Adds up each epoch's contributions per row (and item). Exchange contract: `per_epoch` routes each
/// row to the worker its hash picks, so a row's changes within an epoch meet in one place and leave as
/// one update.
fn row_changes<'scope>(
    contributions: VecCollection<'scope, Epoch, RowKey, Usage>,
) -> StreamVec<'scope, Epoch, (RowKey, Epoch, Usage)> {
    consolidate::per_epoch(contributions.inner, "RowChanges")
}
