//! `COPY … FROM STDIN` in its text format, for what stores new events in bulk: the pipeline's claims
//! fast path (`claims.rs`), and the `e2e` benchmark's baseline and floor, which must write what the
//! pipeline writes. One spelling of a field, a time and a raw row.
//!
//! ```text
//!  field  ──escape──►  \\ \t \n \r          (everything else as it is)
//!  time   ──────────►  2024-01-15T14:00:00.000000Z   (None: no calendar date; the caller's statement refuses it)
//!  events ──────────►  telemetry_events rows, by customer, event type and time (their index's order),
//!                      each with the time its caller spelled once
//! ```

use std::fmt::Write as _;

use meterflow_model::Event;

/// A field in `COPY`'s text format: backslash, tab, newline and carriage return escaped.
pub fn escape(field: &str, out: &mut String) {
    for ch in field.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            _ => out.push(ch),
        }
    }
}

/// An event time (microseconds since the epoch) as a `timestamptz` literal; `None` past the calendar.
pub fn time(micros: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
}

/// The raw rows of `events` for `COPY telemetry_events (event_id, customer_id, event_type, event_time,
/// value, properties)`, ordered by customer, event type and time, the order of their index. Each event
/// comes with its [`time`], which the caller spells once for this and its claim.
pub fn telemetry_rows<'e>(events: impl IntoIterator<Item = (&'e Event, &'e str)>) -> Vec<u8> {
    let mut events: Vec<(&Event, &str)> = events.into_iter().collect();
    events.sort_unstable_by(|(a, _), (b, _)| {
        (&a.customer_id, &a.event_type, a.event_time_micros).cmp(&(
            &b.customer_id,
            &b.event_type,
            b.event_time_micros,
        ))
    });
    let mut rows = String::with_capacity(events.len() * 160);
    for (e, time) in events {
        escape(&e.event_id, &mut rows);
        rows.push('\t');
        escape(&e.customer_id, &mut rows);
        rows.push('\t');
        escape(&e.event_type, &mut rows);
        let _ = write!(rows, "\t{time}\t{}\t", e.value);
        escape(&e.properties, &mut rows);
        rows.push('\n');
    }
    rows.into_bytes()
}

/// The distinct (customer, event type) pairs of `events`, sorted, as the two arrays
/// `meterflow_note_event_types` takes (migration 0016): sorted, so concurrent writers lock the
/// event-type rows in one order.
pub fn event_type_pairs<'e>(
    events: impl IntoIterator<Item = &'e Event>,
) -> (Vec<String>, Vec<String>) {
    let pairs: std::collections::BTreeSet<(&str, &str)> = events
        .into_iter()
        .map(|e| (e.customer_id.as_str(), e.event_type.as_str()))
        .collect();
    pairs
        .into_iter()
        .map(|(c, t)| (c.to_owned(), t.to_owned()))
        .unzip()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_and_times_are_spelled_for_copy() {
        let mut out = String::new();
        escape("a\\b\tc\nd\re", &mut out);
        assert_eq!(out, "a\\\\b\\tc\\nd\\re");
        assert_eq!(time(0).as_deref(), Some("1970-01-01T00:00:00.000000Z"));
        assert_eq!(time(i64::MAX), None);
    }
}
