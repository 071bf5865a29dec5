//! One period's state in the `RatePeriod` operator (see `rating.rs`): its windows' usage, its stored
//! charges and what it has given, and how an epoch's changes rate it.
//!
//! ```text
//!  apply(change)   a window or stored charge changes; rerate_from = the earliest window changed
//!  rate(books)     only charges given, no book or stored charge changed ─► rate_from(rerate_from)
//!                    totals (sum, count): the quantity before it carried, the windows from it priced
//!                    items (max, unique, latest): every window walked, those from it priced
//!                  otherwise ─────────────────────────────────────────────► rated() ─► give()
//!                  either way: the changes that leave, and `given` made what is rated now
//! ```

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;

use differential_dataflow::consolidation::consolidate;
use differential_dataflow::difference::{IsZero, Semigroup};
use meterflow_model::batch::QuarantineReason;
use meterflow_model::{
    rate_period, rate_period_from, rate_totals_after, Charge, Dimensions, Item, Measure, PriceBook,
    WindowUsage,
};
use rust_decimal::Decimal;

use super::{PeriodChange, PeriodKey, Rated};
use crate::usage::Usage;

/// A window's usage, accumulated: its total (a sum or count meter's row) or its items (a multiset
/// meter's rows, each with its count). The items are boxed, and absent when there are none: most
/// windows are a sum's or a count's, and an empty map inline took a third of every window's 72 bytes.
struct WindowState {
    end: i64,
    total: Option<Usage>,
    // Boxed on purpose: an absent map costs 8 bytes, an empty one inline 24.
    #[allow(clippy::box_collection)]
    items: Option<Box<BTreeMap<Item, Usage>>>,
}

impl WindowState {
    fn new(end: i64) -> Self {
        WindowState {
            end,
            total: None,
            items: None,
        }
    }

    /// Its items with their counts, in order.
    fn items(&self) -> impl Iterator<Item = (&Item, &Usage)> + Clone {
        self.items.iter().flat_map(|items| items.iter())
    }

    fn has_items(&self) -> bool {
        self.items.is_some()
    }

    /// Adds `usage` to the count of `item`; the map goes when its last item does.
    fn add_item(&mut self, item: Item, usage: Usage) {
        let items = self.items.get_or_insert_with(Box::default);
        match items.entry(item) {
            Entry::Occupied(mut count) => {
                count.get_mut().plus_equals(&usage);
                if count.get().is_zero() {
                    count.remove();
                }
            }
            Entry::Vacant(_) if usage.is_zero() => {}
            Entry::Vacant(slot) => {
                slot.insert(usage);
            }
        }
        if items.is_empty() {
            self.items = None;
        }
    }

    /// What the window measures: its items (those with a positive count) or else its total; `None`
    /// when it has neither, or its items cancel out.
    fn measure(&self) -> Option<Measure> {
        let items = self
            .items()
            .filter(|(_, count)| count.aggregate.event_count > 0)
            .map(|(item, _)| item);
        let total = self.total.map(|total| total.aggregate.value);
        if total.is_none() && items.clone().next().is_none() {
            return None;
        }
        Measure::from_items(total.unwrap_or_default(), items)
    }
}

/// A period's windows by start, in one vector kept sorted. A period has at most 744 hourly windows
/// (44,640 minute ones), and a change nearly always falls on the last or a recent one, so a window
/// is found without a search or with a binary one, and a rating reads the windows in memory order.
/// In a `BTreeMap` they lay over half-full nodes, a cache miss each (review R5) and about twice the
/// memory.
#[derive(Default)]
struct Windows(Vec<(i64, WindowState)>);

impl Windows {
    /// The window that starts at `start`, made (ending at `end`) if there is none.
    fn entry(&mut self, start: i64, end: i64) -> Option<&mut WindowState> {
        let at = self.position(start).unwrap_or_else(|at| {
            self.0.insert(at, (start, WindowState::new(end)));
            at
        });
        self.0.get_mut(at).map(|(_, window)| window)
    }

