//! Driving one timely worker: feed records and offset markers from the worker's reader, advance the epoch
//! on every tick (also on workers that own no partition, so the global frontier always moves), stay at most
//! `max_inflight_epochs` ahead of the sink, and stop cleanly. Building the graph is `operators::build`.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};
use meterflow_model::{Meter, PartitionProgress, PriceBook, RatingCorrection, RatingState};
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::{Inspect, Probe};
use timely::dataflow::{InputHandleVec, ProbeHandle};
use timely::worker::Worker;

use crate::catch_up::{epoch_length, holds_the_watermark, ReadPartition, Told};
use crate::classify::{read_watermark, Classified, SharedWatermark};
use crate::commit::{commit_epochs, SinkChannels};
use crate::control::Control;
use crate::error::WorkerError;
use crate::inputs::GraphInputs;
use crate::operators::{build, Epoch, GraphContext};
use crate::source::SourceMessage;
use meterflow_model::watermark::WatermarkPolicy;

/// How a worker paces itself.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// How often the epoch advances (and so how often the sink commits).
    pub epoch_interval: Duration,
    /// How many epochs the inputs may run ahead of the sink's last commit.
    pub max_inflight_epochs: u64,
    /// While the reader is behind (its last batch was full: more records were waiting in Kafka), every
    /// epoch but the first lasts at least this long.
    pub catch_up_interval: Option<Duration>,
    /// While the reader is behind and this worker holds the event-time watermark below the next
    /// window close (`catch_up.rs`), an epoch lasts up to this long, past `catch_up_interval`. Kept
    /// under the idle timeout: the commit sees a partition only at the end of an epoch it was read in.
    pub catch_up_hold: Option<Duration>,
    /// A batch at least this large says records were waiting (the reader is behind).
    pub full_batch: usize,
    /// How worker 0 derives the event-time watermark.
    pub watermarks: WatermarkPolicy,
    /// Where worker 0 publishes how many epochs its inputs are ahead of the sink's last commit (the
    /// binary exports it as `epoch_frontier_lag`).
    pub epochs_behind: Arc<AtomicU64>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            epoch_interval: Duration::from_millis(250),
            max_inflight_epochs: 8,
            catch_up_interval: None,
            catch_up_hold: None,
            full_batch: usize::MAX,
            watermarks: WatermarkPolicy::default(),
            epochs_behind: Arc::new(AtomicU64::new(0)),
        }
    }
}

/// What rating starts from, and how price books and re-rating jobs' corrections reach it; given to
/// worker 0 of process 0 only.
pub struct RatingFeed {
    /// What the pipeline committed before this run.
    pub state: RatingState,
    /// The price books when the pipeline started.
    pub books: Vec<PriceBook>,
    /// Later snapshots of all price books (the config watcher sends one whenever they change).
    pub updates: Receiver<Vec<PriceBook>>,
    /// What re-rating jobs changed in the stored state (the job runner sends each once it committed).
    pub corrections: Receiver<Correction>,
}

/// What metering reads, given to worker 0 of process 0 only, which feeds it to every worker through the
/// control input (`control.rs`).
pub struct ControlFeed {
    /// The meters when the pipeline started.
    pub meters: Vec<Meter>,
    /// Later snapshots of all meters (the config watcher sends one whenever they change).
    pub updates: Receiver<Vec<Meter>>,
    /// The committed watermark, as the writer publishes it.
    pub watermark: SharedWatermark,
    /// Admins' floors under the watermark as they are set (`POST /api/v1/watermark`), before the
    /// commit that lifts the watermark to them: a held catch-up epoch ends for one.
    pub floors: Receiver<i64>,
}

impl ControlFeed {
    /// Meters that never change and a watermark that moves only if someone stores into it.
    pub fn fixed(meters: Vec<Meter>, watermark: SharedWatermark) -> Self {
        ControlFeed {
            meters,
            updates: crossbeam_channel::never(),
            watermark,
            floors: crossbeam_channel::never(),
        }
    }
}

/// What worker 0 of process 0 has and the other workers do not: the sink, and what rating and
/// metering are fed. A test may give it any of them.
#[derive(Default)]
pub struct Feeds {
    pub sink: Option<SinkChannels>,
    pub rating: Option<RatingFeed>,
    pub control: Option<ControlFeed>,
}

/// A re-rating job's change of the stored rating state, and whom to tell once the epoch that feeds it
/// to rating is committed (what rating derived from it is then stored too).
pub struct Correction {
    pub change: RatingCorrection,
    pub committed: Box<dyn FnOnce() + Send>,
}

