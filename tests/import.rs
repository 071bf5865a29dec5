//! `meterflow import FILE`: the `--csv` engine against a brute-force reference (duplicates, conflicting
//! copies, invalid lines, blank lines, late and out-of-order times, several workers), and the stored mode
//! (through Kafka and the running pipeline) counting every event once when the same file is imported twice.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;

fn temp_file(name: &str) -> PathBuf {
    std::env::temp_dir().join(unique(name))
}

/// One line of the file and what the reference makes of it.
struct Line {
    text: String,
    /// `(id, customer, type, event time in seconds, value)` when the line is a valid event.
    event: Option<(String, String, String, i64, Decimal)>,
}

/// A file of `n` lines over 6 hours, in no time order: copies of earlier ids (identical, and some with
/// another value: conflicting), invalid lines (bad JSON, a negative value, a bad time), blank lines, CRLF.
fn lines(n: usize, seed: u64) -> Vec<Line> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut out: Vec<Line> = Vec::new();
    let mut ids: Vec<usize> = Vec::new();
    let mut valid: Vec<usize> = Vec::new();
    for i in 0..n {
        let roll = rng.random_range(0..100);
        if roll < 3 {
            out.push(Line {
                text: ["", "   ", "\r"][rng.random_range(0..3)].to_owned(),
                event: None,
            });
            continue;
        }
        if roll < 6 {
            let text = match rng.random_range(0..3) {
                0 => r#"{"event_id":"broken","#.to_owned(),
                1 => format!(
                    r#"{{"event_id":"neg_{i}","customer_id":"c1","event_type":"api_call","event_time":"2024-01-15T10:00:00Z","value":"-1"}}"#
                ),
                _ => format!(
                    r#"{{"event_id":"time_{i}","customer_id":"c1","event_type":"api_call","event_time":"yesterday"}}"#
                ),
            };
            out.push(Line { text, event: None });
            continue;
        }
        // A verbatim copy of an earlier event (an identical duplicate)...
        if roll < 11 && !valid.is_empty() {
            let earlier: &Line = &out[valid[rng.random_range(0..valid.len())]];
            let copy = Line {
                text: earlier.text.clone(),
                event: earlier.event.clone(),
            };
            valid.push(out.len());
            out.push(copy);
            continue;
        }
        // ... a copy of an earlier id with other fields (a conflicting one), or a fresh event.
        let id = if roll < 16 && !ids.is_empty() {
            format!("evt_{}", ids[rng.random_range(0..ids.len())])
        } else {
            ids.push(i);
            format!("evt_{i}")
        };
        let customer = format!("cust_{}", rng.random_range(0..30));
        let event_type = ["api_call", "tokens", "storage_gb"][rng.random_range(0..3)].to_owned();
        // Six hours of 2024-01-15 in random order: every line is late or early for its neighbours.
        let time = 1_705_312_800 + rng.random_range(0..6 * 3600);
        let value = Decimal::new(rng.random_range(0..1_000_000), rng.random_range(0..4));
        let stamp = chrono::DateTime::from_timestamp(time, 0)
            .unwrap()
            .format("%Y-%m-%dT%H:%M:%SZ");
        let cr = if rng.random_range(0..10) == 0 {
            "\r"
        } else {
            ""
        };
        let text = format!(
            r#"{{"event_id":"{id}","customer_id":"{customer}","event_type":"{event_type}","event_time":"{stamp}","value":"{value}","properties":{{"region":"eu"}}}}{cr}"#
        );
        valid.push(out.len());
        out.push(Line {
            text,
            event: Some((id, customer, event_type, time, value)),
        });
    }
    out
}

fn write(path: &Path, lines: &[Line]) {
    let text: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
    std::fs::write(path, text.join("\n")).unwrap();
}

/// The brute-force reference: the first copy of each id in file order counts; hourly sum and count per
/// customer and type. Also (counted, duplicates, dead letters).
fn reference(lines: &[Line]) -> (Aggregates, (usize, usize, usize)) {
    let mut seen = HashSet::new();
    let mut out = Aggregates::new();
    let (mut counted, mut duplicates, mut dead) = (0, 0, 0);
    for line in lines {
        match &line.event {
            None if line.text.trim().is_empty() => {}
            None => dead += 1,
            Some((id, customer, event_type, time, value)) => {
                if !seen.insert(id.clone()) {
                    duplicates += 1;
                    continue;
                }
                counted += 1;
                let e = out
                    .entry((customer.clone(), event_type.clone(), time - time % 3600))
                    .or_default();
                e.0 += *value;
                e.1 += 1;
            }
        }
    }
    (normalized(out), (counted, duplicates, dead))
}

fn read_csv(path: &Path) -> Aggregates {
    let text = std::fs::read_to_string(path).unwrap();
    let mut rows = text.lines();
    assert_eq!(
        rows.next(),
        Some("customer_id,event_type,window_start,value_sum,event_count")
    );
    let mut out = BTreeMap::new();
    for row in rows {
        let f: Vec<&str> = row.split(',').collect();
        assert_eq!(f.len(), 5, "{row}");
        let start = chrono::DateTime::parse_from_rfc3339(f[2])
            .unwrap()
            .timestamp();
        assert!(f[2].ends_with(":00:00Z"), "{row}");
        let previous = out.insert(
            (f[0].to_owned(), f[1].to_owned(), start),
            (
                f[3].parse::<Decimal>().unwrap(),
                f[4].parse::<i64>().unwrap(),
            ),
        );
        assert!(previous.is_none(), "a row appears twice: {row}");
    }
    normalized(out)
}

