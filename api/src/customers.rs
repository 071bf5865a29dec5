//! `POST|GET /api/v1/customers`, `GET|PATCH /api/v1/customers/{id}` and
//! `GET /api/v1/customers/{id}/upcoming-invoice` (SPEC §6).
//!
//! ```text
//!  POST  body ─► NewCustomer: unknown fields, wrong JSON types ─► 400 MALFORMED_JSON
//!             ─► every bad field ─► 422 with its path ─► INSERT … ON CONFLICT DO NOTHING
//!                (the id is taken ─► 409 CUSTOMER_ALREADY_EXISTS) ─► 201
//!  PATCH      ─► name, email, address (null clears), currency (only before the first issued invoice,
//!               else 409 CURRENCY_LOCKED); anything else ─► 422
//!  upcoming   ─► upcoming_lines of the period (default: the current month by the API's clock) priced as
//!               issuing would: lines per meter and book rounded once, minimum top-ups, subtotal
//! ```
//! The upcoming invoice works for unregistered customers too (their usage is counted, SPEC §2), in the
//! default currency USD with `"registered": false`; registering the customer is what makes it invoiceable.
//!
//! Length: 79 of its lines are tests; the upcoming invoice is priced here because it is the
//! customer route that reads the customer's currency and minimum.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use chrono::{DateTime, Utc};
use meterflow_model::money::is_currency;
use meterflow_model::{Customer, FieldError};
use meterflow_store::customers::{self, CustomerError, StoredCustomer};
use meterflow_store::invoices::{self as sink, Period};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::audit::{Audit, IdFrom};
use crate::auth::Scope;
use crate::error::ApiError;
use crate::extract::{limited, JsonObject};
use crate::invoices::{issue_error, LineView};
use crate::openapi::{
    body, ok, op, page, params, path_param, problem, schema, Access, Route, Verb,
};
use crate::page::{Cursor, Page};
use crate::AppState;
use axum::routing::on;
use meterflow_store::audit::Entity;
use serde_json::json;

/// The largest body of a POST or PATCH.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// The currency of a customer registered without one, and of unregistered customers' upcoming invoices.
pub const DEFAULT_CURRENCY: &str = "USD";

const MAX_NAME: usize = 200;
const MAX_EMAIL: usize = 254;
const MAX_ADDRESS: usize = 1000;

/// A customer to register.
// Its fields are optional in Rust so that every missing one is reported.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCustomer {
    #[schema(required = true, value_type = meterflow_model::openapi::Id)]
    customer_id: Option<String>,
    #[schema(required = true, value_type = String)]
    name: Option<String>,
    email: Option<String>,
    address: Option<String>,
    /// Default USD; fixed once the customer has an invoice.
    #[schema(value_type = Option<meterflow_model::openapi::Currency>)]
    currency: Option<String>,
}

/// What `PATCH /api/v1/customers/{customer_id}` may change: an absent field stays, a null one is cleared.
// The patch is read field by field (`Patch::parse`), so that null and absent differ; this type is its
// schema, and `the_patch_schema_names_the_fields_the_parser_takes` keeps the two in step.
#[derive(Deserialize, utoipa::ToSchema)]
#[schema(as = CustomerPatch)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub(crate) struct PatchFields {
    #[serde(default)]
    name: String,
    email: Option<String>,
    address: Option<String>,
    #[serde(default)]
    #[schema(value_type = meterflow_model::openapi::Currency)]
    currency: String,
}

/// A registered customer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Customer)]
pub struct CustomerView {
    customer_id: String,
    name: String,
    #[schema(required = true)]
    email: Option<String>,
    #[schema(required = true)]
    address: Option<String>,
    currency: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<StoredCustomer> for CustomerView {
    fn from(s: StoredCustomer) -> Self {
        CustomerView {
            customer_id: s.customer.customer_id,
            name: s.customer.name,
            email: s.customer.email,
            address: s.customer.address,
            currency: s.customer.currency,
            created_at: s.created_at,
            updated_at: s.updated_at,
        }
    }
}

pub async fn create(
    State(state): State<AppState>,
    caller: crate::auth::Caller,
    JsonObject(raw): JsonObject<NewCustomer>,
) -> Result<impl IntoResponse, ApiError> {
    let customer = resolve(raw).map_err(ApiError::Validation)?;
    caller.may_act_for(&customer.customer_id)?;
    let mut conn = state.pool.acquire().await?;
    let stored = customers::create_customer(&mut conn, &customer)
        .await
        .map_err(write_error)?;
    let location = format!("/api/v1/customers/{}", stored.customer.customer_id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(CustomerView::from(stored)),
    ))
}

