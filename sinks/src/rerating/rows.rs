//! The two sides a re-rating compares per window: the rows the raw events give (recomputed from
//! `raw_events` with the meters as they are), and the rows stored.

use super::*;

/// The rows the scope's counted events make with today's meters: only events the pipeline has
/// committed (claimed below the committed offsets) and not voided by a committed void.
pub(super) async fn expected_rows(
    tx: &mut PgConnection,
    scope: &Scope,
    from: i64,
    to: i64,
    meters: &MeterSet,
) -> Result<BTreeMap<AggregateKey, Content>, sqlx::Error> {
    let rows = sqlx::query(
        "WITH committed AS (
             SELECT partition, max(next_offset) AS next FROM source_offsets GROUP BY partition
         )
         SELECT t.event_id, t.customer_id, t.event_type,
                (extract(epoch FROM t.event_time) * 1000000)::bigint, t.value, t.properties::text
         FROM telemetry_events t
         JOIN event_ids e ON e.event_id = t.event_id
         WHERE t.event_time >= to_timestamp($1) AND t.event_time < to_timestamp($2)
           AND (cardinality($3::text[]) = 0 OR t.customer_id = ANY($3))
           AND e.counted_partition IS NOT NULL
           AND (e.counted_partition < 0
                OR e.counted_offset < (SELECT next FROM committed c WHERE c.partition = e.counted_partition))
           AND NOT COALESCE(e.voided_partition < 0
                            OR e.voided_offset < (SELECT next FROM committed c WHERE c.partition = e.voided_partition), false)",
    )
    .bind(from)
    .bind(to)
    .bind(&scope.customer_ids)
    .fetch_all(&mut *tx)
    .await?;
    let mut expected: BTreeMap<AggregateKey, Content> = BTreeMap::new();
    for r in rows {
        // The event as it was metered: properties are stored as the decoder's canonical text (migration
        // 0008), so it is rebuilt, not decoded again (a rule added since must not drop a counted event).
        let event = Event {
            event_id: r.try_get(0)?,
            customer_id: r.try_get(1)?,
            event_type: r.try_get(2)?,
            event_time_micros: r.try_get(3)?,
            value: r.try_get(4)?,
            properties: r.try_get(5)?,
        };
        let (contributions, _skipped) = meters.contributions(&event);
        for c in contributions {
            match c.item {
                None => {
                    let entry = expected
                        .entry(c.key)
                        .or_insert(Content::Total(Aggregate::default()));
                    if let Content::Total(total) = entry {
                        total
                            .checked_add(&c.usage)
                            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
                    }
                }
                Some(item) => {
                    let entry = expected
                        .entry(c.key)
                        .or_insert_with(|| Content::Items(BTreeMap::new()));
                    if let Content::Items(items) = entry {
                        *items.entry(item).or_default() += c.usage.event_count;
                    }
                }
            }
        }
    }
    Ok(expected)
}

/// The stored rows with a window starting in `[from, to)` (seconds), of the given customers (all when
/// empty).
/// Also returns the stored aggregate of each multiset row, and the quarantined rows.
pub(super) async fn stored_rows(
    tx: &mut PgConnection,
    customers: &[String],
    from: i64,
    to: i64,
    multiset: &BTreeSet<String>,
) -> Result<
    (
        BTreeMap<AggregateKey, Content>,
        BTreeMap<AggregateKey, Aggregate>,
        BTreeSet<AggregateKey>,
    ),
    sqlx::Error,
> {
    let mut stored = BTreeMap::new();
    let mut totals = BTreeMap::new();
    let mut quarantined = BTreeSet::new();
    // A quarantined row (its value overflowed, README "Overflow is data") is rewritten whole by a job,
    // which ends the quarantine.
    let rows = sqlx::query(
        "SELECT customer_id, meter, extract(epoch FROM window_start)::bigint,
                extract(epoch FROM window_end)::bigint, value, event_count, quarantined
         FROM aggregations
         WHERE window_start >= to_timestamp($1) AND window_start < to_timestamp($2)
           AND (cardinality($3::text[]) = 0 OR customer_id = ANY($3))",
    )
    .bind(from)
    .bind(to)
    .bind(customers)
    .fetch_all(&mut *tx)
    .await?;
    for r in rows {
        let key = key_of(&r)?;
        let total = Aggregate {
            value: r.try_get(4)?,
            event_count: r.try_get(5)?,
        };
        if r.try_get::<bool, _>(6)? {
            quarantined.insert(key.clone());
        }
        if multiset.contains(&key.meter) {
            totals.insert(key.clone(), total);
            stored.insert(key, Content::Items(BTreeMap::new()));
        } else {
            stored.insert(key, Content::Total(total));
        }
    }
    let items = sqlx::query(
        "SELECT v.customer_id, v.meter, extract(epoch FROM v.window_start)::bigint,
                extract(epoch FROM a.window_end)::bigint, v.kind, v.sort_time, v.item, v.num, v.count
         FROM meter_values v JOIN aggregations a USING (customer_id, meter, window_start)
         WHERE v.window_start >= to_timestamp($1) AND v.window_start < to_timestamp($2)
           AND (cardinality($3::text[]) = 0 OR v.customer_id = ANY($3)) AND v.count > 0",
    )
    .bind(from)
    .bind(to)
    .bind(customers)
    .fetch_all(&mut *tx)
    .await?;
    for r in items {
        let key = key_of(&r)?;
        let item = item_of(&r)?;
        let entry = stored
            .entry(key)
            .or_insert_with(|| Content::Items(BTreeMap::new()));
        if let Content::Items(items) = entry {
            items.insert(item, r.try_get(8)?);
        }
    }
    // A multiset row whose items are all gone is no row.
    stored.retain(|_, c| !matches!(c, Content::Items(items) if items.is_empty()));
    Ok((stored, totals, quarantined))
}

pub(super) fn key_of(r: &sqlx::postgres::PgRow) -> Result<AggregateKey, sqlx::Error> {
    Ok(AggregateKey {
        customer_id: r.try_get(0)?,
        meter: r.try_get(1)?,
        window_start: r.try_get(2)?,
        window_end: r.try_get(3)?,
    })
}

/// The item of a `meter_values` row selected as (…, kind, sort_time, item, num, …) at columns 4–7.
pub(super) fn item_of(r: &sqlx::postgres::PgRow) -> Result<Item, sqlx::Error> {
    let kind: String = r.try_get(4)?;
    let text: String = r.try_get(6)?;
    let num: Option<Decimal> = r.try_get(7)?;
    Ok(match kind.as_str() {
        "max" => Item::Max(num.unwrap_or_default().normalize()),
        "unique_count" => Item::Unique(text),
        _ => Item::Latest {
            time_micros: r.try_get(5)?,
            event_id: text,
            value: num.unwrap_or_default(),
        },
    })
}