/// What a worker did.
#[derive(Clone, Copy, Debug, Default)]
pub struct WorkerSummary {
    pub records: u64,
    pub epochs: u64,
}

/// Runs one worker until its reader is caught up (and the sink has committed everything), `stop` is set,
/// or the reader fails; a failed reader sets `stop` (shared by the process's workers), so every worker
/// commits what it has and stops, and this one returns the failure.
pub fn run_worker(
    worker: &mut Worker,
    config: &WorkerConfig,
    context: GraphContext,
    reader: Receiver<SourceMessage>,
    feeds: Feeds,
    stop: &AtomicBool,
) -> Result<WorkerSummary, WorkerError> {
    let watermarks = config.watermarks.clone();
    let allowed_lateness_micros = context.allowed_lateness_micros;
    // What the control input told this worker, for holding catch-up epochs (`catch_up.rs`).
    let told = Rc::new(Cell::new(Told::default()));
    let Feeds {
        sink,
        rating,
        control,
    } = feeds;
    // `items_open`: the oldest epoch any worker may still feed items at (worker 0 keeps the control
    // input one ahead of it).
    let items_open = ProbeHandle::new();
    let (mut inputs, probe) = worker.dataflow::<Epoch, _, _>(|scope| {
        let mut inputs = GraphInputs::default();
        let probe = ProbeHandle::new();
        let mut streams = inputs.streams(scope);
        streams.items = streams.items.probe_with(&items_open);
        let hearing = Rc::clone(&told);
        streams.control.clone().broadcast().inspect(move |change| {
            let mut now = hearing.get();
            match change {
                Control::Watermark(w) => now.watermark = now.watermark.max(Some(*w)),
                Control::Floor(f) => now.floor = now.floor.max(Some(*f)),
                Control::Meters { .. } => {}
            }
            hearing.set(now);
        });
        let updates = build(streams, context);
        commit_epochs(updates, sink, watermarks).probe_with(&probe);
        (inputs, probe)
    });
    let mut corrections = None;
    let mut books = rating.map(|feed| {
        corrections = Some(feed.corrections.clone());
        start_rating(&mut inputs, feed)
    });
    let mut control = control.map(|feed| Controller::start(&mut inputs, feed));
    if control.is_none() {
        // Only the feeding worker holds the control input back; the others' handles keep ahead.
        inputs.control.advance_to(1);
    }
    // Corrections fed, with the epoch they were fed at, until that epoch is committed.
    let mut uncommitted: Vec<Uncommitted> = Vec::new();

    let mut summary = WorkerSummary::default();
    let mut next_offsets: BTreeMap<i32, PartitionProgress> = BTreeMap::new();
    let mut last_read: BTreeMap<i32, Instant> = BTreeMap::new();
    let mut moved: BTreeSet<i32> = BTreeSet::new();
    let mut last_tick = Instant::now();
    let mut caught_up = false;
    let mut reader_open = true;
    // The reader's last batch was full: it is behind the topic's end (catch_up_interval).
    let mut backlogged = false;
    // A failed reader stops every worker of the process (finding 33b): the others would otherwise go
    // on committing, and move the watermark, while this worker's partitions are never read again.
    let mut failed: Option<WorkerError> = None;

    while !stop.load(Ordering::Relaxed) && !caught_up {
        let epoch = inputs.epoch();
        // A run's first epoch closes with its first batch (`batches_per_turn`) and is never stretched.
        let first_epoch = summary.epochs == 0;
        let mut fed = false;
        if let Some(control) = &mut control {
            // One epoch ahead of the oldest items still fed: what is fed next applies from the epoch
            // after the slowest worker's current one, and no worker's metering waits for it.
            if let Some(open) = items_open.with_frontier(|f| f.first().copied()) {
                let ahead = open.saturating_add(1);
                if ahead > *inputs.control.time() {
                    inputs.control.advance_to(ahead);
                }
            }
            fed |= control.feed(&mut inputs.control);
        }
        if let Some((current, updates)) = &mut books {
            while let Ok(snapshot) = updates.try_recv() {
                fed |= inputs.replace_books(current, snapshot, epoch);
            }
        }
        if let Some(corrections) = &corrections {
            while let Ok(correction) = corrections.try_recv() {
                inputs.correct(correction.change, epoch);
                uncommitted.push((epoch, correction.committed));
                fed = true;
            }
        }
        // How many epochs the sink (every worker's, via the probe) has yet to commit.
        let committed = probe.with_frontier(|f| f.first().copied()).unwrap_or(epoch);
        tell_committed(&mut uncommitted, committed);
        let behind = epoch.saturating_sub(committed);
        if worker.index() == 0 {
            config.epochs_behind.store(behind, Ordering::Relaxed);
        }
        if reader_open && behind < config.max_inflight_epochs {
            for _ in 0..batches_per_turn(first_epoch) {
                match reader.try_recv() {
                    Ok(SourceMessage::Items(batch)) => {
                        fed = true;
                        backlogged = batch.len() >= config.full_batch;
                        let trusted = trusted_event_time();
                        let now = Instant::now();
                        summary.records = summary.records.saturating_add(batch.len() as u64);
                        for item in batch {
                            let progress =
                                next_offsets
                                    .entry(item.partition)
                                    .or_insert(PartitionProgress {
                                        partition: item.partition,
                                        next_offset: 0,
                                        max_event_time_micros: None,
                                    });
                            progress.next_offset = item.offset.saturating_add(1);
                            if let Classified::Count(e) = &item.what {
                                progress.max_event_time_micros = progress
                                    .max_event_time_micros
                                    .max(Some(e.event_time_micros.min(trusted)));
                            }
                            moved.insert(item.partition);
                            last_read.insert(item.partition, now);
                            inputs.items.send(item);
                        }
                    }
                    Ok(SourceMessage::CaughtUp) => caught_up = true,
                    Ok(SourceMessage::Failed(why)) => {
                        tracing::error!(error = %why, "a Kafka reader failed; stopping every worker");
                        stop.store(true, Ordering::Relaxed);
                        failed = Some(WorkerError::Source(why));
                        break;
                    }
                    Err(TryRecvError::Empty) => break,
                    // A worker without partitions has no reader: it only keeps time.
                    Err(TryRecvError::Disconnected) => {
                        reader_open = false;
                        break;
                    }
                }
            }
        }
        // Epochs stretch while the sink lags: a longer epoch folds more events into each aggregate
        // change, so a slow database receives fewer, larger commits instead of a growing queue.
        let stretch = 1u32.saturating_add(behind.min(config.max_inflight_epochs) as u32);
        let mut interval = config.epoch_interval.saturating_mul(stretch);
        // While the reader is behind the topic's end (a backfill, a restart, a burst), an epoch lasts
        // at least `catch_up_interval`: fewer, larger commits, and each window revised fewer times
        // (issue 15: 1M backfill events made 677k row changes in 35 commits at 250 ms, 494k in 7).
        // Not the first epoch: a restart's first commit shows it is working again, and comes as soon
        // as the state it starts from allows (1.5 s sooner at a restart with little state).
        if let Some(catch_up) = config.catch_up_interval {
            if reader_open && backlogged && !first_epoch {
                interval = interval.max(catch_up);
                // And longer while no window can close before it ends (`catch_up.rs`).
                interval =
                    epoch_length(interval, config.catch_up_hold, last_tick.elapsed(), || {
                        let read = next_offsets.values().filter_map(|p| {
                            last_read.get(&p.partition).map(|at| ReadPartition {
                                partition: p.partition,
                                max_event_time_micros: p.max_event_time_micros,
                                last_read: *at,
                                read_this_epoch: moved.contains(&p.partition),
                            })
                        });
                        holds_the_watermark(
                            told.get(),
                            read,
                            &config.watermarks,
                            allowed_lateness_micros,
                            catch_up,
                            Instant::now(),
                        )
                    });
            }
        }
        // The first epoch closes once it holds a batch: after a restart it also holds rating's
        // restored state, and what rides with it is committed only once that state is in.
        let first_fed = first_epoch && summary.records > 0;
        if caught_up || first_fed || last_tick.elapsed() >= interval {
            send_markers(&mut inputs.markers, epoch, &mut moved, &next_offsets);
            let next = epoch.saturating_add(1);
            inputs.advance_to(next);
            if control.is_none() {
                inputs.control.advance_to(next.saturating_add(1));
            }
            summary.epochs = summary.epochs.saturating_add(1);
            last_tick = Instant::now();
        }
        if fed {
            worker.step();
        } else {
            worker.step_or_park(Some(Duration::from_millis(5)));
        }
    }

    // Book changes that came before the reader's "caught up" still apply: the loop polls them first,
    // so one that arrived during the loop's last turn would otherwise be dropped.
    if let Some((current, updates)) = &mut books {
        let epoch = inputs.epoch();
        while let Ok(snapshot) = updates.try_recv() {
            inputs.replace_books(current, snapshot, epoch);
        }
    }
    // Close the inputs; the dataflow drains and the sink commits what is left.
    let epoch = inputs.epoch();
    send_markers(&mut inputs.markers, epoch, &mut moved, &next_offsets);
    drop(inputs);
    while !probe.done() {
        worker.step_or_park(Some(Duration::from_millis(5)));
    }
    tell_committed(&mut uncommitted, Epoch::MAX);
    match failed {
        Some(why) => Err(why),
        None => Ok(summary),
    }
}

