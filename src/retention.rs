//! `meterflow retention`: the seed's "archive old data". Raw events (`telemetry_events`) are partitioned
//! by month (migration 0003); this drops, optionally archiving first, the month partitions that lie
//! wholly behind the retention horizon.
//!
//! ```text
//!  horizon = min committed watermark (pipeline_leases) − 35 days   (none yet: nothing is old; refuse)
//!  for each month partition older than --before, oldest first:
//!    month not wholly before the horizon ─► kept (an event of it may still arrive, be voided, re-rated)
//!    else, one transaction:
//!      LOCK the partition (SHARE: no writes) ─► count ─► [--archive] COPY … TO STDOUT (CSV, header)
//!        ─► DIR/telemetry_events_YYYY_MM.csv.gz.tmp, fsync, line count = row count, rename
//!        (an empty month leaves no file)
//!      DETACH PARTITION + DROP TABLE ─► telemetry_retention.archived_before = month end ─► COMMIT
//!  [--prune-event-ids] one DELETE of the dropped months' event_ids rows, never one an unsent outbox
//!    row still needs (event_ids has no index on event_time: one pass for all months)
//! ```
//! Why the horizon: an event older than it is refused on both paths (SPEC §2), so no new copy, late
//! event or void can need a dropped month; inside it, all three can. Dedup is not affected by dropping
//! raw events: its truth is `event_ids`, kept unless `--prune-event-ids` (then an id of a dropped month
//! posted again with a recent event time would count as new: the SPEC promises dedup for the retention
//! horizon, and that id's first copy is past it). A re-rating job over an archived month would find no
//! raw events and zero the month: migration 0014 refuses such jobs, and this command refuses to run
//! while a pending or running job covers a month it would drop.
//!
//! An archive restores with `gzip -dc F | psql "$MF_DATABASE_URL" -c "\copy telemetry_events FROM STDIN
//! (FORMAT csv, HEADER)"` (after `CREATE TABLE telemetry_events_YYYY_MM PARTITION OF telemetry_events
//! FOR VALUES FROM ('YYYY-MM-01') TO (…)`).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, NaiveDate, Utc};
use futures::StreamExt;
use meterflow_model::DEFAULT_RETENTION_MICROS;
use meterflow_store::retention::{self as store, MonthPartition as Partition};
use sqlx::{Connection, PgConnection};

#[derive(Debug, clap::Args)]
pub struct RetentionArgs {
    /// Drop the raw events of the months before this one (YYYY-MM). Only months wholly behind the
    /// retention horizon (the committed watermark − 35 days) are touched; later ones are kept and
    /// reported.
    #[arg(long, value_name = "YYYY-MM")]
    before: String,
    /// Write each month's raw events to DIR/telemetry_events_YYYY_MM.csv.gz (gzip'd CSV with a header,
    /// `COPY … FROM` restores it) before dropping it.
    #[arg(long, value_name = "DIR")]
    archive: Option<PathBuf>,
    /// Say what would be archived and dropped; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Also delete the dropped months' event_ids rows (the dedup claims, ~100 bytes each). Without it
    /// they are kept, so an old id posted again is still recognised.
    #[arg(long)]
    prune_event_ids: bool,
}

pub fn run(args: &RetentionArgs, database_url: &str) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(retention(args, database_url))
}

fn parse_month(text: &str) -> Result<DateTime<Utc>> {
    let date = NaiveDate::parse_from_str(&format!("{text}-01"), "%Y-%m-%d")
        .with_context(|| format!("--before {text}: expected a month as YYYY-MM"))?;
    Ok(date.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc())
}

