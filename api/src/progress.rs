//! `GET /api/v1/progress` and `POST /api/v1/watermark` (SPEC §4): how far the pipeline has committed,
//! and an admin's way to close windows when no later event will come (backfills, tests).
//!
//! A client that posted events and wants to read their aggregates waits until, for every partition,
//! `next_offset` reaches the `end_offset` it saw after posting (`lag` = 0), and — to read finalized
//! windows — until `committed_watermark` passes the window's end plus `allowed_lateness_seconds`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use chrono::{DateTime, Utc};
use meterflow_store::results;
use meterflow_store::watermark_floors;
use rdkafka::producer::Producer;
use serde::{Deserialize, Serialize};

use crate::auth::Scope;
use crate::error::ApiError;
use crate::extract::JsonObject;
use crate::openapi::{body, ok, op, problem, schema, Access, Route, Verb};
use crate::AppState;
use axum::routing::on;
use serde_json::json;

/// How far the pipeline has committed the events topic, and how far Kafka has it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Progress {
    topic: String,
    /// The last committed epoch; null before the pipeline's first commit.
    committed_epoch: Option<i64>,
    committed_at: Option<DateTime<Utc>>,
    /// Windows ending before this instant plus the allowed lateness are final.
    committed_watermark: Option<DateTime<Utc>>,
    allowed_lateness_seconds: Option<i64>,
    /// The watermark the pipeline's next commit reaches at least (`POST /api/v1/watermark`).
    watermark_floor: Option<DateTime<Utc>>,
    /// The sum of the partitions' lag; null when Kafka did not answer for one of them.
    lag_total: Option<i64>,
    /// Every partition's lag is 0.
    caught_up: bool,
    partitions: Vec<PartitionProgress>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct PartitionProgress {
    partition: i32,
    /// The next offset the pipeline will read (everything before is committed).
    next_offset: i64,
    /// The partition's end (high watermark) now; `null` when Kafka did not answer.
    end_offset: Option<i64>,
    lag: Option<i64>,
    max_event_time: Option<DateTime<Utc>>,
}

pub async fn progress(State(state): State<AppState>) -> Result<Json<Progress>, ApiError> {
    let lease = results::committed_progress(&state.pool, &state.topic).await?;
    let stored = results::committed_offsets(&state.pool, &state.topic).await?;
    let floor = watermark_floors::floor(&state.pool, &state.topic).await?;

    let ends = end_offsets(&state).await;
    let mut partitions = Vec::new();
    for (partition, end) in &ends {
        let row = stored.iter().find(|r| r.partition == *partition);
        let next_offset = row.map_or(0, |r| r.next_offset);
        let max_event_time = row.and_then(|r| r.max_event_time);
        partitions.push(PartitionProgress {
            partition: *partition,
            next_offset,
            end_offset: *end,
            lag: end.map(|e| (e - next_offset).max(0)),
            max_event_time,
        });
    }
    let lag_total: Option<i64> = partitions.iter().map(|p| p.lag).sum();
    Ok(Json(Progress {
        topic: state.topic.clone(),
        committed_epoch: lease.as_ref().map(|l| l.committed_epoch),
        committed_at: lease.as_ref().and_then(|l| l.committed_at),
        committed_watermark: lease.as_ref().and_then(|l| l.committed_watermark),
        allowed_lateness_seconds: lease.as_ref().map(|l| l.allowed_lateness_seconds),
        watermark_floor: floor,
        lag_total,
        caught_up: lag_total == Some(0),
        partitions,
    }))
}

/// Each partition's end offset, or `None` where Kafka did not answer.
async fn end_offsets(state: &AppState) -> Vec<(i32, Option<i64>)> {
    let producer = state.producer.clone();
    let topic = state.topic.clone();
    tokio::task::spawn_blocking(move || {
        let timeout = std::time::Duration::from_secs(2);
        let client = producer.client();
        let Ok(metadata) = client.fetch_metadata(Some(&topic), timeout) else {
            return Vec::new();
        };
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        partitions
            .into_iter()
            .map(|p| {
                let end = client
                    .fetch_watermarks(&topic, p, timeout)
                    .ok()
                    .map(|(_, high)| high);
                (p, end)
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// The watermark floor: asked for in the request, in force in the answer.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[schema(as = Watermark)]
#[serde(deny_unknown_fields)]
pub struct AdvanceWatermark {
    advance_to: DateTime<Utc>,
}

/// How far ahead of the API's clock the watermark may be advanced: an advance is irreversible and
/// makes every older event too old, so a far-future instant (a typo, or a hostile admin key) is refused.
pub const MAX_ADVANCE_AHEAD: chrono::Duration = chrono::Duration::minutes(5);

/// `POST /api/v1/watermark {"advance_to": t}`: the committed watermark will be at least `t` from the
/// pipeline's next commit on (it never goes back). 202 with the floor now in force; 422 for an instant
/// more than 5 minutes ahead of now. Audited (`watermark.advance`, before and after).
pub async fn advance(
    State(state): State<AppState>,
    caller: crate::auth::Caller,
    request_id: Option<axum::Extension<crate::middleware::RequestId>>,
    JsonObject(request): JsonObject<AdvanceWatermark>,
) -> Result<impl IntoResponse, ApiError> {
    let latest = Utc::now()
        .checked_add_signed(MAX_ADVANCE_AHEAD)
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    if request.advance_to > latest {
        return Err(ApiError::Validation(vec![
            meterflow_model::FieldError::new(
                "advance_to",
                "must be at most 5 minutes ahead of now: an advance cannot be undone",
            ),
        ]));
    }
    let floor = watermark_floors::advance(
        &state.pool,
        &state.topic,
        request.advance_to,
        caller.0.actor(),
        request_id.as_ref().map(|r| r.0 .0.as_str()),
    )
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(AdvanceWatermark { advance_to: floor }),
    ))
}

/// This module's routes: each row routes its handler and documents it, with the role it needs
/// ([`Route`]).
pub(crate) const ROUTES: &[Route] = &[
    Route {
        verb: Verb::Get,
        path: "/api/v1/progress",
        access: Access::Read,
        scope: Scope::Shared,
        audit: None,
        idempotent: false,
        summary: "How far the pipeline has committed, per partition",
        handler: |m, _| on(m, progress),
        spec: || {
            op(
                vec![],
                None,
                vec![(200, ok("Progress", schema::<Progress>()))],
            )
        },
    },
    Route {
        verb: Verb::Post,
        path: "/api/v1/watermark",
        access: Access::Admin,
        scope: Scope::Refused,
        audit: None,
        idempotent: false,
        summary: "Raise the watermark floor (closes windows when no later event will come)",
        handler: |m, _| on(m, advance),
        spec: || {
            op(
                vec![],
                Some(body(
                    schema::<AdvanceWatermark>(),
                    json!({"advance_to": "2024-01-01T00:00:00Z"}),
                )),
                vec![
                    (
                        202,
                        ok(
                            "The floor now in force (audited)",
                            schema::<AdvanceWatermark>(),
                        ),
                    ),
                    (400, problem("MALFORMED_JSON")),
                    (413, problem("PAYLOAD_TOO_LARGE")),
                    (
                        422,
                        problem("VALIDATION_FAILED: more than 5 minutes ahead of now"),
                    ),
                ],
            )
        },
    },
];
