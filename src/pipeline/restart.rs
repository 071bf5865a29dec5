//! What makes a running pipeline start again in-process: partitions added to the events topic. The
//! watcher is a task on the process's one runtime: it cancels the run's token (which stops the workers
//! at the end of their epoch) after saying why in `restart`. (A re-rating job no longer restarts
//! anything: the leader's rating takes its correction in at one epoch, `meterflow_sinks::rerating`.)

use super::*;

/// How often every process looks for partitions added to the events topic.
pub(super) const PARTITION_CHECK: Duration = Duration::from_secs(5);

/// Watches the events topic's partition count: partitions added while running (`kafka-topics --alter
/// --partitions`) would otherwise be read by no one until a restart, while the API already produces to
/// them (review finding 18). Every process of a cluster watches, so they all restart together, in-process,
/// and the partitions are assigned anew.
pub(super) async fn watch_partitions(
    brokers: String,
    topic: String,
    partitions: i32,
    stop: CancellationToken,
    restart: Arc<AtomicBool>,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(PARTITION_CHECK) => {}
        }
        // rdkafka's metadata call blocks: off the runtime's threads.
        let (b, t) = (brokers.clone(), topic.clone());
        match tokio::task::spawn_blocking(move || kafka::partition_count(&b, &t)).await {
            Ok(Ok(now)) if now > partitions => {
                tracing::warn!(
                    topic,
                    before = partitions,
                    now,
                    "the events topic gained partitions; restarting in-process to read them"
                );
                restart.store(true, Ordering::Relaxed);
                stop.cancel();
                return;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot read the partition count"),
            Err(e) => tracing::debug!(error = %e, "the partition count look-up failed"),
        }
    }
}
