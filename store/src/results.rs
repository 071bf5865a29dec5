//! The pipeline's results as the API reads them: aggregation rows (and the events counted in a
//! window), charges and dead letters, a page at a time in key order. Reads only: the pipeline
//! (`meterflow_sinks`) writes these tables.

use chrono::{DateTime, Utc};
use meterflow_model::Dimensions;
use rust_decimal::Decimal;
use sqlx::types::Json;
use sqlx::PgPool;

/// Which windows a page lists: optional customer and meter, `window_start` in `[from, to)`, dimension
/// values that hold `dimensions` (a JSON object; `{"region": null}` asks for the value null), after the
/// key `(customer, meter, window_start, dimensions)` of the previous page, at most `limit` rows.
#[derive(Clone, Copy, Debug)]
pub struct WindowPage<'a> {
    pub customer_id: Option<&'a str>,
    pub meter: Option<&'a str>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub dimensions: Option<&'a str>,
    pub after: Option<WindowAfter<'a>>,
    pub limit: i64,
}

/// The last key of the previous page: customer, meter, window start, dimension values (JSON text).
pub type WindowAfter<'a> = (&'a str, &'a str, DateTime<Utc>, &'a str);

/// A row of `aggregations`.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct AggregationRow {
    pub customer_id: String,
    pub meter: String,
    pub dimensions: Json<Dimensions>,
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    pub value: Decimal,
    pub event_count: i64,
    pub finalized: bool,
    pub revision: i32,
    pub updated_at: DateTime<Utc>,
    pub quarantined: bool,
}

/// A page of aggregation rows.
pub async fn aggregations(
    pool: &PgPool,
    page: WindowPage<'_>,
) -> Result<Vec<AggregationRow>, sqlx::Error> {
    let (after_customer, after_meter, after_start, after_dimensions) = split(page.after);
    sqlx::query_as!(
        AggregationRow,
        r#"SELECT customer_id, meter, dimensions AS "dimensions: Json<Dimensions>", window_start,
                window_end, value, event_count, finalized, revision, updated_at, quarantined
         FROM aggregations
         WHERE ($1::text IS NULL OR customer_id = $1)
           AND ($2::text IS NULL OR meter = $2)
           AND ($3::timestamptz IS NULL OR window_start >= $3)
           AND ($4::timestamptz IS NULL OR window_start < $4)
           AND ($5::text IS NULL OR (customer_id, meter, window_start, dimensions) > ($5, $6, $7, $8::text::jsonb))
           AND ($9::text IS NULL OR dimensions @> $9::text::jsonb)
         ORDER BY customer_id, meter, window_start, dimensions
         LIMIT $10"#,
        page.customer_id,
        page.meter,
        page.from,
        page.to,
        after_customer,
        after_meter,
        after_start,
        after_dimensions,
        page.dimensions,
        page.limit,
    )
    .fetch_all(pool)
    .await
}

/// A page of aggregation rows added up over every dimension but `key` (`total_by`): one row per
/// (customer, meter, window, value of `key`), of the rows whose meter groups by `key`. For count and
/// sum meters (the caller checks), whose values add up. A total past the decimal range is shown as 0
/// and quarantined, as a row's own value is.
pub async fn aggregation_totals(
    pool: &PgPool,
    page: WindowPage<'_>,
    key: &str,
) -> Result<Vec<AggregationRow>, sqlx::Error> {
    let (after_customer, after_meter, after_start, after_dimensions) = split(page.after);
    sqlx::query_as!(
        AggregationRow,
        r#"SELECT customer_id AS "customer_id!", meter AS "meter!",
                dimensions AS "dimensions!: Json<Dimensions>", window_start AS "window_start!",
                window_end AS "window_end!",
                CASE WHEN abs(value) > $12 THEN 0 ELSE value END AS "value!",
                event_count AS "event_count!", finalized AS "finalized!", revision AS "revision!",
                updated_at AS "updated_at!", quarantined OR abs(value) > $12 AS "quarantined!"
         FROM (
             SELECT customer_id, meter, jsonb_build_object($11::text, dimensions -> $11::text) AS dimensions,
                    window_start, max(window_end) AS window_end, sum(value) AS value,
                    sum(event_count)::bigint AS event_count, bool_and(finalized) AS finalized,
                    max(revision) AS revision, max(updated_at) AS updated_at,
                    bool_or(quarantined) AS quarantined
             FROM aggregations
             WHERE dimensions ? $11::text
               AND ($1::text IS NULL OR customer_id = $1)
               AND ($2::text IS NULL OR meter = $2)
               AND ($3::timestamptz IS NULL OR window_start >= $3)
               AND ($4::timestamptz IS NULL OR window_start < $4)
               AND ($9::text IS NULL OR dimensions @> $9::text::jsonb)
             GROUP BY customer_id, meter, window_start, dimensions -> $11::text
         ) t
         WHERE ($5::text IS NULL OR (customer_id, meter, window_start, dimensions) > ($5, $6, $7, $8::text::jsonb))
         ORDER BY customer_id, meter, window_start, dimensions
         LIMIT $10"#,
        page.customer_id,
        page.meter,
        page.from,
        page.to,
        after_customer,
        after_meter,
        after_start,
        after_dimensions,
        page.dimensions,
        page.limit,
        key,
        Decimal::MAX,
    )
    .fetch_all(pool)
    .await
}

