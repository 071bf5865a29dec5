//! Ingestion (SPEC §2, §3, §8): `POST /api/v1/events`, `POST /api/v1/events/batch` and
//! `POST /api/v1/events/{id}/void`.
//!
//! ```text
//!  body ─► decode+validate (plain JSON or CloudEvents) ─err─► known id? 409 : 400/422
//!        ─► ingest.rs (group commit): INSERT event_ids (unique: 409 if taken) + telemetry_events
//!           + event_outbox ─► produce to Kafka (idempotent, acks=all) ─ok─► 201, outbox row cleared later
//!                                                                    └err─► rows removed ─► 503
//! ```
//! A crash between the INSERT and Kafka's acknowledgement leaves the outbox row behind; the relay
//! (`outbox.rs`) republishes it, so after a 201 the event reaches the pipeline whatever happens next, and
//! the pipeline's claim on `event_ids` makes sure it counts once however often it is produced.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use chrono::{SecondsFormat, Utc};
use meterflow_model::wire::{RecordKindHeader, KIND_HEADER};
use meterflow_model::{
    decode_as, sniff_event_id, split_batch, DecodeError, Format, Limits, DEFAULT_RETENTION_MICROS,
};
use meterflow_store::events;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use serde::Serialize;

use crate::audit::{Audit, IdFrom};
use crate::auth::{Caller, Scope};
use crate::error::ApiError;
use crate::extract::{body_error, is_object, limited, not_an_object};
use crate::openapi::{body, ok, op, path_param, problem, schema, Access, Route, Verb};
use crate::AppState;
use axum::routing::on;
use meterflow_store::audit::Entity;
use meterflow_store::owners::Owned;
use serde_json::json;

/// The largest single-event body by default (SPEC §8; `api.max_event_bytes`).
pub const MAX_EVENT_BYTES: usize = 64 * 1024;
/// The largest batch body by default (SPEC §8; `api.max_batch_bytes`).
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// The most events in one batch.
pub const MAX_BATCH_EVENTS: usize = 1000;

pub async fn post_event(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let format = content_format(&headers)?;
    let body = body.map_err(|e| body_error(e, state.settings.max_event_bytes))?;
    if !is_object(&body) {
        return Err(not_an_object());
    }
    let now = Utc::now();
    let event = match decode_as(format, &body, now.timestamp_micros(), &limits(&state)) {
        Ok(event) => event,
        Err(e) => return Err(refusal(&state, &body, e).await),
    };
    // Checked on the decoded event: the customer it will be counted for.
    caller.may_act_for(&event.customer_id)?;
    let event_id = event.event_id.clone();
    state.ingester.accept(event).await?;
    Ok((
        StatusCode::CREATED,
        Json(Accepted {
            event_id,
            received_at: now.to_rfc3339_opts(SecondsFormat::Millis, true),
            status: AcceptedStatus::Accepted,
        }),
    ))
}

/// The 201 of `POST /api/v1/events`, serialised straight from this (no intermediate JSON value); the
/// fields in the order they always had.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = EventAccepted)]
pub(crate) struct Accepted {
    event_id: String,
    #[schema(format = DateTime)]
    received_at: String,
    status: AcceptedStatus,
}

/// An accepted event's status: it is stored and will be counted once.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
enum AcceptedStatus {
    Accepted,
}

/// The answer to a batch: how many items were accepted and rejected, and each item's outcome.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct BatchResult {
    accepted: usize,
    rejected: usize,
    /// One per item, in order.
    results: Vec<ItemResult>,
}

/// One item's outcome in a batch.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ItemResult {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// The status a single POST of this item would have had: 201, 409, 400, 422 or 503.
    pub status: u16,
    /// The problem a single POST would have answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<crate::error::Problem>)]
    pub error: Option<serde_json::Value>,
}

/// A void's answer: `voided` when it already was, `voiding` while it travels to the pipeline.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct EventVoid {
    event_id: String,
    status: VoidStatus,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
enum VoidStatus {
    Voided,
    Voiding,
}

