//! Invoice runs (SPEC §6): every registered customer's invoice for a period, issued in batches through
//! [`invoices::issue_batch`], resumable after a crash with no duplicate and no gap. The API runs them in
//! a background task; `meterflow invoice-run` runs them in the foreground with a progress bar.
//!
//! ```text
//!  create_run ─► BEGIN  INSERT invoice_runs (one unfinished run per period: a unique index)
//!                       items ◄─ every registered customer ('pending')
//!                             ◄─ every unregistered customer with usage in the period ('unregistered')
//!                COMMIT
//!  execute    ─► pg_try_advisory_lock(run) on the executor's own connection (released if it dies)
//!                loop: BEGIN  next `batch_size` pending items (customer order)
//!                             issue_batch ─► invoices + numbers
//!                             items ─► issued | skipped | failed
//!                      COMMIT (invoices, numbers and item states together)
//!                status ─► succeeded
//! ```
//! Contract: killed at any moment, a run loses at most its open batch, whose transaction (numbers
//! included) rolls back; executed again (by the CLI or the API's sweeper) it goes on from the pending
//! items. Customers registered after the run was created are not in it.

use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection};

use crate::invoices::{self, Period, ONE_ISSUED_PER_PERIOD};
use crate::is_transient;

/// The unique index that allows one unfinished run per period.
pub const ONE_ACTIVE_PER_PERIOD: &str = "invoice_runs_one_active_per_period";

/// How many customers are shown by name in a run's status (unregistered ones, failures).
const SAMPLE: i64 = 100;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "the period ends at {end}; it has not ended yet by the clock or the pipeline's watermark \
         ({ended_by})"
    )]
    PeriodNotEnded {
        end: DateTime<Utc>,
        ended_by: DateTime<Utc>,
    },
    #[error("invoice run {0} for this period has not finished yet; wait for it (or resume it)")]
    InProgress(String),
    #[error("no invoice run has this id")]
    NotFound,
    /// Another process holds the run.
    #[error("invoice run {0} is being executed by another process")]
    Busy(String),
    #[error("postgres failed during the invoice run: {0}")]
    Database(#[from] sqlx::Error),
}

/// A run's state and counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunStatus {
    pub run_id: String,
    pub period: Period,
    /// `pending`, `running`, `succeeded` or `failed`.
    pub status: String,
    pub error: Option<String>,
    /// Registered customers in the run.
    pub total: i64,
    pub pending: i64,
    pub issued: i64,
    /// Customers whose invoice for the period had already been issued.
    pub skipped_existing: i64,
    pub failed: i64,
    /// Customers with usage in the period that are not registered (not invoiced).
    pub unregistered: i64,
    /// Up to 100 of them, in id order.
    pub unregistered_sample: Vec<String>,
    /// Up to 100 failed customers and why, in id order.
    pub failures: Vec<(String, String)>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// An `invoice_runs` row as [`run_status`] selects it.
struct RunRow {
    period_start: DateTime<Utc>,
    period_end: DateTime<Utc>,
    status: String,
    error: Option<String>,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
}

impl RunStatus {
    /// Customers done (issued, skipped or failed).
    pub fn done(&self) -> i64 {
        self.total - self.pending
    }
}

/// Creates a run for `period` with every registered customer as a pending item, if the period has ended
/// by `ended_by` and no other run for it is unfinished. Returns the run's id.
pub async fn create_run(
    conn: &mut PgConnection,
    period: Period,
    ended_by: DateTime<Utc>,
) -> Result<String, RunError> {
    if period.end > ended_by {
        return Err(RunError::PeriodNotEnded {
            end: period.end,
            ended_by,
        });
    }
    let run_id = format!("run_{:016x}", rand::random::<u64>());
    let mut tx = conn.begin().await?;
    let created = sqlx::query!(
        "INSERT INTO invoice_runs (run_id, period_start, period_end) VALUES ($1, $2, $3)",
        run_id,
        period.start,
        period.end,
    )
    .execute(&mut *tx)
    .await;
    match created {
        Ok(_) => {}
        Err(e) if invoices::violates(&e, ONE_ACTIVE_PER_PERIOD) => {
            drop(tx);
            let other = unfinished_run(conn, period).await?.unwrap_or_default();
            return Err(RunError::InProgress(other));
        }
        Err(e) => return Err(e.into()),
    }
    sqlx::query!(
        "INSERT INTO invoice_run_items (run_id, customer_id) SELECT $1, customer_id FROM customers",
        run_id,
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "INSERT INTO invoice_run_items (run_id, customer_id, status)
         SELECT DISTINCT $1, u.customer_id, 'unregistered' FROM upcoming_lines u
         WHERE u.period_start = $2
           AND NOT EXISTS (SELECT 1 FROM customers c WHERE c.customer_id = u.customer_id)",
        run_id,
        period.start,
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(run_id)
}

/// The unfinished (pending or running) run of `period`, if any.
pub async fn unfinished_run(
    conn: &mut PgConnection,
    period: Period,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar!(
        "SELECT run_id FROM invoice_runs
         WHERE period_start = $1 AND status IN ('pending', 'running')",
        period.start,
    )
    .fetch_optional(&mut *conn)
    .await
}

/// Every unfinished run, oldest first.
pub async fn unfinished_runs(conn: &mut PgConnection) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar!(
        "SELECT run_id FROM invoice_runs WHERE status IN ('pending', 'running') ORDER BY created_at",
    )
    .fetch_all(&mut *conn)
    .await
}

