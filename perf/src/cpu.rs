//! Where a run's CPU went: per thread of the process under test, per kind of Postgres process
//! (backends, WAL writer, checkpointer, autovacuum, ...) and Kafka, sampled from `/proc` while the run
//! lasts. A thread or backend that exits mid-run keeps the CPU it had at its last sample, so short
//! lived backends are counted too (to within one sampling interval).
//!
//! ```text
//!  CpuWatch::start(pid) ──► sampler thread, every 200 ms:
//!      /proc/<pid>/task/*/stat ─► "thread <comm>"
//!      /proc/*/stat where comm = postgres ─► "postgres <kind>" (from its title, cmdline)
//!      /proc/*/cmdline with kafka.Kafka ─► "kafka"
//!  CpuWatch::finish() ──► {label: CPU seconds used since start}, largest first
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

/// Clock ticks per second of `/proc/*/stat` (the kernel's USER_HZ, 100 on Linux).
pub const TICKS: f64 = 100.0;

/// utime + stime of one `/proc/.../stat` file.
pub fn stat_ticks(path: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The entries of `dir` named by a number (pids in `/proc`, tids in `task/`).
pub fn numeric_entries(dir: &str) -> Vec<u32> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The kind of a Postgres process from its title: `postgres: walwriter` → `walwriter`,
/// `postgres: meterflow db 127.0.0.1(5) idle` → `backend`.
fn postgres_kind(cmdline: &str) -> String {
    let Some(title) = cmdline.strip_prefix("postgres:") else {
        return "postmaster".to_owned();
    };
    let words: Vec<&str> = title.split_whitespace().collect();
    match words.as_slice() {
        [] => "postmaster".to_owned(),
        [_, _, host, ..] if host.contains('(') => "backend".to_owned(),
        ws => ws.iter().take(2).copied().collect::<Vec<_>>().join(" "),
    }
}

/// One sample: (pid or tid) → (label, ticks).
fn sample(target: Option<u32>) -> HashMap<u64, (String, u64)> {
    let mut out = HashMap::new();
    if let Some(pid) = target {
        for tid in numeric_entries(&format!("/proc/{pid}/task")) {
            let base = format!("/proc/{pid}/task/{tid}");
            let (Some(ticks), Ok(comm)) = (
                stat_ticks(&format!("{base}/stat")),
                std::fs::read_to_string(format!("{base}/comm")),
            ) else {
                continue;
            };
            out.insert(
                (1 << 40) | u64::from(tid),
                (format!("thread {}", comm.trim()), ticks),
            );
        }
    }
    for pid in numeric_entries("/proc") {
        if Some(pid) == target {
            continue;
        }
        let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let label = if comm.trim() == "postgres" {
            format!("postgres {}", postgres_kind(&cmdline))
        } else if cmdline.contains("kafka.Kafka") {
            "kafka".to_owned()
        } else {
            continue;
        };
        if let Some(ticks) = stat_ticks(&format!("/proc/{pid}/stat")) {
            out.insert(u64::from(pid), (label, ticks));
        }
    }
    out
}

/// Takes `next`'s ticks into `last`, keeping a process's first label: a backend that exits has an
/// empty command line in its last sample (it would read as the postmaster), but its ticks still count.
fn merge(last: &mut HashMap<u64, (String, u64)>, next: HashMap<u64, (String, u64)>) {
    for (id, (label, ticks)) in next {
        last.entry(id)
            .and_modify(|(_, t)| *t = ticks)
            .or_insert((label, ticks));
    }
}

/// A sampler running until [`CpuWatch::finish`].
pub struct CpuWatch {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<HashMap<String, u64>>,
}

impl CpuWatch {
    /// Watches the threads of `target` (the process under test; `None` for none), Postgres and Kafka.
    pub fn start(target: Option<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let first = sample(target);
            let mut last = first.clone();
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                merge(&mut last, sample(target));
            }
            merge(&mut last, sample(target));
            let mut used: HashMap<String, u64> = HashMap::new();
            for (id, (label, ticks)) in last {
                let before = first.get(&id).map_or(0, |(_, t)| *t);
                *used.entry(label).or_default() += ticks.saturating_sub(before);
            }
            used
        });
        Self { stop, handle }
    }

    /// CPU seconds per label since [`CpuWatch::start`], largest first, as a JSON object, with
    /// `"postgres (all)"` summed.
    pub fn finish(self) -> Value {
        self.stop.store(true, Ordering::Relaxed);
        let used = self.handle.join().unwrap_or_default();
        let postgres: u64 = used
            .iter()
            .filter(|(l, _)| l.starts_with("postgres"))
            .map(|(_, t)| t)
            .sum();
        let mut rows: Vec<(String, u64)> = used.into_iter().filter(|(_, t)| *t > 0).collect();
        rows.push(("postgres (all)".to_owned(), postgres));
        rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let mut map = serde_json::Map::new();
        for (label, ticks) in rows {
            map.insert(label, json!((ticks as f64 / TICKS * 100.0).round() / 100.0));
        }
        Value::Object(map)
    }
}

#[cfg(test)]
mod tests {
    use super::postgres_kind;

    #[test]
    fn postgres_titles_become_kinds() {
        assert_eq!(postgres_kind("postgres: walwriter "), "walwriter");
        assert_eq!(
            postgres_kind("postgres: autovacuum worker mf_x"),
            "autovacuum worker"
        );
        assert_eq!(
            postgres_kind("postgres: meterflow mf_perf_e2e_1 127.0.0.1(5544) idle"),
            "backend"
        );
        assert_eq!(
            postgres_kind("/usr/lib/postgresql/15/bin/postgres -D /var/lib/x"),
            "postmaster"
        );
    }
}
