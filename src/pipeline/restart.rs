//! What makes a running pipeline start again in-process: partitions added to the events topic, and a
//! re-rating job's resync request.

use super::*;

/// How often every process looks for partitions added to the events topic.
pub(super) const PARTITION_CHECK: Duration = Duration::from_secs(5);

/// Watches the events topic's partition count: partitions added while running (`kafka-topics --alter
/// --partitions`) would otherwise be read by no one until a restart, while the API already produces to
/// them (review finding 18). Every process of a cluster watches, so they all restart together, in-process,
/// and the partitions are assigned anew.
pub(super) fn spawn_partition_watcher(
    brokers: &str,
    topic: &str,
    partitions: i32,
    stop: Arc<AtomicBool>,
    restart: Arc<AtomicBool>,
) {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    let spawned = std::thread::Builder::new()
        .name("partition-watch".into())
        .spawn(move || {
            let mut waited = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                waited += Duration::from_millis(100);
                if waited < PARTITION_CHECK {
                    continue;
                }
                waited = Duration::ZERO;
                match kafka::partition_count(&brokers, &topic) {
                    Ok(now) if now > partitions => {
                        tracing::warn!(
                            topic,
                            before = partitions,
                            now,
                            "the events topic gained partitions; restarting in-process to read them"
                        );
                        restart.store(true, Ordering::Relaxed);
                        stop.store(true, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "cannot read the partition count"),
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot watch the topic's partition count");
    }
}

/// Watches for a re-rating job's resync request (`pipeline_leases.resync_requested` moving past
/// `seen`): then sets `resync` and stops this run, so `run` starts again from the corrected state. Ends
/// with the run.
pub(super) fn spawn_resync_watcher(
    database_url: &str,
    topic: &str,
    seen: i64,
    stop: Arc<AtomicBool>,
    resync: Arc<AtomicBool>,
) {
    let url = database_url.to_owned();
    let topic = topic.to_owned();
    let spawned = std::thread::Builder::new()
        .name("resync-watch".into())
        .spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            let mut conn: Option<PgConnection> = None;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(250));
                let requested = runtime.block_on(async {
                    if conn.is_none() {
                        conn = Some(PgConnection::connect(&url).await?);
                    }
                    let c = conn.as_mut().expect("connected above");
                    restore::resync_requests(c, &topic).await
                });
                match requested {
                    Ok(n) if n != seen => {
                        tracing::info!(
                            "a re-rating job corrected stored rows; reloading rating state"
                        );
                        resync.store(true, Ordering::Relaxed);
                        stop.store(true, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => conn = None,
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot watch for re-rating resyncs");
    }
}
