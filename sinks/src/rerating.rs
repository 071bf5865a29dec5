//! Re-rating jobs (SPEC §7): recompute a scope from the stored raw events, the current meters and the
//! current price books through the same `model/` code the dataflow uses, and correct what differs.
//!
//! ```text
//!  one read-only snapshot, holding no lock (the pipeline keeps committing, finding 23):
//!    events counted and committed in the scope (event_ids ⋈ telemetry_events, below the committed
//!    offsets, minus committed voids) ──decode + MeterSet──► expected rows
//!    stored rows (aggregations, meter_values) ──compare──► corrections: expected − stored, per row/item
//!  one transaction, holding every pipeline lease row (so no epoch commits meanwhile):
//!    stored rows += corrections (what the pipeline committed since the snapshot stays added)
//!    every period the scope touches ──rate_period over its (corrected) rows──► correct charges,
//!                                                                          rebuild upcoming lines
//!    pipeline_leases.resync_requested += 1 ──► the running pipeline reloads its rating state
//!  COMMIT
//! ```
//! Contract: after a job, every row, charge and upcoming line in its scope (widened to whole UTC days,
//! which holds whole windows of every meter, and for charges to whole billing periods) equals what an
//! uninterrupted pipeline run over the same events with today's meters and books would have stored. The
//! pipeline reloads the corrected state, so it never later overwrites a correction with a stale value.

mod rows;

use std::collections::{BTreeMap, BTreeSet};

use meterflow_model::{
    period_of, rate_period, Aggregate, AggregateKey, Aggregation, Charge, Event, Item, Measure,
    MeterSet, PriceBook, WindowUsage,
};
use rust_decimal::Decimal;
use sqlx::{Connection, PgConnection};

use meterflow_store::{meters, price_books};
use rows::{expected_rows, stored_rows};

pub use meterflow_store::rerating_jobs::{Outcome, Scope};

const DAY: i64 = 86_400;

/// A row's content: a group total, or a multiset of items.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Content {
    Total(Aggregate),
    Items(BTreeMap<Item, i64>),
}

