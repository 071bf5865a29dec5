//! The API's writes of events (SPEC §3, §9): accepted events claimed, stored and queued for Kafka in
//! one statement; a refused send withdrawn; copies answered 409; voids requested; the outbox cleared
//! and relayed. With [`crate::claims`] (the pipeline's Kafka readers), this is the one writer of
//! `event_ids`, `telemetry_events` and `event_outbox`.
//!
//! ```text
//!  POST /events ─► store_new: event_ids + telemetry_events + event_outbox, one statement ─► 201
//!                  Kafka refused ─► withdraw (the id is free again) │ Kafka acked ─► forget_events
//!  POST /events/{id}/void ─► request_void: void_requested_at + the outbox row, one transaction
//!  relay (a crashed request's rows) ─► due ... forget_sent, one transaction holding the rows
//! ```

use std::collections::HashSet;
use std::time::Duration;

use meterflow_model::wire::VoidRecord;
use meterflow_model::Event;
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool};

/// Stores the claims, raw events and outbox rows of a batch of accepted events in one statement;
/// returns the ids stored (the others were known already). `payloads[i]` is `events[i]`'s Kafka record.
///
/// Concurrent batches take their row locks in one order (event ids, then customer and event type for
/// the event-type rows of migration 0013), so they do not deadlock one another.
pub async fn store_new(
    pool: &PgPool,
    events: &[&Event],
    payloads: &[Vec<u8>],
) -> Result<HashSet<String>, sqlx::Error> {
    if events.is_empty() {
        return Ok(HashSet::new());
    }
    let n = events.len();
    let mut ids = Vec::with_capacity(n);
    let mut customers = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    let mut times = Vec::with_capacity(n);
    let mut values: Vec<Decimal> = Vec::with_capacity(n);
    let mut properties = Vec::with_capacity(n);
    let mut fingerprints = Vec::with_capacity(n);
    for e in events {
        ids.push(e.event_id.as_str());
        customers.push(e.customer_id.as_str());
        types.push(e.event_type.as_str());
        times.push(e.event_time_micros);
        values.push(e.value);
        properties.push(e.properties.as_str());
        fingerprints.push(e.fingerprint());
    }
    // The id, customer, type and properties arrays borrow from the events (`&str`), cast past the
    // macro's `&[String]`; the statement's parameter types are its own casts.
    let stored: Vec<String> = sqlx::query_scalar!(
        "WITH input AS (
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::numeric[], $6::text[],
                                  $7::bytea[], $8::bigint[])
               AS u(event_id, customer_id, event_type, micros, value, properties, payload, fingerprint)
         ), claimed AS (
             INSERT INTO event_ids (event_id, event_time, fingerprint, source)
             SELECT event_id, timestamptz 'epoch' + micros * interval '1 microsecond', fingerprint, 'api' FROM input
             ORDER BY event_id
             ON CONFLICT ON CONSTRAINT event_ids_pkey DO NOTHING
             RETURNING event_id
         ), stored AS (
             INSERT INTO telemetry_events (event_id, customer_id, event_type, event_time, value, properties)
             SELECT i.event_id, i.customer_id, i.event_type, timestamptz 'epoch' + i.micros * interval '1 microsecond',
                    i.value, i.properties::json
             FROM input i JOIN claimed USING (event_id)
             ORDER BY i.customer_id, i.event_type
             RETURNING customer_id, event_type
         ), noted AS (
             -- The bound on event types per customer (migration 0016): 22M01 past it.
             SELECT meterflow_note_event_types(array_agg(customer_id), array_agg(event_type)) FROM stored
         )
         INSERT INTO event_outbox (event_id, payload, customer_id)
         SELECT i.event_id, i.payload, i.customer_id FROM input i JOIN claimed USING (event_id) CROSS JOIN noted
         RETURNING event_id",
        &ids[..] as &[&str],
        &customers[..] as &[&str],
        &types[..] as &[&str],
        &times,
        &values,
        &properties[..] as &[&str],
        payloads,
        &fingerprints,
    )
    .fetch_all(pool)
    .await?;
    Ok(stored.into_iter().collect())
}

/// Of `ids`, those that stay known whatever happens to their first copy: they may be answered 409
/// DUPLICATE_EVENT. An id whose first copy is not yet counted is marked as answered, which keeps it if
/// Kafka refuses that copy ([`withdraw`]); an id not stored (any more) is left out.
pub async fn answered_duplicates(
    pool: &sqlx::PgPool,
    ids: &[String],
) -> Result<HashSet<String>, sqlx::Error> {
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    // Rows counted or already marked never go; the others are marked under their row lock, which the
    // withdrawal's DELETE takes too, so of a mark and a withdrawal exactly one wins.
    let known: Vec<String> = sqlx::query_scalar!(
        r#"WITH marked AS (
             UPDATE event_ids SET duplicate_answered = true
             WHERE event_id = ANY($1) AND counted_partition IS NULL AND NOT duplicate_answered
             RETURNING event_id
         )
         SELECT event_id AS "event_id!" FROM marked
         UNION
         SELECT event_id FROM event_ids
         WHERE event_id = ANY($1) AND (counted_partition IS NOT NULL OR duplicate_answered)"#,
        ids,
    )
    .fetch_all(pool)
    .await?;
    Ok(known.into_iter().collect())
}

