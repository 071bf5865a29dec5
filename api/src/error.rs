//! One error type for the whole API, one `match` to a status, rendered as RFC 9457 problem+json with a
//! stable `code` (SPEC §8). Details never carry SQL or stack traces: those go to the log.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use meterflow_model::FieldError;
use serde::Serialize;

use crate::admission::Refused;

#[derive(Clone, Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the body is not valid JSON of the expected shape: {0}")]
    MalformedJson(String),
    #[error("the request is invalid")]
    Validation(Vec<FieldError>),
    #[error("an event with id {0} was already accepted")]
    DuplicateEvent(String),
    #[error("the body is larger than the limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error("send the body as application/json")]
    UnsupportedMediaType,
    #[error("{0}")]
    BadRequest(String),
    #[error("not found")]
    NotFound,
    /// A conflict with a stable code of its own and a message saying what to do.
    #[error("{1}")]
    Conflict(&'static str, String),
    #[error("{0} is unavailable; retry shortly")]
    Unavailable(&'static str),
    /// Refused by admission control: the API is past what it can serve now (admission.rs).
    #[error("{}", .0.detail())]
    Overloaded(Overload),
    /// No Postgres connection came free within the pool's wait (`api.pool_acquire_timeout_ms`): the
    /// database is busy or away.
    #[error(
        "no database connection came free in time (the database is busy or away); retry shortly"
    )]
    PoolTimedOut,
    /// Not answered within the request timeout (`api.request_timeout_secs`).
    #[error("the request was not answered within {0} s; retry shortly")]
    Timeout(u64),
    /// No key, or a key that is unknown, malformed or revoked.
    #[error("send a valid API key: Authorization: Bearer <key>")]
    Unauthorized,
    /// The key's role is weaker than the route's.
    #[error("this API key's role ({0}) may not do this; it needs {1}")]
    Forbidden(&'static str, &'static str),
    /// The key's rate limit is spent; retry after this many seconds.
    #[error("too many requests with this API key; retry in {0} s")]
    RateLimited(u64),
    /// An Idempotency-Key reused with another request.
    #[error("this Idempotency-Key was used with another request; use a new key for a new request")]
    IdempotencyKeyReused,
    /// An Idempotency-Key whose first request is still being answered.
    #[error("a request with this Idempotency-Key is still in progress; retry shortly")]
    IdempotencyKeyInProgress,
    #[error("internal error")]
    Internal(String),
}

/// Which bound refused an `OVERLOADED` request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overload {
    /// Too many requests already waiting for a slot.
    InFlight,
    /// No slot came free within the queueing budget.
    QueueTime,
    /// The ingest queue was full.
    IngestQueue,
}

impl Overload {
    fn detail(self) -> &'static str {
        match self {
            Overload::InFlight | Overload::QueueTime => {
                "the API is serving as many requests as it can; retry after the Retry-After delay"
            }
            Overload::IngestQueue => "the ingest queue is full; retry after the Retry-After delay",
        }
    }

    fn refused(self) -> Refused {
        match self {
            Overload::InFlight => Refused::InFlight,
            Overload::QueueTime => Refused::QueueTime,
            Overload::IngestQueue => Refused::IngestQueue,
        }
    }
}

/// RFC 9457 problem details with a stable `code`: DUPLICATE_EVENT, INVOICE_ALREADY_EXISTS,
/// RERATING_IN_PROGRESS, PRICE_BOOK_OVERLAP, PERIOD_NOT_ENDED, VALIDATION_FAILED (with field paths in
/// `errors`), MALFORMED_JSON, PAYLOAD_TOO_LARGE, UNAUTHORIZED, FORBIDDEN, NOT_FOUND, RATE_LIMITED,
/// UNAVAILABLE, and the more specific METER_EXISTS, METER_NAME_COLLIDES, PERIOD_QUARANTINED,
/// CUSTOMER_ALREADY_EXISTS, CURRENCY_LOCKED, CURRENCY_MISMATCH, AMOUNT_OVERFLOW,
/// INVOICE_RUN_IN_PROGRESS, BAD_REQUEST, UNSUPPORTED_MEDIA_TYPE, TIMEOUT.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Problem)]
pub(crate) struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    #[schema(pattern = "^[A-Z][A-Z_]*$")]
    code: &'a str,
    detail: String,
    /// Every invalid field, with its path (`value`, `properties.region`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<FieldError>>)]
    errors: Option<&'a [FieldError]>,
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            ApiError::MalformedJson(_) => {
                (StatusCode::BAD_REQUEST, "MALFORMED_JSON", "Malformed JSON")
            }
            ApiError::Validation(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "VALIDATION_FAILED",
                "Validation failed",
            ),
            ApiError::DuplicateEvent(_) => {
                (StatusCode::CONFLICT, "DUPLICATE_EVENT", "Duplicate event")
            }
            ApiError::PayloadTooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "PAYLOAD_TOO_LARGE",
                "Payload too large",
            ),
            ApiError::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UNSUPPORTED_MEDIA_TYPE",
                "Unsupported media type",
            ),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "BAD_REQUEST", "Bad request"),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "NOT_FOUND", "Not found"),
            ApiError::Conflict(code, _) => (StatusCode::CONFLICT, code, "Conflict"),
            ApiError::Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "Service unavailable",
            ),
            ApiError::Overloaded(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "OVERLOADED", "Overloaded")
            }
            ApiError::PoolTimedOut => (
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "Service unavailable",
            ),
            ApiError::Timeout(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "TIMEOUT",
                "Request timeout",
            ),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "Unauthorized"),
            ApiError::Forbidden(..) => (StatusCode::FORBIDDEN, "FORBIDDEN", "Forbidden"),
            ApiError::RateLimited(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "RATE_LIMITED",
                "Rate limited",
            ),
            ApiError::IdempotencyKeyReused => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "IDEMPOTENCY_KEY_REUSED",
                "Idempotency-Key reused",
            ),
            ApiError::IdempotencyKeyInProgress => (
                StatusCode::CONFLICT,
                "IDEMPOTENCY_KEY_IN_PROGRESS",
                "Idempotency-Key in progress",
            ),
            ApiError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "INTERNAL",
                "Internal error",
            ),
        }
    }
}

