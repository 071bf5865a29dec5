//! What a pipeline reads at start-up and while it runs besides its input: the meters in force and the
//! event-time progress last committed.

use std::collections::HashMap;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use meterflow_model::{Aggregation, Meter, Window};
use sqlx::{PgConnection, Row};

/// The meters in force (not archived).
pub async fn load_meters(conn: &mut PgConnection) -> Result<Vec<Meter>, sqlx::Error> {
    Ok(list_meters(conn, None)
        .await?
        .into_iter()
        .map(|(m, _)| m)
        .collect())
}

/// The meters in force with their creation time, all or the one named.
pub async fn list_meters(
    conn: &mut PgConnection,
    name: Option<&str>,
) -> Result<Vec<(Meter, DateTime<Utc>)>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT meter, event_type, aggregation, value_property, \"window\", created_at
         FROM meters WHERE archived_at IS NULL AND ($1::text IS NULL OR meter = $1) ORDER BY meter",
    )
    .bind(name)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            let meter = Meter {
                meter: r.try_get(0)?,
                event_type: r.try_get(1)?,
                aggregation: parse_aggregation(r.try_get(2)?)?,
                value_property: r.try_get(3)?,
                window: parse_window(r.try_get(4)?)?,
            };
            Ok((meter, r.try_get(5)?))
        })
        .collect()
}

/// What creating a meter did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeterCreated {
    Created,
    /// The same definition existed: nothing changed.
    Identical,
    /// Another definition has that name: meters are immutable, nothing changed.
    Different,
}

/// Creates a meter unless one of that name exists.
pub async fn create_meter(
    conn: &mut PgConnection,
    meter: &Meter,
) -> Result<MeterCreated, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO meters (meter, event_type, aggregation, value_property, \"window\")
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT ON CONSTRAINT meters_pkey DO NOTHING",
    )
    .bind(&meter.meter)
    .bind(&meter.event_type)
    .bind(meter.aggregation.as_str())
    .bind(&meter.value_property)
    .bind(window_name(meter.window))
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if inserted == 1 {
        return Ok(MeterCreated::Created);
    }
    let existing = list_meters(conn, Some(&meter.meter)).await?;
    Ok(if existing.iter().any(|(m, _)| m == meter) {
        MeterCreated::Identical
    } else {
        MeterCreated::Different
    })
}

pub fn window_name(w: Window) -> &'static str {
    match w {
        Window::Minute => "minute",
        Window::Hour => "hour",
        Window::Day => "day",
    }
}

fn parse_window(s: String) -> Result<Window, sqlx::Error> {
    match s.as_str() {
        "minute" => Ok(Window::Minute),
        "hour" => Ok(Window::Hour),
        "day" => Ok(Window::Day),
        other => Err(sqlx::Error::Decode(
            format!("unknown window {other}").into(),
        )),
    }
}

fn parse_aggregation(s: String) -> Result<Aggregation, sqlx::Error> {
    serde_json::Value::from_str(&format!("\"{s}\""))
        .and_then(serde_json::from_value)
        .map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

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
