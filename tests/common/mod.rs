//! Shared harness for the integration tests: a fresh Postgres database and a fresh Kafka topic per test,
//! on the real services that `deploy/local/up` starts, and the real `meterflow` binary.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use rand::Rng;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use reqwest::StatusCode;
use rust_decimal::Decimal;
use serde_json::Value;
use sqlx::{Connection, PgConnection, PgPool, Row};

pub const BROKERS: &str = "127.0.0.1:9092";
pub const ADMIN_URL: &str = "postgres://meterflow@127.0.0.1:5432/meterflow";

/// A meters file (`--meters`) holding `json`, under a name of its own in the temp directory.
pub fn meters_file(json: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("{}.json", unique("meters")));
    std::fs::write(&path, json).unwrap();
    path
}

/// Inserts an open-ended USD price book `id` for `meter` from `from` on: a default book, or
/// `customer`'s own. Straight into `price_books`, as an operator's `psql` would.
pub async fn insert_price_book<'c>(
    db: impl sqlx::PgExecutor<'c>,
    id: &str,
    meter: &str,
    customer: Option<&str>,
    from: &str,
    model: &Value,
) {
    sqlx::query(
        "INSERT INTO price_books (price_book_id, meter, customer_id, currency, effective, model)
         VALUES ($1, $2, $3, 'USD', tstzrange($4::timestamptz, NULL, '[)'), $5)",
    )
    .bind(id)
    .bind(meter)
    .bind(customer)
    .bind(from)
    .bind(model)
    .execute(db)
    .await
    .unwrap();
}

/// A unique suffix for names of this test's database and topic.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{:08x}",
        std::process::id(),
        rand::rng().random::<u32>()
    )
}

/// Creates a migrated database of its own; returns its URL.
pub async fn fresh_database() -> String {
    let url = empty_database().await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    meterflow_sinks::MIGRATOR.run(&pool).await.unwrap();
    pool.close().await;
    url
}

/// A database of its own with no schema at all (`meterflow migrate` never ran).
pub async fn empty_database() -> String {
    let name = unique("mf_test");
    let mut admin = PgConnection::connect(ADMIN_URL)
        .await
        .expect("Postgres must be running on 127.0.0.1:5432 (deploy/local/up)");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .unwrap();
    format!("postgres://meterflow@127.0.0.1:5432/{name}")
}

