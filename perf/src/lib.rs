//! Benchmark helpers shared by the scenario binaries in `src/bin/` (see `perf/README.md`).

pub mod cpu;
pub mod load;

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
    // The migrations write thousands of catalog rows (a partition per month); left to autovacuum, their
    // vacuum and analyze ran about 15 s into the measurement. A database in service has long had both.
    // Only the catalogs: a vacuumed *empty* table is planned as having no pages, and the plans a
    // session caches early (a foreign key's check of `event_ids`, plpgsql's) stay sequential scans as
    // it grows (the gate at 06f5dd5: 25,737 scans of `event_ids` reading 330M rows, p99 0.8-1.4 s).
    let catalogs: Vec<String> = sqlx::query_scalar(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c
         JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'pg_catalog' AND c.relkind = 'r' AND NOT c.relisshared",
    )
    .fetch_all(&pool)
    .await?;
    sqlx::query(&format!("VACUUM (ANALYZE) {}", catalogs.join(", ")))
        .execute(&pool)
        .await?;
    pool.close().await;
    checkpoint(&mut admin).await;
    Ok(url)
}

/// Flushes the set-up's writes (a new database is thousands of partition files) before a benchmark
/// measures anything, so that the next timed checkpoint, and its fsync of every dirty file, does not
/// land inside the measurement. Needs `pg_checkpoint` (granted by `deploy/local/up`); without it the
/// run goes on and says so.
async fn checkpoint(admin: &mut PgConnection) {
    if let Err(e) = sqlx::query("CHECKPOINT").execute(admin).await {
        eprintln!(
            "warning: CHECKPOINT before the measurement failed ({e}); run deploy/local/up, \
             which grants pg_checkpoint to meterflow"
        );
    }
}

