//! Postgres for what the API and the jobs read and change: customers, meters, price books, invoices and
//! invoice runs. Knows nothing of timely, Kafka or axum; the pipeline's own tables (aggregates, charges,
//! claims, offsets, the lease) are `meterflow_sinks`'.
//!
//! ```text
//!   api ──► store ──► model        src/ (jobs: invoice runs, meters from the config) ──► store
//!   sinks (re-rating, restore) ──► store::{meters, price_books}::load_*   (reads only)
//! ```
//!
//! | file | owns (writes) |
//! |---|---|
//! | `meters.rs` | `meters`: registered (names disjoint from event types), listed, loaded for the pipeline |
//! | `price_books.rs` | `price_books` and their audit rows: created and edited, loaded for rating |
//! | `customers.rs` | `customers`: registered, listed, edited (the currency only before the first invoice) |
//! | `invoices.rs` | `invoices` and their lines: issuing (gapless numbers, top-ups, adjustments; one issued invoice per period), voids, reads, the upcoming invoice |
//! | `rerating_jobs.rs` | `rerating_jobs`: queued (no two unfinished jobs overlap), claimed, finished |
//! | `invoice_runs.rs` | `invoice_runs`: every registered customer's invoice for a period, in batches, resumable |
//!
//! Data never reaches a panic: outside tests this crate may not unwrap, expect or index (the lints
//! below; `clippy.toml` allows them in tests). Arithmetic on data is checked by hand (money through
//! `meterflow_model::money`).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod customers;
pub mod invoice_runs;
pub mod invoices;
pub mod meters;
pub mod price_books;
pub mod rerating_jobs;

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
