//! The bound on dimension values (issue 17, `docs/dimensions.md`): of each (meter, `group_by` key), the
//! first `max_dimension_values` distinct values are admitted; a contribution that would bring one more
//! is refused, and its event is a dead letter `DIMENSION_CARDINALITY` (it still counts in the meters
//! that admit it, as an event a meter skips does). Never a silent merge.
//!
//! ```text
//!  contributions of group_by meters ─exchange by meter─► stash per epoch
//!  admitted values (restored, epoch 0) ─exchange by meter─┘      │ both frontiers past e
//!        counts in (event time, event id, meter) order: every value admitted or admissible?
//!           yes ─► the contribution, and each new value (SinkUpdate::DimensionValue, stored)
//!           no  ─► DeadLetter(DIMENSION_CARDINALITY), nothing counted
//!        then retractions (voids): only of contributions whose values are all admitted
//! ```
//! Deterministic: an epoch's decisions depend only on the values admitted before it and on the
//! epoch's contributions in a fixed order, so a replay decides as the first run did. A contribution
//! whose values are all admitted already is passed on as it comes (values are never un-admitted, so
//! no order can change that answer); only those bringing a value not admitted yet wait for their
//! epoch to close and are decided in order. Values are never
//! un-admitted (a void does not free a slot), so a value not admitted now was never admitted, and a
//! void of a refused contribution is dropped rather than taken from a row it never reached.

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use differential_dataflow::collection::AsCollection;
use differential_dataflow::VecCollection;
use meterflow_model::dimensions::{refusal_reason, Admitted};
use meterflow_model::{DeadLetter, Event};
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::{Capability, OkErr, Operator};
use timely::dataflow::StreamVec;

use crate::commit::SinkUpdate;
use crate::operators::Epoch;
use crate::rating::RowKey;
use crate::usage::Usage;

/// A value admitted for a (meter, key): `(meter, key, value)`, `None` for the value null.
pub type AdmittedValue = meterflow_model::batch::DimensionValue;

/// A contribution to a row of a meter with `group_by`, waiting for its values to be admitted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    pub row: RowKey,
    /// The contribution (negated for a retraction).
    pub usage: Usage,
    /// A void's retraction, not a count.
    pub retraction: bool,
    /// The meter's `max_dimension_values`.
    pub bound: u32,
    /// Where the event was read, for its dead letter.
    pub partition: i32,
    pub offset: i64,
    pub event: Event,
}

impl Candidate {
    /// The order in which an epoch's counts are decided: by event time, event id and meter.
    fn order(&self) -> (i64, &str, &str) {
        (
            self.event.event_time_micros,
            &self.event.event_id,
            &self.row.0.meter,
        )
    }
}

/// What admission gives: admitted contributions, and dead letters and newly admitted values for the
/// sink.
type Decided = Result<(RowKey, Epoch, Usage), (Epoch, SinkUpdate)>;

/// Admits `candidates` against the values admitted so far (`restored` at a start, then as decided).
// The `Result` is a routing tag for `ok_err`, as in `operators::meter`, not an error.
#[allow(clippy::type_complexity, clippy::result_large_err)]
pub fn admit<'scope>(
    candidates: StreamVec<'scope, Epoch, Candidate>,
    restored: StreamVec<'scope, Epoch, AdmittedValue>,
) -> (
    VecCollection<'scope, Epoch, RowKey, Usage>,
    StreamVec<'scope, Epoch, (Epoch, SinkUpdate)>,
) {
    let decided: StreamVec<'scope, Epoch, Decided> = candidates.binary_frontier(
        restored,
        Exchange::new(|c: &Candidate| meter_hash(&c.row.0.meter)),
        Exchange::new(|a: &AdmittedValue| meter_hash(&a.0)),
        "AdmitDimensions",
        |_cap, _info| {
            let mut admitted = Admitted::default();
            let mut waiting: BTreeMap<Epoch, (Capability<Epoch>, Vec<Candidate>)> = BTreeMap::new();
            move |(candidates, candidates_frontier), (restored, restored_frontier), output| {
                restored.for_each(|_, data| {
                    for (meter, key, value) in data.drain(..) {
                        admitted.insert(&meter, &key, value.as_deref());
                    }
                });
                candidates.for_each_stamp(|cap, data| {
                    let Some(&epoch) = cap.least() else {
                        return;
                    };
                    // The common case: every value admitted already, whatever the order.
                    let mut session = output.session(&cap);
                    let mut wait = Vec::new();
                    for batch in data {
                        for c in batch.drain(..) {
                            if admitted.all(&c.row.0.meter, &c.row.0.dimensions) {
                                session.give(Ok((c.row, epoch, c.usage)));
                            } else {
                                wait.push(c);
                            }
                        }
                    }
                    drop(session);
                    if wait.is_empty() {
                        return;
                    }
                    let Some(held) = cap.retain_least(output.output_index()) else {
                        return;
                    };
                    let (_, stash) = waiting.entry(epoch).or_insert_with(|| (held, Vec::new()));
                    stash.append(&mut wait);
                });
                while let Some(entry) = waiting.first_entry() {
                    let epoch = *entry.key();
                    if candidates_frontier.frontier().less_equal(&epoch)
                        || restored_frontier.frontier().less_equal(&epoch)
                    {
                        break;
                    }
                    let (cap, stash) = entry.remove();
                    let mut session = output.session(&cap);
                    decide(stash, epoch, &mut admitted, |d| session.give(d));
                }
            }
        },
    );
    let (admitted, other) = decided.ok_err(|d| d);
    (admitted.as_collection(), other)
}

/// The worker a meter's candidates and values meet on.
fn meter_hash(meter: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    meter.hash(&mut hasher);
    hasher.finish()
}

/// Decides one epoch's candidates that brought a value not admitted when they came: counts in
/// order, then retractions.
#[allow(clippy::result_large_err)]
fn decide(
    mut stash: Vec<Candidate>,
    epoch: Epoch,
    admitted: &mut Admitted,
    mut give: impl FnMut(Decided),
) {
    stash.sort_by(|a, b| (a.retraction, a.order()).cmp(&(b.retraction, b.order())));
    for c in stash {
        let meter = c.row.0.meter.as_str();
        if c.retraction {
            if admitted.all(meter, &c.row.0.dimensions) {
                give(Ok((c.row, epoch, c.usage)));
            }
            continue;
        }
        let decided = admitted
            .admit(meter, &c.row.0.dimensions, c.bound)
            .map_err(|(key, value)| refusal(&c, key, value));
        match decided {
            Err(letter) => give(Err((epoch, SinkUpdate::DeadLetter(letter)))),
            Ok(new) => {
                for value in new {
                    give(Err((epoch, SinkUpdate::DimensionValue(value))));
                }
                give(Ok((c.row, epoch, c.usage)));
            }
        }
    }
}

/// The dead letter of a contribution whose value `value` of `key` the meter's bound refuses.
fn refusal(c: &Candidate, key: &str, value: Option<&str>) -> DeadLetter {
    DeadLetter {
        partition: c.partition,
        offset: c.offset,
        payload: serde_json::to_vec(&c.event).unwrap_or_default(),
        reason: refusal_reason(&c.row.0.meter, c.bound, key, value),
    }
}
