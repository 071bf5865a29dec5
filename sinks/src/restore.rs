//! What a pipeline reads at start-up and while it runs besides its input: the event-time progress last
//! committed, and the committed rows and charges rating starts from (the meters and price books in force
//! are read through `meterflow_store`).

mod copy;

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use meterflow_model::batch::{QuarantineReason, QuarantinedPeriod};
use meterflow_model::{
    Aggregate, AggregateKey, Charge, CompactString, Dimensions, Item, Latest, RatingState,
};
use rust_decimal::Decimal;
use sqlx::types::Json;
use sqlx::PgConnection;

/// The event-time progress last committed: the global watermark and, per partition, the greatest event
/// time read (microseconds).
pub async fn stored_event_times(
    conn: &mut PgConnection,
    topic: &str,
) -> Result<(Option<i64>, HashMap<i32, i64>), sqlx::Error> {
    let watermark: Option<DateTime<Utc>> = sqlx::query_scalar!(
        "SELECT committed_watermark FROM pipeline_leases WHERE topic = $1",
        topic,
    )
    .fetch_optional(&mut *conn)
    .await?
    .flatten();
    let rows = sqlx::query!(
        "SELECT partition, max_event_time AS \"max_event_time!\" FROM source_offsets WHERE topic = $1 AND max_event_time IS NOT NULL",
        topic,
    )
    .fetch_all(&mut *conn)
    .await?;
    let partitions = rows
        .iter()
        .map(|r| (r.partition, r.max_event_time.timestamp_micros()))
        .collect();
    Ok((watermark.map(|w| w.timestamp_micros()), partitions))
}

/// Records the allowed lateness the pipeline runs with, so the sink's finalization and the API agree.
pub async fn set_allowed_lateness(
    conn: &mut PgConnection,
    topic: &str,
    lateness_micros: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE pipeline_leases SET allowed_lateness = $2::bigint * interval '1 microsecond'
         WHERE topic = $1",
        topic,
        lateness_micros,
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A `meter_values` row with its row's window (bounds in seconds), as `item_rows` and the
/// re-rating job's `stored_rows` select it.
pub(crate) struct ItemRow {
    pub(crate) customer_id: String,
    pub(crate) meter: String,
    pub(crate) dimensions: Json<Dimensions>,
    pub(crate) window_start: i64,
    pub(crate) window_end: i64,
    pub(crate) kind: String,
    pub(crate) sort_time: i64,
    pub(crate) item: String,
    pub(crate) num: Option<Decimal>,
    pub(crate) count: i64,
}

impl ItemRow {
    /// The key of the row the item belongs to.
    pub(crate) fn key(&self) -> AggregateKey {
        AggregateKey {
            customer_id: self.customer_id.as_str().into(),
            meter: self.meter.as_str().into(),
            dimensions: self.dimensions.0.clone(),
            window_start: self.window_start,
            window_end: self.window_end,
        }
    }

    /// The item the row's kind, sort_time, item and num make ([`item_columns`] the other way).
    pub(crate) fn item(self) -> Item {
        let text = self.item;
        let num = self.num;
        match self.kind.as_str() {
            "max" => Item::Max(num.unwrap_or_default().normalize()),
            "unique_count" => Item::Unique(text),
            _ => Item::Latest(Box::new(Latest {
                time_micros: self.sort_time,
                event_id: text,
                value: num.unwrap_or_default(),
            })),
        }
    }

    /// The row's key, its item, and its count as the usage.
    fn into_row(self) -> (AggregateKey, Option<Item>, Aggregate) {
        let key = self.key();
        let usage = Aggregate {
            value: Decimal::ZERO,
            event_count: self.count,
        };
        (key, Some(self.item()), usage)
    }
}

/// The `meter_values` columns of an item: (kind, sort_time, item text, num).
pub(crate) fn item_columns(item: &Item) -> (&'static str, i64, String, Option<Decimal>) {
    let kind = item_kind(item);
    match item {
        Item::Max(v) => (kind, 0, v.to_string(), Some(*v)),
        Item::Unique(text) => (kind, 0, text.clone(), None),
        Item::Latest(latest) => (
            kind,
            latest.time_micros,
            latest.event_id.clone(),
            Some(latest.value),
        ),
    }
}

/// The `kind` column of an item's `meter_values` row.
pub(crate) fn item_kind(item: &Item) -> &'static str {
    match item {
        Item::Max(_) => "max",
        Item::Unique(_) => "unique_count",
        Item::Latest(_) => "latest",
    }
}

/// A `rating_quarantine` row as `load_rating_state` selects it, its times in seconds.
struct QuarantineRow {
    customer_id: String,
    meter: String,
    dimensions: Json<Dimensions>,
    period_start: i64,
    from_window: i64,
    reason: String,
}

impl From<QuarantineRow> for QuarantinedPeriod {
    fn from(row: QuarantineRow) -> Self {
        let reason = match row.reason.as_str() {
            "usage_overflow" => QuarantineReason::UsageOverflow,
            _ => QuarantineReason::RatingOverflow,
        };
        QuarantinedPeriod {
            customer_id: row.customer_id,
            meter: row.meter,
            dimensions: row.dimensions.0,
            period_start: row.period_start,
            from_window: row.from_window,
            reason,
        }
    }
}

