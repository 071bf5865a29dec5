//! The dataflow against a plain reference: random records (valid, invalid, several partitions) through
//! 1, 2 and 4 workers and several epoch lengths must give exactly the aggregates, offsets and dead letters
//! a straightforward loop computes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meterflow_dataflow::source::{owned_partitions, SourceMessage};
use meterflow_dataflow::{run_worker, RawRecord, SinkChannels, WorkerConfig};
use meterflow_model::{decode_event, Aggregate, AggregateKey, EpochBatch, Limits};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const PARTITIONS: i32 = 5;
const BASE_MS: i64 = 1_705_320_000_000; // 2024-01-15T12:00:00Z

#[derive(Debug, Default, PartialEq)]
struct Outcome {
    aggregates: BTreeMap<AggregateKey, Aggregate>,
    offsets: BTreeMap<i32, i64>,
    dead_letters: BTreeSet<(i32, i64)>,
}

fn random_records(seed: u64, n: usize) -> Vec<RawRecord> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut next_offset = vec![0i64; PARTITIONS as usize];
    (0..n)
        .map(|i| {
            let partition = rng.random_range(0..PARTITIONS);
            let offset = next_offset[partition as usize];
            next_offset[partition as usize] += 1;
            let t = BASE_MS + rng.random_range(0..6 * 3_600_000);
            let time = chrono::DateTime::from_timestamp_millis(t).unwrap().to_rfc3339();
            let payload = match rng.random_range(0..20) {
                0 => b"{not json".to_vec(),
                1 => format!(r#"{{"event_id":"e{i}","customer_id":"c","event_type":"t","event_time":"{time}","value":"-1"}}"#).into_bytes(),
                2 => format!(r#"{{"event_id":"e{i}","customer_id":"c{}","event_type":"api_call","event_time":"{time}"}}"#, rng.random_range(0..7)).into_bytes(),
                _ => format!(
                    r#"{{"event_id":"e{i}","customer_id":"c{}","event_type":"{}","event_time":"{time}","value":"{}.{:02}"}}"#,
                    rng.random_range(0..7),
                    ["api_call", "tokens", "storage_gb"][rng.random_range(0..3)],
                    rng.random_range(0..1000),
                    rng.random_range(0..100)
                )
                .into_bytes(),
            };
            RawRecord { partition, offset, timestamp_ms: BASE_MS + 7 * 3_600_000, payload }
        })
        .collect()
}

fn reference(records: &[RawRecord]) -> Outcome {
    let mut out = Outcome::default();
    for r in records {
        out.offsets.insert(r.partition, r.offset + 1);
        match decode_event(&r.payload, r.timestamp_ms * 1_000, &Limits::default()) {
            Ok(e) => out
                .aggregates
                .entry(AggregateKey::default_meter(&e))
                .or_default()
                .checked_add(&Aggregate::of(e.value))
                .unwrap(),
            Err(_) => {
                out.dead_letters.insert((r.partition, r.offset));
            }
        }
    }
    out
}

fn run_dataflow(records: Vec<RawRecord>, workers: usize, epoch_ms: u64, chunk: usize) -> Outcome {
    let (batch_tx, batch_rx) = crossbeam_channel::bounded::<EpochBatch>(4);
    let (ack_tx, ack_rx) = crossbeam_channel::unbounded();
    let sink = Arc::new(Mutex::new(Some(SinkChannels {
        batches: batch_tx,
        acks: ack_rx,
    })));
    let all = records.clone();
    // A failed assertion in the collector ends the test binary at once: the workers would otherwise wait
    // forever for a sink that is gone.
    let collector = std::thread::spawn(move || {
        std::panic::set_hook(Box::new(|info| {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "{info}"); // not captured: the process exits next
            std::process::exit(101);
        }));
        let mut out = Outcome::default();
        let mut last_epoch = 0;
        for batch in batch_rx {
            assert!(
                batch.epoch > last_epoch || last_epoch == 0,
                "epochs arrive in order"
            );
            last_epoch = batch.epoch;
            let keys: BTreeSet<&AggregateKey> = batch.aggregates.iter().map(|(k, _)| k).collect();
            assert_eq!(
                keys.len(),
                batch.aggregates.len(),
                "at most one change per key in a batch"
            );
            for (key, agg) in batch.aggregates {
                let entry = out.aggregates.entry(key.clone()).or_default();
                entry.checked_add(&agg).unwrap();
                if entry.is_zero() {
                    out.aggregates.remove(&key);
                }
            }
            for (p, next) in batch.offsets {
                let stored = out.offsets.entry(p).or_default();
                assert!(next >= *stored, "offsets never move back");
                *stored = next;
            }
            for d in batch.dead_letters {
                assert!(
                    out.dead_letters.insert((d.partition, d.offset)),
                    "a dead letter is stored once"
                );
            }
            // Exactly-once at every commit: what is stored is exactly what the stored offsets cover.
            let below: Vec<&RawRecord> = all
                .iter()
                .filter(|r| r.offset < out.offsets.get(&r.partition).copied().unwrap_or(0))
                .collect();
            let covered = reference(&below.into_iter().cloned().collect::<Vec<_>>());
            assert_eq!(
                out.aggregates, covered.aggregates,
                "results match the committed offsets after epoch {last_epoch}"
            );
            assert_eq!(out.dead_letters, covered.dead_letters);
            ack_tx.send(batch.epoch).unwrap();
        }
        out
    });
    let records = Arc::new(records);
    let config = WorkerConfig {
        epoch_interval: Duration::from_millis(epoch_ms),
        ..WorkerConfig::default()
    };
    timely::execute(timely::Config::process(workers), move |worker| {
        let owned = owned_partitions(PARTITIONS, worker.index(), worker.peers());
        let (tx, rx) = crossbeam_channel::bounded(1_000_000);
        let mine: Vec<RawRecord> = records
            .iter()
            .filter(|r| owned.contains(&r.partition))
            .cloned()
            .collect();
        for part in mine.chunks(chunk) {
            tx.send(SourceMessage::Records(part.to_vec())).unwrap();
        }
        tx.send(SourceMessage::CaughtUp).unwrap();
        let sink = if worker.index() == 0 {
            sink.lock().unwrap().take()
        } else {
            None
        };
        run_worker(worker, &config, rx, sink, &AtomicBool::new(false)).unwrap();
    })
    .unwrap();
    collector.join().unwrap()
}

#[test]
fn the_dataflow_equals_the_reference_for_1_2_and_4_workers() {
    for seed in 0..3 {
        let records = random_records(seed, 3_000);
        let expected = reference(&records);
        assert!(!expected.dead_letters.is_empty() && expected.aggregates.len() > 50);
        for workers in [1, 2, 4] {
            for (epoch_ms, chunk) in [(0, 7), (5, 500)] {
                let got = run_dataflow(records.clone(), workers, epoch_ms, chunk);
                assert_eq!(
                    got, expected,
                    "seed {seed}, {workers} workers, epoch {epoch_ms} ms, chunks of {chunk}"
                );
            }
        }
    }
}
