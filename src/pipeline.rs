//! `meterflow pipeline`: Kafka → timely/differential → Postgres, on W workers in one or several processes.
//!
//! Start-up: ensure the topic, take over the writer lease (process 0), read the committed offsets, start
//! the Postgres writer (process 0), then run the workers. Every worker reads its own partitions from the
//! committed offsets on; worker 0 hands completed epochs to the writer.
//!
//! The process has one tokio runtime and one cancellation token. Everything asynchronous (the Postgres
//! writer, the workers' claims, the watchers, the metrics endpoint) runs on that runtime, and each run
//! has a child of the token:
//!
//! ```text
//!  shutdown (SIGINT/SIGTERM) ──cancels──► run's token ◄──cancels── new partitions (restart.rs: run again)
//!                                           │
//!          ┌──────────────────┬─────────────┼────────────────┬──────────────────┐
//!   workers stop at the   config watcher  lag monitor   re-rating runner   partition
//!   end of their epoch    (watch.rs,      (watch.rs,    (leader; between   watcher
//!                          leader)         leader)       jobs, awaited)
//! ```
//! The leader runs the re-rating jobs the API queues (`meterflow_sinks::rerating_jobs`): a job corrects
//! the stored state in one transaction and hands the change to worker 0's rating, which takes it in at
//! one epoch, so the dataflow goes on from the corrected state without a restart.
//!
//! Length: the start-up reads top to bottom as one sequence (topic, lease, restore, writer,
//! watchers, workers, shutdown); what runs beside it is already apart in `pipeline/watch.rs` and
//! `pipeline/restart.rs`.

mod restart;
mod watch;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use meterflow_dataflow::classify::new_watermark;
use meterflow_dataflow::source::{owned_partitions, spawn_reader};
use meterflow_dataflow::worker::{Correction, RatingFeed};
use meterflow_dataflow::{
    run_worker, ControlFeed, Feeds, GraphContext, SinkChannels, SourceConfig, WatermarkPolicy,
    WorkerConfig,
};
use meterflow_model::{Limits, Meter, PriceBook};
use meterflow_sinks::restore;
use meterflow_store::{meters, price_books, watermark_floors, PgClaims};
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::kafka;
use restart::watch_partitions;
use watch::{monitor_lag, watch_config};

/// The pipeline's flags: per-process ones, and those that override `[pipeline]` keys of the configuration
/// (src/config.rs documents each and lists which flag sets which key).
#[derive(Debug, clap::Args)]
pub struct PipelineArgs {
    /// Timely worker threads in this process (pipeline.workers) [env: MF_PIPELINE_WORKERS; default 1].
    #[arg(long, short = 'w')]
    pub workers: Option<usize>,
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
    /// After the events topic was deleted and recreated: forget where the old one was read and read the
    /// new one from its start. Events counted before stay counted; their copies count as duplicates.
    /// Without it the pipeline refuses to start on a recreated topic.
    #[arg(long)]
    pub reset_source: bool,
    /// How often an epoch closes, i.e. how often results are committed (pipeline.epoch_ms) [env:
    /// MF_PIPELINE_EPOCH_MS; default 250].
    #[arg(long)]
    pub epoch_ms: Option<u64>,
    /// While the pipeline is behind the topic's end, every epoch but the first lasts at least this
    /// long, and up to 4/5 of the idle timeout while no window can close before it ends; 0: never
    /// (pipeline.catch_up_epoch_ms) [env: MF_PIPELINE_CATCH_UP_EPOCH_MS; default 2000].
    #[arg(long)]
    pub catch_up_epoch_ms: Option<u64>,
    /// Allowed out-of-orderness: a partition's watermark trails its greatest event time by this much
    /// (pipeline.out_of_orderness_ms) [env: MF_OUT_OF_ORDERNESS_MS; default 5000].
    #[arg(long)]
    pub out_of_orderness_ms: Option<u64>,
    /// Allowed lateness: a window is finalized once the watermark passes its end plus this
    /// (pipeline.allowed_lateness_secs) [env: MF_ALLOWED_LATENESS_SECS; default 3600].
    #[arg(long)]
    pub allowed_lateness_secs: Option<u64>,
    /// A partition with no records for this long stops holding the watermark back
    /// (pipeline.idle_timeout_secs) [env: MF_IDLE_TIMEOUT_SECS; default 10].
    #[arg(long)]
    pub idle_timeout_secs: Option<u64>,
    /// A JSON file with meter definitions (an array of `{"meter","event_type","aggregation",
    /// "value_property","window"}`), created at start-up if missing; more can be added with
    /// POST /api/v1/meters while running (pipeline.meters_file) [env: MF_METERS_FILE].
    #[arg(long)]
    pub meters: Option<std::path::PathBuf>,
    /// Where to serve the pipeline's Prometheus metrics; empty: nowhere (pipeline.metrics_addr) [env:
    /// MF_PIPELINE_METRICS_ADDR; default 127.0.0.1:9464].
    #[arg(long)]
    pub metrics_addr: Option<String>,
}

