//! `rating`: the pricing math of SPEC §5 on one core (`../shared/PERF.md`, id `rating`), each against a
//! baseline measured in the same run on the same input. No services needed.
//!
//! - `price`: one 10-tier graduated price of 1,000,000 units (`PriceModel::price`), ns per call;
//!   baseline: a naive walk over the units one by one, each priced in the tier it falls in.
//! - `rate`: 10,000 hourly aggregations (`Measure::Total`) rated with `rate_period`, ms for all; they are
//!   14 customers' January 2024 periods (744 hourly windows each, the last customer 328), passed in
//!   shuffled order, each customer with the default 10-tier book and every other one with a book of its
//!   own; baseline: the naive reading of the spec, the period-to-date quantity recomputed from scratch
//!   for every window (O(n²) per period).
//! - `book_for`: the book of a window among 1,000 books of one meter (999 customers' own, 1 default),
//!   for customers half with a book of their own and half without, ns per lookup; baseline: the same
//!   lookups through a `HashMap` from customer to books built once.
//!
//! Every side's answers are checked equal to its baseline's. Prints one JSON line per run and a summary.
//!
//!     cargo build --release -p meterflow-perf --bin rating && target/release/rating --runs 5

use std::collections::HashMap;
use std::hint::black_box;
use std::str::FromStr;
use std::time::Instant;

use clap::Parser;
use meterflow_model::{
    book_for, rate_period, Charge, Measure, PriceBook, PriceModel, Tier, WindowUsage,
};
use meterflow_perf::median;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;

#[derive(Debug, Parser)]
#[command(
    about = "Graduated pricing, period rating and price-book lookup on one core, against naive baselines"
)]
struct Args {
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Units priced by one graduated price call.
    #[arg(long, default_value_t = 1_000_000)]
    units: u64,
    /// Graduated price calls timed per run.
    #[arg(long, default_value_t = 1_000_000)]
    calls: usize,
    /// Naive unit-by-unit calls timed per run (each walks every unit).
    #[arg(long, default_value_t = 3)]
    naive_calls: usize,
    /// Hourly aggregations rated per run.
    #[arg(long, default_value_t = 10_000)]
    windows: usize,
    /// Price books of the meter for the lookup.
    #[arg(long, default_value_t = 1_000)]
    books: usize,
    /// Lookups timed per run.
    #[arg(long, default_value_t = 1_000_000)]
    lookups: usize,
}

/// 2024-01-01T00:00:00Z; January has 744 hours.
const JANUARY: i64 = 1_704_067_200;
const HOURS: usize = 744;

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// Ten tiers up to 900,000 units, then open; prices falling from 0.01 to 0.001, four flat fees.
fn ten_tiers() -> Vec<Tier> {
    let bounds = [
        "1000", "10000", "50000", "100000", "200000", "300000", "500000", "700000", "900000",
    ];
    let fees = ["0", "5", "0", "10", "0", "0", "25", "0", "0", "50"];
    (0..10)
        .map(|i| Tier {
            up_to: bounds.get(i).map(|b| d(b)),
            unit_price: Decimal::new(10 - i as i64, 3),
            flat_fee: d(fees[i]),
        })
        .collect()
}

/// The graduated price walked unit by unit: each unit in the tier it falls in, a tier's flat fee when
/// its first unit is reached.
fn naive_graduated(tiers: &[Tier], units: u64) -> Decimal {
    let mut total = Decimal::ZERO;
    let mut entered = None;
    for unit in 1..=units {
        let unit = Decimal::from(unit);
        let i = tiers
            .iter()
            .position(|t| t.up_to.is_none_or(|up| unit <= up))
            .unwrap();
        total += tiers[i].unit_price;
        if entered != Some(i) {
            total += tiers[i].flat_fee;
            entered = Some(i);
        }
    }
    total
}

fn book(id: String, customer: Option<String>, model: PriceModel) -> PriceBook {
    PriceBook {
        entries: Default::default(),
        dimensions: Default::default(),
        price_book_id: id,
        meter: "api_calls".into(),
        customer_id: customer,
        currency: "USD".into(),
        effective_from: (JANUARY - 366 * 86_400) * 1_000_000,
        effective_to: None,
        model,
        minimum_per_period: None,
    }
}

/// One customer's period: its windows (shuffled) and the books that can price them.
struct Period {
    customer: String,
    windows: Vec<WindowUsage>,
    own: Option<PriceBook>,
}

