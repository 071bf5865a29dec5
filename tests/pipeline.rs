//! The pipeline end to end on the real broker and database: random events → `meterflow pipeline` →
//! `aggregations`, compared with a plain reference, for 1 and 2 workers and across a `kill -9`.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn aggregates_equal_the_reference_for_1_and_2_workers() {
    let topic = fresh_topic(4).await;
    let events = random_events(4_000, 7);
    produce_events(&topic, &events);
    let expected = reference(&events);
    let invalid = invalid_count(&events);
    assert!(
        invalid > 0 && expected.len() > 100,
        "the input exercises dead letters and many keys"
    );

    for workers in [1, 2] {
        let url = fresh_database().await;
        drain(&url, &topic, workers);
        assert_same(
            &stored_aggregates(&url).await,
            &expected,
            &format!("{workers} worker(s)"),
        );
        assert_eq!(
            scalar_i64(&url, "SELECT count(*) FROM dead_letters").await,
            invalid
        );
        assert_eq!(
            scalar_i64(&url, "SELECT sum(next_offset)::bigint FROM source_offsets").await,
            events.len() as i64
        );

        // Running again finds nothing new and changes nothing.
        drain(&url, &topic, workers);
        assert_same(
            &stored_aggregates(&url).await,
            &expected,
            &format!("{workers} worker(s), second run"),
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pipeline_killed_mid_stream_resumes_without_loss_or_double_counting() {
    let topic = fresh_topic(4).await;
    let url = fresh_database().await;
    let events = random_events(120_000, 11);
    let total = events.len() as i64;

    // The producer keeps writing while the pipeline runs, so the kill always lands mid-stream.
    let producer = produce_in_waves(&topic, &events, 6_000);
    let mut child = spawn_pipeline(&url, &topic, 2, &["--epoch-ms", "20"]);
    let committed_at_kill =
        wait_until_committed(&url, total / 10, Duration::from_secs(120), "the pipeline").await;
    child.kill(); // SIGKILL
    producer.join().unwrap();
    assert!(
        committed_at_kill < total,
        "the kill must land mid-stream (committed {committed_at_kill} of {total})"
    );

    drain(&url, &topic, 1);
    assert_same(
        &stored_aggregates(&url).await,
        &reference(&events),
        "after kill -9 and restart",
    );
    assert_eq!(
        scalar_i64(&url, "SELECT count(*) FROM dead_letters").await,
        invalid_count(&events)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_just_before_or_just_after_the_sink_commit_loses_and_repeats_nothing() {
    let events = random_events(20_000, 13);
    let (first, second) = events.split_at(8_000);
    let expected = reference(&events);
    for failpoint in ["before_commit:1", "after_commit:1"] {
        // A clean run commits the first part; a second run crashes at its first commit of the rest.
        let topic = fresh_topic(4).await;
        let url = fresh_database().await;
        produce_events(&topic, first);
        drain(&url, &topic, 1);
        produce_events(&topic, second);
        let out = meterflow(&url, &topic)
            .env("MF_FAILPOINT", failpoint)
            .args(["pipeline", "--until-caught-up", "--workers", "2"])
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "{failpoint}: the failpoint must crash the pipeline"
        );
        let committed = committed(&url).await;
        if failpoint.starts_with("before") {
            // The transaction died before COMMIT: only the first part is stored.
            assert_eq!(committed, first.len() as i64, "{failpoint}");
        } else {
            // The transaction committed but was never acknowledged: a restart must not redo it.
            assert!(
                committed > first.len() as i64,
                "{failpoint}: {committed} committed"
            );
        }
        drain(&url, &topic, 2);
        assert_same(&stored_aggregates(&url).await, &expected, failpoint);
        assert_eq!(
            scalar_i64(&url, "SELECT count(*) FROM dead_letters").await,
            invalid_count(&events)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_without_partitions_still_lets_epochs_complete() {
    // One partition, three workers: two own nothing. Were their frontiers stuck, no epoch would ever
    // complete and nothing would be committed.
    let topic = fresh_topic(1).await;
    let url = fresh_database().await;
    let events = random_events(500, 17);
    let _pipeline = spawn_pipeline(&url, &topic, 3, &[]);
    produce_events(&topic, &events);
    let expected = reference(&events);
    let deadline = Instant::now() + Duration::from_secs(60);
    while stored_aggregates(&url).await != expected {
        assert!(
            Instant::now() < deadline,
            "the idle workers held the frontier back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
