//! API keys and the gate every `/api/v1` request passes (SPEC §8, RELIABILITY "Security").
//!
//! ```text
//!  request ─► gate: Authorization: Bearer mf_<key_id>_<secret>
//!               no/unknown/revoked key ─► 401 UNAUTHORIZED (WWW-Authenticate: Bearer)
//!               role < route's role    ─► 403 FORBIDDEN        (ingest < read < admin)
//!               bucket of (key, class) empty ─► 429 RATE_LIMITED (Retry-After)
//!               key bound to a customer, anything not that customer's ─► 404 NOT_FOUND
//!                 (what that is, the route's row declares: its [`Scope`])
//!          ─► Principal in the request's extensions ─► idempotency ─► audit ─► handler
//! ```
//!
//! Keys carry ≥ 128 random bits, so a fast hash is right: only SHA-256 of the whole key is stored and
//! compared in constant time. Verified keys are cached for [`Settings::key_cache_ttl`](crate::Settings)
//! (2 s by default): a revocation is seen within that. With auth off (`MF_AUTH=off`) every request is an
//! unbound admin acting as `auth-off`, and nothing is rate limited.
//!
//! The token buckets are written here, not taken from `governor`, for one reason: a batch of N events
//! is admitted as soon as the key has one token and then overdraws its bucket by N − 1, so a key that
//! sends 1,000-event batches waits its debt off afterwards ([`Gate::spend_batch`]). governor's GCRA can
//! only refuse a request for N cells it does not have now (`check_n`), which would refuse every batch
//! larger than the burst outright. The buckets are 20 lines (`refill`, `take_from`).

mod scope;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, RawPathParams, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use meterflow_store::keys;
use meterflow_store::owners::{self, Owned};
use rand::Rng;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::openapi::{Access, Route};
use crate::{ApiError, AppState};
use scope::confine;
pub use scope::{Caller, Scope};

/// What a key may do; each role may do everything the weaker ones may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Send and void events.
    Ingest,
    /// Also every GET under `/api/v1`.
    Read,
    /// Everything.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Ingest => "ingest",
            Role::Read => "read",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "ingest" => Some(Role::Ingest),
            "read" => Some(Role::Read),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// Who is asking: in every `/api/v1` request's extensions once the gate let it through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// `None` with auth off.
    pub key_id: Option<String>,
    pub role: Role,
    /// A bound key sees only this customer.
    pub customer_id: Option<String>,
}

impl Principal {
    /// What the audit log records as the actor: the key id, or `auth-off`.
    pub fn actor(&self) -> &str {
        self.key_id.as_deref().unwrap_or("auth-off")
    }

    /// The principal of every request when auth is off.
    pub fn auth_off() -> Principal {
        Principal {
            key_id: None,
            role: Role::Admin,
            customer_id: None,
        }
    }
}

/// A token bucket's refill rate and size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub per_sec: f64,
    pub burst: f64,
}

/// Keys look like `mf_<key_id>_<secret>`: 12 hex digits of id (48 bits, for lookup and logs) and 48 hex
/// digits of secret (192 bits).
pub const KEY_PREFIX: &str = "mf_";

/// A new key: `(key_id, key)`. Only the hash of `key` is ever stored.
pub fn generate() -> (String, String) {
    let mut rng = rand::rng();
    let id: [u8; 6] = rng.random();
    let secret: [u8; 24] = rng.random();
    let key_id = hex(&id);
    let key = format!("{KEY_PREFIX}{key_id}_{}", hex(&secret));
    (key_id, key)
}

/// SHA-256 of the whole key.
pub fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The key id of a well-formed key.
fn key_id_of(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hexes = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hexes(id, 12) && hexes(secret, 48)).then_some(id)
}

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub use meterflow_store::keys::KeyInfo;

