//! Reading `COPY (…) TO STDOUT (FORMAT binary)`: a restart's bulk reads of the committed rows and
//! charges (`restore.rs`), without a query's per-row protocol and sqlx's per-row decoding. Lighter on
//! the client, it lets two Postgres backends serve rows and charges at once on two cores: a 1M-window
//! state loads in 1.7 s instead of 2.5 s (`perf/RESULTS.md`, recovery).
//!
//! ```text
//!  header  "PGCOPY\n\xff\r\n\0" · flags i32 · extension length i32 · extension
//!  tuple   field count i16 (-1: the end) · per field: length i32 (-1: NULL) · its bytes
//! ```
//! Every number is big-endian. The statements select only text, `bigint`, `timestamptz` and `boolean`
//! columns (numerics and jsonb as their text), so each field decodes without Postgres's binary numeric.

use std::ops::Range;
use std::str::FromStr;

use futures::TryStreamExt;
use rust_decimal::Decimal;
use sqlx::PgConnection;

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// Runs `statement` (a `COPY … TO STDOUT (FORMAT binary)`) and hands each tuple to `each` as it
/// arrives. A stream that breaks the format, or a field `each` cannot decode, is an error.
pub(super) async fn each_tuple(
    conn: &mut PgConnection,
    statement: &str,
    mut each: impl FnMut(&Tuple<'_>) -> Result<(), sqlx::Error>,
) -> Result<(), sqlx::Error> {
    let mut stream = conn.copy_out_raw(statement).await?;
    let mut reader = Reader::default();
    while let Some(chunk) = stream.try_next().await? {
        reader.buffer.extend_from_slice(&chunk);
        while let Some(tuple) = reader.next_tuple()? {
            each(&tuple)?;
        }
        reader.compact();
    }
    if !reader.ended {
        return Err(malformed("the stream ended before its trailer"));
    }
    Ok(())
}

/// The bytes received and not yet read, and how far the reading got.
#[derive(Default)]
struct Reader {
    buffer: Vec<u8>,
    at: usize,
    header_read: bool,
    ended: bool,
    /// Where each field of the current tuple lies in `buffer` (`None`: NULL).
    fields: Vec<Option<Range<usize>>>,
}

impl Reader {
    /// The next whole tuple in the buffer; `None` if it needs more bytes (or the trailer was read).
    fn next_tuple(&mut self) -> Result<Option<Tuple<'_>>, sqlx::Error> {
        if self.ended {
            return Ok(None);
        }
        if !self.header_read {
            let Some(fixed) = self.buffer.get(self.at..self.at.saturating_add(19)) else {
                return Ok(None);
            };
            if fixed.get(..SIGNATURE.len()) != Some(SIGNATURE) {
                return Err(malformed("no binary COPY signature"));
            }
            let extension = i32_at(fixed, 15).unwrap_or(-1);
            let extension =
                usize::try_from(extension).map_err(|_| malformed("a negative header extension"))?;
            let end = self.at.saturating_add(19).saturating_add(extension);
            if self.buffer.len() < end {
                return Ok(None);
            }
            self.at = end;
            self.header_read = true;
        }
        let mut at = self.at;
        let Some(count) = self.buffer.get(at..).and_then(|b| i16_at(b, 0)) else {
            return Ok(None);
        };
        at = at.saturating_add(2);
        if count == -1 {
            self.at = at;
            self.ended = true;
            return Ok(None);
        }
        let count = usize::try_from(count).map_err(|_| malformed("a negative field count"))?;
        self.fields.clear();
        for _ in 0..count {
            let Some(length) = self.buffer.get(at..).and_then(|b| i32_at(b, 0)) else {
                return Ok(None);
            };
            at = at.saturating_add(4);
            if length < 0 {
                self.fields.push(None);
                continue;
            }
            let end = at.saturating_add(usize::try_from(length).unwrap_or(usize::MAX));
            if self.buffer.len() < end {
                return Ok(None);
            }
            self.fields.push(Some(at..end));
            at = end;
        }
        self.at = at;
        Ok(Some(Tuple {
            buffer: &self.buffer,
            fields: &self.fields,
        }))
    }

    /// Drops the bytes already read, once they are most of the buffer.
    fn compact(&mut self) {
        if self.at > self.buffer.len() / 2 {
            self.buffer.drain(..self.at);
            self.at = 0;
        }
    }
}

/// One row of a binary COPY, its fields by position.
pub(super) struct Tuple<'a> {
    buffer: &'a [u8],
    fields: &'a [Option<Range<usize>>],
}