/// Most records a reader hands over at once, with catch-up epochs on (the default). A batch's claims
/// are one transaction of two COPYs, and fewer, larger ones cost Postgres less: 4,096 → 16,384 took
/// ~1–2 of 15 Postgres CPU-seconds off a 1M backfill (issue 15, perf/RESULTS.md). Such a batch is read
/// in well under the catch-up interval; with catch-up epochs off, batches stay at [`BACKLOGGED`], as an
/// epoch cannot split a batch and `epoch_ms` alone then says how often a commit comes.
const READ_BATCH: usize = 16_384;

/// Records queued at most between each reader and its worker, in whole batches (the memory of a
/// burst, `perf` burst).
const QUEUED_RECORDS: usize = 65_536;

/// A batch of at least this many records says the reader is behind: it fills one within its 10 ms
/// window only from records already waiting in Kafka (the catch-up epochs, `dataflow/src/catch_up.rs`).
/// Below [`READ_BATCH`], so a backlog is seen whether or not a whole batch fills in the window. Also
/// the first batch's size: a restart's first commit holds it (recovery: a first batch of 16,384 made
/// that commit 0.3 s later).
const BACKLOGGED: usize = 4_096;

/// Runs the pipeline until it is caught up (`--until-caught-up`), stopped by a signal, or fails. When
/// the events topic gains partitions, the pipeline commits what it has, stops its workers and starts
/// again with the partitions assigned anew (like a recovery, in-process).
pub fn run(args: &PipelineArgs, cfg: &Config) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    meterflow_sinks::metrics::register_all();
    if !cfg.pipeline.metrics_addr.is_empty() {
        serve_metrics(&runtime, &cfg.pipeline.metrics_addr);
    }
    let shutdown = CancellationToken::new();
    runtime.spawn(stop_on_signal(shutdown.clone()));
    loop {
        let restart = Arc::new(AtomicBool::new(false));
        run_once(args, cfg, &runtime, shutdown.child_token(), &restart)?;
        if !restart.load(Ordering::Relaxed) || shutdown.is_cancelled() {
            return Ok(());
        }
        eprintln!("pipeline: restarting in-process (the topic gained partitions)");
    }
}