/// When Kafka refused an accepted event: it was not accepted after all, so its id is free again
/// (true), unless another copy was already answered 409 or the pipeline counted it (false: it stays,
/// and the relay delivers it).
pub async fn withdraw(pool: &PgPool, event: &Event) -> Result<bool, sqlx::Error> {
    let gone: i64 = sqlx::query_scalar!(
        r#"WITH gone AS (
             DELETE FROM event_ids
             WHERE event_id = $1 AND counted_partition IS NULL AND NOT duplicate_answered
             RETURNING event_id
         ), raw AS (
             DELETE FROM telemetry_events WHERE event_id IN (SELECT event_id FROM gone) AND event_time = $2
         )
         SELECT count(*) AS "count!" FROM gone"#,
        event.event_id,
        event.event_time(),
    )
    .fetch_one(pool)
    .await?;
    Ok(gone > 0)
}

/// A void asked for (`POST /api/v1/events/{id}/void`).
#[derive(Clone, Debug)]
pub struct VoidRequest {
    pub customer_id: String,
    /// Voided (or being voided) before this request: nothing was written.
    pub already: bool,
    /// The void record for Kafka (also in the outbox), when this request wrote one.
    pub payload: Vec<u8>,
}

/// Requests the void of `event_id`: marks it and writes the void's outbox row in one transaction, so
/// a void is "requested" only once it is sure to reach the pipeline. `None` for an unknown id.
pub async fn request_void(
    pool: &PgPool,
    event_id: &str,
) -> Result<Option<VoidRequest>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query!(
        r#"WITH target AS (
             SELECT e.event_id, t.customer_id, e.void_requested_at IS NOT NULL AS already
             FROM event_ids e JOIN telemetry_events t ON t.event_id = e.event_id AND t.event_time = e.event_time
             WHERE e.event_id = $1
             FOR UPDATE OF e
         ), requested AS (
             UPDATE event_ids e SET void_requested_at = now()
             FROM target WHERE e.event_id = target.event_id AND NOT target.already
             RETURNING e.event_id
         )
         SELECT customer_id, already AS "already!" FROM target"#,
        event_id,
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some((customer_id, already)) = row.map(|r| (r.customer_id, r.already)) else {
        return Ok(None);
    };
    if already {
        return Ok(Some(VoidRequest {
            customer_id,
            already,
            payload: Vec::new(),
        }));
    }
    let payload = serde_json::to_vec(&VoidRecord {
        event_id: event_id.to_owned(),
        customer_id: customer_id.clone(),
    })
    .unwrap_or_default();
    // Outbox first: once the request is acknowledged, the void reaches the pipeline.
    sqlx::query!(
        "INSERT INTO event_outbox (event_id, kind, payload, customer_id) VALUES ($1, 'void', $2, $3)
         ON CONFLICT ON CONSTRAINT event_outbox_pkey DO NOTHING",
        event_id,
        payload,
        customer_id,
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(VoidRequest {
        customer_id,
        already,
        payload,
    }))
}

/// Clears the outbox row of a void Kafka acknowledged.
pub async fn forget_void(pool: &PgPool, event_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "DELETE FROM event_outbox WHERE event_id = $1 AND kind = 'void'",
        event_id,
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Clears the outbox rows of events Kafka acknowledged.
pub async fn forget_events(pool: &PgPool, ids: &[String]) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "DELETE FROM event_outbox WHERE kind = 'event' AND event_id = ANY($1)",
        ids,
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// An outbox row left behind (its request died before Kafka answered).
#[derive(Clone, Debug)]
pub struct Outboxed {
    pub event_id: String,
    pub payload: Vec<u8>,
    pub customer_id: String,
    /// `event` or `void`: the record's `meterflow-kind` header.
    pub kind: String,
    /// When it was stored (accepted), ms since the epoch: the record's time.
    pub stored_ms: i64,
}

/// An `event_outbox` row as [`due`] selects it.
struct OutboxRow {
    event_id: String,
    payload: Vec<u8>,
    customer_id: String,
    kind: String,
    stored_ms: i64,
}

impl From<OutboxRow> for Outboxed {
    fn from(row: OutboxRow) -> Self {
        Outboxed {
            event_id: row.event_id,
            payload: row.payload,
            customer_id: row.customer_id,
            kind: row.kind,
            stored_ms: row.stored_ms,
        }
    }
}

/// The oldest outbox rows older than `grace`, at most 1,000, locked in `tx` (another relay skips
/// them) until [`forget_sent`] and the commit.
pub async fn due(tx: &mut PgConnection, grace: Duration) -> Result<Vec<Outboxed>, sqlx::Error> {
    let rows = sqlx::query_as!(
        OutboxRow,
        r#"SELECT event_id, payload, customer_id, kind, (extract(epoch FROM created_at) * 1000)::bigint AS "stored_ms!"
         FROM event_outbox
         WHERE created_at < now() - make_interval(secs => $1)
         ORDER BY created_at LIMIT 1000 FOR UPDATE SKIP LOCKED"#,
        grace.as_secs_f64(),
    )
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows.into_iter().map(Outboxed::from).collect())
}

/// Clears the outbox rows `(event_id, kind)` the relay sent, in the transaction of [`due`].
pub async fn forget_sent(
    tx: &mut PgConnection,
    sent: &[(String, String)],
) -> Result<(), sqlx::Error> {
    let ids: Vec<&str> = sent.iter().map(|s| s.0.as_str()).collect();
    let kinds: Vec<&str> = sent.iter().map(|s| s.1.as_str()).collect();
    // Borrowed elements (`&str`): typed by the casts, not the macro's `&[String]`.
    sqlx::query!(
        "DELETE FROM event_outbox o USING UNNEST($1::text[], $2::text[]) AS s(i, k)
         WHERE o.event_id = s.i AND o.kind = s.k",
        &ids[..] as &[&str],
        &kinds[..] as &[&str],
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}