/// Stores a new key and audits it (as `actor`); returns it with the key itself, which is shown once.
pub async fn create_key(
    pool: &PgPool,
    role: Role,
    customer_id: Option<&str>,
    name: &str,
    actor: &str,
) -> Result<(KeyInfo, String), sqlx::Error> {
    let (key_id, key) = generate();
    let key_hash = hash(&key);
    let new = keys::NewKey {
        key_id,
        key_hash: key_hash.as_slice(),
        role: role.as_str(),
        customer_id,
        name,
    };
    Ok((keys::create(pool, new, actor).await?, key))
}

/// Every key, oldest first (never their secrets: only hashes are stored).
pub async fn list_keys(pool: &PgPool) -> Result<Vec<KeyInfo>, sqlx::Error> {
    keys::list(pool).await
}

/// Revokes a key and audits it; `false` if there is no such key or it was already revoked.
pub async fn revoke_key(pool: &PgPool, key_id: &str, actor: &str) -> Result<bool, sqlx::Error> {
    keys::revoke(pool, key_id, actor).await
}

/// A key as the gate knows it.
#[derive(Clone, Debug)]
struct StoredKey {
    hash: Vec<u8>,
    role: Role,
    customer_id: Option<String>,
    revoked: bool,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Most key lookups in the database at once, whoever asks: a flood of unknown keys cannot take the
/// connections that admitted requests need.
const CONCURRENT_LOOKUPS: usize = 8;

/// The gate's memory: recently verified keys and the rate-limit buckets.
pub struct Gate {
    /// By key id: the stored key (`None`: no such key) and when it was read.
    keys: Mutex<HashMap<String, (Option<StoredKey>, Instant)>>,
    /// By key id and route class (`true`: ingest).
    buckets: Mutex<HashMap<(String, bool), Bucket>>,
    /// Before any key is known: database lookups of key ids not in the cache, per client address.
    lookups: Mutex<HashMap<std::net::IpAddr, Bucket>>,
    /// Lookups running now.
    looking_up: tokio::sync::Semaphore,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            keys: Mutex::default(),
            buckets: Mutex::default(),
            lookups: Mutex::default(),
            looking_up: tokio::sync::Semaphore::new(CONCURRENT_LOOKUPS),
        }
    }
}

/// Refills `bucket` at `rate` up to now.
fn refill(bucket: &mut Bucket, rate: Rate, now: Instant) {
    let elapsed = now.duration_since(bucket.at).as_secs_f64();
    bucket.tokens = (bucket.tokens + elapsed * rate.per_sec).min(rate.burst);
    bucket.at = now;
}

/// Takes a token from `bucket` (refilled at `rate`), or says in how many seconds one is there.
fn take_from(bucket: &mut Bucket, rate: Rate, now: Instant) -> Result<(), u64> {
    refill(bucket, rate, now);
    if bucket.tokens >= 1.0 {
        bucket.tokens -= 1.0;
        Ok(())
    } else {
        Err(((1.0 - bucket.tokens) / rate.per_sec).ceil().max(1.0) as u64)
    }
}

