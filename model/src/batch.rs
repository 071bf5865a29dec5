//! What the dataflow hands its sink for each completed epoch: the changes to aggregates, the source
//! positions that produced them and the records that could not be decoded. A sink commits one batch (or
//! several, merged) atomically; that is what makes the pipeline exactly-once.

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

use crate::aggregate::{Aggregate, AggregateKey};
use crate::dimensions::Dimensions;
use crate::meter::Item;
use crate::price::Charge;

/// A Kafka record that is not a valid event, kept with the reason (SPEC §2).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    pub payload: Vec<u8>,
    /// `MALFORMED_JSON: …` or `VALIDATION_FAILED: field: message; …`.
    pub reason: String,
}

/// A copy of an event_id that was already counted (SPEC §3). Identical copies are only counted in
/// `duplicate_events_total`; conflicting ones (another payload) are kept for inspection.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Duplicate {
    pub event_id: String,
    pub partition: i32,
    pub offset: i64,
    pub kind: DuplicateKind,
    /// The record as read, kept only for conflicting copies.
    pub payload: Vec<u8>,
}

/// How a duplicate relates to the copy that counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DuplicateKind {
    /// The same payload again (a retry).
    Identical,
    /// Another payload under a used id: kept for inspection.
    Conflicting,
    /// The id was voided before this copy was read.
    Voided,
}

impl DuplicateKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DuplicateKind::Identical => "identical",
            DuplicateKind::Conflicting => "conflicting",
            DuplicateKind::Voided => "voided",
        }
    }
}

/// An event applied to a window its meter had already finalized (SPEC §4).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LateEvent {
    pub event_id: String,
    pub customer_id: CompactString,
    pub meter: CompactString,
    pub window_start: i64,
    pub event_time_micros: i64,
    /// The committed watermark it arrived behind.
    pub watermark_micros: i64,
}

/// How far one partition has been read: the next offset, and the greatest event time seen in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PartitionProgress {
    pub partition: i32,
    pub next_offset: i64,
    pub max_event_time_micros: Option<i64>,
}

/// A change to one aggregate row: `usage` added, and for the multiset meters the item it concerns.
pub type RowChange = (AggregateKey, Option<Item>, Aggregate);

/// A change to one window charge: `(customer_id, meter, charge, diff)`. A charge row is replaced whole:
/// after consolidation a window has at most one `+1` (its new charge) and one `-1` (its old one).
pub type ChargeChange = (CompactString, CompactString, Charge, i64);

/// A change to one line of an upcoming invoice: the charges of `(customer_id, period_start, meter,
/// dimensions, price_book_id)` in `currency` changed by `amount` and `quantity`, over `windows` more (or fewer)
/// windows. The line is the sum of its windows' charges; it goes when `windows` reaches 0.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LineChange {
    pub customer_id: CompactString,
    /// The billing period's start, seconds since the epoch.
    pub period_start: i64,
    pub meter: CompactString,
    /// The dimension values of the windows the line adds up (`{}` without `group_by`).
    pub dimensions: Dimensions,
    pub price_book_id: CompactString,
    pub currency: CompactString,
    pub amount: rust_decimal::Decimal,
    pub quantity: rust_decimal::Decimal,
    pub windows: i64,
}

impl LineChange {
    fn key(&self) -> (&str, i64, &str, &Dimensions, &str, &str) {
        (
            &self.customer_id,
            self.period_start,
            &self.meter,
            &self.dimensions,
            &self.price_book_id,
            &self.currency,
        )
    }
}

/// Why a billing period's rating stopped at a window (issue 13, "overflow is data, not a crash").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum QuarantineReason {
    /// A window's usage (the sum of its values) left the 96-bit decimal range.
    UsageOverflow,
    /// Pricing the period-to-date usage left the decimal range (a quantity times a price, a sum of
    /// charges).
    RatingOverflow,
}

