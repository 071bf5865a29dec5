//! `db_scenario`: the seed's database scenario (seed §7, `../shared/PERF.md` id `db`).
//!
//! 1. Seeds a database of its own directly in Postgres (server-side `INSERT … SELECT generate_series`),
//!    at `--scale 1.0`: 10,000 customers, 10,000,000 `telemetry_events` with their `event_ids` rows (as
//!    the pipeline leaves them: claimed, counted), 1,000,000 hourly `aggregations` (the GROUP BY of those
//!    events: 10 events per window, 25 windows per customer and event type over 2024), 500,000 `charges`
//!    (the windows of the two priced meters, per-unit books), their `upcoming_lines`, and 50,000 issued
//!    `invoices` (every customer, January–May 2024) whose `line_items` are the period's upcoming lines.
//!    Invoice lines are not a table in meterflow: they are the invoice row's `line_items` (migration 0006
//!    says why).
//! 2. Times, sequentially over `--iterations` random parameters each (after a warm-up), p50/p99/max,
//!    each against the seed's target (point 5, range 50, aggregation 500, join 1000 ms; over HTTP the
//!    seed's API table: 100/100/200 ms p99) and our goal (p99 1 / 10 / 100 / 200 ms):
//!    `point_lookup` (an invoice by id, the seed's `findOne('invoices', {invoice_id})`); `range` (the
//!    seed's `SELECT * FROM telemetry_events WHERE customer_id = $1 AND event_time BETWEEN $2 AND $3`
//!    over a month); `aggregation` (a customer's usage per meter over a month, from the hourly
//!    aggregates the pipeline pre-computes); `aggregation_month_all` (every customer's usage per meter
//!    over a month, from the aggregates); `aggregation_month_precomputed` (the same for the priced
//!    meters from `upcoming_lines`, the per-period sums the pipeline keeps); `join` (a period's billed
//!    revenue per customer currency and meter: invoices ⋈ customers ⋈ the invoices' lines); and over
//!    HTTP against a `meterflow api` it spawns (`MF_AUTH=off`) `GET /api/v1/aggregations`, `/charges`
//!    and `/invoices` for one customer (and month), and `GET /api/v1/invoices/{id}`.
//! 3. `EXPLAIN (ANALYZE, BUFFERS)` of every query and of the SQL the API runs for those GETs, as the
//!    plan a prepared statement gets after six executions (`auto`: sqlx prepares every statement) and
//!    forced custom and generic, saved to `perf/results/db-explain-<date>.txt`; checks that no `auto`
//!    plan reads a big table with a Seq Scan that keeps under 10% of its rows, and that the raw events
//!    are pruned to the queried month's partition.
//! 4. One JSON line per query, and a summary in `perf/results/db-<UTC timestamp>.json` (machine, commit,
//!    command line, sizes, thresholds, pass/fail).
//!
//! ```sh
//! cargo build --release -p meterflow -p meterflow-perf
//! target/release/db_scenario                       # full scale (a few minutes of seeding)
//! target/release/db_scenario --scale 0.01          # a quick run
//! target/release/db_scenario --database mf_perf_db_keep --keep   # seed once, rerun without seeding
//! ```
//!
//! Length: the seed's database scenario is one command: seeding, the workload, the checks and the report
//! run in order and share their state.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Months, TimeZone, Utc};
use clap::Parser;
use futures::TryStreamExt;
use meterflow_perf::{drop_database, wait_ready, Proc, Services};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Row};

#[derive(Debug, Parser)]
#[command(
    about = "The seed's database scenario: seed Postgres, time the queries and GETs, EXPLAIN them"
)]
struct Args {
    /// Fraction of the seed's sizes (1.0: 10k customers, 10M events, 1M aggregations, 500k charges,
    /// 50k invoices).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// The database's name (default: a fresh `mf_perf_db_<unix time>`).
    #[arg(long)]
    database: Option<String>,
    /// Keep the database afterwards, and reuse it when it is already seeded at this scale (no seeding).
    #[arg(long)]
    keep: bool,
    /// Timed executions of each query (random parameters).
    #[arg(long, default_value_t = 200)]
    iterations: usize,
    /// Untimed executions of each query first.
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// Where the spawned `meterflow api` listens.
    #[arg(long, default_value = "127.0.0.1:3931")]
    api_addr: String,
    /// Skip the HTTP GETs (no `meterflow api` needed).
    #[arg(long)]
    no_http: bool,
    /// Where the JSON summary and the EXPLAIN file go.
    #[arg(long, default_value = "perf/results")]
    results: PathBuf,
    /// Seed of the random parameters.
    #[arg(long, default_value_t = 7)]
    rng_seed: u64,
    #[command(flatten)]
    services: Services,
}

/// Rows per table at the chosen scale.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Sizes {
    customers: i64,
    events: i64,
    aggregations: i64,
    charges: i64,
    invoices: i64,
}

/// Event types; the first two are priced (per-unit books), so they have charges and invoice lines.
const TYPES: [&str; 4] = ["api_call", "storage_gb", "tokens", "compute_seconds"];
/// Events per aggregation window.
const PER_WINDOW: i64 = 10;
/// Months of 2024 that have issued invoices (January..=May).
const INVOICED_MONTHS: i64 = 5;

impl Sizes {
    fn at(scale: f64) -> Result<Sizes> {
        if !(scale > 0.0 && scale <= 10.0) {
            bail!("--scale must be in (0, 10]");
        }
        let customers = ((10_000.0 * scale).round() as i64).max(10);
        let events = ((10_000_000.0 * scale).round() as i64).max(customers * 4 * PER_WINDOW);
        // Whole windows only.
        let events = events - events % PER_WINDOW;
        let aggregations = events / PER_WINDOW;
        let keys = customers * TYPES.len() as i64;
        // Two of the four event types are priced: their windows are charged.
        let charges = charged_windows(aggregations, keys, customers);
        Ok(Sizes {
            customers,
            events,
            aggregations,
            charges,
            invoices: customers * INVOICED_MONTHS,
        })
    }
}

