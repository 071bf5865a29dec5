//! `load`: the seed's load, stress, spike and endurance scenarios (and the ingest-rate targets) against
//! a real `meterflow api` + `meterflow pipeline` on a fresh database and topic, driven by goose at a
//! fixed arrival rate (see `meterflow_perf::load`). After the run it checks that nothing was lost,
//! writes `perf/results/<scenario>-<time>.json` and `.html`, and exits non-zero when a threshold fails.
//!
//!     cargo build --release -p meterflow -p meterflow-perf
//!     target/release/load sustained --short      # 20 s ramp, 2 min at 1,000 req/s, 20 s down
//!     target/release/load spike                  # 100 → 2,000 → 100 users, a minute each
//!     target/release/load endurance --duration 30m
//!
//! Length: the seed's four load scenarios share one run: start the services, drive goose, check that
//! nothing was lost, report.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use meterflow_perf::load::chart::{self, Chart, Series};
use meterflow_perf::load::{drive, sampler, Endpoint, Mix, Plan, Recorder};
use meterflow_perf::{Services, Stack};
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Seed §1: 100 users, 1,000 req/s (70 % POST /events, 20 % GET /aggregations, 10 % GET
    /// /charges); 1 min ramp, 10 min hold, 1 min down.
    Sustained,
    /// Seed §2: 100 → 500 → 1,000 → 2,000 → 3,000 users (10 req/s each), a minute each, then a
    /// minute back at 100 to see the recovery.
    Stress,
    /// Seed §3: 100 → 2,000 → 100 users (10 req/s each), a minute each.
    Spike,
    /// Seed §4: 50 users at 100 req/s for `--duration` (the seed's is 24 h).
    Endurance,
    /// The seed's ingestion target: single POST /events only, at `--rate` (default 10,000 req/s).
    Ingest,
    /// POST /events/batch of 1,000 events at `--rate` batches/s (default 100: 100,000 events/s).
    Batch,
    /// The baseline for `ingest`: GET /healthz (no work) at `--rate` with the same users: what the
    /// load tool and the HTTP stack alone cost on this box.
    Floor,
    /// The CI gate: the sustained mix at 1,000 req/s for 95 s; fails on p99 ≥ 200 ms, errors ≥ 0.1 %
    /// or a lost event.
    Gate,
}

#[derive(Debug, Parser)]
#[command(
    about = "The seed's load scenarios against a local meterflow, driven by goose at a fixed arrival rate",
    long_about = "Starts `meterflow api` and `meterflow pipeline` on a fresh database and topic (the local \
                  services must be up: deploy/local/up), runs the scenario, checks that every event \
                  answered 201 is stored and aggregated exactly once, and writes a JSON summary and an \
                  HTML page of charts to --out. Exits 1 when a threshold fails."
)]
struct Args {
    scenario: Scenario,
    /// The seed's shorter variant: 20 s ramps and 2 min holds (stress and spike: 20 s per level).
    #[arg(long)]
    short: bool,
    /// Endurance only: how long to hold the rate, e.g. 30m, 2h, 90s.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    duration: Duration,
    /// Requests per second at full load (scenario default if not given).
    #[arg(long)]
    rate: Option<f64>,
    /// Users at full load (scenario default if not given).
    #[arg(long)]
    users: Option<usize>,
    /// Pipeline workers.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Port for the API under test.
    #[arg(long, default_value_t = 3931)]
    port: u16,
    /// Where the JSON summary and the HTML page go.
    #[arg(long, default_value = "perf/results")]
    out: String,
    /// Also keep goose's own metrics and write its HTML report beside ours (costs CPU per request).
    #[arg(long)]
    goose_report: bool,
    /// Extra environment for the API and pipeline, e.g. `--env MF_API_MAX_IN_FLIGHT=512`.
    #[arg(long, value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Users keep their cadence when told 429/503 with `Retry-After` (by default they wait as told, as
    /// a well-behaved client does; this shows what clients that ignore it do to the box).
    #[arg(long)]
    ignore_retry_after: bool,
    /// Latency thresholds are reported but do not fail the run (loss, errors and crashes still do).
    /// CI uses this until the p99 regression at 1,000 req/s is fixed (see perf/RESULTS.md).
    #[arg(long)]
    latency_advisory: bool,
    /// Keep the run's database (it is dropped otherwise).
    #[arg(long)]
    keep_database: bool,
    /// Kafka's log directory, for the topic's disk use.
    #[arg(long, env = "MF_KAFKA_LOGS", default_value_t = default_kafka_logs())]
    kafka_logs: String,
    #[command(flatten)]
    services: Services,
}

