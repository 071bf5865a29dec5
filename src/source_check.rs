//! Is the events topic the one this database has read? Checked by the pipeline leader before it takes
//! the lease (review findings 8, 9 and 18).
//!
//! ```text
//!  other topic in this database? ─── yes ─► refuse: one database serves one events topic
//!  --reset-source ─► forget the old topic's positions (sinks::source::reset_source)
//!  per partition:  stored next offset beyond the end?            ─► refuse (recreated or truncated)
//!                  anchored record still there but different?    ─► refuse (recreated)
//!                  next offset below the first record retained?  ─► a dead letter names the gap
//!  new anchors: the record before each stored next offset
//! ```
//! Kafka topic IDs would say the same more directly, but rdkafka has no safe API for them; a record
//! re-read at a known offset tells the topics apart as well (a recreated topic that holds byte-identical
//! records at the same offsets is, for billing, the same topic).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use meterflow_model::fnv1a;
use meterflow_sinks::source;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use sqlx::PgConnection;

use crate::kafka::client_config;

/// What Kafka holds of one partition.
struct PartitionView {
    low: i64,
    high: i64,
    /// The hash of the record at the stored anchor's offset, if there is one there.
    anchor: Option<i64>,
    /// The record before the stored next offset: `(offset, hash)`.
    last_read: Option<(i64, i64)>,
}

/// Refuses to start on another topic than the database's, or on a recreated topic; records retention
/// gaps; moves the anchors to the current positions. With `reset`, first forgets the old topic.
pub async fn check_source(
    conn: &mut PgConnection,
    brokers: &str,
    topic: &str,
    partitions: i32,
    reset: bool,
) -> Result<()> {
    if let Some(other) = source::other_topic(conn, topic).await? {
        bail!(
            "this database holds the results of topic {other}, not {topic}: one database serves one \
             events topic (claims and results are not kept per topic). Point MF_EVENTS_TOPIC at {other}, \
             or use another database for {topic}"
        );
    }
    if reset {
        source::reset_source(conn, topic).await?;
        tracing::warn!(
            topic,
            "source reset: the topic is read from its start; events counted before stay counted"
        );
    }
    let offsets = meterflow_sinks::stored_offsets(conn, topic).await?;
    let anchors = source::anchors(conn, topic).await?;
    let view = {
        let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
        let (offsets, anchors) = (offsets.clone(), anchors.clone());
        tokio::task::spawn_blocking(move || {
            read_partitions(&brokers, &topic, partitions, &offsets, &anchors)
        })
        .await??
    };
    let recreated = |partition: i32, why: String| {
        anyhow::anyhow!(
            "partition {partition} of topic {topic} is not the partition this database has read: \
             {why}. The topic was deleted and recreated, or truncated, so the stored offsets no longer \
             describe it. To read the new topic from its start (events counted before stay counted; \
             their copies count as duplicates), run the pipeline once with --reset-source"
        )
    };
    for (partition, v) in &view {
        let next = offsets.get(partition).copied().unwrap_or(0);
        if next > v.high {
            return Err(recreated(
                *partition,
                format!(
                    "meterflow read up to offset {next}, but the partition ends at {}",
                    v.high
                ),
            ));
        }
        if let Some((offset, hash)) = anchors.get(partition) {
            if *offset >= v.low && v.anchor != Some(*hash) {
                return Err(recreated(
                    *partition,
                    format!(
                        "the record at offset {offset} differs from the one meterflow read there"
                    ),
                ));
            }
        }
        if next < v.low {
            tracing::error!(
                topic,
                partition,
                from = next,
                to = v.low,
                "Kafka deleted records before meterflow read them (retention); a dead letter records the gap"
            );
            source::record_gap(conn, topic, *partition, next, v.low).await?;
        }
    }
    store_anchors(conn, topic, &view).await
}

/// Anchors each partition at the record before its stored next offset (at a clean stop).
pub async fn anchor_positions(
    conn: &mut PgConnection,
    brokers: &str,
    topic: &str,
    partitions: i32,
) -> Result<()> {
    let offsets = meterflow_sinks::stored_offsets(conn, topic).await?;
    let view = {
        let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
        tokio::task::spawn_blocking(move || {
            read_partitions(&brokers, &topic, partitions, &offsets, &HashMap::new())
        })
        .await??
    };
    store_anchors(conn, topic, &view).await
}

