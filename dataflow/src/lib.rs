//! The streaming core: Kafka records in, per-epoch [`EpochBatch`](meterflow_model::EpochBatch)es out.
//! Knows nothing of HTTP or Postgres: the sink is whoever reads the batch channel.
//!
//! ```text
//!  Kafka ─► reader thread (one per worker, owns its partitions) ─► bounded channel
//!                                                                     │ (never blocks the worker)
//!      reader: decode+validate, claim each event_id in Postgres (dedup, classify.rs)
//!  worker loop: feed classified items + offset markers, advance the epoch ◄──┘
//!      │       (worker 0 also feeds the control input: meters, committed watermark; and rating's inputs)
//!      ▼  build(): meter ─► contributions (row, item, Σvalue, count) ─► consolidate (exchange by row)
//!                   │   (its row changes + restored rows) ─► rate (with price books) ─► charge changes ─► lines
//!                   └─► late events, duplicates, dead letters   offsets ──┐          │
//!                                     └───────────────────────────────────┴─► commit_epochs (worker 0,
//!                                                                             watermark)
//!                                                                     │ batch per completed epoch
//!                                                                     ▼
//!                                                               sink thread (sinks crate)
//! ```
//!
//! | file | owns |
//! |---|---|
//! | `source.rs` | the Kafka reader threads: deterministic partition assignment, start offsets, catch-up |
//! | `admit.rs` | the bound on dimension values: the first `max_dimension_values` values of each (meter, key) are admitted, an event bringing one more is a dead letter |
//! | `classify.rs` | decode, validate and claim (dedup, voids) on the reader threads; the claim store is `meterflow_model::claims` |
//! | `meters.rs` | [`Meters`](meters::Meters): a set of meters as metering reads it; no default meter on a meter's name |
//! | `control.rs` | [`Control`]: the meters and the committed watermark as a timestamped input, and what is in force at each epoch |
//! | `inputs.rs` | [`GraphInputs`]: every input handle of the graph, once, for the worker loop, tests, import and benchmarks |
//! | `operators.rs` | `build(inputs, context)`: the dataflow graph, one small named operator per step |
//! | `rating.rs` | `rate`: window usage + price books → period-to-date window charges (SPEC §5) |
//! | `error.rs` | [`WorkerError`]: what stops the pipeline, and where transient and data failures are handled instead |
//! | `consolidate.rs` | `per_epoch`: an epoch's updates summed per record in a hash table (row changes, lines, quarantines) |
//! | `commit.rs` | `commit_epochs`: gathers each completed epoch on worker 0, hands it to the sink, holds the epoch open until the sink acknowledges |
//! | `worker.rs` | driving a worker: feeding inputs, ticking epochs, backpressure, shutdown |
//! | `wire.rs` | [`Json`](wire::Json): meters and price books cross processes as JSON text (bincode cannot read back a skipped field) |
//! | `usage.rs` | [`Usage`], the aggregate as a differential difference; a sum past the decimal range is a sticky *overflowed* usage (quarantine) |
//!
//! Data never reaches a panic: outside tests this crate may not unwrap, expect, index or do unchecked
//! arithmetic (the lints below; `clippy.toml` allows the first three in tests).
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )
)]

pub mod admit;
pub mod catch_up;
pub mod classify;
pub mod commit;
pub mod consolidate;
pub mod control;
pub mod error;
pub mod inputs;
pub mod meters;
pub mod operators;
pub mod rating;
pub mod source;
pub mod usage;
pub mod wire;
pub mod worker;

pub use classify::SharedWatermark;
pub use commit::{SinkChannels, SinkUpdate};
pub use control::Control;
pub use error::{SourceError, WorkerError};
pub use inputs::{GraphInputs, Inputs, RatingInputs};
pub use meterflow_model::watermark::WatermarkPolicy;
pub use operators::GraphContext;
pub use source::{RawRecord, RecordKind, SourceConfig};
pub use worker::{run_worker, ControlFeed, Feeds, RatingFeed, WorkerConfig};
