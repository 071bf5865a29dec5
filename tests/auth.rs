//! API keys, roles, customer-bound keys, rate limits, Idempotency-Key and the audit log (issue 7), on real
//! Postgres and Kafka; each test has its own database and topic.
//!
//! Length: independent tests of one area (keys, roles, bound keys, rate limits, idempotency, audit),
//! each readable on its own; shared helpers are in `tests/common`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use meterflow_api::auth::{self, Rate, Role};
use meterflow_api::openapi::{routes, Access};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// Auth on, generous limits unless a test says otherwise.
fn settings() -> meterflow_api::Settings {
    meterflow_api::Settings {
        auth: true,
        rate: Rate {
            per_sec: 1000.0,
            burst: 1000.0,
        },
        ..Default::default()
    }
}

async fn key(api: &TestApi, role: Role, customer: Option<&str>) -> String {
    auth::create_key(&api.pool, role, customer, "test", "test")
        .await
        .unwrap()
        .1
}

async fn send(
    api: &TestApi,
    method: Method,
    path: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> reqwest::Response {
    let mut request = api.client.request(method, format!("{}{path}", api.base));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    request.send().await.unwrap()
}

fn method(verb: meterflow_api::openapi::Verb) -> Method {
    Method::from_bytes(verb.as_str().to_ascii_uppercase().as_bytes()).unwrap()
}

/// The route's path with every `{parameter}` filled in.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|s| if s.starts_with('{') { "x" } else { s })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_refuses_no_key_and_a_weaker_role_and_lets_admin_through() {
    let api = spawn_api_with(settings()).await;
    let ingest = key(&api, Role::Ingest, None).await;
    let read = key(&api, Role::Read, None).await;
    let admin = key(&api, Role::Admin, None).await;
    let mut checked = 0;
    for route in routes() {
        let (m, path) = (method(route.verb), concrete(route.path));
        let body = (m != Method::GET).then(|| json!({}));
        let what = format!("{m} {path}");
        if route.access == Access::Public {
            let response = send(&api, m, &path, None, None).await;
            assert!(
                response.status() != StatusCode::UNAUTHORIZED,
                "{what} needs no key"
            );
            continue;
        }
        let response = send(&api, m.clone(), &path, None, body.as_ref()).await;
        assert_eq!(
            response
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap().to_owned()),
            Some("Bearer realm=\"meterflow\"".into()),
            "{what}"
        );
        expect_problem(response, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
        let response = send(
            &api,
            m.clone(),
            &path,
            Some("mf_000000000000_nonsense"),
            None,
        )
        .await;
        expect_problem(response, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
        let weaker: &[&String] = match route.access {
            Access::Admin => &[&ingest, &read],
            Access::Read => &[&ingest],
            _ => &[],
        };
        for weak in weaker {
            let response = send(&api, m.clone(), &path, Some(weak), body.as_ref()).await;
            expect_problem(response, StatusCode::FORBIDDEN, "FORBIDDEN").await;
        }
        let response = send(&api, m.clone(), &path, Some(&admin), body.as_ref()).await;
        let status = response.status();
        assert!(
            status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
            "{what} as admin: {status}"
        );
        checked += 1;
    }
    assert!(checked >= 25, "only {checked} routes checked");
    // The role the key needs, the way the route table says (read may GET, not ingest's POSTs… but
    // ingest may void events).
    let response = send(&api, Method::GET, "/api/v1/meters", Some(&read), None).await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_key_is_refused_within_seconds_and_malformed_headers_are_401() {
    let api = spawn_api_with(settings()).await;
    let (info, read) = auth::create_key(&api.pool, Role::Read, None, "soon revoked", "test")
        .await
        .unwrap();
    let ok = send(&api, Method::GET, "/api/v1/meters", Some(&read), None).await;
    assert_eq!(ok.status(), StatusCode::OK);
    assert!(auth::revoke_key(&api.pool, &info.key_id, "test")
        .await
        .unwrap());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let response = send(&api, Method::GET, "/api/v1/meters", Some(&read), None).await;
        if response.status() == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still accepted 5 s after revocation"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A right id with a wrong secret, and a header that is not Bearer.
    let forged = format!(
        "{}{}",
        &read[..read.len() - 1],
        if read.ends_with('0') { '1' } else { '0' }
    );
    let admin = key(&api, Role::Admin, None).await;
    let forged_admin = format!(
        "{}{}",
        &admin[..admin.len() - 1],
        if admin.ends_with('0') { '1' } else { '0' }
    );
    for bad in [forged, forged_admin] {
        let response = send(&api, Method::GET, "/api/v1/meters", Some(&bad), None).await;
        expect_problem(response, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
    }
    let basic = api
        .client
        .get(format!("{}/api/v1/meters", api.base))
        .header("authorization", format!("Basic {admin}"))
        .send()
        .await
        .unwrap();
    expect_problem(basic, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_bound_to_a_customer_sees_only_that_customer() {
    let api = spawn_api_with(settings()).await;
    spawn_job_runner(&api).await;
    let admin = key(&api, Role::Admin, None).await;
    for id in ["cust_a", "cust_b"] {
        let body = json!({"customer_id": id, "name": format!("Customer {id}"), "currency": "USD"});
        let response = send(
            &api,
            Method::POST,
            "/api/v1/customers",
            Some(&admin),
            Some(&body),
        )
        .await;
        assert_eq!(response.status(), StatusCode::CREATED, "register {id}");
    }
    let mut invoice = std::collections::BTreeMap::new();
    let mut job = std::collections::BTreeMap::new();
    for id in ["cust_a", "cust_b"] {
        let body = json!({"customer_id": id, "period_start": "2024-01-01T00:00:00Z",
                          "period_end": "2024-01-31T23:59:59.999Z"});
        let response = send(
            &api,
            Method::POST,
            "/api/v1/invoices",
            Some(&admin),
            Some(&body),
        )
        .await;
        let status = response.status();
        let created: Value = response.json().await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "{created}");
        invoice.insert(id, created["invoice_id"].as_str().unwrap().to_owned());
        let body = json!({"customer_ids": [id], "from": "2024-01-01T00:00:00Z",
                          "to": "2024-01-01T01:00:00Z", "reason": "test"});
        let response = send(
            &api,
            Method::POST,
            "/api/v1/rerating-jobs",
            Some(&admin),
            Some(&body),
        )
        .await;
        let status = response.status();
        let created: Value = response.json().await.unwrap();
        assert!(status.is_success(), "{created}");
        job.insert(id, created["job_id"].as_str().unwrap().to_owned());
        // One job at a time may cover a customer and window; wait for this one to end.
        let path = format!("/api/v1/rerating-jobs/{}", job[id]);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got: Value = send(&api, Method::GET, &path, Some(&admin), None)
                .await
                .json()
                .await
                .unwrap();
            if got["status"] != "pending" && got["status"] != "running" {
                break;
            }
            assert!(Instant::now() < deadline, "job did not finish: {got}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let bound = key(&api, Role::Read, Some("cust_a")).await;
    let ingest_a = key(&api, Role::Ingest, Some("cust_a")).await;
    let get = |path: String| {
        let (api, bound) = (&api, &bound);
        async move { send(api, Method::GET, &path, Some(bound), None).await }
    };
    for (path, own, others) in [
        (
            "aggregations",
            "/api/v1/aggregations?customer_id=cust_a",
            "/api/v1/aggregations?customer_id=cust_b",
        ),
        (
            "charges",
            "/api/v1/charges?customer_id=cust_a",
            "/api/v1/charges?customer_id=cust_b",
        ),
        (
            "invoices",
            "/api/v1/invoices?customer_id=cust_a",
            "/api/v1/invoices?customer_id=cust_b",
        ),
        (
            "customer",
            "/api/v1/customers/cust_a",
            "/api/v1/customers/cust_b",
        ),
        (
            "upcoming",
            "/api/v1/customers/cust_a/upcoming-invoice",
            "/api/v1/customers/cust_b/upcoming-invoice",
        ),
    ] {
        assert_eq!(
            get(own.into()).await.status(),
            StatusCode::OK,
            "{path}: own"
        );
        expect_problem(get(others.into()).await, StatusCode::NOT_FOUND, "NOT_FOUND").await;
    }
    for (id, expected) in [
        ("cust_a", StatusCode::OK),
        ("cust_b", StatusCode::NOT_FOUND),
    ] {
        for path in [
            format!("/api/v1/invoices/{}", invoice[id]),
            format!("/api/v1/invoices/{}/document", invoice[id]),
            format!("/api/v1/rerating-jobs/{}", job[id]),
        ] {
            assert_eq!(get(path.clone()).await.status(), expected, "{path} of {id}");
        }
    }
    // Lists without a customer are narrowed to the bound one.
    for path in ["/api/v1/invoices", "/api/v1/customers"] {
        let page: Value = get(path.into()).await.json().await.unwrap();
        let customers: Vec<&str> = page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["customer_id"].as_str().unwrap())
            .collect();
        assert_eq!(customers, ["cust_a"], "{path}: {page}");
    }
    // Routes about no one customer, and the other customer's events, do not exist for it.
    expect_problem(
        get("/api/v1/dead-letters".into()).await,
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    )
    .await;
    let event = |customer: &str, id: &str| {
        json!({"event_id": id, "customer_id": customer, "event_type": "api_call",
               "event_time": chrono::Utc::now().to_rfc3339(), "value": 1})
    };
    let theirs = send(
        &api,
        Method::POST,
        "/api/v1/events",
        Some(&ingest_a),
        Some(&event("cust_b", "e1")),
    )
    .await;
    expect_problem(theirs, StatusCode::NOT_FOUND, "NOT_FOUND").await;
    let batch = json!([event("cust_a", "e2"), event("cust_b", "e3")]);
    let mixed = send(
        &api,
        Method::POST,
        "/api/v1/events/batch",
        Some(&ingest_a),
        Some(&batch),
    )
    .await;
    expect_problem(mixed, StatusCode::NOT_FOUND, "NOT_FOUND").await;
    let mine = send(
        &api,
        Method::POST,
        "/api/v1/events",
        Some(&ingest_a),
        Some(&event("cust_a", "e4")),
    )
    .await;
    assert_eq!(mine.status(), StatusCode::CREATED);
    // An admin key bound to A may not void B's invoice.
    let bound_admin = key(&api, Role::Admin, Some("cust_a")).await;
    let void = send(
        &api,
        Method::POST,
        &format!("/api/v1/invoices/{}/void", invoice["cust_b"]),
        Some(&bound_admin),
        Some(&json!({"reason": "x"})),
    )
    .await;
    expect_problem(void, StatusCode::NOT_FOUND, "NOT_FOUND").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn api_key_create_prints_a_working_key_that_list_never_shows_and_revoke_ends() {
    let api = spawn_api_with(settings()).await;
    let output = meterflow(&api.url, &api.topic)
        .args(["api-key", "create", "--role", "read", "--name", "dashboard"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let key = stdout.lines().last().unwrap().trim().to_owned();
    assert!(key.starts_with("mf_"), "{stdout}");
    let response = send(&api, Method::GET, "/api/v1/meters", Some(&key), None).await;
    assert_eq!(response.status(), StatusCode::OK);

    let listed = meterflow(&api.url, &api.topic)
        .args(["api-key", "list"])
        .output()
        .unwrap();
    let listed = String::from_utf8(listed.stdout).unwrap();
    let key_id = &key[3..15];
    assert!(
        listed.contains(key_id) && listed.contains("dashboard"),
        "{listed}"
    );
    assert!(!listed.contains(&key[16..]), "list never shows the secret");
    let stored: Vec<u8> = sqlx::query_scalar("SELECT key_hash FROM api_keys WHERE key_id = $1")
        .bind(key_id)
        .fetch_one(&api.pool)
        .await
        .unwrap();
    assert_eq!(stored, auth::hash(&key), "only the hash is stored");

    let revoked = meterflow(&api.url, &api.topic)
        .args(["api-key", "revoke", key_id])
        .output()
        .unwrap();
    assert!(revoked.status.success());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let response = send(&api, Method::GET, "/api/v1/meters", Some(&key), None).await;
    expect_problem(response, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
    let again = meterflow(&api.url, &api.topic)
        .args(["api-key", "revoke", key_id])
        .output()
        .unwrap();
    assert!(!again.status.success(), "revoking twice fails");
    let actors: Vec<(String, String)> = sqlx::query_as(
        "SELECT actor, action FROM audit_log WHERE entity = 'api_key' AND entity_id = $1 ORDER BY id",
    )
    .bind(key_id)
    .fetch_all(&api.pool)
    .await
    .unwrap();
    assert_eq!(
        actors,
        [
            ("cli".to_owned(), "api_key.create".to_owned()),
            ("cli".to_owned(), "api_key.revoke".to_owned())
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_too_large_body_is_413_and_a_flood_is_429_for_that_key_only() {
    let api = spawn_api_with(meterflow_api::Settings {
        rate: Rate {
            per_sec: 1.0,
            burst: 5.0,
        },
        ..settings()
    })
    .await;
    let ingest = key(&api, Role::Ingest, None).await;
    let big = json!({"event_id": "big", "customer_id": "c", "event_type": "t",
                     "event_time": "2024-01-15T10:00:00Z", "value": 1,
                     "properties": {"padding": "x".repeat(100 * 1024)}});
    let response = send(
        &api,
        Method::POST,
        "/api/v1/events",
        Some(&ingest),
        Some(&big),
    )
    .await;
    expect_problem(response, StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE").await;

    let flooder = key(&api, Role::Read, None).await;
    let other = key(&api, Role::Read, None).await;
    let mut limited = None;
    for _ in 0..20 {
        let response = send(&api, Method::GET, "/api/v1/meters", Some(&flooder), None).await;
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(response);
            break;
        }
        assert_eq!(response.status(), StatusCode::OK);
    }
    let limited = limited.expect("20 requests at once from one key are limited");
    let retry: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=5).contains(&retry), "Retry-After {retry}");
    expect_problem(limited, StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED").await;
    let response = send(&api, Method::GET, "/api/v1/meters", Some(&other), None).await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "another key keeps working"
    );
    // Ingest has its own bucket.
    let ev = json!({"event_id": "small", "customer_id": "c", "event_type": "t",
                    "event_time": chrono::Utc::now().to_rfc3339(), "value": 1});
    let response = send(
        &api,
        Method::POST,
        "/api/v1/events",
        Some(&ingest),
        Some(&ev),
    )
    .await;
    assert_eq!(response.status(), StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idempotency_key_replays_the_stored_answer_and_refuses_another_body() {
    let api = spawn_api_with(settings()).await;
    let admin = key(&api, Role::Admin, None).await;
    let post = |key: &'static str, body: Value| {
        let (api, admin) = (&api, &admin);
        async move {
            api.client
                .post(format!("{}/api/v1/customers", api.base))
                .bearer_auth(admin)
                .header("idempotency-key", key)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let body = json!({"customer_id": "cust_idem", "name": "Idem", "currency": "USD"});
    let first = post("k-1", body.clone()).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();
    let again = post("k-1", body.clone()).await;
    assert_eq!(
        again.status(),
        StatusCode::CREATED,
        "the stored status, not 409"
    );
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    let other = post("k-1", json!({"customer_id": "cust_other", "name": "Other"})).await;
    expect_problem(
        other,
        StatusCode::UNPROCESSABLE_ENTITY,
        "IDEMPOTENCY_KEY_REUSED",
    )
    .await;
    // Without the header, the same request is a conflict: it really ran once.
    let plain = send(
        &api,
        Method::POST,
        "/api/v1/customers",
        Some(&admin),
        Some(&body),
    )
    .await;
    assert!(plain.status().is_client_error(), "{}", plain.status());
    let count = scalar_i64(&api.url, "SELECT count(*) FROM customers").await;
    assert_eq!(count, 1);
    // Keys are per API key: another key may use the same Idempotency-Key for its own request.
    let admin2 = key(&api, Role::Admin, None).await;
    let theirs = api
        .client
        .post(format!("{}/api/v1/customers", api.base))
        .bearer_auth(&admin2)
        .header("idempotency-key", "k-1")
        .json(&json!({"customer_id": "cust_two", "name": "Two"}))
        .send()
        .await
        .unwrap();
    assert_eq!(theirs.status(), StatusCode::CREATED);
}

/// actor, action, entity_id, before, after.
type AuditRow = (String, String, String, Option<Value>, Option<Value>);

#[tokio::test(flavor = "multi_thread")]
async fn the_audit_log_records_who_did_what_and_refuses_update_and_delete() {
    let api = spawn_api_with(settings()).await;
    let (info, admin) = auth::create_key(&api.pool, Role::Admin, None, "ops", "test")
        .await
        .unwrap();
    let body = json!({"customer_id": "cust_audit", "name": "Before", "currency": "USD"});
    let created = send(
        &api,
        Method::POST,
        "/api/v1/customers",
        Some(&admin),
        Some(&body),
    )
    .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let patched = send(
        &api,
        Method::PATCH,
        "/api/v1/customers/cust_audit",
        Some(&admin),
        Some(&json!({"name": "After"})),
    )
    .await;
    assert_eq!(patched.status(), StatusCode::OK);
    let rows: Vec<AuditRow> = sqlx::query_as(
        "SELECT actor, action, entity_id, before, after FROM audit_log WHERE entity = 'customer' ORDER BY id",
    )
    .fetch_all(&api.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        (rows[0].0.as_str(), rows[0].1.as_str()),
        (info.key_id.as_str(), "customer.create")
    );
    assert!(rows[0].3.is_none());
    assert_eq!(rows[0].4.as_ref().unwrap()["name"], "Before");
    assert_eq!(
        (rows[1].1.as_str(), rows[1].2.as_str()),
        ("customer.update", "cust_audit")
    );
    assert_eq!(rows[1].3.as_ref().unwrap()["name"], "Before");
    assert_eq!(rows[1].4.as_ref().unwrap()["name"], "After");

    // The application's role (the one that migrated and owns the table) cannot change the log.
    for sql in [
        "UPDATE audit_log SET actor = 'someone else'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ] {
        let error = sqlx::query(sql).execute(&api.pool).await.unwrap_err();
        let code = error
            .as_database_error()
            .and_then(|e| e.code())
            .unwrap()
            .into_owned();
        assert_eq!(code, "42501", "{sql}: {error}");
    }
    let may_update: bool = sqlx::query_scalar(
        "SELECT has_table_privilege(current_user, 'audit_log', 'UPDATE')
             OR has_table_privilege(current_user, 'audit_log', 'DELETE')
             OR has_table_privilege(current_user, 'audit_log', 'TRUNCATE')",
    )
    .fetch_one(&api.pool)
    .await
    .unwrap();
    assert!(
        !may_update,
        "the privileges are revoked, not only the trigger"
    );
    let may_insert: bool =
        sqlx::query_scalar("SELECT has_table_privilege(current_user, 'audit_log', 'INSERT')")
            .fetch_one(&api.pool)
            .await
            .unwrap();
    assert!(may_insert);
    let count = scalar_i64(
        &api.url,
        "SELECT count(*) FROM audit_log WHERE entity = 'customer'",
    )
    .await;
    assert_eq!(count, 2);
}

/// Finding 1: serde derive takes a JSON array in field order, so the gate's body sniffing let a bound key
/// post `["id","victim",…]` for another customer. The check now runs on the decoded request, and a body
/// (or batch item) that is not a JSON object is refused.
#[tokio::test(flavor = "multi_thread")]
async fn finding_01_bound_key_array_body_is_refused() {
    let api = spawn_api_with(settings()).await;
    let ingest = key(&api, Role::Ingest, Some("cust_me")).await;
    let admin = key(&api, Role::Admin, Some("cust_me")).await;
    let now = chrono::Utc::now().to_rfc3339();
    let raw = |path: &str, content_type: &str, key: &str, body: String| {
        let request = api
            .client
            .post(format!("{}{path}", api.base))
            .bearer_auth(key)
            .header("content-type", content_type)
            .body(body);
        async move { request.send().await.unwrap() }
    };
    let json_ct = "application/json";
    let cases: Vec<(&str, &str, &String, String)> = vec![
        (
            "/api/v1/events",
            json_ct,
            &ingest,
            format!(r#"["arr-1","cust_victim","api_call","{now}","1000000"]"#),
        ),
        (
            "/api/v1/events/batch",
            json_ct,
            &ingest,
            format!(r#"[["arr-2","cust_victim","api_call","{now}","1000000"]]"#),
        ),
        (
            "/api/v1/events/batch",
            json_ct,
            &ingest,
            format!(
                r#"[{{"event_id":"arr-3","customer_id":"cust_me","event_type":"t","event_time":"{now}"}},
                     ["arr-4","cust_victim","api_call","{now}","1000000"]]"#
            ),
        ),
        (
            "/api/v1/events",
            "application/cloudevents+json",
            &ingest,
            format!(r#"["1.0","arr-5","src","api_call","cust_victim","{now}"]"#),
        ),
        (
            "/api/v1/events/batch",
            "application/cloudevents-batch+json",
            &ingest,
            format!(r#"[["1.0","arr-6","src","api_call","cust_victim","{now}"]]"#),
        ),
        (
            "/api/v1/invoices",
            json_ct,
            &admin,
            r#"["cust_victim","2024-01-01T00:00:00Z","2024-02-01T00:00:00Z"]"#.to_owned(),
        ),
        (
            "/api/v1/customers",
            json_ct,
            &admin,
            r#"["cust_victim2","Evil",null,null,"JPY"]"#.to_owned(),
        ),
        (
            "/api/v1/rerating-jobs",
            json_ct,
            &admin,
            r#"[["cust_victim"],"2024-01-01T00:00:00Z","2024-01-02T00:00:00Z","x"]"#.to_owned(),
        ),
    ];
    for (path, content_type, key, body) in cases {
        let response = raw(path, content_type, key, body.clone()).await;
        let status = response.status();
        let text = response.text().await.unwrap();
        // A batch answers per item: only the object item of its own customer may be accepted.
        let refused = status.is_client_error()
            || (status == StatusCode::OK
                && serde_json::from_str::<Value>(&text).unwrap()["results"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|r| r["status"] != 201 || r["event_id"] == "arr-3"));
        assert!(refused, "{path} {body}: {status} {text}");
    }
    // Objects naming another customer are refused too, in every shape the decoder takes.
    let cases: Vec<(&str, &str, &String, String)> = vec![
        ("/api/v1/events", "application/cloudevents+json", &ingest,
         format!(r#"{{"specversion":"1.0","id":"obj-1","source":"s","type":"api_call","subject":"cust_victim","time":"{now}"}}"#)),
        ("/api/v1/events/batch", "application/cloudevents-batch+json", &ingest,
         format!(r#"[{{"specversion":"1.0","id":"obj-2","source":"s","type":"api_call","subject":"cust_victim","time":"{now}"}}]"#)),
        ("/api/v1/events", json_ct, &ingest,
         format!(r#"{{"event_id":"obj-3","customer\u005fid":"cust_victim","event_type":"t","event_time":"{now}"}}"#)),
        ("/api/v1/invoices", json_ct, &admin,
         r#"{"customer_id":"cust_victim","period_start":"2024-01-01T00:00:00Z","period_end":"2024-02-01T00:00:00Z"}"#.to_owned()),
        ("/api/v1/customers", json_ct, &admin,
         r#"{"customer_id":"cust_victim3","name":"Evil"}"#.to_owned()),
    ];
    for (path, content_type, key, body) in cases {
        let response = raw(path, content_type, key, body.clone()).await;
        let status = response.status();
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "{path} {body}: {}",
            response.text().await.unwrap()
        );
    }
    for (table, column) in [
        ("telemetry_events", "customer_id"),
        ("event_outbox", "customer_id"),
        ("invoices", "customer_id"),
        ("customers", "customer_id"),
    ] {
        let n = scalar_i64(
            &api.url,
            &format!("SELECT count(*) FROM {table} WHERE {column} LIKE 'cust_victim%'"),
        )
        .await;
        assert_eq!(n, 0, "{table} holds a victim's row");
    }
    let jobs = scalar_i64(&api.url, "SELECT count(*) FROM rerating_jobs").await;
    assert_eq!(jobs, 0, "a rerating job was queued");
    // Its own events, as an object, still go through.
    let mine = raw("/api/v1/events", json_ct, &ingest, format!(
        r#"{{"event_id":"own-1","customer_id":"cust_me","event_type":"t","event_time":"{now}"}}"#)).await;
    assert_eq!(mine.status(), StatusCode::CREATED);
}

/// Finding 16: a bound key listed and read every price book, other customers' negotiated ones too. It
/// now sees the defaults (no customer) and its own customer's books only; another's is 404.
#[tokio::test(flavor = "multi_thread")]
async fn finding_16_bound_key_sees_only_default_and_own_price_books() {
    let api = spawn_api_with(settings()).await;
    let admin = key(&api, Role::Admin, None).await;
    let mut ids = std::collections::BTreeMap::new();
    for customer in [None, Some("cust_me"), Some("cust_victim")] {
        let body = json!({"meter": "api_call", "customer_id": customer,
                          "effective_from": "2024-01-01T00:00:00Z",
                          "model": {"type": "per_unit", "unit_price": "0.01"}});
        let response = send(
            &api,
            Method::POST,
            "/api/v1/price-books",
            Some(&admin),
            Some(&body),
        )
        .await;
        let status = response.status();
        let created: Value = response.json().await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "{created}");
        ids.insert(
            customer.unwrap_or("default"),
            created["price_book_id"].as_str().unwrap().to_owned(),
        );
    }
    let bound = key(&api, Role::Read, Some("cust_me")).await;
    let listed = |path: &'static str| {
        let (api, bound) = (&api, &bound);
        async move {
            let response = send(api, Method::GET, path, Some(bound), None).await;
            let status = response.status();
            let page: Value = response.json().await.unwrap();
            let mut customers: Vec<Option<String>> = match page["data"].as_array() {
                Some(data) => data
                    .iter()
                    .map(|b| b["customer_id"].as_str().map(str::to_owned))
                    .collect(),
                None => vec![],
            };
            customers.sort();
            (status, customers)
        }
    };
    let (status, customers) = listed("/api/v1/price-books").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(customers, [None, Some("cust_me".to_owned())]);
    let (status, customers) = listed("/api/v1/price-books?customer_id=cust_me").await;
    assert_eq!(
        (status, customers),
        (StatusCode::OK, vec![Some("cust_me".to_owned())])
    );
    let (status, customers) = listed("/api/v1/price-books?customer_id=cust_victim").await;
    assert!(
        status == StatusCode::NOT_FOUND || (status == StatusCode::OK && customers.is_empty()),
        "{status} {customers:?}"
    );
    // Paging does not leak them either: one book per page.
    let mut seen = vec![];
    let mut path = "/api/v1/price-books?limit=1".to_owned();
    loop {
        let page: Value = send(&api, Method::GET, &path, Some(&bound), None)
            .await
            .json()
            .await
            .unwrap();
        for b in page["data"].as_array().unwrap() {
            seen.push(b["price_book_id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/api/v1/price-books?limit=1&cursor={c}"),
            None => break,
        }
        assert!(seen.len() < 10, "{seen:?}");
    }
    assert!(!seen.contains(&ids["cust_victim"]), "{seen:?}");
    assert_eq!(seen.len(), 2, "{seen:?}");
    for (whose, expected) in [
        ("default", StatusCode::OK),
        ("cust_me", StatusCode::OK),
        ("cust_victim", StatusCode::NOT_FOUND),
    ] {
        let path = format!("/api/v1/price-books/{}", ids[whose]);
        let response = send(&api, Method::GET, &path, Some(&bound), None).await;
        assert_eq!(response.status(), expected, "{whose}");
    }
}

/// Finding 20: before any key is checked, a request could add metric series (one per HTTP method
/// token) and cost a database query (one per random key id). Unknown methods are labelled `OTHER`, and
/// lookups of key ids not in the cache are limited per client address.
#[tokio::test(flavor = "multi_thread")]
async fn finding_20_pre_auth_work_is_bounded() {
    let api = spawn_api_with(meterflow_api::Settings {
        key_cache_ttl: Duration::from_secs(60),
        ..settings()
    })
    .await;
    let admin = key(&api, Role::Admin, None).await;
    let ok = send(&api, Method::GET, "/api/v1/meters", Some(&admin), None).await;
    assert_eq!(ok.status(), StatusCode::OK);
    for i in 0..30 {
        let m = Method::from_bytes(format!("RND{i}").as_bytes()).unwrap();
        let path = if i % 2 == 0 {
            "/api/v1/meters"
        } else {
            "/nope"
        };
        send(&api, m, path, None, None).await;
    }
    let metrics = api.get("/metrics").await.text().await.unwrap();
    assert!(!metrics.contains("RND"), "a series per method");
    assert!(metrics.contains("method=\"OTHER\""), "{metrics}");

    // Random well-formed keys: each would be a database query.
    let mut statuses = std::collections::BTreeMap::new();
    for chunk in 0..6 {
        let posts = (0..50).map(|i| {
            let (id, secret): (u64, u128) = (chunk * 1000 + i, 7);
            let key = format!("mf_{:012x}_{:048x}", id, secret);
            let api = &api;
            async move {
                send(api, Method::GET, "/api/v1/meters", Some(&key), None)
                    .await
                    .status()
            }
        });
        for status in futures::future::join_all(posts).await {
            *statuses.entry(status.as_u16()).or_insert(0) += 1;
        }
    }
    let looked_up = statuses.get(&401).copied().unwrap_or(0);
    assert!(
        statuses.keys().all(|s| [401, 429].contains(s)),
        "{statuses:?}"
    );
    assert!(
        looked_up <= 100,
        "{looked_up} of 300 random keys reached the database: {statuses:?}"
    );
    // A key already verified keeps working.
    let ok = send(&api, Method::GET, "/api/v1/meters", Some(&admin), None).await;
    assert_eq!(ok.status(), StatusCode::OK);
}

/// Finding 21: the ingest rate limit counted requests, so a batch of 1000 events cost one token. A batch
/// now spends a token per event (it may take the bucket below zero; the key then waits).
#[tokio::test(flavor = "multi_thread")]
async fn finding_21_a_batch_spends_a_token_per_event() {
    let api = spawn_api_with(meterflow_api::Settings {
        ingest_rate: Rate {
            per_sec: 1.0,
            burst: 10.0,
        },
        ..settings()
    })
    .await;
    let ingest = key(&api, Role::Ingest, None).await;
    let now = chrono::Utc::now().to_rfc3339();
    let batch: Vec<Value> = (0..50)
        .map(|i| json!({"event_id": format!("rl-{i}"), "customer_id": "c", "event_type": "t", "event_time": now}))
        .collect();
    let response = send(
        &api,
        Method::POST,
        "/api/v1/events/batch",
        Some(&ingest),
        Some(&json!(batch)),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let one =
        json!({"event_id": "rl-after", "customer_id": "c", "event_type": "t", "event_time": now});
    let response = send(
        &api,
        Method::POST,
        "/api/v1/events",
        Some(&ingest),
        Some(&one),
    )
    .await;
    let status = response.status();
    let retry = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "50 events spent the burst of 10"
    );
    assert!(retry.is_some_and(|r| r >= 30), "Retry-After {retry:?}");
}

/// Finding 31 (tier 4): when the audit's snapshot after a committed change failed, the client got a 5xx
/// for a change that happened (and a retry then made another, or a 409). The answer is now the
/// handler's, and the audit row is still written (without the `after` snapshot).
#[tokio::test(flavor = "multi_thread")]
async fn finding_31_a_committed_change_is_not_answered_5xx_when_its_audit_snapshot_fails() {
    let api = spawn_api_with(settings()).await;
    let admin = key(&api, Role::Admin, None).await;
    // The application may read the customer's columns it uses, not a new one: a whole-row snapshot fails.
    for sql in [
        "ALTER TABLE customers ADD COLUMN secret text",
        "REVOKE SELECT ON customers FROM current_user",
        "GRANT SELECT (customer_id, name, email, address, currency, created_at, updated_at) ON customers TO current_user",
    ] {
        sqlx::query(sql).execute(&api.pool).await.unwrap();
    }
    let body = json!({"customer_id": "cust_snap", "name": "Snap", "currency": "USD"});
    let response = send(
        &api,
        Method::POST,
        "/api/v1/customers",
        Some(&admin),
        Some(&body),
    )
    .await;
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let audited = scalar_i64(
        &api.url,
        "SELECT count(*) FROM audit_log WHERE action = 'customer.create' AND entity_id = 'cust_snap'",
    )
    .await;
    assert_eq!(
        audited, 1,
        "the change is audited even without its snapshot"
    );
}

/// Finding 31 (tier 4): a request with an Idempotency-Key that timed out left its claim unanswered; a
/// retry got 409 IDEMPOTENCY_KEY_IN_PROGRESS for a minute and then ran the change again. The handler now
/// runs to the end and stores its answer, which the retry gets.
#[tokio::test(flavor = "multi_thread")]
async fn finding_31_a_timed_out_idempotent_request_is_answered_to_its_retry() {
    let api = spawn_api_with(meterflow_api::Settings {
        request_timeout: Duration::from_secs(1),
        ..settings()
    })
    .await;
    let admin = key(&api, Role::Admin, None).await;
    // The customers table is locked: the creation waits past the request timeout.
    let mut blocker = api.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE customers IN EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let post = || {
        api.client
            .post(format!("{}/api/v1/customers", api.base))
            .bearer_auth(&admin)
            .header("idempotency-key", "slow-1")
            .json(&json!({"customer_id": "cust_slow", "name": "Slow"}))
            .send()
    };
    let first = post().await.unwrap();
    expect_problem(first, StatusCode::SERVICE_UNAVAILABLE, "TIMEOUT").await;
    blocker.rollback().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let retry = loop {
        let retry = post().await.unwrap();
        if retry.status() != StatusCode::CONFLICT {
            break retry;
        }
        assert!(
            Instant::now() < deadline,
            "still in progress: {}",
            retry.text().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
}
