//! The API's Prometheus metrics, defined once, with bounded labels (route templates, never raw paths or
//! customer ids), and the middleware that records every request.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

use crate::admission::Refused;
use crate::AppState;

pub struct Metrics {
    registry: Registry,
    pub http_duration: HistogramVec,
    pub http_requests: IntCounterVec,
    pub events_ingested: IntCounterVec,
    /// Requests refused or given up on, by which bound: `api_refused_total{reason}` (admission.rs).
    pub refused: IntCounterVec,
    /// Group commits by how they went: `api_group_commits_total{outcome}` (ingest.rs).
    pub group_commits: IntCounterVec,
    /// Requests holding a slot (`api_requests_in_flight`).
    pub in_flight: IntGauge,
    /// Requests waiting for a slot (`api_requests_waiting`), set when scraped.
    waiting: IntGauge,
    /// Events queued for the group commit (`api_ingest_queue_depth`), set when scraped.
    ingest_queue: IntGauge,
    /// The event types with a series of their own so far (at most [`MAX_EVENT_TYPE_LABELS`]).
    event_types: Mutex<HashSet<String>>,
}

/// How a group commit of accepted events went: the `outcome` label of `api_group_commits_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupCommit {
    /// Stored in one statement.
    Stored,
    /// Rolled back as a deadlock or serialization failure, and tried again.
    Retried,
    /// The statement failed, and each event was stored on its own.
    OneByOne,
}

impl GroupCommit {
    pub const ALL: [GroupCommit; 3] = [
        GroupCommit::Stored,
        GroupCommit::Retried,
        GroupCommit::OneByOne,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GroupCommit::Stored => "stored",
            GroupCommit::Retried => "retried",
            GroupCommit::OneByOne => "one_by_one",
        }
    }
}

/// Event types are chosen by clients: past this many distinct ones, further types are counted as
/// `other`, so the label stays bounded.
pub const MAX_EVENT_TYPE_LABELS: usize = 200;

impl Metrics {
    // The definitions are constants: a failure here is a bug found by every test, not data.
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        let registry = Registry::new();
        let http_duration = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "HTTP request latency")
                .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]),
            &["method", "route", "status"],
        )
        .expect("valid metric");
        let http_requests = IntCounterVec::new(
            Opts::new("http_requests_total", "HTTP requests"),
            &["method", "route", "status"],
        )
        .expect("valid metric");
        let events_ingested = IntCounterVec::new(
            Opts::new("events_ingested_total", "Events accepted by the API"),
            &["event_type"],
        )
        .expect("valid metric");
        let refused = IntCounterVec::new(
            Opts::new(
                "api_refused_total",
                "Requests refused (503 OVERLOADED, 503 on no free database connection, 429) or timed \
                 out, by the bound that gave way",
            ),
            &["reason"],
        )
        .expect("valid metric");
        for reason in Refused::ALL {
            refused.with_label_values(&[reason.as_str()]);
        }
        let group_commits = IntCounterVec::new(
            Opts::new(
                "api_group_commits_total",
                "Group commits of accepted events: stored in one statement, retried after a \
                 deadlock or serialization failure, or stored one by one after the statement failed",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        for outcome in GroupCommit::ALL {
            group_commits.with_label_values(&[outcome.as_str()]);
        }
        let in_flight = IntGauge::new("api_requests_in_flight", "Requests holding a slot")
            .expect("valid metric");
        let waiting = IntGauge::new("api_requests_waiting", "Requests waiting for a slot")
            .expect("valid metric");
        let ingest_queue = IntGauge::new(
            "api_ingest_queue_depth",
            "Events queued for the group commit",
        )
        .expect("valid metric");
        for m in [
            Box::new(http_duration.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(http_requests.clone()),
            Box::new(events_ingested.clone()),
            Box::new(refused.clone()),
            Box::new(group_commits.clone()),
            Box::new(in_flight.clone()),
            Box::new(waiting.clone()),
            Box::new(ingest_queue.clone()),
        ] {
            registry.register(m).expect("metric registered once");
        }
        Metrics {
            registry,
            http_duration,
            http_requests,
            events_ingested,
            refused,
            group_commits,
            in_flight,
            waiting,
            ingest_queue,
            event_types: Mutex::new(HashSet::new()),
        }
    }

    /// Adds a batch's accepted events, counted per event type, to `events_ingested_total`.
    pub fn count_ingested(&self, per_type: &HashMap<String, u64>) {
        if per_type.is_empty() {
            return;
        }
        let mut known = self
            .event_types
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for (event_type, n) in per_type {
            let label = if known.contains(event_type) {
                event_type.as_str()
            } else if known.len() < MAX_EVENT_TYPE_LABELS {
                known.insert(event_type.clone());
                event_type.as_str()
            } else {
                "other"
            };
            self.events_ingested.with_label_values(&[label]).inc_by(*n);
        }
    }

    /// Counts one group commit in `api_group_commits_total{outcome}`.
    pub fn count_group_commit(&self, outcome: GroupCommit) {
        self.group_commits
            .with_label_values(&[outcome.as_str()])
            .inc();
    }

    /// Sets the gauges read at scrape time: requests waiting for a slot, events queued for the group
    /// commit.
    pub fn set_queues(&self, waiting: usize, ingest_queue: usize) {
        self.waiting.set(i64::try_from(waiting).unwrap_or(i64::MAX));
        self.ingest_queue
            .set(i64::try_from(ingest_queue).unwrap_or(i64::MAX));
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8(buffer).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The method as a label: the standard ones by name, any extension method (an arbitrary token a
/// client chooses) as `OTHER`, so clients cannot add series.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method as M;
    match *method {
        M::GET => "GET",
        M::HEAD => "HEAD",
        M::POST => "POST",
        M::PUT => "PUT",
        M::DELETE => "DELETE",
        M::PATCH => "PATCH",
        M::OPTIONS => "OPTIONS",
        M::CONNECT => "CONNECT",
        M::TRACE => "TRACE",
        _ => "OTHER",
    }
}

/// Records latency and count per method, route template and status, and refusals by reason.
pub async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    // A clone of the matched path is a reference count, not a copy of the text.
    let route = request.extensions().get::<MatchedPath>().cloned();
    let response = next.run(request).await;
    if let Some(refused) = response.extensions().get::<Refused>() {
        state
            .metrics
            .refused
            .with_label_values(&[refused.as_str()])
            .inc();
    }
    let status = response.status();
    let labels = [
        method,
        route.as_ref().map_or("unmatched", MatchedPath::as_str),
        status.as_str(),
    ];
    state
        .metrics
        .http_duration
        .with_label_values(&labels)
        .observe(started.elapsed().as_secs_f64());
    state.metrics.http_requests.with_label_values(&labels).inc();
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_type_labels_are_bounded() {
        let metrics = Metrics::new();
        for i in 0..MAX_EVENT_TYPE_LABELS + 50 {
            metrics.count_ingested(&HashMap::from([(format!("type_{i}"), 2)]));
        }
        let families = metrics.registry.gather();
        let ingested = families
            .iter()
            .find(|f| f.name() == "events_ingested_total")
            .unwrap();
        assert_eq!(ingested.get_metric().len(), MAX_EVENT_TYPE_LABELS + 1);
        let other = ingested
            .get_metric()
            .iter()
            .find(|m| m.get_label()[0].value() == "other")
            .unwrap();
        assert_eq!(other.get_counter().get_value(), 100.0);
    }
}
