//! The seed's load scenarios (`../shared/seed/performance-requirements.md` §1–§4), driven by
//! [goose](https://book.goose.rs), a Rust load-testing framework in the style of Locust.
//!
//! ```text
//!  goose test plan (users over time) ──► each user: a fixed cadence (rate ÷ users), so the arrival
//!        rate follows the plan, not the server ──► pick POST /events │ GET /aggregations │ GET /charges
//!        ──► Recorder: latency from the *scheduled* start (HdrHistogram per endpoint and per second),
//!            status classes, the ids answered 201
//!  Sampler (1 s): RSS, fds and CPU of api, pipeline, Kafka, Postgres; pool connections; disk
//!  after the plan: loss check (every 201 stored once, everything stored aggregated once) ─► JSON + HTML
//! ```
//!
//! Open loop: a user sends its n-th request at `start + n × cadence`, whether or not its previous answer
//! came back in time. A user that falls behind sends its overdue requests at once, and the latency of
//! each is counted from when it was due, so a stalled server shows as latency instead of as a lower
//! arrival rate (coordinated omission). The users in the plan bound the requests in flight, as k6's
//! `constant-arrival-rate` executor bounds them with its virtual users.

pub mod chart;
pub mod recorder;
pub mod sampler;

use std::sync::Arc;
use std::time::Duration;

use goose::config::GooseConfiguration;
use goose::prelude::*;
use rand::{Rng, SeedableRng};
use reqwest::header::CONTENT_TYPE;
use tokio::time::Instant;

pub use recorder::Recorder;

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum Endpoint {
    /// `POST /api/v1/events` with the seed's payload.
    PostEvent,
    /// `GET /api/v1/aggregations?customer_id=…`.
    GetAggregations,
    /// `GET /api/v1/charges?customer_id=…`.
    GetCharges,
    /// `POST /api/v1/events/batch` with [`BATCH_EVENTS`] of the seed's events.
    PostBatch,
    /// `GET /healthz`: no work at all, the floor of the load tool and the HTTP stack on this box.
    Health,
}

/// Events per batch request in the batch scenario.
pub const BATCH_EVENTS: usize = 1000;

impl Endpoint {
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::PostEvent => "POST /api/v1/events",
            Endpoint::GetAggregations => "GET /api/v1/aggregations",
            Endpoint::GetCharges => "GET /api/v1/charges",
            Endpoint::PostBatch => "POST /api/v1/events/batch",
            Endpoint::Health => "GET /healthz",
        }
    }
}

/// The request mix and each user's cadence.
#[derive(Debug, Clone)]
pub struct Mix {
    /// Endpoints with weights (the seed's 70/20/10).
    pub weights: Vec<(Endpoint, u32)>,
    /// Requests per second each user sends.
    pub per_user_rate: f64,
    /// Distinct customers (the seed's `cust_${__VU % 100}`).
    pub customers: usize,
    /// Makes event ids unique to this run.
    pub run: String,
    /// Whether a user told 429/503 with `Retry-After: n` waits n seconds (skipping the requests due
    /// meanwhile), as a well-behaved client does; otherwise it keeps its cadence regardless.
    pub honour_retry_after: bool,
}

impl Mix {
    fn pick(&self, rng: &mut impl Rng) -> Endpoint {
        let total: u32 = self.weights.iter().map(|(_, w)| w).sum();
        let mut roll = rng.random_range(0..total.max(1));
        for (endpoint, weight) in &self.weights {
            if roll < *weight {
                return *endpoint;
            }
            roll -= weight;
        }
        Endpoint::PostEvent
    }

    fn period(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.per_user_rate.max(1e-3))
    }
}

/// One user's schedule.
struct Pace {
    next: Instant,
    paused_until: Option<Instant>,
    n: u64,
    rng: rand::rngs::SmallRng,
}

/// The goose transaction: one paced request.
pub fn transaction(mix: Arc<Mix>, recorder: Arc<Recorder>) -> Transaction {
    Transaction::new(Arc::new(move |user: &mut GooseUser| {
        let (mix, recorder) = (mix.clone(), recorder.clone());
        Box::pin(async move { paced_request(user, &mix, &recorder).await })
    }))
    .set_name("mix")
}

