//! `POST|GET /api/v1/price-books` and `GET|PATCH /api/v1/price-books/{id}` (SPEC §5, §8, §12).
//!
//! ```text
//!  POST body ─► NewPriceBook: unknown fields, wrong JSON types ─► 400 MALFORMED_JSON
//!            ─► resolve: the seed's shape (metric_type, top-level unit_price, no currency ─► USD),
//!               exact decimals (numbers or strings), RFC 3339 times, every bad field ─► 422 with its path
//!            ─► store::price_books::create_price_book: the exclusion constraint refuses an overlap
//!               ─► 409 PRICE_BOOK_OVERLAP; else the book and its audit row commit together ─► 201
//!  PATCH     ─► only model, minimum_per_period, effective_to (anything else ─► 422), same checks,
//!               audited in the transaction that changes the book
//! ```
//! Ranges are half-open `[effective_from, effective_to)`; an end written as `…T23:59:59.999Z` is the
//! instant that follows. Decimals in responses are JSON numbers with their exact digits.

mod posted;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::on;
use axum::Json;
use chrono::{DateTime, Utc};
use meterflow_model::json::decimal_number;
use meterflow_model::{PriceModel, Tier};
use meterflow_store::price_books::{self, BookFilter, PriceBookError, StoredPriceBook};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::audit::{Audit, IdFrom};
use crate::auth::{Caller, Scope};
use crate::error::ApiError;
use crate::extract::{limited, JsonObject};
use crate::openapi::{
    body, ok, op, page, params, path_param, problem, schema, Access, Route, Verb,
};
use crate::page::{Cursor, Page};
use crate::time::exclusive_end;
use crate::AppState;
use meterflow_store::audit::Entity;
use posted::{resolve, NewPriceBook, Patch, PatchFields};

/// The largest body of a POST or PATCH.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A stored book as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = PriceBook)]
pub struct PriceBookView {
    price_book_id: String,
    meter: String,
    #[schema(required = true)]
    customer_id: Option<String>,
    /// The dimension values of the windows it prices; `{}`: every window.
    #[schema(value_type = Object)]
    dimensions: meterflow_model::Dimensions,
    currency: String,
    effective_from: DateTime<Utc>,
    #[schema(required = true)]
    effective_to: Option<DateTime<Utc>>,
    /// As posted, decimals as numbers. Absent for a rate card, whose prices are its `entries`.
    #[schema(value_type = Option<Object>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<Value>,
    /// A rate card's entries (absent for a plain book): each prices the windows its `dimensions`
    /// match, as a book of its own would.
    #[serde(skip_serializing_if = "Option::is_none")]
    entries: Option<Vec<EntryView>>,
    #[schema(required = true, value_type = Option<meterflow_model::openapi::Decimal>)]
    minimum_per_period: Option<serde_json::Number>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// One entry of a rate card as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = RateEntryView)]
pub struct EntryView {
    #[schema(value_type = Object)]
    dimensions: meterflow_model::Dimensions,
    /// Decimals as numbers.
    #[schema(value_type = Object)]
    model: Value,
}

pub async fn create(
    State(state): State<AppState>,
    JsonObject(raw): JsonObject<NewPriceBook>,
) -> Result<impl IntoResponse, ApiError> {
    let book = resolve(raw, new_id()).map_err(ApiError::Validation)?;
    let mut conn = state.pool.acquire().await?;
    selector_keys_are_grouped_by(&mut conn, &book).await?;
    let stored = price_books::create_price_book(&mut conn, &book)
        .await
        .map_err(write_error)?;
    let location = format!("/api/v1/price-books/{}", stored.book.price_book_id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(view(stored)?),
    ))
}