pub async fn run_status(
    conn: &mut PgConnection,
    run_id: &str,
) -> Result<Option<RunStatus>, sqlx::Error> {
    let Some(run) = sqlx::query_as!(
        RunRow,
        "SELECT period_start, period_end, status, error, created_at, started_at, finished_at
         FROM invoice_runs WHERE run_id = $1",
        run_id,
    )
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let mut status = RunStatus {
        run_id: run_id.to_owned(),
        period: Period {
            start: run.period_start,
            end: run.period_end,
        },
        status: run.status,
        error: run.error,
        total: 0,
        pending: 0,
        issued: 0,
        skipped_existing: 0,
        failed: 0,
        unregistered: 0,
        unregistered_sample: Vec::new(),
        failures: Vec::new(),
        created_at: run.created_at,
        started_at: run.started_at,
        finished_at: run.finished_at,
    };
    let counts = sqlx::query!(
        r#"SELECT status, count(*) AS "count!" FROM invoice_run_items WHERE run_id = $1 GROUP BY status"#,
        run_id,
    )
    .fetch_all(&mut *conn)
    .await?;
    for row in &counts {
        let n = row.count;
        match row.status.as_str() {
            "pending" => status.pending = n,
            "issued" => status.issued = n,
            "skipped" => status.skipped_existing = n,
            "failed" => status.failed = n,
            _ => status.unregistered = n,
        }
    }
    status.total = status.pending + status.issued + status.skipped_existing + status.failed;
    if status.unregistered > 0 {
        status.unregistered_sample = sqlx::query_scalar!(
            "SELECT customer_id FROM invoice_run_items
             WHERE run_id = $1 AND status = 'unregistered' ORDER BY customer_id LIMIT $2",
            run_id,
            SAMPLE,
        )
        .fetch_all(&mut *conn)
        .await?;
    }
    if status.failed > 0 {
        status.failures = sqlx::query!(
            r#"SELECT customer_id, coalesce(error, '') AS "error!" FROM invoice_run_items
             WHERE run_id = $1 AND status = 'failed' ORDER BY customer_id LIMIT $2"#,
            run_id,
            SAMPLE,
        )
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|row| (row.customer_id, row.error))
        .collect();
    }
    Ok(Some(status))
}

/// How an execution goes.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Customers issued per transaction.
    pub batch_size: usize,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions { batch_size: 250 }
    }
}

/// Executes (or resumes) `run_id` on `conn`, which must be a connection of its own: it holds the run's
/// advisory lock until the run ends or the connection dies. Calls `progress` after every batch. Returns
/// the final status; a run that has already finished is returned as it is.
pub async fn execute(
    conn: &mut PgConnection,
    run_id: &str,
    options: &RunOptions,
    mut progress: impl FnMut(&RunStatus),
) -> Result<RunStatus, RunError> {
    let locked: bool = sqlx::query_scalar!(
        r#"SELECT pg_try_advisory_lock(hashtextextended('invoice_run:' || $1, 0)) AS "locked!""#,
        run_id,
    )
    .fetch_one(&mut *conn)
    .await?;
    if !locked {
        return Err(RunError::Busy(run_id.to_owned()));
    }
    let result = execute_locked(conn, run_id, options, &mut progress).await;
    if let Err(RunError::Database(e)) = &result {
        // Recorded for GET /invoice-runs/{id}; the run stays resumable unless the error is permanent.
        let status = if is_transient(e) { "running" } else { "failed" };
        let _ = sqlx::query!(
            "UPDATE invoice_runs SET status = $2, error = $3 WHERE run_id = $1",
            run_id,
            status,
            e.to_string(),
        )
        .execute(&mut *conn)
        .await;
    }
    // The unlock's one row (its bool) is read and dropped, as `execute` did: the same messages.
    let _ = sqlx::query_scalar!(
        "SELECT pg_advisory_unlock(hashtextextended('invoice_run:' || $1, 0))",
        run_id,
    )
    .fetch_one(&mut *conn)
    .await;
    result
}

