//! `import --csv --engine dataflow`: the same decoded events through the pipeline's timely graph
//! (`operators::build`), the copies to take back as retractions; the module doc of `import.rs` says why
//! it is not the default.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use meterflow_dataflow::classify::{Classified, SourceItem};
use meterflow_dataflow::operators::{build, Epoch};
use meterflow_dataflow::{GraphContext, GraphInputs, SinkUpdate};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::{Operator, Probe};
use timely::dataflow::ProbeHandle;

use super::*;

/// Events per epoch, all workers together.
const EPOCH_EVENTS: u64 = 200_000;

type DedupTables = Arc<Mutex<Vec<Option<Vec<Vec<(u64, u64)>>>>>>;

/// Each timely worker reads its byte range as `csv_worker` does and feeds the counted events in
/// epochs; once every worker has read its range, every copy of an id but the first is fed as a
/// retraction (`Classified::Retract`, as a void); the graph's row
/// changes are added up per row, as they leave it, in the direct engine's compact [`Rows`] (interned
/// names: a third of the memory of a map by the graph's keys), and written like its rows.
pub fn import_csv(args: &ImportArgs, out: &Path) -> Result<Summary> {
    let started = Instant::now();
    let path = args.file.clone();
    let len = std::fs::metadata(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    let workers = args.workers.clamp(1, 256);
    let seed: u64 = rand::random();
    let decoder = Decoder {
        reference_micros: chrono::Utc::now().timestamp_micros(),
        limits: Limits::default(),
    };
    let done = Arc::new(AtomicU64::new(0));
    let bar = progress_bar(len, args.quiet, "reading");
    let tables: DedupTables = Arc::new(Mutex::new((0..workers).map(|_| None).collect()));
    let arrived = Arc::new(AtomicUsize::new(0));
    let context = GraphContext {
        allowed_lateness_micros: 3_600_000_000,
    };
    let ranges = ranges(len, workers);
    let done_worker = done.clone();
    type Out = (Worker, Rows, u64);
    let guards = with_progress(&bar, &done, || {
        timely::execute(
            timely::Config::process(workers),
            move |worker| -> Result<Out, String> {
                let index = worker.index();
                let range = ranges.get(index).copied().unwrap_or((0, 0));
                let collected = Arc::new(Mutex::new(Rows::new(seed)));
                let seen = collected.clone();
                let context = context.clone();
                let (mut inputs, probe) = worker.dataflow::<Epoch, _, _>(|scope| {
                    let mut inputs = GraphInputs::default();
                    let probe = ProbeHandle::new();
                    build(inputs.streams(scope), context)
                        .unary::<CapacityContainerBuilder<Vec<()>>, _, _, _>(
                            Pipeline,
                            "Collect",
                            move |_, _| {
                                move |input, _output| {
                                    let Ok(mut rows) = seen.lock() else {
                                        return;
                                    };
                                    input.for_each(|_, data| {
                                        for (_, update) in data.drain(..) {
                                            match update {
                                                SinkUpdate::Row(key, None, agg) => {
                                                    let row = rows.row_of(&key);
                                                    rows.rows.add(row, Usage::of(agg));
                                                }
                                                SinkUpdate::QuarantinedRow(key) => {
                                                    let row = rows.row_of(&key);
                                                    rows.rows.quarantine(row);
                                                }
                                                _ => {}
                                            }
                                        }
                                    });
                                }
                            },
                        )
                        .probe_with(&probe);
                    (inputs, probe)
                });
                let mut epoch: Epoch = 0;
                let mut fed = 0u64;
                let mut offset = 0i64;
                let advance = |inputs: &mut GraphInputs, epoch: &mut Epoch| {
                    *epoch += 1;
                    inputs.advance_to(*epoch);
                    inputs.control.advance_to(*epoch);
                };
                let per_worker = (EPOCH_EVENTS / workers as u64).max(1);
                let mut share = read_range(
                    &path,
                    range,
                    decoder,
                    seed,
                    &done_worker,
                    workers,
                    |event| {
                        inputs.items.send(SourceItem {
                            partition: index as i32,
                            offset,
                            what: Classified::Count(event),
                        });
                        offset += 1;
                        fed += 1;
                        if fed.is_multiple_of(per_worker) {
                            advance(&mut inputs, &mut epoch);
                            // One epoch in flight at most: the graph keeps up with the reading.
                            let until = epoch.saturating_sub(1);
                            while probe.less_than(&until) {
                                worker.step();
                            }
                        }
                        Ok(())
                    },
                )
                .map_err(|e| format!("{e:#}"))?;
                // Hand over the dedup table; step until every worker has (no one blocks the graph).
                if let Ok(mut t) = tables.lock() {
                    if let Some(slot) = t.get_mut(index) {
                        *slot = Some(std::mem::take(&mut share.seen));
                    }
                }
                arrived.fetch_add(1, Ordering::SeqCst);
                while arrived.load(Ordering::SeqCst) < workers {
                    worker.step();
                }
                advance(&mut inputs, &mut epoch);
                let retracted = {
                    // This worker's part of every table, taken out of it.
                    let parts: Vec<Vec<(u64, u64)>> = tables
                        .lock()
                        .map_err(|_| "dedup tables lock poisoned".to_owned())?
                        .iter_mut()
                        .flatten()
                        .filter_map(|p| p.get_mut(index).map(std::mem::take))
                        .collect();
                    later_copies(&path, parts, decoder, |event| {
                        inputs.items.send(SourceItem {
                            partition: index as i32,
                            offset,
                            what: Classified::Retract(event),
                        });
                        offset += 1;
                        Ok(())
                    })
                    .map_err(|e| format!("{e:#}"))?
                };
                drop(inputs);
                while !probe.done() {
                    worker.step();
                }
                let rows = collected
                    .lock()
                    .map(|mut c| std::mem::replace(&mut *c, Rows::new(seed)))
                    .map_err(|_| "collected rows lock poisoned".to_owned())?;
                Ok((share, rows, retracted))
            },
        )
        .map_err(anyhow::Error::msg)
    })?;
    let results: Vec<Out> = guards
        .join()
        .into_iter()
        .map(|r| {
            r.map_err(anyhow::Error::msg)
                .and_then(|r| r.map_err(anyhow::Error::msg))
        })
        .collect::<Result<_>>()?;
    bar.finish_and_clear();
    let read = started.elapsed().as_secs_f64();
    let mut shares = Vec::new();
    let mut parts = Vec::new();
    let mut retracted = 0;
    for (share, rows, n) in results {
        shares.push(share);
        retracted += n;
        parts.push(rows);
    }
    let mut summary = tally(&shares);
    summary.counted -= retracted;
    summary.duplicates += retracted;
    drop(shares);
    let parts: Vec<&Rows> = parts.iter().collect();
    let (rows, quarantined) = write_csv(&parts, out, workers)?;
    summary.rows = rows;
    summary.quarantined_rows = quarantined;
    summary.seconds = started.elapsed().as_secs_f64();
    summary.phases = [read, 0.0, summary.seconds - read];
    Ok(summary)
}
