//! `recovery`: how long `meterflow pipeline` takes to resume after `kill -9`, against how much state it
//! has (live aggregate windows), SPEC §9 / issue 6 (goal: < 10 s with 1M live windows).
//!
//! For each size: a fresh topic and database get `size` events, each in a window of its own, drained
//! into Postgres; then a pipeline is started on more input, killed with SIGKILL mid-run, and restarted
//! once more input has come (at least `--more / 2` records are left to read after the kill).
//! Measured from the restart: the first commit (it is working again) and the drain of what was left.
//! Baseline in the same run: the same restart with no state at all (size 0).
//!
//! A default price book prices every window (`--no-book` leaves it out), so the restart also restores
//! the rating state and rates: every window has its charge at the end, which the run checks.
//!
//!     cargo build --release -p meterflow -p meterflow-perf
//!     target/release/recovery --windows 0,100000,1000000

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use meterflow_perf::{drop_database, fresh_database, Services};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(about = "Restart time after kill -9 against the number of live windows")]
struct Args {
    #[arg(long, value_delimiter = ',', default_value = "0,100000,1000000")]
    windows: Vec<usize>,
    /// Events produced after the state is built, read across the kill and the restart.
    #[arg(long, default_value_t = 200_000)]
    more: usize,
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// No price book: windows are metered, not rated (what this benchmark measured before issue 15).
    #[arg(long)]
    no_book: bool,
    /// VACUUM (ANALYZE) the state once it is built, as autovacuum would have visited a long-running
    /// deployment's tables; without it the restart is the first to read the built pages (it sets their
    /// hint bits and prunes them).
    #[arg(long)]
    vacuum: bool,
    /// The pipelines' log filter (`info` shows how long loading the rating state took).
    #[arg(long, default_value = "warn")]
    log: String,
    #[command(flatten)]
    services: Services,
}

/// One event per (customer, hour) window from `first` on.
fn produce(brokers: &str, topic: &str, first: usize, n: usize) -> Result<()> {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    for i in first..first + n {
        let (customer, hour) = (i / 24, i % 24);
        let payload = json!({"event_id": format!("r{i}"), "customer_id": format!("c{customer}"), "event_type": "api_call",
                             "event_time": format!("2024-01-15T{hour:02}:30:00Z")})
        .to_string();
        let key = format!("c{customer}");
        let mut record = BaseRecord::to(topic).key(&key).payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    producer.poll(Duration::from_millis(5));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(120))?;
    Ok(())
}

fn pipeline(args: &Args, url: &str, topic: &str, until_caught_up: bool) -> Command {
    let mut c = Command::new(&args.services.meterflow);
    c.args([
        "pipeline",
        "--workers",
        &args.workers.to_string(),
        "--metrics-addr",
        "",
    ])
    .env("MF_DATABASE_URL", url)
    .env("MF_EVENTS_TOPIC", topic)
    .env("MF_KAFKA_BROKERS", &args.services.brokers)
    .env("MF_LOG", &args.log)
    .stdout(Stdio::null());
    if until_caught_up {
        c.arg("--until-caught-up");
    }
    c
}

/// (generation, committed epoch, records committed)
async fn committed(pool: &sqlx::PgPool) -> Result<(i64, i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT (SELECT generation FROM pipeline_leases), (SELECT committed_epoch FROM pipeline_leases),
                (SELECT coalesce(sum(next_offset), 0)::bigint FROM source_offsets)",
    )
    .fetch_one(pool)
    .await?)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    for &size in &args.windows {
        let url = fresh_database(&args.services.database_url, "mf_perf_recovery", size).await?;
        let topic = format!("perf.recovery.{size}.{}", chrono::Utc::now().timestamp());
        let pool = sqlx::PgPool::connect(&url).await?;
        if !args.no_book {
            sqlx::query(
                "INSERT INTO price_books (price_book_id, meter, currency, effective, model)
                 VALUES ('pb_default', 'api_call', 'USD', '[2024-01-01,)', '{\"type\":\"per_unit\",\"unit_price\":\"0.01\"}')",
            )
            .execute(&pool)
            .await?;
        }
        // Build the state: `size` live windows.
        produce(&args.services.brokers, &topic, 0, size.max(1))?;
        let built = Instant::now();
        if !pipeline(&args, &url, &topic, true).status()?.success() {
            bail!("building the state failed");
        }
        let build_seconds = built.elapsed().as_secs_f64();
        if args.vacuum {
            sqlx::query("VACUUM (ANALYZE) aggregations, charges, upcoming_lines")
                .execute(&pool)
                .await?;
        }
        let windows: i64 = sqlx::query_scalar("SELECT count(*) FROM aggregations")
            .fetch_one(&pool)
            .await?;
        // More input; kill -9 mid-run. Half of it is produced before the kill, half after: however a
        // pipeline cuts its epochs (its last commit before the kill may hold all it had read), the
        // restart has at least `more / 2` records to read.
        let before_kill = args.more / 2;
        produce(&args.services.brokers, &topic, size.max(1), before_kill)?;
        // Catch-up epochs off for the run that is killed: with them (2 s while behind) one commit
        // could hold all of the first half, and the kill would come after it, not mid-run.
        let mut first = pipeline(&args, &url, &topic, false)
            .env("MF_PIPELINE_CATCH_UP_EPOCH_MS", "0")
            .spawn()?;
        let before = committed(&pool).await?.2;
        while committed(&pool).await?.2 < before + (before_kill / 2) as i64 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        first.kill()?;
        first.wait()?;
        produce(
            &args.services.brokers,
            &topic,
            size.max(1) + before_kill,
            args.more - before_kill,
        )?;
        let (killed_generation, _, at_kill) = committed(&pool).await?;
        // Restart: time to the first commit, and to the end of the input.
        let restarted = Instant::now();
        let mut second = pipeline(&args, &url, &topic, true).spawn()?;
        loop {
            let (generation, epoch, _) = committed(&pool).await?;
            if generation > killed_generation && epoch > 0 {
                break;
            }
            if let Some(status) = second.try_wait()? {
                bail!("the restarted pipeline ended ({status}) without a commit: nothing was left to read after the kill");
            }
            anyhow::ensure!(
                restarted.elapsed() < Duration::from_secs(300),
                "no commit after restart"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let first_commit = restarted.elapsed().as_secs_f64();
        second.wait()?;
        let drained = restarted.elapsed().as_secs_f64();
        let total: i64 =
            sqlx::query_scalar("SELECT coalesce(sum(event_count), 0)::bigint FROM aggregations")
                .fetch_one(&pool)
                .await?;
        anyhow::ensure!(
            total == (size.max(1) + args.more) as i64,
            "exactly once: {total} counted"
        );
        let (windows_now, charged): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM aggregations), (SELECT count(*) FROM charges)",
        )
        .fetch_one(&pool)
        .await?;
        anyhow::ensure!(
            args.no_book || charged == windows_now,
            "every window priced: {charged} charges for {windows_now} windows"
        );
        println!(
            "{}",
            json!({"bench": "recovery", "live_windows": windows, "price_book": !args.no_book, "vacuumed": args.vacuum, "charges": charged, "build_seconds": build_seconds, "killed_at_records": at_kill,
                   "restart_to_first_commit_seconds": first_commit, "restart_to_drained_seconds": drained,
                   "records_after_kill": (size.max(1) + args.more) as i64 - at_kill})
        );
        pool.close().await;
        drop_database(&args.services.database_url, &url).await?;
    }
    Ok(())
}
