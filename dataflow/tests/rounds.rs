//! The graph alone, driven in explicit rounds: no reader threads, no clock, no sink. Each round feeds
//! classified events (and voids of earlier ones) at one epoch, advances every input, and steps the
//! workers until the epoch has passed; then the round's output must be exactly what its events cause
//! (`operators::build`'s contract): per row, the sum of the round's contributions, stamped with the
//! round's epoch, and nothing else. For 1, 2 and 4 workers, against a plain per-round sum.
//!
//! The meters and the committed watermark are timestamped inputs too (`control.rs`): worker 0 changes
//! them at random rounds, and each round's rows and late events must follow what is in force at that
//! round, on every worker.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use meterflow_dataflow::classify::{Classified, SourceItem};
use meterflow_dataflow::operators::{build, Epoch};
use meterflow_dataflow::{Control, GraphContext, GraphInputs, SinkUpdate};
use meterflow_model::{decode_event, Aggregation, Event, Limits, Meter, Window};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use timely::dataflow::operators::{Inspect, Probe};
use timely::dataflow::ProbeHandle;

const ROUNDS: u64 = 12;
const PARTITIONS: i32 = 4;
const BASE_S: i64 = 1_705_320_000; // 2024-01-15T12:00:00Z
const LATENESS_MICROS: i64 = 3_600_000_000;

fn meter(name: &str, aggregation: Aggregation, property: Option<&str>) -> Meter {
    Meter {
        meter: name.into(),
        event_type: "api_call".into(),
        aggregation,
        value_property: property.map(str::to_owned),
        window: Window::Hour,
        group_by: Default::default(),
        max_dimension_values: None,
    }
}

fn meters() -> Vec<Meter> {
    vec![
        meter("calls", Aggregation::Count, None),
        meter("tokens", Aggregation::Sum, Some("value")),
    ]
}

/// The meters in force at round 0, and at random later rounds: a third meter added, then one taken
/// away, then every meter gone (each event type then has its default meter: the sum of the events'
/// values, named after the type).
fn random_controls(seed: u64) -> Vec<(Epoch, Control)> {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed);
    let mut sets = vec![
        meters(),
        vec![
            meter("calls", Aggregation::Count, None),
            meter("tokens", Aggregation::Sum, Some("value")),
            meter("peak", Aggregation::Max, Some("value")),
        ],
        vec![meter("tokens", Aggregation::Sum, Some("value"))],
        Vec::new(),
    ]
    .into_iter();
    let mut controls = vec![(
        0,
        Control::Meters {
            version: 0,
            meters: sets.next().unwrap(),
        },
    )];
    let mut round = 0;
    for (version, meters) in (1..).zip(sets) {
        round += rng.random_range(1..4);
        controls.push((round, Control::Meters { version, meters }));
    }
    // The watermark moves at random rounds through the events' four hours, past the first window's
    // close (its end plus the allowed lateness) from some round on.
    let mut watermark = (BASE_S + 2 * 3600) * 1_000_000;
    controls.push((
        rng.random_range(1..ROUNDS / 2),
        Control::Watermark(watermark),
    ));
    for round in 1..ROUNDS {
        if rng.random_bool(0.4) {
            watermark += rng.random_range(0..3_600_000_000i64);
            controls.push((round, Control::Watermark(watermark)));
        }
        // An admin's floor far ahead: metering never reads it (only a commit lifts the watermark).
        if rng.random_bool(0.2) {
            controls.push((round, Control::Floor((BASE_S + 100 * 3600) * 1_000_000)));
        }
    }
    controls
}

/// The meters and watermark in force at `round`.
fn in_force(controls: &[(Epoch, Control)], round: Epoch) -> (Vec<Meter>, Option<i64>) {
    let mut meters = Vec::new();
    let mut watermark = None;
    for (_, control) in controls.iter().filter(|(at, _)| *at <= round) {
        match control {
            Control::Meters { meters: m, .. } => meters = m.clone(),
            Control::Watermark(w) => watermark = watermark.max(Some(*w)),
            Control::Floor(_) => {}
        }
    }
    (meters, watermark)
}

