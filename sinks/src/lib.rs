//! Postgres: where results become durable. Knows nothing of timely or axum.
//!
//! | file | owns |
//! |---|---|
//! | `claims.rs` | [`PgClaims`]: durable dedup and voids on `event_ids`, called by the Kafka readers |
//! | `metrics.rs` | the pipeline's Prometheus metrics |
//! | `epoch.rs` | the epoch sink: one fenced transaction per batch of completed epochs, results + offsets together |
//! | `lease.rs` | the writer lease (fencing generation) and the stored source offsets a restart resumes from |
//! | `store.rs` | meters, and the event-time progress a restart goes on from |
//! | `error.rs` | [`SinkError`], classified transient (retry) or permanent (stop) |

pub mod claims;
pub mod epoch;
pub mod error;
pub mod lease;
pub mod metrics;
pub mod store;

pub use claims::PgClaims;
pub use epoch::{spawn_writer, WriterSummary};
pub use error::SinkError;
pub use lease::{acquire_lease, stored_offsets, Lease};

/// The schema every crate writes to, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");
