//! `meterflow import FILE.csv`: a CSV file of events, converted to JSON Lines first, then imported as
//! any JSON Lines file (the same decode and validation, dedup, metering; or produced to Kafka).
//!
//! ```text
//!  FILE.csv ──csv reader (RFC 4180: quoted fields, line breaks in them)──► one JSON event a line
//!      header: event_id, customer_id, event_type, event_time, value  (value may be left out: 1)
//!              properties (a JSON object's text)  or  any other columns (each a string property)
//!      a record with more or fewer cells than the header ──► a dead letter (CSV_FIELDS), not converted
//!      an empty cell ──► the field left out (the decoder then says what is missing)
//! ```
//! The converted file is written beside the system's temporary files and removed when the import
//! ends. Line N of it is record N of the CSV file (1 = the first after the header; a record not
//! converted leaves a blank line), so a dead letter names its record.

use std::fs::File;
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

    /// The record as one JSON event on one line (no line break in it: JSON escapes them).
    fn write_event(&self, record: &csv::StringRecord, out: &mut Vec<u8>) -> Result<()> {
        out.push(b'{');
        let mut first = true;
        let mut key = |out: &mut Vec<u8>, name: &str| -> Result<()> {
            if !std::mem::take(&mut first) {
                out.push(b',');
            }
            serde_json::to_writer(&mut *out, name)?;
            out.push(b':');
            Ok(())
        };
        for (field, at) in &self.fields {
            let Some(cell) = record.get(*at).filter(|c| !c.is_empty()) else {
                continue;
            };
            key(out, field)?;
            serde_json::to_writer(&mut *out, cell)?;
        }
        match &self.properties {
            Properties::Json(at) => {
                if let Some(cell) = record.get(*at).filter(|c| !c.trim().is_empty()) {
                    key(out, "properties")?;
                    // As given: the decoder checks it is a flat JSON object. Line breaks between
                    // its tokens are blanks; inside its strings they are not allowed unescaped.
                    out.extend(
                        cell.bytes()
                            .map(|b| if b == b'\n' || b == b'\r' { b' ' } else { b }),
                    );
                }
            }
            Properties::Columns(columns) => {
                let mut cells = columns
                    .iter()
                    .filter_map(|(name, at)| {
                        Some((name, record.get(*at).filter(|c| !c.is_empty())?))
                    })
                    .peekable();
                if cells.peek().is_some() {
                    key(out, "properties")?;
                    let map: serde_json::Map<String, serde_json::Value> = cells
                        .map(|(name, cell)| (name.clone(), serde_json::Value::from(cell)))
                        .collect();
                    serde_json::to_writer(&mut *out, &map)?;
                }
            }
        }
        out.extend_from_slice(b"}\n");
        Ok(())
    }
}

/// The JSON Lines file a CSV file became, removed when dropped.
pub(super) struct Converted {
    pub path: PathBuf,
    /// Records with more or fewer cells than the header: not converted, each a dead letter.
    pub bad_records: u64,
    /// The first few of them: `record N: …`.
    pub bad_samples: Vec<String>,
}

impl Drop for Converted {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Converts the CSV file `csv` into JSON Lines, one event a line.
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
    let path = std::env::temp_dir().join(format!(
        "meterflow-import-{}-{}.jsonl",
        std::process::id(),
        rand::random::<u32>()
    ));
    let mut converted = Converted {
        path,
        bad_records: 0,
        bad_samples: Vec::new(),
    };
    let file = File::create(&converted.path)
        .with_context(|| format!("creating {}", converted.path.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut line = Vec::with_capacity(512);
    let mut record = csv::StringRecord::new();
    let mut number = 0u64;
    while reader
        .read_record(&mut record)
        .with_context(|| format!("reading {} after record {number}", csv.display()))?
    {
        number += 1;
        if record.len() != columns.width {
            converted.bad_records += 1;
            if converted.bad_samples.len() < samples {
                converted.bad_samples.push(format!(
                    "record {number}: CSV_FIELDS: {} cells, the header has {}",
                    record.len(),
                    columns.width
                ));
            }
            // A blank line (skipped), so that line N of the JSON Lines is record N of the CSV.
            out.write_all(b"\n")?;
            continue;
        }
        line.clear();
        columns.write_event(&record, &mut line)?;
        out.write_all(&line)?;
    }
    out.flush()
        .with_context(|| format!("writing {}", converted.path.display()))?;
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
        assert_eq!(converted.bad_records, 1);
        assert_eq!(
            converted.bad_samples,
            vec!["record 3: CSV_FIELDS: 3 cells, the header has 6"]
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