impl QuarantineReason {
    pub fn as_str(self) -> &'static str {
        match self {
            QuarantineReason::UsageOverflow => "usage_overflow",
            QuarantineReason::RatingOverflow => "rating_overflow",
        }
    }
}

/// A billing period of one customer and meter that is rated only up to `from_window`: that window and
/// the ones after it have no charge, because their usage or their price cannot be represented. The
/// sink keeps it in `rating_quarantine` until the usage is corrected.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct QuarantinedPeriod {
    pub customer_id: String,
    pub meter: String,
    /// The dimension values of the period's windows (`{}` without `group_by`).
    pub dimensions: Dimensions,
    /// The period's start, seconds since the epoch.
    pub period_start: i64,
    /// The first window without a charge, seconds since the epoch.
    pub from_window: i64,
    pub reason: QuarantineReason,
}

/// What the pipeline committed before it stopped, loaded when it starts again so rating (which needs
/// each period's whole usage, not just the new events) goes on from there (SPEC §9).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RatingState {
    /// Every stored row as one change: a group row's total, or one multiset item with its count.
    pub rows: Vec<RowChange>,
    /// The group rows among `rows` that are quarantined: their value overflowed, so their stored value
    /// is not their usage.
    pub quarantined_rows: Vec<AggregateKey>,
    /// Every stored charge: `(customer_id, meter, charge)`.
    pub charges: Vec<(CompactString, CompactString, Charge)>,
    /// Every stored quarantined period (`rating_quarantine`).
    pub quarantined_periods: Vec<QuarantinedPeriod>,
    /// Every dimension value admitted so far (`dimension_values`): `(meter, key, value)`.
    pub dimension_values: Vec<DimensionValue>,
}

/// A value a meter's `group_by` key has admitted (`None`: the value null), which the bound counts.
pub type DimensionValue = (String, String, Option<String>);

/// What a re-rating job changed in the stored rows of the periods it touched (SPEC §7): their rows (and
/// quarantined rows) before and after; the charges and quarantined periods are left empty, because
/// rating derives them. The pipeline's rating retracts `before` and adds `after` at one epoch, so what
/// it rates from stays what is stored, without a restart; unchanged parts of the two cancel out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RatingCorrection {
    pub before: RatingState,
    pub after: RatingState,
}

/// Everything one or more completed epochs produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EpochBatch {
    /// The last epoch this batch completes.
    pub epoch: u64,
    /// Changes to add to the stored rows, at most one per (key, item).
    pub aggregates: Vec<RowChange>,
    /// Group rows whose change (or whose total) overflowed the decimal range: their change in
    /// `aggregates` carries only the event count, and the sink marks the row quarantined.
    pub quarantined_rows: Vec<AggregateKey>,
    /// Billing periods entering (`+1`) or leaving (`-1`) quarantine.
    pub quarantined_periods: Vec<(QuarantinedPeriod, i64)>,
    /// Changes to window charges, at most one `+1` per window.
    pub charges: Vec<ChargeChange>,
    /// Changes to upcoming-invoice lines, at most one per line.
    pub lines: Vec<LineChange>,
    /// For each partition read, how far.
    pub offsets: Vec<PartitionProgress>,
    pub dead_letters: Vec<DeadLetter>,
    pub duplicates: Vec<Duplicate>,
    pub late_events: Vec<LateEvent>,
    /// Dimension values admitted in this batch's epochs, to store.
    pub dimension_values: Vec<DimensionValue>,
    /// The global event-time watermark after this batch (microseconds), when known.
    pub watermark: Option<i64>,
    /// When the dataflow sealed the batch (computed its watermark): the start of its commit latency.
    pub sealed_at: Option<std::time::Instant>,
}

impl EpochBatch {
    /// Nothing to store but perhaps a watermark.
    pub fn is_empty(&self) -> bool {
        self.aggregates.is_empty()
            && self.quarantined_rows.is_empty()
            && self.quarantined_periods.is_empty()
            && self.charges.is_empty()
            && self.lines.is_empty()
            && self.offsets.is_empty()
            && self.dead_letters.is_empty()
            && self.duplicates.is_empty()
            && self.late_events.is_empty()
            && self.dimension_values.is_empty()
    }