fn default_kafka_logs() -> String {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    format!("{home}/.cache/meterflow/kafka-data/logs")
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s}: expected e.g. 30m, 2h, 90s"))?;
    match unit {
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s}: the unit is s, m or h")),
    }
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s}: expected NAME=VALUE"))
}

/// A scenario made concrete: its plan, mix and thresholds.
struct Setup {
    plan: Plan,
    mix: Vec<(Endpoint, u32)>,
    rate: f64,
    users: usize,
}

const SEED_MIX: [(Endpoint, u32); 3] = [
    (Endpoint::PostEvent, 70),
    (Endpoint::GetAggregations, 20),
    (Endpoint::GetCharges, 10),
];

fn setup(args: &Args) -> Setup {
    let (ramp, hold) = if args.short { (20, 120) } else { (60, 600) };
    let level = if args.short { 20 } else { 60 };
    let mixed = SEED_MIX.to_vec();
    let (plan, mix, rate, users) = match args.scenario {
        Scenario::Sustained => {
            let users = args.users.unwrap_or(100);
            let plan = Plan {
                steps: vec![(users, ramp), (users, hold), (0, ramp)],
            };
            (plan, mixed, args.rate.unwrap_or(1000.0), users)
        }
        Scenario::Gate => {
            let users = args.users.unwrap_or(100);
            let plan = Plan {
                steps: vec![(users, 10), (users, 80), (0, 5)],
            };
            (plan, mixed, args.rate.unwrap_or(1000.0), users)
        }
        Scenario::Stress => {
            let levels = [100, 500, 1000, 2000, 3000, 100];
            (Plan::stepped(&levels, level), mixed, 30_000.0, 3000)
        }
        Scenario::Spike => {
            let levels = [100, 2000, 100];
            (Plan::stepped(&levels, level), mixed, 20_000.0, 2000)
        }
        Scenario::Endurance => {
            let users = args.users.unwrap_or(50);
            let plan = Plan {
                steps: vec![(users, 10), (users, args.duration.as_secs()), (0, 5)],
            };
            (plan, mixed, args.rate.unwrap_or(100.0), users)
        }
        Scenario::Ingest | Scenario::Floor => {
            let rate = args.rate.unwrap_or(10_000.0);
            let users = args.users.unwrap_or((rate / 10.0).ceil() as usize);
            let plan = Plan {
                steps: vec![
                    (users, 10),
                    (users, if args.short { 30 } else { 60 }),
                    (0, 2),
                ],
            };
            let endpoint = if args.scenario == Scenario::Floor {
                Endpoint::Health
            } else {
                Endpoint::PostEvent
            };
            (plan, vec![(endpoint, 1)], rate, users)
        }
        Scenario::Batch => {
            let rate = args.rate.unwrap_or(100.0);
            let users = args.users.unwrap_or(50);
            let plan = Plan {
                steps: vec![
                    (users, 5),
                    (users, if args.short { 30 } else { 60 }),
                    (0, 2),
                ],
            };
            (plan, vec![(Endpoint::PostBatch, 1)], rate, users)
        }
    };
    // Stress and spike keep the seed's 10 req/s per user; the rate follows the users.
    let rate = match args.scenario {
        Scenario::Stress | Scenario::Spike => 10.0 * users as f64,
        _ => rate,
    };
    Setup {
        plan,
        mix,
        rate,
        users,
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let setup = setup(&args);
    let name = format!("{:?}", args.scenario).to_lowercase();
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out))?;
    let prefix = format!("mf_load_{name}");
    let mut stack =
        Stack::start(&args.services, &prefix, args.port, args.workers, &args.env).await?;
    eprintln!(
        "load {name}: {} users at {} req/s, plan {} ({} s), database {}",
        setup.users,
        setup.rate,
        setup.plan.goose(),
        setup.plan.seconds(),
        stack.url
    );
    let recorder = Arc::new(Recorder::new());
    let mix = Arc::new(Mix {
        weights: setup.mix.clone(),
        per_user_rate: setup.rate / setup.users.max(1) as f64,
        customers: 100,
        run: stamp.clone(),
        honour_retry_after: !args.ignore_retry_after,
    });
    let stop = Arc::new(AtomicBool::new(false));
    let database = stack.url.rsplit_once('/').map_or("", |(_, n)| n).to_owned();
    let sampling = tokio::spawn(sampler::sample(
        sampler::Targets {
            api: stack.api.id(),
            tool: std::process::id(),
            pipeline: stack.pipeline.id(),
            database_url: args.services.database_url.clone(),
            database,
            kafka_logs: args.kafka_logs.clone().into(),
            topic: stack.topic.clone(),
        },
        stop.clone(),
    ));
    let progress = tokio::spawn(report_progress(recorder.clone(), setup.plan.seconds()));
    let goose_report = format!("{}/{name}-{stamp}-goose.html", args.out);
    let driven = drive(
        &stack.base,
        &setup.plan,
        mix,
        recorder.clone(),
        args.goose_report.then_some(goose_report.as_str()),
    )
    .await;
    progress.abort();
    let alive = (stack.api.alive(), stack.pipeline.alive());
    let check_started = Instant::now();
    let loss = loss_check(&stack, &recorder.accepted()).await;
    let check_seconds = check_started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Release);
    let samples = sampling.await.unwrap_or_default();
    let metrics = scrape_metrics(&stack.base).await;
    let statements = meterflow_perf::top_statements(&stack.url).await;
    driven.context("running the goose plan")?;
    let loss = loss?;

    let summary = recorder.summary();
    let timeline = recorder.timeline();
    let phases = phases(&setup.plan, &recorder, &samples);
    let observed = Observed {
        summary: &summary,
        recorder: &recorder,
        loss: &loss,
        alive,
        samples: &samples,
        metrics: &metrics,
    };
    let verdict = thresholds(&args, &setup, &observed);
    let passed = verdict
        .iter()
        .all(|(name, ok, _)| *ok || (args.latency_advisory && is_latency(name)));
    let latency_only = verdict.iter().all(|(name, ok, _)| *ok || is_latency(name));
    let result = json!({
        "scenario": name,
        "date": chrono::Utc::now().to_rfc3339(),
        "machine": machine(),
        "commit": commit(),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "tool": "goose 0.18 (meterflow_perf::load: fixed arrival rate, latency from the scheduled start)",
        "plan": {"goose_test_plan": setup.plan.goose(), "seconds": setup.plan.seconds(),
                 "users": setup.users, "rate_per_s": setup.rate,
                 "mix": setup.mix.iter().map(|(e, w)| json!({"endpoint": e.name(), "weight": w})).collect::<Vec<_>>()},
        "env": args.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "passed": passed,
        "thresholds": verdict.iter().map(|(name, ok, detail)| json!({"name": name, "passed": ok, "detail": detail})).collect::<Vec<_>>(),
        "summary": summary,
        "phases": phases,
        "knee": knee(&phases),
        "loss_check": loss,
        "loss_check_seconds": check_seconds,
        "processes_alive_after": {"api": alive.0, "pipeline": alive.1},
        "resources": resource_summary(&samples),
        "api_metrics_after": metrics,
        "postgres_statements": statements,
        "timeline": timeline,
        "samples": samples,
    });
    let json_path = format!("{}/{name}-{stamp}.json", args.out);
    std::fs::write(&json_path, serde_json::to_string_pretty(&result)?)?;
    let html_path = format!("{}/{name}-{stamp}.html", args.out);
    std::fs::write(&html_path, html(&name, &result, &verdict))?;
    print_summary(&name, &result, &verdict);
    eprintln!("results: {json_path}\npicture: {html_path}");
    if !args.keep_database {
        stack.drop_database(&args.services.database_url).await?;
    }
    if !passed {
        std::process::exit(if latency_only { LATENCY_MISS } else { 1 });
    }
    Ok(())
}

