//! The OpenAPI document at `/api/v1/openapi.json` against the live server: a well-formed OpenAPI 3
//! document, every route in it and every documented operation routed, and its request examples
//! accepted. (Schemathesis, `deploy/local/schemathesis`, checks the answers against the schemas.)

mod common;

use std::collections::BTreeSet;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::Value;

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// The API with auth off (`MF_AUTH=off`), as Schemathesis sees it: these tests are about routing and
/// shapes; tests/auth.rs is about keys.
async fn spawn_open_api() -> TestApi {
    let url = fresh_database().await;
    let topic = fresh_topic(2).await;
    let pool = meterflow_api::pool_options(10).connect(&url).await.unwrap();
    let producer = meterflow_api::producer_config(BROKERS).create().unwrap();
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

async fn document(api: &TestApi) -> Value {
    let response = api.get("/api/v1/openapi.json").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    response.json().await.unwrap()
}

/// Every `(method, path, operation)` of the document.
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            out.push((method.clone(), path.clone(), operation.clone()));
        }
    }
    out
}

/// Every `$ref` in `value`.
fn refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r.clone()),
                    _ => refs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

/// The path with each `{param}` replaced by `value`.
fn fill(path: &str, value: &str) -> String {
    let mut out = String::new();
    let mut rest = path;
    while let Some(open) = rest.find('{') {
        let close = rest[open..].find('}').unwrap() + open;
        out.push_str(&rest[..open]);
        out.push_str(value);
        rest = &rest[close + 1..];
    }
    out + rest
}

fn example(operation: &Value) -> Option<Value> {
    let example = &operation["requestBody"]["content"]["application/json"]["example"];
    (!example.is_null()).then(|| example.clone())
}

async fn send(api: &TestApi, method: &str, path: &str, body: Option<&Value>) -> reqwest::Response {
    let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap();
    let mut request = api.client.request(method, format!("{}{path}", api.base));
    if let Some(body) = body {
        request = request.json(body);
    }
    request.send().await.unwrap()
}

