//! The whole-system adversarial suite (issue 13, "Tests that must exist and pass"), on real Kafka and
//! Postgres with the real binary.
//!
//! A seeded generator mixes hostile records with good ones, over Kafka (plain JSON, CloudEvents with
//! and without their header, void records) and over HTTP (`POST /events`, `/events/batch`,
//! CloudEvents single and batch, `POST /events/{id}/void`), voids events both ways, and kills
//! (SIGKILL) and restarts the pipeline twice. Every hostile record belongs to a named class
//! ([`CLASSES`]). The test asserts that
//!
//! - the pipeline process never exits and the API's `/healthz` answers, after every round;
//! - every good event is counted, wherever it stood among hostile ones;
//! - every Kafka record is accounted for exactly once, by its position: counted (its `event_ids`
//!   claim), a duplicate (nothing, or a `duplicate_events` row when conflicting), a dead letter with a
//!   non-empty reason, or a void (applied: `event_ids.voided_*`; or ignored);
//! - the aggregations equal a reference computed here, in plain Rust, from the good events minus the
//!   voided ones (sharing no code with the dataflow): default meters (sum of `value`, hourly) for
//!   `adv.call` and `adv.tokens`, and three meters the test creates over `adv.prop` (a sum of
//!   `properties.n`, hourly; a count, per minute; a count grouped by `properties.region`, whose values
//!   come plain, escaped, as numbers and booleans, missing and too long, issue 17); and so do the
//!   `adv.tokens` charges of a default per-unit price book;
//! - no HTTP answer is a 5xx but a 503 with Retry-After; a refused body or batch item is a 4xx
//!   problem+json, and the good items of a batch get 201 whatever their neighbours.
//!
//! Knobs: `MF_ADVERSARY_SEED` (default 13) picks the records; `MF_ADVERSARY_SECONDS` (default 80)
//! scales the run (one round per second asked; a round takes about one second on an idle machine,
//! and the pipeline is killed and restarted after a third and after two thirds of the rounds);
//! `MF_ADVERSARY_CLASSES=a,b` runs only these hostile classes (known failing or not),
//! `MF_ADVERSARY_CLASSES=all` every class, `MF_ADVERSARY_CLASSES=none` only good traffic. By default
//! the classes in [`KNOWN_FAILING_CLASSES`] are left out, so main stays green while they are fixed.
//! The same seed and seconds always send the same records.
//!
//! The overflow class sends its huge values to a customer of its own, priced so that its rating
//! overflows; that customer's rows are not compared (the quarantine is the pipeline's design), and
//! everything else must stay exact.
//!
//! Length: one seeded generator of hostile and good records and the invariants checked over its whole
//! run; each record kind sits beside the invariant it threatens.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::str::FromStr;
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection, Row};

/// Classes that still break the system. The test leaves them out until they are fixed; empty this list
/// as the fixes land (`MF_ADVERSARY_CLASSES=<class>` runs one of them on its own).
const KNOWN_FAILING_CLASSES: &[&str] = &[];

/// Every hostile class, with what it sends.
const CLASSES: &[(&str, &str)] = &[
    (
        "huge_values",
        "ten values of 10^20 and ten of 9999999999999999999999999999 in one window, priced at \
         10^13 (own customer)",
    ),
    (
        "nul_in_field_name",
        "NUL in an unknown top-level field name (plain and CloudEvents)",
    ),
    (
        "nul_in_property_key",
        "NUL in a property key / CloudEvents data key",
    ),
    (
        "nul_in_property_value",
        "NUL in a property value / CloudEvents data value",
    ),
    (
        "surrogate_in_property_key",
        "lone surrogates (\\ud800, \\udc00) in property keys",
    ),
    (
        "surrogate_in_property_value",
        "lone and reversed surrogates in property values",
    ),
    (
        "nul_in_string_fields",
        "NUL in event_id, customer_id, event_type, event_time, a string value",
    ),
    (
        "surrogate_in_string_fields",
        "a lone surrogate in the same positions",
    ),
    ("nul_in_cloudevent", "NUL in every CloudEvents attribute"),
    (
        "surrogate_in_cloudevent",
        "a lone surrogate in every CloudEvents attribute",
    ),
    (
        "escaped_digits_value",
        "\"100\\u0030\" and other escaped digits as the value",
    ),
    (
        "escaped_digits_property",
        "\"100\\u0030\" as the property a sum meter reads",
    ),
    (
        "escaped_string_fields",
        "escapes in ids, type, time and field names (valid once unescaped)",
    ),
    (
        "number_spellings_value",
        "1e2, 100.0, -0, 1E+2, \"1e2\" … and 1e29, 1e400, -1e2, 01 as the value",
    ),
    (
        "number_spellings_property",
        "the same spellings in the property a sum meter reads",
    ),
    (
        "non_bmp",
        "non-BMP characters, raw and as escaped surrogate pairs, in property keys and values",
    ),
    ("random_bytes", "random bytes, and an empty record"),
    (
        "invalid_utf8",
        "invalid UTF-8 in ids, property keys and values",
    ),
    (
        "truncated_utf8",
        "a multi-byte character cut short, inside a string and at the end of a record",
    ),
    (
        "one_mib_records",
        "records of about 1 MiB (a huge property, a huge unknown field)",
    ),
    (
        "deep_nesting",
        "10,000 nested arrays or objects: the whole record, a property, an unknown field",
    ),
    (
        "array_shapes",
        "arrays where objects belong: the event, properties, value, CloudEvents data",
    ),
    (
        "duplicate_keys",
        "duplicate keys, also spelled with escapes: top level, properties, CloudEvents",
    ),
    (
        "void_bad_ids",
        "void records with unknown, NUL, surrogate, huge, array-shaped or malformed ids",
    ),
    (
        "void_bad_paths",
        "POST /events/{id}/void with NUL, invalid UTF-8, huge or unknown ids",
    ),
    (
        "odd_headers",
        "Kafka headers that lie: a CloudEvents content-type on plain JSON, non-UTF-8 values, \
         meterflow-kind spelled otherwise or on an event, a void without its header",
    ),
    (
        "record_timestamps",
        "Kafka record timestamps as far ahead as the broker takes, or at the epoch",
    ),
    (
        "void_races",
        "a void read before its event, a second void of a voided event, a copy of a voided event",
    ),
    (
        "cross_path_duplicates",
        "the same event produced to Kafka and posted over HTTP at once",
    ),
    (
        "duplicates",
        "identical and conflicting copies of counted events over Kafka, re-posts over HTTP",
    ),
    (
        "hostile_batch_bodies",
        "whole batch bodies that are not a batch: [], {}, truncated, > 1 MiB, 1001 items …",
    ),
];

const OVERFLOW_CUSTOMER: &str = "cust_overflow";
/// 2024-01-15T12:00:00Z: good events fall in the six hours after it.
const BASE_TIME: i64 = 1_705_320_000;
const CATCH_UP: Duration = Duration::from_secs(60);
/// The explicit meters over `adv.prop` (the other types are metered by their default meter).
const SUM_METER: &str = "adv_prop_n";
/// The default price of `adv.tokens`, per unit.
const TOKEN_PRICE: &str = "0.01";
const COUNT_METER: &str = "adv_prop_events";
/// A count of `adv.prop` events per hour grouped by `properties.region` (issue 17): the values come
/// spelled plainly, escaped, as numbers and booleans, missing (null), and longer than a dimension
/// value may be (the meter skips the event).
const REGION_METER: &str = "adv_prop_by_region";

// ---------------------------------------------------------------------------------------------------
// Good events, as the test knows them.

/// A good event: what it must count as, and how each field is spelled on the wire.
#[derive(Clone, Debug)]
struct Good {
    id: String,
    customer: String,
    event_type: &'static str,
    /// Seconds since the epoch.
    time: i64,
    value: Decimal,
    /// `properties.n` as the sum meter must read it (`None`: the meter skips the event).
    n: Option<Decimal>,
    /// Wire spellings: string contents for the ids, type and time; JSON text for value and n.
    id_text: String,
    customer_text: String,
    type_text: String,
    time_text: String,
    value_json: Option<String>,
    n_json: Option<String>,
    /// More properties, as (key JSON, value JSON).
    extra: Vec<(String, String)>,
}

impl Good {
    fn props(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if let Some(n) = &self.n_json {
            p.push((q("n"), n.clone()));
        }
        p.extend(self.extra.iter().cloned());
        p
    }

    fn plain_fields(&self) -> Vec<(String, String)> {
        let mut f = vec![
            (q("event_id"), q(&self.id_text)),
            (q("customer_id"), q(&self.customer_text)),
            (q("event_type"), q(&self.type_text)),
            (q("event_time"), q(&self.time_text)),
        ];
        if let Some(v) = &self.value_json {
            f.push((q("value"), v.clone()));
        }
        let props = self.props();
        if !props.is_empty() {
            f.push((q("properties"), obj(&props)));
        }
        f
    }

    fn plain(&self) -> Vec<u8> {
        obj(&self.plain_fields()).into_bytes()
    }

    fn data_fields(&self) -> Vec<(String, String)> {
        let mut data = Vec::new();
        if let Some(v) = &self.value_json {
            data.push((q("value"), v.clone()));
        }
        data.extend(self.props());
        data
    }

    fn cloud_fields(&self) -> Vec<(String, String)> {
        vec![
            (q("specversion"), q("1.0")),
            (q("id"), q(&self.id_text)),
            (q("source"), q("/adversary")),
            (q("type"), q(&self.type_text)),
            (q("subject"), q(&self.customer_text)),
            (q("time"), q(&self.time_text)),
            (q("datacontenttype"), q("application/json")),
            (q("data"), obj(&self.data_fields())),
        ]
    }

    fn cloud(&self) -> Vec<u8> {
        obj(&self.cloud_fields()).into_bytes()
    }

    fn encode(&self, fmt: Fmt) -> Vec<u8> {
        match fmt {
            Fmt::Cloud => self.cloud(),
            _ => self.plain(),
        }
    }

    /// The `region` dimension value the region meter must see, read here from the wire spelling with
    /// serde_json and rust_decimal (not the model's code): `Some(None)` null (missing), `None` longer
    /// than a dimension value may be (the meter skips the event).
    fn region(&self) -> Option<Option<String>> {
        let Some((_, value)) = self
            .extra
            .iter()
            .find(|(key, _)| serde_json::from_str::<String>(key).ok().as_deref() == Some("region"))
        else {
            return Some(None);
        };
        let text = match serde_json::from_str::<serde_json::Value>(value).unwrap() {
            serde_json::Value::String(s) => s,
            serde_json::Value::Bool(b) => b.to_string(),
            _ => dec(value).normalize().to_string(),
        };
        (text.len() <= 256).then_some(Some(text))
    }

