//! `import` without `--csv`: every line produced as is to the events topic (keyed by its customer,
//! idempotent producer), and with `--wait`, waiting until the pipeline has committed every record.

use super::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, Producer};
use sqlx::{Connection, PgConnection};

pub fn run(args: &ImportArgs, cfg: &crate::config::Config) -> Result<()> {
    let (brokers, topic) = (cfg.kafka.brokers.as_str(), cfg.kafka.events_topic.as_str());
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(crate::kafka::ensure_topic(
        brokers,
        topic,
        crate::kafka::DEFAULT_PARTITIONS,
    ))?;
    let producer = crate::kafka::bulk_producer(brokers)?;
    let path = args.file.as_path();
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file.metadata()?.len();
    let decoder = Decoder {
        reference_micros: chrono::Utc::now().timestamp_micros(),
        limits: Limits::default(),
    };
    let done = AtomicU64::new(0);
    let bar = progress_bar(len, args.quiet, "producing");
    let (mut produced, mut undecodable) = (0u64, 0u64);
    with_progress(&bar, &done, || {
        for_each_line(&file, 0, len, &done, |_, line| {
            let Some(line) = record(line) else {
                return Ok(());
            };
            // Keyed by customer, as applications produce; a line that does not decode goes as is
            // (the pipeline makes it a dead letter, with its reason).
            let key = match decoder.decode(line) {
                Ok(e) => Some(e.customer_id),
                Err(_) => {
                    undecodable += 1;
                    None
                }
            };
            let mut record = BaseRecord::<str, [u8]>::to(topic).payload(line);
            if let Some(key) = key.as_deref() {
                record = record.key(key);
            }
            crate::kafka::send_waiting(&producer, record)?;
            produced += 1;
            Ok(())
        })
    })?;
    producer
        .flush(Duration::from_secs(120))
        .context("flushing the last records to Kafka")?;
    bar.finish_and_clear();
    let ends = end_offsets(brokers, topic)?;
    eprintln!(
        "import: produced {produced} records ({undecodable} will be dead letters) to {topic} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if !args.wait {
        eprintln!("import: the pipeline commits them as it reads them (--wait waits for that)");
        return Ok(());
    }
    runtime.block_on(wait_committed(args, cfg, topic, &ends))?;
    eprintln!(
        "import: the pipeline has committed every record produced ({:.1} s in all)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The next offset of every partition of `topic` (after the import's records).
fn end_offsets(brokers: &str, topic: &str) -> Result<Vec<(i32, i64)>> {
    let consumer: BaseConsumer = crate::kafka::client_config(brokers).create()?;
    let partitions = crate::kafka::partition_count(brokers, topic)?;
    (0..partitions)
        .map(|p| {
            let (_, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .with_context(|| format!("reading the end offset of {topic}/{p}"))?;
            Ok((p, high))
        })
        .collect()
}

async fn wait_committed(
    args: &ImportArgs,
    cfg: &crate::config::Config,
    topic: &str,
    ends: &[(i32, i64)],
) -> Result<()> {
    let masked = cfg.database.url.masked();
    let mut conn = PgConnection::connect(cfg.database.url.expose())
        .await
        .with_context(|| format!("cannot connect to Postgres at {masked}"))?;
    let total: i64 = ends.iter().map(|(_, e)| e).sum();
    let bar = progress_bar(u64::try_from(total).unwrap_or(0), args.quiet, "committing");
    if let Ok(style) =
        ProgressStyle::with_template("import: committed {bar:40} {pos}/{len} records (eta {eta})")
    {
        bar.set_style(style);
    }
    let deadline = Instant::now() + Duration::from_secs(args.wait_timeout_secs);
    loop {
        let stored = sqlx::query!(
            "SELECT partition, next_offset FROM source_offsets WHERE topic = $1",
            topic,
        )
        .fetch_all(&mut conn)
        .await
        .context("reading source_offsets; has `meterflow migrate` run?")?;
        let committed = |p: i32| {
            stored
                .iter()
                .find(|s| s.partition == p)
                .map_or(0, |s| s.next_offset)
        };
        let covered: i64 = ends.iter().map(|(p, e)| committed(*p).min(*e)).sum();
        bar.set_position(u64::try_from(covered).unwrap_or(0));
        if ends.iter().all(|(p, e)| committed(*p) >= *e) {
            bar.finish_and_clear();
            return Ok(());
        }
        if Instant::now() >= deadline {
            bar.abandon();
            bail!(
                "--wait: after {} s the pipeline has committed {covered} of {total} records of {topic}; \
                 is `meterflow pipeline` running?",
                args.wait_timeout_secs
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
