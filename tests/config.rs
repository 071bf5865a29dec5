//! The configuration of the `meterflow` binary (SPEC §10): the committed reference file is what
//! `config --print-defaults` prints, a file's unknown key is refused naming it and the file, flags beat
//! the environment which beats the file, the password never prints, and the `[api]` keys take effect.

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// The binary with no `MF_*` variable of the caller's environment.
fn bare() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_meterflow"));
    for (name, _) in std::env::vars() {
        if name.starts_with("MF_") {
            command.env_remove(name);
        }
    }
    command
}

fn run(command: &mut Command) -> Output {
    command.stdin(Stdio::null()).output().unwrap()
}

fn temp_toml(text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("{}.toml", unique("meterflow_config")));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn print_defaults_prints_the_committed_reference() {
    let out = run(bare().args(["config", "--print-defaults"]));
    assert!(out.status.success());
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/meterflow.example.toml"
    ))
    .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        committed,
        "regenerate: meterflow config --print-defaults > deploy/meterflow.example.toml"
    );
    // It is a valid configuration file as it stands.
    let out = run(bare().args([
        "--config",
        concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/meterflow.example.toml"),
        "config",
        "--print",
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_unknown_key_is_refused_naming_the_key_and_the_file() {
    let file = temp_toml("[pipeline]\nworkers = 2\nepoch_millis = 10\n");
    for out in [
        run(bare()
            .arg("--config")
            .arg(&file)
            .args(["config", "--print"])),
        run(bare().env("MF_CONFIG", &file).arg("migrate")),
    ] {
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("epoch_millis"), "{stderr}");
        assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    }
    std::fs::remove_file(file).unwrap();
}

#[test]
fn flags_beat_the_environment_which_beats_the_file() {
    let file = temp_toml(
        "[kafka]\nevents_topic = \"from.file\"\nbrokers = \"file:9092\"\n\n[api]\naddr = \"127.0.0.1:4000\"\n\n[pipeline]\nworkers = 2\n",
    );
    let out = run(bare()
        .env("MF_CONFIG", &file)
        .env("MF_EVENTS_TOPIC", "from.env")
        .env("MF_API_ADDR", "127.0.0.1:5000")
        .env("MF_PIPELINE_WORKERS", "3")
        .args(["--topic", "from.flag", "config", "--print"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    let effective: toml::Table = printed.parse().unwrap();
    assert_eq!(
        effective["kafka"]["events_topic"].as_str(),
        Some("from.flag")
    );
    assert_eq!(effective["kafka"]["brokers"].as_str(), Some("file:9092"));
    assert_eq!(effective["api"]["addr"].as_str(), Some("127.0.0.1:5000"));
    assert_eq!(effective["pipeline"]["workers"].as_integer(), Some(3));
    assert_eq!(effective["pipeline"]["epoch_ms"].as_integer(), Some(250));
    assert!(printed.contains("# set by flag --topic"), "{printed}");
    assert!(printed.contains("# set by environment MF_API_ADDR"));
    std::fs::remove_file(file).unwrap();
}

#[test]
fn the_database_password_comes_from_the_environment_only_and_never_prints() {
    let out = run(bare()
        .env(
            "MF_DATABASE_URL",
            "postgres://meterflow:hunter2@db.example:5432/meterflow",
        )
        .args(["config", "--print"]));
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(!printed.contains("hunter2"), "{printed}");
    assert!(printed.contains("postgres://meterflow:****@db.example:5432/meterflow"));

    let file =
        temp_toml("[database]\nurl = \"postgres://meterflow:hunter2@db.example/meterflow\"\n");
    let out = run(bare()
        .arg("--config")
        .arg(&file)
        .args(["config", "--print"]));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("MF_DATABASE_URL") && !stderr.contains("hunter2"),
        "{stderr}"
    );
    std::fs::remove_file(file).unwrap();

    let out = run(bare().args([
        "--database-url",
        "postgres://meterflow:hunter2@db.example/meterflow",
        "migrate",
    ]));
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("hunter2"));
}

/// The API's statement timeout is set on every pooled connection.
#[tokio::test(flavor = "multi_thread")]
async fn the_statement_timeout_is_set_on_the_api_connections() {
    let url = fresh_database().await;
    let options = meterflow_api::connect_options(&url, Duration::from_millis(1234)).unwrap();
    let pool = meterflow_api::pool_options(2)
        .connect_with(options)
        .await
        .unwrap();
    let timeout: String = sqlx::query_scalar("SHOW statement_timeout")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(timeout, "1234ms");
    let cancelled = sqlx::query("SELECT pg_sleep(2)")
        .execute(&pool)
        .await
        .unwrap_err();
    assert!(
        matches!(
            meterflow_api::ApiError::from(cancelled),
            meterflow_api::ApiError::Unavailable(_)
        ),
        "a statement over the timeout is a 503, not a 500"
    );
}

/// `meterflow api` applies `api.request_timeout_secs` (a request whose body stalls is answered 503
/// TIMEOUT as problem+json with Retry-After) and `api.max_event_bytes` (413), set through the
/// environment.
#[tokio::test(flavor = "multi_thread")]
async fn the_api_applies_its_request_timeout_and_body_limit() {
    let url = fresh_database().await;
    let topic = fresh_topic(1).await;
    let addr = free_addr();
    let mut command = meterflow(&url, &topic);
    command
        .env("MF_API_ADDR", &addr)
        .env("MF_API_REQUEST_TIMEOUT_SECS", "1")
        .env("MF_API_MAX_EVENT_BYTES", "2048")
        .arg("api");
    let _api = spawn_quiet(command);
    let base = format!("http://{addr}");
    wait_healthy(&base, Duration::from_secs(60)).await;

    let big = json!({"event_id": "big", "customer_id": "c", "event_type": "api_call",
                     "event_time": "2024-01-15T14:30:00Z", "properties": {"pad": "x".repeat(3000)}});
    let response = reqwest::Client::new()
        .post(format!("{base}/api/v1/events"))
        .json(&big)
        .send()
        .await
        .unwrap();
    expect_problem(response, StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE").await;

    let stalled = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        stream
            .write_all(
                format!(
                    "POST /api/v1/events HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
                     Content-Length: 100\r\nConnection: close\r\n\r\n{{\"event_id\":"
                )
                .as_bytes(),
            )
            .unwrap();
        let sent = Instant::now();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        (sent.elapsed(), response)
    })
    .await
    .unwrap();
    let (took, response) = stalled;
    assert!(
        response.starts_with("HTTP/1.1 503"),
        "a stalled request is answered 503: {response}"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "after about the 1 s timeout: {took:?}"
    );
    let lower = response.to_ascii_lowercase();
    assert!(
        lower.contains("content-type: application/problem+json"),
        "{response}"
    );
    assert!(lower.contains("retry-after: "), "{response}");
    assert!(lower.contains("x-request-id: "), "{response}");
    let body: Value = serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["code"], "TIMEOUT");
}

/// The API's connections plan every statement for its parameters: a cached generic plan of the list
/// queries' `($1 IS NULL OR customer_id = $1)` walked the whole primary key (1.2 s at 1M aggregations in
/// `db_scenario`) where the custom plan uses the customer index.
#[tokio::test(flavor = "multi_thread")]
async fn the_api_connections_plan_each_statement_for_its_parameters() {
    let url = fresh_database().await;
    for timeout in [Duration::ZERO, Duration::from_millis(1234)] {
        let options = meterflow_api::connect_options(&url, timeout).unwrap();
        let pool = meterflow_api::pool_options(1)
            .connect_with(options)
            .await
            .unwrap();
        let mode: String = sqlx::query_scalar("SHOW plan_cache_mode")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(mode, "force_custom_plan", "statement timeout {timeout:?}");
    }
}
