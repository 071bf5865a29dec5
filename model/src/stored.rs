//! What a commit means: [`Stored`], the state a sink keeps, and [`Stored::apply`], one
//! [`EpochBatch`] taken in, with the rules every sink must keep checked as errors. Pure and in memory: the
//! reference the dataflow's tests compare the Postgres-free pipeline against, and the statement of
//! what `sinks/src/epoch.rs` does in one transaction.
//!
//! ```text
//!  EpochBatch ──apply──► rows        group rows add up; multiset rows count items (never below zero)
//!                        quarantined rows marked; periods in and out of quarantine
//!                        charges     a window's charge replaced whole: its old one withdrawn (−1)
//!                                    must be the stored one; at most one new (+1)
//!                        lines       add up; a line with no windows left is empty and goes
//!                        offsets     move forward; the watermark never goes back
//! ```

use std::collections::{BTreeMap, BTreeSet};

use compact_str::CompactString;
use rust_decimal::Decimal;

use crate::aggregate::{Aggregate, AggregateKey};
use crate::batch::{ChargeChange, EpochBatch, QuarantinedPeriod};
use crate::dimensions::Dimensions;
use crate::meter::Item;
use crate::price::{Charge, Measure};

/// An upcoming-invoice line's key: (customer, period start, meter, price book, dimension values).
pub type LineKey = (CompactString, i64, CompactString, CompactString, Dimensions);

/// A charge row's key: (customer, meter, window start, dimension values).
pub type ChargeKey = (CompactString, CompactString, i64, Dimensions);

/// An upcoming-invoice line's totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LineTotals {
    pub amount: Decimal,
    pub quantity: Decimal,
    pub windows: i64,
}

/// The state a sink keeps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stored {
    /// Group rows (`None` item: Σ value, Σ count) and multiset items (the item's event count).
    pub rows: BTreeMap<(AggregateKey, Option<Item>), Aggregate>,
    pub quarantined_rows: BTreeSet<AggregateKey>,
    pub quarantined_periods: BTreeSet<QuarantinedPeriod>,
    pub charges: BTreeMap<ChargeKey, Charge>,
    pub lines: BTreeMap<LineKey, LineTotals>,
    /// Per partition, the next offset to read.
    pub offsets: BTreeMap<i32, i64>,
    pub watermark: Option<i64>,
    pub dead_letters: usize,
    pub late_events: usize,
}

/// A batch that breaks what a commit means; a sink that took it in would store something wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("a sum left the decimal range: {0}")]
    Overflow(String),
    #[error("an item would be retracted below zero: {0}")]
    ItemBelowZero(String),
    #[error("a row with no events has a value: {0}")]
    ValueWithoutEvents(String),
    #[error("a window gets two new charges in one batch: {0}")]
    TwoNewCharges(String),
    #[error("a withdrawn charge is not the stored one: {0}")]
    WithdrawnNotStored(String),
    #[error("a line would have fewer than no windows, or none and an amount: {0}")]
    LineWindows(String),
    #[error("a period leaves quarantine it was not in, or enters it twice: {0}")]
    Quarantine(String),
}

impl Stored {
    /// Takes `batch` in, as one commit; on an error nothing of it is applied.
    pub fn apply(&mut self, batch: &EpochBatch) -> Result<(), ApplyError> {
        let mut next = self.clone();
        next.apply_rows(batch)?;
        next.apply_charges(batch)?;
        next.apply_lines(batch)?;
        next.apply_quarantined_periods(batch)?;
        for p in &batch.offsets {
            let at = next.offsets.entry(p.partition).or_insert(p.next_offset);
            *at = (*at).max(p.next_offset);
        }
        next.watermark = next.watermark.max(batch.watermark);
        next.dead_letters = next.dead_letters.saturating_add(batch.dead_letters.len());
        next.late_events = next.late_events.saturating_add(batch.late_events.len());
        *self = next;
        Ok(())
    }

    fn apply_rows(&mut self, batch: &EpochBatch) -> Result<(), ApplyError> {
        for (key, item, change) in &batch.aggregates {
            let slot = (key.clone(), item.clone());
            let row = self.rows.entry(slot.clone()).or_default();
            if item.is_some() {
                row.event_count = row
                    .event_count
                    .checked_add(change.event_count)
                    .ok_or_else(|| ApplyError::Overflow(format!("{slot:?}")))?;
                if row.event_count < 0 {
                    return Err(ApplyError::ItemBelowZero(format!("{slot:?}")));
                }
            } else if row.checked_add(change).is_err() {
                // The dataflow quarantines a row whose sum overflows; the count still adds.
                row.value = Decimal::ZERO;
                row.event_count = row.event_count.saturating_add(change.event_count);
                self.quarantined_rows.insert(key.clone());
            }
            if row.event_count == 0 {
                if !row.value.is_zero() && !self.quarantined_rows.contains(key) {
                    return Err(ApplyError::ValueWithoutEvents(format!("{slot:?}")));
                }
                self.rows.remove(&slot);
            }
        }
        self.quarantined_rows
            .extend(batch.quarantined_rows.iter().cloned());
        Ok(())
    }