    /// Folds a later batch into this one: row changes add up, offsets and the watermark move forward.
    /// Two changes of a row whose sum overflows quarantine the row (never an error); the only error is
    /// an upcoming-invoice line change leaving the decimal range, which consecutive changes of one line
    /// cannot do (they telescope: their sum is the difference of two line totals).
    pub fn absorb(&mut self, later: EpochBatch) -> Result<(), crate::aggregate::Overflow> {
        self.epoch = self.epoch.max(later.epoch);
        self.aggregates.extend(later.aggregates);
        self.quarantined_rows.extend(later.quarantined_rows);
        // Stable: a row's changes stay in epoch order, so their partial sums telescope.
        self.aggregates
            .sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        let mut merged: Vec<RowChange> = Vec::with_capacity(self.aggregates.len());
        for (key, item, agg) in self.aggregates.drain(..) {
            match merged.last_mut() {
                Some((last, last_item, acc)) if *last == key && *last_item == item => {
                    let mut sum = *acc;
                    if sum.checked_add(&agg).is_ok() {
                        *acc = sum;
                    } else {
                        acc.value = rust_decimal::Decimal::ZERO;
                        acc.event_count = acc.event_count.saturating_add(agg.event_count);
                        self.quarantined_rows.push(key);
                    }
                }
                _ => merged.push((key, item, agg)),
            }
        }
        self.quarantined_rows.sort_unstable();
        self.quarantined_rows.dedup();
        let quarantined = &self.quarantined_rows;
        merged.retain(|(key, item, agg)| {
            !agg.is_zero() || (item.is_none() && quarantined.binary_search(key).is_ok())
        });
        self.aggregates = merged;
        self.quarantined_periods.extend(later.quarantined_periods);
        consolidate_quarantines(&mut self.quarantined_periods);
        self.charges.extend(later.charges);
        consolidate_charges(&mut self.charges);
        self.lines.extend(later.lines);
        self.lines.sort_by(|a, b| a.key().cmp(&b.key()));
        let mut lines: Vec<LineChange> = Vec::with_capacity(self.lines.len());
        for line in self.lines.drain(..) {
            match lines.last_mut() {
                Some(last) if last.key() == line.key() => {
                    last.amount = last
                        .amount
                        .checked_add(line.amount)
                        .ok_or(crate::aggregate::Overflow)?;
                    last.quantity = last
                        .quantity
                        .checked_add(line.quantity)
                        .ok_or(crate::aggregate::Overflow)?;
                    last.windows = last.windows.saturating_add(line.windows);
                }
                _ => lines.push(line),
            }
        }
        lines.retain(|l| l.windows != 0 || !l.amount.is_zero() || !l.quantity.is_zero());
        self.lines = lines;
        for progress in later.offsets {
            match self
                .offsets
                .iter_mut()
                .find(|p| p.partition == progress.partition)
            {
                Some(p) => {
                    p.next_offset = p.next_offset.max(progress.next_offset);
                    p.max_event_time_micros =
                        p.max_event_time_micros.max(progress.max_event_time_micros);
                }
                None => self.offsets.push(progress),
            }
        }
        self.dead_letters.extend(later.dead_letters);
        self.duplicates.extend(later.duplicates);
        self.late_events.extend(later.late_events);
        self.dimension_values.extend(later.dimension_values);
        self.watermark = self.watermark.max(later.watermark);
        self.sealed_at = self.sealed_at.or(later.sealed_at);
        Ok(())
    }
}

