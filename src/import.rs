//! `meterflow import FILE`: a file of events (JSON Lines, one event per line, or CSV: `csv_in.rs`
//! converts it to JSON Lines first) through meterflow's decode, dedup and metering, in one of two
//! modes.
//!
//! * `--csv OUT`, the engine alone (no Kafka, no Postgres): every line is decoded and validated by the
//!   pipeline's decoder (`decode_as(Plain, …)`, as `dataflow/src/classify.rs` decodes a plain record), a
//!   line that fails is a dead letter (counted and summarised, never a panic); the events are
//!   deduplicated by `event_id` in memory, exactly (the first copy in file order counts, every later
//!   copy is a duplicate); each counted event goes through the pipeline's meters
//!   (`meterflow_dataflow::meters::Meters`, here the default meters: per event type, hourly, sum of
//!   `value` and count) and its contributions are added up per row as the dataflow adds them
//!   ([`Usage`], the same commutative group: a sum past the decimal range is quarantined, not written).
//!   The output is one CSV row per non-empty row: `customer_id,event_type,window_start,value_sum,
//!   event_count` (the peers' format, `perf/peers`), sorted.
//!
//!   How: W workers each read their own byte range of the file (cut at line boundaries) with large
//!   positioned reads, decode every line and add every valid event's contributions into their own rows
//!   (one small table per meter and window, keyed by customer: events come roughly in time order, so
//!   the tables being filled stay in cache), and append `(hash of event_id, line position)` to a list:
//!   16 bytes per event, no id kept in memory. Then dedup, in parallel by part of the hash space: the
//!   lists are each sorted in place and merged, and where hashes are equal the lines are read back and
//!   compared by event_id (exact); every copy of an id but the first in file order is taken back out
//!   (the negation of its contributions, as a void retracts). The rows are merged by customer range,
//!   sorted and written.
//!   Rows are a commutative group, so counting first and retracting after gives the same sums as
//!   deduplicating first.
//!
//!   `--engine dataflow` feeds the same decoded events through the pipeline's timely graph instead
//!   (`operators::build`, the copies to take back as `Classified::Retract`) and adds up the row changes
//!   it outputs in the same [`Rows`]: the same CSV, in about twice the time (9.0 s against 4.8 s on
//!   the peers' 10M-event file, perf/RESULTS.md): the graph moves every event and every contribution
//!   through its operators' buffers, sums the rows per epoch in hash tables, and keeps every period's
//!   windows for rating (a price book may come later). So the default adds the rows up on the workers
//!   directly.

//! * without `--csv`, the results stored in Postgres by the pipeline itself: every line is produced as
//!   is to the events topic with the idempotent producer (as `meterflow loadgen` does), keyed by its
//!   customer, and with `--wait` the import waits until the pipeline has committed every record
//!   produced. The running pipeline decodes, claims (the claim store deduplicates by event_id, so
//!   importing the same file twice counts every event once), meters, rates and commits them exactly
//!   once, as it does any other record; invalid lines become its dead letters.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use differential_dataflow::difference::{Abelian, IsZero, Semigroup};
use hashbrown::HashTable;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use meterflow_dataflow::meters::Meters;
use meterflow_dataflow::usage::Usage;
use meterflow_model::{decode_as, Aggregate, DecodeError, Event, Format, Limits, Meter, Window};

use csv_out::write_csv;
use lines::{for_each_line, line_at, record};
use rows::{hash_bytes, RowKey, Rows};

mod csv_in;
mod csv_out;
mod dataflow_engine;
mod lines;
mod produce;
mod rows;