/// A window of a meter: customer, meter, start, end, dimension values (JSON text).
pub type WindowKey<'a> = (&'a str, &'a str, DateTime<Utc>, DateTime<Utc>, &'a str);

/// The ids of the events counted (and not voided) in each window, in id order, after `after`, at most
/// `per_window` per window: `(index of the window in windows, event id)`.
pub async fn window_event_ids(
    pool: &PgPool,
    windows: &[WindowKey<'_>],
    after: Option<&str>,
    per_window: i64,
) -> Result<Vec<(usize, String)>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT w.i AS "i!", x.event_id AS "event_id!"
         FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[], $7::text[])
              WITH ORDINALITY AS w(customer_id, meter, window_start, window_end, dimensions, i)
         CROSS JOIN LATERAL (
             SELECT t.event_id
             FROM telemetry_events t
             JOIN event_ids e ON e.event_id = t.event_id AND e.event_time = t.event_time
             WHERE t.customer_id = w.customer_id
               AND t.event_type = COALESCE((SELECT event_type FROM meters WHERE meter = w.meter), w.meter)
               AND t.event_time >= w.window_start AND t.event_time < w.window_end
               AND e.counted_partition IS NOT NULL AND e.voided_partition IS NULL
               AND ($5::text IS NULL OR t.event_id > $5)
               -- The window's dimension values: each key's property in its dimension-value form
               -- (model::dimensions::value_of), missing for null.
               AND NOT EXISTS (
                   SELECT 1 FROM jsonb_each(w.dimensions::jsonb) AS d(key, value)
                   WHERE NOT CASE
                       WHEN d.value = 'null'::jsonb THEN NOT (t.properties::jsonb ? d.key)
                       ELSE CASE jsonb_typeof(t.properties::jsonb -> d.key)
                           WHEN 'number' THEN
                               trim_scale((t.properties::jsonb ->> d.key)::numeric)::text = d.value #>> '{}'
                           WHEN 'string' THEN t.properties::jsonb ->> d.key = d.value #>> '{}'
                           WHEN 'boolean' THEN t.properties::jsonb ->> d.key = d.value #>> '{}'
                           ELSE false
                       END
                   END)
             ORDER BY t.event_id
             LIMIT $6
         ) x
         ORDER BY w.i, x.event_id"#,
        // `&str`s, which the macro's check (it expects `String`s for `text[]`) would refuse.
        windows.iter().map(|w| w.0).collect::<Vec<_>>() as _,
        windows.iter().map(|w| w.1).collect::<Vec<_>>() as _,
        &windows.iter().map(|w| w.2).collect::<Vec<_>>(),
        &windows.iter().map(|w| w.3).collect::<Vec<_>>(),
        after,
        per_window,
        windows.iter().map(|w| w.4).collect::<Vec<_>>() as _,
    )
    .fetch_all(pool)
    .await?;
    // WITH ORDINALITY counts from 1.
    Ok(rows
        .into_iter()
        .filter_map(|row| {
            let i = usize::try_from(row.i.checked_sub(1)?).ok()?;
            Some((i, row.event_id))
        })
        .collect())
}

/// A row of `charges`.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct ChargeRow {
    pub customer_id: String,
    pub meter: String,
    pub dimensions: Json<Dimensions>,
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    pub quantity: Decimal,
    pub amount: Decimal,
    pub currency: String,
    pub price_book_id: String,
    pub revision: i32,
    pub updated_at: DateTime<Utc>,
}

