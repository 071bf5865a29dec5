//! The pipeline's Prometheus metrics (SPEC §10), in the process-wide default registry; the pipeline
//! serves them at `--metrics-addr`. Labels are bounded: reasons, kinds, partitions — never customers.
// The definitions below are constants: registering one fails only on a bug every test finds, not on data.
#![allow(clippy::expect_used)]

use std::sync::LazyLock;

use meterflow_model::DuplicateKind;
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

/// Windows that close: each window a commit's watermark moves past is observed once, whether the
/// commit's own row write finalizes it or the finalizing UPDATE does (`epoch.rs`). A window whose
/// first row is written after an earlier commit's watermark passed it (late data) is born finalized
/// and never waits to close, so it is not observed here.
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

pub static COMMITTED_RECORDS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "pipeline_records_committed_total",
        "Kafka records (events, duplicates, voids, dead letters) whose results the sink committed"
    )
    .expect("a valid metric")
});

pub static QUARANTINED_WINDOWS: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "quarantined_windows",
        "Aggregate rows quarantined because their value left the 96-bit decimal range (aggregations.quarantined)"
    )
    .expect("a valid metric")
});

pub static QUARANTINED_PERIODS: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "quarantined_periods",
        "Billing periods rated only up to a window because usage or charges overflowed (rating_quarantine)"
    )
    .expect("a valid metric")
});

pub static DROPPED_RETRACTIONS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "sink_dropped_retractions_total",
        "Retractions of max/unique_count/latest items that met no stored item (never expected; dropped, not fatal)"
    )
    .expect("a valid metric")
});

/// The reasons of dead letters (`DecodeError::code`); any other is counted as `OTHER`, so the label
/// stays bounded.
pub const DEAD_LETTER_REASONS: [&str; 2] = ["MALFORMED_JSON", "VALIDATION_FAILED"];

/// The `reason` label of a dead letter whose stored reason is `reason` (`CODE: details`).
pub fn dead_letter_reason(reason: &str) -> &'static str {
    let code = reason.split(':').next().unwrap_or_default();
    DEAD_LETTER_REASONS
        .into_iter()
        .find(|r| *r == code)
        .unwrap_or("OTHER")
}

/// Registers every metric and creates each labelled series at zero, so all of them are exported from
/// the start (a dashboard shows 0, not "no data", and an alert on `increase` sees the first one).
pub fn register_all() {
    LazyLock::force(&COMMIT_SECONDS);
    LazyLock::force(&COMMIT_ROWS);
    meterflow_store::metrics::register_all();
    LazyLock::force(&WINDOW_CLOSE_SECONDS);
    LazyLock::force(&AGGREGATION_LAG);
    LazyLock::force(&WATERMARK);
    LazyLock::force(&EPOCHS_BEHIND);
    LazyLock::force(&CONSUMER_LAG);
    LazyLock::force(&COMMITTED_RECORDS);
    LazyLock::force(&QUARANTINED_WINDOWS);
    LazyLock::force(&QUARANTINED_PERIODS);
    LazyLock::force(&DROPPED_RETRACTIONS);
    for kind in ["transient", "permanent"] {
        COMMIT_ERRORS.with_label_values(&[kind]);
    }
    for reason in DEAD_LETTER_REASONS.into_iter().chain(["OTHER"]) {
        DEAD_LETTERS.with_label_values(&[reason]);
    }
    for kind in [
        DuplicateKind::Identical,
        DuplicateKind::Conflicting,
        DuplicateKind::Voided,
    ] {
        DUPLICATES.with_label_values(&[kind.as_str()]);
    }
    LATE_EVENTS.with_label_values(&[LATE_WINDOW_FINALIZED]);
}

/// The one reason of `late_events_total` so far: the event's window was already finalized.
pub const LATE_WINDOW_FINALIZED: &str = "window_finalized";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_reasons_are_bounded() {
        assert_eq!(
            dead_letter_reason("MALFORMED_JSON: expected value"),
            "MALFORMED_JSON"
        );
        assert_eq!(
            dead_letter_reason("VALIDATION_FAILED: value: negative"),
            "VALIDATION_FAILED"
        );
        assert_eq!(dead_letter_reason("cust_123 sent garbage"), "OTHER");
    }

    #[test]
    fn every_metric_is_exported_once_registered() {
        register_all();
        let names: Vec<String> = prometheus::gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect();
        for name in [
            "sink_commit_duration_seconds",
            "sink_commit_rows_total",
            "sink_commit_errors_total",
            "dead_letters_total",
            "duplicate_events_total",
            "late_events_total",
            "window_close_duration_seconds",
            "aggregation_lag_seconds",
            "committed_watermark_seconds",
            "epoch_frontier_lag",
            "pipeline_records_committed_total",
            "quarantined_windows",
            "quarantined_periods",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} in {names:?}");
        }
    }
}