fn run_once(
    args: &PipelineArgs,
    cfg: &Config,
    runtime: &tokio::runtime::Runtime,
    run: CancellationToken,
    restart: &Arc<AtomicBool>,
) -> Result<()> {
    let (database_url, brokers, topic) = (
        cfg.database.url.expose(),
        cfg.kafka.brokers.as_str(),
        cfg.kafka.events_topic.as_str(),
    );
    let started = Instant::now();
    // However this run ends, its tasks end with it.
    let _end_of_run = run.clone().drop_guard();
    // The workers look at a flag between steps: set when the run is cancelled (a signal, new
    // partitions); they then commit what they have and return.
    let stop = Arc::new(AtomicBool::new(false));
    runtime.spawn({
        let (run, stop) = (run.clone(), stop.clone());
        async move {
            run.cancelled().await;
            stop.store(true, Ordering::Relaxed);
        }
    });
    let partitions = runtime.block_on(kafka::ensure_topic(
        brokers,
        topic,
        kafka::DEFAULT_PARTITIONS,
    ))?;

    let leader = args.process == 0;
    let lateness_micros = i64::try_from(cfg.pipeline.allowed_lateness_secs)
        .ok()
        .and_then(|secs| secs.checked_mul(1_000_000))
        .ok_or_else(|| {
            anyhow!(
                "pipeline.allowed_lateness_secs = {} is too large; give at most {} seconds",
                cfg.pipeline.allowed_lateness_secs,
                i64::MAX / 1_000_000
            )
        })?;
    let file_meters = match cfg.pipeline.meters_file() {
        Some(path) => read_meters_file(&path)?,
        None => Vec::new(),
    };
    let (lease, start_offsets, (watermark, event_times), meters, rating) =
        runtime.block_on(async {
            let mut conn = PgConnection::connect(database_url).await.with_context(|| {
                format!(
                    "cannot connect to Postgres at {}; is it running and migrated?",
                    cfg.database.url.masked()
                )
            })?;
            crate::require_migrated(&mut conn, cfg).await?;
            for meter in &file_meters {
                match meters::create_meter(&mut conn, meter).await? {
                    meters::MeterCreated::Created | meters::MeterCreated::Identical => {}
                    meters::MeterCreated::Different => anyhow::bail!(
                    "meter {} in the meters file differs from the stored one; meters are immutable \
                     once created: give the new definition another name",
                    meter.meter
                ),
                    meters::MeterCreated::Collides(why) => {
                        anyhow::bail!("meter {} in the meters file: {why}", meter.meter)
                    }
                }
            }
            let lease = if leader {
                crate::source_check::check_source(
                    &mut conn,
                    brokers,
                    topic,
                    partitions,
                    args.reset_source,
                )
                .await?;
                let lease = meterflow_sinks::acquire_lease(&mut conn, topic).await?;
                restore::set_allowed_lateness(&mut conn, topic, lateness_micros).await?;
                Some(lease)
            } else {
                None
            };
            let offsets = meterflow_sinks::stored_offsets(&mut conn, topic).await?;
            let times = restore::stored_event_times(&mut conn, topic).await?;
            let meters = meters::load_meters(&mut conn).await?;
            // Rating needs each period's whole usage: the leader (which alone feeds and commits it) starts
            // from what was committed, read under the lease so nothing commits meanwhile.
            let rating = if leader {
                let loaded = Instant::now();
                // A second connection serves the charges beside the rows, in the same snapshot.
                let mut beside = PgConnection::connect(database_url).await?;
                let state = restore::load_rating_state(&mut conn, &mut beside).await?;
                let books = price_books::load_price_books(&mut conn).await?;
                tracing::info!(
                    rows = state.rows.len(),
                    charges = state.charges.len(),
                    books = books.len(),
                    seconds = loaded.elapsed().as_secs_f64(),
                    "loaded the committed rows and charges rating starts from"
                );
                Some((state, books))
            } else {
                None
            };
            anyhow::Ok((lease, offsets, times, meters, rating))
        })?;
    let (mut book_updates, mut corrections) = (None, None);
    let rating = rating.map(|(state, books)| {
        let (tx, rx) = crossbeam_channel::bounded(1);
        book_updates = Some((books.clone(), tx));
        let (correct, corrected) = crossbeam_channel::unbounded();
        corrections = Some(correct);
        RatingFeed {
            state,
            books,
            updates: rx,
            corrections: corrected,
        }
    });
    let shared_watermark = new_watermark(watermark);
    // The leader's worker 0 feeds the meters and the committed watermark to every worker of every
    // process (the dataflow's control input); the config watcher, on the leader only, sends it new
    // meters and price books and wakes the re-rating runner.
    let jobs_queued = Arc::new(tokio::sync::Notify::new());
    let control = if leader {
        let (meter_updates, updates) = crossbeam_channel::unbounded();
        let (floor_updates, floors) = crossbeam_channel::unbounded();
        runtime.spawn(watch_config(
            database_url.to_owned(),
            (meters.clone(), meter_updates),
            book_updates,
            watch::Floors {
                topic: topic.to_owned(),
                known: None,
                updates: floor_updates,
            },
            jobs_queued.clone(),
            run.clone(),
        ));
        Some(ControlFeed {
            meters,
            updates,
            watermark: shared_watermark.clone(),
            floors,
        })
    } else {
        None
    };
    // The leader runs the re-rating jobs; this run waits for its runner before it returns, so the
    // next run's start-up never loads the state while a job of this one commits.
    let runner = match (&lease, corrections) {
        (Some(lease), Some(corrections)) => Some(runtime.spawn(run_rerating_jobs(
            database_url.to_owned(),
            lease.clone(),
            jobs_queued,
            corrections,
            run.clone(),
        ))),
        _ => None,
    };

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
            let writer = meterflow_sinks::spawn_writer(
                runtime.handle().clone(),
                database_url.to_owned(),
                lease,
                batch_rx,
                ack_tx,
                shared_watermark.clone(),
            )?;
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

    runtime.spawn(watch_partitions(
        brokers.to_owned(),
        topic.to_owned(),
        partitions,
        run.clone(),
        restart.clone(),
    ));

    let catch_up = cfg.pipeline.catch_up_epoch_ms > 0;
    let source = SourceConfig {
        brokers: brokers.to_owned(),
        topic: topic.to_owned(),
        partitions,
        start_offsets,
        until_caught_up: args.until_caught_up,
        batch_size: if catch_up { READ_BATCH } else { BACKLOGGED },
        first_batch: BACKLOGGED,
        limits: Limits::default(),
        watermark: shared_watermark.clone(),
    };
    let queued = (QUEUED_RECORDS / source.batch_size.max(1)).max(1);
    let config = WorkerConfig {
        epoch_interval: Duration::from_millis(cfg.pipeline.epoch_ms),
        catch_up_interval: catch_up.then(|| Duration::from_millis(cfg.pipeline.catch_up_epoch_ms)),
        // Under the idle timeout, with a fifth of it left for the commit: the commit sees a partition
        // only at the end of an epoch that read it, and must not take a held one for idle.
        catch_up_hold: catch_up
            .then(|| Duration::from_secs(cfg.pipeline.idle_timeout_secs).mul_f64(0.8)),
        full_batch: BACKLOGGED,
        watermarks: WatermarkPolicy {
            out_of_orderness_micros: cfg.pipeline.out_of_orderness_ms as i64 * 1_000,
            idle_timeout: Duration::from_secs(cfg.pipeline.idle_timeout_secs),
            initial: event_times,
        },
        ..WorkerConfig::default()
    };
    if leader {
        runtime.spawn(monitor_lag(
            database_url.to_owned(),
            brokers.to_owned(),
            topic.to_owned(),
            partitions,
            config.epochs_behind.clone(),
            run.clone(),
        ));
    }
    let context = GraphContext {
        allowed_lateness_micros: lateness_micros,
    };
    let database_url_owned = database_url.to_owned();
    let sink = Arc::new(Mutex::new(sink));
    let rating = Arc::new(Mutex::new(rating));
    let control = Arc::new(Mutex::new(control));
    let handle = runtime.handle().clone();
    let guards = timely::execute(
        timely_config(args, cfg.pipeline.workers)?,
        move |worker| -> Result<_> {
            let owned = owned_partitions(source.partitions, worker.index(), worker.peers());
            let claims = PgClaims::new(handle.clone(), &database_url_owned);
            let mut source = source.clone();
            let mut config = config.clone();
            if !leader {
                let (offsets, times) =
                    progress_under_the_lease(&handle, &database_url_owned, &source.topic)?;
                source.start_offsets = offsets;
                // As the leader's commit sees them: a held catch-up epoch reads them (catch_up.rs).
                config.watermarks.initial = times;
            }
            let (reader, _handle) = spawn_reader(source, owned, Box::new(claims), queued)
                .context("starting a Kafka reader thread")?;
            // Worker 0 of process 0 hands epochs to the writer (commit.rs), feeds rating its restored
            // state and the price books, and feeds every worker the meters and the watermark; the
            // others have none of it.
            let feeds = if worker.index() == 0 {
                let take = |what: &str| anyhow!("{what} lock poisoned");
                Feeds {
                    sink: sink.lock().map_err(|_| take("sink"))?.take(),
                    rating: rating.lock().map_err(|_| take("rating"))?.take(),
                    control: control.lock().map_err(|_| take("control"))?.take(),
                }
            } else {
                Feeds::default()
            };
            Ok(run_worker(
                worker,
                &config,
                context.clone(),
                reader,
                feeds,
                &stop,
            )?)
        },
    )
    .map_err(|e| anyhow!("starting timely: {e}"))?;

    let mut records = 0;
    let mut epochs = 0;
    for result in guards.join() {
        let summary = result.map_err(|e| anyhow!("a worker failed: {e}"))??;
        records += summary.records;
        epochs = epochs.max(summary.epochs);
    }
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(runner) = runner {
        run.cancel();
        let _ = runtime.block_on(runner);
    }
    let written = match writer {
        Some(done) => Some(done.recv().context("the Postgres writer stopped")?),
        None => None,
    };
    eprintln!(
        "pipeline: process {} read {records} records in {epochs} epochs, {elapsed:.1}s ({:.0} records/s)",
        args.process,
        records as f64 / elapsed.max(1e-9)
    );
    if written.is_some() {
        // A clean stop: remember where each partition was read, so a recreated topic is told apart at
        // the next start even if this was the first run.
        runtime.block_on(async {
            let mut conn = PgConnection::connect(database_url).await?;
            crate::source_check::anchor_positions(&mut conn, brokers, topic, partitions).await
        })?;
    }
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

/// Runs the re-rating jobs the API queues (woken by `queued`) until `stop`: each job's correction goes
/// to worker 0's rating through `corrections`, and the job is done once the epoch that took it in is
/// committed (or the workers are gone: the next start loads the corrected state).
async fn run_rerating_jobs(
    database_url: String,
    lease: meterflow_sinks::Lease,
    queued: Arc<tokio::sync::Notify>,
    corrections: crossbeam_channel::Sender<Correction>,
    stop: CancellationToken,
) {
    // Two connections: a job's, and the one that records its outcome.
    let pool = match sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_lazy(&database_url)
    {
        Ok(pool) => pool,
        Err(e) => {
            tracing::error!(error = %e, "cannot run re-rating jobs: bad database url");
            return;
        }
    };
    let apply: meterflow_sinks::rerating_jobs::Apply = Arc::new(move |change| {
        let (tell, told) = tokio::sync::oneshot::channel();
        let sent = corrections.send(Correction {
            change,
            committed: Box::new(move || {
                let _ = tell.send(());
            }),
        });
        Box::pin(async move {
            if sent.is_ok() {
                // An error: the workers are gone without committing it; the next start loads it.
                let _ = told.await;
            }
        })
    });
    meterflow_sinks::rerating_jobs::runner(pool.clone(), lease, queued, apply, stop).await;
    pool.close().await;
}

/// The committed offsets and per-partition event times as a process other than the leader must read
/// them: once the cluster has connected, which the leader joins only after taking the lease, so no
/// commit of an earlier leader can land after them (review finding 7). Read before that, they could be
/// overtaken by the old leader's last commits, and this process's readers would count those records
/// again (and its workers judge a held catch-up epoch by older event times than the commit's).
fn progress_under_the_lease(
    runtime: &tokio::runtime::Handle,
    url: &str,
    topic: &str,
) -> Result<(HashMap<i32, i64>, HashMap<i32, i64>)> {
    runtime
        .block_on(async {
            let mut conn = PgConnection::connect(url).await?;
            let offsets = meterflow_sinks::stored_offsets(&mut conn, topic).await?;
            let (_, times) = restore::stored_event_times(&mut conn, topic).await?;
            Ok::<_, sqlx::Error>((offsets, times))
        })
        .context("reading the committed offsets and event times")
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

/// Reads a meters file: a JSON array of definitions, each checked.
fn read_meters_file(path: &std::path::Path) -> Result<Vec<Meter>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let meters: Vec<Meter> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} must be a JSON array of meters like \
             {{\"meter\":\"api_calls\",\"event_type\":\"api_call\",\"aggregation\":\"count\",\"window\":\"hour\"}}",
            path.display()
        )
    })?;
    for m in &meters {
        if let Err(errors) = m.validate() {
            let why: Vec<String> = errors
                .iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect();
            anyhow::bail!("{}: meter {}: {}", path.display(), m.meter, why.join("; "));
        }
    }
    Ok(meters)
}

