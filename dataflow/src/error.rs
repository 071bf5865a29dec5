//! What can go wrong in the engine, by what the caller should do about it (RELIABILITY.md):
//!
//! | kind | example | where it is handled |
//! |---|---|---|
//! | transient: retry | the claim store unavailable ([`ClaimError::Unavailable`]), a Kafka poll error | where it happens: the reader retries with capped backoff and skips nothing (`source.rs`) |
//! | caused by the data: quarantine that record | a payload that does not decode, a record the claim store refuses ([`ClaimError::Refused`]), a usage past the decimal range | never an error: a dead letter with its reason, or a quarantined row or period (`classify.rs`, `usage.rs`, `rating.rs`) |
//! | permanent: stop and say so | the Kafka consumer cannot be created or assigned its partitions | [`WorkerError`]: every worker of the process commits what it has and stops; the caller reports it |
//!
//! [`ClaimError::Unavailable`]: meterflow_model::claims::ClaimError::Unavailable
//! [`ClaimError::Refused`]: meterflow_model::claims::ClaimError::Refused

use rdkafka::error::KafkaError;

/// A reader that cannot go on: its partitions would never be read again.
#[derive(Debug, thiserror::Error)]
#[error("reading {topic}: {source}")]
pub struct SourceError {
    pub topic: String,
    #[source]
    pub source: KafkaError,
}

/// Why a worker stopped the pipeline. Permanent for this run: transient failures are retried where they
/// happen, and bad data never gets here.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A reader of this process failed (this worker's or another's).
    #[error(transparent)]
    Source(#[from] SourceError),
}
