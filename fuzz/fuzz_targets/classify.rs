//! The whole classify path (issue 13), not only the decoder. Any bytes, read from Kafka as a plain
//! event, a CloudEvent (its `content-type` header) or a void record, go through the pipeline's own
//! `classify` (decode, validate, claim — with the in-memory claim store, the reference semantics of
//! the Postgres one) and then the meters:
//!
//! - nothing panics, and a dead letter always has a reason;
//! - a counted event's canonical JSON (`Event::to_json`: what the API forwards to Kafka, and the form a
//!   void or a re-rating rebuilds from the stored row) decodes to the same event, which the meters turn
//!   into the same contributions;
//! - a void record for a counted event retracts it, with exactly the contributions it made.
#![no_main]

use std::sync::atomic::AtomicI64;

use libfuzzer_sys::fuzz_target;
use meterflow_dataflow::classify::{classify, Classified};
use meterflow_model::claims::MemoryClaims;
use meterflow_dataflow::{RawRecord, RecordKind};
use meterflow_model::{decode_as, Aggregation, Format, Limits, Meter, MeterSet, Window};

/// 2024-01-15T14:30:00Z, the records' timestamp (the reference for "in the future").
const NOW_MS: i64 = 1_705_329_000_000;

/// Every aggregation over `api_call` (values and properties, each window length); any other type is
/// metered by its default meter.
fn meters() -> MeterSet {
    let meter = |name: &str, aggregation, property: Option<&str>, window| Meter {
        meter: name.to_owned(),
        event_type: "api_call".to_owned(),
        aggregation,
        value_property: property.map(str::to_owned),
        window,
        group_by: Default::default(),
        max_dimension_values: None,
    };
    MeterSet::new([
        meter("calls", Aggregation::Count, None, Window::Minute),
        meter("total", Aggregation::Sum, Some("value"), Window::Hour),
        meter(
            "tokens",
            Aggregation::Sum,
            Some("properties.n"),
            Window::Hour,
        ),
        meter("peak", Aggregation::Max, Some("properties.n"), Window::Day),
        meter(
            "users",
            Aggregation::UniqueCount,
            Some("properties.user"),
            Window::Hour,
        ),
        meter(
            "level",
            Aggregation::Latest,
            Some("properties.n"),
            Window::Minute,
        ),
    ])
}

fn record(offset: i64, kind: RecordKind, payload: Vec<u8>) -> RawRecord {
    RawRecord {
        partition: 0,
        offset,
        timestamp_ms: NOW_MS,
        kind,
        payload,
    }
}

fn classify_one(claims: &mut MemoryClaims, record: RawRecord) -> Classified {
    let watermark = AtomicI64::new(i64::MIN);
    let mut items = classify(&[record], claims, &Limits::default(), &watermark)
        .expect("the in-memory claim store always answers");
    assert_eq!(items.len(), 1, "one item per record");
    items.remove(0).what
}

fuzz_target!(|data: &[u8]| {
    let meters = meters();
    for kind in [
        RecordKind::Event(Format::Plain),
        RecordKind::Event(Format::CloudEvent),
        RecordKind::Void,
    ] {
        let mut claims = MemoryClaims::default();
        match classify_one(&mut claims, record(0, kind, data.to_vec())) {
            Classified::Count(event) => {
                let metered = meters.contributions(&event);
                // The event as the API forwards it and as a void rebuilds it.
                let again = decode_as(
                    Format::Plain,
                    &event.to_json(),
                    NOW_MS * 1_000,
                    &Limits::default(),
                )
                .expect("a counted event re-encodes to a valid one");
                assert_eq!(again, event, "the canonical JSON is the same event");
                assert_eq!(
                    meters.contributions(&again),
                    metered,
                    "the same event meters the same"
                );
                // Its void, through the same path: ids are validated ([A-Za-z0-9._:-]), so they
                // need no escaping.
                let void = format!(
                    r#"{{"event_id":"{}","customer_id":"{}"}}"#,
                    event.event_id, event.customer_id
                );
                match classify_one(&mut claims, record(1, RecordKind::Void, void.into_bytes())) {
                    Classified::Retract(retracted) => assert_eq!(
                        meters.contributions(&retracted).0,
                        metered.0,
                        "a void retracts exactly what the event contributed"
                    ),
                    other => panic!("the void of a counted event must retract it, got {other:?}"),
                }
            }
            Classified::Dead(dead) => {
                assert!(!dead.reason.is_empty(), "a dead letter has a reason")
            }
            Classified::Retract(event) => {
                panic!("a void retracted {event:?}, which no record here counted")
            }
            Classified::Duplicate(_) | Classified::Ignored => {}
        }
    }
});
