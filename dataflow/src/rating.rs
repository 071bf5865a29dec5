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
//! ```
//! Contract: for every (customer, meter, period, dimension values) with usage, the output holds exactly
//! the charges `meterflow_model::rate_period` gives for the period's whole usage and the books that
//! overlap it (the default ones and the customer's own, whose selector the values match), minus the
//! charges stored for it (so after a restart only what changed while the pipeline was down leaves). A
//! late event, a void or a price book created, edited or closed changes only the periods it touches,
//! and within them only the windows whose charge moves. Exchange: every change of a period goes to the
//! worker its key's hash picks, and every worker sees every book, so a period is rated on one worker.
//!
//! Why a table and not differential's `reduce`: epochs are totally ordered, so a period's state is one
//! accumulation, not a history to replay at each time. The table keeps it once, where the reduce kept
//! an arrangement of every window update, another of its output, and the distincts and joins that
//! brought the books to each period. The `core` benchmark went from about 290k to 365k events/s on one
//! worker, and peak memory from 725 to 612 MB; pricing from the earliest window changed took it on
//! to 444k (perf/RESULTS.md).
//!
//! Cost, per epoch and period touched: the windows from the earliest one changed on are priced
//! again (review R7; the usual change is the current window); the earlier ones only add up to the
//! period-to-date quantity they start from. A book or a stored charge that changes, a quarantine or an
//! overflow prices the whole period (at most 744 hourly windows; 44,640 for a minute meter).
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
use differential_dataflow::hashable::Hashable;
use differential_dataflow::VecCollection;
use hashbrown::HashMap;
use meterflow_model::batch::{QuarantineReason, QuarantinedPeriod};
use meterflow_model::{period_of, AggregateKey, Charge, Dimensions, Item, PriceBook};
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::vec::{Broadcast, Map};
use timely::dataflow::operators::{Capability, Concat, OkErr, Operator};

use crate::operators::Epoch;
use crate::usage::Usage;
use crate::wire::Json;
use period::PeriodState;

mod period;

/// A row of a meter, and for multiset meters the item within it.
pub type RowKey = (AggregateKey, Option<Item>);

/// A window charge as the sink stores it: `(customer_id, meter, charge)`.
pub type ChargeRow = (String, String, Charge);

/// One customer's usage of one meter's windows of one set of dimension values in one billing period:
/// (customer, meter, the period's start in seconds, dimension values).
type PeriodKey = (String, String, i64, Dimensions);

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
    Charge(Arc<Charge>),
    Quarantined {
        from_window: i64,
        reason: QuarantineReason,
    },
}

/// The price books in force, by meter, each with its multiplicity (present while positive).
type Books = HashMap<String, BTreeMap<PriceBook, isize>>;

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
    let rated = rate_periods(windows.concat(stored), books);
    // One pass splits them (no copy of every charge for a branch that keeps only the quarantines).
    let (charges, quarantined) = rated.ok_err(|((key, rated), time, diff)| {
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

type Changes<'scope> = timely::dataflow::StreamVec<'scope, Epoch, (PeriodKey, PeriodChange, Epoch)>;
type BookChanges<'scope> = timely::dataflow::StreamVec<'scope, Epoch, (PriceBook, Epoch, isize)>;
type RatedChanges<'scope> =
    timely::dataflow::StreamVec<'scope, Epoch, ((PeriodKey, Rated), Epoch, isize)>;

/// An epoch's input, held until both inputs pass it.
struct Pending {
    capability: Capability<Epoch>,
    changes: Vec<(PeriodKey, PeriodChange)>,
    books: Vec<(PriceBook, isize)>,
}

/// The `RatePeriod` operator (see the module docs): `changes` exchanged by period, `books` already
/// on every worker.
fn rate_periods<'scope>(
    changes: Changes<'scope>,
    books: BookChanges<'scope>,
) -> RatedChanges<'scope> {
    changes.binary_frontier::<_, CapacityContainerBuilder<Vec<_>>, _, _, _, _>(
        books,
        Exchange::new(|(period, _, _): &(PeriodKey, PeriodChange, Epoch)| period.hashed()),
        Pipeline,
        "RatePeriod",
        |_cap, _info| {
            let mut pending: BTreeMap<Epoch, Pending> = BTreeMap::new();
            let mut periods: HashMap<PeriodKey, PeriodState> = HashMap::new();
            let mut in_force: Books = HashMap::new();
            move |(changes, changes_frontier), (books, books_frontier), output| {
                changes.for_each_stamp(|cap, data| {
                    let Some(&least) = cap.least() else {
                        return;
                    };
                    for batch in data {
                        for (period, change, epoch) in batch.drain(..) {
                            held(&mut pending, epoch, || cap.delayed(&epoch.max(least), 0))
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
                            held(&mut pending, epoch, || cap.delayed(&epoch.max(least), 0))
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
                    let given = rate_epoch(&mut periods, &mut in_force, changes, books);
                    output.session(&capability).give_iterator(
                        given
                            .into_iter()
                            .map(|(key, rated, diff)| ((key, rated), epoch, diff)),
                    );
                }
            }
        },
    )
}

/// The epoch's entry of `pending`, made with the capability `hold` gives when it is the first.
fn held(
    pending: &mut BTreeMap<Epoch, Pending>,
    epoch: Epoch,
    hold: impl FnOnce() -> Capability<Epoch>,
) -> &mut Pending {
    pending.entry(epoch).or_insert_with(|| Pending {
        capability: hold(),
        changes: Vec::new(),
        books: Vec::new(),
    })
}

/// Takes in one epoch's book and period changes and rates every period they touch: what leaves.
fn rate_epoch(
    periods: &mut HashMap<PeriodKey, PeriodState>,
    in_force: &mut Books,
    changes: Vec<(PeriodKey, PeriodChange)>,
    books: Vec<(PriceBook, isize)>,
) -> Vec<(PeriodKey, Rated, isize)> {
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
    let mut out = Vec::new();
    for period in touched {
        let Some(state) = periods.get_mut(&period) else {
            continue;
        };
        let books: Vec<&PriceBook> = in_force
            .get(&period.1)
            .into_iter()
            .flatten()
            .filter(|(book, count)| **count > 0 && prices(book, &period))
            .map(|(book, _)| book)
            .collect();
        out.extend(
            state
                .rate(&period, &books)
                .into_iter()
                .map(|(rated, diff)| (period.clone(), rated, diff)),
        );
        if state.is_empty() {
            periods.remove(&period);
        }
    }
    out
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