/// How many of the reader's batches a worker takes in one turn of its loop: one in a run's first epoch
/// (which closes with it), 16 after. At a restart with 1M live windows the first epoch held the 65–130k
/// records read while worker 0 fed the state, and committing them delayed the run's first commit (the
/// sign it is working again) by 0.4–0.75 s (perf/RESULTS.md, "recovery").
fn batches_per_turn(first_epoch: bool) -> usize {
    if first_epoch {
        1
    } else {
        16
    }
}

/// The latest event time the watermark may follow: this worker's clock plus the tolerance for the
/// future (SPEC §2). "In the future" is judged against the record's timestamp, which the producer sets;
/// without this bound one record with a forged timestamp would move the (monotone) watermark past the
/// clock for good (finding 19).
fn trusted_event_time() -> i64 {
    chrono::Utc::now()
        .timestamp_micros()
        .saturating_add(meterflow_model::Limits::default().max_future_micros)
}

/// A correction fed at an epoch, and whom to tell once that epoch is committed.
type Uncommitted = (Epoch, Box<dyn FnOnce() + Send>);

/// Tells the corrections fed before `committed` (the sink's frontier) that they are stored.
fn tell_committed(uncommitted: &mut Vec<Uncommitted>, committed: Epoch) {
    let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(uncommitted)
        .into_iter()
        .partition(|(epoch, _)| *epoch < committed);
    *uncommitted = waiting;
    for (_, tell) in done {
        tell();
    }
}

