//! The event outbox's two background tasks: deleting rows whose events Kafka acknowledged (in batches, off
//! the request path), and relaying rows left behind by a crash.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use meterflow_store::events;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::PgPool;
use tokio::sync::mpsc;

/// Where the ids of events Kafka acknowledged go to have their outbox rows cleared; counts the ids not
/// cleared yet, so a shutdown can wait for them.
#[derive(Clone)]
pub struct Acks {
    tx: mpsc::Sender<String>,
    pending: Arc<AtomicUsize>,
}

/// The receiving side of [`Acks`], for [`forget_published`].
pub struct AckReceiver {
    rx: mpsc::Receiver<String>,
    pending: Arc<AtomicUsize>,
}

impl Acks {
    /// A bounded channel of acknowledged ids.
    pub fn channel(capacity: usize) -> (Acks, AckReceiver) {
        let (tx, rx) = mpsc::channel(capacity);
        let pending = Arc::new(AtomicUsize::new(0));
        (
            Acks {
                tx,
                pending: pending.clone(),
            },
            AckReceiver { rx, pending },
        )
    }

    /// Queues `event_id`'s outbox row for deletion; waits while the queue is full.
    pub async fn send(&self, event_id: String) -> Result<(), mpsc::error::SendError<String>> {
        self.pending.fetch_add(1, Ordering::AcqRel);
        let sent = self.tx.send(event_id).await;
        if sent.is_err() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
        }
        sent
    }

    /// Waits until every queued id has been dealt with (its row deleted, or the deletion failed and
    /// the relay will resend it).
    pub async fn drain(&self) {
        while self.pending.load(Ordering::Acquire) > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Deletes acknowledged outbox rows, up to 1000 per statement.
pub async fn forget_published(pool: PgPool, acked: AckReceiver) {
    let AckReceiver { mut rx, pending } = acked;
    let mut ids = Vec::with_capacity(1000);
    while rx.recv_many(&mut ids, 1000).await > 0 {
        if let Err(e) = events::forget_events(&pool, &ids).await {
            tracing::warn!(error = %e, rows = ids.len(), "could not clear published outbox rows; the relay will resend them");
        }
        pending.fetch_sub(ids.len(), Ordering::AcqRel);
        ids.clear();
    }
}

/// Every `every`, republishes outbox rows older than `grace` (their request died before Kafka answered).
pub async fn relay(
    pool: PgPool,
    producer: FutureProducer,
    topic: String,
    every: Duration,
    grace: Duration,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        match relay_once(&pool, &producer, &topic, grace).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(events = n, "relayed events left in the outbox"),
            Err(e) => tracing::warn!(error = %e, "outbox relay failed; will retry"),
        }
    }
}

/// One relay pass; returns how many events it republished.
pub async fn relay_once(
    pool: &PgPool,
    producer: &FutureProducer,
    topic: &str,
    grace: Duration,
) -> Result<usize, RelayError> {
    let mut tx = pool.begin().await?;
    let rows = events::due(&mut tx, grace).await?;
    let mut sent = Vec::with_capacity(rows.len());
    for row in rows {
        // The time it was stored (accepted), not the time of this relay: a late relay, or one by an
        // instance whose clock is behind, must not change the record's time (finding 30).
        let record = FutureRecord::to(topic)
            .key(&row.customer_id)
            .payload(&row.payload)
            .timestamp(row.stored_ms)
            // `event` or `void`: an event's header tells the reader the API accepted it (finding 10).
            .headers(OwnedHeaders::new().insert(Header {
                key: meterflow_model::wire::KIND_HEADER,
                value: Some(row.kind.as_str()),
            }));
        producer
            .send(record, Duration::from_secs(5))
            .await
            .map_err(|(e, _)| RelayError::Kafka(e))?;
        sent.push((row.event_id, row.kind));
    }
    events::forget_sent(&mut tx, &sent).await?;
    tx.commit().await?;
    Ok(sent.len())
}

/// Why a relay pass failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Kafka(rdkafka::error::KafkaError),
}