pub async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(price_book_id): Path<String>,
) -> Result<Json<PriceBookView>, ApiError> {
    let mut conn = state.pool.acquire().await?;
    let stored = price_books::get_price_book(&mut conn, &price_book_id)
        .await?
        .ok_or(ApiError::NotFound)?;
    // A customer's own book is for that customer's keys (and unbound ones); defaults are for all.
    if let Some(customer) = &stored.book.customer_id {
        caller.may_act_for(customer)?;
    }
    Ok(Json(view(stored)?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PriceBookQuery {
    /// Only this meter's.
    meter: Option<String>,
    /// Only this customer's (and, for a bound key, the defaults).
    customer_id: Option<String>,
    /// Books in force at some instant at or after this one.
    from: Option<DateTime<Utc>>,
    /// Books in force at some instant before this one.
    to: Option<DateTime<Utc>>,
    /// Page size.
    #[param(minimum = 1, maximum = 1000, default = 100)]
    limit: Option<i64>,
    /// The `next_cursor` of the previous page (opaque).
    cursor: Option<String>,
}

/// Books in (meter, effective_from, price_book_id) order, a page at a time.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<PriceBookQuery>, QueryRejection>,
) -> Result<Json<Page<PriceBookView>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = crate::page::limit(q.limit)?;
    let to = q.to.map(exclusive_end);
    if let (Some(from), Some(to)) = (q.from, to) {
        if from > to {
            return Err(ApiError::BadRequest("from must not be after to".into()));
        }
    }
    let after = q.cursor.as_deref().map(Cursor::decode).transpose()?;
    let filter = BookFilter {
        meter: q.meter.as_deref(),
        customer_id: q.customer_id.as_deref(),
        visible_to: caller.bound(),
        from: q.from,
        to,
        after: after.as_ref().map(|c| (c.0.as_str(), c.2, c.1.as_str())),
        limit: limit + 1,
    };
    let mut conn = state.pool.acquire().await?;
    let data = price_books::list_price_books(&mut conn, &filter)
        .await?
        .into_iter()
        .map(view)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(Page::from_overfetched(data, limit, |b| {
        Cursor::of(b.meter.clone(), b.price_book_id.clone(), b.effective_from).encode()
    })))
}

pub async fn update(
    State(state): State<AppState>,
    Path(price_book_id): Path<String>,
    JsonObject(fields): JsonObject<Map<String, Value>>,
) -> Result<Json<PriceBookView>, ApiError> {
    let patch = Patch::parse(fields)?;
    let mut conn = state.pool.acquire().await?;
    let stored =
        price_books::update_price_book(&mut conn, &price_book_id, |book| patch.apply(book))
            .await
            .map_err(write_error)?;
    Ok(Json(view(stored)?))
}

fn write_error(e: PriceBookError) -> ApiError {
    match e {
        PriceBookError::Overlap { with } => ApiError::Conflict(
            "PRICE_BOOK_OVERLAP",
            match with {
                Some(other) => format!(
                    "the range overlaps price book {other} of the same meter and customer scope; \
                     ranges are half-open [effective_from, effective_to): end one where the other begins"
                ),
                None => "the range overlaps another price book of the same meter and customer \
                         scope; ranges are half-open [effective_from, effective_to)"
                    .to_owned(),
            },
        ),
        PriceBookError::NotFound => ApiError::NotFound,
        PriceBookError::Invalid(errors) => ApiError::Validation(errors),
        PriceBookError::Database(e) => e.into(),
    }
}

/// A fresh id: `pb_` and 64 random bits in hex.
/// A book's selector names keys its meter groups by: a key the meter does not group by would match no
/// window (a meter's windows carry exactly its `group_by` keys), so it is refused rather than stored to
/// price nothing.
async fn selector_keys_are_grouped_by(
    conn: &mut sqlx::PgConnection,
    book: &meterflow_model::PriceBook,
) -> Result<(), ApiError> {
    let selectors: Vec<(String, &meterflow_model::Dimensions)> = if book.is_card() {
        book.entries
            .iter()
            .enumerate()
            .map(|(i, e)| (format!("entries[{i}].dimensions"), &e.dimensions))
            .collect()
    } else {
        vec![("dimensions".to_owned(), &book.dimensions)]
    };
    if selectors.iter().all(|(_, d)| d.is_empty()) {
        return Ok(());
    }
    let meters = meterflow_store::meters::list_meters(conn, Some(&book.meter)).await?;
    let group_by: Vec<String> = meters
        .first()
        .map(|(m, _)| m.group_by.keys().to_vec())
        .unwrap_or_default();
    let errors: Vec<meterflow_model::FieldError> = selectors
        .iter()
        .flat_map(|(field, d)| d.iter().map(move |(key, _)| (field, key)))
        .filter(|(_, key)| !group_by.iter().any(|k| k == *key))
        .map(|(field, key)| {
            meterflow_model::FieldError::new(
                format!("{field}.{key}"),
                format!(
                    "is not a group_by key of meter {} (its group_by: {group_by:?}); create the                      meter with group_by first",
                    book.meter
                ),
            )
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Validation(errors))
    }
}

fn new_id() -> String {
    format!("pb_{:016x}", rand::random::<u64>())
}

fn view(stored: StoredPriceBook) -> Result<PriceBookView, ApiError> {
    let StoredPriceBook {
        book,
        created_at,
        updated_at,
    } = stored;
    let instant = |micros: i64| {
        DateTime::from_timestamp_micros(micros).ok_or_else(|| {
            ApiError::Internal(format!("a stored instant is out of range: {micros}"))
        })
    };
    Ok(PriceBookView {
        effective_from: instant(book.effective_from)?,
        effective_to: book.effective_to.map(instant).transpose()?,
        model: (!book.is_card()).then(|| model_json(&book.model)),
        entries: book.is_card().then(|| {
            book.entries
                .iter()
                .map(|e| EntryView {
                    dimensions: e.dimensions.clone(),
                    model: model_json(&e.model),
                })
                .collect()
        }),
        minimum_per_period: book.minimum_per_period.as_ref().map(decimal_number),
        price_book_id: book.price_book_id,
        meter: book.meter,
        customer_id: book.customer_id,
        dimensions: book.dimensions,
        currency: book.currency,
        created_at,
        updated_at,
    })
}