impl Tuple<'_> {
    /// Field `i`'s bytes; NULL or a missing field is an error (the statements select none).
    fn bytes(&self, i: usize) -> Result<&[u8], sqlx::Error> {
        self.fields
            .get(i)
            .cloned()
            .flatten()
            .and_then(|range| self.buffer.get(range))
            .ok_or_else(|| malformed(&format!("field {i} is NULL or missing")))
    }

    /// Field `i` as text.
    pub(super) fn text(&self, i: usize) -> Result<&str, sqlx::Error> {
        std::str::from_utf8(self.bytes(i)?)
            .map_err(|_| malformed(&format!("field {i} is not UTF-8")))
    }

    /// Field `i`, a `bigint`.
    pub(super) fn int8(&self, i: usize) -> Result<i64, sqlx::Error> {
        let bytes: [u8; 8] = self
            .bytes(i)?
            .try_into()
            .map_err(|_| malformed(&format!("field {i} is not a bigint")))?;
        Ok(i64::from_be_bytes(bytes))
    }

    /// Field `i`, a `timestamptz` (microseconds since 2000-01-01 UTC), as whole seconds since the
    /// Unix epoch, rounded down.
    pub(super) fn timestamp_secs(&self, i: usize) -> Result<i64, sqlx::Error> {
        const UNIX_TO_2000_SECS: i64 = 946_684_800;
        self.int8(i)?
            .div_euclid(1_000_000)
            .checked_add(UNIX_TO_2000_SECS)
            .ok_or_else(|| malformed(&format!("field {i} is no finite timestamp")))
    }

    /// Field `i`, a `boolean`.
    pub(super) fn boolean(&self, i: usize) -> Result<bool, sqlx::Error> {
        match self.bytes(i)? {
            [b] => Ok(*b != 0),
            _ => Err(malformed(&format!("field {i} is not a boolean"))),
        }
    }

    /// Field `i`, a numeric's text.
    pub(super) fn decimal(&self, i: usize) -> Result<Decimal, sqlx::Error> {
        let text = self.text(i)?;
        Decimal::from_str(text).map_err(|e| {
            sqlx::Error::Decode(format!("field {i}: {text:?} is not a decimal: {e}").into())
        })
    }

    /// Field `i`, a value its text parses into (a jsonb's text into `Dimensions`).
    pub(super) fn parsed<T: FromStr>(&self, i: usize) -> Result<T, sqlx::Error>
    where
        T::Err: std::fmt::Display,
    {
        let text = self.text(i)?;
        T::from_str(text).map_err(|e| sqlx::Error::Decode(format!("field {i}: {e}").into()))
    }
}

fn i16_at(bytes: &[u8], at: usize) -> Option<i16> {
    let b: [u8; 2] = bytes.get(at..at.checked_add(2)?)?.try_into().ok()?;
    Some(i16::from_be_bytes(b))
}

fn i32_at(bytes: &[u8], at: usize) -> Option<i32> {
    let b: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(i32::from_be_bytes(b))
}

fn malformed(why: &str) -> sqlx::Error {
    sqlx::Error::Protocol(format!("reading a binary COPY: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binary COPY stream of `tuples` (each field `None` for NULL).
    fn stream(tuples: &[Vec<Option<Vec<u8>>>]) -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.extend(0i32.to_be_bytes());
        out.extend(0i32.to_be_bytes());
        for t in tuples {
            out.extend((t.len() as i16).to_be_bytes());
            for f in t {
                match f {
                    Some(b) => {
                        out.extend((b.len() as i32).to_be_bytes());
                        out.extend(b);
                    }
                    None => out.extend((-1i32).to_be_bytes()),
                }
            }
        }
        out.extend((-1i16).to_be_bytes());
        out
    }

    /// Feeds `bytes` in chunks of `size`, collecting field 0 as text and field 1 as a bigint.
    fn read(bytes: &[u8], size: usize) -> Result<(Vec<(String, i64)>, bool), sqlx::Error> {
        let mut reader = Reader::default();
        let mut seen = Vec::new();
        for chunk in bytes.chunks(size) {
            reader.buffer.extend_from_slice(chunk);
            while let Some(t) = reader.next_tuple()? {
                seen.push((t.text(0)?.to_owned(), t.int8(1)?));
            }
            reader.compact();
        }
        Ok((seen, reader.ended))
    }

    #[test]
    fn tuples_split_anywhere_across_chunks_read_whole() {
        let tuples: Vec<_> = (0..50)
            .map(|i: i64| {
                vec![
                    Some(format!("c{i}").into_bytes()),
                    Some((i * 1_000_003).to_be_bytes().to_vec()),
                ]
            })
            .collect();
        let bytes = stream(&tuples);
        for size in [1, 2, 3, 7, 19, 64, 4096] {
            let (seen, ended) = read(&bytes, size).unwrap();
            assert!(ended, "chunks of {size}");
            assert_eq!(seen.len(), 50);
            assert_eq!(seen[49], ("c49".to_owned(), 49 * 1_000_003));
        }
    }

    #[test]
    fn a_broken_stream_is_an_error_never_a_panic() {
        let good = stream(&[vec![Some(b"a".to_vec()), Some(7i64.to_be_bytes().to_vec())]]);
        let mut wrong_signature = good.clone();
        wrong_signature[0] = b'X';
        assert!(read(&wrong_signature, 64).is_err());
        // A NULL, a short bigint, bad UTF-8.
        for tuple in [
            vec![None, Some(7i64.to_be_bytes().to_vec())],
            vec![Some(b"a".to_vec()), Some(vec![1, 2])],
            vec![Some(vec![0xff, 0xfe]), Some(7i64.to_be_bytes().to_vec())],
            vec![Some(b"a".to_vec())],
        ] {
            assert!(read(&stream(&[tuple]), 5).is_err());
        }
        // Cut short: no trailer, no panic.
        let (_, ended) = read(&good[..good.len() - 1], 3).unwrap();
        assert!(!ended);
        // A length past the end of the stream only waits for more.
        let mut huge = stream(&[]);
        huge.truncate(huge.len() - 2);
        huge.extend(1i16.to_be_bytes());
        huge.extend(i32::MAX.to_be_bytes());
        let (seen, ended) = read(&huge, 8).unwrap();
        assert!(seen.is_empty() && !ended);
    }
}
