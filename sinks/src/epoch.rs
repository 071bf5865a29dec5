//! The epoch sink: makes the dataflow's results durable, exactly once.
//!
//! ```text
//!  EpochBatch(e1) EpochBatch(e2) … ──merge what is queued──► one transaction:
//!      SELECT … FROM pipeline_leases FOR UPDATE       -- fence: still our generation, and progress
//!                                                     -- exactly where our last commit left it?
//!      UPDATE pipeline_leases SET committed_epoch = e2 + 1, committed_watermark
//!                                                     -- first: the rows below are written finalized
//!                                                     -- when the watermark closes their window
//!      upsert aggregations  (value += Δ, event_count += Δ; a sum past the decimal range quarantines)
//!      upsert / delete charges (a window's charge replaced whole), rating_quarantine
//!      add to upcoming_lines (Σ charges per customer, period, meter, book)
//!      insert dead_letters  (ON CONFLICT (topic, partition, offset) DO NOTHING)
//!      upsert source_offsets (next offset per partition)
//!      UPDATE aggregations SET finalized   (the windows it closes that no row above touched)
//!  COMMIT ──► ack(e2) to the dataflow
//! ```
//! Contract: a batch's aggregate changes and the offsets that produced them commit together or not at
//! all, so a restart that resumes from the stored offsets neither loses nor repeats a record. When a
//! COMMIT's outcome is unknown (connection lost), the writer reconnects and reads `committed_epoch` of its
//! generation to learn whether it happened, instead of guessing: a data batch stores one past its last
//! epoch there, so the 0 that taking the lease writes never reads as "epoch 0 committed" (finding 5).
//! A zombie (older generation) is refused.
//!
//! Overflow is data, not a crash (issue 13): a group row whose change overflowed in the dataflow
//! (`EpochBatch::quarantined_rows`), or whose stored total would leave the 96-bit decimal range, is
//! marked `quarantined`: its value stays at the last value in range, its event count goes on. The
//! periods rating could not finish are kept in `rating_quarantine` (changes, like charges: rating
//! subtracts the stored ones at start-up). The `quarantined_windows` and `quarantined_periods` gauges
//! follow both tables.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use meterflow_model::EpochBatch;
use sqlx::{ConnectOptions, Connection, PgConnection};

use crate::error::SinkError;
use crate::lease::Lease;
use crate::metrics;

mod rows;
pub(crate) use rows::insert_dimension_values;

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

/// Starts the writer thread: commits every batch it receives, acknowledging the epoch after each COMMIT
/// and publishing the committed watermark. It ends when the batch channel closes (`Ok`) or on a
/// permanent error, which stops the pipeline. The thread is its own because it waits on the workers'
/// channel; its statements run on `runtime`, the process's (a multi-thread runtime, whose IO driver
/// runs on the runtime's threads).
pub fn spawn_writer(
    runtime: tokio::runtime::Handle,
    database_url: String,
    lease: Lease,
    batches: Receiver<EpochBatch>,
    acks: Sender<u64>,
    watermark: Arc<AtomicI64>,
) -> std::io::Result<JoinHandle<Result<WriterSummary, SinkError>>> {
    std::thread::Builder::new()
        .name("pg-epoch-sink".into())
        .spawn(move || {
            runtime.block_on(write_all(&database_url, &lease, batches, acks, &watermark))
        })
}

/// An idle pipeline still commits this often, so the watermark (idle partitions, an admin's floor)
/// moves on and windows get finalized.
const IDLE_COMMIT: Duration = Duration::from_millis(500);