/// Marks, at `epoch`, how far each partition that moved during the epoch has been read.
fn send_markers(
    markers: &mut InputHandleVec<Epoch, (Epoch, PartitionProgress)>,
    epoch: Epoch,
    moved: &mut BTreeSet<i32>,
    next_offsets: &BTreeMap<i32, PartitionProgress>,
) {
    for partition in std::mem::take(moved) {
        markers.send((epoch, next_offsets[&partition]));
    }
}

/// Feeds what was committed before, and the price books, at epoch 0; returns the books in force and
/// where later snapshots come from.
fn start_rating(
    inputs: &mut GraphInputs,
    feed: RatingFeed,
) -> (BTreeSet<PriceBook>, Receiver<Vec<PriceBook>>) {
    inputs.send_state(feed.state, 0, 1);
    let mut current = BTreeSet::new();
    inputs.replace_books(&mut current, feed.books, 0);
    (current, feed.updates)
}

/// Worker 0's side of the control input: feeds the meters and the committed watermark as they change,
/// at the control input's epoch, which the worker loop holds one ahead of the items' frontier.
struct Controller {
    feed: ControlFeed,
    /// The version of the last meters fed.
    version: u64,
    /// The last watermark fed.
    watermark: Option<i64>,
    /// The last floor fed.
    floor: Option<i64>,
}

impl Controller {
    /// Feeds the meters and the watermark at start, at epoch 0.
    fn start(inputs: &mut GraphInputs, feed: ControlFeed) -> Self {
        let meters = feed.meters.clone();
        inputs.control.send(Control::Meters { version: 0, meters });
        let mut controller = Controller {
            feed,
            version: 0,
            watermark: None,
            floor: None,
        };
        controller.feed(&mut inputs.control);
        controller
    }

    /// Feeds, at the control input's epoch, the latest meters if they changed, the committed
    /// watermark if it moved, and an admin's floor if one rose; true if it fed anything.
    fn feed(&mut self, control: &mut InputHandleVec<Epoch, Control>) -> bool {
        let mut fed = false;
        if let Some(meters) = self.feed.updates.try_iter().last() {
            self.version = self.version.saturating_add(1);
            control.send(Control::Meters {
                version: self.version,
                meters,
            });
            fed = true;
        }
        let watermark = read_watermark(&self.feed.watermark);
        if watermark > self.watermark {
            if let Some(w) = watermark {
                control.send(Control::Watermark(w));
                fed = true;
            }
            self.watermark = watermark;
        }
        let floor = self.feed.floors.try_iter().max();
        if floor > self.floor {
            if let Some(f) = floor {
                control.send(Control::Floor(f));
                fed = true;
            }
            self.floor = floor;
        }
        if fed {
            // An input hands on what it was sent when it advances or is flushed: now, so every worker
            // has the change before the items read after it (the oldest epoch is metered as read).
            control.flush();
        }
        fed
    }
}
