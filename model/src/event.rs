//! The usage event and its one decoder/validator, shared by the HTTP API and the Kafka source (SPEC §2).
//!
//! ```text
//! bytes ──serde (strict: unknown fields, duplicate fields refused)──► RawEvent
//!       ──validate (ids, alphabet, times, exact decimal value, properties)──► Event
//!                                  └─ every failing field ─► DecodeError::Invalid([FieldError])
//! ```
//! Decisions depend only on the bytes and the reference instant passed in (the Kafka record's timestamp
//! or the API's clock), never on the processor's wall clock, so a replay decides the same way.
//!
//! Length: 270 of its lines are tests; the one decoder is kept in one file so that the API and the
//! Kafka source cannot drift apart.

mod cloudevents;

use std::borrow::Cow;

use chrono::{DateTime, Datelike, SecondsFormat, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::json::{decimal_number, parse_decimal, MAX_EVENT_VALUE};
pub use cloudevents::decode_cloudevent;

/// A validated usage event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub event_id: String,
    pub customer_id: String,
    pub event_type: String,
    /// Event time, microseconds since the epoch, UTC.
    pub event_time_micros: i64,
    pub value: Decimal,
    /// Flat properties: the JSON object as sent, validated (`{}` when absent).
    pub properties: String,
}

/// How long raw events are kept and late events still accepted (SPEC §2): 35 days.
pub const DEFAULT_RETENTION_MICROS: i64 = 35 * 86_400 * 1_000_000;

/// Validation limits (SPEC §2).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// How far past the reference instant an event time may lie.
    pub max_future_micros: i64,
    /// Largest encoded size of `properties`.
    pub max_properties_bytes: usize,
    /// Events before this instant are beyond the retention horizon (SPEC §2): the committed watermark
    /// minus the retention. `None` before any watermark: then nothing is too old.
    pub oldest_micros: Option<i64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_future_micros: 5 * 60 * 1_000_000,
            max_properties_bytes: 4 * 1024,
            oldest_micros: None,
        }
    }
}

/// One reason a field is invalid, with its JSON path (`value`, `properties.region`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// Why bytes are not an event.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON, or not an object of the event's shape (unknown or duplicate fields, wrong types).
    #[error("malformed event: {0}")]
    Malformed(String),
    /// Well-formed, but some fields break the rules.
    #[error("invalid event: {}", describe(.0))]
    Invalid(Vec<FieldError>),
}

fn describe(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("{}: {}", e.field, e.message))
        .collect::<Vec<_>>()
        .join("; ")
}

impl DecodeError {
    /// A short stable reason for dead letters and metrics: `MALFORMED_JSON` or `VALIDATION_FAILED`.
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::Malformed(_) => "MALFORMED_JSON",
            DecodeError::Invalid(_) => "VALIDATION_FAILED",
        }
    }
}

/// The wire shape, before validation, borrowing from the input where it can. serde's derive refuses
/// duplicate fields on its own; `value` and `properties` stay raw JSON until validated. Its OpenAPI
/// schema is `Event`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(as = Event))]
pub struct RawEvent<'a> {
    #[serde(borrow)]
    #[cfg_attr(feature = "openapi", schema(value_type = crate::openapi::Id))]
    event_id: Cow<'a, str>,
    #[serde(borrow)]
    #[cfg_attr(feature = "openapi", schema(value_type = crate::openapi::Id))]
    customer_id: Cow<'a, str>,
    #[serde(borrow)]
    #[cfg_attr(feature = "openapi", schema(value_type = crate::openapi::Name))]
    event_type: Cow<'a, str>,
    /// RFC 3339, not far in the future.
    #[serde(borrow)]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    event_time: Cow<'a, str>,
    /// The quantity the meters read; default 1.
    #[serde(default, borrow)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<crate::openapi::DecimalIn>))]
    value: Option<&'a RawValue>,
    /// Flat: string, number or boolean values.
    #[serde(default, borrow)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    properties: Option<&'a RawValue>,
}

/// A JSON object's entries, keys borrowed where unescaped and values left raw.
struct Entries<'a>(Vec<(Key<'a>, &'a RawValue)>);

