//! Rating in the dataflow (SPEC §5): every window's usage, with the price books in force, becomes the
//! window's period-to-date charge, incrementally.
//!
//! ```text
//!  usage (every row ever committed + this run's row changes) ─map─► (period, window change) ──┐
//!  stored charges (fed back at a restart) ───────────────────map─► (period, stored change) ──┤ exchange
//!                                                                                            ▼ by period
//!  books (price_books, changes fed by worker 0) ─broadcast─► RatePeriod: a table of periods, each with
//!                                                            its windows' usage, its stored charges and
//!                                                            what it has given so far
//!     an epoch both inputs have passed: every period it touched (a window or a stored charge changed,
//!     or a book of its meter that overlaps it) is rated again, from its earliest window changed on
//!                                                  ─► rated − stored − given ─► charge changes
//!                                              and their sums per (book, currency) ─► line changes
//! ```
//! Contract: for every (customer, meter, period, dimension values) with usage, the output holds exactly
//! the charges `meterflow_model::rate_period` gives for the period's whole usage and the books that
//! overlap it (the default ones and the customer's own, whose selector the values match), minus the
//! charges stored for it (so after a restart only what changed while the pipeline was down leaves). A
//! late event, a void or a price book created, edited or closed changes only the periods it touches,
//! and within them only the windows whose charge moves. Exchange: every change of a period goes to the
//! worker its key's hash picks, and every worker sees every book, so a period is rated on one worker.
//! A line is one period's (its charges with one book and currency), so the operator adds up each
//! line's change itself: one update per line and epoch, with no exchange or table of lines after it.
//!
//! Why a table and not differential's `reduce`: epochs are totally ordered, so a period's state is one
//! accumulation, not a history to replay at each time. The table keeps it once, where the reduce kept
//! an arrangement of every window update, another of its output, and the distincts and joins that
//! brought the books to each period. The `core` benchmark went from about 290k to 365k events/s on one
//! worker, and peak memory from 725 to 612 MB; pricing from the earliest window changed took it on
//! to 444k, and reading the table in memory order when most of it is touched to about 510k
//! (perf/RESULTS.md). Its keys' and charges' short texts are kept inline (`CompactString`), so a
//! clone of a key or a charge allocates nothing. What is left is mostly cache misses: a backfill
//! touches every period each epoch, and a period's state is a few scattered allocations (review R5).
//!
//! Cost, per epoch and period touched: the windows from the earliest one changed on are priced
//! again (review R7; the usual change is the current window); the earlier ones only add up to the
//! period-to-date quantity they start from, and for a sum or count meter that quantity is carried
//! from the last rating, so the earlier windows are not read again. A book or a stored charge
//! that changes, a quarantine or an overflow prices the whole period (at most 744 hourly windows;
//! 44,640 for a minute meter).
//!
//! Overflow is data, not a crash (issue 13): when a window's usage overflowed (usage.rs) or pricing the
//! period-to-date usage leaves the decimal range, the period is rated up to the last window that can
//! be rated, and the operator also outputs a [`QuarantinedPeriod`] naming the first window without a
//! charge and why. The sink stores it in `rating_quarantine` in the same commit (and the
//! `quarantined_periods` gauge and its alert show it), so the period's later charges are never
//! withdrawn silently; once the usage is corrected (a void, a re-rating job), the quarantine goes.

use std::collections::BTreeMap;
use std::sync::Arc;

use differential_dataflow::collection::AsCollection;
use differential_dataflow::difference::{Abelian, IsZero, Semigroup};
use differential_dataflow::hashable::Hashable;
use differential_dataflow::VecCollection;
use hashbrown::HashMap;
use meterflow_model::batch::{QuarantineReason, QuarantinedPeriod};
use meterflow_model::{
    period_of, AggregateKey, Charge, CompactString, Dimensions, Item, LineChange, PriceBook,
};
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::vec::{Broadcast, Map};
use timely::dataflow::operators::{Capability, Concat, OkErr, Operator};

use crate::operators::Epoch;
use crate::usage::{LineTotal, Usage};
use crate::wire::Json;
use period::PeriodState;

mod period;

/// A row of a meter, and for multiset meters the item within it.
pub type RowKey = (AggregateKey, Option<Item>);

/// A window charge as the sink stores it: `(customer_id, meter, charge)`.
pub type ChargeRow = (CompactString, CompactString, Charge);