async fn write_all(
    url: &str,
    lease: &Lease,
    batches: Receiver<EpochBatch>,
    acks: Sender<u64>,
    shared_watermark: &AtomicI64,
) -> Result<WriterSummary, SinkError> {
    let mut summary = WriterSummary::default();
    let mut conn = connect(url).await?;
    let mut last_commit = Instant::now();
    let mut committed_watermark: Option<i64> = None;
    // The first commit of a run also sets the quarantine gauges.
    let mut first = true;
    // The progress this writer expects to find: acquiring the lease reset it to 0, and only this
    // writer's commits move it (compare-and-set, as Materialize's persist does with its frontier).
    let mut expected: i64 = 0;
    // Blocking receive is fine: this thread exists only to write.
    while let Ok(mut batch) = batches.recv() {
        // The first commit of a run takes its own epochs only: after a restart, the epochs read while
        // rating took its state in are all sealed at once, and merged they made the first commit
        // (the sign the pipeline is committing again) ~1 s longer at 1M windows (perf/RESULTS.md).
        while !first && batch.aggregates.len() < MAX_ROWS_PER_COMMIT {
            match batches.try_recv() {
                Ok(later) => batch.absorb(later)?,
                Err(_) => break,
            }
        }
        let watermark_moved = batch.watermark > committed_watermark;
        if batch.is_empty() && !watermark_moved && last_commit.elapsed() < IDLE_COMMIT {
            let _ = acks.send(batch.epoch);
            continue;
        }
        let started = Instant::now();
        let committed = commit_with_retry(url, &mut conn, lease, &batch, expected, first).await?;
        expected = committed.epoch;
        first = false;
        let took = started.elapsed();
        last_commit = Instant::now();
        summary.commit_time += took;
        summary.commits += 1;
        summary.aggregate_rows += batch.aggregates.len() as u64;
        summary.dead_letters += batch.dead_letters.len() as u64;
        record_metrics(&batch, &committed, took);
        if let Some(w) = committed.watermark {
            committed_watermark = Some(w);
            shared_watermark.fetch_max(w, Ordering::AcqRel);
        }
        let _ = acks.send(batch.epoch);
    }
    Ok(summary)
}

fn record_metrics(batch: &EpochBatch, committed: &Committed, took: Duration) {
    metrics::COMMIT_SECONDS.observe(took.as_secs_f64());
    metrics::COMMIT_ROWS.inc_by(batch.aggregates.len() as u64);
    for d in &batch.dead_letters {
        metrics::DEAD_LETTERS
            .with_label_values(&[metrics::dead_letter_reason(&d.reason)])
            .inc();
    }
    for d in &batch.duplicates {
        metrics::DUPLICATES
            .with_label_values(&[d.kind.as_str()])
            .inc();
    }
    if !batch.late_events.is_empty() {
        metrics::LATE_EVENTS
            .with_label_values(&[metrics::LATE_WINDOW_FINALIZED])
            .inc_by(batch.late_events.len() as u64);
    }
    if committed.finalized > 0 {
        // From when the watermark was computed (the batch was sealed) to the finalizing COMMIT.
        let since = batch.sealed_at.map_or(took, |t| t.elapsed());
        for _ in 0..committed.finalized.min(10_000) {
            metrics::WINDOW_CLOSE_SECONDS.observe(since.as_secs_f64());
        }
    }
    if let Some((windows, periods)) = committed.quarantined {
        metrics::QUARANTINED_WINDOWS.set(windows);
        metrics::QUARANTINED_PERIODS.set(periods);
    }
    if let Some(w) = committed.watermark {
        metrics::WATERMARK.set(w / 1_000_000);
        metrics::AGGREGATION_LAG.set(chrono::Utc::now().timestamp() - w / 1_000_000);
    }
}

/// The writer's `work_mem`. An epoch's rows reach Postgres as arrays, and `UNNEST` keeps a
/// statement's rows in a tuplestore of at most `work_mem`; past the default 4 MB (about 30k late
/// events, or 20k group rows) it spills them to a temporary file and reads them back (`BufFileRead`
/// in `pg_stat_activity`, in the last commit of a backfill; issue 15). It bounds each sort, hash or
/// tuplestore of the writer's statements, on its one connection. A `work_mem` in the database URL's
/// `options` is overridden.
const WORK_MEM: &str = "256MB";

async fn connect(url: &str) -> Result<PgConnection, SinkError> {
    // Large epoch commits are slow by design; they are measured (WriterSummary), not logged as slow.
    let options = url
        .parse::<sqlx::postgres::PgConnectOptions>()?
        .log_slow_statements(tracing::log::LevelFilter::Off, Duration::ZERO)
        .options([("work_mem", WORK_MEM)]);
    Ok(PgConnection::connect_with(&options).await?)
}