#[derive(Deserialize, PartialEq, Eq, PartialOrd, Ord)]
struct Key<'a>(#[serde(borrow)] Cow<'a, str>);

impl<'de> Deserialize<'de> for Entries<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Entries<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<Key<'de>, &'de RawValue>()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

/// Decodes and validates one plain-JSON event. `reference_micros` is the instant "in the future" is
/// measured from.
pub fn decode_event(
    bytes: &[u8],
    reference_micros: i64,
    limits: &Limits,
) -> Result<Event, DecodeError> {
    let raw: RawEvent = serde_json::from_slice(object(bytes)?).map_err(malformed)?;
    validate(
        Parts {
            event_id: raw.event_id,
            customer_id: raw.customer_id,
            event_type: raw.event_type,
            event_time: raw.event_time,
            value: raw.value,
            properties: raw.properties.map(Properties::Raw),
        },
        reference_micros,
        limits,
    )
}

/// How an event's body is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// meterflow's own JSON (SPEC §2).
    Plain,
    /// CloudEvents 1.0, structured JSON mode.
    CloudEvent,
}

impl Format {
    /// The format a `Content-Type` (HTTP header or Kafka record header) names.
    pub fn of_content_type(content_type: Option<&str>) -> Format {
        match content_type {
            Some(ct) if ct.starts_with("application/cloudevents") => Format::CloudEvent,
            _ => Format::Plain,
        }
    }
}

/// Decodes one event in the given format. A plain-JSON decode that fails on a body that looks like a
/// CloudEvent (it names `specversion`) is retried as one, so producers that cannot set headers still work.
pub fn decode_as(
    format: Format,
    bytes: &[u8],
    reference_micros: i64,
    limits: &Limits,
) -> Result<Event, DecodeError> {
    match format {
        Format::CloudEvent => decode_cloudevent(bytes, reference_micros, limits),
        Format::Plain => match decode_event(bytes, reference_micros, limits) {
            Err(DecodeError::Malformed(why)) if contains(bytes, b"\"specversion\"") => {
                decode_cloudevent(bytes, reference_micros, limits)
                    .map_err(|_| DecodeError::Malformed(why))
            }
            other => other,
        },
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Splits a JSON array (a batch body) into its items, left raw for the per-item decoder.
pub fn split_batch(bytes: &[u8]) -> Result<Vec<&RawValue>, DecodeError> {
    serde_json::from_slice(bytes)
        .map_err(|e| malformed(format!("a batch must be a JSON array of events: {e}")))
}

/// Reads only the `event_id` (or a CloudEvent's `id`) of a body that failed validation, so a known id
/// can be answered 409 before any other check (SPEC §3).
pub fn sniff_event_id(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Id {
        event_id: Option<String>,
        id: Option<String>,
    }
    let id: Id = serde_json::from_slice(bytes).ok()?;
    // Only an id that could be stored is worth a look-up (one with NUL would even fail the query).
    id.event_id
        .or(id.id)
        .filter(|i| !i.is_empty() && i.len() <= 128 && i.bytes().all(is_id_char))
}

/// An event's fields before validation, whichever format they came in.
struct Parts<'a> {
    event_id: Cow<'a, str>,
    customer_id: Cow<'a, str>,
    event_type: Cow<'a, str>,
    event_time: Cow<'a, str>,
    value: Option<&'a RawValue>,
    properties: Option<Properties<'a>>,
}

enum Properties<'a> {
    /// A JSON value that must be a flat object.
    Raw(&'a RawValue),
    /// An object's entries already split (a CloudEvent's `data` without `value`).
    Entries(Vec<(Key<'a>, &'a RawValue)>),
}

/// The one validator (SPEC §2): every failing field is reported, with its path.
fn validate(raw: Parts<'_>, reference_micros: i64, limits: &Limits) -> Result<Event, DecodeError> {
    let mut errors = Vec::new();
    check_id(&mut errors, "event_id", &raw.event_id, 128, is_id_char);
    check_id(
        &mut errors,
        "customer_id",
        &raw.customer_id,
        128,
        is_id_char,
    );
    check_id(&mut errors, "event_type", &raw.event_type, 64, is_type_char);

    let event_time_micros = match DateTime::parse_from_rfc3339(&raw.event_time) {
        Ok(t) if !(1..=9999).contains(&t.with_timezone(&Utc).year()) => {
            errors.push(field(
                "event_time",
                "must lie in the years 0001 to 9999 (UTC)",
            ));
            0
        }
        Ok(t) => {
            let micros = t.with_timezone(&Utc).timestamp_micros();
            if micros > reference_micros.saturating_add(limits.max_future_micros) {
                errors.push(field("event_time", "is more than 5 minutes in the future"));
            } else if let Some(oldest) = limits.oldest_micros {
                if micros < oldest {
                    errors.push(field(
                        "event_time",
                        "is older than the retention horizon (35 days behind the watermark)",
                    ));
                }
            }
            micros
        }
        Err(_) => {
            errors.push(field(
                "event_time",
                "must be an RFC 3339 timestamp with an offset",
            ));
            0
        }
    };

    let value = match raw.value.map(RawValue::get) {
        None => Decimal::ONE,
        // A string without escapes is its own content; one with escapes is unescaped by serde.
        Some(text) if text.starts_with('"') && !text.contains('\\') => {
            let inner = text.strip_prefix('"').and_then(|t| t.strip_suffix('"'));
            parse_value(&mut errors, inner.unwrap_or_default())
        }
        Some(text) if text.starts_with('"') => match serde_json::from_str::<String>(text) {
            Ok(inner) => parse_value(&mut errors, &inner),
            Err(e) => return Err(malformed(e)),
        },
        Some(text) if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) => {
            parse_value(&mut errors, text)
        }
        Some(_) => {
            errors.push(field(
                "value",
                "must be a number or a string holding a decimal",
            ));
            Decimal::ZERO
        }
    };

    let properties = match raw.properties {
        None => "{}".to_owned(),
        Some(Properties::Raw(raw)) => {
            let Entries(entries) = serde_json::from_str(raw.get())
                .map_err(|e| malformed(format!("properties must be a JSON object: {e}")))?;
            canonical_properties(&mut errors, entries, limits)?
        }
        Some(Properties::Entries(entries)) => canonical_properties(&mut errors, entries, limits)?,
    };

    if !errors.is_empty() {
        return Err(DecodeError::Invalid(errors));
    }
    Ok(Event {
        event_id: raw.event_id.into_owned(),
        customer_id: raw.customer_id.into_owned(),
        event_type: raw.event_type.into_owned(),
        event_time_micros,
        value,
        properties,
    })
}

