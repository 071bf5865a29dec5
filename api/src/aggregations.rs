//! `GET /api/v1/aggregations`: the current aggregate rows, filtered, in key order, with keyset
//! pagination behind an opaque cursor (SPEC §8).

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
use crate::AppState;
use axum::routing::on;

/// Most event ids in one answer of `include=event_ids` (`limit × event_ids_limit`).
pub const MAX_EVENT_IDS_PER_ANSWER: i64 = 10_000;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AggregationQuery {
    /// Only this customer's.
    customer_id: Option<String>,
    /// Only this meter's.
    meter: Option<String>,
    /// Windows starting at or after this instant.
    from: Option<DateTime<Utc>>,
    /// Windows starting before this instant.
    to: Option<DateTime<Utc>>,
    /// Page size.
    #[param(minimum = 1, maximum = 1000, default = 100)]
    limit: Option<i64>,
    /// The `next_cursor` of the previous page (opaque).
    cursor: Option<String>,
    /// `event_ids`: list each window's contributing event ids.
    #[param(pattern = "^event_ids$")]
    include: Option<String>,
    /// Most event ids listed per window (at most 1000, and `limit × event_ids_limit` at most 10,000;
    /// by default as many as that allows, up to 1000).
    #[param(minimum = 1, maximum = 1000)]
    event_ids_limit: Option<i64>,
    /// List event ids after this one (the `event_ids_next_cursor` of a previous answer).
    event_ids_after: Option<String>,
    /// Add the rows up over every dimension but this one: one row per (customer, meter, window,
    /// value of the key). Needs `meter`, a count or sum meter that groups by the key.
    #[param(pattern = "^[a-z0-9_]{1,32}$")]
    total_by: Option<String>,
}

/// A window's aggregate: the meter's value over the customer's events in it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Aggregation {
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
    value: Decimal,
    event_count: i64,
    finalized: bool,
    /// The window's sum left the decimal range: `value` is its last value in range, not its usage
    /// (README "Overflow is data, not a crash"). Shown only when true.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    quarantined: bool,
    revision: i32,
    updated_at: DateTime<Utc>,
    /// With `include=event_ids`: the window's counted event ids, in order.
    #[serde(skip_serializing_if = "Option::is_none")]
    event_ids: Option<Vec<String>>,
    /// Set when the window has more event ids than listed: pass it as `event_ids_after`.
    #[serde(skip_serializing_if = "Option::is_none")]
    event_ids_next_cursor: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    caller: crate::auth::Caller,
    RawQuery(raw): RawQuery,
) -> Result<Json<Page<Aggregation>>, ApiError> {
    let (q, selector): (AggregationQuery, _) = dimension_filter::split(raw.as_deref())?;
    let selector = selector.map(|s| s.to_string());
    // A bound key's list is its own customer's: another one asked for is 404.
    let customer = caller.narrow(q.customer_id.clone())?;
    let with_ids = match q.include.as_deref() {
        None => false,
        Some("event_ids") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "include={other} is not known; the one option is include=event_ids"
            )))
        }
    };
    let limit = crate::page::limit(q.limit)?;
    // Ids per answer are bounded: by default as many per window as fit, at most 1000.
    let ids_limit = match q.event_ids_limit {
        None => (MAX_EVENT_IDS_PER_ANSWER / limit).clamp(1, crate::page::MAX_LIMIT),
        Some(n) => crate::page::limit(Some(n))?,
    };
    if with_ids && limit.saturating_mul(ids_limit) > MAX_EVENT_IDS_PER_ANSWER {
        return Err(ApiError::BadRequest(format!(
            "include=event_ids lists at most {MAX_EVENT_IDS_PER_ANSWER} ids per answer: \
             limit × event_ids_limit is {}; lower one of them",
            limit.saturating_mul(ids_limit)
        )));
    }
    let after = q.cursor.as_deref().map(Cursor::decode).transpose()?;
    let after_dimensions = after
        .as_ref()
        .map(|c| cursor_dimensions(&c.3))
        .transpose()?;
    let page = results::WindowPage {
        customer_id: customer.as_deref(),
        meter: q.meter.as_deref(),
        from: q.from,
        to: q.to,
        dimensions: selector.as_deref(),
        after: after
            .as_ref()
            .zip(after_dimensions.as_deref())
            .map(|(c, d)| (c.0.as_str(), c.1.as_str(), c.2, d)),
        limit: limit + 1,
    };
    let rows = match q.total_by.as_deref() {
        None => results::aggregations(&state.pool, page).await?,
        Some(key) => {
            if with_ids {
                return Err(ApiError::BadRequest(
                    "include=event_ids lists a window's events; a total over dimensions has no \
                     one window: leave out total_by or include"
                        .into(),
                ));
            }
            totals_are_sums(&state, q.meter.as_deref(), key).await?;
            results::aggregation_totals(&state.pool, page, key).await?
        }
    };
    let data: Vec<Aggregation> = rows
        .into_iter()
        .map(|r| Aggregation {
            customer_id: r.customer_id,
            meter: r.meter,
            dimensions: r.dimensions.0,
            window_start: r.window_start,
            window_end: r.window_end,
            value: r.value,
            event_count: r.event_count,
            finalized: r.finalized,
            revision: r.revision,
            updated_at: r.updated_at,
            quarantined: r.quarantined,
            event_ids: None,
            event_ids_next_cursor: None,
        })
        .collect();
    let mut data = data;
    if with_ids {
        // One query for every window of the page.
        let shown = data.len().min(usize::try_from(limit).unwrap_or(usize::MAX));
        let windows = data.get(..shown).unwrap_or_default();
        let dimensions: Vec<String> = windows.iter().map(|a| a.dimensions.to_string()).collect();
        let mut texts = dimensions.iter().map(String::as_str);
        let keys: Vec<results::WindowKey<'_>> = windows
            .iter()
            .map(|a| {
                (
                    a.customer_id.as_str(),
                    a.meter.as_str(),
                    a.window_start,
                    a.window_end,
                    texts.next().unwrap_or("{}"),
                )
            })
            .collect();
        let rows = results::window_event_ids(
            &state.pool,
            &keys,
            q.event_ids_after.as_deref(),
            ids_limit + 1,
        )
        .await?;
        let mut listed: Vec<Vec<String>> = vec![Vec::new(); shown];
        for (i, id) in rows {
            if let Some(ids) = listed.get_mut(i) {
                ids.push(id);
            }
        }
        for (a, mut ids) in data.iter_mut().zip(listed) {
            if ids.len() as i64 > ids_limit {
                ids.truncate(ids_limit as usize);
                a.event_ids_next_cursor = ids.last().cloned();
            }
            a.event_ids = Some(ids);
        }
    }
    Ok(Json(Page::from_overfetched(data, limit, |a| {
        Cursor(
            a.customer_id.clone(),
            a.meter.clone(),
            a.window_start,
            a.dimensions.to_string(),
        )
        .encode()
    })))
}