/// A read-only transaction in one snapshot (REPEATABLE READ) on `conn`: what restoring the rating
/// state and a re-rating job's reading run in.
pub(crate) async fn read_only_snapshot(
    conn: &mut PgConnection,
) -> Result<sqlx::Transaction<'_, sqlx::Postgres>, sqlx::Error> {
    let mut tx = sqlx::Connection::begin(conn).await?;
    sqlx::query!("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// Everything committed that rating needs (SPEC §9): each sum/count row's total, each max /
/// unique_count / latest row's multiset of items, every charge and quarantined period. Read in one
/// snapshot; the caller holds the writer lease, so no epoch commits meanwhile, and re-rating jobs run
/// in the leader only once this is loaded (finding 13a: a job committing during the load would be
/// missed), and check the lease in their transaction (`rerating.rs`). The group rows and the charges,
/// a row each per window, are read by binary COPY (`restore/copy.rs`), the charges on `beside` in the
/// same snapshot, so two Postgres backends serve them at once; `tests/rating.rs` checks the state
/// against the one [`rating_rows`] and a query read.
pub async fn load_rating_state(
    conn: &mut PgConnection,
    beside: &mut PgConnection,
) -> Result<RatingState, sqlx::Error> {
    let mut tx = read_only_snapshot(conn).await?;
    let snapshot: Option<String> = sqlx::query_scalar!("SELECT pg_export_snapshot()")
        .fetch_one(&mut *tx)
        .await?;
    let snapshot = snapshot.ok_or_else(|| sqlx::Error::Protocol("no snapshot exported".into()))?;
    let mut beside_tx = read_only_snapshot(beside).await?;
    // A snapshot id is Postgres's own text (`00000003-0000001B-1`); SET takes no parameters.
    let quoted = snapshot.replace('\'', "''");
    sqlx::query(&format!("SET TRANSACTION SNAPSHOT '{quoted}'"))
        .execute(&mut *beside_tx)
        .await?;
    let (mut state, charges) =
        futures::future::try_join(copy_rows(&mut tx), copy_charges(&mut beside_tx)).await?;
    beside_tx.commit().await?;
    state.charges = charges;
    let quarantined = sqlx::query_as!(
        QuarantineRow,
        "SELECT customer_id, meter, dimensions AS \"dimensions: Json<Dimensions>\",
                extract(epoch FROM period_start)::bigint AS \"period_start!\",
                extract(epoch FROM from_window)::bigint AS \"from_window!\", reason
         FROM rating_quarantine",
    )
    .fetch_all(&mut *tx)
    .await?;
    state
        .quarantined_periods
        .extend(quarantined.into_iter().map(QuarantinedPeriod::from));
    state.dimension_values = sqlx::query!("SELECT meter, key, value FROM dimension_values")
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|r| (r.meter, r.key, r.value))
        .collect();
    tx.commit().await?;
    Ok(state)
}

/// The group rows (by binary COPY) and the multiset items of the whole state.
async fn copy_rows(conn: &mut PgConnection) -> Result<RatingState, sqlx::Error> {
    let mut state = RatingState::default();
    copy::each_tuple(conn, &copy_group_rows(), |t| {
        let key = AggregateKey {
            customer_id: t.text(0)?.into(),
            meter: t.text(1)?.into(),
            dimensions: t.parsed(2)?,
            window_start: t.timestamp_secs(3)?,
            window_end: t.timestamp_secs(4)?,
        };
        let aggregate = Aggregate {
            value: t.decimal(5)?,
            event_count: t.int8(6)?,
        };
        push_group_row(&mut state, key, aggregate, t.boolean(7)?);
        Ok(())
    })
    .await?;
    item_rows(conn, None, &mut state).await?;
    Ok(state)
}

/// Every charge, `(customer_id, meter, charge)`, by binary COPY.
async fn copy_charges(
    conn: &mut PgConnection,
) -> Result<Vec<(CompactString, CompactString, Charge)>, sqlx::Error> {
    let mut charges = Vec::new();
    copy::each_tuple(conn, COPY_CHARGES, |t| {
        let charge = Charge {
            dimensions: t.parsed(2)?,
            window_start: t.timestamp_secs(3)?,
            window_end: t.timestamp_secs(4)?,
            quantity: t.decimal(5)?,
            amount: t.decimal(6)?,
            currency: t.text(7)?.into(),
            price_book_id: t.text(8)?.into(),
        };
        charges.push((t.text(0)?.into(), t.text(1)?.into(), charge));
        Ok(())
    })
    .await?;
    Ok(charges)
}

/// Whose windows, and which, a part of the rating state covers: `customers`' windows starting in
/// `[from, to)` (seconds since the epoch).
#[derive(Clone, Debug)]
pub struct Within {
    pub customers: Vec<String>,
    pub from: i64,
    pub to: i64,
}