/// Windows w in 0..aggregations whose key (w mod keys) falls on a priced type (key / customers < 2).
fn charged_windows(aggregations: i64, keys: i64, customers: i64) -> i64 {
    let full = aggregations / keys;
    let rest = aggregations % keys;
    full * 2 * customers + rest.min(2 * customers)
}

#[derive(Debug, Clone)]
enum P {
    Text(String),
    Time(DateTime<Utc>),
    Int(i64),
    Null,
}

impl P {
    /// As a SQL literal, for `EXECUTE name(…)`.
    fn literal(&self) -> String {
        match self {
            P::Text(s) => format!("'{}'", s.replace('\'', "''")),
            P::Time(t) => format!("'{}'", t.to_rfc3339()),
            P::Int(n) => n.to_string(),
            P::Null => "NULL".into(),
        }
    }
}

fn bind<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    params: &[P],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    for p in params {
        q = match p {
            P::Text(s) => q.bind(s.clone()),
            P::Time(t) => q.bind(*t),
            P::Int(n) => q.bind(*n),
            P::Null => q.bind(None::<String>),
        };
    }
    q
}

/// A query class of the seed, with its target and our goal (ms, at p99).
#[derive(Debug, Clone, Copy)]
struct Class {
    name: &'static str,
    seed_ms: f64,
    goal_ms: f64,
}

const POINT: Class = Class {
    name: "point",
    seed_ms: 5.0,
    goal_ms: 1.0,
};
const RANGE: Class = Class {
    name: "range",
    seed_ms: 50.0,
    goal_ms: 10.0,
};
const AGGREGATION: Class = Class {
    name: "aggregation",
    seed_ms: 500.0,
    goal_ms: 100.0,
};
const JOIN: Class = Class {
    name: "join",
    seed_ms: 1000.0,
    goal_ms: 200.0,
};

/// Random parameters for the queries.
struct Sampler {
    rng: SmallRng,
    customers: i64,
    invoice_ids: Vec<String>,
}

impl Sampler {
    fn customer(&mut self) -> String {
        let c = self.rng.random_range(0..self.customers);
        customer_id(c)
    }
    /// A month of 2024: (start, next month's start).
    fn month(&mut self, months: u32) -> (DateTime<Utc>, DateTime<Utc>) {
        let m = self.rng.random_range(0..months);
        month_start(m)
    }
    fn invoice(&mut self) -> String {
        let i = self.rng.random_range(0..self.invoice_ids.len());
        self.invoice_ids.get(i).cloned().unwrap_or_default()
    }
}

fn customer_id(c: i64) -> String {
    format!("cust_{:06}", c + 1)
}

fn month_start(m: u32) -> (DateTime<Utc>, DateTime<Utc>) {
    let jan = Utc
        .with_ymd_and_hms(2024, 1, 1, 0, 0, 0)
        .single()
        .unwrap_or_default();
    let start = jan + Months::new(m);
    (start, start + Months::new(1))
}

/// A SQL query of the scenario: its text and a parameter generator.
struct SqlQuery {
    name: &'static str,
    class: Class,
    sql: &'static str,
    params: fn(&mut Sampler) -> Vec<P>,
}

fn queries() -> Vec<SqlQuery> {
    vec![
        SqlQuery {
            name: "point_lookup",
            class: POINT,
            sql: "SELECT invoice_id, number, customer_id, billing_period_start, billing_period_end, status,
                         currency, subtotal, total, issued_at, voided_at, void_reason, line_items
                  FROM invoices WHERE invoice_id = $1",
            params: |s| vec![P::Text(s.invoice())],
        },
        SqlQuery {
            name: "range",
            class: RANGE,
            sql: "SELECT * FROM telemetry_events
                  WHERE customer_id = $1 AND event_time BETWEEN $2 AND $3",
            params: |s| {
                let (from, to) = s.month(12);
                vec![
                    P::Text(s.customer()),
                    P::Time(from),
                    P::Time(to - chrono::Duration::microseconds(1)),
                ]
            },
        },
        SqlQuery {
            name: "aggregation",
            class: AGGREGATION,
            sql: "SELECT meter, sum(value) AS usage, sum(event_count) AS events, count(*) AS windows
                  FROM aggregations
                  WHERE customer_id = $1 AND window_start >= $2 AND window_start < $3
                  GROUP BY meter ORDER BY meter",
            params: |s| {
                let (from, to) = s.month(12);
                vec![P::Text(s.customer()), P::Time(from), P::Time(to)]
            },
        },
        SqlQuery {
            name: "aggregation_month_all",
            class: AGGREGATION,
            sql: "SELECT meter, sum(value) AS usage, sum(event_count) AS events,
                         count(DISTINCT customer_id) AS customers
                  FROM aggregations
                  WHERE window_start >= $1 AND window_start < $2
                  GROUP BY meter ORDER BY meter",
            params: |s| {
                let (from, to) = s.month(12);
                vec![P::Time(from), P::Time(to)]
            },
        },
        SqlQuery {
            name: "aggregation_month_precomputed",
            class: AGGREGATION,
            // The same question for the priced meters, from what the pipeline pre-computes per
            // customer and period (upcoming_lines: Σ of the window charges' quantities).
            sql: "SELECT meter, sum(quantity) AS usage, sum(windows) AS windows,
                         count(DISTINCT customer_id) AS customers
                  FROM upcoming_lines
                  WHERE period_start = $1
                  GROUP BY meter ORDER BY meter",
            params: |s| {
                let (from, _) = s.month(12);
                vec![P::Time(from)]
            },
        },
        SqlQuery {
            name: "join",
            class: JOIN,
            sql: "SELECT c.currency, l.line->>'meter' AS meter, count(DISTINCT i.customer_id) AS customers,
                         count(*) AS lines, sum((l.line->>'amount')::numeric) AS billed
                  FROM invoices i
                  JOIN customers c ON c.customer_id = i.customer_id
                  CROSS JOIN LATERAL jsonb_array_elements(i.line_items) AS l(line)
                  WHERE i.billing_period_start = $1 AND i.status = 'issued'
                  GROUP BY 1, 2 ORDER BY 1, 2",
            params: |s| {
                let (from, _) = s.month(INVOICED_MONTHS as u32);
                vec![P::Time(from)]
            },
        },
    ]
}

