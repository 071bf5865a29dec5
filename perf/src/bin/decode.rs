//! `decode`: JSON bytes → validated event on one core (`../shared/PERF.md`, id `decode`), against two
//! same-run baselines on the same bytes: serde_json parsing into `IgnoredAny` (the bare cost of reading
//! the JSON) and into a `serde_json::Value`. Prints one JSON line per measurement and a summary.
//!
//!     cargo build --release -p meterflow-perf && target/release/decode --events 1000000 --runs 5

use std::hint::black_box;
use std::time::Instant;

use clap::Parser;
use meterflow_model::{decode_event, Limits};
use meterflow_perf::median;

#[derive(Debug, Parser)]
#[command(about = "Event decoding throughput on one core, against bare JSON parsing")]
struct Args {
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

fn payloads(n: usize) -> Vec<Vec<u8>> {
    let types = [
        "api_call",
        "tokens",
        "storage_gb",
        "compute_seconds",
        "seats",
    ];
    (0..n)
        .map(|i| {
            format!(
                r#"{{"event_id":"lg_1_{i}","customer_id":"cust_{:05}","event_type":"{}","event_time":"2024-01-15T14:{:02}:{:02}.{:03}Z","value":"{}.{:02}","properties":{{"region":"{}"}}}}"#,
                (i * 7919) % 1000,
                types[i % 5],
                (i / 60) % 60,
                i % 60,
                i % 1000,
                i % 4000,
                i % 100,
                ["eu", "us", "ap"][i % 3]
            )
            .into_bytes()
        })
        .collect()
}

fn time(label: &str, payloads: &[Vec<u8>], runs: usize, mut f: impl FnMut(&[u8]) -> bool) -> f64 {
    let mut rates = Vec::new();
    for run in 0..runs {
        let started = Instant::now();
        let mut ok = 0usize;
        for p in payloads {
            ok += f(black_box(p)) as usize;
        }
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(ok, payloads.len(), "{label}: every payload must decode");
        let rate = payloads.len() as f64 / secs;
        println!(
            "{}",
            serde_json::json!({"bench": "decode", "side": label, "run": run, "events_per_s": rate.round()})
        );
        rates.push(rate);
    }
    median(rates)
}

fn main() {
    let args = Args::parse();
    let payloads = payloads(args.events);
    let bytes: usize = payloads.iter().map(Vec::len).sum();
    let limits = Limits::default();
    let now = 1_800_000_000_000_000;
    let valid = payloads
        .iter()
        .filter(|p| decode_event(p, now, &limits).is_ok())
        .count();
    if let Some(bad) = payloads
        .iter()
        .find(|p| decode_event(p, now, &limits).is_err())
    {
        eprintln!(
            "warning: {} of {} payloads do not decode, e.g. {}: {:?}",
            payloads.len() - valid,
            payloads.len(),
            String::from_utf8_lossy(bad),
            decode_event(bad, now, &limits).err()
        );
    }
    let ours = time("meterflow", &payloads, args.runs, |p| {
        decode_event(p, now, &limits).is_ok()
    });
    let ignored = time("serde_ignored_any", &payloads, args.runs, |p| {
        serde_json::from_slice::<serde::de::IgnoredAny>(p).is_ok()
    });
    let value = time("serde_value", &payloads, args.runs, |p| {
        serde_json::from_slice::<serde_json::Value>(p).is_ok()
    });
    println!(
        "{}",
        serde_json::json!({"bench": "decode", "summary": true, "events": args.events, "mean_bytes": bytes / payloads.len(),
            "meterflow_events_per_s_median": ours.round(), "serde_ignored_any_median": ignored.round(),
            "serde_value_median": value.round(), "ratio_to_value": (ours / value * 100.0).round() / 100.0})
    );
}
