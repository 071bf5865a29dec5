//! The rating API (SPEC §5, §8, §12; issue 4) against the real database: price books created, read,
//! listed and edited in both request shapes with exact decimals; validation with field paths; the
//! exclusion constraint under 50 concurrent creations (the seed's test 5), customer scopes, half-open
//! ranges and edits; the append-only audit; and `GET /api/v1/charges` over rows written as the pipeline
//! writes them.
//!
//! Length: independent tests of one area, each readable on its own; shared helpers are in
//! `tests/common`.

mod common;

use std::str::FromStr;

use common::*;
use meterflow_model::{PriceModel, Tier};
use reqwest::StatusCode;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sqlx::Row;

const BOOKS: &str = "/api/v1/price-books";

/// JSON parsed with its numbers' exact digits (the `json!` macro would take them through f64).
fn exact(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

fn d(text: &str) -> Decimal {
    Decimal::from_str(text).unwrap()
}

/// A default per-unit book of `meter` over `[from, to)`.
fn book(meter: &str, customer: Option<&str>, from: &str, to: Option<&str>) -> Value {
    json!({"meter": meter, "customer_id": customer, "effective_from": from, "effective_to": to,
           "model": {"type": "per_unit", "unit_price": "0.01"}})
}

async fn create(api: &TestApi, body: &Value) -> Value {
    let response = api.post_json(BOOKS, body).await;
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body} → {text}");
    exact(&text)
}

async fn patch(api: &TestApi, id: &str, body: &Value) -> reqwest::Response {
    api.client
        .patch(format!("{}{BOOKS}/{id}", api.base))
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn count(api: &TestApi, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&api.pool).await.unwrap()
}

/// The field paths of a 422 problem, in order.
async fn invalid_fields(response: reqwest::Response) -> Vec<String> {
    let body = expect_problem(
        response,
        StatusCode::UNPROCESSABLE_ENTITY,
        "VALIDATION_FAILED",
    )
    .await;
    body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap().to_owned())
        .collect()
}

