//! `POST /api/v1/invoices`, `GET /api/v1/invoices`, `GET /api/v1/invoices/{id}`,
//! `POST /api/v1/invoices/{id}/void` and `GET /api/v1/invoices/{id}/document` (SPEC §6).
//!
//! ```text
//!  POST {customer_id, period_start, period_end}
//!     ─► a calendar month, UTC (`…T23:59:59.999Z` is the instant that follows, SPEC §12), else 422
//!     ─► store::invoices::issue, one transaction:
//!          not registered ─► 404 · ended neither by the clock nor the watermark ─► 409 PERIOD_NOT_ENDED
//!          already issued (checked under the customer's lock; the unique index is the last guard)
//!                         ─► 409 INVOICE_ALREADY_EXISTS
//!          a line in another currency ─► 409 CURRENCY_MISMATCH
//!     ─► 201 the invoice: gapless number, lines rounded once, top-ups, adjustments, totals
//!  void  ─► status void (the period is free again); voiding a void invoice changes nothing ─► 200
//!  document ─► meterflow_documents: text/html, or application/pdf with ?format=pdf
//! ```
//!
//! Length: the five invoice routes share the period checks, the numbering and the line rounding;
//! splitting them would pass those back and forth between files.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use meterflow_model::json::decimal_number;
use meterflow_model::{Adjustment, FieldError, InvoiceError, InvoiceLine, InvoiceStatus, LineKind};
use meterflow_store::customers;
use meterflow_store::invoices::{self as sink, InvoiceFilter, IssueError, Period, StoredInvoice};
use serde::{Deserialize, Serialize};

use crate::audit::{Audit, IdFrom};
use crate::auth::Scope;
use crate::error::ApiError;
use crate::extract::{body_error, decode_object, limited, JsonObject};
use crate::openapi::{
    body, ok, op, optional_body, page, params, path_param, problem, schema, Access, Route, Verb,
};
use crate::page::{Cursor, Page};
use crate::time::{exclusive_end, parse_rfc3339};
use crate::AppState;
use axum::routing::on;
use meterflow_store::audit::Entity;
use meterflow_store::owners::Owned;
use serde_json::json;

/// The largest body of a POST.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// An invoice to issue: one customer's calendar month.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewInvoice {
    #[schema(required = true, value_type = String)]
    customer_id: Option<String>,
    /// RFC 3339, a month's start (alias billing_period_start).
    #[serde(alias = "billing_period_start")]
    #[schema(required = true, value_type = String)]
    period_start: Option<String>,
    /// RFC 3339, that month's end (alias billing_period_end).
    #[serde(alias = "billing_period_end")]
    #[schema(required = true, value_type = String)]
    period_end: Option<String>,
}

/// An invoice as the API shows it: decimals as exact JSON numbers, instants in RFC 3339 UTC.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Invoice)]
pub struct InvoiceView {
    invoice_id: String,
    number: i64,
    customer_id: String,
    billing_period_start: DateTime<Utc>,
    billing_period_end: DateTime<Utc>,
    status: InvoiceStatus,
    currency: String,
    line_items: Vec<LineView>,
    adjustments: Vec<AdjustmentView>,
    #[schema(value_type = meterflow_model::openapi::Decimal)]
    subtotal: serde_json::Number,
    #[schema(value_type = meterflow_model::openapi::Decimal)]
    total: serde_json::Number,
    issued_at: DateTime<Utc>,
    #[schema(required = true)]
    voided_at: Option<DateTime<Utc>>,
    #[schema(required = true)]
    void_reason: Option<String>,
}

/// One line of an invoice: a meter's usage under one price book, or a minimum's top-up.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Line)]
pub struct LineView {
    meter: String,
    /// The dimension values the line bills; `{}` for a meter without `group_by`.
    #[schema(value_type = Object)]
    dimensions: meterflow_model::Dimensions,
    kind: LineKind,
    description: String,
    #[schema(value_type = meterflow_model::openapi::Decimal)]
    quantity: serde_json::Number,
    unit_price_summary: String,
    #[schema(value_type = meterflow_model::openapi::Decimal)]
    amount: serde_json::Number,
    price_book_id: String,
}

