//! meterflow's pure domain: what an event is, how one is decoded and validated, which window and meter it
//! falls in, and how aggregates add up. No I/O lives here; every other crate builds on these types.
//!
//! | file | owns |
//! |---|---|
//! | `event.rs` | [`Event`], the one decoder and validator shared by HTTP and Kafka (SPEC §2) |
//! | `window.rs` | tumbling UTC windows (SPEC §4) |
//! | `aggregate.rs` | [`AggregateKey`], [`Aggregate`]: the default meter's sum + count |
//! | `batch.rs` | [`EpochBatch`]: what one completed epoch hands the sink |
//! | `json.rs` | exact decimals in JSON: numbers with their digits, never through f64 |

pub mod aggregate;
pub mod batch;
pub mod event;
pub mod json;
pub mod window;

pub use aggregate::{Aggregate, AggregateKey};
pub use batch::{DeadLetter, EpochBatch};
pub use event::{decode_event, DecodeError, Event, FieldError, Limits};
pub use window::Window;
