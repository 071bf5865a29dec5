//! meterflow's pure domain: what an event is, how one is decoded and validated, which window and meter it
//! falls in, and how aggregates add up. No I/O lives here; every other crate builds on these types.
//!
//! | file | owns |
//! |---|---|
//! | `event.rs` | [`Event`], the one decoder and validator shared by HTTP and Kafka (SPEC §2) |
//! | `window.rs` | tumbling UTC windows (SPEC §4) |
//! | `meter.rs` | [`Meter`], [`MeterSet`]: count/sum/max/unique_count/latest, events → row contributions |
//! | `dimensions.rs` | [`Dimensions`], [`GroupBy`]: the properties a meter groups by, an event's values for them, a book selector's match, and `Admitted`, the bound's one rule (the dataflow's Admit operator and re-rating jobs) (issue 17) |
//! | `aggregate.rs` | [`AggregateKey`], [`Aggregate`]: a row's key, sum + count as a group |
//! | `price.rs` | [`PriceBook`], [`PriceModel`], [`rate_period`]: period-to-date rating (SPEC §5) |
//! | `invoice.rs` | [`Customer`], [`Invoice`]: issued invoices, lines, adjustments; the invoice math: lines rounded once, minimum top-ups, corrections (SPEC §6) |
//! | `money.rs` | checked money arithmetic and the one rounding to a currency's minor unit |
//! | `batch.rs` | [`EpochBatch`]: what one completed epoch hands the sink |
//! | `stored.rs` | [`stored::Stored`]: what a commit means, `apply(&EpochBatch)` in memory with the sink's rules as errors; the tests' reference |
//! | `claims.rs` | the claim-store port ([`claims::Claims`]) the Kafka readers call, and its in-memory reference |
//! | `watermark.rs` | [`watermark::WatermarkPolicy`]: the event-time watermark from the partitions' progress (SPEC §4), pure |
//! | `wire.rs` | the Kafka wire format between the API and the pipeline: key, `meterflow-kind` header, void record |
//! | `json.rs` | exact decimals in JSON: numbers with their digits, never through f64 |
//! | `openapi.rs` | (feature `openapi`) the wire's decimals and patterns as OpenAPI schemas, for the API's document |
//!
//! Data never reaches a panic: outside tests, this crate may not unwrap, expect, index or do unchecked
//! arithmetic (the lints below; `clippy.toml` allows them in tests).
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )
)]

pub mod aggregate;
pub mod batch;
pub mod claims;
pub mod dimensions;
pub mod event;
pub mod invoice;
pub mod json;
pub mod meter;
pub mod money;
#[cfg(feature = "openapi")]
pub mod openapi;
pub mod price;
pub mod stored;
pub mod watermark;
pub mod window;
pub mod wire;

pub use aggregate::{Aggregate, AggregateKey};
pub use batch::{
    ChargeChange, DeadLetter, Duplicate, DuplicateKind, EpochBatch, LateEvent, LineChange,
    PartitionProgress, RatingCorrection, RatingState, RowChange,
};
/// A short text kept inline up to 24 bytes (customer ids, meter names, price book ids, currencies):
/// the dataflow's keys and charges are cloned, compared and moved between workers without a heap
/// allocation or a free on another thread. Serializes as a string.
pub use compact_str::CompactString;
pub use dimensions::{Dimensions, GroupBy};
pub use event::{
    check_void_ids, decode_as, decode_cloudevent, decode_event, fnv1a, object, printable,
    sniff_event_id, split_batch, DecodeError, Event, FieldError, Format, Limits,
    DEFAULT_RETENTION_MICROS,
};
pub use invoice::{
    Adjustment, Customer, Draft, Invoice, InvoiceError, InvoiceLine, InvoiceStatus, LineKind,
    PeriodUsage,
};
pub use meter::{Aggregation, Contribution, Item, Latest, Meter, MeterSet, Skip};
pub use money::MoneyError;
pub use price::{
    book_for, entry_for, period_of, rate_period, rate_period_from, rate_totals_after, Charge,
    Measure, PriceBook, PriceModel, RateEntry, Tier, WindowUsage,
};
pub use window::Window;
