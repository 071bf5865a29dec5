//! `meterflow import FILE.csv`: a CSV file of events, converted to JSON Lines first, then imported as
//! any JSON Lines file (the same decode and validation, dedup, metering; or produced to Kafka).
//!
//! ```text
//!  FILE.csv ──csv reader (RFC 4180: quoted fields, line breaks in them)──► one JSON event a line
//!      header: event_id, customer_id, event_type, event_time, value  (value may be left out: 1)
//!              properties (a JSON object's text)  or  any other columns (each a string property)
//!      a record with more or fewer cells than the header ──► a dead letter (CSV_FIELDS), not converted
//!      a record that is not UTF-8 ──► a dead letter (CSV_UTF8)
//!      a properties cell that is not one JSON value ──► a dead letter (CSV_PROPERTIES)
//!      an empty cell ──► the field left out (the decoder then says what is missing)
//! ```
//! The converted file is written beside the system's temporary files and removed when the import
//! ends. Line N of it is record N of the CSV file (1 = the first after the header; a record not
//! converted leaves a blank line), so a dead letter names its record (and one found here, its line
//! in the file too: a quoted cell may span lines). Without `--csv` the records not converted are
//! reported and not produced.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The event fields a CSV file's header names; `properties` or other columns make the properties.
const FIELDS: [&str; 5] = [
    "event_id",
    "customer_id",
    "event_type",
    "event_time",
    "value",
];

