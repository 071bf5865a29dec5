//! Tenant isolation by construction (issue 13, item 5): a matrix generated from the route table
//! (`openapi::routes()`, which the router is built from). Every route × {no key, a weaker role, a key bound
//! to another customer, a body in each JSON shape}. A route added to the table without a fixture here
//! fails the test, so no route can skip the matrix.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use meterflow_api::auth::{self, Rate, Role};
use meterflow_api::openapi::{routes, Access, Verb};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const VICTIM: &str = "cust_victim";
const ME: &str = "cust_me";

fn settings() -> meterflow_api::Settings {
    meterflow_api::Settings {
        auth: true,
        rate: Rate {
            per_sec: 10_000.0,
            burst: 10_000.0,
        },
        ingest_rate: Rate {
            per_sec: 10_000.0,
            burst: 10_000.0,
        },
        key_cache_ttl: Duration::from_secs(600),
        ..Default::default()
    }
}

async fn key(api: &TestApi, role: Role, customer: Option<&str>) -> (String, String) {
    let (info, key) = auth::create_key(&api.pool, role, customer, "isolation", "test")
        .await
        .unwrap();
    (info.key_id, key)
}

fn method(verb: Verb) -> Method {
    match verb {
        Verb::Get => Method::GET,
        Verb::Post => Method::POST,
        Verb::Patch => Method::PATCH,
    }
}

/// A request body as text.
async fn send(
    api: &TestApi,
    method: Method,
    path: &str,
    key: Option<&str>,
    body: Option<String>,
) -> (StatusCode, String) {
    let mut request = api.client.request(method, format!("{}{path}", api.base));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.text().await.unwrap())
}

/// Whether a key of `role` may call a route of `access`.
fn allows(role: Role, access: Access) -> bool {
    match access {
        Access::Public | Access::Ingest => true,
        Access::Read => role >= Role::Read,
        Access::Admin => role == Role::Admin,
    }
}

/// The victim's things, made by an unbound admin key.
struct Victim {
    event_id: String,
    invoice_id: String,
    price_book_id: String,
    job_id: String,
    run_id: String,
}

