//! Admission control (issue 14, spike and stress): past what the API can serve it refuses early with
//! 503 `OVERLOADED` (problem+json, Retry-After) instead of queueing without bound; an event answered 201
//! is still stored exactly once, a refused one is not stored, health and metrics stay served, and
//! requests succeed again once the burst is over. Real Postgres and Kafka (tests/common).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn event(id: &str) -> Value {
    json!({
        "event_id": id,
        "customer_id": "cust_admission",
        "event_type": "api_call",
        "event_time": "2024-01-15T14:30:00Z",
        "value": "1",
    })
}

fn settings() -> meterflow_api::Settings {
    meterflow_api::Settings {
        auth: false,
        ..Default::default()
    }
}

/// The API on its own database and topic, with `pool` options of the test's choosing.
async fn spawn_with_pool(
    settings: meterflow_api::Settings,
    pool: sqlx::postgres::PgPoolOptions,
) -> TestApi {
    let url = fresh_database().await;
    let topic = fresh_topic(2).await;
    let pool = pool.connect(&url).await.unwrap();
    let producer = meterflow_api::producer_config(BROKERS).create().unwrap();
    let state =
        meterflow_api::AppState::with_settings(pool.clone(), producer, topic.clone(), settings);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(meterflow_api::serve(
        listener,
        state,
        std::future::pending(),
    ));
    TestApi {
        base,
        pool,
        url,
        topic,
        client: reqwest::Client::new(),
    }
}

/// A refusal: 503, Retry-After, problem+json with code OVERLOADED.
async fn assert_overloaded(response: reqwest::Response) {
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let retry: u64 = retry_after
        .as_deref()
        .expect("a refusal carries Retry-After")
        .parse()
        .unwrap();
    assert!(retry >= 1);
    expect_problem(response, StatusCode::SERVICE_UNAVAILABLE, "OVERLOADED").await;
}

/// `api_refused_total{reason}` as the metrics endpoint shows it (0 when absent).
async fn refused(api: &TestApi, reason: &str) -> u64 {
    counter(api, &format!("api_refused_total{{reason=\"{reason}\"}}"))
        .await
        .unwrap_or(0)
}

/// The value of one counter series (`name{label="value"}`) as the metrics endpoint shows it.
async fn counter(api: &TestApi, series: &str) -> Option<u64> {
    let response = api.get("/metrics").await;
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.unwrap();
    let series = format!("{series} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map(|v| v.trim().parse().unwrap())
}

/// How many times each id is stored.
async fn stored(api: &TestApi, ids: &[String]) -> HashMap<String, i64> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT event_id, count(*) FROM telemetry_events WHERE event_id = ANY($1) GROUP BY event_id",
    )
    .bind(ids)
    .fetch_all(&api.pool)
    .await
    .unwrap();
    rows.into_iter().collect()
}

/// Sends `n` events at once; returns the ids answered 201 and those refused (after checking every
/// refusal is a proper one and nothing else was answered).
async fn burst(api: &TestApi, prefix: &str, n: usize) -> (Vec<String>, Vec<String>) {
    let outcomes = futures::future::join_all((0..n).map(|i| async move {
        let id = format!("{prefix}-{i}");
        let response = api.post_event(&event(&id)).await;
        let status = response.status();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert_overloaded(response).await;
        } else {
            assert_eq!(
                status,
                StatusCode::CREATED,
                "{}",
                response.text().await.unwrap()
            );
        }
        (id, status)
    }))
    .await;
    let (created, refused): (Vec<_>, Vec<_>) = outcomes
        .into_iter()
        .partition(|(_, status)| *status == StatusCode::CREATED);
    (
        created.into_iter().map(|(id, _)| id).collect(),
        refused.into_iter().map(|(id, _)| id).collect(),
    )
}

/// Every 201 is stored exactly once, no refused event is stored, and the API serves again.
async fn assert_nothing_lost_and_recovered(api: &TestApi, created: &[String], refused: &[String]) {
    let counts = stored(api, created).await;
    for id in created {
        assert_eq!(counts.get(id), Some(&1), "{id} was answered 201");
    }
    assert!(
        stored(api, refused).await.is_empty(),
        "a refused event was stored"
    );
    for i in 0..20 {
        let id = format!("after-{}-{i}", created.len());
        let response = api.post_event(&event(&id)).await;
        assert_eq!(response.status(), StatusCode::CREATED, "after the burst");
    }
}

