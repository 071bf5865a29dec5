//! Rating in the dataflow (SPEC §5): every window's usage, with the price books in force, becomes the
//! window's period-to-date charge, incrementally.
//!
//! ```text
//!  usage (every row ever committed + this run's contributions)
//!     └─map─► ((customer, meter, period), window, item) ────────────────────────────────┐
//!               └─distinct─► periods ─► (meter, period) ─distinct─┐                      │
//!  books (price_books, reloaded every second) ─► (meter, book) ──join, overlap─► (meter, period, book)
//!               periods ────────────────────────────────join, scope─► ((customer, meter, period), book)
//!                                                                                        ▼
//!                             reduce per (customer, meter, period): rate_period ─► window charges
//! ```
//! Contract: for every (customer, meter, period) with usage, the output holds exactly the charges
//! `meterflow_model::rate_period` gives for the period's whole usage and the books that overlap it
//! (the default ones and the customer's own). A late event, a void or a price book created, edited or
//! closed changes only the periods it touches, and within them only the windows whose charge moves
//! (differential emits the difference of the reduce's output). Exchange: the reduce routes by period
//! key, so all of a period's windows and books meet on one worker.
//!
//! Cost: a change to one window re-rates its whole period (at most 744 hourly windows; 44,640 minute
//! windows for a minute meter), once per epoch and period touched.

use differential_dataflow::collection::AsCollection;
use differential_dataflow::VecCollection;
use meterflow_model::{
    period_of, rate_period, Aggregate, AggregateKey, Charge, Item, Measure, PriceBook, WindowUsage,
};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use timely::dataflow::operators::vec::Map;

use crate::operators::Epoch;
use crate::usage::Usage;

/// A row of a meter, and for multiset meters the item within it.
pub type RowKey = (AggregateKey, Option<Item>);

/// A window charge as the sink stores it: `(customer_id, meter, charge)`.
pub type ChargeRow = (String, String, Charge);

/// One customer's usage of one meter in one billing period (the period's start, seconds).
type PeriodKey = (String, String, i64);

/// What the rating reduce sees of a period: its windows' usage and the books that may price it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
enum RateInput {
    Window {
        start: i64,
        end: i64,
        item: Option<Item>,
    },
    Book(PriceBook),
}

/// Rates `usage` (all of it, accumulated: every row's total or multiset) with `books`.
pub fn rate<'scope>(
    usage: VecCollection<'scope, Epoch, RowKey, Usage>,
    books: VecCollection<'scope, Epoch, PriceBook, isize>,
) -> VecCollection<'scope, Epoch, ChargeRow, isize> {
    let windows = usage.map(|(key, item)| {
        let (period, _) = period_of(key.window_start);
        (
            (key.customer_id, key.meter, period),
            RateInput::Window {
                start: key.window_start,
                end: key.window_end,
                item,
            },
        )
    });
    let periods = windows.clone().map(|(period, _)| period).distinct();
    let meter_periods = periods
        .clone()
        .map(|(_, meter, period)| (meter, period))
        .distinct();
    let meter_period_books = meter_periods
        .join_map(
            books.map(|book| (book.meter.clone(), book)),
            |meter, period, book| ((meter.clone(), *period), book.clone()),
        )
        .filter(|((_, period), book)| {
            let (_, end) = period_of(*period);
            book.overlaps(period * 1_000_000, end * 1_000_000)
        });
    let period_books = periods
        .map(|(customer, meter, period)| ((meter, period), customer))
        .join_map(meter_period_books, |(meter, period), customer, book| {
            ((customer.clone(), meter.clone(), *period), book.clone())
        })
        .filter(|((customer, _, _), book)| {
            book.customer_id.as_ref().is_none_or(|own| own == customer)
        });
    // A book's multiplicity rides in the usage difference so both inputs meet in one reduce.
    let books_as_usage = period_books
        .inner
        .map(|((period, book), time, diff)| {
            let usage = Usage(Aggregate {
                value: Decimal::ZERO,
                event_count: diff as i64,
            });
            ((period, RateInput::Book(book)), time, usage)
        })
        .as_collection();
    windows
        .concat(books_as_usage)
        .reduce_named("RatePeriod", |period, input, output| {
            for charge in rate_inputs(period, input) {
                output.push((charge, 1isize));
            }
        })
        .map(|((customer, meter, _), charge)| (customer, meter, charge))
}

/// The charges of one period from the reduce's accumulated input.
fn rate_inputs(period: &PeriodKey, input: &[(&RateInput, Usage)]) -> Vec<Charge> {
    struct Window<'a> {
        end: i64,
        total: Decimal,
        counted: bool,
        items: Vec<&'a Item>,
    }
    let mut windows: std::collections::BTreeMap<i64, Window<'_>> = Default::default();
    let mut books: Vec<&PriceBook> = Vec::new();
    for (what, usage) in input {
        match what {
            RateInput::Book(book) if usage.0.event_count > 0 => books.push(book),
            RateInput::Book(_) => {}
            RateInput::Window { start, end, item } => {
                let window = windows.entry(*start).or_insert(Window {
                    end: *end,
                    total: Decimal::ZERO,
                    counted: false,
                    items: Vec::new(),
                });
                match item {
                    None => {
                        let Some(total) = window.total.checked_add(usage.0.value) else {
                            tracing::error!(?period, "a window total overflowed; period not rated");
                            return Vec::new();
                        };
                        window.total = total;
                        window.counted = true;
                    }
                    Some(item) if usage.0.event_count > 0 => window.items.push(item),
                    Some(_) => {}
                }
            }
        }
    }
    if books.is_empty() {
        return Vec::new();
    }
    let usage: Vec<WindowUsage> = windows
        .into_iter()
        .filter(|(_, w)| w.counted || !w.items.is_empty())
        .filter_map(|(start, w)| {
            Some(WindowUsage {
                window_start: start,
                window_end: w.end,
                measure: Measure::from_items(w.total, w.items)?,
            })
        })
        .collect();
    match rate_period(&period.0, &usage, &books) {
        Ok(charges) => charges,
        Err(e) => {
            // Unreachable for validated input (28-digit values, sane prices); never a panic.
            tracing::error!(?period, error = %e, "rating a period overflowed; period not rated");
            Vec::new()
        }
    }
}
