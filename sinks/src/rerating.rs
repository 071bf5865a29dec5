//! Re-rating jobs (SPEC §7): recompute a scope from the stored raw events, the current meters and the
//! current price books through the same `model/` code the dataflow uses, and correct what differs.
//!
//! ```text
//!  one read-only snapshot, holding no lock (the pipeline keeps committing, finding 23):
//!    events counted and committed in the scope (event_ids ⋈ telemetry_events, below the committed
//!    offsets, minus committed voids) ──decode + MeterSet──► expected rows
//!    stored rows (aggregations, meter_values) ──compare──► corrections: expected − stored, per row/item
//!  one transaction, holding every pipeline lease row (so no epoch commits meanwhile), and only while
//!  the runner's pipeline still holds its topic's lease (a fenced leader's job is left to the new one):
//!    the stored rows of the periods the scope touches ──► before
//!    stored rows += corrections (what the pipeline committed since the snapshot stays added)
//!    every period the scope touches ──rate_period over its (corrected) rows──► the charges it will
//!      have (compared and summed for the outcome); upcoming lines rebuilt from the stored charges
//!    the stored rows of those periods again ──► after
//!  COMMIT ──► RatingCorrection { before, after } ──► the running pipeline's rating, at one epoch:
//!    it retracts before, adds after, and its charge and line changes reach the sink as any others
//! ```
//! Contract: once a job has succeeded, every row, charge and upcoming line in its scope (widened to
//! whole UTC days, which holds whole windows of every meter, and for charges to whole billing periods)
//! equals what an uninterrupted pipeline run over the same events with today's meters and books would
//! have stored.
//!
//! Only the pipeline's leader runs jobs (`rerating_jobs.rs`), and the job succeeds once the epoch that
//! took its correction in is committed. The rows are the job's to correct; the charges stay the
//! rating's, the one writer that keeps them a function of the rows: the rating retracts `before` and
//! adds `after` (the stored rows are what it holds: only its sink and this job write them, and the job
//! holds the lease rows), re-rates the periods, and the sink stores the changed charges and lines, so
//! nothing later overwrites a correction with a stale value, and nothing restarts. Upcoming lines are
//! rebuilt from the stored charges here because they add up: a line tampered with is made whole, and
//! the rating's changes then add to it. With no pipeline running, the corrected rows wait for the next
//! start, whose rating charges them (it subtracts the stored charges, so only differences are written).
//!
//! What this rests on: the stored rows are what the running rating holds. That holds for everything
//! this code writes (the sink, jobs), and across restarts (a start loads them). A row edited by hand
//! in Postgres while the pipeline runs breaks it: a job's `after − before` then includes the edit,
//! which the rating never had, and its state ends off by that much until the next start. Edit rows
//! by hand only with the pipeline stopped (then a job repairs them as above), or restart it after.
//! The resync this replaced reloaded everything, so it also covered that case; it cost a restart of
//! every process per job.

mod bound;
mod rows;

use std::collections::{BTreeMap, BTreeSet};

use meterflow_model::{
    period_of, rate_period, Aggregate, AggregateKey, Aggregation, Charge, CompactString,
    Dimensions, Event, Item, Measure, MeterSet, PriceBook, WindowUsage,
};
use rust_decimal::Decimal;
use sqlx::types::Json;
use sqlx::{Connection, PgConnection};

use bound::Bound;
use meterflow_model::stored::multiset_row;
use meterflow_model::RatingCorrection;
use meterflow_store::{meters, price_books};
use rows::{expected_rows, stored_rows};

use crate::restore::{item_columns, rating_rows, Within};
use crate::Lease;

pub use meterflow_store::rerating_jobs::{Outcome, Scope};

const DAY: i64 = 86_400;

/// A row's content: a group total, or a multiset of items.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Content {
    Total(Aggregate),
    Items(BTreeMap<Item, i64>),
}

/// How often a job recomputes when the pipeline admitted values of a meter it admits values of while
/// it read (`bound.rs`).
const ATTEMPTS: usize = 3;