/// Properties are a flat object of strings, numbers and booleans, without duplicate keys, NUL or lone
/// surrogates. They are kept in one canonical spelling, whatever path or format they came by: compact,
/// keys and strings unescaped and written back with JSON's minimal escapes (`"a\u0062"` is `"ab"`),
/// numbers and booleans with their own digits. So the same event has the same bytes, fingerprint and
/// metered contributions on every path (HTTP, batch, CloudEvents, Kafka, void, re-rating, restore).
fn canonical_properties(
    errors: &mut Vec<FieldError>,
    mut entries: Vec<(Key<'_>, &RawValue)>,
    limits: &Limits,
) -> Result<String, DecodeError> {
    let mut text = String::from("{");
    for (i, (Key(key), v)) in entries.iter().enumerate() {
        let path = || format!("properties.{}", printable(key));
        if key.contains('\0') {
            errors.push(field(&path(), "must not contain NUL (U+0000) in its name"));
        }
        if i > 0 {
            text.push(',');
        }
        push_json_string(&mut text, key)?;
        text.push(':');
        let raw = v.get();
        if raw.starts_with('"') && !raw.contains('\\') {
            // Without an escape, a string token is its own canonical spelling: JSON forbids raw
            // control characters in it (the parser has refused them), and a NUL or a lone surrogate
            // can only be written escaped.
            text.push_str(raw);
        } else if raw.starts_with('"') {
            match serde_json::from_str::<String>(raw) {
                Ok(s) if s.contains('\0') => {
                    errors.push(field(&path(), "must not contain NUL (U+0000)"))
                }
                Ok(s) => push_json_string(&mut text, &s)?,
                Err(_) => errors.push(field(
                    &path(),
                    "must be valid Unicode text (no lone surrogate escapes)",
                )),
            }
        } else if raw.starts_with(|c: char| c == '-' || c == 't' || c == 'f' || c.is_ascii_digit())
        {
            text.push_str(raw);
        } else {
            errors.push(field(&path(), "must be a string, number or boolean"));
        }
    }
    text.push('}');
    entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    if let Some(pair) = entries
        .windows(2)
        .find(|w| w.first().map(|a| &a.0) == w.get(1).map(|b| &b.0))
    {
        let key = pair
            .first()
            .map(|(k, _)| printable(&k.0))
            .unwrap_or_default();
        return Err(malformed(format!("duplicate key in properties: {key}")));
    }
    if text.len() > limits.max_properties_bytes {
        errors.push(field("properties", "must be at most 4 KiB when encoded"));
    }
    Ok(text)
}

/// `text` as a JSON string with JSON's minimal escapes, as `serde_json::to_string` writes it; a text
/// that needs none (the usual name or value) is copied between quotes without a detour through a new
/// `String`.
fn push_json_string(out: &mut String, text: &str) -> Result<(), DecodeError> {
    if text.contains(|c: char| c == '"' || c == '\\' || c.is_ascii_control()) {
        out.push_str(&serde_json::to_string(text).map_err(malformed)?);
    } else {
        out.push('"');
        out.push_str(text);
        out.push('"');
    }
    Ok(())
}

/// FNV-1a over the parts, each followed by a 0xff separator, as a stored `bigint`. Stable across builds
/// and versions (fingerprints and record hashes are stored).
pub fn fnv1a(parts: &[&[u8]]) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.iter().chain(std::iter::once(&0xff)) {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash as i64
}

/// The bytes, if they hold a JSON object. serde's derived structs also take a JSON array of the fields
/// in order (`["id","cust",…]`); an event, a CloudEvent and a void are objects only, so that no shape
/// of a body can carry fields past a check made on another shape (review finding 1).
pub fn object(bytes: &[u8]) -> Result<&[u8], DecodeError> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Ok(bytes),
        _ => Err(DecodeError::Malformed("must be a JSON object".into())),
    }
}

