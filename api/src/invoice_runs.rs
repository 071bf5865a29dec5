//! `POST /api/v1/invoice-runs` and `GET /api/v1/invoice-runs/{id}` (SPEC §6): every registered
//! customer's invoice for a period, issued by a background task of the API process.
//!
//! ```text
//!  POST {period: "2024-01"} ─► 422 bad period · 409 PERIOD_NOT_ENDED · 409 INVOICE_RUN_IN_PROGRESS
//!                           ─► store::invoice_runs::create_run (customers snapshotted as items)
//!                           ─► tokio task: execute on a connection of its own ─► 202 {run_id, status}
//!  sweeper (every 10 s)     ─► unfinished runs nobody holds (their process died) are resumed here
//!  GET                      ─► status and counts: total, issued, skipped_existing, failed, unregistered
//! ```
//! `meterflow invoice-run` executes runs the same way, in the foreground.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use chrono::{DateTime, Utc};
use meterflow_model::FieldError;
use meterflow_store::invoice_runs::{self as runs, RunError, RunOptions, RunStatus};
use meterflow_store::invoices::{self as sink, Period};
use serde::{Deserialize, Serialize};

use sqlx::{ConnectOptions, PgPool};

use crate::auth::Scope;
use crate::error::ApiError;
use crate::extract::{limited, JsonObject};
use crate::openapi::{body, ok, op, path_param, problem, schema, Access, Route, Verb};
use crate::AppState;
use axum::routing::on;
use serde_json::json;

/// How often the API looks for unfinished runs that no process is executing.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// An invoice run to start: every registered customer's invoice for one month.
#[derive(Deserialize, utoipa::ToSchema)]
#[schema(as = NewInvoiceRun)]
#[serde(deny_unknown_fields)]
pub struct NewRun {
    #[schema(required = true, value_type = meterflow_model::openapi::Month)]
    period: Option<String>,
}

/// A started run: pending until the API's runner picks it up.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct InvoiceRunAccepted {
    run_id: String,
    status: String,
    /// `2024-01`.
    period: String,
}

pub async fn create(
    State(state): State<AppState>,
    JsonObject(raw): JsonObject<NewRun>,
) -> Result<impl IntoResponse, ApiError> {
    let period = match raw.period.as_deref().map(Period::parse_month) {
        None => Err("is required".to_owned()),
        Some(p) => p.map_err(|e| e.to_string()),
    }
    .map_err(|why| ApiError::Validation(vec![FieldError::new("period", why)]))?;
    let mut conn = state.pool.acquire().await?;
    let ended_by = sink::ended_by(&mut conn, &state.topic, Utc::now()).await?;
    let run_id = runs::create_run(&mut conn, period, ended_by)
        .await
        .map_err(run_error)?;
    drop(conn);
    tokio::spawn(execute_in_background(state.pool.clone(), run_id.clone()));
    let location = format!("/api/v1/invoice-runs/{run_id}");
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(InvoiceRunAccepted {
            run_id,
            status: "pending".into(),
            period: period.month(),
        }),
    ))
}

fn run_error(e: RunError) -> ApiError {
    match e {
        RunError::PeriodNotEnded { .. } => ApiError::Conflict("PERIOD_NOT_ENDED", e.to_string()),
        RunError::InProgress(_) | RunError::Busy(_) => {
            ApiError::Conflict("INVOICE_RUN_IN_PROGRESS", e.to_string())
        }
        RunError::NotFound => ApiError::NotFound,
        RunError::Database(e) => e.into(),
    }
}

/// An invoice run's progress and outcome.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = InvoiceRun)]
pub struct RunView {
    run_id: String,
    /// `2024-01`.
    period: String,
    period_start: DateTime<Utc>,
    period_end: DateTime<Utc>,
    #[schema(value_type = crate::rerating::JobStatus)]
    status: String,
    error: Option<String>,
    /// Registered customers in the run, and how many of them are done.
    total: i64,
    done: i64,
    issued: i64,
    skipped_existing: i64,
    failed: i64,
    failures: Vec<RunFailure>,
    /// Customers with usage in the period that are not registered: not invoiced.
    unregistered_with_usage: Unregistered,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
}

/// A customer whose invoice failed, and why.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct RunFailure {
    customer_id: String,
    error: String,
}

/// How many customers with usage are not registered, and some of them.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct Unregistered {
    count: i64,
    customer_ids: Vec<String>,
}