#[derive(Clone, Debug, clap::Args)]
#[command(
    long_about = "Import a file of events (JSON Lines: one event per line, as POST /api/v1/events takes \
one; blank lines are skipped; or CSV, below).\n\n\
With --csv OUT: the engine alone, no Kafka, no Postgres. Each line is decoded and validated by the \
pipeline's decoder (a line that fails is a dead letter, summarised at the end), events are deduplicated \
by event_id in memory (exact: the first copy in the file counts), metered by the default meters (per \
event type, hourly sum of value and count) and written as CSV: \
customer_id,event_type,window_start,value_sum,event_count. It runs on --workers threads, not through \
the timely dataflow.\n\n\
Without --csv: the results are stored in Postgres by the running pipeline. Every line is produced, as \
is, to the events topic with the idempotent producer (as `meterflow loadgen` does); with --wait the \
import waits until the pipeline has committed all of them. The pipeline's claim store deduplicates by \
event_id, so importing the same file twice counts every event once. Events older than 35 days behind \
the pipeline's committed watermark are dead letters there (SPEC §2).\n\n\
A CSV file (a name ending in .csv, or --format csv) is converted to JSON Lines first: RFC 4180 \
records under a header naming event_id,customer_id,event_type,event_time, optionally value, and either \
a properties column (a JSON object) or other columns, each a string property. A record with more or \
fewer cells than the header is a dead letter (CSV_FIELDS). Parquet is not read: convert it first.\n\n\
A progress bar is drawn on stderr when it is a terminal (not with --quiet)."
)]
pub struct ImportArgs {
    /// The file to import: JSON Lines, or CSV (see --format).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// The file's format: `jsonl` (one JSON event a line), `csv` (a header naming event_id,
    /// customer_id, event_type, event_time, and optionally value and properties, a JSON object, or
    /// other columns, each a string property; converted to JSON Lines in the temporary directory
    /// first), or `auto`: csv for a name ending in .csv, else jsonl.
    #[arg(long, default_value = "auto", value_parser = ["auto", "jsonl", "csv"])]
    pub format: String,
    /// Write the aggregates to this CSV file (`-`: stdout) instead of producing to Kafka.
    #[arg(long, value_name = "OUT")]
    pub csv: Option<PathBuf>,
    /// Worker threads of the --csv engine.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// --csv only: `direct` adds the rows up on the workers themselves; `dataflow` feeds the same
    /// decoded, deduplicated events through the pipeline's timely graph (`operators::build`, no price
    /// book) and writes the rows it outputs (slower; for comparison).
    #[arg(long, default_value = "direct", value_parser = ["direct", "dataflow"])]
    pub engine: String,
    /// Without --csv: wait until the pipeline has committed every record produced.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up (exit 1) after this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub wait_timeout_secs: u64,
    /// No progress bar.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

pub fn run(args: &ImportArgs, cfg: &crate::config::Config) -> Result<()> {
    if !is_csv(args) {
        return import(args, cfg, None);
    }
    let converted = csv_in::to_json_lines(&args.file, DEAD_SAMPLES)?;
    let args = ImportArgs {
        file: converted.path.clone(),
        ..args.clone()
    };
    import(&args, cfg, Some(&converted))
}

/// Whether `args.file` is read as CSV.
fn is_csv(args: &ImportArgs) -> bool {
    match args.format.as_str() {
        "csv" => true,
        "jsonl" => false,
        _ => args
            .file
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("csv")),
    }
}

/// Imports the JSON Lines file of `args`; `converted` is the CSV conversion it came from, if any,
/// whose records of the wrong width are dead letters too.
fn import(
    args: &ImportArgs,
    cfg: &crate::config::Config,
    converted: Option<&csv_in::Converted>,
) -> Result<()> {
    match &args.csv {
        Some(out) => {
            let summary = if args.engine == "dataflow" {
                dataflow_engine::import_csv(args, out)?
            } else {
                import_csv(args, out)?
            };
            let summary = match converted {
                Some(c) => summary.of_csv(c),
                None => summary,
            };
            eprintln!("{}", summary.line(out));
            for sample in &summary.dead_samples {
                eprintln!("import: dead letter: {sample}");
            }
            Ok(())
        }
        None => {
            if let Some(c) = converted.filter(|c| c.bad_records() > 0) {
                eprintln!(
                    "import: {} CSV records not produced (they could not be read as events)",
                    c.bad_records()
                );
                for sample in &c.bad_samples {
                    eprintln!("import: dead letter: {sample}");
                }
            }
            produce::run(args, cfg)
        }
    }
}