fn periods(rng: &mut SmallRng, windows: usize) -> Vec<Period> {
    (0..windows.div_ceil(HOURS))
        .map(|c| {
            let customer = format!("cust_{c:03}");
            let n = (windows - c * HOURS).min(HOURS);
            let mut ws: Vec<WindowUsage> = (0..n as i64)
                .map(|h| WindowUsage {
                    window_start: JANUARY + h * 3600,
                    window_end: JANUARY + (h + 1) * 3600,
                    measure: Measure::Total(Decimal::from(rng.random_range(0..=2_000u32))),
                })
                .collect();
            ws.shuffle(rng);
            let own = (c % 2 == 1).then(|| {
                let mut tiers = ten_tiers();
                tiers[0].unit_price = d("0.008");
                book(
                    format!("own_{customer}"),
                    Some(customer.clone()),
                    PriceModel::Graduated { tiers },
                )
            });
            Period {
                customer,
                windows: ws,
                own,
            }
        })
        .collect()
}

/// The books that can price a period: the default and the customer's own.
fn books_of<'a>(default: &'a PriceBook, period: &'a Period) -> Vec<&'a PriceBook> {
    std::iter::once(default)
        .chain(period.own.as_ref())
        .collect()
}

/// SPEC §5 read literally: for each window in time order, the period-to-date quantity before and
/// including it summed from scratch.
fn naive_rate(customer: &str, windows: &[WindowUsage], books: &[&PriceBook]) -> Vec<Charge> {
    let mut ordered: Vec<&WindowUsage> = windows.iter().collect();
    ordered.sort_by_key(|w| w.window_start);
    let total = |ws: &[&WindowUsage]| -> Decimal {
        ws.iter()
            .map(|w| match w.measure {
                Measure::Total(v) => v,
                _ => unreachable!("the benchmark rates totals"),
            })
            .sum()
    };
    let mut charges = Vec::new();
    for i in 0..ordered.len() {
        let w = ordered[i];
        let Some(book) = book_for(
            books.iter().copied(),
            customer,
            &Default::default(),
            w.window_start,
        ) else {
            continue;
        };
        let (before, including) = (total(&ordered[..i]), total(&ordered[..=i]));
        charges.push(Charge {
            dimensions: Default::default(),
            window_start: w.window_start,
            window_end: w.window_end,
            quantity: including - before,
            amount: book.model.price(including).unwrap() - book.model.price(before).unwrap(),
            currency: book.currency.as_str().into(),
            price_book_id: book.price_book_id.as_str().into(),
        });
    }
    charges
}

fn line(side: &str, run: usize, figure: &str, value: f64) {
    println!(
        "{}",
        serde_json::json!({"bench": "rating", "side": side, "run": run, figure: value})
    );
}

/// Runs `f` once per run, returning the median and all runs of `per(elapsed seconds)`.
fn measure(
    side: &str,
    figure: &str,
    runs: usize,
    per: impl Fn(f64) -> f64,
    mut f: impl FnMut(),
) -> (f64, Vec<f64>) {
    let mut all = Vec::new();
    for run in 0..runs {
        let started = Instant::now();
        f();
        let value = per(started.elapsed().as_secs_f64());
        line(side, run, figure, value);
        all.push(value);
    }
    (median(all.clone()), all)
}

