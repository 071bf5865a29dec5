//! Two request middlewares: request ids and request timeouts.
//!
//! ```text
//!  request ─► request_id: x-request-id as sent (if sane) or a new one ─► span "request"{request_id, method,
//!             route} around everything below, so every log line of the request carries the id
//!          ─► metrics::track ─► admission::admit (a slot, or 503 OVERLOADED) ─► within: not answered
//!             within api.request_timeout_secs ─► 503 TIMEOUT
//!          ─► problem_rejections (NUL in path/query ─► 400; axum's text/plain 4xx ─► problem+json)
//!          ─► handler
//!  response ◄─ x-request-id echoed
//! ```

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::Rng;
use tracing::Instrument;

use crate::ApiError;

/// The header a request id travels in, both ways.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request's id, also in the request's extensions for handlers that record it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestId(pub String);

/// Longest request id taken from a client; longer ones are replaced.
const MAX_ID_LEN: usize = 128;

/// Takes the client's `x-request-id` when it is 1 to 128 visible ASCII characters, else makes one
/// (128 random bits, hex); runs the request in a span carrying it and echoes it in the response.
pub async fn request_id(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty() && v.len() <= MAX_ID_LEN && v.bytes().all(|b| b.is_ascii_graphic())
        })
        .map(str::to_owned)
        .unwrap_or_else(new_id);
    let route = request.extensions().get::<MatchedPath>().cloned();
    // At ERROR level so that the span, and so the id, is there whatever the log filter lets through
    // (with `warn`, an INFO span would be filtered out and the request's warnings would lack the id).
    let span = tracing::error_span!(
        "request",
        request_id = %id,
        method = %request.method(),
        route = route.as_ref().map_or("unmatched", MatchedPath::as_str),
    );
    request.extensions_mut().insert(RequestId(id.clone()));
    let started = Instant::now();
    let mut response = next.run(request).instrument(span.clone()).await;
    span.in_scope(|| {
        tracing::debug!(
            status = response.status().as_u16(),
            millis = started.elapsed().as_secs_f64() * 1e3,
            "request answered"
        );
    });
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID.clone(), value);
    }
    response
}

fn new_id() -> String {
    format!("{:032x}", rand::rng().random::<u128>())
}

/// Answers 503 `TIMEOUT` (problem+json, Retry-After) when the rest of the request takes longer than
/// `limit`; the handler is dropped. Work it handed off (an event queued for storing) still completes, so
/// a retry of a timed-out event may answer 409: it was accepted.
pub async fn timeout(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    within(limit, request, next).await
}

/// [`timeout`] as a function, for a middleware that does more (admission.rs runs it in its slot, one
/// layer fewer per request).
pub async fn within(limit: Duration, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(
                seconds = limit.as_secs_f64(),
                "request not answered in time; answered 503"
            );
            ApiError::Timeout(limit.as_secs()).into_response()
        }
    }
}

/// axum's own rejections (a path segment that is not UTF-8, say `/events/%FF/void`) answer in
/// text/plain; every 4xx of this API is a problem+json, so they are rewritten into one, keeping the
/// status and the reason. A path or query holding NUL is refused first ([`refuse_nul`]: one layer
/// for both, as each layer costs every request an allocation or two).
pub async fn problem_rejections(request: Request, next: Next) -> Response {
    if has_nul(&request) {
        return nul_refused();
    }
    let response = next.run(request).await;
    let status = response.status();
    let plain = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/plain"));
    if !status.is_client_error() || !plain {
        return response;
    }
    let body = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .unwrap_or_default();
    let mut problem =
        ApiError::BadRequest(String::from_utf8_lossy(&body).into_owned()).into_response();
    *problem.status_mut() = status;
    problem
}

/// A query or path that holds NUL (`%00`) can name nothing this API stores (Postgres text cannot hold
/// it): 400 before any handler or query sees it, whatever the route.
pub async fn refuse_nul(request: Request, next: Next) -> Response {
    if has_nul(&request) {
        return nul_refused();
    }
    next.run(request).await
}

fn has_nul(request: &Request) -> bool {
    let has_nul = |text: &str| {
        text.as_bytes()
            .windows(3)
            .any(|w| w.eq_ignore_ascii_case(b"%00"))
    };
    let uri = request.uri();
    has_nul(uri.path()) || uri.query().is_some_and(has_nul)
}

fn nul_refused() -> Response {
    ApiError::BadRequest("the path and query must not contain NUL (%00)".into()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_32_hex_digits_and_differ() {
        let (a, b) = (new_id(), new_id());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