impl Gate {
    /// The principal of `key`, or 401. A key id not in the cache costs a database lookup, which is
    /// limited per client address (429 beyond `lookup_rate`).
    async fn verify(
        &self,
        pool: &PgPool,
        key: &str,
        ttl: Duration,
        client: Option<std::net::IpAddr>,
        lookup_rate: Rate,
    ) -> Result<Principal, ApiError> {
        let key_id = key_id_of(key).ok_or(ApiError::Unauthorized)?;
        let cached = {
            let keys = self
                .keys
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            keys.get(key_id)
                .filter(|(_, at)| at.elapsed() < ttl)
                .map(|(k, _)| k.clone())
        };
        let stored = match cached {
            Some(stored) => stored,
            None => {
                {
                    let client =
                        client.unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
                    let mut lookups = self
                        .lookups
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let now = Instant::now();
                    if lookups.len() > 10_000 {
                        // Forget clients whose bucket has refilled: they are as new.
                        let full = lookup_rate.burst / lookup_rate.per_sec;
                        lookups.retain(|_, b| now.duration_since(b.at).as_secs_f64() < full);
                    }
                    let bucket = lookups.entry(client).or_insert(Bucket {
                        tokens: lookup_rate.burst,
                        at: now,
                    });
                    take_from(bucket, lookup_rate, now).map_err(ApiError::RateLimited)?;
                }
                let _permit = self
                    .looking_up
                    .acquire()
                    .await
                    .map_err(|_| ApiError::Unavailable("the key check"))?;
                let row = keys::stored(pool, key_id).await?;
                let stored = row.map(|(hash, role, customer_id, revoked)| StoredKey {
                    hash,
                    role: Role::parse(&role).unwrap_or(Role::Ingest),
                    customer_id,
                    revoked,
                });
                let mut keys = self
                    .keys
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if keys.len() > 10_000 {
                    keys.retain(|_, (_, at)| at.elapsed() < ttl);
                }
                keys.insert(key_id.to_owned(), (stored.clone(), Instant::now()));
                stored
            }
        };
        match stored {
            Some(k) if !k.revoked && constant_time_eq(&hash(key), &k.hash) => Ok(Principal {
                key_id: Some(key_id.to_owned()),
                role: k.role,
                customer_id: k.customer_id,
            }),
            _ => Err(ApiError::Unauthorized),
        }
    }

    /// Takes a token from the key's bucket for this class, or says in how many seconds one is there.
    fn take(&self, key_id: &str, ingest: bool, rate: Rate) -> Result<(), u64> {
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let bucket = buckets
            .entry((key_id.to_owned(), ingest))
            .or_insert(Bucket {
                tokens: rate.burst,
                at: now,
            });
        take_from(bucket, rate, now)
    }