/// Commits `batch`, retrying transient failures with capped exponential backoff. Before each retry it
/// resolves whether the previous attempt in fact committed.
///
/// A loop rather than a retry crate (`backon`): between two attempts it reconnects and asks the
/// database whether the last attempt committed after all, and only a transient error retries, forever
/// (the pipeline must not skip an epoch). A retry combinator would carry the connection through a
/// context value and hide that middle step; the loop shows it.
async fn commit_with_retry(
    url: &str,
    conn: &mut PgConnection,
    lease: &Lease,
    batch: &EpochBatch,
    expected: i64,
    first: bool,
) -> Result<Committed, SinkError> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match commit(conn, lease, batch, expected, first).await {
            Ok(committed) => return Ok(committed),
            Err(SinkError::Transient(e)) => {
                metrics::COMMIT_ERRORS
                    .with_label_values(&["transient"])
                    .inc();
                tracing::warn!(error = %e, epoch = batch.epoch, ?backoff, "sink commit failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                match connect(url).await {
                    Ok(fresh) => *conn = fresh,
                    Err(SinkError::Transient(_)) => continue,
                    Err(other) => return Err(other),
                }
                // A batch without data (a heartbeat) moves no progress: committing it again is harmless.
                if batch.is_empty() {
                    continue;
                }
                if let Some(committed) =
                    already_committed(conn, lease, stored_epoch(batch, expected)).await?
                {
                    return Ok(committed);
                }
            }
            Err(other) => {
                metrics::COMMIT_ERRORS
                    .with_label_values(&["permanent"])
                    .inc();
                return Err(other);
            }
        }
    }
}

/// The progress a commit of `batch` stores in `pipeline_leases.committed_epoch`: one past its last
/// epoch, or (a heartbeat) the progress as it is. Taking the lease resets the progress to 0 and every
/// run's dataflow starts at epoch 0, so 0 must mean "nothing committed in this generation", never
/// "epoch 0 committed" (finding 5: a transient failure of the first commit was taken for a commit).
fn stored_epoch(batch: &EpochBatch, expected: i64) -> i64 {
    if batch.is_empty() {
        expected
    } else {
        (batch.epoch as i64).saturating_add(1)
    }
}

/// Whether this generation committed progress `stored` (see [`stored_epoch`]) already, after a lost
/// connection left a COMMIT's outcome unknown.
async fn already_committed(
    conn: &mut PgConnection,
    lease: &Lease,
    stored: i64,
) -> Result<Option<Committed>, SinkError> {
    let row = sqlx::query!(
        "SELECT generation, committed_epoch, committed_watermark FROM pipeline_leases WHERE topic = $1",
        lease.topic,
    )
    .fetch_one(&mut *conn)
    .await?;
    let (generation, committed, watermark) =
        (row.generation, row.committed_epoch, row.committed_watermark);
    if generation != lease.generation {
        return Err(SinkError::Fenced {
            topic: lease.topic.clone(),
            ours: lease.generation,
            current: generation,
        });
    }
    Ok((committed >= stored).then(|| Committed {
        epoch: committed,
        watermark: watermark.map(|w| w.timestamp_micros()),
        finalized: 0,
        quarantined: None,
    }))
}

