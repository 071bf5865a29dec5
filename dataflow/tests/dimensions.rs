//! Meter dimensions (issue 17) through the graph, against a brute-force reference: random events over
//! three properties (`model`, `region`, `user`), some missing and some spelled two ways (`1.50` and
//! `1.5`), duplicates of one value under another spelling, and voids, through meters with and without
//! `group_by` of every kind, and a random history of price books, plain and dimensioned (a graduated
//! default whose tiers count each dimension value's usage alone, defaults for one model, for one model
//! in one region and for a missing model, and one customer's own for one model; the most specific
//! wins, and half the time a rate card). Retries of counted events come as duplicates, and events
//! arrive out of event-time order over five hours with an hour of allowed lateness, so some are late.
//! The final rows, charges and upcoming lines, and the totals an invoice of those lines issues, must
//! equal what a plain loop computes from the counted events and the books in force at the end, for
//! 1, 2 and 4 workers.
//!
//! The reference knows each event's dimension values from how it generated them, not from
//! `GroupBy::values`, so a wrong spelling or a merge of two values shows.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use meterflow_dataflow::classify::{Classified, SourceItem};
use meterflow_dataflow::operators::{build, Epoch};
use meterflow_dataflow::{Control, GraphContext, GraphInputs, SinkUpdate};
use meterflow_model::batch::{DimensionValue, Duplicate, DuplicateKind};
use meterflow_model::invoice::{draft, PeriodUsage};
use meterflow_model::{
    decode_event, period_of, Aggregation, Dimensions, Event, GroupBy, Item, Limits, Meter,
    PriceBook, PriceModel, RateEntry, RatingState, Tier, Window,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use timely::dataflow::operators::{Inspect, Probe};
use timely::dataflow::ProbeHandle;

const ROUNDS: u64 = 8;
const PARTITIONS: i32 = 4;
const BASE_S: i64 = 1_705_320_000; // 2024-01-15T12:00:00Z

/// A generated event: what it was sent as, and the dimension values the reference gives it.
#[derive(Clone, Debug)]
struct Sent {
    event: Event,
    model: Option<&'static str>,
    region: Option<&'static str>,
    user: u32,
}

fn meter(name: &str, aggregation: Aggregation, value: Option<&str>, group_by: &[&str]) -> Meter {
    Meter {
        meter: name.into(),
        event_type: "llm".into(),
        aggregation,
        value_property: value.map(str::to_owned),
        window: Window::Hour,
        group_by: GroupBy::new(group_by.iter().map(|k| k.to_string()).collect()).unwrap(),
        max_dimension_values: None,
    }
}

fn meters() -> Vec<Meter> {
    vec![
        meter(
            "tokens",
            Aggregation::Sum,
            Some("value"),
            &["region", "model"],
        ),
        meter("calls", Aggregation::Count, None, &["model"]),
        meter(
            "users",
            Aggregation::UniqueCount,
            Some("properties.user"),
            &["region"],
        ),
        meter("requests", Aggregation::Count, None, &[]),
    ]
}

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

/// Tokens: a graduated default book, so a window's charge depends on its dimension values' usage
/// before it; a default book for one model, and one customer's own book for another.
fn books() -> Vec<PriceBook> {
    let graduated = PriceBook {
        entries: Default::default(),
        price_book_id: "tokens-default".into(),
        meter: "tokens".into(),
        customer_id: None,
        currency: "USD".into(),
        effective_from: 0,
        effective_to: None,
        model: PriceModel::Graduated {
            tiers: vec![
                Tier {
                    up_to: Some(d("150")),
                    unit_price: d("0.01"),
                    flat_fee: d("0"),
                },
                Tier {
                    up_to: None,
                    unit_price: d("0.002"),
                    flat_fee: d("0"),
                },
            ],
        },
        minimum_per_period: None,
        dimensions: Dimensions::default(),
    };
    vec![
        graduated.clone(),
        // The small model at its own price, and customer c1's own price for the large one.
        PriceBook {
            price_book_id: "tokens-small".into(),
            dimensions: selector(&[("model", Some("small"))]),
            model: PriceModel::PerUnit {
                unit_price: d("0.003"),
            },
            ..graduated.clone()
        },
        PriceBook {
            price_book_id: "tokens-c1-large".into(),
            customer_id: Some("c1".into()),
            dimensions: selector(&[("model", Some("large"))]),
            model: PriceModel::PerUnit {
                unit_price: d("0.0005"),
            },
            ..graduated
        },
    ]
}

fn selector(pairs: &[(&str, Option<&str>)]) -> Dimensions {
    Dimensions::from_pairs(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_owned))),
    )
}