/// Exit code of a run whose only failed thresholds are latency ones (nothing lost, no errors, nothing
/// crashed): `deploy/local/test` measures such a gate once more, since one stall of the shared 2-core
/// box (a host's I/O hiccup lands on every request in flight) can carry a 95 s p99 over its line.
const LATENCY_MISS: i32 = 3;

/// Whether a threshold is about latency or rate (the ones a busy machine can miss), not loss or errors.
fn is_latency(name: &str) -> bool {
    name.contains("p99") || name.contains("req/s")
}

/// A line every 10 s while the plan runs, so a user can watch.
async fn report_progress(recorder: Arc<Recorder>, seconds: u64) {
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let t = recorder.elapsed() as usize;
        let w = recorder.window(t.saturating_sub(10), t);
        eprintln!(
            "  {t:>5} / {seconds} s  last 10 s: ok {} refused {} errors {}  p50 {} ms  p99 {} ms",
            w["ok"], w["refused"], w["errors"], w["latency_ms"]["p50"], w["latency_ms"]["p99"]
        );
    }
}

/// Every id answered 201 is stored exactly once, and once the pipeline caught up, everything stored is
/// in the aggregates exactly once (the aggregates' event counts equal the stored events per customer
/// and hour).
async fn loss_check(stack: &Stack, accepted: &[String]) -> Result<Value> {
    let pool = sqlx::PgPool::connect(&stack.url).await?;
    // The ids go into a temporary table, so that Postgres joins them with one hash join instead of
    // probing every month partition's index per id.
    let mut conn = pool.acquire().await?;
    sqlx::query("CREATE TEMP TABLE accepted (event_id text NOT NULL)")
        .execute(&mut *conn)
        .await?;
    for chunk in accepted.chunks(50_000) {
        sqlx::query("INSERT INTO accepted SELECT unnest($1::text[])")
            .bind(chunk)
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query("ANALYZE accepted").execute(&mut *conn).await?;
    let (stored, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT t.event_id) FROM telemetry_events t JOIN accepted USING (event_id)",
    )
    .fetch_one(&mut *conn)
    .await?;
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(180);
    let client = reqwest::Client::new();
    let (mut differing, mut events, mut aggregated);
    loop {
        let caught_up = client
            .get(format!("{}/api/v1/progress", stack.base))
            .send()
            .await
            .ok()
            .map(|r| r.json::<Value>())
            .map(|f| async { f.await.ok() });
        let caught_up = match caught_up {
            Some(f) => f.await.is_some_and(|p| p["caught_up"] == true),
            None => false,
        };
        (differing, events, aggregated) = sqlx::query_as::<_, (i64, i64, i64)>(
            "WITH raw AS (SELECT customer_id, date_trunc('hour', event_time) AS w, count(*) AS n
                            FROM telemetry_events WHERE event_type = 'api_call' GROUP BY 1, 2),
                  agg AS (SELECT customer_id, window_start AS w, sum(event_count) AS n
                            FROM aggregations GROUP BY 1, 2)
             SELECT count(*) FILTER (WHERE raw.n IS DISTINCT FROM agg.n),
                    coalesce(sum(raw.n), 0)::bigint, coalesce(sum(agg.n), 0)::bigint
               FROM raw FULL JOIN agg USING (customer_id, w)",
        )
        .fetch_one(&pool)
        .await?;
        if caught_up && differing == 0 {
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let answered = i64::try_from(accepted.len()).unwrap_or(i64::MAX);
    let lost = answered - distinct;
    Ok(json!({
        "answered_201": answered,
        "stored_of_those": stored,
        "distinct_stored_of_those": distinct,
        "lost": lost,
        "stored_twice": stored - distinct,
        "events_stored": events,
        "events_aggregated": aggregated,
        "hour_windows_differing": differing,
        "passed": lost == 0 && stored == distinct && differing == 0,
    }))
}

async fn scrape_metrics(base: &str) -> Value {
    let Ok(r) = reqwest::get(format!("{base}/metrics")).await else {
        return json!(null);
    };
    let text = r.text().await.unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            !l.starts_with('#')
                && (l.contains("http")
                    || l.contains("refus")
                    || l.contains("shed")
                    || l.contains("ingest"))
        })
        .collect();
    json!(lines)
}