/// The SQL the API runs for the timed GETs (api/src/aggregations.rs, api/src/charges.rs,
/// store/src/invoices.rs `list_invoices` / `get_invoice` + `with_details`), with the parameters of a
/// customer-scoped GET.
fn api_queries() -> Vec<SqlQuery> {
    vec![
        SqlQuery {
            name: "api_aggregations",
            class: RANGE,
            sql: "SELECT customer_id, meter, window_start, window_end, value, event_count, finalized, revision,
                         updated_at, quarantined
                  FROM aggregations
                  WHERE ($1::text IS NULL OR customer_id = $1)
                    AND ($2::text IS NULL OR meter = $2)
                    AND ($3::timestamptz IS NULL OR window_start >= $3)
                    AND ($4::timestamptz IS NULL OR window_start < $4)
                    AND ($5::text IS NULL OR (customer_id, meter, window_start) > ($5, $6, $7))
                  ORDER BY customer_id, meter, window_start
                  LIMIT $8",
            params: |s| {
                let (from, to) = s.month(12);
                vec![
                    P::Text(s.customer()),
                    P::Null,
                    P::Time(from),
                    P::Time(to),
                    P::Null,
                    P::Null,
                    P::Null,
                    P::Int(101),
                ]
            },
        },
        SqlQuery {
            name: "api_charges",
            class: RANGE,
            sql: "SELECT customer_id, meter, window_start, window_end, quantity, amount, currency, price_book_id,
                         revision, updated_at
                  FROM charges
                  WHERE ($1::text IS NULL OR customer_id = $1)
                    AND ($2::text IS NULL OR meter = $2)
                    AND ($3::timestamptz IS NULL OR window_start >= $3)
                    AND ($4::timestamptz IS NULL OR window_start < $4)
                    AND ($5::text IS NULL OR (customer_id, meter, window_start) > ($5, $6, $7))
                  ORDER BY customer_id, meter, window_start
                  LIMIT $8",
            params: |s| {
                let (from, to) = s.month(12);
                vec![
                    P::Text(s.customer()),
                    P::Null,
                    P::Time(from),
                    P::Time(to),
                    P::Null,
                    P::Null,
                    P::Null,
                    P::Int(101),
                ]
            },
        },
        SqlQuery {
            name: "api_invoices_list",
            class: RANGE,
            sql: "SELECT invoice_id, number, customer_id, billing_period_start, billing_period_end, status,
                         currency, subtotal, total, issued_at, voided_at, void_reason, line_items
                  FROM invoices
                  WHERE ($1::text IS NULL OR customer_id = $1)
                    AND ($2::timestamptz IS NULL OR billing_period_start >= $2)
                    AND ($3::timestamptz IS NULL OR billing_period_start < $3)
                    AND ($4::text IS NULL OR status = $4)
                    AND ($5::bigint IS NULL OR number > $5)
                  ORDER BY number LIMIT $6",
            params: |s| {
                vec![
                    P::Text(s.customer()),
                    P::Null,
                    P::Null,
                    P::Null,
                    P::Null,
                    P::Int(101),
                ]
            },
        },
        SqlQuery {
            name: "api_invoice_get",
            class: POINT,
            sql: "SELECT invoice_id, number, customer_id, billing_period_start, billing_period_end, status,
                         currency, subtotal, total, issued_at, voided_at, void_reason, line_items
                  FROM invoices WHERE invoice_id = $1",
            params: |s| vec![P::Text(s.invoice())],
        },
        SqlQuery {
            name: "api_invoice_adjustments",
            class: POINT,
            sql: "SELECT invoice_id, original_invoice_id, period_start, meter, price_book_id, amount, reason
                  FROM invoice_adjustments WHERE invoice_id = ANY(ARRAY[$1]) ORDER BY invoice_id, position",
            params: |s| vec![P::Text(s.invoice())],
        },
    ]
}

/// An HTTP GET of the scenario.
struct HttpQuery {
    name: &'static str,
    class: Class,
    /// The seed's API table (p99), when it names the endpoint.
    seed_api_ms: Option<f64>,
    path: fn(&mut Sampler) -> String,
}

fn http_queries() -> Vec<HttpQuery> {
    fn month_filter(s: &mut Sampler) -> String {
        let (from, to) = s.month(12);
        format!(
            "customer_id={}&from={}&to={}&limit=100",
            s.customer(),
            from.format("%Y-%m-%dT%H:%M:%SZ"),
            to.format("%Y-%m-%dT%H:%M:%SZ")
        )
    }
    vec![
        HttpQuery {
            name: "http_aggregations",
            class: RANGE,
            seed_api_ms: Some(100.0),
            path: |s| format!("/api/v1/aggregations?{}", month_filter(s)),
        },
        HttpQuery {
            name: "http_charges",
            class: RANGE,
            seed_api_ms: Some(100.0),
            path: |s| format!("/api/v1/charges?{}", month_filter(s)),
        },
        HttpQuery {
            name: "http_invoices",
            class: RANGE,
            seed_api_ms: Some(200.0),
            path: |s| format!("/api/v1/invoices?customer_id={}&limit=100", s.customer()),
        },
        HttpQuery {
            name: "http_invoice_by_id",
            class: POINT,
            seed_api_ms: Some(200.0),
            path: |s| format!("/api/v1/invoices/{}", s.invoice()),
        },
    ]
}

#[derive(Debug, Clone, serde::Serialize)]
struct Timing {
    query: String,
    kind: &'static str,
    class: &'static str,
    iterations: usize,
    rows_p50: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    seed_target_ms: f64,
    goal_ms: f64,
    seed_api_ms: Option<f64>,
    seed_pass: bool,
    goal_pass: bool,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank.
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted.get(rank - 1).copied().unwrap_or(f64::NAN)
}