/// The book that prices a tokens window of `customer` with `dimensions`, chosen plainly: of the
/// books whose scope and selector fit, the customer's own before a default, then more keys.
fn book_of<'a>(
    books: &'a [PriceBook],
    customer: &str,
    dimensions: &Dimensions,
) -> Option<&'a PriceBook> {
    books
        .iter()
        .filter(|b| b.customer_id.as_deref().is_none_or(|c| c == customer))
        .filter(|b| {
            b.dimensions
                .iter()
                .all(|(key, value)| dimensions.iter().any(|(k, v)| k == key && v == value))
        })
        .max_by_key(|b| (b.customer_id.is_some(), b.dimensions.iter().count()))
}

/// A random history of the books: at round 0 and at random later rounds the set in force is redrawn
/// from a pool (a graduated default at one of two prices, defaults for `{"model": "small"}`,
/// `{"model": "large"}`, `{"model": "large", "region": "eu"}` and `{"model": null}`, and c1's own for
/// the large model), each kept with probability 0.6, and half the time a rate card in place of the
/// large and null defaults; the changes are fed as they happen. Returns the
/// changes and the set in force at the end.
fn book_history(seed: u64) -> (Vec<(Epoch, PriceBook, isize)>, Vec<PriceBook>) {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0xb00c);
    let pool = |rng: &mut SmallRng| -> Vec<PriceBook> {
        let mut books = books();
        if rng.random_bool(0.5) {
            books[0].model = PriceModel::PerUnit {
                unit_price: d("0.004"),
            };
        }
        let base = books[1].clone();
        let with = |id: &str, pairs: &[(&str, Option<&str>)], price: &str| PriceBook {
            price_book_id: id.into(),
            customer_id: None,
            dimensions: selector(pairs),
            model: PriceModel::PerUnit {
                unit_price: d(price),
            },
            ..base.clone()
        };
        books.push(with("tokens-large", &[("model", Some("large"))], "0.006"));
        books.push(with(
            "tokens-large-eu",
            &[("model", Some("large")), ("region", Some("eu"))],
            "0.007",
        ));
        books.push(with("tokens-none", &[("model", None)], "0.008"));
        books.retain(|_| rng.random_bool(0.6));
        // Half the time the large and null models are priced by one rate card instead, which also
        // prices the small model in the us region: its entries reach the graph as books sharing
        // the card's id (`PriceBook::priced`, as `load_price_books` gives them).
        if rng.random_bool(0.5) {
            books.retain(|b| b.price_book_id != "tokens-large" && b.price_book_id != "tokens-none");
            let entry = |pairs: &[(&str, Option<&str>)], price: &str| RateEntry {
                dimensions: selector(pairs),
                model: PriceModel::PerUnit {
                    unit_price: d(price),
                },
            };
            let mut card = with("tokens-card", &[], "0");
            card.set_entries(vec![
                entry(&[("model", Some("large"))], "0.006"),
                entry(&[("model", None)], "0.008"),
                entry(&[("model", Some("small")), ("region", Some("us"))], "0.009"),
            ]);
            books.extend(card.priced());
        }
        books
    };
    let mut changes = Vec::new();
    let mut current: Vec<PriceBook> = Vec::new();
    for round in 0..ROUNDS {
        if round > 0 && !rng.random_bool(0.5) {
            continue;
        }
        let next = pool(&mut rng);
        for gone in current.iter().filter(|b| !next.contains(b)) {
            changes.push((round, gone.clone(), -1));
        }
        for new in next.iter().filter(|b| !current.contains(b)) {
            changes.push((round, new.clone(), 1));
        }
        current = next;
    }
    (changes, current)
}

