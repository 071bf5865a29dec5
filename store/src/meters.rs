//! Meters in Postgres: the ones in force, listed, and registered (a name is never an event type, and a
//! meter, once stored, is never redefined in place).

use std::str::FromStr;

use chrono::{DateTime, Utc};
use meterflow_model::{Aggregation, GroupBy, Meter, Window};
use sqlx::PgConnection;

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
    let rows = sqlx::query_as!(
        MeterRow,
        r#"SELECT meter, event_type, aggregation, value_property, "window", group_by,
                max_dimension_values, created_at
         FROM meters WHERE archived_at IS NULL AND ($1::text IS NULL OR meter = $1) ORDER BY meter"#,
        name,
    )
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter().map(TryInto::try_into).collect()
}

/// A `meters` row as [`list_meters`] selects it; the aggregation and window are parsed from their names.
struct MeterRow {
    meter: String,
    event_type: String,
    aggregation: String,
    value_property: Option<String>,
    window: String,
    group_by: Vec<String>,
    max_dimension_values: Option<i32>,
    created_at: DateTime<Utc>,
}

impl TryFrom<MeterRow> for (Meter, DateTime<Utc>) {
    type Error = sqlx::Error;

    fn try_from(row: MeterRow) -> Result<Self, sqlx::Error> {
        let meter = Meter {
            meter: row.meter,
            event_type: row.event_type,
            aggregation: parse_aggregation(row.aggregation)?,
            value_property: row.value_property,
            window: parse_window(row.window)?,
            group_by: GroupBy::new(row.group_by)
                .map_err(|e| sqlx::Error::Decode(e.message.into()))?,
            max_dimension_values: row
                .max_dimension_values
                .map(u32::try_from)
                .transpose()
                .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        };
        Ok((meter, row.created_at))
    }
}

/// What creating a meter did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeterCreated {
    Created,
    /// The same definition existed: nothing changed.
    Identical,
    /// Another definition has that name: meters are immutable, nothing changed.
    Different,
    /// The name is an event type in use (finding 15): events of that type have rows under their
    /// default meter, which is named after the type, or another meter reads that type. Meter names
    /// and event types are disjoint; nothing changed.
    Collides(String),
}

/// Creates a meter unless one of that name exists, or the name is an event type in use (see
/// [`MeterCreated::Collides`]; the dataflow keeps the other direction: an event whose type is a meter's
/// name gets no default meter, `dataflow/src/meters.rs`).
pub async fn create_meter(
    conn: &mut PgConnection,
    meter: &Meter,
) -> Result<MeterCreated, sqlx::Error> {
    let existing = list_meters(conn, Some(&meter.meter)).await?;
    if !existing.is_empty() {
        return Ok(if existing.iter().any(|(m, _)| m == meter) {
            MeterCreated::Identical
        } else {
            MeterCreated::Different
        });
    }
    let taken = sqlx::query!(
        r#"SELECT EXISTS (SELECT 1 FROM aggregations WHERE meter = $1) AS "history!",
                (SELECT min(meter) FROM meters
                 WHERE archived_at IS NULL AND event_type = $1 AND $1 <> $2) AS "read_by?""#,
        meter.meter,
        meter.event_type,
    )
    .fetch_one(&mut *conn)
    .await?;
    let (history, read_by) = (taken.history, taken.read_by);
    if history {
        return Ok(MeterCreated::Collides(format!(
            "events of type {0} are stored under their default meter, which is named {0}: a meter \
             named {0} would reinterpret them; choose another name",
            meter.meter
        )));
    }
    if let Some(other) = read_by {
        return Ok(MeterCreated::Collides(format!(
            "meter {other} reads event type {0}: meter names and event types must differ; choose \
             another name",
            meter.meter
        )));
    }
    let inserted = sqlx::query!(
        r#"INSERT INTO meters (meter, event_type, aggregation, value_property, "window", group_by,
                             max_dimension_values)
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT ON CONSTRAINT meters_pkey DO NOTHING"#,
        meter.meter,
        meter.event_type,
        meter.aggregation.as_str(),
        meter.value_property,
        window_name(meter.window),
        meter.group_by.keys(),
        meter
            .max_dimension_values
            .map(|n| i32::try_from(n).unwrap_or(i32::MAX)),
    )
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
