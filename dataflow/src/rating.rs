//! Rating in the dataflow (SPEC §5): every window's usage, with the price books in force, becomes the
//! window's period-to-date charge, incrementally.
//!
//! ```text
//!  usage (every row ever committed + this run's row changes)
//!     └─map─► ((customer, meter, period, dimensions), window, item) ────────────────────────────────┐
//!               └─distinct─► periods ─► (meter, period) ─distinct─┐                      │
//!  books (price_books, reloaded on every change) ─► (meter, book) ──join, overlap─► (meter, period, book)
//!               periods ────────────────────────────────join, scope─► ((customer, meter, period), book)
//!  stored charges (fed back at a restart) ─► ((customer, meter, period), charge) ─────────┤
//!                                                                                        ▼
//!          reduce per (customer, meter, period): rate_period − stored ─► window charge changes
//! ```
//! Contract: for every (customer, meter, period, dimension values) with usage, the output holds exactly
//! the charges `meterflow_model::rate_period` gives for the period's whole usage and the books that
//! overlap it (the default ones and the customer's own, whose selector the values match), minus the charges stored for it (so after a restart
//! only what changed while the pipeline was down leaves). A late event, a void or a price book
//! created, edited or closed changes only the periods it touches, and within them only the windows
//! whose charge moves (differential emits the difference of the reduce's output). Exchange: the reduce
//! routes by period key, so all of a period's windows, books and stored charges meet on one worker.
//!
//! Cost: a change to one window re-rates its whole period (at most 744 hourly windows; 44,640 minute
//! windows for a minute meter), once per epoch and period touched.
//!
//! Overflow is data, not a crash (issue 13): when a window's usage overflowed (usage.rs) or pricing the
//! period-to-date usage leaves the decimal range, the period is rated up to the last window that can
//! be rated, and the reduce also outputs a [`QuarantinedPeriod`] naming the first window without a
//! charge and why. The sink stores it in `rating_quarantine` in the same commit (and the
//! `quarantined_periods` gauge and its alert show it), so the period's later charges are never
//! withdrawn silently; once the usage is corrected (a void, a re-rating job), the quarantine goes.

use std::sync::Arc;

use differential_dataflow::collection::AsCollection;
use differential_dataflow::operators::ThresholdTotal;
use differential_dataflow::VecCollection;
use meterflow_model::batch::{QuarantineReason, QuarantinedPeriod};
use meterflow_model::{
    period_of, rate_period, Aggregate, AggregateKey, Charge, Dimensions, Item, Measure, PriceBook,
    WindowUsage,
};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::OkErr;

use crate::operators::Epoch;
use crate::usage::Usage;

/// A row of a meter, and for multiset meters the item within it.
pub type RowKey = (AggregateKey, Option<Item>);

/// A window charge as the sink stores it: `(customer_id, meter, charge)`.
pub type ChargeRow = (String, String, Charge);

/// One customer's usage of one meter's windows of one set of dimension values in one billing period:
/// (customer, meter, the period's start in seconds, dimension values).
type PeriodKey = (String, String, i64, Dimensions);

/// What the rating reduce sees of a period: its windows' usage and the books that may price it.
/// Boxed where large and rare (a book, a multiset item), so the common value, a group window, is 32
/// bytes: every update is moved through sorts and merges several times. A box orders as what it holds.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
enum RateInput {
    Window {
        start: i64,
        end: i64,
        item: Option<Box<Item>>,
    },
    Book(Box<PriceBook>),
    /// A charge the sink stores already (fed back at a restart): the reduce withdraws it from what it
    /// gives, so only the difference leaves.
    Stored(Box<Charge>),
}

/// What rating a period gives: window charges, and at most one quarantine. A charge is shared, not
/// copied, as the reduce's output trace merges its batches (it orders as the charge it holds).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Rated {
    Charge(Arc<Charge>),
    Quarantined {
        from_window: i64,
        reason: QuarantineReason,
    },
}

