//! `burst`: backpressure under a burst (issue 6). A topic pre-filled with `--events` events (10M by
//! default, `meterflow loadgen` at full speed) is drained by `meterflow pipeline --until-caught-up` while
//! its resident memory is sampled every 100 ms: the pipeline reads at most 8 epochs ahead of the sink and
//! its readers block on bounded channels, so the peak must not grow with the burst. Baseline in the same
//! run: the same pipeline over a tenth of the burst (its first partition-spread tenth is a separate topic).
//!
//!     cargo build --release -p meterflow -p meterflow-perf
//!     target/release/burst --events 10000000

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use meterflow_perf::{drop_database, fresh_database, rate, Services};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    about = "Peak RSS of the pipeline while it drains a burst, against a burst ten times smaller"
)]
struct Args {
    #[arg(long, default_value_t = 10_000_000)]
    events: u64,
    /// Reuse a topic holding --events events instead of filling a new one.
    #[arg(long)]
    topic: Option<String>,
    #[arg(long, default_value_t = 2)]
    workers: usize,
    #[command(flatten)]
    services: Services,
}

fn fill(args: &Args, events: u64) -> Result<String> {
    let topic = format!("perf.burst.{events}.{}", chrono::Utc::now().timestamp());
    let status = Command::new(&args.services.meterflow)
        .args([
            "loadgen",
            "--rate",
            "0",
            "--events",
            &events.to_string(),
            "--spread-hours",
            "48",
        ])
        .env("MF_EVENTS_TOPIC", &topic)
        .env("MF_KAFKA_BROKERS", &args.services.brokers)
        .stdout(Stdio::null())
        .status()
        .with_context(|| {
            format!(
                "running {} (cargo build --release)",
                args.services.meterflow
            )
        })?;
    if !status.success() {
        bail!("loadgen failed");
    }
    Ok(topic)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

async fn drain(args: &Args, topic: &str, events: u64) -> Result<serde_json::Value> {
    let url = fresh_database(
        &args.services.database_url,
        "mf_perf_burst",
        events as usize,
    )
    .await?;
    let started = Instant::now();
    let mut child = Command::new(&args.services.meterflow)
        .args([
            "pipeline",
            "--until-caught-up",
            "--workers",
            &args.workers.to_string(),
            "--metrics-addr",
            "",
        ])
        .env("MF_DATABASE_URL", &url)
        .env("MF_EVENTS_TOPIC", topic)
        .env("MF_KAFKA_BROKERS", &args.services.brokers)
        .env("MF_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    let (mut peak, mut samples) = (0, Vec::new());
    while child.try_wait()?.is_none() {
        if let Some(kib) = rss_kib(child.id()) {
            peak = peak.max(kib);
            samples.push(kib);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed();
    anyhow::ensure!(child.wait()?.success(), "the pipeline failed");
    // The peak in each quarter of the run: flat means bounded, rising means growing with the input.
    let quarters: Vec<u64> = samples
        .chunks(samples.len().div_ceil(4).max(1))
        .map(|q| q.iter().max().copied().unwrap_or(0) / 1024)
        .collect();
    samples.sort_unstable();
    let median = samples.get(samples.len() / 2).copied().unwrap_or(0);
    drop_database(&args.services.database_url, &url).await?;
    Ok(
        json!({"events": events, "seconds": took.as_secs_f64(), "events_per_s": rate(events, took).round(),
              "peak_rss_mib": peak / 1024, "median_rss_mib": median / 1024, "peak_rss_mib_by_quarter": quarters}),
    )
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let big = match &args.topic {
        Some(t) => t.clone(),
        None => fill(&args, args.events)?,
    };
    let small_events = args.events / 10;
    let small = fill(&args, small_events)?;
    let baseline = drain(&args, &small, small_events).await?;
    println!(
        "{}",
        json!({"bench": "burst", "side": "tenth", "result": baseline})
    );
    let burst = drain(&args, &big, args.events).await?;
    println!(
        "{}",
        json!({"bench": "burst", "side": "burst", "topic": big, "result": burst})
    );
    Ok(())
}
