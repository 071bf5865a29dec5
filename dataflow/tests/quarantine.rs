//! Overflow is data, not a crash (issue 13, findings 3 and 17): a window whose usage leaves the 96-bit
//! decimal range, or a period whose price does, is quarantined — the dataflow never panics, the
//! period keeps the charges of the windows before it, the sink is told which row and which period, and
//! every other customer is rated as usual. And a charge keeps its usage's decimal scale.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meterflow_dataflow::classify::{classify, new_watermark};
use meterflow_dataflow::source::SourceMessage;
use meterflow_dataflow::worker::RatingFeed;
use meterflow_dataflow::{
    run_worker, Feeds, GraphContext, RawRecord, RecordKind, SinkChannels, WorkerConfig,
};
use meterflow_model::batch::{QuarantineReason, QuarantinedPeriod};
use meterflow_model::claims::SharedMemoryClaims;
use meterflow_model::{
    Aggregate, AggregateKey, Charge, EpochBatch, Format, Limits, PriceBook, PriceModel, RatingState,
};
use rust_decimal::Decimal;

const HOUR: i64 = 3_600;
/// 2024-01-15T10:00:00Z, in January's billing period.
const W1: i64 = 1_705_312_800;
const JANUARY: i64 = 1_704_067_200;

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn key(customer: &str, start: i64) -> AggregateKey {
    AggregateKey {
        dimensions: Default::default(),
        customer_id: customer.into(),
        meter: "api_call".into(),
        window_start: start,
        window_end: start + HOUR,
    }
}

fn event(id: &str, customer: &str, time: i64, value: &str, offset: i64) -> RawRecord {
    let time = chrono::DateTime::from_timestamp(time + 60, 0)
        .unwrap()
        .to_rfc3339();
    RawRecord {
        partition: 0,
        offset,
        timestamp_ms: (W1 + 30 * 86_400) * 1000,
        kind: RecordKind::Event(Format::Plain),
        payload: format!(
            r#"{{"event_id":"{id}","customer_id":"{customer}","event_type":"api_call","event_time":"{time}","value":"{value}"}}"#
        )
        .into_bytes(),
    }
}

fn per_unit(price: &str) -> PriceBook {
    PriceBook {
        entries: Default::default(),
        dimensions: Default::default(),
        price_book_id: "pb".into(),
        meter: "api_call".into(),
        customer_id: None,
        currency: "USD".into(),
        effective_from: 0,
        effective_to: None,
        model: PriceModel::PerUnit {
            unit_price: dec(price),
        },
        minimum_per_period: None,
    }
}

/// What the sink was handed, applied as the Postgres sink would: charges by window, quarantined rows,
/// quarantined periods.
#[derive(Default, Debug)]
struct Seen {
    charges: BTreeMap<(String, i64), Charge>,
    rows: BTreeSet<AggregateKey>,
    periods: BTreeMap<QuarantinedPeriod, i64>,
    dead_letters: usize,
}

/// Runs one worker over `records`, starting from `state` with `books`.
fn run(records: Vec<RawRecord>, state: RatingState, books: Vec<PriceBook>) -> Seen {
    let (batch_tx, batch_rx) = crossbeam_channel::bounded::<EpochBatch>(4);
    let (ack_tx, ack_rx) = crossbeam_channel::unbounded();
    let sink = Arc::new(Mutex::new(Some(SinkChannels {
        batches: batch_tx,
        acks: ack_rx,
    })));
    let (_book_tx, book_rx) = crossbeam_channel::unbounded();
    let feed = Arc::new(Mutex::new(Some(RatingFeed {
        state,
        books,
        updates: book_rx,
        corrections: crossbeam_channel::never(),
    })));
    let collector = std::thread::spawn(move || {
        let mut seen = Seen::default();
        for batch in batch_rx {
            for (customer, _, charge, diff) in &batch.charges {
                let window = (customer.to_string(), charge.window_start);
                if *diff > 0 {
                    seen.charges.insert(window, charge.clone());
                } else if !batch
                    .charges
                    .iter()
                    .any(|c| c.3 > 0 && (&c.0, c.2.window_start) == (customer, window.1))
                {
                    seen.charges.remove(&window);
                }
            }
            seen.rows.extend(batch.quarantined_rows.iter().cloned());
            seen.dead_letters += batch.dead_letters.len();
            for (period, diff) in &batch.quarantined_periods {
                *seen.periods.entry(period.clone()).or_default() += diff;
            }
            seen.periods.retain(|_, n| *n != 0);
            let _ = ack_tx.send(batch.epoch); // a heartbeat may come after the workers are done
        }
        seen
    });
    let config = WorkerConfig {
        epoch_interval: Duration::from_millis(1),
        ..WorkerConfig::default()
    };
    let watermark = new_watermark(None);
    let context = GraphContext {
        allowed_lateness_micros: 3_600_000_000,
    };
    let records = Arc::new(records);
    timely::execute(timely::Config::thread(), move |worker| {
        let (tx, rx) = crossbeam_channel::unbounded();
        let items = classify(
            &records,
            &mut SharedMemoryClaims::default(),
            &Limits::default(),
            &watermark,
        )
        .unwrap();
        tx.send(SourceMessage::Items(items)).unwrap();
        tx.send(SourceMessage::CaughtUp).unwrap();
        run_worker(
            worker,
            &config,
            context.clone(),
            rx,
            Feeds {
                sink: sink.lock().unwrap().take(),
                rating: feed.lock().unwrap().take(),
                control: None,
            },
            &AtomicBool::new(false),
        )
        .unwrap();
    })
    .unwrap();
    collector.join().unwrap()
}

