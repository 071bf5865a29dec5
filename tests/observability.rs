//! SPEC §10 observability on the real services: every metric the Grafana dashboard
//! (`deploy/grafana/meterflow.json`) and the alert rules (`deploy/prometheus/alerts.yml`) use is exported
//! by the API or the pipeline, no metric carries a customer, and every request has an id that its
//! response and its log lines carry.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

/// PromQL words that are not metric names (aggregation modifiers, set and vector-matching operators).
const KEYWORDS: [&str; 12] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
];

/// The metric names a PromQL expression reads: identifiers that are not functions, keywords, label names
/// in matchers or grouping clauses, strings, numbers or durations.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // `chars[i]` opens a string: the index after it closes.
    let skip_string = |mut i: usize| {
        let quote = chars[i];
        i += 1;
        while i < chars.len() && chars[i] != quote {
            i += if chars[i] == '\\' { 2 } else { 1 };
        }
        i + 1
    };
    // `chars[i]` is `open`: the index after its matching `close`, strings skipped.
    let skip_group = |mut i: usize, open: char, close: char| {
        let mut depth = 0;
        while i < chars.len() {
            match chars[i] {
                '"' | '\'' | '`' => {
                    i = skip_string(i);
                    continue;
                }
                c if c == open => depth += 1,
                c if c == close => {
                    depth -= 1;
                    if depth == 0 {
                        return i + 1;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        i
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            i = skip_group(i, '{', '}');
        } else if c == '[' {
            i = skip_group(i, '[', ']');
        } else if c == '"' || c == '\'' || c == '`' {
            i = skip_string(i);
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let rest: String = chars[next..].iter().collect();
            // `f(…)`, or an aggregation written `sum by (…) (…)` / `sum without (…) (…)`.
            let called = rest.starts_with('(')
                || ["by", "without"].iter().any(|k| {
                    rest.strip_prefix(k)
                        .is_some_and(|r| r.trim_start().starts_with('('))
                });
            if KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
                if called {
                    // A grouping clause: its parentheses hold label names.
                    i = skip_group(next, '(', ')');
                }
            } else if !called && !word.eq_ignore_ascii_case("nan") {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn metric_names_are_read_out_of_promql() {
    let expr = r#"histogram_quantile(0.99, sum by (route, le) (rate(http_request_duration_seconds_bucket{method="GET", route=~"/api/v1/(a|b)"}[5m]))) > 0.1
        and on() sum without (instance) (kafka_consumer_lag offset 5m) > 1e3 or absent(up_total{job="x"}) * 1000"#;
    let names: Vec<String> = metric_names(expr).into_iter().collect();
    assert_eq!(
        names,
        [
            "http_request_duration_seconds_bucket",
            "kafka_consumer_lag",
            "up_total"
        ]
    );
}

/// Every `expr` of the Grafana dashboard.
fn dashboard_exprs() -> Vec<String> {
    fn walk(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, v) in map {
                    match (key.as_str(), v) {
                        ("expr", Value::String(e)) => out.push(e.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/meterflow.json"
    ))
    .unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut out = Vec::new();
    walk(&dashboard, &mut out);
    out
}

/// Every `expr:` of the alert rules: one line, or a `|` / `>` block of deeper-indented lines.
fn alert_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/prometheus/alerts.yml"
    ))
    .unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut alert = String::new();
    for (n, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start().trim_start_matches("- ");
        if let Some(name) = trimmed.strip_prefix("alert:") {
            alert = name.trim().to_owned();
        }
        let Some(value) = trimmed.strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        let expr = if value.starts_with('|') || value.starts_with('>') {
            let indent = line.len() - line.trim_start().len();
            lines[n + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect::<Vec<_>>()
                .join(" ")
        } else {
            value.trim_matches(|c| c == '\'' || c == '"').to_owned()
        };
        out.push((alert.clone(), expr));
    }
    out
}

/// One exported series: its name, its labels, its value.
type Sample = (String, Vec<(String, String)>, f64);

/// A Prometheus text exposition: metric families with their type, and samples with their labels.
struct Exposition {
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

fn parse_exposition(text: &str) -> Exposition {
    let mut types = BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            types.insert(
                parts.next().unwrap().to_owned(),
                parts.next().unwrap().to_owned(),
            );
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap();
                let mut labels = Vec::new();
                // Label values here never contain `",`: split on it.
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").unwrap();
                    labels.push((k.to_owned(), v.trim_end_matches('"').to_owned()));
                }
                (name.to_owned(), labels)
            }
            None => (series.to_owned(), Vec::new()),
        };
        samples.push((name, labels, value.parse().unwrap()));
    }
    Exposition { types, samples }
}

impl Exposition {
    /// Whether `name` is exported: a family, or a histogram's `_bucket`/`_sum`/`_count` series.
    fn exports(&self, name: &str) -> bool {
        if self.types.contains_key(name) {
            return true;
        }
        ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix).is_some_and(|base| {
                self.types
                    .get(base)
                    .is_some_and(|t| t == "histogram" || t == "summary")
            })
        })
    }

    /// The value of the series `name` with exactly these labels.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && l.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| *v)
    }

    fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, _, v)| v)
            .sum()
    }
}

