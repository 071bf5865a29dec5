//! `watermark_floors`: an admin's floor under a topic's watermark (`POST /api/v1/watermark`), which the
//! pipeline's next commit lifts the watermark to. It only rises.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// The floor of `topic`, if an admin set one.
pub async fn floor(pool: &PgPool, topic: &str) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar!(
        "SELECT advance_to FROM watermark_floors WHERE topic = $1",
        topic,
    )
    .fetch_optional(pool)
    .await
}

/// Raises the floor of `topic` to `to` (never lowers it) and audits it; returns the floor after.
pub async fn advance(
    pool: &PgPool,
    topic: &str,
    to: DateTime<Utc>,
    actor: &str,
    request_id: Option<&str>,
) -> Result<DateTime<Utc>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let before: Option<DateTime<Utc>> = sqlx::query_scalar!(
        "SELECT advance_to FROM watermark_floors WHERE topic = $1 FOR UPDATE",
        topic,
    )
    .fetch_optional(&mut *tx)
    .await?;
    let floor: DateTime<Utc> = sqlx::query_scalar!(
        r#"INSERT INTO watermark_floors AS f (topic, advance_to) VALUES ($1, $2)
         ON CONFLICT ON CONSTRAINT watermark_floors_pkey
         DO UPDATE SET advance_to = GREATEST(f.advance_to, excluded.advance_to), updated_at = now()
         RETURNING advance_to AS "advance_to!""#,
        topic,
        to,
    )
    .fetch_one(&mut *tx)
    .await?;
    crate::audit::insert(
        &mut tx,
        actor,
        "watermark.advance",
        "watermark",
        topic,
        before.map(|b| serde_json::json!({"advance_to": b})),
        Some(serde_json::json!({"advance_to": floor, "requested": to})),
        request_id,
    )
    .await?;
    tx.commit().await?;
    Ok(floor)
}
