//! Re-rating jobs (SPEC §7, issue 5) on real Kafka and Postgres: the seed's concurrency test 4, and a
//! job that restores tampered rows, charges and upcoming lines exactly — in Postgres and in the running
//! pipeline's state, so later usage is rated from the corrected values.

mod common;

use std::time::{Duration, Instant};

use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;

const WAIT: Duration = Duration::from_secs(90);

async fn start_job(api: &TestApi, scope: &Value) -> reqwest::Response {
    api.post_json("/api/v1/rerating-jobs", scope).await
}

async fn wait_for_job(api: &TestApi, job_id: &str) -> Value {
    let started = Instant::now();
    loop {
        let job = api
            .get_json(&format!("/api/v1/rerating-jobs/{job_id}"))
            .await;
        if job["status"] == "succeeded" || job["status"] == "failed" {
            return job;
        }
        assert!(started.elapsed() < WAIT, "the job did not finish: {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn event(id: &str, customer: &str, kind: &str, time: &str, value: &str) -> Value {
    json!({"event_id": id, "customer_id": customer, "event_type": kind, "event_time": time, "value": value})
}

/// The seed's concurrency test 4: a second job over an overlapping scope fails while the first runs,
/// and can start (pending) once the first has finished.
#[tokio::test(flavor = "multi_thread")]
async fn an_overlapping_job_is_refused_until_the_first_finishes() {
    let api = spawn_api().await;
    let _pipeline = spawn_pipeline(&api.url, &api.topic, 2, &["--epoch-ms", "50"]);
    for i in 0..5 {
        let e = event(
            &format!("r{i}"),
            "cust_123",
            "api_call",
            "2024-01-10T10:00:00Z",
            "2",
        );
        assert_eq!(api.post_event(&e).await.status(), StatusCode::CREATED);
    }
    api.wait_caught_up(WAIT).await;
    let scope = json!({"customer_ids": ["cust_123"], "window_start": "2024-01-01T00:00:00Z",
                       "window_end": "2024-01-31T23:59:59.999Z", "reason": "seed test 4"});
    let first = start_job(&api, &scope).await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["status"], "pending");
    let second = start_job(&api, &scope).await;
    expect_problem(second, StatusCode::CONFLICT, "RERATING_IN_PROGRESS").await;
    // Another customer's scope does not overlap.
    let other = json!({"customer_ids": ["cust_999"], "from": "2024-01-01T00:00:00Z",
                       "to": "2024-02-01T00:00:00Z"});
    assert_eq!(start_job(&api, &other).await.status(), StatusCode::ACCEPTED);

    let done = wait_for_job(&api, first["job_id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        done["to"], "2024-02-01T00:00:00.000Z",
        "…23:59:59.999Z means the next instant"
    );
    assert!(done["windows_checked"].as_i64().unwrap() >= 1, "{done}");
    assert_eq!(done["windows_changed"], 0, "nothing had drifted: {done}");
    let again = start_job(&api, &scope).await;
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["status"], "pending");

    let bad = start_job(
        &api,
        &json!({"from": "2024-02-01T00:00:00Z", "to": "2024-01-01T00:00:00Z"}),
    )
    .await;
    let problem = expect_problem(bad, StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_FAILED").await;
    assert!(problem.to_string().contains("\"to\""), "{problem}");
    expect_problem(
        api.get("/api/v1/rerating-jobs/rrj_nope").await,
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    )
    .await;
}

/// Every business column of the rows, charges and upcoming lines, decimals without trailing zeros.
async fn business_state(pool: &PgPool) -> Vec<String> {
    let queries = [
        "SELECT 'agg', customer_id, meter, window_start::text, trim_scale(value)::text, event_count::text
         FROM aggregations ORDER BY 2, 3, 4",
        "SELECT 'item', customer_id, meter, window_start::text, item, count::text
         FROM meter_values ORDER BY 2, 3, 4, 5",
        "SELECT 'charge', customer_id, meter, window_start::text, trim_scale(amount)::text || ' ' || trim_scale(quantity)::text, price_book_id
         FROM charges ORDER BY 2, 3, 4",
        "SELECT 'line', customer_id, meter, period_start::text, trim_scale(amount)::text || ' ' || trim_scale(quantity)::text, windows::text
         FROM upcoming_lines ORDER BY 2, 3, 4",
    ];
    let mut out = Vec::new();
    for q in queries {
        let rows: Vec<(String, String, String, String, String, String)> =
            sqlx::query_as(q).fetch_all(pool).await.unwrap();
        out.extend(rows.into_iter().map(|r| format!("{r:?}")));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_restores_tampered_rows_and_the_pipeline_rates_on_from_the_corrected_state() {
    let api = spawn_api().await;
    let meters = json!({"meter": "peak", "event_type": "gauge", "aggregation": "max",
                        "value_property": "value", "window": "hour"});
    assert_eq!(
        api.post_json("/api/v1/meters", &meters).await.status(),
        StatusCode::CREATED
    );
    for (id, meter, price) in [("pb_calls", "api_call", "0.5"), ("pb_peak", "peak", "1")] {
        sqlx::query(
            "INSERT INTO price_books (price_book_id, meter, currency, effective, model)
             VALUES ($1, $2, 'USD', '[2024-01-01,)', $3)",
        )
        .bind(id)
        .bind(meter)
        .bind(json!({"type": "per_unit", "unit_price": price}))
        .execute(&api.pool)
        .await
        .unwrap();
    }
    let mut pipeline = spawn_pipeline(&api.url, &api.topic, 2, &["--epoch-ms", "50"]);
    let events = [
        event("t1", "cust_t", "api_call", "2024-01-10T10:05:00Z", "4"),
        event("t2", "cust_t", "api_call", "2024-01-10T11:05:00Z", "6"),
        event("t3", "cust_t", "gauge", "2024-01-10T10:10:00Z", "7"),
        event("t4", "cust_t", "gauge", "2024-01-10T11:10:00Z", "9"),
        event("t5", "cust_t", "gauge", "2024-01-10T11:20:00Z", "3"),
    ];
    for e in &events {
        assert_eq!(api.post_event(e).await.status(), StatusCode::CREATED);
    }
    api.wait_caught_up(WAIT).await;
    // Charges follow within a second of the commit that holds the rows.
    let deadline = Instant::now() + WAIT;
    while scalar_i64(&api.url, "SELECT count(*) FROM charges").await < 4 {
        assert!(Instant::now() < deadline, "charges never appeared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let truth = business_state(&api.pool).await;
    pipeline.kill();

    // Tamper while the pipeline is down, so its restart loads the tampered state.
    for sql in [
        "UPDATE aggregations SET value = value + 100 WHERE meter = 'api_call' AND window_start = '2024-01-10T10:00:00Z'",
        "DELETE FROM meter_values WHERE meter = 'peak' AND item = '9'",
        "UPDATE charges SET amount = 999 WHERE meter = 'peak'",
        "UPDATE upcoming_lines SET amount = amount + 1",
    ] {
        let hit = sqlx::query(sql).execute(&api.pool).await.unwrap().rows_affected();
        assert!(hit > 0, "tampering changed nothing: {sql}");
    }
    let _pipeline = spawn_pipeline(&api.url, &api.topic, 3, &["--epoch-ms", "50"]);
    api.wait_caught_up(WAIT).await;
    assert_ne!(
        business_state(&api.pool).await,
        truth,
        "the tampering shows"
    );

    let job = start_job(
        &api,
        &json!({"customer_ids": ["cust_t"], "from": "2024-01-10T10:30:00Z",
                                      "to": "2024-01-10T11:00:00Z", "reason": "drift"}),
    )
    .await;
    assert_eq!(job.status(), StatusCode::ACCEPTED);
    let job: Value = job.json().await.unwrap();
    let done = wait_for_job(&api, job["job_id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(done["windows_changed"].as_i64().unwrap() >= 2, "{done}");
    assert_ne!(done["amount_before"], done["amount_after"], "{done}");
    assert_eq!(business_state(&api.pool).await, truth, "restored exactly");

    // The pipeline reloaded the corrected state: a new event in the tampered window adds to the true
    // value (4 + 1), and its charge is rated from it (per unit 0.5 → 2.5), not from the tampered 104.
    let more = event("t6", "cust_t", "api_call", "2024-01-10T10:40:00Z", "1");
    assert_eq!(api.post_event(&more).await.status(), StatusCode::CREATED);
    api.wait_caught_up(WAIT).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let (value, amount): (String, String) = sqlx::query_as(
            "SELECT trim_scale(a.value)::text, trim_scale(c.amount)::text
             FROM aggregations a JOIN charges c USING (customer_id, meter, window_start)
             WHERE a.meter = 'api_call' AND a.window_start = '2024-01-10T10:00:00Z'",
        )
        .fetch_one(&api.pool)
        .await
        .unwrap();
        if (value.as_str(), amount.as_str()) == ("5", "2.5") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "value {value}, charge {amount}: expected 5 and 2.5"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And the peak meter's period-to-date: 10:00 max 7, 11:00 max 9 again → charges 7 and 2.
    let peaks: Vec<String> = sqlx::query_scalar(
        "SELECT trim_scale(amount)::text FROM charges WHERE meter = 'peak' ORDER BY window_start",
    )
    .fetch_all(&api.pool)
    .await
    .unwrap();
    assert_eq!(peaks, ["7", "2"]);
}

/// Review finding 14, as it really was: a job recomputed events from Postgres's jsonb spelling, which
/// unescapes strings and rewrites numbers, so it counted an escaped number (`"100\u0030"`) that the
/// dataflow had skipped, and "corrected" the row. (The review's 4 KiB variant does not happen: the job
/// re-serialised the properties compactly; the test below keeps it as a regression.) Properties are
/// now stored as the decoder's canonical text and rebuilt, not decoded again.
#[tokio::test(flavor = "multi_thread")]
async fn finding_14_a_job_agrees_with_the_dataflow_on_an_escaped_number() {
    let api = spawn_api().await;
    let meter = json!({"meter": "tok", "event_type": "llm", "aggregation": "sum",
                       "value_property": "properties.tokens"});
    assert_eq!(
        api.post_json("/api/v1/meters", &meter).await.status(),
        StatusCode::CREATED
    );
    let _pipeline = spawn_pipeline(&api.url, &api.topic, 1, &["--epoch-ms", "50"]);
    let body = r#"{"event_id":"esc","customer_id":"cust_esc","event_type":"llm","event_time":"2024-01-10T10:00:00Z","properties":{"tokens":"100\u0030"}}"#;
    let posted = api
        .post_raw(
            "/api/v1/events",
            "application/json",
            body.as_bytes().to_vec(),
        )
        .await;
    assert_eq!(posted.status(), StatusCode::CREATED);
    api.wait_caught_up(WAIT).await;
    let scope = json!({"customer_ids": ["cust_esc"], "from": "2024-01-01T00:00:00Z",
                       "to": "2024-02-01T00:00:00Z"});
    let job: Value = start_job(&api, &scope).await.json().await.unwrap();
    let done = wait_for_job(&api, job["job_id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        done["windows_changed"], 0,
        "the job and the dataflow agree: {done}"
    );
    let rows = api
        .get_json("/api/v1/aggregations?customer_id=cust_esc&meter=tok")
        .await;
    assert_eq!(rows["data"][0]["value"].to_string(), "1000", "{rows}");
}

/// The review's 4 KiB variant of finding 14 (not reproducible on b156429; kept as a regression).
#[tokio::test(flavor = "multi_thread")]
async fn finding_14_a_job_keeps_an_event_whose_properties_fill_4_kib() {
    let api = spawn_api().await;
    let _pipeline = spawn_pipeline(&api.url, &api.topic, 1, &["--epoch-ms", "50"]);
    let properties: serde_json::Map<String, Value> =
        (0..455).map(|i| (format!("k{i:03}"), json!(1))).collect();
    assert_eq!(serde_json::to_string(&properties).unwrap().len(), 4096);
    let mut e = event("full", "cust_4k", "api_call", "2024-01-10T10:00:00Z", "3");
    e["properties"] = Value::Object(properties);
    assert_eq!(api.post_event(&e).await.status(), StatusCode::CREATED);
    api.wait_caught_up(WAIT).await;
    let scope = json!({"customer_ids": ["cust_4k"], "from": "2024-01-01T00:00:00Z",
                       "to": "2024-02-01T00:00:00Z"});
    let job: Value = start_job(&api, &scope).await.json().await.unwrap();
    let done = wait_for_job(&api, job["job_id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["windows_changed"], 0, "nothing had drifted: {done}");
    let rows = api
        .get_json("/api/v1/aggregations?customer_id=cust_4k&meter=api_call")
        .await;
    assert_eq!(rows["data"][0]["event_count"], 1, "{rows}");
}

/// Review finding 13b: epochs in flight while a job corrected the stored state were committed after it,
/// with line *deltas* computed from the pipeline's pre-job charges, so `upcoming_lines` drifted from
/// the charges it sums (by the job's own correction), and invoices read the lines. A new meter over
/// past events makes the job correct rows and charges while traffic for the same window streams in.
/// This test passes on b156429 too (three rounds, several runs): the drift the review suspected was not
/// reproduced, so no fix was made for it; the test stays as a regression guard.
#[tokio::test(flavor = "multi_thread")]
async fn finding_13b_upcoming_lines_equal_their_charges_after_a_job_under_traffic() {
    let api = spawn_api().await;
    let _pipeline = spawn_pipeline(&api.url, &api.topic, 1, &["--epoch-ms", "20"]);
    let post = |api: &TestApi, i: usize| {
        let e = event(
            &format!("t{i}"),
            "cust_13b",
            "llm",
            "2024-01-10T10:00:00Z",
            "1",
        );
        let (client, base) = (api.client.clone(), api.base.clone());
        async move {
            let r = client
                .post(format!("{base}/api/v1/events"))
                .json(&e)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::CREATED);
        }
    };
    for i in 0..50 {
        post(&api, i).await;
    }
    api.wait_caught_up(WAIT).await;
    let meter = json!({"meter": "m2", "event_type": "llm", "aggregation": "sum",
                       "value_property": "value"});
    assert_eq!(
        api.post_json("/api/v1/meters", &meter).await.status(),
        StatusCode::CREATED
    );
    let book = json!({"meter": "m2", "effective_from": "2024-01-01T00:00:00Z",
                      "model": {"type": "per_unit", "unit_price": "0.5"}});
    assert_eq!(
        api.post_json("/api/v1/price-books", &book).await.status(),
        StatusCode::CREATED
    );
    tokio::time::sleep(Duration::from_secs(2)).await; // the pipeline picks up the meter and book
    for round in 0..3 {
        let traffic = {
            let (client, base) = (api.client.clone(), api.base.clone());
            tokio::spawn(async move {
                for i in 0..150 {
                    let e = event(
                        &format!("s{round}-{i}"),
                        "cust_13b",
                        "llm",
                        "2024-01-10T10:00:00Z",
                        "1",
                    );
                    let _ = client
                        .post(format!("{base}/api/v1/events"))
                        .json(&e)
                        .send()
                        .await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let scope = json!({"customer_ids": ["cust_13b"], "from": "2024-01-01T00:00:00Z",
                           "to": "2024-02-01T00:00:00Z"});
        let job: Value = start_job(&api, &scope).await.json().await.unwrap();
        let done = wait_for_job(&api, job["job_id"].as_str().unwrap()).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        traffic.await.unwrap();
    }
    api.wait_caught_up(WAIT).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pool = PgPool::connect(&api.url).await.unwrap();
    let (charges, lines): (rust_decimal::Decimal, rust_decimal::Decimal) = sqlx::query_as(
        "SELECT (SELECT COALESCE(sum(amount), 0) FROM charges WHERE customer_id = 'cust_13b' AND meter = 'm2'),
                (SELECT COALESCE(sum(amount), 0) FROM upcoming_lines WHERE customer_id = 'cust_13b' AND meter = 'm2')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(lines, charges, "upcoming lines must add up their charges");
    assert_eq!(
        charges,
        rust_decimal::Decimal::from(250),
        "500 events at 0.5"
    );
}