async fn scrape(url: &str) -> String {
    let response = reqwest::get(url).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{url}");
    response.text().await.unwrap()
}

/// The dashboard and the alert rules read only metrics the API and the pipeline export; no exported
/// series has a customer label or a customer's id; the pipeline's counters count what happened.
#[tokio::test(flavor = "multi_thread")]
async fn every_metric_of_the_dashboard_and_the_alerts_is_exported_without_customer_labels() {
    let api = spawn_api().await;
    let metrics_addr = free_addr();
    let _pipeline = spawn_pipeline(
        &api.url,
        &api.topic,
        1,
        &["--metrics-addr", &metrics_addr, "--epoch-ms", "50"],
    );
    let pipeline_metrics = format!("http://{metrics_addr}/metrics");

    // Five events over HTTP from customers whose ids must never show in the metrics, one of them
    // posted twice (409), a void (a path with an id), and straight to Kafka: a broken record (a dead
    // letter) and a copy of an accepted event (a duplicate).
    let event = |i: usize| {
        json!({"event_id": format!("obs_{i}"), "customer_id": format!("secretcustomer{i}"),
               "event_type": "api_call", "event_time": "2024-01-15T14:30:00Z"})
    };
    for i in 0..5 {
        assert_eq!(
            api.post_event(&event(i)).await.status(),
            StatusCode::CREATED
        );
    }
    assert_eq!(
        api.post_event(&event(0)).await.status(),
        StatusCode::CONFLICT
    );
    assert_eq!(
        api.get("/api/v1/aggregations?customer_id=secretcustomer1")
            .await
            .status(),
        StatusCode::OK
    );
    produce(
        &api.topic,
        &[
            ("secretcustomer9".into(), b"{broken".to_vec()),
            (
                "secretcustomer2".into(),
                serde_json::to_vec(&event(2)).unwrap(),
            ),
        ],
    );
    api.wait_caught_up(WAIT).await;

    // The pipeline's counters follow its commits; wait until they show the dead letter and the
    // duplicate, and its lag monitor has seen both partitions.
    let deadline = Instant::now() + WAIT;
    let pipeline = loop {
        if let Ok(response) = reqwest::get(&pipeline_metrics).await {
            let exposition = parse_exposition(&response.text().await.unwrap());
            let ready = exposition.value("dead_letters_total", &[("reason", "MALFORMED_JSON")])
                == Some(1.0)
                && exposition.value("duplicate_events_total", &[("kind", "identical")])
                    == Some(1.0)
                && ["0", "1"].iter().all(|p| {
                    exposition.value("kafka_consumer_lag", &[("partition", p)]) == Some(0.0)
                });
            if ready {
                break exposition;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the pipeline's metrics never showed the dead letter, the duplicate and no lag:\n{}",
            scrape(&pipeline_metrics).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Scraped twice: the first scrape of /metrics is counted in the second.
    scrape(&format!("{}/metrics", api.base)).await;
    let api_text = scrape(&format!("{}/metrics", api.base)).await;
    let pipeline_text = scrape(&pipeline_metrics).await;
    let api_metrics = parse_exposition(&api_text);

    let mut exprs: Vec<(String, String)> = dashboard_exprs()
        .into_iter()
        .map(|e| ("dashboard".to_owned(), e))
        .collect();
    assert!(exprs.len() >= 15, "the dashboard has its panels");
    let alerts = alert_exprs();
    assert!(alerts.len() >= 10, "the alert rules are read: {alerts:?}");
    exprs.extend(alerts);
    let mut checked = BTreeSet::new();
    for (origin, expr) in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{origin}: no metric in {expr}");
        for name in names {
            assert!(
                api_metrics.exports(&name) || pipeline.exports(&name),
                "{origin} uses {name} ({expr}), which neither the API nor the pipeline exports"
            );
            checked.insert(name);
        }
    }
    for spec_metric in [
        "http_request_duration_seconds_bucket",
        "http_requests_total",
        "events_ingested_total",
        "aggregation_lag_seconds",
        "window_close_duration_seconds_bucket",
        "kafka_consumer_lag",
        "sink_commit_duration_seconds_bucket",
        "sink_commit_rows_total",
        "dead_letters_total",
        "duplicate_events_total",
        "late_events_total",
        "epoch_frontier_lag",
        "committed_watermark_seconds",
    ] {
        assert!(
            checked.contains(spec_metric),
            "SPEC §10's {spec_metric} is on the dashboard or in an alert"
        );
    }

    // Bounded labels: no customer label, no customer's id, route templates rather than paths.
    for (what, exposition, text) in [
        ("api", &api_metrics, &api_text),
        ("pipeline", &pipeline, &pipeline_text),
    ] {
        for (name, labels, _) in &exposition.samples {
            assert!(
                labels.iter().all(|(k, _)| k != "customer_id"),
                "{what}: {name} has a customer_id label"
            );
        }
        assert!(
            !text.contains("secretcustomer"),
            "{what}'s metrics mention a customer:\n{text}"
        );
    }
    assert!(api_text.contains("route=\"/api/v1/events\""));
    assert!(
        api_text.contains("route=\"/metrics\""),
        "scrapes are counted (MeterflowApiDown)"
    );
    assert!(api_text.contains(
        "http_request_duration_seconds_bucket{method=\"POST\",route=\"/api/v1/events\",status=\"201\",le=\"0.01\"}"
    ), "the seed's buckets from 0.01 s");

    // The counters count what happened.
    assert_eq!(
        api_metrics.value("events_ingested_total", &[("event_type", "api_call")]),
        Some(5.0)
    );
    assert_eq!(
        api_metrics.value(
            "http_requests_total",
            &[
                ("method", "POST"),
                ("route", "/api/v1/events"),
                ("status", "201")
            ]
        ),
        Some(5.0)
    );
    assert_eq!(
        api_metrics.value(
            "http_requests_total",
            &[
                ("method", "POST"),
                ("route", "/api/v1/events"),
                ("status", "409")
            ]
        ),
        Some(1.0)
    );
    assert!(pipeline.sum("sink_commit_duration_seconds_count") >= 1.0);
    assert!(pipeline.sum("sink_commit_rows_total") >= 1.0);
    assert_eq!(
        pipeline
            .value("committed_watermark_seconds", &[])
            .map(|w| w > 1.7e9),
        Some(true),
        "the committed watermark (2024-01-15 minus the out-of-orderness) is exported"
    );
}

/// Every response carries a request id — the client's `x-request-id` if it sent a sane one, else a
/// new one — and with `--log-format json` every log line of the request is a JSON object carrying it.
#[tokio::test(flavor = "multi_thread")]
async fn every_request_has_an_id_in_its_response_and_its_json_log_lines() {
    let url = fresh_database().await;
    let topic = fresh_topic(1).await;
    let addr = free_addr();
    let log = std::env::temp_dir().join(format!("{}.log", unique("api_log")));
    let mut command = meterflow(&url, &topic);
    command
        .env("MF_API_ADDR", &addr)
        .env("MF_LOG", "warn,meterflow_api=debug")
        .args(["--log-format", "json", "api"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut api = Running(command.spawn().unwrap());
    let base = format!("http://{addr}");
    wait_healthy(&base, WAIT).await;
    let client = reqwest::Client::new();

    let sent = client
        .post(format!("{base}/api/v1/events"))
        .header("x-request-id", "client-id-42")
        .json(
            &json!({"event_id": "rid_1", "customer_id": "c", "event_type": "api_call",
                      "event_time": "2024-01-15T14:30:00Z"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), StatusCode::CREATED);
    assert_eq!(sent.headers()["x-request-id"], "client-id-42");

    let mut generated = BTreeSet::new();
    for _ in 0..2 {
        let response = client
            .get(format!("{base}/api/v1/nowhere"))
            .header("x-request-id", "x".repeat(500))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let id = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "an oversized id is replaced by a generated one: {id}"
        );
        generated.insert(id);
    }
    assert_eq!(generated.len(), 2, "each request its own id");

    sigterm(&api.0);
    assert!(wait_exit(&mut api.0, WAIT, "the API").success());
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::remove_file(&log).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    let of_request = |id: &str| -> Vec<&Value> {
        lines
            .iter()
            .filter(|l| l["span"]["request_id"] == id)
            .collect()
    };
    let ours = of_request("client-id-42");
    assert!(
        ours.iter()
            .any(|l| l["fields"]["message"] == "request answered"
                && l["fields"]["status"] == 201
                && l["span"]["route"] == "/api/v1/events"),
        "the request's log lines carry its id:\n{text}"
    );
    for id in &generated {
        assert!(!of_request(id).is_empty(), "{id} is logged:\n{text}");
    }
}
