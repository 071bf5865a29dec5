//! Kafka reader threads. Each timely worker owns a fixed set of partitions (partition `p` belongs to worker
//! `p mod peers`: deterministic, no consumer-group rebalancing) and one reader thread that polls them with
//! an assigned (not subscribed) consumer, starting from the offsets the sink last committed. The reader
//! hands batches of records to its worker over a bounded channel; when the channel is full the *reader*
//! waits, never the worker.

use std::collections::HashMap;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

/// One Kafka record as read, before decoding.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RawRecord {
    pub partition: i32,
    pub offset: i64,
    /// The record's timestamp (ms since the epoch): the reference for "in the future" (SPEC §2).
    pub timestamp_ms: i64,
    pub payload: Vec<u8>,
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
}

/// What a reader thread says to its worker.
#[derive(Debug)]
pub enum SourceMessage {
    Records(Vec<RawRecord>),
    /// Every owned partition has reached the end it had at start-up (only with `until_caught_up`).
    CaughtUp,
    /// The reader cannot go on; the worker stops the pipeline with this message.
    Failed(String),
}

/// The partitions worker `index` of `peers` owns.
pub fn owned_partitions(partitions: i32, index: usize, peers: usize) -> Vec<i32> {
    (0..partitions)
        .filter(|p| *p as usize % peers == index)
        .collect()
}

/// Starts the reader thread for one worker.
pub fn spawn_reader(
    config: SourceConfig,
    owned: Vec<i32>,
    capacity: usize,
) -> std::io::Result<(Receiver<SourceMessage>, JoinHandle<()>)> {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let handle = std::thread::Builder::new()
        .name(format!(
            "kafka-reader-{}",
            owned.first().copied().unwrap_or(-1)
        ))
        .spawn(move || {
            if let Err(e) = read(&config, &owned, &tx) {
                let _ = tx.send(SourceMessage::Failed(format!(
                    "reading {}: {e}",
                    config.topic
                )));
            }
        })?;
    Ok((rx, handle))
}

fn read(
    config: &SourceConfig,
    owned: &[i32],
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
        .create()?;

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
    loop {
        let timeout = if batch.is_empty() {
            Duration::from_millis(100)
        } else {
            Duration::ZERO
        };
        match consumer.poll(timeout) {
            Some(Ok(msg)) => {
                let partition = msg.partition();
                next.insert(partition, msg.offset() + 1);
                batch.push(RawRecord {
                    partition,
                    offset: msg.offset(),
                    timestamp_ms: msg.timestamp().to_millis().unwrap_or(0),
                    payload: msg.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                });
                if batch.len() < config.batch_size {
                    continue;
                }
            }
            Some(Err(e)) => {
                tracing::warn!(topic = %config.topic, error = %e, "kafka consumer error; retrying");
            }
            None => {}
        }
        if !batch.is_empty() {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(config.batch_size));
            if tx.send(SourceMessage::Records(full)).is_err() {
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
