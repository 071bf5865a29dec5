//! Rating in the dataflow against a plain reference rater (issue 4): random events (with voids) for
//! meters of every aggregation over two billing periods, and a random history of price books —
//! defaults and customer overrides, created, edited (model and range) and closed while events flow,
//! including edits of ranges already rated — through 1, 2 and 4 workers. The charges the sink ends up
//! with must equal what a brute-force rater computes from the final usage and the final books; and a
//! pipeline restarted half-way from its committed rows and charges (with the books changed while it
//! was down) must end up in the same place; and so must one restarted from rows tampered with, once a
//! re-rating job's correction of them reaches its rating while it runs (no restart).
//!
//! Length: one harness: the random history generator, the reference rater and the comparison only make
//! sense together.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meterflow_dataflow::classify::{classify, new_watermark};
use meterflow_dataflow::source::{owned_partitions, SourceMessage};
use meterflow_dataflow::worker::{Correction, RatingFeed};
use meterflow_dataflow::{
    run_worker, ControlFeed, Feeds, GraphContext, RawRecord, RecordKind, SinkChannels, WorkerConfig,
};
use meterflow_model::claims::SharedMemoryClaims;
use meterflow_model::stored::{ChargeKey, LineKey, LineTotals, Stored};
use meterflow_model::{
    period_of, Aggregation, Charge, EpochBatch, Format, Limits, Meter, PriceBook, PriceModel,
    RatingCorrection, RatingState, Tier, Window,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;

const PARTITIONS: i32 = 3;
const CUSTOMERS: u32 = 4;
const BASE_MS: i64 = 1_705_708_800_000; // 2024-01-20T00:00:00Z: events span January and February
const SPAN_MS: i64 = 21 * 86_400_000;
const DAY_US: i64 = 86_400_000_000;

fn meters() -> Vec<Meter> {
    let m = |name: &str, aggregation, property: Option<&str>, window| Meter {
        meter: name.into(),
        event_type: "api_call".into(),
        aggregation,
        value_property: property.map(str::to_owned),
        window,
        group_by: Default::default(),
        max_dimension_values: None,
    };
    vec![
        m("calls", Aggregation::Count, None, Window::Day),
        m(
            "tokens",
            Aggregation::Sum,
            Some("properties.tokens"),
            Window::Hour,
        ),
        m("peak", Aggregation::Max, Some("value"), Window::Day),
        m(
            "users",
            Aggregation::UniqueCount,
            Some("properties.user"),
            Window::Day,
        ),
        m("level", Aggregation::Latest, Some("value"), Window::Day),
    ]
}

/// A decoded event as the reference sees it.
#[derive(Clone, Debug)]
struct Ev {
    id: String,
    customer: String,
    time_us: i64,
    value: Decimal,
    user: String,
    tokens: Decimal,
}

fn random_events(rng: &mut SmallRng, n: usize) -> (Vec<RawRecord>, Vec<Ev>) {
    let mut offsets = vec![0i64; PARTITIONS as usize];
    let mut records = Vec::new();
    let mut events: Vec<(i32, Ev)> = Vec::new();
    let mut voided = BTreeSet::new();
    for i in 0..n {
        let c = rng.random_range(0..CUSTOMERS);
        let partition = (c % PARTITIONS as u32) as i32;
        let customer = format!("c{c}");
        let (kind, payload) = if rng.random_range(0..15) == 0 && !events.is_empty() {
            // A void of an earlier event of this partition.
            let candidates: Vec<&Ev> = events
                .iter()
                .filter(|(p, e)| *p == partition && !voided.contains(&e.id))
                .map(|(_, e)| e)
                .collect();
            let Some(e) = candidates.get(rng.random_range(0..candidates.len().max(1))) else {
                continue;
            };
            voided.insert(e.id.clone());
            let body = format!(
                r#"{{"event_id":"{}","customer_id":"{}"}}"#,
                e.id, e.customer
            );
            (RecordKind::Void, body.into_bytes())
        } else {
            let t_ms = BASE_MS + rng.random_range(0..SPAN_MS);
            let ev = Ev {
                id: format!("e{i}"),
                customer: customer.clone(),
                time_us: t_ms * 1000,
                value: Decimal::new(rng.random_range(0..10_000), 1),
                user: format!("\"u{}\"", rng.random_range(0..12)),
                tokens: Decimal::from(rng.random_range(0..2_000)),
            };
            let time = chrono::DateTime::from_timestamp_millis(t_ms)
                .unwrap()
                .to_rfc3339();
            let json = format!(
                r#"{{"event_id":"{}","customer_id":"{customer}","event_type":"api_call","event_time":"{time}","value":"{}","properties":{{"user":{},"tokens":{}}}}}"#,
                ev.id, ev.value, ev.user, ev.tokens
            );
            events.push((partition, ev));
            (RecordKind::Event(Format::Plain), json.into_bytes())
        };
        let offset = offsets[partition as usize];
        offsets[partition as usize] += 1;
        records.push(RawRecord {
            partition,
            offset,
            timestamp_ms: BASE_MS + SPAN_MS + 86_400_000,
            kind,
            payload,
        });
    }
    let live = events
        .into_iter()
        .map(|(_, e)| e)
        .filter(|e| !voided.contains(&e.id))
        .collect();
    (records, live)
}

fn random_model(rng: &mut SmallRng) -> PriceModel {
    let price = |rng: &mut SmallRng| Decimal::new(rng.random_range(1..500), 3);
    match rng.random_range(0..4) {
        0 => PriceModel::PerUnit {
            unit_price: price(rng),
        },
        1 | 2 => {
            let mut up = 0;
            let mut tiers: Vec<Tier> = (0..rng.random_range(1..4))
                .map(|_| {
                    up += rng.random_range(1..4000);
                    Tier {
                        up_to: Some(Decimal::from(up)),
                        unit_price: price(rng),
                        flat_fee: Decimal::from(rng.random_range(0..3)),
                    }
                })
                .collect();
            tiers.push(Tier {
                up_to: None,
                unit_price: price(rng),
                flat_fee: Decimal::ZERO,
            });
            if rng.random_bool(0.5) {
                PriceModel::Graduated { tiers }
            } else {
                PriceModel::Volume { tiers }
            }
        }
        _ => PriceModel::Package {
            package_size: Decimal::from(rng.random_range(1..50)),
            package_price: Decimal::new(rng.random_range(1..900), 2),
        },
    }
}

/// A random history of price-book sets: each step creates, edits (model, range end) or closes a book.
/// Books of one meter and scope never overlap, as the database guarantees.
fn random_book_history(rng: &mut SmallRng, steps: usize) -> Vec<Vec<PriceBook>> {
    let start_us = BASE_MS * 1000 - 25 * DAY_US;
    let mut books: Vec<PriceBook> = Vec::new();
    let mut history = Vec::new();
    let mut next_id = 0;
    for _ in 0..steps {
        match rng.random_range(0..4) {
            0 | 1 => {
                let meter = meters()[rng.random_range(0..5)].meter.clone();
                let customer = rng
                    .random_bool(0.3)
                    .then(|| format!("c{}", rng.random_range(0..CUSTOMERS)));
                let from = start_us + rng.random_range(0..50) * DAY_US;
                let to = rng
                    .random_bool(0.5)
                    .then(|| from + rng.random_range(1..30) * DAY_US);
                let book = PriceBook {
                    entries: Default::default(),
                    dimensions: Default::default(),
                    price_book_id: format!("pb{next_id}"),
                    meter,
                    customer_id: customer,
                    currency: "USD".into(),
                    effective_from: from,
                    effective_to: to,
                    model: random_model(rng),
                    minimum_per_period: None,
                };
                next_id += 1;
                let overlaps = books.iter().any(|b| {
                    b.meter == book.meter
                        && b.customer_id == book.customer_id
                        && b.overlaps(book.effective_from, book.effective_to.unwrap_or(i64::MAX))
                });
                if !overlaps {
                    books.push(book);
                }
            }
            2 if !books.is_empty() => {
                let i = rng.random_range(0..books.len());
                books[i].model = random_model(rng);
            }
            3 if !books.is_empty() => {
                // Close (or shorten) a book: an edit of ranges that may have been rated already.
                let i = rng.random_range(0..books.len());
                let b = &mut books[i];
                let end = b.effective_from + rng.random_range(1..20) * DAY_US;
                b.effective_to = Some(b.effective_to.map_or(end, |t| t.min(end)));
            }
            _ => {}
        }
        history.push(books.clone());
    }
    history
}

/// Upcoming-invoice lines: (customer, period, meter, book) → totals.
type Lines = BTreeMap<LineKey, LineTotals>;

/// The stored state a sink keeps: the model's statement of a commit, whose `apply` checks the sink's
/// rules (a charge appears or goes once, a withdrawn charge was the stored one, lines never have fewer
/// than no windows).
type Store = Stored;

/// What these tests read off the stored state.
trait Reads {
    fn lines_from_charges(&self) -> Lines;
    fn state(&self) -> RatingState;
}

impl Reads for Stored {
    /// The lines a sink should hold: the stored charges summed per (customer, period, meter, book).
    fn lines_from_charges(&self) -> Lines {
        let mut lines = Lines::new();
        for ((customer, meter, _, _), c) in &self.charges {
            let key = (
                customer.clone(),
                period_of(c.window_start).0,
                meter.clone(),
                c.price_book_id.clone(),
                c.dimensions.clone(),
            );
            let line = lines.entry(key).or_default();
            line.amount += c.amount;
            line.quantity += c.quantity;
            line.windows += 1;
        }
        lines
    }

    fn state(&self) -> RatingState {
        RatingState {
            rows: self
                .rows
                .iter()
                .map(|((k, i), a)| (k.clone(), i.clone(), *a))
                .collect(),
            charges: self
                .charges
                .iter()
                .map(|((c, m, _, _), ch)| (c.clone(), m.clone(), ch.clone()))
                .collect(),
            ..RatingState::default()
        }
    }
}

/// Runs the dataflow over `records` with `workers` workers, the book `history` fed one snapshot at a
/// time while the records flow, starting from what `store` holds (and the dedup `claims` made so far).
fn run(
    records: &[RawRecord],
    workers: usize,
    history: &[Vec<PriceBook>],
    store: Store,
    claims: SharedMemoryClaims,
) -> Store {
    run_correcting(records, workers, history, store, claims, None)
}

/// [`run`], with a re-rating job's `correction` handed to rating half-way through the records; panics
/// if it is not reported committed by the end.
fn run_correcting(
    records: &[RawRecord],
    workers: usize,
    history: &[Vec<PriceBook>],
    mut store: Store,
    claims: SharedMemoryClaims,
    correction: Option<RatingCorrection>,
) -> Store {
    // With a correction, the pipeline starts from the tampered rows (its `before` in place of its
    // `after`); the store keeps the truth, as the job's transaction restores it in Postgres.
    let state = match &correction {
        Some(c) => tampered(store.state(), c),
        None => store.state(),
    };
    let (batch_tx, batch_rx) = crossbeam_channel::bounded::<EpochBatch>(4);
    let (ack_tx, ack_rx) = crossbeam_channel::unbounded();
    let sink = Arc::new(Mutex::new(Some(SinkChannels {
        batches: batch_tx,
        acks: ack_rx,
    })));
    let (book_tx, book_rx) = crossbeam_channel::unbounded();
    let (correct_tx, correct_rx) = crossbeam_channel::unbounded();
    let feed = Arc::new(Mutex::new(Some(RatingFeed {
        state,
        books: history.first().cloned().unwrap_or_default(),
        updates: book_rx,
        corrections: correct_rx,
    })));
    let expect_committed = correction.is_some();
    let committed = Arc::new(AtomicBool::new(false));
    let told = committed.clone();
    let correction = Arc::new(Mutex::new(correction));
    let collector = std::thread::spawn(move || {
        for batch in batch_rx {
            // A batch the store refuses fails the test at once: the workers would otherwise hold the
            // epoch for an acknowledgement that never comes (the pipeline's process stops instead).
            if let Err(why) = store.apply(&batch) {
                eprintln!("the store refused epoch {}: {why}", batch.epoch);
                std::process::exit(101);
            }
            let _ = ack_tx.send(batch.epoch); // a heartbeat may come after the workers are done
        }
        store
    });
    let records = Arc::new(records.to_vec());
    let history = Arc::new(history.to_vec());
    let config = WorkerConfig {
        epoch_interval: Duration::from_millis(1),
        ..WorkerConfig::default()
    };
    let watermark = new_watermark(None);
    let context = GraphContext {
        allowed_lateness_micros: 3_600_000_000,
    };
    timely::execute(timely::Config::process(workers), move |worker| {
        let owned = owned_partitions(PARTITIONS, worker.index(), worker.peers());
        let (tx, rx) = crossbeam_channel::unbounded();
        let mine: Vec<RawRecord> = records
            .iter()
            .filter(|r| owned.contains(&r.partition))
            .cloned()
            .collect();
        let mut claims = claims.clone();
        let (sink, feed) = if worker.index() == 0 {
            (sink.lock().unwrap().take(), feed.lock().unwrap().take())
        } else {
            (None, None)
        };
        // Records and book changes interleave: a feeder sends a chunk, then (worker 0) the next books.
        let history = history.clone();
        let book_tx = book_tx.clone();
        let index = worker.index();
        let watermark = watermark.clone();
        let control = (index == 0).then(|| ControlFeed::fixed(meters(), watermark.clone()));
        let (correct_tx, correction, committed) =
            (correct_tx.clone(), correction.clone(), committed.clone());
        let feeder = std::thread::spawn(move || {
            let chunks: Vec<&[RawRecord]> = mine.chunks(40).collect();
            let steps = chunks.len().max(history.len());
            for step in 0..steps {
                if index == 0 && step == steps / 2 {
                    if let Some(change) = correction.lock().unwrap().take() {
                        let committed = committed.clone();
                        let committed = Box::new(move || {
                            committed.store(true, std::sync::atomic::Ordering::SeqCst)
                        });
                        correct_tx.send(Correction { change, committed }).unwrap();
                    }
                }
                if let Some(part) = chunks.get(step) {
                    let items =
                        classify(part, &mut claims, &Limits::default(), &watermark).unwrap();
                    tx.send(SourceMessage::Items(items)).unwrap();
                }
                if index == 0 {
                    if let Some(books) = history.get(step + 1) {
                        book_tx.send(books.clone()).unwrap();
                    }
                }
                std::thread::sleep(Duration::from_micros(300));
            }
            tx.send(SourceMessage::CaughtUp).unwrap();
        });
        let feeds = Feeds {
            sink,
            rating: feed,
            control,
        };
        run_worker(
            worker,
            &config,
            context.clone(),
            rx,
            feeds,
            &AtomicBool::new(false),
        )
        .unwrap();
        feeder.join().unwrap();
    })
    .unwrap();
    let store = collector.join().unwrap();
    if expect_committed {
        assert!(
            told.load(std::sync::atomic::Ordering::SeqCst),
            "the correction was reported committed"
        );
    }
    store
}

/// `state` with `correction.after`'s rows taken out and `correction.before`'s put in.
fn tampered(mut state: RatingState, correction: &RatingCorrection) -> RatingState {
    let replaced: BTreeSet<_> = correction
        .after
        .rows
        .iter()
        .map(|(k, i, _)| (k.clone(), i.clone()))
        .collect();
    state
        .rows
        .retain(|(k, i, _)| !replaced.contains(&(k.clone(), i.clone())));
    state.rows.extend(correction.before.rows.iter().cloned());
    state
}

/// The reference rater: windows from the raw events with their own arithmetic, then for each window
/// the period-to-date quantity before and including it recomputed from scratch, the book found by a
/// plain scan, `price(including) − price(before)`.
fn reference(events: &[Ev], books: &[PriceBook]) -> BTreeMap<ChargeKey, Charge> {
    let mut windows: BTreeMap<(String, String, i64), (i64, Vec<&Ev>)> = BTreeMap::new();
    for m in meters() {
        for e in events {
            let secs = m.window.seconds();
            let start = (e.time_us / 1_000_000).div_euclid(secs) * secs;
            windows
                .entry((e.customer.clone(), m.meter.clone(), start))
                .or_insert((start + secs, Vec::new()))
                .1
                .push(e);
        }
    }
    let aggregation = |meter: &str| meters().into_iter().find(|m| m.meter == meter).unwrap();
    // The period-to-date quantity over the given events of one meter.
    let ptd = |meter: &Meter, evs: &[&Ev]| -> Decimal {
        match meter.aggregation {
            Aggregation::Count => Decimal::from(evs.len()),
            Aggregation::Sum => evs.iter().map(|e| e.tokens).sum(),
            Aggregation::Max => evs.iter().map(|e| e.value).max().unwrap_or_default(),
            Aggregation::UniqueCount => {
                Decimal::from(evs.iter().map(|e| &e.user).collect::<BTreeSet<_>>().len())
            }
            Aggregation::Latest => evs
                .iter()
                .max_by_key(|e| (e.time_us, e.id.clone()))
                .map_or(Decimal::ZERO, |e| e.value),
        }
    };
    let mut charges = BTreeMap::new();
    for ((customer, meter, start), (end, _)) in &windows {
        let m = aggregation(meter);
        let (period, _) = period_of(*start);
        let in_period = |upto: i64, inclusive: bool| -> Vec<&Ev> {
            windows
                .range((customer.clone(), meter.clone(), period)..)
                .take_while(|((c, mm, s), _)| {
                    c == customer && mm == meter && period_of(*s).0 == period
                })
                .filter(|((_, _, s), _)| if inclusive { *s <= upto } else { *s < upto })
                .flat_map(|(_, (_, evs))| evs.iter().copied())
                .collect()
        };
        let at = start * 1_000_000;
        let covering = |own: bool| {
            books.iter().find(|b| {
                b.meter == *meter
                    && (b.customer_id.as_deref() == Some(customer.as_str())) == own
                    && (own || b.customer_id.is_none())
                    && b.effective_from <= at
                    && b.effective_to.is_none_or(|t| at < t)
            })
        };
        let Some(book) = covering(true).or_else(|| covering(false)) else {
            continue;
        };
        let before = ptd(&m, &in_period(*start, false));
        let including = ptd(&m, &in_period(*start, true));
        let amount = book.model.price(including).unwrap() - book.model.price(before).unwrap();
        charges.insert(
            (
                customer.as_str().into(),
                meter.as_str().into(),
                *start,
                Default::default(),
            ),
            Charge {
                dimensions: Default::default(),
                window_start: *start,
                window_end: *end,
                quantity: including - before,
                amount,
                currency: book.currency.as_str().into(),
                price_book_id: book.price_book_id.as_str().into(),
            },
        );
    }
    charges
}

fn assert_same(
    got: &BTreeMap<ChargeKey, Charge>,
    expected: &BTreeMap<ChargeKey, Charge>,
    context: &str,
) {
    let keys: BTreeSet<_> = got.keys().chain(expected.keys()).collect();
    let problems: Vec<String> = keys
        .into_iter()
        .filter(|k| {
            // Amounts compare as numbers (1.50 == 1.5); everything else exactly.
            match (got.get(*k), expected.get(*k)) {
                (Some(a), Some(b)) => {
                    a.amount != b.amount
                        || a.quantity != b.quantity
                        || a.price_book_id != b.price_book_id
                        || a.window_end != b.window_end
                }
                _ => true,
            }
        })
        .take(5)
        .map(|k| {
            format!(
                "{k:?}: got {:?}, expected {:?}",
                got.get(k),
                expected.get(k)
            )
        })
        .collect();
    assert!(
        problems.is_empty(),
        "{context}: {} charges, expected {}; first differences:\n{}",
        got.len(),
        expected.len(),
        problems.join("\n")
    );
}

#[test]
fn charges_equal_a_reference_rater_for_1_2_and_4_workers() {
    for seed in 0..3 {
        let mut rng = SmallRng::seed_from_u64(seed);
        let (records, events) = random_events(&mut rng, 1_500);
        let history = random_book_history(&mut rng, 40);
        let expected = reference(&events, history.last().unwrap());
        assert!(
            expected.len() > 100,
            "seed {seed}: the books price a good part of the usage ({} charges)",
            expected.len()
        );
        let customer_own = expected.values().filter(|c| {
            history
                .last()
                .unwrap()
                .iter()
                .any(|b| b.price_book_id == c.price_book_id && b.customer_id.is_some())
        });
        assert!(
            customer_own.count() > 0,
            "seed {seed}: some windows are priced by a customer's own book"
        );
        let negative = expected
            .values()
            .filter(|c| c.amount < Decimal::ZERO)
            .count();
        for workers in [1, 2, 4] {
            let store = run(
                &records,
                workers,
                &history,
                Store::default(),
                SharedMemoryClaims::default(),
            );
            assert_same(
                &store.charges,
                &expected,
                &format!("seed {seed}, {workers} workers ({negative} negative charges expected)"),
            );
            assert_eq!(
                store.lines,
                store.lines_from_charges(),
                "upcoming-invoice lines are the sums of the charges"
            );
        }
    }
}

#[test]
fn a_restart_from_committed_rows_and_charges_rates_like_an_uninterrupted_run() {
    let mut rng = SmallRng::seed_from_u64(7);
    let (records, events) = random_events(&mut rng, 1_500);
    let history = random_book_history(&mut rng, 40);
    let (first, second) = history.split_at(20);
    // The first run reads the records of the first half of each partition with the early books.
    let cut: Vec<RawRecord> = records
        .iter()
        .filter(|r| {
            r.offset
                < records
                    .iter()
                    .filter(|x| x.partition == r.partition)
                    .count() as i64
                    / 2
        })
        .cloned()
        .collect();
    let rest: Vec<RawRecord> = records
        .iter()
        .filter(|r| {
            !cut.iter()
                .any(|c| c.partition == r.partition && c.offset == r.offset)
        })
        .cloned()
        .collect();
    let claims = SharedMemoryClaims::default();
    let stored = run(&cut, 2, first, Store::default(), claims.clone());
    assert!(!stored.charges.is_empty());
    // Restart with other workers, the books having changed while it was down.
    let restarted = run(&rest, 4, second, stored, claims);
    assert_same(
        &restarted.charges,
        &reference(&events, history.last().unwrap()),
        "after a restart",
    );
    assert_eq!(restarted.lines, restarted.lines_from_charges());
}

/// A re-rating job corrects stored rows under a running pipeline (SPEC §7): the pipeline restarts from
/// rows tampered with (sums raised, multiset items dropped), and half-way through the rest of the
/// records the job's correction (the tampered rows before, the true ones after) reaches its rating.
/// The charges end where an uninterrupted run would, for 1, 2 and 4 workers; without the correction
/// they would not.
#[test]
fn a_correction_taken_in_while_running_rates_like_an_uninterrupted_run() {
    let mut rng = SmallRng::seed_from_u64(11);
    let (records, events) = random_events(&mut rng, 1_500);
    let history = random_book_history(&mut rng, 40);
    let (first, second) = history.split_at(20);
    let half = |r: &RawRecord| {
        r.offset
            < records
                .iter()
                .filter(|x| x.partition == r.partition)
                .count() as i64
                / 2
    };
    let cut: Vec<RawRecord> = records.iter().filter(|r| half(r)).cloned().collect();
    let rest: Vec<RawRecord> = records.iter().filter(|r| !half(r)).cloned().collect();
    let expected = reference(&events, history.last().unwrap());
    for workers in [1, 2, 4] {
        let claims = SharedMemoryClaims::default();
        let stored = run(&cut, 2, first, Store::default(), claims.clone());
        // Tamper with every third row: a group row's value raised, a multiset item dropped.
        let (mut before, mut after) = (Vec::new(), Vec::new());
        let keys: Vec<_> = stored.rows.keys().cloned().step_by(3).collect();
        assert!(keys.len() > 50, "enough rows to tamper with");
        for (key, item) in keys {
            let truth = stored.rows[&(key.clone(), item.clone())];
            after.push((key.clone(), item.clone(), truth));
            if item.is_none() {
                let mut raised = truth;
                raised.value += Decimal::from(7);
                before.push((key.clone(), None, raised));
            }
        }
        let correction = RatingCorrection {
            before: RatingState {
                rows: before,
                ..RatingState::default()
            },
            after: RatingState {
                rows: after,
                ..RatingState::default()
            },
        };
        let corrected = run_correcting(&rest, workers, second, stored, claims, Some(correction));
        assert_same(
            &corrected.charges,
            &expected,
            &format!("{workers} workers, a correction taken in while running"),
        );
        assert_eq!(corrected.lines, corrected.lines_from_charges());
    }
}
