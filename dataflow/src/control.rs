//! The graph's control input: the meters in force and the committed watermark, as timestamped data, the
//! way price books are. Worker 0 of process 0 feeds a change at an epoch; `broadcast` hands it to every
//! worker of every process; metering applies it to the items of that epoch and later ones.
//!
//! ```text
//!  config watcher ─► Vec<Meter> ─┐
//!                                ├─► worker 0: Control at epoch e ─► broadcast ─► Meter operator
//!  writer ─► committed watermark ┘   e = 1 + the oldest epoch any      (every worker)   │
//!                                    worker still feeds items at      meters_at(e') for items at e' ≥ e;
//!                                                                     the greatest watermark received
//! ```
//! Worker 0 holds the control input one epoch ahead of the items' frontier (`worker.rs`): a meter it
//! feeds applies from the epoch after the slowest worker's current one, on every worker at once, and
//! the oldest open epoch is metered while it is read (it never waits for the control input).
//!
//! The watermark is used as received, not as of an item's epoch: it only moves forward, and the
//! freshest committed one judges an event closer to how its commit will find the window (the sink
//! finalizes windows by the watermark committed before it). So an event read after a watermark was
//! committed and fed is a late event on every worker, whichever epoch it falls in. (Before, each
//! process kept its own copy of the meters, reloaded when its watcher woke, and the watermark was a
//! shared atomic that processes other than the writer's never saw move.)

use std::collections::BTreeMap;
use std::sync::Arc;

use meterflow_model::Meter;
use serde::{Deserialize, Serialize};

use crate::meters::Meters;
use crate::operators::Epoch;

/// A change of what metering reads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// The whole set of meters in force from this epoch on. `version` orders two snapshots fed at one
    /// epoch (the later one wins).
    Meters {
        version: u64,
        /// As JSON text between processes (`wire.rs`): a meter skips empty fields.
        #[serde(with = "crate::wire::json_text")]
        meters: Vec<Meter>,
    },
    /// The committed event-time watermark from this epoch on (it only moves forward).
    Watermark(i64),
    /// An admin's floor under the watermark (`POST /api/v1/watermark`), as set, before the commit that
    /// lifts the watermark to it. Metering ignores it (the committed watermark judges lateness); the
    /// worker loop ends a held catch-up epoch for it (`catch_up.rs`).
    Floor(i64),
}

/// What metering reads: the meter sets received, by the epoch they apply from, and the greatest
/// committed watermark received.
#[derive(Debug, Default)]
pub struct InForce {
    meters: BTreeMap<Epoch, (u64, Arc<Meters>)>,
    watermark: Option<i64>,
}

impl InForce {
    /// Records a change fed at `epoch`.
    pub fn record(&mut self, epoch: Epoch, change: Control) {
        match change {
            Control::Meters { version, meters } => {
                let newer = self
                    .meters
                    .get(&epoch)
                    .is_none_or(|(known, _)| version > *known);
                if newer {
                    self.meters
                        .insert(epoch, (version, Arc::new(Meters::new(meters))));
                }
            }
            Control::Watermark(w) => self.watermark = self.watermark.max(Some(w)),
            Control::Floor(_) => {}
        }
    }

    /// The meters in force at `epoch` (none recorded: no meter is defined, every event type has its
    /// default meter).
    pub fn meters_at(&self, epoch: Epoch) -> Arc<Meters> {
        self.meters
            .range(..=epoch)
            .next_back()
            .map(|(_, (_, m))| Arc::clone(m))
            .unwrap_or_default()
    }

    /// The greatest committed watermark received, if any.
    pub fn watermark(&self) -> Option<i64> {
        self.watermark
    }

    /// Forgets the meter sets no epoch from `oldest` on can read: every one before the last one at or
    /// before `oldest`.
    pub fn forget_before(&mut self, oldest: Epoch) {
        if let Some(&last) = self.meters.range(..=oldest).next_back().map(|(e, _)| e) {
            self.meters.retain(|epoch, _| *epoch >= last);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meterflow_model::{Aggregation, Window};

    fn meter(name: &str) -> Meter {
        Meter {
            meter: name.into(),
            event_type: "api_call".into(),
            aggregation: Aggregation::Count,
            value_property: None,
            window: Window::Hour,
            group_by: Default::default(),
            max_dimension_values: None,
        }
    }

    #[test]
    fn a_change_applies_from_its_epoch_on_and_the_later_version_wins_within_one() {
        let mut in_force = InForce::default();
        assert!(in_force.meters_at(5).is_empty());
        in_force.record(
            3,
            Control::Meters {
                version: 2,
                meters: vec![meter("b")],
            },
        );
        in_force.record(
            3,
            Control::Meters {
                version: 1,
                meters: vec![meter("a")],
            },
        );
        in_force.record(
            7,
            Control::Meters {
                version: 3,
                meters: vec![meter("c"), meter("d")],
            },
        );
        assert!(in_force.meters_at(2).is_empty());
        assert_eq!(in_force.meters_at(3).len(), 1);
        assert_eq!(in_force.meters_at(6).len(), 1);
        assert_eq!(in_force.meters_at(7).len(), 2);
        in_force.forget_before(6);
        assert_eq!(in_force.meters_at(6).len(), 1);
        assert_eq!(in_force.meters_at(9).len(), 2);
    }

    #[test]
    fn the_watermark_is_the_greatest_received() {
        let mut in_force = InForce::default();
        assert_eq!(in_force.watermark(), None);
        in_force.record(5, Control::Watermark(300));
        in_force.record(2, Control::Watermark(100));
        assert_eq!(in_force.watermark(), Some(300));
    }
}