/// `POST /api/v1/events/batch`: a JSON array of up to 1000 events (or `application/cloudevents-batch+json`).
/// Each item is decided on its own; the answer is 200 with a result per item, in order.
pub async fn post_batch(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let format = content_format(&headers)?;
    let body = body.map_err(|e| body_error(e, state.settings.max_batch_bytes))?;
    let items = split_batch(&body).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    if items.is_empty() || items.len() > MAX_BATCH_EVENTS {
        return Err(ApiError::Validation(vec![
            meterflow_model::FieldError::new(
                "",
                format!("a batch holds 1 to {MAX_BATCH_EVENTS} events"),
            ),
        ]));
    }
    // The rate limit counts events, not requests.
    state
        .gate
        .spend_batch(&caller, items.len(), state.settings.ingest_rate)?;
    let now = Utc::now();
    let limits = limits(&state);
    // Decode every item, then hand the valid ones to the ingester at once: they are stored in one
    // statement and forwarded to Kafka together.
    let mut outcomes: Vec<Result<String, ApiError>> = Vec::with_capacity(items.len());
    let mut valid = Vec::new();
    let mut invalid = Vec::new();
    for (index, item) in items.iter().enumerate() {
        let bytes = item.get().as_bytes();
        if !is_object(bytes) {
            outcomes.push(Err(not_an_object()));
            continue;
        }
        match decode_as(format, bytes, now.timestamp_micros(), &limits) {
            Ok(event) => {
                outcomes.push(Ok(event.event_id.clone()));
                valid.push((index, event));
            }
            Err(e) => {
                if let Some(id) = sniff_event_id(bytes) {
                    invalid.push((index, id));
                }
                outcomes.push(Err(decode_error(e)));
            }
        }
    }
    // An invalid item whose id is known is a duplicate (SPEC §3): one query for all of them.
    let ids: Vec<String> = invalid.iter().map(|(_, id)| id.clone()).collect();
    let known = events::answered_duplicates(&state.pool, &ids).await?;
    for (index, id) in invalid {
        if known.contains(&id) {
            if let Some(outcome) = outcomes.get_mut(index) {
                *outcome = Err(ApiError::DuplicateEvent(id));
            }
        }
    }
    // A bound key's batch naming another customer is refused whole, before anything is stored; checked
    // on the decoded events, the customers they would be counted for.
    for (_, event) in &valid {
        caller.may_act_for(&event.customer_id)?;
    }
    let accepted_all = futures::future::join_all(
        valid
            .iter()
            .map(|(_, event)| state.ingester.accept(event.clone())),
    )
    .await;
    for ((index, _), result) in valid.iter().zip(accepted_all) {
        if let Err(e) = result {
            if let Some(outcome) = outcomes.get_mut(*index) {
                *outcome = Err(e);
            }
        }
    }
    let mut results = Vec::with_capacity(items.len());
    let mut accepted = 0;
    // An item refused by a bound (a full ingest queue…) counts the batch as refused for that reason.
    let mut refused = None;
    for (index, (item, outcome)) in items.iter().zip(outcomes).enumerate() {
        results.push(match outcome {
            Ok(event_id) => {
                accepted += 1;
                ItemResult {
                    index,
                    event_id: Some(event_id),
                    status: 201,
                    error: None,
                }
            }
            Err(e) => {
                refused = refused.or(e.refused());
                let (status, problem) = e.to_problem();
                ItemResult {
                    index,
                    event_id: sniff_event_id(item.get().as_bytes()),
                    status: status.as_u16(),
                    error: Some(problem),
                }
            }
        });
    }
    // An item to retry (503) is answered as a single 503 would be: the batch says when.
    let retry = results.iter().any(|r| r.status == 503);
    let body = BatchResult {
        accepted,
        rejected: results.len().saturating_sub(accepted),
        results,
    };
    let mut response = (StatusCode::OK, Json(body)).into_response();
    if retry {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("1"),
        );
    }
    if let Some(refused) = refused {
        response.extensions_mut().insert(refused);
    }
    Ok(response)
}

/// `POST /api/v1/events/{event_id}/void`: retracts a counted event from every aggregate (SPEC §2). The
/// void travels through Kafka behind the event (same key), so the pipeline applies it exactly once;
/// the id stays used. 202 the first time, 200 when it was already voided, 404 for an unknown id.
pub async fn void_event(
    State(state): State<AppState>,
    Path(event_id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    // The void request and its outbox row commit together: a void is "requested" only once it is
    // sure to reach the pipeline, so a retry after any failure here finds nothing requested and tries
    // again, and "voided" always means a void record exists.
    let Some(void) = events::request_void(&state.pool, &event_id).await? else {
        return Err(ApiError::NotFound);
    };
    if void.already {
        return Ok((
            StatusCode::OK,
            Json(EventVoid {
                event_id,
                status: VoidStatus::Voided,
            }),
        ));
    }
    if publish(
        &state,
        &void.customer_id,
        &void.payload,
        RecordKindHeader::Void,
        Utc::now().timestamp_millis(),
    )
    .await
    .is_ok()
    {
        let _ = events::forget_void(&state.pool, &event_id).await;
    }
    // If Kafka did not answer, the relay delivers the void from the outbox.
    Ok((
        StatusCode::ACCEPTED,
        Json(EventVoid {
            event_id,
            status: VoidStatus::Voiding,
        }),
    ))
}

/// The answer for a body that is not a valid event: 409 if its id is already known (checked before any
/// other validation, SPEC §3), else the decoding error.
async fn refusal(state: &AppState, body: &[u8], e: DecodeError) -> ApiError {
    if let Some(id) = sniff_event_id(body) {
        let ids = [id];
        match events::answered_duplicates(&state.pool, &ids).await {
            Ok(known) if !known.is_empty() => {
                let [id] = ids;
                return ApiError::DuplicateEvent(id);
            }
            Ok(_) => {}
            Err(e) => return ApiError::from(e),
        }
    }
    decode_error(e)
}

fn decode_error(e: DecodeError) -> ApiError {
    match e {
        DecodeError::Malformed(why) => ApiError::MalformedJson(why),
        DecodeError::Invalid(errors) => ApiError::Validation(errors),
    }
}

/// The validation limits now: the age limit follows the committed watermark (SPEC §2).
fn limits(state: &AppState) -> Limits {
    let watermark = state.watermark.load(std::sync::atomic::Ordering::Relaxed);
    Limits {
        oldest_micros: (watermark != i64::MIN)
            .then(|| watermark.saturating_sub(DEFAULT_RETENTION_MICROS)),
        ..state.limits
    }
}

/// JSON or CloudEvents JSON; anything else is 415.
fn content_format(headers: &HeaderMap) -> Result<Format, ApiError> {
    match headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        None => Ok(Format::Plain),
        Some(ct) if ct.starts_with("application/cloudevents") => Ok(Format::CloudEvent),
        Some(ct) if ct.starts_with("application/json") => Ok(Format::Plain),
        Some(_) => Err(ApiError::UnsupportedMediaType),
    }
}

