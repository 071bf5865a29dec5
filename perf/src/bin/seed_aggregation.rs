//! `seed_aggregation`: the seed's "aggregates 100K events in under 10 seconds" scenario
//! (`../shared/seed/performance-requirements.md` §5), end to end against a real `meterflow api` and
//! `meterflow pipeline`: 100k events over 1,000 customers and one hour are ingested — through single
//! `POST /api/v1/events` (64 concurrent clients, as the seed's `Promise.all` does), through
//! `POST /api/v1/events/batch`, or straight into Kafka — then the watermark is advanced and the clock
//! stops when every event is in the aggregates. Baseline in the same run: what a naive service does, one
//! single-row INSERT per event over 64 connections and one GROUP BY.
//!
//!     cargo build --release -p meterflow -p meterflow-perf
//!     target/release/seed_aggregation --events 100000 --runs 3

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use meterflow_perf::{drop_database, fresh_database, median, wait_ready, Proc, Services};
use rand::{Rng, SeedableRng};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(about = "The seed's 100K-event aggregation scenario, end to end, per ingestion path")]
struct Args {
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    #[arg(long, default_value_t = 1_000)]
    customers: usize,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Ingestion paths to measure: single, batch, kafka.
    #[arg(long, value_delimiter = ',', default_value = "kafka,batch,single")]
    paths: Vec<String>,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value_t = 2)]
    workers: usize,
    #[command(flatten)]
    services: Services,
    #[arg(long, default_value_t = 3917)]
    port: u16,
}

fn events(n: usize, customers: usize, run: usize) -> Vec<Value> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(run as u64);
    let start = chrono::DateTime::parse_from_rfc3339("2024-01-15T14:00:00Z").unwrap();
    (0..n)
        .map(|i| {
            let t = start + chrono::Duration::milliseconds(rng.random_range(0..3_600_000));
            json!({"event_id": format!("seed_{run}_{i}"), "customer_id": format!("cust_{}", rng.random_range(0..customers)),
                   "event_type": "api_call", "event_time": t.to_rfc3339(), "value": rng.random_range(1..100)})
        })
        .collect()
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let client = reqwest::Client::new();
    let mut summary = serde_json::Map::new();
    for path in &args.paths {
        let mut seconds = Vec::new();
        for run in 0..args.runs {
            let url = fresh_database(&args.services.database_url, "mf_perf_seed", run).await?;
            let topic = format!("perf.seed.{path}.{}.{run}", chrono::Utc::now().timestamp());
            let base = format!("http://127.0.0.1:{}", args.port);
            let spawn = |sub: &[&str]| -> Result<Proc> {
                Ok(Proc(
                    Command::new(&args.services.meterflow)
                        .args(sub)
                        .env("MF_DATABASE_URL", &url)
                        .env("MF_EVENTS_TOPIC", &topic)
                        .env("MF_KAFKA_BROKERS", &args.services.brokers)
                        .env("MF_API_ADDR", format!("127.0.0.1:{}", args.port))
                        .env("MF_PIPELINE_METRICS_ADDR", "")
                        .env("MF_LOG", "warn")
                        // The seed's scripts send no key (SPEC §8).
                        .env("MF_AUTH", "off")
                        .stdout(Stdio::null())
                        .spawn()
                        .with_context(|| {
                            format!(
                                "starting {} (cargo build --release first)",
                                args.services.meterflow
                            )
                        })?,
                ))
            };
            let _api = spawn(&["api"])?;
            wait_ready(&base).await?;
            let workers = args.workers.to_string();
            let _pipeline = spawn(&["pipeline", "--workers", &workers])?;
            let batch = events(args.events, args.customers, run);
            let started = Instant::now();
            match path.as_str() {
                "single" => post_single(&client, &base, batch, args.concurrency).await?,
                "batch" => post_batches(&client, &base, batch).await?,
                "kafka" => produce(&args.services.brokers, &topic, batch).await?,
                other => bail!("unknown path {other}: single, batch or kafka"),
            }
            let ingested = started.elapsed();
            // The seed's advanceWatermark() + waitForAggregationComplete().
            let response = client
                .post(format!("{base}/api/v1/watermark"))
                .json(&json!({"advance_to": "2024-01-15T16:00:01Z"}))
                .send()
                .await?;
            anyhow::ensure!(
                response.status().is_success(),
                "advancing the watermark: {}",
                response.status()
            );
            wait_complete(&client, &base, &url, args.events as i64).await?;
            let took = started.elapsed();
            println!(
                "{}",
                json!({"path": path, "run": run, "events": args.events, "ingest_seconds": ingested.as_secs_f64(),
                       "total_seconds": took.as_secs_f64()})
            );
            seconds.push(took.as_secs_f64());
            if run == 0 && path == "kafka" {
                footprint(&url).await?;
            }
            drop(_pipeline);
            drop(_api);
            drop_database(&args.services.database_url, &url).await?;
        }
        summary.insert(path.clone(), json!(median(seconds)));
    }
    let mut naive = Vec::new();
    for run in 0..args.runs {
        naive.push(naive_baseline(&args, run).await?);
    }
    summary.insert("naive_insert_baseline".into(), json!(median(naive)));
    println!(
        "{}",
        json!({"median_seconds": summary, "events": args.events})
    );
    Ok(())
}