/// The share of an endpoint's answers the API itself timed within `le` seconds (its
/// `http_request_duration_seconds` histogram, scraped after the run), beside the client's view.
fn server_share_within(metrics: &Value, endpoint: &str, le: &str) -> Option<f64> {
    let (method, route) = endpoint.split_once(' ')?;
    let series = format!("method=\"{method}\",route=\"{route}\",status=\"200\"");
    let value = |prefix: &str| -> Option<f64> {
        metrics.as_array()?.iter().find_map(|line| {
            let rest = line.as_str()?.strip_prefix(prefix)?;
            rest.split_whitespace().next()?.parse().ok()
        })
    };
    let within = value(&format!(
        "http_request_duration_seconds_bucket{{{series},le=\"{le}\"}}"
    ))?;
    let count = value(&format!("http_request_duration_seconds_count{{{series}}}"))?;
    (count > 0.0).then(|| within / count)
}

/// Latency and classes per step of the plan (a stress level, the spike, the recovery).
/// Per step of the plan (a stress level, the spike, the recovery): answers by class, latency, and the
/// mean CPU and the peak RSS of each component meanwhile, so a reader can see which gave way first.
fn phases(plan: &Plan, recorder: &Recorder, samples: &[Value]) -> Vec<Value> {
    let mut start = 0u64;
    let mut out = Vec::new();
    for (users, secs) in &plan.steps {
        let end = start + secs;
        if *secs > 1 {
            let mut w = recorder.window(start as usize, end as usize);
            w["users"] = json!(users);
            let during: Vec<Value> = samples
                .iter()
                .filter(|s| {
                    s["t"]
                        .as_f64()
                        .is_some_and(|t| t >= start as f64 && t < end as f64)
                })
                .cloned()
                .collect();
            let mean = |path: &[&str]| {
                let xs = series(&during, path);
                (xs.iter().sum::<f64>() / xs.len().max(1) as f64 * 10.0).round() / 10.0
            };
            let peak = |path: &[&str]| series(&during, path).into_iter().fold(0.0, f64::max);
            w["cpu_pct_mean"] = json!({
                "machine": mean(&["machine_cpu_pct"]), "api": mean(&["api", "cpu_pct"]),
                "pipeline": mean(&["pipeline", "cpu_pct"]), "postgres": mean(&["postgres", "cpu_pct"]),
                "kafka": mean(&["kafka", "cpu_pct"]), "load_tool": mean(&["load_tool", "cpu_pct"]),
            });
            w["rss_mb_peak"] =
                json!({"api": peak(&["api", "rss_mb"]), "pipeline": peak(&["pipeline", "rss_mb"])});
            w["db_connections_active_peak"] = json!(peak(&["db_connections", "active"]));
            out.push(w);
        }
        start = end;
    }
    out
}

