//! `POST /api/v1/meters` and `GET /api/v1/meters` (SPEC §4): meter definitions. A definition is
//! immutable: posting the same one again is idempotent (200), another one under a used name is 409.
//! The pipeline picks new meters up within a second and applies them to the events it processes after.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use chrono::{DateTime, Utc};
use meterflow_model::{Meter, Window};
use serde::Serialize;
use sqlx::Row;

use crate::error::ApiError;
use crate::AppState;

#[derive(Debug, Serialize)]
pub struct StoredMeter {
    #[serde(flatten)]
    meter: Meter,
    created_at: DateTime<Utc>,
}

pub async fn create(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let body = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let meter: Meter =
        serde_json::from_slice(&body).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    meter.validate().map_err(ApiError::Validation)?;
    let inserted = sqlx::query(
        "INSERT INTO meters (meter, event_type, aggregation, value_property, \"window\")
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT ON CONSTRAINT meters_pkey DO NOTHING",
    )
    .bind(&meter.meter)
    .bind(&meter.event_type)
    .bind(meter.aggregation.as_str())
    .bind(&meter.value_property)
    .bind(window_name(meter.window))
    .execute(&state.pool)
    .await?
    .rows_affected();
    let stored = load(&state, Some(&meter.meter)).await?;
    let Some(existing) = stored.into_iter().next() else {
        return Err(ApiError::Internal(
            "a meter vanished after its insert".into(),
        ));
    };
    if inserted == 1 {
        return Ok((StatusCode::CREATED, Json(existing)));
    }
    if existing.meter == meter {
        return Ok((StatusCode::OK, Json(existing)));
    }
    Err(ApiError::Conflict(
        "METER_EXISTS",
        format!(
            "a different meter named {} exists; meters are immutable once created: choose another name",
            meter.meter
        ),
    ))
}

pub async fn list(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let data = load(&state, None).await?;
    Ok(Json(serde_json::json!({"data": data, "next_cursor": null})))
}

async fn load(state: &AppState, name: Option<&str>) -> Result<Vec<StoredMeter>, ApiError> {
    let rows = sqlx::query(
        "SELECT meter, event_type, aggregation, value_property, \"window\", created_at
         FROM meters WHERE archived_at IS NULL AND ($1::text IS NULL OR meter = $1) ORDER BY meter",
    )
    .bind(name)
    .fetch_all(&state.pool)
    .await?;
    rows.iter()
        .map(|r| {
            let definition = serde_json::json!({
                "meter": r.try_get::<String, _>(0)?,
                "event_type": r.try_get::<String, _>(1)?,
                "aggregation": r.try_get::<String, _>(2)?,
                "value_property": r.try_get::<Option<String>, _>(3)?,
                "window": r.try_get::<String, _>(4)?,
            });
            let meter: Meter = serde_json::from_value(definition)
                .map_err(|e| ApiError::Internal(format!("a stored meter does not decode: {e}")))?;
            Ok(StoredMeter {
                meter,
                created_at: r.try_get(5)?,
            })
        })
        .collect()
}

fn window_name(w: Window) -> &'static str {
    match w {
        Window::Minute => "minute",
        Window::Hour => "hour",
        Window::Day => "day",
    }
}