/// One recomputation's end.
#[allow(clippy::large_enum_variant)] // one per job attempt, returned at once
enum Attempt {
    /// Done: `None` if the pipeline no longer holds the lease (nothing was changed).
    Done(Option<(Outcome, RatingCorrection)>),
    /// The pipeline admitted values meanwhile; nothing was changed.
    AdmittedMeanwhile,
}

/// Runs the recomputation for `scope` in one transaction (see the module docs), for the pipeline that
/// holds `lease`: `None` if it no longer does (nothing was changed).
pub async fn rerate(
    conn: &mut PgConnection,
    scope: &Scope,
    lease: &Lease,
) -> Result<Option<(Outcome, RatingCorrection)>, sqlx::Error> {
    for _ in 1..ATTEMPTS {
        if let Attempt::Done(done) = rerate_once(conn, scope, lease).await? {
            return Ok(done);
        }
    }
    match rerate_once(conn, scope, lease).await? {
        Attempt::Done(done) => Ok(done),
        Attempt::AdmittedMeanwhile => Err(sqlx::Error::Protocol(format!(
            "the pipeline admitted new dimension values of a meter this job admits values of \
             while it read, {ATTEMPTS} times; run the job again when fewer new values arrive"
        ))),
    }
}

async fn rerate_once(
    conn: &mut PgConnection,
    scope: &Scope,
    lease: &Lease,
) -> Result<Attempt, sqlx::Error> {
    let from = (scope.from_micros / 1_000_000).div_euclid(DAY) * DAY;
    let to = ((scope.to_micros + 999_999) / 1_000_000 + DAY - 1).div_euclid(DAY) * DAY;
    // Reading and recomputing takes long for a wide scope: it runs in a snapshot, without the lease,
    // so the pipeline keeps committing meanwhile (finding 23). What the pipeline commits after the
    // snapshot are changes for events the snapshot does not count, so the corrections are applied as
    // differences (expected − stored as of the snapshot), which keeps those changes.
    let mut snapshot = crate::restore::read_only_snapshot(conn).await?;
    let meters = meters::load_meters(&mut snapshot).await?;
    let multiset: BTreeSet<String> = meters
        .iter()
        .filter(|m| {
            matches!(
                m.aggregation,
                Aggregation::Max | Aggregation::UniqueCount | Aggregation::Latest
            )
        })
        .map(|m| m.meter.clone())
        .collect();
    let mut bound = Bound::load(&mut snapshot, &meters).await?;
    let meter_set = MeterSet::new(meters);

    let expected = expected_rows(&mut snapshot, scope, from, to, &meter_set, &mut bound).await?;
    let (stored, stored_totals, quarantined) =
        stored_rows(&mut snapshot, &scope.customer_ids, from, to, &multiset).await?;
    snapshot.commit().await?;
    let mut tx = conn.begin().await?;
    // No epoch commits while we correct: the sink takes this lock first in every commit.
    let leases =
        sqlx::query!("SELECT topic, generation FROM pipeline_leases ORDER BY topic FOR UPDATE")
            .fetch_all(&mut *tx)
            .await?;
    if !leases
        .iter()
        .any(|l| l.topic == lease.topic && l.generation == lease.generation)
    {
        // Release the lease rows now, not when the connection is next used.
        tx.rollback().await?;
        return Ok(Attempt::Done(None));
    }
    if bound.admitted_meanwhile(&mut tx).await? {
        tx.rollback().await?;
        return Ok(Attempt::AdmittedMeanwhile);
    }
    bound.store(&mut tx, &lease.topic).await?;
    // Every period the scope touches, for the customers with rows there; and the rating state there.
    let periods: BTreeSet<(CompactString, CompactString, i64, Dimensions)> = expected
        .keys()
        .chain(stored.keys())
        .map(|k| {
            (
                k.customer_id.clone(),
                k.meter.clone(),
                period_of(k.window_start).0,
                k.dimensions.clone(),
            )
        })
        .collect();
    let within = Within {
        customers: periods
            .iter()
            .map(|(c, _, _, _)| c.to_string())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
        from: periods.iter().map(|(_, _, p, _)| *p).min().unwrap_or(0),
        to: periods
            .iter()
            .map(|(_, _, p, _)| period_of(*p).1)
            .max()
            .unwrap_or(0),
    };
    let before = rating_rows(&mut tx, Some(&within)).await?;
    let mut outcome = Outcome::default();
    let keys: BTreeSet<&AggregateKey> = expected.keys().chain(stored.keys()).collect();
    outcome.windows_checked = keys.len() as u64;
    for key in keys {
        let want = expected.get(key);
        // A multiset row must also show the value its items make (it could have been tampered with).
        let row_right = match want {
            Some(Content::Items(items)) => stored_totals.get(key) == multiset_row(items).as_ref(),
            _ => true,
        };
        let had = stored.get(key);
        let is_quarantined = quarantined.contains(key);
        if want == had && row_right && !is_quarantined {
            continue;
        }
        outcome.windows_changed += 1;
        if is_quarantined {
            // Its stored value is not its usage: write it whole (README "Overflow is data").
            write_row(&mut tx, key, want).await?;
        } else {
            correct_row(&mut tx, key, want, had).await?;
        }
    }

    // What the charges of every period the scope touches will be once rated from the corrected rows.
    let books = price_books::load_price_books(&mut tx).await?;
    // By (customer, period) first, so each customer's period is read once for all its meters and
    // dimension values.
    let mut by_period: Vec<_> = periods.iter().collect();
    by_period.sort_by_key(|(c, m, p, d)| (c, p, m, d));
    let mut loaded: Option<((&str, i64), StoredRows)> = None;
    for (customer, meter, period, dimensions) in by_period {
        let at = (customer.as_str(), *period);
        let rows = match loaded.take() {
            Some((was, rows)) if was == at => rows,
            _ => {
                let customers = vec![customer.to_string()];
                let end = period_of(*period).1;
                stored_rows(&mut tx, &customers, *period, end, &multiset)
                    .await?
                    .0
            }
        };
        let rated = Rated {
            customer,
            meter,
            dimensions,
            period: *period,
        };
        let (checked, changed, before, after) =
            rerate_period(&mut tx, rated, &rows, &books).await?;
        loaded = Some((at, rows));
        outcome.windows_checked += checked;
        outcome.windows_changed += changed;
        outcome.amount_before = checked_sum([outcome.amount_before, before])?;
        outcome.amount_after = checked_sum([outcome.amount_after, after])?;
    }
    let touched: BTreeSet<(&str, i64)> = periods
        .iter()
        .map(|(c, _, p, _)| (c.as_str(), *p))
        .collect();
    for (customer, period) in touched {
        sqlx::query!(
            "DELETE FROM upcoming_lines WHERE customer_id = $1 AND period_start = to_timestamp($2::bigint)",
            customer,
            period,
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query!(
            "INSERT INTO upcoming_lines (customer_id, period_start, meter, dimensions, price_book_id,
                                         currency, quantity, amount, windows)
             SELECT customer_id, to_timestamp($2::bigint), meter, dimensions, price_book_id, min(currency),
                    sum(quantity), sum(amount), count(*)
             FROM charges
             WHERE customer_id = $1 AND window_start >= to_timestamp($2::bigint)
               AND window_start < to_timestamp($3::bigint)
             GROUP BY customer_id, meter, dimensions, price_book_id",
            customer,
            period,
            period_of(period).1,
        )
        .execute(&mut *tx)
        .await?;
    }
    let mut after = rating_rows(&mut tx, Some(&within)).await?;
    tx.commit().await?;
    // The running Admit operator learns the values this job admitted at the correction's epoch.
    after.dimension_values = bound.new;
    Ok(Attempt::Done(Some((
        outcome,
        RatingCorrection { before, after },
    ))))
}