/// Text that is safe to show and to store anywhere (a Postgres `text`, a log line): control characters
/// (NUL among them) escaped, and at most 512 characters.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(512));
    for c in text.chars().take(512) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A decoding failure, with its message made [`printable`].
fn malformed(e: impl std::fmt::Display) -> DecodeError {
    DecodeError::Malformed(printable(&e.to_string()))
}

/// Checks the ids of a void record (`{"event_id", "customer_id"}`) with the event's own rules, so a
/// void that could name no event is a dead letter rather than a query.
pub fn check_void_ids(event_id: &str, customer_id: &str) -> Result<(), DecodeError> {
    let mut errors = Vec::new();
    check_id(&mut errors, "event_id", event_id, 128, is_id_char);
    check_id(&mut errors, "customer_id", customer_id, 128, is_id_char);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(DecodeError::Invalid(errors))
    }
}

impl Event {
    /// The event's canonical JSON: what the API forwards to Kafka, which decodes back to the same event
    /// (the properties byte for byte, so both ends compute the same fingerprint).
    pub fn to_json(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Wire<'a> {
            event_id: &'a str,
            customer_id: &'a str,
            event_type: &'a str,
            event_time: String,
            value: serde_json::Number,
            properties: &'a RawValue,
        }
        // The decoder made `properties` valid JSON; were it not, the empty payload is a dead letter.
        let Ok(properties) = serde_json::from_str::<&RawValue>(&self.properties) else {
            return Vec::new();
        };
        serde_json::to_vec(&Wire {
            event_id: &self.event_id,
            customer_id: &self.customer_id,
            event_type: &self.event_type,
            event_time: self
                .event_time()
                .to_rfc3339_opts(SecondsFormat::AutoSi, true),
            value: decimal_number(&self.value),
            properties,
        })
        .unwrap_or_default()
    }

    /// A stable 64-bit fingerprint of everything but the id (FNV-1a over customer, type, time, the
    /// normalized value and the properties): two copies of one event_id with different fingerprints are
    /// conflicting duplicates (SPEC §3). Stable across builds and versions: it is stored.
    pub fn fingerprint(&self) -> i64 {
        fnv1a(&[
            self.customer_id.as_bytes(),
            self.event_type.as_bytes(),
            &self.event_time_micros.to_le_bytes(),
            self.value.normalize().to_string().as_bytes(),
            self.properties.as_bytes(),
        ])
    }

    /// The raw JSON of one property, if present.
    pub fn property(&self, key: &str) -> Option<&RawValue> {
        let Entries(entries) = serde_json::from_str(&self.properties).ok()?;
        entries
            .into_iter()
            .find(|(k, _)| k.0 == key)
            .map(|(_, v)| v)
    }

    /// The raw values of the properties named `keys`, in their order (`None`: absent), from one parse
    /// of the properties.
    pub fn properties_named<K: AsRef<str>>(&self, keys: &[K]) -> Vec<Option<&RawValue>> {
        let entries = serde_json::from_str::<Entries>(&self.properties)
            .map(|Entries(entries)| entries)
            .unwrap_or_default();
        keys.iter()
            .map(|key| {
                entries
                    .iter()
                    .find(|(k, _)| k.0 == key.as_ref())
                    .map(|(_, v)| *v)
            })
            .collect()
    }

    pub fn event_time(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(self.event_time_micros).unwrap_or(DateTime::<Utc>::MIN_UTC)
    }
}

