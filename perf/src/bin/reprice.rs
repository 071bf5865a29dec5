//! `reprice`: the time from a price change to re-rated charges in Postgres (issue 4), against the number
//! of rated windows.
//!
//! For each size: a fresh database gets `customers × windows` hourly aggregate rows (inserted directly:
//! this measures rating, not metering) and a default per-unit book; `meterflow pipeline` starts, loads
//! them and rates every window (the first figure). Then:
//!   - the default book's price changes: every window must be re-rated (the second figure);
//!   - one customer gets a book of their own: only that customer's windows may change (the third
//!     figure, and a check that no other charge was rewritten).
//!
//! With `--models N` (issue 17) every customer's window is N windows, one per value of a `model`
//! dimension, and a fourth figure: a default book for one model (a selector, `{"model": "m0"}`), which
//! must re-rate that model's windows and no others (checked by the charges' revisions). With two or
//! more models, a rate card then prices models m1… in one book (a fifth figure: those windows
//! re-rated), and one entry's price changes (a sixth: only that model's windows, checked by the
//! revisions again).
//!
//! Baseline in the same run: Postgres alone rewriting every charge for the new price with one
//! `UPDATE charges SET amount = quantity × price` (per-unit only: the naive, non-incremental way).
//!
//!     cargo build --release -p meterflow -p meterflow-perf
//!     target/release/reprice --customers 100,1000,5000 --windows 168
//!     target/release/reprice --customers 100,1000 --windows 168 --models 20

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use clap::Parser;
use meterflow_perf::{drop_database, fresh_database, Services};
use serde_json::json;
use sqlx::PgPool;

#[derive(Debug, Parser)]
#[command(about = "Time from a price change to re-rated charges in Postgres")]
struct Args {
    #[arg(long, value_delimiter = ',', default_value = "100,1000,5000")]
    customers: Vec<usize>,
    /// Hourly windows per customer (168: a week).
    #[arg(long, default_value_t = 168)]
    windows: usize,
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Values of a `model` dimension per customer and window (0: a meter without dimensions).
    #[arg(long, default_value_t = 0)]
    models: usize,
    #[command(flatten)]
    services: Services,
}