async fn paced_request(user: &mut GooseUser, mix: &Mix, recorder: &Recorder) -> TransactionResult {
    let period = mix.period();
    let index = user.weighted_users_index;
    if user.get_session_data::<Pace>().is_none() {
        // Users start spread over one period, so a ramp does not send in lockstep.
        let mut rng = rand::rngs::SmallRng::seed_from_u64(index as u64);
        let phase = period.mul_f64(rng.random_range(0.0..1.0));
        user.set_session_data(Pace {
            next: Instant::now() + phase,
            paused_until: None,
            n: 0,
            rng,
        });
    }
    let Some(pace) = user.get_session_data_mut::<Pace>() else {
        return Ok(());
    };
    let (due, n) = (pace.next, pace.n);
    if let Some(until) = pace.paused_until.take() {
        if until > due {
            // Told to come back later: the requests due meanwhile are not sent.
            let skipped = (until - due).as_secs_f64() / period.as_secs_f64();
            let skipped = skipped.ceil().max(1.0);
            pace.next += period.mul_f64(skipped);
            recorder.deferred(due, skipped as u64);
            return Ok(());
        }
    }
    pace.next += period;
    pace.n += 1;
    let endpoint = mix.pick(&mut pace.rng);
    let customer = format!("cust_{}", index % mix.customers.max(1));
    tokio::time::sleep_until(due).await;
    recorder.started(due);
    let (method, path, body, ids) = match endpoint {
        Endpoint::PostEvent => {
            let id = format!("evt_{}_{index}_{n}", mix.run);
            let body = seed_event(&id, &customer).to_string();
            (
                GooseMethod::Post,
                "/api/v1/events".to_owned(),
                body,
                vec![id],
            )
        }
        Endpoint::PostBatch => {
            let ids: Vec<String> = (0..BATCH_EVENTS)
                .map(|i| format!("evt_{}_{index}_{n}_{i}", mix.run))
                .collect();
            let events: Vec<serde_json::Value> = ids
                .iter()
                .enumerate()
                .map(|(i, id)| seed_event(id, &format!("cust_{}", i % mix.customers.max(1))))
                .collect();
            let body = serde_json::Value::Array(events).to_string();
            (
                GooseMethod::Post,
                "/api/v1/events/batch".to_owned(),
                body,
                ids,
            )
        }
        Endpoint::GetAggregations => (
            GooseMethod::Get,
            format!("/api/v1/aggregations?customer_id={customer}"),
            String::new(),
            vec![],
        ),
        Endpoint::GetCharges => (
            GooseMethod::Get,
            format!("/api/v1/charges?customer_id={customer}"),
            String::new(),
            vec![],
        ),
        Endpoint::Health => (
            GooseMethod::Get,
            "/healthz".to_owned(),
            String::new(),
            vec![],
        ),
    };
    let mut builder = user.get_request_builder(&method, &path)?;
    if !body.is_empty() {
        builder = builder.header(CONTENT_TYPE, "application/json").body(body);
    }
    let request = GooseRequest::builder()
        .method(method)
        .path(path.as_str())
        .name(endpoint.name())
        .set_request_builder(builder)
        .build();
    let sent = Instant::now();
    let outcome = match user.request(request).await {
        Ok(goose) => recorder::Outcome::of(goose.response, endpoint).await,
        Err(_) => recorder::Outcome::transport(),
    };
    let done = Instant::now();
    if let (true, Some(secs)) = (mix.honour_retry_after, outcome.retry_after) {
        if let Some(pace) = user.get_session_data_mut::<Pace>() {
            pace.paused_until = Some(done + Duration::from_secs(secs));
        }
    }
    recorder.finished(endpoint, due, sent, done, outcome, ids);
    Ok(())
}

/// The seed's payload (§1): no value (it counts one), event time now.
fn seed_event(id: &str, customer: &str) -> serde_json::Value {
    serde_json::json!({
        "event_id": id,
        "customer_id": customer,
        "event_time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "event_type": "api_call",
    })
}

/// A goose test plan: users over time, as `(users, seconds)` steps ramped linearly.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub steps: Vec<(usize, u64)>,
}

impl Plan {
    /// Goose's `--test-plan` spelling: `"100,60s;100,600s;0,60s"`.
    pub fn goose(&self) -> String {
        self.steps
            .iter()
            .map(|(users, secs)| format!("{users},{secs}s"))
            .collect::<Vec<_>>()
            .join(";")
    }

    pub fn seconds(&self) -> u64 {
        self.steps.iter().map(|(_, s)| s).sum()
    }

    /// Users the plan asks for at `t` seconds (linear within a step).
    pub fn users_at(&self, t: f64) -> f64 {
        let (mut from, mut start) = (0.0, 0.0);
        for (users, secs) in &self.steps {
            let end = start + *secs as f64;
            if t < end {
                let f = if *secs == 0 {
                    1.0
                } else {
                    (t - start) / *secs as f64
                };
                return from + (*users as f64 - from) * f;
            }
            from = *users as f64;
            start = end;
        }
        from
    }

    /// Holds at each level for `secs`, reaching it within one second: the seed's stepped profiles.
    pub fn stepped(levels: &[usize], secs: u64) -> Plan {
        let mut steps = Vec::new();
        for &users in levels {
            steps.push((users, 1));
            steps.push((users, secs.saturating_sub(1)));
        }
        steps.push((0, 1));
        Plan { steps }
    }
}

/// Runs `plan` against `base` with goose; every request goes through `recorder`.
pub async fn drive(
    base: &str,
    plan: &Plan,
    mix: Arc<Mix>,
    recorder: Arc<Recorder>,
    goose_report: Option<&str>,
) -> anyhow::Result<()> {
    let goose = |e: GooseError| anyhow::anyhow!("goose: {e:?}");
    let mut attack = GooseAttack::initialize_with_config(GooseConfiguration::default())
        .map_err(goose)?
        .register_scenario(scenario!("seed").register_transaction(transaction(mix, recorder)))
        .set_default(GooseDefault::Host, base)
        .map_err(goose)?
        .set_default(GooseDefault::TestPlan, plan.goose().as_str())
        .map_err(goose)?
        .set_default(GooseDefault::Timeout, "10")
        .map_err(goose)?
        .set_default(GooseDefault::NoTelnet, true)
        .map_err(goose)?
        .set_default(GooseDefault::NoWebSocket, true)
        .map_err(goose)?
        .set_default(GooseDefault::Quiet, 1)
        .map_err(goose)?;
    attack = match goose_report {
        // Goose's own metrics and HTML report, at some CPU cost per request.
        Some(path) => attack
            .set_default(GooseDefault::ReportFile, path)
            .map_err(goose)?
            .set_default(GooseDefault::NoPrintMetrics, true)
            .map_err(goose)?,
        // Only the recorder's: goose then spends nothing on per-request metrics.
        None => attack
            .set_default(GooseDefault::NoMetrics, true)
            .map_err(goose)?,
    };
    attack.execute().await.map_err(goose)?;
    Ok(())
}
