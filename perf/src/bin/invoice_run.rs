//! `invoice_run`: the seed's monthly invoice run (`../shared/PERF.md`; seed: 10,000 customers in < 5 min,
//! goal < 10 s, < 1 MB per invoice). Measures invoicing, not metering: each run seeds a fresh database
//! directly with the customers, three price books and the customers' `upcoming_lines` for January 2024
//! (as the pipeline would have left them), then times `meterflow invoice-run --period 2024-01` under
//! `/usr/bin/time -v` (wall time of the whole process, start-up included; peak RSS), checks the result
//! (one issued invoice per registered customer, numbers exactly 1..=N) and measures the Postgres
//! footprint of the invoice tables.
//!
//! Baseline, in the same run on an identically seeded database: a naive client issuing one invoice per
//! customer through `POST /api/v1/invoices` of a `meterflow api`, one request at a time.
//!
//! Seed per customer: api_calls (graduated, 3 tiers), storage_gb (per unit, a minimum of 5.00: about half
//! of the customers get a top-up line) and, for every other customer, tokens (per unit): 2.5 usage
//! lines on average. Plus 1% as many unregistered customers with usage (reported, not invoiced).
//!
//!     cargo build --release -p meterflow -p meterflow-perf && target/release/invoice_run --runs 3

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use meterflow_perf::{drop_database, fresh_database, median, rate, Services};
use sqlx::{Connection, PgConnection};

#[derive(Debug, Parser)]
#[command(
    about = "A monthly invoice run for N customers: `meterflow invoice-run` vs one POST per customer"
)]
struct Args {
    /// Registered customers.
    #[arg(long, default_value_t = 10_000)]
    customers: i64,
    /// Runs of each side (the medians are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Passed to `meterflow invoice-run --batch-size` (its default when absent).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Measure meterflow only.
    #[arg(long)]
    no_baseline: bool,
    /// Where the baseline's `meterflow api` listens.
    #[arg(long, default_value = "127.0.0.1:3917")]
    api_addr: String,
    #[command(flatten)]
    services: Services,
}

const PERIOD_START: &str = "2024-01-01T00:00:00Z";
const PERIOD_END: &str = "2024-02-01T00:00:00Z";

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut ours = Vec::new();
    let mut baseline = Vec::new();
    let mut bytes_per_invoice = Vec::new();
    let mut peak_rss_mb = Vec::new();
    for run in 0..args.runs {
        let url = fresh_database(&args.services.database_url, "mf_perf_invoice", run).await?;
        let seeded = seed(&url, args.customers).await?;
        let (took, rss_kb, stdout) = invoice_run(&args, &url)?;
        let issued = check(&url, args.customers).await?;
        let (invoice_bytes, run_bytes) = footprint(&url).await?;
        let r = rate(issued as u64, took);
        let per_invoice = invoice_bytes as f64 / issued as f64;
        println!(
            "{}",
            serde_json::json!({"bench": "invoice_run", "side": "meterflow", "run": run,
                "customers": args.customers, "seed_seconds": seeded.as_secs_f64(),
                "seconds": took.as_secs_f64(), "invoices_per_s": r,
                "invoice_table_bytes": invoice_bytes, "bytes_per_invoice": per_invoice,
                "run_item_bytes": run_bytes, "peak_rss_kb": rss_kb,
                "summary": stdout.lines().collect::<Vec<_>>()})
        );
        ours.push(r);
        bytes_per_invoice.push(per_invoice);
        peak_rss_mb.push(rss_kb as f64 / 1024.0);
        drop_database(&args.services.database_url, &url).await?;
        if args.no_baseline {
            continue;
        }

        let url = fresh_database(&args.services.database_url, "mf_perf_invoice_base", run).await?;
        seed(&url, args.customers).await?;
        let took = one_post_per_customer(&args, &url).await?;
        let issued = check(&url, args.customers).await?;
        let r = rate(issued as u64, took);
        println!(
            "{}",
            serde_json::json!({"bench": "invoice_run", "side": "baseline", "run": run,
                "customers": args.customers, "seconds": took.as_secs_f64(), "invoices_per_s": r})
        );
        baseline.push(r);
        drop_database(&args.services.database_url, &url).await?;
    }
    let list = |xs: &[f64], unit: &str| {
        xs.iter()
            .map(|x| format!("{x:.0}{unit}"))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    println!(
        "invoice_run: {} customers: meterflow median {:.0} invoices/s ({}) = {:.2} s for all; \
         {:.0} bytes per invoice in Postgres ({}); peak RSS {:.1} MiB ({})",
        args.customers,
        median(ours.clone()),
        list(&ours, ""),
        args.customers as f64 / median(ours.clone()),
        median(bytes_per_invoice.clone()),
        list(&bytes_per_invoice, ""),
        median(peak_rss_mb.clone()),
        list(&peak_rss_mb, " MiB"),
    );
    if !baseline.is_empty() {
        println!(
            "invoice_run: baseline (one POST /api/v1/invoices per customer, sequential) median {:.0} \
             invoices/s ({}) = {:.2} s for all; ratio {:.1}",
            median(baseline.clone()),
            list(&baseline, ""),
            args.customers as f64 / median(baseline.clone()),
            median(ours.clone()) / median(baseline.clone()),
        );
    }
    Ok(())
}

