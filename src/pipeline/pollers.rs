//! What the pipeline polls beside its dataflow: the meters and price books in Postgres (fed to the
//! workers as they change), and the consumer lag per partition (a metric).

use super::*;

/// Reloads the meters every second, so a meter created through the API applies to the events processed
/// after it (SPEC §4).
pub(super) fn spawn_meter_poller(
    database_url: &str,
    registry: MeterRegistry,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let url = database_url.to_owned();
    std::thread::Builder::new()
        .name("meter-poller".into())
        .spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            let mut known = registry.current().len();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                let loaded = runtime.block_on(async {
                    let mut conn = PgConnection::connect(&url).await?;
                    meters::load_meters(&mut conn).await
                });
                match loaded {
                    Ok(meters) => {
                        if meters.len() != known {
                            tracing::info!(
                                meters = meters.len(),
                                "meters changed; applying them to new events"
                            );
                            known = meters.len();
                        }
                        registry.replace(meters);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot reload meters; keeping the current ones")
                    }
                }
            }
        })?;
    Ok(())
}

/// Reloads the price books every second and sends a snapshot whenever they changed, so a book created,
/// edited or closed re-rates the windows it touches within about a second (SPEC §5).
pub(super) fn spawn_book_poller(
    database_url: &str,
    initial: Vec<PriceBook>,
    updates: crossbeam_channel::Sender<Vec<PriceBook>>,
    stop: Arc<AtomicBool>,
) {
    let url = database_url.to_owned();
    let spawned = std::thread::Builder::new()
        .name("book-poller".into())
        .spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            let mut known = initial;
            let mut conn: Option<PgConnection> = None;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(500));
                let loaded = runtime.block_on(async {
                    if conn.is_none() {
                        conn = Some(PgConnection::connect(&url).await?);
                    }
                    let c = conn.as_mut().expect("connected above");
                    price_books::load_price_books(c).await
                });
                match loaded {
                    Ok(books) if books != known => {
                        tracing::info!(books = books.len(), "price books changed; re-rating");
                        known = books.clone();
                        // The dataflow is gone once the pipeline stops.
                        if updates.send(books).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        conn = None;
                        tracing::warn!(error = %e, "cannot reload price books; keeping the current ones");
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the price-book poller; books are fixed for this run");
    }
}

/// Every 2 s until `stop`: each partition's consumer lag (its end offset in Kafka minus the offset the sink
/// committed in Postgres), the records committed since, and worker 0's epoch lag, as Prometheus
/// metrics. Runs on the leader (process 0) only, which alone commits; a failed look-up keeps the last
/// values and tries again. It starts after the first interval, out of the way of the start-up.
pub(super) fn spawn_lag_monitor(
    cfg: &Config,
    partitions: i32,
    epochs_behind: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    use meterflow_sinks::metrics;
    use rdkafka::consumer::{BaseConsumer, Consumer};

    let url = cfg.database.url.expose().to_owned();
    let (brokers, topic) = (cfg.kafka.brokers.clone(), cfg.kafka.events_topic.clone());
    let spawned = std::thread::Builder::new()
        .name("lag-monitor".into())
        .spawn(move || {
            // Sleeps in short steps so a stop is noticed promptly; false once stopped.
            let pause = || {
                for _ in 0..20 {
                    if stop.load(Ordering::Relaxed) {
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                !stop.load(Ordering::Relaxed)
            };
            if !pause() {
                return;
            }
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            let consumer: BaseConsumer = match kafka::client_config(&brokers).create() {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot create the Kafka client of the lag monitor; no consumer lag metrics");
                    return;
                }
            };
            let mut conn: Option<PgConnection> = None;
            let mut committed_before: Option<i64> = None;
            loop {
                metrics::EPOCHS_BEHIND.set(epochs_behind.load(Ordering::Relaxed) as i64);
                let stored = runtime.block_on(async {
                    if conn.is_none() {
                        conn = Some(PgConnection::connect(&url).await?);
                    }
                    let c = conn.as_mut().expect("connected above");
                    meterflow_sinks::stored_offsets(c, &topic).await
                });
                match stored {
                    Ok(offsets) => {
                        let mut committed_sum = 0;
                        for p in 0..partitions {
                            let Ok((low, high)) =
                                consumer.fetch_watermarks(&topic, p, Duration::from_secs(5))
                            else {
                                continue;
                            };
                            let committed = offsets.get(&p).copied().unwrap_or(low);
                            committed_sum += committed;
                            metrics::CONSUMER_LAG
                                .with_label_values(&[&p.to_string()])
                                .set((high - committed).max(0));
                        }
                        if let Some(before) = committed_before {
                            metrics::COMMITTED_RECORDS.inc_by((committed_sum - before).max(0) as u64);
                        }
                        committed_before = Some(committed_sum);
                    }
                    Err(_) => conn = None,
                }
                if !pause() {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the lag monitor; no consumer lag metrics");
    }
}