async fn retention(args: &RetentionArgs, url: &str) -> Result<()> {
    let before = parse_month(&args.before)?;
    let mut conn = PgConnection::connect(url)
        .await
        .context("connecting to Postgres")?;

    // The horizon: what both paths refuse as too old (SPEC §2), i.e. the committed watermark − 35 days;
    // with several topics, the least watermark. No watermark yet: nothing is too old.
    let watermark = match store::least_committed_watermark(&mut conn).await? {
        Some(w) => w,
        None => bail!(
            "no committed watermark yet: until the pipeline commits one, an event of any age is accepted, \
             so no month is past the retention horizon; nothing was changed"
        ),
    };
    let horizon = watermark - chrono::Duration::microseconds(DEFAULT_RETENTION_MICROS);
    println!(
        "retention: committed watermark {watermark}, retention horizon {horizon} (35 days before); \
         months before {} that end by the horizon are {}",
        before.format("%Y-%m"),
        if args.dry_run {
            "listed (dry run)"
        } else if args.archive.is_some() {
            "archived and dropped"
        } else {
            "dropped"
        }
    );

    let mut due = Vec::new();
    for p in store::month_partitions(&mut conn).await? {
        if p.start >= before {
            continue;
        }
        if p.end > horizon {
            println!(
                "  kept {}: not wholly behind the retention horizon ({horizon})",
                p.name
            );
            continue;
        }
        due.push(p);
    }
    if due.is_empty() {
        println!("retention: nothing to do");
        return Ok(());
    }
    if let Some(job) = store::job_before(&mut conn, due.iter().map(|p| p.end).max()).await? {
        bail!("re-rating job {job} is pending or running over a month to drop (it reads the raw events); wait for it to finish");
    }

    let (mut rows, mut ids) = (0_i64, 0_i64);
    let from = due.iter().map(|p| p.start).min().unwrap_or(before);
    let to = due.iter().map(|p| p.end).max().unwrap_or(before);
    for p in &due {
        rows += if args.dry_run {
            dry_run(&mut conn, p, args).await?
        } else {
            drop_month(&mut conn, p, args).await?
        };
    }
    if args.prune_event_ids {
        ids = if args.dry_run {
            store::event_ids_to_prune(&mut conn, from, to).await?
        } else {
            let deleted = store::prune_event_ids(&mut conn, from, to).await?;
            i64::try_from(deleted).unwrap_or(i64::MAX)
        };
    }
    println!(
        "retention: {} {} month(s), {rows} raw events{}",
        if args.dry_run {
            "would drop"
        } else {
            "dropped"
        },
        due.len(),
        if args.prune_event_ids {
            format!(", {ids} event_ids rows")
        } else {
            String::new()
        }
    );
    Ok(())
}

async fn dry_run(conn: &mut PgConnection, p: &Partition, args: &RetentionArgs) -> Result<i64> {
    let rows = store::rows_in(conn, p).await?;
    println!(
        "  would {}drop {} ({rows} rows)",
        match &args.archive {
            Some(dir) if rows > 0 => format!("archive to {} and ", archive_path(dir, p).display()),
            _ => String::new(),
        },
        p.name,
    );
    Ok(rows)
}

fn archive_path(dir: &Path, p: &Partition) -> PathBuf {
    dir.join(format!("{}.csv.gz", p.name))
}

async fn drop_month(conn: &mut PgConnection, p: &Partition, args: &RetentionArgs) -> Result<i64> {
    let mut tx = conn.begin().await?;
    // No writes while it is read: the archive is exactly what is dropped.
    let rows = store::lock_month(&mut tx, p).await?;
    let archived = match &args.archive {
        // An empty month (migration 0003 created every month from 2020) leaves no file.
        Some(_) if rows == 0 => None,
        Some(dir) => {
            let path = archive_path(dir, p);
            let written = archive(&mut tx, p, dir, &path).await?;
            if written != rows {
                bail!(
                    "{}: the archive holds {written} rows but the partition {rows}; nothing was dropped",
                    p.name
                );
            }
            Some(path)
        }
        None => None,
    };
    store::drop_month(&mut tx, p).await?;
    tx.commit().await?;
    println!(
        "  dropped {} ({rows} rows){}",
        p.name,
        match archived {
            Some(path) => format!(", archived to {}", path.display()),
            None => String::new(),
        },
    );
    Ok(rows)
}

/// Writes the partition as gzip'd CSV (header first) to `path` through a temporary file, fsynced and
/// renamed into place; returns the data rows written.
async fn archive(conn: &mut PgConnection, p: &Partition, dir: &Path, path: &Path) -> Result<i64> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("gz.tmp");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    // Every row is one line: ids and types have no line breaks, and JSON text escapes them.
    let mut lines = 0_i64;
    {
        let mut stream = std::pin::pin!(store::copy_out_month(conn, p).await?);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            let chunk = chunk.as_ref();
            lines += chunk.iter().filter(|b| **b == b'\n').count() as i64;
            gz.write_all(chunk)
                .with_context(|| format!("writing {}", tmp.display()))?;
        }
    }
    let file = gz.finish()?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(lines - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_are_parsed() {
        assert!(parse_month("2024-13").is_err());
        assert_eq!(
            parse_month("2024-12").unwrap().to_rfc3339(),
            "2024-12-01T00:00:00+00:00"
        );
    }
}
