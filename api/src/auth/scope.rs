//! What a key bound to one customer may reach: each route's [`Scope`], enforced by [`confine`] before
//! the handler runs (a path's customer or owner checked, the rest 404), and [`Caller`], with which a
//! handler checks the customer its request names or narrows a list to the key's customer.

use super::*;

/// What a key bound to one customer may reach on a route. Every row of the route table declares it
/// (`openapi::Route::scope`, next to the role), and [`confine`] enforces it before the handler runs: a
/// route cannot be added without saying what a bound key sees on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// About no one customer's data (meters, progress, the document), or filtered by the handler for the
    /// key (price books: the defaults and its own customer's).
    Shared,
    /// A list taking a `customer_id` filter: the handler narrows it to the key's customer
    /// ([`Caller::narrow`]: another one is 404, none becomes the key's).
    List,
    /// The customer list: answered with the key's own customer.
    OwnCustomer,
    /// This path parameter is a customer id, and must be the key's.
    PathCustomer(&'static str),
    /// This path parameter names a thing a customer owns, and the owner must be the key's customer.
    Owned(Owned, &'static str),
    /// The body names the customer: the handler checks the decoded request against the key
    /// ([`Caller::may_act_for`]), whatever JSON shape the body came in.
    Body,
    /// Not one customer's (dead letters, invoice runs, the watermark, meter and price-book writes): 404.
    Refused,
}

impl Scope {
    /// What a bound key sees on the route, for the OpenAPI document.
    pub fn describe(self) -> String {
        match self {
            Scope::Shared => "the same as any key (nothing here is one customer's, or the handler \
                              shows only the defaults and the key's own)"
                .into(),
            Scope::List => "only its own customer's rows; another `customer_id` is 404".into(),
            Scope::OwnCustomer => "only its own customer".into(),
            Scope::PathCustomer(param) => format!("only its own customer as `{param}`, else 404"),
            Scope::Owned(_, param) => {
                format!("only what its own customer owns as `{param}`, else 404")
            }
            Scope::Body => "only its own customer in the body, else 404".into(),
            Scope::Refused => "404: the route is not one customer's".into(),
        }
    }
}

/// A key bound to `customer` sees only that customer: anything else answers 404, as if it did not exist.
/// The route's [`Scope`] says how: a path's customer or owner is checked, the customer list answered
/// with the key's own, routes about no one customer refused; lists and bodies are the handler's
/// ([`Caller`]).
pub(super) async fn confine(
    state: &AppState,
    customer: &str,
    scope: Scope,
    request: Request,
) -> Result<Admitted, ApiError> {
    let (mut parts, body) = request.into_parts();
    let params = RawPathParams::from_request_parts(&mut parts, state)
        .await
        .ok();
    let param = |name: &str| {
        params
            .as_ref()
            .and_then(|p| {
                p.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_owned())
            })
            .unwrap_or_default()
    };
    let owner = |what: Owned, id: String| async move {
        Ok::<_, ApiError>(owners::owner(&state.pool, what, &id).await?)
    };
    let allowed = match scope {
        Scope::Shared => true,
        Scope::List => true,
        Scope::OwnCustomer => {
            let mine = crate::customers::get_one(
                State(state.clone()),
                axum::extract::Path(customer.to_owned()),
            )
            .await;
            let data = match mine {
                Ok(Json(view)) => vec![view],
                Err(ApiError::NotFound) => vec![],
                Err(e) => return Err(e),
            };
            let page = crate::page::Page {
                data,
                next_cursor: None,
            };
            return Ok(Admitted::Answer(Json(page).into_response()));
        }
        Scope::PathCustomer(name) => param(name) == customer,
        Scope::Owned(what, name) => owner(what, param(name)).await? == Some(customer.to_owned()),
        Scope::Body => true,
        Scope::Refused => false,
    };
    if allowed {
        Ok(Admitted::Pass(Request::from_parts(parts, body)))
    } else {
        Err(ApiError::NotFound)
    }
}

/// The caller as the gate admitted it, for handlers: a customer-bound key may act only for its customer.
/// Handlers whose body names a customer decode it first and then call [`Caller::may_act_for`] with the
/// decoded customer, so the check sees exactly what will be stored, whatever JSON shape the body had.
#[derive(Clone, Debug)]
pub struct Caller(pub Principal);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        // Every `/api/v1` route passed the gate, which leaves the principal; without one, refuse.
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .map(Caller)
            .ok_or(ApiError::Unauthorized)
    }
}

impl Caller {
    /// The customer a bound key is bound to.
    pub fn bound(&self) -> Option<&str> {
        self.0.customer_id.as_deref()
    }

    /// The customer a list may show: a bound key's own (another one asked for is 404, none asked for
    /// becomes it), else the one asked for, if any.
    pub fn narrow(&self, asked: Option<String>) -> Result<Option<String>, ApiError> {
        match (self.bound(), asked) {
            (Some(bound), Some(asked)) if asked != bound => Err(ApiError::NotFound),
            (Some(bound), _) => Ok(Some(bound.to_owned())),
            (None, asked) => Ok(asked),
        }
    }

    /// Ok if this caller may act for `customer_id`; a key bound to another customer gets 404, as if the
    /// thing did not exist.
    pub fn may_act_for(&self, customer_id: &str) -> Result<(), ApiError> {
        match self.bound() {
            Some(bound) if bound != customer_id => Err(ApiError::NotFound),
            _ => Ok(()),
        }
    }
}