/// What an import did.
#[derive(Debug, Default)]
pub struct Summary {
    pub records: u64,
    pub counted: u64,
    pub duplicates: u64,
    pub dead_letters: u64,
    pub dead_reasons: BTreeMap<&'static str, u64>,
    /// The first few dead letters: `line N: reason`.
    pub dead_samples: Vec<String>,
    pub rows: u64,
    /// Rows whose sum left the decimal range: not written (the pipeline quarantines them).
    pub quarantined_rows: u64,
    pub seconds: f64,
    /// Seconds per phase: read, decode, dedup and meter each range; take back later copies across
    /// ranges; merge, sort and write.
    pub phases: [f64; 3],
}

impl Summary {
    /// The summary of a CSV file's import: line N of the converted file is record N of the CSV
    /// file, and the records that were not converted are dead letters too.
    fn of_csv(mut self, converted: &csv_in::Converted) -> Summary {
        self.records += converted.bad_records();
        self.dead_letters += converted.bad_records();
        for (code, n) in &converted.bad_reasons {
            *self.dead_reasons.entry(code).or_default() += n;
        }
        let decoded = self
            .dead_samples
            .iter()
            .map(|s| match s.strip_prefix("line ") {
                Some(rest) => format!("record {rest}"),
                None => s.clone(),
            });
        let mut samples: Vec<String> = converted
            .bad_samples
            .iter()
            .cloned()
            .chain(decoded)
            .collect();
        samples.truncate(DEAD_SAMPLES);
        self.dead_samples = samples;
        self
    }

    fn line(&self, out: &Path) -> String {
        let reasons: Vec<String> = self
            .dead_reasons
            .iter()
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        format!(
            "import: {} records in {:.2} s ({:.0} records/s): {} counted, {} duplicates, {} dead letters{}, \
             {} rows{} -> {}",
            self.records,
            self.seconds,
            self.records as f64 / self.seconds.max(1e-9),
            self.counted,
            self.duplicates,
            self.dead_letters,
            if reasons.is_empty() {
                String::new()
            } else {
                format!(" ({})", reasons.join(", "))
            },
            self.rows,
            if self.quarantined_rows > 0 {
                format!(", {} rows quarantined (sum past the decimal range, not written)", self.quarantined_rows)
            } else {
                String::new()
            },
            out.display()
        ) + &format!(
            " [read+decode+dedup+meter {:.2} s, dedup across ranges {:.2} s, merge+write {:.2} s]",
            self.phases[0], self.phases[1], self.phases[2]
        )
    }
}

const DEAD_SAMPLES: usize = 5;
const CHUNK: usize = 4 << 20;

fn progress_bar(total: u64, quiet: bool, what: &str) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    let template = format!(
        "import: {what} {{bar:40}} {{bytes}}/{{total_bytes}} ({{bytes_per_sec}}, eta {{eta}})"
    );
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}

/// Runs `f` while a thread moves the bar to `done` every 100 ms.
fn with_progress<T>(bar: &ProgressBar, done: &AtomicU64, f: impl FnOnce() -> T) -> T {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        if !bar.is_hidden() {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    bar.set_position(done.load(Ordering::Relaxed));
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
        let out = f();
        stop.store(true, Ordering::Relaxed);
        out
    })
}

// ---- the --csv engine --------------------------------------------------------------------------

/// What the import decides for every line: the same every time a line is read.
#[derive(Clone, Copy)]
struct Decoder {
    /// "In the future" is measured from the start of the import, as the pipeline measures it from the
    /// record's timestamp.
    reference_micros: i64,
    limits: Limits,
}

impl Decoder {
    fn decode(&self, line: &[u8]) -> Result<Event, DecodeError> {
        // As dataflow/src/classify.rs decodes a plain record (before any watermark: nothing is too old).
        decode_as(Format::Plain, line, self.reference_micros, &self.limits)
    }

    fn event_at(&self, file: &File, at: u64) -> Result<Event> {
        let line = line_at(file, at)?;
        let line = record(&line).unwrap_or_default();
        self.decode(line)
            .map_err(|e| anyhow::anyhow!("the line at byte {at} no longer decodes ({e}); was the file changed during the import?"))
    }
}

