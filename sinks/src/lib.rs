//! Postgres for the pipeline's own tables: where results become durable. Knows nothing of timely or
//! axum; what the API and the jobs own (customers, meters, price books, invoices) is `meterflow_store`.
//!
//! | file | owns |
//! |---|---|
//! | `metrics.rs` | the pipeline's Prometheus metrics |
//! | `epoch.rs` | the epoch sink: one fenced transaction per batch of completed epochs, results + offsets together; quarantined rows and periods |
//! | `epoch/rows.rs` | the statements of an epoch commit, one per table: aggregates, multisets, charges, upcoming lines, quarantined periods, dead letters, duplicates, late events |
//! | `lease.rs` | the writer lease (fencing generation) and the stored source offsets a restart resumes from |
//! | `restore.rs` | the event-time progress and the rating state a restart goes on from (all of it, or a re-rating job's periods) |
//! | `source.rs` | one events topic per database, anchors that tell a recreated topic, retention gaps, the source reset |
//! | `rerating.rs` | re-rating jobs: recompute a scope from raw events, correct rows, charges, upcoming lines |
//! | `rerating_jobs.rs` | the runner, in the pipeline's leader, that executes queued re-rating jobs, one at a time, with a session lock each, and hands each correction to the running rating |
//! | `error.rs` | [`SinkError`], classified transient (retry) or permanent (stop) |
//!
//! Data never reaches a panic: outside tests this crate may not unwrap, expect or index (the lints
//! below; `clippy.toml` allows them in tests). Arithmetic on data is checked by hand (money through
//! `meterflow_model::money`).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

//! ## Recovery (SPEC §9)
//!
//! ```text
//!  kill -9 ──► restart: acquire_lease (generation+1: the old instance is fenced)
//!                       stored_offsets + stored_event_times ──► readers resume at the committed offsets
//!                       load_rating_state (rows, multisets, charges) + price books ──► worker 0 feeds
//!                       them to rating at epoch 0; the stored charges are subtracted, so only what
//!                       changed while it was down (a price book edited) reaches the sink
//!  records after the committed offsets are read again ──► claims: a record finds its own claim (counts
//!  again, its epoch never committed) or another's (duplicate) ──► the same results as an uninterrupted run
//! ```
//! Aggregates need no memory between epochs (sums and counts are added to the stored rows, max /
//! unique_count / latest are recomputed from their stored multisets, dedup is the `event_ids` table), but
//! period-to-date rating needs each period's whole usage: the leader loads every stored row and charge
//! at start-up, so restart time grows with the number of live windows (`perf/src/bin/recovery.rs`). A
//! restart may change `--workers` and `--processes` (partitions are reassigned, claims are keyed by record
//! position, not by worker). A re-rating job changes the stored state under the running pipeline's
//! lease, and its rating takes the same change in at one epoch (`rerating.rs`): no restart.

pub mod epoch;
pub mod error;
pub mod lease;
pub mod metrics;
pub mod rerating;
pub mod rerating_jobs;
pub mod restore;
pub mod schema;
pub mod source;

pub use epoch::{spawn_writer, WriterSummary};
pub use error::SinkError;
pub use lease::{acquire_lease, stored_offsets, Lease};

/// The schema every crate writes to, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");
