//! Kafka reader threads. Each timely worker owns a fixed set of partitions (partition `p` belongs to worker
//! `p mod peers`: deterministic, no consumer-group rebalancing) and one reader thread that polls them with
//! an assigned (not subscribed) consumer, starting from the offsets the sink last committed. The reader
//! hands batches of records to its worker over a bounded channel; when the channel is full the *reader*
//! waits, never the worker.

use std::collections::HashMap;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use meterflow_model::claims::Claims;
use meterflow_model::wire::{RecordKindHeader, KIND_HEADER};
use meterflow_model::{Format, Limits};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::classify::{classify, SharedWatermark, SourceItem};
use crate::error::SourceError;

/// How long a started batch waits for more records before it is handed over unfilled (issue 15).
const BATCH_WINDOW: Duration = Duration::from_millis(10);

/// One Kafka record as read, before decoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawRecord {
    pub partition: i32,
    pub offset: i64,
    /// The record's timestamp (ms since the epoch): the reference for "in the future" (SPEC §2).
    pub timestamp_ms: i64,
    pub kind: RecordKind,
    pub payload: Vec<u8>,
}

/// What a record holds, from its headers: `content-type: application/cloudevents+json` marks a
/// CloudEvent, `meterflow-kind: void` a void written by the API, `meterflow-kind: event` an event the
/// API accepted (answered 201).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    Event(Format),
    /// An event the API accepted: it judged the event's age against the watermark it knew then, and
    /// that decision stands (finding 10), so the reader does not refuse it as too old.
    Accepted(Format),
    Void,
}

impl RecordKind {
    fn of(headers: Option<&rdkafka::message::BorrowedHeaders>) -> RecordKind {
        let (mut format, mut accepted) = (Format::Plain, false);
        if let Some(headers) = headers {
            for h in headers.iter() {
                match (h.key, h.value) {
                    (KIND_HEADER, Some(v)) => match RecordKindHeader::parse(v) {
                        Some(RecordKindHeader::Void) => return RecordKind::Void,
                        Some(RecordKindHeader::Event) => accepted = true,
                        None => {}
                    },
                    ("content-type", Some(v)) => {
                        format = Format::of_content_type(std::str::from_utf8(v).ok())
                    }
                    _ => {}
                }
            }
        }
        if accepted {
            RecordKind::Accepted(format)
        } else {
            RecordKind::Event(format)
        }
    }
}

/// Where and what a worker reads.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    pub brokers: String,
    pub topic: String,
    /// How many partitions the topic has (read once at start-up).
    pub partitions: i32,
    /// The next offset to read per partition, as committed by the sink; absent partitions start at the
    /// earliest offset (SPEC §4).
    pub start_offsets: HashMap<i32, i64>,
    /// Stop once every owned partition has been read up to its end as of start-up.
    pub until_caught_up: bool,
    /// Most records per batch handed to the worker.
    pub batch_size: usize,
    /// Most records in the first batch. A run's first epoch holds one batch (worker.rs), and its
    /// commit, the first after a restart, comes sooner when that batch is small.
    pub first_batch: usize,
    pub limits: Limits,
    /// The committed watermark, for the age limit (SPEC §2).
    pub watermark: SharedWatermark,
}

/// What a reader thread says to its worker.
#[derive(Debug)]
pub enum SourceMessage {
    /// A batch; empty when the reader has come to the topic's end since its last batch.
    Items(Vec<SourceItem>),
    /// Every owned partition has reached the end it had at start-up (only with `until_caught_up`).
    CaughtUp,
    /// The reader cannot go on; the worker stops the pipeline with this error.
    Failed(SourceError),
}

/// The partitions worker `index` of `peers` owns.
pub fn owned_partitions(partitions: i32, index: usize, peers: usize) -> Vec<i32> {
    (0..partitions)
        .filter(|p| (*p as usize).checked_rem(peers) == Some(index))
        .collect()
}

/// Starts the reader thread for one worker.
pub fn spawn_reader(
    config: SourceConfig,
    owned: Vec<i32>,
    mut claims: Box<dyn Claims>,
    capacity: usize,
) -> std::io::Result<(Receiver<SourceMessage>, JoinHandle<()>)> {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let handle = std::thread::Builder::new()
        .name(format!(
            "kafka-reader-{}",
            owned.first().copied().unwrap_or(-1)
        ))
        .spawn(move || {
            if let Err(e) = read(&config, &owned, claims.as_mut(), &tx) {
                let _ = tx.send(SourceMessage::Failed(SourceError {
                    topic: config.topic.clone(),
                    source: e,
                }));
            }
        })?;
    Ok((rx, handle))
}

