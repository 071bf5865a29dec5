//! What a pipeline reads at start-up and while it runs besides its input: the event-time progress last
//! committed, and the committed rows and charges rating starts from (the meters and price books in force
//! are read through `meterflow_store`).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use meterflow_model::batch::{QuarantineReason, QuarantinedPeriod};
use meterflow_model::{Aggregate, AggregateKey, Charge, Item, RatingState};
use rust_decimal::Decimal;
use sqlx::{PgConnection, Row};

/// The event-time progress last committed: the global watermark and, per partition, the greatest event
/// time read (microseconds).
pub async fn stored_event_times(
    conn: &mut PgConnection,
    topic: &str,
) -> Result<(Option<i64>, HashMap<i32, i64>), sqlx::Error> {
    let watermark: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT committed_watermark FROM pipeline_leases WHERE topic = $1")
            .bind(topic)
            .fetch_optional(&mut *conn)
            .await?
            .flatten();
    let rows = sqlx::query(
        "SELECT partition, max_event_time FROM source_offsets WHERE topic = $1 AND max_event_time IS NOT NULL",
    )
    .bind(topic)
    .fetch_all(&mut *conn)
    .await?;
    let partitions = rows
        .iter()
        .map(|r| {
            let t: DateTime<Utc> = r.try_get(1)?;
            Ok((r.try_get::<i32, _>(0)?, t.timestamp_micros()))
        })
        .collect::<Result<_, sqlx::Error>>()?;
    Ok((watermark.map(|w| w.timestamp_micros()), partitions))
}

/// Records the allowed lateness the pipeline runs with, so the sink's finalization and the API agree.
pub async fn set_allowed_lateness(
    conn: &mut PgConnection,
    topic: &str,
    lateness_micros: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE pipeline_leases SET allowed_lateness = $2 * interval '1 microsecond' WHERE topic = $1",
    )
    .bind(topic)
    .bind(lateness_micros)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Everything committed that rating needs (SPEC §9): each sum/count row's total, each max /
/// unique_count / latest row's multiset of items, every charge and quarantined period; and how many
/// resyncs re-rating jobs had requested of `topic` by then. Read in one snapshot; the caller holds the
/// writer lease, so no epoch commits meanwhile, but a re-rating job may: its correction is in the
/// state exactly when its resync is in the count, so a job committing during the load makes the
/// pipeline reload (finding 13a).
pub async fn load_rating_state(
    conn: &mut PgConnection,
    topic: &str,
) -> Result<(RatingState, i64), sqlx::Error> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    // The snapshot is taken by this first statement.
    let resyncs = resync_requests(&mut tx, topic).await?;
    let mut state = RatingState::default();
    // A value outside the decimal range (stored before quarantines existed) is read as quarantined,
    // never decoded into a Decimal it does not fit.
    let groups = sqlx::query(
        "SELECT customer_id, meter, extract(epoch FROM window_start)::bigint,
                extract(epoch FROM window_end)::bigint,
                CASE WHEN abs(value) > $1 THEN 0 ELSE value END, event_count,
                quarantined OR abs(value) > $1
         FROM aggregations a
         WHERE NOT EXISTS (SELECT 1 FROM meters m WHERE m.meter = a.meter
                           AND m.aggregation IN ('max', 'unique_count', 'latest'))",
    )
    .bind(Decimal::MAX)
    .fetch_all(&mut *tx)
    .await?;
    for r in groups {
        let key = AggregateKey {
            customer_id: r.try_get(0)?,
            meter: r.try_get(1)?,
            window_start: r.try_get(2)?,
            window_end: r.try_get(3)?,
        };
        let aggregate = Aggregate {
            value: r.try_get(4)?,
            event_count: r.try_get(5)?,
        };
        let quarantined: bool = r.try_get(6)?;
        if quarantined {
            state.quarantined_rows.push(key.clone());
            state.rows.push((key, None, aggregate));
        } else if !aggregate.is_zero() {
            state.rows.push((key, None, aggregate));
        }
    }
    let items = sqlx::query(
        "SELECT v.customer_id, v.meter, extract(epoch FROM v.window_start)::bigint,
                extract(epoch FROM a.window_end)::bigint, v.kind, v.sort_time, v.item, v.num, v.count
         FROM meter_values v
         JOIN aggregations a USING (customer_id, meter, window_start)
         WHERE v.count > 0",
    )
    .fetch_all(&mut *tx)
    .await?;
    for r in items {
        let key = AggregateKey {
            customer_id: r.try_get(0)?,
            meter: r.try_get(1)?,
            window_start: r.try_get(2)?,
            window_end: r.try_get(3)?,
        };
        let kind: String = r.try_get(4)?;
        let text: String = r.try_get(6)?;
        let num: Option<Decimal> = r.try_get(7)?;
        let item = match kind.as_str() {
            "max" => Item::Max(num.unwrap_or_default().normalize()),
            "unique_count" => Item::Unique(text),
            _ => Item::Latest {
                time_micros: r.try_get(5)?,
                event_id: text,
                value: num.unwrap_or_default(),
            },
        };
        let usage = Aggregate {
            value: Decimal::ZERO,
            event_count: r.try_get(8)?,
        };
        state.rows.push((key, Some(item), usage));
    }
    let charges = sqlx::query(
        "SELECT customer_id, meter, extract(epoch FROM window_start)::bigint,
                extract(epoch FROM window_end)::bigint, quantity, amount, currency, price_book_id
         FROM charges",
    )
    .fetch_all(&mut *tx)
    .await?;
    for r in charges {
        let charge = Charge {
            window_start: r.try_get(2)?,
            window_end: r.try_get(3)?,
            quantity: r.try_get(4)?,
            amount: r.try_get(5)?,
            currency: r.try_get(6)?,
            price_book_id: r.try_get(7)?,
        };
        state.charges.push((r.try_get(0)?, r.try_get(1)?, charge));
    }
    let quarantined = sqlx::query(
        "SELECT customer_id, meter, extract(epoch FROM period_start)::bigint,
                extract(epoch FROM from_window)::bigint, reason
         FROM rating_quarantine",
    )
    .fetch_all(&mut *tx)
    .await?;
    for r in quarantined {
        let reason = match r.try_get::<String, _>(4)?.as_str() {
            "usage_overflow" => QuarantineReason::UsageOverflow,
            _ => QuarantineReason::RatingOverflow,
        };
        state.quarantined_periods.push(QuarantinedPeriod {
            customer_id: r.try_get(0)?,
            meter: r.try_get(1)?,
            period_start: r.try_get(2)?,
            from_window: r.try_get(3)?,
            reason,
        });
    }
    tx.commit().await?;
    Ok((state, resyncs))
}

/// How many resyncs re-rating jobs have requested of the pipeline on `topic` (see `rerating.rs`).
pub async fn resync_requests(conn: &mut PgConnection, topic: &str) -> Result<i64, sqlx::Error> {
    let n: Option<i64> =
        sqlx::query_scalar("SELECT resync_requested FROM pipeline_leases WHERE topic = $1")
            .bind(topic)
            .fetch_optional(&mut *conn)
            .await?;
    Ok(n.unwrap_or(0))
}

/// Records that the pipeline's loaded state includes the first `done` resync requests.
pub async fn resync_done(
    conn: &mut PgConnection,
    topic: &str,
    done: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE pipeline_leases SET resync_done = GREATEST(resync_done, $2) WHERE topic = $1",
    )
    .bind(topic)
    .bind(done)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