async fn store_anchors(
    conn: &mut PgConnection,
    topic: &str,
    view: &HashMap<i32, PartitionView>,
) -> Result<()> {
    for (partition, v) in view {
        if let Some((offset, hash)) = v.last_read {
            source::set_anchor(conn, topic, *partition, offset, hash).await?;
        }
    }
    Ok(())
}

fn read_partitions(
    brokers: &str,
    topic: &str,
    partitions: i32,
    offsets: &HashMap<i32, i64>,
    anchors: &HashMap<i32, (i64, i64)>,
) -> Result<HashMap<i32, PartitionView>> {
    let consumer: BaseConsumer = client_config(brokers)
        .set("group.id", "meterflow-source-check")
        .set("enable.auto.commit", "false")
        // One record per partition is read (records_at); by default a fetch waits up to 500 ms for
        // more data, which made a clean stop of an 8-partition topic take 7 s (issue 15, e2e), and
        // brings up to 1 MiB per partition.
        .set("fetch.wait.max.ms", "10")
        .set("max.partition.fetch.bytes", "65536")
        .create()
        .context("creating a Kafka consumer to check the source topic")?;
    let timeout = Duration::from_secs(10);
    let mut ranges = HashMap::new();
    for partition in 0..partitions {
        let range = consumer
            .fetch_watermarks(topic, partition, timeout)
            .with_context(|| {
                format!("reading the offsets of {topic}/{partition} from {brokers}")
            })?;
        ranges.insert(partition, range);
    }
    let within = |partition: i32, offset: i64| {
        ranges
            .get(&partition)
            .is_some_and(|(low, high)| offset >= *low && offset < *high)
    };
    let next = |partition: i32| offsets.get(&partition).copied().unwrap_or(0);
    // Every partition's anchored record in one read, then every partition's last record read.
    let anchored: Vec<(i32, i64)> = anchors
        .iter()
        .map(|(partition, (offset, _))| (*partition, *offset))
        .filter(|(partition, offset)| within(*partition, *offset))
        .collect();
    let at_anchors = records_at(&consumer, topic, &anchored)?;
    let befores: Vec<(i32, i64)> = (0..partitions)
        .filter_map(|p| next(p).checked_sub(1).map(|before| (p, before)))
        .filter(|(partition, before)| within(*partition, *before))
        .collect();
    let at_befores = records_at(&consumer, topic, &befores)?;
    let mut view = HashMap::new();
    for (partition, (low, high)) in ranges {
        let anchor = anchors.get(&partition).and_then(|(offset, _)| {
            at_anchors
                .get(&partition)
                .and_then(|(at, hash)| (at == offset).then_some(*hash))
        });
        let last_read = at_befores
            .get(&partition)
            .copied()
            .filter(|(at, _)| *at < next(partition));
        view.insert(
            partition,
            PartitionView {
                low,
                high,
                anchor,
                last_read,
            },
        );
    }
    Ok(view)
}

/// The first record at or after each `(partition, offset)`: its offset and the hash of its key and
/// payload, by partition. All are read at once (a partition at a time took a fetch round each, a
/// quarter of a second per start and clean stop). A partition with no record within 10 s is absent.
fn records_at(
    consumer: &BaseConsumer,
    topic: &str,
    wanted: &[(i32, i64)],
) -> Result<HashMap<i32, (i64, i64)>> {
    let mut found = HashMap::new();
    if wanted.is_empty() {
        return Ok(found);
    }
    let mut assignment = TopicPartitionList::new();
    for (partition, offset) in wanted {
        assignment.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
    }
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while found.len() < wanted.len() && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) if wanted.iter().any(|(p, _)| *p == m.partition()) => {
                found
                    .entry(m.partition())
                    .or_insert_with(|| (m.offset(), record_hash(m.key(), m.payload())));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e).context("reading a record of the source topic"),
            None => {}
        }
    }
    Ok(found)
}

/// The hash of a record's key and payload.
fn record_hash(key: Option<&[u8]>, payload: Option<&[u8]>) -> i64 {
    fnv1a(&[key.unwrap_or_default(), payload.unwrap_or_default()])
}