fn timing(
    query: &str,
    kind: &'static str,
    class: Class,
    seed_api_ms: Option<f64>,
    mut ms: Vec<f64>,
    mut rows: Vec<f64>,
) -> Timing {
    ms.sort_by(f64::total_cmp);
    rows.sort_by(f64::total_cmp);
    let p99 = percentile(&ms, 0.99);
    // Over HTTP the seed's own figure is its API table's; a SQL query has its class's.
    let seed = seed_api_ms.unwrap_or(class.seed_ms);
    Timing {
        query: query.to_owned(),
        kind,
        class: class.name,
        iterations: ms.len(),
        rows_p50: percentile(&rows, 0.5),
        p50_ms: percentile(&ms, 0.5),
        p99_ms: p99,
        max_ms: ms.last().copied().unwrap_or(f64::NAN),
        seed_target_ms: seed,
        goal_ms: class.goal_ms,
        seed_api_ms,
        seed_pass: p99 < seed,
        goal_pass: p99 < class.goal_ms,
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let sizes = Sizes::at(args.scale)?;
    let started = Utc::now();
    let admin = &args.services.database_url;
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    let name = match &args.database {
        Some(n) => {
            if n.is_empty()
                || !n
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                bail!("--database must be lower-case letters, digits and _");
            }
            n.clone()
        }
        None => format!("mf_perf_db_{}", started.timestamp()),
    };
    let url = format!("{base}/{name}");
    eprintln!(
        "db_scenario: database {name}, scale {} = {} customers, {} events, {} aggregations, {} charges, {} invoices",
        args.scale, sizes.customers, sizes.events, sizes.aggregations, sizes.charges, sizes.invoices
    );

    let seed_seconds = prepare(&args, admin, &name, &url, sizes).await?;
    let result = measure(&args, &url, sizes, seed_seconds, started).await;
    if !args.keep {
        drop_database(admin, &url).await?;
    } else {
        eprintln!("db_scenario: kept database {name} (rerun with --database {name} --keep)");
    }
    result
}

/// Creates and seeds the database, or reuses a kept one seeded at the same scale. Returns the seeding
/// time (None: reused).
async fn prepare(
    args: &Args,
    admin_url: &str,
    name: &str,
    url: &str,
    sizes: Sizes,
) -> Result<Option<f64>> {
    let mut admin = PgConnection::connect(admin_url)
        .await
        .context("connecting to Postgres (deploy/local/up)")?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut admin)
            .await?;
    if exists && args.keep {
        let mut conn = PgConnection::connect(url).await?;
        let seeded: Option<f64> = sqlx::query_scalar(
            "SELECT scale FROM perf_db_seed WHERE EXISTS (SELECT 1 FROM pg_tables WHERE tablename = 'perf_db_seed')",
        )
        .fetch_optional(&mut conn)
        .await
        .ok()
        .flatten();
        conn.close().await?;
        match seeded {
            Some(s) if (s - args.scale).abs() < 1e-12 => {
                // Migrations added since (indexes) apply to the kept data too.
                let pool = PgPool::connect(url).await?;
                meterflow_sinks::MIGRATOR.run(&pool).await?;
                pool.close().await;
                eprintln!("db_scenario: reusing {name}, seeded at scale {s}");
                return Ok(None);
            }
            Some(s) => bail!(
                "database {name} was seeded at scale {s}, not {}: pick another --database",
                args.scale
            ),
            None => {
                eprintln!("db_scenario: {name} exists but was not seeded completely: recreating it")
            }
        }
    }
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
        .execute(&mut admin)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await?;
    admin.close().await?;
    let pool = PgPool::connect(url).await?;
    meterflow_sinks::MIGRATOR.run(&pool).await?;
    pool.close().await;
    let took = seed(url, sizes).await?;
    let mut conn = PgConnection::connect(url).await?;
    sqlx::query("CREATE TABLE perf_db_seed (scale float8 NOT NULL, seconds float8 NOT NULL, seeded_at timestamptz NOT NULL DEFAULT now())")
        .execute(&mut conn)
        .await?;
    sqlx::query("INSERT INTO perf_db_seed (scale, seconds) VALUES ($1, $2)")
        .bind(args.scale)
        .bind(took.as_secs_f64())
        .execute(&mut conn)
        .await?;
    Ok(Some(took.as_secs_f64()))
}

/// The events of `generate_series(lo, hi - 1)`: i → window w = i / 10; key = w mod (customers × 4)
/// gives the customer and event type; w / keys the window's rank (0..25) over 2024, each rank 350 hours
/// apart and staggered by customer and type; ten events per window, spread over its hour.
const EVENTS: &str = "SELECT format('evt_%s', lpad(i::text, 10, '0')) AS event_id,
        format('cust_%s', lpad((c + 1)::text, 6, '0')) AS customer_id,
        (ARRAY['api_call', 'storage_gb', 'tokens', 'compute_seconds'])[t + 1] AS event_type,
        timestamptz '2024-01-01 00:00:00+00'
          + ((k * 350 + (c * 7 + t * 13) % 350) * 3600 + ((i % 10) * 331 + c * 17) % 3600)
            * interval '1 second' AS event_time,
        (CASE t WHEN 0 THEN 1 WHEN 1 THEN ((i * 7) % 1000) / 100.0 WHEN 2 THEN (i * 7919) % 5000
                ELSE ((i * 13) % 600) / 10.0 END)::numeric AS value,
        format('{\"region\":\"%s\"}', (ARRAY['eu', 'us', 'ap'])[(i % 3)::int + 1])::json AS properties,
        i, c
    FROM (SELECT i, (i / 10) % $3 % $4 AS c, ((i / 10) % $3 / $4)::int AS t, (i / 10) / $3 AS k
          FROM generate_series($1::bigint, $2::bigint - 1) AS i) AS g";