/// Serves the pipeline's Prometheus metrics; a busy address is reported, not fatal.
fn serve_metrics(runtime: &tokio::runtime::Runtime, addr: &str) {
    let addr = addr.to_owned();
    runtime.spawn(async move {
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(|| async {
                let mut out = Vec::new();
                let encoder = prometheus::TextEncoder::new();
                let _ = prometheus::Encoder::encode(&encoder, &prometheus::gather(), &mut out);
                ([("content-type", "text/plain; version=0.0.4")], out)
            }),
        );
        match tokio::net::TcpListener::bind(&addr).await {
            Ok(listener) => {
                tracing::info!(%addr, "pipeline metrics at /metrics");
                let _ = axum::serve(listener, app).await;
            }
            Err(e) => tracing::warn!(%addr, error = %e, "cannot serve pipeline metrics"),
        }
    });
}

async fn stop_on_signal(shutdown: CancellationToken) {
    crate::shutdown_signal().await;
    tracing::info!("stopping: closing the current epoch and committing what is done");
    shutdown.cancel();
}

fn timely_config(args: &PipelineArgs, workers: usize) -> Result<timely::Config> {
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
            threads: workers,
            process: args.process,
            addresses,
            report: false,
            zerocopy: false,
        }
    } else if workers > 1 {
        timely::CommunicationConfig::Process(workers)
    } else {
        timely::CommunicationConfig::Thread
    };
    Ok(timely::Config {
        communication,
        worker: timely::WorkerConfig::default(),
    })
}
