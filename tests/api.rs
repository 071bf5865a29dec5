//! The HTTP API against the real broker and database: ingestion (201/409/400/413/415/422, concurrent
//! duplicates), reads (filters, pagination, exact decimals), health and metrics, and events posted over
//! HTTP reaching the aggregates through Kafka and the pipeline.
//!
//! Length: independent tests of one area, each readable on its own; shared helpers are in
//! `tests/common`.

mod common;

use std::time::Duration;

use common::*;
use rdkafka::config::ClientConfig;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;

fn event(id: &str) -> Value {
    json!({"event_id": id, "customer_id": "cust_123", "event_type": "api_call",
           "event_time": "2024-01-15T14:30:00Z", "value": "1.5", "properties": {"region": "eu"}})
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_is_accepted_once_and_its_duplicate_gets_409() {
    let api = spawn_api().await;
    let first = api.post_event(&event("evt_01")).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let duplicate = api.post_event(&event("evt_01")).await;
    expect_problem(duplicate, StatusCode::CONFLICT, "DUPLICATE_EVENT").await;
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM telemetry_events WHERE event_id = 'evt_01'")
            .fetch_one(&api.pool)
            .await
            .unwrap();
    assert_eq!(rows, 1);
    let value: String =
        sqlx::query_scalar("SELECT value::text FROM telemetry_events WHERE event_id = 'evt_01'")
            .fetch_one(&api.pool)
            .await
            .unwrap();
    assert_eq!(value, "1.5");
}

#[tokio::test(flavor = "multi_thread")]
async fn of_concurrent_identical_posts_exactly_one_is_accepted() {
    let api = spawn_api().await;
    let body = event("evt_race_123");
    let responses = futures::future::join_all((0..10).map(|_| api.post_event(&body))).await;
    let mut statuses: Vec<u16> = responses.iter().map(|r| r.status().as_u16()).collect();
    statuses.sort();
    assert_eq!(statuses, [201, 409, 409, 409, 409, 409, 409, 409, 409, 409]);
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM telemetry_events WHERE event_id = 'evt_race_123'")
            .fetch_one(&api.pool)
            .await
            .unwrap();
    assert_eq!(rows, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_bodies_get_a_clear_problem() {
    let api = spawn_api().await;
    let post_raw = |body: &'static str, content_type: &'static str| {
        api.client
            .post(format!("{}/api/v1/events", api.base))
            .header("content-type", content_type)
            .body(body)
            .send()
    };

    let malformed = post_raw("{\"event_id\": ", "application/json")
        .await
        .unwrap();
    expect_problem(malformed, StatusCode::BAD_REQUEST, "MALFORMED_JSON").await;

    let mut invalid = event("evt_bad");
    invalid["value"] = json!("-3");
    invalid["event_type"] = json!("Not Valid");
    let body = expect_problem(
        api.post_event(&invalid).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "VALIDATION_FAILED",
    )
    .await;
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["event_type", "value"]);

    let form = post_raw("event_id=1", "application/x-www-form-urlencoded")
        .await
        .unwrap();
    expect_problem(
        form,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "UNSUPPORTED_MEDIA_TYPE",
    )
    .await;

    let mut huge = event("evt_huge");
    huge["properties"] = json!({"blob": "x".repeat(70 * 1024)});
    expect_problem(
        api.post_event(&huge).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "PAYLOAD_TOO_LARGE",
    )
    .await;

    expect_problem(
        api.get("/api/v1/nowhere").await,
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    )
    .await;

    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM telemetry_events")
        .fetch_one(&api.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0, "nothing invalid is stored");
}

async fn seed_aggregations(pool: &PgPool) {
    sqlx::query(
        "INSERT INTO aggregations (customer_id, meter, window_start, window_end, value, event_count)
         SELECT 'cust_' || c, m, timestamptz '2024-01-15 00:00Z' + h * interval '1 hour',
                timestamptz '2024-01-15 01:00Z' + h * interval '1 hour', 12345678901234567890.123456789, 3
         FROM generate_series(1, 3) c, unnest(array['api_call', 'tokens']) m, generate_series(0, 4) h",
    )
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn aggregations_filter_paginate_and_keep_exact_decimals() {
    let api = spawn_api().await;
    seed_aggregations(&api.pool).await;

    // Filters: one customer, one meter, two of five hours.
    let response =
        api.get("/api/v1/aggregations?customer_id=cust_2&meter=tokens&from=2024-01-15T01:00:00Z&to=2024-01-15T03:00:00Z").await;
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.unwrap();
    assert!(
        text.contains("\"value\":12345678901234567890.123456789"),
        "decimals are exact JSON numbers: {text}"
    );
    let body: Value = serde_json::from_str(&text).unwrap();
    let starts: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["window_start"].as_str().unwrap())
        .collect();
    assert_eq!(starts, ["2024-01-15T01:00:00Z", "2024-01-15T02:00:00Z"]);
    assert!(body["next_cursor"].is_null());

    // Pagination: pages of 4 walk all 30 rows once, in key order.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/aggregations?limit=4&cursor={c}"),
            None => "/api/v1/aggregations?limit=4".to_owned(),
        };
        let page: Value = api.get(&path).await.json().await.unwrap();
        for a in page["data"].as_array().unwrap() {
            seen.push(format!(
                "{}/{}/{}",
                a["customer_id"], a["meter"], a["window_start"]
            ));
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(seen.len(), 30);
    assert_eq!(seen, sorted, "every row once, in order");

    for bad in [
        "limit=0",
        "limit=5000",
        "cursor=zz",
        "from=yesterday",
        "colour=blue",
    ] {
        let response = api.get(&format!("/api/v1/aggregations?{bad}")).await;
        expect_problem(response, StatusCode::BAD_REQUEST, "BAD_REQUEST").await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn health_readiness_and_metrics_answer() {
    let api = spawn_api().await;
    assert_eq!(api.get("/healthz").await.status(), StatusCode::OK);
    let ready = api.get("/readyz").await;
    assert_eq!(ready.status(), StatusCode::OK);
    assert_eq!(
        api.post_event(&event("evt_m")).await.status(),
        StatusCode::CREATED
    );
    let metrics = api.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"events_ingested_total{event_type="api_call"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"http_requests_total{method="POST",route="/api/v1/events",status="201"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("http_request_duration_seconds_bucket"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn events_posted_over_http_reach_the_aggregates_through_kafka() {
    let api = spawn_api().await;
    for (i, value) in ["1.5", "2.25", "0.25"].iter().enumerate() {
        let mut e = event(&format!("evt_http_{i}"));
        e["value"] = json!(value);
        assert_eq!(api.post_event(&e).await.status(), StatusCode::CREATED);
    }
    drain(&api.url, &api.topic, 2);
    let page: Value = api
        .get("/api/v1/aggregations?customer_id=cust_123")
        .await
        .json()
        .await
        .unwrap();
    let rows = page["data"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["value"].to_string(), "4.00");
    assert_eq!(rows[0]["event_count"], 3);
    assert_eq!(rows[0]["window_start"], "2024-01-15T14:00:00Z");
    assert_eq!(rows[0]["window_end"], "2024-01-15T15:00:00Z");

    // Kafka acknowledged every event, so the outbox empties.
    let mut left = 1;
    for _ in 0..100 {
        left = scalar_i64(&api.url, "SELECT count(*) FROM event_outbox").await;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(left, 0, "acknowledged events leave the outbox");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_stranded_in_the_outbox_is_relayed_and_counted_once() {
    let api = spawn_api().await;
    // As if the API crashed after storing the event and before Kafka acknowledged it — and Kafka had in
    // fact taken it: the relay sends it a second time, and it must still count once.
    let payload = br#"{"event_id":"evt_stranded","customer_id":"cust_9","event_type":"api_call","event_time":"2024-01-15T10:15:00Z","value":7}"#;
    let event = meterflow_model::decode_event(payload, i64::MAX / 2, &Default::default()).unwrap();
    sqlx::query(
        "WITH i AS (INSERT INTO event_ids (event_id, event_time, fingerprint, source)
                    VALUES ('evt_stranded', '2024-01-15T10:15:00Z', $2, 'api') RETURNING event_id),
              e AS (INSERT INTO telemetry_events (event_id, customer_id, event_type, event_time, value)
                    SELECT event_id, 'cust_9', 'api_call', '2024-01-15T10:15:00Z', 7 FROM i RETURNING event_id)
         INSERT INTO event_outbox (event_id, payload, customer_id, created_at)
         SELECT event_id, $1, 'cust_9', now() - interval '1 hour' FROM e",
    )
    .bind(&payload[..])
    .bind(event.fingerprint())
    .execute(&api.pool)
    .await
    .unwrap();
    produce(&api.topic, &[("cust_9".to_owned(), payload.to_vec())]);
    let producer = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .create()
        .unwrap();
    // Relay until the outbox is empty; the API's own background relay may take the row first, and
    // `FOR UPDATE SKIP LOCKED` keeps the two from both sending it.
    let mut relayed = 0;
    for _ in 0..50 {
        relayed += meterflow_api::outbox::relay_once(
            &api.pool,
            &producer,
            &api.topic,
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        if scalar_i64(&api.url, "SELECT count(*) FROM event_outbox").await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(relayed <= 1);
    assert_eq!(
        scalar_i64(&api.url, "SELECT count(*) FROM event_outbox").await,
        0,
        "the event was relayed"
    );

    drain(&api.url, &api.topic, 1);
    assert_eq!(
        scalar_i64(&api.url, "SELECT count(*) FROM telemetry_events").await,
        1,
        "one raw event row"
    );
    let page: Value = api
        .get("/api/v1/aggregations?customer_id=cust_9")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["data"][0]["value"].to_string(), "7");
    assert_eq!(page["data"][0]["event_count"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_listed_with_their_reason_in_pages() {
    let api = spawn_api().await;
    let topic = api.topic.clone();
    let records: Vec<(String, Vec<u8>)> = vec![
        ("c".into(), b"{not json".to_vec()),
        ("c".into(), br#"{"event_id":"x","customer_id":"c","event_type":"t","event_time":"2024-01-15T14:30:00Z","value":"-2"}"#.to_vec()),
        ("c".into(), br#"{"event_id":"ok","customer_id":"c","event_type":"t","event_time":"2024-01-15T14:30:00Z"}"#.to_vec()),
    ];
    produce(&topic, &records);
    drain(&api.url, &topic, 1);

    let first: Value = api
        .get("/api/v1/dead-letters?limit=1")
        .await
        .json()
        .await
        .unwrap();
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a second page")
        .to_owned();
    let second: Value = api
        .get(&format!("/api/v1/dead-letters?limit=1&cursor={cursor}"))
        .await
        .json()
        .await
        .unwrap();
    assert!(second["next_cursor"].is_null());
    let mut reasons: Vec<String> = [&first, &second]
        .iter()
        .map(|page| page["data"][0]["reason"].as_str().unwrap().to_owned())
        .collect();
    reasons.sort();
    assert!(reasons[0].starts_with("MALFORMED_JSON"), "{reasons:?}");
    assert!(
        reasons[1].starts_with("VALIDATION_FAILED") && reasons[1].contains("value"),
        "{reasons:?}"
    );
    assert_eq!(first["data"][0]["topic"], topic.as_str());

    let response = api.get("/api/v1/dead-letters?cursor=abc").await;
    expect_problem(response, StatusCode::BAD_REQUEST, "BAD_REQUEST").await;
}

/// Finding 11 (issue 13, item 4): one bad item in a group commit or a batch failed every other item with
/// it. Each item now gets its own outcome: the valid ones 201, the bad one a 4xx.
#[tokio::test(flavor = "multi_thread")]
async fn finding_11_one_bad_item_never_changes_another_items_status() {
    let api = spawn_api().await;
    let now = chrono::Utc::now().to_rfc3339();
    let good = |id: String| {
        format!(
            r#"{{"event_id":"{id}","customer_id":"c","event_type":"t","event_time":"{now}","value":1}}"#
        )
    };
    let bad = |id: &str, poison: &str| {
        format!(
            r#"{{"event_id":"{id}","customer_id":"c","event_type":"t","event_time":"{now}","properties":{{"k":"{poison}"}}}}"#
        )
    };
    for (round, poison) in [r"\u0000", r"\ud800"].into_iter().enumerate() {
        // A batch: ten valid events around one bad one.
        let mut items: Vec<String> = (0..10).map(|i| good(format!("b{round}-{i}"))).collect();
        items.insert(5, bad(&format!("b{round}-bad"), poison));
        let body = format!("[{}]", items.join(","));
        let response = api
            .post_raw(
                "/api/v1/events/batch",
                "application/json",
                body.into_bytes(),
            )
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        let result: Value = response.json().await.unwrap();
        let statuses: Vec<u64> = result["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["status"].as_u64().unwrap())
            .collect();
        for (i, status) in statuses.iter().enumerate() {
            if i == 5 {
                assert!(
                    (400..500).contains(status),
                    "{poison}: bad item {status}: {result}"
                );
            } else {
                assert_eq!(*status, 201, "{poison}: item {i}: {result}");
            }
        }
        // Concurrent single posts share a group commit.
        let posts = (0..10)
            .map(|i| good(format!("s{round}-{i}")))
            .chain([bad(&format!("s{round}-bad"), poison)])
            .map(|body| {
                let api = &api;
                async move {
                    let response = api
                        .post_raw("/api/v1/events", "application/json", body.into_bytes())
                        .await;
                    response.status()
                }
            });
        let statuses = futures::future::join_all(posts).await;
        for (i, status) in statuses.iter().enumerate() {
            if i == 10 {
                assert!(status.is_client_error(), "{poison}: bad single {status}");
            } else {
                assert_eq!(*status, StatusCode::CREATED, "{poison}: single {i}");
            }
        }
        let stored = scalar_i64(
            &api.url,
            &format!("SELECT count(*) FROM event_ids WHERE event_id LIKE '_{round}-%'"),
        )
        .await;
        assert_eq!(
            stored, 20,
            "{poison}: the valid events are stored, the bad ones not"
        );
    }
}

/// Finding 12: the void's `void_requested_at` and its outbox row were two statements; when the second
/// failed, a retry answered 200 "voided" though no void existed. Both are one transaction now.
#[tokio::test(flavor = "multi_thread")]
async fn finding_12_a_void_whose_outbox_insert_failed_is_not_answered_voided() {
    let api = spawn_api().await;
    let mut e = event("evt_void_12");
    e["event_time"] = json!(chrono::Utc::now().to_rfc3339());
    assert_eq!(api.post_event(&e).await.status(), StatusCode::CREATED);
    // The outbox refuses voids for now.
    for sql in [
        "CREATE FUNCTION refuse_void() RETURNS trigger LANGUAGE plpgsql AS
         $$ BEGIN RAISE EXCEPTION 'no voids today' USING ERRCODE = '57P01'; END $$",
        "CREATE TRIGGER refuse_void BEFORE INSERT ON event_outbox FOR EACH ROW
         WHEN (NEW.kind = 'void') EXECUTE FUNCTION refuse_void()",
    ] {
        sqlx::query(sql).execute(&api.pool).await.unwrap();
    }
    let path = "/api/v1/events/evt_void_12/void";
    let first = api.post_json(path, &json!({})).await;
    assert!(first.status().is_server_error(), "{}", first.status());
    let requested = scalar_i64(
        &api.url,
        "SELECT count(*) FROM event_ids WHERE event_id = 'evt_void_12' AND void_requested_at IS NOT NULL",
    )
    .await;
    assert_eq!(
        requested, 0,
        "the void request was rolled back with its outbox row"
    );
    sqlx::query("DROP TRIGGER refuse_void ON event_outbox")
        .execute(&api.pool)
        .await
        .unwrap();
    let retry = api.post_json(path, &json!({})).await;
    let status = retry.status();
    let body: Value = retry.json().await.unwrap();
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "the retry makes the void: {body}"
    );
    assert_eq!(body["status"], "voiding");
    let again = api.post_json(path, &json!({})).await;
    assert_eq!(again.status(), StatusCode::OK, "then it is voided");
}

/// The API with a producer whose broker never answers (Kafka refuses every event after 1.5 s).
async fn spawn_api_without_kafka() -> TestApi {
    let url = fresh_database().await;
    let topic = unique("nokafka");
    let pool = meterflow_api::pool_options(10).connect(&url).await.unwrap();
    let producer = meterflow_api::producer_config(&free_addr())
        .set("message.timeout.ms", "1500")
        .create()
        .unwrap();
    let settings = meterflow_api::Settings {
        auth: false,
        ..Default::default()
    };
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

/// Finding 6: a copy was answered 409 DUPLICATE_EVENT while its first copy was still on its way to Kafka;
/// when Kafka then refused the first copy, it was withdrawn: one client told "already accepted", the
/// event counted never. Now a 409 is only given for an event that stays.
#[tokio::test(flavor = "multi_thread")]
async fn finding_06_no_409_for_a_copy_whose_first_copy_is_withdrawn() {
    let api = spawn_api_without_kafka().await;
    let now = chrono::Utc::now().to_rfc3339();
    let e = |id: &str| json!({"event_id": id, "customer_id": "c", "event_type": "t", "event_time": now, "value": 1});
    // Both copies in one batch.
    let response = api
        .post_json(
            "/api/v1/events/batch",
            &json!([e("dup-batch"), e("dup-batch")]),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let result: Value = response.json().await.unwrap();
    let batch: Vec<u64> = result["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    // Two concurrent single posts: the second arrives while the first waits for Kafka.
    let single = e("dup-single");
    let first = api.post_event(&single);
    let second = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        api.post_event(&single).await
    };
    let (first, second) = tokio::join!(first, second);
    let singles = vec![
        first.status().as_u16() as u64,
        second.status().as_u16() as u64,
    ];
    for (id, statuses) in [("dup-batch", batch), ("dup-single", singles)] {
        // Once a client was told 201 or 409, the event must stay: stored, with its outbox row for the
        // relay to deliver.
        let promised = statuses.iter().any(|s| *s == 201 || *s == 409);
        let kept = scalar_i64(
            &api.url,
            &format!(
                "SELECT count(*) FROM event_ids i JOIN event_outbox o USING (event_id)
                 WHERE event_id = '{id}' AND o.kind = 'event'"
            ),
        )
        .await;
        assert!(
            statuses.iter().all(|s| [201, 409, 503].contains(s)),
            "{id}: {statuses:?}"
        );
        assert_eq!(
            kept,
            i64::from(promised),
            "{id}: statuses {statuses:?}, but the event is {}",
            if kept == 1 { "kept" } else { "gone" }
        );
        // A withdrawn event leaves no outbox row behind: the relay would deliver it, and the
        // pipeline count an event its client was told 503 for.
        let outbox = scalar_i64(
            &api.url,
            &format!(
                "SELECT count(*) FROM event_outbox WHERE event_id = '{id}' AND kind = 'event'"
            ),
        )
        .await;
        assert_eq!(
            outbox, kept,
            "{id}: statuses {statuses:?}, outbox rows {outbox}"
        );
    }
}

/// Finding 20: every `/readyz` did a Kafka metadata fetch on the blocking pool and a database query; a
/// flood exhausted the pool. The answer is now cached for about a second.
#[tokio::test(flavor = "multi_thread")]
async fn finding_20_readyz_is_cached_for_a_second() {
    let api = spawn_api().await;
    let first: Value = api.get("/readyz").await.json().await.unwrap();
    let bursts = futures::future::join_all((0..20).map(|_| api.get("/readyz"))).await;
    for response in bursts {
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body["checked_at"], first["checked_at"],
            "checked again: {body}"
        );
    }
    assert!(first["checked_at"].is_string(), "{first}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later: Value = api.get("/readyz").await.json().await.unwrap();
    assert_ne!(later["checked_at"], first["checked_at"]);
}

/// Finding 21: `include=event_ids` with `limit=1000&event_ids_limit=1000` listed up to a million ids
/// in one answer. Ids per answer are bounded (limit × event_ids_limit ≤ 10,000).
#[tokio::test(flavor = "multi_thread")]
async fn finding_21_include_event_ids_is_bounded() {
    let api = spawn_api().await;
    seed_aggregations(&api.pool).await;
    let too_many = api
        .get("/api/v1/aggregations?include=event_ids&limit=1000&event_ids_limit=1000")
        .await;
    expect_problem(too_many, StatusCode::BAD_REQUEST, "BAD_REQUEST").await;
    for path in [
        "/api/v1/aggregations?include=event_ids",
        "/api/v1/aggregations?include=event_ids&limit=10&event_ids_limit=1000",
        "/api/v1/aggregations?include=event_ids&limit=1000",
    ] {
        let response = api.get(path).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
}

/// Finding 19: `POST /watermark` took any instant (2099 refused every later event) and left no audit
/// row. An instant more than 5 minutes ahead of now is refused, and an advance is audited.
#[tokio::test(flavor = "multi_thread")]
async fn finding_19_watermark_advance_is_bounded_and_audited() {
    let api = spawn_api().await;
    let far = api
        .post_json(
            "/api/v1/watermark",
            &json!({"advance_to": "2099-01-01T00:00:00Z"}),
        )
        .await;
    expect_problem(far, StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_FAILED").await;
    let floors = scalar_i64(&api.url, "SELECT count(*) FROM watermark_floors").await;
    assert_eq!(floors, 0);
    let soon = (chrono::Utc::now() - chrono::Duration::minutes(1)).to_rfc3339();
    let ok = api
        .post_json("/api/v1/watermark", &json!({"advance_to": soon}))
        .await;
    assert_eq!(ok.status(), StatusCode::ACCEPTED);
    let audited = scalar_i64(
        &api.url,
        "SELECT count(*) FROM audit_log WHERE action = 'watermark.advance' AND after IS NOT NULL",
    )
    .await;
    assert_eq!(audited, 1);
}

/// Issue 15: `POST /watermark` announces the floor on the pipeline's config channel, so a pipeline
/// that holds a catch-up epoch open ends it and commits the floor within seconds (`catch_up.rs`).
#[tokio::test(flavor = "multi_thread")]
async fn a_watermark_floor_is_announced_to_the_pipeline() {
    let api = spawn_api().await;
    let mut listener = sqlx::postgres::PgListener::connect(&api.url).await.unwrap();
    listener.listen("meterflow_config").await.unwrap();
    let soon = (chrono::Utc::now() - chrono::Duration::minutes(1)).to_rfc3339();
    let ok = api
        .post_json("/api/v1/watermark", &json!({"advance_to": soon}))
        .await;
    assert_eq!(ok.status(), StatusCode::ACCEPTED);
    let told = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("announced within 5 s")
        .unwrap();
    assert_eq!(told.payload(), "watermark_floors");
}

/// Finding 32: a failed re-rating job showed the raw database message in its `error` field.
#[tokio::test(flavor = "multi_thread")]
async fn finding_32_job_errors_do_not_expose_database_messages() {
    let api = spawn_api().await;
    spawn_job_runner(&api).await;
    sqlx::query("ALTER TABLE pipeline_leases RENAME TO pipeline_leases_gone")
        .execute(&api.pool)
        .await
        .unwrap();
    let created = api
        .post_json(
            "/api/v1/rerating-jobs",
            &json!({"customer_ids": ["c"], "from": "2024-01-01T00:00:00Z", "to": "2024-01-02T00:00:00Z"}),
        )
        .await;
    assert!(created.status().is_success());
    let job: Value = created.json().await.unwrap();
    let path = format!("/api/v1/rerating-jobs/{}", job["job_id"].as_str().unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let job = loop {
        let job = api.get_json(&path).await;
        if job["status"] == "failed" {
            break job;
        }
        assert!(std::time::Instant::now() < deadline, "{job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let error = job["error"].as_str().unwrap_or_default();
    assert!(!error.is_empty(), "{job}");
    for leak in ["pipeline_leases", "relation", "database:", "sqlx"] {
        assert!(!error.contains(leak), "{leak} in {error}");
    }
}

/// Finding 23: a re-rating job `running` for 10 minutes was claimed again by any API instance, though
/// its runner was alive (a long job), so two recomputations ran. A runner now holds a session lock on
/// its job: only a job whose runner is gone (lock free) is claimed again, and then at once.
#[tokio::test(flavor = "multi_thread")]
async fn finding_23_a_running_job_is_not_claimed_again_while_its_runner_lives() {
    let api = spawn_api().await;
    spawn_job_runner(&api).await;
    // Another instance's runner, alive: it holds the job's lock.
    let mut runner = sqlx::PgConnection::connect(&api.url).await.unwrap();
    use sqlx::Connection;
    sqlx::query("SELECT pg_advisory_lock(hashtext('meterflow.rerating'), hashtext('rrj_live'))")
        .execute(&mut runner)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO rerating_jobs (job_id, customer_ids, scope, reason, status, started_at)
         VALUES ('rrj_live', '{c}', tstzrange('2024-01-01', '2024-01-02', '[)'), 'long', 'running',
                 now() - interval '11 minutes')",
    )
    .execute(&api.pool)
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, restarted): (String, bool) = sqlx::query_as(
        "SELECT status, started_at > now() - interval '10 minutes' FROM rerating_jobs WHERE job_id = 'rrj_live'",
    )
    .fetch_one(&api.pool)
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), restarted),
        ("running", false),
        "claimed again while its runner lives"
    );
    // The runner dies: its lock goes with its connection, and the job is taken over and finished.
    runner.close().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let job = api.get_json("/api/v1/rerating-jobs/rrj_live").await;
        if job["status"] == "succeeded" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{job}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Finding 30 (tier 4): the outbox relay produced with the relaying moment as the record's timestamp, so
/// an event relayed late (or by an instance whose clock is behind) carried another time than the one
/// it was accepted at. The relay keeps the time the event was stored.
#[tokio::test(flavor = "multi_thread")]
async fn finding_30_a_relayed_record_keeps_its_acceptance_time() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let api = spawn_api().await;
    let payload = br#"{"event_id":"evt_late_relay","customer_id":"cust_9","event_type":"api_call","event_time":"2024-01-15T10:15:00Z","value":7}"#;
    let event = meterflow_model::decode_event(payload, i64::MAX / 2, &Default::default()).unwrap();
    let stored_ms: i64 = sqlx::query_scalar(
        "WITH i AS (INSERT INTO event_ids (event_id, event_time, fingerprint, source)
                    VALUES ('evt_late_relay', '2024-01-15T10:15:00Z', $2, 'api') RETURNING event_id),
              e AS (INSERT INTO telemetry_events (event_id, customer_id, event_type, event_time, value)
                    SELECT event_id, 'cust_9', 'api_call', '2024-01-15T10:15:00Z', 7 FROM i RETURNING event_id)
         INSERT INTO event_outbox (event_id, payload, customer_id, created_at)
         SELECT event_id, $1, 'cust_9', now() - interval '1 hour' FROM e
         RETURNING (extract(epoch FROM created_at) * 1000)::bigint",
    )
    .bind(&payload[..])
    .bind(event.fingerprint())
    .fetch_one(&api.pool)
    .await
    .unwrap();
    let producer = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .create()
        .unwrap();
    for _ in 0..50 {
        meterflow_api::outbox::relay_once(
            &api.pool,
            &producer,
            &api.topic,
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        if scalar_i64(&api.url, "SELECT count(*) FROM event_outbox").await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .set("group.id", unique("relay-ts"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&api.topic]).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let timestamp = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the record never came"
        );
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) {
            if m.payload() == Some(&payload[..]) {
                break m.timestamp().to_millis().unwrap();
            }
        }
    };
    assert!(
        (timestamp - stored_ms).abs() < 1000,
        "record time {timestamp}, stored at {stored_ms}: {} s apart",
        (timestamp - stored_ms) / 1000
    );
}

/// Issue 13 ("no 5xx except 503 with Retry-After"): a batch answers 200 with a status per item; when an
/// item is 503 (retry), the answer says when, as a single 503 would.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_with_an_item_to_retry_carries_retry_after() {
    let api = spawn_api_without_kafka().await;
    let now = chrono::Utc::now().to_rfc3339();
    let response = api
        .post_json(
            "/api/v1/events/batch",
            &json!([{"event_id": "ra-1", "customer_id": "c", "event_type": "t", "event_time": now}]),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let retry = response.headers().get("retry-after").cloned();
    let result: Value = response.json().await.unwrap();
    assert_eq!(result["results"][0]["status"], 503, "{result}");
    assert_eq!(
        retry.as_ref().and_then(|v| v.to_str().ok()),
        Some("1"),
        "{result}"
    );
}

/// Found by Schemathesis: a NUL in a query parameter reached a statement and came back 422 from the
/// database's refusal (undocumented for a GET). A path or query holding `%00` is now a 400 problem+json
/// before any handler runs.
#[tokio::test]
async fn a_nul_in_a_path_or_query_is_a_400_problem() {
    let api = spawn_api().await;
    for path in [
        "/api/v1/aggregations?meter=%00x&event_ids_after=%C2%B1",
        "/api/v1/charges?customer_id=a%00",
        "/api/v1/customers/c%00",
    ] {
        let (status, body) = problem(api.get(path).await).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
    }
    let (status, _) = problem(
        api.post_json("/api/v1/events/e%00/void", &serde_json::json!({}))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}