/// `total_by=<key>` adds values up: it needs a meter named, of a kind whose values add (count, sum),
/// that groups by the key. Anything else is a 400 that says which.
async fn totals_are_sums(state: &AppState, meter: Option<&str>, key: &str) -> Result<(), ApiError> {
    let Some(name) = meter else {
        return Err(ApiError::BadRequest(
            "total_by needs meter=<name>: totals add up one meter's values".into(),
        ));
    };
    let mut conn = state.pool.acquire().await?;
    let meters = meterflow_store::meters::list_meters(&mut conn, Some(name)).await?;
    let Some((meter, _)) = meters.first() else {
        return Err(ApiError::BadRequest(format!(
            "total_by: meter {name} has no group_by (it is not a stored meter)"
        )));
    };
    if !meter.group_by.keys().iter().any(|k| k == key) {
        return Err(ApiError::BadRequest(format!(
            "total_by: meter {name} does not group by {key} (its group_by: {:?})",
            meter.group_by.keys()
        )));
    }
    match meter.aggregation {
        meterflow_model::Aggregation::Count | meterflow_model::Aggregation::Sum => Ok(()),
        other => Err(ApiError::BadRequest(format!(
            "total_by adds values up, and meter {name} is a {} meter, whose values do not add",
            other.as_str()
        ))),
    }
}

/// This module's routes: each row routes its handler and documents it, with the role it needs
/// ([`Route`]).
pub(crate) const ROUTES: &[Route] = &[Route {
    verb: Verb::Get,
    path: "/api/v1/aggregations",
    access: Access::Read,
    scope: Scope::List,
    audit: None,
    idempotent: false,
    summary: "Aggregate rows per customer, meter and window",
    handler: |m, _| on(m, list),
    spec: || {
        op(
                params::<AggregationQuery>(),
                None,
                vec![
                    (200, ok("A page of aggregates", page::<Aggregation>())),
                    (400, problem(&format!("BAD_REQUEST: a bad filter, limit or cursor, or more than 10000 event ids asked for. {}", dimension_filter::DOC))),
                ],
            )
    },
}];