    /// Where the window that starts at `start` is (`Ok`) or would go (`Err`). Looked for from the
    /// back first: a change nearly always falls on one of the last few windows (the current one, or
    /// the one before for late events), which lie in the cache lines next to the last; a binary
    /// search from the middle was a cache miss a step.
    fn position(&self, start: i64) -> Result<usize, usize> {
        const FROM_THE_BACK: usize = 4;
        let len = self.0.len();
        for (back, (s, _)) in self.0.iter().rev().enumerate().take(FROM_THE_BACK) {
            if *s <= start {
                // `back` windows follow this one.
                let after = len.saturating_sub(back);
                return if *s == start {
                    Ok(after.saturating_sub(1))
                } else {
                    Err(after)
                };
            }
        }
        if len <= FROM_THE_BACK {
            return Err(0);
        }
        self.0.binary_search_by_key(&start, |(s, _)| *s)
    }

    fn remove(&mut self, start: i64) {
        if let Ok(at) = self.position(start) {
            self.0.remove(at);
        }
    }

    /// The windows that start in `since..until`, in order.
    fn range(&self, since: i64, until: i64) -> &[(i64, WindowState)] {
        let before = self
            .0
            .get(..starting_at(&self.0, until))
            .unwrap_or_default();
        before.get(starting_at(before, since)..).unwrap_or_default()
    }