fn parse_value(errors: &mut Vec<FieldError>, text: &str) -> Decimal {
    match parse_decimal(text) {
        Ok(d) if d.is_sign_negative() && !d.is_zero() => {
            errors.push(field("value", "must not be negative"));
            d
        }
        Ok(d) if d > MAX_EVENT_VALUE => {
            errors.push(field("value", "must be at most 1e20"));
            d
        }
        Ok(d) => d,
        Err(why) => {
            errors.push(field("value", why));
            Decimal::ZERO
        }
    }
}

fn check_id(
    errors: &mut Vec<FieldError>,
    name: &str,
    id: &str,
    max: usize,
    allowed: fn(u8) -> bool,
) {
    if id.is_empty() || id.len() > max {
        errors.push(field(name, &format!("must be 1 to {max} characters long")));
    } else if !id.bytes().all(allowed) {
        let alphabet = if max == 64 {
            "[a-z0-9_.-]"
        } else {
            "[A-Za-z0-9._:-]"
        };
        errors.push(field(name, &format!("may only contain {alphabet}")));
    }
}

fn is_id_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')
}

fn is_type_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
}

fn field(name: &str, message: &str) -> FieldError {
    FieldError::new(name, message)
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    const NOW: i64 = 1_705_329_000_000_000; // 2024-01-15T14:30:00Z

    fn decode(json: &str) -> Result<Event, DecodeError> {
        decode_event(json.as_bytes(), NOW, &Limits::default())
    }

    fn invalid_fields(json: &str) -> Vec<String> {
        match decode(json) {
            Err(DecodeError::Invalid(errors)) => errors.into_iter().map(|e| e.field).collect(),
            other => panic!("expected an invalid event, got {other:?}"),
        }
    }

    #[test]
    fn the_spec_example_decodes_with_an_exact_value() {
        let e = decode(r#"{"event_id":"evt_01","customer_id":"cust_123","event_type":"api_call",
            "event_time":"2024-01-15T14:30:00Z","value":"1.5","properties":{"region":"eu","model":"large"}}"#)
        .unwrap();
        assert_eq!(e.value, Decimal::from_str("1.5").unwrap());
        assert_eq!(e.event_time_micros, NOW);
        assert_eq!(e.properties, r#"{"region":"eu","model":"large"}"#);
    }

    #[test]
    fn a_missing_value_counts_as_one_and_numbers_keep_their_digits() {
        let e = decode(r#"{"event_id":"a","customer_id":"c","event_type":"t","event_time":"2024-01-15T14:30:00+02:00"}"#)
            .unwrap();
        assert_eq!(e.value, Decimal::ONE);
        assert_eq!(e.event_time_micros, NOW - 2 * 3_600 * 1_000_000);
        let e = decode(
            r#"{"event_id":"a","customer_id":"c","event_type":"t","event_time":"2024-01-15T14:30:00Z","value":0.1000000000000000055511151231257827}"#,
        );
        assert!(
            e.is_err(),
            "more than 28 significant digits must be refused, not rounded"
        );
        let e = decode(r#"{"event_id":"a","customer_id":"c","event_type":"t","event_time":"2024-01-15T14:30:00Z","value":0.30000000000000004}"#)
            .unwrap();
        assert_eq!(e.value.to_string(), "0.30000000000000004");
    }

    #[test]
    fn unknown_and_duplicate_fields_are_malformed() {
        let unknown = r#"{"event_id":"a","customer_id":"c","event_type":"t","event_time":"2024-01-15T14:30:00Z","total":1}"#;
        assert!(matches!(decode(unknown), Err(DecodeError::Malformed(_))));
        let dup = r#"{"event_id":"a","event_id":"b","customer_id":"c","event_type":"t","event_time":"2024-01-15T14:30:00Z"}"#;
        assert!(matches!(decode(dup), Err(DecodeError::Malformed(_))));
        assert!(matches!(
            decode("{\"event_id\":"),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn every_broken_field_is_reported_with_its_path() {
        let fields = invalid_fields(
            r#"{"event_id":"bad id","customer_id":"","event_type":"API","event_time":"yesterday","value":"-1","properties":{"nested":{"a":1}}}"#,
        );
        assert_eq!(
            fields,
            [
                "event_id",
                "customer_id",
                "event_type",
                "event_time",
                "value",
                "properties.nested"
            ]
        );
    }

    #[test]
    fn an_event_from_the_future_is_rejected_but_history_is_accepted() {
        assert_eq!(
            invalid_fields(
                r#"{"event_id":"a","customer_id":"c","event_type":"t","event_time":"2024-01-15T14:35:01Z"}"#
            ),
            ["event_time"]
        );
        assert!(decode(r#"{"event_id":"a","customer_id":"c","event_type":"t","event_time":"2024-01-15T14:35:00Z"}"#).is_ok());
        assert!(decode(r#"{"event_id":"a","customer_id":"c","event_type":"t","event_time":"2019-01-01T00:00:00Z"}"#).is_ok());
    }

    #[test]
    fn nan_infinity_and_oversized_properties_are_invalid() {
        for v in [r#""NaN""#, r#""Infinity""#, "1e400", r#""-0.5""#, "true"] {
            let json = format!(
                r#"{{"event_id":"a","customer_id":"c","event_type":"t","event_time":"2024-01-15T14:30:00Z","value":{v}}}"#
            );
            assert_eq!(invalid_fields(&json), ["value"], "value {v}");
        }
        let big = "x".repeat(5000);
        let json = format!(
            r#"{{"event_id":"a","customer_id":"c","event_type":"t","event_time":"2024-01-15T14:30:00Z","properties":{{"k":"{big}"}}}}"#
        );
        assert_eq!(invalid_fields(&json), ["properties"]);
    }

    #[test]
    fn properties_must_be_a_flat_object_without_duplicate_keys() {
        let base = r#"{"event_id":"a","customer_id":"c","event_type":"t","event_time":"2024-01-15T14:30:00Z","properties":"#;
        let with = |props: &str| decode(&format!("{base}{props}}}"));
        assert!(matches!(
            with(r#"{"k":1,"k":2}"#),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(with("5"), Err(DecodeError::Malformed(_))));
        assert_eq!(
            invalid_fields(&format!("{base}{}}}", r#"{"a":null,"b":[1],"c":true}"#)),
            ["properties.a", "properties.b"]
        );
        assert_eq!(
            with(r#"{"a\u0062" : "x\/y", "n":-1.5 }"#)
                .unwrap()
                .properties,
            r#"{"ab":"x/y","n":-1.5}"#,
            "properties are kept in one canonical spelling"
        );
    }

    #[test]
    fn properties_are_spelled_as_a_serde_json_round_trip_of_each_string() {
        use rand::{Rng, SeedableRng};
        // Plain text, quotes, backslashes, escapes of every kind, control characters and DEL,
        // non-ASCII and non-BMP text, in keys and in values.
        const PIECES: [&str; 14] = [
            "eu",
            "a b",
            "\\\"",
            "\\\\",
            "\\n",
            "\\t",
            "\\u0001",
            "\\u007f",
            "\u{7f}",
            "\\/",
            "é",
            "\\u00e9",
            "\u{1F600}",
            "\\ud83d\\ude00",
        ];
        let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
        let base = r#"{"event_id":"a","customer_id":"c","event_type":"t","event_time":"2024-01-15T14:30:00Z","properties":"#;
        let text = |rng: &mut rand::rngs::SmallRng| -> String {
            (0..rng.random_range(1..4))
                .map(|_| PIECES[rng.random_range(0..PIECES.len())])
                .collect()
        };
        for i in 0..2_000 {
            let (key, value) = (text(&mut rng), text(&mut rng));
            let number = ["1", "-2.5e3", "true", "false"][i % 4];
            let props = format!(r#"{{"{key}":"{value}", "n{i}" : {number}}}"#);
            let event = decode(&format!("{base}{props}}}")).unwrap();
            // The spelling before the fast path: every string read and written by serde_json.
            let spell = |json: &str| {
                serde_json::to_string(&serde_json::from_str::<String>(json).unwrap()).unwrap()
            };
            let expected = format!(
                "{{{}:{},\"n{i}\":{number}}}",
                spell(&format!("\"{key}\"")),
                spell(&format!("\"{value}\""))
            );
            assert_eq!(event.properties, expected, "{props}");
        }
    }

    #[test]
    fn nul_and_lone_surrogates_are_refused_in_every_property_position() {
        let base = r#"{"event_id":"a","customer_id":"c","event_type":"t","event_time":"2024-01-15T14:30:00Z","properties":"#;
        let with = |props: &str| decode(&format!("{base}{props}}}"));
        for props in [
            r#"{"k":"\u0000"}"#,
            r#"{"\u0000":"v"}"#,
            r#"{"k":"\ud800"}"#,
        ] {
            match with(props) {
                Err(DecodeError::Invalid(_)) => {}
                other => panic!("{props} must be invalid, got {other:?}"),
            }
        }
        // A lone surrogate in a key cannot even be read as a key.
        assert!(with(r#"{"\ud800":"v"}"#).is_err());
        // Non-BMP characters, escaped or not, are fine and spelled one way.
        let a = with(r#"{"k":"\ud83d\ude00"}"#).unwrap();
        let b = with("{\"k\":\"\u{1F600}\"}").unwrap();
        assert_eq!(a.properties, b.properties);
    }

    #[test]
    fn reasons_never_carry_control_characters() {
        let json = "{\"event_id\":\"a\",\"customer_id\":\"c\",\"event_type\":\"t\",\"event_time\":\"2024-01-15T14:30:00Z\",\"\\u0000x\":1}";
        let e = decode(json).unwrap_err();
        assert!(!e.to_string().contains('\0'), "{e}");
        assert!(!e.to_string().chars().any(char::is_control), "{e}");
    }

    #[test]
    fn years_outside_0001_to_9999_and_values_above_1e20_are_refused() {
        assert_eq!(
            invalid_fields(
                r#"{"event_id":"a","customer_id":"c","event_type":"t","event_time":"0000-01-01T00:30:00+01:00"}"#
            ),
            ["event_time"]
        );
        assert_eq!(
            invalid_fields(
                r#"{"event_id":"a","customer_id":"c","event_type":"t","event_time":"2024-01-15T14:30:00Z","value":"9999999999999999999999999999"}"#
            ),
            ["value"]
        );
        assert!(decode(r#"{"event_id":"a","customer_id":"c","event_type":"t","event_time":"2024-01-15T14:30:00Z","value":1e20}"#).is_ok());
    }

    #[test]
    fn finding_01_an_array_of_the_fields_is_not_an_event() {
        let array = br#"["id","cust_victim","api_call","2024-01-15T14:30:00Z","1000000"]"#;
        assert!(matches!(
            decode_event(array, NOW, &Limits::default()),
            Err(DecodeError::Malformed(_))
        ));
        let ce = br#"["1.0","id","src","type","victim","2024-01-15T14:30:00Z"]"#;
        assert!(decode_cloudevent(ce, NOW, &Limits::default()).is_err());
        assert!(decode_as(Format::Plain, b" 5", NOW, &Limits::default()).is_err());
    }

    #[test]
    fn only_a_storable_id_is_sniffed() {
        assert_eq!(
            sniff_event_id(br#"{"event_id":"e-1","x":1}"#).as_deref(),
            Some("e-1")
        );
        assert_eq!(sniff_event_id(br#"{"event_id":"e\u0000"}"#), None);
        assert_eq!(sniff_event_id(br#"{"id":"bad id"}"#), None);
    }

    #[test]
    fn void_ids_follow_the_event_id_rules() {
        assert!(check_void_ids("evt-1", "cust").is_ok());
        assert!(check_void_ids("\0", "cust").is_err());
        assert!(check_void_ids("e", "").is_err());
    }

    #[test]
    fn an_escaped_value_string_is_unescaped_before_parsing() {
        let e = decode(r#"{"event_id":"a","customer_id":"c","event_type":"t","event_time":"2024-01-15T14:30:00Z","value":"\u0031.5"}"#)
            .unwrap();
        assert_eq!(e.value, Decimal::from_str("1.5").unwrap());
    }

    #[test]
    fn the_canonical_json_decodes_back_to_the_same_event() {
        let e = decode(r#"{"event_id":"e-1","customer_id":"c","event_type":"tokens","event_time":"2024-01-15T14:30:00.123456Z","value":"12.500","properties":{"model":"large","n":3}}"#)
            .unwrap();
        assert_eq!(
            decode_event(&e.to_json(), NOW, &Limits::default()).unwrap(),
            e
        );
    }

    #[test]
    fn a_cloudevent_maps_onto_the_same_event() {
        let ce = r#"{"specversion":"1.0","id":"evt_01","source":"/billing","type":"api_call","subject":"cust_123",
            "time":"2024-01-15T14:30:00Z","datacontenttype":"application/json","data":{"value":"1.5","region":"eu"}}"#;
        let e = decode_cloudevent(ce.as_bytes(), NOW, &Limits::default()).unwrap();
        assert_eq!(
            (e.event_id.as_str(), e.customer_id.as_str()),
            ("evt_01", "cust_123")
        );
        assert_eq!(e.value, Decimal::from_str("1.5").unwrap());
        assert_eq!(e.properties, r#"{"region":"eu"}"#);
        // Sniffed without a content type, too.
        assert_eq!(
            decode_as(Format::Plain, ce.as_bytes(), NOW, &Limits::default()).unwrap(),
            e
        );
    }

    #[test]
    fn cloudevent_errors_name_the_cloudevent_fields() {
        let ce = r#"{"specversion":"0.3","id":"bad id","source":"s","type":"api_call","data":{"value":-1}}"#;
        let fields: Vec<String> = match decode_cloudevent(ce.as_bytes(), NOW, &Limits::default()) {
            Err(DecodeError::Invalid(errors)) => errors.into_iter().map(|e| e.field).collect(),
            other => panic!("expected invalid, got {other:?}"),
        };
        assert_eq!(
            fields,
            ["specversion", "id", "subject", "time", "data.value"]
        );
    }

    #[test]
    fn events_before_the_retention_horizon_are_refused() {
        let limits = Limits {
            oldest_micros: Some(NOW - 1),
            ..Limits::default()
        };
        let json = r#"{"event_id":"a","customer_id":"c","event_type":"t","event_time":"2024-01-15T14:29:00Z"}"#;
        match decode_event(json.as_bytes(), NOW, &limits) {
            Err(DecodeError::Invalid(e)) => assert_eq!(e[0].field, "event_time"),
            other => panic!("expected too old, got {other:?}"),
        }
    }

    #[test]
    fn the_fingerprint_ignores_the_id_and_the_value_spelling_but_not_the_payload() {
        let a = decode(r#"{"event_id":"a","customer_id":"c","event_type":"t","event_time":"2024-01-15T14:30:00Z","value":"1.50"}"#).unwrap();
        let b = decode(r#"{"event_id":"b","customer_id":"c","event_type":"t","event_time":"2024-01-15T14:30:00Z","value":1.5}"#).unwrap();
        let c = decode(r#"{"event_id":"a","customer_id":"c","event_type":"t","event_time":"2024-01-15T14:30:00Z","value":2}"#).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
    }
}
