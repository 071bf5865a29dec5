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

/// Most event ids in one answer of `include=event_ids` (`limit × event_ids_limit`).
pub const MAX_EVENT_IDS_PER_ANSWER: i64 = 10_000;

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
    /// Most event ids listed per window (at most 1000, and `limit × event_ids_limit` at most 10,000;
    /// by default as many as that allows, up to 1000).
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
    /// The window's sum left the decimal range: `value` is its last value in range, not its usage
    /// (README "Overflow is data, not a crash"). Shown only when true.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    quarantined: bool,
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
    let limit = crate::page::limit(q.limit)?;
    // Ids per answer are bounded: by default as many per window as fit, at most 1000.
    let ids_limit = match q.event_ids_limit {
        None => (MAX_EVENT_IDS_PER_ANSWER / limit).clamp(1, crate::page::MAX_LIMIT),
        Some(n) => crate::page::limit(Some(n))?,
    };
    if with_ids && limit.saturating_mul(ids_limit) > MAX_EVENT_IDS_PER_ANSWER {
        return Err(ApiError::BadRequest(format!(
            "include=event_ids lists at most {MAX_EVENT_IDS_PER_ANSWER} ids per answer: \
             limit × event_ids_limit is {}; lower one of them",
            limit.saturating_mul(ids_limit)
        )));
    }
    let after = q.cursor.as_deref().map(Cursor::decode).transpose()?;
    let (after_customer, after_meter, after_start) = match &after {
        Some(c) => (Some(c.0.as_str()), Some(c.1.as_str()), Some(c.2)),
        None => (None, None, None),
    };
    let rows = sqlx::query(
        "SELECT customer_id, meter, window_start, window_end, value, event_count, finalized, revision, updated_at,
                quarantined
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
                quarantined: r.try_get(9)?,
                event_ids: None,
                event_ids_next_cursor: None,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let mut data = data;
    if with_ids {
        // One query for every window of the page.
        let shown = data.len().min(usize::try_from(limit).unwrap_or(usize::MAX));
        let windows = data.get(..shown).unwrap_or_default();
        let customers: Vec<&str> = windows.iter().map(|a| a.customer_id.as_str()).collect();
        let meters: Vec<&str> = windows.iter().map(|a| a.meter.as_str()).collect();
        let starts: Vec<DateTime<Utc>> = windows.iter().map(|a| a.window_start).collect();
        let ends: Vec<DateTime<Utc>> = windows.iter().map(|a| a.window_end).collect();
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT w.i, x.event_id
             FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[])
                  WITH ORDINALITY AS w(customer_id, meter, window_start, window_end, i)
             CROSS JOIN LATERAL (
                 SELECT t.event_id
                 FROM telemetry_events t
                 JOIN event_ids e ON e.event_id = t.event_id AND e.event_time = t.event_time
                 WHERE t.customer_id = w.customer_id
                   AND t.event_type = COALESCE((SELECT event_type FROM meters WHERE meter = w.meter), w.meter)
                   AND t.event_time >= w.window_start AND t.event_time < w.window_end
                   AND e.counted_partition IS NOT NULL AND e.voided_partition IS NULL
                   AND ($5::text IS NULL OR t.event_id > $5)
                 ORDER BY t.event_id
                 LIMIT $6
             ) x
             ORDER BY w.i, x.event_id",
        )
        .bind(&customers)
        .bind(&meters)
        .bind(&starts)
        .bind(&ends)
        .bind(q.event_ids_after.as_deref())
        .bind(ids_limit + 1)
        .fetch_all(&state.pool)
        .await?;
        let mut listed: Vec<Vec<String>> = vec![Vec::new(); shown];
        for (i, id) in rows {
            // WITH ORDINALITY counts from 1.
            let slot = i
                .checked_sub(1)
                .and_then(|i| usize::try_from(i).ok())
                .and_then(|i| listed.get_mut(i));
            if let Some(ids) = slot {
                ids.push(id);
            }
        }
        for (a, mut ids) in data.iter_mut().zip(listed) {
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
