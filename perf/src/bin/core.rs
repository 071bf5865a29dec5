//! `core`: the dataflow alone (`../shared/PERF.md`, ids `core` and `scale`), from decoded events in
//! memory to aggregates and charges: no Kafka, no Postgres, no claims. `meterflow_dataflow::operators::build`
//! runs inside `timely::execute` with W workers, fed the way `worker.rs` feeds it (items one by one,
//! offset markers per partition, the price books at epoch 0 on worker 0), and its sink stream is
//! counted on every worker (or, with `--commit`, handed over by `commit_epochs` to a thread that
//! counts each epoch's batch and acknowledges it at once).
//!
//!     cargo build --release --locked -p meterflow-perf --bin core
//!     target/release/core --events 4000000 --workers 1,2 --runs 3            # books price every window
//!     target/release/core --events 4000000 --workers 1,2 --runs 3 --no-books # rating does nothing
//!     target/release/core --events 4000000 --workers 1,2 --runs 3 --dimensions 50x5
//!                         # every type's meter grouped by model (50 values) and region (5 values)
//!
//! The input is the peers' workload shape (`../shared/peers/WORKLOAD.md`): 10,000 customers, 5 event
//! types (40/25/15/12/8 %), event *i* of N at `i·H/N` ± 60 s with 2 % a further 0–600 s late, values
//! decimals in [0, 100] with 0–3 places, and by default the peers' density (H = 48 h per 10M events,
//! about 4.4 events per customer × type × hour). No meter is defined, so every type goes to its default meter
//! (hourly sum and count per customer × type), the peers' aggregation. `--events` is the whole data
//! set: the same for every worker count (so the results are identical and the 1→2 ratio compares the
//! same work). It is generated before timing, already classified as counted items, each customer on a
//! partition (`fnv1a(customer) % --partitions`) and each partition on the worker a reader would give it
//! (`owned_partitions`). Each worker's share is made on a thread of its own that lives through the
//! run, as each worker's reader decodes its events on its own thread in the pipeline (`source.rs`):
//! a worker frees what its reader allocated, never what the other's did. An epoch is
//! `--epoch-events` consecutive events of the stream, all workers together (each feeds its share):
//! epoch e is fed, the inputs advance to e+1, and the worker steps until the output frontier passes
//! `e + 1 − --inflight`. The committed watermark follows the epochs
//! (greatest event time so far minus 5 s, as the sink would set it).
//!
//! Each worker count runs as its own process, alternating (1, 2, 1, 2, …), so one run's memory does not
//! weigh on the next. Prints one JSON line per run (workers, events, seconds, events/s, events/s per
//! worker, output updates by kind, peak RSS) and a summary: medians over `--runs` and the 1→2 ratio.
//! Each run checks that the row changes add up to every event exactly once (count and exact sum).
//!
//! Length: one benchmark: the feeding, the timed run, the check of its output and the report share their
//! state.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use crossbeam_channel::unbounded;
use meterflow_dataflow::classify::{Classified, SourceItem};
use meterflow_dataflow::commit::commit_epochs;
use meterflow_dataflow::operators::{build, Epoch};
use meterflow_dataflow::source::owned_partitions;
use meterflow_dataflow::{Control, GraphContext, GraphInputs, SinkChannels, SinkUpdate};
use meterflow_model::{fnv1a, EpochBatch, Event, PartitionProgress, PriceBook, PriceModel, Tier};
use meterflow_perf::median;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::{Operator, Probe};
use timely::dataflow::ProbeHandle;

/// The allocator the `meterflow` binary runs with, so the figures are the pipeline's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// 2024-01-15T00:00:00Z, the peers' first event time, in microseconds.
const BASE_MICROS: i64 = 1_705_276_800_000_000;
const TYPES: [(&str, u32); 5] = [
    ("api_call", 40),
    ("storage_gb_hour", 25),
    ("llm_tokens", 15),
    ("seat", 12),
    ("compute_second", 8),
];
const REGIONS: [&str; 3] = ["eu", "us", "apac"];