/// The group rows of the whole state (a sum or count meter's, one per window), as binary COPY reads
/// them: a value outside the decimal range (stored before quarantines existed) is read as quarantined,
/// never decoded into a Decimal it does not fit; the same rule as [`rating_rows`]'s query.
fn copy_group_rows() -> String {
    format!(
        "COPY (SELECT customer_id, meter, dimensions::text, window_start, window_end,
                      (CASE WHEN abs(value) > {max} THEN 0 ELSE value END)::text, event_count,
                      quarantined OR abs(value) > {max}
               FROM aggregations a
               WHERE NOT EXISTS (SELECT 1 FROM meters m WHERE m.meter = a.meter
                                 AND m.aggregation IN ('max', 'unique_count', 'latest')))
         TO STDOUT (FORMAT binary)",
        max = Decimal::MAX
    )
}

/// Every charge, as binary COPY reads it.
const COPY_CHARGES: &str =
    "COPY (SELECT customer_id, meter, dimensions::text, window_start, window_end,
                  quantity::text, amount::text, currency, price_book_id
           FROM charges)
     TO STDOUT (FORMAT binary)";

/// Adds a stored group row to `state`: a quarantined one with its mark, a zero one not at all.
fn push_group_row(
    state: &mut RatingState,
    key: AggregateKey,
    aggregate: Aggregate,
    quarantined: bool,
) {
    if quarantined {
        state.quarantined_rows.push(key.clone());
        state.rows.push((key, None, aggregate));
    } else if !aggregate.is_zero() {
        state.rows.push((key, None, aggregate));
    }
}

impl Within {
    /// The query parameters of `within`: customers, from, to (all NULL: everything).
    fn bounds(within: Option<&Within>) -> (Option<&[String]>, Option<i64>, Option<i64>) {
        match within {
            Some(w) => (Some(w.customers.as_slice()), Some(w.from), Some(w.to)),
            None => (None, None, None),
        }
    }
}

/// The stored rows rating needs (each sum/count row's total, each multiset row's items, and which rows
/// are quarantined), all of them or only `within`, on the caller's connection or transaction. The
/// charges and quarantined periods of the state are left empty.
pub async fn rating_rows(
    conn: &mut PgConnection,
    within: Option<&Within>,
) -> Result<RatingState, sqlx::Error> {
    let (customers, from, to) = Within::bounds(within);
    let mut state = RatingState::default();
    // A value outside the decimal range (stored before quarantines existed) is read as quarantined,
    // never decoded into a Decimal it does not fit.
    let groups = sqlx::query!(
        "SELECT customer_id, meter, dimensions AS \"dimensions: Json<Dimensions>\",
                window_start, window_end,
                CASE WHEN abs(value) > $1 THEN 0 ELSE value END AS \"value!\", event_count,
                quarantined OR abs(value) > $1 AS \"quarantined!\"
         FROM aggregations a
         WHERE NOT EXISTS (SELECT 1 FROM meters m WHERE m.meter = a.meter
                           AND m.aggregation IN ('max', 'unique_count', 'latest'))
           AND ($2::text[] IS NULL OR a.customer_id = ANY($2))
           AND ($3::bigint IS NULL OR a.window_start >= to_timestamp($3))
           AND ($4::bigint IS NULL OR a.window_start < to_timestamp($4))",
        Decimal::MAX,
        customers,
        from,
        to,
    )
    .fetch_all(&mut *conn)
    .await?;
    for r in groups {
        let key = AggregateKey {
            customer_id: r.customer_id.into(),
            meter: r.meter.into(),
            dimensions: r.dimensions.0,
            window_start: r.window_start.timestamp(),
            window_end: r.window_end.timestamp(),
        };
        let aggregate = Aggregate {
            value: r.value,
            event_count: r.event_count,
        };
        push_group_row(&mut state, key, aggregate, r.quarantined);
    }
    item_rows(conn, within, &mut state).await?;
    Ok(state)
}

/// Adds the stored multiset items (of max / unique_count / latest rows) rating needs, all of them or
/// only `within`'s, to `state`.
async fn item_rows(
    conn: &mut PgConnection,
    within: Option<&Within>,
    state: &mut RatingState,
) -> Result<(), sqlx::Error> {
    let (customers, from, to) = Within::bounds(within);
    let items = sqlx::query_as!(
        ItemRow,
        "SELECT v.customer_id, v.meter, v.dimensions AS \"dimensions: Json<Dimensions>\",
                extract(epoch FROM v.window_start)::bigint AS \"window_start!\",
                extract(epoch FROM a.window_end)::bigint AS \"window_end!\", v.kind, v.sort_time, v.item, v.num,
                v.count
         FROM meter_values v
         JOIN aggregations a USING (customer_id, meter, window_start, dimensions)
         WHERE v.count > 0
           AND ($1::text[] IS NULL OR v.customer_id = ANY($1))
           AND ($2::bigint IS NULL OR v.window_start >= to_timestamp($2))
           AND ($3::bigint IS NULL OR v.window_start < to_timestamp($3))",
        customers,
        from,
        to,
    )
    .fetch_all(&mut *conn)
    .await?;
    state.rows.extend(items.into_iter().map(ItemRow::into_row));
    Ok(())
}