pub async fn get_one(
    State(state): State<AppState>,
    Path(customer_id): Path<String>,
) -> Result<Json<CustomerView>, ApiError> {
    let mut conn = state.pool.acquire().await?;
    let stored = customers::get_customer(&mut conn, &customer_id)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(stored.into()))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct CustomerQuery {
    /// Page size.
    #[param(minimum = 1, maximum = 1000, default = 100)]
    limit: Option<i64>,
    /// The `next_cursor` of the previous page (opaque).
    cursor: Option<String>,
}

/// Customers in id order, a page at a time.
pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<CustomerQuery>, QueryRejection>,
) -> Result<Json<Page<CustomerView>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = crate::page::limit(q.limit)?;
    let after = q.cursor.as_deref().map(Cursor::decode).transpose()?;
    let mut conn = state.pool.acquire().await?;
    let data =
        customers::list_customers(&mut conn, after.as_ref().map(|c| c.0.as_str()), limit + 1)
            .await?
            .into_iter()
            .map(CustomerView::from)
            .collect();
    Ok(Json(Page::from_overfetched(data, limit, |c| {
        Cursor::of(c.customer_id.clone(), String::new(), DateTime::UNIX_EPOCH).encode()
    })))
}

pub async fn update(
    State(state): State<AppState>,
    Path(customer_id): Path<String>,
    JsonObject(fields): JsonObject<Map<String, Value>>,
) -> Result<Json<CustomerView>, ApiError> {
    let patch = Patch::parse(fields).map_err(ApiError::Validation)?;
    let mut conn = state.pool.acquire().await?;
    let stored = customers::update_customer(&mut conn, &customer_id, |c| patch.apply(c))
        .await
        .map_err(write_error)?;
    Ok(Json(stored.into()))
}

/// What a PATCH changes; `None` leaves a field as it is, `Some(None)` clears it.
#[derive(Debug, Default)]
struct Patch {
    name: Option<String>,
    email: Option<Option<String>>,
    address: Option<Option<String>>,
    currency: Option<String>,
}

impl Patch {
    fn parse(fields: Map<String, Value>) -> Result<Patch, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut patch = Patch::default();
        for (key, value) in fields {
            let text = |errors: &mut Vec<FieldError>, nullable: bool| match value.clone() {
                Value::String(s) => Some(Some(s)),
                Value::Null if nullable => Some(None),
                _ => {
                    let what = if nullable {
                        "a string or null"
                    } else {
                        "a string"
                    };
                    errors.push(FieldError::new(key.clone(), format!("must be {what}")));
                    None
                }
            };
            match key.as_str() {
                "name" => patch.name = text(&mut errors, false).flatten(),
                "email" => patch.email = text(&mut errors, true),
                "address" => patch.address = text(&mut errors, true),
                "currency" => patch.currency = text(&mut errors, false).flatten(),
                "customer_id" | "created_at" | "updated_at" => errors.push(FieldError::new(
                    key,
                    "cannot be changed: a PATCH may change name, email, address and currency",
                )),
                _ => errors.push(FieldError::new(key, "is not a field of a customer")),
            }
        }
        let probe = Customer {
            customer_id: "x".into(),
            name: patch.name.clone().unwrap_or_else(|| "x".into()),
            email: patch.email.clone().flatten(),
            address: patch.address.clone().flatten(),
            currency: patch
                .currency
                .clone()
                .unwrap_or_else(|| DEFAULT_CURRENCY.into()),
        };
        errors.extend(validate(&probe));
        if errors.is_empty() {
            Ok(patch)
        } else {
            Err(errors)
        }
    }

    fn apply(&self, before: &Customer) -> Customer {
        let mut after = before.clone();
        if let Some(name) = &self.name {
            after.name = name.trim().to_owned();
        }
        if let Some(email) = &self.email {
            after.email = email.as_ref().map(|e| e.trim().to_owned());
        }
        if let Some(address) = &self.address {
            after.address = address.clone();
        }
        if let Some(currency) = &self.currency {
            after.currency = currency.clone();
        }
        after
    }
}