    /// Spends what the rest of a batch costs: the gate took one token for the request, a batch of
    /// `events` takes one per event, in advance. Auth off (no key id): nothing is limited.
    pub fn spend_batch(&self, caller: &Caller, events: usize, rate: Rate) -> Result<(), ApiError> {
        match &caller.0.key_id {
            Some(key_id) if events > 1 => {
                // The request's own token is taken; this one is the debt the batch leaves.
                let mut buckets = self
                    .buckets
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let now = Instant::now();
                let bucket = buckets.entry((key_id.clone(), true)).or_insert(Bucket {
                    tokens: rate.burst,
                    at: now,
                });
                refill(bucket, rate, now);
                // It may go below zero: the key then waits until the bucket refilled.
                bucket.tokens -= (events - 1) as f64;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// The weakest role a route allows, as its row says.
pub fn required_role(access: Access) -> Role {
    match access {
        Access::Ingest => Role::Ingest,
        Access::Read => Role::Read,
        // A public route never asks (the gate passes it); were it asked, the strictest answer.
        Access::Admin | Access::Public => Role::Admin,
    }
}

/// The gate of one route: the app's state and the row it guards.
#[derive(Clone)]
pub struct Guard {
    pub state: AppState,
    pub route: &'static Route,
}

/// The middleware on every route, with its row ([`Guard`]): authenticates, checks the row's role, the
/// rate limit and a bound key's customer (the row's [`Scope`]), and leaves the [`Principal`] in the
/// request's extensions. A public row passes.
pub async fn gate(State(guard): State<Guard>, mut request: Request, next: Next) -> Response {
    let Guard { state, route } = guard;
    if route.access == Access::Public {
        return next.run(request).await;
    }
    if !state.settings.auth {
        request.extensions_mut().insert(Principal::auth_off());
        return next.run(request).await;
    }
    match admit(&state, route, request).await {
        Ok(Admitted::Pass(request)) => next.run(request).await,
        Ok(Admitted::Answer(response)) => response,
        Err(e) => e.into_response(),
    }
}

enum Admitted {
    Pass(Request),
    Answer(Response),
}

async fn admit(
    state: &AppState,
    route: &Route,
    mut request: Request,
) -> Result<Admitted, ApiError> {
    let key = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .ok_or(ApiError::Unauthorized)?;
    let client = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let principal = state
        .gate
        .verify(
            &state.pool,
            key,
            state.settings.key_cache_ttl,
            client,
            state.settings.key_lookup_rate,
        )
        .await?;
    let needed = required_role(route.access);
    if principal.role < needed {
        return Err(ApiError::Forbidden(
            principal.role.as_str(),
            needed.as_str(),
        ));
    }
    // Sending and voiding events have a bucket of their own.
    let ingest = route.access == Access::Ingest;
    let rate = if ingest {
        state.settings.ingest_rate
    } else {
        state.settings.rate
    };
    let key_id = principal.key_id.clone().unwrap_or_default();
    state
        .gate
        .take(&key_id, ingest, rate)
        .map_err(ApiError::RateLimited)?;
    request.extensions_mut().insert(principal.clone());
    match &principal.customer_id {
        None => Ok(Admitted::Pass(request)),
        Some(customer) => confine(state, customer, route.scope, request).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_parses_hashes_and_carries_192_secret_bits() {
        let (id, key) = generate();
        assert_eq!(key_id_of(&key), Some(id.as_str()));
        assert_eq!(key.len(), 3 + 12 + 1 + 48);
        assert!(constant_time_eq(&hash(&key), &hash(&key)));
        assert!(!constant_time_eq(&hash(&key), &hash(&generate().1)));
        assert_eq!(key_id_of("mf_abc_def"), None);
        assert_eq!(key_id_of("Bearer x"), None);
    }

    #[test]
    fn roles_are_ordered_and_routes_need_the_right_one() {
        assert!(Role::Ingest < Role::Read && Role::Read < Role::Admin);
        let needed = |verb: &str, path: &str| {
            let row = crate::openapi::routes()
                .find(|r| r.verb.as_str() == verb && r.path == format!("/api/v1{path}"))
                .unwrap();
            required_role(row.access)
        };
        assert_eq!(needed("post", "/events"), Role::Ingest);
        assert_eq!(needed("post", "/events/{event_id}/void"), Role::Ingest);
        assert_eq!(needed("get", "/invoices"), Role::Read);
        assert_eq!(needed("post", "/invoices"), Role::Admin);
        assert_eq!(needed("patch", "/customers/{customer_id}"), Role::Admin);
    }

    #[test]
    fn a_bucket_refuses_past_its_burst_and_says_when_to_retry() {
        let gate = Gate::default();
        let rate = Rate {
            per_sec: 1.0,
            burst: 2.0,
        };
        assert!(gate.take("a", false, rate).is_ok());
        assert!(gate.take("a", false, rate).is_ok());
        assert_eq!(gate.take("a", false, rate), Err(1));
        assert!(gate.take("a", true, rate).is_ok(), "another class");
        assert!(gate.take("b", false, rate).is_ok(), "another key");
    }

    #[test]
    fn a_bound_caller_may_act_only_for_its_customer() {
        let p = |c: Option<&str>| {
            Caller(Principal {
                key_id: None,
                role: Role::Admin,
                customer_id: c.map(str::to_owned),
            })
        };
        assert!(p(None).may_act_for("b").is_ok());
        assert!(p(Some("a")).may_act_for("a").is_ok());
        assert!(matches!(
            p(Some("a")).may_act_for("b"),
            Err(ApiError::NotFound)
        ));
        let asked = |c: Option<&str>| c.map(str::to_owned);
        assert_eq!(
            p(None).narrow(asked(Some("b"))).ok(),
            Some(asked(Some("b")))
        );
        assert_eq!(p(None).narrow(None).ok(), Some(None));
        assert_eq!(p(Some("a")).narrow(None).ok(), Some(asked(Some("a"))));
        assert_eq!(
            p(Some("a")).narrow(asked(Some("a"))).ok(),
            Some(asked(Some("a")))
        );
        assert!(matches!(
            p(Some("a")).narrow(asked(Some("b"))),
            Err(ApiError::NotFound)
        ));
    }
}