    /// The windows that start at `from` or later, in order.
    fn from(&self, from: i64) -> &[(i64, WindowState)] {
        self.0.get(starting_at(&self.0, from)..).unwrap_or_default()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Where the first of `windows` (sorted by start) that starts at `start` or later is: counted from
/// the back, as [`Windows::position`] looks, because rating asks from the window changed last,
/// nearly always one of the last few. A binary search from the middle was a cache miss a step (8 % of
/// `core`); counting back is never more than the windows that rating then reads from there.
fn starting_at(windows: &[(i64, WindowState)], start: i64) -> usize {
    let after = windows
        .iter()
        .rev()
        .take_while(|(s, _)| *s >= start)
        .count();
    windows.len().saturating_sub(after)
}

/// What the operator holds of one period.
pub(super) struct PeriodState {
    windows: Windows,
    /// The charges the sink stores, as fed back (none but after a restart), not yet consolidated.
    stored: Vec<(Charge, isize)>,
    /// What the operator has given for the period so far, accumulated and consolidated.
    given: Vec<(Rated, isize)>,
    /// Changed in the epoch being taken in (it is on the epoch's list of periods to rate).
    touched: bool,
    /// The earliest window changed in that epoch: its charge and the later ones are rated again.
    /// `i64::MIN` rates the whole period (a book or a stored charge changed); `i64::MAX`, nothing.
    rerate_from: i64,
    /// The period-to-date quantity of the windows before a start, as the last rating from there
    /// found it: the next rating from that window or a later one adds up only the windows between.
    /// Gone when a window before it changes.
    carried: Option<Carried>,
}

/// The windows that start before `until`, all totals, add up to `quantity`.
#[derive(Clone, Copy)]
struct Carried {
    until: i64,
    quantity: Decimal,
}

impl Default for PeriodState {
    fn default() -> Self {
        PeriodState {
            windows: Windows::default(),
            stored: Vec::new(),
            given: Vec::new(),
            touched: false,
            rerate_from: i64::MAX,
            carried: None,
        }
    }
}

impl PeriodState {
    /// Takes in one change of the epoch; true if it is the period's first in the epoch (the period
    /// is then to be rated once the epoch is complete).
    pub(super) fn apply(&mut self, change: PeriodChange) -> bool {
        let first = !std::mem::replace(&mut self.touched, true);
        match change {
            PeriodChange::Window {
                start,
                end,
                item,
                usage,
            } => {
                self.rerate_from = self.rerate_from.min(start);
                if self.carried.is_some_and(|carried| start < carried.until) {
                    self.carried = None;
                }
                let Some(window) = self.windows.entry(start, end) else {
                    return first;
                };
                window.end = end;
                match item {
                    None => match &mut window.total {
                        Some(total) => {
                            total.plus_equals(&usage);
                            if total.is_zero() {
                                window.total = None;
                            }
                        }
                        None if usage.is_zero() => {}
                        None => window.total = Some(usage),
                    },
                    Some(item) => window.add_item(item, usage),
                }
                if window.total.is_none() && !window.has_items() {
                    self.windows.remove(start);
                }
            }
            PeriodChange::Stored(charge, diff) => {
                self.rerate_from = i64::MIN;
                self.stored.push((*charge, diff));
            }
        }
        first
    }

    /// A book that may price the period changed: it is rated whole. True if that is the period's
    /// first change in the epoch.
    pub(super) fn rate_whole(&mut self) -> bool {
        self.rerate_from = i64::MIN;
        !std::mem::replace(&mut self.touched, true)
    }

    /// Changed in the epoch being taken in, and not rated since.
    pub(super) fn is_touched(&self) -> bool {
        self.touched
    }

    /// Nothing left to keep: no window, no stored charge, nothing given.
    pub(super) fn is_empty(&self) -> bool {
        self.windows.is_empty() && self.stored.is_empty() && self.given.is_empty()
    }

    /// Rates the period after an epoch's changes: what leaves. From the earliest window changed on
    /// when what it gave holds only charges (review R7: the usual change is the current window, so
    /// a period is not rated again from its start at every epoch, nor after a restart); the whole
    /// period when a book or a stored charge changed, or a quarantine or an overflow is in play.
    pub(super) fn rate(&mut self, period: &PeriodKey, books: &[&PriceBook]) -> Vec<(Rated, isize)> {
        self.touched = false;
        let from = std::mem::replace(&mut self.rerate_from, i64::MAX);
        if books.is_empty() && self.stored.is_empty() && self.given.is_empty() {
            return Vec::new();
        }
        let only_charges = !matches!(self.given.last(), Some((Rated::Quarantined { .. }, _)));
        if from > i64::MIN && only_charges && !books.is_empty() {
            if let Some(changes) = self.rate_from(period, books, from) {
                return changes;
            }
        }
        let target = self.rated(period, books);
        give(&mut self.given, target)
    }

    /// The changes of the charges of the windows from `from` on, when what the period gave holds
    /// only charges (rated ones, and stored ones withdrawn), in window order: a `Rated::Charge` orders
    /// by its window's start first. So do the stored charges, consolidated by the whole rating that
    /// took them in (a charge orders by its dimension values, the period's, then its window; a stored
    /// charge that comes rates the whole period). `None`
    /// when a window's usage overflowed or pricing overflows: the whole period is rated then, which
    /// finds where rating stops.
    fn rate_from(
        &mut self,
        period: &PeriodKey,
        books: &[&PriceBook],
        from: i64,
    ) -> Option<Vec<(Rated, isize)>> {
        let totals = self
            .totals_before(from)
            .and_then(|quantity| Some((quantity, self.usage_from(from)?)));
        let charges = match totals {
            Some((quantity, usage)) => {
                let charges =
                    rate_totals_after(&period.0, &period.3, quantity, &usage, books).ok()?;
                self.carried = Some(Carried {
                    until: from,
                    quantity,
                });
                charges
            }
            None => {
                let (usage, None) = self.usage_until_overflow() else {
                    return None;
                };
                rate_period_from(&period.0, &period.3, &usage, books, from).ok()?
            }
        };
        let stored_from = self
            .stored
            .partition_point(|(charge, _)| charge.window_start < from);
        let mut target: Vec<(Rated, isize)> = charges
            .into_iter()
            .map(|charge| (Rated::charge(charge), 1))
            .collect();
        target.extend(withdrawn(
            self.stored.get(stored_from..).unwrap_or_default(),
        ));
        let split = self.given.partition_point(|(rated, _)| match rated {
            Rated::Charge(start, _) => *start < from,
            Rated::Quarantined { .. } => false,
        });
        let mut given_from = self.given.split_off(split);
        let changes = give(&mut given_from, target);
        self.given.append(&mut given_from);
        Some(changes)
    }

    /// The period's charges from its whole usage, up to the first window that cannot be rated (its
    /// usage overflowed, or pricing overflows there), and then that window as a quarantine; minus
    /// its stored charges.
    fn rated(&mut self, period: &PeriodKey, books: &[&PriceBook]) -> Vec<(Rated, isize)> {
        consolidate(&mut self.stored);
        let mut out = withdrawn(&self.stored);
        if books.is_empty() {
            return out;
        }
        // The windows before the first overflowed one can be rated; that one and those after cannot.
        let (usage, overflowed) = self.usage_until_overflow();
        let mut quarantine = overflowed.map(|start| (start, QuarantineReason::UsageOverflow));
        let (charges, rating_stopped) = rate_longest_prefix(&period.0, &period.3, &usage, books);
        if let Some(from_window) = rating_stopped {
            // Pricing stopped before any usage overflow could: the earlier window is where rating ends.
            quarantine = Some((from_window, QuarantineReason::RatingOverflow));
        }
        out.extend(charges.into_iter().map(|c| (Rated::charge(c), 1)));
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

    /// The period-to-date quantity of the windows before `from`, when they are all totals (a sum or
    /// count meter's) and none overflowed: from what the last rating carried, plus the windows since.
    fn totals_before(&self, from: i64) -> Option<Decimal> {
        let (since, mut quantity) = match self.carried {
            Some(carried) if carried.until <= from => (carried.until, carried.quantity),
            _ => (i64::MIN, Decimal::ZERO),
        };
        for (_, window) in self.windows.range(since, from) {
            let total = window.total.filter(|total| !total.overflowed)?;
            if window.has_items() {
                return None;
            }
            quantity = meterflow_model::money::add(quantity, total.aggregate.value).ok()?;
        }
        Some(quantity)
    }

    /// The measures of the windows from `from` on, in time order, when they are all totals and
    /// none overflowed.
    fn usage_from(&self, from: i64) -> Option<Vec<WindowUsage>> {
        self.windows
            .from(from)
            .iter()
            .map(|(start, window)| {
                let total = window.total.filter(|total| !total.overflowed)?;
                (!window.has_items()).then_some(WindowUsage {
                    window_start: *start,
                    window_end: window.end,
                    measure: Measure::Total(total.aggregate.value),
                })
            })
            .collect()
    }

    /// The measures of the windows before the first whose usage overflowed, in time order, and that
    /// window's start.
    fn usage_until_overflow(&self) -> (Vec<WindowUsage>, Option<i64>) {
        let mut usage: Vec<WindowUsage> = Vec::with_capacity(self.windows.len());
        for (start, window) in &self.windows.0 {
            if window.total.is_some_and(|total| total.overflowed) {
                return (usage, Some(*start));
            }
            if let Some(measure) = window.measure() {
                usage.push(WindowUsage {
                    window_start: *start,
                    window_end: window.end,
                    measure,
                });
            }
        }
        (usage, None)
    }
}

/// Stored charges as what rating gives for them: each withdrawn as many times as it is stored.
fn withdrawn(stored: &[(Charge, isize)]) -> Vec<(Rated, isize)> {
    stored
        .iter()
        .map(|(charge, diff)| (Rated::charge(charge.clone()), diff.saturating_neg()))
        .collect()
}

/// Makes `target` what `given` holds (all of a period's, or its part from a window on): the changes
/// that leave. Where a charge given before and one of `target` are equal (decimals equal whatever
/// their scale), the one given stays, so a later withdrawal withdraws what left. Both are merged in
/// order: `given` is consolidated, and so `target` is made.
fn give(given: &mut Vec<(Rated, isize)>, mut target: Vec<(Rated, isize)>) -> Vec<(Rated, isize)> {
    consolidate(&mut target);
    let mut changes = Vec::with_capacity(target.len().saturating_add(given.len()));
    let mut next = Vec::with_capacity(target.len());
    let mut before = std::mem::take(given).into_iter().peekable();
    for (rated, diff) in target {
        while let Some((gone, was)) = before.next_if(|(old, _)| *old < rated) {
            changes.push((gone, was.saturating_neg()));
        }
        match before.next_if(|(old, _)| *old == rated) {
            Some((kept, was)) => {
                if was != diff {
                    changes.push((kept.clone(), diff.saturating_sub(was)));
                }
                next.push((kept, diff));
            }
            None => {
                changes.push((rated.clone(), diff));
                next.push((rated, diff));
            }
        }
    }
    changes.extend(before.map(|(gone, was)| (gone, was.saturating_neg())));
    *given = next;
    changes
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

#[cfg(test)]
mod tests {
    use super::*;
    use meterflow_model::Aggregate;

    /// 2024-01-01T00:00:00Z.
    const START: i64 = 1_704_067_200;

    fn max_window(start: i64, value: i64) -> PeriodChange {
        PeriodChange::Window {
            start,
            end: start + 3600,
            item: Some(Item::Max(Decimal::from(value))),
            usage: Usage::of(Aggregate::of(Decimal::ZERO)),
        }
    }

    #[test]
    fn a_multiset_period_is_rated_from_the_window_that_changed() {
        let book = crate::rating::tests::book("b", None, Decimal::ONE);
        let period = ("c".into(), "m".into(), START, Dimensions::default());
        let mut state = PeriodState::default();
        state.apply(max_window(START, 5));
        assert_eq!(state.rate(&period, &[&book]).len(), 1);
        // No window before it, so nothing to carry; its items are not a total: the items' walk.
        state.apply(max_window(START, 9));
        assert!(state.rate_from(&period, &[&book], START).is_some());
        // A window before it holds items: the items' walk too.
        state.apply(max_window(START + 3600, 7));
        assert!(state.rate_from(&period, &[&book], START + 3600).is_some());
    }

    #[test]
    fn windows_stay_sorted_and_ranged_like_a_btree_map() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(17);
        let mut windows = Windows::default();
        let mut reference: BTreeMap<i64, i64> = BTreeMap::new();
        for _ in 0..2_000 {
            // Mostly the latest windows, sometimes an early one: late data.
            let start = match rng.random_range(0..4) {
                0 => rng.random_range(0..100),
                _ => rng.random_range(80..100),
            };
            if rng.random_range(0..3) == 0 {
                windows.remove(start);
                reference.remove(&start);
            } else if let Some(window) = windows.entry(start, start + 1) {
                window.end += 1;
                *reference.entry(start).or_insert(start + 1) += 1;
            }
            let (since, until) = (rng.random_range(-1..101), rng.random_range(-1..101));
            let ends = |w: &[(i64, WindowState)]| -> Vec<(i64, i64)> {
                w.iter().map(|(s, w)| (*s, w.end)).collect()
            };
            let expected: Vec<(i64, i64)> = reference
                .iter()
                .filter(|(s, _)| (since..until).contains(*s))
                .map(|(s, e)| (*s, *e))
                .collect();
            assert_eq!(ends(windows.range(since, until)), expected);
            let expected: Vec<(i64, i64)> =
                reference.range(since..).map(|(s, e)| (*s, *e)).collect();
            assert_eq!(ends(windows.from(since)), expected);
            assert_eq!(windows.len(), reference.len());
        }
    }
}
