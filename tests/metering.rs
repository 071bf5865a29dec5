//! Metering semantics end to end (SPEC §2–§4, issue 3), on real Kafka and Postgres with the real binary:
//! dedup across the API and Kafka, the seed's concurrency tests 1 and 2, late events, voids, meters,
//! bad input over HTTP and over Kafka, CloudEvents and batches.
//!
//! Length: independent end-to-end tests of one area, each readable on its own; shared helpers are in
//! `tests/common`.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use reqwest::StatusCode;
use rust_decimal::Decimal;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

/// Gives the topic a committed watermark before a pipeline starts, as an earlier run would have left.
async fn preset_watermark(url: &str, topic: &str, watermark: &str) {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    sqlx::query(
        "INSERT INTO pipeline_leases (topic, generation, committed_epoch, committed_watermark)
         VALUES ($1, 0, 0, $2::timestamptz)",
    )
    .bind(topic)
    .bind(watermark)
    .execute(&pool)
    .await
    .unwrap();
}

/// The seed's concurrency test 1: the same event_id posted twice at once.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_posts_of_one_event_id_give_201_and_409_and_one_row() {
    let api = spawn_api().await;
    let event = json!({"event_id": "evt_race_123", "customer_id": "cust_123", "event_type": "api_call",
                       "event_time": "2024-01-15T14:30:00Z"});
    let (a, b) = tokio::join!(api.post_event(&event), api.post_event(&event));
    let mut statuses = [a.status().as_u16(), b.status().as_u16()];
    statuses.sort();
    assert_eq!(statuses, [201, 409]);
    let rows = scalar_i64(
        &api.url,
        "SELECT count(*) FROM telemetry_events WHERE event_id = 'evt_race_123'",
    )
    .await;
    assert_eq!(rows, 1);
}

