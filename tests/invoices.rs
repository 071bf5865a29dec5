//! Customers, invoices, adjustments and invoice runs (SPEC §6; issue 5) against the real API, database,
//! pipeline and binary: the seed's concurrency test 3; periods that have not ended; voids that free a
//! period with gapless numbers; minimum top-ups; the upcoming invoice; the adjustment invariant over
//! three issued periods with late events, voids and price edits, checked against a plain reference
//! rater; an invoice run killed twice and resumed (CLI) and one through the API; the documents.
//!
//! Length: independent end-to-end tests of one area, and the plain invoice reference the adjustment test
//! checks against; shared helpers are in `tests/common`.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::str::FromStr;
use std::time::{Duration, Instant};

use common::*;
use meterflow_model::money::round_to_minor_unit;
use meterflow_model::period_of;
use reqwest::StatusCode;
use rust_decimal::Decimal;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

fn d(text: &str) -> Decimal {
    Decimal::from_str(text).unwrap()
}

/// A decimal from a JSON number (kept with its digits) or string.
fn dec(v: &Value) -> Decimal {
    match v {
        Value::String(s) => d(s),
        other => d(&other.to_string()),
    }
}

fn secs(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .timestamp()
}

async fn register(api: &TestApi, id: &str, currency: &str) {
    let response = api
        .post_json(
            "/api/v1/customers",
            &json!({"customer_id": id, "name": format!("Customer {id}"),
                    "email": format!("billing@{id}.example"), "address": "1 Main St\nSpringfield",
                    "currency": currency}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED, "register {id}");
}

fn january(customer: &str) -> Value {
    json!({"customer_id": customer, "period_start": "2024-01-01T00:00:00Z",
           "period_end": "2024-01-31T23:59:59.999Z"})
}

fn period(customer: &str, month: &str) -> Value {
    let (start, _) = period_of(secs(&format!("{month}-01T00:00:00Z")));
    let (_, end) = period_of(start);
    let at = |s: i64| {
        chrono::DateTime::from_timestamp(s, 0)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    json!({"customer_id": customer, "period_start": at(start), "period_end": at(end)})
}

/// POSTs an invoice and expects 201; returns it.
async fn issue(api: &TestApi, body: &Value) -> Value {
    let response = api.post_json("/api/v1/invoices", body).await;
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body} → {text}");
    serde_json::from_str(&text).unwrap()
}

/// A price book through the API; returns its id.
async fn create_book(api: &TestApi, body: Value) -> String {
    let response = api.post_json("/api/v1/price-books", &body).await;
    let status = response.status();
    let created: Value = response.json().await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body} → {created}");
    created["price_book_id"].as_str().unwrap().to_owned()
}

/// A default per-unit book of `meter`, inserted as the API would store it.
async fn insert_book(api: &TestApi, id: &str, meter: &str, price: &str, minimum: Option<&str>) {
    sqlx::query(
        "INSERT INTO price_books (price_book_id, meter, currency, effective, model, minimum_per_period)
         VALUES ($1, $2, 'USD', tstzrange('2024-01-01T00:00:00Z', NULL, '[)'), $3, $4::numeric)",
    )
    .bind(id)
    .bind(meter)
    .bind(json!({"type": "per_unit", "unit_price": price}))
    .bind(minimum)
    .execute(&api.pool)
    .await
    .unwrap();
}

/// An upcoming-invoice line as the pipeline stores it (invoicing reads nothing else).
async fn insert_line(
    api: &TestApi,
    customer: &str,
    period_start: &str,
    meter: &str,
    book: &str,
    quantity: &str,
    amount: &str,
) {
    sqlx::query(
        "INSERT INTO upcoming_lines (customer_id, period_start, meter, price_book_id, currency,
                                     quantity, amount, windows)
         VALUES ($1, $2::timestamptz, $3, $4, 'USD', $5::numeric, $6::numeric, 1)",
    )
    .bind(customer)
    .bind(period_start)
    .bind(meter)
    .bind(book)
    .bind(quantity)
    .bind(amount)
    .execute(&api.pool)
    .await
    .unwrap();
}

/// Every invoice number issued so far, in order (void ones included).
async fn numbers(api: &TestApi) -> Vec<i64> {
    sqlx::query_scalar("SELECT number FROM invoices ORDER BY number")
        .fetch_all(&api.pool)
        .await
        .unwrap()
}

fn one_to(n: i64) -> Vec<i64> {
    (1..=n).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_issues_of_one_period_give_one_invoice_and_one_conflict() {
    let api = spawn_api().await;
    // The seed's test 3 for cust_123, then the same race for nine more customers at once.
    let customers: Vec<String> = std::iter::once("cust_123".to_owned())
        .chain((1..10).map(|i| format!("cust_race_{i}")))
        .collect();
    for c in &customers {
        register(&api, c, "USD").await;
    }
    let posts = customers.iter().flat_map(|c| {
        let body = january(c);
        let api = &api;
        [0, 1].map(move |_| {
            let body = body.clone();
            async move { api.post_json("/api/v1/invoices", &body).await }
        })
    });
    let responses = futures::future::join_all(posts).await;
    for (pair, customer) in responses.chunks(2).zip(&customers) {
        let statuses: Vec<StatusCode> = pair.iter().map(|r| r.status()).collect();
        assert!(
            statuses.contains(&StatusCode::CREATED) && statuses.contains(&StatusCode::CONFLICT),
            "{customer}: {statuses:?}"
        );
    }
    for response in responses {
        if response.status() == StatusCode::CONFLICT {
            let problem =
                expect_problem(response, StatusCode::CONFLICT, "INVOICE_ALREADY_EXISTS").await;
            assert!(problem["detail"].as_str().unwrap().contains("already has"));
        }
    }
    // The seed's check: exactly one row for (customer_id, billing_period_start).
    let rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM invoices WHERE customer_id = $1 AND billing_period_start = $2::timestamptz",
    )
    .bind("cust_123")
    .bind("2024-01-01T00:00:00Z")
    .fetch_one(&api.pool)
    .await
    .unwrap();
    assert_eq!(rows, 1);
    assert_eq!(numbers(&api).await, one_to(10), "no number lost to a loser");

    // A later issue is refused the same way, and so is a row written past the API: the database
    // itself holds one issued invoice per customer and period.
    expect_problem(
        api.post_json("/api/v1/invoices", &january("cust_123"))
            .await,
        StatusCode::CONFLICT,
        "INVOICE_ALREADY_EXISTS",
    )
    .await;
    let sneaky = sqlx::query(
        "INSERT INTO invoices (invoice_id, number, customer_id, billing_period_start,
                               billing_period_end, currency, line_items, subtotal, total, issued_at)
         VALUES ('inv_x', 99, 'cust_123', '2024-01-01T00:00:00Z', '2024-02-01T00:00:00Z', 'USD',
                 '[]', 0, 0, now())",
    )
    .execute(&api.pool)
    .await
    .unwrap_err();
    let db = sneaky.as_database_error().unwrap();
    assert_eq!(
        (db.code().as_deref(), db.constraint()),
        (Some("23505"), Some("invoices_one_issued_per_period"))
    );
    // Nor is an invoice ever deleted: a void is the only way out.
    let deleted = sqlx::query("DELETE FROM invoices WHERE customer_id = 'cust_123'")
        .execute(&api.pool)
        .await
        .unwrap_err();
    assert!(deleted.to_string().contains("never deleted"), "{deleted}");
}

