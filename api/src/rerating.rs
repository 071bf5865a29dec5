//! `POST /api/v1/rerating-jobs` and `GET /api/v1/rerating-jobs/{id}` (SPEC §7): a job is queued here and
//! executed by `meterflow_sinks::rerating_jobs::runner`, which the pipeline's leader runs beside its
//! dataflow (woken by the `rerating_jobs` table's NOTIFY, migration 0019). With no pipeline running, a
//! job stays pending until one starts.
//!
//! A job whose scope (customers × time) overlaps a pending or running one is refused with 409
//! `RERATING_IN_PROGRESS` (`meterflow_store::rerating_jobs::queue`: of two concurrent requests exactly
//! one wins). Once a job finishes, the same scope can be started again.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use chrono::{DateTime, Utc};
use meterflow_model::json::decimal_number;
use meterflow_model::FieldError;
use meterflow_store::rerating_jobs::{self as jobs, Queued};
use rand::Rng;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::audit::{Audit, IdFrom};
use crate::auth::Scope;
use crate::error::ApiError;
use crate::extract::{limited, JsonObject};
use crate::openapi::{body, ok, op, path_param, problem, schema, Access, Route, Verb};
use crate::time::{exclusive_end, parse_rfc3339};
use crate::AppState;
use axum::routing::on;
use meterflow_store::audit::Entity;
use meterflow_store::owners::Owned;
use serde_json::json;

/// The largest body of a job request.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// The request: `from`/`to` (or the seed's `window_start`/`window_end`), customers (empty: all).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(as = NewReratingJob)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// Empty or absent: all.
    #[serde(default)]
    customer_ids: Vec<String>,
    /// RFC 3339 (alias window_start).
    #[serde(alias = "window_start")]
    #[schema(required = true, value_type = String)]
    from: Option<String>,
    /// RFC 3339 (alias window_end).
    #[serde(alias = "window_end")]
    #[schema(required = true, value_type = String)]
    to: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

/// A queued job.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct JobAccepted {
    job_id: String,
    status: String,
}

/// Where a background job (re-rating, invoice run) stands.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // the schema of the status column's values (its CHECK constraint)
#[schema(rename_all = "lowercase")]
pub(crate) enum JobStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
}

/// A re-rating job's scope, state and effect.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ReratingJob {
    job_id: String,
    customer_ids: Vec<String>,
    #[schema(format = DateTime)]
    from: Option<String>,
    #[schema(format = DateTime)]
    to: Option<String>,
    reason: String,
    #[schema(value_type = JobStatus)]
    status: String,
    windows_checked: i64,
    windows_changed: i64,
    /// The scope's charges before and after, once it succeeded.
    #[schema(value_type = Option<meterflow_model::openapi::Decimal>)]
    amount_before: Option<Value>,
    #[schema(value_type = Option<meterflow_model::openapi::Decimal>)]
    amount_after: Option<Value>,
    error: Option<String>,
    #[schema(format = DateTime)]
    created_at: Option<String>,
    #[schema(format = DateTime)]
    started_at: Option<String>,
    #[schema(format = DateTime)]
    finished_at: Option<String>,
}

pub async fn create(
    State(state): State<AppState>,
    caller: crate::auth::Caller,
    JsonObject(request): JsonObject<JobRequest>,
) -> Result<impl IntoResponse, ApiError> {
    // A bound key may re-rate its own customer only (an empty list means every customer).
    if let Some(bound) = caller.bound() {
        if request.customer_ids.len() != 1 || request.customer_ids.iter().any(|c| c != bound) {
            return Err(ApiError::NotFound);
        }
    }
    let (from, to) = validate(&request)?;
    let job_id = format!("rrj_{:016x}", rand::rng().random::<u64>());
    let mut conn = state.pool.acquire().await?;
    let reason = request.reason.as_deref().unwrap_or("");
    if let Queued::Busy(busy) = jobs::queue(
        &mut conn,
        &job_id,
        &request.customer_ids,
        (from, to),
        reason,
    )
    .await?
    {
        return Err(ApiError::Conflict(
            "RERATING_IN_PROGRESS",
            format!(
                "re-rating job {busy} covers an overlapping scope and has not finished; wait for it \
                 (GET /api/v1/rerating-jobs/{busy}) and start this one again"
            ),
        ));
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(JobAccepted {
            job_id,
            status: "pending".into(),
        }),
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
    let job = jobs::get(&state.pool, &job_id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let money = |d: Option<Decimal>| d.map(|d| Value::Number(decimal_number(&d)));
    let time = |t: Option<DateTime<Utc>>| {
        t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
    };
    Ok(Json(ReratingJob {
        job_id: job.job_id,
        customer_ids: job.customer_ids,
        from: time(job.from),
        to: time(job.to),
        reason: job.reason,
        status: job.status,
        windows_checked: job.windows_checked,
        windows_changed: job.windows_changed,
        amount_before: money(job.amount_before),
        amount_after: money(job.amount_after),
        error: job.error,
        created_at: time(job.created_at),
        started_at: time(job.started_at),
        finished_at: time(job.finished_at),
    }))
}

/// This module's routes: each row routes its handler and documents it, with the role it needs
/// ([`Route`]).
pub(crate) const ROUTES: &[Route] = &[
    Route {
        verb: Verb::Post,
        path: "/api/v1/rerating-jobs",
        access: Access::Admin,
        scope: Scope::Body,
        audit: Some(Audit {
            action: "rerating_job.create",
            entity: "rerating_job",
            snapshot: Entity::ReratingJob,
            id: IdFrom::Body("job_id"),
        }),
        idempotent: true,
        summary: "Re-rate a scope of customers and time from the raw events",
        handler: |m, _| limited(on(m, create), MAX_BODY_BYTES),
        spec: || {
            op(
                vec![],
                Some(body(
                    schema::<JobRequest>(),
                    json!({"customer_ids": ["cust_1"], "from": "2024-01-01T00:00:00Z",
                           "to": "2024-01-02T00:00:00Z", "reason": "corrected price book"}),
                )),
                vec![
                    (202, ok("Queued", schema::<JobAccepted>())),
                    (400, problem("MALFORMED_JSON")),
                    (
                        409,
                        problem("RERATING_IN_PROGRESS: an overlapping job is pending or running"),
                    ),
                    (413, problem("PAYLOAD_TOO_LARGE")),
                    (422, problem("VALIDATION_FAILED")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Get,
        path: "/api/v1/rerating-jobs/{job_id}",
        access: Access::Read,
        scope: Scope::Owned(Owned::ReratingJob, "job_id"),
        audit: None,
        idempotent: false,
        summary: "A re-rating job's state and effect",
        handler: |m, _| on(m, get),
        spec: || {
            op(
                vec![path_param("job_id")],
                None,
                vec![
                    (200, ok("The job", schema::<ReratingJob>())),
                    (404, problem("NOT_FOUND")),
                ],
            )
        },
    },
];
