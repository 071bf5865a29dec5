//! What the pipeline watches beside its dataflow: the meters and price books in Postgres (LISTEN on
//! the tables' notifications, fed to the workers as they change; a queued re-rating job wakes the
//! leader's runner on the same channel, and an admin's watermark floor ends a held catch-up epoch),
//! and the consumer lag per partition
//! (a metric, polled). Each is a task on the process's one runtime and ends when the run's token is
//! cancelled.

use super::*;

/// The channel the `meters` and `price_books` triggers notify (migration 0018), with the table's name.
const CONFIG_CHANNEL: &str = "meterflow_config";

/// How long the watcher waits for a notification before it looks at the fallback's clock again.
const FALLBACK_CHECK: Duration = Duration::from_secs(1);

/// Reloads everything this often even without a notification: a missed one (a bug, a trigger
/// dropped by hand) costs at most this much delay.
const FALLBACK: Duration = Duration::from_secs(30);

/// What a notification says changed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Changed {
    Meters,
    Books,
    /// A re-rating job was queued (`rerating_jobs`, migration 0019).
    Jobs,
    /// An admin set a watermark floor (`meterflow_store::watermark_floors::advance`).
    Floor,
    /// Anything may have: a reconnect, the fallback, an unknown payload.
    Both,
}

/// Keeps the dataflow's meters and price books current (SPEC §4, §5): it sends worker 0 of the leader
/// each new set, which feeds it to every worker at one epoch. It LISTENs on
/// [`CONFIG_CHANNEL`], which the tables' triggers notify on every change, and reloads what changed:
/// a meter applies to the events processed after it, and a book created, edited or closed re-rates
/// the windows it touches, within milliseconds of the commit. Notifications sent while its connection
/// was down are lost, so it reloads both whenever it (re)connects, and every [`FALLBACK`] anyway.
pub(super) async fn watch_config(
    url: String,
    meters: (Vec<Meter>, crossbeam_channel::Sender<Vec<Meter>>),
    books: Option<(Vec<PriceBook>, crossbeam_channel::Sender<Vec<PriceBook>>)>,
    floors: Floors,
    jobs_queued: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) {
    let mut watcher = Watcher {
        url,
        meters,
        books,
        floors,
        jobs_queued,
        conn: None,
    };
    tokio::select! {
        () = stop.cancelled() => {}
        () = watcher.run() => {}
    }
}

/// The admin's watermark floor of the pipeline's topic: the greatest sent to worker 0, and where new ones
/// go (a held catch-up epoch ends for one: `meterflow_dataflow::catch_up`).
pub(super) struct Floors {
    pub topic: String,
    pub known: Option<i64>,
    pub updates: crossbeam_channel::Sender<i64>,
}

struct Watcher {
    url: String,
    /// The meters the dataflow has, and where new ones go.
    meters: (Vec<Meter>, crossbeam_channel::Sender<Vec<Meter>>),
    /// The books the dataflow has, and where new ones go; `None` when this process rates nothing.
    books: Option<(Vec<PriceBook>, crossbeam_channel::Sender<Vec<PriceBook>>)>,
    floors: Floors,
    /// Woken when a re-rating job is queued (the leader's runner waits on it).
    jobs_queued: Arc<tokio::sync::Notify>,
    /// The connection the reloads read on (the listener's is busy listening).
    conn: Option<PgConnection>,
}