async fn execute_locked(
    conn: &mut PgConnection,
    run_id: &str,
    options: &RunOptions,
    progress: &mut impl FnMut(&RunStatus),
) -> Result<RunStatus, RunError> {
    let mut status = run_status(conn, run_id).await?.ok_or(RunError::NotFound)?;
    if status.status == "succeeded" || status.status == "failed" {
        return Ok(status);
    }
    sqlx::query!(
        "UPDATE invoice_runs SET status = 'running', error = NULL,
                started_at = coalesce(started_at, now())
         WHERE run_id = $1",
        run_id,
    )
    .execute(&mut *conn)
    .await?;
    status.status = "running".to_owned();
    progress(&status);
    let mut failures_in_a_row = 0;
    loop {
        match batch(conn, run_id, status.period, options.batch_size).await {
            Ok(None) => break,
            Ok(Some(done)) => {
                failures_in_a_row = 0;
                status.pending -= done.issued + done.skipped + done.failed;
                status.issued += done.issued;
                status.skipped_existing += done.skipped;
                status.failed += done.failed;
                progress(&status);
            }
            // Someone issued one of the batch's invoices around the customer lock: the next attempt
            // finds it and skips it. Transient failures are retried with a backoff. (Inline rather than
            // a retry crate: the retry is one arm of the batch loop, which already owns the counts.)
            Err(e)
                if failures_in_a_row < 5
                    && (is_transient(&e) || invoices::violates(&e, ONE_ISSUED_PER_PERIOD)) =>
            {
                failures_in_a_row += 1;
                tracing::warn!(run_id, error = %e, "invoice run batch failed; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(200 << failures_in_a_row))
                    .await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    sqlx::query!(
        "UPDATE invoice_runs SET status = 'succeeded', finished_at = now() WHERE run_id = $1",
        run_id,
    )
    .execute(&mut *conn)
    .await?;
    run_status(conn, run_id).await?.ok_or(RunError::NotFound)
}

/// What one batch did.
struct Done {
    issued: i64,
    skipped: i64,
    failed: i64,
}

/// Issues the next batch of pending items in one transaction; `None` when none is left.
async fn batch(
    conn: &mut PgConnection,
    run_id: &str,
    period: Period,
    size: usize,
) -> Result<Option<Done>, sqlx::Error> {
    let mut tx = conn.begin().await?;
    let ids: Vec<String> = sqlx::query_scalar!(
        "SELECT customer_id FROM invoice_run_items
         WHERE run_id = $1 AND status = 'pending' ORDER BY customer_id LIMIT $2",
        run_id,
        size as i64,
    )
    .fetch_all(&mut *tx)
    .await?;
    if ids.is_empty() {
        return Ok(None);
    }
    let outcome = invoices::issue_batch(&mut tx, &ids, period, Utc::now()).await?;
    let mut items: Vec<(String, &'static str, Option<String>, Option<String>)> = Vec::new();
    items.extend(outcome.issued.iter().map(|i| {
        (
            i.customer_id.clone(),
            "issued",
            Some(i.invoice_id.clone()),
            None,
        )
    }));
    items.extend(
        outcome
            .skipped
            .iter()
            .map(|(c, i)| (c.clone(), "skipped", Some(i.clone()), None)),
    );
    items.extend(
        outcome
            .failed
            .iter()
            .map(|(c, e)| (c.clone(), "failed", None, Some(e.to_string()))),
    );
    items.extend(outcome.unknown.iter().map(|c| {
        (
            c.clone(),
            "failed",
            None,
            Some("the customer is no longer registered".to_owned()),
        )
    }));
    let customers: Vec<&str> = items.iter().map(|i| i.0.as_str()).collect();
    let states: Vec<&str> = items.iter().map(|i| i.1).collect();
    let invoice_ids: Vec<Option<&str>> = items.iter().map(|i| i.2.as_deref()).collect();
    let errors: Vec<Option<&str>> = items.iter().map(|i| i.3.as_deref()).collect();
    // Borrowed (and, for the last two, nullable) elements: typed by the casts, not the macro's `&[String]`.
    sqlx::query!(
        "UPDATE invoice_run_items i SET status = u.s, invoice_id = u.inv, error = u.e
         FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[]) AS u(c, s, inv, e)
         WHERE i.run_id = $1 AND i.customer_id = u.c",
        run_id,
        &customers[..] as &[&str],
        &states[..] as &[&str],
        &invoice_ids[..] as &[Option<&str>],
        &errors[..] as &[Option<&str>],
    )
    .execute(&mut *tx)
    .await?;
    failpoint::hit("invoice_run_before_commit");
    tx.commit().await?;
    failpoint::hit("invoice_run_after_commit");
    Ok(Some(Done {
        issued: outcome.issued.len() as i64,
        skipped: outcome.skipped.len() as i64,
        failed: (outcome.failed.len() + outcome.unknown.len()) as i64,
    }))
}

/// Crash injection for tests: `MF_FAILPOINT=invoice_run_before_commit:N` or `invoice_run_after_commit:N`
/// aborts the process the N-th time a batch reaches that point, just as a `kill -9` there would.
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
