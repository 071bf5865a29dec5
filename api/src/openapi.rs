//! The route table and the OpenAPI 3.1 document built from it (SPEC §8).
//!
//! ```text
//!  events::ROUTES, meters::ROUTES, … (each module's rows, next to its handlers), SYSTEM
//!  a row: method + path + role + handler + parameters/body/responses
//!     ├──► router()    every row routed, behind its role (the method comes from the row)
//!     └──► document()  every row documented, served at GET /api/v1/openapi.json (no auth)
//! ```
//! Routing and documentation read the same rows, so a route cannot exist undocumented or a documented
//! operation unrouted; `tests/openapi.rs` checks both against the live server, and Schemathesis
//! (`deploy/local/schemathesis`) checks that the answers conform to the schemas. A module declares
//! its routes and their roles in its own `ROUTES`; [`routes`] lists the modules.
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

use axum::routing::{on, MethodFilter, MethodRouter};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use utoipa::openapi::path::ParameterIn;
use utoipa::openapi::{RefOr, Schema};
use utoipa::{IntoParams, PartialSchema, ToSchema};

use crate::auth::Scope;
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
    /// What a key bound to one customer may reach here.
    pub scope: Scope,
    /// What the audit log records of a change made here, if anything.
    pub audit: Option<crate::audit::Audit>,
    /// Whether an `Idempotency-Key` is honoured here (a stored answer replayed).
    pub idempotent: bool,
    pub summary: &'static str,
    /// The handler, routed for the given method (with its body limit, if any).
    pub handler: fn(MethodFilter, &Settings) -> MethodRouter<AppState>,
    /// The operation's `parameters`, `requestBody` and `responses`; [`document`] adds the responses
    /// every operation shares (auth, rate limit, unavailable).
    pub spec: fn() -> Value,
}

/// The path of the document itself.
pub const DOCUMENT_PATH: &str = "/api/v1/openapi.json";

