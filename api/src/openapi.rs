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
//! Schemas are written by hand with `serde_json`, next to the handler they describe in spirit: requests
//! take decimals as JSON numbers or strings, responses give them as JSON numbers with their exact digits.
// The document is built from constants (the route table), not from requests: indexing a JSON value or
// expecting an entry here can only fail on a bug every test finds.
#![allow(clippy::indexing_slicing, clippy::expect_used)]

use std::sync::OnceLock;

use axum::extract::DefaultBodyLimit;
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

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
                    schema("Event"),
                    json!({"event_id": "evt_0001", "customer_id": "cust_1", "event_type": "api_call",
                           "event_time": "2024-01-15T10:00:00Z", "value": "1.5",
                           "properties": {"region": "eu"}}),
                )),
                vec![
                    (201, ok("The event is stored and will be counted once", schema("EventAccepted"))),
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
                           "items": schema("Event")}),
                    json!([{"event_id": "evt_0002", "customer_id": "cust_1", "event_type": "api_call",
                            "event_time": "2024-01-15T10:00:00Z", "value": 2}]),
                )),
                vec![
                    (
                        200,
                        ok("A result per item, in order", schema("BatchResult")),
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
                    (200, ok("Already voided", schema("EventVoid"))),
                    (
                        202,
                        ok(
                            "The void is on its way to the pipeline",
                            schema("EventVoid"),
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
                    schema("Meter"),
                    json!({"meter": "api_calls", "event_type": "api_call", "aggregation": "count",
                           "window": "hour"}),
                )),
                vec![
                    (200, ok("The identical meter exists", schema("StoredMeter"))),
                    (201, ok("Created", schema("StoredMeter"))),
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
                vec![(200, ok("The meters", page("StoredMeter")))],
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
                vec![(200, ok("Progress", schema("Progress")))],
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
                    schema("Watermark"),
                    json!({"advance_to": "2024-01-01T00:00:00Z"}),
                )),
                vec![
                    (
                        202,
                        ok("The floor now in force (audited)", schema("Watermark")),
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
            let mut params = list_params(true);
            params.extend([
                query(
                    "include",
                    json!({"type": "string", "enum": ["event_ids"]}),
                    "`event_ids` lists each window's contributing event ids",
                ),
                query(
                    "event_ids_limit",
                    limit_schema(),
                    "Most event ids per window; `limit` × `event_ids_limit` must be at most 10000 \
                     (by default as many as that allows, up to 1000)",
                ),
                query(
                    "event_ids_after",
                    json!({"type": "string"}),
                    "A window's `event_ids_next_cursor`",
                ),
            ]);
            op(
                params,
                None,
                vec![
                    (200, ok("A page of aggregates", page("Aggregation"))),
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
                page_params(),
                None,
                vec![
                    (200, ok("A page of dead letters", page("DeadLetter"))),
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
                    schema("NewPriceBook"),
                    json!({"meter": "api_calls", "currency": "USD",
                           "effective_from": "2024-01-01T00:00:00Z",
                           "model": {"type": "graduated", "tiers": [
                               {"up_to": 1000, "unit_price": "0"},
                               {"up_to": null, "unit_price": "0.002"}]},
                           "minimum_per_period": "10.00"}),
                )),
                vec![
                    (201, ok("Created", schema("PriceBook"))),
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
                list_params(true),
                None,
                vec![
                    (200, ok("A page of price books", page("PriceBook"))),
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
                    (200, ok("The price book", schema("PriceBook"))),
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
                    schema("PriceBookPatch"),
                    json!({"minimum_per_period": null}),
                )),
                vec![
                    (200, ok("The changed price book", schema("PriceBook"))),
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
                list_params(true),
                None,
                vec![
                    (200, ok("A page of charges", page("Charge"))),
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
                    schema("NewReratingJob"),
                    json!({"customer_ids": ["cust_1"], "from": "2024-01-01T00:00:00Z",
                           "to": "2024-01-02T00:00:00Z", "reason": "corrected price book"}),
                )),
                vec![
                    (202, ok("Queued", schema("JobAccepted"))),
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
                    (200, ok("The job", schema("ReratingJob"))),
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
                    schema("NewCustomer"),
                    json!({"customer_id": "cust_openapi", "name": "Acme", "email": "billing@acme.test",
                           "currency": "EUR"}),
                )),
                vec![
                    (201, ok("Created", schema("Customer"))),
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
                page_params(),
                None,
                vec![
                    (200, ok("A page of customers", page("Customer"))),
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
                    (200, ok("The customer", schema("Customer"))),
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
                Some(body(schema("CustomerPatch"), json!({"address": null}))),
                vec![
                    (200, ok("The changed customer", schema("Customer"))),
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
                vec![
                    path_param("customer_id"),
                    query(
                        "period",
                        month_schema(),
                        "The month; default the current one",
                    ),
                ],
                None,
                vec![
                    (200, ok("The upcoming invoice", schema("UpcomingInvoice"))),
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
                    schema("NewInvoice"),
                    json!({"customer_id": "cust_openapi", "period_start": "2024-01-01T00:00:00Z",
                           "period_end": "2024-01-31T23:59:59.999Z"}),
                )),
                vec![
                    (201, ok("Issued", schema("Invoice"))),
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
            let mut params = vec![query(
                "customer_id",
                json!({"type": "string"}),
                "Only this customer's",
            )];
            params.extend(time_params());
            params.push(query(
                "status",
                json!({"type": "string", "enum": ["issued", "void"]}),
                "Only invoices in this status",
            ));
            params.extend(page_params());
            op(
                params,
                None,
                vec![
                    (200, ok("A page of invoices", page("Invoice"))),
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
                    (200, ok("The invoice", schema("Invoice"))),
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
            let mut body = body(schema("InvoiceVoid"), json!({"reason": "issued in error"}));
            body["required"] = json!(false);
            op(
                vec![path_param("invoice_id")],
                Some(body),
                vec![
                    (200, ok("The voided invoice", schema("Invoice"))),
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
                vec![
                    path_param("invoice_id"),
                    query(
                        "format",
                        json!({"type": "string", "enum": ["html", "pdf"]}),
                        "`html` (default) or `pdf`",
                    ),
                ],
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
                Some(body(schema("NewInvoiceRun"), json!({"period": "2024-01"}))),
                vec![
                    (202, ok("Started", schema("InvoiceRunAccepted"))),
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
                    (200, ok("The run", schema("InvoiceRun"))),
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
        spec: || op(vec![], None, vec![(200, ok("Alive", schema("Health")))]),
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
                    (200, ok("Ready", schema("Ready"))),
                    (
                        503,
                        ok("Not ready (see which dependency is down)", schema("Ready")),
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

/// The OpenAPI 3.0 document of [`ROUTES`].
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
        "openapi": "3.0.3",
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
            "schemas": schemas(),
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

fn schema(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn page(item: &str) -> Value {
    json!({"type": "object", "required": ["data", "next_cursor"], "properties": {
        "data": {"type": "array", "items": schema(item)},
        "next_cursor": {"type": "string", "nullable": true,
                        "description": "Pass as `cursor` for the next page; null on the last"},
    }})
}

fn body(schema: Value, example: Value) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": schema, "example": example}}})
}

fn ok(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

fn problem(description: &str) -> Value {
    json!({"description": description,
           "content": {"application/problem+json": {"schema": schema("Problem")}}})
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

fn query(name: &str, schema: Value, description: &str) -> Value {
    json!({"name": name, "in": "query", "required": false, "schema": schema, "description": description})
}

fn limit_schema() -> Value {
    json!({"type": "integer", "minimum": 1, "maximum": crate::page::MAX_LIMIT, "default": 100})
}

fn month_schema() -> Value {
    json!({"type": "string", "pattern": "^[0-9]{4}-(0[1-9]|1[0-2])$", "example": "2024-01"})
}

fn page_params() -> Vec<Value> {
    vec![
        query("limit", limit_schema(), "Page size"),
        query(
            "cursor",
            json!({"type": "string"}),
            "The `next_cursor` of the previous page (opaque)",
        ),
    ]
}

fn time_params() -> Vec<Value> {
    vec![
        query(
            "from",
            json!({"type": "string", "format": "date-time"}),
            "At or after this instant",
        ),
        query(
            "to",
            json!({"type": "string", "format": "date-time"}),
            "Before this instant",
        ),
    ]
}

/// `customer_id`, `meter`, `from`, `to`, `limit`, `cursor` (SPEC §8).
fn list_params(with_meter: bool) -> Vec<Value> {
    let mut params = vec![query(
        "customer_id",
        json!({"type": "string"}),
        "Only this customer's",
    )];
    if with_meter {
        params.push(query(
            "meter",
            json!({"type": "string"}),
            "Only this meter's",
        ));
    }
    params.extend(time_params());
    params.extend(page_params());
    params
}

fn schemas() -> Value {
    let string = json!({"type": "string"});
    let nullable_string = json!({"type": "string", "nullable": true});
    let time = json!({"type": "string", "format": "date-time"});
    let nullable_time = json!({"type": "string", "format": "date-time", "nullable": true});
    let number = json!({"type": "number", "description": "A decimal with its exact digits"});
    let nullable_number = json!({"type": "number", "nullable": true});
    let integer = json!({"type": "integer"});
    let nullable_integer = json!({"type": "integer", "nullable": true});
    let decimal_in = json!({"anyOf": [
        {"type": "number"},
        {"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?$"}],
        "description": "A decimal: a JSON number or a string of digits"});
    let nullable_decimal_in = json!({"anyOf": [
        {"type": "number"},
        {"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?$"}],
        "nullable": true});
    let currency = json!({"type": "string", "pattern": "^[A-Z]{3}$", "example": "USD"});
    let month = month_schema();
    let id = json!({"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"});
    let name = json!({"type": "string", "pattern": "^[a-z0-9_.-]{1,64}$"});
    let all = [
        (
            "Problem",
            json!({
                "type": "object",
                "description": "RFC 9457 problem details with a stable `code`: DUPLICATE_EVENT, \
                    INVOICE_ALREADY_EXISTS, RERATING_IN_PROGRESS, PRICE_BOOK_OVERLAP, PERIOD_NOT_ENDED, \
                    VALIDATION_FAILED (with field paths in `errors`), MALFORMED_JSON, PAYLOAD_TOO_LARGE, \
                    UNAUTHORIZED, FORBIDDEN, NOT_FOUND, RATE_LIMITED, UNAVAILABLE, and the more specific \
                    METER_EXISTS, METER_NAME_COLLIDES, PERIOD_QUARANTINED, CUSTOMER_ALREADY_EXISTS, CURRENCY_LOCKED, CURRENCY_MISMATCH, AMOUNT_OVERFLOW, \
                    INVOICE_RUN_IN_PROGRESS, BAD_REQUEST, UNSUPPORTED_MEDIA_TYPE, TIMEOUT.",
                "required": ["type", "title", "status", "code", "detail"],
                "properties": {
                    "type": string, "title": string, "status": integer,
                    "code": {"type": "string", "pattern": "^[A-Z][A-Z_]*$"},
                    "detail": string,
                    "errors": {"type": "array", "items": {
                        "type": "object", "required": ["field", "message"],
                        "properties": {"field": string, "message": string}}},
                },
            }),
        ),
        (
            "Event",
            json!({
                "type": "object",
                "additionalProperties": false,
                "required": ["event_id", "customer_id", "event_type", "event_time"],
                "properties": {
                    "event_id": id, "customer_id": id, "event_type": name,
                    "event_time": {"type": "string", "format": "date-time", "description": "RFC 3339, not far in the future"},
                    "value": decimal_in,
                    "properties": {"type": "object", "description": "Flat: string, number or boolean values"},
                },
            }),
        ),
        (
            "EventAccepted",
            json!({"type": "object", "required": ["event_id", "status", "received_at"],
            "properties": {"event_id": string, "status": {"type": "string", "enum": ["accepted"]},
                           "received_at": time}}),
        ),
        (
            "BatchResult",
            json!({"type": "object", "required": ["accepted", "rejected", "results"],
            "properties": {"accepted": integer, "rejected": integer, "results": {"type": "array", "items": {
                "type": "object", "required": ["index", "status"],
                "properties": {"index": integer, "event_id": string,
                               "status": {"type": "integer", "description": "What a single POST would answer"},
                               "error": schema("Problem")}}}}}),
        ),
        (
            "EventVoid",
            json!({"type": "object", "required": ["event_id", "status"],
            "properties": {"event_id": string, "status": {"type": "string", "enum": ["voided", "voiding"]}}}),
        ),
        (
            "Meter",
            json!({
                "type": "object", "additionalProperties": false,
                "required": ["meter", "event_type", "aggregation"],
                "properties": {
                    "meter": name, "event_type": name,
                    "aggregation": {"type": "string", "enum": ["count", "sum", "max", "unique_count", "latest"]},
                    "value_property": {"type": "string", "description": "`value` or `properties.<key>`"},
                    "window": {"type": "string", "enum": ["minute", "hour", "day"], "default": "hour"},
                },
            }),
        ),
        (
            "StoredMeter",
            json!({
                "type": "object",
                "required": ["meter", "event_type", "aggregation", "window", "created_at"],
                "properties": {
                    "meter": string, "event_type": string,
                    "aggregation": {"type": "string", "enum": ["count", "sum", "max", "unique_count", "latest"]},
                    "value_property": string,
                    "window": {"type": "string", "enum": ["minute", "hour", "day"]},
                    "created_at": time,
                },
            }),
        ),
        (
            "Progress",
            json!({"type": "object", "required": ["topic", "partitions", "caught_up"], "properties": {
            "topic": string, "committed_epoch": nullable_integer, "committed_at": nullable_time,
            "committed_watermark": nullable_time, "allowed_lateness_seconds": nullable_integer,
            "watermark_floor": nullable_time, "lag_total": nullable_integer, "caught_up": {"type": "boolean"},
            "partitions": {"type": "array", "items": {"type": "object",
                "required": ["partition", "next_offset"], "properties": {
                    "partition": integer, "next_offset": integer, "end_offset": nullable_integer,
                    "lag": nullable_integer, "max_event_time": nullable_time}}}}}),
        ),
        (
            "Watermark",
            json!({"type": "object", "additionalProperties": false, "required": ["advance_to"],
            "properties": {"advance_to": time}}),
        ),
        (
            "Aggregation",
            json!({"type": "object", "required": ["customer_id", "meter", "window_start", "window_end",
                "value", "event_count", "finalized", "revision", "updated_at"], "properties": {
            "customer_id": string, "meter": string, "window_start": time, "window_end": time,
            "value": number, "event_count": integer, "finalized": {"type": "boolean"},
            "quarantined": {"type": "boolean", "description": "present (true) when the window's sum left the decimal range: value is its last value in range"},
            "revision": integer, "updated_at": time,
            "event_ids": {"type": "array", "items": string},
            "event_ids_next_cursor": string}}),
        ),
        (
            "DeadLetter",
            json!({"type": "object", "required": ["id", "topic", "partition", "offset", "reason",
                "payload", "created_at"], "properties": {
            "id": integer, "topic": string, "partition": integer, "offset": integer, "reason": string,
            "payload": string, "created_at": time}}),
        ),
        (
            "PriceModel",
            json!({
                "type": "object", "additionalProperties": false, "required": ["type"],
                "description": "per_unit needs unit_price; graduated and volume need tiers (the last open, \
                    up_to null); package needs package_size and package_price",
                "properties": {
                    "type": {"type": "string", "enum": ["per_unit", "graduated", "volume", "package"]},
                    "unit_price": decimal_in,
                    "tiers": {"type": "array", "items": {"type": "object", "additionalProperties": false,
                        "properties": {"up_to": nullable_decimal_in, "unit_price": decimal_in,
                                       "flat_fee": decimal_in}}},
                    "package_size": decimal_in, "package_price": decimal_in,
                },
            }),
        ),
        (
            "NewPriceBook",
            json!({
                "type": "object", "additionalProperties": false,
                "required": ["currency", "effective_from"],
                "description": "`meter` (or the seed's `metric_type`), and `model` (or the seed's `unit_price` \
                    for per_unit)",
                "properties": {
                    "meter": string, "metric_type": string, "customer_id": nullable_string, "currency": currency,
                    "effective_from": {"type": "string", "description": "RFC 3339"},
                    "effective_to": {"type": "string", "nullable": true, "description": "RFC 3339; null: open"},
                    "model": schema("PriceModel"), "unit_price": decimal_in,
                    "minimum_per_period": nullable_decimal_in,
                },
            }),
        ),
        (
            "PriceBookPatch",
            json!({"type": "object", "additionalProperties": false, "properties": {
            "model": schema("PriceModel"), "minimum_per_period": nullable_decimal_in,
            "effective_to": {"type": "string", "nullable": true, "description": "RFC 3339; null: open"}}}),
        ),
        (
            "PriceBook",
            json!({"type": "object", "required": ["price_book_id", "meter", "customer_id", "currency",
                "effective_from", "effective_to", "model", "minimum_per_period", "created_at", "updated_at"],
            "properties": {
                "price_book_id": string, "meter": string, "customer_id": nullable_string, "currency": string,
                "effective_from": time, "effective_to": nullable_time,
                "model": {"type": "object", "description": "As posted, decimals as numbers"},
                "minimum_per_period": nullable_number, "created_at": time, "updated_at": time}}),
        ),
        (
            "Charge",
            json!({"type": "object", "required": ["customer_id", "meter", "window_start", "window_end",
                "quantity", "amount", "currency", "price_book_id", "revision", "updated_at"], "properties": {
            "customer_id": string, "meter": string, "window_start": time, "window_end": time,
            "quantity": number, "amount": number, "currency": string, "price_book_id": string,
            "revision": integer, "updated_at": time}}),
        ),
        (
            "NewReratingJob",
            json!({"type": "object", "additionalProperties": false, "required": ["from", "to"],
            "properties": {
                "customer_ids": {"type": "array", "items": string, "description": "Empty or absent: all"},
                "from": {"type": "string", "description": "RFC 3339 (alias window_start)"},
                "to": {"type": "string", "description": "RFC 3339 (alias window_end)"},
                "reason": nullable_string}}),
        ),
        (
            "JobAccepted",
            json!({"type": "object", "required": ["job_id", "status"],
            "properties": {"job_id": string, "status": string}}),
        ),
        (
            "ReratingJob",
            json!({"type": "object", "required": ["job_id", "customer_ids", "status"], "properties": {
            "job_id": string, "customer_ids": {"type": "array", "items": string},
            "from": nullable_time, "to": nullable_time, "reason": string,
            "status": {"type": "string", "enum": ["pending", "running", "succeeded", "failed"]},
            "windows_checked": integer, "windows_changed": integer,
            "amount_before": nullable_number, "amount_after": nullable_number, "error": nullable_string,
            "created_at": nullable_time, "started_at": nullable_time, "finished_at": nullable_time}}),
        ),
        (
            "NewCustomer",
            json!({"type": "object", "additionalProperties": false, "required": ["customer_id", "name"],
            "properties": {"customer_id": string, "name": string, "email": nullable_string,
                           "address": nullable_string, "currency": currency}}),
        ),
        (
            "CustomerPatch",
            json!({"type": "object", "additionalProperties": false, "properties": {
            "name": string, "email": nullable_string, "address": nullable_string, "currency": currency}}),
        ),
        (
            "Customer",
            json!({"type": "object", "required": ["customer_id", "name", "email", "address", "currency",
                "created_at", "updated_at"], "properties": {
            "customer_id": string, "name": string, "email": nullable_string, "address": nullable_string,
            "currency": string, "created_at": time, "updated_at": time}}),
        ),
        (
            "Line",
            json!({"type": "object", "required": ["meter", "kind", "description", "quantity",
                "unit_price_summary", "amount", "price_book_id"], "properties": {
            "meter": string, "kind": {"type": "string", "enum": ["usage", "minimum"]}, "description": string,
            "quantity": number, "unit_price_summary": string, "amount": number, "price_book_id": string}}),
        ),
        (
            "Adjustment",
            json!({"type": "object", "required": ["original_invoice_id", "period_start", "meter",
                "price_book_id", "amount", "reason"], "properties": {
            "original_invoice_id": string, "period_start": time, "meter": string, "price_book_id": string,
            "amount": number, "reason": string}}),
        ),
        (
            "UpcomingInvoice",
            json!({"type": "object", "required": ["customer_id", "registered",
                "billing_period_start", "billing_period_end", "currency", "line_items", "subtotal",
                "issued_invoice_id"], "properties": {
            "customer_id": string, "registered": {"type": "boolean"}, "billing_period_start": time,
            "billing_period_end": time, "currency": string,
            "line_items": {"type": "array", "items": schema("Line")}, "subtotal": number,
            "issued_invoice_id": nullable_string}}),
        ),
        (
            "NewInvoice",
            json!({"type": "object", "additionalProperties": false,
            "required": ["customer_id", "period_start", "period_end"],
            "properties": {"customer_id": string,
                "period_start": {"type": "string", "description": "RFC 3339, a month's start (alias billing_period_start)"},
                "period_end": {"type": "string", "description": "RFC 3339, that month's end (alias billing_period_end)"}}}),
        ),
        (
            "InvoiceVoid",
            json!({"type": "object", "additionalProperties": false,
            "properties": {"reason": {"type": "string", "maxLength": 1000, "nullable": true}}}),
        ),
        (
            "Invoice",
            json!({"type": "object", "required": ["invoice_id", "number", "customer_id",
                "billing_period_start", "billing_period_end", "status", "currency", "line_items",
                "adjustments", "subtotal", "total", "issued_at", "voided_at", "void_reason"], "properties": {
            "invoice_id": string, "number": integer, "customer_id": string, "billing_period_start": time,
            "billing_period_end": time, "status": {"type": "string", "enum": ["issued", "void"]},
            "currency": string, "line_items": {"type": "array", "items": schema("Line")},
            "adjustments": {"type": "array", "items": schema("Adjustment")}, "subtotal": number,
            "total": number, "issued_at": time, "voided_at": nullable_time, "void_reason": nullable_string}}),
        ),
        (
            "NewInvoiceRun",
            json!({"type": "object", "additionalProperties": false, "required": ["period"],
            "properties": {"period": month}}),
        ),
        (
            "InvoiceRunAccepted",
            json!({"type": "object", "required": ["run_id", "status", "period"],
            "properties": {"run_id": string, "status": string, "period": string}}),
        ),
        (
            "InvoiceRun",
            json!({"type": "object", "required": ["run_id", "period", "period_start", "period_end",
                "status", "total", "done", "issued", "skipped_existing", "failed", "failures",
                "unregistered_with_usage", "created_at"], "properties": {
            "run_id": string, "period": string, "period_start": time, "period_end": time,
            "status": {"type": "string", "enum": ["pending", "running", "succeeded", "failed"]},
            "error": nullable_string, "total": integer, "done": integer, "issued": integer,
            "skipped_existing": integer, "failed": integer,
            "failures": {"type": "array", "items": {"type": "object",
                "properties": {"customer_id": string, "error": string}}},
            "unregistered_with_usage": {"type": "object", "properties": {
                "count": integer, "customer_ids": {"type": "array", "items": string}}},
            "created_at": time, "started_at": nullable_time, "finished_at": nullable_time}}),
        ),
        (
            "Health",
            json!({"type": "object", "required": ["status"], "properties": {"status": string}}),
        ),
        (
            "Ready",
            json!({"type": "object", "required": ["status", "postgres", "kafka"], "properties": {
            "status": {"type": "string", "enum": ["ready", "unavailable"]},
            "postgres": {"type": "string", "enum": ["up", "down"]},
            "kafka": {"type": "string", "enum": ["up", "down"]},
            "checked_at": {"type": "string", "format": "date-time",
                           "description": "When this was checked; answers are shared for about a second"}}}),
        ),
    ];
    Value::Object(all.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}
