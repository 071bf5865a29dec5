//! The HTTP API (axum): ingestion, reads from Postgres, health and metrics. Knows nothing of timely.
//!
//! | file | owns |
//! |---|---|
//! | `events.rs` | `POST /api/v1/events`: validate, store durably and uniquely, forward to Kafka |
//! | `outbox.rs` | background tasks that clear and relay the event outbox |
//! | `ingest.rs` | group commit: queued events stored in one statement, forwarded to Kafka together |
//! | `events.rs` | also `POST /api/v1/events/batch` and `POST /api/v1/events/{id}/void` |
//! | `meters.rs` | `POST|GET /api/v1/meters` |
//! | `price_books.rs` | `POST|GET /api/v1/price-books`, `GET|PATCH /api/v1/price-books/{id}` (audited) |
//! | `charges.rs` | `GET /api/v1/charges` |
//! | `progress.rs` | `GET /api/v1/progress`, `POST /api/v1/watermark` |
//! | `aggregations.rs` | `GET /api/v1/aggregations` (with `include=event_ids`) |
//! | `dead_letters.rs` | `GET /api/v1/dead-letters` |
//! | `customers.rs` | `POST|GET /api/v1/customers`, `GET|PATCH /api/v1/customers/{id}`, `GET …/{id}/upcoming-invoice` |
//! | `invoices.rs` | `POST|GET /api/v1/invoices`, `GET /api/v1/invoices/{id}`, `POST …/{id}/void`, `GET …/{id}/document` |
//! | `invoice_runs.rs` | `POST /api/v1/invoice-runs`, `GET /api/v1/invoice-runs/{id}`, background runs and their sweeper |
//! | `rerating.rs` | `POST /api/v1/rerating-jobs`, `GET /api/v1/rerating-jobs/{id}`: queued here, run beside the API by `meterflow_sinks::rerating_jobs` |
//! | `page.rs` | list envelopes, page sizes, cursors |
//! | `extract.rs` | [`extract::JsonObject`], the JSON-object body extractor whose rejection is problem+json, and the route body limits it names |
//! | `time.rs` | RFC 3339 instants, and `…T23:59:59.999Z` as the exclusive end that follows |
//! | `error.rs` | [`ApiError`] → problem+json |
//! | `metrics.rs` | Prometheus metrics and the request-tracking middleware |
//! | `openapi.rs` | the route table: the router and the OpenAPI document (`/api/v1/openapi.json`) are built from it; the document's schemas are derived from the request and response types |
//! | `auth.rs` | API keys (create, list, revoke), the gate: key → role → rate limit → a bound key's customer |
//! | `idempotency.rs` | `Idempotency-Key` on the admin POSTs: stored responses replayed, reuse refused |
//! | `audit.rs` | the append-only audit log: who changed what, before and after |
//! | `middleware.rs` | request ids (and the span every log line of a request carries), request timeouts |
//!
//! Data never reaches a panic: outside tests this crate may not unwrap, expect or index (the lints
//! below; `clippy.toml` allows them in tests). Arithmetic on data is checked by hand (money through
//! `meterflow_model::money`).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod admission;
pub mod aggregations;
pub mod audit;
pub mod auth;
pub mod charges;
pub mod customers;
pub mod dead_letters;
pub mod dimension_filter;
pub mod error;
pub mod events;
pub mod extract;
pub mod idempotency;
pub mod ingest;
pub mod invoice_runs;
pub mod invoices;
pub mod meters;
pub mod metrics;
pub mod middleware;
pub mod openapi;
pub mod outbox;
pub mod page;
pub mod price_books;
pub mod progress;
pub mod rerating;
pub mod time;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::{Json, Router};
use meterflow_model::Limits;
use rdkafka::producer::{FutureProducer, Producer};
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub use error::ApiError;
pub use metrics::Metrics;

/// The API's Kafka producer settings: idempotent, acks from all replicas, and a bounded wait — a record
/// Kafka has not taken within 10 s fails, and the request is answered 503 (with the event withdrawn)
/// instead of hanging while the broker is down.
pub fn producer_config(brokers: &str) -> rdkafka::config::ClientConfig {
    let mut config = rdkafka::config::ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "10000")
        .set("linger.ms", "2");
    config
}

