//! `rerating_jobs`: re-rating jobs queued by the API (SPEC §7), claimed and finished by their runner
//! (`meterflow_sinks::rerating_jobs`), read back by `GET /api/v1/rerating-jobs/{id}`.
//!
//! ```text
//!  queue ──► pending ──claim──► running ──succeed──► succeeded (what it checked, changed, amounts)
//!                                      └──fail─────► failed (a public error text)
//! ```
//! A job whose scope (customers × time) overlaps a pending or running one is not queued: the check and
//! the insert run under a table lock, so of two concurrent requests exactly one wins.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{Connection, PgConnection, PgPool};

/// What a job covers: customers (empty: all) and a half-open time range, microseconds.
#[derive(Clone, Debug)]
pub struct Scope {
    pub customer_ids: Vec<String>,
    pub from_micros: i64,
    pub to_micros: i64,
}

/// What a job found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Rows (windows of a meter) compared, and charges compared.
    pub windows_checked: u64,
    /// Rows or charges that differed and were corrected.
    pub windows_changed: u64,
    /// Σ charge amounts of the scope's periods before and after.
    pub amount_before: Decimal,
    pub amount_after: Decimal,
}

/// A job as stored.
#[derive(Clone, Debug)]
pub struct StoredJob {
    pub job_id: String,
    pub customer_ids: Vec<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub reason: String,
    pub status: String,
    pub windows_checked: i64,
    pub windows_changed: i64,
    pub amount_before: Option<Decimal>,
    pub amount_after: Option<Decimal>,
    pub error: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A `rerating_jobs` row as [`get`] selects it (`lower`, `upper`: the scope's bounds).
struct JobRow {
    job_id: String,
    customer_ids: Vec<String>,
    lower: Option<DateTime<Utc>>,
    upper: Option<DateTime<Utc>>,
    reason: String,
    status: String,
    windows_checked: i64,
    windows_changed: i64,
    amount_before: Option<Decimal>,
    amount_after: Option<Decimal>,
    error: Option<String>,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
}

impl From<JobRow> for StoredJob {
    fn from(row: JobRow) -> Self {
        StoredJob {
            job_id: row.job_id,
            customer_ids: row.customer_ids,
            from: row.lower,
            to: row.upper,
            reason: row.reason,
            status: row.status,
            windows_checked: row.windows_checked,
            windows_changed: row.windows_changed,
            amount_before: row.amount_before,
            amount_after: row.amount_after,
            error: row.error,
            created_at: Some(row.created_at),
            started_at: row.started_at,
            finished_at: row.finished_at,
        }
    }
}

/// Queues a job, unless an unfinished job's scope overlaps it ([`Queued::Busy`] names that job).
pub async fn queue(
    conn: &mut PgConnection,
    job_id: &str,
    customer_ids: &[String],
    (from, to): (DateTime<Utc>, DateTime<Utc>),
    reason: &str,
) -> Result<Queued, sqlx::Error> {
    let mut tx = conn.begin().await?;
    sqlx::query!("LOCK TABLE rerating_jobs IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let busy: Option<String> = sqlx::query_scalar!(
        "SELECT job_id FROM rerating_jobs
         WHERE status IN ('pending', 'running')
           AND scope && tstzrange($1, $2, '[)')
           AND (cardinality(customer_ids) = 0 OR cardinality($3::text[]) = 0 OR customer_ids && $3)
         LIMIT 1",
        from,
        to,
        customer_ids,
    )
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(busy) = busy {
        return Ok(Queued::Busy(busy));
    }
    sqlx::query!(
        "INSERT INTO rerating_jobs (job_id, customer_ids, scope, reason)
         VALUES ($1, $2, tstzrange($3, $4, '[)'), $5)",
        job_id,
        customer_ids,
        from,
        to,
        reason,
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Queued::Queued)
}

/// What [`queue`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Queued {
    Queued,
    /// Not queued: this unfinished job's scope overlaps.
    Busy(String),
}

/// One job, if it exists.
pub async fn get(pool: &PgPool, job_id: &str) -> Result<Option<StoredJob>, sqlx::Error> {
    let row = sqlx::query_as!(
        JobRow,
        r#"SELECT job_id, customer_ids, lower(scope) AS "lower?", upper(scope) AS "upper?", reason, status,
                windows_checked, windows_changed, amount_before, amount_after, error, created_at, started_at,
                finished_at
         FROM rerating_jobs WHERE job_id = $1"#,
        job_id,
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.map(StoredJob::from))
}

/// The oldest jobs not finished (pending, or running: perhaps without a runner), at most 20.
pub async fn unfinished(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar!(
        "SELECT job_id FROM rerating_jobs WHERE status IN ('pending', 'running')
         ORDER BY created_at LIMIT 20",
    )
    .fetch_all(pool)
    .await
}

/// Marks `job_id` running and returns its scope; `None` if it finished meanwhile.
pub async fn claim(conn: &mut PgConnection, job_id: &str) -> Result<Option<Scope>, sqlx::Error> {
    sqlx::query_as!(
        Scope,
        r#"UPDATE rerating_jobs SET status = 'running', started_at = now()
         WHERE job_id = $1 AND status IN ('pending', 'running')
         RETURNING customer_ids, (extract(epoch FROM lower(scope)) * 1000000)::bigint AS "from_micros!",
                   (extract(epoch FROM upper(scope)) * 1000000)::bigint AS "to_micros!""#,
        job_id,
    )
    .fetch_optional(&mut *conn)
    .await
}

/// Records a job's success and what it did.
pub async fn succeed(pool: &PgPool, job_id: &str, outcome: &Outcome) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE rerating_jobs SET status = 'succeeded', finished_at = now(), windows_checked = $2,
                windows_changed = $3, amount_before = $4, amount_after = $5
         WHERE job_id = $1",
        job_id,
        i64::try_from(outcome.windows_checked).unwrap_or(i64::MAX),
        i64::try_from(outcome.windows_changed).unwrap_or(i64::MAX),
        outcome.amount_before,
        outcome.amount_after,
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Records a job's failure with a text fit for its caller (no database internals).
pub async fn fail(pool: &PgPool, job_id: &str, error: &str) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE rerating_jobs SET status = 'failed', finished_at = now(), error = $2 WHERE job_id = $1",
        job_id,
        error,
    )
    .execute(pool)
    .await?;
    Ok(())
}