/// One customer's usage of one meter's windows of one set of dimension values in one billing period:
/// (customer, meter, the period's start in seconds, dimension values).
type PeriodKey = (CompactString, CompactString, i64, Dimensions);

/// A change that reaches a period's worker.
#[derive(Clone, Debug, Serialize, Deserialize)]
enum PeriodChange {
    /// One row's usage changed: a window's total, or one item of a multiset window.
    Window {
        start: i64,
        end: i64,
        item: Option<Item>,
        usage: Usage,
    },
    /// A charge the sink stores (fed back at a restart) came or went.
    Stored(Box<Charge>, isize),
}

/// What rating a period gives: window charges, and at most one quarantine. A charge is shared, not
/// copied, between what the period gave and what leaves (it orders as the charge it holds).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Rated {
    /// A window charge, behind its window's start: a period's charges order and split by window
    /// without a read of each charge (those reads were cache misses, a third of rating's time).
    Charge(i64, Arc<Charge>),
    Quarantined {
        from_window: i64,
        reason: QuarantineReason,
    },
}

impl Rated {
    fn charge(charge: Charge) -> Rated {
        Rated::Charge(charge.window_start, Arc::new(charge))
    }
}

/// What leaves the rating of a period in an epoch: a change of what it gave, and the change of each
/// of its lines, the sum of its charge changes with one (book, currency).
#[derive(Clone, Debug)]
enum Output {
    Given(Rated),
    /// Boxed: an output is as small as a `Rated` (a line is one an epoch and period, a charge two).
    Line(Box<LineDelta>),
}

/// The change of a period's line with one book and currency.
#[derive(Clone, Debug)]
struct LineDelta {
    price_book_id: CompactString,
    currency: CompactString,
    total: LineTotal,
}

impl LineDelta {
    /// The change of the line of `period` this is.
    fn change_of(self, period: PeriodKey) -> LineChange {
        let (customer_id, meter, period_start, dimensions) = period;
        LineChange {
            customer_id,
            period_start,
            meter,
            dimensions,
            price_book_id: self.price_book_id,
            currency: self.currency,
            amount: self.total.amount,
            quantity: self.total.quantity,
            windows: self.total.windows,
        }
    }
}

/// What rating gives each epoch: changes of window charges, of the periods in quarantine, and of
/// upcoming-invoice lines (at most one per line: a line is one period's, and a period is rated once
/// an epoch, on one worker).
pub struct Rating<'scope> {
    pub charges: VecCollection<'scope, Epoch, ChargeRow, isize>,
    pub quarantined: VecCollection<'scope, Epoch, QuarantinedPeriod, isize>,
    /// Each a period's line (SPEC §6) for one book and currency, with its epoch.
    pub lines: timely::dataflow::StreamVec<'scope, Epoch, (Epoch, LineChange)>,
}

/// The price books in force, by meter, each with its multiplicity (present while positive).
type Books = HashMap<String, BTreeMap<PriceBook, isize>>;