/// One worker's share.
struct Worker {
    rows: Rows,
    /// (hash of event_id, position of its line) of every valid event, by hash modulo the worker count:
    /// dedup sorts these after the read (sequential, where a table probe per event is a cache miss).
    seen: Vec<Vec<(u64, u64)>>,
    lines: u64,
    records: u64,
    counted: u64,
    duplicates: u64,
    dead: u64,
    dead_reasons: BTreeMap<&'static str, u64>,
    /// (line index within the range, reason).
    dead_samples: Vec<(u64, String)>,
}

fn csv_worker(
    path: &Path,
    range: (u64, u64),
    decoder: Decoder,
    seed: u64,
    done: &AtomicU64,
    parts: usize,
) -> Result<Worker> {
    let mut rows = Rows::new(seed);
    let mut w = read_range(path, range, decoder, seed, done, parts, |event| {
        rows.add(&event, false)
    })?;
    w.rows = rows;
    Ok(w)
}

/// Reads and decodes the lines of one byte range: `on_event` gets every valid event; its id's hash and
/// position are kept for [`later_copies`].
fn read_range(
    path: &Path,
    (start, end): (u64, u64),
    decoder: Decoder,
    seed: u64,
    done: &AtomicU64,
    parts: usize,
    mut on_event: impl FnMut(Event) -> Result<()>,
) -> Result<Worker> {
    let parts = parts.max(1);
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // About 160 bytes a line: size the dedup table once instead of growing it.
    let expected = usize::try_from(end.saturating_sub(start) / 150).unwrap_or(0);
    let mut w = Worker {
        rows: Rows::new(seed),
        seen: (0..parts)
            .map(|_| Vec::with_capacity(expected / parts))
            .collect(),
        lines: 0,
        records: 0,
        counted: 0,
        duplicates: 0,
        dead: 0,
        dead_reasons: BTreeMap::new(),
        dead_samples: Vec::new(),
    };
    for_each_line(&file, start, end, done, |at, line| {
        let index = w.lines;
        w.lines += 1;
        let Some(line) = record(line) else {
            return Ok(());
        };
        w.records += 1;
        let event = match decoder.decode(line) {
            Ok(event) => event,
            Err(e) => {
                w.dead += 1;
                *w.dead_reasons.entry(e.code()).or_default() += 1;
                if w.dead_samples.len() < DEAD_SAMPLES {
                    w.dead_samples.push((index, format!("{}: {e}", e.code())));
                }
                return Ok(());
            }
        };
        let h = hash_bytes(seed, event.event_id.as_bytes());
        if let Some(ids) = w.seen.get_mut((h % parts as u64) as usize) {
            ids.push((h, at));
        }
        w.counted += 1;
        on_event(event)
    })?;
    Ok(w)
}

/// Every copy of an id but the first in file order, each passed to `retract` (they were all counted):
/// the (hash, position) pairs of one part of the hash space, from every range, each part sorted in
/// place and all merged in order; where hashes are equal, the lines are read back and compared by
/// event_id (exact; a hash collision costs a read). Merged, not copied into one table: the copy held
/// every pair twice while it was made (16 bytes an event: 160 MB for 10M events).
fn later_copies(
    path: &Path,
    mut parts: Vec<Vec<(u64, u64)>>,
    decoder: Decoder,
    mut retract: impl FnMut(Event) -> Result<()>,
) -> Result<u64> {
    for part in &mut parts {
        part.sort_unstable();
    }
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut n = 0u64;
    let mut pairs = merged(&parts).peekable();
    while let Some((hash, at)) = pairs.next() {
        if pairs.peek().is_none_or(|(next, _)| *next != hash) {
            continue;
        }
        let mut group = vec![(hash, at)];
        while let Some(pair) = pairs.next_if(|(next, _)| *next == hash) {
            group.push(pair);
        }
        // (event_id, position, event), the first copy of each id first.
        let mut copies = group
            .iter()
            .map(|&(_, at)| decoder.event_at(&file, at).map(|e| (at, e)))
            .collect::<Result<Vec<(u64, Event)>>>()?;
        copies.sort_unstable_by(|(a, ea), (b, eb)| (&ea.event_id, a).cmp(&(&eb.event_id, b)));
        let mut previous: Option<String> = None;
        for (_, event) in copies {
            if previous.as_deref() == Some(event.event_id.as_str()) {
                retract(event)?;
                n += 1;
            } else {
                previous = Some(event.event_id.clone());
            }
        }
    }
    Ok(n)
}

