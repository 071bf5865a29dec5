//! `GET /api/v1/aggregations`: the current aggregate rows, filtered, in key order, with keyset
//! pagination behind an opaque cursor (SPEC §8).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::error::ApiError;
use crate::page::{Cursor, Page};
use crate::AppState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregationQuery {
    customer_id: Option<String>,
    meter: Option<String>,
    /// Windows starting at or after this instant.
    from: Option<DateTime<Utc>>,
    /// Windows starting before this instant.
    to: Option<DateTime<Utc>>,
    limit: Option<i64>,
    cursor: Option<String>,
    /// `event_ids`: list each window's contributing event ids.
    include: Option<String>,
    /// Most event ids listed per window (default and maximum 1000).
    event_ids_limit: Option<i64>,
    /// List event ids after this one (the `event_ids_next_cursor` of a previous answer).
    event_ids_after: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Aggregation {
    customer_id: String,
    meter: String,
    window_start: DateTime<Utc>,
    window_end: DateTime<Utc>,
    #[serde(serialize_with = "meterflow_model::json::serialize_decimal")]
    value: Decimal,
    event_count: i64,
    finalized: bool,
    revision: i32,
    updated_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_ids: Option<Vec<String>>,
    /// Set when the window has more event ids than listed: pass it as `event_ids_after`.
    #[serde(skip_serializing_if = "Option::is_none")]
    event_ids_next_cursor: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<AggregationQuery>, QueryRejection>,
) -> Result<Json<Page<Aggregation>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let with_ids = match q.include.as_deref() {
        None => false,
        Some("event_ids") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "include={other} is not known; the one option is include=event_ids"
            )))
        }
    };
    let ids_limit = crate::page::limit(q.event_ids_limit)?;
    let limit = crate::page::limit(q.limit)?;
    let after = q.cursor.as_deref().map(Cursor::decode).transpose()?;
    let (after_customer, after_meter, after_start) = match &after {
        Some(c) => (Some(c.0.as_str()), Some(c.1.as_str()), Some(c.2)),
        None => (None, None, None),
    };
    let rows = sqlx::query(
        "SELECT customer_id, meter, window_start, window_end, value, event_count, finalized, revision, updated_at
         FROM aggregations
         WHERE ($1::text IS NULL OR customer_id = $1)
           AND ($2::text IS NULL OR meter = $2)
           AND ($3::timestamptz IS NULL OR window_start >= $3)
           AND ($4::timestamptz IS NULL OR window_start < $4)
           AND ($5::text IS NULL OR (customer_id, meter, window_start) > ($5, $6, $7))
         ORDER BY customer_id, meter, window_start
         LIMIT $8",
    )
    .bind(q.customer_id)
    .bind(q.meter)
    .bind(q.from)
    .bind(q.to)
    .bind(after_customer)
    .bind(after_meter)
    .bind(after_start)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let data = rows
        .iter()
        .map(|r| {
            Ok(Aggregation {
                customer_id: r.try_get(0)?,
                meter: r.try_get(1)?,
                window_start: r.try_get(2)?,
                window_end: r.try_get(3)?,
                value: r.try_get(4)?,
                event_count: r.try_get(5)?,
                finalized: r.try_get(6)?,
                revision: r.try_get(7)?,
                updated_at: r.try_get(8)?,
                event_ids: None,
                event_ids_next_cursor: None,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let mut data = data;
    if with_ids {
        for a in data.iter_mut().take(limit as usize) {
            let mut ids: Vec<String> = sqlx::query_scalar(
                "SELECT t.event_id
                 FROM telemetry_events t
                 JOIN event_ids e ON e.event_id = t.event_id AND e.event_time = t.event_time
                 WHERE t.customer_id = $1
                   AND t.event_type = COALESCE((SELECT event_type FROM meters WHERE meter = $2), $2)
                   AND t.event_time >= $3 AND t.event_time < $4
                   AND e.counted_partition IS NOT NULL AND e.voided_partition IS NULL
                   AND ($5::text IS NULL OR t.event_id > $5)
                 ORDER BY t.event_id
                 LIMIT $6",
            )
            .bind(&a.customer_id)
            .bind(&a.meter)
            .bind(a.window_start)
            .bind(a.window_end)
            .bind(q.event_ids_after.as_deref())
            .bind(ids_limit + 1)
            .fetch_all(&state.pool)
            .await?;
            if ids.len() as i64 > ids_limit {
                ids.truncate(ids_limit as usize);
                a.event_ids_next_cursor = ids.last().cloned();
            }
            a.event_ids = Some(ids);
        }
    }
    Ok(Json(Page::from_overfetched(data, limit, |a| {
        Cursor(a.customer_id.clone(), a.meter.clone(), a.window_start).encode()
    })))
}
