//! `GET /api/v1/charges`: the window charges the pipeline committed (SPEC §5), filtered, in key order,
//! with keyset pagination behind an opaque cursor (SPEC §8). Amounts are unrounded and shown with their
//! exact digits.

use axum::extract::{RawQuery, State};
use axum::Json;
use chrono::{DateTime, Utc};
use meterflow_store::results;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::auth::Scope;
use crate::dimension_filter::{self, cursor_dimensions};
use crate::error::ApiError;
use crate::openapi::{ok, op, page, params, problem, Access, Route, Verb};
use crate::page::{Cursor, Page};
use crate::time::exclusive_end;
use crate::AppState;
use axum::routing::on;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ChargeQuery {
    /// Only this customer's.
    customer_id: Option<String>,
    /// Only this meter's.
    meter: Option<String>,
    /// Windows starting at or after this instant.
    #[serde(alias = "window_start")]
    from: Option<DateTime<Utc>>,
    /// Windows starting before this instant (`…T23:59:59.999Z` is the instant that follows).
    #[serde(alias = "window_end")]
    to: Option<DateTime<Utc>>,
    /// Page size.
    #[param(minimum = 1, maximum = 1000, default = 100)]
    limit: Option<i64>,
    /// The `next_cursor` of the previous page (opaque).
    cursor: Option<String>,
}

/// A window's charge: its quantity priced by the book in force at the window's start, period to date.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Charge {
    customer_id: String,
    meter: String,
    /// The window's values of the meter's `group_by` keys, `{"model": "large", "region": null}`;
    /// `{}` for a meter without `group_by`.
    #[schema(value_type = Object)]
    dimensions: meterflow_model::Dimensions,
    window_start: DateTime<Utc>,
    window_end: DateTime<Utc>,
    #[serde(serialize_with = "meterflow_model::json::serialize_decimal")]
    #[schema(value_type = meterflow_model::openapi::Decimal)]
    quantity: Decimal,
    #[serde(serialize_with = "meterflow_model::json::serialize_decimal")]
    #[schema(value_type = meterflow_model::openapi::Decimal)]
    amount: Decimal,
    currency: String,
    price_book_id: String,
    revision: i32,
    updated_at: DateTime<Utc>,
}

pub async fn list(
    State(state): State<AppState>,
    caller: crate::auth::Caller,
    RawQuery(raw): RawQuery,
) -> Result<Json<Page<Charge>>, ApiError> {
    let (q, selector): (ChargeQuery, _) = dimension_filter::split(raw.as_deref())?;
    let selector = selector.map(|s| s.to_string());
    // A bound key's list is its own customer's: another one asked for is 404.
    let customer = caller.narrow(q.customer_id.clone())?;
    let limit = crate::page::limit(q.limit)?;
    let after = q.cursor.as_deref().map(Cursor::decode).transpose()?;
    let after_dimensions = after
        .as_ref()
        .map(|c| cursor_dimensions(&c.3))
        .transpose()?;
    let page = results::WindowPage {
        customer_id: customer.as_deref(),
        meter: q.meter.as_deref(),
        from: q.from,
        to: q.to.map(exclusive_end),
        dimensions: selector.as_deref(),
        after: after
            .as_ref()
            .zip(after_dimensions.as_deref())
            .map(|(c, d)| (c.0.as_str(), c.1.as_str(), c.2, d)),
        limit: limit + 1,
    };
    let data: Vec<Charge> = results::charges(&state.pool, page)
        .await?
        .into_iter()
        .map(|r| Charge {
            customer_id: r.customer_id,
            meter: r.meter,
            dimensions: r.dimensions.0,
            window_start: r.window_start,
            window_end: r.window_end,
            quantity: r.quantity,
            amount: r.amount,
            currency: r.currency,
            price_book_id: r.price_book_id,
            revision: r.revision,
            updated_at: r.updated_at,
        })
        .collect();
    Ok(Json(Page::from_overfetched(data, limit, |c| {
        Cursor(
            c.customer_id.clone(),
            c.meter.clone(),
            c.window_start,
            c.dimensions.to_string(),
        )
        .encode()
    })))
}

/// This module's routes: each row routes its handler and documents it, with the role it needs
/// ([`Route`]).
pub(crate) const ROUTES: &[Route] = &[Route {
    verb: Verb::Get,
    path: "/api/v1/charges",
    access: Access::Read,
    scope: Scope::List,
    audit: None,
    idempotent: false,
    summary: "Window charges, unrounded",
    handler: |m, _| on(m, list),
    spec: || {
        op(
            params::<ChargeQuery>(),
            None,
            vec![
                (200, ok("A page of charges", page::<Charge>())),
                (
                    400,
                    problem(&format!(
                        "BAD_REQUEST: a bad filter, limit or cursor. {}",
                        dimension_filter::DOC
                    )),
                ),
            ],
        )
    },
}];
