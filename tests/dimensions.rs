//! Meter dimensions end to end (issue 17, `docs/dimensions.md`), on real Kafka and Postgres with the
//! real binary: an LLM-billing meter grouped by model, its rows and charges per model (each model's
//! graduated tiers count only its own tokens, and a customer's own book for one model beats the
//! default), the invoice lines per model, the dimension filters, the cursor across dimension values,
//! and the bound on values (past it an event is a dead letter, and a restart bounds the same).

mod common;

use std::time::Duration;

use common::*;
use reqwest::StatusCode;
use rust_decimal::Decimal;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

fn tokens(id: &str, customer: &str, model: Option<&str>, n: u32) -> Value {
    let mut properties = json!({"tokens": n});
    if let Some(model) = model {
        properties["model"] = json!(model);
    }
    json!({"event_id": id, "customer_id": customer, "event_type": "llm_call",
           "event_time": "2024-01-15T14:30:00Z", "properties": properties})
}

async fn post_all(api: &TestApi, events: &[Value]) {
    for e in events {
        let response = api.post_event(e).await;
        assert_eq!(response.status(), StatusCode::CREATED, "{e}");
    }
}

/// A cursor as the API encodes it: the hex of its text.
fn hex(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

/// (dimensions, value or amount, normalized) of every row listed at `path`, following the cursor one row at a time.
async fn listed(api: &TestApi, path: &str) -> Vec<(Value, String)> {
    let mut out = Vec::new();
    let mut next = format!("{path}&limit=1");
    loop {
        let page = api.get_json(&next).await;
        for row in page["data"].as_array().unwrap() {
            let value = row
                .get("value")
                .or_else(|| row.get("amount"))
                .unwrap()
                .to_string();
            // Amounts keep their exact digits (1.050): compare them as numbers.
            let value = value.parse::<Decimal>().unwrap().normalize().to_string();
            out.push((row["dimensions"].clone(), value));
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => next = format!("{path}&limit=1&cursor={cursor}"),
            None => return out,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_by_model_are_rows_and_charges_per_model_and_filter_by_dimension() {
    let api = spawn_api().await;
    let meter = json!({"meter": "llm_tokens", "event_type": "llm_call", "aggregation": "sum",
                       "value_property": "properties.tokens", "group_by": ["model"]});
    assert_eq!(
        api.post_json("/api/v1/meters", &meter).await.status(),
        StatusCode::CREATED
    );
    let stored = api.get_json("/api/v1/meters").await;
    assert_eq!(stored["data"][0]["group_by"], json!(["model"]), "{stored}");
    // Graduated: the first 100 tokens at 0.01, the rest at 0.001, per model.
    let book = json!({"meter": "llm_tokens", "effective_from": "2024-01-01T00:00:00Z",
                      "model": {"type": "graduated", "tiers": [
                          {"up_to": "100", "unit_price": "0.01"}, {"unit_price": "0.001"}]}});
    assert_eq!(
        api.post_json("/api/v1/price-books", &book).await.status(),
        StatusCode::CREATED
    );
    // acme's own price for the large model: more specific than the default for that model only.
    let own = json!({"meter": "llm_tokens", "customer_id": "acme", "dimensions": {"model": "large"},
                     "effective_from": "2024-01-01T00:00:00Z",
                     "model": {"type": "per_unit", "unit_price": "0.002"}});
    let created = api.post_json("/api/v1/price-books", &own).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let created: Value = created.json().await.unwrap();
    assert_eq!(created["dimensions"], json!({"model": "large"}));
    // The same selector and scope again overlaps; a key the meter does not group by is refused.
    let again = api.post_json("/api/v1/price-books", &own).await;
    assert_eq!(again.status(), StatusCode::CONFLICT);
    let mut bad = own.clone();
    bad["dimensions"] = json!({"region": "eu"});
    let refused = api.post_json("/api/v1/price-books", &bad).await;
    assert!(refused.status().is_client_error(), "{}", refused.status());
    let _pipeline = spawn_pipeline(&api.url, &api.topic, 2, &[]);
    post_all(
        &api,
        &[
            tokens("t1", "acme", Some("large"), 80),
            tokens("t2", "acme", Some("large"), 70),
            tokens("t3", "acme", Some("small"), 90),
            tokens("t4", "acme", None, 5),
            tokens("t5", "other", Some("large"), 1000),
        ],
    )
    .await;
    // A number as the model: its dimension value is its normalized spelling.
    let numeric = json!({"event_id": "t6", "customer_id": "num", "event_type": "llm_call",
                         "event_time": "2024-01-15T14:30:00Z",
                         "properties": {"tokens": 1, "model": 1.50}});
    post_all(&api, &[numeric]).await;
    api.wait_caught_up(WAIT).await;

    let rows = listed(
        &api,
        "/api/v1/aggregations?customer_id=acme&meter=llm_tokens",
    )
    .await;
    assert_eq!(
        rows,
        vec![
            (json!({"model": null}), "5".into()),
            (json!({"model": "large"}), "150".into()),
            (json!({"model": "small"}), "90".into()),
        ],
        "one row per model, in key order, across pages"
    );
    // Each window lists the events of its own values only.
    let ids =
        |filter: &str| format!("/api/v1/aggregations?meter=llm_tokens&include=event_ids&{filter}");
    let large = api
        .get_json(&ids("customer_id=acme&dimension.model=large"))
        .await;
    assert_eq!(
        large["data"][0]["event_ids"],
        json!(["t1", "t2"]),
        "{large}"
    );
    let missing = api
        .get_json(&ids("customer_id=acme&null_dimension=model"))
        .await;
    assert_eq!(missing["data"][0]["event_ids"], json!(["t4"]), "{missing}");
    let number = api.get_json(&ids("customer_id=num")).await;
    assert_eq!(number["data"][0]["dimensions"], json!({"model": "1.5"}));
    assert_eq!(number["data"][0]["event_ids"], json!(["t6"]), "{number}");
    // large: acme's own book, 150 × 0.002; small: 90 × 0.01 (the default's tiers count the small
    // model's tokens only); no model: 5 × 0.01.
    let charges = listed(&api, "/api/v1/charges?customer_id=acme&meter=llm_tokens").await;
    assert_eq!(
        charges,
        vec![
            (json!({"model": null}), "0.05".into()),
            (json!({"model": "large"}), "0.3".into()),
            (json!({"model": "small"}), "0.9".into()),
        ]
    );
    // Another customer's large model: the default, 100 × 0.01 + 900 × 0.001.
    let other = listed(&api, "/api/v1/charges?customer_id=other&meter=llm_tokens").await;
    assert_eq!(other, vec![(json!({"model": "large"}), "1.9".into())]);
    // The upcoming invoice has a line per model, named by its values.
    let upcoming = api
        .get_json("/api/v1/customers/acme/upcoming-invoice?period=2024-01")
        .await;
    let lines: Vec<(String, Value)> = upcoming["line_items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["description"].as_str().unwrap().to_owned(),
                l["dimensions"].clone(),
            )
        })
        .collect();
    assert_eq!(
        lines,
        vec![
            ("llm_tokens — model null".to_owned(), json!({"model": null})),
            (
                "llm_tokens — model large".to_owned(),
                json!({"model": "large"})
            ),
            (
                "llm_tokens — model small".to_owned(),
                json!({"model": "small"})
            ),
        ],
        "{upcoming}"
    );
    let large = api
        .get_json("/api/v1/aggregations?meter=llm_tokens&dimension.model=large")
        .await;
    let customers: Vec<&str> = large["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["customer_id"].as_str().unwrap())
        .collect();
    assert_eq!(customers, ["acme", "other"], "{large}");
    let missing = api
        .get_json("/api/v1/charges?meter=llm_tokens&null_dimension=model")
        .await;
    assert_eq!(missing["data"].as_array().unwrap().len(), 1, "{missing}");
    // Hostile filters and cursors are 400s, never a 500 from Postgres (jsonb holds no NUL).
    let long = "x".repeat(10 * 1024);
    for bad in [
        "/api/v1/aggregations?dimension.Model=large".to_owned(),
        "/api/v1/aggregations?dimension.model=la%00rge".to_owned(),
        format!("/api/v1/charges?dimension.model={}", "x".repeat(1024)),
        "/api/v1/aggregations?dimension.model=a&dimension.model=b".to_owned(),
        format!(
            "/api/v1/aggregations?cursor={}",
            hex(&["acme", "llm_tokens", "0", r#"{"model":"a\u0000"}"#].join("\0"))
        ),
        format!(
            "/api/v1/charges?cursor={}",
            hex(&["acme", "m", "0", "{not json"].join("\0"))
        ),
    ] {
        expect_problem(api.get(&bad).await, StatusCode::BAD_REQUEST, "BAD_REQUEST").await;
    }
    // An escaped value is the text it spells; it matches nothing here, and is no error.
    let escaped = api
        .get_json("/api/v1/aggregations?dimension.model=l%5Cu0061rge")
        .await;
    assert_eq!(escaped["data"], json!([]));
    // A book's selector with NUL, or too long, is refused as a field.
    for value in [json!("a\u{0}b"), json!(long)] {
        let book = json!({"meter": "llm_tokens", "dimensions": {"model": value},
                          "effective_from": "2024-01-01T00:00:00Z", "unit_price": "1"});
        let response = api.post_json("/api/v1/price-books", &book).await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{book}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn past_the_bound_an_event_is_a_dead_letter_before_and_after_a_restart() {
    let api = spawn_api().await;
    let meter = json!({"meter": "llm_calls", "event_type": "llm_call", "aggregation": "count",
                       "group_by": ["model"], "max_dimension_values": 2});
    assert_eq!(
        api.post_json("/api/v1/meters", &meter).await.status(),
        StatusCode::CREATED
    );
    let mut pipeline = spawn_pipeline(&api.url, &api.topic, 2, &[]);
    post_all(
        &api,
        &[
            tokens("b1", "acme", Some("a"), 1),
            tokens("b2", "acme", Some("b"), 1),
        ],
    )
    .await;
    api.wait_caught_up(WAIT).await;
    post_all(&api, &[tokens("b3", "acme", Some("c"), 1)]).await;
    api.wait_caught_up(WAIT).await;
    pipeline.kill();
    // A restart knows "a" and "b" were admitted: "c" is still refused, "b" still counts.
    let _pipeline = spawn_pipeline(&api.url, &api.topic, 1, &[]);
    post_all(
        &api,
        &[
            tokens("b4", "acme", Some("c"), 1),
            tokens("b5", "acme", Some("b"), 1),
        ],
    )
    .await;
    api.wait_caught_up(WAIT).await;
    let rows = listed(
        &api,
        "/api/v1/aggregations?customer_id=acme&meter=llm_calls",
    )
    .await;
    assert_eq!(
        rows,
        vec![
            (json!({"model": "a"}), "1".into()),
            (json!({"model": "b"}), "2".into()),
        ]
    );
    let dead = scalar_i64(
        &api.url,
        "SELECT count(*) FROM dead_letters WHERE reason LIKE 'DIMENSION_CARDINALITY: meter llm_calls%'",
    )
    .await;
    assert_eq!(dead, 2, "b3 and b4 are dead letters");
    let admitted = scalar_i64(&api.url, "SELECT count(*) FROM dimension_values").await;
    assert_eq!(admitted, 2);
}

/// A meter created with `group_by` applies to history through a re-rating job, and the job admits
/// values as the pipeline does: the first values in (event time, event id) order up to the bound, the
/// rest dead letters. The running pipeline then knows the job's values: a live event with a further
/// value is refused, one with an admitted value counts.
#[tokio::test(flavor = "multi_thread")]
async fn a_rerating_job_applies_a_new_group_by_meter_to_history_within_its_bound() {
    let api = spawn_api().await;
    let _pipeline = spawn_pipeline(&api.url, &api.topic, 2, &[]);
    post_all(
        &api,
        &[
            tokens("h1", "acme", Some("a"), 1),
            tokens("h2", "acme", Some("b"), 1),
            tokens("h3", "acme", Some("c"), 1),
            tokens("h4", "acme", Some("a"), 1),
            tokens("h5", "acme", None, 1),
        ],
    )
    .await;
    api.wait_caught_up(WAIT).await;
    let meter = json!({"meter": "llm_calls", "event_type": "llm_call", "aggregation": "count",
                       "group_by": ["model"], "max_dimension_values": 2});
    assert_eq!(
        api.post_json("/api/v1/meters", &meter).await.status(),
        StatusCode::CREATED
    );
    let job = api
        .post_json(
            "/api/v1/rerating-jobs",
            &json!({"from": "2024-01-15T00:00:00Z", "to": "2024-01-16T00:00:00Z",
                    "reason": "apply llm_calls by model to January"}),
        )
        .await;
    assert_eq!(job.status(), StatusCode::ACCEPTED);
    let job_id = job.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let job = api
            .get_json(&format!("/api/v1/rerating-jobs/{job_id}"))
            .await;
        if job["status"] == "succeeded" {
            break;
        }
        assert_ne!(job["status"], "failed", "{job}");
        assert!(std::time::Instant::now() < deadline, "{job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rows = || {
        listed(
            &api,
            "/api/v1/aggregations?customer_id=acme&meter=llm_calls",
        )
    };
    assert_eq!(
        rows().await,
        vec![
            (json!({"model": "a"}), "2".into()),
            (json!({"model": "b"}), "1".into()),
        ],
        "a and b are admitted (h1, h2); c (h3) and null (h5) are past the bound of 2"
    );
    let dead = || {
        scalar_i64(
            &api.url,
            "SELECT count(*) FROM dead_letters WHERE reason LIKE 'DIMENSION_CARDINALITY: meter llm_calls%'",
        )
    };
    assert_eq!(dead().await, 2, "h3 and h5 are dead letters");
    assert_eq!(
        scalar_i64(&api.url, "SELECT count(*) FROM dimension_values").await,
        2
    );
    // The live pipeline took the job's values in: "d" is refused, "b" counts.
    post_all(
        &api,
        &[
            tokens("l1", "acme", Some("d"), 1),
            tokens("l2", "acme", Some("b"), 1),
        ],
    )
    .await;
    api.wait_caught_up(WAIT).await;
    assert_eq!(
        rows().await,
        vec![
            (json!({"model": "a"}), "2".into()),
            (json!({"model": "b"}), "2".into()),
        ]
    );
    assert_eq!(dead().await, 3, "l1 is a dead letter too");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_meter_definition_with_a_bad_group_by_is_refused() {
    let api = spawn_api().await;
    for (group_by, bound) in [
        (json!(["a", "b", "c", "d"]), json!(null)),
        (json!(["Model"]), json!(null)),
        (json!(["m", "m"]), json!(null)),
        (json!(["m"]), json!(0)),
        (json!(["m"]), json!(100001)),
        (json!([]), json!(5)),
    ] {
        let meter = json!({"meter": "m1", "event_type": "x", "aggregation": "count",
                           "group_by": group_by, "max_dimension_values": bound});
        let response = api.post_json("/api/v1/meters", &meter).await;
        let status = response.status();
        assert!(
            status.is_client_error(),
            "{meter}: {status} {}",
            response.text().await.unwrap()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn total_by_adds_the_rows_up_over_every_other_dimension() {
    let api = spawn_api().await;
    let meter = json!({"meter": "llm_requests", "event_type": "llm_call", "aggregation": "count",
                       "group_by": ["model", "region"]});
    assert_eq!(
        api.post_json("/api/v1/meters", &meter).await.status(),
        StatusCode::CREATED
    );
    let _pipeline = spawn_pipeline(&api.url, &api.topic, 1, &[]);
    let call = |id: &str, model: &str, region: Option<&str>| {
        let mut properties = json!({"model": model});
        if let Some(region) = region {
            properties["region"] = json!(region);
        }
        json!({"event_id": id, "customer_id": "acme", "event_type": "llm_call",
               "event_time": "2024-01-15T14:30:00Z", "properties": properties})
    };
    post_all(
        &api,
        &[
            call("r1", "large", Some("eu")),
            call("r2", "large", Some("us")),
            call("r3", "large", None),
            call("r4", "small", Some("eu")),
        ],
    )
    .await;
    api.wait_caught_up(WAIT).await;
    let by_model = listed(
        &api,
        "/api/v1/aggregations?meter=llm_requests&total_by=model",
    )
    .await;
    assert_eq!(
        by_model,
        vec![
            (json!({"model": "large"}), "3".into()),
            (json!({"model": "small"}), "1".into()),
        ]
    );
    let by_region = listed(
        &api,
        "/api/v1/aggregations?meter=llm_requests&total_by=region&dimension.model=large",
    )
    .await;
    assert_eq!(
        by_region,
        vec![
            (json!({"region": null}), "1".into()),
            (json!({"region": "eu"}), "1".into()),
            (json!({"region": "us"}), "1".into()),
        ]
    );
    for bad in [
        "/api/v1/aggregations?total_by=model",
        "/api/v1/aggregations?meter=llm_requests&total_by=tier",
        "/api/v1/aggregations?meter=llm_requests&total_by=model&include=event_ids",
    ] {
        expect_problem(api.get(bad).await, StatusCode::BAD_REQUEST, "BAD_REQUEST").await;
    }
}

/// (description, dimensions, price_book_id, amount normalized) of every line of an invoice.
fn lines_of(invoice: &Value) -> Vec<(String, Value, String, String)> {
    invoice["line_items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["description"].as_str().unwrap().to_owned(),
                l["dimensions"].clone(),
                l["price_book_id"].as_str().unwrap_or_default().to_owned(),
                l["amount"]
                    .to_string()
                    .trim_matches('"')
                    .parse::<Decimal>()
                    .unwrap()
                    .normalize()
                    .to_string(),
            )
        })
        .collect()
}

/// The issue's LLM-billing example: one rate card prices every model (a graduated price for the large
/// model, a flat one for the small, a fallback for the rest), acme has its own price for the large
/// model, the invoice and its document have a line per model, and a PATCH of the card's entries
/// re-prices what it changes.
#[tokio::test(flavor = "multi_thread")]
async fn a_rate_card_prices_every_model_in_one_book_and_a_customer_override_beats_it() {
    let api = spawn_api().await;
    let meter = json!({"meter": "llm_tokens", "event_type": "llm_call", "aggregation": "sum",
                       "value_property": "properties.tokens", "group_by": ["model"]});
    assert_eq!(
        api.post_json("/api/v1/meters", &meter).await.status(),
        StatusCode::CREATED
    );
    let entries = json!([
        {"dimensions": {"model": "large"}, "model": {"type": "graduated", "tiers": [
            {"up_to": "100", "unit_price": "0.01"}, {"unit_price": "0.002"}]}},
        {"dimensions": {"model": "small"}, "model": {"type": "per_unit", "unit_price": "0.001"}},
        {"dimensions": {}, "model": {"type": "per_unit", "unit_price": "0.005"}}
    ]);
    let card = json!({"meter": "llm_tokens", "effective_from": "2024-01-01T00:00:00Z",
                      "entries": entries});
    let created = api.post_json("/api/v1/price-books", &card).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let created: Value = created.json().await.unwrap();
    let card_id = created["price_book_id"].as_str().unwrap().to_owned();
    assert_eq!(created["entries"].as_array().unwrap().len(), 3, "{created}");
    assert_eq!(created["entries"][1]["model"]["unit_price"], json!(0.001));
    assert!(
        created.get("model").is_none(),
        "a card's prices are its entries: {created}"
    );
    let shown = api
        .get_json(&format!("/api/v1/price-books/{card_id}"))
        .await;
    assert_eq!(shown["entries"], created["entries"]);
    // acme's own price for the large model beats the card's entry for it.
    let own = json!({"meter": "llm_tokens", "customer_id": "acme", "dimensions": {"model": "large"},
                     "effective_from": "2024-01-01T00:00:00Z",
                     "model": {"type": "per_unit", "unit_price": "0.003"}});
    let own = api.post_json("/api/v1/price-books", &own).await;
    assert_eq!(own.status(), StatusCode::CREATED);
    let own_id = own.json::<Value>().await.unwrap()["price_book_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // An entry holds its selector against every other book of the scope, and the other way round.
    let plain = json!({"meter": "llm_tokens", "dimensions": {"model": "small"},
                       "effective_from": "2024-06-01T00:00:00Z", "unit_price": "1"});
    let overlap = api.post_json("/api/v1/price-books", &plain).await;
    assert_eq!(overlap.status(), StatusCode::CONFLICT);
    let overlap: Value = overlap.json().await.unwrap();
    assert!(
        overlap["detail"].as_str().unwrap().contains(&card_id),
        "{overlap}"
    );
    let other_card = json!({"meter": "llm_tokens", "effective_from": "2025-01-01T00:00:00Z",
                            "entries": [{"dimensions": {"model": "tiny"}, "model": {"type": "per_unit", "unit_price": "1"}},
                                        {"dimensions": {}, "model": {"type": "per_unit", "unit_price": "1"}}]});
    assert_eq!(
        api.post_json("/api/v1/price-books", &other_card)
            .await
            .status(),
        StatusCode::CONFLICT,
        "its {{}} entry overlaps the first card's"
    );
    // Bad cards are refused field by field.
    let per_unit = json!({"type": "per_unit", "unit_price": "1"});
    for (bad, field) in [
        (
            json!({"entries": [{"dimensions": {"model": "a"}, "model": per_unit},
                               {"dimensions": {"model": "a"}, "model": per_unit}]}),
            "entries[1].dimensions",
        ),
        (
            json!({"entries": [{"dimensions": {"region": "eu"}, "model": per_unit}]}),
            "entries[0].dimensions.region",
        ),
        (
            json!({"entries": [{"dimensions": {}, "model": {"type": "per_unit"}}]}),
            "entries[0].model.unit_price",
        ),
        (json!({"entries": []}), "entries"),
        (
            json!({"entries": [{"dimensions": {"model": "a\u{0}b"}, "model": per_unit}]}),
            "entries[0].dimensions.model",
        ),
        (
            json!({"entries": [{"dimensions": {"model": "x".repeat(10 * 1024)}, "model": per_unit}]}),
            "entries[0].dimensions.model",
        ),
        (
            json!({"entries": [{"model": per_unit}], "model": per_unit}),
            "entries",
        ),
    ] {
        let mut body = json!({"meter": "llm_tokens", "effective_from": "2030-01-01T00:00:00Z"});
        body.as_object_mut()
            .unwrap()
            .extend(bad.as_object().unwrap().clone());
        let response = api.post_json("/api/v1/price-books", &body).await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}"
        );
        let problem: Value = response.json().await.unwrap();
        assert!(
            problem["errors"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["field"] == field),
            "{field}: {problem}"
        );
    }
    let _pipeline = spawn_pipeline(&api.url, &api.topic, 2, &[]);
    post_all(
        &api,
        &[
            tokens("r1", "acme", Some("large"), 150),
            tokens("r2", "acme", Some("small"), 90),
            tokens("r3", "acme", None, 10),
            tokens("r4", "other", Some("large"), 150),
            tokens("r5", "other", Some("medium"), 20),
        ],
    )
    .await;
    api.wait_caught_up(WAIT).await;
    // acme: large by its own book (150 × 0.003), small by the card (90 × 0.001), no model by the
    // card's fallback (10 × 0.005). other: large by the card's tiers (100 × 0.01 + 50 × 0.002),
    // medium by the fallback (20 × 0.005).
    let acme = listed(&api, "/api/v1/charges?customer_id=acme&meter=llm_tokens").await;
    assert_eq!(
        acme,
        vec![
            (json!({"model": null}), "0.05".into()),
            (json!({"model": "large"}), "0.45".into()),
            (json!({"model": "small"}), "0.09".into()),
        ]
    );
    let other = listed(&api, "/api/v1/charges?customer_id=other&meter=llm_tokens").await;
    assert_eq!(
        other,
        vec![
            (json!({"model": "large"}), "1.1".into()),
            (json!({"model": "medium"}), "0.1".into()),
        ]
    );
    // The card re-priced: the small model at 0.002. Only that entry's windows change.
    let mut changed = entries.clone();
    changed[1]["model"]["unit_price"] = json!("0.002");
    let patched = api
        .patch_json(
            &format!("/api/v1/price-books/{card_id}"),
            &json!({"entries": changed}),
        )
        .await;
    assert_eq!(patched.status(), StatusCode::OK);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let acme = listed(&api, "/api/v1/charges?customer_id=acme&meter=llm_tokens").await;
        if acme.contains(&(json!({"model": "small"}), "0.18".into())) {
            assert!(acme.contains(&(json!({"model": "large"}), "0.45".into())));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the card's new price never reached the charges: {acme:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A card's model cannot be PATCHed (its prices are its entries), nor a plain book's entries.
    let wrong = api
        .patch_json(
            &format!("/api/v1/price-books/{card_id}"),
            &json!({"model": per_unit}),
        )
        .await;
    assert_eq!(wrong.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let wrong = api
        .patch_json(
            &format!("/api/v1/price-books/{own_id}"),
            &json!({"entries": changed}),
        )
        .await;
    assert_eq!(wrong.status(), StatusCode::UNPROCESSABLE_ENTITY);
    // The issued invoice and its document: a line per model, the card's lines by the card.
    let customer = json!({"customer_id": "acme", "name": "Acme", "email": "ap@acme.example"});
    assert_eq!(
        api.post_json("/api/v1/customers", &customer).await.status(),
        StatusCode::CREATED
    );
    let issued = api
        .post_json(
            "/api/v1/invoices",
            &json!({"customer_id": "acme", "period_start": "2024-01-01T00:00:00Z",
                    "period_end": "2024-01-31T23:59:59.999Z"}),
        )
        .await;
    assert_eq!(issued.status(), StatusCode::CREATED);
    let issued: Value = issued.json().await.unwrap();
    assert_eq!(
        lines_of(&issued),
        vec![
            (
                "llm_tokens — model null".into(),
                json!({"model": null}),
                card_id.clone(),
                "0.05".into()
            ),
            (
                "llm_tokens — model large".into(),
                json!({"model": "large"}),
                own_id.clone(),
                "0.45".into()
            ),
            (
                "llm_tokens — model small".into(),
                json!({"model": "small"}),
                card_id.clone(),
                "0.18".into()
            ),
        ],
        "{issued}"
    );
    let id = issued["invoice_id"].as_str().unwrap();
    let document = api
        .get(&format!("/api/v1/invoices/{id}/document"))
        .await
        .text()
        .await
        .unwrap();
    for line in [
        "llm_tokens — model large",
        "llm_tokens — model small",
        "llm_tokens — model null",
    ] {
        assert!(document.contains(line), "{line} in {document}");
    }
}
