//! Sink errors, classified as Feldera's Postgres adapter does: by kind and SQLSTATE class.

use meterflow_store::is_transient;

/// Why the sink could not commit.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Another pipeline instance took over the topic; this one must stop (it is a zombie).
    #[error(
        "another pipeline took over topic {topic} (our generation {ours}, now {current}); stopping"
    )]
    Fenced {
        topic: String,
        ours: i64,
        current: i64,
    },
    /// The committed progress is not where this writer's last commit left it: something else committed
    /// for the topic under the same lease. Never expected; stop rather than risk a double count.
    #[error("the committed progress of topic {topic} moved under this writer (expected epoch {expected}, found {found}); stopping")]
    ProgressMoved {
        topic: String,
        expected: i64,
        found: i64,
    },
    /// The database said no; retrying the same statement will not help.
    #[error("postgres refused the commit: {0}")]
    Permanent(#[source] sqlx::Error),
    /// Lost connection, server restart, serialization failure: retry.
    #[error("postgres is unavailable: {0}")]
    Transient(#[source] sqlx::Error),
    #[error("an aggregate overflowed the 96-bit decimal range")]
    Overflow(#[from] meterflow_model::aggregate::Overflow),
}

impl From<sqlx::Error> for SinkError {
    fn from(e: sqlx::Error) -> Self {
        if is_transient(&e) {
            SinkError::Transient(e)
        } else {
            SinkError::Permanent(e)
        }
    }
}
