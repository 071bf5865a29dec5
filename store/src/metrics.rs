//! The claim store's Prometheus metrics, in the process-wide default registry (the pipeline serves them
//! with its own, `meterflow_sinks::metrics`).
// The definitions below are constants: registering one fails only on a bug every test finds, not on data.
#![allow(clippy::expect_used)]

use std::sync::LazyLock;

use prometheus::{register_int_counter, IntCounter};

pub static CLAIM_FAST_BATCHES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "claim_fast_path_batches_total",
        "Batches of new event ids claimed and stored by the fast path (COPY)"
    )
    .expect("a valid metric")
});

pub static CLAIM_FALLBACKS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "claim_fast_path_fallbacks_total",
        "Batches whose fast-path claim (COPY) met an id already claimed and went to the statement"
    )
    .expect("a valid metric")
});

/// Registers every metric of this crate, so each is exported from the start (at 0).
pub fn register_all() {
    LazyLock::force(&CLAIM_FAST_BATCHES);
    LazyLock::force(&CLAIM_FALLBACKS);
}
