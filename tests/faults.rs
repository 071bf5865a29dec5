//! Faults of `../shared/RELIABILITY.md` (issue 6): `kill -9` of the pipeline at 20/50/80 % of its input,
//! Postgres crashing (`pg_ctl -m immediate`) and the Kafka broker killed (`kill -9`) while events are
//! posted and aggregated. Every accepted event must be counted exactly once; while a dependency is down
//! the API answers 503 with Retry-After, never 500.
//!
//! These tests stop the shared services, so they live in a test binary of their own (cargo runs test
//! binaries one after another) and take turns within it.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::const_new(());

fn deploy(script: &str, args: &[&str]) {
    let path = format!("{}/deploy/local/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(&path).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{script} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Brings the services back when a fault test ends, also when it fails half-way through its fault, so
/// the tests after it meet running services.
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        let path = format!("{}/deploy/local/up", env!("CARGO_MANIFEST_DIR"));
        let _ = Command::new(path).output();
    }
}

/// RELIABILITY.md "processor crash": `kill -9` with 20, 50 and 80 % of the input committed, then a
/// restart: exactly the uninterrupted result.
#[tokio::test(flavor = "multi_thread")]
async fn a_pipeline_killed_at_20_50_and_80_percent_resumes_exactly() {
    let _turn = SERIAL.lock().await;
    let topic = fresh_topic(4).await;
    let events = random_events(30_000, 31);
    produce_events(&topic, &events);
    let expected = reference(&events);
    for share in [0.2, 0.5, 0.8] {
        let target = (events.len() as f64 * share) as i64;
        // One commit may take the pipeline from below the target to the end (commits merge what is
        // queued): then the kill came too late to test anything, and the share is tried again.
        let mut attempt = 0;
        let url = loop {
            attempt += 1;
            let url = fresh_database().await;
            // A commit every 20 ms even though the whole input waits in the topic: catch-up epochs
            // (2 s while the reader is behind) would commit it all at once, after the kill's mark.
            let mut pipeline = spawn_pipeline(
                &url,
                &topic,
                2,
                &["--epoch-ms", "20", "--catch-up-epoch-ms", "0"],
            );
            let at =
                wait_until_committed(&url, target, Duration::from_secs(120), "the first run").await;
            pipeline.kill();
            if at < events.len() as i64 {
                break url;
            }
            assert!(
                attempt < 5,
                "killed at {at} of {} in {attempt} attempts: the kill must come before the end",
                events.len()
            );
        };
        drain(&url, &topic, 3);
        assert_same(
            &stored_aggregates(&url).await,
            &expected,
            &format!("killed at {share}"),
        );
        let counted = scalar_i64(
            &url,
            "SELECT coalesce(sum(event_count), 0)::bigint FROM aggregations",
        )
        .await;
        let claimed = scalar_i64(
            &url,
            "SELECT count(*) FROM event_ids WHERE counted_partition IS NOT NULL",
        )
        .await;
        assert_eq!(counted, claimed, "every counted event once, by distinct id");
    }
}

/// Posts events one after another until told to stop, recording what each got.
async fn post_until(
    api: &TestApi,
    prefix: &str,
    stop: &std::sync::atomic::AtomicBool,
) -> Vec<(String, u16)> {
    let mut outcomes = Vec::new();
    let mut i = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let id = format!("{prefix}_{i}");
        let event = json!({"event_id": id, "customer_id": format!("c{}", i % 7), "event_type": "api_call",
                           "event_time": "2024-01-15T14:30:00Z"});
        let response = api.post_event(&event).await;
        let status = response.status();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert!(
                response.headers().contains_key("retry-after"),
                "503 carries Retry-After"
            );
        }
        outcomes.push((id, status.as_u16()));
        i += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    outcomes
}

/// After a fault: every 201 is counted exactly once, nothing else is; no answer was a 500.
async fn assert_accepted_counted_once(api: &TestApi, outcomes: &[(String, u16)], fault: &str) {
    assert!(
        outcomes.iter().all(|(_, s)| [201, 503].contains(s)),
        "{fault}: only 201 or 503: {:?}",
        outcomes
            .iter()
            .filter(|(_, s)| ![201, 503].contains(s))
            .take(5)
            .collect::<Vec<_>>()
    );
    let accepted: BTreeSet<&str> = outcomes
        .iter()
        .filter(|(_, s)| *s == 201)
        .map(|(id, _)| id.as_str())
        .collect();
    assert!(
        accepted.len() > 20,
        "{fault}: events were accepted around the fault"
    );
    api.wait_caught_up(Duration::from_secs(120)).await;
    let counted: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM event_ids WHERE counted_partition IS NOT NULL")
            .fetch_all(&api.pool)
            .await
            .unwrap();
    let counted: BTreeSet<&str> = counted.iter().map(String::as_str).collect();
    assert!(
        accepted.is_subset(&counted),
        "{fault}: accepted but never counted: {:?}",
        accepted.difference(&counted).take(5).collect::<Vec<_>>()
    );
    let total = scalar_i64(
        &api.url,
        "SELECT coalesce(sum(event_count), 0)::bigint FROM aggregations",
    )
    .await;
    assert_eq!(total, counted.len() as i64, "{fault}: each counted id once");
}

/// RELIABILITY.md "Postgres restart": Postgres crashes mid-run and comes back; the API answers 503 (with
/// Retry-After) and reports not ready meanwhile; the pipeline's sink retries and resolves its unknown
/// COMMIT; every accepted event counts once.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_crashing_mid_run_loses_and_doubles_nothing() {
    let _turn = SERIAL.lock().await;
    let _restore = Restore;
    let api = spawn_api().await;
    let _pipeline = spawn_pipeline(&api.url, &api.topic, 2, &["--epoch-ms", "50"]);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let fault = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        deploy("fault", &["postgres-crash"]);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let ready = api.get("/readyz").await;
        assert_eq!(
            ready.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready while Postgres is down"
        );
        let body: Value = ready.json().await.unwrap();
        assert_eq!(body["postgres"], "down");
        tokio::time::sleep(Duration::from_secs(2)).await;
        deploy("up", &[]);
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    };
    let (outcomes, ()) = tokio::join!(post_until(&api, "pg", &stop), fault);
    assert!(
        outcomes.iter().any(|(_, s)| *s == 503),
        "some posts met the database down"
    );
    assert_accepted_counted_once(&api, &outcomes, "postgres crash").await;
}

/// RELIABILITY.md "broker restart": the Kafka broker is killed mid-run and restarted; the API answers
/// 503 meanwhile; the consumer resumes; no acknowledged event is lost or doubled.
#[tokio::test(flavor = "multi_thread")]
async fn the_kafka_broker_killed_mid_run_loses_and_doubles_nothing() {
    let _turn = SERIAL.lock().await;
    let _restore = Restore;
    let api = spawn_api().await;
    let _pipeline = spawn_pipeline(&api.url, &api.topic, 2, &["--epoch-ms", "50"]);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let fault = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        deploy("fault", &["kafka-kill"]);
        // Long enough for a produce to time out (10 s) and be answered 503.
        tokio::time::sleep(Duration::from_secs(12)).await;
        deploy("up", &[]);
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    };
    let started = Instant::now();
    let (outcomes, ()) = tokio::join!(post_until(&api, "kafka", &stop), fault);
    assert!(started.elapsed() < Duration::from_secs(120));
    assert!(
        outcomes.iter().any(|(_, s)| *s == 503),
        "some posts met the broker down"
    );
    assert_accepted_counted_once(&api, &outcomes, "broker kill").await;
}
