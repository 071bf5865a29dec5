//! Postgres for what the API and the jobs read and change: events accepted over HTTP and their claims
//! (the pipeline's Kafka readers claim through [`PgClaims`] too), customers, meters, price books,
//! invoices and runs, re-rating jobs, keys, audit, idempotency, and the API's reads of the pipeline's
//! results. Knows nothing of timely, Kafka or axum; the pipeline's own tables (aggregates, charges,
//! upcoming lines, offsets, the lease) are written by `meterflow_sinks`.
//!
//! ```text
//!   api ──► store ──► model        src/ (jobs: invoice runs, meters from the config) ──► store
//!   sinks (re-rating, restore, source reset) ──► store::{meters, price_books}::load_*, claims::release_for_reset
//!   src/pipeline ──► PgClaims, handed to the dataflow's readers behind model::claims::Claims
//! ```
//!
//! | file | owns (writes) |
//! |---|---|
//! | `events.rs` | the API's event writes: accepted events claimed + stored + queued in one statement, withdrawals, 409 answers, voids, the outbox |
//! | `claims.rs` | [`PgClaims`]: durable dedup and voids on `event_ids` (and the raw rows of new events), called by the pipeline's Kafka readers |
//! | `copy_text.rs` | `COPY`'s text format: fields, times, raw event rows (the claims fast path; perf's e2e and floor) |
//! | `metrics.rs` | the claim store's Prometheus metrics |
//! | `meters.rs` | `meters`: registered (names disjoint from event types), listed, loaded for the pipeline |
//! | `price_books.rs` | `price_books` and their audit rows: created and edited, loaded for rating |
//! | `customers.rs` | `customers`: registered, listed, edited (the currency only before the first invoice) |
//! | `invoices.rs` | `invoices` and their lines: issuing (gapless numbers, top-ups, adjustments; one issued invoice per period), the upcoming invoice |
//! | `invoices/stored.rs` | stored invoices: listed, read with their adjustments, voided |
//! | `invoice_runs.rs` | `invoice_runs`: every registered customer's invoice for a period, in batches, resumable |
//! | `rerating_jobs.rs` | `rerating_jobs`: queued (no two unfinished jobs overlap), claimed, finished |
//! | `keys.rs` | `api_keys`: created and revoked (audited), listed, looked up |
//! | `audit.rs` | `audit_log`, append-only, and the snapshots its rows show |
//! | `idempotency.rs` | `idempotency_keys`: claims and the answers stored under them |
//! | `watermark_floors.rs` | `watermark_floors`: an admin's floor under a topic's watermark (audited) |
//! | `results.rs` | reads of the pipeline's results for the API: aggregations (and their events), charges, dead letters, the committed progress, readiness |
//! | `retention.rs` | `meterflow retention`'s SQL: month partitions of `telemetry_events` dropped, `telemetry_retention`, `event_ids` pruned |
//! | `owners.rs` | whose an invoice, a re-rating job or an event is (for customer-bound keys) |
//!
//! Data never reaches a panic: outside tests this crate may not unwrap, expect or index (the lints
//! below; `clippy.toml` allows them in tests). Arithmetic on data is checked by hand (money through
//! `meterflow_model::money`).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod audit;
pub mod claims;
pub mod copy_text;
pub mod customers;
pub mod events;
pub mod idempotency;
pub mod invoice_runs;
pub mod invoices;
pub mod keys;
pub mod meters;
pub mod metrics;
pub mod owners;
pub mod price_books;
pub mod rerating_jobs;
pub mod results;
pub mod retention;
pub mod watermark_floors;

pub use claims::PgClaims;

/// Connection-level failures and SQLSTATE classes 08 (connection), 40 (rollback), 53 (resources),
/// 57 (operator intervention: shutdown, admin terminate) are worth retrying.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            ["08", "40", "53", "57"]
                .iter()
                .any(|class| code.starts_with(class))
        }
        _ => false,
    }
}