/// A model as JSON with its decimals as exact numbers.
fn model_json(model: &PriceModel) -> Value {
    let number = |d: &Decimal| Value::Number(decimal_number(d));
    let tiers = |tiers: &[Tier]| -> Vec<Value> {
        tiers
            .iter()
            .map(|t| {
                json!({
                    "up_to": t.up_to.as_ref().map(number),
                    "unit_price": number(&t.unit_price),
                    "flat_fee": number(&t.flat_fee),
                })
            })
            .collect()
    };
    match model {
        PriceModel::PerUnit { unit_price } => {
            json!({"type": "per_unit", "unit_price": number(unit_price)})
        }
        PriceModel::Graduated { tiers: t } => json!({"type": "graduated", "tiers": tiers(t)}),
        PriceModel::Volume { tiers: t } => json!({"type": "volume", "tiers": tiers(t)}),
        PriceModel::Package {
            package_size,
            package_price,
        } => json!({
            "type": "package",
            "package_size": number(package_size),
            "package_price": number(package_price),
        }),
    }
}

/// This module's routes: each row routes its handler and documents it, with the role it needs
/// ([`Route`]).
pub(crate) const ROUTES: &[Route] = &[
    Route {
        verb: Verb::Post,
        path: "/api/v1/price-books",
        access: Access::Admin,
        scope: Scope::Refused,
        audit: Some(Audit {
            action: "price_book.create",
            entity: "price_book",
            snapshot: Entity::PriceBook,
            id: IdFrom::Body("price_book_id"),
        }),
        idempotent: true,
        summary: "Create a price book",
        handler: |m, _| limited(on(m, create), MAX_BODY_BYTES),
        spec: || {
            op(
                vec![],
                Some(body(
                    schema::<NewPriceBook>(),
                    json!({"meter": "api_calls", "currency": "USD",
                           "effective_from": "2024-01-01T00:00:00Z",
                           "model": {"type": "graduated", "tiers": [
                               {"up_to": 1000, "unit_price": "0"},
                               {"up_to": null, "unit_price": "0.002"}]},
                           "minimum_per_period": "10.00"}),
                )),
                vec![
                    (201, ok("Created", schema::<PriceBookView>())),
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
        scope: Scope::Shared,
        audit: None,
        idempotent: false,
        summary: "Price books in (meter, effective_from) order",
        handler: |m, _| on(m, list),
        spec: || {
            op(
                params::<PriceBookQuery>(),
                None,
                vec![
                    (200, ok("A page of price books", page::<PriceBookView>())),
                    (400, problem("BAD_REQUEST: a bad filter, limit or cursor")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Get,
        path: "/api/v1/price-books/{price_book_id}",
        access: Access::Read,
        scope: Scope::Shared,
        audit: None,
        idempotent: false,
        summary: "One price book",
        handler: |m, _| on(m, get_one),
        spec: || {
            op(
                vec![path_param("price_book_id")],
                None,
                vec![
                    (200, ok("The price book", schema::<PriceBookView>())),
                    (404, problem("NOT_FOUND")),
                ],
            )
        },
    },
    Route {
        verb: Verb::Patch,
        path: "/api/v1/price-books/{price_book_id}",
        access: Access::Admin,
        scope: Scope::Refused,
        audit: Some(Audit {
            action: "price_book.update",
            entity: "price_book",
            snapshot: Entity::PriceBook,
            id: IdFrom::Path("price_book_id"),
        }),
        idempotent: false,
        summary: "Change a price book's model, minimum or end (audited)",
        handler: |m, _| limited(on(m, update), MAX_BODY_BYTES),
        spec: || {
            op(
                vec![path_param("price_book_id")],
                Some(body(
                    schema::<PatchFields>(),
                    json!({"minimum_per_period": null}),
                )),
                vec![
                    (200, ok("The changed price book", schema::<PriceBookView>())),
                    (400, problem("MALFORMED_JSON")),
                    (404, problem("NOT_FOUND")),
                    (409, problem("PRICE_BOOK_OVERLAP")),
                    (413, problem("PAYLOAD_TOO_LARGE")),
                    (422, problem("VALIDATION_FAILED")),
                ],
            )
        },
    },
];
