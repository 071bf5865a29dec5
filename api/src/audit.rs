//! The append-only audit log (`audit_log`, migration 0007): who (key id), what, before/after, when.
//!
//! ```text
//!  admin change ─► record_changes: before = the entity's row (to_jsonb) for PATCH and voids
//!               ─► handler ─► 2xx? after = the entity's row again (id from the path, or the created
//!                  body) ─► one audit_log row {actor, action, entity, entity_id, before, after, request_id}
//! ```
//!
//! The row is written after the change committed, not in its transaction: a crash between the two loses
//! the audit row (the change itself stands). Once the change committed, nothing in auditing it turns
//! the answer into a 5xx: a failed `after` snapshot is logged and the row written without it. Key creation and revocation (`meterflow api-key`) are audited
//! in their own transaction. The database refuses UPDATE, DELETE and TRUNCATE of the log.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use meterflow_store::audit::{insert, snapshot, Entity};

use crate::auth::Principal;
use crate::middleware::RequestId;
use crate::{ApiError, AppState};

/// What an audited route records: its action, its entity, whose row it snapshots, and where the id is.
/// A route row declares it (`openapi::Route::audit`).
#[derive(Clone, Copy, Debug)]
pub struct Audit {
    pub action: &'static str,
    pub entity: &'static str,
    /// Whose row (`to_jsonb`) the audit row shows before and after.
    pub snapshot: Entity,
    pub id: IdFrom,
}

/// Where an audited change's entity id is.
#[derive(Clone, Copy, Debug)]
pub enum IdFrom {
    /// A path parameter: the entity exists before, so `before` is recorded.
    Path(&'static str),
    /// A field of the created entity's response body.
    Body(&'static str),
}

/// The state of an audited route's middleware: the app's and the row's [`Audit`].
#[derive(Clone)]
pub struct Audited {
    pub state: AppState,
    pub audit: Audit,
}

/// The middleware of an audited route (inside the gate): records its change.
pub async fn record_changes(
    State(Audited { state, audit }): State<Audited>,
    request: Request,
    next: Next,
) -> Response {
    match record(&state, audit, request, next).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn record(
    state: &AppState,
    audited: Audit,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let actor = request
        .extensions()
        .get::<Principal>()
        .map_or("auth-off", |p| p.actor())
        .to_owned();
    let request_id = request.extensions().get::<RequestId>().map(|r| r.0.clone());
    let (mut parts, body) = request.into_parts();
    let path_id = match audited.id {
        IdFrom::Path(name) => {
            let params = <axum::extract::RawPathParams as axum::extract::FromRequestParts<
                AppState,
            >>::from_request_parts(&mut parts, state)
            .await
            .ok();
            params.and_then(|p| {
                p.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_owned())
            })
        }
        IdFrom::Body(_) => None,
    };
    let before = match &path_id {
        Some(id) => snapshot(&state.pool, audited.snapshot, id).await?,
        None => None,
    };
    let response = next.run(Request::from_parts(parts, body)).await;
    let created = matches!(audited.id, IdFrom::Body(_));
    let changed = if created {
        response.status() == StatusCode::CREATED
    } else {
        response.status().is_success()
    };
    if !changed {
        return Ok(response);
    }
    // From here on the change has committed: whatever fails while auditing it is logged, and the
    // client gets the handler's answer (a 5xx would make it retry a change that happened).
    let (parts, body) = response.into_parts();
    let (id, body) = match (audited.id, path_id) {
        (IdFrom::Body(field), _) => match axum::body::to_bytes(body, 16 * 1024 * 1024).await {
            Ok(bytes) => {
                let id = serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|v| v.get(field).and_then(|f| f.as_str()).map(str::to_owned));
                (id, Body::from(bytes))
            }
            Err(e) => {
                tracing::error!(action = audited.action, error = %e, "cannot read a response to audit; audit row not written");
                return Err(ApiError::Internal(format!(
                    "reading a response to audit: {e}"
                )));
            }
        },
        (IdFrom::Path(_), id) => (id, body),
    };
    if let Some(id) = id {
        let after = match snapshot(&state.pool, audited.snapshot, &id).await {
            Ok(after) => after,
            Err(e) => {
                // Audited without its snapshot: the row still says who changed what, when.
                tracing::error!(action = audited.action, entity_id = %id, error = %e, "no snapshot after the change; auditing it without one");
                None
            }
        };
        if created || before != after {
            let written = match state.pool.acquire().await {
                Ok(mut conn) => {
                    insert(
                        &mut conn,
                        &actor,
                        audited.action,
                        audited.entity,
                        &id,
                        before,
                        after,
                        request_id.as_deref(),
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = written {
                // The change stands; the operator must know its audit row is missing.
                tracing::error!(action = audited.action, entity_id = %id, error = %e, "audit row not written");
            }
        }
    } else {
        tracing::error!(
            action = audited.action,
            "audited change without an entity id; audit row not written"
        );
    }
    Ok(Response::from_parts(parts, body))
}
