//! The runner of re-rating jobs: it takes the jobs `POST /api/v1/rerating-jobs` queued in
//! `rerating_jobs`, oldest first, runs each through [`rerating::rerate`], waits for the running pipeline
//! to reload what the job corrected, and records the outcome on the job.
//!
//! ```text
//!  rerating_jobs (pending | running without a runner) ──pg_try_advisory_lock(job)──► claim: running
//!    ──rerate(scope)──► wait_for_resync ──► succeeded (windows checked / changed, amounts) | failed (SQLSTATE)
//! ```
//! The `meterflow api` process runs it (the API crate only queues jobs and reads them).

use std::time::Duration;

use sqlx::{PgPool, Row};

use crate::rerating::{self, Scope};

/// Runs pending jobs one at a time, oldest first, for as long as its process runs. Woken by new jobs, and
/// every second in case another API instance queued one. The runner of a job holds a session lock on it
/// (`pg_advisory_lock`, on the connection that runs it), so a job left `running` is picked up again as
/// soon as its runner is gone (a crashed instance's connection ends, and its lock with it), and never
/// while it still runs, however long (its recomputation is one transaction: it happened or it did not).
pub async fn runner(pool: PgPool, wake: std::sync::Arc<tokio::sync::Notify>) {
    loop {
        match run_next(&pool).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "re-rating runner: cannot reach Postgres"),
        }
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// The session lock of a job's runner (two keys, so it cannot meet another advisory lock by chance):
/// taken if free, and released.
const TRY_LOCK_JOB: &str =
    "SELECT pg_try_advisory_lock(hashtext('meterflow.rerating'), hashtext($1))";
const UNLOCK_JOB: &str = "SELECT pg_advisory_unlock(hashtext('meterflow.rerating'), hashtext($1))";

/// Claims and runs the oldest job that is pending, or running without a runner; false when there is
/// none.
async fn run_next(pool: &PgPool) -> Result<bool, sqlx::Error> {
    let candidates: Vec<String> = sqlx::query_scalar(
        "SELECT job_id FROM rerating_jobs WHERE status IN ('pending', 'running')
         ORDER BY created_at LIMIT 20",
    )
    .fetch_all(pool)
    .await?;
    if candidates.is_empty() {
        return Ok(false);
    }
    let mut conn = pool.acquire().await?;
    for job_id in candidates {
        let locked: bool = sqlx::query_scalar(TRY_LOCK_JOB)
            .bind(&job_id)
            .fetch_one(&mut *conn)
            .await?;
        if !locked {
            // Its runner lives (in this or another instance).
            continue;
        }
        let ran = claim_and_run(pool, &mut conn, &job_id).await;
        let unlocked: Result<bool, _> = sqlx::query_scalar(UNLOCK_JOB)
            .bind(&job_id)
            .fetch_one(&mut *conn)
            .await;
        let reset = sqlx::query("RESET statement_timeout")
            .execute(&mut *conn)
            .await;
        if !matches!(unlocked, Ok(true)) || reset.is_err() {
            // Never hand the pool a connection that holds a job's lock or lacks its timeout.
            drop(conn.detach());
            return ran;
        }
        match ran {
            Ok(false) => continue,
            other => return other,
        }
    }
    Ok(false)
}

/// Claims `job_id` (whose lock this connection holds) and runs it; false if it is no longer pending or
/// running (finished meanwhile).
async fn claim_and_run(
    pool: &PgPool,
    conn: &mut sqlx::pool::PoolConnection<sqlx::Postgres>,
    job_id: &str,
) -> Result<bool, sqlx::Error> {
    let claimed = sqlx::query(
        "UPDATE rerating_jobs SET status = 'running', started_at = now()
         WHERE job_id = $1 AND status IN ('pending', 'running')
         RETURNING job_id, customer_ids, (extract(epoch FROM lower(scope)) * 1000000)::bigint,
                   (extract(epoch FROM upper(scope)) * 1000000)::bigint",
    )
    .bind(job_id)
    .fetch_optional(&mut **conn)
    .await?;
    let Some(row) = claimed else {
        return Ok(false);
    };
    let job_id: String = row.try_get(0)?;
    let scope = Scope {
        customer_ids: row.try_get(1)?,
        from_micros: row.try_get(2)?,
        to_micros: row.try_get(3)?,
    };
    // A job reads far more than a request: the pool's statement timeout (api.statement_timeout_ms)
    // does not apply to it. The caller RESETs it before the connection goes back.
    sqlx::query("SET statement_timeout = 0")
        .execute(&mut **conn)
        .await?;
    let result = match rerating::rerate(conn, &scope).await {
        // Done once the running pipeline has reloaded what the job corrected.
        Ok(outcome) => rerating::wait_for_resync(conn, Duration::from_secs(120))
            .await
            .map(|confirmed| (outcome, confirmed)),
        Err(e) => Err(e),
    };
    match result {
        Ok((outcome, confirmed)) => {
            if !confirmed {
                tracing::warn!(
                    job_id,
                    "the pipeline did not confirm reloading within 120 s"
                );
            }
            tracing::info!(job_id, ?outcome, "re-rating job succeeded");
            sqlx::query(
                "UPDATE rerating_jobs SET status = 'succeeded', finished_at = now(), windows_checked = $2,
                        windows_changed = $3, amount_before = $4, amount_after = $5
                 WHERE job_id = $1",
            )
            .bind(&job_id)
            .bind(outcome.windows_checked as i64)
            .bind(outcome.windows_changed as i64)
            .bind(outcome.amount_before)
            .bind(outcome.amount_after)
            .execute(pool)
            .await?;
        }
        Err(e) => {
            tracing::error!(job_id, error = %e, "re-rating job failed");
            sqlx::query(
                "UPDATE rerating_jobs SET status = 'failed', finished_at = now(), error = $2 WHERE job_id = $1",
            )
            .bind(&job_id)
            .bind(public_error(&e))
            .execute(pool)
            .await?;
        }
    }
    Ok(true)
}

/// What a job's `error` field says about a database failure: its SQLSTATE and where the details are,
/// never the database's own message (it names tables, columns and values).
pub(crate) fn public_error(e: &sqlx::Error) -> String {
    match e.as_database_error().and_then(|d| d.code()) {
        Some(code) => format!(
            "the database refused the work (SQLSTATE {code}); the API's log has the details"
        ),
        None => "the database could not be reached or answered unexpectedly; the API's log has the details"
            .to_owned(),
    }
}