/// The API's Postgres pool settings: a request waits at most 3 s for a connection, then is answered 503
/// with Retry-After instead of hanging while the database is down. `meterflow api` shortens the wait
/// to `api.pool_acquire_timeout_ms` (500 ms by default: admission control, see admission.rs).
pub fn pool_options(max_connections: u32) -> sqlx::postgres::PgPoolOptions {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(3))
}

/// Connection options for `url` with a Postgres `statement_timeout` on every connection (zero: none).
/// A statement cancelled by it fails with SQLSTATE 57014, which the API answers 503.
///
/// Every connection also plans each statement for its parameters (`plan_cache_mode =
/// force_custom_plan`). The list queries filter with `($1 IS NULL OR customer_id = $1)`: a cached
/// generic plan cannot use the customer index for that, and walked the whole primary key, 1.2 s per
/// `GET /aggregations` at 1M aggregations in `db_scenario`, where a custom plan takes under 1 ms. Postgres
/// picks generic plans on its own after five executions when it estimates them cheaper, so this is not
/// left to its estimate.
pub fn connect_options(
    url: &str,
    statement_timeout: Duration,
) -> Result<sqlx::postgres::PgConnectOptions, sqlx::Error> {
    let options: sqlx::postgres::PgConnectOptions = url.parse()?;
    let options = options.options([("plan_cache_mode", "force_custom_plan")]);
    Ok(if statement_timeout.is_zero() {
        options
    } else {
        options.options([(
            "statement_timeout",
            format!("{}ms", statement_timeout.as_millis()),
        )])
    })
}

/// A small pool beside `pool` for the statements that run thousands of times a second with the same
/// shape: the group commit's INSERT, its check of duplicates, and the outbox cleaner's DELETE. They
/// need no plan for their parameters, so here Postgres may cache a generic plan (`plan_cache_mode =
/// auto`) instead of planning each call again as [`connect_options`] makes the list queries do (0.2 ms
/// of a 0.8 ms single-event commit, measured with `pg_stat_statements.track_planning` under
/// `load spike`).
fn ingest_pool(pool: &PgPool) -> PgPool {
    let options = (*pool.connect_options())
        .clone()
        .options([("plan_cache_mode", "auto")]);
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(ingest::STORING as u32 + 2)
        .acquire_timeout(pool.options().get_acquire_timeout())
        .connect_lazy_with(options)
}

/// The API's tunables (the `[api]` section of the configuration).
#[derive(Clone, Debug)]
pub struct Settings {
    /// A request not answered within this is answered 503 `TIMEOUT`.
    pub request_timeout: Duration,
    /// Largest body of `POST /api/v1/events`.
    pub max_event_bytes: usize,
    /// Largest body of `POST /api/v1/events/batch`.
    pub max_batch_bytes: usize,
    /// Whether `/api/v1` needs an API key. On by default; off (`MF_AUTH=off`) every request is an
    /// unbound admin acting as `auth-off`, with no rate limits.
    pub auth: bool,
    /// Per-key token bucket of the ingest routes (`POST /events`, `/events/batch`, `/events/{id}/void`).
    pub ingest_rate: auth::Rate,
    /// Per-key token bucket of every other `/api/v1` route.
    pub rate: auth::Rate,
    /// How long a verified key is trusted before it is read again (so a revocation takes this long).
    pub key_cache_ttl: Duration,
    /// Per client address: database lookups of key ids not in the cache (unknown, random or expired
    /// keys), before any key is known; beyond it 429.
    pub key_lookup_rate: auth::Rate,
    /// Requests being served at once, health and metrics apart (`api.max_in_flight`); as many more may
    /// wait up to `queue_timeout` for a slot, any further one is answered 503 `OVERLOADED` at once.
    pub max_in_flight: usize,
    /// Longest a request waits for a slot before its handler starts; then 503 `OVERLOADED`
    /// (`api.queue_timeout_ms`).
    pub queue_timeout: Duration,
    /// Events queued for the group commit; when full, a new event is answered 503 `OVERLOADED` at
    /// once (`api.ingest_queue`).
    pub ingest_queue: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            request_timeout: Duration::from_secs(30),
            max_event_bytes: events::MAX_EVENT_BYTES,
            max_batch_bytes: events::MAX_BATCH_BYTES,
            auth: true,
            ingest_rate: auth::Rate {
                per_sec: 1000.0,
                burst: 2000.0,
            },
            rate: auth::Rate {
                per_sec: 50.0,
                burst: 100.0,
            },
            key_cache_ttl: Duration::from_secs(2),
            key_lookup_rate: auth::Rate {
                per_sec: 20.0,
                burst: 50.0,
            },
            max_in_flight: admission::DEFAULT_MAX_IN_FLIGHT,
            queue_timeout: admission::DEFAULT_QUEUE_TIMEOUT,
            ingest_queue: ingest::DEFAULT_QUEUE,
        }
    }
}

