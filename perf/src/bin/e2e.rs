//! `e2e`: a pre-filled Kafka topic drained into Postgres by `meterflow pipeline`, against the baseline of
//! `../shared/PERF.md` measured in the same run on the same topic: a bare rdkafka consumer COPYing the raw
//! events into `telemetry_events`. Prints one JSON line per run and a summary line per topic shape with
//! the medians and their ratio.
//!
//!     cargo build --release && target/release/e2e --events 1000000 --runs 3
//!
//! Two topic shapes (`--shapes`): `live`, event times within the two minutes before they were
//! produced, the normal case; and `backfill`, spread over 48 hours, so that nearly every event falls
//! in a window the watermark has already closed (a late event). Each run also records where the CPU
//! went (per pipeline thread and per kind of Postgres process, [`meterflow_perf::cpu`]) and the run
//! database's statements with their WAL (`pg_stat_statements`).
//!
//! `--floor` adds a third side: the writes SPEC requires of the pipeline, done by a bare consumer with
//! nothing else, as cheaply as Postgres takes them. It decodes each event as the pipeline does, COPYs
//! its raw row and its claim (SPEC §3), a `late_events` row for an event whose window had closed
//! (SPEC §4: `window_end` + 1 h of lateness at or before the watermark, the least over partitions of
//! their greatest event time), and at the end one aggregate row per window, written once (no
//! revisions, no offsets, no epochs). No real pipeline can write less; where the pipeline falls short
//! of a ratio to the baseline, its ratio to this floor says how much of the gap is the work itself.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use meterflow_perf::cpu::CpuWatch;
use meterflow_perf::{
    drop_database, fresh_database, median, print_statements, rate, top_statements, Services,
};
use meterflow_store::copy_text;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;
use sqlx::{Connection, PgConnection};

#[derive(Debug, Parser)]
#[command(about = "End-to-end drain of a pre-filled topic: meterflow vs a bare COPY consumer")]
struct Args {
    /// Events in the topic.
    #[arg(long, default_value_t = 5_000_000)]
    events: u64,
    /// Runs of each side (the medians are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Pipeline workers (per process).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Pipeline processes: more than one runs a local timely cluster (`deploy/local/cluster`).
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// Measure meterflow only (for comparing shapes on one topic).
    #[arg(long)]
    no_baseline: bool,
    /// Topic shapes to measure, in order: `live` (event times within two minutes of production) and
    /// `backfill` (spread over 48 hours: nearly every event is late).
    #[arg(long, value_delimiter = ',', default_value = "live,backfill")]
    shapes: Vec<Shape>,
    /// Reuse this topic instead of creating and filling a new one (it must hold --events events;
    /// give one shape only).
    #[arg(long)]
    topic: Option<String>,
    /// Also measure the floor: the writes SPEC requires, alone, by a bare consumer (module doc).
    #[arg(long)]
    floor: bool,
    /// Meter every event type grouped by two properties (issue 17), e.g. `50x5`: the topic's events
    /// carry `model` (one of A) and `region` (one of B), and each run's database gets a meter per type
    /// (an hourly sum, as the default meter) with `group_by: ["model", "region"]`. Absent: default
    /// meters. Compare with a run without it, on a topic filled alike (the events differ only by the
    /// `model` property).
    #[arg(long, value_parser = meterflow_perf::parse_dimensions)]
    dimensions: Option<(u32, u32)>,
    #[command(flatten)]
    services: Services,
}

/// How a topic's event times are spread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Shape {
    Live,
    Backfill,
}