impl From<InvoiceLine> for LineView {
    fn from(l: InvoiceLine) -> Self {
        LineView {
            quantity: decimal_number(&l.quantity),
            amount: decimal_number(&l.amount),
            meter: l.meter,
            dimensions: l.dimensions,
            kind: l.kind,
            description: l.description,
            unit_price_summary: l.unit_price_summary,
            price_book_id: l.price_book_id,
        }
    }
}

/// A correction of an earlier invoice's line, billed on this one.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Adjustment)]
pub struct AdjustmentView {
    original_invoice_id: String,
    /// The period of the corrected line.
    period_start: DateTime<Utc>,
    meter: String,
    /// The dimension values of the corrected line.
    #[schema(value_type = Object)]
    dimensions: meterflow_model::Dimensions,
    price_book_id: String,
    #[schema(value_type = meterflow_model::openapi::Decimal)]
    amount: serde_json::Number,
    reason: String,
}

impl From<Adjustment> for AdjustmentView {
    fn from(a: Adjustment) -> Self {
        AdjustmentView {
            period_start: seconds(a.period_start),
            amount: decimal_number(&a.amount),
            original_invoice_id: a.original_invoice_id,
            meter: a.meter,
            dimensions: a.dimensions,
            price_book_id: a.price_book_id,
            reason: a.reason,
        }
    }
}

fn seconds(s: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(s, 0).unwrap_or_default()
}

impl From<StoredInvoice> for InvoiceView {
    fn from(s: StoredInvoice) -> Self {
        let i = s.invoice;
        InvoiceView {
            invoice_id: i.invoice_id,
            number: i.number,
            customer_id: i.customer_id,
            billing_period_start: seconds(i.billing_period_start),
            billing_period_end: seconds(i.billing_period_end),
            status: i.status,
            currency: i.currency,
            line_items: i.line_items.into_iter().map(LineView::from).collect(),
            adjustments: i
                .adjustments
                .into_iter()
                .map(AdjustmentView::from)
                .collect(),
            subtotal: decimal_number(&i.subtotal),
            total: decimal_number(&i.total),
            issued_at: DateTime::from_timestamp_micros(i.issued_at).unwrap_or_default(),
            voided_at: s.voided_at,
            void_reason: s.void_reason,
        }
    }
}

/// How an issue's failure is answered.
pub(crate) fn issue_error(e: IssueError) -> ApiError {
    match e {
        IssueError::UnknownCustomer(_) => ApiError::NotFound,
        IssueError::AlreadyExists { .. } => {
            ApiError::Conflict("INVOICE_ALREADY_EXISTS", e.to_string())
        }
        IssueError::PeriodNotEnded { .. } => ApiError::Conflict("PERIOD_NOT_ENDED", e.to_string()),
        IssueError::Invoice(InvoiceError::CurrencyMismatch { .. }) => {
            ApiError::Conflict("CURRENCY_MISMATCH", e.to_string())
        }
        IssueError::Invoice(InvoiceError::Quarantined { .. }) => {
            ApiError::Conflict("PERIOD_QUARANTINED", e.to_string())
        }
        IssueError::Invoice(InvoiceError::Overflow(_)) => ApiError::Conflict(
            "AMOUNT_OVERFLOW",
            "an amount of the invoice overflowed the 96-bit decimal range".into(),
        ),
        IssueError::Database(e) => e.into(),
    }
}

pub async fn issue(
    State(state): State<AppState>,
    caller: crate::auth::Caller,
    JsonObject(raw): JsonObject<NewInvoice>,
) -> Result<impl IntoResponse, ApiError> {
    let (customer_id, period) = resolve(raw).map_err(ApiError::Validation)?;
    caller.may_act_for(&customer_id)?;
    let mut conn = state.pool.acquire().await?;
    let invoice = sink::issue(&mut conn, &customer_id, period, &state.topic, Utc::now())
        .await
        .map_err(issue_error)?;
    let location = format!("/api/v1/invoices/{}", invoice.invoice_id);
    let view = InvoiceView::from(StoredInvoice {
        invoice,
        voided_at: None,
        void_reason: None,
    });
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(view),
    ))
}