/// The first level whose p99 reached 200 ms or whose refusals passed 1 %: where latency bends.
fn knee(phases: &[Value]) -> Value {
    phases
        .iter()
        .find(|p| {
            let total = p["ok"].as_f64().unwrap_or(0.0) + p["refused"].as_f64().unwrap_or(0.0);
            p["latency_ms"]["p99"].as_f64().unwrap_or(0.0) >= 200.0
                || p["refused"].as_f64().unwrap_or(0.0) > 0.01 * total.max(1.0)
        })
        .map_or(json!(null), |p| json!({"users": p["users"], "from_s": p["from_s"], "p99_ms": p["latency_ms"]["p99"], "refused": p["refused"], "cpu_pct_mean": p["cpu_pct_mean"]}))
}

fn series(samples: &[Value], path: &[&str]) -> Vec<f64> {
    samples
        .iter()
        .filter_map(|s| path.iter().try_fold(s, |v, k| v.get(k))?.as_f64())
        .collect()
}

fn resource_summary(samples: &[Value]) -> Value {
    let stat = |path: &[&str]| {
        let xs = series(samples, path);
        let max = xs.iter().copied().fold(f64::NAN, f64::max);
        let mean = xs.iter().sum::<f64>() / xs.len().max(1) as f64;
        json!({"first": xs.first(), "last": xs.last(), "max": max, "mean": (mean * 10.0).round() / 10.0,
               "growth_last_vs_second_fifth": sampler::growth(&xs)})
    };
    json!({
        "machine_cpu_pct": stat(&["machine_cpu_pct"]),
        "api_rss_mb": stat(&["api", "rss_mb"]), "api_fds": stat(&["api", "fds"]),
        "api_cpu_pct": stat(&["api", "cpu_pct"]),
        "pipeline_rss_mb": stat(&["pipeline", "rss_mb"]), "pipeline_fds": stat(&["pipeline", "fds"]),
        "pipeline_cpu_pct": stat(&["pipeline", "cpu_pct"]),
        "kafka_cpu_pct": stat(&["kafka", "cpu_pct"]), "load_tool_cpu_pct": stat(&["load_tool", "cpu_pct"]), "postgres_cpu_pct": stat(&["postgres", "cpu_pct"]),
        "db_connections_active": stat(&["db_connections", "active"]),
        "db_connections_idle": stat(&["db_connections", "idle"]),
        "db_bytes": stat(&["db_bytes"]), "kafka_topic_bytes": stat(&["kafka_topic_bytes"]),
    })
}

type Verdict = Vec<(String, bool, String)>;

/// What a run observed, for [`thresholds`].
struct Observed<'a> {
    summary: &'a Value,
    recorder: &'a Recorder,
    loss: &'a Value,
    /// Whether the API and the pipeline were still running after the plan.
    alive: (bool, bool),
    samples: &'a [Value],
    /// The API's own metrics, scraped after the plan.
    metrics: &'a Value,
}