/// Drops a database made by [`fresh_database`], retrying while its last connections close (an
/// autovacuum worker may hold it briefly). A database that cannot be dropped is reported, not fatal.
pub async fn drop_database(admin_url: &str, url: &str) -> Result<()> {
    let name = url.rsplit_once('/').map_or(url, |(_, n)| n);
    let mut admin = PgConnection::connect(admin_url).await?;
    for _ in 0..50 {
        // FORCE: a pool the benchmark closed may still hold a connection (seen with the recovery
        // benchmark's), and the database is done with.
        let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
        if sqlx::query(&drop).execute(&mut admin).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("warning: could not drop database {name}; drop it by hand");
    Ok(())
}

/// `--dimensions AxB` of the `core` and `e2e` benchmarks (issue 17): how many values the `model` and
/// the `region` property take, each 1 to 1000.
pub fn parse_dimensions(text: &str) -> Result<(u32, u32), String> {
    let (a, b) = text
        .split_once('x')
        .ok_or_else(|| format!("{text:?}: give the value counts as AxB, e.g. 50x5"))?;
    let count = |s: &str| {
        s.parse::<u32>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| format!("{s:?}: a value count is 1 to 1000"))
    };
    Ok((count(a)?, count(b)?))
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

/// A child process killed (and reaped) when dropped.
pub struct Proc(pub std::process::Child);

impl Proc {
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Whether the process is still running (a crash under load shows here).
    pub fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A whole meterflow on the local services: a fresh database and topic, `meterflow api` (the seed's
/// scripts send no key, so `MF_AUTH=off`) and `meterflow pipeline`. Dropping it stops both processes;
/// the database is left for inspection until [`Stack::drop_database`].
pub struct Stack {
    pub url: String,
    pub topic: String,
    pub base: String,
    pub api: Proc,
    pub pipeline: Proc,
}

impl Stack {
    /// Starts a stack on `port`. `env` is extra environment for both processes (e.g. API limits).
    pub async fn start(
        services: &Services,
        prefix: &str,
        port: u16,
        workers: usize,
        env: &[(String, String)],
    ) -> Result<Stack> {
        let url = fresh_database(&services.database_url, prefix, 0).await?;
        let topic = format!("perf.{prefix}.{}", chrono::Utc::now().timestamp());
        let spawn = |sub: &[&str]| -> Result<Proc> {
            let child = std::process::Command::new(&services.meterflow)
                .args(sub)
                .env("MF_DATABASE_URL", &url)
                .env("MF_EVENTS_TOPIC", &topic)
                .env("MF_KAFKA_BROKERS", &services.brokers)
                .env("MF_API_ADDR", format!("127.0.0.1:{port}"))
                .env("MF_PIPELINE_METRICS_ADDR", "")
                .env("MF_LOG", "warn")
                .env("MF_AUTH", "off")
                .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .stdout(std::process::Stdio::null())
                .spawn()
                .with_context(|| {
                    format!(
                        "starting {} (cargo build --release first)",
                        services.meterflow
                    )
                })?;
            Ok(Proc(child))
        };
        let base = format!("http://127.0.0.1:{port}");
        let api = spawn(&["api"])?;
        wait_ready(&base).await?;
        let pipeline = spawn(&["pipeline", "--workers", &workers.to_string()])?;
        wait_committed(&base).await?;
        Ok(Stack {
            url,
            topic,
            base,
            api,
            pipeline,
        })
    }

    /// Stops both processes and drops the database.
    pub async fn drop_database(self, admin_url: &str) -> Result<()> {
        let url = self.url.clone();
        drop(self);
        drop_database(admin_url, &url).await
    }
}

/// Waits until `GET {base}/readyz` answers 2xx (10 s at most).
pub async fn wait_ready(base: &str) -> Result<()> {
    let client = reqwest::Client::new();
    for _ in 0..200 {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the API at {base} did not become ready within 10 s")
}

/// Waits until the pipeline has made its first commit (`GET {base}/api/v1/progress` shows a
/// `committed_epoch`; 60 s at most), so that a load plan measures a running system rather than the
/// pipeline's start (its Kafka group join, its restore) competing with the first requests for the
/// two cores: those first seconds showed stalls of up to 0.9 s that steady operation does not have.
/// A start is measured on its own by `recovery`.
pub async fn wait_committed(base: &str) -> Result<()> {
    let client = reqwest::Client::new();
    for _ in 0..600 {
        let progress = client
            .get(format!("{base}/api/v1/progress"))
            .send()
            .await
            .ok()
            .map(|r| r.json::<serde_json::Value>());
        if let Some(body) = progress {
            if body.await.is_ok_and(|p| !p["committed_epoch"].is_null()) {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the pipeline behind {base} made no commit within 60 s")
}

/// One `pg_stat_statements` row: calls, total ms, mean ms, rows, WAL records, full-page images, WAL
/// bytes, the statement's text.
type StatementRow = (i64, f64, f64, i64, i64, i64, rust_decimal::Decimal, String);

/// Where the database's time went during a run: the run's own database in `pg_stat_statements`, by
/// total execution time, with calls, rows and WAL. An error object where the extension is not
/// loaded (`deploy/local/up` loads it).
pub async fn top_statements(url: &str) -> serde_json::Value {
    let rows: Result<Vec<StatementRow>, _> = async {
        let pool = sqlx::PgPool::connect(url).await?;
        sqlx::query_as(
            "SELECT calls, total_exec_time, mean_exec_time, rows, wal_records, wal_fpi, wal_bytes,
                    left(regexp_replace(query, '\\s+', ' ', 'g'), 160)
               FROM pg_stat_statements
              WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
              ORDER BY total_exec_time DESC LIMIT 12",
        )
        .fetch_all(&pool)
        .await
    }
    .await;
    match rows {
        Ok(rows) => rows
            .into_iter()
            .map(
                |(calls, total, mean, rows, wal_records, wal_fpi, wal, query)| {
                    serde_json::json!({"calls": calls, "total_ms": total.round(),
                    "mean_ms": (mean * 1000.0).round() / 1000.0, "rows": rows,
                    "wal_records": wal_records, "wal_fpi": wal_fpi, "wal_bytes": wal.to_string(),
                    "query": query})
                },
            )
            .collect(),
        Err(e) => serde_json::json!({"unavailable": e.to_string()}),
    }
}

/// Prints the first `n` rows of [`top_statements`] on stderr, one line each.
pub fn print_statements(statements: &serde_json::Value, n: usize) {
    let Some(rows) = statements.as_array() else {
        eprintln!("  pg_stat_statements: {statements}");
        return;
    };
    eprintln!("  postgres, by total time (pg_stat_statements):");
    for st in rows.iter().take(n) {
        let query: String = st["query"]
            .as_str()
            .unwrap_or("")
            .chars()
            .take(70)
            .collect();
        eprintln!(
            "    {:>8} ms {:>8} calls {:>8} ms each {:>10} WAL bytes  {query}",
            st["total_ms"], st["calls"], st["mean_ms"], st["wal_bytes"]
        );
    }
}