async fn seed(url: &str, sizes: Sizes) -> Result<Duration> {
    let started = Instant::now();
    let options = PgConnectOptions::from_str(url)?.options([
        ("timezone", "UTC"),
        ("synchronous_commit", "off"),
        ("work_mem", "256MB"),
        ("maintenance_work_mem", "512MB"),
    ]);
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await?;
    let step = |what: &str, t: Instant| {
        eprintln!("  seeded {what} in {:.1} s", t.elapsed().as_secs_f64());
    };

    let t = Instant::now();
    sqlx::query(
        r#"INSERT INTO price_books (price_book_id, meter, currency, effective, model, minimum_per_period)
           VALUES ('pb_api_call', 'api_call', 'USD', tstzrange('2023-01-01', NULL, '[)'),
                   '{"type":"per_unit","unit_price":"0.002"}', NULL),
                  ('pb_storage_gb', 'storage_gb', 'USD', tstzrange('2023-01-01', NULL, '[)'),
                   '{"type":"per_unit","unit_price":"0.023"}', NULL)"#,
    )
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO customers (customer_id, name, email, address, currency, created_at, updated_at)
         SELECT format('cust_%s', lpad(i::text, 6, '0')), format('Customer %s Ltd', i),
                format('billing@c%s.example', i), format(E'%s Main Street\\nSpringfield', i), 'USD',
                timestamptz '2023-12-01 00:00:00+00' + i * interval '1 minute',
                timestamptz '2023-12-01 00:00:00+00' + i * interval '1 minute'
         FROM generate_series(1, $1) AS i",
    )
    .bind(sizes.customers)
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO customer_event_types (customer_id, event_type, first_seen)
         SELECT c.customer_id, t, timestamptz '2024-01-01 00:00:00+00'
         FROM customers c CROSS JOIN unnest(ARRAY['api_call', 'storage_gb', 'tokens', 'compute_seconds']) AS t",
    )
    .execute(&pool)
    .await?;
    step("customers, price books", t);

    // The seed fills customer_event_types itself (above), as the writers of events do through
    // meterflow_note_event_types (migration 0016).
    let t = Instant::now();
    let keys = sizes.customers * TYPES.len() as i64;
    const CHUNK: i64 = 500_000;
    let chunks: Vec<(i64, i64)> = (0..sizes.events)
        .step_by(CHUNK as usize)
        .map(|lo| (lo, (lo + CHUNK).min(sizes.events)))
        .collect();
    let total = chunks.len();
    let done = std::sync::atomic::AtomicUsize::new(0);
    futures::stream::iter(chunks.into_iter().map(Ok::<_, anyhow::Error>))
        .try_for_each_concurrent(2, |(lo, hi)| {
            let pool = pool.clone();
            let done = &done;
            async move {
                let events = format!(
                    "INSERT INTO telemetry_events (event_id, customer_id, event_type, event_time, value,
                                                   properties, received_at)
                     SELECT event_id, customer_id, event_type, event_time, value, properties,
                            event_time + interval '2 seconds'
                     FROM ({EVENTS}) AS e"
                );
                let ids = format!(
                    "INSERT INTO event_ids (event_id, event_time, fingerprint, source, counted_partition,
                                            counted_offset, created_at)
                     SELECT event_id, event_time, (i * 2654435761) % 9007199254740991, 'kafka',
                            (c % 8)::int, i, event_time + interval '3 seconds'
                     FROM ({EVENTS}) AS e"
                );
                for sql in [events, ids] {
                    sqlx::query(&sql)
                        .bind(lo)
                        .bind(hi)
                        .bind(keys)
                        .bind(sizes.customers)
                        .execute(&pool)
                        .await?;
                }
                let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if n.is_multiple_of(4) || n == total {
                    eprintln!("  events: {n}/{total} chunks of {CHUNK}");
                }
                Ok(())
            }
        })
        .await?;
    step("telemetry_events + event_ids", t);

    // Aggregations: the hourly GROUP BY of the events, as the pipeline commits them (finalized), one
    // month at a time, two at once.
    let t = Instant::now();
    futures::stream::iter((0..12u32).map(Ok::<_, anyhow::Error>))
        .try_for_each_concurrent(2, |m| {
            let pool = pool.clone();
            async move {
                let (from, to) = month_start(m);
                sqlx::query(
                    "INSERT INTO aggregations (customer_id, meter, window_start, window_end, value, event_count,
                                               finalized, revision, updated_at)
                     SELECT customer_id, event_type, date_trunc('hour', event_time),
                            date_trunc('hour', event_time) + interval '1 hour', sum(value), count(*), true, 1,
                            max(received_at) + interval '1 hour 5 minutes'
                     FROM telemetry_events WHERE event_time >= $1 AND event_time < $2
                     GROUP BY 1, 2, 3",
                )
                .bind(from)
                .bind(to)
                .execute(&pool)
                .await?;
                Ok(())
            }
        })
        .await?;
    step("aggregations", t);

    let t = Instant::now();
    sqlx::query(
        "INSERT INTO charges (customer_id, meter, window_start, window_end, quantity, amount, currency,
                              price_book_id, revision, updated_at)
         SELECT a.customer_id, a.meter, a.window_start, a.window_end, a.value,
                a.value * (b.model->>'unit_price')::numeric, 'USD', b.price_book_id, 1, a.updated_at
         FROM aggregations a JOIN price_books b ON b.meter = a.meter",
    )
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO upcoming_lines (customer_id, period_start, meter, price_book_id, currency, quantity, amount,
                                     windows, updated_at)
         SELECT customer_id, date_trunc('month', window_start), meter, price_book_id, 'USD', sum(quantity),
                sum(amount), count(*), max(updated_at)
         FROM charges GROUP BY 1, 2, 3, 4",
    )
    .execute(&pool)
    .await?;
    step("charges + upcoming_lines", t);

    // Invoices: every customer, January..May 2024, numbered in issue order; lines as the issuer writes
    // them (model::InvoiceLine, decimals as strings), one per priced meter with usage.
    let t = Instant::now();
    sqlx::query(
        "INSERT INTO invoices (invoice_id, number, customer_id, billing_period_start, billing_period_end, status,
                               currency, line_items, subtotal, total, issued_at)
         SELECT 'inv_' || substr(md5('inv_' || x.n), 1, 16), x.n, x.customer_id, x.ps,
                x.ps + interval '1 month', 'issued', 'USD', coalesce(l.lines, '[]'::jsonb),
                coalesce(l.subtotal, 0), coalesce(l.subtotal, 0),
                x.ps + interval '1 month 1 day' + x.n * interval '10 milliseconds'
         FROM (SELECT row_number() OVER (ORDER BY m, c.customer_id) AS n, c.customer_id,
                      timestamptz '2024-01-01 00:00:00+00' + m * interval '1 month' AS ps
               FROM customers c CROSS JOIN generate_series(0, $1 - 1) AS m) AS x
         LEFT JOIN LATERAL (
             SELECT jsonb_agg(jsonb_build_object(
                        'meter', u.meter, 'kind', 'usage', 'description', u.meter || ' usage',
                        'quantity', u.quantity::text,
                        'unit_price_summary', 'per unit: ' || (b.model->>'unit_price'),
                        'amount', round(u.amount, 2)::text, 'price_book_id', u.price_book_id)
                      ORDER BY u.meter) AS lines,
                    sum(round(u.amount, 2)) AS subtotal
             FROM upcoming_lines u JOIN price_books b ON b.price_book_id = u.price_book_id
             WHERE u.customer_id = x.customer_id AND u.period_start = x.ps) AS l ON true",
    )
    .bind(INVOICED_MONTHS)
    .execute(&pool)
    .await?;
    sqlx::query(
        "UPDATE invoice_numbers SET last_number = (SELECT coalesce(max(number), 0) FROM invoices)",
    )
    .execute(&pool)
    .await?;
    step("invoices", t);

    let t = Instant::now();
    sqlx::query("VACUUM (ANALYZE)").execute(&pool).await?;
    step("VACUUM ANALYZE", t);
    pool.close().await;
    let took = started.elapsed();
    eprintln!("db_scenario: seeded in {:.1} s", took.as_secs_f64());
    Ok(took)
}

