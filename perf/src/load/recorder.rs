//! Every request's outcome: latency from its scheduled start (HdrHistogram, per endpoint and per
//! second of the run), its class (ok, refused with or without `Retry-After`, error), and the event ids
//! the API answered 201 for, which the loss check looks for afterwards.

use std::collections::BTreeMap;
use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::{Endpoint, BATCH_EVENTS};

/// How a request ended.
pub struct Outcome {
    status: Option<u16>,
    /// `Retry-After` in seconds, when the answer carried one.
    pub retry_after: Option<u64>,
    /// Event ids the API accepted: a 201, or a batch's items answered 201.
    accepted: Accepted,
}

enum Accepted {
    None,
    All,
    Some(Vec<usize>),
}

impl Outcome {
    /// Reads the status (and a batch's per-item results) off a response.
    pub async fn of(
        response: Result<reqwest::Response, reqwest::Error>,
        endpoint: Endpoint,
    ) -> Outcome {
        let Ok(response) = response else {
            return Outcome::transport();
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
        let accepted = match (endpoint, status) {
            (Endpoint::PostEvent, 201) => Accepted::All,
            (Endpoint::PostBatch, 200) => match response.json::<Value>().await {
                Ok(body) => Accepted::Some(batch_accepted(&body)),
                Err(_) => return Outcome::transport(),
            },
            _ => Accepted::None,
        };
        Outcome {
            status: Some(status),
            retry_after,
            accepted,
        }
    }

    /// No HTTP answer: a connection error or the 10 s timeout.
    pub fn transport() -> Outcome {
        Outcome {
            status: None,
            retry_after: None,
            accepted: Accepted::None,
        }
    }

    fn class(&self, endpoint: Endpoint) -> Class {
        match (endpoint, self.status) {
            (_, None) => Class::Error,
            (Endpoint::PostEvent, Some(201)) => Class::Ok,
            (Endpoint::PostEvent, Some(_)) if self.status.is_some_and(|s| s < 300) => Class::Error,
            (_, Some(s)) if (200..300).contains(&s) => Class::Ok,
            (_, Some(429 | 503)) if self.retry_after.is_some() => Class::Refused,
            (_, Some(_)) => Class::Error,
        }
    }
}

/// The indexes of a batch's items answered 201.
fn batch_accepted(body: &Value) -> Vec<usize> {
    body["results"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter(|r| r["status"] == 201)
                .filter_map(|r| r["index"].as_u64())
                .filter_map(|i| usize::try_from(i).ok())
                .filter(|i| *i < BATCH_EVENTS)
                .collect()
        })
        .unwrap_or_default()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Ok,
    /// 429 or 503 with `Retry-After`: the informative refusal admission control gives.
    Refused,
    /// Anything else: another status, or no answer at all.
    Error,
}

fn histogram(sigfig: u8) -> Histogram<u64> {
    // 1 µs .. 100 s; `new_with_bounds` only fails for bounds like these being wrong.
    Histogram::new_with_bounds(1, 100_000_000, sigfig)
        .unwrap_or_else(|_| Histogram::new(sigfig).unwrap_or_else(|_| unreachable!()))
}

struct EndpointStats {
    /// From the scheduled start to the answer (µs): what a user waited, open loop.
    latency: Histogram<u64>,
    /// From the actual send to the answer (µs): the server's time alone.
    service: Histogram<u64>,
    ok: u64,
    refused: u64,
    errors: u64,
    statuses: BTreeMap<String, u64>,
}

impl EndpointStats {
    fn new() -> Self {
        EndpointStats {
            latency: histogram(3),
            service: histogram(3),
            ok: 0,
            refused: 0,
            errors: 0,
            statuses: BTreeMap::new(),
        }
    }
}

#[derive(Default)]
struct Second {
    started: u64,
    /// Requests a user did not send because it was told to retry later (honouring `Retry-After`).
    deferred: u64,
    ok: u64,
    refused: u64,
    errors: u64,
    latency: Option<Histogram<u64>>,
}

struct Inner {
    endpoints: BTreeMap<Endpoint, EndpointStats>,
    seconds: Vec<Second>,
    accepted: Vec<String>,
    deferred: u64,
}

/// Shared by every goose user.
pub struct Recorder {
    start: Instant,
    inner: Mutex<Inner>,
}

impl Recorder {
    pub fn new() -> Self {
        Recorder {
            start: Instant::now(),
            inner: Mutex::new(Inner {
                endpoints: BTreeMap::new(),
                seconds: Vec::new(),
                accepted: Vec::new(),
                deferred: 0,
            }),
        }
    }

    pub fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn second(inner: &mut Inner, at: usize) -> &mut Second {
        if inner.seconds.len() <= at {
            inner.seconds.resize_with(at + 1, Second::default);
        }
        &mut inner.seconds[at]
    }

    fn index(&self, at: Instant) -> usize {
        at.saturating_duration_since(self.start).as_secs() as usize
    }

    /// `n` requests due at `due` were not sent: the user honours a `Retry-After`.
    pub fn deferred(&self, due: Instant, n: u64) {
        let at = self.index(due);
        if let Ok(mut inner) = self.inner.lock() {
            Self::second(&mut inner, at).deferred += n;
            inner.deferred += n;
        }
    }

