//! `POST /api/v1/rerating-jobs` and `GET /api/v1/rerating-jobs/{id}` (SPEC §7), and the runner that
//! executes pending jobs in the background (`meterflow_sinks::rerating` does the recomputation).
//!
//! A job whose scope (customers × time) overlaps a pending or running one is refused with 409
//! `RERATING_IN_PROGRESS`: the check and the insert run under a table lock, so of two concurrent
//! requests exactly one wins. Once a job finishes, the same scope can be started again.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use chrono::{DateTime, Utc};
use meterflow_model::json::decimal_number;
use meterflow_model::FieldError;
use meterflow_sinks::rerating::{self, Scope};
use rand::Rng;
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::{Connection, PgPool, Row};

use crate::error::ApiError;
use crate::time::{exclusive_end, parse_rfc3339};
use crate::AppState;

/// The request: `from`/`to` (or the seed's `window_start`/`window_end`), customers (empty: all).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobRequest {
    #[serde(default)]
    customer_ids: Vec<String>,
    #[serde(alias = "window_start")]
    from: Option<String>,
    #[serde(alias = "window_end")]
    to: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

pub async fn create(
    State(state): State<AppState>,
    caller: crate::auth::Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let body = body.map_err(|e| crate::events::body_error(e, 64 * 1024))?;
    let request: JobRequest = crate::auth::decode_object(&body)?;
    // A bound key may re-rate its own customer only (an empty list means every customer).
    if let Some(bound) = caller.bound() {
        if request.customer_ids.len() != 1 || request.customer_ids.iter().any(|c| c != bound) {
            return Err(ApiError::NotFound);
        }
    }
    let (from, to) = validate(&request)?;
    let job_id = format!("rrj_{:016x}", rand::rng().random::<u64>());
    let mut conn = state.pool.acquire().await?;
    let mut tx = conn.begin().await?;
    sqlx::query("LOCK TABLE rerating_jobs IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let busy: Option<String> = sqlx::query_scalar(
        "SELECT job_id FROM rerating_jobs
         WHERE status IN ('pending', 'running')
           AND scope && tstzrange($1, $2, '[)')
           AND (cardinality(customer_ids) = 0 OR cardinality($3::text[]) = 0 OR customer_ids && $3)
         LIMIT 1",
    )
    .bind(from)
    .bind(to)
    .bind(&request.customer_ids)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(busy) = busy {
        return Err(ApiError::Conflict(
            "RERATING_IN_PROGRESS",
            format!(
                "re-rating job {busy} covers an overlapping scope and has not finished; wait for it \
                 (GET /api/v1/rerating-jobs/{busy}) and start this one again"
            ),
        ));
    }
    sqlx::query(
        "INSERT INTO rerating_jobs (job_id, customer_ids, scope, reason)
         VALUES ($1, $2, tstzrange($3, $4, '[)'), $5)",
    )
    .bind(&job_id)
    .bind(&request.customer_ids)
    .bind(from)
    .bind(to)
    .bind(request.reason.as_deref().unwrap_or(""))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    state.rerating_wake.notify_one();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"job_id": job_id, "status": "pending"})),
    ))
}

fn validate(request: &JobRequest) -> Result<(DateTime<Utc>, DateTime<Utc>), ApiError> {
    let mut errors = Vec::new();
    let from = match request.from.as_deref().map(parse_rfc3339) {
        Some(Some(t)) => Some(t),
        Some(None) => {
            errors.push(FieldError::new("from", "must be an RFC 3339 time"));
            None
        }
        None => {
            errors.push(FieldError::new("from", "is required"));
            None
        }
    };
    let to = match request.to.as_deref().map(parse_rfc3339) {
        Some(Some(t)) => Some(exclusive_end(t)),
        Some(None) => {
            errors.push(FieldError::new("to", "must be an RFC 3339 time"));
            None
        }
        None => {
            errors.push(FieldError::new("to", "is required"));
            None
        }
    };
    if let (Some(f), Some(t)) = (from, to) {
        if t <= f {
            errors.push(FieldError::new("to", "must be after from"));
        }
    }
    for (i, c) in request.customer_ids.iter().enumerate() {
        if c.is_empty() || c.len() > 128 {
            errors.push(FieldError::new(
                format!("customer_ids[{i}]"),
                "must be 1 to 128 characters",
            ));
        }
    }
    match (from, to) {
        (Some(f), Some(t)) if errors.is_empty() => Ok((f, t)),
        _ => Err(ApiError::Validation(errors)),
    }
}

pub async fn get(
    State(state): State<AppState>,
    Path(job_id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let row = sqlx::query(
        "SELECT job_id, customer_ids, lower(scope), upper(scope), reason, status, windows_checked,
                windows_changed, amount_before, amount_after, error, created_at, started_at, finished_at
         FROM rerating_jobs WHERE job_id = $1",
    )
    .bind(&job_id)
    .fetch_optional(&state.pool)
    .await?
    .ok_or(ApiError::NotFound)?;
    let money = |d: Option<Decimal>| d.map(|d| Value::Number(decimal_number(&d)));
    let time = |t: Option<DateTime<Utc>>| {
        t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
    };
    Ok(Json(json!({
        "job_id": row.try_get::<String, _>(0)?,
        "customer_ids": row.try_get::<Vec<String>, _>(1)?,
        "from": time(row.try_get(2)?),
        "to": time(row.try_get(3)?),
        "reason": row.try_get::<String, _>(4)?,
        "status": row.try_get::<String, _>(5)?,
        "windows_checked": row.try_get::<i64, _>(6)?,
        "windows_changed": row.try_get::<i64, _>(7)?,
        "amount_before": money(row.try_get(8)?),
        "amount_after": money(row.try_get(9)?),
        "error": row.try_get::<Option<String>, _>(10)?,
        "created_at": time(row.try_get(11)?),
        "started_at": time(row.try_get(12)?),
        "finished_at": time(row.try_get(13)?),
    })))
}

/// Runs pending jobs one at a time, oldest first, for as long as the API runs. Woken by new jobs, and
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
