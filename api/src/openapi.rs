//! The route table and the OpenAPI 3 document built from it (SPEC §8).
//!
//! ```text
//!  ROUTES: method + path + role + handler + parameters/body/responses
//!     ├──► router()    every row routed (the method comes from the row, not from the handler)
//!     └──► document()  every row documented, served at GET /api/v1/openapi.json (no auth)
//! ```
//! Routing and documentation read the same rows, so a route cannot exist undocumented or a documented
//! operation unrouted; `tests/openapi.rs` checks both against the live server, and Schemathesis
//! (`deploy/local/schemathesis`) checks that the answers conform to the schemas.
//!
//! The schemas are derived (utoipa's `ToSchema` and `IntoParams`) from the types the handlers read and
//! write, with their doc comments as descriptions; an operation names them by type ([`schema`],
//! [`page`], [`params`]), and the document's components are exactly the schemas its operations reach.
//! A decimal is a JSON number or string in requests, a JSON number with its exact digits in responses
//! (`meterflow_model::openapi`). The table, not `#[utoipa::path]` on each handler, holds the rest of an
//! operation (method, path, role, statuses): one row routes and documents it, so the two cannot differ.
// The document is built from constants (the route table), not from requests: indexing a JSON value or
// expecting an entry here can only fail on a bug every test finds.
#![allow(clippy::indexing_slicing, clippy::expect_used)]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use axum::extract::DefaultBodyLimit;
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use utoipa::openapi::path::ParameterIn;
use utoipa::openapi::{RefOr, Schema};
use utoipa::{IntoParams, PartialSchema, ToSchema};

use crate::page::Page;
use crate::{
    aggregations, charges, customers, dead_letters, events, invoice_runs, invoices, meters,
    price_books, progress, rerating, AppState, Settings,
};

/// An HTTP method of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Get,
    Post,
    Patch,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::Post => "post",
            Verb::Patch => "patch",
        }
    }

    fn method(self) -> axum::http::Method {
        match self {
            Verb::Get => axum::http::Method::GET,
            Verb::Post => axum::http::Method::POST,
            Verb::Patch => axum::http::Method::PATCH,
        }
    }

    fn filter(self) -> MethodFilter {
        match self {
            Verb::Get => MethodFilter::GET,
            Verb::Post => MethodFilter::POST,
            Verb::Patch => MethodFilter::PATCH,
        }
    }
}

/// Who may call a route: no key, or a key of at least this role (`ingest` < `read` < `admin`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    Public,
    Ingest,
    Read,
    Admin,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Public => "public",
            Access::Ingest => "ingest",
            Access::Read => "read",
            Access::Admin => "admin",
        }
    }
}

/// One operation: routed by [`router`], documented by [`document`].
pub struct Route {
    pub verb: Verb,
    /// The full path, `{name}` for a parameter (axum's syntax and OpenAPI's agree).
    pub path: &'static str,
    pub access: Access,
    pub summary: &'static str,
    /// The handler, routed for the given method (with its body limit, if any).
    pub handler: fn(MethodFilter, &Settings) -> MethodRouter<AppState>,
    /// The operation's `parameters`, `requestBody` and `responses`; [`document`] adds the responses
    /// every operation shares (auth, rate limit, unavailable).
    pub spec: fn() -> Value,
}

/// The path of the document itself.
pub const DOCUMENT_PATH: &str = "/api/v1/openapi.json";