/// Runs the recomputation for `scope` in one transaction (see the module docs).
pub async fn rerate(conn: &mut PgConnection, scope: &Scope) -> Result<Outcome, sqlx::Error> {
    let from = (scope.from_micros / 1_000_000).div_euclid(DAY) * DAY;
    let to = ((scope.to_micros + 999_999) / 1_000_000 + DAY - 1).div_euclid(DAY) * DAY;
    // Reading and recomputing takes long for a wide scope: it runs in a snapshot, without the lease,
    // so the pipeline keeps committing meanwhile (finding 23). What the pipeline commits after the
    // snapshot are changes for events the snapshot does not count, so the corrections are applied as
    // differences (expected − stored as of the snapshot), which keeps those changes.
    let mut snapshot = conn.begin().await?;
    sqlx::query!("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *snapshot)
        .await?;
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
    let meter_set = MeterSet::new(meters);

    let expected = expected_rows(&mut snapshot, scope, from, to, &meter_set).await?;
    let (stored, stored_totals, quarantined) =
        stored_rows(&mut snapshot, &scope.customer_ids, from, to, &multiset).await?;
    snapshot.commit().await?;
    let mut tx = conn.begin().await?;
    // No epoch commits while we correct: the sink takes this lock first in every commit.
    sqlx::query!("SELECT topic FROM pipeline_leases ORDER BY topic FOR UPDATE")
        .fetch_all(&mut *tx)
        .await?;
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

    // Charges: every period the scope touches, for the customers with rows there.
    let periods: BTreeSet<(String, String, i64)> = expected
        .keys()
        .chain(stored.keys())
        .map(|k| {
            (
                k.customer_id.clone(),
                k.meter.clone(),
                period_of(k.window_start).0,
            )
        })
        .collect();
    let books = price_books::load_price_books(&mut tx).await?;
    for (customer, meter, period) in &periods {
        let (checked, changed, before, after) =
            rerate_period(&mut tx, customer, meter, *period, &books, &multiset).await?;
        outcome.windows_checked += checked;
        outcome.windows_changed += changed;
        outcome.amount_before = checked_sum([outcome.amount_before, before])?;
        outcome.amount_after = checked_sum([outcome.amount_after, after])?;
    }
    let touched: BTreeSet<(&str, i64)> = periods.iter().map(|(c, _, p)| (c.as_str(), *p)).collect();
    for (customer, period) in touched {
        sqlx::query!(
            "DELETE FROM upcoming_lines WHERE customer_id = $1 AND period_start = to_timestamp($2::bigint)",
            customer,
            period,
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query!(
            "INSERT INTO upcoming_lines (customer_id, period_start, meter, price_book_id, currency,
                                         quantity, amount, windows)
             SELECT customer_id, to_timestamp($2::bigint), meter, price_book_id, min(currency), sum(quantity),
                    sum(amount), count(*)
             FROM charges
             WHERE customer_id = $1 AND window_start >= to_timestamp($2::bigint)
               AND window_start < to_timestamp($3::bigint)
             GROUP BY customer_id, meter, price_book_id",
            customer,
            period,
            period_of(period).1,
        )
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query!("UPDATE pipeline_leases SET resync_requested = resync_requested + 1")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(outcome)
}

/// Waits until every running pipeline (one that committed within the last 5 s) has reloaded the state
/// a job corrected; a stopped pipeline reloads it when it starts. False if `within` passed first.
pub async fn wait_for_resync(
    conn: &mut PgConnection,
    within: std::time::Duration,
) -> Result<bool, sqlx::Error> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let pending: i64 = sqlx::query_scalar!(
            "SELECT count(*) AS \"pending!\" FROM pipeline_leases
             WHERE resync_done < resync_requested AND committed_at > now() - interval '5 seconds'",
        )
        .fetch_one(&mut *conn)
        .await?;
        if pending == 0 {
            return Ok(true);
        }
        if std::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
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
            "INSERT INTO aggregations AS a (customer_id, meter, window_start, window_end, value, event_count)
             VALUES ($1, $2, to_timestamp($3::bigint), to_timestamp($4::bigint), $5, $6)
             ON CONFLICT ON CONSTRAINT aggregations_pkey DO UPDATE
             SET value = a.value + excluded.value, event_count = a.event_count + excluded.event_count,
                 revision = a.revision + 1, updated_at = now()",
            key.customer_id,
            key.meter,
            start,
            key.window_end,
            value,
            count,
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query!(
            "DELETE FROM aggregations WHERE customer_id = $1 AND meter = $2 AND window_start = to_timestamp($3::bigint)
               AND value = 0 AND event_count = 0",
            key.customer_id,
            key.meter,
            start,
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
        let (k, sort_time, text, num) = item_columns(item);
        kind = Some(k);
        if delta == 0 {
            continue;
        }
        let updated = sqlx::query!(
            "UPDATE meter_values SET count = count + $6
             WHERE customer_id = $1 AND meter = $2 AND window_start = to_timestamp($3::bigint) AND sort_time = $4
               AND item = $5",
            key.customer_id,
            key.meter,
            start,
            sort_time,
            text,
            delta,
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated == 0 {
            sqlx::query!(
                "INSERT INTO meter_values (customer_id, meter, window_start, sort_time, item, num, kind, count)
                 VALUES ($1, $2, to_timestamp($3::bigint), $4, $5, $6, $7, $8)",
                key.customer_id,
                key.meter,
                start,
                sort_time,
                text,
                num,
                k,
                delta,
            )
            .execute(&mut *tx)
            .await?;
        }
    }
    sqlx::query!(
        "DELETE FROM meter_values WHERE customer_id = $1 AND meter = $2 AND window_start = to_timestamp($3::bigint)
           AND count = 0",
        key.customer_id,
        key.meter,
        start,
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
         )
         INSERT INTO aggregations AS a (customer_id, meter, window_start, window_end, value, event_count)
         SELECT $1, $2, to_timestamp($3::bigint), to_timestamp($4::bigint),
                CASE $5 WHEN 'max' THEN COALESCE(agg.max_num, 0)
                        WHEN 'unique_count' THEN agg.items
                        ELSE COALESCE(agg.latest, 0) END,
                agg.events
         FROM agg WHERE agg.items > 0
         ON CONFLICT ON CONSTRAINT aggregations_pkey DO UPDATE
         SET value = excluded.value, event_count = excluded.event_count,
             revision = a.revision + 1, updated_at = now()",
        key.customer_id,
        key.meter,
        start,
        key.window_end,
        kind.unwrap_or("max"),
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "DELETE FROM aggregations a WHERE customer_id = $1 AND meter = $2 AND window_start = to_timestamp($3::bigint)
           AND NOT EXISTS (SELECT 1 FROM meter_values v WHERE v.customer_id = a.customer_id
                           AND v.meter = a.meter AND v.window_start = a.window_start)",
        key.customer_id,
        key.meter,
        start,
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// The `meter_values` columns of an item: (kind, sort_time, item text, num).
fn item_columns(item: &Item) -> (&'static str, i64, String, Option<Decimal>) {
    match item {
        Item::Max(v) => ("max", 0, v.to_string(), Some(*v)),
        Item::Unique(text) => ("unique_count", 0, text.clone(), None),
        Item::Latest {
            time_micros,
            event_id,
            value,
        } => ("latest", *time_micros, event_id.clone(), Some(*value)),
    }
}

/// Replaces a stored row by what it should be (or removes it).
async fn write_row(
    tx: &mut PgConnection,
    key: &AggregateKey,
    want: Option<&Content>,
) -> Result<(), sqlx::Error> {
    let start = key.window_start;
    sqlx::query!(
        "DELETE FROM meter_values WHERE customer_id = $1 AND meter = $2 AND window_start = to_timestamp($3::bigint)",
        key.customer_id,
        key.meter,
        start,
    )
    .execute(&mut *tx)
    .await?;
    let row = match want {
        None => None,
        Some(Content::Total(total)) => Some(*total),
        Some(Content::Items(items)) => {
            for (item, count) in items.iter().filter(|(_, n)| **n > 0) {
                let (kind, sort_time, text, num) = match item {
                    Item::Max(v) => ("max", 0, v.to_string(), Some(*v)),
                    Item::Unique(text) => ("unique_count", 0, text.clone(), None),
                    Item::Latest {
                        time_micros,
                        event_id,
                        value,
                    } => ("latest", *time_micros, event_id.clone(), Some(*value)),
                };
                sqlx::query!(
                    "INSERT INTO meter_values (customer_id, meter, window_start, sort_time, item, num, kind, count)
                     VALUES ($1, $2, to_timestamp($3::bigint), $4, $5, $6, $7, $8)",
                    key.customer_id,
                    key.meter,
                    start,
                    sort_time,
                    text,
                    num,
                    kind,
                    count,
                )
                .execute(&mut *tx)
                .await?;
            }
            multiset_row(items)
        }
    };
    match row {
        None => {
            sqlx::query!(
                "DELETE FROM aggregations WHERE customer_id = $1 AND meter = $2 AND window_start = to_timestamp($3::bigint)",
                key.customer_id,
                key.meter,
                start,
            )
            .execute(&mut *tx)
            .await?;
        }
        Some(total) => {
            sqlx::query!(
                "INSERT INTO aggregations AS a (customer_id, meter, window_start, window_end, value, event_count)
                 VALUES ($1, $2, to_timestamp($3::bigint), to_timestamp($4::bigint), $5, $6)
                 ON CONFLICT ON CONSTRAINT aggregations_pkey DO UPDATE
                 SET value = excluded.value, event_count = excluded.event_count, quarantined = false,
                     revision = a.revision + 1, updated_at = now()",
                key.customer_id,
                key.meter,
                start,
                key.window_end,
                total.value,
                total.event_count,
            )
            .execute(&mut *tx)
            .await?;
        }
    }
    Ok(())
}

/// The aggregate a multiset row shows: max, number of distinct values or latest value, with the number
/// of events; `None` without items.
fn multiset_row(items: &BTreeMap<Item, i64>) -> Option<Aggregate> {
    let live: Vec<&Item> = items
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(i, _)| i)
        .collect();
    if live.is_empty() {
        return None;
    }
    let event_count: i64 = items.values().filter(|n| **n > 0).sum();
    let value = match Measure::from_items(Decimal::ZERO, live.iter().copied())? {
        Measure::Max(v) => v,
        Measure::Unique(values) => Decimal::from(values.len()),
        Measure::Latest { value, .. } => value,
        Measure::Total(v) => v,
    };
    Some(Aggregate { value, event_count })
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
            window_start: row.window_start,
            window_end: row.window_end,
            quantity: row.quantity,
            amount: row.amount,
            currency: row.currency,
            price_book_id: row.price_book_id,
        }
    }
}