#[tokio::test(flavor = "multi_thread")]
async fn only_ended_calendar_months_of_registered_customers_are_issued() {
    let api = spawn_api().await;
    register(&api, "cust_a", "USD").await;
    let now = chrono::Utc::now();
    let (start, end) = period_of(now.timestamp());
    let at = |s: i64| {
        chrono::DateTime::from_timestamp(s, 0)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    let current =
        json!({"customer_id": "cust_a", "period_start": at(start), "period_end": at(end)});
    let problem = expect_problem(
        api.post_json("/api/v1/invoices", &current).await,
        StatusCode::CONFLICT,
        "PERIOD_NOT_ENDED",
    )
    .await;
    assert!(problem["detail"].as_str().unwrap().contains(&at(end)));
    expect_problem(
        api.post_json("/api/v1/invoice-runs", &json!({"period": chrono::DateTime::from_timestamp(start, 0).unwrap().format("%Y-%m").to_string()}))
            .await,
        StatusCode::CONFLICT,
        "PERIOD_NOT_ENDED",
    )
    .await;

    // Not a calendar month, a missing or malformed field: 422 with the field's path.
    for (body, field) in [
        (
            json!({"customer_id": "cust_a", "period_start": "2024-01-02T00:00:00Z",
                   "period_end": "2024-02-01T00:00:00Z"}),
            "period_start",
        ),
        (
            json!({"customer_id": "cust_a", "period_start": "2024-01-01T00:00:00Z",
                   "period_end": "2024-02-15T00:00:00Z"}),
            "period_end",
        ),
        (
            json!({"customer_id": "cust_a", "period_start": "2024-01-01",
                   "period_end": "2024-02-01T00:00:00Z"}),
            "period_start",
        ),
        (
            json!({"period_start": "2024-01-01T00:00:00Z", "period_end": "2024-02-01T00:00:00Z"}),
            "customer_id",
        ),
    ] {
        let problem = expect_problem(
            api.post_json("/api/v1/invoices", &body).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_FAILED",
        )
        .await;
        assert_eq!(problem["errors"][0]["field"], field, "{body}");
    }
    expect_problem(
        api.post_json(
            "/api/v1/invoices",
            &json!({"customer_id": "cust_a", "period": "2024-01"}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "MALFORMED_JSON",
    )
    .await;
    // Usage of an unregistered customer is counted, but only registered customers are invoiced.
    expect_problem(
        api.post_json("/api/v1/invoices", &january("cust_nobody"))
            .await,
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    )
    .await;

    // The watermark is the other clock: once the pipeline's committed watermark has passed the end of
    // the current month, the month has ended (SPEC §6).
    sqlx::query(
        "INSERT INTO pipeline_leases (topic, generation, committed_epoch, committed_watermark)
         VALUES ($1, 1, 0, $2)",
    )
    .bind(&api.topic)
    .bind(chrono::DateTime::from_timestamp(end + 3600, 0).unwrap())
    .execute(&api.pool)
    .await
    .unwrap();
    let invoice = issue(&api, &current).await;
    assert_eq!(invoice["billing_period_end"], at(end));
    assert!(numbers(&api).await == [1]);
}

#[tokio::test(flavor = "multi_thread")]
async fn voiding_frees_the_period_and_numbers_stay_gapless() {
    let api = spawn_api().await;
    insert_book(&api, "pb_api", "api_call", "0.1", None).await;
    for c in ["cust_a", "cust_b"] {
        register(&api, c, "USD").await;
        insert_line(
            &api,
            c,
            "2024-01-01T00:00:00Z",
            "api_call",
            "pb_api",
            "100",
            "10",
        )
        .await;
    }
    let a1 = issue(&api, &january("cust_a")).await;
    let b1 = issue(&api, &january("cust_b")).await;
    assert_eq!(
        (a1["number"].as_i64(), b1["number"].as_i64()),
        (Some(1), Some(2))
    );
    assert_eq!(a1["status"], "issued");
    let a1_id = a1["invoice_id"].as_str().unwrap().to_owned();

    let voided = api
        .post_json(
            &format!("/api/v1/invoices/{a1_id}/void"),
            &json!({"reason": "wrong address"}),
        )
        .await;
    assert_eq!(voided.status(), StatusCode::OK);
    let voided: Value = voided.json().await.unwrap();
    assert_eq!(voided["status"], "void");
    assert_eq!(voided["void_reason"], "wrong address");
    assert!(voided["voided_at"].is_string());
    // Voiding again changes nothing; an unknown invoice is 404.
    let again: Value = api
        .post_raw(
            &format!("/api/v1/invoices/{a1_id}/void"),
            "application/json",
            vec![],
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(again["voided_at"], voided["voided_at"]);
    assert_eq!(
        api.post_json("/api/v1/invoices/inv_nope/void", &json!({}))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );

    // The period is free again: the new invoice takes the next number; the void one stays, unchanged.
    let a2 = issue(&api, &january("cust_a")).await;
    assert_eq!(a2["number"], 3);
    assert_ne!(a2["invoice_id"], a1["invoice_id"]);
    assert_eq!(a2["total"], a1["total"]);
    assert_eq!(a2["adjustments"], json!([]));
    expect_problem(
        api.post_json("/api/v1/invoices", &january("cust_b")).await,
        StatusCode::CONFLICT,
        "INVOICE_ALREADY_EXISTS",
    )
    .await;
    assert_eq!(numbers(&api).await, one_to(3));
    let old = api.get_json(&format!("/api/v1/invoices/{a1_id}")).await;
    assert_eq!(old["status"], "void");
    assert_eq!(old["number"], 1);
    assert_eq!(
        old["line_items"], a1["line_items"],
        "an invoice never changes"
    );

    // Lists filter by customer, status and period, in number order, a page at a time.
    let all = api.get_json("/api/v1/invoices?customer_id=cust_a").await;
    let got: Vec<(i64, &str)> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["number"].as_i64().unwrap(), i["status"].as_str().unwrap()))
        .collect();
    assert_eq!(got, [(1, "void"), (3, "issued")]);
    let issued = api.get_json("/api/v1/invoices?status=issued").await;
    assert_eq!(issued["data"].as_array().unwrap().len(), 2);
    let page = api.get_json("/api/v1/invoices?limit=2").await;
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
    let cursor = page["next_cursor"].as_str().unwrap();
    let rest = api
        .get_json(&format!("/api/v1/invoices?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(rest["data"][0]["number"], 3);
    assert!(rest["next_cursor"].is_null());
    let february = api
        .get_json("/api/v1/invoices?from=2024-02-01T00:00:00Z&to=2024-02-29T23:59:59.999Z")
        .await;
    assert_eq!(february["data"], json!([]));
    let january_list = api
        .get_json("/api/v1/invoices?from=2024-01-01T00:00:00Z&to=2024-01-31T23:59:59.999Z")
        .await;
    assert_eq!(january_list["data"].as_array().unwrap().len(), 3);
    assert_eq!(
        api.get("/api/v1/invoices?colour=red").await.status(),
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_minimum_tops_the_line_up_to_exactly_the_minimum_and_the_upcoming_invoice_shows_it() {
    let api = spawn_api().await;
    insert_book(&api, "pb_api", "api_call", "0.0001", Some("10")).await;
    insert_book(&api, "pb_gb", "storage_gb", "0.5", Some("2")).await;
    register(&api, "cust_a", "USD").await;
    // 3.335 rounds to 3.34; the top-up is 10.00 − 3.34 = 6.66 (not round(6.665) = 6.67), so the two
    // lines add up to exactly the minimum. Storage (6.1725 → 6.17) is above its minimum of 2.
    insert_line(
        &api,
        "cust_a",
        "2024-01-01T00:00:00Z",
        "api_call",
        "pb_api",
        "33350",
        "3.335",
    )
    .await;
    insert_line(
        &api,
        "cust_a",
        "2024-01-01T00:00:00Z",
        "storage_gb",
        "pb_gb",
        "12.345",
        "6.1725",
    )
    .await;

    let upcoming = api
        .get_json("/api/v1/customers/cust_a/upcoming-invoice?period=2024-01")
        .await;
    assert_eq!(upcoming["registered"], true);
    assert_eq!(upcoming["currency"], "USD");
    assert_eq!(upcoming["billing_period_start"], "2024-01-01T00:00:00Z");
    assert!(upcoming["issued_invoice_id"].is_null());
    let lines: Vec<(String, String, Decimal)> = upcoming["line_items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["meter"].as_str().unwrap().to_owned(),
                l["kind"].as_str().unwrap().to_owned(),
                dec(&l["amount"]),
            )
        })
        .collect();
    assert_eq!(
        lines,
        [
            ("api_call".into(), "usage".into(), d("3.34")),
            ("api_call".into(), "minimum".into(), d("6.66")),
            ("storage_gb".into(), "usage".into(), d("6.17")),
        ]
    );
    assert_eq!(dec(&upcoming["subtotal"]), d("16.17"));
    assert_eq!(
        upcoming["line_items"][0]["unit_price_summary"],
        "per unit: 0.0001"
    );
    assert_eq!(upcoming["line_items"][0]["quantity"].to_string(), "33350");

    // Issuing bills exactly what the upcoming invoice showed, rounded once per line.
    let invoice = issue(&api, &january("cust_a")).await;
    assert_eq!(invoice["line_items"], upcoming["line_items"]);
    assert_eq!(invoice["subtotal"], upcoming["subtotal"]);
    assert_eq!(invoice["total"], upcoming["subtotal"]);
    assert_eq!(invoice["subtotal"].to_string(), "16.17");
    let after = api
        .get_json("/api/v1/customers/cust_a/upcoming-invoice?period=2024-01")
        .await;
    assert_eq!(after["issued_invoice_id"], invoice["invoice_id"]);

    // An unregistered customer's usage shows too, in the default currency.
    insert_line(
        &api,
        "cust_new",
        "2024-01-01T00:00:00Z",
        "storage_gb",
        "pb_gb",
        "1",
        "0.5",
    )
    .await;
    let unregistered = api
        .get_json("/api/v1/customers/cust_new/upcoming-invoice?period=2024-01")
        .await;
    assert_eq!(unregistered["registered"], false);
    assert_eq!(unregistered["currency"], "USD");
    assert_eq!(unregistered["subtotal"].to_string(), "2.00");
    // The current month by default; a customer without usage has an empty draft.
    let current = api
        .get_json("/api/v1/customers/cust_a/upcoming-invoice")
        .await;
    let (start, _) = period_of(chrono::Utc::now().timestamp());
    assert_eq!(
        secs(current["billing_period_start"].as_str().unwrap()),
        start
    );
    assert_eq!(current["line_items"], json!([]));
    assert_eq!(
        api.get("/api/v1/customers/cust_a/upcoming-invoice?period=2024-13")
            .await
            .status(),
        StatusCode::UNPROCESSABLE_ENTITY
    );

    // A customer billed in EUR with usage priced in USD: neither the draft nor the invoice guesses.
    register(&api, "cust_eur", "EUR").await;
    insert_line(
        &api,
        "cust_eur",
        "2024-01-01T00:00:00Z",
        "storage_gb",
        "pb_gb",
        "1",
        "0.5",
    )
    .await;
    let problem = expect_problem(
        api.get("/api/v1/customers/cust_eur/upcoming-invoice?period=2024-01")
            .await,
        StatusCode::CONFLICT,
        "CURRENCY_MISMATCH",
    )
    .await;
    assert!(problem["detail"].as_str().unwrap().contains("pb_gb"));
    expect_problem(
        api.post_json("/api/v1/invoices", &january("cust_eur"))
            .await,
        StatusCode::CONFLICT,
        "CURRENCY_MISMATCH",
    )
    .await;
    assert_eq!(numbers(&api).await, one_to(1));
}

#[tokio::test(flavor = "multi_thread")]
async fn customers_are_registered_read_listed_and_edited() {
    let api = spawn_api().await;
    let response = api
        .post_json(
            "/api/v1/customers",
            &json!({"customer_id": "cust_1", "name": "Acme", "email": "ap@acme.example"}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["location"], "/api/v1/customers/cust_1");
    let created: Value = response.json().await.unwrap();
    assert_eq!(created["currency"], "USD", "the default currency");
    assert!(created["address"].is_null());
    expect_problem(
        api.post_json(
            "/api/v1/customers",
            &json!({"customer_id": "cust_1", "name": "Other"}),
        )
        .await,
        StatusCode::CONFLICT,
        "CUSTOMER_ALREADY_EXISTS",
    )
    .await;
    expect_problem(
        api.post_json(
            "/api/v1/customers",
            &json!({"customer_id": "cust_2", "name": "B", "vat": "x"}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "MALFORMED_JSON",
    )
    .await;
    let problem = expect_problem(
        api.post_json(
            "/api/v1/customers",
            &json!({"customer_id": "bad id", "name": "B", "currency": "XYZ", "email": "no"}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "VALIDATION_FAILED",
    )
    .await;
    let fields: Vec<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["customer_id", "email", "currency"]);
    for i in 2..=5 {
        register(&api, &format!("cust_{i}"), "EUR").await;
    }

    let patch = |body: Value| {
        let api = &api;
        async move {
            api.client
                .patch(format!("{}/api/v1/customers/cust_1", api.base))
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let edited: Value =
        patch(json!({"name": "Acme Corp", "address": "2 Side St", "currency": "EUR"}))
            .await
            .json()
            .await
            .unwrap();
    assert_eq!(
        (
            &edited["name"],
            &edited["address"],
            &edited["currency"],
            &edited["email"]
        ),
        (
            &json!("Acme Corp"),
            &json!("2 Side St"),
            &json!("EUR"),
            &json!("ap@acme.example")
        )
    );
    let problem = expect_problem(
        patch(json!({"customer_id": "x", "colour": "red"})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "VALIDATION_FAILED",
    )
    .await;
    assert_eq!(problem["errors"].as_array().unwrap().len(), 2);
    assert_eq!(
        api.client
            .patch(format!("{}/api/v1/customers/cust_404", api.base))
            .json(&json!({"name": "x"}))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    // Once it has an issued invoice, a customer's currency is fixed.
    issue(&api, &january("cust_1")).await;
    expect_problem(
        patch(json!({"currency": "USD"})).await,
        StatusCode::CONFLICT,
        "CURRENCY_LOCKED",
    )
    .await;
    assert_eq!(
        patch(json!({"email": null})).await.status(),
        StatusCode::OK,
        "other fields still change"
    );

    let one = api.get_json("/api/v1/customers/cust_1").await;
    assert!(one["email"].is_null());
    assert_eq!(
        api.get("/api/v1/customers/nope").await.status(),
        StatusCode::NOT_FOUND
    );
    let mut ids = Vec::new();
    let mut path = "/api/v1/customers?limit=2".to_owned();
    loop {
        let page = api.get_json(&path).await;
        ids.extend(
            page["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["customer_id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/api/v1/customers?limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(ids, ["cust_1", "cust_2", "cust_3", "cust_4", "cust_5"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_document_is_printable_html_or_a_pdf() {
    let api = spawn_api().await;
    insert_book(&api, "pb_api", "api_call", "0.01", Some("25")).await;
    register(&api, "cust_doc", "USD").await;
    insert_line(
        &api,
        "cust_doc",
        "2024-01-01T00:00:00Z",
        "api_call",
        "pb_api",
        "1234",
        "1234.5678",
    )
    .await;
    let invoice = issue(&api, &january("cust_doc")).await;
    let id = invoice["invoice_id"].as_str().unwrap();
    assert_eq!(invoice["total"].to_string(), "1234.57");

    let response = api.get(&format!("/api/v1/invoices/{id}/document")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "text/html; charset=utf-8"
    );
    let html = response.text().await.unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.contains("Invoice 1"), "the number");
    assert!(html.contains(id));
    assert!(html.contains("Customer cust_doc"));
    assert!(html.contains("1,234.57 USD"), "the line and the total");
    assert!(html.contains("1 – 31 January 2024"));

    let response = api
        .get(&format!("/api/v1/invoices/{id}/document?format=pdf"))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/pdf");
    let pdf = response.bytes().await.unwrap();
    assert!(pdf.starts_with(b"%PDF-"));
    assert!(pdf.windows(14).any(|w| w == b"(1,234.57 USD)"));

    assert_eq!(
        api.get(&format!("/api/v1/invoices/{id}/document?format=doc"))
            .await
            .status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        api.get("/api/v1/invoices/inv_nope/document").await.status(),
        StatusCode::NOT_FOUND
    );
}

/// Σ issued totals of a customer.
async fn issued_total(api: &TestApi, customer: &str) -> Decimal {
    sqlx::query_scalar(
        "SELECT coalesce(sum(total), 0) FROM invoices WHERE customer_id = $1 AND status = 'issued'",
    )
    .bind(customer)
    .fetch_one(&api.pool)
    .await
    .unwrap()
}

fn adjustments_of(invoice: &Value) -> Vec<(String, Decimal, String)> {
    invoice["adjustments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["period_start"].as_str().unwrap().to_owned(),
                dec(&a["amount"]),
                a["original_invoice_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn voids_keep_issued_totals_equal_to_what_the_issued_periods_bill() {
    let api = spawn_api().await;
    insert_book(&api, "pb_api", "api_call", "0.1", None).await;
    for c in ["cust_reissue", "cust_credit"] {
        register(&api, c, "USD").await;
        insert_line(
            &api,
            c,
            "2024-01-01T00:00:00Z",
            "api_call",
            "pb_api",
            "100",
            "10",
        )
        .await;
    }
    let mut jan = BTreeMap::new();
    for c in ["cust_reissue", "cust_credit"] {
        jan.insert(c, issue(&api, &january(c)).await);
        // Late January usage: the February invoice corrects January by +2.50.
        sqlx::query(
            "UPDATE upcoming_lines SET amount = 12.5, quantity = 125 WHERE customer_id = $1",
        )
        .bind(c)
        .execute(&api.pool)
        .await
        .unwrap();
        insert_line(
            &api,
            c,
            "2024-02-01T00:00:00Z",
            "api_call",
            "pb_api",
            "50",
            "5",
        )
        .await;
        let feb = issue(&api, &period(c, "2024-02")).await;
        let jan_id = jan[c]["invoice_id"].as_str().unwrap().to_owned();
        assert_eq!(
            adjustments_of(&feb),
            [("2024-01-01T00:00:00Z".to_owned(), d("2.50"), jan_id.clone())]
        );
        assert_eq!(dec(&feb["total"]), d("7.50"));
        let voided = api
            .post_json(&format!("/api/v1/invoices/{jan_id}/void"), &json!({}))
            .await;
        assert_eq!(voided.status(), StatusCode::OK);
    }

    // January issued again: its lines bill it in full, and the +2.50 already billed for it on the
    // February invoice is reversed on the new one.
    let again = issue(&api, &january("cust_reissue")).await;
    let old_jan = jan["cust_reissue"]["invoice_id"].as_str().unwrap();
    assert_eq!(dec(&again["subtotal"]), d("12.50"));
    assert_eq!(
        adjustments_of(&again),
        [(
            "2024-01-01T00:00:00Z".to_owned(),
            d("-2.50"),
            old_jan.to_owned()
        )]
    );
    assert_eq!(dec(&again["total"]), d("10.00"));
    assert_eq!(
        issued_total(&api, "cust_reissue").await,
        d("17.50"),
        "12.50 + 5.00"
    );

    // Or March comes first: January is no longer billed, so the +2.50 is reversed there — a credit.
    insert_line(
        &api,
        "cust_credit",
        "2024-03-01T00:00:00Z",
        "api_call",
        "pb_api",
        "10",
        "1",
    )
    .await;
    let march = issue(&api, &period("cust_credit", "2024-03")).await;
    let old_jan = jan["cust_credit"]["invoice_id"].as_str().unwrap();
    assert_eq!(
        adjustments_of(&march),
        [(
            "2024-01-01T00:00:00Z".to_owned(),
            d("-2.50"),
            old_jan.to_owned()
        )]
    );
    assert_eq!(
        march["total"].to_string(),
        "-1.50",
        "a negative total is a credit"
    );
    assert_eq!(
        issued_total(&api, "cust_credit").await,
        d("6.00"),
        "5.00 + 1.00"
    );
    let again = issue(&api, &january("cust_credit")).await;
    assert_eq!(again["adjustments"], json!([]));
    assert_eq!(
        issued_total(&api, "cust_credit").await,
        d("18.50"),
        "12.50 + 5.00 + 1.00"
    );
    assert_eq!(numbers(&api).await, one_to(7));
}

// ── The adjustment invariant, end to end with the pipeline ────────────────────────────────────────

/// A per-unit book as the test knows it.
#[derive(Clone, Debug)]
struct Book {
    id: String,
    meter: &'static str,
    customer: Option<&'static str>,
    /// Seconds; open-ended.
    from: i64,
    price: Decimal,
    minimum: Option<Decimal>,
}

/// An event as the test sent it.
struct Sent {
    id: &'static str,
    meter: &'static str,
    time: i64,
    value: Decimal,
}

/// (period start, meter, book) → Σ amount, unrounded: the plain reference rater. Every book here is
/// per unit, so a window's charge is its quantity × the price of the book in force at its start (the
/// customer's own book before the default one), and a period's line is the sum over its windows.
fn rate(
    customer: &str,
    events: &[Sent],
    voided: &HashSet<&str>,
    books: &[Book],
) -> BTreeMap<(i64, String, String), Decimal> {
    let mut lines = BTreeMap::new();
    for e in events.iter().filter(|e| !voided.contains(e.id)) {
        let window = e.time - e.time.rem_euclid(3600);
        let covering = |b: &&Book| b.meter == e.meter && b.from <= window;
        let book = books
            .iter()
            .filter(covering)
            .find(|b| b.customer == Some(customer))
            .or_else(|| books.iter().filter(covering).find(|b| b.customer.is_none()));
        if let Some(book) = book {
            let (period, _) = period_of(e.time);
            *lines
                .entry((period, e.meter.to_owned(), book.id.clone()))
                .or_insert(Decimal::ZERO) += e.value * book.price;
        }
    }
    lines
}

/// What each line should bill now: round(max(amount, minimum)).
fn billed_now(
    lines: &BTreeMap<(i64, String, String), Decimal>,
    books: &[Book],
) -> BTreeMap<(i64, String, String), Decimal> {
    lines
        .iter()
        .map(|(key, amount)| {
            let minimum = books.iter().find(|b| b.id == key.2).unwrap().minimum;
            let amount = minimum.map_or(*amount, |m| (*amount).max(m));
            (key.clone(), round_to_minor_unit(amount, "USD"))
        })
        .collect()
}

/// Waits until the stored upcoming lines of `customer` equal the reference (amounts compared exactly).
async fn wait_for_lines(
    api: &TestApi,
    customer: &str,
    expected: &BTreeMap<(i64, String, String), Decimal>,
    what: &str,
) {
    let started = Instant::now();
    let want: BTreeMap<_, _> = expected
        .iter()
        .map(|(k, v)| (k.clone(), v.normalize()))
        .collect();
    loop {
        let rows: Vec<(i64, String, String, Decimal)> = sqlx::query_as(
            "SELECT extract(epoch FROM period_start)::bigint, meter, price_book_id, amount
             FROM upcoming_lines WHERE customer_id = $1",
        )
        .bind(customer)
        .fetch_all(&api.pool)
        .await
        .unwrap();
        let got: BTreeMap<_, _> = rows
            .into_iter()
            .map(|(p, m, b, a)| ((p, m, b), a.normalize()))
            .collect();
        if got == want {
            return;
        }
        assert!(
            started.elapsed() < WAIT,
            "{what}: upcoming lines are {got:?}, the reference says {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn post_events(api: &TestApi, customer: &str, events: &[&Sent]) {
    for e in events {
        let time = chrono::DateTime::from_timestamp(e.time, 0)
            .unwrap()
            .to_rfc3339();
        let body = json!({"event_id": e.id, "customer_id": customer, "event_type": e.meter,
                          "event_time": time, "value": e.value.to_string()});
        let response = api.post_event(&body).await;
        assert_eq!(response.status(), StatusCode::CREATED, "{body}");
    }
}

/// Checks one issued invoice against the reference: its lines, its adjustments (`billed_now − billed
/// before` for every line of the periods issued before), its totals, and the invariant: the customer's
/// issued totals add up to what every period issued so far bills now.
fn check_issue(
    invoice: &Value,
    month: i64,
    now: &BTreeMap<(i64, String, String), Decimal>,
    lines: &BTreeMap<(i64, String, String), Decimal>,
    books: &[Book],
    ledger: &mut BTreeMap<(i64, String, String), Decimal>,
    issued_totals: &mut Decimal,
) {
    // Lines: per (meter, book) of the month, the usage rounded once and the top-up to the minimum.
    let mut expected_lines = Vec::new();
    for ((p, meter, book), amount) in lines.iter().filter(|((p, _, _), _)| *p == month) {
        let usage = round_to_minor_unit(*amount, "USD");
        expected_lines.push((meter.clone(), book.clone(), "usage".to_owned(), usage));
        let minimum = books.iter().find(|b| &b.id == book).unwrap().minimum;
        if let Some(m) = minimum.filter(|m| amount < m) {
            let topup = round_to_minor_unit(m, "USD") - usage;
            expected_lines.push((meter.clone(), book.clone(), "minimum".to_owned(), topup));
        }
        assert_eq!(*p, month);
    }
    let got_lines: Vec<(String, String, String, Decimal)> = invoice["line_items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["meter"].as_str().unwrap().to_owned(),
                l["price_book_id"].as_str().unwrap().to_owned(),
                l["kind"].as_str().unwrap().to_owned(),
                dec(&l["amount"]),
            )
        })
        .collect();
    assert_eq!(got_lines, expected_lines, "lines of {invoice}");

    // Adjustments: every line of an earlier issued period brought to what it bills now.
    let earlier: BTreeSet<i64> = ledger.keys().map(|k| k.0).collect();
    let keys: BTreeSet<&(i64, String, String)> = ledger
        .keys()
        .chain(now.keys().filter(|k| earlier.contains(&k.0)))
        .collect();
    let mut expected_adjustments = BTreeMap::new();
    for key in keys {
        let delta = now.get(key).copied().unwrap_or_default()
            - ledger.get(key).copied().unwrap_or_default();
        if !delta.is_zero() {
            expected_adjustments.insert(key.clone(), delta.normalize());
        }
    }
    let got_adjustments: BTreeMap<(i64, String, String), Decimal> = invoice["adjustments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                (
                    secs(a["period_start"].as_str().unwrap()),
                    a["meter"].as_str().unwrap().to_owned(),
                    a["price_book_id"].as_str().unwrap().to_owned(),
                ),
                dec(&a["amount"]).normalize(),
            )
        })
        .collect();
    assert_eq!(
        got_adjustments, expected_adjustments,
        "adjustments of {invoice}"
    );
    for a in invoice["adjustments"].as_array().unwrap() {
        assert!(a["original_invoice_id"]
            .as_str()
            .unwrap()
            .starts_with("inv_"));
        assert!(!a["reason"].as_str().unwrap().is_empty());
    }

    let subtotal: Decimal = expected_lines.iter().map(|l| l.3).sum();
    let total = subtotal + expected_adjustments.values().copied().sum::<Decimal>();
    assert_eq!(dec(&invoice["subtotal"]), subtotal);
    assert_eq!(dec(&invoice["total"]), total);
    *issued_totals += total;
    // The invariant: Σ issued totals == Σ over the periods issued so far of what they bill now.
    for (key, billed) in now {
        if key.0 <= month {
            ledger.insert(key.clone(), *billed);
        }
    }
    ledger.retain(|key, _| now.contains_key(key));
    let owed: Decimal = now
        .iter()
        .filter(|(k, _)| k.0 <= month)
        .map(|(_, v)| *v)
        .sum();
    assert_eq!(
        *issued_totals, owed,
        "Σ issued totals after issuing {invoice}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn issued_invoices_add_up_to_the_current_price_of_every_period_after_late_usage_voids_and_price_edits(
) {
    let api = spawn_api().await;
    let _pipeline = spawn_pipeline(&api.url, &api.topic, 2, &["--epoch-ms", "50"]);
    let customer = "cust_inv";
    register(&api, customer, "USD").await;
    register(&api, "cust_other", "USD").await;
    let jan = secs("2024-01-01T00:00:00Z");
    let feb = secs("2024-02-01T00:00:00Z");
    let mar = secs("2024-03-01T00:00:00Z");

    let mut books = vec![
        Book {
            id: create_book(
                &api,
                json!({"meter": "api_call", "effective_from": "2024-01-01T00:00:00Z",
                "model": {"type": "per_unit", "unit_price": "0.10"}}),
            )
            .await,
            meter: "api_call",
            customer: None,
            from: jan,
            price: d("0.10"),
            minimum: None,
        },
        Book {
            id: create_book(
                &api,
                json!({"meter": "storage", "effective_from": "2024-01-01T00:00:00Z",
                "model": {"type": "per_unit", "unit_price": "0.5"}, "minimum_per_period": "20"}),
            )
            .await,
            meter: "storage",
            customer: None,
            from: jan,
            price: d("0.5"),
            minimum: Some(d("20")),
        },
    ];
    let event = |id, meter, time: &str, value: &str| Sent {
        id,
        meter,
        time: secs(time),
        value: d(value),
    };
    let events = [
        event("j1", "api_call", "2024-01-25T10:00:00Z", "12.345"),
        event("j2", "api_call", "2024-01-28T12:10:00Z", "7.005"),
        event("j3", "storage", "2024-01-26T00:30:00Z", "3.333"),
        event("f1", "api_call", "2024-02-02T09:00:00Z", "100.001"),
        event("f2", "storage", "2024-02-03T00:00:00Z", "50.5"),
        event("f3", "api_call", "2024-02-04T11:00:00Z", "4.4"),
        // Sent after January is issued: a late event.
        event("j4", "api_call", "2024-01-30T15:00:00Z", "3.3335"),
        // Sent after February is issued.
        event("m1", "api_call", "2024-03-01T01:00:00Z", "10"),
    ];
    let mut voided: HashSet<&str> = HashSet::new();
    let mut ledger = BTreeMap::new();
    let mut issued_totals = Decimal::ZERO;

    // January and February usage; another customer's usage must not leak into this one's invoices.
    post_events(&api, customer, &events[..6].iter().collect::<Vec<_>>()).await;
    post_events(
        &api,
        "cust_other",
        &[&event("o1", "api_call", "2024-01-20T00:00:00Z", "999")],
    )
    .await;
    let sent = &events[..6];
    let lines = rate(customer, sent, &voided, &books);
    wait_for_lines(&api, customer, &lines, "January and February").await;
    let january = issue(&api, &period(customer, "2024-01")).await;
    let now = billed_now(&lines, &books);
    check_issue(
        &january,
        jan,
        &now,
        &lines,
        &books,
        &mut ledger,
        &mut issued_totals,
    );
    assert_eq!(january["adjustments"], json!([]));
    assert_eq!(january["number"], 1);

    // A late January event and a price edit touch the issued January: February carries adjustments.
    post_events(&api, customer, &[&events[6]]).await;
    let patched = api
        .client
        .patch(format!("{}/api/v1/price-books/{}", api.base, books[0].id))
        .json(&json!({"model": {"type": "per_unit", "unit_price": "0.125"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), StatusCode::OK);
    books[0].price = d("0.125");
    let sent = &events[..7];
    let lines = rate(customer, sent, &voided, &books);
    wait_for_lines(&api, customer, &lines, "a late event and a price edit").await;
    let february = issue(&api, &period(customer, "2024-02")).await;
    let now = billed_now(&lines, &books);
    check_issue(
        &february,
        feb,
        &now,
        &lines,
        &books,
        &mut ledger,
        &mut issued_totals,
    );
    assert_eq!(
        february["adjustments"].as_array().unwrap().len(),
        1,
        "only January's api_call line changed: {february}"
    );
    assert_eq!(
        february["adjustments"][0]["original_invoice_id"],
        january["invoice_id"]
    );

    // More changes: the customer gets a book of its own from 28 January (a new line in both issued
    // periods, the default book's lines shrink), a February event is voided, the storage minimum goes
    // up (a top-up changes in January and appears in February), and March has usage.
    books.push(Book {
        id: create_book(
            &api,
            json!({"meter": "api_call", "customer_id": customer,
            "effective_from": "2024-01-28T00:00:00Z",
            "model": {"type": "per_unit", "unit_price": "0.05"}}),
        )
        .await,
        meter: "api_call",
        customer: Some("cust_inv"),
        from: secs("2024-01-28T00:00:00Z"),
        price: d("0.05"),
        minimum: None,
    });
    let voided_response = api.post_json("/api/v1/events/f3/void", &json!({})).await;
    assert_eq!(voided_response.status(), StatusCode::ACCEPTED);
    voided.insert("f3");
    let patched = api
        .client
        .patch(format!("{}/api/v1/price-books/{}", api.base, books[1].id))
        .json(&json!({"minimum_per_period": "30"}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), StatusCode::OK);
    books[1].minimum = Some(d("30"));
    post_events(&api, customer, &[&events[7]]).await;
    let lines = rate(customer, &events, &voided, &books);
    wait_for_lines(
        &api,
        customer,
        &lines,
        "a customer book, a void, a minimum and March",
    )
    .await;
    let march = issue(&api, &period(customer, "2024-03")).await;
    let now = billed_now(&lines, &books);
    check_issue(
        &march,
        mar,
        &now,
        &lines,
        &books,
        &mut ledger,
        &mut issued_totals,
    );
    assert!(
        march["adjustments"].as_array().unwrap().len() >= 5,
        "January and February lines of three books changed: {march}"
    );
    // The issued invoices themselves never changed.
    let stored = api
        .get_json(&format!(
            "/api/v1/invoices/{}",
            january["invoice_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(stored["line_items"], january["line_items"]);
    assert_eq!(stored["total"], january["total"]);
    assert_eq!(numbers(&api).await, one_to(3));
    let others: i64 =
        sqlx::query_scalar("SELECT count(*) FROM invoices WHERE customer_id = 'cust_other'")
            .fetch_one(&api.pool)
            .await
            .unwrap();
    assert_eq!(others, 0);
}

// ── Invoice runs ──────────────────────────────────────────────────────────────────────────────────

/// 25 registered customers (one billed in EUR with usage priced in USD: it fails), 5 unregistered ones
/// with usage, 3 issued already.
async fn thirty_customers(api: &TestApi) {
    insert_book(api, "pb_api", "api_call", "0.01", Some("1")).await;
    for i in 0..25 {
        let id = format!("c{i:02}");
        register(api, &id, if i == 24 { "EUR" } else { "USD" }).await;
        if i % 4 != 3 {
            let amount = format!("{}.{:03}5", i, i);
            insert_line(
                api,
                &id,
                "2024-01-01T00:00:00Z",
                "api_call",
                "pb_api",
                "100",
                &amount,
            )
            .await;
        }
    }
    for i in 0..5 {
        insert_line(
            api,
            &format!("u{i}"),
            "2024-01-01T00:00:00Z",
            "api_call",
            "pb_api",
            "5",
            "0.05",
        )
        .await;
    }
    for id in ["c00", "c05", "c10"] {
        issue(api, &january(id)).await;
    }
}

/// Every invoice is one customer's only issued invoice of January, and the numbers are 1..=n.
async fn assert_no_duplicate_and_no_gap(api: &TestApi) -> i64 {
    let (invoices, customers): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT customer_id) FROM invoices WHERE status = 'issued'",
    )
    .fetch_one(&api.pool)
    .await
    .unwrap();
    assert_eq!(invoices, customers, "one invoice per customer");
    assert_eq!(numbers(api).await, one_to(invoices), "gapless numbers");
    invoices
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invoice_run_killed_twice_resumes_with_no_duplicate_and_no_gap() {
    let api = spawn_api().await;
    thirty_customers(&api).await;
    let run = |failpoint: Option<&str>| {
        let mut cmd = meterflow(&api.url, &api.topic);
        cmd.args(["invoice-run", "--period", "2024-01", "--batch-size", "4"]);
        if let Some(f) = failpoint {
            cmd.env("MF_FAILPOINT", f);
        }
        cmd.output().unwrap()
    };

    // Killed inside its second batch's transaction (before COMMIT), then after its third batch's
    // COMMIT of the resumed run.
    let first = run(Some("invoice_run_before_commit:2"));
    assert!(!first.status.success(), "the failpoint aborts");
    assert!(
        String::from_utf8_lossy(&first.stderr).contains("failpoint invoice_run_before_commit:2")
    );
    let after_first = assert_no_duplicate_and_no_gap(&api).await;
    assert!(after_first > 3 && after_first < 25, "{after_first} issued");
    let second = run(Some("invoice_run_after_commit:3"));
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("resuming unfinished run"));
    let after_second = assert_no_duplicate_and_no_gap(&api).await;
    assert!(
        after_second > after_first && after_second < 24,
        "{after_second} issued"
    );

    let last = run(None);
    let stdout = String::from_utf8_lossy(&last.stdout);
    let stderr = String::from_utf8_lossy(&last.stderr);
    assert_eq!(
        last.status.code(),
        Some(2),
        "one customer failed: {stdout}{stderr}"
    );
    assert!(stderr.contains("resuming unfinished run"), "{stderr}");
    assert!(
        stderr.contains("25/25 (100%)"),
        "the progress reaches the end: {stderr}"
    );
    for line in [
        "registered customers      25",
        "issued                    21",
        "skipped (already issued)  3",
        "failed                    1",
        "c24: usage of meter api_call",
        "unregistered with usage   5 (not invoiced: u0, u1, u2, u3, u4)",
    ] {
        assert!(stdout.contains(line), "{line} in {stdout}");
    }
    assert_eq!(assert_no_duplicate_and_no_gap(&api).await, 24);

    // The API reports the same run; a second run for the period finds everything issued.
    let run_id: String = sqlx::query_scalar("SELECT run_id FROM invoice_runs")
        .fetch_one(&api.pool)
        .await
        .unwrap();
    let status = api
        .get_json(&format!("/api/v1/invoice-runs/{run_id}"))
        .await;
    assert_eq!(status["status"], "succeeded");
    assert_eq!(
        (
            &status["total"],
            &status["done"],
            &status["issued"],
            &status["skipped_existing"],
            &status["failed"]
        ),
        (&json!(25), &json!(25), &json!(21), &json!(3), &json!(1))
    );
    assert_eq!(status["unregistered_with_usage"]["count"], 5);
    assert_eq!(status["failures"][0]["customer_id"], "c24");
    let again = run(None);
    assert!(String::from_utf8_lossy(&again.stdout).contains("skipped (already issued)  24"));
    assert_eq!(assert_no_duplicate_and_no_gap(&api).await, 24);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invoice_run_through_the_api_runs_in_the_background_and_reports_its_summary() {
    let api = spawn_api().await;
    thirty_customers(&api).await;
    let response = api
        .post_json("/api/v1/invoice-runs", &json!({"period": "2024-01"}))
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let accepted: Value = response.json().await.unwrap();
    assert_eq!(accepted["status"], "pending");
    let run_id = accepted["run_id"].as_str().unwrap().to_owned();
    let started = Instant::now();
    let status = loop {
        let status = api
            .get_json(&format!("/api/v1/invoice-runs/{run_id}"))
            .await;
        if status["status"] == "succeeded" {
            break status;
        }
        assert_ne!(status["status"], "failed", "{status}");
        assert!(started.elapsed() < WAIT, "the run did not finish: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (
            &status["period"],
            &status["total"],
            &status["issued"],
            &status["skipped_existing"],
            &status["failed"]
        ),
        (
            &json!("2024-01"),
            &json!(25),
            &json!(21),
            &json!(3),
            &json!(1)
        )
    );
    assert_eq!(
        status["unregistered_with_usage"],
        json!({"count": 5, "customer_ids": ["u0", "u1", "u2", "u3", "u4"]})
    );
    assert!(status["failures"][0]["error"]
        .as_str()
        .unwrap()
        .contains("billed in EUR"));
    assert_eq!(assert_no_duplicate_and_no_gap(&api).await, 24);
    // Each customer's invoice bills its line: e.g. c01's 1.0015 rounds to 1.00, at the minimum of 1.
    let c01 = api.get_json("/api/v1/invoices?customer_id=c01").await;
    assert_eq!(c01["data"][0]["total"].to_string(), "1.00");
    let c03 = api.get_json("/api/v1/invoices?customer_id=c03").await;
    assert_eq!(
        c03["data"][0]["line_items"],
        json!([]),
        "no usage: an empty invoice"
    );

    for (body, status, code) in [
        (
            json!({"period": "2024-1"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_FAILED",
        ),
        (
            json!({}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_FAILED",
        ),
        (
            json!({"period": "2024-01", "x": 1}),
            StatusCode::BAD_REQUEST,
            "MALFORMED_JSON",
        ),
    ] {
        expect_problem(
            api.post_json("/api/v1/invoice-runs", &body).await,
            status,
            code,
        )
        .await;
    }
    assert_eq!(
        api.get("/api/v1/invoice-runs/run_nope").await.status(),
        StatusCode::NOT_FOUND
    );
}
