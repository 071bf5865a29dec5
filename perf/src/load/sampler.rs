//! Once a second, what each component uses: RSS, open file descriptors and CPU of the API, the
//! pipeline, Kafka and Postgres (all its processes), the machine's CPU, the database's connections by
//! state, and the disk Postgres and Kafka hold for this run. Read from `/proc` and `pg_stat_activity`,
//! so it needs nothing installed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cpu::{numeric_entries, stat_ticks, TICKS};

/// What one sample watches.
pub struct Targets {
    pub api: u32,
    pub pipeline: u32,
    /// The load tool itself: it shares the cores.
    pub tool: u32,
    pub database_url: String,
    pub database: String,
    /// Kafka's log directory (`deploy/local/up`: `$KDATA/logs`) and this run's topic.
    pub kafka_logs: PathBuf,
    pub topic: String,
}

/// CPU seconds and memory of some processes at one instant.
#[derive(Default, Clone, Copy)]
struct Usage {
    cpu_ticks: u64,
    rss_kb: u64,
    fds: u64,
}

fn read_usage(pid: u32) -> Option<Usage> {
    let cpu_ticks = stat_ticks(&format!("/proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    Some(Usage {
        cpu_ticks,
        rss_kb,
        fds,
    })
}

/// Processes whose command line contains `needle` (Kafka) or whose name is `comm` (Postgres).
fn pids(comm: Option<&str>, needle: Option<&str>) -> Vec<u32> {
    numeric_entries("/proc")
        .into_iter()
        .filter(|pid| {
            let comm_ok = comm.is_none_or(|c| {
                std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|s| s.trim() == c)
            });
            let needle_ok = needle.is_none_or(|n| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|s| String::from_utf8_lossy(&s).contains(n))
            });
            comm_ok && needle_ok
        })
        .collect()
}

fn sum_usage(pids: &[u32]) -> Usage {
    pids.iter()
        .filter_map(|p| read_usage(*p))
        .fold(Usage::default(), |a, u| Usage {
            cpu_ticks: a.cpu_ticks + u.cpu_ticks,
            rss_kb: a.rss_kb + u.rss_kb,
            fds: a.fds + u.fds,
        })
}

/// Busy and total jiffies of the whole machine.
fn machine_ticks() -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let Some(cpu) = stat.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

fn dir_bytes(dir: &Path, prefix: &str) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .flat_map(|e| std::fs::read_dir(e.path()).into_iter().flatten())
        .filter_map(|f| f.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Samples every second until `stop` is set; returns the samples.
pub async fn sample(targets: Targets, stop: Arc<AtomicBool>) -> Vec<Value> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&targets.database_url)
        .await
        .ok();
    let kafka = pids(None, Some("kafka.Kafka"));
    let start = Instant::now();
    let mut last: Option<(Instant, [Usage; 5], (u64, u64))> = None;
    let mut samples = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let postgres = pids(Some("postgres"), None);
        let now = [
            read_usage(targets.api).unwrap_or_default(),
            read_usage(targets.pipeline).unwrap_or_default(),
            sum_usage(&kafka),
            sum_usage(&postgres),
            read_usage(targets.tool).unwrap_or_default(),
        ];
        let machine = machine_ticks();
        let at = Instant::now();
        if let Some((then, before, machine_before)) = last {
            let secs = at.duration_since(then).as_secs_f64().max(1e-3);
            let cpu = |i: usize| {
                let d = now[i].cpu_ticks.saturating_sub(before[i].cpu_ticks) as f64;
                (d / TICKS / secs * 1000.0).round() / 10.0
            };
            let busy = machine.0.saturating_sub(machine_before.0) as f64;
            let total = machine.1.saturating_sub(machine_before.1).max(1) as f64;
            let (connections, db_bytes) = match &pool {
                Some(pool) => database(pool, &targets.database).await,
                None => (json!(null), 0),
            };
            let mb = |kb: u64| (kb as f64 / 102.4).round() / 10.0;
            samples.push(json!({
                "t": (start.elapsed().as_secs_f64() * 10.0).round() / 10.0,
                "machine_cpu_pct": (busy / total * 1000.0).round() / 10.0,
                "api": {"rss_mb": mb(now[0].rss_kb), "fds": now[0].fds, "cpu_pct": cpu(0)},
                "pipeline": {"rss_mb": mb(now[1].rss_kb), "fds": now[1].fds, "cpu_pct": cpu(1)},
                "kafka": {"rss_mb": mb(now[2].rss_kb), "cpu_pct": cpu(2)},
                "postgres": {"rss_mb": mb(now[3].rss_kb), "cpu_pct": cpu(3), "processes": postgres.len()},
                "load_tool": {"rss_mb": mb(now[4].rss_kb), "cpu_pct": cpu(4)},
                "db_connections": connections,
                "db_bytes": db_bytes,
                "kafka_topic_bytes": dir_bytes(&targets.kafka_logs, &format!("{}-", targets.topic)),
            }));
        }
        last = Some((at, now, machine));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    samples
}

/// Connections to this run's database by state, and its size.
async fn database(pool: &sqlx::PgPool, name: &str) -> (Value, i64) {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT coalesce(state, 'other'), count(*) FROM pg_stat_activity WHERE datname = $1
          GROUP BY 1",
    )
    .bind(name)
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    let size: i64 = sqlx::query_scalar("SELECT pg_database_size($1)")
        .bind(name)
        .fetch_one(pool)
        .await
        .unwrap_or(0);
    let by_state: serde_json::Map<String, Value> =
        rows.into_iter().map(|(s, n)| (s, json!(n))).collect();
    (Value::Object(by_state), size)
}

/// Whether a series is flat: the mean of its last fifth against the mean of its second fifth (the
/// first is warm-up), as a ratio. 1.0 is flat; a leak grows it with the run's length.
pub fn growth(series: &[f64]) -> f64 {
    let n = series.len();
    if n < 10 {
        return 1.0;
    }
    let fifth = n / 5;
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len().max(1) as f64;
    let early = mean(series.get(fifth..2 * fifth).unwrap_or(&[]));
    let late = mean(series.get(n - fifth..).unwrap_or(&[]));
    if early <= 0.0 {
        1.0
    } else {
        (late / early * 1000.0).round() / 1000.0
    }
}