/// Everything a request handler may use: one [`Shared`] behind an `Arc`, because axum clones the state
/// for every middleware and handler of every request (cloning the fields one by one was a tenth of the
/// API's CPU per `POST /api/v1/events`: perf/results/api-profile.md).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] holds.
pub struct Shared {
    pub pool: PgPool,
    /// The group commit's and the outbox cleaner's connections: the same database and timeouts as
    /// `pool`, but Postgres may cache generic plans here (see [`ingest_pool`]).
    pub ingest_pool: PgPool,
    pub producer: FutureProducer,
    pub topic: String,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    /// Ids of events Kafka acknowledged, whose outbox rows can go.
    pub published: outbox::Acks,
    /// The pipeline's committed watermark (µs; `i64::MIN` before any), refreshed every second: events
    /// older than it minus the retention are refused (SPEC §2).
    pub watermark: Arc<AtomicI64>,
    /// Where accepted events queue to be stored and forwarded (group commit).
    pub ingester: ingest::Ingester,
    /// The API's slots: how many requests are served at once, and how long one may wait for a slot.
    pub admission: Arc<admission::Admission>,
    pub settings: Settings,
    /// Verified keys and rate-limit buckets.
    pub gate: Arc<auth::Gate>,
    /// The last readiness answer and when it was checked: `/readyz` checks at most once a second.
    ready: Arc<tokio::sync::Mutex<Option<(std::time::Instant, StatusCode, Ready)>>>,
    /// The process's one shutdown token ([`AppState::stopping`]).
    stop: CancellationToken,
}

impl AppState {
    /// Builds the state with the default [`Settings`] and starts the outbox's background tasks on the
    /// current runtime.
    pub fn new(pool: PgPool, producer: FutureProducer, topic: String) -> Self {
        Self::with_settings(pool, producer, topic, Settings::default())
    }

    /// [`AppState::new`] with these settings.
    pub fn with_settings(
        pool: PgPool,
        producer: FutureProducer,
        topic: String,
        settings: Settings,
    ) -> Self {
        let ingest_pool = ingest_pool(&pool);
        let stop = CancellationToken::new();
        let (published, acked) = outbox::Acks::channel(100_000);
        // Ends once the ingester's last acknowledgement is through (its channel closes), not at `stop`:
        // `drain` waits for it.
        tokio::spawn(outbox::forget_published(ingest_pool.clone(), acked));
        spawn_until(
            &stop,
            outbox::relay(
                pool.clone(),
                producer.clone(),
                topic.clone(),
                Duration::from_secs(5),
                Duration::from_secs(30),
            ),
        );
        let watermark = Arc::new(AtomicI64::new(i64::MIN));
        spawn_until(
            &stop,
            follow_watermark(pool.clone(), topic.clone(), watermark.clone()),
        );
        let (state_tx, state_rx) = tokio::sync::oneshot::channel();
        let state = AppState(Arc::new(Shared {
            pool,
            ingest_pool,
            producer,
            topic,
            limits: Limits::default(),
            metrics: Arc::new(Metrics::new()),
            published,
            watermark,
            ingester: ingest::Ingester::start(state_rx, settings.ingest_queue),
            admission: Arc::new(admission::Admission::new(
                settings.max_in_flight,
                settings.queue_timeout,
            )),
            settings,
            gate: Arc::new(auth::Gate::default()),
            ready: Arc::default(),
            stop: stop.clone(),
        }));
        spawn_until(&stop, invoice_runs::sweep_unfinished(state.pool.clone()));
        let _ = state_tx.send(state.clone());
        state
    }

    /// Waits until every event handed to the ingester is stored and forwarded to Kafka (or refused),
    /// and the outbox rows of those Kafka acknowledged are cleared: after this, stopping the process
    /// leaves nothing for the outbox relay to resend. Call it once the server stopped taking requests.
    pub async fn drain(&self) {
        self.ingester.drain().await;
        self.published.drain().await;
    }