/// A page of charges.
pub async fn charges(pool: &PgPool, page: WindowPage<'_>) -> Result<Vec<ChargeRow>, sqlx::Error> {
    let (after_customer, after_meter, after_start, after_dimensions) = split(page.after);
    sqlx::query_as!(
        ChargeRow,
        r#"SELECT customer_id, meter, dimensions AS "dimensions: Json<Dimensions>", window_start,
                window_end, quantity, amount, currency, price_book_id, revision, updated_at
         FROM charges
         WHERE ($1::text IS NULL OR customer_id = $1)
           AND ($2::text IS NULL OR meter = $2)
           AND ($3::timestamptz IS NULL OR window_start >= $3)
           AND ($4::timestamptz IS NULL OR window_start < $4)
           AND ($5::text IS NULL OR (customer_id, meter, window_start, dimensions) > ($5, $6, $7, $8::text::jsonb))
           AND ($9::text IS NULL OR dimensions @> $9::text::jsonb)
         ORDER BY customer_id, meter, window_start, dimensions
         LIMIT $10"#,
        page.customer_id,
        page.meter,
        page.from,
        page.to,
        after_customer,
        after_meter,
        after_start,
        after_dimensions,
        page.dimensions,
        page.limit,
    )
    .fetch_all(pool)
    .await
}

/// A row of `dead_letters`.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct DeadLetterRow {
    pub id: i64,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub reason: String,
    pub payload: Vec<u8>,
    pub created_at: DateTime<Utc>,
}

/// Dead letters after `after` (an id), oldest first, at most `limit`.
pub async fn dead_letters(
    pool: &PgPool,
    after: i64,
    limit: i64,
) -> Result<Vec<DeadLetterRow>, sqlx::Error> {
    sqlx::query_as!(
        DeadLetterRow,
        r#"SELECT id, topic, partition, "offset", reason, payload, created_at FROM dead_letters
         WHERE id > $1 ORDER BY id LIMIT $2"#,
        after,
        limit,
    )
    .fetch_all(pool)
    .await
}

/// The previous page's last key as four optional parameters.
#[allow(clippy::type_complexity)]
fn split<'a>(
    after: Option<WindowAfter<'a>>,
) -> (
    Option<&'a str>,
    Option<&'a str>,
    Option<DateTime<Utc>>,
    Option<&'a str>,
) {
    match after {
        Some((c, m, s, d)) => (Some(c), Some(m), Some(s), Some(d)),
        None => (None, None, None, None),
    }
}

/// A topic's committed progress (`pipeline_leases`), as `GET /api/v1/progress` shows it.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct CommittedProgress {
    pub committed_epoch: i64,
    pub committed_at: Option<DateTime<Utc>>,
    pub committed_watermark: Option<DateTime<Utc>>,
    pub allowed_lateness_seconds: i64,
}

/// The committed progress of `topic`; `None` before a pipeline took it.
pub async fn committed_progress(
    pool: &PgPool,
    topic: &str,
) -> Result<Option<CommittedProgress>, sqlx::Error> {
    sqlx::query_as!(
        CommittedProgress,
        r#"SELECT committed_epoch, committed_at, committed_watermark,
                extract(epoch FROM allowed_lateness)::bigint AS "allowed_lateness_seconds!"
         FROM pipeline_leases WHERE topic = $1"#,
        topic,
    )
    .fetch_optional(pool)
    .await
}

/// A partition's committed read position and the greatest event time read in it.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct PartitionOffset {
    pub partition: i32,
    pub next_offset: i64,
    pub max_event_time: Option<DateTime<Utc>>,
}

/// The committed positions of `topic`, by partition.
pub async fn committed_offsets(
    pool: &PgPool,
    topic: &str,
) -> Result<Vec<PartitionOffset>, sqlx::Error> {
    sqlx::query_as!(
        PartitionOffset,
        "SELECT partition, next_offset, max_event_time FROM source_offsets WHERE topic = $1 ORDER BY partition",
        topic,
    )
    .fetch_all(pool)
    .await
}

/// The committed watermark of `topic`, once there is one.
pub async fn committed_watermark(
    pool: &PgPool,
    topic: &str,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    let w: Option<Option<DateTime<Utc>>> = sqlx::query_scalar!(
        "SELECT committed_watermark FROM pipeline_leases WHERE topic = $1",
        topic,
    )
    .fetch_optional(pool)
    .await?;
    Ok(w.flatten())
}

/// Whether the database answers a statement (readiness).
pub async fn ping(pool: &PgPool) -> Result<(), sqlx::Error> {
    // One row, discarded (the macro's query has no `execute`).
    sqlx::query!("SELECT 1 AS one")
        .fetch_one(pool)
        .await
        .map(|_| ())
}