/// [`send`] for a body past the route's limit. The server may answer 413 and close the connection
/// before the client has written the whole body; the client then reports the broken pipe instead of
/// the answer. That is the transport, not the route: such a send is tried again (up to 10 times).
async fn send_over_limit(
    api: &TestApi,
    method: &str,
    path: &str,
    body: &Value,
) -> reqwest::Response {
    let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap();
    let mut last = None;
    for _ in 0..10 {
        let request = api
            .client
            .request(method.clone(), format!("{}{path}", api.base))
            .json(body);
        match request.send().await {
            Ok(response) => return response,
            Err(e) if e.is_request() || e.is_body() => {
                last = Some(e);
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{method} {path}: {e}"),
        }
    }
    panic!("{method} {path}: no answer in 10 tries: {last:?}")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_document_is_openapi_3_with_operations_responses_and_components() {
    let api = spawn_open_api().await;
    let doc = document(&api).await;
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        doc["openapi"]
    );
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    assert!(schemas.contains_key("Problem"));
    let bearer = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!(
        (bearer["type"].as_str(), bearer["scheme"].as_str()),
        (Some("http"), Some("bearer"))
    );

    let mut ids = BTreeSet::new();
    for (method, path, op) in operations(&doc) {
        let what = format!("{method} {path}");
        assert!(METHODS.contains(&method.as_str()), "{what}");
        assert!(path.starts_with('/'), "{what}");
        assert!(
            ids.insert(op["operationId"].as_str().unwrap().to_owned()),
            "{what}: operationId"
        );
        let responses = op["responses"].as_object().unwrap();
        assert!(
            responses.keys().any(|s| s.starts_with('2')),
            "{what}: no success response"
        );
        for (status, response) in responses {
            assert!(
                status.parse::<u16>().is_ok_and(|s| (100..600).contains(&s)),
                "{what} {status}"
            );
            assert!(
                response["description"].is_string(),
                "{what} {status}: description"
            );
            if status.starts_with('4') || (status == "503" && path.starts_with("/api/v1")) {
                assert!(
                    response["content"]["application/problem+json"]["schema"].is_object(),
                    "{what} {status}: errors are problem+json"
                );
            }
        }
        // Every `{param}` of the path is declared, and nothing else is declared in the path.
        let declared: BTreeSet<String> = op["parameters"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .filter(|p| p["in"] == "path")
                    .map(|p| p["name"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default();
        let templated: BTreeSet<String> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(str::to_owned)
            .collect();
        assert_eq!(declared, templated, "{what}: path parameters");
        for p in op["parameters"].as_array().into_iter().flatten() {
            assert!(
                p["schema"].is_object() && ["path", "query"].contains(&p["in"].as_str().unwrap()),
                "{what}: {p}"
            );
        }
        // The role: public routes need no key, the rest a bearer key of a named role.
        let role = op["x-required-role"].as_str().unwrap();
        assert!(
            ["public", "ingest", "read", "admin"].contains(&role),
            "{what}"
        );
        assert_eq!(
            op["security"].as_array().unwrap().is_empty(),
            role == "public",
            "{what}"
        );
        if role != "public" {
            assert!(
                responses.contains_key("401") && responses.contains_key("403"),
                "{what}"
            );
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    for r in &all {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("{r}"));
        assert!(schemas.contains_key(name), "dangling {r}");
    }
    // The components are the schemas the operations reach (derived from the types), nothing else.
    for name in schemas.keys() {
        let target = format!("#/components/schemas/{name}");
        assert!(all.contains(&target), "{name} is not referenced");
    }
    assert!(schemas.len() > 30, "{} components", schemas.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_is_documented_and_every_documented_operation_is_routed() {
    let api = spawn_open_api().await;
    let doc = document(&api).await;
    let documented: BTreeSet<(String, String)> = operations(&doc)
        .into_iter()
        .map(|(m, p, _)| (m, p))
        .collect();
    // SPEC §8's endpoints, and the document itself.
    let expected: BTreeSet<(String, String)> = [
        ("post", "/events"),
        ("post", "/events/batch"),
        ("post", "/events/{event_id}/void"),
        ("post", "/meters"),
        ("get", "/meters"),
        ("get", "/progress"),
        ("post", "/watermark"),
        ("get", "/aggregations"),
        ("get", "/dead-letters"),
        ("post", "/price-books"),
        ("get", "/price-books"),
        ("get", "/price-books/{price_book_id}"),
        ("patch", "/price-books/{price_book_id}"),
        ("get", "/charges"),
        ("post", "/rerating-jobs"),
        ("get", "/rerating-jobs/{job_id}"),
        ("post", "/customers"),
        ("get", "/customers"),
        ("get", "/customers/{customer_id}"),
        ("patch", "/customers/{customer_id}"),
        ("get", "/customers/{customer_id}/upcoming-invoice"),
        ("post", "/invoices"),
        ("get", "/invoices"),
        ("get", "/invoices/{invoice_id}"),
        ("post", "/invoices/{invoice_id}/void"),
        ("get", "/invoices/{invoice_id}/document"),
        ("post", "/invoice-runs"),
        ("get", "/invoice-runs/{run_id}"),
        ("get", "/openapi.json"),
    ]
    .into_iter()
    .map(|(m, p)| (m.to_owned(), format!("/api/v1{p}")))
    .chain(["/healthz", "/readyz", "/metrics"].map(|p| ("get".to_owned(), p.to_owned())))
    .collect();
    assert_eq!(documented, expected);

    // Each documented operation reaches a handler: never 405, and the request is counted under its
    // route template (the metrics label requests the router did not match "unmatched").
    for (method, path) in &documented {
        let response = send(&api, method, &fill(path, "openapi_probe"), None).await;
        assert_ne!(
            response.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
    }
    let metrics = api.get("/metrics").await.text().await.unwrap();
    for (method, path) in &documented {
        let label = format!(
            "method=\"{}\",route=\"{path}\"",
            method.to_ascii_uppercase()
        );
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("http_requests_total{") && l.contains(&label)),
            "{method} {path} was not routed"
        );
    }
    assert!(
        !metrics.contains("route=\"unmatched\""),
        "some documented request was not routed"
    );

    // Every other method on a documented path is refused (405): nothing undocumented is routed there.
    for path in documented.iter().map(|(_, p)| p).collect::<BTreeSet<_>>() {
        for method in METHODS {
            if !documented.contains(&(method.to_owned(), path.clone())) {
                let response = send(&api, method, &fill(path, "openapi_probe"), None).await;
                assert_eq!(
                    response.status(),
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path}"
                );
            }
        }
    }
    // And a path not in the document is 404 problem+json.
    let response = api.get("/api/v1/not-a-route").await;
    expect_problem(response, StatusCode::NOT_FOUND, "NOT_FOUND").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_request_examples_of_the_document_are_accepted() {
    let api = spawn_open_api().await;
    let doc = document(&api).await;
    let ops = operations(&doc);
    let with_example: Vec<_> = ops
        .iter()
        .filter(|(_, _, op)| example(op).is_some())
        .collect();
    assert!(with_example.len() >= 12, "{} examples", with_example.len());
    // Creations first, so the changes and the void find what they change.
    let order = |path: &str| match path {
        "/api/v1/customers" | "/api/v1/meters" | "/api/v1/price-books" => 0,
        p if p.contains('{') => 2,
        _ => 1,
    };
    let mut with_example = with_example;
    with_example.sort_by_key(|(_, path, _)| order(path));
    let mut price_book_id = String::new();
    for (method, path, op) in with_example {
        let target = match path.as_str() {
            "/api/v1/price-books/{price_book_id}" => fill(path, &price_book_id),
            "/api/v1/customers/{customer_id}" => fill(path, "cust_openapi"),
            _ => fill(path, "openapi_probe"),
        };
        let body = example(op).unwrap();
        let response = send(&api, method, &target, Some(&body)).await;
        let status = response.status();
        let text = response.text().await.unwrap();
        // A domain answer (404 for an unknown id, 409 for a period not ended) is fine; a refusal of
        // the example's shape or a server error is not.
        assert!(
            status.is_success()
                || status == StatusCode::NOT_FOUND
                || status == StatusCode::CONFLICT,
            "{method} {path} refused its own example {body}: {status} {text}"
        );
        if path == "/api/v1/price-books" {
            let created: Value = serde_json::from_str(&text).unwrap();
            price_book_id = created["price_book_id"].as_str().unwrap().to_owned();
        }
    }
}

/// Found by Schemathesis: a NUL character reached Postgres, which cannot store it, and the API
/// answered 500. Now it is refused with the field's path.
#[tokio::test(flavor = "multi_thread")]
async fn text_with_a_nul_character_is_refused_not_a_server_error() {
    let api = spawn_open_api().await;
    let body = serde_json::json!({"customer_id": "cA", "name": "a\u{0}b", "address": "x\u{0}"});
    let response = api.post_json("/api/v1/customers", &body).await;
    let problem = expect_problem(
        response,
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
    assert_eq!(fields, ["name", "address"]);
}

/// Every operation that takes a JSON body refuses one over its limit with 413 problem+json naming the
/// limit, not axum's plain text or a 400 (`POST /api/v1/meters` and `/watermark` answered 400 before
/// their bodies were read by `meterflow_api::extract::JsonObject`).
#[tokio::test(flavor = "multi_thread")]
async fn every_body_over_its_limit_is_413_problem_json() {
    let api = spawn_open_api().await;
    let doc = document(&api).await;
    // Over every route's limit: the largest is axum's default, 2 MiB.
    let big = serde_json::json!({"padding": "x".repeat(2 * 1024 * 1024 + 1)});
    let mut checked = 0;
    for (method, path, operation) in operations(&doc) {
        if operation.get("requestBody").is_none() {
            continue;
        }
        let response = send_over_limit(&api, &method, &fill(&path, "too_big"), &big).await;
        let problem =
            expect_problem(response, StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE").await;
        let detail = problem["detail"].as_str().unwrap_or_default();
        assert!(
            detail.chars().any(|c| c.is_ascii_digit()),
            "{method} {path}: the detail names no limit: {detail}"
        );
        checked += 1;
    }
    assert!(checked >= 12, "{checked} operations with a body");
}
