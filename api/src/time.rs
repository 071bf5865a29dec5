//! Instants at the API's edge: RFC 3339 in, and the seed's inclusive ends (SPEC §12).

use chrono::{DateTime, Duration, Utc};

/// An end of a range as a client wrote it. `…T23:59:59.999Z` (the last millisecond, microsecond or
/// nanosecond of a second) is the seed's way of writing an inclusive end: it means the exclusive instant
/// that follows (`…+1 ms`). Any other instant is taken as the exclusive end it already is.
pub fn exclusive_end(t: DateTime<Utc>) -> DateTime<Utc> {
    let nanos = t.timestamp_subsec_nanos();
    for unit in [1_000_000, 1_000, 1] {
        if nanos.is_multiple_of(unit) && nanos + unit == 1_000_000_000 {
            return t + Duration::nanoseconds(i64::from(unit));
        }
    }
    t
}

/// Parses an RFC 3339 timestamp with an offset, as UTC.
pub fn parse_rfc3339(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        parse_rfc3339(text).unwrap()
    }

    #[test]
    fn the_last_instant_of_a_second_means_the_next_second() {
        for inclusive in [
            "2024-01-31T23:59:59.999Z",
            "2024-01-31T23:59:59.999999Z",
            "2024-01-31T23:59:59.999999999Z",
        ] {
            assert_eq!(exclusive_end(at(inclusive)), at("2024-02-01T00:00:00Z"));
        }
    }

    #[test]
    fn other_instants_are_already_exclusive_ends() {
        for t in [
            "2024-02-01T00:00:00Z",
            "2024-01-31T23:59:59Z",
            "2024-01-31T23:59:59.998Z",
            "2024-01-31T23:59:59.9999Z",
        ] {
            assert_eq!(exclusive_end(at(t)), at(t));
        }
        assert!(parse_rfc3339("2024-01-31").is_none());
        assert!(
            parse_rfc3339("2024-01-31T10:00:00").is_none(),
            "an offset is required"
        );
    }
}
