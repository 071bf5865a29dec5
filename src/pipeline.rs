//! `meterflow pipeline`: Kafka → timely/differential → Postgres, on W workers in one or several processes.
//!
//! Start-up: ensure the topic, take over the writer lease (process 0), read the committed offsets, start
//! the Postgres writer (process 0), then run the workers. Every worker reads its own partitions from the
//! committed offsets on; worker 0 hands completed epochs to the writer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use meterflow_dataflow::source::{owned_partitions, spawn_reader};
use meterflow_dataflow::{run_worker, SinkChannels, SourceConfig, WorkerConfig};
use sqlx::{Connection, PgConnection};

use crate::kafka;

#[derive(Debug, clap::Args)]
pub struct PipelineArgs {
    /// Timely worker threads in this process.
    #[arg(long, short = 'w', default_value_t = 1)]
    pub workers: usize,
    /// Processes in the timely cluster.
    #[arg(long, default_value_t = 1)]
    pub processes: usize,
    /// This process's index in the cluster (0-based).
    #[arg(long, default_value_t = 0)]
    pub process: usize,
    /// File with one `host:port` per process, in process order (needed when --processes > 1).
    #[arg(long)]
    pub hostfile: Option<std::path::PathBuf>,
    /// Stop once everything in the topic at start-up is committed (backfills, tests, benchmarks).
    #[arg(long)]
    pub until_caught_up: bool,
    /// How often an epoch closes, i.e. how often results are committed.
    #[arg(long, default_value_t = 250)]
    pub epoch_ms: u64,
}

pub fn run(args: &PipelineArgs, database_url: &str, brokers: &str, topic: &str) -> Result<()> {
    let started = Instant::now();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(kafka::ensure_topic(
        brokers,
        topic,
        kafka::DEFAULT_PARTITIONS,
    ))?;
    let partitions = kafka::partition_count(brokers, topic)?;

    let leader = args.process == 0;
    let (lease, start_offsets) = runtime.block_on(async {
        let mut conn = PgConnection::connect(database_url).await.with_context(|| {
            format!("cannot connect to Postgres at {database_url}; is it running and migrated?")
        })?;
        let lease = if leader {
            Some(meterflow_sinks::acquire_lease(&mut conn, topic).await?)
        } else {
            None
        };
        let offsets = meterflow_sinks::stored_offsets(&mut conn, topic).await?;
        anyhow::Ok((lease, offsets))
    })?;

    // The writer thread (process 0 only) and its channels to worker 0.
    let (sink, writer) = match lease {
        Some(lease) => {
            tracing::info!(
                topic,
                generation = lease.generation,
                "took over the writer lease"
            );
            let (batch_tx, batch_rx) = crossbeam_channel::bounded(4);
            let (ack_tx, ack_rx) = crossbeam_channel::unbounded();
            let writer =
                meterflow_sinks::spawn_writer(database_url.to_owned(), lease, batch_rx, ack_tx)?;
            (
                Some(SinkChannels {
                    batches: batch_tx,
                    acks: ack_rx,
                }),
                Some(watch_writer(writer)?),
            )
        }
        None => (None, None),
    };

    let stop = Arc::new(AtomicBool::new(false));
    runtime.spawn(stop_on_signal(stop.clone()));

    let source = SourceConfig {
        brokers: brokers.to_owned(),
        topic: topic.to_owned(),
        partitions,
        start_offsets,
        until_caught_up: args.until_caught_up,
        batch_size: 4096,
    };
    let config = WorkerConfig {
        epoch_interval: Duration::from_millis(args.epoch_ms),
        ..WorkerConfig::default()
    };
    let sink = Arc::new(Mutex::new(sink));
    let guards = timely::execute(timely_config(args)?, move |worker| {
        let owned = owned_partitions(source.partitions, worker.index(), worker.peers());
        let (reader, _handle) =
            spawn_reader(source.clone(), owned, 64).map_err(|e| e.to_string())?;
        // Worker 0 of process 0 hands epochs to the writer (commit.rs); the others have no sink.
        let sink = if worker.index() == 0 {
            sink.lock()
                .map_err(|_| "sink lock poisoned".to_owned())?
                .take()
        } else {
            None
        };
        run_worker(worker, &config, reader, sink, &stop)
    })
    .map_err(|e| anyhow!("starting timely: {e}"))?;

    let mut records = 0;
    let mut epochs = 0;
    for result in guards.join() {
        let summary = result
            .map_err(|e| anyhow!("a worker failed: {e}"))?
            .map_err(|e| anyhow!("{e}"))?;
        records += summary.records;
        epochs = epochs.max(summary.epochs);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let written = match writer {
        Some(done) => Some(done.recv().context("the Postgres writer stopped")?),
        None => None,
    };
    eprintln!(
        "pipeline: process {} read {records} records in {epochs} epochs, {elapsed:.1}s ({:.0} records/s)",
        args.process,
        records as f64 / elapsed.max(1e-9)
    );
    if let Some(w) = written {
        eprintln!(
            "pipeline: committed {} transactions: {} aggregate changes, {} dead letters ({:.2}s in commits)",
            w.commits,
            w.aggregate_rows,
            w.dead_letters,
            w.commit_time.as_secs_f64()
        );
        println!(
            "{}",
            serde_json::json!({"process": args.process, "records": records, "epochs": epochs, "seconds": elapsed,
                "commits": w.commits, "aggregate_rows": w.aggregate_rows, "dead_letters": w.dead_letters})
        );
    }
    Ok(())
}

/// Waits for the writer in a thread of its own: a permanent sink error (fenced, refused by Postgres)
/// stops the whole process with the reason, because the workers cannot make progress without the sink.
fn watch_writer(
    writer: std::thread::JoinHandle<
        Result<meterflow_sinks::WriterSummary, meterflow_sinks::SinkError>,
    >,
) -> Result<crossbeam_channel::Receiver<meterflow_sinks::WriterSummary>> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::Builder::new().name("pg-writer-watch".into()).spawn(move || match writer.join() {
        Ok(Ok(summary)) => {
            let _ = tx.send(summary);
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "the Postgres sink stopped; the pipeline stops with it");
            eprintln!("error: the Postgres sink stopped: {e}");
            std::process::exit(2);
        }
        Err(_) => {
            eprintln!("error: the Postgres sink panicked");
            std::process::exit(2);
        }
    })?;
    Ok(rx)
}

async fn stop_on_signal(stop: Arc<AtomicBool>) {
    crate::shutdown_signal().await;
    tracing::info!("stopping: closing the current epoch and committing what is done");
    stop.store(true, Ordering::Relaxed);
}

fn timely_config(args: &PipelineArgs) -> Result<timely::Config> {
    let communication = if args.processes > 1 {
        let path = args
            .hostfile
            .as_ref()
            .context("--processes > 1 needs --hostfile with one host:port per line")?;
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let addresses: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect();
        anyhow::ensure!(
            addresses.len() == args.processes,
            "{} lists {} addresses but --processes is {}",
            path.display(),
            addresses.len(),
            args.processes
        );
        anyhow::ensure!(
            args.process < args.processes,
            "--process must be below --processes"
        );
        timely::CommunicationConfig::Cluster {
            threads: args.workers,
            process: args.process,
            addresses,
            report: false,
            zerocopy: false,
        }
    } else if args.workers > 1 {
        timely::CommunicationConfig::Process(args.workers)
    } else {
        timely::CommunicationConfig::Thread
    };
    Ok(timely::Config {
        communication,
        worker: timely::WorkerConfig::default(),
    })
}