/// The customer and a calendar-month period, or every bad field.
fn resolve(raw: NewInvoice) -> Result<(String, Period), Vec<FieldError>> {
    let mut errors = Vec::new();
    let mut instant = |field: &str, text: Option<&str>| match text.map(parse_rfc3339) {
        None => {
            errors.push(FieldError::new(field, "is required"));
            None
        }
        Some(None) => {
            errors.push(FieldError::new(
                field,
                "must be an RFC 3339 timestamp with an offset, such as 2024-01-01T00:00:00Z",
            ));
            None
        }
        Some(Some(t)) => Some(t),
    };
    let start = instant("period_start", raw.period_start.as_deref());
    let end = instant("period_end", raw.period_end.as_deref()).map(exclusive_end);
    let customer_id = raw.customer_id.filter(|c| !c.is_empty());
    if customer_id.is_none() {
        errors.push(FieldError::new("customer_id", "is required"));
    }
    let period = match (start, end) {
        (Some(start), Some(end)) => match Period::from_bounds(start, end) {
            Ok(p) => Some(p),
            Err(e @ sink::PeriodError::Start) => {
                errors.push(FieldError::new("period_start", e.to_string()));
                None
            }
            Err(e) => {
                errors.push(FieldError::new("period_end", e.to_string()));
                None
            }
        },
        _ => None,
    };
    match (customer_id, period) {
        (Some(c), Some(p)) if errors.is_empty() => Ok((c, p)),
        _ => Err(errors),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct InvoiceQuery {
    /// Only this customer's.
    customer_id: Option<String>,
    /// Invoices whose period starts at or after this instant.
    #[serde(alias = "period_start")]
    from: Option<DateTime<Utc>>,
    /// Invoices whose period starts before this instant (`…T23:59:59.999Z` is the instant that follows).
    #[serde(alias = "period_end")]
    to: Option<DateTime<Utc>>,
    /// Only invoices in this status.
    status: Option<InvoiceStatus>,
    /// Page size.
    #[param(minimum = 1, maximum = 1000, default = 100)]
    limit: Option<i64>,
    /// The `next_cursor` of the previous page (opaque).
    cursor: Option<String>,
}

/// Invoices in number (issue) order, a page at a time, with their lines and adjustments.
pub async fn list(
    State(state): State<AppState>,
    caller: crate::auth::Caller,
    query: Result<Query<InvoiceQuery>, QueryRejection>,
) -> Result<Json<Page<InvoiceView>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    // A bound key's list is its own customer's: another one asked for is 404.
    let customer = caller.narrow(q.customer_id.clone())?;
    let limit = crate::page::limit(q.limit)?;
    let after_number = match q.cursor.as_deref().map(Cursor::decode).transpose()? {
        Some(c) => Some(
            c.0.parse::<i64>()
                .map_err(|_| ApiError::BadRequest("cursor is not one this API returned".into()))?,
        ),
        None => None,
    };
    let filter = InvoiceFilter {
        customer_id: customer.as_deref(),
        from: q.from,
        to: q.to.map(exclusive_end),
        status: q.status,
        after_number,
        limit: limit + 1,
    };
    let mut conn = state.pool.acquire().await?;
    let data = sink::list_invoices(&mut conn, &filter)
        .await?
        .into_iter()
        .map(InvoiceView::from)
        .collect();
    Ok(Json(Page::from_overfetched(data, limit, |i| {
        Cursor::of(i.number.to_string(), String::new(), DateTime::UNIX_EPOCH).encode()
    })))
}

pub async fn get_one(
    State(state): State<AppState>,
    Path(invoice_id): Path<String>,
) -> Result<Json<InvoiceView>, ApiError> {
    let mut conn = state.pool.acquire().await?;
    let stored = sink::get_invoice(&mut conn, &invoice_id)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(stored.into()))
}

/// Why an invoice is voided; the body is optional.
#[derive(Default, Deserialize, utoipa::ToSchema)]
#[schema(as = InvoiceVoid)]
#[serde(deny_unknown_fields)]
pub(crate) struct VoidRequest {
    #[schema(max_length = 1000)]
    reason: Option<String>,
}