impl Shape {
    fn spread_hours(self) -> u64 {
        match self {
            Shape::Live => 0,
            Shape::Backfill => 48,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Shape::Live => "live",
            Shape::Backfill => "backfill",
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.topic.is_some() && args.shapes.len() != 1 {
        bail!("--topic reuses one topic: give one --shapes value with it");
    }
    for &shape in &args.shapes {
        let topic = match &args.topic {
            Some(t) => t.clone(),
            None => prefill(&args, shape)?,
        };
        measure(&args, shape, &topic).await?;
    }
    Ok(())
}

/// `--runs` alternating runs of meterflow and the baseline on one topic, then the summary line.
async fn measure(args: &Args, shape: Shape, topic: &str) -> Result<()> {
    let mut ours = Vec::new();
    let mut baseline = Vec::new();
    let mut floor = Vec::new();
    for run in 0..args.runs {
        let url = fresh_database(&args.services.database_url, "mf_perf_e2e", run).await?;
        if args.dimensions.is_some() {
            create_dimensioned_meters(&url).await?;
        }
        let (took, cpu) = drain_with_meterflow(args, topic, &url)?;
        let rows: i64 = scalar(
            &url,
            "SELECT coalesce(sum(event_count), 0)::bigint FROM aggregations",
        )
        .await?;
        let late: i64 = scalar(&url, "SELECT count(*) FROM late_events").await?;
        let statements = top_statements(&url).await;
        let r = rate(args.events, took);
        eprintln!("e2e {} meterflow run {run}: {r:.0} events/s", shape.name());
        print_statements(&statements, 6);
        println!(
            "{}",
            serde_json::json!({"bench": "e2e", "shape": shape.name(), "side": "meterflow", "workers": args.workers, "processes": args.processes, "run": run, "events": args.events, "aggregated_events": rows, "late_events": late, "seconds": took.as_secs_f64(), "events_per_s": r, "cpu_seconds": cpu, "postgres_statements": statements})
        );
        ours.push(r);
        drop_database(&args.services.database_url, &url).await?;
        if args.no_baseline {
            continue;
        }

        let url = fresh_database(&args.services.database_url, "mf_perf_base", run).await?;
        let watch = CpuWatch::start(Some(std::process::id()));
        let took = copy_baseline(&args.services.brokers, topic, &url).await?;
        let cpu = watch.finish();
        let rows: i64 = scalar(&url, "SELECT count(*) FROM telemetry_events").await?;
        let statements = top_statements(&url).await;
        let r = rate(args.events, took);
        eprintln!("e2e {} baseline run {run}: {r:.0} events/s", shape.name());
        print_statements(&statements, 3);
        println!(
            "{}",
            serde_json::json!({"bench": "e2e", "shape": shape.name(), "side": "baseline_copy", "run": run, "events": args.events, "stored_rows": rows, "seconds": took.as_secs_f64(), "events_per_s": r, "cpu_seconds": cpu, "postgres_statements": statements})
        );
        baseline.push(r);
        drop_database(&args.services.database_url, &url).await?;
        if args.floor {
            floor.push(measure_floor(args, shape, topic, run).await?);
        }
    }
    let (m, b) = (median(ours), median(baseline));
    let mut summary = serde_json::json!({"bench": "e2e", "summary": true, "shape": shape.name(), "topic": topic, "events": args.events, "runs": args.runs, "workers": args.workers, "processes": args.processes,
            "meterflow_events_per_s_median": m.round(), "baseline_events_per_s_median": b.round(), "ratio": (m / b * 100.0).round() / 100.0});
    if args.floor {
        let f = median(floor);
        summary["floor_events_per_s_median"] = f.round().into();
        summary["floor_to_baseline"] = ((f / b * 100.0).round() / 100.0).into();
        summary["meterflow_to_floor"] = ((m / f * 100.0).round() / 100.0).into();
    }
    println!("{summary}");
    Ok(())
}

/// One run of the floor (module doc) on a fresh database; returns its rate.
async fn measure_floor(args: &Args, shape: Shape, topic: &str, run: usize) -> Result<f64> {
    let url = fresh_database(&args.services.database_url, "mf_perf_floor", run).await?;
    let watch = CpuWatch::start(Some(std::process::id()));
    let took = floor_writes(&args.services.brokers, topic, &url).await?;
    let cpu = watch.finish();
    let late: i64 = scalar(&url, "SELECT count(*) FROM late_events").await?;
    let windows: i64 = scalar(&url, "SELECT count(*) FROM aggregations").await?;
    let statements = top_statements(&url).await;
    let r = rate(args.events, took);
    eprintln!("e2e {} floor run {run}: {r:.0} events/s", shape.name());
    print_statements(&statements, 5);
    println!(
        "{}",
        serde_json::json!({"bench": "e2e", "shape": shape.name(), "side": "floor", "run": run, "events": args.events, "late_events": late, "windows": windows, "seconds": took.as_secs_f64(), "events_per_s": r, "cpu_seconds": cpu, "postgres_statements": statements})
    );
    drop_database(&args.services.database_url, &url).await?;
    Ok(r)
}

/// The event types `meterflow loadgen` produces, each metered as its default meter would be, grouped
/// by model and region.
async fn create_dimensioned_meters(url: &str) -> Result<()> {
    let mut conn = PgConnection::connect(url).await?;
    sqlx::query(
        "INSERT INTO meters (meter, event_type, aggregation, value_property, group_by)
         SELECT t, t, 'sum', 'value', '{model,region}'
         FROM UNNEST(ARRAY['api_call', 'tokens', 'storage_gb', 'compute_seconds', 'seats']) AS t",
    )
    .execute(&mut conn)
    .await?;
    Ok(())
}

fn prefill(args: &Args, shape: Shape) -> Result<String> {
    let topic = format!(
        "perf.e2e.{}.{}",
        shape.name(),
        chrono::Utc::now().timestamp()
    );
    eprintln!("e2e: filling {topic} with {} events ...", args.events);
    let status = Command::new(&args.services.meterflow)
        .args([
            "loadgen",
            "--rate",
            "0",
            "--events",
            &args.events.to_string(),
            "--spread-hours",
            &shape.spread_hours().to_string(),
        ])
        .args(match args.dimensions {
            Some((models, regions)) => vec![
                "--models".to_owned(),
                models.to_string(),
                "--regions".to_owned(),
                regions.to_string(),
            ],
            None => Vec::new(),
        })
        .env("MF_EVENTS_TOPIC", &topic)
        .env("MF_KAFKA_BROKERS", &args.services.brokers)
        .status()
        .with_context(|| {
            format!(
                "running {} (build it with cargo build --release)",
                args.services.meterflow
            )
        })?;
    if !status.success() {
        bail!("loadgen failed");
    }
    Ok(topic)
}

/// Wall time of `meterflow pipeline --until-caught-up` as a whole process, start-up included, and
/// where the CPU went meanwhile.
fn drain_with_meterflow(
    args: &Args,
    topic: &str,
    url: &str,
) -> Result<(Duration, serde_json::Value)> {
    let started = Instant::now();
    let mut command = if args.processes > 1 {
        let mut c = Command::new("deploy/local/cluster");
        c.args([
            &args.processes.to_string(),
            &args.workers.to_string(),
            "--until-caught-up",
        ])
        .env("MF_BIN", &args.services.meterflow);
        c
    } else {
        let mut c = Command::new(&args.services.meterflow);
        c.args([
            "pipeline",
            "--until-caught-up",
            "--workers",
            &args.workers.to_string(),
        ]);
        c
    };
    let child = command
        .env("MF_EVENTS_TOPIC", topic)
        .env("MF_DATABASE_URL", url)
        .env("MF_KAFKA_BROKERS", &args.services.brokers)
        .env("MF_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let watch = CpuWatch::start(Some(child.id()));
    let out = child.wait_with_output()?;
    let took = started.elapsed();
    let cpu = watch.finish();
    if !out.status.success() {
        bail!("pipeline failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((took, cpu))
}

#[derive(Deserialize)]
struct RawEvent<'a> {
    event_id: &'a str,
    customer_id: &'a str,
    event_type: &'a str,
    event_time: &'a str,
    value: serde_json::Value,
    #[serde(default, borrow)]
    properties: Option<&'a serde_json::value::RawValue>,
}

/// The baseline: one consumer reads every partition from the start to its end and COPYs each event's
/// columns into `telemetry_events` in batches of 100k rows.
async fn copy_baseline(brokers: &str, topic: &str, url: &str) -> Result<Duration> {
    let started = Instant::now();
    let (consumer, mut ends) = from_the_start(brokers, topic)?;
    let mut conn = PgConnection::connect(url).await?;
    let mut buffer = String::with_capacity(16 << 20);
    let mut rows = 0;
    while !ends.is_empty() {
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message?;
            if ends
                .get(&message.partition())
                .is_some_and(|end| message.offset() + 1 >= *end)
            {
                ends.remove(&message.partition());
            }
            let e: RawEvent = serde_json::from_slice(message.payload().unwrap_or_default())?;
            let value = match &e.value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let properties = e.properties.map_or("{}", |p| p.get());
            for (i, field) in [
                e.event_id,
                e.customer_id,
                e.event_type,
                e.event_time,
                &value,
                properties,
            ]
            .iter()
            .enumerate()
            {
                if i > 0 {
                    buffer.push('\t');
                }
                copy_text::escape(field, &mut buffer);
            }
            buffer.push('\n');
            rows += 1;
        }
        if rows == 100_000 || (ends.is_empty() && rows > 0) {
            copy(&mut conn, buffer.as_bytes()).await?;
            buffer.clear();
            rows = 0;
        }
    }
    Ok(started.elapsed())
}

/// A consumer assigned every partition of `topic` from its start, and each non-empty partition's end.
fn from_the_start(brokers: &str, topic: &str) -> Result<(BaseConsumer, HashMap<i32, i64>)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "meterflow-perf-baseline")
        .set("enable.auto.commit", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> = metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| p.id())
        .collect();
    let mut assignment = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for &p in &partitions {
        assignment.add_partition_offset(topic, p, Offset::Beginning)?;
        let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        if high > 0 {
            ends.insert(p, high);
        }
    }
    consumer.assign(&assignment)?;
    Ok((consumer, ends))
}

/// An hour window's key in the floor: customer, event type, start (seconds).
type Window = (String, String, i64);

/// The floor's writes (module doc): per 100k events one transaction of three COPYs (claims, raw rows,
/// late rows), then every window's aggregate once. The consumer decodes and spells the next batch while
/// two connections write the previous ones, as the pipeline's two readers do.
async fn floor_writes(brokers: &str, topic: &str, url: &str) -> Result<Duration> {
    const WRITERS: usize = 2;
    let started = Instant::now();
    let (sender, receiver) = tokio::sync::mpsc::channel::<[Vec<u8>; 3]>(WRITERS);
    let receiver = std::sync::Arc::new(tokio::sync::Mutex::new(receiver));
    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        let mut conn = PgConnection::connect(url).await?;
        let receiver = receiver.clone();
        writers.push(tokio::spawn(async move {
            loop {
                let next = receiver.lock().await.recv().await;
                let Some(texts) = next else {
                    return Ok::<_, anyhow::Error>(());
                };
                floor_commit(&mut conn, &texts).await?;
            }
        }));
    }
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    let windows =
        tokio::task::spawn_blocking(move || floor_read(&brokers, &topic, &sender)).await??;
    for writer in writers {
        writer.await??;
    }
    let mut rows = String::with_capacity(windows.len() * 80);
    for ((customer, meter, start), (value, count)) in &windows {
        copy_text::escape(customer, &mut rows);
        rows.push('\t');
        copy_text::escape(meter, &mut rows);
        for micros in [*start, start + FLOOR_HOUR] {
            rows.push('\t');
            rows.push_str(&copy_text::time(micros).unwrap_or_default());
        }
        rows.push_str(&format!("\t{value}\t{count}\n"));
    }
    let mut conn = PgConnection::connect(url).await?;
    let mut copy = conn
        .copy_in_raw("COPY aggregations (customer_id, meter, window_start, window_end, value, event_count) FROM STDIN")
        .await?;
    copy.send(rows.as_bytes()).await?;
    copy.finish().await?;
    Ok(started.elapsed())
}

