//! The epoch sink: makes the dataflow's results durable, exactly once.
//!
//! ```text
//!  EpochBatch(e1) EpochBatch(e2) … ──merge what is queued──► one transaction:
//!      SELECT … FROM pipeline_leases FOR UPDATE       -- fence: still our generation?
//!      upsert aggregations  (value += Δ, event_count += Δ)
//!      insert dead_letters  (ON CONFLICT (topic, partition, offset) DO NOTHING)
//!      upsert source_offsets (next offset per partition)
//!      UPDATE pipeline_leases SET committed_epoch = e2
//!  COMMIT ──► ack(e2) to the dataflow
//! ```
//! Contract: a batch's aggregate changes and the offsets that produced them commit together or not at
//! all, so a restart that resumes from the stored offsets neither loses nor repeats a record. When a
//! COMMIT's outcome is unknown (connection lost), the writer reconnects and reads `committed_epoch` of its
//! generation to learn whether it happened, instead of guessing. A zombie (older generation) is refused.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use meterflow_model::EpochBatch;
use rust_decimal::Decimal;
use sqlx::{ConnectOptions, Connection, PgConnection};

use crate::error::SinkError;
use crate::lease::Lease;

/// Most aggregate rows merged into one transaction.
const MAX_ROWS_PER_COMMIT: usize = 100_000;

/// What the writer did, returned when its batch channel closes.
#[derive(Clone, Copy, Debug, Default)]
pub struct WriterSummary {
    pub commits: u64,
    pub aggregate_rows: u64,
    pub dead_letters: u64,
    pub commit_time: Duration,
}

/// Starts the writer thread: commits every batch it receives, acknowledging the epoch after each COMMIT.
/// It ends when the batch channel closes (`Ok`) or on a permanent error, which stops the pipeline.
pub fn spawn_writer(
    database_url: String,
    lease: Lease,
    batches: Receiver<EpochBatch>,
    acks: Sender<u64>,
) -> std::io::Result<JoinHandle<Result<WriterSummary, SinkError>>> {
    std::thread::Builder::new()
        .name("pg-epoch-sink".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| SinkError::Permanent(sqlx::Error::Io(e)))?;
            runtime.block_on(write_all(&database_url, &lease, batches, acks))
        })
}

async fn write_all(
    url: &str,
    lease: &Lease,
    batches: Receiver<EpochBatch>,
    acks: Sender<u64>,
) -> Result<WriterSummary, SinkError> {
    let mut summary = WriterSummary::default();
    let mut conn = connect(url).await?;
    // Blocking receive is fine: this thread exists only to write.
    while let Ok(mut batch) = batches.recv() {
        while batch.aggregates.len() < MAX_ROWS_PER_COMMIT {
            match batches.try_recv() {
                Ok(later) => batch.absorb(later)?,
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            let _ = acks.send(batch.epoch);
            continue;
        }
        let started = Instant::now();
        commit_with_retry(url, &mut conn, lease, &batch).await?;
        summary.commit_time += started.elapsed();
        summary.commits += 1;
        summary.aggregate_rows += batch.aggregates.len() as u64;
        summary.dead_letters += batch.dead_letters.len() as u64;
        let _ = acks.send(batch.epoch);
    }
    Ok(summary)
}

async fn connect(url: &str) -> Result<PgConnection, SinkError> {
    // Large epoch commits are slow by design; they are measured (WriterSummary), not logged as slow.
    let options = url
        .parse::<sqlx::postgres::PgConnectOptions>()?
        .log_slow_statements(tracing::log::LevelFilter::Off, Duration::ZERO);
    Ok(PgConnection::connect_with(&options).await?)
}

/// Commits `batch`, retrying transient failures with capped exponential backoff. Before each retry it
/// resolves whether the previous attempt in fact committed.
async fn commit_with_retry(
    url: &str,
    conn: &mut PgConnection,
    lease: &Lease,
    batch: &EpochBatch,
) -> Result<(), SinkError> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match commit(conn, lease, batch).await {
            Ok(()) => return Ok(()),
            Err(SinkError::Transient(e)) => {
                tracing::warn!(error = %e, epoch = batch.epoch, ?backoff, "sink commit failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                match connect(url).await {
                    Ok(fresh) => *conn = fresh,
                    Err(SinkError::Transient(_)) => continue,
                    Err(other) => return Err(other),
                }
                if already_committed(conn, lease, batch.epoch).await? {
                    return Ok(());
                }
            }
            Err(other) => return Err(other),
        }
    }
}

async fn already_committed(
    conn: &mut PgConnection,
    lease: &Lease,
    epoch: u64,
) -> Result<bool, SinkError> {
    let (generation, committed): (i64, i64) =
        sqlx::query_as("SELECT generation, committed_epoch FROM pipeline_leases WHERE topic = $1")
            .bind(&lease.topic)
            .fetch_one(&mut *conn)
            .await?;
    if generation != lease.generation {
        return Err(SinkError::Fenced {
            topic: lease.topic.clone(),
            ours: lease.generation,
            current: generation,
        });
    }
    Ok(committed >= epoch as i64)
}