/// Runs `meterflow import --quiet ARGS --csv OUT INPUT`, which must succeed: its stderr.
fn import_csv(args: &[&str], input: &Path, out: &Path) -> String {
    let run = Command::new(env!("CARGO_BIN_EXE_meterflow"))
        .args(["import", "--quiet"])
        .args(args)
        .arg("--csv")
        .arg(out)
        .arg(input)
        .env("MF_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success(), "{stderr}");
    stderr
}

#[test]
fn csv_equals_a_brute_force_reference_with_duplicates_invalid_lines_and_disorder() {
    let lines = lines(6_000, 3);
    let (expected, (counted, duplicates, dead)) = reference(&lines);
    assert!(duplicates > 300 && dead > 100 && expected.len() > 500);
    let input = temp_file("import-in.jsonl");
    write(&input, &lines);
    let runs = [1, 2, 3, 7]
        .map(|w| ("direct", w))
        .into_iter()
        .chain([("dataflow", 1), ("dataflow", 3)]);
    for (engine, workers) in runs {
        let out = temp_file("import-out.csv");
        let workers_arg = workers.to_string();
        let stderr = import_csv(
            &["--engine", engine, "--workers", &workers_arg],
            &input,
            &out,
        );
        let context = format!("{engine}, {workers} workers");
        assert_same(&read_csv(&out), &expected, &context);
        let summary = format!("{counted} counted, {duplicates} duplicates, {dead} dead letters");
        assert!(stderr.contains(&summary), "{context}: {stderr}");
        assert!(stderr.contains("import: dead letter: line "), "{stderr}");
        std::fs::remove_file(&out).unwrap();
    }
    std::fs::remove_file(&input).unwrap();
}

/// The same events as a CSV file (a `region` column for the property, a quoted cell, CRLF): the same
/// rows as the reference; a record of the wrong width and one with a bad time are dead letters named
/// by their record. The file's name does not end in .csv: `--format csv` says what it is.
#[test]
fn a_csv_file_imports_like_its_json_lines() {
    let lines = lines(3_000, 5);
    let (expected, (counted, duplicates, dead)) = reference(&lines);
    let mut csv = String::from("event_id,customer_id,event_type,event_time,value,region\n");
    let mut bad = 0;
    for line in &lines {
        match &line.event {
            Some((id, customer, event_type, time, value)) => {
                let stamp = chrono::DateTime::from_timestamp(*time, 0)
                    .unwrap()
                    .format("%Y-%m-%dT%H:%M:%SZ");
                csv.push_str(&format!(
                    "{id},\"{customer}\",{event_type},{stamp},{value},eu\r\n"
                ));
            }
            None if line.text.trim().is_empty() => {}
            None => {
                bad += 1;
                csv.push_str(if bad % 2 == 0 {
                    "broken,row\n"
                } else {
                    "evt_bad,c1,api_call,yesterday,1,eu\n"
                });
            }
        }
    }
    assert_eq!(bad, dead);
    let input = temp_file("import-in.csv");
    std::fs::write(&input, csv).unwrap();
    let out = temp_file("import-out.csv");
    let stderr = import_csv(&["--workers", "2", "--format", "csv"], &input, &out);
    assert_same(&read_csv(&out), &expected, "CSV input");
    let summary = format!("{counted} counted, {duplicates} duplicates, {dead} dead letters");
    assert!(stderr.contains(&summary), "{stderr}");
    assert!(stderr.contains("CSV_FIELDS"), "{stderr}");
    assert!(stderr.contains("import: dead letter: record "), "{stderr}");
    std::fs::remove_file(&out).unwrap();
    std::fs::remove_file(&input).unwrap();
}

#[test]
fn a_missing_file_is_an_error_not_a_panic() {
    let run = Command::new(env!("CARGO_BIN_EXE_meterflow"))
        .args(["import", "--csv", "-", "/nonexistent/events.jsonl"])
        .output()
        .unwrap();
    assert!(!run.status.success());
    assert!(!String::from_utf8_lossy(&run.stderr).contains("panicked"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_stored_mode_counts_every_event_once_when_a_file_is_imported_twice() {
    let topic = fresh_topic(4).await;
    let url = fresh_database().await;
    let events = random_events(2_000, 21);
    let expected = common::reference(&events);
    let input = temp_file("import-stored.jsonl");
    let text: Vec<String> = events
        .iter()
        .map(|e| String::from_utf8(e.payload()).unwrap())
        .collect();
    std::fs::write(&input, text.join("\n")).unwrap();

    let _pipeline = spawn_pipeline(&url, &topic, 2, &["--epoch-ms", "50"]);
    for round in 0..2 {
        let run = meterflow(&url, &topic)
            .args(["import", "--wait", "--wait-timeout-secs", "90"])
            .arg(&input)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "round {round}: {stderr}");
        assert!(
            stderr.contains("the pipeline has committed every record produced"),
            "{stderr}"
        );
        // --wait returned only once the offsets cover every record produced so far.
        assert_eq!(
            committed(&url).await,
            events.len() as i64 * (round + 1),
            "round {round}"
        );
        assert_same(
            &stored_aggregates(&url).await,
            &expected,
            &format!("after import {}", round + 1),
        );
    }
    assert_eq!(
        scalar_i64(&url, "SELECT count(*) FROM dead_letters").await,
        invalid_count(&events) * 2,
        "each invalid line is a dead letter each time it is read"
    );
    std::fs::remove_file(&input).unwrap();
}