/// What a route is called with: the path with the victim's ids, and a body naming the victim whose fields
/// are in declaration order (so the array shapes are what serde would take in field order).
struct Fixture {
    path: String,
    body: Option<Vec<(&'static str, Value)>>,
}

/// The fixture of every route of the table; `None` for a route that has none yet (the test then fails).
fn fixture(verb: Verb, path: &str, v: &Victim) -> Option<Fixture> {
    let now = chrono::Utc::now().to_rfc3339();
    let event = || {
        vec![
            ("event_id", json!(unique("iso"))),
            ("customer_id", json!(VICTIM)),
            ("event_type", json!("api_call")),
            ("event_time", json!(now)),
            ("value", json!("1000000")),
        ]
    };
    let (p, body): (String, Option<Vec<(&'static str, Value)>>) = match (verb, path) {
        (Verb::Post, "/api/v1/events") => (path.into(), Some(event())),
        // The batch's shapes are its items' (see `shapes`).
        (Verb::Post, "/api/v1/events/batch") => (path.into(), Some(event())),
        (Verb::Post, "/api/v1/events/{event_id}/void") => {
            (format!("/api/v1/events/{}/void", v.event_id), None)
        }
        (Verb::Post, "/api/v1/meters") => (
            path.into(),
            Some(vec![
                ("meter", json!("evil")),
                ("event_type", json!("api_call")),
                ("aggregation", json!("count")),
            ]),
        ),
        (Verb::Get, "/api/v1/meters") => (path.into(), None),
        (Verb::Get, "/api/v1/progress") => (path.into(), None),
        (Verb::Post, "/api/v1/watermark") => (
            path.into(),
            Some(vec![("advance_to", json!("2024-01-01T00:00:00Z"))]),
        ),
        // With a dimension filter too (issue 17): the victim's rows have dimension values.
        (Verb::Get, "/api/v1/aggregations") => (
            format!("{path}?customer_id={VICTIM}&include=event_ids&dimension.model=secret"),
            None,
        ),
        (Verb::Get, "/api/v1/dead-letters") => (path.into(), None),
        (Verb::Post, "/api/v1/price-books") => (
            path.into(),
            Some(vec![
                ("meter", json!("api_call")),
                ("customer_id", json!(VICTIM)),
                ("effective_from", json!("2024-02-01T00:00:00Z")),
                ("model", json!({"type": "per_unit", "unit_price": "0"})),
            ]),
        ),
        (Verb::Get, "/api/v1/price-books") => (format!("{path}?customer_id={VICTIM}"), None),
        (Verb::Get, "/api/v1/price-books/{price_book_id}") => {
            (format!("/api/v1/price-books/{}", v.price_book_id), None)
        }
        (Verb::Patch, "/api/v1/price-books/{price_book_id}") => (
            format!("/api/v1/price-books/{}", v.price_book_id),
            Some(vec![("effective_to", json!("2024-01-15T00:00:00Z"))]),
        ),
        (Verb::Get, "/api/v1/charges") => (format!("{path}?customer_id={VICTIM}"), None),
        (Verb::Post, "/api/v1/rerating-jobs") => (
            path.into(),
            Some(vec![
                ("customer_ids", json!([VICTIM])),
                ("from", json!("2024-03-01T00:00:00Z")),
                ("to", json!("2024-03-02T00:00:00Z")),
                ("reason", json!("x")),
            ]),
        ),
        (Verb::Get, "/api/v1/rerating-jobs/{job_id}") => {
            (format!("/api/v1/rerating-jobs/{}", v.job_id), None)
        }
        (Verb::Post, "/api/v1/customers") => (
            path.into(),
            Some(vec![
                ("customer_id", json!(format!("{VICTIM}_2"))),
                ("name", json!("Evil")),
                ("email", Value::Null),
                ("address", Value::Null),
                ("currency", json!("JPY")),
            ]),
        ),
        (Verb::Get, "/api/v1/customers") => (path.into(), None),
        (Verb::Get, "/api/v1/customers/{customer_id}") => {
            (format!("/api/v1/customers/{VICTIM}"), None)
        }
        (Verb::Patch, "/api/v1/customers/{customer_id}") => (
            format!("/api/v1/customers/{VICTIM}"),
            Some(vec![("name", json!("Evil"))]),
        ),
        (Verb::Get, "/api/v1/customers/{customer_id}/upcoming-invoice") => {
            (format!("/api/v1/customers/{VICTIM}/upcoming-invoice"), None)
        }
        (Verb::Post, "/api/v1/invoices") => (
            path.into(),
            Some(vec![
                ("customer_id", json!(VICTIM)),
                ("period_start", json!("2024-02-01T00:00:00Z")),
                ("period_end", json!("2024-03-01T00:00:00Z")),
            ]),
        ),
        (Verb::Get, "/api/v1/invoices") => (format!("{path}?customer_id={VICTIM}"), None),
        (Verb::Get, "/api/v1/invoices/{invoice_id}") => {
            (format!("/api/v1/invoices/{}", v.invoice_id), None)
        }
        (Verb::Post, "/api/v1/invoices/{invoice_id}/void") => (
            format!("/api/v1/invoices/{}/void", v.invoice_id),
            Some(vec![("reason", json!("evil"))]),
        ),
        (Verb::Get, "/api/v1/invoices/{invoice_id}/document") => {
            (format!("/api/v1/invoices/{}/document", v.invoice_id), None)
        }
        (Verb::Post, "/api/v1/invoice-runs") => {
            (path.into(), Some(vec![("period", json!("2024-02"))]))
        }
        (Verb::Get, "/api/v1/invoice-runs/{run_id}") => {
            (format!("/api/v1/invoice-runs/{}", v.run_id), None)
        }
        _ => return None,
    };
    Some(Fixture { path: p, body })
}

/// The body in every JSON shape: an object, the same values as an array (serde derive takes it in
/// field order), a nested array, and scalars. For the batch route each shape is an item.
fn shapes(route: &str, fields: &[(&'static str, Value)]) -> Vec<(&'static str, String)> {
    // An object's text in field order, not the map's (sorted) order.
    let object_text = format!(
        "{{{}}}",
        fields
            .iter()
            .map(|(k, v)| format!("{}:{v}", json!(k)))
            .collect::<Vec<_>>()
            .join(",")
    );
    let array = Value::Array(fields.iter().map(|(_, v)| v.clone()).collect());
    let nested = json!([array.clone()]);
    let shapes = vec![
        ("object", object_text),
        ("array", array.to_string()),
        ("nested array", nested.to_string()),
        ("string", json!(VICTIM).to_string()),
        ("number", "1".to_owned()),
        ("null", "null".to_owned()),
    ];
    if route == "/api/v1/events/batch" {
        shapes
            .into_iter()
            .map(|(name, item)| (name, format!("[{item}]")))
            .collect()
    } else {
        shapes
    }
}

/// Everything that must not change while the other customer's key tries: a digest of the tables.
/// `path` without its `customer_id` query parameter, if it has one.
fn without_customer(path: &str) -> Option<String> {
    let (route, query) = path.split_once('?')?;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| !p.starts_with("customer_id="))
        .collect();
    if kept.len() == query.split('&').count() {
        return None;
    }
    Some(if kept.is_empty() {
        route.to_owned()
    } else {
        format!("{route}?{}", kept.join("&"))
    })
}

async fn state_digest(api: &TestApi) -> String {
    sqlx::query_scalar(
        "SELECT md5(string_agg(x, '|' ORDER BY x)) FROM (
             SELECT 'c' || to_jsonb(t)::text AS x FROM customers t
             UNION ALL SELECT 'i' || to_jsonb(t)::text FROM invoices t
             UNION ALL SELECT 'p' || to_jsonb(t)::text FROM price_books t
             UNION ALL SELECT 'r' || to_jsonb(t)::text FROM rerating_jobs t
             UNION ALL SELECT 'n' || (to_jsonb(t) - 'started_at' - 'finished_at' - 'status')::text FROM invoice_runs t
             UNION ALL SELECT 'w' || to_jsonb(t)::text FROM watermark_floors t
             UNION ALL SELECT 'm' || to_jsonb(t)::text FROM meters t
             UNION ALL SELECT 't' || event_id || customer_id FROM telemetry_events t
             UNION ALL SELECT 'e' || event_id || coalesce(void_requested_at::text, '-') FROM event_ids
         ) s",
    )
    .fetch_one(&api.pool)
    .await
    .unwrap()
}

async fn wait_for(api: &TestApi, key: &str, path: &str, done: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, text) = send(api, Method::GET, path, Some(key), None).await;
        let got: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if done(&got) {
            return;
        }
        assert!(Instant::now() < deadline, "{path}: {got}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn setup(api: &TestApi, admin: &str) -> Victim {
    spawn_job_runner(api).await;
    let post = |path: &'static str, body: Value| async move {
        let (status, text) =
            send(api, Method::POST, path, Some(admin), Some(body.to_string())).await;
        assert!(status.is_success(), "{path} {body}: {status} {text}");
        serde_json::from_str::<Value>(&text).unwrap()
    };
    for id in [VICTIM, ME] {
        post(
            "/api/v1/customers",
            json!({"customer_id": id, "name": id, "currency": "USD"}),
        )
        .await;
    }
    let book = post(
        "/api/v1/price-books",
        json!({"meter": "api_call", "customer_id": VICTIM, "effective_from": "2024-01-01T00:00:00Z",
               "model": {"type": "per_unit", "unit_price": "0.01"}}),
    )
    .await;
    let invoice = post(
        "/api/v1/invoices",
        json!({"customer_id": VICTIM, "period_start": "2024-01-01T00:00:00Z",
               "period_end": "2024-01-31T23:59:59.999Z"}),
    )
    .await;
    let job = post(
        "/api/v1/rerating-jobs",
        json!({"customer_ids": [VICTIM], "from": "2024-01-01T00:00:00Z", "to": "2024-01-01T01:00:00Z"}),
    )
    .await;
    let event_id = unique("victim_ev");
    post(
        "/api/v1/events",
        json!({"event_id": event_id, "customer_id": VICTIM, "event_type": "api_call",
               "event_time": chrono::Utc::now().to_rfc3339(), "value": 5}),
    )
    .await;
    let run = post("/api/v1/invoice-runs", json!({"period": "2024-01"})).await;
    // No pipeline runs here: the victim's window and charge are written as its sink would, so that
    // the lists of aggregates and charges have something of the victim's to leak.
    sqlx::query(
        "INSERT INTO aggregations (customer_id, meter, window_start, window_end, value, event_count)
         VALUES ($1, 'api_call', '2024-01-15T10:00:00Z', '2024-01-15T11:00:00Z', 5, 1)",
    )
    .bind(VICTIM)
    .execute(&api.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO aggregations (customer_id, meter, window_start, window_end, value, event_count,
                                   dimensions)
         VALUES ($1, 'api_call', '2024-01-15T10:00:00Z', '2024-01-15T11:00:00Z', 7, 1,
                 '{\"model\": \"secret\"}')",
    )
    .bind(VICTIM)
    .execute(&api.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO charges (customer_id, meter, window_start, window_end, quantity, amount, currency,
                              price_book_id)
         VALUES ($1, 'api_call', '2024-01-15T10:00:00Z', '2024-01-15T11:00:00Z', 5, 0.05, 'USD', $2)",
    )
    .bind(VICTIM)
    .bind(book["price_book_id"].as_str().unwrap())
    .execute(&api.pool)
    .await
    .unwrap();
    let victim = Victim {
        event_id,
        invoice_id: invoice["invoice_id"].as_str().unwrap().to_owned(),
        price_book_id: book["price_book_id"].as_str().unwrap().to_owned(),
        job_id: job["job_id"].as_str().unwrap().to_owned(),
        run_id: run["run_id"].as_str().unwrap().to_owned(),
    };
    let busy = |v: &Value| v["status"] == "pending" || v["status"] == "running";
    wait_for(
        api,
        admin,
        &format!("/api/v1/rerating-jobs/{}", victim.job_id),
        |v| v["status"].is_string() && !busy(v),
    )
    .await;
    wait_for(
        api,
        admin,
        &format!("/api/v1/invoice-runs/{}", victim.run_id),
        |v| v["status"].is_string() && !busy(v),
    )
    .await;
    victim
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_isolates_keys_roles_customers_and_body_shapes() {
    let api = spawn_api_with(settings()).await;
    let (_, admin) = key(&api, Role::Admin, None).await;
    let (_, read) = key(&api, Role::Read, None).await;
    let (_, ingest) = key(&api, Role::Ingest, None).await;
    let mut bound = BTreeMap::new();
    let mut bound_ids = Vec::new();
    for role in [Role::Ingest, Role::Read, Role::Admin] {
        let (id, k) = key(&api, role, Some(ME)).await;
        bound_ids.push(id);
        bound.insert(role, k);
    }
    let victim = setup(&api, &admin).await;
    let before = state_digest(&api).await;
    let mut failures = Vec::new();
    let mut missing = Vec::new();
    let mut covered = 0;
    for route in routes() {
        let m = method(route.verb);
        let what = format!("{} {}", route.verb.as_str(), route.path);
        if route.access == Access::Public {
            assert!(
                !route.path.starts_with("/api/v1/") || route.path == "/api/v1/openapi.json",
                "{what}: a public route under /api/v1"
            );
            continue;
        }
        let Some(f) = fixture(route.verb, route.path, &victim) else {
            missing.push(what);
            continue;
        };
        covered += 1;
        let body = f
            .body
            .as_ref()
            .map(|fields| shapes(route.path, fields)[0].1.clone());
        // No key.
        let (status, _) = send(&api, m.clone(), &f.path, None, body.clone()).await;
        if status != StatusCode::UNAUTHORIZED {
            failures.push(format!("{what} without a key: {status}"));
        }
        // Weaker roles (unbound).
        let weaker: Vec<&String> = match route.access {
            Access::Admin => vec![&ingest, &read],
            Access::Read => vec![&ingest],
            _ => vec![],
        };
        for weak in weaker {
            let (status, _) = send(&api, m.clone(), &f.path, Some(weak), body.clone()).await;
            if status != StatusCode::FORBIDDEN {
                failures.push(format!("{what} with a weaker role: {status}"));
            }
        }
        // Keys bound to another customer, of every role the route allows: 404, or an answer that
        // shows nothing of the victim's.
        for (role, k) in &bound {
            if !allows(*role, route.access) {
                continue;
            }
            let shapes = match &f.body {
                Some(fields) => shapes(route.path, fields)
                    .into_iter()
                    .map(|(n, b)| (n, Some(b)))
                    .collect(),
                None => vec![("no body", None)],
            };
            // A list is asked for the victim by name, and without a customer at all (then it must
            // show the key's own customer only).
            let mut paths = vec![f.path.clone()];
            paths.extend(without_customer(&f.path));
            let asks = paths
                .iter()
                .flat_map(|path| shapes.iter().map(move |(shape, body)| (path, shape, body)));
            for (path, shape, body) in asks {
                let (status, text) = send(&api, m.clone(), path, Some(k), body.clone()).await;
                let leaks = text.contains(VICTIM)
                    || [
                        &victim.invoice_id,
                        &victim.price_book_id,
                        &victim.job_id,
                        &victim.event_id,
                    ]
                    .iter()
                    .any(|id| text.contains(id.as_str()));
                // A body names the victim: any success is a write for another customer (a batch
                // answers 200 with every item refused).
                let wrote = body.is_some()
                    && status.is_success()
                    && serde_json::from_str::<Value>(&text).unwrap_or(Value::Null)["accepted"] != 0;
                let ok = (status.is_client_error() || status.is_success()) && !leaks && !wrote;
                if !ok {
                    failures.push(format!(
                        "{what} ({path}) bound to {ME} ({role:?}), {shape} body: {status} {}",
                        text.chars().take(300).collect::<String>()
                    ));
                }
            }
        }
        // Every shape but an object is refused whoever sends it (the batch: every item).
        if let Some(fields) = &f.body {
            for (shape, body) in shapes(route.path, fields).into_iter().skip(1) {
                let (status, text) = send(&api, m.clone(), &f.path, Some(&admin), Some(body)).await;
                let refused = status.is_client_error()
                    || (route.path == "/api/v1/events/batch"
                        && status == StatusCode::OK
                        && serde_json::from_str::<Value>(&text).unwrap()["accepted"] == 0);
                if !refused {
                    failures.push(format!("{what} as admin, {shape} body: {status} {text}"));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "routes without a fixture in tests/isolation.rs (add one): {missing:?}"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(covered >= 28, "only {covered} routes covered");
    // Nothing the bound keys sent changed anything.
    assert_eq!(
        state_digest(&api).await,
        before,
        "the bound keys changed stored data"
    );
    // Idempotency-Key answers are per key: the victim's stored answer is not replayed to another key.
    let body = json!({"customer_id": format!("{VICTIM}_idem"), "name": "Idem"}).to_string();
    let created = api
        .client
        .post(format!("{}/api/v1/customers", api.base))
        .bearer_auth(&admin)
        .header("idempotency-key", "iso-shared")
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let before = state_digest(&api).await;
    let replayed = api
        .client
        .post(format!("{}/api/v1/customers", api.base))
        .bearer_auth(&bound[&Role::Admin])
        .header("idempotency-key", "iso-shared")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert!(replayed.headers().get("idempotent-replayed").is_none());
    let status = replayed.status();
    let text = replayed.text().await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND, "{text}");
    // Nothing the bound keys sent changed anything.
    assert_eq!(
        state_digest(&api).await,
        before,
        "the bound keys changed stored data"
    );
    let audited: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE actor = ANY($1)")
        .bind(&bound_ids)
        .fetch_one(&api.pool)
        .await
        .unwrap();
    assert_eq!(audited, 0, "a bound key made an audited change");
}