    /// A request began (counted in the second it was due: the offered rate).
    pub fn started(&self, due: Instant) {
        let at = self.index(due);
        if let Ok(mut inner) = self.inner.lock() {
            Self::second(&mut inner, at).started += 1;
        }
    }

    pub fn finished(
        &self,
        endpoint: Endpoint,
        due: Instant,
        sent: Instant,
        done: Instant,
        outcome: Outcome,
        ids: Vec<String>,
    ) {
        let latency = micros(done.saturating_duration_since(due));
        let service = micros(done.saturating_duration_since(sent));
        let class = outcome.class(endpoint);
        let at = self.index(done);
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let stats = inner
            .endpoints
            .entry(endpoint)
            .or_insert_with(EndpointStats::new);
        let _ = stats.latency.record(latency);
        let _ = stats.service.record(service);
        let status = outcome
            .status
            .map_or_else(|| "no answer".to_owned(), |s| s.to_string());
        *stats.statuses.entry(status).or_default() += 1;
        match class {
            Class::Ok => stats.ok += 1,
            Class::Refused => stats.refused += 1,
            Class::Error => stats.errors += 1,
        }
        let second = Self::second(&mut inner, at);
        match class {
            Class::Ok => second.ok += 1,
            Class::Refused => second.refused += 1,
            Class::Error => second.errors += 1,
        }
        let _ = second
            .latency
            .get_or_insert_with(|| histogram(2))
            .record(latency);
        match outcome.accepted {
            Accepted::None => {}
            Accepted::All => inner.accepted.extend(ids),
            Accepted::Some(indexes) => {
                for i in indexes {
                    if let Some(id) = ids.get(i) {
                        inner.accepted.push(id.clone());
                    }
                }
            }
        }
    }

    /// The ids answered 201, in no particular order.
    pub fn accepted(&self) -> Vec<String> {
        self.inner
            .lock()
            .map(|i| i.accepted.clone())
            .unwrap_or_default()
    }

    /// Per endpoint and overall: counts, classes, statuses and latency percentiles (ms).
    pub fn summary(&self) -> Value {
        let Ok(inner) = self.inner.lock() else {
            return json!({});
        };
        let mut all_latency = histogram(3);
        let mut all_service = histogram(3);
        let (mut ok, mut refused, mut errors) = (0, 0, 0);
        let mut endpoints = serde_json::Map::new();
        for (endpoint, s) in &inner.endpoints {
            let _ = all_latency.add(&s.latency);
            let _ = all_service.add(&s.service);
            ok += s.ok;
            refused += s.refused;
            errors += s.errors;
            endpoints.insert(endpoint.name().to_owned(), endpoint_json(s));
        }
        let total = ok + refused + errors;
        json!({
            "requests": total, "ok": ok, "refused": refused, "errors": errors,
            "error_rate": ratio(errors, total), "refused_rate": ratio(refused, total),
            "non_2xx_rate": ratio(refused + errors, total),
            "deferred_by_retry_after": inner.deferred,
            "latency_ms": percentiles(&all_latency), "service_ms": percentiles(&all_service),
            "endpoints": endpoints,
        })
    }

    /// Per second of the run: requests due (offered), answers by class and latency percentiles (ms).
    pub fn timeline(&self) -> Vec<Value> {
        let Ok(inner) = self.inner.lock() else {
            return vec![];
        };
        inner
            .seconds
            .iter()
            .enumerate()
            .map(|(t, s)| {
                let p = s.latency.as_ref().map(|h| {
                    json!({"p50": ms(h.value_at_quantile(0.5)), "p99": ms(h.value_at_quantile(0.99)),
                           "max": ms(h.max())})
                });
                json!({"t": t, "offered": s.started, "deferred": s.deferred, "ok": s.ok, "refused": s.refused,
                       "errors": s.errors, "latency_ms": p})
            })
            .collect()
    }

    /// Latency percentiles (ms) of the answers completed between `from` and `to` seconds.
    pub fn window(&self, from: usize, to: usize) -> Value {
        let Ok(inner) = self.inner.lock() else {
            return json!(null);
        };
        let mut h = histogram(2);
        let (mut ok, mut refused, mut errors) = (0, 0, 0);
        for s in inner
            .seconds
            .iter()
            .skip(from)
            .take(to.saturating_sub(from))
        {
            if let Some(l) = &s.latency {
                let _ = h.add(l);
            }
            ok += s.ok;
            refused += s.refused;
            errors += s.errors;
        }
        json!({"from_s": from, "to_s": to, "ok": ok, "refused": refused, "errors": errors,
               "latency_ms": percentiles(&h)})
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

fn endpoint_json(s: &EndpointStats) -> Value {
    let total = s.ok + s.refused + s.errors;
    json!({
        "requests": total, "ok": s.ok, "refused": s.refused, "errors": s.errors,
        "error_rate": ratio(s.errors, total), "statuses": s.statuses,
        "latency_ms": percentiles(&s.latency), "service_ms": percentiles(&s.service),
    })
}

fn percentiles(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!(null);
    }
    json!({
        "p50": ms(h.value_at_quantile(0.5)), "p90": ms(h.value_at_quantile(0.9)),
        "p99": ms(h.value_at_quantile(0.99)), "p999": ms(h.value_at_quantile(0.999)),
        "max": ms(h.max()), "mean": (h.mean() / 10.0).round() / 100.0,
    })
}

fn ms(micros: u64) -> f64 {
    (micros as f64 / 10.0).round() / 100.0
}

fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}
