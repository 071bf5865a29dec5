//! Finding 33b: a reader that fails (a Kafka error) stopped only its own worker; the others kept
//! committing and moving the watermark while that worker's partitions were never read again. Now the
//! failure stops every worker of the process (they commit what they have) and the run ends with it.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meterflow_dataflow::source::SourceMessage;
use meterflow_dataflow::{
    run_worker, Feeds, GraphContext, SinkChannels, SourceError, WorkerConfig,
};
use meterflow_model::EpochBatch;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

#[test]
fn finding_33b_a_failed_reader_stops_every_worker_of_the_process() {
    let (batch_tx, batch_rx) = crossbeam_channel::bounded::<EpochBatch>(4);
    let (ack_tx, ack_rx) = crossbeam_channel::unbounded();
    let sink = Arc::new(Mutex::new(Some(SinkChannels {
        batches: batch_tx,
        acks: ack_rx,
    })));
    std::thread::spawn(move || {
        for batch in batch_rx {
            let _ = ack_tx.send(batch.epoch);
        }
    });
    // Worker 0's reader stays open and never catches up; worker 1's fails at once.
    let (open_tx, open_rx) = crossbeam_channel::unbounded::<SourceMessage>();
    let (failed_tx, failed_rx) = crossbeam_channel::unbounded::<SourceMessage>();
    failed_tx
        .send(SourceMessage::Failed(SourceError {
            topic: "t".into(),
            source: KafkaError::MetadataFetch(RDKafkaErrorCode::AllBrokersDown),
        }))
        .unwrap();
    let readers = Arc::new(Mutex::new(vec![Some(open_rx), Some(failed_rx)]));
    let stop = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let context = GraphContext {
            allowed_lateness_micros: 0,
        };
        let config = WorkerConfig {
            epoch_interval: Duration::from_millis(5),
            ..WorkerConfig::default()
        };
        let guards = timely::execute(timely::Config::process(2), move |worker| {
            let index = worker.index();
            let reader = readers.lock().unwrap()[index].take().unwrap();
            let feeds = Feeds {
                sink: if index == 0 {
                    sink.lock().unwrap().take()
                } else {
                    None
                },
                ..Feeds::default()
            };
            run_worker(worker, &config, context.clone(), reader, feeds, &stop)
        })
        .unwrap();
        let results: Vec<Result<(), String>> = guards
            .join()
            .into_iter()
            .map(|r| r.unwrap().map(|_| ()).map_err(|e| e.to_string()))
            .collect();
        let _ = done_tx.send(results);
    });
    let results = done_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("every worker stops when one reader fails");
    assert_eq!(
        results,
        vec![
            Ok(()),
            Err(format!(
                "reading t: {}",
                KafkaError::MetadataFetch(RDKafkaErrorCode::AllBrokersDown)
            ))
        ]
    );
    drop(open_tx);
    drop(failed_tx);
}