/// The next pair of a part in [`merged`]: (pair, part, its index in the part), least first.
type Head = Reverse<((u64, u64), usize, usize)>;

/// The pairs of sorted `parts`, in order: a k-way merge.
fn merged(parts: &[Vec<(u64, u64)>]) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut heads: BinaryHeap<Head> = parts
        .iter()
        .enumerate()
        .filter_map(|(p, part)| part.first().map(|&pair| Reverse((pair, p, 0))))
        .collect();
    std::iter::from_fn(move || {
        let Reverse((pair, p, i)) = heads.pop()?;
        if let Some(&next) = parts.get(p).and_then(|part| part.get(i + 1)) {
            heads.push(Reverse((next, p, i + 1)));
        }
        Some(pair)
    })
}

/// `(start, end)` byte ranges of about equal size.
fn ranges(len: u64, n: usize) -> Vec<(u64, u64)> {
    let n = n.max(1) as u64;
    (0..n).map(|i| (len * i / n, len * (i + 1) / n)).collect()
}

pub fn import_csv(args: &ImportArgs, out: &Path) -> Result<Summary> {
    let started = Instant::now();
    let path = args.file.as_path();
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    let workers = args.workers.clamp(1, 256);
    let seed: u64 = rand::random();
    let decoder = Decoder {
        reference_micros: chrono::Utc::now().timestamp_micros(),
        limits: Limits::default(),
    };
    let done = AtomicU64::new(0);
    let bar = progress_bar(len, args.quiet, "reading");
    let results: Vec<Result<Worker>> = with_progress(&bar, &done, || {
        let done = &done;
        std::thread::scope(|s| {
            let handles: Vec<_> = ranges(len, workers)
                .into_iter()
                .map(|range| s.spawn(move || csv_worker(path, range, decoder, seed, done, workers)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("an import worker panicked")))
                })
                .collect()
        })
    });
    bar.finish_and_clear();
    let mut shares = results.into_iter().collect::<Result<Vec<Worker>>>()?;
    let read = started.elapsed().as_secs_f64();

    let retractions = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|t| {
                let parts: Vec<Vec<(u64, u64)>> = shares
                    .iter_mut()
                    .filter_map(|w| w.seen.get_mut(t).map(std::mem::take))
                    .collect();
                s.spawn(move || {
                    let mut rows = Rows::new(seed);
                    let n = later_copies(path, parts, decoder, |e| rows.add(&e, true))?;
                    Ok((rows, n))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a dedup thread panicked")))
            })
            .collect::<Result<Vec<(Rows, u64)>>>()
    })?;

    let mut summary = tally(&shares);
    let mut parts: Vec<Rows> = shares.into_iter().map(|w| w.rows).collect();
    for (rows, n) in retractions {
        summary.counted -= n;
        summary.duplicates += n;
        parts.push(rows);
    }
    let parts: Vec<&Rows> = parts.iter().collect();
    let deduped = started.elapsed().as_secs_f64();
    let (rows, quarantined) = write_csv(&parts, out, workers)?;
    summary.rows = rows;
    summary.quarantined_rows = quarantined;
    summary.seconds = started.elapsed().as_secs_f64();
    summary.phases = [read, deduped - read, summary.seconds - deduped];
    Ok(summary)
}