/// The thresholds each scenario is held to (the seed's, and this issue's).
fn thresholds(args: &Args, setup: &Setup, observed: &Observed<'_>) -> Verdict {
    let Observed {
        summary,
        recorder,
        loss,
        alive,
        samples,
        metrics,
    } = *observed;
    let mut v: Verdict = Vec::new();
    let f = |x: &Value| x.as_f64().unwrap_or(f64::NAN);
    v.push((
        "no event lost (every 201 stored once, everything stored aggregated once)".into(),
        loss["passed"] == true,
        format!(
            "lost {}, stored twice {}, windows differing {}",
            loss["lost"], loss["stored_twice"], loss["hour_windows_differing"]
        ),
    ));
    v.push((
        "api and pipeline still running".into(),
        alive.0 && alive.1,
        format!("api {}, pipeline {}", alive.0, alive.1),
    ));
    let post = &summary["endpoints"][Endpoint::PostEvent.name()];
    let p99 = |x: &Value| f(&x["latency_ms"]["p99"]);
    match args.scenario {
        Scenario::Sustained | Scenario::Gate | Scenario::Endurance => {
            v.push((
                "p99 < 200 ms (all requests)".into(),
                p99(summary) < 200.0,
                format!("p99 {} ms", p99(summary)),
            ));
            v.push((
                "non-2xx < 0.1 %".into(),
                f(&summary["non_2xx_rate"]) < 0.001,
                format!(
                    "{:.4} % of {}",
                    100.0 * f(&summary["non_2xx_rate"]),
                    summary["requests"]
                ),
            ));
            for e in [Endpoint::GetAggregations, Endpoint::GetCharges] {
                let s = &summary["endpoints"][e.name()];
                v.push((
                    format!("{} p99 < 100 ms (seed's endpoint table)", e.name()),
                    p99(s) < 100.0,
                    format!("p99 {} ms", p99(s)),
                ));
                v.push((
                    format!("informational: {} answered within 100 ms, measured by the API", e.name()),
                    true,
                    server_share_within(metrics, e.name(), "0.1").map_or_else(
                        || "no histogram".into(),
                        |share| format!("{:.3} % (the rest of the client's p99 is queueing before the handler or in the box)", 100.0 * share),
                    ),
                ));
            }
            let achieved = f(&summary["requests"]) / setup.plan.seconds().max(1) as f64;
            v.push((
                "informational: requests / plan seconds".into(),
                true,
                format!("{achieved:.0} req/s"),
            ));
            let cpu = series(samples, &["machine_cpu_pct"]);
            let mean = cpu.iter().sum::<f64>() / cpu.len().max(1) as f64;
            v.push((
                "informational: machine CPU < 80 % average (seed)".into(),
                true,
                format!("{mean:.1} % (everything: load tool, API, pipeline, Kafka, Postgres)"),
            ));
            if args.scenario == Scenario::Endurance {
                for (name, path) in [
                    ("api RSS", &["api", "rss_mb"][..]),
                    ("pipeline RSS", &["pipeline", "rss_mb"][..]),
                    ("api fds", &["api", "fds"][..]),
                    ("pipeline fds", &["pipeline", "fds"][..]),
                ] {
                    let g = sampler::growth(&series(samples, path));
                    v.push((
                        format!("{name} flat (last fifth ≤ 1.25 × second fifth)"),
                        g <= 1.25,
                        format!("× {g}"),
                    ));
                }
            }
        }
        Scenario::Stress | Scenario::Spike => {
            let refused_ok = summary["endpoints"].as_object().is_some_and(|m| {
                m.values()
                    .all(|e| f(&e["errors"]) <= 0.001 * f(&e["requests"]).max(1.0))
            });
            v.push((
                "informative answers: every failure is a 429/503 with Retry-After (errors < 0.1 %)"
                    .into(),
                refused_ok,
                format!(
                    "refused {}, errors {}",
                    summary["refused"], summary["errors"]
                ),
            ));
            let p99_all = p99(summary);
            v.push((
                "p99 bounded (< 1 s) under overload".into(),
                p99_all < 1000.0,
                format!("p99 {p99_all} ms, max {} ms", summary["latency_ms"]["max"]),
            ));
            // Recovery: the last level's second half (back at 100 users).
            let total = setup.plan.seconds() as usize;
            let level = if args.short { 20 } else { 60 };
            let w = recorder.window(total.saturating_sub(level / 2 + 1), total.saturating_sub(1));
            v.push((
                "recovered: last level's second half p99 < 200 ms, nothing refused".into(),
                p99(&w) < 200.0 && w["refused"] == 0 && w["errors"] == 0,
                format!(
                    "p99 {} ms, refused {}, errors {}",
                    p99(&w),
                    w["refused"],
                    w["errors"]
                ),
            ));
        }
        Scenario::Ingest | Scenario::Floor => {
            let ok = if args.scenario == Scenario::Floor {
                &summary["endpoints"][Endpoint::Health.name()]["ok"]
            } else {
                &post["ok"]
            };
            let achieved = f(ok) / setup.plan.seconds().max(1) as f64;
            let hold = recorder.window(10, setup.plan.seconds() as usize - 2);
            let hold_rate = f(&hold["ok"]) / (setup.plan.seconds() as f64 - 12.0).max(1.0);
            v.push((
                format!(
                    "≥ {} req/s answered (201, or 200 for the floor) while holding",
                    setup.rate
                ),
                hold_rate >= 0.99 * setup.rate,
                format!("{hold_rate:.0} req/s (whole plan {achieved:.0})"),
            ));
            v.push((
                "p99 < 200 ms while holding".into(),
                p99(&hold) < 200.0,
                format!("p99 {} ms", p99(&hold)),
            ));
            v.push((
                "non-2xx < 0.1 %".into(),
                f(&summary["non_2xx_rate"]) < 0.001,
                format!("{:.4} %", 100.0 * f(&summary["non_2xx_rate"])),
            ));
        }
        Scenario::Batch => {
            let hold = recorder.window(5, setup.plan.seconds() as usize - 2);
            let secs = (setup.plan.seconds() as f64 - 7.0).max(1.0);
            let events = f(&loss["answered_201"]);
            let batches = f(&hold["ok"]) / secs;
            let target = setup.rate * 1000.0;
            v.push((
                format!("≥ {target} events/s through /events/batch"),
                batches * 1000.0 >= 0.99 * target,
                format!(
                    "{:.0} events/s while holding ({events} answered 201 in all)",
                    batches * 1000.0
                ),
            ));
            v.push((
                "non-2xx < 0.1 %".into(),
                f(&summary["non_2xx_rate"]) < 0.001,
                format!("{:.4} %", 100.0 * f(&summary["non_2xx_rate"])),
            ));
        }
    }
    v
}