/// Corrects a stored row by the difference between what it should be (`want`) and what it was in the
/// snapshot (`had`): a group row's value and count, a multiset row's item counts (the row is then
/// recomputed from its items). Changes the pipeline committed since the snapshot stay added.
async fn correct_row(
    tx: &mut PgConnection,
    key: &AggregateKey,
    want: Option<&Content>,
    had: Option<&Content>,
) -> Result<(), sqlx::Error> {
    let overflow = || sqlx::Error::Decode(Box::new(meterflow_model::aggregate::Overflow));
    let items_of = |c: Option<&Content>| -> Option<BTreeMap<Item, i64>> {
        match c {
            Some(Content::Items(items)) => Some(items.clone()),
            Some(Content::Total(_)) => None,
            None => Some(BTreeMap::new()),
        }
    };
    let total_of = |c: Option<&Content>| match c {
        Some(Content::Total(t)) => Some(*t),
        Some(Content::Items(_)) => None,
        None => Some(Aggregate::default()),
    };
    let start = key.window_start;
    let dimensions = key.dimensions.to_string();
    let is_items =
        matches!(want, Some(Content::Items(_))) || matches!(had, Some(Content::Items(_)));
    if !is_items {
        let (Some(w), Some(h)) = (total_of(want), total_of(had)) else {
            return write_row(tx, key, want).await;
        };
        let value = w.value.checked_sub(h.value).ok_or_else(overflow)?;
        let count = w
            .event_count
            .checked_sub(h.event_count)
            .ok_or_else(overflow)?;
        sqlx::query!(
            "INSERT INTO aggregations AS a (customer_id, meter, window_start, window_end, value, event_count,
                                            dimensions)
             VALUES ($1, $2, to_timestamp($3::bigint), to_timestamp($4::bigint), $5, $6, $7::text::jsonb)
             ON CONFLICT ON CONSTRAINT aggregations_pkey DO UPDATE
             SET value = a.value + excluded.value, event_count = a.event_count + excluded.event_count,
                 revision = a.revision + 1, updated_at = now()",
            key.customer_id.as_str(),
            key.meter.as_str(),
            start,
            key.window_end,
            value,
            count,
            dimensions,
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query!(
            "DELETE FROM aggregations WHERE customer_id = $1 AND meter = $2 AND window_start = to_timestamp($3::bigint)
               AND dimensions = $4::text::jsonb AND value = 0 AND event_count = 0",
            key.customer_id.as_str(),
            key.meter.as_str(),
            start,
            dimensions,
        )
        .execute(&mut *tx)
        .await?;
        return Ok(());
    }
    let (Some(w), Some(h)) = (items_of(want), items_of(had)) else {
        return write_row(tx, key, want).await;
    };
    let mut kind = None;
    for item in w.keys().chain(h.keys()) {
        let delta = w
            .get(item)
            .copied()
            .unwrap_or(0)
            .checked_sub(h.get(item).copied().unwrap_or(0))
            .ok_or_else(overflow)?;
        let (k, sort_time, text, _) = item_columns(item);
        kind = Some(k);
        if delta == 0 {
            continue;
        }
        let updated = sqlx::query!(
            "UPDATE meter_values SET count = count + $6
             WHERE customer_id = $1 AND meter = $2 AND window_start = to_timestamp($3::bigint) AND sort_time = $4
               AND item = $5 AND dimensions = $7::text::jsonb",
            key.customer_id.as_str(),
            key.meter.as_str(),
            start,
            sort_time,
            text,
            delta,
            dimensions,
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated == 0 {
            insert_item(tx, key, item, delta).await?;
        }
    }
    sqlx::query!(
        "DELETE FROM meter_values WHERE customer_id = $1 AND meter = $2 AND window_start = to_timestamp($3::bigint)
           AND dimensions = $4::text::jsonb AND count = 0",
        key.customer_id.as_str(),
        key.meter.as_str(),
        start,
        dimensions,
    )
    .execute(&mut *tx)
    .await?;
    // The row shows what its items make now (also when it had been tampered with).
    sqlx::query!(
        "WITH agg AS (
             SELECT max(v.num) AS max_num, count(*) AS items, sum(v.count)::bigint AS events,
                    (array_agg(v.num ORDER BY v.sort_time DESC, v.item DESC))[1] AS latest
             FROM meter_values v
             WHERE v.customer_id = $1 AND v.meter = $2 AND v.window_start = to_timestamp($3::bigint)
               AND v.dimensions = $6::text::jsonb
         )
         INSERT INTO aggregations AS a (customer_id, meter, window_start, window_end, value, event_count,
                                        dimensions)
         SELECT $1, $2, to_timestamp($3::bigint), to_timestamp($4::bigint),
                CASE $5 WHEN 'max' THEN COALESCE(agg.max_num, 0)
                        WHEN 'unique_count' THEN agg.items
                        ELSE COALESCE(agg.latest, 0) END,
                agg.events, $6::text::jsonb
         FROM agg WHERE agg.items > 0
         ON CONFLICT ON CONSTRAINT aggregations_pkey DO UPDATE
         SET value = excluded.value, event_count = excluded.event_count,
             revision = a.revision + 1, updated_at = now()",
        key.customer_id.as_str(),
        key.meter.as_str(),
        start,
        key.window_end,
        kind.unwrap_or("max"),
        dimensions,
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "DELETE FROM aggregations a WHERE customer_id = $1 AND meter = $2 AND window_start = to_timestamp($3::bigint)
           AND dimensions = $4::text::jsonb
           AND NOT EXISTS (SELECT 1 FROM meter_values v WHERE v.customer_id = a.customer_id
                           AND v.meter = a.meter AND v.window_start = a.window_start
                           AND v.dimensions = a.dimensions)",
        key.customer_id.as_str(),
        key.meter.as_str(),
        start,
        dimensions,
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Stores a new `meter_values` row: `item` of the row `key`, held `count` times.
async fn insert_item(
    tx: &mut PgConnection,
    key: &AggregateKey,
    item: &Item,
    count: i64,
) -> Result<(), sqlx::Error> {
    let (kind, sort_time, text, num) = item_columns(item);
    sqlx::query!(
        "INSERT INTO meter_values (customer_id, meter, window_start, sort_time, item, num, kind, count,
                                   dimensions)
         VALUES ($1, $2, to_timestamp($3::bigint), $4, $5, $6, $7, $8, $9::text::jsonb)",
        key.customer_id.as_str(),
        key.meter.as_str(),
        key.window_start,
        sort_time,
        text,
        num,
        kind,
        count,
        key.dimensions.to_string(),
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Replaces a stored row by what it should be (or removes it).
async fn write_row(
    tx: &mut PgConnection,
    key: &AggregateKey,
    want: Option<&Content>,
) -> Result<(), sqlx::Error> {
    let start = key.window_start;
    let dimensions = key.dimensions.to_string();
    sqlx::query!(
        "DELETE FROM meter_values WHERE customer_id = $1 AND meter = $2 AND window_start = to_timestamp($3::bigint)
           AND dimensions = $4::text::jsonb",
        key.customer_id.as_str(),
        key.meter.as_str(),
        start,
        dimensions,
    )
    .execute(&mut *tx)
    .await?;
    let row = match want {
        None => None,
        Some(Content::Total(total)) => Some(*total),
        Some(Content::Items(items)) => {
            for (item, count) in items.iter().filter(|(_, n)| **n > 0) {
                insert_item(tx, key, item, *count).await?;
            }
            multiset_row(items)
        }
    };
    match row {
        None => {
            sqlx::query!(
                "DELETE FROM aggregations WHERE customer_id = $1 AND meter = $2 AND window_start = to_timestamp($3::bigint)
                   AND dimensions = $4::text::jsonb",
                key.customer_id.as_str(),
                key.meter.as_str(),
                start,
                dimensions,
            )
            .execute(&mut *tx)
            .await?;
        }
        Some(total) => {
            sqlx::query!(
                "INSERT INTO aggregations AS a (customer_id, meter, window_start, window_end, value, event_count,
                                                dimensions)
                 VALUES ($1, $2, to_timestamp($3::bigint), to_timestamp($4::bigint), $5, $6, $7::text::jsonb)
                 ON CONFLICT ON CONSTRAINT aggregations_pkey DO UPDATE
                 SET value = excluded.value, event_count = excluded.event_count, quarantined = false,
                     revision = a.revision + 1, updated_at = now()",
                key.customer_id.as_str(),
                key.meter.as_str(),
                start,
                key.window_end,
                total.value,
                total.event_count,
                dimensions,
            )
            .execute(&mut *tx)
            .await?;
        }
    }
    Ok(())
}

/// Σ amounts, or an error (never a panic) when it leaves the 96-bit decimal range (finding 22).
fn checked_sum(amounts: impl IntoIterator<Item = Decimal>) -> Result<Decimal, sqlx::Error> {
    amounts
        .into_iter()
        .try_fold(Decimal::ZERO, |sum, a| sum.checked_add(a))
        .ok_or_else(|| sqlx::Error::Decode(Box::new(meterflow_model::aggregate::Overflow)))
}

/// A `charges` row of one customer's meter as `rerate_period` selects it, its window bounds in seconds.
struct ChargeRow {
    dimensions: Json<Dimensions>,
    window_start: i64,
    window_end: i64,
    quantity: Decimal,
    amount: Decimal,
    currency: String,
    price_book_id: String,
}

impl From<ChargeRow> for Charge {
    fn from(row: ChargeRow) -> Self {
        Charge {
            dimensions: row.dimensions.0,
            window_start: row.window_start,
            window_end: row.window_end,
            quantity: row.quantity,
            amount: row.amount,
            currency: row.currency.into(),
            price_book_id: row.price_book_id.into(),
        }
    }
}

/// Stored rows by key, as `stored_rows` reads them.
type StoredRows = BTreeMap<AggregateKey, Content>;

/// One period [`rerate_period`] rates: a customer's windows of one meter and one set of dimension
/// values in the billing period starting at `period` (seconds).
#[derive(Clone, Copy)]
struct Rated<'a> {
    customer: &'a str,
    meter: &'a str,
    dimensions: &'a Dimensions,
    period: i64,
}

/// Rates one customer's meter and dimension values over one period from `rows`, the customer's stored
/// (corrected) rows of the period, as the pipeline's rating will once it takes the correction in, and compares with the stored charges: (charges compared,
/// charges that will change, Σ before, Σ after). Writes nothing: the charges are the rating's.
async fn rerate_period(
    tx: &mut PgConnection,
    rated: Rated<'_>,
    rows: &StoredRows,
    books: &[PriceBook],
) -> Result<(u64, u64, Decimal, Decimal), sqlx::Error> {
    let Rated {
        customer,
        meter,
        dimensions,
        period,
    } = rated;
    let end = period_of(period).1;
    let windows: Vec<WindowUsage> = rows
        .iter()
        .filter(|(k, _)| k.meter == meter && k.dimensions == *dimensions)
        .filter_map(|(k, content)| {
            let measure = match content {
                Content::Total(total) => Measure::Total(total.value),
                Content::Items(items) => Measure::from_items(
                    Decimal::ZERO,
                    items.iter().filter(|(_, n)| **n > 0).map(|(i, _)| i),
                )?,
            };
            Some(WindowUsage {
                window_start: k.window_start,
                window_end: k.window_end,
                measure,
            })
        })
        .collect();
    let meter_books: Vec<&PriceBook> = books
        .iter()
        .filter(|b| b.meter == meter && b.customer_id.as_deref().is_none_or(|c| c == customer))
        .filter(|b| dimensions.matches(&b.dimensions))
        .collect();
    let want: BTreeMap<i64, Charge> = rate_period(customer, dimensions, &windows, &meter_books)
        .map_err(|e| sqlx::Error::Decode(Box::new(e)))?
        .into_iter()
        .map(|c| (c.window_start, c))
        .collect();
    let stored: BTreeMap<i64, Charge> = sqlx::query_as!(
        ChargeRow,
        "SELECT dimensions AS \"dimensions: Json<Dimensions>\",
                extract(epoch FROM window_start)::bigint AS \"window_start!\",
                extract(epoch FROM window_end)::bigint AS \"window_end!\",
                quantity, amount, currency, price_book_id
         FROM charges
         WHERE customer_id = $1 AND meter = $2 AND window_start >= to_timestamp($3::bigint)
           AND window_start < to_timestamp($4::bigint) AND dimensions = $5::text::jsonb",
        customer,
        meter,
        period,
        end,
        dimensions.to_string(),
    )
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|r| (r.window_start, Charge::from(r)))
    .collect();
    let before = checked_sum(stored.values().map(|c| c.amount))?;
    let after = checked_sum(want.values().map(|c| c.amount))?;
    let starts: BTreeSet<i64> = want.keys().chain(stored.keys()).copied().collect();
    let changed = starts
        .iter()
        .filter(|start| want.get(*start) != stored.get(*start))
        .count() as u64;
    Ok((starts.len() as u64, changed, before, after))
}
