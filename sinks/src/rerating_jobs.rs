//! The runner of re-rating jobs: it takes the jobs `POST /api/v1/rerating-jobs` queued in
//! `rerating_jobs` (through `meterflow_store::rerating_jobs`, the table's one writer), oldest first,
//! runs each through [`rerating::rerate`], hands the correction to the running dataflow's rating, and
//! records the outcome on the job once the epoch that took it in is committed.
//!
//! ```text
//!  NOTIFY meterflow_config 'rerating_jobs' (a job queued) | every 5 s ──► wake
//!  rerating_jobs (pending | running without a runner) ──pg_try_advisory_lock(job)──► claim: running
//!    ──rerate(scope, lease)──► apply(correction): rating retracts before, adds after, at one epoch
//!    ──that epoch committed──► succeeded (windows checked / changed, amounts) | failed (SQLSTATE)
//! ```
//! The pipeline's leader (process 0) runs it, beside the dataflow whose rating it corrects; the API
//! only queues jobs and reads them.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use meterflow_model::RatingCorrection;
use meterflow_store::rerating_jobs as jobs;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{rerating, Lease};

/// Hands a job's correction to the running dataflow's rating; resolves once the epoch that took it in
/// is committed, or the dataflow is gone (the next start then loads the corrected state).
pub type Apply = Arc<dyn Fn(RatingCorrection) -> BoxFuture<'static, ()> + Send + Sync>;

/// A job is looked for this often without a notification: one queued while the listener was down, or
/// left running by a runner that died.
const FALLBACK: Duration = Duration::from_secs(5);

/// Runs pending jobs one at a time, oldest first, for the pipeline that holds `lease`, until `stop` is
/// cancelled (between jobs: a job under way finishes first). Woken by `wake` (a job was queued) and
/// every [`FALLBACK`]. The runner of a job holds a session lock on it (`pg_advisory_lock`, on the
/// connection that runs it), so a job left `running` is picked up again as soon as its runner is gone
/// (a crashed instance's connection ends, and its lock with it), and never while it still runs, however
/// long (its recomputation is one transaction: it happened or it did not).
pub async fn runner(
    pool: PgPool,
    lease: Lease,
    wake: Arc<tokio::sync::Notify>,
    apply: Apply,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        match run_next(&pool, &lease, &apply).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "re-rating runner: cannot reach Postgres"),
        }
        tokio::select! {
            () = stop.cancelled() => {}
            () = wake.notified() => {}
            () = tokio::time::sleep(FALLBACK) => {}
        }
    }
}

/// Claims and runs the oldest job that is pending, or running without a runner; false when there is
/// none.
async fn run_next(pool: &PgPool, lease: &Lease, apply: &Apply) -> Result<bool, sqlx::Error> {
    let candidates = jobs::unfinished(pool).await?;
    if candidates.is_empty() {
        return Ok(false);
    }
    let mut conn = pool.acquire().await?;
    for job_id in candidates {
        // The session lock of a job's runner (two keys, so it cannot meet another advisory lock by
        // chance): taken if free, and released below.
        let locked: bool = sqlx::query_scalar!(
            r#"SELECT pg_try_advisory_lock(hashtext('meterflow.rerating'), hashtext($1)) AS "locked!""#,
            job_id,
        )
        .fetch_one(&mut *conn)
        .await?;
        if !locked {
            // Its runner lives (in this or another instance).
            continue;
        }
        let ran = claim_and_run(pool, &mut conn, &job_id, lease, apply).await;
        let unlocked: Result<bool, _> = sqlx::query_scalar!(
            r#"SELECT pg_advisory_unlock(hashtext('meterflow.rerating'), hashtext($1)) AS "unlocked!""#,
            job_id,
        )
        .fetch_one(&mut *conn)
        .await;
        let reset = sqlx::query!("RESET statement_timeout")
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
    lease: &Lease,
    apply: &Apply,
) -> Result<bool, sqlx::Error> {
    let Some(scope) = jobs::claim(conn, job_id).await? else {
        return Ok(false);
    };
    // A job reads far more than a request: the pool's statement timeout (api.statement_timeout_ms)
    // does not apply to it. The caller RESETs it before the connection goes back.
    sqlx::query!("SET statement_timeout = 0")
        .execute(&mut **conn)
        .await?;
    match rerating::rerate(conn, &scope, lease).await {
        Ok(None) => {
            // Fenced: a newer pipeline holds the lease; the job stays running, for its runner.
            tracing::warn!(
                job_id,
                "the pipeline lost its lease; leaving the job to the new leader"
            );
            return Ok(false);
        }
        Ok(Some((outcome, correction))) => {
            // Done once the running dataflow's rating has taken the correction in and committed.
            apply(correction).await;
            tracing::info!(job_id, ?outcome, "re-rating job succeeded");
            jobs::succeed(pool, job_id, &outcome).await?;
        }
        Err(e) => {
            tracing::error!(job_id, error = %e, "re-rating job failed");
            jobs::fail(pool, job_id, &public_error(&e)).await?;
        }
    }
    Ok(true)
}

/// What a job's `error` field says about a database failure: its SQLSTATE and where the details are,
/// never the database's own message (it names tables, columns and values).
pub(crate) fn public_error(e: &sqlx::Error) -> String {
    match e.as_database_error().and_then(|d| d.code()) {
        Some(code) => format!(
            "the database refused the work (SQLSTATE {code}); the pipeline's log has the details"
        ),
        None => "the database could not be reached or answered unexpectedly; the pipeline's log has the details"
            .to_owned(),
    }
}
