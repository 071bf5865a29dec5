//! `meterflow loadgen`: produces a realistic mix of usage events to Kafka, at a fixed rate or as fast as
//! the broker takes them, with a progress line every second and a summary at the end.
//!
//! The mix: customers drawn with a skew (a few heavy customers, a long tail), five event types with
//! different value shapes (counts, token amounts, fractional GB), event times a little in the past, and
//! optionally a share of invalid records to exercise dead letters.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::{SecondsFormat, Utc};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rdkafka::producer::{BaseRecord, Producer};

use crate::kafka;

#[derive(Debug, clap::Args)]
pub struct LoadgenArgs {
    /// Events per second; 0 produces as fast as the broker accepts.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Stop after this many events (default: run until --duration or Ctrl-C).
    #[arg(long)]
    pub events: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Distinct customers.
    #[arg(long, default_value_t = 1000)]
    pub customers: u64,
    /// Invalid records per thousand (they become dead letters).
    #[arg(long, default_value_t = 0)]
    pub invalid_permille: u32,
    /// Spread event times over this many hours before now (0 = within the last two minutes).
    #[arg(long, default_value_t = 0)]
    pub spread_hours: u64,
    /// Seed of the random mix (the same seed gives the same events, apart from times).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Event-id prefix, so that several runs never share ids.
    #[arg(long, default_value = "lg")]
    pub id_prefix: String,
    /// Also give each event a `model` property, one of this many values (`m0` …), for meters grouped
    /// by it (docs/dimensions.md). 0: none.
    #[arg(long, default_value_t = 0)]
    pub models: u32,
    /// How many values the `region` property takes (`eu`, `us`, `ap`, then `r3` …).
    #[arg(long, default_value_t = 3)]
    pub regions: u32,
}

const EVENT_TYPES: [(&str, u32); 5] = [
    ("api_call", 50),
    ("tokens", 25),
    ("storage_gb", 10),
    ("compute_seconds", 10),
    ("seats", 5),
];

/// Produces the events; prints a JSON summary line on stdout.
pub fn run(args: &LoadgenArgs, brokers: &str, topic: &str) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(kafka::ensure_topic(
        brokers,
        topic,
        kafka::DEFAULT_PARTITIONS,
    ))?;
    let producer = kafka::bulk_producer(brokers)?;

    let mut rng = SmallRng::seed_from_u64(args.seed);
    let started = Instant::now();
    let mut last_report = started;
    let mut produced: u64 = 0;
    let mut invalid: u64 = 0;
    let limit = args.events.unwrap_or(u64::MAX);
    let deadline = args.duration.map(|s| started + Duration::from_secs_f64(s));
    while produced < limit && deadline.is_none_or(|d| Instant::now() < d) {
        if args.rate > 0 {
            let due = (started.elapsed().as_secs_f64() * args.rate as f64) as u64;
            if produced >= due {
                std::thread::sleep(Duration::from_micros(500));
                continue;
            }
        }
        let (customer, payload, bad) = next_event(&mut rng, args, produced);
        invalid += bad as u64;
        kafka::send_waiting(
            &producer,
            BaseRecord::to(topic).key(&customer).payload(&payload),
        )?;
        produced += 1;
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            let secs = started.elapsed().as_secs_f64();
            eprint!(
                "\rloadgen: {produced} events in {secs:.0}s ({:.0}/s)   ",
                produced as f64 / secs
            );
            let _ = std::io::stderr().flush();
        }
    }
    producer
        .flush(Duration::from_secs(60))
        .context("flushing the last events to Kafka")?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!("\rloadgen: produced {produced} events ({invalid} invalid) to {topic} in {secs:.1}s ({:.0}/s)", produced as f64 / secs);
    println!(
        "{}",
        serde_json::json!({"produced": produced, "invalid": invalid, "seconds": secs, "rate": produced as f64 / secs})
    );
    Ok(())
}

/// One event of the mix: (key, payload, whether it is deliberately invalid).
fn next_event(rng: &mut SmallRng, args: &LoadgenArgs, n: u64) -> (String, Vec<u8>, bool) {
    // Skewed customers: squaring a uniform draw favours low ids.
    let u: f64 = rng.random();
    let customer = format!("cust_{:05}", ((u * u) * args.customers as f64) as u64);
    let pick = rng.random_range(0..100);
    let mut acc = 0;
    let event_type = EVENT_TYPES
        .iter()
        .find(|(_, w)| {
            acc += w;
            pick < acc
        })
        .map_or("api_call", |(t, _)| t);
    let value = match event_type {
        "tokens" => rng.random_range(1..4000).to_string(),
        "storage_gb" => format!(
            "{}.{:03}",
            rng.random_range(0..50),
            rng.random_range(0..1000)
        ),
        "compute_seconds" => format!(
            "{}.{:02}",
            rng.random_range(0..600),
            rng.random_range(0..100)
        ),
        _ => "1".to_owned(),
    };
    let back_ms = if args.spread_hours > 0 {
        rng.random_range(0..args.spread_hours * 3_600_000)
    } else {
        rng.random_range(0..120_000)
    };
    let time = (Utc::now() - chrono::Duration::milliseconds(back_ms as i64))
        .to_rfc3339_opts(SecondsFormat::Millis, true);
    let id = format!("{}_{}_{n}", args.id_prefix, args.seed);
    let bad = rng.random_range(0..1000) < args.invalid_permille;
    let value = if bad {
        "\"-5\"".to_owned()
    } else {
        format!("\"{value}\"")
    };
    let region = match rng.random_range(0..args.regions.max(1)) {
        0 => "eu".to_owned(),
        1 => "us".to_owned(),
        2 => "ap".to_owned(),
        r => format!("r{r}"),
    };
    let model = if args.models > 0 {
        format!(r#","model":"m{}""#, rng.random_range(0..args.models))
    } else {
        String::new()
    };
    let payload = format!(
        r#"{{"event_id":"{id}","customer_id":"{customer}","event_type":"{event_type}","event_time":"{time}","value":{value},"properties":{{"region":"{region}"{model}}}}}"#,
    );
    (customer, payload.into_bytes(), bad)
}
