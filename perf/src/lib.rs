//! Benchmark helpers shared by the scenario binaries in `src/bin/` (see `perf/README.md`).

use std::time::Duration;

use anyhow::{Context, Result};

/// Where the services and the binary under test are: every scenario binary takes these flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Services {
    #[arg(
        long,
        env = "MF_DATABASE_URL",
        default_value = "postgres://meterflow@127.0.0.1:5432/meterflow"
    )]
    pub database_url: String,
    #[arg(long, env = "MF_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// The meterflow binary (`cargo build --release` first).
    #[arg(long, default_value = "target/release/meterflow")]
    pub meterflow: String,
}
use sqlx::{Connection, PgConnection};

/// A migrated database of its own, named `prefix_<unix time>_<n>`; returns its URL.
pub async fn fresh_database(admin_url: &str, prefix: &str, n: usize) -> Result<String> {
    let name = format!("{prefix}_{}_{n}", chrono::Utc::now().timestamp());
    let mut admin = PgConnection::connect(admin_url)
        .await
        .context("connecting to Postgres (deploy/local/up)")?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
        .execute(&mut admin)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await?;
    let base = admin_url.rsplit_once('/').map_or(admin_url, |(b, _)| b);
    let url = format!("{base}/{name}");
    let pool = sqlx::PgPool::connect(&url).await?;
    meterflow_sinks::MIGRATOR.run(&pool).await?;
    pool.close().await;
    Ok(url)
}

/// Drops a database made by [`fresh_database`], retrying while its last connections close (an
/// autovacuum worker may hold it briefly). A database that cannot be dropped is reported, not fatal.
pub async fn drop_database(admin_url: &str, url: &str) -> Result<()> {
    let name = url.rsplit_once('/').map_or(url, |(_, n)| n);
    let mut admin = PgConnection::connect(admin_url).await?;
    for _ in 0..50 {
        let drop = format!("DROP DATABASE IF EXISTS {name}");
        if sqlx::query(&drop).execute(&mut admin).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("warning: could not drop database {name}; drop it by hand");
    Ok(())
}

/// The median of some durations' rates (events per second).
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

pub fn rate(events: u64, took: Duration) -> f64 {
    events as f64 / took.as_secs_f64().max(1e-9)
}