/// Customers, books and January's upcoming lines, written directly; returns how long it took.
async fn seed(url: &str, customers: i64) -> Result<Duration> {
    let started = Instant::now();
    let mut conn = PgConnection::connect(url).await?;
    for sql in [
        r#"INSERT INTO price_books (price_book_id, meter, currency, effective, model, minimum_per_period)
           VALUES
           ('pb_api', 'api_calls', 'USD', tstzrange('2024-01-01', NULL, '[)'),
            '{"type":"graduated","tiers":[{"up_to":"1000","unit_price":"0.01","flat_fee":"0"},
              {"up_to":"100000","unit_price":"0.005","flat_fee":"0"},
              {"up_to":null,"unit_price":"0.002","flat_fee":"0"}]}', NULL),
           ('pb_gb', 'storage_gb', 'USD', tstzrange('2024-01-01', NULL, '[)'),
            '{"type":"per_unit","unit_price":"0.023"}', 5.00),
           ('pb_tok', 'tokens', 'USD', tstzrange('2024-01-01', NULL, '[)'),
            '{"type":"per_unit","unit_price":"0.000002"}', NULL)"#,
        "INSERT INTO customers (customer_id, name, email, address, currency)
         SELECT format('cust_%s', lpad(i::text, 6, '0')), format('Customer %s Ltd', i),
                format('billing@c%s.example', i), format('%s Main Street\nSpringfield', i), 'USD'
         FROM generate_series(1, $1) AS i",
        // api_calls: graduated price of a pseudo-random quantity (the pipeline's Σ of window charges).
        "INSERT INTO upcoming_lines (customer_id, period_start, meter, price_book_id, currency, quantity,
                                     amount, windows)
         SELECT format('cust_%s', lpad(i::text, 6, '0')), '2024-01-01', 'api_calls', 'pb_api', 'USD', q,
                least(q, 1000) * 0.01 + greatest(least(q, 100000) - 1000, 0) * 0.005
                  + greatest(q - 100000, 0) * 0.002,
                744
         FROM generate_series(1, $1) AS i, LATERAL (SELECT (i * 7919 % 250000)::numeric AS q) AS x",
        "INSERT INTO upcoming_lines (customer_id, period_start, meter, price_book_id, currency, quantity,
                                     amount, windows)
         SELECT format('cust_%s', lpad(i::text, 6, '0')), '2024-01-01', 'storage_gb', 'pb_gb', 'USD',
                q, q * 0.023, 744
         FROM generate_series(1, $1) AS i, LATERAL (SELECT (i * 104729 % 400000) / 1000.0 AS q) AS x",
        "INSERT INTO upcoming_lines (customer_id, period_start, meter, price_book_id, currency, quantity,
                                     amount, windows)
         SELECT format('cust_%s', lpad(i::text, 6, '0')), '2024-01-01', 'tokens', 'pb_tok', 'USD',
                q, q * 0.000002, 744
         FROM generate_series(1, $1, 2) AS i, LATERAL (SELECT (i * 15485863 % 90000000)::numeric AS q) AS x",
        // Usage of customers that are not registered: reported by the run, not invoiced.
        "INSERT INTO upcoming_lines (customer_id, period_start, meter, price_book_id, currency, quantity,
                                     amount, windows)
         SELECT format('unregistered_%s', i), '2024-01-01', 'storage_gb', 'pb_gb', 'USD', 1, 0.023, 1
         FROM generate_series(1, greatest($1 / 100, 1)) AS i",
    ] {
        let query = sqlx::query(sql);
        let query = if sql.contains("$1") {
            query.bind(customers)
        } else {
            query
        };
        query.execute(&mut conn).await?;
    }
    sqlx::query("ANALYZE customers, upcoming_lines, price_books")
        .execute(&mut conn)
        .await?;
    Ok(started.elapsed())
}

