//! Everything the graph reads, once: [`GraphInputs`], the input handles a driver feeds (the worker loop,
//! the tests that drive `build` in rounds, `meterflow import` and the core benchmark), and [`Inputs`],
//! the streams `build` takes.
//!
//! ```text
//!  GraphInputs ──streams(scope)──► Inputs ──build──► sink updates
//!   items        classified records, on the worker that read them
//!   markers      (epoch, how far a partition was read)
//!   control      meters and watermark (control.rs), worker 0 only
//!   rows, charges, quarantines   what rating starts from (restored), worker 0 only
//!   books        price-book changes, worker 0 only
//!   admitted     the dimension values admitted before a start (admit.rs), worker 0 only
//! ```
//! Every worker advances every handle each epoch, also those it never sends on, so the frontier moves.

use std::collections::BTreeSet;

use differential_dataflow::difference::Abelian;
use meterflow_model::batch::QuarantinedPeriod;
use meterflow_model::{PartitionProgress, PriceBook, RatingCorrection, RatingState};
use timely::dataflow::{InputHandleVec, Scope, StreamVec};

use crate::admit::AdmittedValue;
use crate::classify::SourceItem;
use crate::control::Control;
use crate::operators::Epoch;
use crate::rating::{ChargeRow, RowKey};
use crate::usage::Usage;

/// The streams [`build`](crate::operators::build) reads.
pub struct Inputs<'scope> {
    pub items: StreamVec<'scope, Epoch, SourceItem>,
    pub markers: StreamVec<'scope, Epoch, (Epoch, PartitionProgress)>,
    pub control: StreamVec<'scope, Epoch, Control>,
    pub rating: RatingInputs<'scope>,
    /// The dimension values admitted before a start (admit.rs), at epoch 0.
    pub admitted: StreamVec<'scope, Epoch, AdmittedValue>,
}

/// The rating inputs, as differential updates `(data, epoch, diff)`: what the pipeline committed before
/// (fed by worker 0 at epoch 0) and the price books (changes fed by worker 0 as they are seen).
pub struct RatingInputs<'scope> {
    pub restored_rows: StreamVec<'scope, Epoch, (RowKey, Epoch, Usage)>,
    pub restored_charges: StreamVec<'scope, Epoch, (ChargeRow, Epoch, isize)>,
    pub restored_quarantines: StreamVec<'scope, Epoch, (QuarantinedPeriod, Epoch, isize)>,
    pub books: StreamVec<'scope, Epoch, (PriceBook, Epoch, isize)>,
}

/// The input handles of one worker.
#[derive(Default)]
pub struct GraphInputs {
    pub items: InputHandleVec<Epoch, SourceItem>,
    pub markers: InputHandleVec<Epoch, (Epoch, PartitionProgress)>,
    pub control: InputHandleVec<Epoch, Control>,
    pub rows: InputHandleVec<Epoch, (RowKey, Epoch, Usage)>,
    pub charges: InputHandleVec<Epoch, (ChargeRow, Epoch, isize)>,
    pub quarantines: InputHandleVec<Epoch, (QuarantinedPeriod, Epoch, isize)>,
    pub books: InputHandleVec<Epoch, (PriceBook, Epoch, isize)>,
    pub admitted: InputHandleVec<Epoch, AdmittedValue>,
}

impl GraphInputs {
    /// The streams of these handles in `scope`.
    pub fn streams<'scope>(&mut self, scope: Scope<'scope, Epoch>) -> Inputs<'scope> {
        Inputs {
            items: self.items.to_stream(scope),
            markers: self.markers.to_stream(scope),
            control: self.control.to_stream(scope),
            rating: RatingInputs {
                restored_rows: self.rows.to_stream(scope),
                restored_charges: self.charges.to_stream(scope),
                restored_quarantines: self.quarantines.to_stream(scope),
                books: self.books.to_stream(scope),
            },
            admitted: self.admitted.to_stream(scope),
        }
    }

    /// The epoch the items are fed at.
    pub fn epoch(&self) -> Epoch {
        *self.items.time()
    }

    /// Moves every input but the control input to `epoch`. The control input moves by its own rule
    /// (the worker loop: `worker.rs`); a driver that feeds no control moves it along with the others.
    pub fn advance_to(&mut self, epoch: Epoch) {
        self.items.advance_to(epoch);
        self.markers.advance_to(epoch);
        self.rows.advance_to(epoch);
        self.charges.advance_to(epoch);
        self.quarantines.advance_to(epoch);
        self.books.advance_to(epoch);
        self.admitted.advance_to(epoch);
    }

    /// Feeds a stored rating state at `epoch`, added (`sign` 1) or retracted (-1).
    pub fn send_state(&mut self, state: RatingState, epoch: Epoch, sign: isize) {
        let quarantined: BTreeSet<_> = state.quarantined_rows.into_iter().collect();
        for (key, item, aggregate) in state.rows {
            let mut usage = if item.is_none() && quarantined.contains(&key) {
                Usage::overflowed(aggregate.event_count)
            } else {
                Usage::of(aggregate)
            };
            if sign < 0 {
                usage.negate();
            }
            self.rows.send(((key, item), epoch, usage));
        }
        for charge in state.charges {
            self.charges.send((charge, epoch, sign));
        }
        for period in state.quarantined_periods {
            self.quarantines.send((period, epoch, sign));
        }
        // Admitted values are never taken back; a correction's `after` carries the values its job
        // admitted (sinks/src/rerating/bound.rs).
        if sign > 0 {
            for value in state.dimension_values {
                self.admitted.send(value);
            }
        }
    }

    /// Feeds a re-rating job's change of the stored state at `epoch`: its state before, retracted, and
    /// after, added (what both hold cancels out).
    pub fn correct(&mut self, change: RatingCorrection, epoch: Epoch) {
        self.send_state(change.before, epoch, -1);
        self.send_state(change.after, epoch, 1);
    }

    /// Feeds the difference between the books in force and a new snapshot at `epoch`; true if there
    /// was one.
    pub fn replace_books(
        &mut self,
        current: &mut BTreeSet<PriceBook>,
        snapshot: Vec<PriceBook>,
        epoch: Epoch,
    ) -> bool {
        let next: BTreeSet<PriceBook> = snapshot.into_iter().collect();
        let mut changed = false;
        for gone in current.difference(&next) {
            self.books.send((gone.clone(), epoch, -1));
            changed = true;
        }
        for new in next.difference(current) {
            self.books.send((new.clone(), epoch, 1));
            changed = true;
        }
        *current = next;
        changed
    }
}
