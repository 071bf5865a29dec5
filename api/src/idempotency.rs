//! `Idempotency-Key` on the admin POSTs (SPEC §8; the route rows with `idempotent: true`): the same key
//! with the same request gets the stored response again; the same key with another request is refused
//! 422 `IDEMPOTENCY_KEY_REUSED`.
//!
//! ```text
//!  POST + Idempotency-Key ─► claim (key id, idempotency key) with SHA-256(method, path, body)
//!     claimed ─► handler ─► status < 500 (and not 429): stored; else the claim is dropped (retry runs again)
//!     stored, same hash ─► the stored status, content type and body, with `Idempotent-Replayed: true`
//!     stored, other hash ─► 422;  claimed by a request still running ─► 409 IDEMPOTENCY_KEY_IN_PROGRESS
//! ```
//! Keys are scoped by API key id (`auth-off` with auth off). The handler runs to the end and its answer is
//! stored even when the request itself is dropped (request timeout, client gone), so a retry gets that
//! answer. A claim left by a request that never finished (the process died) is taken over after a minute.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use meterflow_store::idempotency;
use sha2::{Digest, Sha256};

use crate::auth::Principal;
use crate::{ApiError, AppState};

pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
pub static REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Longest Idempotency-Key accepted.
const MAX_KEY_LEN: usize = 255;

/// The state of a route's replay middleware: the app's, and the route (without `/api/v1`) the stored
/// answers are kept under.
#[derive(Clone)]
pub struct Honoured {
    pub state: AppState,
    pub route: &'static str,
}

/// The middleware of a route that honours `Idempotency-Key` (inside the gate; `openapi::Route::idempotent`).
pub async fn replay(
    State(Honoured { state, route }): State<Honoured>,
    request: Request,
    next: Next,
) -> Response {
    let Some(key) = request.headers().get(&IDEMPOTENCY_KEY).cloned() else {
        return next.run(request).await;
    };
    match run(&state, route, key, request, next).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn run(
    state: &AppState,
    route: &str,
    key: HeaderValue,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let key = key
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= MAX_KEY_LEN)
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "Idempotency-Key must be 1 to {MAX_KEY_LEN} visible ASCII characters"
            ))
        })?
        .to_owned();
    let scope = request
        .extensions()
        .get::<Principal>()
        .map_or("auth-off", |p| p.actor())
        .to_owned();
    let limit = state.settings.max_batch_bytes;
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::PayloadTooLarge(limit))?;
    let mut hasher = Sha256::new();
    hasher.update(parts.method.as_str().as_bytes());
    hasher.update(b" ");
    hasher.update(parts.uri.path().as_bytes());
    hasher.update(b"\n");
    hasher.update(&bytes);
    let request_hash: [u8; 32] = hasher.finalize().into();

    if !idempotency::claim(&state.pool, &scope, &key, route, request_hash.as_slice()).await? {
        let stored = idempotency::stored(&state.pool, &scope, &key).await?;
        return match stored {
            Some((hash, _, _, _)) if hash != request_hash => Err(ApiError::IdempotencyKeyReused),
            Some((_, Some(status), content_type, body)) => Ok(stored_response(
                status,
                content_type,
                body.unwrap_or_default(),
            )),
            _ => Err(ApiError::IdempotencyKeyInProgress),
        };
    }

    // The handler and the storing of its answer run to the end even if this request is dropped (the
    // client gave up, or the request timeout answered 503): a retry then gets the stored answer instead
    // of waiting for the claim to expire and running the change a second time (finding 31).
    let state = state.clone();
    let request = Request::from_parts(parts, Body::from(bytes));
    tokio::spawn(async move { answer_and_store(&state, scope, key, request, next).await })
        .await
        .map_err(|e| {
            ApiError::Internal(format!("the handler of an idempotent request failed: {e}"))
        })?
}

/// Runs the handler and stores its answer under the claim (or drops the claim for a 5xx or 429).
async fn answer_and_store(
    state: &AppState,
    scope: String,
    key: String,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let response = next.run(request).await;
    let status = response.status();
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        idempotency::release(&state.pool, &scope, &key).await?;
        return Ok(response);
    }
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, 16 * 1024 * 1024)
        .await
        .map_err(|e| ApiError::Internal(format!("reading a response to store: {e}")))?;
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    idempotency::record(
        &state.pool,
        &scope,
        &key,
        (i32::from(status.as_u16()), content_type, body.as_ref()),
    )
    .await?;
    Ok(Response::from_parts(parts, Body::from(body)))
}

fn stored_response(status: i32, content_type: Option<String>, body: Vec<u8>) -> Response {
    let status = u16::try_from(status)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    if let Some(value) = content_type.and_then(|c| HeaderValue::from_str(&c).ok()) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    headers.insert(REPLAYED.clone(), HeaderValue::from_static("true"));
    response
}