impl From<RunStatus> for RunView {
    fn from(s: RunStatus) -> Self {
        RunView {
            run_id: s.run_id.clone(),
            period: s.period.month(),
            period_start: s.period.start,
            period_end: s.period.end,
            status: s.status.clone(),
            error: s.error.as_deref().map(public_error),
            total: s.total,
            done: s.done(),
            issued: s.issued,
            skipped_existing: s.skipped_existing,
            failed: s.failed,
            failures: s
                .failures
                .iter()
                .map(|(c, e)| RunFailure {
                    customer_id: c.clone(),
                    error: public_error(e),
                })
                .collect(),
            unregistered_with_usage: Unregistered {
                count: s.unregistered,
                customer_ids: s.unregistered_sample.clone(),
            },
            created_at: s.created_at,
            started_at: s.started_at,
            finished_at: s.finished_at,
        }
    }
}

pub async fn get_one(
    State(state): State<AppState>,
    Path(run_id): Path<String>,
) -> Result<Json<RunView>, ApiError> {
    let mut conn = state.pool.acquire().await?;
    let status = runs::run_status(&mut conn, &run_id)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(status.into()))
}

/// Executes a run on a connection of its own (not the pool's: if this process dies, the connection
/// closes and the run's lock goes with it, so another process can resume the run).
pub async fn execute_in_background(pool: PgPool, run_id: String) {
    let mut conn = match pool.connect_options().connect().await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::warn!(%run_id, error = %e, "cannot connect to run an invoice run; the sweeper retries");
            return;
        }
    };
    match runs::execute(&mut conn, &run_id, &RunOptions::default(), |_| {}).await {
        Ok(status) => tracing::info!(
            %run_id,
            period = %status.period.month(),
            issued = status.issued,
            skipped = status.skipped_existing,
            failed = status.failed,
            unregistered = status.unregistered,
            "invoice run finished"
        ),
        Err(RunError::Busy(_)) => {}
        Err(e) => tracing::error!(%run_id, error = %e, "invoice run stopped"),
    }
}

/// Resumes, every [`SWEEP_EVERY`], the unfinished runs that no process executes (the one that did died).
pub async fn sweep_unfinished(pool: PgPool) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    loop {
        tick.tick().await;
        let unfinished = match pool.acquire().await {
            Ok(mut conn) => runs::unfinished_runs(&mut conn).await,
            Err(e) => Err(e),
        };
        match unfinished {
            Ok(ids) => {
                for run_id in ids {
                    execute_in_background(pool.clone(), run_id).await;
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot look for unfinished invoice runs"),
        }
    }
}

/// A run's or a customer's error as shown: a database failure's own message (it names tables, columns
/// and values) is replaced by a pointer to the log; other errors (currency mismatch, overflow…) stay.
fn public_error(text: &str) -> String {
    const DATABASE: [&str; 2] = [
        "postgres failed during the invoice run:",
        "postgres refused the issue:",
    ];
    if DATABASE.iter().any(|p| text.starts_with(p)) {
        "a database error stopped it; the log of the process that ran it has the details".to_owned()
    } else {
        text.to_owned()
    }
}

/// This module's routes: each row routes its handler and documents it, with the role it needs
/// ([`Route`]).
pub(crate) const ROUTES: &[Route] = &[
    Route {
        verb: Verb::Post,
        path: "/api/v1/invoice-runs",
        access: Access::Admin,
        scope: Scope::Refused,
        audit: None,
        idempotent: true,
        summary: "Invoice every registered customer for an ended month, in the background",
        handler: |m, _| limited(on(m, create), crate::invoices::MAX_BODY_BYTES),
        spec: || {
            op(
                vec![],
                Some(body(schema::<NewRun>(), json!({"period": "2024-01"}))),
                vec![
                    (202, ok("Started", schema::<InvoiceRunAccepted>())),
                    (400, problem("MALFORMED_JSON")),
                    (409, problem("PERIOD_NOT_ENDED or INVOICE_RUN_IN_PROGRESS")),
                    (413, problem("PAYLOAD_TOO_LARGE")),
                    (422, problem("VALIDATION_FAILED")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Get,
        path: "/api/v1/invoice-runs/{run_id}",
        access: Access::Read,
        scope: Scope::Refused,
        audit: None,
        idempotent: false,
        summary: "An invoice run's progress",
        handler: |m, _| on(m, get_one),
        spec: || {
            op(
                vec![path_param("run_id")],
                None,
                vec![
                    (200, ok("The run", schema::<RunView>())),
                    (404, problem("NOT_FOUND")),
                ],
            )
        },
    },
];