fn pipeline(args: &Args, url: &str, topic: &str) -> Result<Child> {
    Ok(Command::new(&args.services.meterflow)
        .args([
            "pipeline",
            "--workers",
            &args.workers.to_string(),
            "--metrics-addr",
            "",
        ])
        .env("MF_DATABASE_URL", url)
        .env("MF_EVENTS_TOPIC", topic)
        .env("MF_KAFKA_BROKERS", &args.services.brokers)
        .env("MF_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?)
}

/// Waits until `sql` (a count) reaches `target`; returns the seconds since `since`.
async fn wait_count(pool: &PgPool, sql: &str, target: i64, since: Instant) -> Result<f64> {
    loop {
        let n: i64 = sqlx::query_scalar(sql).fetch_one(pool).await?;
        if n >= target {
            return Ok(since.elapsed().as_secs_f64());
        }
        ensure!(
            since.elapsed() < Duration::from_secs(600),
            "stuck at {n} of {target}: {sql}"
        );
        // Not faster: each poll scans the table, on the same two cores as the pipeline and Postgres.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    for &customers in &args.customers {
        let url = fresh_database(&args.services.database_url, "mf_perf_reprice", customers).await?;
        let topic = format!(
            "perf.reprice.{customers}.{}",
            chrono::Utc::now().timestamp()
        );
        let pool = PgPool::connect(&url).await?;
        let models = args.models.max(1);
        let windows = (customers * args.windows * models) as i64;
        sqlx::query(
            "INSERT INTO aggregations (customer_id, meter, window_start, window_end, value, event_count,
                                       dimensions)
             SELECT 'c' || c, 'api_call', t, t + interval '1 hour', (c % 7) + h % 5 + m + 1, 1,
                    CASE WHEN $3 THEN jsonb_build_object('model', 'm' || m) ELSE '{}' END
             FROM generate_series(0, $1 - 1) AS c,
                  generate_series(0, $2 - 1) AS h,
                  generate_series(0, $4 - 1) AS m,
                  LATERAL (SELECT timestamptz '2024-01-08T00:00:00Z' + h * interval '1 hour' AS t) AS w",
        )
        .bind(customers as i64)
        .bind(args.windows as i64)
        .bind(args.models > 0)
        .bind(models as i64)
        .execute(&pool)
        .await?;
        if args.models > 0 {
            sqlx::query(
                "INSERT INTO meters (meter, event_type, aggregation, value_property, group_by)
                 VALUES ('api_call', 'api_call', 'sum', 'value', '{model}')",
            )
            .execute(&pool)
            .await?;
        }
        sqlx::query(
            "INSERT INTO price_books (price_book_id, meter, currency, effective, model)
             VALUES ('pb_default', 'api_call', 'USD', '[2024-01-01,)', '{\"type\":\"per_unit\",\"unit_price\":\"0.01\"}')",
        )
        .execute(&pool)
        .await?;

        // Start: load the rows and rate every window.
        let started = Instant::now();
        let mut running = pipeline(&args, &url, &topic)?;
        let initial = wait_count(&pool, "SELECT count(*) FROM charges", windows, started).await?;

        // The default book's price changes: every window re-rated.
        let changed = Instant::now();
        sqlx::query(
            "UPDATE price_books SET model = '{\"type\":\"per_unit\",\"unit_price\":\"0.02\"}'
             WHERE price_book_id = 'pb_default'",
        )
        .execute(&pool)
        .await?;
        let all = wait_count(
            &pool,
            "SELECT count(*) FROM charges WHERE amount = quantity * 0.02",
            windows,
            changed,
        )
        .await?;

        // One customer's own book: only their windows change.
        let revisions: i64 = sqlx::query_scalar("SELECT sum(revision)::bigint FROM charges")
            .fetch_one(&pool)
            .await?;
        let narrow = Instant::now();
        sqlx::query(
            "INSERT INTO price_books (price_book_id, meter, customer_id, currency, effective, model)
             VALUES ('pb_c0', 'api_call', 'c0', 'USD', '[2024-01-01,)', '{\"type\":\"per_unit\",\"unit_price\":\"0.05\"}')",
        )
        .execute(&pool)
        .await?;
        let own = (args.windows * models) as i64;
        let one = wait_count(
            &pool,
            "SELECT count(*) FROM charges WHERE price_book_id = 'pb_c0'",
            own,
            narrow,
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rewritten: i64 = sqlx::query_scalar("SELECT sum(revision)::bigint FROM charges")
            .fetch_one(&pool)
            .await?;
        ensure!(
            rewritten - revisions == own,
            "a customer's own book rewrote {} charges, expected {own}",
            rewritten - revisions,
        );

        // One model's own default price: only its windows change (c0's stay under c0's own book,
        // which is more specific: the customer's).
        let model_seconds = if args.models > 0 {
            let before = rewritten;
            let changed = ((customers - 1) * args.windows) as i64;
            let started = Instant::now();
            sqlx::query(
                "INSERT INTO price_books (price_book_id, meter, currency, effective, model, dimensions)
                 VALUES ('pb_m0', 'api_call', 'USD', '[2024-01-01,)',
                         '{\"type\":\"per_unit\",\"unit_price\":\"0.07\"}', '{\"model\": \"m0\"}')",
            )
            .execute(&pool)
            .await?;
            let seconds = wait_count(
                &pool,
                "SELECT count(*) FROM charges WHERE price_book_id = 'pb_m0'",
                changed,
                started,
            )
            .await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let after: i64 = sqlx::query_scalar("SELECT sum(revision)::bigint FROM charges")
                .fetch_one(&pool)
                .await?;
            ensure!(
                after - before == changed,
                "one model's book rewrote {} charges, expected {changed}",
                after - before,
            );
            Some(seconds)
        } else {
            None
        };
        let card_seconds = if args.models > 1 {
            Some(rate_card(&pool, customers, args.windows, models).await?)
        } else {
            None
        };
        running.kill()?;
        running.wait()?;

        // Baseline: Postgres alone rewriting every charge for a new per-unit price.
        let baseline = Instant::now();
        sqlx::query("UPDATE charges SET amount = quantity * 0.03, revision = revision + 1, updated_at = now()")
            .execute(&pool)
            .await?;
        let baseline = baseline.elapsed().as_secs_f64();

        println!(
            "{}",
            json!({"bench": "reprice", "customers": customers, "windows": windows,
                   "models": args.models,
                   "start_to_all_rated_seconds": initial, "default_price_change_seconds": all,
                   "one_customer_book_seconds": one, "one_model_book_seconds": model_seconds,
                   "rate_card_seconds": card_seconds.map(|(c, _)| c),
                   "rate_card_one_entry_seconds": card_seconds.map(|(_, e)| e),
                   "baseline_sql_rewrite_seconds": baseline})
        );
        // Not `pool.close()`: it has been seen to wait forever here; dropping the pool closes its
        // connections, and a database that cannot be dropped in time is left for clean-tests.
        drop(pool);
        let dropped = drop_database(&args.services.database_url, &url);
        if tokio::time::timeout(Duration::from_secs(30), dropped)
            .await
            .is_err()
        {
            eprintln!("warning: could not drop {url} in 30 s; deploy/local/clean-tests will");
        }
    }
    Ok(())
}

/// A rate card for models m1…m{models-1} (m0 has its own book, c0 its own), then one entry's price
/// changed: the seconds until every window the card prices is re-rated, and until the changed
/// entry's windows are (only those: checked by the charges' revisions).
async fn rate_card(
    pool: &PgPool,
    customers: usize,
    windows: usize,
    models: usize,
) -> Result<(f64, f64)> {
    let revisions = || async {
        sqlx::query_scalar::<_, i64>("SELECT sum(revision)::bigint FROM charges")
            .fetch_one(pool)
            .await
    };
    let per_model = ((customers - 1) * windows) as i64;
    let started = Instant::now();
    sqlx::query(
        "INSERT INTO price_books (price_book_id, meter, currency, effective, model, entries)
         SELECT 'pb_card', 'api_call', 'USD', '[2024-01-01,)', e -> 0 -> 'model', e
         FROM (SELECT jsonb_agg(jsonb_build_object(
                          'dimensions', jsonb_build_object('model', 'm' || m),
                          'model', '{\"type\":\"per_unit\",\"unit_price\":\"0.04\"}'::jsonb)
                      ORDER BY m) AS e
               FROM generate_series(1, $1 - 1) AS m) AS card",
    )
    .bind(models as i64)
    .execute(pool)
    .await?;
    let card = wait_count(
        pool,
        "SELECT count(*) FROM charges WHERE price_book_id = 'pb_card'",
        per_model * (models as i64 - 1),
        started,
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = revisions().await?;
    let started = Instant::now();
    // Entry 0 prices m1.
    sqlx::query(
        "UPDATE price_books SET entries = jsonb_set(entries, '{0,model,unit_price}', '\"0.09\"')
         WHERE price_book_id = 'pb_card'",
    )
    .execute(pool)
    .await?;
    let entry = wait_count(
        pool,
        "SELECT count(*) FROM charges WHERE price_book_id = 'pb_card' AND amount = quantity * 0.09",
        per_model,
        started,
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = revisions().await?;
    ensure!(
        after - before == per_model,
        "one entry of the rate card rewrote {} charges, expected {per_model}",
        after - before,
    );
    Ok((card, entry))
}