/// Finding 3: a window's stored usage plus new events leaves the decimal range. No panic: the row and
/// the period are quarantined from that window on, the earlier window keeps its charge, and another
/// customer is rated as usual.
#[test]
fn finding_03_a_usage_overflow_quarantines_the_window_and_its_period_only() {
    let near_max = Decimal::MAX - dec("100");
    let state = RatingState {
        rows: vec![
            (key("a", W1), None, Aggregate::of(dec("10"))),
            (key("a", W1 + HOUR), None, Aggregate::of(near_max)),
        ],
        ..RatingState::default()
    };
    let records = vec![
        event("e1", "a", W1 + HOUR, "1000", 0),
        event("e2", "b", W1, "5", 1),
    ];
    let seen = run(records, state, vec![per_unit("1")]);
    assert_eq!(
        seen.charges.get(&("a".into(), W1)).map(|c| c.amount),
        Some(dec("10")),
        "the window before the overflow keeps its charge: {seen:?}"
    );
    assert!(!seen.charges.contains_key(&("a".into(), W1 + HOUR)));
    assert_eq!(
        seen.charges.get(&("b".into(), W1)).map(|c| c.amount),
        Some(dec("5")),
        "another customer is rated as usual"
    );
    assert_eq!(
        seen.periods.keys().cloned().collect::<Vec<_>>(),
        vec![QuarantinedPeriod {
            dimensions: Default::default(),
            customer_id: "a".into(),
            meter: "api_call".into(),
            period_start: JANUARY,
            from_window: W1 + HOUR,
            reason: QuarantineReason::UsageOverflow,
        }]
    );
}

/// Finding 3, within one epoch: events whose sum overflows one row quarantine that row (the sink is
/// told), not the pipeline.
#[test]
fn finding_03_an_epoch_whose_contributions_overflow_a_row_quarantines_the_row() {
    let nines = "9999999999999999999999999999";
    let records: Vec<RawRecord> = (0..10)
        .map(|i| event(&format!("n{i}"), "a", W1, nines, i))
        .chain([event("ok", "b", W1, "5", 10)])
        .collect();
    let seen = run(records, RatingState::default(), vec![per_unit("1")]);
    if seen.dead_letters == 0 {
        // Only when validation lets 28-digit values through is there anything to quarantine.
        assert_eq!(seen.rows, BTreeSet::from([key("a", W1)]), "{seen:?}");
        assert_eq!(seen.periods.len(), 1, "{seen:?}");
    }
    assert_eq!(
        seen.charges.get(&("b".into(), W1)).map(|c| c.amount),
        Some(dec("5")),
        "another customer is rated as usual: {seen:?}"
    );
}

/// Finding 17: pricing the period overflows at a window (value × price past the range). The windows
/// before it keep their charges (they used to be withdrawn with the whole period), and the period is
/// quarantined from that window on.
#[test]
fn finding_17_a_rating_overflow_keeps_earlier_charges_and_quarantines_the_period() {
    let state = RatingState {
        rows: vec![
            (key("c", W1), None, Aggregate::of(dec("10"))),
            (
                key("c", W1 + 2 * HOUR),
                None,
                Aggregate::of(dec("40000000000000000000000000000")),
            ),
        ],
        ..RatingState::default()
    };
    let records = vec![event("e1", "c", W1 + HOUR, "1", 0)];
    let seen = run(records, state, vec![per_unit("2")]);
    assert_eq!(
        seen.charges
            .iter()
            .map(|((c, w), ch)| (c.as_str(), *w, ch.amount))
            .collect::<Vec<_>>(),
        vec![("c", W1, dec("20")), ("c", W1 + HOUR, dec("2"))],
        "{seen:?}"
    );
    assert_eq!(
        seen.periods.keys().cloned().collect::<Vec<_>>(),
        vec![QuarantinedPeriod {
            dimensions: Default::default(),
            customer_id: "c".into(),
            meter: "api_call".into(),
            period_start: JANUARY,
            from_window: W1 + 2 * HOUR,
            reason: QuarantineReason::RatingOverflow,
        }]
    );
}

/// A window's charge keeps the scale of its usage: a quantity of 87.00 is charged as 87.00 and one of
/// 87 as 87. Rating reads the row changes, so when those took a neighbour's scale (differential's
/// `consolidate` reuses the previous key's equal (time, diff), and decimals are equal whatever their
/// scale; `rounds.rs::a_row_change_keeps_the_scale_of_its_events`), 4 of these 6 charges did too.
#[test]
fn a_charge_keeps_the_scale_of_its_usage() {
    let values = ["87.0", "87", "87.00", "87", "5.10", "5.1"];
    let records = values
        .iter()
        .zip(0..)
        .map(|(value, i)| event(&format!("q{i}"), &format!("c{i}"), W1, value, i))
        .collect();
    let seen = run(records, RatingState::default(), vec![per_unit("1")]);
    let got: Vec<(&str, String)> = seen
        .charges
        .iter()
        .map(|((customer, _), charge)| (customer.as_str(), charge.quantity.to_string()))
        .collect();
    let customers: Vec<String> = (0..values.len()).map(|i| format!("c{i}")).collect();
    let want: Vec<(&str, String)> = customers
        .iter()
        .zip(values)
        .map(|(customer, value)| (customer.as_str(), value.to_string()))
        .collect();
    assert_eq!(got, want);
}
