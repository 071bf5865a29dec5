//! List responses: `{"data": […], "next_cursor": …}`, page sizes, and opaque keyset cursors.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::ApiError;

/// The largest page a client may ask for (SPEC §8).
pub const MAX_LIMIT: i64 = 1000;
const DEFAULT_LIMIT: i64 = 100;

/// One page of a list, in order.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    pub data: Vec<T>,
    /// Pass as `cursor` for the next page; null on the last.
    #[schema(required = true)]
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// A page from up to `limit + 1` rows in order: an extra row only says that a next page exists,
    /// whose cursor is the key of this page's last row.
    pub fn from_overfetched(
        mut data: Vec<T>,
        limit: i64,
        cursor_of: impl Fn(&T) -> String,
    ) -> Self {
        let next_cursor = if data.len() as i64 > limit {
            data.truncate(limit as usize);
            data.last().map(cursor_of)
        } else {
            None
        };
        Page { data, next_cursor }
    }
}

pub fn limit(requested: Option<i64>) -> Result<i64, ApiError> {
    match requested {
        None => Ok(DEFAULT_LIMIT),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_LIMIT}, not {n}"
        ))),
    }
}

/// The last row's key of a page: (customer_id, meter, window_start, and for window lists the
/// dimension values as JSON text, else empty). Encoded as hex of a NUL-separated string: opaque to
/// clients, trivially safe in a URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor(pub String, pub String, pub DateTime<Utc>, pub String);

impl Cursor {
    /// A cursor of a list keyed by two names and an instant.
    pub fn of(first: String, second: String, at: DateTime<Utc>) -> Self {
        Cursor(first, second, at, String::new())
    }

    pub fn encode(&self) -> String {
        let plain = format!(
            "{}\0{}\0{}\0{}",
            self.0,
            self.1,
            self.2.timestamp_micros(),
            self.3
        );
        plain.bytes().map(|b| format!("{b:02x}")).collect()
    }

    pub fn decode(text: &str) -> Result<Self, ApiError> {
        let bad = || ApiError::BadRequest("cursor is not one this API returned".into());
        if !text.len().is_multiple_of(2) || text.len() > 4096 {
            return Err(bad());
        }
        let bytes = (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(text.get(i..i + 2).ok_or_else(bad)?, 16).map_err(|_| bad()))
            .collect::<Result<Vec<u8>, _>>()?;
        let plain = String::from_utf8(bytes).map_err(|_| bad())?;
        let mut parts = plain.split('\0');
        let (Some(c), Some(m), Some(t), Some(d), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad());
        };
        let micros: i64 = t.parse().map_err(|_| bad())?;
        let at = DateTime::from_timestamp_micros(micros).ok_or_else(bad)?;
        Ok(Cursor(c.to_owned(), m.to_owned(), at, d.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_decodes_to_what_was_encoded_and_garbage_is_refused() {
        let c = Cursor(
            "cust_1".into(),
            "api_call".into(),
            DateTime::from_timestamp(1_705_327_200, 0).unwrap(),
            r#"{"model":"large"}"#.into(),
        );
        assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
        for bad in ["zz", "abc", "00", ""] {
            assert!(Cursor::decode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn page_sizes_are_bounded() {
        assert_eq!(limit(None).unwrap(), 100);
        assert!(limit(Some(0)).is_err());
        assert!(limit(Some(1001)).is_err());
    }
}
