//! Admission control: past what the box can serve, the API refuses early and cheaply (503 `OVERLOADED`,
//! problem+json, `Retry-After`) instead of queueing without bound (issue 14: under the seed's spike the
//! API once queued everything, p99 4.7 s, RSS 13 → 292 MB).
//!
//! ```text
//!  request ─► health, readiness, metrics? ──────────────────────────────────────► served, never limited
//!          ─► a free slot (api.max_in_flight)? ─────────────────────────────────► handler
//!          ─► else: as many waiting as there are slots already? ─► 503 OVERLOADED   (reason in_flight)
//!          ─► else: wait for a slot, at most api.queue_timeout_ms ─► got one ─► handler
//!                                                                  └ timed out ─► 503 OVERLOADED (queue_time)
//!  inside:  ingest queue full (api.ingest_queue) ─► 503 OVERLOADED at once          (ingest_queue)
//!           no Postgres connection within api.pool_acquire_timeout_ms ─► 503 UNAVAILABLE (db_pool)
//!           a key's token bucket spent ─► 429 RATE_LIMITED                          (rate_limit)
//!           not answered within api.request_timeout_secs ─► 503 TIMEOUT             (request_timeout)
//! ```
//! The request timeout runs inside the slot (one middleware layer fewer per request).
//! Every such answer is counted in `api_refused_total{reason}` (see [`Refused`]), so a load test can
//! tell which bound gave way first; `api_requests_in_flight` and `api_requests_waiting` show the slots.
//!
//! Why this shape: a bound on requests in flight bounds memory (each holds at most one body) and, by
//! Little's law, latency (in flight ÷ throughput); a short bounded wait for a slot absorbs the burstiness
//! of arrivals without refusing a request a slot would have taken a millisecond later, yet a request that
//! cannot start within the budget is refused rather than served too late to matter. tower's
//! `ConcurrencyLimit` waits without bound and `load_shed` refuses without any wait, and neither exempts
//! the health routes or says why it refused; the same semantics on tokio's fair (FIFO) [`Semaphore`]
//! take a few lines. The permit is taken before the body is read, so a body's memory is counted too.
//!
//! The default of 128 slots (4 per pool connection): by Little's law, at the ~3,700 req/s the 2-core
//! box serves the seed's mix, 128 in flight is ~35 ms of queueing. Measured with `load spike` (2,000
//! users, 20,000 req/s offered): 256 slots served 3,740 req/s during the spike with p99 1.08 s counted
//! from each request's scheduled start, 128 served 2,900 req/s with p99 0.54 s, 64 served 2,000 req/s
//! with p99 0.28 s. The seed asks for a bounded p99 under the spike; 128 keeps it well under a second
//! while giving up the least throughput. The 32 pool connections serve the reads among them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use crate::error::{ApiError, Overload};
use crate::AppState;

/// Requests served at once by default (`api.max_in_flight`).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 128;
/// Longest wait for a slot by default (`api.queue_timeout_ms`).
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_millis(100);

/// Routes never limited: probes and scrapes must be answered, above all under overload.
pub const EXEMPT: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// Why a request was refused (or given up on): the `reason` label of `api_refused_total`. Carried in
/// the response's extensions from where the refusal is made to the metrics middleware.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// As many requests were already waiting for a slot as there are slots.
    InFlight,
    /// No slot came free within the queueing budget.
    QueueTime,
    /// The group commit's queue was full.
    IngestQueue,
    /// No Postgres connection came free within the pool's wait.
    DbPool,
    /// A key's token bucket was spent (429).
    RateLimit,
    /// Not answered within the request timeout.
    RequestTimeout,
}

impl Refused {
    pub const ALL: [Refused; 6] = [
        Refused::InFlight,
        Refused::QueueTime,
        Refused::IngestQueue,
        Refused::DbPool,
        Refused::RateLimit,
        Refused::RequestTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refused::InFlight => "in_flight",
            Refused::QueueTime => "queue_time",
            Refused::IngestQueue => "ingest_queue",
            Refused::DbPool => "db_pool",
            Refused::RateLimit => "rate_limit",
            Refused::RequestTimeout => "request_timeout",
        }
    }
}

/// The slots and the count of requests waiting for one.
pub struct Admission {
    slots: Arc<Semaphore>,
    /// Most requests waiting for a slot at once.
    max_waiting: usize,
    waiting: AtomicUsize,
    queue_timeout: Duration,
}

impl Admission {
    /// `max_in_flight` slots (at least one); as many may wait, each at most `queue_timeout`.
    pub fn new(max_in_flight: usize, queue_timeout: Duration) -> Self {
        let slots = max_in_flight.clamp(1, Semaphore::MAX_PERMITS);
        Admission {
            slots: Arc::new(Semaphore::new(slots)),
            max_waiting: slots,
            waiting: AtomicUsize::new(0),
            queue_timeout,
        }
    }

    /// Requests waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// Decrements a counter when dropped (also when the client goes away mid-wait).
struct Count<'a>(&'a AtomicUsize);

impl Drop for Count<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The middleware: runs the request in a slot, or refuses it (see the module doc).
pub async fn admit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let limit = state.settings.request_timeout;
    if EXEMPT.contains(&request.uri().path()) {
        return crate::middleware::within(limit, request, next).await;
    }
    let admission = &state.admission;
    let permit = match admission.slots.clone().try_acquire_owned() {
        Ok(permit) => permit,
        Err(_) => {
            if admission.waiting.fetch_add(1, Ordering::AcqRel) >= admission.max_waiting {
                admission.waiting.fetch_sub(1, Ordering::AcqRel);
                return ApiError::Overloaded(Overload::InFlight).into_response();
            }
            let waiting = Count(&admission.waiting);
            let acquired = tokio::time::timeout(
                admission.queue_timeout,
                admission.slots.clone().acquire_owned(),
            )
            .await;
            drop(waiting);
            match acquired {
                Ok(Ok(permit)) => permit,
                _ => return ApiError::Overloaded(Overload::QueueTime).into_response(),
            }
        }
    };
    state.metrics.in_flight.inc();
    let _served = InFlight {
        gauge: &state.metrics.in_flight,
        _permit: permit,
    };
    crate::middleware::within(limit, request, next).await
}

/// A slot taken: gives it back and lowers `api_requests_in_flight` when the request ends (also when the
/// client goes away).
struct InFlight<'a> {
    gauge: &'a prometheus::IntGauge,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_distinct_labels() {
        let mut labels: Vec<&str> = Refused::ALL.iter().map(|r| r.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Refused::ALL.len());
    }

    #[tokio::test]
    async fn a_zero_limit_still_serves_one_at_a_time() {
        let admission = Admission::new(0, Duration::from_millis(1));
        assert_eq!(admission.slots.available_permits(), 1);
        assert_eq!(admission.max_waiting, 1);
    }
}
