//! `POST /api/v1/rerating-jobs` and `GET /api/v1/rerating-jobs/{id}` (SPEC §7): a job is queued here and
//! executed by `meterflow_sinks::rerating_jobs::runner`, which the `meterflow api` process runs beside
//! the API (woken through [`AppState::rerating_wake`](crate::AppState)).
//!
//! A job whose scope (customers × time) overlaps a pending or running one is refused with 409
//! `RERATING_IN_PROGRESS`: the check and the insert run under a table lock, so of two concurrent
//! requests exactly one wins. Once a job finishes, the same scope can be started again.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use chrono::{DateTime, Utc};
use meterflow_model::json::decimal_number;
use meterflow_model::FieldError;
use rand::Rng;
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::{Connection, Row};

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