/// The seed's concurrency test 2: ten late events for one finalized window, posted at once, all count
/// exactly once; the window is revised and every one is recorded as late.
#[tokio::test(flavor = "multi_thread")]
async fn ten_concurrent_late_events_for_one_window_count_exactly_once() {
    let api = spawn_api().await;
    let _pipeline = spawn_pipeline(&api.url, &api.topic, 2, &[]);
    // Close 14:00–15:00 (and its hour of allowed lateness) before the events arrive.
    api.advance_watermark("2024-01-15T16:00:01Z", WAIT).await;
    let bodies: Vec<Value> = (0..10)
        .map(|i| {
            json!({"event_id": format!("evt_late_{i}"), "customer_id": "cust_123",
                   "event_type": "api_call", "event_time": "2024-01-15T14:30:00Z"})
        })
        .collect();
    let posts = bodies.iter().map(|b| api.post_event(b));
    for response in futures::future::join_all(posts).await {
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    api.wait_caught_up(WAIT).await;
    let page = api
        .get_json("/api/v1/aggregations?customer_id=cust_123&from=2024-01-15T14:00:00Z&to=2024-01-15T14:00:01Z&include=event_ids")
        .await;
    let agg = &page["data"][0];
    assert_eq!(agg["value"].to_string(), "10", "{page}");
    assert_eq!(agg["event_count"], 10);
    assert_eq!(agg["finalized"], true);
    let ids: BTreeSet<&str> = agg["event_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 10);
    assert!(ids.contains("evt_late_7"));
    let late = scalar_i64(&api.url, "SELECT count(*) FROM late_events").await;
    assert_eq!(late, 10, "every late event is recorded");
    let progress = api.get_json("/api/v1/progress").await;
    assert_eq!(progress["lag_total"], 0);
    assert!(progress["partitions"].as_array().unwrap().len() == 2);
}

/// RELIABILITY.md "duplicate storm": events posted to the API (some twice, at once) and re-produced
/// straight to Kafka, identical or with another payload, count once; the raw store keeps one row per
/// id; an id that arrived only through Kafka is a 409 for the API.
#[tokio::test(flavor = "multi_thread")]
async fn duplicates_from_the_api_and_straight_from_kafka_count_once() {
    let api = spawn_api().await;
    let _pipeline = spawn_pipeline(&api.url, &api.topic, 2, &[]);
    let events = random_events(150, 11)
        .into_iter()
        .filter(|e| !e.invalid)
        .collect::<Vec<_>>();
    let bodies: Vec<Value> = events
        .iter()
        .map(|e| serde_json::from_slice(&e.payload()).unwrap())
        .collect();
    let posts = bodies
        .iter()
        .chain(bodies.iter().step_by(4))
        .map(|b| api.post_event(b));
    let mut statuses: Vec<u16> = futures::future::join_all(posts)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    // A client retries a 503 (the machine may be too loaded to hand out a connection within 3 s):
    // retried or not, each id must end up accepted exactly once.
    let all: Vec<&Value> = bodies.iter().chain(bodies.iter().step_by(4)).collect();
    for _ in 0..20 {
        let retry: Vec<usize> = (0..statuses.len())
            .filter(|i| statuses[*i] == 503)
            .collect();
        if retry.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        for i in retry {
            statuses[i] = api.post_event(all[i]).await.status().as_u16();
        }
    }
    let mut seen = std::collections::BTreeMap::new();
    for s in &statuses {
        *seen.entry(*s).or_insert(0) += 1;
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        events.len(),
        "statuses: {seen:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 201 || *s == 409),
        "statuses: {seen:?}"
    );

    // Straight to Kafka: identical copies, and conflicting ones (same id, another value).
    let mut copies: Vec<(String, Vec<u8>)> = events
        .iter()
        .step_by(10)
        .map(|e| (e.customer.clone(), e.payload()))
        .collect();
    let conflicting: Vec<_> = events.iter().skip(3).step_by(30).collect();
    for e in &conflicting {
        let mut other = (*e).clone();
        other.value += Decimal::ONE;
        copies.push((e.customer.clone(), other.payload()));
    }
    // And events that only ever come through Kafka.
    let kafka_only: Vec<TestEvent> = random_events(20, 12)
        .into_iter()
        .filter(|e| !e.invalid)
        .collect();
    copies.extend(kafka_only.iter().map(|e| (e.customer.clone(), e.payload())));
    produce(&api.topic, &copies);
    api.wait_caught_up(WAIT).await;

    let mut all = events.clone();
    all.extend(kafka_only.iter().cloned());
    assert_same(
        &stored_aggregates(&api.url).await,
        &reference(&all),
        "after the storm",
    );
    assert_eq!(
        scalar_i64(&api.url, "SELECT count(*) FROM telemetry_events").await,
        all.len() as i64,
        "one raw row per event_id"
    );
    assert_eq!(
        scalar_i64(
            &api.url,
            "SELECT count(*) FROM duplicate_events WHERE kind = 'conflicting'"
        )
        .await,
        conflicting.len() as i64,
        "conflicting copies are kept for inspection"
    );
    let again: Value = serde_json::from_slice(&kafka_only[0].payload()).unwrap();
    expect_problem(
        api.post_event(&again).await,
        StatusCode::CONFLICT,
        "DUPLICATE_EVENT",
    )
    .await;
    // Known ids are 409 before any other validation.
    let mut broken = again.clone();
    broken["value"] = json!("-5");
    expect_problem(
        api.post_event(&broken).await,
        StatusCode::CONFLICT,
        "DUPLICATE_EVENT",
    )
    .await;
}

/// Meters through the API: checked, immutable, and applied by a pipeline started after them; a void
/// takes an event back out of every meter, once.
#[tokio::test(flavor = "multi_thread")]
async fn meters_aggregate_each_their_way_and_a_void_retracts_from_all() {
    let api = spawn_api().await;
    let meters = [
        json!({"meter": "gpu_calls", "event_type": "gpu", "aggregation": "count", "window": "minute"}),
        json!({"meter": "gpu_tokens", "event_type": "gpu", "aggregation": "sum", "value_property": "properties.tokens"}),
        json!({"meter": "gpu_peak", "event_type": "gpu", "aggregation": "max", "value_property": "value", "window": "day"}),
        json!({"meter": "gpu_users", "event_type": "gpu", "aggregation": "unique_count", "value_property": "properties.user"}),
        json!({"meter": "gpu_level", "event_type": "gpu", "aggregation": "latest", "value_property": "value"}),
    ];
    for m in &meters {
        assert_eq!(
            api.post_json("/api/v1/meters", m).await.status(),
            StatusCode::CREATED
        );
    }
    assert_eq!(
        api.post_json("/api/v1/meters", &meters[0]).await.status(),
        StatusCode::OK,
        "idempotent"
    );
    let mut other = meters[0].clone();
    other["window"] = json!("hour");
    expect_problem(
        api.post_json("/api/v1/meters", &other).await,
        StatusCode::CONFLICT,
        "METER_EXISTS",
    )
    .await;
    let bad = json!({"meter": "Bad", "event_type": "gpu", "aggregation": "sum"});
    let body = expect_problem(
        api.post_json("/api/v1/meters", &bad).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "VALIDATION_FAILED",
    )
    .await;
    assert_eq!(body["errors"].as_array().unwrap().len(), 2, "{body}");
    let unknown = json!({"meter": "m", "event_type": "gpu", "aggregation": "median"});
    expect_problem(
        api.post_json("/api/v1/meters", &unknown).await,
        StatusCode::BAD_REQUEST,
        "MALFORMED_JSON",
    )
    .await;
    assert_eq!(
        api.get_json("/api/v1/meters").await["data"]
            .as_array()
            .unwrap()
            .len(),
        5
    );

    let _pipeline = spawn_pipeline(&api.url, &api.topic, 1, &[]);
    let gpu = |id: &str, time: &str, value: &str, user: &str, tokens: u32| {
        json!({"event_id": id, "customer_id": "acme", "event_type": "gpu", "event_time": time,
               "value": value, "properties": {"user": user, "tokens": tokens}})
    };
    for e in [
        gpu("g1", "2024-03-01T10:00:10Z", "5.5", "ann", 100),
        gpu("g2", "2024-03-01T10:00:40Z", "9.25", "bob", 50),
        gpu("g3", "2024-03-01T10:20:00Z", "2", "ann", 7),
    ] {
        assert_eq!(api.post_event(&e).await.status(), StatusCode::CREATED);
    }
    api.wait_caught_up(WAIT).await;
    let value = |page: &Value| page["data"][0]["value"].to_string();
    let get = |meter: &str| format!("/api/v1/aggregations?customer_id=acme&meter={meter}");
    assert_eq!(
        api.get_json(&get("gpu_calls")).await["data"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "two minutes"
    );
    assert_eq!(value(&api.get_json(&get("gpu_calls")).await), "2");
    assert_eq!(value(&api.get_json(&get("gpu_tokens")).await), "157");
    assert_eq!(value(&api.get_json(&get("gpu_peak")).await), "9.25");
    assert_eq!(value(&api.get_json(&get("gpu_users")).await), "2");
    assert_eq!(value(&api.get_json(&get("gpu_level")).await), "2");
    assert!(
        api.get_json("/api/v1/aggregations?meter=gpu").await["data"]
            .as_array()
            .unwrap()
            .is_empty(),
        "no default meter for a metered type"
    );

    // Void the peak: every meter forgets it.
    let voided = api.post_json("/api/v1/events/g2/void", &json!({})).await;
    assert_eq!(voided.status(), StatusCode::ACCEPTED);
    assert_eq!(
        api.post_json("/api/v1/events/g2/void", &json!({}))
            .await
            .status(),
        StatusCode::OK
    );
    expect_problem(
        api.post_json("/api/v1/events/nope/void", &json!({})).await,
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    )
    .await;
    api.wait_caught_up(WAIT).await;
    assert_eq!(value(&api.get_json(&get("gpu_calls")).await), "1");
    assert_eq!(value(&api.get_json(&get("gpu_tokens")).await), "107");
    assert_eq!(value(&api.get_json(&get("gpu_peak")).await), "5.5");
    assert_eq!(value(&api.get_json(&get("gpu_users")).await), "1");
    expect_problem(
        api.post_event(&gpu("g2", "2024-03-01T10:00:40Z", "9.25", "bob", 50))
            .await,
        StatusCode::CONFLICT,
        "DUPLICATE_EVENT",
    )
    .await;
    let ids = api
        .get_json(&format!("{}&include=event_ids", get("gpu_peak")))
        .await;
    assert_eq!(ids["data"][0]["event_ids"], json!(["g1", "g3"]));
}

/// A meter created while the pipeline runs applies to the events it processes right after: the
/// pipeline LISTENs for the table's notification (migration 0018) instead of polling every second.
#[tokio::test(flavor = "multi_thread")]
async fn a_meter_created_while_the_pipeline_runs_applies_within_a_fraction_of_a_second() {
    let api = spawn_api().await;
    let _pipeline = spawn_pipeline(&api.url, &api.topic, 1, &[]);
    let chat = |id: &str| {
        json!({"event_id": id, "customer_id": "acme", "event_type": "chat",
               "event_time": chrono::Utc::now().to_rfc3339(), "value": 3})
    };
    assert_eq!(
        api.post_event(&chat("c1")).await.status(),
        StatusCode::CREATED
    );
    api.wait_caught_up(WAIT).await;
    // The pipeline has read its meters and is idle: only a notification can tell it of a new one
    // (its fallback reload is 30 s away).
    let meter = json!({"meter": "chat_calls", "event_type": "chat", "aggregation": "count"});
    assert_eq!(
        api.post_json("/api/v1/meters", &meter).await.status(),
        StatusCode::CREATED
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        api.post_event(&chat("c2")).await.status(),
        StatusCode::CREATED
    );
    api.wait_caught_up(WAIT).await;
    let calls = api
        .get_json("/api/v1/aggregations?customer_id=acme&meter=chat_calls")
        .await;
    assert_eq!(
        calls["data"][0]["event_count"], 1,
        "the event after the meter, and only it: {calls}"
    );
}

fn event_with(field: &str, raw: &str) -> Vec<u8> {
    let mut fields = vec![
        ("event_id", r#""evt_bad""#.to_owned()),
        ("customer_id", r#""cust_1""#.to_owned()),
        ("event_type", r#""api_call""#.to_owned()),
        ("event_time", r#""2024-01-15T14:30:00Z""#.to_owned()),
    ];
    match fields.iter_mut().find(|(f, _)| *f == field) {
        Some(slot) => slot.1 = raw.to_owned(),
        None => fields.push((Box::leak(field.to_owned().into_boxed_str()), raw.to_owned())),
    }
    let body: Vec<String> = fields
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!(r#""{k}":{v}"#))
        .collect();
    format!("{{{}}}", body.join(",")).into_bytes()
}

/// Every bad input of RELIABILITY.md, as (name, body, HTTP status, problem code).
fn bad_inputs() -> Vec<(&'static str, Vec<u8>, u16, &'static str)> {
    let deep = format!("{}{}", "[".repeat(5_000), "]".repeat(5_000));
    let future = (chrono::Utc::now() + chrono::Duration::minutes(10)).to_rfc3339();
    vec![
        ("malformed", b"{not json".to_vec(), 400, "MALFORMED_JSON"),
        (
            "truncated",
            br#"{"event_id":"a","customer_id":"c""#.to_vec(),
            400,
            "MALFORMED_JSON",
        ),
        (
            "invalid utf-8",
            b"{\"event_id\":\"\xff\xfe\"}".to_vec(),
            400,
            "MALFORMED_JSON",
        ),
        (
            "deep nesting",
            event_with("properties", &format!(r#"{{"a":{deep}}}"#)),
            422,
            "VALIDATION_FAILED",
        ),
        (
            "deep top level",
            deep.clone().into_bytes(),
            400,
            "MALFORMED_JSON",
        ),
        (
            "wrong type",
            event_with("event_id", "5"),
            400,
            "MALFORMED_JSON",
        ),
        (
            "unknown field",
            event_with("total", "1"),
            400,
            "MALFORMED_JSON",
        ),
        (
            "duplicate key",
            format!(
                r#"{{"event_id":"a",{}"#,
                &String::from_utf8(event_with("value", "1")).unwrap()[1..]
            )
            .into_bytes(),
            400,
            "MALFORMED_JSON",
        ),
        (
            "negative",
            event_with("value", r#""-1""#),
            422,
            "VALIDATION_FAILED",
        ),
        (
            "nan",
            event_with("value", r#""NaN""#),
            422,
            "VALIDATION_FAILED",
        ),
        (
            "infinity",
            event_with("value", r#""Infinity""#),
            422,
            "VALIDATION_FAILED",
        ),
        (
            "1e400",
            event_with("value", "1e400"),
            422,
            "VALIDATION_FAILED",
        ),
        (
            "too many digits",
            event_with("value", "1.23456789012345678901234567891"),
            422,
            "VALIDATION_FAILED",
        ),
        (
            "missing id",
            event_with("event_id", ""),
            400,
            "MALFORMED_JSON",
        ),
        (
            "oversized id",
            event_with("event_id", &format!(r#""{}""#, "x".repeat(129))),
            422,
            "VALIDATION_FAILED",
        ),
        (
            "control character",
            event_with("customer_id", r#""cust\u0007""#),
            422,
            "VALIDATION_FAILED",
        ),
        (
            "future",
            event_with("event_time", &format!(r#""{future}""#)),
            422,
            "VALIDATION_FAILED",
        ),
        (
            "too old",
            event_with("event_time", r#""2023-11-01T00:00:00Z""#),
            422,
            "VALIDATION_FAILED",
        ),
        (
            "nested property",
            event_with("properties", r#"{"a":{"b":1}}"#),
            422,
            "VALIDATION_FAILED",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn every_bad_input_over_http_gets_the_right_problem() {
    let api = spawn_api().await;
    // A committed watermark, so "too old" (35 days behind it) applies.
    preset_watermark(&api.url, &api.topic, "2024-01-20T00:00:00Z").await;
    tokio::time::sleep(Duration::from_millis(1_500)).await; // the API follows it every second
    for (name, body, status, code) in bad_inputs() {
        let response = api
            .post_raw("/api/v1/events", "application/json", body)
            .await;
        let (got, problem) = problem(response).await;
        assert_eq!(
            (got.as_u16(), problem["code"].as_str().unwrap()),
            (status, code),
            "{name}: {problem}"
        );
    }
    let too_large = event_with(
        "properties",
        &format!(r#"{{"a":"{}"}}"#, "x".repeat(70_000)),
    );
    let response = api
        .post_raw("/api/v1/events", "application/json", too_large)
        .await;
    expect_problem(response, StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE").await;
    let response = api
        .post_raw("/api/v1/events", "text/plain", event_with("value", "1"))
        .await;
    expect_problem(
        response,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "UNSUPPORTED_MEDIA_TYPE",
    )
    .await;
    assert_eq!(
        scalar_i64(&api.url, "SELECT count(*) FROM event_ids").await,
        0,
        "nothing invalid is stored"
    );

    // A batch with one bad item: a result per item, the good ones accepted.
    let batch = json!([
        {"event_id": "b1", "customer_id": "c", "event_type": "api_call", "event_time": "2024-01-15T14:30:00Z"},
        {"event_id": "b2", "customer_id": "c", "event_type": "api_call", "event_time": "2024-01-15T14:30:00Z", "value": "-1"},
        {"event_id": "b3", "customer_id": "c", "event_type": "api_call", "event_time": "2024-01-15T14:31:00Z"},
        {"event_id": "b1", "customer_id": "c", "event_type": "api_call", "event_time": "2024-01-15T14:30:00Z"}
    ]);
    let response = api.post_json("/api/v1/events/batch", &batch).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    let statuses: Vec<u64> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [201, 422, 201, 409], "{body}");
    assert_eq!(body["results"][1]["error"]["errors"][0]["field"], "value");
    let too_many = Value::Array(
        (0..1001)
            .map(|i| json!({"event_id": format!("m{i}")}))
            .collect(),
    );
    expect_problem(
        api.post_json("/api/v1/events/batch", &too_many).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "VALIDATION_FAILED",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_bad_record_over_kafka_is_a_dead_letter_and_the_partition_moves_on() {
    let url = fresh_database().await;
    let topic = fresh_topic(1).await;
    preset_watermark(&url, &topic, "2024-01-20T00:00:00Z").await;
    let bad = bad_inputs();
    let mut records: Vec<(String, Vec<u8>)> = bad
        .iter()
        .map(|(_, body, _, _)| ("k".to_owned(), body.clone()))
        .collect();
    records.push(("k".into(), event_with("value", "2")));
    produce(&topic, &records);
    drain(&url, &topic, 1);
    assert_eq!(
        scalar_i64(&url, "SELECT count(*) FROM dead_letters").await,
        bad.len() as i64
    );
    assert_eq!(
        scalar_i64(&url, "SELECT count(*) FROM dead_letters WHERE reason NOT LIKE 'MALFORMED_JSON:%' AND reason NOT LIKE 'VALIDATION_FAILED:%'").await,
        0,
        "every dead letter says why"
    );
    assert_eq!(
        scalar_i64(&url, "SELECT next_offset FROM source_offsets").await,
        records.len() as i64
    );
    assert_eq!(
        scalar_i64(&url, "SELECT event_count FROM aggregations").await,
        1,
        "the valid record after them counts"
    );
}

/// CloudEvents 1.0, single and batch, map onto the same events.
#[tokio::test(flavor = "multi_thread")]
async fn cloudevents_single_and_batch_are_accepted() {
    let api = spawn_api().await;
    let ce = |id: &str| {
        json!({"specversion": "1.0", "id": id, "source": "/gpu-cluster", "type": "api_call",
               "subject": "cust_ce", "time": "2024-01-15T14:30:00Z", "datacontenttype": "application/json",
               "data": {"value": "2.5", "region": "eu"}})
    };
    let response = api
        .post_raw(
            "/api/v1/events",
            "application/cloudevents+json",
            serde_json::to_vec(&ce("ce1")).unwrap(),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let batch = serde_json::to_vec(&json!([ce("ce2"), ce("ce1"), {"specversion": "1.0"}])).unwrap();
    let response = api
        .post_raw(
            "/api/v1/events/batch",
            "application/cloudevents-batch+json",
            batch,
        )
        .await;
    let body: Value = response.json().await.unwrap();
    let statuses: Vec<u64> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [201, 409, 400], "{body}");
    drain(&api.url, &api.topic, 1);
    let page = api
        .get_json("/api/v1/aggregations?customer_id=cust_ce")
        .await;
    assert_eq!(page["data"][0]["value"].to_string(), "5.0");
    let properties: String =
        sqlx::query_scalar("SELECT properties::text FROM telemetry_events WHERE event_id = 'ce2'")
            .fetch_one(&api.pool)
            .await
            .unwrap();
    // Stored as the decoder's canonical text (migration 0008), not re-spelled by jsonb.
    assert_eq!(properties, r#"{"region":"eu"}"#);
}

/// Random streams with identical and conflicting duplicates, late and too-old events, through Kafka into
/// 1, 2 and 4 workers: the stored aggregates and late events equal a plain reference.
#[tokio::test(flavor = "multi_thread")]
async fn aggregates_with_duplicates_and_late_events_equal_the_reference_for_1_2_and_4_workers() {
    let topic = fresh_topic(4).await;
    // The watermark an earlier run left: 2024-01-15T13:00Z; hours ending by 12:00 are closed.
    let watermark = 1_705_323_600;
    let events: Vec<TestEvent> = random_events(2_000, 21);
    let mut records: Vec<(String, Vec<u8>)> = events
        .iter()
        .map(|e| (e.customer.clone(), e.payload()))
        .collect();
    let mut conflicting = 0;
    for (i, e) in events.iter().enumerate().filter(|(_, e)| !e.invalid) {
        if i % 7 == 0 {
            records.push((e.customer.clone(), e.payload()));
        }
        if i % 53 == 0 {
            let mut other = e.clone();
            other.value += Decimal::new(1, 2);
            records.push((e.customer.clone(), other.payload()));
            conflicting += 1;
        }
    }
    let too_old: Vec<TestEvent> = (0..5)
        .map(|i| TestEvent {
            id: format!("old_{i}"),
            time: watermark - 40 * 86_400,
            ..events[0].clone()
        })
        .collect();
    records.extend(too_old.iter().map(|e| (e.customer.clone(), e.payload())));
    produce(&topic, &records);

    let expected = reference(&events);
    let expected_late: BTreeSet<String> = events
        .iter()
        .filter(|e| !e.invalid && e.time - e.time.rem_euclid(3600) + 3600 + 3600 <= watermark)
        .map(|e| e.id.clone())
        .collect();
    assert!(!expected_late.is_empty());
    for workers in [1, 2, 4] {
        let url = fresh_database().await;
        preset_watermark(&url, &topic, "2024-01-15T13:00:00Z").await;
        // A day of allowed out-of-orderness keeps the watermark at the preset one for the whole run, so
        // which events are late does not depend on reading order.
        drain_with(
            &url,
            &topic,
            workers,
            &["--out-of-orderness-ms", "86400000"],
        );
        assert_same(
            &stored_aggregates(&url).await,
            &expected,
            &format!("{workers} workers"),
        );
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        let late: Vec<(String, String)> = sqlx::query_as("SELECT event_id, meter FROM late_events")
            .fetch_all(&pool)
            .await
            .unwrap();
        // Recorded once per event and meter (the table has no key since migration 0017).
        let distinct: BTreeSet<&(String, String)> = late.iter().collect();
        assert_eq!(
            distinct.len(),
            late.len(),
            "{workers} workers: a late event recorded twice"
        );
        assert_eq!(
            late.into_iter().map(|(id, _)| id).collect::<BTreeSet<_>>(),
            expected_late,
            "{workers} workers: late events"
        );
        assert_eq!(
            scalar_i64(&url, "SELECT count(*) FROM dead_letters").await,
            invalid_count(&events) + too_old.len() as i64,
            "{workers} workers: invalid and too-old records are dead letters"
        );
        assert_eq!(
            scalar_i64(&url, "SELECT count(*) FROM duplicate_events").await,
            conflicting
        );
        assert_eq!(
            scalar_i64(&url, "SELECT count(*) FROM aggregations WHERE finalized").await,
            scalar_i64(
                &url,
                "SELECT count(*) FROM aggregations WHERE window_end <= '2024-01-15T12:00:00Z'"
            )
            .await,
            "{workers} workers: exactly the closed windows are finalized"
        );
    }
}

/// SPEC §4: a window is finalized within 5 s of the watermark passing its end plus the allowed
/// lateness; the pipeline exports the metering metrics of SPEC §10.
#[tokio::test(flavor = "multi_thread")]
async fn a_window_is_finalized_within_five_seconds_of_the_watermark_passing_it() {
    let api = spawn_api().await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let metrics_addr = format!("127.0.0.1:{port}");
    let _pipeline = spawn_pipeline(&api.url, &api.topic, 1, &["--metrics-addr", &metrics_addr]);
    let event = json!({"event_id": "on_time", "customer_id": "c", "event_type": "api_call",
                       "event_time": "2024-01-15T14:30:00Z"});
    assert_eq!(api.post_event(&event).await.status(), StatusCode::CREATED);
    produce(&api.topic, &[("c".into(), b"{broken".to_vec())]);
    api.wait_caught_up(WAIT).await;
    let finalized = "SELECT count(*) FROM aggregations WHERE finalized";
    assert_eq!(
        scalar_i64(&api.url, finalized).await,
        0,
        "not before the watermark passes"
    );

    let asked = std::time::Instant::now();
    let response = api
        .post_json(
            "/api/v1/watermark",
            &json!({"advance_to": "2024-01-15T16:00:00Z"}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    while scalar_i64(&api.url, finalized).await == 0 {
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "finalized within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let text = reqwest::get(format!("http://{metrics_addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for metric in [
        "window_close_duration_seconds_count",
        "aggregation_lag_seconds",
        "committed_watermark_seconds",
        "sink_commit_duration_seconds_count",
        "dead_letters_total{reason=\"MALFORMED_JSON\"} 1",
    ] {
        assert!(text.contains(metric), "{metric} is exported:\n{text}");
    }
}

/// Issue 15: a backfill's catch-up epoch is held open while no window can close (`catch_up.rs`), up to
/// 4/5 of the idle timeout (48 s here): no commit for seconds while the pipeline is behind. An admin's
/// floor posted meanwhile is still committed within SPEC §4's 5 s. (Before the reader's batch window,
/// `source.rs`, its batches came short and no epoch was held here.)
///
/// Ignored in the suite: it needs the pipeline still behind 5 s after its first commit, which beside the
/// other tests of this file on 2 cores it was not (it drained first). Run it alone:
/// `cargo test --test metering a_floor_posted -- --ignored`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "timing: needs the pipeline still behind; run alone with --ignored"]
async fn a_floor_posted_while_an_epoch_is_held_is_committed_within_five_seconds() {
    let api = spawn_api().await;
    // Every event's window closed long ago: the partitions stay below the next close, so nothing
    // closes and the epochs after the first are held.
    preset_watermark(&api.url, &api.topic, "2024-01-16T00:00:00Z").await;
    let events = random_events(1_000_000, 15);
    produce_events(&api.topic, &events);
    let _pipeline = spawn_pipeline(&api.url, &api.topic, 1, &["--idle-timeout-secs", "60"]);
    wait_until_committed(&api.url, 1, WAIT, "the first epoch").await;
    // Past the catch-up interval: the second epoch is held now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let epoch = "SELECT committed_epoch FROM pipeline_leases";
    let before = scalar_i64(&api.url, epoch).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        scalar_i64(&api.url, epoch).await,
        before,
        "no commit for 2 s: the epoch is held"
    );
    let floor = "2024-01-17T00:00:00Z";
    let asked = std::time::Instant::now();
    let response = api
        .post_json("/api/v1/watermark", &json!({ "advance_to": floor }))
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let applied = format!(
        "SELECT count(*) FROM pipeline_leases WHERE committed_watermark >= '{floor}'::timestamptz"
    );
    while scalar_i64(&api.url, &applied).await == 0 {
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "the floor is committed within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A burst read in full batches (the reader behind the topic's end: catch-up epochs) is committed
/// soon after the reader reaches the end, not when a catch-up interval runs out: the reader tells its
/// worker it has nothing left to read (an empty batch). Seen failing without it: the last records
/// waited out the 20 s interval (and seed_aggregation took 3.0 s, not 1.0 s, with the default 2 s).
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_is_committed_soon_after_the_reader_reaches_the_end() {
    let url = fresh_database().await;
    let topic = fresh_topic(1).await;
    let events = random_events(30_000, 21);
    produce_events(&topic, &events);
    let catch_up = ["--catch-up-epoch-ms", "20000", "--idle-timeout-secs", "60"];
    let _pipeline = spawn_pipeline(&url, &topic, 1, &catch_up);
    wait_until_committed(&url, 1, WAIT, "the first epoch").await;
    let first = std::time::Instant::now();
    let all = events.len() as i64;
    wait_until_committed(&url, all, WAIT, "the burst").await;
    assert!(
        first.elapsed() < Duration::from_secs(12),
        "the burst's last epoch closed {:?} after the first commit: it waited out the catch-up interval",
        first.elapsed()
    );
}

/// Meters from a file (`--meters`), and a late event revising a finalized window.
#[tokio::test(flavor = "multi_thread")]
async fn meters_come_from_a_file_and_late_events_revise_finalized_windows() {
    let url = fresh_database().await;
    let topic = fresh_topic(1).await;
    let file = meters_file(
        r#"[{"meter":"calls_per_day","event_type":"api_call","aggregation":"count","window":"day"}]"#,
    );
    let path = file.to_str().unwrap();
    let on_time = |id: &str, time: &str| {
        (
            "c".to_owned(),
            format!(r#"{{"event_id":"{id}","customer_id":"c","event_type":"api_call","event_time":"{time}"}}"#)
                .into_bytes(),
        )
    };
    // Day 1 and, much later, day 3: the watermark (no out-of-orderness) closes day 1.
    produce(
        &topic,
        &[
            on_time("a", "2024-01-15T10:00:00Z"),
            on_time("b", "2024-01-17T10:00:00Z"),
        ],
    );
    drain_with(
        &url,
        &topic,
        1,
        &["--meters", path, "--out-of-orderness-ms", "0"],
    );
    let row = "SELECT event_count FROM aggregations WHERE meter = 'calls_per_day' AND window_start = '2024-01-15'";
    assert_eq!(scalar_i64(&url, row).await, 1);
    assert_eq!(
        scalar_i64(&url, "SELECT count(*) FROM aggregations WHERE finalized").await,
        1,
        "day 1 is closed"
    );
    // A late event for day 1 is applied: the row is revised and the event recorded.
    produce(&topic, &[on_time("late", "2024-01-15T23:00:00Z")]);
    drain_with(
        &url,
        &topic,
        1,
        &["--meters", path, "--out-of-orderness-ms", "0"],
    );
    assert_eq!(scalar_i64(&url, row).await, 2);
    assert_eq!(
        scalar_i64(&url, "SELECT revision::bigint FROM aggregations WHERE meter = 'calls_per_day' AND window_start = '2024-01-15'").await,
        2
    );
    assert_eq!(
        scalar_i64(
            &url,
            "SELECT count(*) FROM late_events WHERE event_id = 'late' AND meter = 'calls_per_day'
             AND customer_id = 'c' AND window_start = '2024-01-15T00:00:00Z'
             AND event_time = '2024-01-15T23:00:00Z' AND watermark = '2024-01-17T10:00:00Z'"
        )
        .await,
        1,
        "the late event is recorded with its meter, customer, window, time and watermark"
    );
    // A changed definition under the same name is refused at start-up with a message.
    std::fs::write(
        &file,
        r#"[{"meter":"calls_per_day","event_type":"api_call","aggregation":"count","window":"hour"}]"#,
    )
    .unwrap();
    let out = meterflow(&url, &topic)
        .args(["pipeline", "--until-caught-up", "--meters", path])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("immutable"));
}

/// An idle partition stops holding the watermark back after the idle timeout.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_partition_stops_holding_the_watermark_back() {
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    let api = spawn_api().await; // a topic with two partitions
    let _pipeline = spawn_pipeline(
        &api.url,
        &api.topic,
        1,
        &["--idle-timeout-secs", "1", "--out-of-orderness-ms", "0"],
    );
    let producer: ThreadedProducer<DefaultProducerContext> = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .create()
        .unwrap();
    for (partition, id, time) in [
        (0, "early", "2024-01-15T12:00:00Z"),
        (1, "late", "2024-01-15T18:00:00Z"),
    ] {
        let payload = format!(
            r#"{{"event_id":"{id}","customer_id":"c","event_type":"t","event_time":"{time}"}}"#
        );
        producer
            .send(
                BaseRecord::<(), _>::to(&api.topic)
                    .partition(partition)
                    .payload(&payload),
            )
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    // While both are active the watermark is the lesser; once partition 0 has been idle for a second,
    // the other one leads.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let progress = api.get_json("/api/v1/progress").await;
        if progress["committed_watermark"] == "2024-01-15T18:00:00Z" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the idle partition held the watermark: {progress}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
