//! Small Kafka chores shared by the subcommands: client settings, creating the events topic, counting its
//! partitions.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::ToBytes;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;

/// Partitions of a topic meterflow creates (SPEC §11).
pub const DEFAULT_PARTITIONS: i32 = 8;

pub fn client_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    config
}

/// A producer that never loses or duplicates on its own retries: idempotent, acks from all replicas, and
/// a bounded wait (the API answers 503 rather than hang while the broker is down).
pub fn producer_config(brokers: &str) -> ClientConfig {
    meterflow_api::producer_config(brokers)
}

/// A producer for bulk writes (`loadgen`, `import`): [`producer_config`], plus large lz4 batches and a
/// queue of a million records.
pub fn bulk_producer(brokers: &str) -> Result<ThreadedProducer<DefaultProducerContext>> {
    producer_config(brokers)
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .context("creating the Kafka producer")
}

/// Queues `record`, waiting while the producer's queue is full; any other refusal is an error.
pub fn send_waiting<K, P>(
    producer: &ThreadedProducer<DefaultProducerContext>,
    mut record: BaseRecord<'_, K, P>,
) -> Result<()>
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e).context("producing to Kafka"),
        }
    }
}

/// Creates `topic` with `partitions` partitions unless it exists, replicated as [`replication_for`]
/// says for the cluster's size; returns how many partitions the topic has. A topic that exists costs
/// one metadata request, no admin client (every pipeline start comes through here).
pub async fn ensure_topic(brokers: &str, topic: &str, partitions: i32) -> Result<i32> {
    let (existing, cluster) = {
        let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
        tokio::task::spawn_blocking(move || look_up(&brokers, &topic)).await??
    };
    if let Some(existing) = existing {
        return Ok(existing);
    }
    let admin: AdminClient<DefaultClientContext> = client_config(brokers)
        .create()
        .context("creating the Kafka admin client")?;
    let (replicas, min_insync) = replication_for(cluster);
    let min_insync = min_insync.to_string();
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(replicas))
        .set("min.insync.replicas", &min_insync);
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics([&new], &options)
        .await
        .with_context(|| {
            format!("cannot reach Kafka at {brokers}; is it running? (deploy/local/up starts it)")
        })?;
    for result in results {
        match result {
            // Another process created it meanwhile.
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => bail!("creating topic {name}: {code}"),
        }
    }
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || partition_count(&brokers, &topic)).await?
}

/// One metadata request: how many partitions `topic` has (`None` if it does not exist yet), and how
/// many brokers the cluster has.
fn look_up(brokers: &str, topic: &str) -> Result<(Option<i32>, usize)> {
    let consumer: BaseConsumer = client_config(brokers).create()?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| {
            format!("cannot reach Kafka at {brokers}; is it running? (deploy/local/up starts it)")
        })?;
    let partitions = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .and_then(|t| i32::try_from(t.partitions().len()).ok())
        .filter(|n| *n > 0);
    Ok((partitions, metadata.brokers().len()))
}

/// How a topic meterflow creates is replicated on a cluster of `brokers`: three copies where there are
/// three brokers, with two in sync for a write (`acks=all`) to count, so an acknowledged event survives
/// the loss of one broker's disk (review finding 18); one copy on a single broker (a laptop, the tests).
pub fn replication_for(brokers: usize) -> (i32, i32) {
    match brokers {
        0 | 1 => (1, 1),
        2 => (2, 1),
        _ => (3, 2),
    }
}

/// How many partitions `topic` has (blocking; call before starting workers).
pub fn partition_count(brokers: &str, topic: &str) -> Result<i32> {
    let consumer: BaseConsumer = client_config(brokers).create()?;
    for _ in 0..50 {
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .with_context(|| {
                format!("cannot read metadata of {topic} from {brokers}; is Kafka running?")
            })?;
        if let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) {
            if !t.partitions().is_empty() {
                return Ok(t.partitions().len() as i32);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("topic {topic} has no partitions")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finding_18_topics_are_replicated_where_the_cluster_allows() {
        assert_eq!(replication_for(1), (1, 1));
        assert_eq!(replication_for(2), (2, 1));
        assert_eq!(replication_for(3), (3, 2));
        assert_eq!(replication_for(9), (3, 2));
    }
}