fn read(
    config: &SourceConfig,
    owned: &[i32],
    claims: &mut dyn Claims,
    tx: &Sender<SourceMessage>,
) -> Result<(), KafkaError> {
    if owned.is_empty() {
        if config.until_caught_up {
            let _ = tx.send(SourceMessage::CaughtUp);
        }
        return Ok(());
    }
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", "meterflow-pipeline")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "50")
        // librdkafka prefetches up to 64 MiB per consumer by default; the dataflow's own bounded
        // channel is the buffer that matters, so keep the prefetch small (memory stays flat in a burst).
        .set("queued.max.messages.kbytes", "8192")
        .create()?;

    // The partitions' leaders, known before the assignment: a partition assigned without one waits
    // out librdkafka's 500 ms offset-query retry before its first fetch (issue 15: half a second of
    // every start). Only a head start: if it fails, librdkafka finds the leaders itself.
    if let Err(e) = consumer.fetch_metadata(Some(&config.topic), Duration::from_secs(30)) {
        tracing::warn!(topic = %config.topic, error = %e, "reading the topic's metadata before the assignment failed; reading on");
    }
    let mut assignment = TopicPartitionList::new();
    let mut next: HashMap<i32, i64> = HashMap::new();
    for &p in owned {
        let offset = match config.start_offsets.get(&p) {
            Some(&o) => Offset::Offset(o),
            None => Offset::Beginning,
        };
        assignment.add_partition_offset(&config.topic, p, offset)?;
    }
    consumer.assign(&assignment)?;

    // The ends to reach when catching up: the high watermarks as of now.
    let mut ends: HashMap<i32, i64> = HashMap::new();
    if config.until_caught_up {
        for &p in owned {
            let (low, high) =
                consumer.fetch_watermarks(&config.topic, p, Duration::from_secs(30))?;
            let start = config.start_offsets.get(&p).copied().unwrap_or(low);
            next.insert(p, start);
            if start < high {
                ends.insert(p, high);
            }
        }
        if ends.is_empty() {
            let _ = tx.send(SourceMessage::CaughtUp);
            return Ok(());
        }
    }

    let mut batch = Vec::with_capacity(config.batch_size);
    let mut cap = config.first_batch.clamp(1, config.batch_size.max(1));
    // When the batch's first record was read.
    let mut started = Instant::now();
    // A batch has gone since the worker last heard that the reader had nothing to read.
    let mut sent_since_idle = false;
    loop {
        let timeout = if batch.is_empty() {
            Duration::from_millis(100)
        } else {
            // A batch waits up to BATCH_WINDOW for more records: a momentary gap in librdkafka's
            // queue no longer cuts it short, so a reader behind the topic's end hands over full
            // batches (the worker's sign that it is catching up); a trickle still goes within it.
            started
                .checked_add(BATCH_WINDOW)
                .map_or(Duration::ZERO, |end| {
                    end.saturating_duration_since(Instant::now())
                })
        };
        match consumer.poll(timeout) {
            Some(Ok(msg)) => {
                let partition = msg.partition();
                if batch.is_empty() {
                    started = Instant::now();
                }
                next.insert(partition, msg.offset().saturating_add(1));
                batch.push(RawRecord {
                    partition,
                    offset: msg.offset(),
                    timestamp_ms: msg.timestamp().to_millis().unwrap_or(0),
                    kind: RecordKind::of(msg.headers()),
                    payload: msg.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                });
                if batch.len() < cap {
                    continue;
                }
            }
            Some(Err(e)) => {
                tracing::warn!(topic = %config.topic, error = %e, "kafka consumer error; retrying");
            }
            // Nothing for a whole poll with no batch begun: the reader is at the topic's end. An
            // empty batch tells the worker, whose last batch may have been full (its sign of a reader
            // behind, which stretches epochs to `catch_up_epoch_ms`): without it, the last epoch of
            // a burst waited out the catch-up interval (issue 15: seed_aggregation 1.0 s → 3.0 s with
            // c706ca7's larger batches).
            None if batch.is_empty() && sent_since_idle => {
                sent_since_idle = false;
                if tx.send(SourceMessage::Items(Vec::new())).is_err() {
                    return Ok(());
                }
            }
            None => {}
        }
        if !batch.is_empty() {
            let items = classify_until_decided(&batch, claims, config);
            batch.clear();
            cap = config.batch_size.max(1);
            sent_since_idle = true;
            if tx.send(SourceMessage::Items(items)).is_err() {
                return Ok(()); // the worker has gone: shutting down.
            }
        }
        if config.until_caught_up {
            ends.retain(|p, end| next.get(p).copied().unwrap_or(0) < *end);
            if ends.is_empty() {
                let _ = tx.send(SourceMessage::CaughtUp);
                return Ok(());
            }
        }
    }
}

/// Classifies a batch, retrying with capped backoff while the claim store cannot answer (Postgres
/// down): records are never skipped, the reader just stops moving. Ten lines on a plain thread, never
/// giving up: a retry crate would add a dependency to the dataflow for no behaviour it lacks.
fn classify_until_decided(
    batch: &[RawRecord],
    claims: &mut dyn Claims,
    config: &SourceConfig,
) -> Vec<SourceItem> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match classify(batch, claims, &config.limits, &config.watermark) {
            Ok(items) => return items,
            Err(e) => {
                tracing::warn!(topic = %config.topic, error = %e, ?backoff, "cannot claim events; retrying");
                std::thread::sleep(backoff);
                backoff = backoff.saturating_mul(2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_partition_has_exactly_one_owner_whatever_the_worker_count() {
        for peers in 1..=5 {
            let mut all: Vec<i32> = (0..peers)
                .flat_map(|w| owned_partitions(8, w, peers))
                .collect();
            all.sort();
            assert_eq!(all, (0..8).collect::<Vec<_>>());
        }
        assert!(
            owned_partitions(2, 3, 4).is_empty(),
            "a worker may own nothing"
        );
    }
}