/// Creates a topic of its own with `partitions` partitions.
pub async fn fresh_topic(partitions: i32) -> String {
    let name = unique("test.events").replace('_', "-");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .create()
        .unwrap();
    let results = admin
        .create_topics(
            [&NewTopic::new(
                &name,
                partitions,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new(),
        )
        .await
        .expect("Kafka must be running on 127.0.0.1:9092 (deploy/local/up)");
    for r in results {
        r.expect("topic created");
    }
    name
}

/// Produces `(key, payload)` records and waits until the broker has them all.
pub fn produce(topic: &str, records: &[(String, Vec<u8>)]) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .set("enable.idempotence", "true")
        .set("linger.ms", "10")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap();
    for (key, payload) in records {
        let mut record = BaseRecord::to(topic).key(key).payload(payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(60)).unwrap();
}

/// One generated usage event, as the test knows it (the reference never decodes JSON).
#[derive(Clone, Debug)]
pub struct TestEvent {
    pub id: String,
    pub customer: String,
    pub event_type: String,
    /// Seconds since the epoch.
    pub time: i64,
    pub value: Decimal,
    /// Deliberately invalid: must end up in dead letters, not in aggregates.
    pub invalid: bool,
}

impl TestEvent {
    pub fn payload(&self) -> Vec<u8> {
        let time = chrono::DateTime::from_timestamp(self.time, 0)
            .unwrap()
            .to_rfc3339();
        let value = if self.invalid {
            "\"-1\"".to_owned()
        } else {
            self.value.to_string()
        };
        format!(
            r#"{{"event_id":"{}","customer_id":"{}","event_type":"{}","event_time":"{time}","value":{value}}}"#,
            self.id, self.customer, self.event_type
        )
        .into_bytes()
    }
}

/// Produces generated events keyed by customer, as applications do.
pub fn produce_events(topic: &str, events: &[TestEvent]) {
    let records: Vec<(String, Vec<u8>)> = events
        .iter()
        .map(|e| (e.customer.clone(), e.payload()))
        .collect();
    produce(topic, &records);
}

/// How many of the events are deliberately invalid (and so dead letters).
pub fn invalid_count(events: &[TestEvent]) -> i64 {
    events.iter().filter(|e| e.invalid).count() as i64
}

/// `n` random events over six hours of 2024-01-15: random customers, types, times and decimal values,
/// about one in fifty invalid.
pub fn random_events(n: usize, seed: u64) -> Vec<TestEvent> {
    use rand::SeedableRng;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    (0..n)
        .map(|i| TestEvent {
            id: format!("evt_{seed}_{i}"),
            customer: format!("cust_{}", rng.random_range(0..40)),
            event_type: ["api_call", "tokens", "storage_gb"][rng.random_range(0..3)].to_owned(),
            time: 1_705_312_800 + rng.random_range(0..6 * 3600),
            value: Decimal::new(rng.random_range(0..1_000_000), rng.random_range(0..5)),
            invalid: rng.random_range(0..50) == 0,
        })
        .collect()
}

pub type Aggregates = BTreeMap<(String, String, i64), (Decimal, i64)>;

/// The plain reference: hourly sum and count per customer and event type of the valid events.
pub fn reference(events: &[TestEvent]) -> Aggregates {
    let mut out = Aggregates::new();
    for e in events.iter().filter(|e| !e.invalid) {
        let entry = out
            .entry((
                e.customer.clone(),
                e.event_type.clone(),
                e.time - e.time.rem_euclid(3600),
            ))
            .or_default();
        entry.0 += e.value;
        entry.1 += 1;
    }
    normalized(out)
}

/// Every stored row; a row with dimension values has them after its meter's name, as jsonb spells
/// them: `llm_tokens {"model": "large"}`.
pub async fn stored_aggregates(url: &str) -> Aggregates {
    let mut conn = PgConnection::connect(url).await.unwrap();
    let rows = sqlx::query(
        "SELECT customer_id,
                meter || CASE WHEN dimensions = '{}' THEN '' ELSE ' ' || dimensions::text END,
                extract(epoch FROM window_start)::bigint, value, event_count
         FROM aggregations",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    rows.iter()
        .map(|r| {
            (
                (r.get(0), r.get(1), r.get(2)),
                (r.get::<Decimal, _>(3).normalize(), r.get(4)),
            )
        })
        .collect()
}

pub fn normalized(mut a: Aggregates) -> Aggregates {
    for v in a.values_mut() {
        v.0 = v.0.normalize();
    }
    a
}

pub async fn scalar_i64(url: &str, sql: &str) -> i64 {
    let mut conn = PgConnection::connect(url).await.unwrap();
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

/// The `meterflow` binary with the test's database and topic.
pub fn meterflow(url: &str, topic: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meterflow"));
    cmd.env("MF_DATABASE_URL", url)
        .env("MF_EVENTS_TOPIC", topic)
        .env("MF_KAFKA_BROKERS", BROKERS)
        .env("MF_LOG", "warn")
        .env("MF_PIPELINE_METRICS_ADDR", "")
        // Keys are tests/auth.rs's subject; the other suites call the API as the seed's scripts do.
        .env("MF_AUTH", "off");
    cmd
}

/// Runs the pipeline until it has committed everything in the topic.
pub fn drain(url: &str, topic: &str, workers: usize) -> Output {
    drain_with(url, topic, workers, &[])
}

/// [`drain`] with more pipeline flags.
pub fn drain_with(url: &str, topic: &str, workers: usize, extra: &[&str]) -> Output {
    let out = meterflow(url, topic)
        .args([
            "pipeline",
            "--until-caught-up",
            "--workers",
            &workers.to_string(),
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pipeline failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A child process that is killed (SIGKILL) and reaped when dropped, so no test leaves one behind.
pub struct Running(pub Child);

impl Running {
    /// `kill -9` and wait for it to be gone.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts a command with its output discarded (shown when `MF_TEST_VERBOSE` is set), killed when the
/// handle drops.
pub fn spawn_quiet(mut command: Command) -> Running {
    let verbose = std::env::var_os("MF_TEST_VERBOSE").is_some();
    let out = || {
        if verbose {
            Stdio::inherit()
        } else {
            Stdio::null()
        }
    };
    Running(command.stdout(out()).stderr(out()).spawn().unwrap())
}

pub fn spawn_pipeline(url: &str, topic: &str, workers: usize, extra: &[&str]) -> Running {
    let mut command = meterflow(url, topic);
    command
        .args(["pipeline", "--workers", &workers.to_string()])
        .args(extra);
    spawn_quiet(command)
}

/// Produces the events in waves with a pause between them, on a thread of its own, so that a pipeline
/// started meanwhile always has more input coming.
pub fn produce_in_waves(
    topic: &str,
    events: &[TestEvent],
    wave: usize,
) -> std::thread::JoinHandle<()> {
    let (topic, events) = (topic.to_owned(), events.to_vec());
    std::thread::spawn(move || {
        for chunk in events.chunks(wave) {
            produce_events(&topic, chunk);
            std::thread::sleep(Duration::from_millis(150));
        }
    })
}

/// How many records the stored offsets cover, over all partitions.
pub async fn committed(url: &str) -> i64 {
    scalar_i64(
        url,
        "SELECT coalesce(sum(next_offset), 0)::bigint FROM source_offsets",
    )
    .await
}

/// Waits until the stored offsets cover at least `records`; panics with `what` after `within`.
pub async fn wait_until_committed(url: &str, records: i64, within: Duration, what: &str) -> i64 {
    let deadline = std::time::Instant::now() + within;
    loop {
        let now = committed(url).await;
        if now >= records {
            return now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} made no progress ({now} of {records} committed)"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Asserts equal aggregates, printing only a summary and the first differences (not two huge maps).
pub fn assert_same(got: &Aggregates, expected: &Aggregates, context: &str) {
    if got == expected {
        return;
    }
    let missing: Vec<_> = expected
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(*v))
        .take(5)
        .collect();
    let extra: Vec<_> = got
        .iter()
        .filter(|(k, _)| !expected.contains_key(*k))
        .take(5)
        .collect();
    panic!(
        "{context}: {} stored rows vs {} expected; first expected rows that differ: {missing:?}; rows that should not exist: {extra:?}",
        got.len(),
        expected.len()
    );
}

/// The API served in-process on an ephemeral port, with its own database and topic.
pub struct TestApi {
    pub base: String,
    pub pool: PgPool,
    pub url: String,
    pub topic: String,
    pub client: reqwest::Client,
}

pub async fn spawn_api() -> TestApi {
    // Auth off: keys are tests/auth.rs's subject; the other suites call the API without one.
    spawn_api_with(meterflow_api::Settings {
        auth: false,
        ..Default::default()
    })
    .await
}

/// Runs the re-rating jobs of `api`'s database as a pipeline leader of its topic would, for tests that
/// run no pipeline: it takes the topic's lease, and a job's correction goes nowhere (there is no
/// dataflow whose rating would take it in). A pipeline started later fences it.
pub async fn spawn_job_runner(api: &TestApi) {
    let mut conn = api.pool.acquire().await.unwrap();
    let lease = meterflow_sinks::acquire_lease(&mut conn, &api.topic)
        .await
        .unwrap();
    let apply: meterflow_sinks::rerating_jobs::Apply = std::sync::Arc::new(|_| Box::pin(async {}));
    tokio::spawn(meterflow_sinks::rerating_jobs::runner(
        api.pool.clone(),
        lease,
        std::sync::Arc::new(tokio::sync::Notify::new()),
        apply,
        tokio_util::sync::CancellationToken::new(),
    ));
}

/// [`spawn_api`] with these settings.
pub async fn spawn_api_with(settings: meterflow_api::Settings) -> TestApi {
    let url = fresh_database().await;
    let topic = fresh_topic(2).await;
    let pool = meterflow_api::pool_options(10).connect(&url).await.unwrap();
    // The production settings, so a broker outage gives the same 503s as in production.
    let producer = meterflow_api::producer_config(BROKERS).create().unwrap();
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

impl TestApi {
    pub async fn post_event(&self, body: &Value) -> reqwest::Response {
        self.client
            .post(format!("{}/api/v1/events", self.base))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// POSTs raw bytes with a content type.
    pub async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.base))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn patch_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .patch(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let response = self.get(path).await;
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        response.json().await.unwrap()
    }

    /// Waits until the pipeline has committed everything in the topic (`GET /api/v1/progress`).
    pub async fn wait_caught_up(&self, within: Duration) -> Value {
        let deadline = std::time::Instant::now() + within;
        loop {
            let progress = self.get_json("/api/v1/progress").await;
            if progress["caught_up"] == true && !progress["committed_epoch"].is_null() {
                return progress;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the pipeline did not catch up: {progress}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sets a watermark floor and waits until the pipeline has committed it.
    pub async fn advance_watermark(&self, to: &str, within: Duration) {
        let response = self
            .post_json("/api/v1/watermark", &serde_json::json!({"advance_to": to}))
            .await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let target = chrono::DateTime::parse_from_rfc3339(to).unwrap();
        let deadline = std::time::Instant::now() + within;
        loop {
            let progress = self.get_json("/api/v1/progress").await;
            if let Some(w) = progress["committed_watermark"].as_str() {
                if chrono::DateTime::parse_from_rfc3339(w).unwrap() >= target {
                    return;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the watermark did not reach {to}: {progress}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
    }
}

/// Asserts a problem+json response with this status and code; returns its body.
pub async fn expect_problem(response: reqwest::Response, status: StatusCode, code: &str) -> Value {
    let (got, body) = problem(response).await;
    assert_eq!((got, body["code"].as_str()), (status, Some(code)), "{body}");
    body
}

pub async fn problem(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        content_type, "application/problem+json",
        "errors are problem+json"
    );
    (status, response.json().await.unwrap())
}

/// An address on 127.0.0.1 with a free port (bound, then released for a child process to bind).
pub fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// Waits until `GET {base}/healthz` answers 200; panics after `within`.
pub async fn wait_healthy(base: &str, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Ok(r) = reqwest::get(format!("{base}/healthz")).await {
            if r.status() == StatusCode::OK {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{base} did not become healthy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends SIGTERM to a child process, as an orchestrator stopping it does.
pub fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -TERM {}", child.id());
}

/// Waits for a child to exit; panics after `within`.
pub fn wait_exit(child: &mut Child, within: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not exit within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How many records the topic holds, over all partitions (the sum of their end offsets).
pub fn topic_records(topic: &str) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let partitions = metadata.topics()[0].partitions().len() as i32;
    (0..partitions)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap()
                .1
        })
        .sum()
}
