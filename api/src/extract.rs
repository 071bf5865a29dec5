//! The request-body extractor every JSON-object route takes, whose rejection is the API's
//! problem+json ([`ApiError`]), never axum's plain-text one.
//!
//! ```text
//!  body bytes ─► over the route's limit ─► 413 PAYLOAD_TOO_LARGE (naming the limit)
//!             ─► unreadable             ─► 400 BAD_REQUEST
//!             ─► not a JSON object      ─► 400 MALFORMED_JSON ("the body must be a JSON object")
//!             ─► not T's shape          ─► 400 MALFORMED_JSON (serde's message, with the line/column)
//!             ─► JsonObject(T)
//! ```
//! A route sets its limit with [`limited`], which both enforces it and tells the extractor what it is.

use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Request};
use axum::http::StatusCode;
use axum::routing::MethodRouter;
use axum::Extension;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::AppState;

/// axum's body limit where a route sets none.
const AXUM_DEFAULT_LIMIT: usize = 2 * 1024 * 1024;

/// The body limit of the route a request is on, as [`limited`] set it.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimit(pub usize);

/// `router` taking bodies of at most `bytes`: larger ones are 413 PAYLOAD_TOO_LARGE.
pub fn limited(router: MethodRouter<AppState>, bytes: usize) -> MethodRouter<AppState> {
    router
        .layer::<_, Infallible>(DefaultBodyLimit::max(bytes))
        .layer::<_, Infallible>(Extension(BodyLimit(bytes)))
}

/// A request body that is one JSON object of `T`'s shape.
#[derive(Debug)]
pub struct JsonObject<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonObject<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let limit = request
            .extensions()
            .get::<BodyLimit>()
            .map_or(AXUM_DEFAULT_LIMIT, |l| l.0);
        let body = Bytes::from_request(request, state)
            .await
            .map_err(|e| body_error(e, limit))?;
        decode_object(&body).map(JsonObject)
    }
}

/// The answer for a body that could not be read: too large, or cut off.
pub fn body_error(e: BytesRejection, limit: usize) -> ApiError {
    match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(limit),
        _ => ApiError::BadRequest(e.body_text()),
    }
}

/// Whether a JSON text's top level is an object (leading whitespace allowed). serde's derived structs
/// also take a JSON array in field order; every body and batch item of the API must be an object.
pub fn is_object(json: &[u8]) -> bool {
    json.iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        .is_some_and(|b| *b == b'{')
}

/// Decodes a request body that must be a JSON object into `T` (400 MALFORMED_JSON otherwise).
pub fn decode_object<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if !is_object(body) {
        return Err(not_an_object());
    }
    serde_json::from_slice(body).map_err(|e| ApiError::MalformedJson(e.to_string()))
}

/// The answer for a body or batch item that is not a JSON object.
pub fn not_an_object() -> ApiError {
    ApiError::MalformedJson("the body must be a JSON object".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_json_object_is_an_object() {
        assert!(is_object(b" \n{\"a\":1}"));
        for not in [&b"[1]"[..], b"\"x\"", b"1", b"null", b"", b"  "] {
            assert!(!is_object(not));
            assert!(decode_object::<serde_json::Value>(not).is_err());
        }
    }
}