    fn apply_charges(&mut self, batch: &EpochBatch) -> Result<(), ApplyError> {
        let key = |c: &ChargeChange| {
            (
                c.0.clone(),
                c.1.clone(),
                c.2.window_start,
                c.2.dimensions.clone(),
            )
        };
        let mut added = BTreeSet::new();
        for c in batch.charges.iter().filter(|c| c.3 > 0) {
            if !added.insert(key(c)) || c.3 != 1 {
                return Err(ApplyError::TwoNewCharges(format!("{c:?}")));
            }
        }
        for c in batch.charges.iter().filter(|c| c.3 < 0) {
            if self.charges.get(&key(c)) != Some(&c.2) || c.3 != -1 {
                return Err(ApplyError::WithdrawnNotStored(format!("{c:?}")));
            }
            self.charges.remove(&key(c));
        }
        for c in batch.charges.iter().filter(|c| c.3 > 0) {
            self.charges.insert(key(c), c.2.clone());
        }
        Ok(())
    }

    fn apply_lines(&mut self, batch: &EpochBatch) -> Result<(), ApplyError> {
        for l in &batch.lines {
            let key = (
                l.customer_id.clone(),
                l.period_start,
                l.meter.clone(),
                l.price_book_id.clone(),
                l.dimensions.clone(),
            );
            let line = self.lines.entry(key.clone()).or_default();
            let overflow = || ApplyError::Overflow(format!("{key:?}"));
            line.amount = line.amount.checked_add(l.amount).ok_or_else(overflow)?;
            line.quantity = line.quantity.checked_add(l.quantity).ok_or_else(overflow)?;
            line.windows = line.windows.checked_add(l.windows).ok_or_else(overflow)?;
            if line.windows < 0
                || (line.windows == 0 && !(line.amount.is_zero() && line.quantity.is_zero()))
            {
                return Err(ApplyError::LineWindows(format!("{key:?}")));
            }
            if line.windows == 0 {
                self.lines.remove(&key);
            }
        }
        Ok(())
    }

    fn apply_quarantined_periods(&mut self, batch: &EpochBatch) -> Result<(), ApplyError> {
        for (period, diff) in &batch.quarantined_periods {
            let changed = match diff {
                1 => self.quarantined_periods.insert(period.clone()),
                -1 => self.quarantined_periods.remove(period),
                _ => false,
            };
            if !changed {
                return Err(ApplyError::Quarantine(format!("{period:?} {diff}")));
            }
        }
        Ok(())
    }

    /// Every row as the API shows it: group rows as stored, multiset rows folded into their value
    /// ([`multiset_row`]).
    pub fn row_values(&self) -> BTreeMap<AggregateKey, Aggregate> {
        let mut values = BTreeMap::new();
        let mut items: BTreeMap<&AggregateKey, BTreeMap<Item, i64>> = BTreeMap::new();
        for ((key, item), row) in &self.rows {
            match item {
                None => {
                    values.insert(key.clone(), *row);
                }
                Some(item) => {
                    items
                        .entry(key)
                        .or_default()
                        .insert(item.clone(), row.event_count);
                }
            }
        }
        for (key, bag) in items {
            if let Some(row) = multiset_row(&bag) {
                values.insert(key.clone(), row);
            }
        }
        values
    }
}