/// `meterflow invoice-run` under `/usr/bin/time -v`: (wall time, peak RSS in KiB, its stdout).
fn invoice_run(args: &Args, url: &str) -> Result<(Duration, u64, String)> {
    let mut command = Command::new("/usr/bin/time");
    command
        .arg("-v")
        .arg(&args.services.meterflow)
        .args(["invoice-run", "--period", "2024-01"])
        .env("MF_DATABASE_URL", url)
        .env("MF_LOG", "warn");
    if let Some(n) = args.batch_size {
        command.args(["--batch-size", &n.to_string()]);
    }
    let started = Instant::now();
    let out = command
        .output()
        .context("running /usr/bin/time -v meterflow invoice-run (is GNU time installed?)")?;
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("meterflow invoice-run failed: {stderr}");
    }
    let rss = stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("Maximum resident set size (kbytes):"))
        .and_then(|v| v.trim().parse().ok())
        .context("no peak RSS in /usr/bin/time's report")?;
    Ok((took, rss, String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// Every registered customer has exactly one issued invoice for the period and the numbers are 1..=N.
async fn check(url: &str, customers: i64) -> Result<i64> {
    let mut conn = PgConnection::connect(url).await?;
    let (count, distinct, min, max): (i64, i64, Option<i64>, Option<i64>) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT customer_id), min(number), max(number) FROM invoices
         WHERE status = 'issued' AND billing_period_start = $1::timestamptz
           AND billing_period_end = $2::timestamptz",
    )
    .bind(PERIOD_START)
    .bind(PERIOD_END)
    .fetch_one(&mut conn)
    .await?;
    if count != customers || distinct != customers || min != Some(1) || max != Some(customers) {
        bail!(
            "expected {customers} invoices numbered 1..={customers}, found {count} for {distinct} \
             customers, numbers {min:?}..={max:?}"
        );
    }
    Ok(count)
}

/// Bytes of the invoice tables (heap, indexes, TOAST) and of the run's item table.
async fn footprint(url: &str) -> Result<(i64, i64)> {
    let mut conn = PgConnection::connect(url).await?;
    sqlx::query("CHECKPOINT").execute(&mut conn).await.ok();
    let sizes: (i64, i64) = sqlx::query_as(
        "SELECT pg_total_relation_size('invoices')
                  + pg_total_relation_size('invoice_adjustments'),
                pg_total_relation_size('invoice_runs') + pg_total_relation_size('invoice_run_items')",
    )
    .fetch_one(&mut conn)
    .await?;
    Ok(sizes)
}

/// A `meterflow api` killed when dropped.
struct Api(Child);

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The baseline: one `POST /api/v1/invoices` per customer, one at a time, against `meterflow api`.
async fn one_post_per_customer(args: &Args, url: &str) -> Result<Duration> {
    let _api = Api(Command::new(&args.services.meterflow)
        .arg("api")
        .env("MF_DATABASE_URL", url)
        .env("MF_KAFKA_BROKERS", &args.services.brokers)
        .env("MF_EVENTS_TOPIC", "perf.invoice-run")
        .env("MF_API_ADDR", &args.api_addr)
        .env("MF_LOG", "warn")
        .env("MF_AUTH", "off")
        .stdout(Stdio::null())
        .spawn()
        .context("starting meterflow api")?);
    let client = reqwest::Client::new();
    let base = format!("http://{}", args.api_addr);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !client
        .get(format!("{base}/healthz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        if Instant::now() > deadline {
            bail!("meterflow api did not start at {base}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = Instant::now();
    for i in 1..=args.customers {
        let body = serde_json::json!({"customer_id": format!("cust_{i:06}"),
            "period_start": PERIOD_START, "period_end": PERIOD_END});
        let response = client
            .post(format!("{base}/api/v1/invoices"))
            .json(&body)
            .send()
            .await?;
        if response.status() != reqwest::StatusCode::CREATED {
            bail!(
                "POST /api/v1/invoices for cust_{i:06}: {} {}",
                response.status(),
                response.text().await.unwrap_or_default()
            );
        }
    }
    Ok(started.elapsed())
}