/// The model property: its JSON spelling, and the value it is.
const MODELS: [(&str, &str); 4] = [
    (r#""small""#, "small"),
    (r#""l\u0061rge""#, "large"),
    ("1.50", "1.5"),
    ("1.5", "1.5"),
];
const REGIONS: [&str; 2] = ["eu", "us"];

/// `(round, partition, item)` per round, and every event sent.
fn random_rounds(seed: u64) -> Vec<(Epoch, i32, Classified, Sent)> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut counted: Vec<Sent> = Vec::new();
    let mut out = Vec::new();
    for round in 0..ROUNDS {
        for i in 0..rng.random_range(10..60) {
            let model = rng
                .random_bool(0.85)
                .then(|| MODELS[rng.random_range(0..4)]);
            let region = rng
                .random_bool(0.8)
                .then(|| REGIONS[rng.random_range(0..2)]);
            let user = rng.random_range(0..5);
            let mut properties = vec![format!(r#""user":"u{user}""#)];
            if let Some((spelled, _)) = model {
                properties.push(format!(r#""model":{spelled}"#));
            }
            if let Some(region) = region {
                properties.push(format!(r#""region":"{region}""#));
            }
            let json = format!(
                r#"{{"event_id":"e{round}-{i}","customer_id":"c{}","event_type":"llm","event_time":"{}","value":"{}","properties":{{{}}}}}"#,
                rng.random_range(0..3),
                chrono::DateTime::from_timestamp(BASE_S + rng.random_range(0..5 * 3600), 0)
                    .unwrap()
                    .to_rfc3339(),
                rng.random_range(1..60),
                properties.join(","),
            );
            let event = decode_event(
                json.as_bytes(),
                (BASE_S + 86_400) * 1_000_000,
                &Limits::default(),
            )
            .unwrap();
            let sent = Sent {
                event: event.clone(),
                model: model.map(|(_, v)| v),
                region,
                user,
            };
            counted.push(sent.clone());
            out.push((
                round,
                rng.random_range(0..PARTITIONS),
                Classified::Count(event),
                sent,
            ));
        }
        // A retry of a counted event: the claim store's duplicate, which counts nowhere.
        if !counted.is_empty() && rng.random_bool(0.5) {
            let again = counted[rng.random_range(0..counted.len())].clone();
            out.push((
                round,
                rng.random_range(0..PARTITIONS),
                Classified::Duplicate(Duplicate {
                    event_id: again.event.event_id.clone(),
                    partition: 0,
                    offset: 0,
                    kind: DuplicateKind::Identical,
                    payload: Vec::new(),
                }),
                again,
            ));
        }
        if !counted.is_empty() && rng.random_bool(0.7) {
            let voided = counted.swap_remove(rng.random_range(0..counted.len()));
            out.push((
                round,
                rng.random_range(0..PARTITIONS),
                Classified::Retract(voided.event.clone()),
                voided,
            ));
        }
    }
    out
}

/// A row: (customer, meter, dimension values as JSON, window start).
type RowKey = (String, String, String, i64);
/// Group rows: Σ value, Σ count. Multiset rows: the distinct items.
#[derive(Debug, Default, PartialEq)]
struct Outcome {
    rows: BTreeMap<RowKey, (Decimal, i64)>,
    items: BTreeMap<RowKey, BTreeSet<String>>,
    /// Per window: (quantity, amount, price book).
    charges: BTreeMap<RowKey, (Decimal, Decimal, String)>,
    /// Upcoming-invoice lines: per (customer, period, meter, dimension values, book), Σ amount and
    /// windows.
    lines: BTreeMap<LineId, (Decimal, i64)>,
}

/// An upcoming line: (customer, period start, meter, dimension values as JSON, price book).
type LineId = (String, i64, String, String, String);

fn dims(pairs: &[(&str, Option<&str>)]) -> String {
    Dimensions::from_pairs(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_owned))),
    )
    .to_string()
}

/// What the counted (sent and not voided) events make, computed plainly.
fn expected(rounds: &[(Epoch, i32, Classified, Sent)], books: &[PriceBook]) -> Outcome {
    let mut counted: BTreeMap<String, Sent> = BTreeMap::new();
    for (_, _, what, sent) in rounds {
        match what {
            Classified::Count(_) => {
                counted.insert(sent.event.event_id.clone(), sent.clone());
            }
            Classified::Duplicate(_) => {}
            _ => {
                counted.remove(&sent.event.event_id);
            }
        }
    }
    let mut out = Outcome::default();
    for s in counted.values() {
        let start = (s.event.event_time_micros / 1_000_000).div_euclid(3600) * 3600;
        let c = s.event.customer_id.clone();
        let row = |meter: &str, dims: String| (c.clone(), meter.to_owned(), dims, start);
        let tokens = out
            .rows
            .entry(row(
                "tokens",
                dims(&[("model", s.model), ("region", s.region)]),
            ))
            .or_default();
        tokens.0 += s.event.value;
        tokens.1 += 1;
        let calls = out
            .rows
            .entry(row("calls", dims(&[("model", s.model)])))
            .or_default();
        calls.0 += Decimal::ONE;
        calls.1 += 1;
        let requests = out.rows.entry(row("requests", "{}".into())).or_default();
        requests.0 += Decimal::ONE;
        requests.1 += 1;
        out.items
            .entry(row("users", dims(&[("region", s.region)])))
            .or_default()
            .insert(format!("\"u{}\"", s.user));
    }
    // Tokens, rated per (customer, dimension values, period), windows in time order.
    let mut before: BTreeMap<(String, String, i64), Decimal> = BTreeMap::new();
    for ((customer, meter, dims, start), (value, _)) in &out.rows {
        if meter != "tokens" {
            continue;
        }
        let parsed: Dimensions = dims.parse().unwrap();
        let Some(book) = book_of(books, customer, &parsed) else {
            continue;
        };
        let period = period_of(*start).0;
        let ptd = before
            .entry((customer.clone(), dims.clone(), period))
            .or_default();
        let amount = book.model.price(*ptd + value).unwrap() - book.model.price(*ptd).unwrap();
        *ptd += value;
        out.charges.insert(
            (customer.clone(), meter.clone(), dims.clone(), *start),
            (*value, amount, book.price_book_id.clone()),
        );
    }
    // The lines are the charges summed per (customer, period, meter, values, book).
    for ((customer, meter, dims, start), (_, amount, book)) in &out.charges {
        let line = out
            .lines
            .entry((
                customer.clone(),
                period_of(*start).0,
                meter.clone(),
                dims.clone(),
                book.clone(),
            ))
            .or_default();
        line.0 += amount;
        line.1 += 1;
    }
    out
}

/// Runs the rounds through `build` on `workers` workers; the final rows and charges.
fn run(
    rounds: Vec<(Epoch, i32, Classified, Sent)>,
    history: Vec<(Epoch, PriceBook, isize)>,
    workers: usize,
) -> Outcome {
    outcome(&updates(rounds, history, workers, meters(), Vec::new()))
}

/// Runs the rounds through `build` on `workers` workers under `meters`, with the values `admitted`
/// before; every update the graph gives.
fn updates(
    rounds: Vec<(Epoch, i32, Classified, Sent)>,
    history: Vec<(Epoch, PriceBook, isize)>,
    workers: usize,
    meters: Vec<Meter>,
    admitted: Vec<DimensionValue>,
) -> Vec<SinkUpdate> {
    let seen: Arc<Mutex<Vec<SinkUpdate>>> = Arc::default();
    let rounds = Arc::new(rounds);
    let history = Arc::new(history);
    let (meters, admitted) = (Arc::new(meters), Arc::new(admitted));
    let collected = seen.clone();
    timely::execute(timely::Config::process(workers), move |worker| {
        let context = GraphContext {
            allowed_lateness_micros: 3_600_000_000,
        };
        let seen = collected.clone();
        let probe = ProbeHandle::new();
        let mut inputs = worker.dataflow::<Epoch, _, _>(|scope| {
            let mut inputs = GraphInputs::default();
            build(inputs.streams(scope), context)
                .inspect(move |(_, update)| seen.lock().unwrap().push(update.clone()))
                .probe_with(&probe);
            inputs
        });
        let (index, peers) = (worker.index(), worker.peers());
        if index == 0 {
            inputs.control.send(Control::Meters {
                version: 0,
                meters: meters.to_vec(),
            });
            inputs.send_state(
                RatingState {
                    dimension_values: admitted.to_vec(),
                    ..RatingState::default()
                },
                0,
                1,
            );
        }
        for round in 0..ROUNDS {
            if index == 0 && round > 0 {
                // The committed watermark advances half an hour a round: from round 4 the first
                // hour's window is closed (its end and an hour's lateness passed), and its events
                // still count, reported late.
                let at = BASE_S + 1800 * round as i64;
                inputs.control.send(Control::Watermark(at * 1_000_000));
            }
            if index == 0 {
                for (at, book, diff) in history.iter() {
                    if *at == round {
                        inputs.books.send((book.clone(), round, *diff));
                    }
                }
            }
            for (at, partition, what, _) in rounds.iter() {
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
    let seen = seen.lock().unwrap().clone();
    seen
}

/// The final rows and charges `updates` make.
fn outcome(updates: &[SinkUpdate]) -> Outcome {
    let mut out = Outcome::default();
    let mut items: BTreeMap<(RowKey, String), i64> = BTreeMap::new();
    let mut charges: BTreeMap<(RowKey, Decimal, Decimal, String), i64> = BTreeMap::new();
    for update in updates {
        match update {
            SinkUpdate::Row(key, item, change) => {
                let row = (
                    key.customer_id.to_string(),
                    key.meter.to_string(),
                    key.dimensions.to_string(),
                    key.window_start,
                );
                match item {
                    None => {
                        let r = out.rows.entry(row).or_default();
                        r.0 += change.value;
                        r.1 += change.event_count;
                    }
                    Some(Item::Unique(user)) => {
                        *items.entry((row, user.clone())).or_default() += change.event_count
                    }
                    Some(other) => panic!("no meter here holds {other:?}"),
                }
            }
            SinkUpdate::Charge(customer, meter, charge, diff) => {
                let row = (
                    customer.to_string(),
                    meter.to_string(),
                    charge.dimensions.to_string(),
                    charge.window_start,
                );
                *charges
                    .entry((
                        row,
                        charge.quantity.normalize(),
                        charge.amount.normalize(),
                        charge.price_book_id.to_string(),
                    ))
                    .or_default() += diff;
            }
            SinkUpdate::Line(l) => {
                let line = out
                    .lines
                    .entry((
                        l.customer_id.to_string(),
                        l.period_start,
                        l.meter.to_string(),
                        l.dimensions.to_string(),
                        l.price_book_id.to_string(),
                    ))
                    .or_default();
                line.0 += l.amount;
                line.1 += l.windows;
            }
            _ => {}
        }
    }
    out.rows.retain(|_, (v, n)| !v.is_zero() || *n != 0);
    for ((row, user), n) in items {
        assert!(n >= 0, "an item below zero: {row:?} {user}");
        if n > 0 {
            out.items.entry(row).or_default().insert(user);
        }
    }
    out.lines
        .retain(|_, (amount, windows)| !amount.is_zero() || *windows != 0);
    for ((row, quantity, amount, book), n) in charges {
        assert!(
            (0..=1).contains(&n),
            "a window holds one charge: {row:?} {n}"
        );
        if n == 1 {
            assert!(
                out.charges
                    .insert(row.clone(), (quantity, amount, book))
                    .is_none(),
                "two charges for {row:?}"
            );
        }
    }
    out
}

fn normalized(mut o: Outcome) -> Outcome {
    for (v, _) in o.rows.values_mut() {
        *v = v.normalize();
    }
    for (q, a, _) in o.charges.values_mut() {
        *q = q.normalize();
        *a = a.normalize();
    }
    for (a, _) in o.lines.values_mut() {
        *a = a.normalize();
    }
    o
}

/// The issued total of each (customer, period) from a run's upcoming lines, through the invoice
/// code (`draft`: each line rounded once, in its meter and values' order).
fn issued(lines: &BTreeMap<LineId, (Decimal, i64)>) -> BTreeMap<(String, i64), Decimal> {
    let mut usage: BTreeMap<(String, i64), Vec<PeriodUsage>> = BTreeMap::new();
    for ((customer, period, meter, dims, book), (amount, _)) in lines {
        usage
            .entry((customer.clone(), *period))
            .or_default()
            .push(PeriodUsage {
                meter: meter.clone(),
                dimensions: dims.parse().unwrap(),
                price_book_id: book.clone(),
                currency: "USD".into(),
                quantity: Decimal::ZERO,
                amount: *amount,
                minimum: None,
                unit_price_summary: String::new(),
            });
    }
    usage
        .into_iter()
        .map(|(at, lines)| {
            let total = draft(&lines, "USD", at.1).unwrap().subtotal.normalize();
            (at, total)
        })
        .collect()
}

/// The issued totals computed plainly: Σ per (customer, period) of each line's amount rounded to
/// cents, half away from zero.
fn issued_plainly(lines: &BTreeMap<LineId, (Decimal, i64)>) -> BTreeMap<(String, i64), Decimal> {
    let mut out: BTreeMap<(String, i64), Decimal> = BTreeMap::new();
    for ((customer, period, ..), (amount, _)) in lines {
        *out.entry((customer.clone(), *period)).or_default() +=
            amount.round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointAwayFromZero);
    }
    out.values_mut().for_each(|v| *v = v.normalize());
    out
}

#[test]
fn windows_charges_and_lines_are_per_dimension_values_under_a_random_book_history() {
    let mut chosen = BTreeSet::new();
    for seed in 0..4 {
        let rounds = random_rounds(seed);
        let (history, in_force) = book_history(seed);
        let want = normalized(expected(&rounds, &in_force));
        chosen.extend(want.charges.values().map(|(_, _, book)| book.clone()));
        let dimensioned: BTreeSet<&str> = want.rows.keys().map(|(_, _, d, _)| d.as_str()).collect();
        assert!(
            dimensioned.contains(r#"{"model":"1.5","region":null}"#)
                && dimensioned.contains(r#"{"model":null}"#),
            "seed {seed}: spellings and missing values occur: {dimensioned:?}"
        );
        let late = updates(rounds.clone(), history.clone(), 1, meters(), Vec::new())
            .iter()
            .filter(|u| matches!(u, SinkUpdate::Late(_)))
            .count();
        assert!(late > 0, "seed {seed}: some events are late");
        for workers in [1, 2, 4] {
            let got = normalized(run(rounds.clone(), history.clone(), workers));
            assert_eq!(got, want, "seed {seed}, {workers} workers");
            assert_eq!(
                issued(&got.lines),
                issued_plainly(&want.lines),
                "seed {seed}, {workers} workers: the issued totals"
            );
        }
    }
    assert!(
        chosen.len() >= 5 && chosen.iter().any(|b| b.contains("tokens-card")),
        "the seeds between them choose most books, the rate card among them: {chosen:?}"
    );
}

/// One event of customer `c` with these properties, at `second` past the base hour.
fn one(id: &str, properties: &str, second: i64) -> Event {
    let json = format!(
        r#"{{"event_id":"{id}","customer_id":"c","event_type":"llm","event_time":"{}","value":"1","properties":{properties}}}"#,
        chrono::DateTime::from_timestamp(BASE_S + second, 0)
            .unwrap()
            .to_rfc3339(),
    );
    decode_event(
        json.as_bytes(),
        (BASE_S + 86_400) * 1_000_000,
        &Limits::default(),
    )
    .unwrap()
}

#[test]
fn past_the_bound_an_event_is_a_dead_letter_and_its_void_takes_nothing_for_1_2_and_4_workers() {
    let bounded = Meter {
        max_dimension_values: Some(2),
        ..meter("calls", Aggregation::Count, None, &["model"])
    };
    let sent = |e: &Event| Sent {
        event: e.clone(),
        model: None,
        region: None,
        user: 0,
    };
    // "a" was admitted before the start; "b" is admitted in round 0 (and "c", later in round 0's
    // order, is not); in round 1 "c" and a missing model (the value null) are refused, "a" and "b"
    // still count, and the void of a refused event takes nothing.
    let a = one("e1", r#"{"model":"a"}"#, 10);
    let b = one("e2", r#"{"model":"b"}"#, 20);
    let c = one("e3", r#"{"model":"c"}"#, 30);
    let c2 = one("e4", r#"{"model":"c"}"#, 40);
    let none = one("e5", r#"{}"#, 50);
    let b2 = one("e6", r#"{"model":"b"}"#, 60);
    let rounds = vec![
        (0, 0, Classified::Count(c.clone()), sent(&c)),
        (0, 1, Classified::Count(b.clone()), sent(&b)),
        (0, 2, Classified::Count(a.clone()), sent(&a)),
        (1, 3, Classified::Count(c2.clone()), sent(&c2)),
        (1, 0, Classified::Count(none.clone()), sent(&none)),
        (1, 1, Classified::Count(b2.clone()), sent(&b2)),
        (1, 2, Classified::Retract(c.clone()), sent(&c)),
    ];
    let admitted = vec![("calls".to_owned(), "model".to_owned(), Some("a".to_owned()))];
    let mut first: Option<(Outcome, Vec<String>, Vec<DimensionValue>)> = None;
    for workers in [1, 2, 4] {
        let updates = updates(
            rounds.clone(),
            Vec::new(),
            workers,
            vec![bounded.clone()],
            admitted.clone(),
        );
        let mut refused: Vec<String> = updates
            .iter()
            .filter_map(|u| match u {
                SinkUpdate::DeadLetter(d) => {
                    assert!(
                        d.reason.starts_with("DIMENSION_CARDINALITY: meter calls"),
                        "{}",
                        d.reason
                    );
                    let event: Event = serde_json::from_slice(&d.payload).unwrap();
                    Some(event.event_id)
                }
                _ => None,
            })
            .collect();
        refused.sort();
        let stored: Vec<DimensionValue> = updates
            .iter()
            .filter_map(|u| match u {
                SinkUpdate::DimensionValue(v) => Some(v.clone()),
                _ => None,
            })
            .collect();
        let got = outcome(&updates);
        assert_eq!(refused, ["e3", "e4", "e5"], "{workers} workers");
        assert_eq!(
            stored,
            [("calls".to_owned(), "model".to_owned(), Some("b".to_owned()))],
            "{workers} workers: only the value admitted in this run is stored"
        );
        let counts: BTreeMap<&str, i64> = got
            .rows
            .iter()
            .map(|((_, _, d, _), (_, n))| (d.as_str(), *n))
            .collect();
        assert_eq!(
            counts,
            BTreeMap::from([(r#"{"model":"a"}"#, 1), (r#"{"model":"b"}"#, 2)]),
            "{workers} workers"
        );
        match &first {
            None => first = Some((got, refused, stored)),
            Some(f) => assert_eq!(f.0, got),
        }
    }
}
