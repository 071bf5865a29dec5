//! The streaming core: Kafka records in, per-epoch [`EpochBatch`](meterflow_model::EpochBatch)es out.
//! Knows nothing of HTTP or Postgres: the sink is whoever reads the batch channel.
//!
//! ```text
//!  Kafka ─► reader thread (one per worker, owns its partitions) ─► bounded channel
//!                                                                     │ (never blocks the worker)
//!  worker loop: feed records + offset markers, advance the epoch ◄────┘
//!      │
//!      ▼  build(): decode ─ok─► usage (key, Σvalue, count) ─► consolidate (exchange by key)
//!                  └─err─► dead letters          offsets ──┐          │
//!                                     └────────────────────┴─► commit_epochs (on worker 0)
//!                                                                     │ batch per completed epoch
//!                                                                     ▼
//!                                                               sink thread (sinks crate)
//! ```
//!
//! | file | owns |
//! |---|---|
//! | `source.rs` | the Kafka reader threads: deterministic partition assignment, start offsets, catch-up |
//! | `operators.rs` | `build`: the dataflow graph, one small named operator per step |
//! | `commit.rs` | `commit_epochs`: gathers each completed epoch on worker 0, hands it to the sink, holds the epoch open until the sink acknowledges |
//! | `worker.rs` | driving a worker: feeding inputs, ticking epochs, backpressure, shutdown |
//! | `usage.rs` | [`Usage`], the aggregate as a differential difference |

pub mod commit;
pub mod operators;
pub mod source;
pub mod usage;
pub mod worker;

pub use commit::{SinkChannels, SinkUpdate};
pub use source::{RawRecord, SourceConfig};
pub use worker::{run_worker, WorkerConfig};