fn machine() -> Value {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().map(str::to_owned))
        .unwrap_or_default();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    json!({"host": host.trim(), "cpus": cpus, "cpu": model, "memory": mem})
}

fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn print_summary(name: &str, result: &Value, verdict: &Verdict) {
    let s = &result["summary"];
    eprintln!(
        "\n{name}: {} requests, ok {}, refused {}, errors {}; latency p50 {} ms p99 {} ms max {} ms",
        s["requests"], s["ok"], s["refused"], s["errors"], s["latency_ms"]["p50"], s["latency_ms"]["p99"], s["latency_ms"]["max"]
    );
    for p in result["phases"].as_array().into_iter().flatten() {
        eprintln!(
            "  {:>5} users from {:>4} s: ok {} refused {} errors {}  p50 {} ms p99 {} ms  cpu % {}",
            p["users"],
            p["from_s"],
            p["ok"],
            p["refused"],
            p["errors"],
            p["latency_ms"]["p50"],
            p["latency_ms"]["p99"],
            p["cpu_pct_mean"]
        );
    }
    if !result["knee"].is_null() {
        eprintln!("  latency bends at: {}", result["knee"]);
    }
    if result["postgres_statements"].is_array() {
        meterflow_perf::print_statements(&result["postgres_statements"], 5);
    }
    for (name, ok, detail) in verdict {
        eprintln!("  [{}] {name}: {detail}", if *ok { "pass" } else { "FAIL" });
    }
    println!(
        "{}",
        json!({"scenario": name, "passed": result["passed"], "summary": {"requests": s["requests"], "ok": s["ok"],
        "refused": s["refused"], "errors": s["errors"], "latency_ms": s["latency_ms"]}, "loss_check": result["loss_check"]})
    );
}