/// The API's own routes: this document, health, readiness and metrics.
const SYSTEM: &[Route] = &[
    Route {
        verb: Verb::Get,
        path: DOCUMENT_PATH,
        access: Access::Public,
        scope: Scope::Shared,
        audit: None,
        idempotent: false,
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
        scope: Scope::Shared,
        audit: None,
        idempotent: false,
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
        scope: Scope::Shared,
        audit: None,
        idempotent: false,
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
        scope: Scope::Shared,
        audit: None,
        idempotent: false,
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

/// Every route of the API: each module's table, then [`SYSTEM`].
pub fn routes() -> impl Iterator<Item = &'static Route> {
    [
        events::ROUTES,
        meters::ROUTES,
        progress::ROUTES,
        aggregations::ROUTES,
        dead_letters::ROUTES,
        price_books::ROUTES,
        charges::ROUTES,
        rerating::ROUTES,
        customers::ROUTES,
        invoices::ROUTES,
        invoice_runs::ROUTES,
        SYSTEM,
    ]
    .into_iter()
    .flatten()
}

/// A router with every row of [`routes`], each behind its own gate (`auth::gate`: the row's role and
/// customer scope, no lookup at request time). The routes that replay an `Idempotency-Key` or are
/// audited get those middlewares (innermost first: auditing, inside replaying a stored response,
/// inside the gate); the others, `POST /api/v1/events` among them, do not pay for two layers that
/// would only pass them on.
pub fn router(state: &AppState) -> Router<AppState> {
    routes().fold(Router::new(), |router, route| {
        let mut methods = (route.handler)(route.verb.filter(), &state.settings);
        if let Some(audit) = route.audit {
            methods = methods.route_layer(axum::middleware::from_fn_with_state(
                crate::audit::Audited {
                    state: state.clone(),
                    audit,
                },
                crate::audit::record_changes,
            ));
        }
        if route.idempotent {
            methods = methods.route_layer(axum::middleware::from_fn_with_state(
                crate::idempotency::Honoured {
                    state: state.clone(),
                    route: route.path.strip_prefix("/api/v1").unwrap_or(route.path),
                },
                crate::idempotency::replay,
            ));
        }
        // Outermost: the row's own gate, with its role and its customer scope.
        methods = methods.route_layer(axum::middleware::from_fn_with_state(
            crate::auth::Guard {
                state: state.clone(),
                route,
            },
            crate::auth::gate,
        ));
        router.route(route.path, methods)
    })
}

async fn serve_document() -> Json<Value> {
    static DOCUMENT: OnceLock<Value> = OnceLock::new();
    Json(DOCUMENT.get_or_init(document).clone())
}

/// The OpenAPI 3.1 document of [`routes`].
pub fn document() -> Value {
    let mut paths = Map::new();
    for route in routes() {
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
                "Needs a key of role `{}` or higher (`MF_AUTH=off` disables auth). A key bound to a \
                 customer: {}.",
                route.access.as_str(),
                route.scope.describe()
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

pub(crate) fn op(
    parameters: Vec<Value>,
    request: Option<Value>,
    responses: Vec<(u16, Value)>,
) -> Value {
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
pub(crate) fn schema<T: ToSchema>() -> Value {
    register::<T>();
    json!({"$ref": format!("#/components/schemas/{}", T::name())})
}

fn register<T: ToSchema>() {
    let mut schemas = vec![(T::name().into_owned(), T::schema())];
    T::schemas(&mut schemas);
    COMPONENTS.with_borrow_mut(|components| components.extend(schemas));
}

/// A page of `T`s ([`Page`]), inline.
pub(crate) fn page<T: ToSchema>() -> Value {
    register::<T>();
    to_json(Page::<T>::schema())
}

/// The query parameters `Q` reads.
pub(crate) fn params<Q: IntoParams>() -> Vec<Value> {
    Q::into_params(|| Some(ParameterIn::Query))
        .into_iter()
        .map(to_json)
        .collect()
}

fn to_json(value: impl serde::Serialize) -> Value {
    serde_json::to_value(value).expect("an OpenAPI object is JSON")
}

pub(crate) fn body(schema: Value, example: Value) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": schema, "example": example}}})
}

/// A request body the operation also takes absent.
pub(crate) fn optional_body(schema: Value, example: Value) -> Value {
    json!({"required": false, "content": {"application/json": {"schema": schema, "example": example}}})
}

pub(crate) fn ok(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

pub(crate) fn problem(description: &str) -> Value {
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

pub(crate) fn path_param(name: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}})
}

/// The property names of `T`'s derived schema (for tests that tie a schema to a parser).
#[cfg(test)]
pub(crate) fn schema_properties<T: ToSchema>() -> Vec<String> {
    let schema = to_json(T::schema());
    schema["properties"]
        .as_object()
        .expect("an object schema")
        .keys()
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_or_audit_names_a_parameter_of_its_path_and_lists_take_a_customer_id() {
        for route in routes() {
            let what = format!("{} {}", route.verb.as_str(), route.path);
            match route.scope {
                Scope::PathCustomer(name) | Scope::Owned(_, name) => {
                    assert!(
                        route.path.contains(&format!("{{{name}}}")),
                        "{what}: no {{{name}}}"
                    );
                }
                Scope::List => {
                    let takes = (route.spec)()["parameters"]
                        .as_array()
                        .is_some_and(|ps| ps.iter().any(|p| p["name"] == "customer_id"));
                    assert!(
                        takes,
                        "{what}: a list narrowed by customer_id must take one"
                    );
                }
                Scope::Shared | Scope::OwnCustomer | Scope::Body | Scope::Refused => {}
            }
            if let Some(crate::audit::Audit {
                id: crate::audit::IdFrom::Path(name),
                ..
            }) = route.audit
            {
                assert!(
                    route.path.contains(&format!("{{{name}}}")),
                    "{what}: audit id {{{name}}}"
                );
            }
        }
    }

    #[test]
    fn the_document_is_the_same_when_built_twice() {
        assert_eq!(document(), document());
    }
}