const FLOOR_HOUR: i64 = 3_600_000_000;

/// The floor's reader: decodes every event, totals its window, and sends the COPY texts of each 100k
/// events to the writers; returns the windows' totals.
fn floor_read(
    brokers: &str,
    topic: &str,
    writers: &tokio::sync::mpsc::Sender<[Vec<u8>; 3]>,
) -> Result<HashMap<Window, (rust_decimal::Decimal, i64)>> {
    let (consumer, mut ends) = from_the_start(brokers, topic)?;
    let partitions = ends.len();
    let limits = meterflow_model::event::Limits::default();
    let now = chrono::Utc::now().timestamp_micros();
    let mut batch: Vec<(meterflow_model::Event, i32, i64)> = Vec::with_capacity(100_000);
    let mut late = String::new();
    let mut latest: HashMap<i32, i64> = HashMap::new();
    let mut windows: HashMap<Window, (rust_decimal::Decimal, i64)> = HashMap::new();
    while !ends.is_empty() {
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message?;
            let partition = message.partition();
            if ends
                .get(&partition)
                .is_some_and(|end| message.offset() + 1 >= *end)
            {
                ends.remove(&partition);
            }
            let payload = message.payload().unwrap_or_default();
            let Ok(event) = meterflow_model::event::decode_event(payload, now, &limits) else {
                continue;
            };
            let start = event.event_time_micros.div_euclid(FLOOR_HOUR) * FLOOR_HOUR;
            let watermark = (latest.len() == partitions)
                .then(|| latest.values().min().copied())
                .flatten();
            if let Some(w) = watermark.filter(|w| start + 2 * FLOOR_HOUR <= *w) {
                copy_text::escape(&event.event_id, &mut late);
                late.push('\t');
                copy_text::escape(&event.event_type, &mut late);
                late.push('\t');
                copy_text::escape(&event.customer_id, &mut late);
                for micros in [start, event.event_time_micros, w] {
                    late.push('\t');
                    late.push_str(&copy_text::time(micros).unwrap_or_default());
                }
                late.push('\n');
            }
            let max = latest.entry(partition).or_insert(event.event_time_micros);
            *max = (*max).max(event.event_time_micros);
            let total = windows
                .entry((event.customer_id.clone(), event.event_type.clone(), start))
                .or_default();
            total.0 += event.value;
            total.1 += 1;
            batch.push((event, partition, message.offset()));
        }
        if batch.len() == 100_000 || (ends.is_empty() && !batch.is_empty()) {
            let texts = floor_texts(&batch, std::mem::take(&mut late));
            writers
                .blocking_send(texts)
                .map_err(|_| anyhow::anyhow!("the floor's writers stopped"))?;
            batch.clear();
        }
    }
    Ok(windows)
}