/// Every item of a list, following its cursors.
async fn walk(api: &TestApi, path: &str) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(c) => format!("{path}&cursor={c}"),
            None => path.to_owned(),
        };
        let page = api.get_json(&url).await;
        items.extend(page["data"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return items,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn price_books_round_trip_in_both_shapes_with_exact_decimals() {
    let api = spawn_api().await;

    // SPEC §5's shape, decimals as strings and as numbers with more digits than an f64 holds.
    let spec = exact(
        r#"{"meter":"api_calls","customer_id":null,"currency":"USD",
            "effective_from":"2024-01-01T00:00:00Z","effective_to":"2024-01-14T23:59:59.999Z",
            "model":{"type":"graduated","tiers":[{"up_to":"1000","unit_price":"0.01","flat_fee":"0"},
                                                 {"up_to":null,"unit_price":0.0012345678901234567890123}]},
            "minimum_per_period":"5.00"}"#,
    );
    let response = api.post_json(BOOKS, &spec).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let text = response.text().await.unwrap();
    for fragment in [
        r#""unit_price":0.0012345678901234567890123"#,
        r#""minimum_per_period":5.00"#,
        r#""up_to":1000"#,
        // An inclusive end is the instant that follows (SPEC §12).
        r#""effective_to":"2024-01-15T00:00:00Z""#,
        r#""effective_from":"2024-01-01T00:00:00Z""#,
    ] {
        assert!(text.contains(fragment), "{fragment} in {text}");
    }
    let created = exact(&text);
    let id = created["price_book_id"].as_str().unwrap().to_owned();
    assert!(
        id.len() == 19 && id.starts_with("pb_") && id[3..].bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    assert_eq!(location, format!("{BOOKS}/{id}"));
    assert_eq!(created["customer_id"], Value::Null);
    assert_eq!(
        created["model"],
        exact(
            r#"{"type":"graduated","tiers":[{"up_to":1000,"unit_price":0.01,"flat_fee":0},
                {"up_to":null,"unit_price":0.0012345678901234567890123,"flat_fee":0}]}"#
        )
    );
    assert!(created["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        api.get_json(&location).await,
        created,
        "GET shows what POST stored"
    );

    // The seed's shape (SPEC §12): metric_type, a top-level unit_price, no currency. It starts where
    // the first book ends: half-open ranges that touch do not overlap.
    let seed = create(
        &api,
        &exact(r#"{"metric_type":"api_calls","effective_from":"2024-01-15T00:00:00Z","unit_price":0.08}"#),
    )
    .await;
    assert_eq!(seed["meter"], "api_calls");
    assert_eq!(seed["currency"], "USD");
    assert_eq!(
        seed["model"],
        exact(r#"{"type":"per_unit","unit_price":0.08}"#)
    );
    assert_eq!(seed["effective_to"], Value::Null);
    assert_eq!(seed["minimum_per_period"], Value::Null);
    let seed_id = seed["price_book_id"].as_str().unwrap().to_owned();

    // Lists: in effective order, filtered, a page at a time.
    let ids = |items: &[Value]| -> Vec<String> {
        items
            .iter()
            .map(|b| b["price_book_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let all = api.get_json(&format!("{BOOKS}?meter=api_calls")).await;
    assert_eq!(
        ids(all["data"].as_array().unwrap()),
        [id.as_str(), seed_id.as_str()]
    );
    assert_eq!(all["data"][0], created);
    assert!(all["next_cursor"].is_null());
    let paged = walk(&api, &format!("{BOOKS}?limit=1")).await;
    assert_eq!(ids(&paged), [id.as_str(), seed_id.as_str()]);
    let january = api
        .get_json(&format!(
            "{BOOKS}?from=2024-01-02T00:00:00Z&to=2024-01-10T00:00:00Z"
        ))
        .await;
    assert_eq!(ids(january["data"].as_array().unwrap()), [id.as_str()]);
    let later = api
        .get_json(&format!("{BOOKS}?from=2024-06-01T00:00:00Z"))
        .await;
    assert_eq!(ids(later["data"].as_array().unwrap()), [seed_id.as_str()]);
    for empty in ["meter=tokens", "customer_id=acme"] {
        let page = api.get_json(&format!("{BOOKS}?{empty}")).await;
        assert_eq!(page["data"], json!([]), "{empty}");
    }

    // PATCH: a new model and no minimum; the rest stays.
    let response = patch(
        &api,
        &id,
        &exact(
            r#"{"model":{"type":"volume","tiers":[{"up_to":100,"unit_price":"0.020"},
                {"up_to":null,"unit_price":0.015,"flat_fee":"2.50"}]},"minimum_per_period":null}"#,
        ),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let patched = exact(&response.text().await.unwrap());
    assert_eq!(
        patched["model"],
        exact(
            r#"{"type":"volume","tiers":[{"up_to":100,"unit_price":0.020,"flat_fee":0},
                {"up_to":null,"unit_price":0.015,"flat_fee":2.50}]}"#
        )
    );
    assert_eq!(patched["minimum_per_period"], Value::Null);
    for same in [
        "meter",
        "currency",
        "effective_from",
        "effective_to",
        "created_at",
    ] {
        assert_eq!(patched[same], created[same], "{same}");
    }
    assert_ne!(patched["updated_at"], created["updated_at"]);
    assert_eq!(api.get_json(&location).await, patched);

    // What the pipeline reads: the same books, as the model's types.
    let mut conn = api.pool.acquire().await.unwrap();
    let books = meterflow_store::price_books::load_price_books(&mut conn)
        .await
        .unwrap();
    assert_eq!(books.len(), 2);
    assert_eq!(books[0].price_book_id, id);
    assert_eq!(
        books[0].model,
        PriceModel::Volume {
            tiers: vec![
                Tier {
                    up_to: Some(d("100")),
                    unit_price: d("0.020"),
                    flat_fee: d("0"),
                },
                Tier {
                    up_to: None,
                    unit_price: d("0.015"),
                    flat_fee: d("2.50"),
                },
            ]
        }
    );
    assert_eq!(books[0].effective_from, 1_704_067_200_000_000);
    assert_eq!(books[0].effective_to, Some(1_705_276_800_000_000));
    assert_eq!(books[0].minimum_per_period, None);
    assert_eq!(books[1].price_book_id, seed_id);
    assert_eq!(books[1].customer_id, None);
    assert_eq!(books[1].currency, "USD");
    assert_eq!(
        books[1].model,
        PriceModel::PerUnit {
            unit_price: d("0.08")
        }
    );
    assert_eq!(books[1].effective_to, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_price_books_are_refused_with_field_paths_and_nothing_is_stored() {
    let api = spawn_api().await;

    let cases: Vec<(Value, Vec<&str>)> = vec![
        (
            exact(
                r#"{"meter":"Bad Meter","customer_id":"","currency":"usd",
                    "effective_from":"2024-02-01T00:00:00Z","effective_to":"2024-01-01T00:00:00Z",
                    "model":{"type":"graduated","tiers":[{"up_to":"10","unit_price":"abc"},
                                                         {"up_to":null,"unit_price":"NaN"}]},
                    "minimum_per_period":"-1"}"#,
            ),
            vec![
                "meter",
                "customer_id",
                "currency",
                "effective_to",
                "model.tiers[0].unit_price",
                "model.tiers[1].unit_price",
                "minimum_per_period",
            ],
        ),
        (json!({}), vec!["meter", "effective_from", "model"]),
        (
            json!({"meter": "m", "currency": "XYZ", "effective_from": "yesterday",
                   "model": {"type": "tiered"}}),
            vec!["currency", "effective_from", "model.type"],
        ),
        (
            json!({"meter": "m", "metric_type": "n", "effective_from": "2024-01-01T00:00:00Z",
                   "unit_price": "1", "model": {"type": "per_unit", "unit_price": "1"}}),
            vec!["metric_type", "unit_price"],
        ),
        (
            json!({"metric_type": "m", "effective_from": "2024-01-01T00:00:00Z", "unit_price": "-0.5"}),
            vec!["unit_price"],
        ),
        (
            json!({"meter": "m", "effective_from": "2024-01-01T00:00:00Z",
                   "model": {"type": "volume", "tiers": [
                       {"up_to": 100, "unit_price": 1}, {"up_to": 50, "unit_price": 1}]}}),
            vec!["model.tiers[1].up_to"],
        ),
        (
            json!({"meter": "m", "effective_from": "2024-01-01T00:00:00Z",
                   "model": {"type": "package", "package_size": 0, "package_price": 5, "tiers": []}}),
            vec!["model.tiers"],
        ),
        (
            json!({"meter": "m", "effective_from": "2024-01-01T00:00:00Z",
                   "model": {"type": "package", "package_size": 0, "package_price": 5}}),
            vec!["model.package_size"],
        ),
    ];
    for (body, fields) in cases {
        let got = invalid_fields(api.post_json(BOOKS, &body).await).await;
        assert_eq!(got, fields, "{body}");
    }

    // Unknown fields and wrong JSON types are malformed bodies, as for meters.
    for body in [
        json!({"meter": "m", "effective_from": "2024-01-01T00:00:00Z", "unit_price": 1, "colour": "blue"}),
        json!({"meter": "m", "effective_from": "2024-01-01T00:00:00Z",
               "model": {"type": "graduated", "tiers": [{"up_to": null, "price": 1}]}}),
        json!({"meter": 7, "effective_from": "2024-01-01T00:00:00Z", "unit_price": 1}),
    ] {
        expect_problem(
            api.post_json(BOOKS, &body).await,
            StatusCode::BAD_REQUEST,
            "MALFORMED_JSON",
        )
        .await;
    }
    let not_json = api
        .post_raw(BOOKS, "application/json", b"{\"meter\":".to_vec())
        .await;
    expect_problem(not_json, StatusCode::BAD_REQUEST, "MALFORMED_JSON").await;

    // A PATCH may change only model, minimum_per_period and effective_to, to valid values.
    let id = create(&api, &book("api_calls", None, "2024-01-01T00:00:00Z", None)).await
        ["price_book_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let patches: Vec<(Value, Vec<&str>)> = vec![
        (json!({"currency": "EUR"}), vec!["currency"]),
        (
            json!({"effective_from": "2023-01-01T00:00:00Z", "meter": "x"}),
            vec!["effective_from", "meter"],
        ),
        (json!({"colour": "blue"}), vec!["colour"]),
        (
            json!({"effective_to": "2023-12-31T00:00:00Z"}),
            vec!["effective_to"],
        ),
        (json!({"effective_to": 5}), vec!["effective_to"]),
        (
            json!({"model": {"type": "per_unit", "unit_price": "-1"}}),
            vec!["model.unit_price"],
        ),
        (
            json!({"minimum_per_period": "-0.01"}),
            vec!["minimum_per_period"],
        ),
    ];
    for (body, fields) in patches {
        let mut got = invalid_fields(patch(&api, &id, &body).await).await;
        got.sort();
        assert_eq!(got, fields, "{body}");
    }

    let missing = format!("{BOOKS}/pb_0000000000000000");
    expect_problem(api.get(&missing).await, StatusCode::NOT_FOUND, "NOT_FOUND").await;
    expect_problem(
        patch(&api, "pb_0000000000000000", &json!({"effective_to": null})).await,
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    )
    .await;
    for bad in [
        "limit=0",
        "limit=5000",
        "cursor=zz",
        "from=yesterday",
        "colour=blue",
        "from=2024-02-01T00:00:00Z&to=2024-01-01T00:00:00Z",
    ] {
        let response = api.get(&format!("{BOOKS}?{bad}")).await;
        expect_problem(response, StatusCode::BAD_REQUEST, "BAD_REQUEST").await;
    }

    assert_eq!(count(&api, "SELECT count(*) FROM price_books").await, 1);
    assert_eq!(
        count(&api, "SELECT count(*) FROM price_book_audit").await,
        1,
        "refused requests leave no audit rows"
    );
    let stored = api.get_json(&format!("{BOOKS}/{id}")).await;
    assert_eq!(stored["currency"], "USD");
    assert_eq!(stored["effective_to"], Value::Null);
}

/// The seed's concurrency test 5: 50 concurrent creations of overlapping books for one meter.
#[tokio::test(flavor = "multi_thread")]
async fn of_50_concurrent_overlapping_books_exactly_one_is_created() {
    let api = spawn_api().await;
    let bodies: Vec<Value> = (1..=50)
        .map(|i| {
            exact(&format!(
                r#"{{"metric_type":"api_calls","effective_from":"2024-01-15T00:00:00Z","unit_price":{}}}"#,
                Decimal::new(i, 2)
            ))
        })
        .collect();
    let responses =
        futures::future::join_all(bodies.iter().map(|body| api.post_json(BOOKS, body))).await;
    let mut winners = Vec::new();
    let mut conflicts = 0;
    for response in responses {
        if response.status() == StatusCode::CREATED {
            winners.push(exact(&response.text().await.unwrap()));
        } else {
            expect_problem(response, StatusCode::CONFLICT, "PRICE_BOOK_OVERLAP").await;
            conflicts += 1;
        }
    }
    assert_eq!((winners.len(), conflicts), (1, 49));
    let rows = sqlx::query("SELECT price_book_id, model->>'unit_price' FROM price_books")
        .fetch_all(&api.pool)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "one row in the table");
    assert_eq!(rows[0].get::<String, _>(0), winners[0]["price_book_id"]);
    assert_eq!(
        rows[0].get::<String, _>(1),
        winners[0]["model"]["unit_price"].to_string(),
        "the stored book is the one answered 201"
    );
    assert_eq!(
        count(&api, "SELECT count(*) FROM price_book_audit").await,
        1
    );
}

/// Concurrent writers of one meter's books never meet in a deadlock: each is answered created or
/// overlapping, never 503. Two inserts that overlap, checked by the exclusion constraint at once, wait
/// for each other; Postgres then kills one (40P01), which the API answered 503 (CI, stop 30).
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_writers_of_one_meter_never_deadlock() {
    use meterflow_model::PriceBook;
    use meterflow_store::price_books::{create_price_book, update_price_book, PriceBookError};
    let api = spawn_api().await;
    for round in 0..25 {
        let meter = format!("race_{round}");
        let book = |i: i64| PriceBook {
            price_book_id: format!("pb_{round}_{i}"),
            meter: meter.clone(),
            customer_id: None,
            dimensions: Default::default(),
            currency: "USD".into(),
            effective_from: 1_700_000_000_000_000 + i,
            effective_to: None,
            model: PriceModel::PerUnit {
                unit_price: Decimal::new(i, 2),
            },
            minimum_per_period: None,
            entries: Vec::new(),
        };
        let creations = (0..10).map(|i| {
            let (pool, book) = (api.pool.clone(), book(i));
            async move {
                let mut conn = pool.acquire().await.unwrap();
                create_price_book(&mut conn, &book).await.map(|_| ())
            }
        });
        let results = futures::future::join_all(creations).await;
        let created = results.iter().filter(|r| r.is_ok()).count();
        for result in &results {
            assert!(
                matches!(result, Ok(()) | Err(PriceBookError::Overlap { .. })),
                "round {round}: {result:?}"
            );
        }
        assert_eq!(created, 1, "round {round}: one book of the overlapping ten");
        // And edits racing creations: close the winner early while the rest try again.
        let winner = (0..10)
            .find(|i| results.get(*i as usize).is_some_and(|r| r.is_ok()))
            .unwrap();
        let edit = {
            let pool = api.pool.clone();
            let id = format!("pb_{round}_{winner}");
            async move {
                let mut conn = pool.acquire().await.unwrap();
                update_price_book(&mut conn, &id, |b| {
                    Ok(PriceBook {
                        effective_to: Some(b.effective_from + 1_000),
                        ..b.clone()
                    })
                })
                .await
                .map(|_| ())
            }
        };
        let retries = (0..9).map(|i| {
            let (pool, mut book) = (api.pool.clone(), book(100 + i));
            book.effective_from += 10_000;
            async move {
                let mut conn = pool.acquire().await.unwrap();
                create_price_book(&mut conn, &book).await.map(|_| ())
            }
        });
        let (edited, results) =
            futures::future::join(edit, futures::future::join_all(retries)).await;
        assert!(edited.is_ok(), "round {round}: {edited:?}");
        for result in &results {
            assert!(
                matches!(result, Ok(()) | Err(PriceBookError::Overlap { .. })),
                "round {round}: {result:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn books_overlap_only_within_one_meter_and_customer_scope() {
    let api = spawn_api().await;
    let january = |customer| {
        book(
            "api_calls",
            customer,
            "2024-01-01T00:00:00Z",
            Some("2024-02-01T00:00:00Z"),
        )
    };
    let default = create(&api, &january(None)).await;
    // A customer's own book may overlap the default one; each customer is a scope of its own.
    create(&api, &january(Some("acme"))).await;
    create(&api, &january(Some("globex"))).await;
    // Half-open: a book starting where another ends does not overlap it.
    create(&api, &book("api_calls", None, "2024-02-01T00:00:00Z", None)).await;
    // Another meter is another scope.
    create(
        &api,
        &book(
            "tokens",
            None,
            "2024-01-01T00:00:00Z",
            Some("2024-02-01T00:00:00Z"),
        ),
    )
    .await;

    let overlapping = [
        book(
            "api_calls",
            None,
            "2024-01-31T00:00:00Z",
            Some("2024-02-01T00:00:00Z"),
        ),
        book("api_calls", Some("acme"), "2024-01-15T00:00:00Z", None),
        // The last millisecond of January is inside the default January book.
        book(
            "api_calls",
            None,
            "2024-01-31T23:59:59.999Z",
            Some("2024-02-01T00:00:00Z"),
        ),
    ];
    for body in &overlapping {
        expect_problem(
            api.post_json(BOOKS, body).await,
            StatusCode::CONFLICT,
            "PRICE_BOOK_OVERLAP",
        )
        .await;
    }
    let problem = expect_problem(
        api.post_json(BOOKS, &overlapping[0]).await,
        StatusCode::CONFLICT,
        "PRICE_BOOK_OVERLAP",
    )
    .await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains(default["price_book_id"].as_str().unwrap()),
        "the problem names the book in the way: {detail}"
    );
    assert_eq!(count(&api, "SELECT count(*) FROM price_books").await, 5);
    assert_eq!(
        count(&api, "SELECT count(*) FROM price_book_audit").await,
        5
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_edit_that_would_overlap_another_book_is_refused() {
    let api = spawn_api().await;
    let a = create(
        &api,
        &book(
            "api_calls",
            None,
            "2024-01-01T00:00:00Z",
            Some("2024-02-01T00:00:00Z"),
        ),
    )
    .await;
    let b = create(&api, &book("api_calls", None, "2024-03-01T00:00:00Z", None)).await;
    let (a_id, b_id) = (
        a["price_book_id"].as_str().unwrap(),
        b["price_book_id"].as_str().unwrap(),
    );

    for end in [json!("2024-03-15T00:00:00Z"), Value::Null] {
        let problem = expect_problem(
            patch(&api, a_id, &json!({"effective_to": end})).await,
            StatusCode::CONFLICT,
            "PRICE_BOOK_OVERLAP",
        )
        .await;
        assert!(
            problem["detail"].as_str().unwrap().contains(b_id),
            "{problem}"
        );
    }
    assert_eq!(
        api.get_json(&format!("{BOOKS}/{a_id}")).await,
        a,
        "a refused edit changes nothing"
    );

    // Up to where the next book begins is fine, written inclusively or not.
    let response = patch(
        &api,
        a_id,
        &json!({"effective_to": "2024-02-29T23:59:59.999Z"}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let extended: Value = response.json().await.unwrap();
    assert_eq!(extended["effective_to"], "2024-03-01T00:00:00Z");

    // An edit racing an edit of the other book's range: each may wait for the other on the
    // constraint's index, a deadlock Postgres breaks by aborting one, which is then retried. The
    // overlap is refused and the other edit goes through, every time.
    let reset = patch(&api, a_id, &json!({"effective_to": "2024-02-01T00:00:00Z"})).await;
    assert_eq!(reset.status(), StatusCode::OK);
    let extend = json!({"effective_to": "2024-03-15T00:00:00Z"});
    for round in 0..10 {
        let end = format!("2024-{:02}-01T00:00:00Z", 4 + round % 9);
        let shorten = json!({"effective_to": end});
        let (overlap, other) =
            tokio::join!(patch(&api, a_id, &extend), patch(&api, b_id, &shorten));
        assert_eq!(
            (overlap.status(), other.status()),
            (StatusCode::CONFLICT, StatusCode::OK),
            "round {round}"
        );
        let b_now = api.get_json(&format!("{BOOKS}/{b_id}")).await;
        assert_eq!(b_now["effective_to"], end.as_str());
    }
    let a_now = api.get_json(&format!("{BOOKS}/{a_id}")).await;
    assert_eq!(a_now["effective_to"], "2024-02-01T00:00:00Z");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_change_is_audited_once_and_the_audit_cannot_be_rewritten() {
    let api = spawn_api().await;
    let created = create(
        &api,
        &json!({"metric_type": "api_calls", "effective_from": "2024-01-01T00:00:00Z",
                "effective_to": "2024-03-01T00:00:00Z", "unit_price": "0.08"}),
    )
    .await;
    let id = created["price_book_id"].as_str().unwrap();
    create(&api, &book("api_calls", None, "2024-06-01T00:00:00Z", None)).await;

    let graduated = json!({"type": "graduated", "tiers": [
        {"up_to": "1000", "unit_price": "0.01"}, {"up_to": null, "unit_price": "0.005"}]});
    let edits = [
        (json!({"model": graduated}), StatusCode::OK),
        // The same values again change nothing, and are not audited.
        (json!({"model": graduated}), StatusCode::OK),
        (json!({"minimum_per_period": "10"}), StatusCode::OK),
        // Refused edits are not audited.
        (
            json!({"effective_to": "2024-07-01T00:00:00Z"}),
            StatusCode::CONFLICT,
        ),
        (json!({"currency": "EUR"}), StatusCode::UNPROCESSABLE_ENTITY),
        (
            json!({"effective_to": "2024-05-31T23:59:59.999Z"}),
            StatusCode::OK,
        ),
    ];
    for (body, status) in edits {
        assert_eq!(patch(&api, id, &body).await.status(), status, "{body}");
    }

    let rows = sqlx::query(
        "SELECT action, before, after FROM price_book_audit WHERE price_book_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(&api.pool)
    .await
    .unwrap();
    let actions: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(actions, ["create", "update", "update", "update"]);
    let json = |i: usize, column: usize| -> Value {
        rows[i]
            .get::<Option<Value>, _>(column)
            .unwrap_or(Value::Null)
    };
    assert_eq!(json(0, 1), Value::Null);
    assert_eq!(
        json(0, 2)["model"],
        json!({"type": "per_unit", "unit_price": "0.08"})
    );
    assert_eq!(json(0, 2)["effective_from"], "2024-01-01T00:00:00Z");
    assert_eq!(
        json(1, 1),
        json(0, 2),
        "each change starts from the one before"
    );
    assert_eq!(json(1, 2)["model"]["type"], "graduated");
    assert_eq!(json(2, 1)["minimum_per_period"], Value::Null);
    assert_eq!(json(2, 2)["minimum_per_period"], "10");
    assert_eq!(json(3, 1)["effective_to"], "2024-03-01T00:00:00Z");
    assert_eq!(json(3, 2)["effective_to"], "2024-06-01T00:00:00Z");

    for rewrite in [
        "UPDATE price_book_audit SET actor = 'mallory'",
        "DELETE FROM price_book_audit",
        "TRUNCATE price_book_audit",
    ] {
        let refused = sqlx::query(rewrite).execute(&api.pool).await;
        assert!(refused.is_err(), "{rewrite} must be refused");
    }
    assert_eq!(
        count(&api, "SELECT count(*) FROM price_book_audit").await,
        5
    );
    assert_eq!(
        count(
            &api,
            "SELECT count(*) FROM price_book_audit WHERE actor = 'mallory'"
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn charges_are_listed_filtered_paginated_and_exact() {
    let api = spawn_api().await;
    let empty = api.get_json("/api/v1/charges").await;
    assert_eq!(empty, json!({"data": [], "next_cursor": null}));

    // As the pipeline writes them: 3 customers × 2 meters × 5 hours, and one negative window charge.
    sqlx::query(
        "INSERT INTO charges (customer_id, meter, window_start, window_end, quantity, amount, currency,
                              price_book_id, revision)
         SELECT 'cust_' || c, m, timestamptz '2024-01-15 00:00Z' + h * interval '1 hour',
                timestamptz '2024-01-15 01:00Z' + h * interval '1 hour',
                1234.5678901234567890123, 12345678901234567890.123456789, 'USD', 'pb_0123456789abcdef', 2
         FROM generate_series(1, 3) c, unnest(array['api_call', 'tokens']) m, generate_series(0, 4) h",
    )
    .execute(&api.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO charges (customer_id, meter, window_start, window_end, quantity, amount, currency,
                              price_book_id)
         VALUES ('cust_9', 'tokens', '2024-01-20 10:00Z', '2024-01-20 11:00Z', 0, -0.500, 'EUR', 'pb_x')",
    )
    .execute(&api.pool)
    .await
    .unwrap();

    let response = api
        .get("/api/v1/charges?customer_id=cust_2&meter=tokens&from=2024-01-15T01:00:00Z&to=2024-01-15T03:00:00Z")
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.unwrap();
    for fragment in [
        r#""amount":12345678901234567890.123456789"#,
        r#""quantity":1234.5678901234567890123"#,
        r#""currency":"USD""#,
        r#""price_book_id":"pb_0123456789abcdef""#,
        r#""revision":2"#,
        r#""window_end":"2024-01-15T02:00:00Z""#,
    ] {
        assert!(text.contains(fragment), "{fragment} in {text}");
    }
    let body = exact(&text);
    let starts = |body: &Value| -> Vec<String> {
        body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["window_start"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        starts(&body),
        ["2024-01-15T01:00:00Z", "2024-01-15T02:00:00Z"]
    );
    assert!(body["next_cursor"].is_null());

    // The seed's names for the range, with an inclusive end (SPEC §12).
    let aliased = api
        .get_json("/api/v1/charges?customer_id=cust_2&meter=tokens&window_start=2024-01-15T01:00:00Z&window_end=2024-01-15T02:59:59.999Z")
        .await;
    assert_eq!(aliased, body);

    let negative = api
        .get("/api/v1/charges?customer_id=cust_9")
        .await
        .text()
        .await
        .unwrap();
    assert!(negative.contains(r#""amount":-0.500"#), "{negative}");
    assert!(negative.contains(r#""quantity":0,"#), "{negative}");

    // Pages of 4 walk all 31 rows once, in key order.
    let all = walk(&api, "/api/v1/charges?limit=4").await;
    let keys: Vec<String> = all
        .iter()
        .map(|c| format!("{}/{}/{}", c["customer_id"], c["meter"], c["window_start"]))
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(keys.len(), 31);
    assert_eq!(keys, sorted, "every row once, in order");
    let tokens = walk(&api, "/api/v1/charges?meter=tokens&limit=7").await;
    assert_eq!(tokens.len(), 16);

    for bad in [
        "limit=0",
        "limit=5000",
        "cursor=zz",
        "from=yesterday",
        "colour=blue",
        "from=2024-01-15T00:00:00Z&window_start=2024-01-15T00:00:00Z",
    ] {
        let response = api.get(&format!("/api/v1/charges?{bad}")).await;
        expect_problem(response, StatusCode::BAD_REQUEST, "BAD_REQUEST").await;
    }
}