/// Rates `usage` (all of it, accumulated: every row's total or multiset) with `books`: the window
/// charges minus the `stored` ones (what the sink holds), and the periods in quarantine.
pub fn rate<'scope>(
    usage: VecCollection<'scope, Epoch, RowKey, Usage>,
    books: VecCollection<'scope, Epoch, PriceBook, isize>,
    stored: VecCollection<'scope, Epoch, ChargeRow, isize>,
) -> (
    VecCollection<'scope, Epoch, ChargeRow, isize>,
    VecCollection<'scope, Epoch, QuarantinedPeriod, isize>,
) {
    let windows = usage.map(|(key, item)| {
        let (period, _) = period_of(key.window_start);
        (
            (key.customer_id, key.meter, period, key.dimensions),
            RateInput::Window {
                start: key.window_start,
                end: key.window_end,
                item: item.map(Box::new),
            },
        )
    });
    // Epochs are totally ordered, so `distinct_total`: one arrangement (the input's) and a look at each
    // changed key's count before and after, instead of `distinct`'s input and output traces and its
    // replay of every changed key's history.
    let periods = windows.clone().map(|(period, _)| period).distinct_total();
    let meter_periods = periods
        .clone()
        .map(|(_, meter, period, _)| (meter, period))
        .distinct_total();
    let meter_period_books = meter_periods
        .join_map(
            books.map(|book| (book.meter.clone(), book)),
            |meter, period, book| ((meter.clone(), *period), book.clone()),
        )
        .filter(|((_, period), book)| {
            let (_, end) = period_of(*period);
            book.overlaps(
                period.saturating_mul(1_000_000),
                end.saturating_mul(1_000_000),
            )
        });
    let period_books = periods
        .map(|(customer, meter, period, dimensions)| ((meter, period), (customer, dimensions)))
        .join_map(
            meter_period_books,
            |(meter, period), (customer, dimensions), book| {
                (
                    (customer.clone(), meter.clone(), *period, dimensions.clone()),
                    book.clone(),
                )
            },
        )
        .filter(|((customer, _, _, dimensions), book)| {
            book.customer_id.as_ref().is_none_or(|own| own == customer)
                && dimensions.matches(&book.dimensions)
        });
    // A book's multiplicity rides in the usage difference so both inputs meet in one reduce.
    let books_as_usage = period_books
        .inner
        .map(|((period, book), time, diff)| {
            let usage = Usage::of(Aggregate {
                value: Decimal::ZERO,
                event_count: diff as i64,
            });
            ((period, RateInput::Book(Box::new(book))), time, usage)
        })
        .as_collection();
    // The stored charges meet their period's windows in the reduce, which gives the difference: the
    // charges leave consolidated, one update per charge and epoch, with no arrangement of their own.
    let stored_as_usage = stored
        .inner
        .map(|((customer, meter, charge), time, diff)| {
            let (period, _) = period_of(charge.window_start);
            let usage = Usage::of(Aggregate {
                value: Decimal::ZERO,
                event_count: diff as i64,
            });
            let dimensions = charge.dimensions.clone();
            (
                (
                    (customer, meter, period, dimensions),
                    RateInput::Stored(Box::new(charge)),
                ),
                time,
                usage,
            )
        })
        .as_collection();
    let rated = windows
        .concat(books_as_usage)
        .concat(stored_as_usage)
        .reduce_named("RatePeriod", |period, input, output| {
            output.extend(rate_inputs(period, input));
        });
    // One pass splits them (no copy of every charge for a branch that keeps only the quarantines).
    let (charges, quarantined) = rated.inner.ok_err(|((key, rated), time, diff)| {
        let (customer_id, meter, period_start, dimensions) = key;
        match rated {
            Rated::Charge(charge) => Ok((
                (customer_id, meter, Arc::unwrap_or_clone(charge)),
                time,
                diff,
            )),
            Rated::Quarantined {
                from_window,
                reason,
            } => Err((
                QuarantinedPeriod {
                    customer_id,
                    meter,
                    dimensions,
                    period_start,
                    from_window,
                    reason,
                },
                time,
                diff,
            )),
        }
    });
    (charges.as_collection(), quarantined.as_collection())
}