fn html(name: &str, result: &Value, verdict: &Verdict) -> String {
    let timeline = result["timeline"].as_array().cloned().unwrap_or_default();
    let samples = result["samples"].as_array().cloned().unwrap_or_default();
    let tl = |f: &dyn Fn(&Value) -> Option<f64>| -> Vec<(f64, f64)> {
        timeline
            .iter()
            .filter_map(|s| Some((s["t"].as_f64()?, f(s)?)))
            .collect()
    };
    let sm = |path: &[&str]| -> Vec<(f64, f64)> {
        samples
            .iter()
            .filter_map(|s| {
                Some((
                    s["t"].as_f64()?,
                    path.iter().try_fold(s, |v, k| v.get(k))?.as_f64()?,
                ))
            })
            .collect()
    };
    let charts = vec![
        Chart {
            title: "Latency from the scheduled start, per second (log scale)",
            y_label: "ms",
            log: true,
            series: vec![
                Series {
                    name: "p50",
                    color: "#1f77b4",
                    points: tl(&|s| s["latency_ms"]["p50"].as_f64()),
                },
                Series {
                    name: "p99",
                    color: "#d62728",
                    points: tl(&|s| s["latency_ms"]["p99"].as_f64()),
                },
                Series {
                    name: "max",
                    color: "#999",
                    points: tl(&|s| s["latency_ms"]["max"].as_f64()),
                },
            ],
        },
        Chart {
            title: "Requests per second",
            y_label: "req/s",
            log: false,
            series: vec![
                Series {
                    name: "sent",
                    color: "#999",
                    points: tl(&|s| s["offered"].as_f64()),
                },
                Series {
                    name: "deferred (Retry-After)",
                    color: "#bcbd22",
                    points: tl(&|s| s["deferred"].as_f64()),
                },
                Series {
                    name: "ok",
                    color: "#2ca02c",
                    points: tl(&|s| s["ok"].as_f64()),
                },
                Series {
                    name: "refused 429/503",
                    color: "#ff7f0e",
                    points: tl(&|s| s["refused"].as_f64()),
                },
                Series {
                    name: "errors",
                    color: "#d62728",
                    points: tl(&|s| s["errors"].as_f64()),
                },
            ],
        },
        Chart {
            title: "Memory (RSS)",
            y_label: "MB",
            log: false,
            series: vec![
                Series {
                    name: "api",
                    color: "#1f77b4",
                    points: sm(&["api", "rss_mb"]),
                },
                Series {
                    name: "pipeline",
                    color: "#2ca02c",
                    points: sm(&["pipeline", "rss_mb"]),
                },
            ],
        },
        Chart {
            title: "CPU (100 % = one core; the machine has two)",
            y_label: "%",
            log: false,
            series: vec![
                Series {
                    name: "api",
                    color: "#1f77b4",
                    points: sm(&["api", "cpu_pct"]),
                },
                Series {
                    name: "pipeline",
                    color: "#2ca02c",
                    points: sm(&["pipeline", "cpu_pct"]),
                },
                Series {
                    name: "postgres",
                    color: "#9467bd",
                    points: sm(&["postgres", "cpu_pct"]),
                },
                Series {
                    name: "kafka",
                    color: "#8c564b",
                    points: sm(&["kafka", "cpu_pct"]),
                },
                Series {
                    name: "load tool",
                    color: "#e377c2",
                    points: sm(&["load_tool", "cpu_pct"]),
                },
                Series {
                    name: "machine (of 200)",
                    color: "#999",
                    points: sm(&["machine_cpu_pct"])
                        .into_iter()
                        .map(|(t, v)| (t, v * 2.0))
                        .collect(),
                },
            ],
        },
        Chart {
            title: "Open file descriptors and database connections",
            y_label: "count",
            log: false,
            series: vec![
                Series {
                    name: "api fds",
                    color: "#1f77b4",
                    points: sm(&["api", "fds"]),
                },
                Series {
                    name: "pipeline fds",
                    color: "#2ca02c",
                    points: sm(&["pipeline", "fds"]),
                },
                Series {
                    name: "db active",
                    color: "#d62728",
                    points: sm(&["db_connections", "active"]),
                },
                Series {
                    name: "db idle",
                    color: "#999",
                    points: sm(&["db_connections", "idle"]),
                },
            ],
        },
        Chart {
            title: "Disk: this run's database and Kafka topic",
            y_label: "MB",
            log: false,
            series: vec![
                Series {
                    name: "postgres db",
                    color: "#9467bd",
                    points: sm(&["db_bytes"])
                        .into_iter()
                        .map(|(t, v)| (t, v / 1e6))
                        .collect(),
                },
                Series {
                    name: "kafka topic",
                    color: "#8c564b",
                    points: sm(&["kafka_topic_bytes"])
                        .into_iter()
                        .map(|(t, v)| (t, v / 1e6))
                        .collect(),
                },
            ],
        },
    ];
    let s = &result["summary"];
    let mut facts = vec![
        (
            "command".to_owned(),
            result["command"].as_str().unwrap_or("").to_owned(),
        ),
        (
            "commit, date".to_owned(),
            format!(
                "{} {}",
                result["commit"].as_str().unwrap_or(""),
                result["date"].as_str().unwrap_or("")
            ),
        ),
        ("machine".to_owned(), result["machine"].to_string()),
        (
            "plan (goose)".to_owned(),
            format!(
                "{} at {} req/s full",
                result["plan"]["goose_test_plan"], result["plan"]["rate_per_s"]
            ),
        ),
        (
            "requests".to_owned(),
            format!(
                "{} (ok {}, refused {}, errors {})",
                s["requests"], s["ok"], s["refused"], s["errors"]
            ),
        ),
        ("latency ms".to_owned(), s["latency_ms"].to_string()),
    ];
    for (name, ok, detail) in verdict {
        facts.push((
            name.clone(),
            format!("{} — {detail}", if *ok { "pass" } else { "FAIL" }),
        ));
    }
    chart::page(&format!("meterflow load: {name}"), &facts, &charts)
}