/// One fenced transaction: results, dead letters and offsets together.
async fn commit(
    conn: &mut PgConnection,
    lease: &Lease,
    batch: &EpochBatch,
    expected: i64,
    first: bool,
) -> Result<Committed, SinkError> {
    let mut tx = conn.begin().await?;
    let row = sqlx::query!(
        "SELECT generation, committed_epoch, committed_watermark FROM pipeline_leases
         WHERE topic = $1 FOR UPDATE",
        lease.topic,
    )
    .fetch_one(&mut *tx)
    .await?;
    let (generation, progress, before) =
        (row.generation, row.committed_epoch, row.committed_watermark);
    if generation != lease.generation {
        return Err(SinkError::Fenced {
            topic: lease.topic.clone(),
            ours: lease.generation,
            current: generation,
        });
    }
    if progress != expected {
        return Err(SinkError::ProgressMoved {
            topic: lease.topic.clone(),
            expected,
            found: progress,
        });
    }

    // The watermark never goes back, and an admin's floor (POST /api/v1/watermark) lifts it. Advanced
    // before the rows are written: a row whose window it closes is written finalized (born so, or
    // finalized by its upsert), not written again by the finalizing UPDATE below (a non-HOT write).
    let advanced = sqlx::query!(
        r#"UPDATE pipeline_leases l
         SET committed_epoch = $2, committed_at = now(),
             committed_watermark = GREATEST(l.committed_watermark,
                                            timestamptz 'epoch' + $3::bigint * interval '1 microsecond',
                                            (SELECT advance_to FROM watermark_floors f WHERE f.topic = l.topic))
         WHERE topic = $1
         RETURNING committed_watermark, (extract(epoch FROM allowed_lateness) * 1000000)::bigint AS "lateness_micros!""#,
        lease.topic,
        stored_epoch(batch, expected),
        batch.watermark,
    )
    .fetch_one(&mut *tx)
    .await?;
    let (watermark, lateness_micros) = (advanced.committed_watermark, advanced.lateness_micros);

    let (group, multiset): (Vec<_>, Vec<_>) = batch
        .aggregates
        .iter()
        .partition(|(_, item, _)| item.is_none());
    if !group.is_empty() {
        rows::upsert_group_rows(&mut tx, &lease.topic, &group, &batch.quarantined_rows).await?;
    }
    if !multiset.is_empty() {
        rows::apply_multiset_rows(&mut tx, &lease.topic, &multiset).await?;
    }
    if !batch.charges.is_empty() {
        rows::apply_charges(&mut tx, &batch.charges).await?;
    }
    if !batch.lines.is_empty() {
        rows::apply_lines(&mut tx, &batch.lines).await?;
    }
    if !batch.quarantined_periods.is_empty() {
        rows::apply_quarantined_periods(&mut tx, &batch.quarantined_periods).await?;
    }
    // Cheap (a partial index each), and a stored total can overflow in any commit of group rows.
    let quarantined = if first || !group.is_empty() || !batch.quarantined_periods.is_empty() {
        let counts = sqlx::query!(
            r#"SELECT (SELECT count(*) FROM aggregations WHERE quarantined) AS "windows!",
                    (SELECT count(*) FROM rating_quarantine) AS "periods!""#,
        )
        .fetch_one(&mut *tx)
        .await?;
        Some((counts.windows, counts.periods))
    } else {
        None
    };
    if !batch.dead_letters.is_empty() {
        rows::insert_dead_letters(&mut tx, &lease.topic, &batch.dead_letters).await?;
    }
    rows::insert_conflicting_duplicates(&mut tx, &lease.topic, &batch.duplicates).await?;
    rows::insert_late_events(&mut tx, &batch.late_events).await?;
    rows::insert_dimension_values(&mut tx, &batch.dimension_values).await?;

    if !batch.offsets.is_empty() {
        let partitions: Vec<i32> = batch.offsets.iter().map(|p| p.partition).collect();
        let nexts: Vec<i64> = batch.offsets.iter().map(|p| p.next_offset).collect();
        let times: Vec<Option<i64>> = batch
            .offsets
            .iter()
            .map(|p| p.max_event_time_micros)
            .collect();
        sqlx::query!(
            "INSERT INTO source_offsets AS s (topic, partition, next_offset, max_event_time)
             SELECT $1, p, n, timestamptz 'epoch' + t * interval '1 microsecond'
             FROM UNNEST($2::int[], $3::bigint[], $4::bigint[]) AS u(p, n, t)
             ON CONFLICT ON CONSTRAINT source_offsets_pkey DO UPDATE
             SET next_offset = excluded.next_offset,
                 max_event_time = GREATEST(s.max_event_time, excluded.max_event_time),
                 updated_at = now()",
            lease.topic,
            &partitions,
            &nexts,
            // Nulls (a partition without an event time) are not in the macro's bigint[] mapping.
            &times as &[Option<i64>],
        )
        .execute(&mut *tx)
        .await?;
    }

    let mut finalized = closed_by(batch, before, watermark, lateness_micros);
    if let Some(w) = watermark {
        let rest = sqlx::query!(
            "UPDATE aggregations SET finalized = true, updated_at = now()
             WHERE NOT finalized AND window_end + $2::bigint * interval '1 microsecond' <= $1",
            w,
            lateness_micros,
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        finalized = finalized.saturating_add(rest);
    }
    // Failpoints count commits that move offsets, not idle (watermark-only) ones, so a test's
    // "the first commit of the new input" does not depend on when an idle commit happens.
    let moves = !batch.offsets.is_empty();
    if moves {
        failpoint::hit("before_commit");
        if failpoint::reached("error_before_commit") {
            // The transaction is dropped (rolled back), as a lost connection would leave it.
            return Err(SinkError::Transient(sqlx::Error::Protocol(
                "failpoint error_before_commit".into(),
            )));
        }
    }
    tx.commit().await?;
    if moves {
        failpoint::hit("after_commit");
    }
    Ok(Committed {
        epoch: stored_epoch(batch, expected),
        watermark: watermark.map(|w| w.timestamp_micros()),
        finalized,
        quarantined,
    })
}

/// How many of the batch's rows have the window the commit's watermark closes (it moved from `before`
/// to `after`): the rows it writes finalized, which the finalizing UPDATE does not count. Exact as
/// long as every window closed by `before` is finalized. Two cases are not: a row a re-rating job
/// inserted unfinalized in a long-closed window, and `allowed_lateness` changed at a restart. There the
/// metric may miss or repeat a window. It is a metric of latency, never a stored result.
fn closed_by(
    batch: &EpochBatch,
    before: Option<chrono::DateTime<chrono::Utc>>,
    after: Option<chrono::DateTime<chrono::Utc>>,
    lateness_micros: i64,
) -> u64 {
    let Some(after) = after else {
        return 0;
    };
    let closes = |key: &meterflow_model::AggregateKey| {
        key.window_end
            .saturating_mul(1_000_000)
            .saturating_add(lateness_micros)
    };
    let after = after.timestamp_micros();
    let before = before.map_or(i64::MIN, |w| w.timestamp_micros());
    let closed: std::collections::HashSet<&meterflow_model::AggregateKey> = batch
        .aggregates
        .iter()
        .map(|(key, _, _)| key)
        .filter(|key| closes(key) > before && closes(key) <= after)
        .collect();
    closed.len() as u64
}

/// What a commit changed beyond the batch itself.
#[derive(Clone, Copy, Debug, Default)]
struct Committed {
    /// The committed epoch after it.
    epoch: i64,
    /// The committed watermark after it.
    watermark: Option<i64>,
    /// Windows it finalized.
    finalized: u64,
    /// How many rows and periods are quarantined after it, when it may have changed that.
    quarantined: Option<(i64, i64)>,
}

/// Fault injection for tests (RELIABILITY.md): `MF_FAILPOINT=before_commit:N` or `after_commit:N` aborts
/// the process at the N-th time that point is reached, just as a `kill -9` there would;
/// `error_before_commit:N` makes the N-th commit that moves offsets fail with a transient error instead
/// of committing, as a lost connection would (it is retried).
mod failpoint {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);

    /// Whether the armed failpoint is `point` and this is its N-th time.
    pub fn reached(point: &str) -> bool {
        let armed = ARMED.get_or_init(|| {
            let spec = std::env::var("MF_FAILPOINT").ok()?;
            let (name, n) = spec.split_once(':')?;
            Some((name.to_owned(), n.parse().ok()?))
        });
        match armed {
            Some((name, n)) if name == point => HITS.fetch_add(1, Ordering::SeqCst) + 1 == *n,
            _ => false,
        }
    }

    /// Aborts the process when the armed failpoint `point` is reached.
    pub fn hit(point: &str) {
        if reached(point) {
            eprintln!("failpoint {point} reached: aborting");
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};
    use meterflow_model::{Aggregate, AggregateKey, Dimensions, Item};
    use rust_decimal::Decimal;

    use super::*;

    fn row(window_end: i64, item: Option<Item>) -> meterflow_model::RowChange {
        let key = AggregateKey {
            customer_id: "c".into(),
            meter: "m".into(),
            dimensions: Dimensions::default(),
            window_start: window_end - 3600,
            window_end,
        };
        (key, item, Aggregate::of(Decimal::ONE))
    }

    fn at(seconds: i64) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp(seconds, 0)
    }

    /// The windows a commit's watermark closes among its own rows: closed after the watermark before
    /// it and no later than the one after; a row of several items counts once.
    #[test]
    fn a_commit_counts_the_windows_its_watermark_closes_among_its_rows() {
        let lateness = 60_000_000; // one minute
        let batch = EpochBatch {
            aggregates: vec![
                row(7_200, None),                            // closes at 7,260: closed before
                row(10_800, Some(Item::Unique("a".into()))), // closes at 10,860: now
                row(10_800, Some(Item::Unique("b".into()))), // the same row
                row(14_400, None),                           // closes at 14,460: now, at the edge
                row(18_000, None),                           // closes at 18,060: still open
            ],
            ..EpochBatch::default()
        };
        assert_eq!(closed_by(&batch, at(7_260), at(14_460), lateness), 2);
        assert_eq!(closed_by(&batch, None, at(14_460), lateness), 3);
        assert_eq!(closed_by(&batch, at(7_260), None, lateness), 0);
    }
}