async fn counts(conn: &mut PgConnection) -> Result<Value> {
    let mut out = serde_json::Map::new();
    for table in [
        "customers",
        "telemetry_events",
        "event_ids",
        "aggregations",
        "charges",
        "upcoming_lines",
        "invoices",
    ] {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&mut *conn)
            .await?;
        out.insert(table.to_owned(), json!(n));
    }
    let lines: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(jsonb_array_length(line_items)), 0)::bigint FROM invoices",
    )
    .fetch_one(&mut *conn)
    .await?;
    out.insert("invoice_lines".into(), json!(lines));
    let bytes: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
        .fetch_one(&mut *conn)
        .await?;
    out.insert("database_bytes".into(), json!(bytes));
    Ok(Value::Object(out))
}

async fn measure(
    args: &Args,
    url: &str,
    sizes: Sizes,
    seed_seconds: Option<f64>,
    started: DateTime<Utc>,
) -> Result<()> {
    let options = PgConnectOptions::from_str(url)?;
    let mut conn = PgConnection::connect_with(&options).await?;
    let rows = counts(&mut conn).await?;
    eprintln!("db_scenario: rows {rows}");
    let invoice_ids: Vec<String> = sqlx::query_scalar(
        "SELECT invoice_id FROM invoices WHERE number % greatest((SELECT count(*) FROM invoices) / 2000, 1) = 0",
    )
    .fetch_all(&mut conn)
    .await?;
    if invoice_ids.is_empty() {
        bail!("no invoices in the database");
    }
    let mut sampler = Sampler {
        rng: SmallRng::seed_from_u64(args.rng_seed),
        customers: sizes.customers,
        invoice_ids,
    };

    let mut timings = Vec::new();
    for q in queries() {
        let mut ms = Vec::with_capacity(args.iterations);
        let mut rows = Vec::with_capacity(args.iterations);
        for n in 0..args.warmup + args.iterations {
            let params = (q.params)(&mut sampler);
            let t = Instant::now();
            let got = bind(sqlx::query(q.sql), &params)
                .fetch_all(&mut conn)
                .await?;
            let took = t.elapsed().as_secs_f64() * 1e3;
            if n >= args.warmup {
                ms.push(took);
                rows.push(got.len() as f64);
            }
        }
        let t = timing(q.name, "sql", q.class, None, ms, rows);
        println!("{}", json!({"bench": "db", "result": &t}));
        timings.push(t);
    }

    if !args.no_http {
        let api = spawn_api(args, url)?;
        let base = format!("http://{}", args.api_addr);
        wait_ready(&base).await?;
        let client = reqwest::Client::new();
        for q in http_queries() {
            let mut ms = Vec::with_capacity(args.iterations);
            let mut rows = Vec::with_capacity(args.iterations);
            for n in 0..args.warmup + args.iterations {
                let path = (q.path)(&mut sampler);
                let t = Instant::now();
                let response = client.get(format!("{base}{path}")).send().await?;
                let status = response.status();
                let body: Value = response.json().await?;
                let took = t.elapsed().as_secs_f64() * 1e3;
                if !status.is_success() {
                    bail!("GET {path}: {status} {body}");
                }
                let n_rows = body
                    .get("data")
                    .and_then(Value::as_array)
                    .map_or(1, |d| d.len());
                if n >= args.warmup {
                    ms.push(took);
                    rows.push(n_rows as f64);
                }
            }
            let t = timing(q.name, "http", q.class, q.seed_api_ms, ms, rows);
            println!("{}", json!({"bench": "db", "result": &t}));
            timings.push(t);
        }
        drop(api);
    }

    // EXPLAIN every query, custom and generic plans.
    let date = started.format("%Y-%m-%d").to_string();
    std::fs::create_dir_all(&args.results)
        .with_context(|| format!("creating {}", args.results.display()))?;
    let explain_path = args.results.join(format!("db-explain-{date}.txt"));
    let mut text = format!(
        "# db_scenario EXPLAIN (ANALYZE, BUFFERS), {}; sizes {}\n# rows {rows}\n",
        started.to_rfc3339(),
        serde_json::to_string(&sizes)?
    );
    let mut plans = Vec::new();
    for q in queries().into_iter().chain(api_queries()) {
        let params = (q.params)(&mut sampler);
        let earlier: Vec<Vec<P>> = (0..6).map(|_| (q.params)(&mut sampler)).collect();
        for mode in ["auto", "force_custom_plan", "force_generic_plan"] {
            let plan = explain(&mut conn, q.sql, &earlier, &params, mode).await?;
            let check = check_plan(&plan);
            let _ = writeln!(
                text,
                "\n===== {} ({mode}) — {} =====\n-- params: {}\n{}\n{}",
                q.name,
                check.verdict(),
                params.iter().map(P::literal).collect::<Vec<_>>().join(", "),
                q.sql,
                plan
            );
            let line = json!({"bench": "db", "explain": q.name, "plan_cache_mode": mode,
                "ok": check.ok(), "scans": check.scans, "big_table_scans_not_served_by_an_index": check.big_seq,
                "event_partitions": check.partitions, "subplans_removed": check.removed,
                "execution_ms": check.execution_ms});
            println!("{line}");
            plans.push(line);
        }
    }
    std::fs::write(&explain_path, &text)
        .with_context(|| format!("writing {}", explain_path.display()))?;
    eprintln!("db_scenario: plans written to {}", explain_path.display());

    let summary = json!({
        "bench": "db",
        "date": started.to_rfc3339(),
        "machine": {"host": shell(&["uname", "-n"]), "nproc": std::thread::available_parallelism().map_or(0, |n| n.get()),
                    "kernel": shell(&["uname", "-r"])},
        "commit": shell(&["git", "rev-parse", "--short", "HEAD"]),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "scale": args.scale,
        "sizes": sizes,
        "rows": rows,
        "seed_seconds": seed_seconds,
        "iterations": args.iterations,
        "warmup": args.warmup,
        "thresholds": {"seed_ms": {"point": 5, "range": 50, "aggregation": 500, "join": 1000,
                                    "api_p99": {"aggregations": 100, "charges": 100, "invoices": 200}},
                       "goal_p99_ms": {"point": 1, "range": 10, "aggregation": 100, "join": 200}},
        "results": timings,
        "plans": plans,
        "explain_file": explain_path.display().to_string(),
        "seed_pass": timings.iter().all(|t| t.seed_pass),
        "goal_pass": timings.iter().all(|t| t.goal_pass),
        // What the application's prepared statements get (auto); the forced generic plans are shown
        // for information (Postgres keeps custom plans while a generic one is estimated dearer).
        "plans_ok": plans.iter()
            .filter(|p| p.get("plan_cache_mode").and_then(Value::as_str) == Some("auto"))
            .all(|p| p.get("ok") == Some(&Value::Bool(true))),
    });
    let path = args
        .results
        .join(format!("db-{}.json", started.format("%Y%m%dT%H%M%SZ")));
    std::fs::write(&path, serde_json::to_string_pretty(&summary)?)
        .with_context(|| format!("writing {}", path.display()))?;

    eprintln!("\ndb_scenario summary (p99 against the seed's target and our goal):");
    for t in &timings {
        eprintln!(
            "  {:<24} p50 {:>8.2} ms  p99 {:>8.2} ms  seed < {:>5} ms {}  goal < {:>4} ms {}",
            t.query,
            t.p50_ms,
            t.p99_ms,
            t.seed_api_ms.unwrap_or(t.seed_target_ms),
            if t.seed_pass { "pass" } else { "FAIL" },
            t.goal_ms,
            if t.goal_pass { "pass" } else { "FAIL" },
        );
    }
    for p in &plans {
        eprintln!(
            "  plan {:<26} {:<19} {}",
            p.get("explain").and_then(Value::as_str).unwrap_or(""),
            p.get("plan_cache_mode")
                .and_then(Value::as_str)
                .unwrap_or(""),
            if p.get("ok") == Some(&Value::Bool(true)) {
                "index/pruning"
            } else {
                "A BIG TABLE READ WITHOUT ITS INDEX"
            }
        );
    }
    if let Some(s) = seed_seconds {
        eprintln!("  seeding took {s:.1} s");
    }
    eprintln!("db_scenario: summary written to {}", path.display());
    println!(
        "{}",
        json!({"bench": "db", "summary": path.display().to_string(),
        "seed_pass": summary.get("seed_pass"), "goal_pass": summary.get("goal_pass"),
        "plans_ok": summary.get("plans_ok")})
    );
    Ok(())
}