/// Every route of the API.
pub const ROUTES: &[Route] = &[
    Route {
        verb: Verb::Post,
        path: "/api/v1/events",
        access: Access::Ingest,
        summary: "Ingest one event (plain JSON or CloudEvents structured JSON)",
        handler: |m, s| on(m, events::post_event).layer(DefaultBodyLimit::max(s.max_event_bytes)),
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
                    (201, ok("The event is stored and will be counted once", schema::<events::Accepted>())),
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
        summary: "Ingest up to 1000 events; each item is decided on its own",
        handler: |m, s| on(m, events::post_batch).layer(DefaultBodyLimit::max(s.max_batch_bytes)),
        spec: || {
            op(
                vec![],
                Some(body(
                    json!({"type": "array", "minItems": 1, "maxItems": events::MAX_BATCH_EVENTS,
                           "items": schema::<meterflow_model::event::RawEvent>()}),
                    json!([{"event_id": "evt_0002", "customer_id": "cust_1", "event_type": "api_call",
                            "event_time": "2024-01-15T10:00:00Z", "value": 2}]),
                )),
                vec![
                    (
                        200,
                        ok(
                            "A result per item, in order",
                            schema::<events::BatchResult>(),
                        ),
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
        summary: "Retract a counted event from every aggregate",
        handler: |m, _| on(m, events::void_event),
        spec: || {
            op(
                vec![path_param("event_id")],
                None,
                vec![
                    (200, ok("Already voided", schema::<events::EventVoid>())),
                    (
                        202,
                        ok(
                            "The void is on its way to the pipeline",
                            schema::<events::EventVoid>(),
                        ),
                    ),
                    (404, problem("NOT_FOUND: no such event")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Post,
        path: "/api/v1/meters",
        access: Access::Admin,
        summary: "Define a meter (immutable; posting the same definition again is idempotent)",
        handler: |m, _| on(m, meters::create),
        spec: || {
            op(
                vec![],
                Some(body(
                    schema::<meterflow_model::Meter>(),
                    json!({"meter": "api_calls", "event_type": "api_call", "aggregation": "count",
                           "window": "hour"}),
                )),
                vec![
                    (200, ok("The identical meter exists", schema::<meters::StoredMeter>())),
                    (201, ok("Created", schema::<meters::StoredMeter>())),
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
        summary: "Every meter definition",
        handler: |m, _| on(m, meters::list),
        spec: || {
            op(
                vec![],
                None,
                vec![(200, ok("The meters", page::<meters::StoredMeter>()))],
            )
        },
    },
    Route {
        verb: Verb::Get,
        path: "/api/v1/progress",
        access: Access::Read,
        summary: "How far the pipeline has committed, per partition",
        handler: |m, _| on(m, progress::progress),
        spec: || {
            op(
                vec![],
                None,
                vec![(200, ok("Progress", schema::<progress::Progress>()))],
            )
        },
    },
    Route {
        verb: Verb::Post,
        path: "/api/v1/watermark",
        access: Access::Admin,
        summary: "Raise the watermark floor (closes windows when no later event will come)",
        handler: |m, _| on(m, progress::advance),
        spec: || {
            op(
                vec![],
                Some(body(
                    schema::<progress::AdvanceWatermark>(),
                    json!({"advance_to": "2024-01-01T00:00:00Z"}),
                )),
                vec![
                    (
                        202,
                        ok(
                            "The floor now in force (audited)",
                            schema::<progress::AdvanceWatermark>(),
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
    Route {
        verb: Verb::Get,
        path: "/api/v1/aggregations",
        access: Access::Read,
        summary: "Aggregate rows per customer, meter and window",
        handler: |m, _| on(m, aggregations::list),
        spec: || {
            op(
                params::<aggregations::AggregationQuery>(),
                None,
                vec![
                    (200, ok("A page of aggregates", page::<aggregations::Aggregation>())),
                    (400, problem("BAD_REQUEST: a bad filter, limit or cursor, or more than 10000 event ids asked for")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Get,
        path: "/api/v1/dead-letters",
        access: Access::Read,
        summary: "Kafka records the pipeline could not accept, with the reason",
        handler: |m, _| on(m, dead_letters::list),
        spec: || {
            op(
                params::<dead_letters::DeadLetterQuery>(),
                None,
                vec![
                    (
                        200,
                        ok("A page of dead letters", page::<dead_letters::DeadLetter>()),
                    ),
                    (400, problem("BAD_REQUEST: a bad limit or cursor")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Post,
        path: "/api/v1/price-books",
        access: Access::Admin,
        summary: "Create a price book",
        handler: |m, _| {
            on(m, price_books::create).layer(DefaultBodyLimit::max(price_books::MAX_BODY_BYTES))
        },
        spec: || {
            op(
                vec![],
                Some(body(
                    schema::<price_books::NewPriceBook>(),
                    json!({"meter": "api_calls", "currency": "USD",
                           "effective_from": "2024-01-01T00:00:00Z",
                           "model": {"type": "graduated", "tiers": [
                               {"up_to": 1000, "unit_price": "0"},
                               {"up_to": null, "unit_price": "0.002"}]},
                           "minimum_per_period": "10.00"}),
                )),
                vec![
                    (201, ok("Created", schema::<price_books::PriceBookView>())),
                    (400, problem("MALFORMED_JSON")),
                    (
                        409,
                        problem("PRICE_BOOK_OVERLAP: another book covers part of this one's time"),
                    ),
                    (413, problem("PAYLOAD_TOO_LARGE")),
                    (422, problem("VALIDATION_FAILED")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Get,
        path: "/api/v1/price-books",
        access: Access::Read,
        summary: "Price books in (meter, effective_from) order",
        handler: |m, _| on(m, price_books::list),
        spec: || {
            op(
                params::<price_books::PriceBookQuery>(),
                None,
                vec![
                    (
                        200,
                        ok(
                            "A page of price books",
                            page::<price_books::PriceBookView>(),
                        ),
                    ),
                    (400, problem("BAD_REQUEST: a bad filter, limit or cursor")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Get,
        path: "/api/v1/price-books/{price_book_id}",
        access: Access::Read,
        summary: "One price book",
        handler: |m, _| on(m, price_books::get_one),
        spec: || {
            op(
                vec![path_param("price_book_id")],
                None,
                vec![
                    (
                        200,
                        ok("The price book", schema::<price_books::PriceBookView>()),
                    ),
                    (404, problem("NOT_FOUND")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Patch,
        path: "/api/v1/price-books/{price_book_id}",
        access: Access::Admin,
        summary: "Change a price book's model, minimum or end (audited)",
        handler: |m, _| {
            on(m, price_books::update).layer(DefaultBodyLimit::max(price_books::MAX_BODY_BYTES))
        },
        spec: || {
            op(
                vec![path_param("price_book_id")],
                Some(body(
                    schema::<price_books::PatchFields>(),
                    json!({"minimum_per_period": null}),
                )),
                vec![
                    (
                        200,
                        ok(
                            "The changed price book",
                            schema::<price_books::PriceBookView>(),
                        ),
                    ),
                    (400, problem("MALFORMED_JSON")),
                    (404, problem("NOT_FOUND")),
                    (409, problem("PRICE_BOOK_OVERLAP")),
                    (413, problem("PAYLOAD_TOO_LARGE")),
                    (422, problem("VALIDATION_FAILED")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Get,
        path: "/api/v1/charges",
        access: Access::Read,
        summary: "Window charges, unrounded",
        handler: |m, _| on(m, charges::list),
        spec: || {
            op(
                params::<charges::ChargeQuery>(),
                None,
                vec![
                    (200, ok("A page of charges", page::<charges::Charge>())),
                    (400, problem("BAD_REQUEST: a bad filter, limit or cursor")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Post,
        path: "/api/v1/rerating-jobs",
        access: Access::Admin,
        summary: "Re-rate a scope of customers and time from the raw events",
        handler: |m, _| on(m, rerating::create),
        spec: || {
            op(
                vec![],
                Some(body(
                    schema::<rerating::JobRequest>(),
                    json!({"customer_ids": ["cust_1"], "from": "2024-01-01T00:00:00Z",
                           "to": "2024-01-02T00:00:00Z", "reason": "corrected price book"}),
                )),
                vec![
                    (202, ok("Queued", schema::<rerating::JobAccepted>())),
                    (400, problem("MALFORMED_JSON")),
                    (
                        409,
                        problem("RERATING_IN_PROGRESS: an overlapping job is pending or running"),
                    ),
                    (413, problem("PAYLOAD_TOO_LARGE")),
                    (422, problem("VALIDATION_FAILED")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Get,
        path: "/api/v1/rerating-jobs/{job_id}",
        access: Access::Read,
        summary: "A re-rating job's state and effect",
        handler: |m, _| on(m, rerating::get),
        spec: || {
            op(
                vec![path_param("job_id")],
                None,
                vec![
                    (200, ok("The job", schema::<rerating::ReratingJob>())),
                    (404, problem("NOT_FOUND")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Post,
        path: "/api/v1/customers",
        access: Access::Admin,
        summary: "Register a customer",
        handler: |m, _| {
            on(m, customers::create).layer(DefaultBodyLimit::max(customers::MAX_BODY_BYTES))
        },
        spec: || {
            op(
                vec![],
                Some(body(
                    schema::<customers::NewCustomer>(),
                    json!({"customer_id": "cust_openapi", "name": "Acme", "email": "billing@acme.test",
                           "currency": "EUR"}),
                )),
                vec![
                    (201, ok("Created", schema::<customers::CustomerView>())),
                    (400, problem("MALFORMED_JSON")),
                    (409, problem("CUSTOMER_ALREADY_EXISTS")),
                    (413, problem("PAYLOAD_TOO_LARGE")),
                    (422, problem("VALIDATION_FAILED")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Get,
        path: "/api/v1/customers",
        access: Access::Read,
        summary: "Customers in id order",
        handler: |m, _| on(m, customers::list),
        spec: || {
            op(
                params::<customers::CustomerQuery>(),
                None,
                vec![
                    (
                        200,
                        ok("A page of customers", page::<customers::CustomerView>()),
                    ),
                    (400, problem("BAD_REQUEST: a bad limit or cursor")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Get,
        path: "/api/v1/customers/{customer_id}",
        access: Access::Read,
        summary: "One customer",
        handler: |m, _| on(m, customers::get_one),
        spec: || {
            op(
                vec![path_param("customer_id")],
                None,
                vec![
                    (200, ok("The customer", schema::<customers::CustomerView>())),
                    (404, problem("NOT_FOUND")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Patch,
        path: "/api/v1/customers/{customer_id}",
        access: Access::Admin,
        summary: "Change a customer's name, email, address or currency",
        handler: |m, _| {
            on(m, customers::update).layer(DefaultBodyLimit::max(customers::MAX_BODY_BYTES))
        },
        spec: || {
            op(
                vec![path_param("customer_id")],
                Some(body(
                    schema::<customers::PatchFields>(),
                    json!({"address": null}),
                )),
                vec![
                    (
                        200,
                        ok("The changed customer", schema::<customers::CustomerView>()),
                    ),
                    (400, problem("MALFORMED_JSON")),
                    (404, problem("NOT_FOUND")),
                    (
                        409,
                        problem("CURRENCY_LOCKED: an invoice was issued in the old currency"),
                    ),
                    (413, problem("PAYLOAD_TOO_LARGE")),
                    (422, problem("VALIDATION_FAILED")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Get,
        path: "/api/v1/customers/{customer_id}/upcoming-invoice",
        access: Access::Read,
        summary: "What issuing the period now would bill",
        handler: |m, _| on(m, customers::upcoming),
        spec: || {
            op(
                vec![path_param("customer_id")]
                    .into_iter()
                    .chain(params::<customers::UpcomingQuery>())
                    .collect(),
                None,
                vec![
                    (
                        200,
                        ok("The upcoming invoice", schema::<customers::UpcomingView>()),
                    ),
                    (400, problem("BAD_REQUEST")),
                    (409, problem("CURRENCY_MISMATCH or AMOUNT_OVERFLOW")),
                    (422, problem("VALIDATION_FAILED: a bad period")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Post,
        path: "/api/v1/invoices",
        access: Access::Admin,
        summary: "Issue a customer's invoice for an ended calendar month",
        handler: |m, _| {
            on(m, invoices::issue).layer(DefaultBodyLimit::max(invoices::MAX_BODY_BYTES))
        },
        spec: || {
            op(
                vec![],
                Some(body(
                    schema::<invoices::NewInvoice>(),
                    json!({"customer_id": "cust_openapi", "period_start": "2024-01-01T00:00:00Z",
                           "period_end": "2024-01-31T23:59:59.999Z"}),
                )),
                vec![
                    (201, ok("Issued", schema::<invoices::InvoiceView>())),
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
        summary: "Invoices in number order, with their lines and adjustments",
        handler: |m, _| on(m, invoices::list),
        spec: || {
            op(
                params::<invoices::InvoiceQuery>(),
                None,
                vec![
                    (
                        200,
                        ok("A page of invoices", page::<invoices::InvoiceView>()),
                    ),
                    (400, problem("BAD_REQUEST: a bad filter, limit or cursor")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Get,
        path: "/api/v1/invoices/{invoice_id}",
        access: Access::Read,
        summary: "One invoice",
        handler: |m, _| on(m, invoices::get_one),
        spec: || {
            op(
                vec![path_param("invoice_id")],
                None,
                vec![
                    (200, ok("The invoice", schema::<invoices::InvoiceView>())),
                    (404, problem("NOT_FOUND")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Post,
        path: "/api/v1/invoices/{invoice_id}/void",
        access: Access::Admin,
        summary: "Void an invoice (the body is optional)",
        handler: |m, _| {
            on(m, invoices::void).layer(DefaultBodyLimit::max(invoices::MAX_BODY_BYTES))
        },
        spec: || {
            let mut body = body(
                schema::<invoices::VoidRequest>(),
                json!({"reason": "issued in error"}),
            );
            body["required"] = json!(false);
            op(
                vec![path_param("invoice_id")],
                Some(body),
                vec![
                    (
                        200,
                        ok("The voided invoice", schema::<invoices::InvoiceView>()),
                    ),
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
        summary: "The printable invoice: HTML, or PDF with format=pdf",
        handler: |m, _| on(m, invoices::document),
        spec: || {
            let binary = json!({"type": "string", "format": "binary"});
            op(
                vec![path_param("invoice_id")]
                    .into_iter()
                    .chain(params::<invoices::DocumentQuery>())
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
    Route {
        verb: Verb::Post,
        path: "/api/v1/invoice-runs",
        access: Access::Admin,
        summary: "Invoice every registered customer for an ended month, in the background",
        handler: |m, _| {
            on(m, invoice_runs::create).layer(DefaultBodyLimit::max(invoices::MAX_BODY_BYTES))
        },
        spec: || {
            op(
                vec![],
                Some(body(
                    schema::<invoice_runs::NewRun>(),
                    json!({"period": "2024-01"}),
                )),
                vec![
                    (
                        202,
                        ok("Started", schema::<invoice_runs::InvoiceRunAccepted>()),
                    ),
                    (400, problem("MALFORMED_JSON")),
                    (409, problem("PERIOD_NOT_ENDED or INVOICE_RUN_IN_PROGRESS")),
                    (413, problem("PAYLOAD_TOO_LARGE")),
                    (422, problem("VALIDATION_FAILED")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Get,
        path: "/api/v1/invoice-runs/{run_id}",
        access: Access::Read,
        summary: "An invoice run's progress",
        handler: |m, _| on(m, invoice_runs::get_one),
        spec: || {
            op(
                vec![path_param("run_id")],
                None,
                vec![
                    (200, ok("The run", schema::<invoice_runs::RunView>())),
                    (404, problem("NOT_FOUND")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Get,
        path: DOCUMENT_PATH,
        access: Access::Public,
        summary: "This document",
        handler: |m, _| on(m, serve_document),
        spec: || {
            op(
                vec![],
                None,
                vec![(200, ok("The OpenAPI document", json!({"type": "object"})))],
            )
        },
    },
    Route {
        verb: Verb::Get,
        path: "/healthz",
        access: Access::Public,
        summary: "Liveness: the process answers",
        handler: |m, _| on(m, crate::healthz),
        spec: || {
            op(
                vec![],
                None,
                vec![(200, ok("Alive", schema::<crate::Health>()))],
            )
        },
    },
    Route {
        verb: Verb::Get,
        path: "/readyz",
        access: Access::Public,
        summary: "Readiness: Postgres answers and Kafka has the topic",
        handler: |m, _| on(m, crate::readyz),
        spec: || {
            op(
                vec![],
                None,
                vec![
                    (200, ok("Ready", schema::<crate::Ready>())),
                    (
                        503,
                        ok(
                            "Not ready (see which dependency is down)",
                            schema::<crate::Ready>(),
                        ),
                    ),
                ],
            )
        },
    },
    Route {
        verb: Verb::Get,
        path: "/metrics",
        access: Access::Public,
        summary: "Prometheus metrics (text exposition format)",
        handler: |m, _| on(m, crate::metrics_text),
        spec: || {
            op(
                vec![],
                None,
                vec![(
                    200,
                    json!({"description": "The metrics",
                           "content": {"text/plain": {"schema": {"type": "string"}}}}),
                )],
            )
        },
    },
];

/// A router with every row of [`ROUTES`]. The routes that replay an `Idempotency-Key` or are audited
/// get those middlewares (innermost first: auditing, inside replaying a stored response); the others,
/// `POST /api/v1/events` among them, do not pay for two layers that would only pass them on.
pub fn router(state: &AppState) -> Router<AppState> {
    ROUTES.iter().fold(Router::new(), |router, route| {
        let mut methods = (route.handler)(route.verb.filter(), &state.settings);
        let method = route.verb.method();
        let path = route.path.strip_prefix("/api/v1").unwrap_or(route.path);
        if crate::audit::is_audited(&method, path) {
            methods = methods.route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                crate::audit::record_changes,
            ));
        }
        if crate::idempotency::honoured(&method, path) {
            methods = methods.route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                crate::idempotency::replay,
            ));
        }
        router.route(route.path, methods)
    })
}

/// The role a route needs, if `method` and the matched `path` (axum's `MatchedPath`) name one.
pub fn access(method: &axum::http::Method, path: &str) -> Option<Access> {
    ROUTES
        .iter()
        .find(|r| r.path == path && r.verb.as_str().eq_ignore_ascii_case(method.as_str()))
        .map(|r| r.access)
}

async fn serve_document() -> Json<Value> {
    static DOCUMENT: OnceLock<Value> = OnceLock::new();
    Json(DOCUMENT.get_or_init(document).clone())
}

/// The OpenAPI 3.1 document of [`ROUTES`].
pub fn document() -> Value {
    let mut paths = Map::new();
    for route in ROUTES {
        let mut operation = (route.spec)();
        let id = format!(
            "{}{}",
            route.verb.as_str(),
            route
                .path
                .trim_start_matches("/api/v1")
                .split(['/', '-', '{', '}'])
                .filter(|s| !s.is_empty())
                .map(|s| format!("_{s}"))
                .collect::<String>()
        );
        operation["operationId"] = json!(id);
        operation["summary"] = json!(route.summary);
        operation["tags"] = json!([tag(route.path)]);
        operation["x-required-role"] = json!(route.access.as_str());
        // Health, readiness and metrics are never refused by admission control (admission.rs); every
        // other route may be.
        let mut shared = Vec::new();
        if !crate::admission::EXEMPT.contains(&route.path) {
            shared.push((
                "503",
                "OVERLOADED (admission control: too many requests in flight, or the ingest queue is \
                 full), UNAVAILABLE (Postgres or Kafka, or no free database connection) or TIMEOUT; \
                 retry after the Retry-After delay",
            ));
        }
        if route.access == Access::Public {
            operation["security"] = json!([]);
        } else {
            operation["security"] = json!([{"bearer": []}]);
            operation["description"] = json!(format!(
                "Needs a key of role `{}` or higher (`MF_AUTH=off` disables auth).",
                route.access.as_str()
            ));
            shared.extend([
                ("401", "UNAUTHORIZED: no key, or not a valid one"),
                ("403", "FORBIDDEN: the key's role is too weak"),
                (
                    "429",
                    "RATE_LIMITED: too many requests from this key; see Retry-After",
                ),
            ]);
        }
        if let Some(responses) = operation["responses"].as_object_mut() {
            for (status, text) in shared {
                let mut answer = problem(text);
                if matches!(status, "503" | "429") {
                    answer["headers"] = retry_after();
                }
                responses.entry(status).or_insert(answer);
            }
        }
        paths
            .entry(route.path)
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("a path item is an object")
            .insert(route.verb.as_str().into(), operation);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "meterflow",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Usage metering and billing. Timestamps are RFC 3339 UTC. Decimals are JSON numbers \
                with their exact digits in responses; requests take numbers or strings. Errors are RFC 9457 \
                application/problem+json with a stable `code`.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "An API key from `meterflow api-key create --role ingest|read|admin`. Roles are \
                    ordered ingest < read < admin: ingest may post events, read may also read everything, \
                    admin may do everything. A key bound to a customer sees only that customer (anything \
                    else is 404).",
            }},
            "schemas": to_json(COMPONENTS.with_borrow_mut(std::mem::take)),
        },
    })
}

fn tag(path: &str) -> &str {
    path.trim_start_matches("/api/v1/")
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or("")
}

fn op(parameters: Vec<Value>, request: Option<Value>, responses: Vec<(u16, Value)>) -> Value {
    let mut operation = json!({
        "responses": responses
            .into_iter()
            .map(|(status, r)| (status.to_string(), r))
            .collect::<Map<_, _>>(),
    });
    if !parameters.is_empty() {
        operation["parameters"] = json!(parameters);
    }
    if let Some(request) = request {
        operation["requestBody"] = request;
    }
    operation
}

thread_local! {
    /// The schemas [`document`]'s operations refer to, collected while it builds them.
    static COMPONENTS: RefCell<BTreeMap<String, RefOr<Schema>>> = const { RefCell::new(BTreeMap::new()) };
}

/// A reference to `T`'s schema, which joins the document's components with every schema it refers to.
fn schema<T: ToSchema>() -> Value {
    register::<T>();
    json!({"$ref": format!("#/components/schemas/{}", T::name())})
}

fn register<T: ToSchema>() {
    let mut schemas = vec![(T::name().into_owned(), T::schema())];
    T::schemas(&mut schemas);
    COMPONENTS.with_borrow_mut(|components| components.extend(schemas));
}

/// A page of `T`s ([`Page`]), inline.
fn page<T: ToSchema>() -> Value {
    register::<T>();
    to_json(Page::<T>::schema())
}

/// The query parameters `Q` reads.
fn params<Q: IntoParams>() -> Vec<Value> {
    Q::into_params(|| Some(ParameterIn::Query))
        .into_iter()
        .map(to_json)
        .collect()
}

fn to_json(value: impl serde::Serialize) -> Value {
    serde_json::to_value(value).expect("an OpenAPI object is JSON")
}

fn body(schema: Value, example: Value) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": schema, "example": example}}})
}

fn ok(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

fn problem(description: &str) -> Value {
    json!({"description": description,
           "content": {"application/problem+json": {"schema": schema::<crate::error::Problem>()}}})
}

/// The `Retry-After` header of a 503 or 429: whole seconds to wait before retrying.
fn retry_after() -> Value {
    json!({"Retry-After": {
        "description": "Seconds to wait before retrying",
        "schema": {"type": "integer", "minimum": 1},
    }})
}

fn path_param(name: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `$ref` of `value`, recursively.
    fn references(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(target)) = map.get("$ref") {
                    out.push(target.clone());
                }
                map.values().for_each(|v| references(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| references(v, out)),
            _ => {}
        }
    }

    #[test]
    fn every_reference_names_a_component_and_every_component_is_referenced() {
        let doc = document();
        let components = doc["components"]["schemas"].as_object().unwrap();
        let mut targets = Vec::new();
        references(&doc, &mut targets);
        for target in &targets {
            let name = target.strip_prefix("#/components/schemas/").unwrap();
            assert!(components.contains_key(name), "{target} is not a component");
        }
        for name in components.keys() {
            let target = format!("#/components/schemas/{name}");
            assert!(targets.contains(&target), "{name} is not referenced");
        }
        assert!(components.len() > 30, "{} components", components.len());
    }

    #[test]
    fn the_document_is_the_same_when_built_twice() {
        assert_eq!(document(), document());
    }
}