/// The aggregate a multiset row shows: max, number of distinct values or latest value (normalized),
/// with the number of events; `None` without items.
pub fn multiset_row(items: &BTreeMap<Item, i64>) -> Option<Aggregate> {
    let live: Vec<&Item> = items
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(i, _)| i)
        .collect();
    if live.is_empty() {
        return None;
    }
    let event_count = items
        .values()
        .filter(|n| **n > 0)
        .fold(0i64, |sum, n| sum.saturating_add(*n));
    let value = match Measure::from_items(Decimal::ZERO, live.iter().copied())? {
        Measure::Max(v) => v,
        Measure::Unique(values) => Decimal::from(values.len()),
        Measure::Latest { value, .. } => value,
        Measure::Total(v) => v,
    };
    Some(Aggregate { value, event_count })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::LineChange;

    fn key(window_start: i64) -> AggregateKey {
        AggregateKey {
            dimensions: Default::default(),
            customer_id: "c".into(),
            meter: "m".into(),
            window_start,
            window_end: window_start + 3600,
        }
    }

    fn charge(amount: i64) -> Charge {
        Charge {
            dimensions: Default::default(),
            window_start: 0,
            window_end: 3600,
            quantity: Decimal::from(amount),
            amount: Decimal::from(amount),
            currency: "USD".into(),
            price_book_id: "b".into(),
        }
    }

    #[test]
    fn rows_add_up_multisets_count_and_a_retraction_below_zero_is_refused() {
        let mut s = Stored::default();
        let batch = EpochBatch {
            aggregates: vec![
                (key(0), None, Aggregate::of(Decimal::from(5))),
                (
                    key(0),
                    Some(Item::Max(Decimal::from(7))),
                    Aggregate {
                        value: Decimal::ZERO,
                        event_count: 1,
                    },
                ),
            ],
            ..EpochBatch::default()
        };
        s.apply(&batch).unwrap();
        s.apply(&batch).unwrap();
        assert_eq!(
            s.rows[&(key(0), None)],
            Aggregate {
                value: Decimal::from(10),
                event_count: 2
            }
        );
        let retract = |n: i64| EpochBatch {
            aggregates: vec![(
                key(0),
                Some(Item::Max(Decimal::from(7))),
                Aggregate {
                    value: Decimal::ZERO,
                    event_count: -n,
                },
            )],
            ..EpochBatch::default()
        };
        let before = s.clone();
        assert!(matches!(
            s.apply(&retract(3)),
            Err(ApplyError::ItemBelowZero(_))
        ));
        assert_eq!(s, before, "a refused batch changes nothing");
        s.apply(&retract(2)).unwrap();
        assert!(!s
            .rows
            .contains_key(&(key(0), Some(Item::Max(Decimal::from(7))))));
    }

    #[test]
    fn a_charge_is_replaced_whole_and_only_the_stored_one_can_be_withdrawn() {
        let mut s = Stored::default();
        let change = |c: Charge, d| ("c".into(), "m".into(), c, d);
        s.apply(&EpochBatch {
            charges: vec![change(charge(1), 1)],
            ..EpochBatch::default()
        })
        .unwrap();
        s.apply(&EpochBatch {
            charges: vec![change(charge(1), -1), change(charge(2), 1)],
            ..EpochBatch::default()
        })
        .unwrap();
        assert_eq!(
            s.charges[&("c".into(), "m".into(), 0, Dimensions::default())],
            charge(2)
        );
        let wrong = EpochBatch {
            charges: vec![change(charge(1), -1)],
            ..EpochBatch::default()
        };
        assert!(matches!(
            s.apply(&wrong),
            Err(ApplyError::WithdrawnNotStored(_))
        ));
        let twice = EpochBatch {
            charges: vec![change(charge(3), 1), change(charge(4), 1)],
            ..EpochBatch::default()
        };
        assert!(matches!(s.apply(&twice), Err(ApplyError::TwoNewCharges(_))));
    }

    #[test]
    fn lines_add_up_and_go_when_their_windows_do() {
        let mut s = Stored::default();
        let line = |amount: i64, windows| LineChange {
            dimensions: Default::default(),
            customer_id: "c".into(),
            period_start: 0,
            meter: "m".into(),
            price_book_id: "b".into(),
            currency: "USD".into(),
            amount: Decimal::from(amount),
            quantity: Decimal::from(amount),
            windows,
        };
        s.apply(&EpochBatch {
            lines: vec![line(5, 2)],
            ..EpochBatch::default()
        })
        .unwrap();
        assert_eq!(s.lines.len(), 1);
        let bad = EpochBatch {
            lines: vec![line(-4, -2)],
            ..EpochBatch::default()
        };
        assert!(matches!(s.apply(&bad), Err(ApplyError::LineWindows(_))));
        s.apply(&EpochBatch {
            lines: vec![line(-5, -2)],
            ..EpochBatch::default()
        })
        .unwrap();
        assert!(s.lines.is_empty());
    }

    #[test]
    fn offsets_move_forward_and_the_watermark_never_goes_back() {
        let mut s = Stored::default();
        let progress = |next_offset| crate::batch::PartitionProgress {
            partition: 0,
            next_offset,
            max_event_time_micros: None,
        };
        s.apply(&EpochBatch {
            offsets: vec![progress(10)],
            watermark: Some(50),
            ..EpochBatch::default()
        })
        .unwrap();
        s.apply(&EpochBatch {
            offsets: vec![progress(4)],
            watermark: Some(20),
            ..EpochBatch::default()
        })
        .unwrap();
        assert_eq!((s.offsets[&0], s.watermark), (10, Some(50)));
    }

    #[test]
    fn a_multiset_row_shows_its_measure() {
        let bag = BTreeMap::from([
            (Item::Max(Decimal::from(3)), 1),
            (Item::Max(Decimal::from(9)), 2),
        ]);
        assert_eq!(
            multiset_row(&bag),
            Some(Aggregate {
                value: Decimal::from(9),
                event_count: 3
            })
        );
        let gone = BTreeMap::from([(Item::Unique("\"a\"".into()), 0)]);
        assert_eq!(multiset_row(&gone), None);
    }
}