/// One fenced transaction: results, dead letters and offsets together.
async fn commit(
    conn: &mut PgConnection,
    lease: &Lease,
    batch: &EpochBatch,
) -> Result<(), SinkError> {
    let mut tx = conn.begin().await?;
    let generation: i64 =
        sqlx::query_scalar("SELECT generation FROM pipeline_leases WHERE topic = $1 FOR UPDATE")
            .bind(&lease.topic)
            .fetch_one(&mut *tx)
            .await?;
    if generation != lease.generation {
        return Err(SinkError::Fenced {
            topic: lease.topic.clone(),
            ours: lease.generation,
            current: generation,
        });
    }

    if !batch.aggregates.is_empty() {
        let n = batch.aggregates.len();
        let (mut customers, mut meters, mut starts, mut values, mut counts) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for (key, agg) in &batch.aggregates {
            customers.push(key.customer_id.as_str());
            meters.push(key.meter.as_str());
            starts.push(key.window_start);
            values.push(agg.value);
            counts.push(agg.event_count);
        }
        sqlx::query(
            "INSERT INTO aggregations AS a (customer_id, meter, window_start, window_end, value, event_count)
             SELECT c, m, to_timestamp(s), to_timestamp(s + 3600), v, n
             FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::numeric[], $5::bigint[]) AS u(c, m, s, v, n)
             ON CONFLICT ON CONSTRAINT aggregations_pkey DO UPDATE
             SET value = a.value + excluded.value,
                 event_count = a.event_count + excluded.event_count,
                 revision = a.revision + 1,
                 updated_at = now()",
        )
        .bind(&customers)
        .bind(&meters)
        .bind(&starts)
        .bind(&values as &[Decimal])
        .bind(&counts)
        .execute(&mut *tx)
        .await?;
    }

    if !batch.dead_letters.is_empty() {
        let partitions: Vec<i32> = batch.dead_letters.iter().map(|d| d.partition).collect();
        let offsets: Vec<i64> = batch.dead_letters.iter().map(|d| d.offset).collect();
        let payloads: Vec<&[u8]> = batch
            .dead_letters
            .iter()
            .map(|d| d.payload.as_slice())
            .collect();
        let reasons: Vec<&str> = batch
            .dead_letters
            .iter()
            .map(|d| d.reason.as_str())
            .collect();
        sqlx::query(
            "INSERT INTO dead_letters (topic, partition, \"offset\", payload, reason)
             SELECT $1, p, o, b, r FROM UNNEST($2::int[], $3::bigint[], $4::bytea[], $5::text[]) AS u(p, o, b, r)
             ON CONFLICT ON CONSTRAINT dead_letters_source_key DO NOTHING",
        )
        .bind(&lease.topic)
        .bind(&partitions)
        .bind(&offsets)
        .bind(&payloads)
        .bind(&reasons)
        .execute(&mut *tx)
        .await?;
    }

    if !batch.offsets.is_empty() {
        let partitions: Vec<i32> = batch.offsets.iter().map(|(p, _)| *p).collect();
        let nexts: Vec<i64> = batch.offsets.iter().map(|(_, n)| *n).collect();
        sqlx::query(
            "INSERT INTO source_offsets AS s (topic, partition, next_offset)
             SELECT $1, p, n FROM UNNEST($2::int[], $3::bigint[]) AS u(p, n)
             ON CONFLICT ON CONSTRAINT source_offsets_pkey DO UPDATE SET next_offset = excluded.next_offset, updated_at = now()",
        )
        .bind(&lease.topic)
        .bind(&partitions)
        .bind(&nexts)
        .execute(&mut *tx)
        .await?;
    }

    sqlx::query(
        "UPDATE pipeline_leases SET committed_epoch = $2, committed_at = now() WHERE topic = $1",
    )
    .bind(&lease.topic)
    .bind(batch.epoch as i64)
    .execute(&mut *tx)
    .await?;
    failpoint::hit("before_commit");
    tx.commit().await?;
    failpoint::hit("after_commit");
    Ok(())
}

/// Crash injection for tests (RELIABILITY.md): `MF_FAILPOINT=before_commit:N` or `after_commit:N` aborts
/// the process at the N-th time that point is reached, just as a `kill -9` there would.
mod failpoint {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);

    pub fn hit(point: &str) {
        let armed = ARMED.get_or_init(|| {
            let spec = std::env::var("MF_FAILPOINT").ok()?;
            let (name, n) = spec.split_once(':')?;
            Some((name.to_owned(), n.parse().ok()?))
        });
        if let Some((name, n)) = armed {
            if name == point && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *n {
                eprintln!("failpoint {point}:{n} reached: aborting");
                std::process::abort();
            }
        }
    }
}