/// The charges of one period from the reduce's accumulated input, up to the first window that cannot be
/// rated (its usage overflowed, or pricing overflows there), and then that window as a quarantine;
/// minus the period's stored charges.
fn rate_inputs(period: &PeriodKey, input: &[(&RateInput, Usage)]) -> Vec<(Rated, isize)> {
    let mut out: Vec<(Rated, isize)> = input
        .iter()
        .filter_map(|(what, usage)| match what {
            RateInput::Stored(charge) if usage.aggregate.event_count != 0 => Some((
                Rated::Charge(Arc::new((**charge).clone())),
                usage.aggregate.event_count.saturating_neg() as isize,
            )),
            _ => None,
        })
        .collect();
    struct Window<'a> {
        end: i64,
        total: Decimal,
        counted: bool,
        overflowed: bool,
        items: Vec<&'a Item>,
    }
    // The books first: a period no book prices is passed over before its windows are gathered.
    let books: Vec<&PriceBook> = input
        .iter()
        .filter_map(|(what, usage)| match what {
            RateInput::Book(book) if usage.aggregate.event_count > 0 => Some(&**book),
            _ => None,
        })
        .collect();
    if books.is_empty() {
        return out;
    }
    let mut windows: std::collections::BTreeMap<i64, Window<'_>> = Default::default();
    for (what, usage) in input {
        match what {
            RateInput::Book(_) | RateInput::Stored(_) => {}
            RateInput::Window { start, end, item } => {
                let window = windows.entry(*start).or_insert(Window {
                    end: *end,
                    total: Decimal::ZERO,
                    counted: false,
                    overflowed: false,
                    items: Vec::new(),
                });
                match item {
                    None if usage.overflowed => window.overflowed = true,
                    None => match window.total.checked_add(usage.aggregate.value) {
                        Some(total) => {
                            window.total = total;
                            window.counted = true;
                        }
                        None => window.overflowed = true,
                    },
                    Some(item) if usage.aggregate.event_count > 0 => window.items.push(&**item),
                    Some(_) => {}
                }
            }
        }
    }
    // The windows before the first overflowed one can be rated; that one and those after cannot.
    let mut quarantine: Option<(i64, QuarantineReason)> = None;
    let mut usage: Vec<WindowUsage> = Vec::with_capacity(windows.len());
    for (start, w) in windows {
        if w.overflowed {
            quarantine = Some((start, QuarantineReason::UsageOverflow));
            break;
        }
        if !w.counted && w.items.is_empty() {
            continue;
        }
        if let Some(measure) = Measure::from_items(w.total, w.items) {
            usage.push(WindowUsage {
                window_start: start,
                window_end: w.end,
                measure,
            });
        }
    }
    let (charges, rating_stopped) = rate_longest_prefix(&period.0, &period.3, &usage, &books);
    if let Some(from_window) = rating_stopped {
        // Pricing stopped before any usage overflow could: the earlier window is where rating ends.
        quarantine = Some((from_window, QuarantineReason::RatingOverflow));
    }
    out.extend(charges.into_iter().map(|c| (Rated::Charge(Arc::new(c)), 1)));
    if let Some((from_window, reason)) = quarantine {
        tracing::warn!(
            customer = %period.0, meter = %period.1, period = period.2, from_window, reason = reason.as_str(),
            "a billing period is quarantined: its usage or its charges leave the decimal range"
        );
        out.push((
            Rated::Quarantined {
                from_window,
                reason,
            },
            1,
        ));
    }
    out
}

/// The charges of the longest prefix of `usage` (in time order) that rates without overflow, and the
/// first window left out when that is not all of it. Period-to-date amounts only grow along the
/// period, so the prefixes that rate form a range and a binary search finds the longest one (only
/// when the whole period does not rate, which is the rare case).
fn rate_longest_prefix(
    customer: &str,
    dimensions: &Dimensions,
    usage: &[WindowUsage],
    books: &[&PriceBook],
) -> (Vec<Charge>, Option<i64>) {
    if let Ok(charges) = rate_period(customer, dimensions, usage, books) {
        return (charges, None);
    }
    // Invariant: the first `good` windows rate, the first `bad` do not.
    let (mut good, mut bad) = (0, usage.len());
    let mut best = Vec::new();
    while bad.saturating_sub(good) > 1 {
        let mid = good.midpoint(bad);
        match rate_period(
            customer,
            dimensions,
            usage.get(..mid).unwrap_or_default(),
            books,
        ) {
            Ok(charges) => {
                good = mid;
                best = charges;
            }
            Err(_) => bad = mid,
        }
    }
    (best, usage.get(good).map(|w| w.window_start))
}