    /// The process's shutdown token: cancelled by [`AppState::stop`] (the binary does on SIGTERM or
    /// Ctrl-C). The server stops taking requests when it is (give [`serve`] its `cancelled()`), and the
    /// background tasks (the outbox relay, the watermark follower, the invoice-run sweeper) end.
    pub fn stopping(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.stop.clone().cancelled_owned()
    }

    /// Cancels the process's shutdown token (see [`AppState::stopping`]).
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

/// Runs a background task until `stop` is cancelled.
fn spawn_until(
    stop: &CancellationToken,
    task: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let stop = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = stop.cancelled() => {}
            () = task => {}
        }
    });
}

/// Keeps `watermark` at the pipeline's committed watermark.
async fn follow_watermark(pool: PgPool, topic: String, watermark: Arc<AtomicI64>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let committed = meterflow_store::results::committed_watermark(&pool, &topic).await;
        if let Ok(Some(w)) = committed {
            watermark.fetch_max(w.timestamp_micros(), Ordering::Relaxed);
        }
    }
}

/// The whole API.
pub fn app(state: AppState) -> Router {
    // Every route comes from the modules' tables (openapi::routes), which the OpenAPI document is
    // built from too. Each route's gate (key, role, rate limit, bound customer) runs before replaying a
    // stored Idempotency-Key response, which runs before auditing the change (openapi::router).
    openapi::router(&state)
        .fallback(|| async { ApiError::NotFound })
        // NUL in the path or query refused, axum's text/plain rejections made problem+json.
        .layer(axum::middleware::from_fn(middleware::problem_rejections))
        // Outermost last: the request id wraps everything (its span covers the metrics and the
        // handler), the metrics see the timeout's 503s.
        // Admission control, and in the slot the request timeout (middleware::within): past the slots
        // a request is refused before anything else runs; inside the metrics, which count refusals.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            admission::admit,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .layer(axum::middleware::from_fn(middleware::request_id))
        .with_state(state)
}

/// Serves `app` on `listener` until `shutdown` resolves; in-flight requests finish first.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // With the client's address: the gate limits key lookups per address.
    axum::serve(
        listener,
        app(state).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// The process answers.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Health {
    status: &'static str,
}

async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Whether Postgres answers and Kafka has the topic.
#[derive(Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct Ready {
    status: Readiness,
    postgres: Up,
    kafka: Up,
    /// When this was checked; answers are shared for about a second.
    #[schema(format = DateTime)]
    checked_at: String,
}

#[derive(Clone, Copy, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
enum Readiness {
    Ready,
    Unavailable,
}

#[derive(Clone, Copy, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
enum Up {
    Up,
    Down,
}

impl Up {
    fn from(up: bool) -> Up {
        if up {
            Up::Up
        } else {
            Up::Down
        }
    }
}

/// Ready when Postgres answers and the Kafka broker has the topic. Checked at most once a second
/// (callers meanwhile share the last answer), so a flood of probes costs no more than one.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let mut last = state.ready.lock().await;
    if let Some((at, status, body)) = last.as_ref() {
        if at.elapsed() < Duration::from_secs(1) {
            return (*status, Json(body.clone()));
        }
    }
    let (status, body) = check_ready(&state).await;
    *last = Some((std::time::Instant::now(), status, body.clone()));
    (status, Json(body))
}

async fn check_ready(state: &AppState) -> (StatusCode, Ready) {
    let db = tokio::time::timeout(
        Duration::from_secs(2),
        meterflow_store::results::ping(&state.pool),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    let producer = state.producer.clone();
    let topic = state.topic.clone();
    let kafka = tokio::task::spawn_blocking(move || {
        producer
            .client()
            .fetch_metadata(Some(&topic), Duration::from_secs(2))
            .is_ok_and(|m| {
                m.topics()
                    .iter()
                    .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
            })
    })
    .await
    .unwrap_or(false);
    let status = if db && kafka {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Ready {
        status: if status == StatusCode::OK {
            Readiness::Ready
        } else {
            Readiness::Unavailable
        },
        postgres: Up::from(db),
        kafka: Up::from(kafka),
        checked_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    };
    (status, body)
}

async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    state
        .metrics
        .set_queues(state.admission.waiting(), state.ingester.queued());
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
