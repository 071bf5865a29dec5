//! The graph alone, driven in explicit rounds: no reader threads, no clock, no sink. Each round feeds
//! classified events (and voids of earlier ones) at one epoch, advances every input, and steps the
//! workers until the epoch has passed; then the round's output must be exactly what its events cause
//! (`operators::build`'s contract): per row, the sum of the round's contributions, stamped with the
//! round's epoch, and nothing else. For 1, 2 and 4 workers, against a plain per-round sum.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use meterflow_dataflow::classify::{new_watermark, Classified, SourceItem};
use meterflow_dataflow::operators::{build, Epoch, RatingInputs};
use meterflow_dataflow::{GraphContext, MeterRegistry, SinkUpdate};
use meterflow_model::batch::QuarantinedPeriod;
use meterflow_model::{decode_event, Aggregation, Event, Limits, Meter, PriceBook, Window};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use timely::dataflow::operators::{Inspect, Probe};
use timely::dataflow::{InputHandleVec, ProbeHandle};

const ROUNDS: u64 = 12;
const PARTITIONS: i32 = 4;
const BASE_S: i64 = 1_705_320_000; // 2024-01-15T12:00:00Z

fn meters() -> Vec<Meter> {
    let m = |name: &str, aggregation, property: Option<&str>| Meter {
        meter: name.into(),
        event_type: "api_call".into(),
        aggregation,
        value_property: property.map(str::to_owned),
        window: Window::Hour,
    };
    vec![
        m("calls", Aggregation::Count, None),
        m("tokens", Aggregation::Sum, Some("value")),
    ]
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

/// The row changes a round must produce: per (customer, meter, window start), Σ value and Σ count.
fn expected(
    items: &[(Epoch, i32, Classified)],
) -> BTreeMap<(Epoch, String, String, i64), (Decimal, i64)> {
    let mut rows: BTreeMap<_, (Decimal, i64)> = BTreeMap::new();
    for (round, _, what) in items {
        let (event, sign) = match what {
            Classified::Count(e) => (e, 1),
            Classified::Retract(e) => (e, -1),
            _ => continue,
        };
        let start = (event.event_time_micros / 1_000_000).div_euclid(3600) * 3600;
        for meter in meters() {
            let value = match meter.aggregation {
                Aggregation::Count => Decimal::ONE,
                _ => event.value,
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
        }
    }
    rows.retain(|_, (v, n)| !v.is_zero() || *n != 0);
    rows
}

/// Runs the rounds through `build` on `workers` workers; returns the row changes by epoch.
fn run_rounds(
    items: Vec<(Epoch, i32, Classified)>,
    workers: usize,
) -> BTreeMap<(Epoch, String, String, i64), (Decimal, i64)> {
    let seen: Arc<Mutex<Vec<(Epoch, Epoch, SinkUpdate)>>> = Arc::default();
    let items = Arc::new(items);
    let collected = seen.clone();
    timely::execute(timely::Config::process(workers), move |worker| {
        let context = GraphContext {
            meters: MeterRegistry::new(meters()),
            watermark: new_watermark(None),
            allowed_lateness_micros: 3_600_000_000,
        };
        let seen = collected.clone();
        let probe = ProbeHandle::new();
        let (mut input, mut markers, mut rows, mut charges, mut quarantines, mut books) =
            worker.dataflow::<Epoch, _, _>(|scope| {
                let mut input = InputHandleVec::<Epoch, SourceItem>::new();
                let mut markers =
                    InputHandleVec::<Epoch, (Epoch, meterflow_model::PartitionProgress)>::new();
                let mut rows = InputHandleVec::new();
                let mut charges = InputHandleVec::new();
                let mut quarantines =
                    InputHandleVec::<Epoch, (QuarantinedPeriod, Epoch, isize)>::new();
                let mut books = InputHandleVec::<Epoch, (PriceBook, Epoch, isize)>::new();
                let rating = RatingInputs {
                    restored_rows: rows.to_stream(scope),
                    restored_charges: charges.to_stream(scope),
                    restored_quarantines: quarantines.to_stream(scope),
                    books: books.to_stream(scope),
                };
                build(
                    input.to_stream(scope),
                    markers.to_stream(scope),
                    rating,
                    context,
                )
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
                (input, markers, rows, charges, quarantines, books)
            });
        let (index, peers) = (worker.index(), worker.peers());
        for round in 0..ROUNDS {
            // Each worker feeds the partitions it owns, as its reader would.
            for (at, partition, what) in items.iter() {
                if *at == round && (*partition as usize) % peers == index {
                    input.send(SourceItem {
                        partition: *partition,
                        offset: 0,
                        what: what.clone(),
                    });
                }
            }
            let next = round + 1;
            input.advance_to(next);
            markers.advance_to(next);
            rows.advance_to(next);
            charges.advance_to(next);
            quarantines.advance_to(next);
            books.advance_to(next);
            while probe.less_than(&next) {
                worker.step();
            }
        }
    })
    .unwrap();
    let mut rows: BTreeMap<_, (Decimal, i64)> = BTreeMap::new();
    for (at, epoch, update) in seen.lock().unwrap().iter() {
        assert!(
            at <= epoch,
            "an update never travels under a later capability than its epoch"
        );
        if let SinkUpdate::Row(key, None, change) = update {
            let row = rows
                .entry((
                    *epoch,
                    key.customer_id.clone(),
                    key.meter.clone(),
                    key.window_start,
                ))
                .or_default();
            row.0 += change.value;
            row.1 += change.event_count;
        }
    }
    rows.retain(|_, (v, n)| !v.is_zero() || *n != 0);
    rows
}

#[test]
fn each_round_outputs_exactly_its_own_row_changes_for_1_2_and_4_workers() {
    for seed in 0..3 {
        let items = random_rounds(seed);
        let want = expected(&items);
        assert!(want.len() > 50, "seed {seed}: enough rows to compare");
        for workers in [1, 2, 4] {
            assert_eq!(
                run_rounds(items.clone(), workers),
                want,
                "seed {seed}, {workers} workers"
            );
        }
    }
}