/// Where each event field is in a record, and what becomes the properties.
#[derive(Debug)]
struct Columns {
    /// (field, column) for each of `FIELDS` the header has.
    fields: Vec<(&'static str, usize)>,
    properties: Properties,
    /// Cells a record must have: the header's.
    width: usize,
}

#[derive(Debug)]
enum Properties {
    /// A `properties` column holding a JSON object's text.
    Json(usize),
    /// Every other column, each a string property under its header name (an empty cell is absent).
    Columns(Vec<(String, usize)>),
}

impl Columns {
    fn of(header: &csv::StringRecord) -> Result<Columns> {
        let position = |name: &str| header.iter().position(|h| h.trim() == name);
        let missing: Vec<&str> = FIELDS
            .iter()
            .take(4)
            .copied()
            .filter(|f| position(f).is_none())
            .collect();
        if !missing.is_empty() {
            bail!(
                "the CSV header lacks {}: its first line must name the columns, at least \
                 event_id,customer_id,event_type,event_time (value, and properties or any other \
                 columns, are optional)",
                missing.join(", ")
            );
        }
        let fields = FIELDS
            .iter()
            .filter_map(|f| Some((*f, position(f)?)))
            .collect();
        let others: Vec<(String, usize)> = header
            .iter()
            .enumerate()
            .filter(|(_, h)| !FIELDS.contains(&h.trim()) && h.trim() != "properties")
            .map(|(i, h)| (h.trim().to_owned(), i))
            .collect();
        let properties = match position("properties") {
            Some(_) if !others.is_empty() => bail!(
                "the CSV header has a properties column and other columns ({}): give the \
                 properties either as one JSON object in `properties` or as columns, not both",
                others
                    .iter()
                    .map(|(h, _)| h.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Some(at) => Properties::Json(at),
            None => Properties::Columns(others),
        };
        Ok(Columns {
            fields,
            properties,
            width: header.len(),
        })
    }

    /// The record as one JSON event on one line (no line break in it: JSON escapes them), or why it
    /// is a dead letter.
    fn write_event(&self, record: &csv::StringRecord, out: &mut Vec<u8>) -> Result<(), Bad> {
        if record.len() != self.width {
            return Err(Bad::Fields(record.len()));
        }
        let cell = |at: usize| record.get(at).filter(|c| !c.trim().is_empty());
        out.push(b'{');
        let mut first = true;
        let mut key = |out: &mut Vec<u8>, name: &str| {
            if !std::mem::take(&mut first) {
                out.push(b',');
            }
            json_string(out, name);
            out.push(b':');
        };
        for (field, at) in &self.fields {
            if let Some(cell) = cell(*at) {
                key(out, field);
                json_string(out, cell);
            }
        }
        match &self.properties {
            Properties::Json(at) => {
                if let Some(cell) = cell(*at) {
                    // One JSON value, or the record is a dead letter: pasted unchecked, a cell could
                    // end the object early and add fields of its own. The decoder then checks it is
                    // a flat object. Being JSON, it has line breaks only between its tokens, where
                    // they are blanks.
                    if serde_json::from_str::<&serde_json::value::RawValue>(cell).is_err() {
                        return Err(Bad::Properties);
                    }
                    key(out, "properties");
                    out.extend(cell.bytes().map(|b| match b {
                        b'\n' | b'\r' => b' ',
                        b => b,
                    }));
                }
            }
            Properties::Columns(columns) => {
                let mut given = columns
                    .iter()
                    .filter_map(|(name, at)| Some((name, cell(*at)?)))
                    .peekable();
                if given.peek().is_some() {
                    key(out, "properties");
                    out.push(b'{');
                    for (i, (name, cell)) in given.enumerate() {
                        if i > 0 {
                            out.push(b',');
                        }
                        json_string(out, name);
                        out.push(b':');
                        json_string(out, cell);
                    }
                    out.push(b'}');
                }
            }
        }
        out.extend_from_slice(b"}\n");
        Ok(())
    }
}

/// Why a record is a dead letter before it is an event.
#[derive(Debug, PartialEq)]
enum Bad {
    /// More or fewer cells than the header: this many.
    Fields(usize),
    /// Not UTF-8.
    Utf8,
    /// A `properties` cell that is not one JSON value.
    Properties,
}

impl Bad {
    fn code(&self) -> &'static str {
        match self {
            Bad::Fields(_) => "CSV_FIELDS",
            Bad::Utf8 => "CSV_UTF8",
            Bad::Properties => "CSV_PROPERTIES",
        }
    }

    fn reason(&self, width: usize) -> String {
        match self {
            Bad::Fields(n) => format!("{n} cells, the header has {width}"),
            Bad::Utf8 => "not UTF-8".to_owned(),
            Bad::Properties => "the properties cell is not one JSON value".to_owned(),
        }
    }
}

/// `text` as a JSON string.
fn json_string(out: &mut Vec<u8>, text: &str) {
    // Writing a `str` into a `Vec` cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

/// The JSON Lines file a CSV file became, removed when dropped.
pub(super) struct Converted {
    pub path: PathBuf,
    /// Records that were not converted, each a dead letter: how many by reason.
    pub bad_reasons: BTreeMap<&'static str, u64>,
    /// The first few of them: `record N (line L): CODE: …`.
    pub bad_samples: Vec<String>,
}

impl Converted {
    /// How many records were not converted.
    pub fn bad_records(&self) -> u64 {
        self.bad_reasons.values().sum()
    }
}

impl Drop for Converted {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Converts the CSV file `csv` into JSON Lines, one event a line; `samples` bad records are kept
/// as samples.
pub(super) fn to_json_lines(csv: &Path, samples: usize) -> Result<Converted> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(csv)
        .with_context(|| format!("opening {}", csv.display()))?;
    let header = reader
        .headers()
        .with_context(|| format!("reading the header of {}", csv.display()))?
        .clone();
    let columns = Columns::of(&header).with_context(|| csv.display().to_string())?;
    let mut converted = Converted {
        path: std::env::temp_dir().join(format!(
            "meterflow-import-{}-{}.jsonl",
            std::process::id(),
            rand::random::<u64>()
        )),
        bad_reasons: BTreeMap::new(),
        bad_samples: Vec::new(),
    };
    let writing = format!(
        "writing {} (the JSON Lines of {}; is the temporary directory full?)",
        converted.path.display(),
        csv.display()
    );
    // A new file of its own: never one a name already stands for.
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&converted.path)
        .with_context(|| writing.clone())?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut line = Vec::with_capacity(512);
    let mut bytes = csv::ByteRecord::new();
    let mut number = 0u64;
    while reader
        .read_byte_record(&mut bytes)
        .with_context(|| format!("reading {} after record {number}", csv.display()))?
    {
        number += 1;
        line.clear();
        let at = bytes.position().map_or(0, |p| p.line());
        // The record is checked as text where it lies (no copy), and its buffer taken back for the
        // next read.
        let event = match csv::StringRecord::from_byte_record(std::mem::take(&mut bytes)) {
            Ok(record) => {
                let event = columns.write_event(&record, &mut line);
                bytes = record.into_byte_record();
                event
            }
            Err(e) => {
                bytes = e.into_byte_record();
                Err(Bad::Utf8)
            }
        };
        if let Err(bad) = event {
            *converted.bad_reasons.entry(bad.code()).or_default() += 1;
            if converted.bad_samples.len() < samples {
                converted.bad_samples.push(format!(
                    "record {number} (line {at}): {}: {}",
                    bad.code(),
                    bad.reason(columns.width)
                ));
            }
            // A blank line (skipped), so that line N of the JSON Lines is record N of the CSV.
            line.clear();
            line.push(b'\n');
        }
        out.write_all(&line).with_context(|| writing.clone())?;
    }
    out.flush().with_context(|| writing.clone())?;
    Ok(converted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convert(text: &str) -> Result<(Vec<serde_json::Value>, Converted)> {
        let dir = std::env::temp_dir().join(format!("mf-csv-in-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir)?;
        let csv = dir.join("events.csv");
        std::fs::write(&csv, text)?;
        let converted = to_json_lines(&csv, 5)?;
        let events = std::fs::read_to_string(&converted.path)?
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        std::fs::remove_dir_all(&dir)?;
        Ok((events, converted))
    }

    /// Quoted cells (commas, quotes, a line break) and extra columns become one JSON line each, as
    /// the decoder reads them; an empty cell is left out; a record of the wrong width is a dead
    /// letter; the converted file goes when the import ends.
    #[test]
    fn records_become_json_events_and_bad_records_dead_letters() {
        let (events, converted) = convert(
            "event_id,customer_id,event_type,event_time,value,region\n\
             e1,c1,api_call,2024-01-15T00:00:00Z,1.5,eu\n\
             \"e,2\",\"c \"\"1\"\"\",api_call,2024-01-15T00:00:01Z,,\"line\nbreak\"\n\
             e3,c1,api_call\n",
        )
        .unwrap();
        assert_eq!(
            events,
            vec![
                serde_json::json!({"event_id": "e1", "customer_id": "c1", "event_type": "api_call",
                    "event_time": "2024-01-15T00:00:00Z", "value": "1.5", "properties": {"region": "eu"}}),
                serde_json::json!({"event_id": "e,2", "customer_id": "c \"1\"", "event_type": "api_call",
                    "event_time": "2024-01-15T00:00:01Z", "properties": {"region": "line\nbreak"}}),
            ]
        );
        assert_eq!(converted.bad_records(), 1);
        assert_eq!(
            converted.bad_samples,
            vec!["record 3 (line 5): CSV_FIELDS: 3 cells, the header has 6"]
        );
        let path = converted.path.clone();
        drop(converted);
        assert!(!path.exists());
    }

    /// A `properties` column is a JSON object's text, kept as given.
    #[test]
    fn a_properties_column_is_taken_as_json() {
        let (events, _) = convert(
            "event_id,customer_id,event_type,event_time,properties\n\
             e1,c1,api_call,2024-01-15T00:00:00Z,\"{\"\"tokens\"\": 7}\"\n",
        )
        .unwrap();
        assert_eq!(events[0]["properties"], serde_json::json!({"tokens": 7}));
    }

    /// A record that is not UTF-8, and a properties cell that is not one JSON value (one that would
    /// close the object and add a field of its own), are dead letters; the records after them are
    /// converted, and line N is still record N.
    #[test]
    fn a_record_that_cannot_be_an_event_is_a_dead_letter_not_a_stop() {
        let dir = std::env::temp_dir().join(format!("mf-csv-in-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let csv = dir.join("events.csv");
        let mut text = b"event_id,customer_id,event_type,event_time,properties\n".to_vec();
        text.extend_from_slice(b"e1,c\xff,api_call,2024-01-15T00:00:00Z,\n");
        text.extend_from_slice(
            b"e2,c1,api_call,2024-01-15T00:00:00Z,\"{}, \"\"value\"\": \"\"9\"\"\"\n",
        );
        text.extend_from_slice(b"e3,c1,api_call,2024-01-15T00:00:00Z,\"{\"\"a\"\":\n1}\"\n");
        std::fs::write(&csv, text).unwrap();
        let converted = to_json_lines(&csv, 5).unwrap();
        let lines: Vec<String> = std::fs::read_to_string(&converted.path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        assert_eq!(lines[..2], ["", ""]);
        let third: serde_json::Value = serde_json::from_str(&lines[2]).unwrap();
        assert_eq!(third["properties"], serde_json::json!({"a": 1}));
        assert_eq!(
            converted.bad_reasons,
            BTreeMap::from([("CSV_PROPERTIES", 1), ("CSV_UTF8", 1)])
        );
        assert_eq!(
            converted.bad_samples,
            vec![
                "record 1 (line 2): CSV_UTF8: not UTF-8",
                "record 2 (line 3): CSV_PROPERTIES: the properties cell is not one JSON value",
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A header that lacks a field, or mixes a properties column with other columns, is refused
    /// with what to do.
    #[test]
    fn a_header_that_cannot_be_read_says_what_it_needs() {
        let e = convert("id,customer_id,event_type,event_time\n")
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("lacks event_id"), "{e:#}");
        let e = convert("event_id,customer_id,event_type,event_time,properties,region\n")
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("not both"), "{e:#}");
    }
}
