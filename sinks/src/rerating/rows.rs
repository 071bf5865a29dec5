//! The two sides a re-rating compares per window: the rows the raw events give (recomputed from
//! `raw_events` with the meters as they are), and the rows stored.

use super::*;
use crate::restore::ItemRow;

/// The rows the scope's counted events make with today's meters: only events the pipeline has
/// committed (claimed below the committed offsets) and not voided by a committed void.
///
/// A meter with `group_by` admits values as the pipeline does (`Admitted::admit`, in (event time, event
/// id) order, voided events too, since the pipeline admitted them when it counted them): `bound`
/// holds what is admitted already and gathers what this job admits and refuses.
pub(super) async fn expected_rows(
    tx: &mut PgConnection,
    scope: &Scope,
    from: i64,
    to: i64,
    meters: &MeterSet,
    bound: &mut Bound,
) -> Result<BTreeMap<AggregateKey, Content>, sqlx::Error> {
    let rows = sqlx::query_as!(
        EventRow,
        "WITH committed AS (
             SELECT partition, max(next_offset) AS next FROM source_offsets GROUP BY partition
         )
         SELECT t.event_id, t.customer_id, t.event_type,
                (extract(epoch FROM t.event_time) * 1000000)::bigint AS \"event_time_micros!\", t.value,
                t.properties::text AS \"properties!\",
                e.counted_partition AS \"counted_partition!\",
                COALESCE(e.counted_offset, -1) AS \"counted_offset!\",
                COALESCE(e.voided_partition < 0
                         OR e.voided_offset < (SELECT next FROM committed c WHERE c.partition = e.voided_partition),
                         false) AS \"voided!\"
         FROM telemetry_events t
         JOIN event_ids e ON e.event_id = t.event_id
         WHERE t.event_time >= to_timestamp($1::bigint) AND t.event_time < to_timestamp($2::bigint)
           AND (cardinality($3::text[]) = 0 OR t.customer_id = ANY($3))
           AND e.counted_partition IS NOT NULL
           AND (e.counted_partition < 0
                OR e.counted_offset < (SELECT next FROM committed c WHERE c.partition = e.counted_partition))
         ORDER BY t.event_time, t.event_id",
        from,
        to,
        &scope.customer_ids,
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut expected: BTreeMap<AggregateKey, Content> = BTreeMap::new();
    for r in rows {
        let (voided, position) = (r.voided, (r.counted_partition, r.counted_offset));
        // The event as it was metered: properties are stored as the decoder's canonical text (migration
        // 0008), so it is rebuilt, not decoded again (a rule added since must not drop a counted event).
        let event = Event::from(r);
        let (contributions, _skipped) = meters.contributions(&event);
        for c in contributions {
            if !bound.admits(&c.key, &event, position) || voided {
                continue;
            }
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
    let rows = sqlx::query_as!(
        AggregationRow,
        "SELECT customer_id, meter, dimensions AS \"dimensions: Json<Dimensions>\",
                extract(epoch FROM window_start)::bigint AS \"window_start!\",
                extract(epoch FROM window_end)::bigint AS \"window_end!\", value, event_count, quarantined
         FROM aggregations
         WHERE window_start >= to_timestamp($1::bigint) AND window_start < to_timestamp($2::bigint)
           AND (cardinality($3::text[]) = 0 OR customer_id = ANY($3))",
        from,
        to,
        customers,
    )
    .fetch_all(&mut *tx)
    .await?;
    for r in rows {
        let key = r.key();
        let total = Aggregate {
            value: r.value,
            event_count: r.event_count,
        };
        if r.quarantined {
            quarantined.insert(key.clone());
        }
        if multiset.contains(key.meter.as_str()) {
            totals.insert(key.clone(), total);
            stored.insert(key, Content::Items(BTreeMap::new()));
        } else {
            stored.insert(key, Content::Total(total));
        }
    }
    let items = sqlx::query_as!(
        ItemRow,
        "SELECT v.customer_id, v.meter, v.dimensions AS \"dimensions: Json<Dimensions>\",
                extract(epoch FROM v.window_start)::bigint AS \"window_start!\",
                extract(epoch FROM a.window_end)::bigint AS \"window_end!\", v.kind, v.sort_time, v.item, v.num,
                v.count
         FROM meter_values v JOIN aggregations a USING (customer_id, meter, window_start, dimensions)
         WHERE v.window_start >= to_timestamp($1::bigint) AND v.window_start < to_timestamp($2::bigint)
           AND (cardinality($3::text[]) = 0 OR v.customer_id = ANY($3)) AND v.count > 0",
        from,
        to,
        customers,
    )
    .fetch_all(&mut *tx)
    .await?;
    for r in items {
        let key = r.key();
        let count = r.count;
        let item = r.item();
        let entry = stored
            .entry(key)
            .or_insert_with(|| Content::Items(BTreeMap::new()));
        if let Content::Items(items) = entry {
            items.insert(item, count);
        }
    }
    // A multiset row whose items are all gone is no row.
    stored.retain(|_, c| !matches!(c, Content::Items(items) if items.is_empty()));
    Ok((stored, totals, quarantined))
}

/// A `telemetry_events` row as `expected_rows` selects it: the event as it was metered.
struct EventRow {
    event_id: String,
    customer_id: String,
    event_type: String,
    event_time_micros: i64,
    value: Decimal,
    properties: String,
    counted_partition: i32,
    counted_offset: i64,
    voided: bool,
}

impl From<EventRow> for Event {
    fn from(row: EventRow) -> Self {
        Event {
            event_id: row.event_id,
            customer_id: row.customer_id,
            event_type: row.event_type,
            event_time_micros: row.event_time_micros,
            value: row.value,
            properties: row.properties,
        }
    }
}

/// An `aggregations` row as `stored_rows` selects it, its window bounds in seconds.
struct AggregationRow {
    customer_id: String,
    meter: String,
    dimensions: Json<Dimensions>,
    window_start: i64,
    window_end: i64,
    value: Decimal,
    event_count: i64,
    quarantined: bool,
}

impl AggregationRow {
    fn key(&self) -> AggregateKey {
        AggregateKey {
            customer_id: self.customer_id.as_str().into(),
            meter: self.meter.as_str().into(),
            dimensions: self.dimensions.0.clone(),
            window_start: self.window_start,
            window_end: self.window_end,
        }
    }
}