fn resolve(raw: NewCustomer) -> Result<Customer, Vec<FieldError>> {
    let mut errors = Vec::new();
    if raw.customer_id.is_none() {
        errors.push(FieldError::new("customer_id", "is required"));
    }
    if raw.name.is_none() {
        errors.push(FieldError::new("name", "is required"));
    }
    let customer = Customer {
        customer_id: raw.customer_id.unwrap_or_else(|| "x".into()),
        name: raw.name.map_or_else(|| "x".into(), |n| n.trim().to_owned()),
        email: raw.email.map(|e| e.trim().to_owned()),
        address: raw.address,
        currency: raw.currency.unwrap_or_else(|| DEFAULT_CURRENCY.into()),
    };
    errors.extend(validate(&customer));
    if errors.is_empty() {
        Ok(customer)
    } else {
        Err(errors)
    }
}

/// Every rule a customer's fields must keep, each broken one with its field.
fn validate(c: &Customer) -> Vec<FieldError> {
    let mut errors = Vec::new();
    // The same rule as an event's customer_id (SPEC §2), so the customer matches its usage.
    let id_char = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-');
    if c.customer_id.is_empty() || c.customer_id.len() > 128 {
        errors.push(FieldError::new(
            "customer_id",
            "must be 1 to 128 characters long",
        ));
    } else if !c.customer_id.bytes().all(id_char) {
        errors.push(FieldError::new(
            "customer_id",
            "may only contain [A-Za-z0-9._:-]",
        ));
    }
    if c.name.trim().is_empty() || c.name.chars().count() > MAX_NAME {
        errors.push(FieldError::new(
            "name",
            format!("must be 1 to {MAX_NAME} characters, not blank"),
        ));
    }
    if let Some(email) = c.email.as_deref().map(str::trim) {
        let valid = email.len() <= MAX_EMAIL
            && !email.chars().any(char::is_whitespace)
            && matches!(email.split_once('@'), Some((local, domain))
                if !local.is_empty() && domain.contains('.') && !domain.contains('@')
                    && !domain.starts_with('.') && !domain.ends_with('.'));
        if !valid {
            errors.push(FieldError::new(
                "email",
                "must be an email address such as billing@example.com",
            ));
        }
    }
    if c.address
        .as_ref()
        .is_some_and(|a| a.chars().count() > MAX_ADDRESS)
    {
        errors.push(FieldError::new(
            "address",
            format!("must be at most {MAX_ADDRESS} characters"),
        ));
    }
    // Postgres text cannot hold U+0000: refused here rather than failing the INSERT.
    for (field, text) in [
        ("name", Some(c.name.as_str())),
        ("email", c.email.as_deref()),
        ("address", c.address.as_deref()),
    ] {
        if text.is_some_and(|t| t.contains('\0')) {
            errors.push(FieldError::new(
                field,
                "must not contain NUL (U+0000) characters",
            ));
        }
    }
    if !is_currency(&c.currency) {
        errors.push(FieldError::new(
            "currency",
            "must be an active ISO 4217 code in upper case, such as USD or EUR",
        ));
    }
    errors
}