    /// What the event adds to each aggregate row: ((customer, meter, window start), value), count 1.
    /// Default meters (SPEC §4): `sum` of `value`, hourly, named after the type. `adv.prop` has the
    /// two meters the test creates instead: a sum of `properties.n` (hourly) and a count (per minute).
    fn contributions(&self) -> Vec<((String, String, i64), Decimal)> {
        let hour = self.time - self.time.rem_euclid(3600);
        if self.event_type == "adv.prop" {
            let minute = self.time - self.time.rem_euclid(60);
            let mut out = vec![(
                (self.customer.clone(), COUNT_METER.to_owned(), minute),
                Decimal::ONE,
            )];
            if let Some(n) = self.n {
                out.push(((self.customer.clone(), SUM_METER.to_owned(), hour), n));
            }
            if let Some(region) = self.region() {
                // As `stored_aggregates` names a row with dimension values (jsonb's spelling).
                let value = serde_json::to_string(&region).unwrap();
                let meter = format!("{REGION_METER} {{\"region\": {value}}}");
                out.push(((self.customer.clone(), meter, hour), Decimal::ONE));
            }
            out
        } else {
            vec![(
                (self.customer.clone(), self.event_type.to_owned(), hour),
                self.value,
            )]
        }
    }
}

/// A JSON string of raw contents (the caller writes any escapes).
fn q(s: &str) -> String {
    format!("\"{s}\"")
}

/// A JSON object of raw (key, value) texts, in order, duplicates kept.
fn obj(fields: &[(String, String)]) -> String {
    let body: Vec<String> = fields.iter().map(|(k, v)| format!("{k}:{v}")).collect();
    format!("{{{}}}", body.join(","))
}

/// Replaces the value of the field whose key text is `key`, or appends it.
fn set(fields: &mut Vec<(String, String)>, key: &str, value: String) {
    match fields.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = value,
        None => fields.push((key.to_owned(), value)),
    }
}

/// Splices raw bytes in place of the marker `@@` (for invalid UTF-8).
fn splice(text: &str, raw: &[u8]) -> Vec<u8> {
    let at = text.find("@@").expect("a marker");
    let mut out = text.as_bytes()[..at].to_vec();
    out.extend_from_slice(raw);
    out.extend_from_slice(&text.as_bytes()[at + 2..]);
    out
}

fn time_text(secs: i64, style: u32) -> String {
    let utc = chrono::DateTime::from_timestamp(secs, 0).unwrap();
    match style % 3 {
        0 => utc.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        1 => utc
            .with_timezone(&chrono::FixedOffset::east_opt(2 * 3600).unwrap())
            .to_rfc3339(),
        _ => utc.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
    }
}

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

// ---------------------------------------------------------------------------------------------------
// Records and requests, and what each must come to.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fmt {
    Plain,
    Cloud,
    /// A Kafka void record (`meterflow-kind: void`).
    Void,
}

#[derive(Clone, Debug)]
enum Expect {
    /// Counted as this event.
    Count(Good),
    /// Refused: a dead letter with a reason over Kafka, a 4xx problem+json over HTTP.
    Refuse,
    /// Counted as this event or refused: the contract leaves the choice open (say an unused
    /// CloudEvents attribute holding a NUL, or a JSON array in the event's field order).
    CountOrRefuse(Good),
    /// A Kafka void that retracts this counted event.
    Void(String),
    /// A Kafka void that retracts nothing: ignored, a tombstone for an id that never counts (its
    /// position in `event_ids.voided_*`), or a dead letter.
    VoidNothing,
    /// An exact copy of a counted event: a duplicate that leaves no row.
    Identical,
    /// Another payload under a counted id: a conflicting duplicate, kept in `duplicate_events`.
    Conflicting(String),
    /// The same event sent over Kafka and over HTTP at once: over Kafka counted or an identical
    /// duplicate; over HTTP 201 or 409 (whichever came second). It counts exactly once.
    EitherPath(Good),
}

#[derive(Clone, Debug)]
struct Item {
    class: &'static str,
    fmt: Fmt,
    key: String,
    bytes: Vec<u8>,
    expect: Expect,
    /// One JSON value that can stand as an item of a batch array.
    batchable: bool,
    /// A CloudEvent over Kafka with its `content-type` header (else found by its `specversion`).
    ce_header: bool,
    /// Kafka only, with these headers (instead of those of its format) and record timestamp.
    raw_kafka: Option<RawKafka>,
}