/// `(round, partition, item)` for every round: new events, and voids of events of earlier rounds.
fn random_rounds(seed: u64) -> Vec<(Epoch, i32, Classified)> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut counted: Vec<Event> = Vec::new();
    let mut out = Vec::new();
    for round in 0..ROUNDS {
        for i in 0..rng.random_range(0..40) {
            let json = format!(
                r#"{{"event_id":"e{round}-{i}","customer_id":"c{}","event_type":"api_call","event_time":"{}","value":"{}"}}"#,
                rng.random_range(0..3),
                chrono::DateTime::from_timestamp(BASE_S + rng.random_range(0..4 * 3600), 0)
                    .unwrap()
                    .to_rfc3339(),
                rng.random_range(1..100),
            );
            let event = decode_event(
                json.as_bytes(),
                (BASE_S + 86_400) * 1_000_000,
                &Limits::default(),
            )
            .unwrap();
            counted.push(event.clone());
            out.push((
                round,
                rng.random_range(0..PARTITIONS),
                Classified::Count(event),
            ));
        }
        if !counted.is_empty() && rng.random_bool(0.5) {
            let voided = counted.swap_remove(rng.random_range(0..counted.len()));
            out.push((
                round,
                rng.random_range(0..PARTITIONS),
                Classified::Retract(voided),
            ));
        }
    }
    out
}

/// Per (round, customer, meter, window start): Σ value and Σ count of the round's changes.
type Rows = BTreeMap<(Epoch, String, String, i64), (Decimal, i64)>;
/// Per round: (event id, meter) of each late event.
type Lates = Vec<(Epoch, String, String)>;

/// The row changes and late events a round must produce, under the meters and watermark in force at
/// that round. A max meter's row is a multiset of items, so only its event count is compared.
fn expected(items: &[(Epoch, i32, Classified)], controls: &[(Epoch, Control)]) -> (Rows, Lates) {
    let mut rows: Rows = BTreeMap::new();
    let mut lates = Vec::new();
    for (round, _, what) in items {
        let (event, sign) = match what {
            Classified::Count(e) => (e, 1),
            Classified::Retract(e) => (e, -1),
            _ => continue,
        };
        let (mut meters, watermark) = in_force(controls, *round);
        if meters.is_empty() {
            meters = vec![meter("api_call", Aggregation::Sum, None)];
        }
        let start = (event.event_time_micros / 1_000_000).div_euclid(3600) * 3600;
        for meter in meters {
            let value = match meter.aggregation {
                Aggregation::Count => Decimal::ONE,
                Aggregation::Sum => event.value,
                _ => Decimal::ZERO,
            };
            let row = rows
                .entry((
                    *round,
                    event.customer_id.clone(),
                    meter.meter.clone(),
                    start,
                ))
                .or_default();
            row.0 += value * Decimal::from(sign);
            row.1 += sign;
            let closes = (start + 3600) * 1_000_000 + LATENESS_MICROS;
            if sign > 0 && watermark.is_some_and(|w| closes <= w) {
                lates.push((*round, event.event_id.clone(), meter.meter.clone()));
            }
        }
    }
    rows.retain(|_, (v, n)| !v.is_zero() || *n != 0);
    lates.sort();
    (rows, lates)
}

/// Runs the rounds through `build` on `workers` workers, worker 0 feeding `controls`; returns the row
/// changes by epoch and the late events.
fn run_rounds(
    items: Vec<(Epoch, i32, Classified)>,
    controls: Vec<(Epoch, Control)>,
    workers: usize,
) -> (Rows, Lates) {
    let seen: Arc<Mutex<Vec<(Epoch, Epoch, SinkUpdate)>>> = Arc::default();
    let items = Arc::new(items);
    let controls = Arc::new(controls);
    let collected = seen.clone();
    timely::execute(timely::Config::process(workers), move |worker| {
        let context = GraphContext {
            allowed_lateness_micros: LATENESS_MICROS,
        };
        let seen = collected.clone();
        let probe = ProbeHandle::new();
        let mut inputs = worker.dataflow::<Epoch, _, _>(|scope| {
            let mut inputs = GraphInputs::default();
            build(inputs.streams(scope), context)
                .inspect_core(move |event| {
                    if let Ok((stamp, data)) = event {
                        let at = *stamp.least().unwrap();
                        let mut seen = seen.lock().unwrap();
                        for (epoch, update) in data {
                            seen.push((at, *epoch, update.clone()));
                        }
                    }
                })
                .probe_with(&probe);
            inputs
        });
        let (index, peers) = (worker.index(), worker.peers());
        for round in 0..ROUNDS {
            if index == 0 {
                for (_, control) in controls.iter().filter(|(at, _)| *at == round) {
                    inputs.control.send(control.clone());
                }
            }
            // Each worker feeds the partitions it owns, as its reader would.
            for (at, partition, what) in items.iter() {
                if *at == round && (*partition as usize) % peers == index {
                    inputs.items.send(SourceItem {
                        partition: *partition,
                        offset: 0,
                        what: what.clone(),
                    });
                }
            }
            let next = round + 1;
            inputs.advance_to(next);
            inputs.control.advance_to(next);
            while probe.less_than(&next) {
                worker.step();
            }
        }
    })
    .unwrap();
    let mut rows: Rows = BTreeMap::new();
    let mut lates = Vec::new();
    for (at, epoch, update) in seen.lock().unwrap().iter() {
        assert!(
            at <= epoch,
            "an update never travels under a later capability than its epoch"
        );
        match update {
            SinkUpdate::Row(key, item, change) => {
                let row = rows
                    .entry((
                        *epoch,
                        key.customer_id.to_string(),
                        key.meter.to_string(),
                        key.window_start,
                    ))
                    .or_default();
                if item.is_none() {
                    row.0 += change.value;
                }
                row.1 += change.event_count;
            }
            SinkUpdate::Late(late) => {
                lates.push((*epoch, late.event_id.clone(), late.meter.to_string()))
            }
            _ => {}
        }
    }
    rows.retain(|_, (v, n)| !v.is_zero() || *n != 0);
    lates.sort();
    (rows, lates)
}

