//! [`Meters`]: a set of meters in force, as metering reads it. Which set is in force at an epoch is the
//! control input's business (`control.rs`): a meter applies to the events of the epochs from the one
//! worker 0 fed it at (SPEC §4).
//!
//! Meter names and event types are disjoint (finding 15): an event type no meter reads goes to its
//! default meter, which is named after the type, so an event whose type is the *name* of a meter that
//! reads another type would add into that meter's rows. Such an event gets no default meter here (it
//! is claimed, and contributes to nothing); creating a meter named after an event type in use is
//! refused on the other side (`store::meters::create_meter`).

use std::collections::{HashMap, HashSet};

use meterflow_model::{Contribution, Event, Meter, MeterSet, Skip};

/// The meters in force: by event type, and the names and types they take.
#[derive(Clone, Debug, Default)]
pub struct Meters {
    set: MeterSet,
    /// Per meter with `group_by`, its `max_dimension_values`.
    bounds: HashMap<String, u32>,
    names: HashSet<String>,
    types: HashSet<String>,
}

impl Meters {
    pub fn new(meters: Vec<Meter>) -> Self {
        Meters {
            bounds: meters
                .iter()
                .filter(|m| !m.group_by.is_empty())
                .map(|m| (m.meter.clone(), m.dimension_bound()))
                .collect(),
            names: meters.iter().map(|m| m.meter.clone()).collect(),
            types: meters.iter().map(|m| m.event_type.clone()).collect(),
            set: MeterSet::new(meters),
        }
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// How many values each `group_by` key of `meter` admits.
    pub fn dimension_bound(&self, meter: &str) -> u32 {
        self.bounds
            .get(meter)
            .copied()
            .unwrap_or(meterflow_model::dimensions::DEFAULT_MAX_DIMENSION_VALUES)
    }

    /// Whether the events of `event_type` go to their default meter
    /// ([`Contribution::by_default_meter`]): no meter reads the type, and none is named after it.
    pub fn by_default(&self, event_type: &str) -> bool {
        !self.set.reads(event_type) && !self.names.contains(event_type)
    }

    /// Every contribution `event` makes (`MeterSet::contributions`), except a default meter's
    /// contribution to a row of a meter of that name.
    pub fn contributions(&self, event: &Event) -> (Vec<Contribution>, Vec<(String, Skip)>) {
        let (contributions, skipped) = self.set.contributions(event);
        if self.names.contains(&event.event_type) && !self.types.contains(&event.event_type) {
            tracing::debug!(
                event_type = %event.event_type,
                "an event type that is a meter's name gets no default meter"
            );
            return (Vec::new(), skipped);
        }
        (contributions, skipped)
    }
}