/// Adds up the diffs of identical quarantine changes and drops those that cancel.
pub fn consolidate_quarantines(changes: &mut Vec<(QuarantinedPeriod, i64)>) {
    changes.sort_by(|a, b| a.0.cmp(&b.0));
    let mut merged: Vec<(QuarantinedPeriod, i64)> = Vec::with_capacity(changes.len());
    for (period, diff) in changes.drain(..) {
        match merged.last_mut() {
            Some(last) if last.0 == period => last.1 = last.1.saturating_add(diff),
            _ => merged.push((period, diff)),
        }
    }
    merged.retain(|c| c.1 != 0);
    *changes = merged;
}

/// Adds up the diffs of identical charge changes and drops those that cancel.
pub fn consolidate_charges(charges: &mut Vec<ChargeChange>) {
    charges.sort_unstable_by(|a, b| (&a.0, &a.1, &a.2).cmp(&(&b.0, &b.1, &b.2)));
    let mut merged: Vec<ChargeChange> = Vec::with_capacity(charges.len());
    for change in charges.drain(..) {
        match merged.last_mut() {
            Some(last) if (&last.0, &last.1, &last.2) == (&change.0, &change.1, &change.2) => {
                last.3 = last.3.saturating_add(change.3)
            }
            _ => merged.push(change),
        }
    }
    merged.retain(|c| c.3 != 0);
    *charges = merged;
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal::Decimal;

    fn key(c: &str) -> AggregateKey {
        AggregateKey {
            dimensions: Default::default(),
            customer_id: c.into(),
            meter: "m".into(),
            window_start: 0,
            window_end: 3_600,
        }
    }

    fn progress(partition: i32, next_offset: i64) -> PartitionProgress {
        PartitionProgress {
            partition,
            next_offset,
            max_event_time_micros: None,
        }
    }

    #[test]
    fn absorbing_a_batch_adds_changes_per_key_and_keeps_the_furthest_offsets() {
        let mut a = EpochBatch {
            epoch: 1,
            aggregates: vec![(key("a"), None, Aggregate::of(Decimal::ONE))],
            offsets: vec![progress(0, 10), progress(1, 5)],
            ..EpochBatch::default()
        };
        let b = EpochBatch {
            epoch: 2,
            aggregates: vec![
                (key("a"), None, Aggregate::of(Decimal::TWO)),
                (key("b"), None, Aggregate::of(Decimal::ONE)),
            ],
            offsets: vec![progress(0, 12)],
            watermark: Some(7),
            ..EpochBatch::default()
        };
        a.absorb(b).unwrap();
        assert_eq!(a.epoch, 2);
        assert_eq!(
            a.aggregates[0],
            (
                key("a"),
                None,
                Aggregate {
                    value: Decimal::from(3),
                    event_count: 2
                }
            )
        );
        assert_eq!(a.aggregates.len(), 2);
        assert_eq!(a.offsets, vec![progress(0, 12), progress(1, 5)]);
        assert_eq!(a.watermark, Some(7));
    }

    /// Finding 3 in the sink: two queued changes of a row whose sum overflows quarantine the row
    /// instead of failing the writer (which stopped the pipeline for good).
    #[test]
    fn finding_03_absorbing_changes_that_overflow_quarantines_the_row() {
        let huge = Aggregate::of(Decimal::MAX - Decimal::ONE);
        let mut a = EpochBatch {
            epoch: 1,
            aggregates: vec![
                (key("a"), None, huge),
                (key("b"), None, Aggregate::of(Decimal::ONE)),
            ],
            ..EpochBatch::default()
        };
        let b = EpochBatch {
            epoch: 2,
            aggregates: vec![(key("a"), None, huge)],
            ..EpochBatch::default()
        };
        a.absorb(b).unwrap();
        assert_eq!(a.quarantined_rows, vec![key("a")]);
        assert_eq!(
            a.aggregates,
            vec![
                (
                    key("a"),
                    None,
                    Aggregate {
                        value: Decimal::ZERO,
                        event_count: 2
                    }
                ),
                (key("b"), None, Aggregate::of(Decimal::ONE)),
            ]
        );
    }
}