fn shell(cmd: &[&str]) -> String {
    let Some((program, rest)) = cmd.split_first() else {
        return String::new();
    };
    Command::new(program)
        .args(rest)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn spawn_api(args: &Args, url: &str) -> Result<Proc> {
    let child = Command::new(&args.services.meterflow)
        .arg("api")
        .env("MF_DATABASE_URL", url)
        .env("MF_KAFKA_BROKERS", &args.services.brokers)
        .env("MF_EVENTS_TOPIC", "perf.db-scenario")
        .env("MF_API_ADDR", &args.api_addr)
        .env("MF_LOG", "warn")
        .env("MF_AUTH", "off")
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| {
            format!(
                "starting {} api (cargo build --release first)",
                args.services.meterflow
            )
        })?;
    Ok(Proc(child))
}

/// `EXPLAIN (ANALYZE, BUFFERS)` of `sql` as a prepared statement executed with `params`, under
/// `plan_cache_mode`: `auto` after six executions with `earlier` parameters is the plan an
/// application's prepared statement (sqlx prepares every statement) actually gets from then on, custom
/// or generic as Postgres chooses; `force_custom_plan`: planned for these values; `force_generic_plan`:
/// the plan reused for any values.
async fn explain(
    conn: &mut PgConnection,
    sql: &str,
    earlier: &[Vec<P>],
    params: &[P],
    mode: &str,
) -> Result<String> {
    sqlx::raw_sql("DEALLOCATE ALL").execute(&mut *conn).await?;
    sqlx::raw_sql(&format!("SET plan_cache_mode = {mode}"))
        .execute(&mut *conn)
        .await?;
    sqlx::raw_sql(&format!("PREPARE db_scenario_q AS {sql}"))
        .execute(&mut *conn)
        .await?;
    let execute = |params: &[P]| {
        let literals = params.iter().map(P::literal).collect::<Vec<_>>().join(", ");
        if params.is_empty() {
            "EXECUTE db_scenario_q".to_owned()
        } else {
            format!("EXECUTE db_scenario_q({literals})")
        }
    };
    if mode == "auto" {
        for p in earlier {
            sqlx::raw_sql(&execute(p)).execute(&mut *conn).await?;
        }
    }
    let rows = sqlx::raw_sql(&format!("EXPLAIN (ANALYZE, BUFFERS) {}", execute(params)))
        .fetch_all(&mut *conn)
        .await?;
    let mut plan = String::new();
    for row in rows {
        let line: String = row.try_get(0)?;
        plan.push_str(&line);
        plan.push('\n');
    }
    sqlx::raw_sql("DEALLOCATE db_scenario_q; RESET plan_cache_mode")
        .execute(&mut *conn)
        .await?;
    Ok(plan)
}