/// Voids an invoice; the body (`{"reason": …}`) is optional.
pub async fn void(
    State(state): State<AppState>,
    Path(invoice_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<InvoiceView>, ApiError> {
    let body = body.map_err(|e| body_error(e, MAX_BODY_BYTES))?;
    let request: VoidRequest = if body.iter().all(u8::is_ascii_whitespace) {
        VoidRequest::default()
    } else {
        decode_object(&body)?
    };
    if request
        .reason
        .as_ref()
        .is_some_and(|r| r.chars().count() > 1000)
    {
        return Err(ApiError::Validation(vec![FieldError::new(
            "reason",
            "must be at most 1000 characters",
        )]));
    }
    let mut conn = state.pool.acquire().await?;
    let stored = sink::void_invoice(
        &mut conn,
        &invoice_id,
        request.reason.as_deref(),
        Utc::now(),
    )
    .await?
    .ok_or(ApiError::NotFound)?;
    Ok(Json(stored.into()))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DocumentQuery {
    /// `html` (default) or `pdf`.
    #[param(pattern = "^(html|pdf)$")]
    format: Option<String>,
}

/// The printable invoice: self-contained HTML, or a PDF with `?format=pdf`.
pub async fn document(
    State(state): State<AppState>,
    Path(invoice_id): Path<String>,
    query: Result<Query<DocumentQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let pdf = match q.format.as_deref() {
        None | Some("html") => false,
        Some("pdf") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "format must be html or pdf, not {other}"
            )))
        }
    };
    let mut conn = state.pool.acquire().await?;
    let stored = sink::get_invoice(&mut conn, &invoice_id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let customer = customers::get_customer(&mut conn, &stored.invoice.customer_id)
        .await?
        .ok_or_else(|| ApiError::Internal(format!("invoice {invoice_id} has no customer")))?
        .customer;
    drop(conn);
    let invoice = stored.invoice;
    if pdf {
        let bytes = meterflow_documents::render_pdf(&invoice, &customer);
        let disposition = format!("inline; filename=\"invoice-{}.pdf\"", invoice.number);
        Ok((
            [
                (header::CONTENT_TYPE, "application/pdf".to_owned()),
                (header::CONTENT_DISPOSITION, disposition),
            ],
            bytes,
        )
            .into_response())
    } else {
        let html = meterflow_documents::render_html(&invoice, &customer);
        Ok(([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response())
    }
}

/// This module's routes: each row routes its handler and documents it, with the role it needs
/// ([`Route`]).
pub(crate) const ROUTES: &[Route] = &[
    Route {
        verb: Verb::Post,
        path: "/api/v1/invoices",
        access: Access::Admin,
        scope: Scope::Body,
        audit: Some(Audit {
            action: "invoice.issue",
            entity: "invoice",
            snapshot: Entity::Invoice,
            id: IdFrom::Body("invoice_id"),
        }),
        idempotent: true,
        summary: "Issue a customer's invoice for an ended calendar month",
        handler: |m, _| limited(on(m, issue), MAX_BODY_BYTES),
        spec: || {
            op(
                vec![],
                Some(body(
                    schema::<NewInvoice>(),
                    json!({"customer_id": "cust_openapi", "period_start": "2024-01-01T00:00:00Z",
                           "period_end": "2024-01-31T23:59:59.999Z"}),
                )),
                vec![
                    (201, ok("Issued", schema::<InvoiceView>())),
                    (400, problem("MALFORMED_JSON")),
                    (404, problem("NOT_FOUND: the customer is not registered")),
                    (
                        409,
                        problem("INVOICE_ALREADY_EXISTS, PERIOD_NOT_ENDED, PERIOD_QUARANTINED, CURRENCY_MISMATCH or AMOUNT_OVERFLOW"),
                    ),
                    (413, problem("PAYLOAD_TOO_LARGE")),
                    (422, problem("VALIDATION_FAILED")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Get,
        path: "/api/v1/invoices",
        access: Access::Read,
        scope: Scope::List,
        audit: None,
        idempotent: false,
        summary: "Invoices in number order, with their lines and adjustments",
        handler: |m, _| on(m, list),
        spec: || {
            op(
                params::<InvoiceQuery>(),
                None,
                vec![
                    (200, ok("A page of invoices", page::<InvoiceView>())),
                    (400, problem("BAD_REQUEST: a bad filter, limit or cursor")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Get,
        path: "/api/v1/invoices/{invoice_id}",
        access: Access::Read,
        scope: Scope::Owned(Owned::Invoice, "invoice_id"),
        audit: None,
        idempotent: false,
        summary: "One invoice",
        handler: |m, _| on(m, get_one),
        spec: || {
            op(
                vec![path_param("invoice_id")],
                None,
                vec![
                    (200, ok("The invoice", schema::<InvoiceView>())),
                    (404, problem("NOT_FOUND")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Post,
        path: "/api/v1/invoices/{invoice_id}/void",
        access: Access::Admin,
        scope: Scope::Owned(Owned::Invoice, "invoice_id"),
        audit: Some(Audit {
            action: "invoice.void",
            entity: "invoice",
            snapshot: Entity::Invoice,
            id: IdFrom::Path("invoice_id"),
        }),
        idempotent: false,
        summary: "Void an invoice (the body is optional)",
        handler: |m, _| limited(on(m, void), MAX_BODY_BYTES),
        spec: || {
            op(
                vec![path_param("invoice_id")],
                Some(optional_body(
                    schema::<VoidRequest>(),
                    json!({"reason": "issued in error"}),
                )),
                vec![
                    (200, ok("The voided invoice", schema::<InvoiceView>())),
                    (400, problem("MALFORMED_JSON")),
                    (404, problem("NOT_FOUND")),
                    (413, problem("PAYLOAD_TOO_LARGE")),
                    (422, problem("VALIDATION_FAILED")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Get,
        path: "/api/v1/invoices/{invoice_id}/document",
        access: Access::Read,
        scope: Scope::Owned(Owned::Invoice, "invoice_id"),
        audit: None,
        idempotent: false,
        summary: "The printable invoice: HTML, or PDF with format=pdf",
        handler: |m, _| on(m, document),
        spec: || {
            let binary = json!({"type": "string", "format": "binary"});
            op(
                vec![path_param("invoice_id")]
                    .into_iter()
                    .chain(params::<DocumentQuery>())
                    .collect(),
                None,
                vec![
                    (
                        200,
                        json!({"description": "The document", "content": {
                            "text/html": {"schema": {"type": "string"}},
                            "application/pdf": {"schema": binary}}}),
                    ),
                    (400, problem("BAD_REQUEST: an unknown format")),
                    (404, problem("NOT_FOUND")),
                ],
            )
        },
    },
];

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn resolved(v: serde_json::Value) -> Result<(String, Period), Vec<String>> {
        let raw: NewInvoice = serde_json::from_value(v).unwrap();
        resolve(raw).map_err(|e| e.into_iter().map(|e| e.field).collect())
    }

    #[test]
    fn the_seeds_inclusive_end_means_the_next_months_start() {
        let (customer, period) = resolved(json!({"customer_id": "cust_123",
            "period_start": "2024-01-01T00:00:00Z", "period_end": "2024-01-31T23:59:59.999Z"}))
        .unwrap();
        assert_eq!(customer, "cust_123");
        assert_eq!(period.month(), "2024-01");
        assert_eq!(period.end, parse_rfc3339("2024-02-01T00:00:00Z").unwrap());
        assert!(resolved(json!({"customer_id": "c",
            "period_start": "2024-01-01T00:00:00Z", "period_end": "2024-02-01T00:00:00Z"}))
        .is_ok());
    }

    #[test]
    fn a_period_must_be_one_calendar_month() {
        let bad = |start: &str, end: &str| {
            resolved(json!({"customer_id": "c", "period_start": start, "period_end": end}))
                .unwrap_err()
        };
        assert_eq!(
            bad("2024-01-02T00:00:00Z", "2024-02-01T00:00:00Z"),
            ["period_start"]
        );
        assert_eq!(
            bad("2024-01-01T00:00:00Z", "2024-03-01T00:00:00Z"),
            ["period_end"]
        );
        assert_eq!(
            bad("2024-01-01T00:00:00Z", "2024-01-31T23:59:59Z"),
            ["period_end"]
        );
        assert_eq!(bad("January", "2024-02-01"), ["period_start", "period_end"]);
        assert_eq!(
            resolved(json!({})).unwrap_err(),
            ["period_start", "period_end", "customer_id"]
        );
    }
}