/// With one slot held by a request whose body has not arrived, the next request waits at most the
/// queueing budget and is refused; health and metrics are answered meanwhile; once the slot frees,
/// requests succeed.
#[tokio::test]
async fn a_request_that_cannot_start_in_time_is_refused_and_health_stays_served() {
    let api = spawn_api_with(meterflow_api::Settings {
        max_in_flight: 1,
        queue_timeout: Duration::from_millis(50),
        ..settings()
    })
    .await;
    // Headers and half a body: the request holds the only slot until the rest arrives.
    let held = serde_json::to_vec(&event("held")).unwrap();
    let (head, tail) = held.split_at(held.len() / 2);
    let addr = api.base.trim_start_matches("http://");
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /api/v1/events HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        held.len()
    );
    slow.write_all(request.as_bytes()).await.unwrap();
    slow.write_all(head).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    assert_overloaded(api.post_event(&event("refused")).await).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused early, not after {:?}",
        started.elapsed()
    );
    assert_eq!(api.get("/healthz").await.status(), StatusCode::OK);
    assert_eq!(refused(&api, "queue_time").await, 1);

    slow.write_all(tail).await.unwrap();
    let mut answer = String::new();
    slow.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");

    assert_nothing_lost_and_recovered(&api, &["held".to_owned()], &["refused".to_owned()]).await;
}

/// A burst far past a tiny limit: some requests are refused at once, every 201 is stored exactly once,
/// and afterwards requests succeed again.
#[tokio::test]
async fn a_burst_past_the_limit_is_partly_refused_and_nothing_accepted_is_lost() {
    let api = spawn_api_with(meterflow_api::Settings {
        max_in_flight: 4,
        queue_timeout: Duration::from_millis(5),
        ..settings()
    })
    .await;
    let (created, refused_ids) = burst(&api, "burst", 400).await;
    assert!(!refused_ids.is_empty(), "nothing was refused");
    assert!(!created.is_empty(), "nothing was accepted");
    let counted = refused(&api, "queue_time").await + refused(&api, "in_flight").await;
    assert_eq!(
        counted,
        refused_ids.len() as u64,
        "every refusal is counted"
    );
    assert_nothing_lost_and_recovered(&api, &created, &refused_ids).await;
}

/// A full ingest queue refuses a new event at once instead of making it wait.
#[tokio::test]
async fn a_full_ingest_queue_refuses_at_once() {
    let api = spawn_api_with(meterflow_api::Settings {
        ingest_queue: 1,
        ..settings()
    })
    .await;
    let (created, refused_ids) = burst(&api, "queue", 300).await;
    assert!(!refused_ids.is_empty(), "nothing was refused");
    assert_eq!(
        refused(&api, "ingest_queue").await,
        refused_ids.len() as u64
    );
    assert_nothing_lost_and_recovered(&api, &created, &refused_ids).await;
}

/// No database connection free within the pool's short wait: 503 with Retry-After, counted, not a hang.
#[tokio::test]
async fn no_free_database_connection_is_a_prompt_503() {
    let api = spawn_with_pool(
        settings(),
        meterflow_api::pool_options(1).acquire_timeout(Duration::from_millis(100)),
    )
    .await;
    let held = api.pool.acquire().await.unwrap();
    let started = Instant::now();
    let response = api.get("/api/v1/meters").await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(response.headers().contains_key("retry-after"));
    expect_problem(response, StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE").await;
    assert_eq!(refused(&api, "db_pool").await, 1);
    drop(held);
    assert_eq!(api.get("/api/v1/meters").await.status(), StatusCode::OK);
}

/// Two batches of new customers stored at once, in opposite orders, must not deadlock on the
/// per-customer event-type rows (migration 0013): a deadlock made the group commit fall back to one
/// statement per event, a second's wait and a thousand commits (seen under `seed_aggregation`).
#[tokio::test]
async fn concurrent_batches_of_new_customers_commit_without_falling_back_one_by_one() {
    let api = spawn_api_with(settings()).await;
    let run = unique("dl");
    for round in 0..4 {
        let batch = |k: usize| {
            let mut customers: Vec<usize> = (0..1000).collect();
            // Each request lists the same new customers in an order of its own.
            customers.rotate_left(k * 167);
            if k % 2 == 1 {
                customers.reverse();
            }
            let events: Vec<Value> = customers
                .iter()
                .map(|c| {
                    json!({
                        "event_id": format!("{run}_{round}_{k}_{c}"),
                        "customer_id": format!("{run}_cust_{round}_{c}"),
                        "event_type": "api_call",
                        "event_time": "2024-01-15T14:30:00Z",
                        "value": "1",
                    })
                })
                .collect();
            Value::Array(events)
        };
        let batches: Vec<Value> = (0..6).map(batch).collect();
        let responses = futures::future::join_all(
            batches
                .iter()
                .map(|b| api.post_json("/api/v1/events/batch", b)),
        )
        .await;
        for response in responses {
            assert_eq!(response.status(), StatusCode::OK);
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["accepted"], 1000, "{body}");
        }
    }
    // Neither fell back nor needed the retry: the lock order alone keeps them apart.
    for outcome in ["one_by_one", "retried"] {
        let series = format!("api_group_commits_total{{outcome=\"{outcome}\"}}");
        assert_eq!(counter(&api, &series).await, Some(0), "{series}");
    }
}
