//! `POST /api/v1/meters` and `GET /api/v1/meters` (SPEC §4): meter definitions. A definition is
//! immutable: posting the same one again is idempotent (200), another one under a used name is 409.
//! The pipeline picks a new meter up as soon as it is committed (it listens for the change) and applies
//! it to the events it processes after.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use chrono::{DateTime, Utc};
use meterflow_model::{Aggregation, Meter, Window};
use meterflow_store::meters::{self as store, MeterCreated};
use serde::Serialize;

use crate::audit::{Audit, IdFrom};
use crate::auth::Scope;
use crate::error::ApiError;
use crate::extract::JsonObject;
use crate::openapi::{body, ok, op, page, problem, schema, Access, Route, Verb};
use crate::page::Page;
use crate::AppState;
use axum::routing::on;
use meterflow_store::audit::Entity;
use serde_json::json;

/// A meter as stored: its definition and when it was created. The fields are [`Meter`]'s, spelled
/// out: `Meter` refuses unknown fields, so a schema that extended it would refuse `created_at`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StoredMeter {
    meter: String,
    event_type: String,
    aggregation: Aggregation,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_property: Option<String>,
    window: Window,
    /// The event properties each window is also keyed by (docs/dimensions.md); absent when none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    group_by: Vec<String>,
    /// How many distinct values each `group_by` key may take; absent: 1,000.
    #[serde(skip_serializing_if = "Option::is_none")]
    max_dimension_values: Option<u32>,
    created_at: DateTime<Utc>,
}

impl StoredMeter {
    fn new((meter, created_at): (Meter, DateTime<Utc>)) -> Self {
        let Meter {
            meter,
            event_type,
            aggregation,
            value_property,
            window,
            group_by,
            max_dimension_values,
        } = meter;
        StoredMeter {
            meter,
            event_type,
            aggregation,
            value_property,
            window,
            group_by: group_by.into(),
            max_dimension_values,
            created_at,
        }
    }
}

pub async fn create(
    State(state): State<AppState>,
    JsonObject(meter): JsonObject<Meter>,
) -> Result<impl IntoResponse, ApiError> {
    meter.validate().map_err(ApiError::Validation)?;
    let mut conn = state.pool.acquire().await?;
    let status = match store::create_meter(&mut conn, &meter).await? {
        MeterCreated::Created => StatusCode::CREATED,
        MeterCreated::Identical => StatusCode::OK,
        MeterCreated::Collides(why) => return Err(ApiError::Conflict("METER_NAME_COLLIDES", why)),
        MeterCreated::Different => {
            return Err(ApiError::Conflict(
                "METER_EXISTS",
                format!(
                    "a different meter named {} exists; meters are immutable once created: choose another name",
                    meter.meter
                ),
            ))
        }
    };
    let stored = store::list_meters(&mut conn, Some(&meter.meter))
        .await?
        .pop()
        .ok_or_else(|| ApiError::Internal("a meter vanished after its insert".into()))?;
    Ok((status, Json(StoredMeter::new(stored))))
}

pub async fn list(State(state): State<AppState>) -> Result<Json<Page<StoredMeter>>, ApiError> {
    let mut conn = state.pool.acquire().await?;
    let data = store::list_meters(&mut conn, None)
        .await?
        .into_iter()
        .map(StoredMeter::new)
        .collect();
    Ok(Json(Page {
        data,
        next_cursor: None,
    }))
}

/// This module's routes: each row routes its handler and documents it, with the role it needs
/// ([`Route`]).
pub(crate) const ROUTES: &[Route] = &[
    Route {
        verb: Verb::Post,
        path: "/api/v1/meters",
        access: Access::Admin,
        scope: Scope::Refused,
        audit: Some(Audit {
            action: "meter.create",
            entity: "meter",
            snapshot: Entity::Meter,
            id: IdFrom::Body("meter"),
        }),
        idempotent: true,
        summary: "Define a meter (immutable; posting the same definition again is idempotent)",
        handler: |m, _| on(m, create),
        spec: || {
            op(
                vec![],
                Some(body(
                    schema::<meterflow_model::Meter>(),
                    json!({"meter": "api_calls", "event_type": "api_call", "aggregation": "count",
                           "window": "hour"}),
                )),
                vec![
                    (200, ok("The identical meter exists", schema::<StoredMeter>())),
                    (201, ok("Created", schema::<StoredMeter>())),
                    (400, problem("MALFORMED_JSON")),
                    (
                        409,
                        problem("METER_EXISTS: a different meter has this name; METER_NAME_COLLIDES: the name is an event type in use (meter names and event types are disjoint)"),
                    ),
                    (413, problem("PAYLOAD_TOO_LARGE")),
                    (422, problem("VALIDATION_FAILED")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Get,
        path: "/api/v1/meters",
        access: Access::Read,
        scope: Scope::Shared,
        audit: None,
        idempotent: false,
        summary: "Every meter definition",
        handler: |m, _| on(m, list),
        spec: || {
            op(
                vec![],
                None,
                vec![(200, ok("The meters", page::<StoredMeter>()))],
            )
        },
    },
];