/// Rates `usage` (all of it, accumulated: every row's total or multiset) with `books`: the window
/// charges minus the `stored` ones (what the sink holds), the periods in quarantine, and the changes
/// of the lines the charges add up to.
// The `Result`s are routing tags for `ok_err`, not errors: the size of their `Err` side is no concern.
#[allow(clippy::result_large_err)]
pub fn rate<'scope>(
    usage: VecCollection<'scope, Epoch, RowKey, Usage>,
    books: VecCollection<'scope, Epoch, PriceBook, isize>,
    stored: VecCollection<'scope, Epoch, ChargeRow, isize>,
) -> Rating<'scope> {
    let windows = usage.inner.map(|((key, item), epoch, usage)| {
        let (period, _) = period_of(key.window_start);
        let change = PeriodChange::Window {
            start: key.window_start,
            end: key.window_end,
            item,
            usage,
        };
        (
            (key.customer_id, key.meter, period, key.dimensions),
            change,
            epoch,
        )
    });
    let stored = stored
        .inner
        .map(|((customer, meter, charge), epoch, diff)| {
            let (period, _) = period_of(charge.window_start);
            let dimensions = charge.dimensions.clone();
            let change = PeriodChange::Stored(Box::new(charge), diff);
            ((customer, meter, period, dimensions), change, epoch)
        });
    // A book crosses processes as JSON text (wire.rs): it skips its empty selector and entries.
    let books = books
        .inner
        .map(|(book, epoch, diff)| (Json(book), epoch, diff))
        .broadcast()
        .map(|(Json(book), epoch, diff)| (book, epoch, diff));
    let (given, lines): (Given<'scope>, _) =
        rate_periods(windows.concat(stored), books).ok_err(|((key, output), time, diff)| {
            match output {
                Output::Given(rated) => Ok(((key, rated), time, diff)),
                Output::Line(line) => Err((time, (*line).change_of(key))),
            }
        });
    // One pass splits them (no copy of every charge for a branch that keeps only the quarantines).
    let (charges, quarantined) = given.ok_err(|((key, rated), time, diff)| {
        let (customer_id, meter, period_start, dimensions) = key;
        match rated {
            Rated::Charge(_, charge) => Ok((
                (customer_id, meter, Arc::unwrap_or_clone(charge)),
                time,
                diff,
            )),
            Rated::Quarantined {
                from_window,
                reason,
            } => Err((
                QuarantinedPeriod {
                    customer_id: customer_id.into(),
                    meter: meter.into(),
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
    Rating {
        charges: charges.as_collection(),
        quarantined: quarantined.as_collection(),
        lines,
    }
}

type Changes<'scope> = timely::dataflow::StreamVec<'scope, Epoch, (PeriodKey, PeriodChange, Epoch)>;
type BookChanges<'scope> = timely::dataflow::StreamVec<'scope, Epoch, (PriceBook, Epoch, isize)>;
type Given<'scope> = timely::dataflow::StreamVec<'scope, Epoch, ((PeriodKey, Rated), Epoch, isize)>;
type Outputs<'scope> =
    timely::dataflow::StreamVec<'scope, Epoch, ((PeriodKey, Output), Epoch, isize)>;

/// An epoch's input, held until both inputs pass it.
struct Pending {
    capability: Capability<Epoch>,
    changes: Vec<(PeriodKey, PeriodChange)>,
    books: Vec<(PriceBook, isize)>,
}

/// The `RatePeriod` operator (see the module docs): `changes` exchanged by period, `books` already
/// on every worker.
fn rate_periods<'scope>(changes: Changes<'scope>, books: BookChanges<'scope>) -> Outputs<'scope> {
    changes.binary_frontier::<_, CapacityContainerBuilder<Vec<_>>, _, _, _, _>(
        books,
        Exchange::new(|(period, _, _): &(PeriodKey, PeriodChange, Epoch)| period.hashed()),
        Pipeline,
        "RatePeriod",
        |_cap, _info| {
            let mut pending: BTreeMap<Epoch, Pending> = BTreeMap::new();
            let mut periods: HashMap<PeriodKey, PeriodState> = HashMap::new();
            let mut in_force: Books = HashMap::new();
            // How many changes the last epoch had: the next epoch's list starts that large, so it
            // does not grow (and copy every change) step by step.
            let mut last_len = 0;
            move |(changes, changes_frontier), (books, books_frontier), output| {
                changes.for_each_stamp(|cap, data| {
                    let Some(&least) = cap.least() else {
                        return;
                    };
                    for batch in data {
                        for (period, change, epoch) in batch.drain(..) {
                            let hold = || cap.delayed(&epoch.max(least), 0);
                            held(&mut pending, epoch, last_len, hold)
                                .changes
                                .push((period, change));
                        }
                    }
                });
                books.for_each_stamp(|cap, data| {
                    let Some(&least) = cap.least() else {
                        return;
                    };
                    for batch in data {
                        for (book, epoch, diff) in batch.drain(..) {
                            let hold = || cap.delayed(&epoch.max(least), 0);
                            held(&mut pending, epoch, last_len, hold)
                                .books
                                .push((book, diff));
                        }
                    }
                });
                while let Some(entry) = pending.first_entry() {
                    let epoch = *entry.key();
                    if changes_frontier.less_equal(&epoch) || books_frontier.less_equal(&epoch) {
                        break;
                    }
                    let Pending {
                        capability,
                        changes,
                        books,
                    } = entry.remove();
                    last_len = changes.len();
                    let mut session = output.session(&capability);
                    rate_epoch(
                        &mut periods,
                        &mut in_force,
                        changes,
                        books,
                        &mut |key, out, diff| session.give(((key, out), epoch, diff)),
                    );
                }
            }
        },
    )
}

/// The epoch's entry of `pending`, made with the capability `hold` gives, and room for `room`
/// changes, when it is the first.
fn held(
    pending: &mut BTreeMap<Epoch, Pending>,
    epoch: Epoch,
    room: usize,
    hold: impl FnOnce() -> Capability<Epoch>,
) -> &mut Pending {
    pending.entry(epoch).or_insert_with(|| Pending {
        capability: hold(),
        changes: Vec::with_capacity(room),
        books: Vec::new(),
    })
}

/// Takes in one epoch's book and period changes and rates every period they touch: what leaves goes
/// to `emit`, as it is made (not gathered first: that list was as large as the epoch's output, and
/// grew by copies).
fn rate_epoch(
    periods: &mut HashMap<PeriodKey, PeriodState>,
    in_force: &mut Books,
    changes: Vec<(PeriodKey, PeriodChange)>,
    books: Vec<(PriceBook, isize)>,
    emit: &mut impl FnMut(PeriodKey, Output, isize),
) {
    let mut touched: Vec<PeriodKey> = Vec::new();
    for (period, change) in changes {
        match periods.get_mut(&period) {
            Some(state) => {
                if state.apply(change) {
                    touched.push(period);
                }
            }
            None => {
                let mut state = PeriodState::default();
                state.apply(change);
                periods.insert(period.clone(), state);
                touched.push(period);
            }
        }
    }
    if !books.is_empty() {
        for (period, state) in periods.iter_mut() {
            if books.iter().any(|(book, _)| prices(book, period)) && state.rate_whole() {
                touched.push(period.clone());
            }
        }
        for (book, diff) in books {
            let meter = in_force.entry(book.meter.clone()).or_default();
            let count = meter.entry(book).or_default();
            *count = count.saturating_add(diff);
            meter.retain(|_, count| *count != 0);
        }
    }
    let in_force: &Books = in_force;
    let mut books = Vec::new();
    // When most periods are touched (a backfill touches every period of its hours), one pass over
    // the table in memory order is cheaper than a second look-up of each by its key.
    if touched.len().saturating_mul(2) >= periods.len() {
        let mut emptied = false;
        for (period, state) in periods.iter_mut().filter(|(_, state)| state.is_touched()) {
            rate_touched(period, state, in_force, &mut books, emit);
            emptied |= state.is_empty();
        }
        if emptied {
            periods.retain(|_, state| !state.is_empty());
        }
        return;
    }
    for period in touched {
        let Some(state) = periods.get_mut(&period) else {
            continue;
        };
        rate_touched(&period, state, in_force, &mut books, emit);
        if state.is_empty() {
            periods.remove(&period);
        }
    }
}

/// Rates one touched period with the books in force that may price it, into `emit`. `books` is
/// room for those books, kept from one period to the next.
fn rate_touched<'b>(
    period: &PeriodKey,
    state: &mut PeriodState,
    in_force: &'b Books,
    books: &mut Vec<&'b PriceBook>,
    emit: &mut impl FnMut(PeriodKey, Output, isize),
) {
    books.clear();
    books.extend(
        in_force
            .get(period.1.as_str())
            .into_iter()
            .flatten()
            .filter(|(book, count)| **count > 0 && prices(book, period))
            .map(|(book, _)| book),
    );
    let given = state.rate(period, books);
    for line in line_changes(&given) {
        emit(period.clone(), Output::Line(Box::new(line)), 1);
    }
    for (rated, diff) in given {
        emit(period.clone(), Output::Given(rated), diff);
    }
}

/// The changes of a period's lines that its charge changes `given` add up to: per (book, currency),
/// each charge's amount and quantity and one window, negated when the charge is withdrawn. Lines
/// that do not change are left out. A period's charges have one book each, and nearly always the
/// same one: the list is short.
fn line_changes(given: &[(Rated, isize)]) -> Vec<LineDelta> {
    let mut lines: Vec<LineDelta> = Vec::new();
    for (rated, diff) in given {
        let Rated::Charge(_, charge) = rated else {
            continue;
        };
        let mut total = LineTotal {
            amount: charge.amount,
            quantity: charge.quantity,
            windows: 1,
        };
        if *diff < 0 {
            total.negate();
        }
        let line = lines.iter_mut().find(|line| {
            line.price_book_id == charge.price_book_id && line.currency == charge.currency
        });
        match line {
            Some(line) => line.total.plus_equals(&total),
            None => lines.push(LineDelta {
                price_book_id: charge.price_book_id.clone(),
                currency: charge.currency.clone(),
                total,
            }),
        }
    }
    lines.retain(|line| !line.total.is_zero());
    lines
}

/// Whether `book` may price `period`: the period's meter, a range that overlaps the period, and a
/// scope and selector that take in its customer and dimension values.
fn prices(book: &PriceBook, period: &PeriodKey) -> bool {
    let (customer, meter, start, dimensions) = period;
    if book.meter != *meter {
        return false;
    }
    let (_, end) = period_of(*start);
    book.overlaps(
        start.saturating_mul(1_000_000),
        end.saturating_mul(1_000_000),
    ) && book.customer_id.as_ref().is_none_or(|own| own == customer)
        && dimensions.matches(&book.dimensions)
}

#[cfg(test)]
mod tests {
    //! `rate_epoch` against a plain reference: random epochs of window changes (with voids, late
    //! windows and periods that empty) and book changes; after every epoch, what has left for each
    //! period adds up to `rate_period` of its whole usage with the books in force, and its line
    //! changes to the lines of those charges.
    use std::collections::BTreeSet;

    use super::*;
    use differential_dataflow::consolidation::consolidate;
    use meterflow_model::{rate_period, Aggregate, Measure, PriceModel, Tier, WindowUsage};
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    use rust_decimal::Decimal;

    /// 2024-01-31T20:00:00Z: ten hourly windows that cross into February.
    const BASE: i64 = 1_706_731_200;

    pub(super) fn book(id: &str, customer: Option<&str>, unit_price: Decimal) -> PriceBook {
        PriceBook {
            price_book_id: id.to_string(),
            meter: "m".to_string(),
            customer_id: customer.map(str::to_string),
            dimensions: Dimensions::default(),
            currency: "USD".to_string(),
            effective_from: 0,
            effective_to: None,
            model: PriceModel::Graduated {
                tiers: vec![
                    Tier {
                        up_to: Some(Decimal::from(150)),
                        unit_price,
                        flat_fee: Decimal::ZERO,
                    },
                    Tier {
                        up_to: None,
                        unit_price: unit_price / Decimal::from(2),
                        flat_fee: Decimal::ONE,
                    },
                ],
            },
            minimum_per_period: None,
            entries: Vec::new(),
        }
    }

    fn usage(value: Decimal, event_count: i64) -> Usage {
        Usage::of(Aggregate { value, event_count })
    }

    /// What the reference rater gives for every period: `rate_period` of its windows' totals.
    fn reference(
        totals: &BTreeMap<(PeriodKey, i64), (Decimal, i64)>,
        books: &BTreeMap<PriceBook, isize>,
    ) -> BTreeMap<PeriodKey, Vec<(Rated, isize)>> {
        let mut windows: BTreeMap<PeriodKey, Vec<WindowUsage>> = BTreeMap::new();
        for ((period, start), (value, count)) in totals {
            if *count != 0 {
                windows
                    .entry(period.clone())
                    .or_default()
                    .push(WindowUsage {
                        window_start: *start,
                        window_end: start + 3600,
                        measure: Measure::Total(*value),
                    });
            }
        }
        windows
            .into_iter()
            .map(|(period, windows)| {
                let books: Vec<&PriceBook> = books
                    .iter()
                    .filter(|(book, count)| **count > 0 && prices(book, &period))
                    .map(|(book, _)| book)
                    .collect();
                let charges = rate_period(&period.0, &period.3, &windows, &books).unwrap();
                let mut rated: Vec<(Rated, isize)> = charges
                    .into_iter()
                    .map(|charge| (Rated::charge(charge), 1))
                    .collect();
                consolidate(&mut rated);
                (period, rated)
            })
            .filter(|(_, rated)| !rated.is_empty())
            .collect()
    }

    /// The lines the reference's charges add up to, per (period, book, currency).
    fn lines_of(
        rated: &BTreeMap<PeriodKey, Vec<(Rated, isize)>>,
    ) -> BTreeMap<(PeriodKey, CompactString, CompactString), LineTotal> {
        let mut lines: BTreeMap<_, LineTotal> = BTreeMap::new();
        for (period, rated) in rated {
            for (rated, diff) in rated {
                let Rated::Charge(_, charge) = rated else {
                    continue;
                };
                assert_eq!(*diff, 1);
                let key = (
                    period.clone(),
                    charge.price_book_id.clone(),
                    charge.currency.clone(),
                );
                lines.entry(key).or_default().plus_equals(&LineTotal {
                    amount: charge.amount,
                    quantity: charge.quantity,
                    windows: 1,
                });
            }
        }
        lines
    }

    /// After every epoch, the charges given add up to the reference's, and so do the line changes
    /// to the lines of the reference's charges, each line changed at most once an epoch.
    #[test]
    fn every_epoch_leaves_what_the_whole_usage_rates_to() {
        for seed in 0..20 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut periods = HashMap::new();
            let mut in_force = Books::new();
            let mut books_now: BTreeMap<PriceBook, isize> = BTreeMap::new();
            let mut totals: BTreeMap<(PeriodKey, i64), (Decimal, i64)> = BTreeMap::new();
            let mut contributions: Vec<(PeriodKey, i64, Decimal)> = Vec::new();
            let mut left: BTreeMap<PeriodKey, Vec<(Rated, isize)>> = BTreeMap::new();
            let mut lines: BTreeMap<(PeriodKey, CompactString, CompactString), LineTotal> =
                BTreeMap::new();
            let catalogue = [
                book("default", None, Decimal::new(1, 2)),
                book("default", None, Decimal::new(3, 2)),
                book("own", Some("c1"), Decimal::new(2, 2)),
            ];
            for epoch in 0..40 {
                let mut changes = Vec::new();
                for _ in 0..rng.random_range(0..6) {
                    let void = !contributions.is_empty() && rng.random_bool(0.2);
                    let (period, start, value, sign) = if void {
                        let i = rng.random_range(0..contributions.len());
                        let (period, start, value) = contributions.swap_remove(i);
                        (period, start, value, -1)
                    } else {
                        let start = BASE + 3600 * rng.random_range(0..10);
                        let customer = format!("c{}", rng.random_range(0..3));
                        let period = (
                            CompactString::from(customer),
                            CompactString::from("m"),
                            period_of(start).0,
                            Dimensions::default(),
                        );
                        let value = Decimal::new(rng.random_range(0..10_000), 2);
                        contributions.push((period.clone(), start, value));
                        (period, start, value, 1)
                    };
                    let total = totals.entry((period.clone(), start)).or_default();
                    total.0 += value * Decimal::from(sign);
                    total.1 += sign;
                    let change = PeriodChange::Window {
                        start,
                        end: start + 3600,
                        item: None,
                        usage: usage(value * Decimal::from(sign), sign),
                    };
                    changes.push((period, change));
                }
                let mut book_changes = Vec::new();
                if epoch % 7 == 3 {
                    let book = catalogue[rng.random_range(0..catalogue.len())].clone();
                    let present = books_now.get(&book).copied().unwrap_or(0) > 0;
                    let diff = if present { -1 } else { 1 };
                    *books_now.entry(book.clone()).or_default() += diff;
                    book_changes.push((book, diff));
                }
                let mut changed = BTreeSet::new();
                let mut given = Vec::new();
                rate_epoch(
                    &mut periods,
                    &mut in_force,
                    changes,
                    book_changes,
                    &mut |period, output, diff| given.push((period, output, diff)),
                );
                for (period, output, diff) in given {
                    match output {
                        Output::Given(rated) => left.entry(period).or_default().push((rated, diff)),
                        Output::Line(line) => {
                            let key = (period, line.price_book_id, line.currency);
                            assert!(
                                changed.insert(key.clone()),
                                "seed {seed}, epoch {epoch}: one change per line and epoch"
                            );
                            lines.entry(key).or_default().plus_equals(&line.total);
                        }
                    }
                }
                left.values_mut().for_each(consolidate);
                left.retain(|_, rated| !rated.is_empty());
                lines.retain(|_, total| !total.is_zero());
                let expected = reference(&totals, &books_now);
                assert_eq!(
                    lines,
                    lines_of(&expected),
                    "seed {seed}, epoch {epoch}: lines"
                );
                assert_eq!(left, expected, "seed {seed}, epoch {epoch}");
            }
        }
    }
}