#[derive(Clone, Debug)]
struct RawKafka {
    headers: Vec<(&'static str, Option<Vec<u8>>)>,
    timestamp_ms: Option<i64>,
}

/// `it` as a Kafka record with exactly these headers and this timestamp.
fn raw_kafka(
    mut it: Item,
    headers: &[(&'static str, Option<&[u8]>)],
    timestamp_ms: Option<i64>,
) -> Item {
    it.raw_kafka = Some(RawKafka {
        headers: headers
            .iter()
            .map(|(k, v)| (*k, v.map(<[u8]>::to_vec)))
            .collect(),
        timestamp_ms,
    });
    it.batchable = false;
    it
}

fn item(
    class: &'static str,
    fmt: Fmt,
    key: &str,
    bytes: impl Into<Vec<u8>>,
    expect: Expect,
) -> Item {
    Item {
        class,
        fmt,
        key: key.to_owned(),
        bytes: bytes.into(),
        expect,
        batchable: true,
        ce_header: true,
        raw_kafka: None,
    }
}

fn refuse(class: &'static str, fmt: Fmt, key: &str, bytes: impl Into<Vec<u8>>) -> Item {
    item(class, fmt, key, bytes, Expect::Refuse)
}

/// A record that no batch can hold as one item (not JSON, too deep, too big).
fn whole(mut item: Item) -> Item {
    item.batchable = false;
    item
}

fn count(class: &'static str, fmt: Fmt, good: Good) -> Item {
    let bytes = good.encode(fmt);
    item(
        class,
        fmt,
        &good.customer.clone(),
        bytes,
        Expect::Count(good),
    )
}

fn maybe(class: &'static str, fmt: Fmt, good: Good, bytes: impl Into<Vec<u8>>) -> Item {
    item(
        class,
        fmt,
        &good.customer.clone(),
        bytes,
        Expect::CountOrRefuse(good),
    )
}

struct Gen {
    rng: SmallRng,
    seed: u64,
    serial: u64,
}

impl Gen {
    fn id(&mut self) -> String {
        self.serial += 1;
        format!("adv-{}-{}", self.seed, self.serial)
    }

    fn customer(&mut self) -> String {
        format!("cust_{}", self.rng.random_range(0..8))
    }

    fn good(&mut self) -> Good {
        let t = ["adv.call", "adv.tokens", "adv.prop"][self.rng.random_range(0..3)];
        self.good_of(t)
    }

    fn good_of(&mut self, event_type: &'static str) -> Good {
        let id = self.id();
        let customer = self.customer();
        let time = BASE_TIME + self.rng.random_range(0..6 * 3600);
        let digits = Decimal::new(
            self.rng.random_range(0..1_000_000),
            self.rng.random_range(0..5u32),
        );
        let (value, value_json) = match self.rng.random_range(0..4) {
            0 => (digits, Some(digits.to_string())),
            1 => (digits, Some(q(&digits.to_string()))),
            2 => (Decimal::ONE, None),
            _ => (digits, Some(digits.to_string())),
        };
        let (n, n_json) = if event_type == "adv.prop" {
            let n = Decimal::new(
                self.rng.random_range(0..100_000),
                self.rng.random_range(0..3u32),
            );
            let spelled = if self.rng.random_bool(0.5) {
                n.to_string()
            } else {
                q(&n.to_string())
            };
            (Some(n), Some(spelled))
        } else {
            (None, None)
        };
        // `region`, spelled plainly, escaped, as a number or a boolean, too long for a dimension value,
        // or absent (the value null for the region meter).
        let region: Option<String> = match self.rng.random_range(0..10) {
            0..=4 => None,
            5 | 6 => Some(q(["eu", "us", "ap"][self.rng.random_range(0..3)])),
            7 => Some(q("e\\u0075")),
            8 => Some(["1.50", "true"][self.rng.random_range(0..2)].to_owned()),
            _ => Some(q(&"x".repeat(300))),
        };
        let extra: Vec<(String, String)> = region
            .into_iter()
            .map(|spelled| (q("region"), spelled))
            .collect();
        let style = self.rng.random_range(0..3);
        Good {
            id_text: id.clone(),
            customer_text: customer.clone(),
            type_text: event_type.to_owned(),
            time_text: time_text(time, style),
            id,
            customer,
            event_type,
            time,
            value,
            n,
            value_json,
            n_json,
            extra,
        }
    }

    /// An `adv.prop` event whose `n` is spelled `n_json` and must read as `n`.
    fn prop(&mut self, n_json: &str, n: Option<Decimal>) -> Good {
        let mut e = self.good_of("adv.prop");
        e.n_json = Some(n_json.to_owned());
        e.n = n;
        e
    }

    fn fmt(&mut self) -> Fmt {
        if self.rng.random_bool(0.3) {
            Fmt::Cloud
        } else {
            Fmt::Plain
        }
    }

    fn random_bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.rng.random::<u8>()).collect()
    }
}

/// The records of one hostile class (Kafka and HTTP take fresh ones each).
fn hostile(class: &'static str, g: &mut Gen) -> Vec<Item> {
    let mut out = Vec::new();
    match class {
        "huge_values" => {
            let minute = g.rng.random_range(0..60);
            // Ten at the largest value one event may carry (10^20), ten far beyond it.
            for i in 0..20 {
                let mut e = g.good_of("adv.call");
                e.customer = OVERFLOW_CUSTOMER.to_owned();
                e.customer_text = e.customer.clone();
                e.time = BASE_TIME + 3600 + minute * 60 + i;
                e.time_text = time_text(e.time, 0);
                let huge = if i < 10 {
                    "100000000000000000000"
                } else {
                    "9999999999999999999999999999"
                };
                e.value = dec(huge);
                e.value_json = Some(huge.into());
                let bytes = e.plain();
                out.push(maybe(class, Fmt::Plain, e, bytes));
            }
        }
        "nul_in_field_name" => {
            for key in [r#""x\u0000y""#, r#""\u0000""#, r#""event_id\u0000""#] {
                let e = g.good();
                let mut f = e.plain_fields();
                f.push((key.into(), "1".into()));
                out.push(refuse(class, Fmt::Plain, &e.customer, obj(&f)));
            }
            let e = g.good();
            let mut f = e.cloud_fields();
            f.push((r#""ext\u0000""#.into(), q("x")));
            out.push(refuse(class, Fmt::Cloud, &e.customer, obj(&f)));
        }
        "nul_in_property_key" | "surrogate_in_property_key" => {
            let keys: &[&str] = if class.starts_with("nul") {
                &[r#""re\u0000gion""#, r#""\u0000""#]
            } else {
                &[r#""\ud800""#, r#""k\udc00""#, r#""\udbff\udbff""#]
            };
            for key in keys {
                let mut e = g.good();
                e.extra = vec![(key.to_string(), q("eu"))];
                let fmt = g.fmt();
                out.push(refuse(class, fmt, &e.customer, e.encode(fmt)));
            }
        }
        "nul_in_property_value" | "surrogate_in_property_value" => {
            let values: &[&str] = if class.starts_with("nul") {
                &[r#""e\u0000u""#, r#""\u0000""#]
            } else {
                &[r#""\ud800""#, r#""x\udbff""#, r#""\ude00\ud83d""#]
            };
            for value in values {
                let mut e = g.good();
                e.extra = vec![(q("region"), value.to_string())];
                let fmt = g.fmt();
                out.push(refuse(class, fmt, &e.customer, e.encode(fmt)));
            }
            // In the property a meter reads.
            let bad = if class.starts_with("nul") {
                r#""1\u0000""#
            } else {
                r#""1\ud800""#
            };
            let e = g.prop(bad, None);
            let fmt = g.fmt();
            out.push(refuse(class, fmt, &e.customer, e.encode(fmt)));
        }
        "nul_in_string_fields" | "surrogate_in_string_fields" => {
            let bad = if class.starts_with("nul") {
                r"\u0000"
            } else {
                r"\ud800"
            };
            for position in 0..5 {
                let mut e = g.good();
                match position {
                    0 => e.id_text.push_str(bad),
                    1 => e.customer_text.push_str(bad),
                    2 => e.type_text.push_str(bad),
                    3 => e.time_text.push_str(bad),
                    _ => e.value_json = Some(q(&format!("1{bad}"))),
                }
                out.push(refuse(class, Fmt::Plain, &e.customer, e.plain()));
            }
        }
        "nul_in_cloudevent" | "surrogate_in_cloudevent" => {
            let bad = if class.starts_with("nul") {
                r"\u0000"
            } else {
                r"\ud800"
            };
            // Attributes that become the event: refused.
            for attr in ["id", "type", "subject", "time", "specversion"] {
                let e = g.good();
                let mut f = e.cloud_fields();
                let slot = f.iter_mut().find(|(k, _)| *k == q(attr)).unwrap();
                slot.1 = format!("{}{bad}\"", &slot.1[..slot.1.len() - 1]);
                out.push(refuse(class, Fmt::Cloud, &e.customer, obj(&f)));
            }
            // Attributes meterflow does not keep: either way, but never a crash.
            for attr in ["source", "datacontenttype", "dataschema"] {
                let e = g.good();
                let mut f = e.cloud_fields();
                let text = if attr == "datacontenttype" {
                    q(&format!("application/json{bad}"))
                } else {
                    q(&format!("/adv{bad}"))
                };
                set(&mut f, &q(attr), text);
                let bytes = obj(&f);
                out.push(maybe(class, Fmt::Cloud, e, bytes));
            }
        }
        "escaped_digits_value" => {
            for (spelled, value) in [
                (r#""100\u0030""#, "1000"),
                (r#""\u0031.5""#, "1.5"),
                (r#""\u0032e1""#, "20"),
            ] {
                let t = ["adv.call", "adv.tokens"][g.rng.random_range(0..2)];
                let mut e = g.good_of(t);
                e.value_json = Some(spelled.into());
                e.value = dec(value);
                let fmt = g.fmt();
                out.push(count(class, fmt, e));
            }
        }
        "escaped_digits_property" => {
            for (spelled, n) in [(r#""100\u0030""#, "1000"), (r#""\u0037""#, "7")] {
                let e = g.prop(spelled, Some(dec(n)));
                let fmt = g.fmt();
                out.push(count(class, fmt, e));
            }
        }
        "escaped_string_fields" => {
            let mut e = g.good();
            e.id_text = e.id_text.replacen('-', r"\u002d", 1);
            e.customer_text = e.customer_text.replacen('_', r"\u005f", 1);
            e.type_text = e.type_text.replacen('.', r"\u002e", 1);
            e.time_text = e.time_text.replacen('T', r"\u0054", 1);
            e.extra = vec![(r#""\u0072egion""#.into(), q(r"e\u0075"))];
            let fmt = g.fmt();
            out.push(count(class, fmt, e));
            // Escaped field names.
            let e = g.good();
            let mut f = e.plain_fields();
            for (k, _) in f.iter_mut() {
                if *k == "\"event_id\"" {
                    *k = r#""\u0065vent_id""#.into();
                }
                if *k == "\"customer_id\"" {
                    *k = r#""customer\u005fid""#.into();
                }
            }
            let bytes = obj(&f);
            let key = e.customer.clone();
            out.push(item(class, Fmt::Plain, &key, bytes, Expect::Count(e)));
            let e = g.good();
            let mut f = e.cloud_fields();
            for (k, _) in f.iter_mut() {
                if *k == "\"subject\"" {
                    *k = r#""\u0073ubject""#.into();
                }
            }
            let bytes = obj(&f);
            let key = e.customer.clone();
            out.push(item(class, Fmt::Cloud, &key, bytes, Expect::Count(e)));
        }
        "number_spellings_value" => {
            for (spelled, value) in [
                ("1e2", "100"),
                ("100.0", "100"),
                ("-0", "0"),
                ("1E+2", "100"),
                (r#""1e2""#, "100"),
                ("0.5e1", "5"),
                ("1e-2", "0.01"),
                ("100.000", "100"),
                ("-0.0", "0"),
            ] {
                let mut e = g.good_of("adv.call");
                e.value_json = Some(spelled.into());
                e.value = dec(value);
                let fmt = g.fmt();
                out.push(count(class, fmt, e));
            }
            for spelled in [
                "1e29",
                r#""1e29""#,
                "1e400",
                "-1e2",
                r#""NaN""#,
                r#""Infinity""#,
                r#""-1""#,
                "true",
                r#""""#,
            ] {
                let mut e = g.good_of("adv.call");
                e.value_json = Some(spelled.into());
                out.push(refuse(class, Fmt::Plain, &e.customer, e.plain()));
            }
            // Not JSON at all: refused, and no batch can hold them.
            for spelled in ["01", "+1", ".5", "0x10", "NaN", "1e", "1.", "--1"] {
                let mut e = g.good_of("adv.call");
                e.value_json = Some(spelled.into());
                out.push(whole(refuse(class, Fmt::Plain, &e.customer, e.plain())));
            }
            // `null` is an absent value (1), and a string with blanks around its digits is those
            // digits; or either is refused.
            for spelled in ["null", r#"" 1""#, r#""1 ""#] {
                let mut e = g.good_of("adv.call");
                e.value_json = Some(spelled.into());
                e.value = Decimal::ONE;
                let bytes = e.plain();
                out.push(maybe(class, Fmt::Plain, e, bytes));
            }
        }
        "number_spellings_property" => {
            for (spelled, n) in [
                ("1e2", "100"),
                ("100.0", "100"),
                ("-0", "0"),
                (r#""1e2""#, "100"),
                ("1E+2", "100"),
                (r#""100.0""#, "100"),
            ] {
                let e = g.prop(spelled, Some(dec(n)));
                let fmt = g.fmt();
                out.push(count(class, fmt, e));
            }
            // Not a number the meter can read: the event counts, the sum meter skips it.
            for spelled in ["true", r#""abc""#] {
                let e = g.prop(spelled, None);
                let fmt = g.fmt();
                out.push(count(class, fmt, e));
            }
            // Out of range or negative: skipped by the meter, or refused outright.
            for spelled in ["1e29", "-5", "1e400"] {
                let e = g.prop(spelled, None);
                let fmt = g.fmt();
                let bytes = e.encode(fmt);
                out.push(maybe(class, fmt, e, bytes));
            }
        }
        "non_bmp" => {
            for (key, value) in [
                (q("region"), q("🇪🇺")),
                (q("emoji"), r#""\ud83d\ude00""#.to_owned()),
                (q("ключ"), q("𝄞 clef")),
                (r#""\ud83d\ude00""#.to_owned(), q("x")),
            ] {
                let mut e = g.good();
                e.extra = vec![(key, value)];
                let fmt = g.fmt();
                out.push(count(class, fmt, e));
            }
        }
        "random_bytes" => {
            let key = g.customer();
            for _ in 0..3 {
                let len = g.rng.random_range(1..300);
                let bytes = g.random_bytes(len);
                out.push(whole(refuse(class, Fmt::Plain, &key, bytes)));
            }
            out.push(whole(refuse(class, Fmt::Plain, &key, Vec::new())));
        }
        "invalid_utf8" => {
            let e = g.good();
            let mut f = e.plain_fields();
            set(&mut f, "\"customer_id\"", q("cust_@@"));
            out.push(whole(refuse(
                class,
                Fmt::Plain,
                &e.customer,
                splice(&obj(&f), b"\xff\xfe"),
            )));
            let mut e = g.good();
            e.extra = vec![(q("region"), q("e@@u"))];
            let fmt = g.fmt();
            out.push(whole(refuse(
                class,
                fmt,
                &e.customer,
                splice(&String::from_utf8(e.encode(fmt)).unwrap(), b"\xc3\x28"),
            )));
            let mut e = g.good();
            e.extra = vec![(q("@@"), q("x"))];
            out.push(whole(refuse(
                class,
                Fmt::Plain,
                &e.customer,
                splice(&String::from_utf8(e.plain()).unwrap(), b"\x80"),
            )));
            let mut e = g.good();
            e.id_text.push_str("@@");
            out.push(whole(refuse(
                class,
                Fmt::Plain,
                &e.customer,
                splice(&String::from_utf8(e.plain()).unwrap(), b"\xed\xa0\x80"),
            )));
        }
        "truncated_utf8" => {
            let mut e = g.good();
            e.extra = vec![(q("region"), q("ab@@"))];
            out.push(whole(refuse(
                class,
                Fmt::Plain,
                &e.customer,
                splice(&String::from_utf8(e.plain()).unwrap(), b"\xe2\x82"),
            )));
            let mut e = g.good();
            e.extra = vec![(q("region"), q("€€€"))];
            let bytes = e.plain();
            let cut = bytes.windows(3).position(|w| w == "€".as_bytes()).unwrap() + 1;
            out.push(whole(refuse(
                class,
                Fmt::Plain,
                &e.customer,
                bytes[..cut].to_vec(),
            )));
            let mut bytes = g.good().plain();
            bytes.extend_from_slice(b"\xf0\x9f");
            out.push(whole(refuse(class, Fmt::Plain, &g.customer(), bytes)));
        }
        "one_mib_records" => {
            let big = 1024 * 1024 - 2048;
            let mut e = g.good();
            e.extra = vec![(q("k"), q(&"x".repeat(big)))];
            out.push(whole(refuse(class, Fmt::Plain, &e.customer, e.plain())));
            let e = g.good();
            let mut f = e.plain_fields();
            f.push((q("pad"), q(&"y".repeat(big))));
            out.push(whole(refuse(class, Fmt::Plain, &e.customer, obj(&f))));
        }
        "deep_nesting" => {
            let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
            let deep_object = format!("{}1{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000));
            let key = g.customer();
            out.push(whole(refuse(class, Fmt::Plain, &key, deep.clone())));
            let mut e = g.good();
            e.extra = vec![(q("a"), deep.clone())];
            out.push(whole(refuse(class, Fmt::Plain, &e.customer, e.plain())));
            let e = g.good();
            let mut f = e.plain_fields();
            f.push((q("x"), deep_object));
            out.push(whole(refuse(class, Fmt::Plain, &e.customer, obj(&f))));
            let e = g.good();
            let mut f = e.cloud_fields();
            set(&mut f, "\"data\"", deep);
            out.push(whole(refuse(class, Fmt::Cloud, &e.customer, obj(&f))));
        }
        "array_shapes" => {
            // The event as an array in field order: serde reads a struct from a sequence. Either it
            // is that event, or it is refused; the bound-key check must see its customer either way.
            let mut e = g.good_of("adv.call");
            let v = e.value.to_string();
            e.value_json = Some(q(&v));
            e.extra.clear();
            let array = format!(
                r#"["{}","{}","{}","{}","{}"]"#,
                e.id, e.customer, e.event_type, e.time_text, v
            );
            out.push(maybe(class, Fmt::Plain, e, array));
            let mut e = g.good_of("adv.prop");
            e.value_json = Some(q(&e.value.to_string()));
            let array = format!(
                r#"["{}","{}","{}","{}",{},{}]"#,
                e.id,
                e.customer,
                e.event_type,
                e.time_text,
                e.value_json.clone().unwrap(),
                obj(&e.props())
            );
            out.push(maybe(class, Fmt::Plain, e, array));
            // A CloudEvent as an array, in attribute order.
            let mut e = g.good_of("adv.tokens");
            e.extra.clear();
            let array = format!(
                r#"["1.0","{}","/adv","{}","{}","{}","application/json",null,{}]"#,
                e.id,
                e.event_type,
                e.customer,
                e.time_text,
                obj(&e.data_fields())
            );
            out.push(maybe(class, Fmt::Cloud, e, array));
            for (field, raw) in [
                ("properties", r#"["a",1]"#),
                ("properties", "[]"),
                ("value", "[1]"),
                ("value", r#"{"v":1}"#),
            ] {
                let e = g.good();
                let mut f = e.plain_fields();
                set(&mut f, &q(field), raw.into());
                out.push(refuse(class, Fmt::Plain, &e.customer, obj(&f)));
            }
            let e = g.good();
            let mut f = e.cloud_fields();
            set(&mut f, "\"data\"", r#"[{"value":1}]"#.into());
            out.push(refuse(class, Fmt::Cloud, &e.customer, obj(&f)));
            let key = g.customer();
            for raw in ["[]", r#""an event""#, "null", "42"] {
                out.push(refuse(class, Fmt::Plain, &key, raw));
            }
        }
        "duplicate_keys" => {
            let e = g.good();
            let mut f = e.plain_fields();
            f.push((q("event_id"), q(&g.id())));
            out.push(refuse(class, Fmt::Plain, &e.customer, obj(&f)));
            let e = g.good();
            let mut f = e.plain_fields();
            f.push((r#""event\u005fid""#.into(), q(&g.id())));
            out.push(refuse(class, Fmt::Plain, &e.customer, obj(&f)));
            let mut e = g.good();
            e.extra = vec![(q("region"), q("eu")), (q("region"), q("us"))];
            let fmt = g.fmt();
            out.push(refuse(class, fmt, &e.customer, e.encode(fmt)));
            let mut e = g.good();
            e.extra = vec![(q("region"), q("eu")), (r#""\u0072egion""#.into(), q("eu"))];
            let fmt = g.fmt();
            out.push(refuse(class, fmt, &e.customer, e.encode(fmt)));
            let mut e = g.good();
            e.value_json = Some("1".into());
            let mut f = e.plain_fields();
            f.push((q("value"), "1".into()));
            out.push(refuse(class, Fmt::Plain, &e.customer, obj(&f)));
            let e = g.good();
            let mut f = e.cloud_fields();
            f.push((q("subject"), q("cust_victim")));
            out.push(refuse(class, Fmt::Cloud, &e.customer, obj(&f)));
            let mut e = g.good();
            e.value_json = Some("1".into());
            let mut f = e.cloud_fields();
            let mut data = e.data_fields();
            data.push((r#""v\u0061lue""#.into(), "2".into()));
            set(&mut f, "\"data\"", obj(&data));
            out.push(refuse(class, Fmt::Cloud, &e.customer, obj(&f)));
        }
        "odd_headers" => {
            let ce = Some(&b"application/cloudevents+json"[..]);
            let e = g.good();
            let bytes = e.plain();
            out.push(raw_kafka(
                maybe(class, Fmt::Plain, e, bytes),
                &[("content-type", ce)],
                None,
            ));
            let e = g.good();
            out.push(raw_kafka(
                count(class, Fmt::Plain, e),
                &[("content-type", Some(b"\xff\xfe"))],
                None,
            ));
            let e = g.good();
            out.push(raw_kafka(
                count(class, Fmt::Plain, e),
                &[("content-type", None), ("x-\u{0}", Some(b"\0"))],
                None,
            ));
            let e = g.good();
            let bytes = e.plain();
            out.push(raw_kafka(
                maybe(class, Fmt::Plain, e, bytes),
                &[("meterflow-kind", Some(b"VOID"))],
                None,
            ));
            let e = g.good();
            let bytes = e.plain();
            out.push(raw_kafka(
                maybe(class, Fmt::Plain, e, bytes),
                &[("meterflow-kind", Some(b"event"))],
                None,
            ));
            let e = g.good();
            out.push(raw_kafka(
                refuse(class, Fmt::Plain, &e.customer.clone(), e.plain()),
                &[("meterflow-kind", Some(b"void"))],
                None,
            ));
            let e = g.good();
            out.push(raw_kafka(
                refuse(class, Fmt::Cloud, &e.customer.clone(), e.cloud()),
                &[("meterflow-kind", Some(b"void")), ("content-type", ce)],
                None,
            ));
            // A void's payload without the void header is not an event.
            let c = g.customer();
            let void = format!(r#"{{"event_id":"{}","customer_id":"{c}"}}"#, g.id());
            out.push(raw_kafka(refuse(class, Fmt::Plain, &c, void), &[], None));
        }
        "record_timestamps" => {
            // As far ahead as the broker takes (`log.message.timestamp.after.max.ms`, one hour by
            // default, refuses more): a 2024 event is not "in the future" of it.
            let ahead = chrono::Utc::now().timestamp_millis() + 50 * 60 * 1000;
            let e = g.good();
            out.push(raw_kafka(count(class, Fmt::Plain, e), &[], Some(ahead)));
            // The epoch: a 2024 event lies in its future (SPEC §2 refuses it), or it counts.
            let e = g.good();
            let bytes = e.plain();
            out.push(raw_kafka(maybe(class, Fmt::Plain, e, bytes), &[], Some(1)));
        }
        "void_bad_ids" => {
            let c = g.customer();
            let void = |bytes: String, expect: Expect| Item {
                class,
                fmt: Fmt::Void,
                key: c.clone(),
                bytes: bytes.into_bytes(),
                expect,
                batchable: false,
                ce_header: false,
                raw_kafka: None,
            };
            let nope = format!("nope-{}", g.id());
            out.push(void(
                format!(r#"{{"event_id":"{nope}","customer_id":"{c}"}}"#),
                Expect::VoidNothing,
            ));
            out.push(void(
                format!(r#"{{"event_id":"a\u0000b","customer_id":"{c}"}}"#),
                Expect::VoidNothing,
            ));
            out.push(void(
                format!(r#"{{"event_id":"\ud800","customer_id":"{c}"}}"#),
                Expect::VoidNothing,
            ));
            out.push(void(
                format!(r#"{{"event_id":"{nope}","customer_id":"c\u0000"}}"#),
                Expect::VoidNothing,
            ));
            out.push(void(
                format!(
                    r#"{{"event_id":"{}","customer_id":"{c}"}}"#,
                    "x".repeat(10_000)
                ),
                Expect::VoidNothing,
            ));
            out.push(void(format!(r#"["{nope}","{c}"]"#), Expect::VoidNothing));
            out.push(void(
                r#"{"event_id":"","customer_id":""}"#.into(),
                Expect::VoidNothing,
            ));
            out.push(void(
                format!(r#"{{"event_id":"{nope}","customer_id":"{c}","extra":1}}"#),
                Expect::Refuse,
            ));
            out.push(void(format!(r#"{{"event_id":"{nope}"}}"#), Expect::Refuse));
            out.push(void(
                r#"{"event_id":5,"customer_id":"c"}"#.into(),
                Expect::Refuse,
            ));
            out.push(void("not a void".into(), Expect::Refuse));
            out.push(void(String::new(), Expect::Refuse));
            let mut bad = void(String::new(), Expect::Refuse);
            bad.bytes = b"{\"event_id\":\"\xff\",\"customer_id\":\"c\"}".to_vec();
            out.push(bad);
        }
        _ => {}
    }
    out
}

// ---------------------------------------------------------------------------------------------------
// What the test expects and what it saw.

#[derive(Default)]
struct Ledger {
    /// Events that must be counted, by id: (class, event).
    must_count: BTreeMap<String, (&'static str, Good)>,
    voided: BTreeSet<String>,
    /// Counted events (of earlier rounds) that the API may void.
    voidable: Vec<String>,
    /// Every record the test produced, with its position.
    kafka: Vec<(Item, (i32, i64))>,
    /// Records the API produced: accepted events and voids.
    api_events: usize,
    api_voids: usize,
    /// Events sent both ways that the API answered 201.
    either_path_201: BTreeSet<String>,
    http_requests: usize,
    problems: Vec<String>,
}

impl Ledger {
    fn problem(&mut self, text: String) {
        if self.problems.len() < 400 {
            self.problems.push(text);
        }
    }

    fn report(&self) -> String {
        let mut by_class: BTreeMap<String, usize> = BTreeMap::new();
        let mut distinct: Vec<(&String, usize)> = Vec::new();
        for p in &self.problems {
            let class = p.split(':').next().unwrap_or_default().to_owned();
            *by_class.entry(class).or_default() += 1;
            match distinct.iter_mut().find(|(q, _)| *q == p) {
                Some(seen) => seen.1 += 1,
                None => distinct.push((p, 1)),
            }
        }
        let lines: Vec<String> = distinct
            .iter()
            .take(60)
            .map(|(p, n)| {
                if *n > 1 {
                    format!("{p} (×{n})")
                } else {
                    p.to_string()
                }
            })
            .collect();
        format!(
            "{} problems (by class: {by_class:?}):\n  {}",
            self.problems.len(),
            lines.join("\n  ")
        )
    }
}

/// The first `n` bytes of `s`, cut at a character boundary.
fn cut(s: &str, n: usize) -> &str {
    let mut end = n.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn preview(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(160)]).into_owned();
    format!("{text:?}{}", if bytes.len() > 160 { "…" } else { "" })
}

// ---------------------------------------------------------------------------------------------------
// Kafka.

fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.max.bytes", "2000000")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap()
}

/// Produces the records in order and returns where each landed.
async fn produce_items(
    producer: FutureProducer,
    topic: String,
    items: Vec<Item>,
) -> Vec<(Item, (i32, i64))> {
    let mut pending = Vec::with_capacity(items.len());
    for item in &items {
        let mut headers = OwnedHeaders::new();
        if let Some(raw) = &item.raw_kafka {
            for (key, value) in &raw.headers {
                headers = headers.insert(Header {
                    key,
                    value: value.as_deref(),
                });
            }
        }
        match item.fmt {
            _ if item.raw_kafka.is_some() => {}
            Fmt::Void => {
                headers = headers.insert(Header {
                    key: "meterflow-kind",
                    value: Some("void"),
                })
            }
            Fmt::Cloud if item.ce_header => {
                headers = headers.insert(Header {
                    key: "content-type",
                    value: Some("application/cloudevents+json"),
                })
            }
            _ => {}
        }
        let mut record = FutureRecord::to(&topic)
            .key(&item.key)
            .payload(&item.bytes)
            .headers(headers);
        if let Some(ms) = item.raw_kafka.as_ref().and_then(|r| r.timestamp_ms) {
            record = record.timestamp(ms);
        }
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((_, r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }
    let mut out = Vec::with_capacity(items.len());
    for (delivery, item) in pending.into_iter().zip(items) {
        match delivery.await {
            Ok(Ok(d)) => out.push((item, (d.partition, d.offset))),
            Ok(Err((e, _))) => panic!("producing a {} record failed: {e}", item.class),
            Err(_) => panic!("producing a {} record was cancelled", item.class),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------------
// HTTP.

struct Answer {
    status: u16,
    problem_json: bool,
    body: String,
}

/// Sends a request; a 503 with Retry-After is retried (as a client would), any other 5xx is a problem.
async fn send(
    api: &TestApi,
    ledger_problems: &mut Vec<String>,
    class: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> Answer {
    let mut dropped = 0;
    for _ in 0..30 {
        let response = match api
            .client
            .post(format!("{}{path}", api.base))
            .header("content-type", content_type)
            .body(body.to_vec())
            .send()
            .await
        {
            Ok(response) => response,
            // A connection closed without an answer: a pooled connection the server had just
            // closed (retried), or a handler that panicked (it happens again).
            Err(e) => {
                dropped += 1;
                if dropped < 3 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                ledger_problems.push(format!(
                    "{class}: POST {} got no answer three times ({e}) — sent {}",
                    cut(path, 80),
                    preview(body)
                ));
                return Answer {
                    status: 0,
                    problem_json: false,
                    body: String::new(),
                };
            }
        };
        let status = response.status().as_u16();
        let retry_after = response.headers().contains_key("retry-after");
        let problem_json = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/problem+json"));
        let body = response.text().await.unwrap_or_default();
        if status == 503 && retry_after {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        }
        if status >= 500 {
            ledger_problems.push(format!(
                "{class}: POST {} answered {status}{} {}",
                cut(path, 80),
                if status == 503 {
                    " without Retry-After"
                } else {
                    ""
                },
                cut(&body, 200)
            ));
        }
        return Answer {
            status,
            problem_json,
            body,
        };
    }
    ledger_problems.push(format!("{class}: POST {path} answered 503 thirty times"));
    Answer {
        status: 503,
        problem_json: true,
        body: String::new(),
    }
}

/// Judges one item's HTTP outcome and records what it means for the ledger.
fn judge(ledger: &mut Ledger, it: &Item, via: &str, status: u16, problem: bool, body: &str) {
    let body = cut(body, 200);
    let refused_well = (400..500).contains(&status) && problem;
    match &it.expect {
        Expect::EitherPath(e) => match status {
            201 => {
                ledger.api_events += 1;
                ledger.either_path_201.insert(e.id.clone());
            }
            409 if problem => {}
            _ if status < 500 => ledger.problem(format!(
                "{}: {via}: an event also sent over Kafka ({}) got {status}, neither 201 nor a 409 problem: {body}",
                it.class, e.id
            )),
            _ => {}
        },
        Expect::Count(e) => {
            if status == 201 {
                ledger.api_events += 1;
                ledger
                    .must_count
                    .insert(e.id.clone(), (it.class, e.clone()));
            } else if status < 500 {
                ledger.problem(format!(
                    "{}: {via}: a good event ({}) got {status}, not 201: {body} — sent {}",
                    it.class,
                    e.id,
                    preview(&it.bytes)
                ));
            }
        }
        Expect::CountOrRefuse(e) => {
            if status == 201 {
                ledger.api_events += 1;
                ledger
                    .must_count
                    .insert(e.id.clone(), (it.class, e.clone()));
            } else if status < 500 && !refused_well {
                ledger.problem(format!(
                    "{}: {via}: got {status} (problem+json: {problem}), neither 201 nor a 4xx problem: {body}",
                    it.class
                ));
            }
        }
        _ => {
            if status == 201 {
                // It reached Kafka: the accounting must expect its record.
                ledger.api_events += 1;
                ledger.problem(format!(
                    "{}: {via}: a hostile body was accepted (201): {}",
                    it.class,
                    preview(&it.bytes)
                ));
            } else if status < 500 && !refused_well {
                ledger.problem(format!(
                    "{}: {via}: got {status} (problem+json: {problem}), not a 4xx problem: {body} — sent {}",
                    it.class,
                    preview(&it.bytes)
                ));
            }
        }
    }
}

fn content_type(fmt: Fmt) -> &'static str {
    match fmt {
        Fmt::Cloud => "application/cloudevents+json",
        _ => "application/json",
    }
}

async fn post_singles(api: &TestApi, ledger: &mut Ledger, items: Vec<Item>) {
    for chunk in items.chunks(12) {
        let sends = chunk.iter().map(|it| async move {
            let mut problems = Vec::new();
            let answer = send(
                api,
                &mut problems,
                it.class,
                "/api/v1/events",
                content_type(it.fmt),
                &it.bytes,
            )
            .await;
            (answer, problems)
        });
        for (it, (answer, problems)) in chunk.iter().zip(futures::future::join_all(sends).await) {
            ledger.http_requests += 1;
            for p in problems {
                ledger.problem(p);
            }
            judge(
                ledger,
                it,
                "POST /events",
                answer.status,
                answer.problem_json,
                &answer.body,
            );
        }
    }
}

/// Posts a batch and judges every item. A batch refused whole is probed class by class, to name the
/// hostile class that sinks its neighbours; its good items are then posted again on their own.
async fn post_batch(api: &TestApi, ledger: &mut Ledger, items: Vec<Item>, cloud: bool) {
    let Some((status, body)) = post_batch_once(api, ledger, &items, cloud).await else {
        return;
    };
    let mut culprits = Vec::new();
    let classes: BTreeSet<&'static str> = items.iter().map(|i| i.class).collect();
    for class in classes.iter().filter(|c| **c != "good") {
        let probe: Vec<Item> = items
            .iter()
            .filter(|i| i.class == *class)
            .cloned()
            .collect();
        if let Some((status, body)) = post_batch_once(api, ledger, &probe, cloud).await {
            culprits.push(*class);
            ledger.problem(format!(
                "{class}: a batch holding {} of its items is refused whole ({status}), so their good neighbours are too: {}",
                probe.len(),
                cut(&body, 300)
            ));
        }
    }
    if culprits.is_empty() {
        ledger.problem(format!(
            "batch: a batch of {} items (classes {classes:?}) was refused whole ({status}), and no class alone reproduces it: {}",
            items.len(),
            cut(&body, 300)
        ));
    }
    let good: Vec<Item> = items.into_iter().filter(|i| i.class == "good").collect();
    if let Some((status, body)) = post_batch_once(api, ledger, &good, cloud).await {
        ledger.problem(format!(
            "good: a batch of {} good events got {status}: {}",
            good.len(),
            cut(&body, 300)
        ));
    }
}

/// Posts one batch and judges its items; `Some((status, body))` when it was refused whole.
async fn post_batch_once(
    api: &TestApi,
    ledger: &mut Ledger,
    items: &[Item],
    cloud: bool,
) -> Option<(u16, String)> {
    if items.is_empty() {
        return None;
    }
    let mut body = b"[".to_vec();
    for (i, it) in items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&it.bytes);
    }
    body.push(b']');
    let (ct, via) = if cloud {
        (
            "application/cloudevents-batch+json",
            "POST /events/batch (CloudEvents)",
        )
    } else {
        ("application/json", "POST /events/batch")
    };
    let mut problems = Vec::new();
    let answer = send(
        api,
        &mut problems,
        "batch",
        "/api/v1/events/batch",
        ct,
        &body,
    )
    .await;
    ledger.http_requests += 1;
    for p in problems {
        ledger.problem(p);
    }
    if answer.status != 200 {
        return Some((answer.status, answer.body));
    }
    let parsed: Value = serde_json::from_str(&answer.body).unwrap_or(Value::Null);
    let results = parsed["results"].as_array().cloned().unwrap_or_default();
    if results.len() != items.len() {
        ledger.problem(format!(
            "batch: {via}: {} results for {} items",
            results.len(),
            items.len()
        ));
        return None;
    }
    let mut retry = Vec::new();
    for (it, result) in items.iter().zip(&results) {
        let status = result["status"].as_u64().unwrap_or(0) as u16;
        if status == 503 {
            retry.push(it.clone());
            continue;
        }
        if status >= 500 {
            ledger.problem(format!(
                "{}: {via}: an item got {status}: {result}",
                it.class
            ));
        }
        let error = &result["error"];
        let problem =
            error["code"].is_string() && error["status"].as_u64() == Some(u64::from(status));
        judge(ledger, it, via, status, problem, &result.to_string());
    }
    // An item that could not be stored now (503) is retried alone, as a client would.
    post_singles(api, ledger, retry).await;
    None
}

async fn healthy(api: &TestApi) -> bool {
    matches!(api.client.get(format!("{}/healthz", api.base)).send().await, Ok(r) if r.status().as_u16() == 200)
}

/// Waits until the pipeline has committed everything in the topic; `Err` with the last progress.
async fn caught_up(api: &TestApi, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(r) = api.get("/api/v1/progress").await.json::<Value>().await {
            if r["caught_up"] == true && !r["committed_epoch"].is_null() {
                return Ok(());
            }
            last = r.to_string();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last)
}

// ---------------------------------------------------------------------------------------------------
// The suite.

fn enabled_classes() -> Vec<&'static str> {
    let all: Vec<&'static str> = CLASSES.iter().map(|(c, _)| *c).collect();
    for known in KNOWN_FAILING_CLASSES {
        assert!(
            all.contains(known),
            "KNOWN_FAILING_CLASSES names an unknown class {known}"
        );
    }
    match std::env::var("MF_ADVERSARY_CLASSES") {
        Ok(s) if s.trim() == "all" => all,
        Ok(s) if s.trim() == "none" => Vec::new(),
        Ok(s) if !s.trim().is_empty() => s
            .split(',')
            .map(|c| {
                let c = c.trim();
                *all.iter()
                    .find(|k| **k == c)
                    .unwrap_or_else(|| panic!("no class {c}; classes: {all:?}"))
            })
            .collect(),
        _ => all
            .into_iter()
            .filter(|c| !KNOWN_FAILING_CLASSES.contains(c))
            .collect(),
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_records_among_good_ones_never_halt_skew_or_lose_the_ledger() {
    let seed = env_u64("MF_ADVERSARY_SEED", 13);
    let seconds = env_u64("MF_ADVERSARY_SECONDS", 80);
    let rounds = seconds.max(2);
    let restarts = [rounds / 3, 2 * rounds / 3];
    let classes = enabled_classes();
    let left_out: Vec<&str> = CLASSES
        .iter()
        .map(|(c, _)| *c)
        .filter(|c| !classes.contains(c))
        .collect();
    eprintln!(
        "adversary: seed {seed}, {rounds} rounds, classes {classes:?}, left out {left_out:?}"
    );
    let started = Instant::now();

    let api = spawn_api().await;
    for meter in [
        json!({"meter": SUM_METER, "event_type": "adv.prop", "aggregation": "sum", "value_property": "properties.n"}),
        json!({"meter": COUNT_METER, "event_type": "adv.prop", "aggregation": "count", "window": "minute"}),
        json!({"meter": REGION_METER, "event_type": "adv.prop", "aggregation": "count", "group_by": ["region"]}),
    ] {
        assert_eq!(
            api.post_json("/api/v1/meters", &meter)
                .await
                .status()
                .as_u16(),
            201
        );
    }
    let on = |c: &'static str| classes.contains(&c);
    // Prices: a default book for `adv.tokens`, whose charges the test checks for every customer, and
    // for the overflow class a price that takes its customer's usage past the decimal range, so the
    // rating of that customer's period overflows (it is quarantined; no one else is touched).
    let mut books = vec![json!({"meter": "adv.tokens", "customer_id": null,
        "effective_from": "2024-01-01T00:00:00Z", "effective_to": null,
        "model": {"type": "per_unit", "unit_price": TOKEN_PRICE}})];
    if on("huge_values") {
        books.push(
            json!({"meter": "adv.call", "customer_id": OVERFLOW_CUSTOMER,
            "effective_from": "2024-01-01T00:00:00Z", "effective_to": null,
            "model": {"type": "per_unit", "unit_price": "10000000000000"}}),
        );
    }
    for book in books {
        let response = api.post_json("/api/v1/price-books", &book).await;
        let status = response.status().as_u16();
        assert_eq!(status, 201, "{book} → {}", response.text().await.unwrap());
    }
    let mut pipeline = spawn_pipeline(&api.url, &api.topic, 2, &[]);
    let producer = producer();
    let mut g = Gen {
        rng: SmallRng::seed_from_u64(seed),
        seed,
        serial: 0,
    };
    let mut ledger = Ledger::default();

    for round in 0..rounds {
        // ---- Kafka: good records with every enabled class's hostile ones mixed in.
        let mut stream: Vec<Item> = (0..120)
            .map(|_| {
                let e = g.good();
                let fmt = g.fmt();
                count("good", fmt, e)
            })
            .collect();
        for &class in &classes {
            stream.extend(hostile(class, &mut g));
        }
        stream.shuffle(&mut g.rng);
        for it in stream.iter_mut() {
            it.ce_header = g.rng.random_bool(0.7);
        }
        // After them: voids of some of this round's good events, copies of others (same key, so
        // they follow their event in its partition).
        let mut targets: Vec<Good> = stream
            .iter()
            .filter_map(|it| match &it.expect {
                Expect::Count(e) if e.customer != OVERFLOW_CUSTOMER => Some(e.clone()),
                _ => None,
            })
            .collect();
        targets.shuffle(&mut g.rng);
        let mut tail = Vec::new();
        for e in targets.iter().take(6) {
            let payload = json!({"event_id": e.id, "customer_id": e.customer}).to_string();
            ledger.voided.insert(e.id.clone());
            tail.push(Item {
                class: "good",
                fmt: Fmt::Void,
                key: e.customer.clone(),
                bytes: payload.into_bytes(),
                expect: Expect::Void(e.id.clone()),
                batchable: false,
                ce_header: false,
                raw_kafka: None,
            });
        }
        let copied: BTreeSet<String> = targets
            .iter()
            .skip(6)
            .take(7)
            .map(|e| e.id.clone())
            .collect();
        if on("duplicates") {
            for (i, e) in targets.iter().skip(6).take(7).enumerate() {
                let original = stream
                    .iter()
                    .find(|it| matches!(&it.expect, Expect::Count(x) if x.id == e.id))
                    .unwrap();
                let mut copy = original.clone();
                copy.class = "duplicates";
                if i < 4 {
                    copy.expect = Expect::Identical;
                } else {
                    let mut other = e.clone();
                    other.value += Decimal::ONE;
                    other.value_json = Some(other.value.to_string());
                    copy.bytes = other.encode(copy.fmt);
                    copy.expect = Expect::Conflicting(e.id.clone());
                }
                tail.push(copy);
            }
        }
        tail.shuffle(&mut g.rng);
        stream.extend(tail);
        let mut either_path = Vec::new();
        if on("cross_path_duplicates") {
            for _ in 0..5 {
                let e = g.good();
                ledger
                    .must_count
                    .insert(e.id.clone(), ("cross_path_duplicates", e.clone()));
                let mut it = count("cross_path_duplicates", Fmt::Plain, e.clone());
                it.expect = Expect::EitherPath(e);
                either_path.push(it);
            }
        }
        if on("void_races") {
            let void_of = |e: &Good, expect: Expect| Item {
                class: "void_races",
                fmt: Fmt::Void,
                key: e.customer.clone(),
                bytes: json!({"event_id": e.id, "customer_id": e.customer})
                    .to_string()
                    .into_bytes(),
                expect,
                batchable: false,
                ce_header: false,
                raw_kafka: None,
            };
            // A void read before its event voids the id (a tombstone): the event, read after it, is a
            // voided duplicate that counts nowhere — on a first run and on a replay alike.
            if let Some(e) = targets.get(13) {
                stream.insert(0, void_of(e, Expect::Void(e.id.clone())));
                ledger.voided.insert(e.id.clone());
                if let Some(event) = stream
                    .iter_mut()
                    .find(|it| matches!(&it.expect, Expect::Count(x) if x.id == e.id))
                {
                    event.expect = Expect::Identical;
                }
            }
            // A second void of a voided event applies to nothing.
            if let Some(e) = targets.first() {
                stream.push(void_of(e, Expect::VoidNothing));
            }
            // A copy of a voided event, read after its void, is a duplicate that counts nowhere.
            if let Some(e) = targets.get(1) {
                let original = stream
                    .iter()
                    .find(|it| matches!(&it.expect, Expect::Count(x) if x.id == e.id))
                    .unwrap();
                let mut copy = original.clone();
                copy.class = "void_races";
                copy.expect = Expect::Identical;
                stream.push(copy);
            }
        }
        for it in &stream {
            if let Expect::Count(e) = &it.expect {
                ledger
                    .must_count
                    .insert(e.id.clone(), (it.class, e.clone()));
            }
        }
        let produced = if restarts.contains(&round) {
            // Kill the pipeline mid-stream and start another.
            let producing =
                tokio::spawn(produce_items(producer.clone(), api.topic.clone(), stream));
            tokio::time::sleep(Duration::from_millis(g.rng.random_range(100..600))).await;
            if let Some(status) = pipeline.0.try_wait().unwrap() {
                ledger.problem(format!(
                    "pipeline: exited ({status}) before the restart of round {round}"
                ));
            }
            pipeline.kill();
            pipeline = spawn_pipeline(&api.url, &api.topic, 2, &[]);
            producing.await.unwrap()
        } else {
            produce_items(producer.clone(), api.topic.clone(), stream).await
        };
        ledger.kafka.extend(produced);

        // ---- HTTP: singles, batches, CloudEvents, voids.
        let mut singles: Vec<Item> = Vec::new();
        let mut batch: Vec<Item> = Vec::new();
        let mut ce_batch: Vec<Item> = Vec::new();
        for _ in 0..24 {
            let e = g.good();
            let fmt = g.fmt();
            singles.push(count("good", fmt, e));
        }
        for _ in 0..12 {
            let e = g.good();
            batch.push(count("good", Fmt::Plain, e));
        }
        for _ in 0..6 {
            let e = g.good();
            ce_batch.push(count("good", Fmt::Cloud, e));
        }
        for &class in &classes {
            for it in hostile(class, &mut g) {
                match it.fmt {
                    _ if it.raw_kafka.is_some() => {}
                    Fmt::Void => {}
                    _ if !it.batchable || g.rng.random_bool(0.5) => singles.push(it),
                    Fmt::Cloud => ce_batch.push(it),
                    Fmt::Plain => batch.push(it),
                }
            }
        }
        singles.shuffle(&mut g.rng);
        batch.shuffle(&mut g.rng);
        ce_batch.shuffle(&mut g.rng);
        let reposts: Vec<Item> = singles
            .iter()
            .filter(|it| it.class == "good" && it.fmt == Fmt::Plain)
            .take(2)
            .cloned()
            .collect();
        // The events sent both ways race: their Kafka copies are produced while the API is posted.
        let racing = tokio::spawn(produce_items(
            producer.clone(),
            api.topic.clone(),
            either_path.clone(),
        ));
        singles.extend(either_path);
        post_singles(&api, &mut ledger, singles).await;
        ledger.kafka.extend(racing.await.unwrap());
        let half = batch.len() / 2;
        let second = batch.split_off(half);
        post_batch(&api, &mut ledger, batch, false).await;
        post_batch(&api, &mut ledger, second, false).await;
        post_batch(&api, &mut ledger, ce_batch, true).await;
        if on("duplicates") {
            for it in reposts {
                let mut problems = Vec::new();
                let answer = send(
                    &api,
                    &mut problems,
                    "duplicates",
                    "/api/v1/events",
                    "application/json",
                    &it.bytes,
                )
                .await;
                ledger.http_requests += 1;
                for p in problems {
                    ledger.problem(p);
                }
                if answer.status != 409 || !answer.problem_json {
                    ledger.problem(format!(
                        "duplicates: a re-post got {}, not a 409 problem: {}",
                        answer.status, answer.body
                    ));
                }
            }
        }
        if on("hostile_batch_bodies") {
            let good = g.good().plain();
            let mut with_bad_utf8 = b"[".to_vec();
            with_bad_utf8.extend_from_slice(&good);
            with_bad_utf8.extend_from_slice(b",{\"event_id\":\"\xff\"}]");
            let many: Vec<String> = (0..1001)
                .map(|_| String::from_utf8(g.good().plain()).unwrap())
                .collect();
            let big: Vec<String> = (0..3000)
                .map(|_| String::from_utf8(g.good().plain()).unwrap())
                .collect();
            let bodies: Vec<(&str, Vec<u8>)> = vec![
                ("application/json", b"[]".to_vec()),
                ("application/json", b"{}".to_vec()),
                (
                    "application/json",
                    format!("[{}", String::from_utf8_lossy(&good)).into_bytes(),
                ),
                ("application/json", with_bad_utf8),
                (
                    "application/json",
                    format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes(),
                ),
                (
                    "application/json",
                    format!("[{}]", many.join(",")).into_bytes(),
                ),
                (
                    "application/json",
                    format!("[{}]", big.join(",")).into_bytes(),
                ),
                ("application/cloudevents-batch+json", b"[1,2,3]".to_vec()),
                (
                    "text/plain",
                    format!("[{}]", String::from_utf8_lossy(&good)).into_bytes(),
                ),
            ];
            for (ct, body) in bodies {
                let mut problems = Vec::new();
                let answer = send(
                    &api,
                    &mut problems,
                    "hostile_batch_bodies",
                    "/api/v1/events/batch",
                    ct,
                    &body,
                )
                .await;
                ledger.http_requests += 1;
                for p in problems {
                    ledger.problem(p);
                }
                // A 200 with every item refused is an acceptable answer to `[1,2,3]`.
                let all_refused = answer.status == 200
                    && serde_json::from_str::<Value>(&answer.body)
                        .is_ok_and(|v| v["accepted"] == 0);
                if !(all_refused || (400..500).contains(&answer.status) && answer.problem_json) {
                    ledger.problem(format!(
                        "hostile_batch_bodies: a {}-byte {ct} body got {} (problem+json: {}): {} — sent {}",
                        body.len(),
                        answer.status,
                        answer.problem_json,
                        cut(&answer.body, 200),
                        preview(&body)
                    ));
                }
            }
        }
        if on("void_bad_paths") {
            let long = "a".repeat(5000);
            for id in [
                "%00",
                "a%00b",
                "%ED%A0%80",
                "%F0%9F%98%80",
                "nope-void",
                long.as_str(),
                "%2e%2e",
                "%FF",
            ] {
                let mut problems = Vec::new();
                let path = format!("/api/v1/events/{id}/void");
                let answer = send(
                    &api,
                    &mut problems,
                    "void_bad_paths",
                    &path,
                    "application/json",
                    b"{}",
                )
                .await;
                ledger.http_requests += 1;
                for p in problems {
                    ledger.problem(p);
                }
                if !((400..500).contains(&answer.status) && answer.problem_json) {
                    ledger.problem(format!(
                        "void_bad_paths: POST /events/{}/void got {} (problem+json: {}): {}",
                        cut(id, 20),
                        answer.status,
                        answer.problem_json,
                        cut(&answer.body, 200)
                    ));
                }
            }
        }

        // ---- Caught up, alive, healthy; then void some events counted in earlier rounds.
        let waited = caught_up(&api, CATCH_UP).await;
        if let Some(status) = pipeline.0.try_wait().unwrap() {
            ledger.problem(format!("pipeline: exited ({status}) in round {round}"));
            panic!(
                "the pipeline exited in round {round}; classes {classes:?}\n{}",
                ledger.report()
            );
        }
        if let Err(progress) = waited {
            ledger.problem(format!(
                "pipeline: did not catch up within {CATCH_UP:?} in round {round}: {progress}"
            ));
            panic!(
                "the pipeline is stuck in round {round}; classes {classes:?}\n{}",
                ledger.report()
            );
        }
        if !healthy(&api).await {
            ledger.problem(format!("api: /healthz did not answer 200 in round {round}"));
        }
        ledger.voidable.shuffle(&mut g.rng);
        let voiding: Vec<String> = ledger
            .voidable
            .drain(..ledger.voidable.len().min(5))
            .collect();
        for id in &voiding {
            let mut problems = Vec::new();
            let answer = send(
                &api,
                &mut problems,
                "good",
                &format!("/api/v1/events/{id}/void"),
                "application/json",
                b"{}",
            )
            .await;
            ledger.http_requests += 1;
            for p in problems {
                ledger.problem(p);
            }
            match answer.status {
                202 => {
                    ledger.api_voids += 1;
                    ledger.voided.insert(id.clone());
                }
                status => ledger.problem(format!(
                    "good: voiding counted event {id} got {status}: {}",
                    answer.body
                )),
            }
        }
        if let Some(id) = voiding.first() {
            let answer = api
                .post_json(&format!("/api/v1/events/{id}/void"), &json!({}))
                .await;
            if answer.status().as_u16() != 200 {
                ledger.problem(format!("good: voiding {id} again got {}", answer.status()));
            }
        }
        // Events of this round become voidable in later ones (not the copied or voided ones).
        let voidable: Vec<String> = ledger
            .must_count
            .iter()
            .filter(|(id, (_, e))| {
                e.customer != OVERFLOW_CUSTOMER
                    && !ledger.voided.contains(*id)
                    && !copied.contains(*id)
            })
            .map(|(id, _)| id.clone())
            .filter(|_| g.rng.random_bool(0.03))
            .collect();
        ledger.voidable = voidable;
        eprintln!("adversary: round {round} done at {:?}", started.elapsed());
    }

    if let Err(progress) = caught_up(&api, CATCH_UP).await {
        ledger.problem(format!("pipeline: did not catch up at the end: {progress}"));
    }
    if let Some(status) = pipeline.0.try_wait().unwrap() {
        ledger.problem(format!("pipeline: exited ({status}) at the end"));
    }
    if !healthy(&api).await {
        ledger.problem("api: /healthz did not answer 200 at the end".into());
    }
    // Reads over what the hostile records left behind answer too.
    for path in [
        "/api/v1/dead-letters?limit=100",
        "/api/v1/aggregations?limit=100",
        "/api/v1/progress",
    ] {
        let status = api.get(path).await.status().as_u16();
        if status >= 500 {
            ledger.problem(format!("api: GET {path} answered {status}"));
        }
    }

    // ---- Every record accounted for, by position.
    let mut conn = PgConnection::connect(&api.url).await.unwrap();
    let mut counted: HashMap<(i32, i64), String> = HashMap::new();
    let mut voided: HashMap<(i32, i64), String> = HashMap::new();
    let mut counted_ids: BTreeSet<String> = BTreeSet::new();
    for r in sqlx::query("SELECT event_id, counted_partition, counted_offset, voided_partition, voided_offset FROM event_ids")
        .fetch_all(&mut conn)
        .await
        .unwrap()
    {
        let id: String = r.get(0);
        if let (Some(p), Some(o)) = (r.get::<Option<i32>, _>(1), r.get::<Option<i64>, _>(2)) {
            counted.insert((p, o), id.clone());
            counted_ids.insert(id.clone());
        }
        if let (Some(p), Some(o)) = (r.get::<Option<i32>, _>(3), r.get::<Option<i64>, _>(4)) {
            voided.insert((p, o), id);
        }
    }
    let mut dead: HashMap<(i32, i64), (String, Vec<u8>)> = HashMap::new();
    for r in sqlx::query(r#"SELECT partition, "offset", reason, substring(payload from 1 for 200) FROM dead_letters WHERE topic = $1"#)
        .bind(&api.topic)
        .fetch_all(&mut conn)
        .await
        .unwrap()
    {
        dead.insert((r.get(0), r.get(1)), (r.get(2), r.get(3)));
    }
    let mut dups: HashMap<(i32, i64), String> = HashMap::new();
    for r in sqlx::query(
        r#"SELECT partition, "offset", event_id FROM duplicate_events WHERE topic = $1"#,
    )
    .bind(&api.topic)
    .fetch_all(&mut conn)
    .await
    .unwrap()
    {
        dups.insert((r.get(0), r.get(1)), r.get(2));
    }

    let mut counted_maybes: Vec<Good> = Vec::new();
    let kafka = std::mem::take(&mut ledger.kafka);
    let mut mine: BTreeSet<(i32, i64)> = BTreeSet::new();
    let mut outcomes: BTreeMap<&str, BTreeMap<&str, usize>> = BTreeMap::new();
    let mut kafka_won: BTreeSet<String> = BTreeSet::new();
    let mut either_path_api_duplicates = 0;
    for (it, pos) in &kafka {
        mine.insert(*pos);
        let c = counted.get(pos);
        let v = voided.get(pos);
        let d = dead.get(pos);
        let x = dups.get(pos);
        let seen = format!(
            "counted {c:?}, voided {v:?}, dead {:?}, duplicate {x:?}",
            d.map(|d| &d.0)
        );
        let outcome = match (c, v, d, x) {
            (Some(_), None, None, None) => "counted",
            (None, Some(_), None, None) => "void applied",
            (None, None, Some(_), None) => "dead letter",
            (None, None, None, Some(_)) => "conflicting",
            (None, None, None, None) => "no row",
            _ => "several",
        };
        *outcomes
            .entry(it.class)
            .or_default()
            .entry(outcome)
            .or_default() += 1;
        let dead_ok = d.is_some_and(|(reason, _)| !reason.trim().is_empty());
        let nothing_else = |want_dead: bool| {
            c.is_none() && v.is_none() && x.is_none() && (d.is_some() == want_dead)
        };
        let ok = match &it.expect {
            Expect::Count(e) => c == Some(&e.id) && v.is_none() && d.is_none() && x.is_none(),
            Expect::Refuse => dead_ok && nothing_else(true),
            Expect::CountOrRefuse(e) => {
                if c == Some(&e.id) && d.is_none() {
                    counted_maybes.push(e.clone());
                    true
                } else {
                    dead_ok && nothing_else(true)
                }
            }
            Expect::Void(id) => v == Some(id) && c.is_none() && d.is_none() && x.is_none(),
            // Ignored, or the tombstone of an id that never counted.
            Expect::VoidNothing => {
                v.is_none_or(|id| !counted_ids.contains(id))
                    && c.is_none()
                    && x.is_none()
                    && (d.is_none() || dead_ok && v.is_none())
            }
            Expect::Identical => nothing_else(false),
            Expect::Conflicting(id) => x == Some(id) && c.is_none() && v.is_none() && d.is_none(),
            Expect::EitherPath(e) => {
                if c == Some(&e.id) {
                    kafka_won.insert(e.id.clone());
                }
                (c.is_none() || c == Some(&e.id)) && v.is_none() && d.is_none() && x.is_none()
            }
        };
        if !ok {
            ledger.problem(format!(
                "{}: the {:?} record at {pos:?} should be {} but is {seen}: {}",
                it.class,
                it.fmt,
                match &it.expect {
                    Expect::Count(e) => format!("counted as {}", e.id),
                    Expect::Refuse => "a dead letter with a reason".into(),
                    Expect::CountOrRefuse(e) => format!("counted as {} or a dead letter", e.id),
                    Expect::Void(id) => format!("the void of {id}"),
                    Expect::VoidNothing => {
                        "an ignored void, a tombstone of an id never counted, or a dead letter"
                            .into()
                    }
                    Expect::Identical => "an identical duplicate (no row)".into(),
                    Expect::Conflicting(id) => format!("a conflicting duplicate of {id}"),
                    Expect::EitherPath(e) =>
                        format!("counted as {} or an identical duplicate", e.id),
                },
                preview(&it.bytes)
            ));
        }
    }
    // What the API produced: counted events and applied voids, nothing else.
    // An event sent both ways counts once: by its Kafka copy (then the API's, if the API answered
    // 201, is a duplicate) or by the API's.
    for id in &ledger.either_path_201 {
        if kafka_won.contains(id) {
            either_path_api_duplicates += 1;
        }
    }
    let api_counted = counted.keys().filter(|p| !mine.contains(p)).count();
    let api_voided = voided.keys().filter(|p| !mine.contains(p)).count();
    if api_counted + either_path_api_duplicates != ledger.api_events
        || api_voided != ledger.api_voids
    {
        ledger.problem(format!(
            "api: {} events ({either_path_api_duplicates} of them also counted from Kafka) and {} voids were accepted over HTTP, but {api_counted} records of the API's were counted and {api_voided} voids applied",
            ledger.api_events, ledger.api_voids
        ));
    }
    for (pos, (reason, payload)) in dead.iter().filter(|(p, _)| !mine.contains(p)) {
        if !payload
            .windows(OVERFLOW_CUSTOMER.len())
            .any(|w| w == OVERFLOW_CUSTOMER.as_bytes())
        {
            ledger.problem(format!(
                "api: a record the API produced is a dead letter at {pos:?}: {reason}: {}",
                preview(payload)
            ));
        }
    }
    for (pos, id) in dups.iter().filter(|(p, _)| !mine.contains(p)) {
        ledger.problem(format!(
            "api: a record the API produced is a conflicting duplicate of {id} at {pos:?}"
        ));
    }
    let total = topic_records(&api.topic);
    let expected_total = kafka.len() + ledger.api_events + ledger.api_voids;
    if total != expected_total as i64 {
        ledger.problem(format!(
            "accounting: the topic holds {total} records, the test produced {} and the API was answered 201/202 for {}",
            kafka.len(),
            ledger.api_events + ledger.api_voids
        ));
    }
    // Every event that must count did, and nothing else did.
    let maybe_ids: BTreeSet<&String> = counted_maybes.iter().map(|e| &e.id).collect();
    let missing: Vec<String> = ledger
        .must_count
        .iter()
        .filter(|(id, _)| !counted_ids.contains(*id))
        .map(|(id, (class, _))| format!("{class}/{id}"))
        .collect();
    if !missing.is_empty() {
        ledger.problem(format!(
            "{}: {} good events were never counted: {:?}",
            missing[0].split('/').next().unwrap_or_default(),
            missing.len(),
            &missing[..missing.len().min(10)]
        ));
    }
    let unexpected: Vec<&String> = counted_ids
        .iter()
        .filter(|id| !ledger.must_count.contains_key(*id) && !maybe_ids.contains(id))
        .collect();
    if !unexpected.is_empty() {
        ledger.problem(format!(
            "accounting: {} events were counted that the test never expected: {:?}",
            unexpected.len(),
            &unexpected[..unexpected.len().min(10)]
        ));
    }
    let voided_ids: BTreeSet<&String> = voided.values().collect();
    let not_voided: Vec<&String> = ledger
        .voided
        .iter()
        .filter(|id| !voided_ids.contains(id))
        .collect();
    if !not_voided.is_empty() {
        ledger.problem(format!(
            "good: {} voids were never applied: {:?}",
            not_voided.len(),
            &not_voided[..not_voided.len().min(10)]
        ));
    }

    // ---- Totals equal the reference: good events minus voided ones.
    let mut events: BTreeMap<String, Good> = ledger
        .must_count
        .iter()
        .map(|(id, (_, e))| (id.clone(), e.clone()))
        .collect();
    for e in counted_maybes {
        events.insert(e.id.clone(), e);
    }
    let mut reference = Aggregates::new();
    for (id, e) in &events {
        let sign: i64 = if ledger.voided.contains(id) { 0 } else { 1 };
        for (key, value) in e.contributions() {
            let row = reference.entry(key).or_default();
            row.0 += value * Decimal::from(sign);
            row.1 += sign;
        }
    }
    let keep = |a: Aggregates| -> Aggregates {
        normalized(a)
            .into_iter()
            .filter(|((customer, _, _), (value, n))| {
                customer != OVERFLOW_CUSTOMER && !(value.is_zero() && *n == 0)
            })
            .collect()
    };
    let reference = keep(reference);
    let stored = keep(stored_aggregates(&api.url).await);
    if stored != reference {
        let differ: Vec<String> = reference
            .iter()
            .filter(|(k, v)| stored.get(*k) != Some(*v))
            .take(8)
            .map(|(k, v)| format!("{k:?}: expected {v:?}, stored {:?}", stored.get(k)))
            .chain(
                stored
                    .iter()
                    .filter(|(k, _)| !reference.contains_key(*k))
                    .take(4)
                    .map(|(k, v)| format!("{k:?}: stored {v:?}, expected no row")),
            )
            .collect();
        ledger.problem(format!(
            "totals: {} stored rows vs {} in the reference; first differences: {differ:#?}",
            stored.len(),
            reference.len()
        ));
    }

    for (class, seen) in &outcomes {
        eprintln!("adversary: Kafka records of {class}: {seen:?}");
    }
    // ---- Charges: every customer's `adv.tokens` windows priced at the default book, untouched by
    // whatever the overflow customer's rating did.
    let price = dec(TOKEN_PRICE);
    let expected_charges: BTreeMap<(String, i64), (Decimal, Decimal)> = reference
        .iter()
        .filter(|((_, meter, _), _)| meter == "adv.tokens")
        .map(|((customer, _, start), (value, _))| {
            (
                (customer.clone(), *start),
                (*value, (*value * price).normalize()),
            )
        })
        .collect();
    let stored_charges: BTreeMap<(String, i64), (Decimal, Decimal)> = sqlx::query(
        "SELECT customer_id, extract(epoch FROM window_start)::bigint, quantity, amount FROM charges
         WHERE meter = 'adv.tokens'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .iter()
    .map(|r| {
        (
            (r.get::<String, _>(0), r.get::<i64, _>(1)),
            (
                r.get::<Decimal, _>(2).normalize(),
                r.get::<Decimal, _>(3).normalize(),
            ),
        )
    })
    .filter(|(_, (quantity, amount))| !(quantity.is_zero() && amount.is_zero()))
    .collect();
    if stored_charges != expected_charges {
        let differ: Vec<String> = expected_charges
            .iter()
            .filter(|(k, v)| stored_charges.get(*k) != Some(*v))
            .take(6)
            .map(|(k, v)| format!("{k:?}: expected {v:?}, stored {:?}", stored_charges.get(k)))
            .collect();
        ledger.problem(format!(
            "charges: {} stored adv.tokens charges vs {} expected; first differences: {differ:#?}",
            stored_charges.len(),
            expected_charges.len()
        ));
    }

    // What the overflow customer's rating came to (informative: the quarantine is the pipeline's).
    let quarantined: Option<i64> =
        sqlx::query_scalar("SELECT count(*) FROM rating_quarantine WHERE customer_id = $1")
            .bind(OVERFLOW_CUSTOMER)
            .fetch_one(&mut conn)
            .await
            .ok();
    eprintln!("adversary: quarantined rating periods of {OVERFLOW_CUSTOMER}: {quarantined:?}");
    eprintln!(
        "adversary: {} Kafka records, {} HTTP requests ({} events and {} voids accepted), {} dead letters, {} rows; {:?}",
        kafka.len(),
        ledger.http_requests,
        ledger.api_events,
        ledger.api_voids,
        dead.len(),
        reference.len(),
        started.elapsed()
    );
    assert!(
        ledger.problems.is_empty(),
        "seed {seed}, classes {classes:?}\n{}",
        ledger.report()
    );
}

/// Found by the `void_races` class, made deterministic: a void read before its event applied to
/// nothing, so the event counted; but a pipeline killed after it claimed the event and before it
/// committed the void's epoch left the event's claim behind, and the replay read the void again, found
/// that claim and retracted the event. Emulated here by leaving that claim in place before the run. A
/// void now leaves a tombstone for an id not seen yet, so the event is voided on every run alike.
#[tokio::test(flavor = "multi_thread")]
async fn a_void_read_before_its_event_voids_it_alike_on_a_first_run_and_on_a_replay() {
    let first_run = void_before_event(false).await;
    let replay = void_before_event(true).await;
    assert_eq!(first_run.0, Some(0), "the void, read first, voids the id");
    assert_same(&first_run.1, &Aggregates::new(), "a first run");
    assert_eq!(replay.0, first_run.0);
    assert_same(&replay.1, &first_run.1, "a replay after a crash");
}

/// A void then its event on one partition, drained; with `killed`, first what a run killed after it
/// claimed the event (and before it committed the void's epoch) leaves behind. Returns the id's voided
/// partition and the stored aggregates.
async fn void_before_event(killed: bool) -> (Option<i32>, Aggregates) {
    let url = fresh_database().await;
    let topic = fresh_topic(1).await;
    let void = json!({"event_id": "evt_r", "customer_id": "cust_r"}).to_string();
    let event = r#"{"event_id":"evt_r","customer_id":"cust_r","event_type":"api_call","event_time":"2024-01-15T14:30:00Z","value":5}"#;
    let mut first = item("void_races", Fmt::Void, "cust_r", void, Expect::VoidNothing);
    first.batchable = false;
    let second = item("void_races", Fmt::Plain, "cust_r", event, Expect::Refuse);
    let produced = produce_items(producer(), topic.clone(), vec![first, second]).await;
    assert_eq!(
        produced.iter().map(|(_, p)| *p).collect::<Vec<_>>(),
        [(0, 0), (0, 1)]
    );
    let mut conn = PgConnection::connect(&url).await.unwrap();
    if killed {
        // What the killed run left: the event's claim at its own position, and its stored row.
        for sql in [
            "INSERT INTO event_ids (event_id, event_time, fingerprint, source, counted_partition, counted_offset)
             VALUES ('evt_r', '2024-01-15T14:30:00Z', 0, 'kafka', 0, 1)",
            "INSERT INTO telemetry_events (event_id, customer_id, event_type, event_time, value, properties)
             VALUES ('evt_r', 'cust_r', 'api_call', '2024-01-15T14:30:00Z', 5, '{}')",
        ] {
            sqlx::query(sql).execute(&mut conn).await.unwrap();
        }
    }
    drain(&url, &topic, 1);
    let voided: Option<i32> =
        sqlx::query_scalar("SELECT voided_partition FROM event_ids WHERE event_id = 'evt_r'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    (voided, stored_aggregates(&url).await)
}