/// Produces a record keyed by customer (so a customer's events and voids share a partition, in order)
/// and waits for the broker's acknowledgement from all in-sync replicas.
pub(crate) async fn publish(
    state: &AppState,
    customer_id: &str,
    payload: &[u8],
    kind: RecordKindHeader,
    timestamp_ms: i64,
) -> Result<(), rdkafka::error::KafkaError> {
    let record = FutureRecord::to(&state.topic)
        .key(customer_id)
        .payload(payload)
        .timestamp(timestamp_ms)
        .headers(OwnedHeaders::new().insert(Header {
            key: KIND_HEADER,
            value: Some(kind.as_str()),
        }));
    state
        .producer
        .send(record, Duration::from_secs(5))
        .await
        .map(|_| ())
        .map_err(|(e, _)| e)
}

/// This module's routes: each row routes its handler and documents it, with the role it needs
/// ([`Route`]).
pub(crate) const ROUTES: &[Route] = &[
    Route {
        verb: Verb::Post,
        path: "/api/v1/events",
        access: Access::Ingest,
        scope: Scope::Body,
        audit: None,
        idempotent: false,
        summary: "Ingest one event (plain JSON or CloudEvents structured JSON)",
        handler: |m, s| limited(on(m, post_event), s.max_event_bytes),
        spec: || {
            op(
                vec![],
                Some(body(
                    schema::<meterflow_model::event::RawEvent>(),
                    json!({"event_id": "evt_0001", "customer_id": "cust_1", "event_type": "api_call",
                           "event_time": "2024-01-15T10:00:00Z", "value": "1.5",
                           "properties": {"region": "eu"}}),
                )),
                vec![
                    (201, ok("The event is stored and will be counted once", schema::<Accepted>())),
                    (400, problem("MALFORMED_JSON: not JSON of the event's shape")),
                    (409, problem("DUPLICATE_EVENT: an event with this id was already accepted")),
                    (413, problem("PAYLOAD_TOO_LARGE")),
                    (415, problem("UNSUPPORTED_MEDIA_TYPE: send application/json or application/cloudevents+json")),
                    (422, problem("VALIDATION_FAILED, with the path of every bad field")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Post,
        path: "/api/v1/events/batch",
        access: Access::Ingest,
        scope: Scope::Body,
        audit: None,
        idempotent: false,
        summary: "Ingest up to 1000 events; each item is decided on its own",
        handler: |m, s| limited(on(m, post_batch), s.max_batch_bytes),
        spec: || {
            op(
                vec![],
                Some(body(
                    json!({"type": "array", "minItems": 1, "maxItems": MAX_BATCH_EVENTS,
                           "items": schema::<meterflow_model::event::RawEvent>()}),
                    json!([{"event_id": "evt_0002", "customer_id": "cust_1", "event_type": "api_call",
                            "event_time": "2024-01-15T10:00:00Z", "value": 2}]),
                )),
                vec![
                    (
                        200,
                        ok("A result per item, in order", schema::<BatchResult>()),
                    ),
                    (400, problem("MALFORMED_JSON: not a JSON array")),
                    (413, problem("PAYLOAD_TOO_LARGE")),
                    (415, problem("UNSUPPORTED_MEDIA_TYPE")),
                    (
                        422,
                        problem("VALIDATION_FAILED: a batch holds 1 to 1000 events"),
                    ),
                ],
            )
        },
    },
    Route {
        verb: Verb::Post,
        path: "/api/v1/events/{event_id}/void",
        access: Access::Ingest,
        scope: Scope::Owned(Owned::Event, "event_id"),
        audit: Some(Audit {
            action: "event.void",
            entity: "event",
            snapshot: Entity::Event,
            id: IdFrom::Path("event_id"),
        }),
        idempotent: false,
        summary: "Retract a counted event from every aggregate",
        handler: |m, _| on(m, void_event),
        spec: || {
            op(
                vec![path_param("event_id")],
                None,
                vec![
                    (200, ok("Already voided", schema::<EventVoid>())),
                    (
                        202,
                        ok(
                            "The void is on its way to the pipeline",
                            schema::<EventVoid>(),
                        ),
                    ),
                    (404, problem("NOT_FOUND: no such event")),
                ],
            )
        },
    },
];
