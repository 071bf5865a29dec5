//! `GET /api/v1/dead-letters`: the Kafka records the pipeline could not accept, with the reason, newest
//! last, paginated by id (SPEC §2, §8).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::error::ApiError;
use crate::page::Page;
use crate::AppState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterQuery {
    limit: Option<i64>,
    cursor: Option<String>,
}

#[derive(Debug, Serialize)]
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
    let rows = sqlx::query(
        "SELECT id, topic, partition, \"offset\", reason, payload, created_at FROM dead_letters
         WHERE id > $1 ORDER BY id LIMIT $2",
    )
    .bind(after)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let data = rows
        .iter()
        .map(|r| {
            Ok(DeadLetter {
                id: r.try_get(0)?,
                topic: r.try_get(1)?,
                partition: r.try_get(2)?,
                offset: r.try_get(3)?,
                reason: r.try_get(4)?,
                payload: String::from_utf8_lossy(&r.try_get::<Vec<u8>, _>(5)?).into_owned(),
                created_at: r.try_get(6)?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Json(Page::from_overfetched(data, limit, |d| {
        d.id.to_string()
    })))
}
