//! `GET /api/v1/dead-letters`: the Kafka records the pipeline could not accept, with the reason, newest
//! last, paginated by id (SPEC §2, §8).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use chrono::{DateTime, Utc};
use meterflow_store::results;
use serde::{Deserialize, Serialize};

use crate::auth::Scope;
use crate::error::ApiError;
use crate::openapi::{ok, op, page, params, problem, Access, Route, Verb};
use crate::page::Page;
use crate::AppState;
use axum::routing::on;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterQuery {
    /// Page size.
    #[param(minimum = 1, maximum = 1000, default = 100)]
    limit: Option<i64>,
    /// The `next_cursor` of the previous page (opaque).
    cursor: Option<String>,
}

/// A Kafka record the pipeline could not count, and why.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeadLetter {
    id: i64,
    topic: String,
    partition: i32,
    offset: i64,
    reason: String,
    /// The record's bytes as text (invalid UTF-8 replaced), for reading; the exact bytes stay in Postgres.
    payload: String,
    created_at: DateTime<Utc>,
}

pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<DeadLetterQuery>, QueryRejection>,
) -> Result<Json<Page<DeadLetter>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = crate::page::limit(q.limit)?;
    let after: i64 = match q.cursor.as_deref() {
        None => 0,
        Some(c) => c
            .parse()
            .map_err(|_| ApiError::BadRequest("cursor is not one this API returned".into()))?,
    };
    let data: Vec<DeadLetter> = results::dead_letters(&state.pool, after, limit + 1)
        .await?
        .into_iter()
        .map(|r| DeadLetter {
            id: r.id,
            topic: r.topic,
            partition: r.partition,
            offset: r.offset,
            reason: r.reason,
            payload: String::from_utf8_lossy(&r.payload).into_owned(),
            created_at: r.created_at,
        })
        .collect();
    Ok(Json(Page::from_overfetched(data, limit, |d| {
        d.id.to_string()
    })))
}

/// This module's routes: each row routes its handler and documents it, with the role it needs
/// ([`Route`]).
pub(crate) const ROUTES: &[Route] = &[Route {
    verb: Verb::Get,
    path: "/api/v1/dead-letters",
    access: Access::Read,
    scope: Scope::Refused,
    audit: None,
    idempotent: false,
    summary: "Kafka records the pipeline could not accept, with the reason",
    handler: |m, _| on(m, list),
    spec: || {
        op(
            params::<DeadLetterQuery>(),
            None,
            vec![
                (200, ok("A page of dead letters", page::<DeadLetter>())),
                (400, problem("BAD_REQUEST: a bad limit or cursor")),
            ],
        )
    },
}];
