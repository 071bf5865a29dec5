//! Postgres: where results become durable. Knows nothing of timely or axum.
//!
//! | file | owns |
//! |---|---|
//! | `epoch.rs` | the epoch sink: one fenced transaction per batch of completed epochs, results + offsets together |
//! | `lease.rs` | the writer lease (fencing generation) and the stored source offsets a restart resumes from |
//! | `error.rs` | [`SinkError`], classified transient (retry) or permanent (stop) |

pub mod epoch;
pub mod error;
pub mod lease;

pub use epoch::{spawn_writer, WriterSummary};
pub use error::SinkError;
pub use lease::{acquire_lease, stored_offsets, Lease};

/// The schema every crate writes to, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");