/// Re-rates one customer's meter over one period from its stored (corrected) rows and corrects the
/// stored charges: (charges compared, charges changed, Σ before, Σ after).
async fn rerate_period(
    tx: &mut PgConnection,
    customer: &str,
    meter: &str,
    period: i64,
    books: &[PriceBook],
    multiset: &BTreeSet<String>,
) -> Result<(u64, u64, Decimal, Decimal), sqlx::Error> {
    let end = period_of(period).1;
    let customers = vec![customer.to_owned()];
    let (rows, _, _) = stored_rows(&mut *tx, &customers, period, end, multiset).await?;
    let windows: Vec<WindowUsage> = rows
        .iter()
        .filter(|(k, _)| k.meter == meter)
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
        .collect();
    let want: BTreeMap<i64, Charge> = rate_period(customer, &windows, &meter_books)
        .map_err(|e| sqlx::Error::Decode(Box::new(e)))?
        .into_iter()
        .map(|c| (c.window_start, c))
        .collect();
    let stored: BTreeMap<i64, Charge> = sqlx::query_as!(
        ChargeRow,
        "SELECT extract(epoch FROM window_start)::bigint AS \"window_start!\",
                extract(epoch FROM window_end)::bigint AS \"window_end!\",
                quantity, amount, currency, price_book_id
         FROM charges
         WHERE customer_id = $1 AND meter = $2 AND window_start >= to_timestamp($3::bigint)
           AND window_start < to_timestamp($4::bigint)",
        customer,
        meter,
        period,
        end,
    )
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|r| (r.window_start, Charge::from(r)))
    .collect();
    let before = checked_sum(stored.values().map(|c| c.amount))?;
    let after = checked_sum(want.values().map(|c| c.amount))?;
    let starts: BTreeSet<i64> = want.keys().chain(stored.keys()).copied().collect();
    let mut changed = 0;
    for start in &starts {
        match (want.get(start), stored.get(start)) {
            (Some(w), Some(s)) if w == s => {}
            (Some(w), _) => {
                changed += 1;
                sqlx::query!(
                    "INSERT INTO charges AS c (customer_id, meter, window_start, window_end, quantity, amount,
                                               currency, price_book_id)
                     VALUES ($1, $2, to_timestamp($3::bigint), to_timestamp($4::bigint), $5, $6, $7, $8)
                     ON CONFLICT ON CONSTRAINT charges_pkey DO UPDATE
                     SET window_end = excluded.window_end, quantity = excluded.quantity,
                         amount = excluded.amount, currency = excluded.currency,
                         price_book_id = excluded.price_book_id, revision = c.revision + 1, updated_at = now()",
                    customer,
                    meter,
                    w.window_start,
                    w.window_end,
                    w.quantity,
                    w.amount,
                    w.currency,
                    w.price_book_id,
                )
                .execute(&mut *tx)
                .await?;
            }
            (None, Some(_)) => {
                changed += 1;
                sqlx::query!(
                    "DELETE FROM charges WHERE customer_id = $1 AND meter = $2 AND window_start = to_timestamp($3::bigint)",
                    customer,
                    meter,
                    start,
                )
                .execute(&mut *tx)
                .await?;
            }
            (None, None) => {}
        }
    }
    Ok((starts.len() as u64, changed, before, after))
}