/// Tables big enough that a Seq Scan of them is a missing index (customers, 10k rows, is not: a
/// period's report joins all of them).
const BIG: [&str; 6] = [
    "telemetry_events",
    "event_ids",
    "aggregations",
    "charges",
    "upcoming_lines",
    "invoices",
];

/// A scan of a big table that keeps less than this share of the rows it reads is a missing index.
const SEQ_SCAN_SHARE: f64 = 0.1;

/// The actual rows (per loop) of a plan node's line.
fn actual_rows(line: &str) -> f64 {
    let Some(actual) = line.split("(actual ").nth(1) else {
        return 0.0;
    };
    let field = |name: &str| {
        actual
            .split(name)
            .nth(1)
            .and_then(|r| r.split([' ', ')']).next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    field("rows=").unwrap_or(0.0)
}

struct PlanCheck {
    scans: Vec<String>,
    big_seq: Vec<String>,
    partitions: usize,
    removed: i64,
    execution_ms: f64,
}

impl PlanCheck {
    fn ok(&self) -> bool {
        // A month of raw events lies in one partition (two when a range touches the next month).
        self.big_seq.is_empty() && self.partitions <= 2
    }
    fn verdict(&self) -> String {
        let mut v = if self.ok() {
            "OK: index scans / pruning".to_owned()
        } else {
            "NOT OK".to_owned()
        };
        if !self.big_seq.is_empty() {
            let _ = write!(v, "; {}", self.big_seq.join("; "));
        }
        if self.partitions > 0 || self.removed > 0 {
            let _ = write!(
                v,
                "; telemetry_events partitions scanned: {} (subplans removed at run time: {})",
                self.partitions, self.removed
            );
        }
        v
    }
}

fn check_plan(plan: &str) -> PlanCheck {
    let mut scans = Vec::new();
    let mut big_seq = Vec::new();
    let mut partitions = BTreeSet::new();
    let mut removed = 0;
    let mut execution_ms = f64::NAN;
    let mut pending: Option<(bool, String, f64)> = None;
    for line in plan.lines() {
        let l = line.trim_start().trim_start_matches("->").trim_start();
        if let Some(rest) = l.strip_prefix("Subplans Removed:") {
            removed += rest.trim().parse::<i64>().unwrap_or(0);
        }
        if let Some(rest) = l.strip_prefix("Execution Time:") {
            execution_ms = rest
                .trim()
                .trim_end_matches("ms")
                .trim()
                .parse()
                .unwrap_or(f64::NAN);
        }
        let kinds = [
            "Parallel Seq Scan",
            "Seq Scan",
            "Parallel Index Only Scan",
            "Parallel Index Scan",
            "Index Only Scan",
            "Index Scan",
            "Parallel Bitmap Heap Scan",
            "Bitmap Heap Scan",
            "Bitmap Index Scan",
        ];
        // A Seq Scan that keeps a large share of its table (a period report reading a fifth of all
        // invoices) is the right plan, not a missing index; an Index Scan that filters away most of
        // what it reads (a generic plan walking a whole primary key in order) is as bad as a Seq
        // Scan. The node's "Rows Removed by Filter" says which (both per loop, as its rows).
        if let Some(rest) = l.strip_prefix("Rows Removed by Filter:") {
            if let Some((seq, table, kept)) = pending.take() {
                let removed: f64 = rest.trim().parse().unwrap_or(0.0);
                let share = kept / (kept + removed).max(1.0);
                let what = if seq { "Seq Scan" } else { "Index Scan" };
                if share < SEQ_SCAN_SHARE && (seq || removed >= 1000.0) {
                    big_seq.push(format!(
                        "{what} on {table} kept {:.2}% of the {} rows it read",
                        share * 100.0,
                        kept + removed
                    ));
                } else {
                    scans.push(format!(
                        "({what} on {table} kept {:.0}% of the rows it read)",
                        share * 100.0
                    ));
                }
            }
            continue;
        }
        let Some(kind) = kinds.iter().find(|k| l.starts_with(*k)) else {
            continue;
        };
        if let Some((seq, table, _)) = pending.take() {
            if seq {
                // No filter: the whole table was wanted.
                scans.push(format!("(Seq Scan on {table} kept every row)"));
            }
        }
        // "<kind> [Backward] [using <index>] on <table> [alias]  (cost=…"
        let head = l.split("  (").next().unwrap_or(l);
        let table = head
            .split(" on ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .unwrap_or("");
        let index = head
            .split(" using ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next());
        scans.push(match index {
            Some(i) => format!("{kind} {table} using {i}"),
            None if table.is_empty() => head.to_owned(),
            None => format!("{kind} {table}"),
        });
        if table.starts_with("telemetry_events") && *kind != "Bitmap Index Scan" {
            partitions.insert(table.to_owned());
        }
        let big = BIG.iter().any(|b| {
            table == *b || (*b == "telemetry_events" && table.starts_with("telemetry_events_"))
        });
        if big && !kind.starts_with("Bitmap Index") {
            pending = Some((kind.contains("Seq Scan"), table.to_owned(), actual_rows(l)));
        }
    }
    if let Some((true, table, _)) = pending.take() {
        scans.push(format!("(Seq Scan on {table} kept every row)"));
    }
    PlanCheck {
        scans,
        big_seq,
        partitions: partitions.len(),
        removed,
        execution_ms,
    }
}