/// Postgres bytes per stored item: what dedup (event_ids), the raw store and the aggregates cost. The
/// pipeline itself keeps no per-id or per-window state in memory.
async fn footprint(url: &str) -> Result<()> {
    let pool = sqlx::PgPool::connect(url).await?;
    sqlx::query("VACUUM ANALYZE").execute(&pool).await?;
    let size = |table: &'static str| {
        let pool = pool.clone();
        async move {
            let (bytes, rows): (i64, i64) = sqlx::query_as(&format!(
                "SELECT coalesce((SELECT sum(pg_total_relation_size(relid))::bigint FROM pg_partition_tree('{table}')),
                                 pg_total_relation_size('{table}')),
                        (SELECT count(*) FROM {table})"
            ))
            .fetch_one(&pool)
            .await?;
            anyhow::Ok(json!({"table": table, "rows": rows, "bytes": bytes,
                              "bytes_per_row": bytes as f64 / rows.max(1) as f64}))
        }
    };
    let tables = json!([
        size("event_ids").await?,
        size("telemetry_events").await?,
        size("aggregations").await?
    ]);
    println!("{}", json!({"footprint": tables}));
    Ok(())
}

async fn post_single(
    client: &reqwest::Client,
    base: &str,
    events: Vec<Value>,
    concurrency: usize,
) -> Result<()> {
    let queue = Arc::new(std::sync::Mutex::new(events));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, base, queue) = (client.clone(), base.to_owned(), queue.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(event) = queue.lock().unwrap().pop() else {
                    return Ok::<(), anyhow::Error>(());
                };
                let r = client
                    .post(format!("{base}/api/v1/events"))
                    .json(&event)
                    .send()
                    .await?;
                anyhow::ensure!(
                    r.status().as_u16() == 201,
                    "POST /events answered {}",
                    r.status()
                );
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn post_batches(client: &reqwest::Client, base: &str, events: Vec<Value>) -> Result<()> {
    let mut tasks = Vec::new();
    for chunk in events.chunks(1_000) {
        let (client, base, body) = (
            client.clone(),
            base.to_owned(),
            Value::Array(chunk.to_vec()),
        );
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(format!("{base}/api/v1/events/batch"))
                .json(&body)
                .send()
                .await?;
            let result: Value = r.json().await?;
            anyhow::ensure!(
                result["rejected"] == 0,
                "a batch had rejected items: {result}"
            );
            Ok::<(), anyhow::Error>(())
        }));
        if tasks.len() >= 4 {
            tasks.remove(0).await??;
        }
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn produce(brokers: &str, topic: &str, events: Vec<Value>) -> Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?;
    let mut pending = Vec::with_capacity(events.len());
    for e in &events {
        let payload = serde_json::to_vec(e)?;
        let key = e["customer_id"].as_str().unwrap_or_default().to_owned();
        let producer = producer.clone();
        let topic = topic.to_owned();
        pending.push(async move {
            producer
                .send(
                    FutureRecord::to(&topic).key(&key).payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
        });
    }
    for r in futures::future::join_all(pending).await {
        r?;
    }
    Ok(())
}

/// Waits until the pipeline has caught up and committed the advanced watermark, and every event is in
/// the aggregates.
async fn wait_complete(client: &reqwest::Client, base: &str, url: &str, events: i64) -> Result<()> {
    let pool = sqlx::PgPool::connect(url).await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let progress: Value = client
            .get(format!("{base}/api/v1/progress"))
            .send()
            .await?
            .json()
            .await?;
        if progress["caught_up"] == true
            && progress["committed_watermark"].as_str() >= Some("2024-01-15T16:00:01Z")
        {
            let counted: i64 = sqlx::query_scalar(
                "SELECT coalesce(sum(event_count), 0)::bigint FROM aggregations",
            )
            .fetch_one(&pool)
            .await?;
            if counted == events {
                return Ok(());
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not complete after 300 s: {progress}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The naive service: one single-row INSERT per event over 64 connections, then one GROUP BY.
async fn naive_baseline(args: &Args, run: usize) -> Result<f64> {
    let url = fresh_database(&args.services.database_url, "mf_perf_naive", run).await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(64)
        .connect(&url)
        .await?;
    let batch = events(args.events, args.customers, run + 1000);
    let started = Instant::now();
    let queue = Arc::new(std::sync::Mutex::new(batch));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (pool, queue) = (pool.clone(), queue.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(e) = queue.lock().unwrap().pop() else { return Ok::<(), sqlx::Error>(()) };
                sqlx::query(
                    "INSERT INTO telemetry_events (event_id, customer_id, event_type, event_time, value)
                     VALUES ($1, $2, $3, $4::timestamptz, $5)",
                )
                .bind(e["event_id"].as_str())
                .bind(e["customer_id"].as_str())
                .bind(e["event_type"].as_str())
                .bind(e["event_time"].as_str())
                .bind(rust_decimal::Decimal::from(e["value"].as_i64().unwrap_or(1)))
                .execute(&pool)
                .await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let _: Vec<(String, i64)> = sqlx::query_as(
        "SELECT customer_id, count(*) FROM telemetry_events GROUP BY customer_id, date_trunc('hour', event_time)",
    )
    .fetch_all(&pool)
    .await?;
    let took = started.elapsed().as_secs_f64();
    pool.close().await;
    drop_database(&args.services.database_url, &url).await?;
    println!(
        "{}",
        json!({"path": "naive_insert_baseline", "run": run, "total_seconds": took})
    );
    Ok(took)
}