#[derive(Debug, Clone, Parser)]
#[command(
    about = "The dataflow alone: decoded events in memory -> aggregates and charges, 1 and 2 workers",
    long_about = "The dataflow alone (operators::build in timely::execute): decoded, classified events \
in memory -> aggregates, window charges and invoice lines, no Kafka, no Postgres. Each worker count \
runs as its own process, alternating; one JSON line per run, then a summary with medians and the \
1->2 worker ratio. Goals (issue 15): >= 1M events/s per worker, >= 1.7x from 1 to 2 workers."
)]
struct Args {
    /// Events in the data set, all workers together (the same set for every worker count).
    #[arg(long, default_value_t = 4_000_000)]
    events: usize,
    /// Worker counts to compare, e.g. `1,2`; each run is its own process.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    workers: Vec<usize>,
    /// Runs per worker count (alternating); the summary gives medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Events per epoch, all workers together (each worker feeds its share).
    #[arg(long, default_value_t = 200_000)]
    epoch_events: usize,
    /// Epochs a worker may feed ahead of the output frontier (1: wait for each epoch).
    #[arg(long, default_value_t = 1)]
    inflight: u64,
    /// No price book: rating finds nothing to price (no charges, no lines).
    #[arg(long)]
    no_books: bool,
    /// Hand the sink stream over with `commit_epochs` (everything to worker 0, one batch per epoch)
    /// to a thread that counts and acknowledges, instead of counting on each worker.
    #[arg(long)]
    commit: bool,
    /// Distinct customers.
    #[arg(long, default_value_t = 10_000)]
    customers: usize,
    /// Kafka partitions the customers are spread over (workers own `p % W`).
    #[arg(long, default_value_t = 12)]
    partitions: i32,
    /// Hours of event time the stream spans. Default: the peers' density (10M events in 48 h, so
    /// about 4.4 events per customer × type × hour), i.e. 48 × events / 10M.
    #[arg(long)]
    hours: Option<f64>,
    /// Group every event type's meter by two properties of AxB values (issue 17), e.g. `50x5`: events
    /// carry `model` (one of A) and `region` (one of B), and each type's meter (an hourly sum, as the
    /// default meter) has `group_by: ["model", "region"]`, so rows, rating periods and lines are per
    /// value pair and every contribution goes through admission. Absent: default meters, as the peers.
    #[arg(long, value_parser = meterflow_perf::parse_dimensions)]
    dimensions: Option<(u32, u32)>,
    #[arg(long, default_value_t = 20_240_115)]
    seed: u64,
    /// Internal: run one measurement with this many workers in this process.
    #[arg(long, hide = true)]
    child: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.partitions < 1 || args.epoch_events == 0 || args.inflight == 0 || args.customers == 0 {
        bail!("--partitions, --epoch-events, --inflight and --customers must be positive");
    }
    if let Some(workers) = args.child {
        // As the `meterflow` binary runs (src/main.rs): transparent huge pages off.
        if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
            eprintln!("could not turn transparent huge pages off: {e}");
        }
        let line = run(&args, workers)?;
        println!("{line}");
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let mut rates: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut seconds: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut rss: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut cpu_rates: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for _ in 0..args.runs {
        for &w in &args.workers {
            let mut cmd = Command::new(&exe);
            // As the `meterflow` binary sets it (src/main.rs, `PURGE_DELAY_MS`): freed memory kept 10 s.
            if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
                cmd.env("MIMALLOC_PURGE_DELAY", "10000");
            }
            cmd.arg("--child")
                .arg(w.to_string())
                .args(["--events", &args.events.to_string()])
                .args(["--epoch-events", &args.epoch_events.to_string()])
                .args(["--inflight", &args.inflight.to_string()])
                .args(["--customers", &args.customers.to_string()])
                .args(["--partitions", &args.partitions.to_string()])
                .args(["--hours", &hours(&args).to_string()])
                .args(["--seed", &args.seed.to_string()]);
            if args.no_books {
                cmd.arg("--no-books");
            }
            if args.commit {
                cmd.arg("--commit");
            }
            if let Some((a, b)) = args.dimensions {
                cmd.args(["--dimensions", &format!("{a}x{b}")]);
            }
            let out = cmd.output().context("running a measurement")?;
            if !out.status.success() {
                bail!(
                    "the {w}-worker run failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let line = String::from_utf8(out.stdout)?;
            let line = line.trim();
            println!("{line}");
            let v: serde_json::Value = serde_json::from_str(line)?;
            let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
            rates.entry(w).or_default().push(f("events_per_s"));
            seconds.entry(w).or_default().push(f("seconds"));
            rss.entry(w).or_default().push(f("peak_rss_mb"));
            cpu_rates
                .entry(w)
                .or_default()
                .push(f("events_per_worker_cpu_s"));
        }
    }
    let by_workers: serde_json::Map<String, serde_json::Value> = rates
        .iter()
        .map(|(w, r)| {
            let m = median(r.clone());
            (
                w.to_string(),
                serde_json::json!({
                    "median_events_per_s": m.round(),
                    "median_events_per_s_per_worker": (m / *w as f64).round(),
                    "median_seconds": median(seconds[w].clone()),
                    "median_peak_rss_mb": median(rss[w].clone()).round(),
                    "median_events_per_worker_cpu_s": median(cpu_rates[w].clone()).round(),
                    "runs": r.iter().map(|x| x.round()).collect::<Vec<_>>(),
                }),
            )
        })
        .collect();
    let scaling = match (rates.get(&1), rates.get(&2)) {
        (Some(one), Some(two)) => Some(median(two.clone()) / median(one.clone())),
        _ => None,
    };
    // Per CPU-second of the workers: what 2 workers would reach on 2 free cores is about
    // 2 × this ratio × the 1-worker rate, whatever else the machine ran.
    let cpu_efficiency = match (cpu_rates.get(&1), cpu_rates.get(&2)) {
        (Some(one), Some(two)) => Some(median(two.clone()) / median(one.clone())),
        _ => None,
    };
    let per_worker_ok = rates
        .iter()
        .all(|(w, r)| median(r.clone()) / *w as f64 >= 1_000_000.0);
    println!(
        "{}",
        serde_json::json!({
            "bench": "core",
            "summary": true,
            "events": args.events,
            "epoch_events": args.epoch_events,
            "inflight": args.inflight,
            "books": !args.no_books,
            "commit": args.commit,
            "workers": by_workers,
            "scaling_1_to_2": scaling.map(|s| (s * 1000.0).round() / 1000.0),
            "cpu_efficiency_2_vs_1": cpu_efficiency.map(|s| (s * 1000.0).round() / 1000.0),
            "goal_1m_per_worker": per_worker_ok,
            "goal_scaling_1_7": scaling.map(|s| s >= 1.7),
        })
    );
    Ok(())
}

/// With `--dimensions`: each type's meter, an hourly sum of `value` as its default meter, grouped by
/// model and region.
fn meters(args: &Args) -> Vec<meterflow_model::Meter> {
    let Some(_) = args.dimensions else {
        return Vec::new();
    };
    TYPES
        .iter()
        .map(|(t, _)| meterflow_model::Meter {
            group_by: meterflow_model::GroupBy::new(vec!["model".into(), "region".into()])
                .unwrap_or_default(),
            ..meterflow_model::Meter::default_for(t)
        })
        .collect()
}

/// The span of event time, in hours.
fn hours(args: &Args) -> f64 {
    args.hours
        .unwrap_or(48.0 * args.events as f64 / 10_000_000.0)
}

/// One worker's input, by epoch, and the partitions it owns.
struct Share {
    epochs: Vec<Vec<SourceItem>>,
}

/// The data set, split as the readers would split it.
struct DataSet {
    shares: Vec<Share>,
    /// The greatest event time up to and including each epoch (for the watermark).
    max_time: Vec<i64>,
    total: Decimal,
}

/// The data set, of which only worker `only`'s share is made (the others stay empty).
fn generate(args: &Args, workers: usize, only: usize) -> DataSet {
    let mut rng = SmallRng::seed_from_u64(args.seed);
    let n = args.events;
    let epochs = n.div_ceil(args.epoch_events);
    let span = (hours(args) * 3_600_000_000.0) as i64;
    let customers: Vec<(String, i32)> = (0..args.customers)
        .map(|c| {
            let id = format!("cust_{c:05}");
            let p = (fnv1a(&[id.as_bytes()]) as u64 % args.partitions as u64) as i32;
            (id, p)
        })
        .collect();
    let worker_of: Vec<usize> = (0..args.partitions)
        .map(|p| {
            (0..workers)
                .find(|w| owned_partitions(args.partitions, *w, workers).contains(&p))
                .unwrap_or(0)
        })
        .collect();
    let mut shares: Vec<Share> = (0..workers)
        .map(|_| Share {
            epochs: (0..epochs).map(|_| Vec::new()).collect(),
        })
        .collect();
    let mut offsets = vec![0i64; args.partitions as usize];
    let mut max_time = vec![i64::MIN; epochs];
    let mut total = Decimal::ZERO;
    let weight: u32 = TYPES.iter().map(|t| t.1).sum();
    for i in 0..n {
        let (customer, partition) = &customers[rng.random_range(0..customers.len())];
        let mut pick = rng.random_range(0..weight);
        let event_type = TYPES
            .iter()
            .find(|(_, w)| {
                let hit = pick < *w;
                pick = pick.saturating_sub(*w);
                hit
            })
            .map_or("api_call", |t| t.0);
        let mut t = BASE_MICROS
            + (i as i128 * span as i128 / n as i128) as i64
            + rng.random_range(-60_000_000..=60_000_000);
        if rng.random_range(0..100) < 2 {
            t -= rng.random_range(0..=600_000_000);
        }
        let places = rng.random_range(0..=3u32);
        let value = Decimal::new(rng.random_range(0..=100 * 10i64.pow(places)), places);
        total += value;
        let dimensions = args
            .dimensions
            .map(|(models, regions)| (rng.random_range(0..models), rng.random_range(0..regions)));
        let offset = &mut offsets[*partition as usize];
        let epoch = i / args.epoch_events;
        max_time[epoch] = max_time[epoch].max(t);
        let worker = worker_of[*partition as usize];
        if worker == only {
            let event = Event {
                event_id: format!("evt_{i:09}"),
                customer_id: customer.clone(),
                event_type: event_type.to_owned(),
                event_time_micros: t,
                value,
                properties: match dimensions {
                    None => format!(r#"{{"region":"{}"}}"#, REGIONS[i % 3]),
                    Some((model, region)) => {
                        format!(r#"{{"model":"m{model}","region":"r{region}"}}"#)
                    }
                },
            };
            shares[worker].epochs[epoch].push(SourceItem {
                partition: *partition,
                offset: *offset,
                what: Classified::Count(event),
            });
        }
        *offset += 1;
    }
    for e in 1..epochs {
        max_time[e] = max_time[e].max(max_time[e - 1]);
    }
    DataSet {
        shares,
        max_time,
        total,
    }
}

/// A book for each event type's default meter, in force forever, for every customer: graduated tiers
/// that a busy customer crosses within the period.
fn books() -> Vec<PriceBook> {
    let d = |s: &str| s.parse::<Decimal>().unwrap_or_default();
    TYPES
        .iter()
        .map(|(t, _)| PriceBook {
            entries: Default::default(),
            dimensions: Default::default(),
            price_book_id: format!("pb_{t}"),
            meter: (*t).to_owned(),
            customer_id: None,
            currency: "USD".into(),
            effective_from: 0,
            effective_to: None,
            model: PriceModel::Graduated {
                tiers: vec![
                    Tier {
                        up_to: Some(d("500")),
                        unit_price: d("0.010"),
                        flat_fee: d("1"),
                    },
                    Tier {
                        up_to: Some(d("2000")),
                        unit_price: d("0.008"),
                        flat_fee: Decimal::ZERO,
                    },
                    Tier {
                        up_to: None,
                        unit_price: d("0.005"),
                        flat_fee: Decimal::ZERO,
                    },
                ],
            },
            minimum_per_period: None,
        })
        .collect()
}

/// What the sink stream carried.
#[derive(Default, Clone, Debug)]
struct Counts {
    rows: u64,
    quarantined: u64,
    charges: u64,
    lines: u64,
    late: u64,
    offsets: u64,
    other: u64,
    /// Σ event_count and Σ value over the group rows' changes: every event exactly once.
    row_events: i64,
    row_value: Decimal,
}

impl Counts {
    fn add(&mut self, update: &SinkUpdate) {
        match update {
            SinkUpdate::Row(_, item, agg) => {
                self.rows += 1;
                if item.is_none() {
                    self.row_events += agg.event_count;
                    self.row_value += agg.value;
                }
            }
            SinkUpdate::QuarantinedRow(_) | SinkUpdate::QuarantinedPeriod(..) => {
                self.quarantined += 1
            }
            SinkUpdate::Charge(..) => self.charges += 1,
            SinkUpdate::Line(_) => self.lines += 1,
            SinkUpdate::Late(_) => self.late += 1,
            SinkUpdate::Offset(_) => self.offsets += 1,
            SinkUpdate::DeadLetter(_)
            | SinkUpdate::Duplicate(_)
            | SinkUpdate::DimensionValue(_) => self.other += 1,
        }
    }

    fn add_batch(&mut self, b: &EpochBatch) {
        self.rows += b.aggregates.len() as u64;
        for (_, item, agg) in &b.aggregates {
            if item.is_none() {
                self.row_events += agg.event_count;
                self.row_value += agg.value;
            }
        }
        self.quarantined += (b.quarantined_rows.len() + b.quarantined_periods.len()) as u64;
        self.charges += b.charges.len() as u64;
        self.lines += b.lines.len() as u64;
        self.late += b.late_events.len() as u64;
        self.offsets += b.offsets.len() as u64;
        self.other += (b.dead_letters.len() + b.duplicates.len()) as u64;
    }

    fn merge(&mut self, o: &Counts) {
        self.rows += o.rows;
        self.quarantined += o.quarantined;
        self.charges += o.charges;
        self.lines += o.lines;
        self.late += o.late;
        self.offsets += o.offsets;
        self.other += o.other;
        self.row_events += o.row_events;
        self.row_value += o.row_value;
    }

    fn total(&self) -> u64 {
        self.rows
            + self.quarantined
            + self.charges
            + self.lines
            + self.late
            + self.offsets
            + self.other
    }
}

/// The threads that made each worker's share, alive until the run ends.
struct Readers {
    stop: Vec<crossbeam_channel::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Readers {
    /// Lets the threads end, and waits for them.
    fn stop(self) -> anyhow::Result<()> {
        drop(self.stop);
        for thread in self.threads {
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("a reader thread panicked"))?;
        }
        Ok(())
    }
}

/// Each worker's share made on a thread of its own, which stays alive through the run: in the
/// pipeline each worker's Kafka reader decodes its events on its own thread (`source.rs`), so a
/// worker frees what its reader allocated, and two workers never free into one thread's memory.
/// Made on one thread, the two workers' frees of its strings contend in mimalloc: metering took
/// twice its one-worker time there, the most of what two workers lost against one. Every thread
/// draws the whole stream (the same seed) and keeps its own share. Gives the shares and the
/// stream's watermark times and total.
fn on_reader_threads(
    args: &Args,
    workers: usize,
) -> anyhow::Result<(Vec<Share>, Vec<i64>, Decimal, Readers)> {
    let mut readers = Readers {
        stop: Vec::new(),
        threads: Vec::new(),
    };
    let mut made = Vec::new();
    for index in 0..workers {
        let (data_tx, data_rx) = crossbeam_channel::bounded(1);
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let args = args.clone();
        let thread = std::thread::Builder::new()
            .name(format!("reader-{index}"))
            .spawn(move || {
                let _ = data_tx.send(generate(&args, workers, index));
                let _ = stop_rx.recv();
            })?;
        made.push(data_rx);
        readers.stop.push(stop_tx);
        readers.threads.push(thread);
    }
    let mut shares = Vec::new();
    let (mut max_time, mut total) = (Vec::new(), Decimal::ZERO);
    for (index, data) in made.into_iter().enumerate() {
        let mut data = data.recv().context("a reader thread ended early")?;
        shares.push(Share {
            epochs: std::mem::take(&mut data.shares[index].epochs),
        });
        (max_time, total) = (data.max_time, data.total);
    }
    Ok((shares, max_time, total, readers))
}

/// One measurement with `workers` workers in this process: the JSON line.
fn run(args: &Args, workers: usize) -> anyhow::Result<serde_json::Value> {
    let generated = Instant::now();
    let (shares, max_time, total, readers) = on_reader_threads(args, workers)?;
    let generate_s = generated.elapsed().as_secs_f64();
    let rss_before = rss_mb("VmRSS");
    let epochs = max_time.len();
    let max_time = Arc::new(max_time);
    let shares = Arc::new(Mutex::new(shares.into_iter().map(Some).collect::<Vec<_>>()));
    let context = GraphContext {
        allowed_lateness_micros: 3_600_000_000,
    };
    let barrier = Arc::new(Barrier::new(workers));
    let with_books = !args.no_books;
    let meters = meters(args);
    let inflight = args.inflight;
    let commit = args.commit;

    // With --commit: worker 0 hands each completed epoch to this thread, which counts and acknowledges.
    let (sink, collector) = if args.commit {
        let (batch_tx, batch_rx) = crossbeam_channel::bounded::<EpochBatch>(8);
        let (ack_tx, ack_rx) = unbounded();
        let collector = std::thread::spawn(move || {
            let mut counts = Counts::default();
            for batch in batch_rx {
                counts.add_batch(&batch);
                let _ = ack_tx.send(batch.epoch);
            }
            counts
        });
        let sink = SinkChannels {
            batches: batch_tx,
            acks: ack_rx,
        };
        (Arc::new(Mutex::new(Some(sink))), Some(collector))
    } else {
        (Arc::new(Mutex::new(None)), None)
    };

    let guards = timely::execute(timely::Config::process(workers), move |worker| {
        let index = worker.index();
        let share = shares.lock().ok().and_then(|mut s| s[index].take());
        let Some(mut share) = share else {
            return (Instant::now(), Instant::now(), 0.0, Counts::default());
        };
        let sink = if index == 0 {
            sink.lock().ok().and_then(|mut s| s.take())
        } else {
            None
        };
        let counts = Arc::new(Mutex::new(Counts::default()));
        let seen = counts.clone();
        let context = context.clone();
        let (mut inputs, probe) = worker.dataflow::<Epoch, _, _>(|scope| {
            let mut inputs = GraphInputs::default();
            let probe = ProbeHandle::new();
            let updates = build(inputs.streams(scope), context);
            if commit {
                commit_epochs(updates, sink, Default::default()).probe_with(&probe);
            } else {
                updates
                    .unary::<CapacityContainerBuilder<Vec<()>>, _, _, _>(
                        Pipeline,
                        "Count",
                        move |_, _| {
                            move |input, _output| {
                                let mut c = Counts::default();
                                // Counted where they lie and dropped in place: a `drain` would
                                // move every update out first (5.5 % of a run's time in `memcpy`).
                                input.for_each(|_, data| {
                                    for (_, u) in data.iter() {
                                        c.add(u);
                                    }
                                    data.clear();
                                });
                                if let Ok(mut counts) = seen.lock() {
                                    counts.merge(&c);
                                }
                            }
                        },
                    )
                    .probe_with(&probe);
            }
            (inputs, probe)
        });
        if index == 0 && with_books {
            for book in books() {
                inputs.books.send((book, 0, 1));
            }
        }
        // The control input runs an epoch ahead, as in `worker.rs` (no meters unless --dimensions:
        // every event type has its default meter).
        if index == 0 && !meters.is_empty() {
            inputs.control.send(Control::Meters {
                version: 0,
                meters: meters.clone(),
            });
        }
        inputs.control.advance_to(1);
        let mut next_offsets: BTreeMap<i32, PartitionProgress> = BTreeMap::new();
        barrier.wait();
        let started = Instant::now();
        let cpu_started = thread_cpu_s();
        for e in 0..epochs {
            let epoch = e as Epoch;
            for item in share.epochs[e].drain(..) {
                let progress = next_offsets
                    .entry(item.partition)
                    .or_insert(PartitionProgress {
                        partition: item.partition,
                        next_offset: 0,
                        max_event_time_micros: None,
                    });
                progress.next_offset = item.offset + 1;
                if let Classified::Count(ev) = &item.what {
                    progress.max_event_time_micros = progress
                        .max_event_time_micros
                        .max(Some(ev.event_time_micros));
                }
                inputs.items.send(item);
            }
            for progress in next_offsets.values() {
                inputs.markers.send((epoch, *progress));
            }
            inputs.advance_to(epoch + 1);
            inputs.control.advance_to(epoch + 2);
            // Wait until the output frontier passes epoch + 1 − inflight.
            let until = (epoch + 2).saturating_sub(inflight);
            // Park while there is nothing to do (as `worker.rs` does): a worker that spins while
            // it waits for another takes a core from it and bills the spin as work.
            while probe.less_than(&until) {
                worker.step_or_park(Some(Duration::from_millis(1)));
            }
            if index == 0 && until > 0 {
                // The sink would publish the committed watermark once the epoch is stored, and
                // worker 0 feed it to every worker.
                let done = (until - 1) as usize;
                let watermark = max_time[done].saturating_sub(5_000_000);
                inputs.control.send(Control::Watermark(watermark));
            }
        }
        drop(inputs);
        while !probe.done() {
            worker.step_or_park(Some(Duration::from_millis(1)));
        }
        let finished = Instant::now();
        let cpu = thread_cpu_s() - cpu_started;
        let counts = counts.lock().map(|c| c.clone()).unwrap_or_default();
        (started, finished, cpu, counts)
    })
    .map_err(anyhow::Error::msg)?;
    let results: Vec<_> = guards
        .join()
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    readers.stop()?;
    let mut counts = Counts::default();
    for (_, _, _, c) in &results {
        counts.merge(c);
    }
    if let Some(collector) = collector {
        let c = collector
            .join()
            .map_err(|_| anyhow::anyhow!("collector panicked"))?;
        counts.merge(&c);
    }
    let started = results.iter().map(|r| r.0).min().context("no worker")?;
    let finished = results.iter().map(|r| r.1).max().context("no worker")?;
    let seconds = finished.duration_since(started).as_secs_f64();
    let rate = args.events as f64 / seconds;
    let cpu: f64 = results.iter().map(|r| r.2).sum();
    let exact = counts.row_events == args.events as i64 && counts.row_value == total;
    if !exact {
        bail!(
            "the row changes do not add up to the input: {} events, sum {} (expected {}, {})",
            counts.row_events,
            counts.row_value,
            args.events,
            total
        );
    }
    Ok(serde_json::json!({
        "bench": "core",
        "workers": workers,
        "events": args.events,
        "epochs": epochs,
        "hours": hours(args),
        "epoch_events": args.epoch_events,
        "inflight": args.inflight,
        "books": with_books,
        "commit": args.commit,
        "seconds": (seconds * 1000.0).round() / 1000.0,
        "events_per_s": rate.round(),
        "events_per_s_per_worker": (rate / workers as f64).round(),
        "worker_cpu_s": (cpu * 1000.0).round() / 1000.0,
        "events_per_worker_cpu_s": (args.events as f64 / cpu).round(),
        "output_updates": counts.total(),
        "rows": counts.rows,
        "charges": counts.charges,
        "lines": counts.lines,
        "late": counts.late,
        "offsets": counts.offsets,
        "quarantined": counts.quarantined,
        "exact": exact,
        "generate_s": (generate_s * 100.0).round() / 100.0,
        "rss_before_mb": rss_before.round(),
        "peak_rss_mb": rss_mb("VmHWM").round(),
        "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split(' ').next().unwrap_or("").to_owned(),
    }))
}

/// CPU time of the calling thread so far (`/proc/thread-self/schedstat`, nanoseconds on a CPU): unlike
/// wall time, it does not count the time other processes of a busy machine took.
fn thread_cpu_s() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |ns| ns / 1e9)
}

/// A line of `/proc/self/status` in MB (`VmRSS` now, `VmHWM` the peak).
fn rss_mb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}
