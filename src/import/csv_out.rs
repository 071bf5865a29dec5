//! Writing the merged rows as the peers' CSV (`customer_id,event_type,window_start,value_sum,event_count`),
//! sorted: the customers split into shards by hash, each shard merged, sorted and written by one thread,
//! the shards' files joined in order.

use super::*;

/// The rows of `p` whose customer (mapped by `cmap`) lies in `lo..hi`.
pub(super) fn in_shard<'a>(
    p: &'a Rows,
    cmap: &'a [u32],
    lo: u32,
    hi: u32,
) -> impl Iterator<Item = (RowKey, &'a Usage)> + 'a {
    p.rows
        .iter()
        .filter(move |((c, ..), _)| cmap.get(*c as usize).is_some_and(|c| (lo..hi).contains(c)))
}

/// Merges the parts' rows (by customer range, one range per thread), sorts them and writes the CSV.
/// Returns (rows written, rows quarantined).
pub(super) fn write_csv(parts: &[&Rows], out: &Path, threads: usize) -> Result<(u64, u64)> {
    // Global, sorted names; each part's ids mapped onto them.
    let mut customers: Vec<&str> = parts
        .iter()
        .flat_map(|p| p.customers.names.iter().map(|n| &**n))
        .collect();
    customers.sort_unstable();
    customers.dedup();
    let mut meters: Vec<&str> = parts
        .iter()
        .flat_map(|p| p.meter_names.names.iter().map(|n| &**n))
        .collect();
    meters.sort_unstable();
    meters.dedup();
    let rank = |all: &[&str], name: &str| all.binary_search(&name).unwrap_or(0) as u32;
    let maps: Vec<(Vec<u32>, Vec<u32>)> = parts
        .iter()
        .map(|p| {
            (
                p.customers
                    .names
                    .iter()
                    .map(|n| rank(&customers, n))
                    .collect(),
                p.meter_names
                    .names
                    .iter()
                    .map(|n| rank(&meters, n))
                    .collect(),
            )
        })
        .collect();
    let threads = threads.max(1);
    let n = customers.len();
    let shards: Vec<Result<(Vec<u8>, u64, u64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (customers, meters, maps) = (&customers, &meters, &maps);
                let (lo, hi) = ((n * t / threads) as u32, (n * (t + 1) / threads) as u32);
                s.spawn(move || -> Result<(Vec<u8>, u64, u64)> {
                    // The shard's rows of every part, with global ids, sorted; equal keys added up.
                    let len = parts
                        .iter()
                        .zip(maps)
                        .map(|(p, (cmap, _))| in_shard(p, cmap, lo, hi).count())
                        .sum();
                    let mut rows: Vec<(RowKey, Usage)> = Vec::with_capacity(len);
                    for (p, (cmap, mmap)) in parts.iter().zip(maps) {
                        for ((c, m, ws, we), usage) in in_shard(p, cmap, lo, hi) {
                            let c = cmap.get(c as usize).copied().unwrap_or(0);
                            let m = mmap.get(m as usize).copied().unwrap_or(0);
                            rows.push(((c, m, ws, we), *usage));
                        }
                    }
                    rows.sort_unstable_by_key(|(k, _)| *k);
                    rows.dedup_by(|(k, u), (first, sum)| {
                        let same = k == first;
                        if same {
                            sum.plus_equals(u);
                        }
                        same
                    });
                    let mut text = Vec::with_capacity(rows.len() * 56);
                    let mut windows: HashMap<i64, String> = HashMap::new();
                    let (mut written, mut quarantined) = (0u64, 0u64);
                    for ((c, m, ws, _), usage) in rows {
                        if usage.overflowed {
                            quarantined += 1;
                            continue;
                        }
                        if usage.is_zero() {
                            continue;
                        }
                        let window = windows.entry(ws).or_insert_with(|| {
                            chrono::DateTime::from_timestamp(ws, 0)
                                .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                                .unwrap_or_else(|| ws.to_string())
                        });
                        let customer = customers.get(c as usize).copied().unwrap_or_default();
                        let meter = meters.get(m as usize).copied().unwrap_or_default();
                        writeln!(
                            text,
                            "{customer},{meter},{window},{},{}",
                            usage.aggregate.value, usage.aggregate.event_count
                        )?;
                        written += 1;
                    }
                    Ok((text, written, quarantined))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a writer thread panicked")))
            })
            .collect()
    });
    let mut sink: Box<dyn Write> = if out == Path::new("-") {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(File::create(out).with_context(|| format!("creating {}", out.display()))?)
    };
    sink.write_all(b"customer_id,event_type,window_start,value_sum,event_count\n")?;
    let (mut written, mut quarantined) = (0, 0);
    for shard in shards {
        let (text, w, q) = shard?;
        sink.write_all(&text)
            .with_context(|| format!("writing {}", out.display()))?;
        written += w;
        quarantined += q;
    }
    sink.flush()
        .with_context(|| format!("writing {}", out.display()))?;
    Ok((written, quarantined))
}
