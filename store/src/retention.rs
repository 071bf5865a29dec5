//! The SQL of `meterflow retention` (src/retention.rs drives it and says why each step is safe): the
//! retention horizon, the month partitions of `telemetry_events`, dropping one in a transaction the
//! caller holds (optionally copying it out first), and pruning the dropped months' `event_ids`.
//!
//! The statements that name a month's partition (`telemetry_events_2026_01`, read from `pg_inherits`
//! and matched by [`month_partition`]) are the only SQL of this crate built at run time: a table name
//! is not a parameter, and sqlx's macros check a fixed text.

use chrono::{DateTime, Months, NaiveDate, Utc};
use sqlx::PgConnection;

/// A month partition of telemetry_events: its name and its instants `[start, end)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MonthPartition {
    pub name: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// `telemetry_events_YYYY_MM` (the names migration 0003 gives) → the partition; anything else (the
/// default partition) is not a month.
pub fn month_partition(name: &str) -> Option<MonthPartition> {
    let rest = name.strip_prefix("telemetry_events_")?;
    let (year, month) = rest.split_once('_')?;
    if year.len() != 4 || month.len() != 2 {
        return None;
    }
    let start = NaiveDate::from_ymd_opt(year.parse().ok()?, month.parse().ok()?, 1)?
        .and_hms_opt(0, 0, 0)?
        .and_utc();
    let end = start.checked_add_months(Months::new(1))?;
    Some(MonthPartition {
        name: name.to_owned(),
        start,
        end,
    })
}

/// The least committed watermark over every topic's lease, or `None` while any lease has none (or
/// there is no lease): until then an event of any age is accepted.
pub async fn least_committed_watermark(
    conn: &mut PgConnection,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    let leases = sqlx::query!(
        r#"SELECT count(*) AS "leases!", count(committed_watermark) AS "with_watermark!",
                  min(committed_watermark) AS watermark
           FROM pipeline_leases"#,
    )
    .fetch_one(conn)
    .await?;
    Ok(leases
        .watermark
        .filter(|_| leases.leases > 0 && leases.with_watermark == leases.leases))
}

/// The month partitions of telemetry_events, oldest first.
pub async fn month_partitions(conn: &mut PgConnection) -> Result<Vec<MonthPartition>, sqlx::Error> {
    let names = sqlx::query_scalar!(
        r#"SELECT c.relname::text AS "name!" FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
           WHERE i.inhparent = 'telemetry_events'::regclass ORDER BY 1"#,
    )
    .fetch_all(conn)
    .await?;
    Ok(names.iter().filter_map(|n| month_partition(n)).collect())
}

/// A pending or running re-rating job whose scope starts before `before` (it reads raw events there).
pub async fn job_before(
    conn: &mut PgConnection,
    before: Option<DateTime<Utc>>,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar!(
        "SELECT job_id FROM rerating_jobs
         WHERE status IN ('pending', 'running') AND lower(scope) < $1 LIMIT 1",
        before,
    )
    .fetch_optional(conn)
    .await
}

/// The raw events the partition holds.
pub async fn rows_in(conn: &mut PgConnection, p: &MonthPartition) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {}", p.name))
        .fetch_one(conn)
        .await
}

/// Locks the partition against writes until the caller's transaction ends (so what is copied out is
/// exactly what is dropped); returns its rows.
pub async fn lock_month(tx: &mut PgConnection, p: &MonthPartition) -> Result<i64, sqlx::Error> {
    sqlx::query(&format!("LOCK TABLE {} IN SHARE MODE", p.name))
        .execute(&mut *tx)
        .await?;
    rows_in(tx, p).await
}

/// The partition's rows as CSV with a header, oldest first, in chunks (`COPY … TO STDOUT`).
pub async fn copy_out_month<'c>(
    tx: &'c mut PgConnection,
    p: &MonthPartition,
) -> Result<impl futures::Stream<Item = Result<impl AsRef<[u8]>, sqlx::Error>> + 'c, sqlx::Error> {
    tx.copy_out_raw(&format!(
        "COPY (SELECT event_id, customer_id, event_type, event_time, value, properties, received_at
               FROM {} ORDER BY event_time, event_id)
         TO STDOUT WITH (FORMAT csv, HEADER)",
        p.name
    ))
    .await
}

/// Detaches and drops the partition, and records that raw events before its end are archived, in the
/// caller's transaction.
pub async fn drop_month(tx: &mut PgConnection, p: &MonthPartition) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "ALTER TABLE telemetry_events DETACH PARTITION {}",
        p.name
    ))
    .execute(&mut *tx)
    .await?;
    sqlx::query(&format!("DROP TABLE {}", p.name))
        .execute(&mut *tx)
        .await?;
    sqlx::query!(
        "INSERT INTO telemetry_retention (singleton, archived_before) VALUES (true, $1)
         ON CONFLICT ON CONSTRAINT telemetry_retention_pkey DO UPDATE
         SET archived_before = GREATEST(telemetry_retention.archived_before, EXCLUDED.archived_before),
             updated_at = now()",
        p.end,
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// The event_ids rows of `[from, to)` that [`prune_event_ids`] would delete.
pub async fn event_ids_to_prune(
    conn: &mut PgConnection,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "ids!" FROM event_ids e
           WHERE e.event_time >= $1 AND e.event_time < $2
             AND NOT EXISTS (SELECT 1 FROM event_outbox o WHERE o.event_id = e.event_id)"#,
        from,
        to,
    )
    .fetch_one(conn)
    .await
}

/// Deletes the event_ids rows of `[from, to)` in one statement (event_ids has no index on event_time:
/// one pass, not one per month), never a row an unsent outbox row still needs; returns how many.
pub async fn prune_event_ids(
    conn: &mut PgConnection,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query!(
        "DELETE FROM event_ids e WHERE e.event_time >= $1 AND e.event_time < $2
           AND NOT EXISTS (SELECT 1 FROM event_outbox o WHERE o.event_id = e.event_id)",
        from,
        to,
    )
    .execute(conn)
    .await?
    .rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn month_partitions_are_recognised_by_name() {
        let p = month_partition("telemetry_events_2024_02").unwrap();
        assert_eq!(p.start.to_rfc3339(), "2024-02-01T00:00:00+00:00");
        assert_eq!(p.end.to_rfc3339(), "2024-03-01T00:00:00+00:00");
        assert!(month_partition("telemetry_events_default").is_none());
        assert!(month_partition("telemetry_events_2024_2").is_none());
    }
}