impl Watcher {
    /// Returns once the dataflow is gone; otherwise runs until cancelled.
    async fn run(&mut self) {
        let mut listener: Option<sqlx::postgres::PgListener> = None;
        let mut last_full = Instant::now();
        loop {
            let changed = match listener.as_mut() {
                None => match self.listen().await {
                    Some(l) => {
                        listener = Some(l);
                        Some(Changed::Both)
                    }
                    None => {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        None
                    }
                },
                Some(l) => match tokio::time::timeout(FALLBACK_CHECK, l.try_recv()).await {
                    Err(_waited) => (last_full.elapsed() >= FALLBACK).then_some(Changed::Both),
                    Ok(Ok(Some(n))) => Some(match n.payload() {
                        "meters" => Changed::Meters,
                        "price_books" => Changed::Books,
                        "rerating_jobs" => Changed::Jobs,
                        "watermark_floors" => Changed::Floor,
                        _ => Changed::Both,
                    }),
                    // Reconnected: what was notified meanwhile is lost.
                    Ok(Ok(None)) => Some(Changed::Both),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "lost the config notifications; listening again");
                        listener = None;
                        None
                    }
                },
            };
            let Some(changed) = changed else { continue };
            if changed == Changed::Both {
                last_full = Instant::now();
            }
            if matches!(changed, Changed::Jobs | Changed::Both) {
                self.jobs_queued.notify_one();
            }
            if matches!(changed, Changed::Meters | Changed::Both) && !self.reload_meters().await {
                return; // the dataflow is gone: the pipeline stopped
            }
            if matches!(changed, Changed::Books | Changed::Both) && !self.reload_books().await {
                return; // the dataflow is gone: the pipeline stopped
            }
            if matches!(changed, Changed::Floor | Changed::Both) && !self.reload_floor().await {
                return; // the dataflow is gone: the pipeline stopped
            }
        }
    }

    async fn listen(&self) -> Option<sqlx::postgres::PgListener> {
        let listening = async {
            let mut listener = sqlx::postgres::PgListener::connect(&self.url).await?;
            listener.listen(CONFIG_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        match listening.await {
            Ok(listener) => Some(listener),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for meter and price-book changes; retrying");
                None
            }
        }
    }

    async fn connection(&mut self) -> Result<&mut PgConnection, sqlx::Error> {
        match &mut self.conn {
            Some(conn) => Ok(conn),
            slot => Ok(slot.insert(PgConnection::connect(&self.url).await?)),
        }
    }

    /// False once the dataflow is gone.
    async fn reload_meters(&mut self) -> bool {
        let loaded = match self.connection().await {
            Ok(conn) => meters::load_meters(conn).await,
            Err(e) => Err(e),
        };
        let (known, updates) = &mut self.meters;
        match loaded {
            Ok(meters) if meters != *known => {
                tracing::info!(
                    meters = meters.len(),
                    "meters changed; applying them to new events"
                );
                *known = meters.clone();
                updates.send(meters).is_ok()
            }
            Ok(_) => true,
            Err(e) => {
                self.conn = None;
                tracing::warn!(error = %e, "cannot reload meters; keeping the current ones");
                true
            }
        }
    }

    /// False once the dataflow is gone. Tries twice: a stale connection fails the first time, and a
    /// floor missed here waits for the fallback's reload.
    async fn reload_floor(&mut self) -> bool {
        let topic = self.floors.topic.clone();
        let mut loaded = Err(sqlx::Error::PoolClosed);
        for _ in 0..2 {
            loaded = match self.connection().await {
                Ok(conn) => watermark_floors::floor(&mut *conn, &topic).await,
                Err(e) => Err(e),
            };
            if loaded.is_ok() {
                break;
            }
            self.conn = None;
        }
        match loaded {
            Ok(Some(floor)) if Some(floor.timestamp_micros()) > self.floors.known => {
                self.floors.known = Some(floor.timestamp_micros());
                self.floors.updates.send(floor.timestamp_micros()).is_ok()
            }
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the watermark floor; a held catch-up epoch ends at its bound");
                true
            }
        }
    }

    /// False once the dataflow is gone.
    async fn reload_books(&mut self) -> bool {
        if self.books.is_none() {
            return true;
        }
        let loaded = match self.connection().await {
            Ok(conn) => price_books::load_price_books(conn).await,
            Err(e) => Err(e),
        };
        let Some((known, updates)) = &mut self.books else {
            return true;
        };
        match loaded {
            Ok(books) if books != *known => {
                tracing::info!(books = books.len(), "price books changed; re-rating");
                *known = books.clone();
                // Worker 0 takes one update at a time (the channel holds one): wait for it off the
                // runtime's scheduling, as a blocking send.
                tokio::task::block_in_place(|| updates.send(books).is_ok())
            }
            Ok(_) => true,
            Err(e) => {
                self.conn = None;
                tracing::warn!(error = %e, "cannot reload price books; keeping the current ones");
                true
            }
        }
    }
}

/// Every 2 s until cancelled: each partition's consumer lag (its end offset in Kafka minus the offset
/// the sink committed in Postgres), the records committed since, and worker 0's epoch lag, as Prometheus
/// metrics. Runs on the leader (process 0) only, which alone commits; a failed look-up keeps the last
/// values and tries again. It starts after the first interval, out of the way of the start-up.
pub(super) async fn monitor_lag(
    url: String,
    brokers: String,
    topic: String,
    partitions: i32,
    epochs_behind: Arc<std::sync::atomic::AtomicU64>,
    stop: CancellationToken,
) {
    use meterflow_sinks::metrics;
    use rdkafka::consumer::{BaseConsumer, Consumer};

    const EVERY: Duration = Duration::from_secs(2);
    let consumer: Arc<BaseConsumer> = match kafka::client_config(&brokers).create() {
        Ok(c) => Arc::new(c),
        Err(e) => {
            tracing::warn!(error = %e, "cannot create the Kafka client of the lag monitor; no consumer lag metrics");
            return;
        }
    };
    let mut conn: Option<PgConnection> = None;
    let mut committed_before: Option<i64> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(EVERY) => {}
        }
        metrics::EPOCHS_BEHIND.set(epochs_behind.load(Ordering::Relaxed) as i64);
        let c = match &mut conn {
            Some(c) => c,
            slot => match PgConnection::connect(&url).await {
                Ok(c) => slot.insert(c),
                Err(_) => continue,
            },
        };
        let offsets = match meterflow_sinks::stored_offsets(c, &topic).await {
            Ok(offsets) => offsets,
            Err(_) => {
                conn = None;
                continue;
            }
        };
        // rdkafka's watermark look-ups block: off the runtime's threads.
        let (consumer, t) = (consumer.clone(), topic.clone());
        let ends = tokio::task::spawn_blocking(move || {
            (0..partitions)
                .map(|p| {
                    (
                        p,
                        consumer
                            .fetch_watermarks(&t, p, Duration::from_secs(5))
                            .ok(),
                    )
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let mut committed_sum = 0;
        for (p, ends) in ends {
            let Some((low, high)) = ends else { continue };
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
}