impl ApiError {
    /// Which bound gave way, if this is a refusal (admission.rs; `api_refused_total{reason}`).
    pub fn refused(&self) -> Option<Refused> {
        match self {
            ApiError::Overloaded(overload) => Some(overload.refused()),
            ApiError::PoolTimedOut => Some(Refused::DbPool),
            ApiError::RateLimited(_) => Some(Refused::RateLimit),
            ApiError::Timeout(_) => Some(Refused::RequestTimeout),
            _ => None,
        }
    }

    /// The status and the problem document, for a response or an item of a batch result.
    pub fn to_problem(&self) -> (StatusCode, serde_json::Value) {
        let (status, code, title) = self.parts();
        if let ApiError::Internal(detail) = &self {
            tracing::error!(%detail, "internal error");
        }
        let errors = match &self {
            ApiError::Validation(errors) => Some(errors.as_slice()),
            _ => None,
        };
        let detail = match &self {
            ApiError::Validation(errors) => errors
                .iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect::<Vec<_>>()
                .join("; "),
            other => other.to_string(),
        };
        let problem = Problem {
            kind: format!(
                "https://meterflow.dev/problems/{}",
                code.to_ascii_lowercase().replace('_', "-")
            ),
            title,
            status: status.as_u16(),
            code,
            detail,
            errors,
        };
        (status, serde_json::to_value(&problem).unwrap_or_default())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, problem) = self.to_problem();
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        match &self {
            ApiError::Unauthorized => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"meterflow\""),
                );
            }
            ApiError::RateLimited(seconds) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from((*seconds).max(1)));
            }
            _ => {}
        }
        // For `api_refused_total{reason}` (metrics.rs).
        if let Some(refused) = self.refused() {
            response.extensions_mut().insert(refused);
        }
        response
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut => ApiError::PoolTimedOut,
            sqlx::Error::Io(_)
            | sqlx::Error::PoolClosed
            | sqlx::Error::Protocol(_) => ApiError::Unavailable("the database"),
            sqlx::Error::Database(db)
                if db
                    .code()
                    .is_some_and(|c| ["08", "40", "53", "57"].iter().any(|k| c.starts_with(k))) =>
            {
                ApiError::Unavailable("the database")
            }
            // A value Postgres cannot store as text (U+0000, in text or jsonb) is the request's fault;
            // handlers refuse it by field first, this is the net for the rest.
            sqlx::Error::Database(db)
                if matches!(db.code().as_deref(), Some("22021" | "22P05")) =>
            {
                ApiError::Validation(vec![FieldError::new(
                    "",
                    "text must not contain NUL (U+0000) characters",
                )])
            }
            // The bound on distinct event types per customer (migration 0013, review finding 21).
            sqlx::Error::Database(db) if db.code().as_deref() == Some("22M01") => {
                ApiError::Validation(vec![FieldError::new(
                    "event_type",
                    "this customer already has 1000 distinct event types; define meters over fewer types",
                )])
            }
            // Any other data exception (class 22: a lone surrogate escape in JSON, a number out of
            // range…) is the request's data too; the database's message stays in the log.
            sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("22")) => {
                tracing::info!(error = %e, "the database refused a request's value");
                ApiError::Validation(vec![FieldError::new(
                    "",
                    "a value cannot be stored (invalid text, JSON or number)",
                )])
            }
            _ => ApiError::Internal(e.to_string()),
        }
    }
}