#[test]
fn each_round_outputs_exactly_its_own_row_changes_for_1_2_and_4_workers() {
    for seed in 0..3 {
        let items = random_rounds(seed);
        let controls = vec![(
            0,
            Control::Meters {
                version: 0,
                meters: meters(),
            },
        )];
        let want = expected(&items, &controls);
        assert!(want.0.len() > 50, "seed {seed}: enough rows to compare");
        for workers in [1, 2, 4] {
            assert_eq!(
                run_rounds(items.clone(), controls.clone(), workers),
                want,
                "seed {seed}, {workers} workers"
            );
        }
    }
}

#[test]
fn meters_and_the_watermark_apply_from_the_round_they_are_fed_at_on_every_worker() {
    for seed in 0..3 {
        let items = random_rounds(seed);
        let controls = random_controls(seed);
        let want = expected(&items, &controls);
        assert!(want.0.len() > 50, "seed {seed}: enough rows to compare");
        assert!(!want.1.is_empty(), "seed {seed}: some events are late");
        let metered: std::collections::BTreeSet<&str> =
            want.0.keys().map(|(_, _, m, _)| m.as_str()).collect();
        assert!(
            metered.contains("peak") && metered.contains("api_call"),
            "seed {seed}: every meter set was in force for some round: {metered:?}"
        );
        for workers in [1, 2, 4] {
            assert_eq!(
                run_rounds(items.clone(), controls.clone(), workers),
                want,
                "seed {seed}, {workers} workers"
            );
        }
    }
}

/// A row's change keeps the scale its events gave it: 87.0 stays 87.0 and 87 stays 87 (Postgres'
/// numeric stores and the API shows what it is given). Differential's `consolidate` did not: its batch
/// reuses the previous row's (time, diff) when they are equal, and decimals are equal whatever their
/// scale, so of two neighbouring rows summing to 87.0 and 87 one came out with the other's.
#[test]
fn a_row_change_keeps_the_scale_of_its_events() {
    let values = ["87.0", "87", "87.00", "87", "5.10", "5.1"];
    let items: Vec<(Epoch, i32, Classified)> = values
        .iter()
        .enumerate()
        .map(|(i, value)| {
            let json = format!(
                r#"{{"event_id":"s{i}","customer_id":"c{i}","event_type":"api_call","event_time":"{}","value":"{value}"}}"#,
                chrono::DateTime::from_timestamp(BASE_S, 0).unwrap().to_rfc3339(),
            );
            let event = decode_event(
                json.as_bytes(),
                (BASE_S + 86_400) * 1_000_000,
                &Limits::default(),
            )
            .unwrap();
            (0, 0, Classified::Count(event))
        })
        .collect();
    // No meter: each type has its default meter, the sum of the events' values named after the type.
    let controls = vec![(
        0,
        Control::Meters {
            version: 0,
            meters: Vec::new(),
        },
    )];
    for workers in [1, 2] {
        let (rows, _) = run_rounds(items.clone(), controls.clone(), workers);
        for (i, value) in values.iter().enumerate() {
            let customer = format!("c{i}");
            let sums: Vec<String> = rows
                .iter()
                .filter(|((_, c, meter, _), _)| *c == customer && meter == "api_call")
                .map(|(_, (sum, _))| sum.to_string())
                .collect();
            assert_eq!(sums, [value.to_string()], "{customer}, {workers} workers");
        }
    }
}