/// The workers' counts, and the first dead letters with their line numbers.
fn tally(shares: &[Worker]) -> Summary {
    let mut summary = Summary::default();
    let mut lines_before = 0u64;
    for w in shares {
        summary.records += w.records;
        summary.counted += w.counted;
        summary.duplicates += w.duplicates;
        summary.dead_letters += w.dead;
        for (r, n) in &w.dead_reasons {
            *summary.dead_reasons.entry(r).or_default() += n;
        }
        for (i, reason) in &w.dead_samples {
            if summary.dead_samples.len() < DEAD_SAMPLES {
                summary
                    .dead_samples
                    .push(format!("line {}: {reason}", lines_before + i + 1));
            }
        }
        lines_before += w.lines;
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;
    use rows::Interner;

    #[test]
    fn the_default_meter_path_equals_meter_set_contributions() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
        let mut fast = Rows::new(1);
        let mut general = Rows::new(1);
        // A meter set that reads a type no event has: the general path, the same default meters.
        general.meters = Meters::new(vec![Meter {
            meter: "other_meter".into(),
            ..Meter::default_for("other")
        }]);
        for i in 0..5_000 {
            // Around window edges, before and after 1970.
            let hour = rng.random_range(-1_000_000i64..1_000_000) * 3_600_000_000;
            let micros = hour + [0, -1, 1, rng.random_range(0..3_600_000_000)][i % 4];
            let event = Event {
                event_id: format!("e{i}"),
                customer_id: format!("c{}", rng.random_range(0..50)),
                event_type: ["api_call", "tokens", "a.b-c"][rng.random_range(0..3)].into(),
                event_time_micros: micros,
                value: rust_decimal::Decimal::new(
                    rng.random_range(0..100_000),
                    rng.random_range(0..5),
                ),
                properties: "{}".into(),
            };
            let retract = rng.random_range(0..10) == 0;
            fast.add(&event, retract).unwrap();
            general.add(&event, retract).unwrap();
        }
        assert!(fast.meters.is_empty() && !general.meters.is_empty());
        assert_eq!(fast.named(), general.named());
    }

    #[test]
    fn interning_finds_short_and_long_names_and_hashes_differ_by_tail() {
        let mut i = Interner::default();
        let long = "a_customer_name_longer_than_sixteen_bytes";
        let names = [
            "",
            "a",
            "cust_00001",
            "cust_00002",
            long,
            "abcdefgh",
            "abcdefgi",
        ];
        let ids: Vec<u32> = names.iter().map(|n| i.intern(7, n)).collect();
        assert_eq!(ids, [0, 1, 2, 3, 4, 5, 6]);
        let again: Vec<u32> = names.iter().map(|n| i.intern(7, n)).collect();
        assert_eq!(again, ids);
        assert_ne!(hash_bytes(7, b"cust_00001"), hash_bytes(7, b"cust_00002"));
        assert_ne!(hash_bytes(7, b"abc"), hash_bytes(7, b"abc\0"));
    }

    #[test]
    fn ranges_cover_the_file_once() {
        assert_eq!(ranges(10, 3), vec![(0, 3), (3, 6), (6, 10)]);
        assert_eq!(ranges(0, 2), vec![(0, 0), (0, 0)]);
    }

    #[test]
    fn every_line_is_read_by_exactly_one_range() {
        let dir = std::env::temp_dir().join(format!("mf-import-lines-{}", std::process::id()));
        let text = b"a\nbb\n\nccc\r\ndddd\nlast";
        std::fs::write(&dir, text).unwrap();
        let file = File::open(&dir).unwrap();
        for n in 1..=text.len() {
            let mut lines = Vec::new();
            let done = AtomicU64::new(0);
            for (start, end) in ranges(text.len() as u64, n) {
                for_each_line(&file, start, end, &done, |at, line| {
                    lines.push((at, line.to_vec()));
                    Ok(())
                })
                .unwrap();
            }
            let expected: Vec<(u64, Vec<u8>)> = vec![
                (0, b"a".to_vec()),
                (2, b"bb".to_vec()),
                (5, b"".to_vec()),
                (6, b"ccc\r".to_vec()),
                (11, b"dddd".to_vec()),
                (16, b"last".to_vec()),
            ];
            assert_eq!(lines, expected, "{n} ranges");
            assert_eq!(
                done.load(Ordering::Relaxed),
                text.len() as u64,
                "{n} ranges"
            );
            assert_eq!(line_at(&file, 6).unwrap(), b"ccc\r");
            assert_eq!(line_at(&file, 16).unwrap(), b"last");
        }
        std::fs::remove_file(&dir).unwrap();
    }
}
