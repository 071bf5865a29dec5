//! The pipeline's Prometheus metrics (SPEC §10), in the process-wide default registry; the pipeline
//! serves them at `--metrics-addr`. Labels are bounded: reasons, kinds, partitions — never customers.

use std::sync::LazyLock;

use prometheus::{
    register_histogram, register_int_counter, register_int_counter_vec, register_int_gauge,
    register_int_gauge_vec, Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
};

fn seconds_buckets() -> Vec<f64> {
    vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
}

pub static COMMIT_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "sink_commit_duration_seconds",
        "Time to commit one batch of epochs to Postgres",
        seconds_buckets()
    )
    .expect("a valid metric")
});

pub static COMMIT_ROWS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!("sink_commit_rows_total", "Aggregate row changes committed")
        .expect("a valid metric")
});

pub static COMMIT_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sink_commit_errors_total",
        "Failed sink commits by kind (transient ones are retried)",
        &["kind"]
    )
    .expect("a valid metric")
});

pub static DEAD_LETTERS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "dead_letters_total",
        "Kafka records stored as dead letters, by reason",
        &["reason"]
    )
    .expect("a valid metric")
});

pub static DUPLICATES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "duplicate_events_total",
        "Copies of an already counted event_id, by kind (identical, conflicting, voided)",
        &["kind"]
    )
    .expect("a valid metric")
});

pub static LATE_EVENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "late_events_total",
        "Events applied to windows already finalized, by reason",
        &["reason"]
    )
    .expect("a valid metric")
});

pub static WINDOW_CLOSE_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "window_close_duration_seconds",
        "From the watermark passing a window's end plus the allowed lateness to the window being finalized in Postgres",
        seconds_buckets()
    )
    .expect("a valid metric")
});

pub static AGGREGATION_LAG: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "aggregation_lag_seconds",
        "Wall-clock time minus the committed event-time watermark"
    )
    .expect("a valid metric")
});

pub static WATERMARK: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "committed_watermark_seconds",
        "The committed event-time watermark (seconds since the epoch)"
    )
    .expect("a valid metric")
});

pub static EPOCHS_BEHIND: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "epoch_frontier_lag",
        "Epochs the inputs are ahead of the sink's last commit"
    )
    .expect("a valid metric")
});

pub static CONSUMER_LAG: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "kafka_consumer_lag",
        "Records in the partition not yet committed by the pipeline",
        &["partition"]
    )
    .expect("a valid metric")
});