fn write_error(e: CustomerError) -> ApiError {
    match e {
        CustomerError::AlreadyExists(_) => {
            ApiError::Conflict("CUSTOMER_ALREADY_EXISTS", e.to_string())
        }
        CustomerError::NotFound => ApiError::NotFound,
        CustomerError::CurrencyLocked(_) => ApiError::Conflict("CURRENCY_LOCKED", e.to_string()),
        CustomerError::Database(e) => e.into(),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UpcomingQuery {
    /// `2024-01`; default the current month by the API's clock.
    #[param(value_type = Option<meterflow_model::openapi::Month>)]
    period: Option<String>,
}

/// The upcoming invoice: what issuing the period now would bill, without adjustments or a number.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = UpcomingInvoice)]
pub struct UpcomingView {
    customer_id: String,
    /// Unregistered customers' usage is counted but not invoiced until they are registered.
    registered: bool,
    billing_period_start: DateTime<Utc>,
    billing_period_end: DateTime<Utc>,
    currency: String,
    line_items: Vec<LineView>,
    #[schema(value_type = meterflow_model::openapi::Decimal)]
    subtotal: serde_json::Number,
    /// The invoice already issued for this period, if any.
    #[schema(required = true)]
    issued_invoice_id: Option<String>,
}

pub async fn upcoming(
    State(state): State<AppState>,
    Path(customer_id): Path<String>,
    query: Result<Query<UpcomingQuery>, QueryRejection>,
) -> Result<Json<UpcomingView>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let period = match q.period.as_deref() {
        None => Period::containing(Utc::now()),
        Some(text) => Period::parse_month(text)
            .map_err(|e| ApiError::Validation(vec![FieldError::new("period", e.to_string())]))?,
    };
    let mut conn = state.pool.acquire().await?;
    let customer = customers::get_customer(&mut conn, &customer_id).await?;
    let currency = customer
        .as_ref()
        .map_or(DEFAULT_CURRENCY, |c| c.customer.currency.as_str())
        .to_owned();
    let draft = sink::upcoming(&mut conn, &customer_id, &currency, period)
        .await
        .map_err(issue_error)?;
    let issued_invoice_id = match customer {
        Some(_) => sink::issued_invoice_id(&mut conn, &customer_id, period.start).await?,
        None => None,
    };
    Ok(Json(UpcomingView {
        registered: customer.is_some(),
        customer_id,
        billing_period_start: period.start,
        billing_period_end: period.end,
        currency: draft.currency,
        line_items: draft.line_items.into_iter().map(LineView::from).collect(),
        subtotal: meterflow_model::json::decimal_number(&draft.subtotal),
        issued_invoice_id,
    }))
}

/// This module's routes: each row routes its handler and documents it, with the role it needs
/// ([`Route`]).
pub(crate) const ROUTES: &[Route] = &[
    Route {
        verb: Verb::Post,
        path: "/api/v1/customers",
        access: Access::Admin,
        scope: Scope::Body,
        audit: Some(Audit {
            action: "customer.create",
            entity: "customer",
            snapshot: Entity::Customer,
            id: IdFrom::Body("customer_id"),
        }),
        idempotent: true,
        summary: "Register a customer",
        handler: |m, _| limited(on(m, create), MAX_BODY_BYTES),
        spec: || {
            op(
                vec![],
                Some(body(
                    schema::<NewCustomer>(),
                    json!({"customer_id": "cust_openapi", "name": "Acme", "email": "billing@acme.test",
                           "currency": "EUR"}),
                )),
                vec![
                    (201, ok("Created", schema::<CustomerView>())),
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
        scope: Scope::OwnCustomer,
        audit: None,
        idempotent: false,
        summary: "Customers in id order",
        handler: |m, _| on(m, list),
        spec: || {
            op(
                params::<CustomerQuery>(),
                None,
                vec![
                    (200, ok("A page of customers", page::<CustomerView>())),
                    (400, problem("BAD_REQUEST: a bad limit or cursor")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Get,
        path: "/api/v1/customers/{customer_id}",
        access: Access::Read,
        scope: Scope::PathCustomer("customer_id"),
        audit: None,
        idempotent: false,
        summary: "One customer",
        handler: |m, _| on(m, get_one),
        spec: || {
            op(
                vec![path_param("customer_id")],
                None,
                vec![
                    (200, ok("The customer", schema::<CustomerView>())),
                    (404, problem("NOT_FOUND")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Patch,
        path: "/api/v1/customers/{customer_id}",
        access: Access::Admin,
        scope: Scope::PathCustomer("customer_id"),
        audit: Some(Audit {
            action: "customer.update",
            entity: "customer",
            snapshot: Entity::Customer,
            id: IdFrom::Path("customer_id"),
        }),
        idempotent: false,
        summary: "Change a customer's name, email, address or currency",
        handler: |m, _| limited(on(m, update), MAX_BODY_BYTES),
        spec: || {
            op(
                vec![path_param("customer_id")],
                Some(body(schema::<PatchFields>(), json!({"address": null}))),
                vec![
                    (200, ok("The changed customer", schema::<CustomerView>())),
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
        scope: Scope::PathCustomer("customer_id"),
        audit: None,
        idempotent: false,
        summary: "What issuing the period now would bill",
        handler: |m, _| on(m, upcoming),
        spec: || {
            op(
                vec![path_param("customer_id")]
                    .into_iter()
                    .chain(params::<UpcomingQuery>())
                    .collect(),
                None,
                vec![
                    (200, ok("The upcoming invoice", schema::<UpcomingView>())),
                    (400, problem("BAD_REQUEST")),
                    (409, problem("CURRENCY_MISMATCH or AMOUNT_OVERFLOW")),
                    (422, problem("VALIDATION_FAILED: a bad period")),
                ],
            )
        },
    },
];

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(errors: Vec<FieldError>) -> Vec<String> {
        errors.into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn the_patch_schema_names_the_fields_the_parser_takes() {
        use crate::openapi::schema_properties;
        let documented = schema_properties::<PatchFields>();
        let refused = |key: &str| {
            let mut body = Map::new();
            body.insert(key.into(), json!("EUR"));
            Patch::parse(body).err().is_some_and(|errors| {
                errors.iter().any(|e| {
                    e.message.contains("is not a field") || e.message.contains("cannot be changed")
                })
            })
        };
        for key in &documented {
            assert!(
                !refused(key),
                "{key} is in the schema but the parser refuses it"
            );
        }
        for key in schema_properties::<CustomerView>() {
            assert_eq!(
                refused(&key),
                !documented.contains(&key),
                "{key}: the parser and the schema disagree"
            );
        }
    }

    #[test]
    fn a_customer_needs_an_id_and_a_name_and_defaults_to_usd() {
        let raw: NewCustomer = serde_json::from_value(json!({})).unwrap();
        assert_eq!(fields(resolve(raw).unwrap_err()), ["customer_id", "name"]);
        let raw: NewCustomer =
            serde_json::from_value(json!({"customer_id": "cust_1", "name": " Acme "})).unwrap();
        let c = resolve(raw).unwrap();
        assert_eq!((c.name.as_str(), c.currency.as_str()), ("Acme", "USD"));
    }

    #[test]
    fn every_bad_field_is_reported_with_its_path() {
        let raw: NewCustomer = serde_json::from_value(json!({"customer_id": "a b",
            "name": "  ", "email": "nope", "currency": "usd"}))
        .unwrap();
        assert_eq!(
            fields(resolve(raw).unwrap_err()),
            ["customer_id", "name", "email", "currency"]
        );
        assert!(serde_json::from_value::<NewCustomer>(json!({"colour": "red"})).is_err());
    }

    #[test]
    fn a_patch_may_change_name_email_address_and_currency_only() {
        let parse = |v: Value| Patch::parse(serde_json::from_value(v).unwrap());
        let bad = parse(json!({"customer_id": "x", "colour": "red", "email": 5})).unwrap_err();
        let mut bad = fields(bad);
        bad.sort();
        assert_eq!(bad, ["colour", "customer_id", "email"]);
        let patch = parse(json!({"email": null, "currency": "EUR"})).unwrap();
        let before = Customer {
            customer_id: "c".into(),
            name: "n".into(),
            email: Some("a@b.c".into()),
            address: None,
            currency: "USD".into(),
        };
        let after = patch.apply(&before);
        assert_eq!(after.email, None);
        assert_eq!(after.currency, "EUR");
        assert_eq!(after.name, "n");
    }
}
