//! `GET /api/v1/charges`: the window charges the pipeline committed (SPEC §5), filtered, in key order,
//! with keyset pagination behind an opaque cursor (SPEC §8). Amounts are unrounded and shown with their
//! exact digits.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::error::ApiError;
use crate::page::{Cursor, Page};
use crate::time::exclusive_end;
use crate::AppState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChargeQuery {
    customer_id: Option<String>,
    meter: Option<String>,
    /// Windows starting at or after this instant.
    #[serde(alias = "window_start")]
    from: Option<DateTime<Utc>>,
    /// Windows starting before this instant (`…T23:59:59.999Z` is the instant that follows).
    #[serde(alias = "window_end")]
    to: Option<DateTime<Utc>>,
    limit: Option<i64>,
    cursor: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Charge {
    customer_id: String,
    meter: String,
    window_start: DateTime<Utc>,
    window_end: DateTime<Utc>,
    #[serde(serialize_with = "meterflow_model::json::serialize_decimal")]
    quantity: Decimal,
    #[serde(serialize_with = "meterflow_model::json::serialize_decimal")]
    amount: Decimal,
    currency: String,
    price_book_id: String,
    revision: i32,
    updated_at: DateTime<Utc>,
}

pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<ChargeQuery>, QueryRejection>,
) -> Result<Json<Page<Charge>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = crate::page::limit(q.limit)?;
    let after = q.cursor.as_deref().map(Cursor::decode).transpose()?;
    let (after_customer, after_meter, after_start) = match &after {
        Some(c) => (Some(c.0.as_str()), Some(c.1.as_str()), Some(c.2)),
        None => (None, None, None),
    };
    let rows = sqlx::query(
        "SELECT customer_id, meter, window_start, window_end, quantity, amount, currency, price_book_id,
                revision, updated_at
         FROM charges
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
    .bind(q.to.map(exclusive_end))
    .bind(after_customer)
    .bind(after_meter)
    .bind(after_start)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let data = rows
        .iter()
        .map(|r| {
            Ok(Charge {
                customer_id: r.try_get(0)?,
                meter: r.try_get(1)?,
                window_start: r.try_get(2)?,
                window_end: r.try_get(3)?,
                quantity: r.try_get(4)?,
                amount: r.try_get(5)?,
                currency: r.try_get(6)?,
                price_book_id: r.try_get(7)?,
                revision: r.try_get(8)?,
                updated_at: r.try_get(9)?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Json(Page::from_overfetched(data, limit, |c| {
        Cursor(c.customer_id.clone(), c.meter.clone(), c.window_start).encode()
    })))
}
