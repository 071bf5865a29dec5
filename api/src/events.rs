//! `POST /api/v1/events` (SPEC §2, §3): validate, make the event durable and unique in Postgres, forward it
//! to Kafka, then answer 201.
//!
//! ```text
//!  body ─► decode+validate ─► INSERT telemetry_events + event_outbox (one statement; 409 if the id exists)
//!        ─► produce to Kafka (idempotent, acks=all) ─ok─► 201, outbox row deleted in the background
//!                                                   └err─► row removed again ─► 503 Retry-After
//! ```
//! A crash between the INSERT and Kafka's acknowledgement leaves the outbox row behind; the relay
//! (`outbox.rs`) republishes it, so after a 201 the event reaches the pipeline whatever happens next.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use chrono::{SecondsFormat, Utc};
use meterflow_model::{decode_event, DecodeError, Event};
use rdkafka::producer::FutureRecord;

use crate::error::ApiError;
use crate::AppState;

/// The largest single-event body (SPEC §8).
pub const MAX_EVENT_BYTES: usize = 64 * 1024;

pub async fn post_event(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    require_json(&headers)?;
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(MAX_EVENT_BYTES),
        _ => ApiError::BadRequest(e.body_text()),
    })?;
    let now = Utc::now();
    let event =
        decode_event(&body, now.timestamp_micros(), &state.limits).map_err(|e| match e {
            DecodeError::Malformed(why) => ApiError::MalformedJson(why),
            DecodeError::Invalid(errors) => ApiError::Validation(errors),
        })?;

    let payload = event.to_json();
    store(&state, &event, &payload).await?;
    if let Err(e) = publish(&state, &event, &payload, now.timestamp_millis()).await {
        tracing::warn!(event_id = %event.event_id, error = %e, "kafka did not take the event; withdrawing it");
        // Compensation: the event was not accepted. If the delete fails too, the outbox row stays and the
        // relay delivers the event later, which is consistent with a retry answering 409.
        let _ = sqlx::query("DELETE FROM telemetry_events WHERE event_id = $1")
            .bind(&event.event_id)
            .execute(&state.pool)
            .await;
        return Err(ApiError::Unavailable("the event log (Kafka)"));
    }
    // Waits (rather than drops) when the outbox cleaner lags: a row left behind would be relayed again.
    let _ = state.published.send(event.event_id.clone()).await;
    state
        .metrics
        .events_ingested
        .with_label_values(&[event.event_type.as_str()])
        .inc();
    let body = serde_json::json!({
        "event_id": event.event_id,
        "status": "accepted",
        "received_at": now.to_rfc3339_opts(SecondsFormat::Millis, true),
    });
    Ok((StatusCode::CREATED, Json(body)))
}

fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    match headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        None => Ok(()),
        Some(ct) if ct.starts_with("application/json") || ct.contains("+json") => Ok(()),
        Some(_) => Err(ApiError::UnsupportedMediaType),
    }
}

/// Stores the event and its outbox row in one statement; a known id is a 409.
async fn store(state: &AppState, event: &Event, payload: &[u8]) -> Result<(), ApiError> {
    let inserted: Option<String> = sqlx::query_scalar(
        "WITH stored AS (
             INSERT INTO telemetry_events (event_id, customer_id, event_type, event_time, value, properties)
             VALUES ($1, $2, $3, $4, $5, $6::jsonb)
             ON CONFLICT ON CONSTRAINT telemetry_events_pkey DO NOTHING
             RETURNING event_id, customer_id)
         INSERT INTO event_outbox (event_id, payload, customer_id)
         SELECT event_id, $7, customer_id FROM stored
         RETURNING event_id",
    )
    .bind(&event.event_id)
    .bind(&event.customer_id)
    .bind(&event.event_type)
    .bind(event.event_time())
    .bind(event.value)
    .bind(&event.properties)
    .bind(payload)
    .fetch_optional(&state.pool)
    .await?;
    match inserted {
        Some(_) => Ok(()),
        None => Err(ApiError::DuplicateEvent(event.event_id.clone())),
    }
}

/// Produces the event keyed by customer (so a customer's events share a partition) and waits for the
/// broker's acknowledgement from all in-sync replicas.
async fn publish(
    state: &AppState,
    event: &Event,
    payload: &[u8],
    timestamp_ms: i64,
) -> Result<(), rdkafka::error::KafkaError> {
    let record = FutureRecord::to(&state.topic)
        .key(&event.customer_id)
        .payload(payload)
        .timestamp(timestamp_ms);
    state
        .producer
        .send(record, Duration::from_secs(5))
        .await
        .map(|_| ())
        .map_err(|(e, _)| e)
}