/// A batch's claims, raw rows and late rows as COPY texts.
fn floor_texts(batch: &[(meterflow_model::Event, i32, i64)], late: String) -> [Vec<u8>; 3] {
    let times: Vec<String> = batch
        .iter()
        .map(|(e, _, _)| copy_text::time(e.event_time_micros).unwrap_or_default())
        .collect();
    let mut claims = String::with_capacity(batch.len() * 64);
    for ((event, partition, offset), time) in batch.iter().zip(&times) {
        copy_text::escape(&event.event_id, &mut claims);
        claims.push_str(&format!(
            "\t{time}\t{}\tkafka\t{partition}\t{offset}\n",
            event.fingerprint()
        ));
    }
    let rows = copy_text::telemetry_rows(
        batch
            .iter()
            .zip(&times)
            .map(|((e, _, _), t)| (e, t.as_str())),
    );
    [claims.into_bytes(), rows, late.into_bytes()]
}

/// One transaction of the floor: a batch's claims, raw rows and late rows.
async fn floor_commit(conn: &mut PgConnection, texts: &[Vec<u8>; 3]) -> Result<()> {
    let mut tx = conn.begin().await?;
    for (statement, text) in [
        "COPY event_ids (event_id, event_time, fingerprint, source, counted_partition, counted_offset) FROM STDIN",
        "COPY telemetry_events (event_id, customer_id, event_type, event_time, value, properties) FROM STDIN",
        "COPY late_events (event_id, meter, customer_id, window_start, event_time, watermark) FROM STDIN",
    ]
    .into_iter()
    .zip(texts)
    {
        if text.is_empty() {
            continue;
        }
        let mut copy = tx.copy_in_raw(statement).await?;
        copy.send(text.as_slice()).await?;
        copy.finish().await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn copy(conn: &mut PgConnection, rows: &[u8]) -> Result<()> {
    let mut copy = conn
        .copy_in_raw("COPY telemetry_events (event_id, customer_id, event_type, event_time, value, properties) FROM STDIN")
        .await?;
    copy.send(rows).await?;
    copy.finish().await?;
    Ok(())
}

async fn scalar(url: &str, sql: &str) -> Result<i64> {
    let mut conn = PgConnection::connect(url).await?;
    Ok(sqlx::query_scalar(sql).fetch_one(&mut conn).await?)
}