fn main() {
    let args = Args::parse();
    let mut rng = SmallRng::seed_from_u64(7);

    // (a) one 10-tier graduated price.
    let model = PriceModel::Graduated { tiers: ten_tiers() };
    let units = Decimal::from(args.units);
    let expected = naive_graduated(&ten_tiers(), args.units);
    assert_eq!(
        model.price(units).unwrap(),
        expected,
        "graduated price == unit-by-unit walk"
    );
    let calls = args.calls as f64;
    let price = measure(
        "graduated_price",
        "ns_per_call",
        args.runs,
        |s| s * 1e9 / calls,
        || {
            for _ in 0..args.calls {
                black_box(black_box(&model).price(black_box(units)).unwrap());
            }
        },
    );
    let naive_calls = args.naive_calls as f64;
    let tiers = ten_tiers();
    let naive_price = measure(
        "naive_unit_by_unit",
        "ns_per_call",
        args.runs,
        |s| s * 1e9 / naive_calls,
        || {
            for _ in 0..args.naive_calls {
                black_box(naive_graduated(black_box(&tiers), black_box(args.units)));
            }
        },
    );

    // (b) rate 10,000 aggregations.
    let periods = periods(&mut rng, args.windows);
    let default = book(
        "default".into(),
        None,
        PriceModel::Graduated { tiers: ten_tiers() },
    );
    let books_of = |p| books_of(&default, p);
    for p in &periods {
        let books = books_of(p);
        let fast = rate_period(&p.customer, &Default::default(), &p.windows, &books).unwrap();
        assert_eq!(
            fast,
            naive_rate(&p.customer, &p.windows, &books),
            "{}",
            p.customer
        );
        let total: Decimal = p
            .windows
            .iter()
            .map(|w| match w.measure {
                Measure::Total(v) => v,
                _ => unreachable!(),
            })
            .sum();
        let book = books.last().unwrap();
        assert_eq!(
            fast.iter().map(|c| c.amount).sum::<Decimal>(),
            book.model.price(total).unwrap()
        );
    }
    let rate = measure(
        "rate_period",
        "ms_total",
        args.runs,
        |s| s * 1e3,
        || {
            for p in &periods {
                black_box(
                    rate_period(&p.customer, &Default::default(), &p.windows, &books_of(p))
                        .unwrap(),
                );
            }
        },
    );
    let naive_rate_ms = measure(
        "naive_ptd_from_scratch",
        "ms_total",
        args.runs,
        |s| s * 1e3,
        || {
            for p in &periods {
                black_box(naive_rate(&p.customer, &p.windows, &books_of(p)));
            }
        },
    );

    // (c) book_for among 1,000 books.
    let mut books: Vec<PriceBook> = (0..args.books.saturating_sub(1))
        .map(|c| {
            book(
                format!("own_{c}"),
                Some(format!("customer_{c:05}")),
                PriceModel::PerUnit {
                    unit_price: d("0.01"),
                },
            )
        })
        .collect();
    books.push(book(
        "default".into(),
        None,
        PriceModel::PerUnit {
            unit_price: d("0.02"),
        },
    ));
    books.shuffle(&mut rng);
    // Half the queries are customers with a book of their own, half customers without.
    let queries: Vec<(String, i64)> = (0..4_096)
        .map(|_| {
            let c = rng.random_range(0..2 * args.books);
            (
                format!("customer_{c:05}"),
                JANUARY + rng.random_range(0..HOURS as i64) * 3600,
            )
        })
        .collect();
    let mut index: HashMap<Option<&str>, Vec<&PriceBook>> = HashMap::new();
    for b in &books {
        index.entry(b.customer_id.as_deref()).or_default().push(b);
    }
    let indexed = |customer: &str, at: i64| -> Option<&PriceBook> {
        let in_force = |scope| {
            index
                .get(&scope)
                .and_then(|bs| bs.iter().copied().find(|b| b.covers(at * 1_000_000)))
        };
        in_force(Some(customer)).or_else(|| in_force(None))
    };
    for (customer, at) in &queries {
        assert_eq!(
            book_for(&books, customer, &Default::default(), *at),
            indexed(customer, *at),
            "{customer}"
        );
    }
    let lookups = args.lookups as f64;
    let lookup = measure(
        "book_for",
        "ns_per_lookup",
        args.runs,
        |s| s * 1e9 / lookups,
        || {
            for (customer, at) in queries.iter().cycle().take(args.lookups) {
                black_box(book_for(
                    black_box(&books),
                    customer,
                    &Default::default(),
                    *at,
                ));
            }
        },
    );
    let indexed_lookup = measure(
        "hashmap_index",
        "ns_per_lookup",
        args.runs,
        |s| s * 1e9 / lookups,
        || {
            for (customer, at) in queries.iter().cycle().take(args.lookups) {
                black_box(indexed(black_box(customer), *at));
            }
        },
    );

    let round = |x: f64, digits: i32| (x * 10f64.powi(digits)).round() / 10f64.powi(digits);
    let all = |xs: &[f64], digits| xs.iter().map(|x| round(*x, digits)).collect::<Vec<_>>();
    println!(
        "{}",
        serde_json::json!({"bench": "rating", "summary": true, "runs": args.runs,
            "graduated_price": {"tiers": 10, "units": args.units,
                "ns_per_call_median": round(price.0, 1), "runs": all(&price.1, 1),
                "baseline_naive_ns_per_call_median": round(naive_price.0, 0),
                "baseline_runs": all(&naive_price.1, 0),
                "speedup": round(naive_price.0 / price.0, 0)},
            "rate_period": {"windows": args.windows, "periods": periods.len(),
                "ms_total_median": round(rate.0, 2), "runs": all(&rate.1, 2),
                "ns_per_window_median": round(rate.0 * 1e6 / args.windows as f64, 0),
                "baseline_naive_ms_total_median": round(naive_rate_ms.0, 2),
                "baseline_runs": all(&naive_rate_ms.1, 2),
                "speedup": round(naive_rate_ms.0 / rate.0, 1)},
            "book_for": {"books": args.books, "ns_per_lookup_median": round(lookup.0, 1),
                "runs": all(&lookup.1, 1),
                "baseline_hashmap_ns_per_lookup_median": round(indexed_lookup.0, 1),
                "baseline_runs": all(&indexed_lookup.1, 1),
                "ratio_to_hashmap": round(lookup.0 / indexed_lookup.0, 1)}})
    );
}
