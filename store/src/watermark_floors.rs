//! `watermark_floors`: an admin's floor under a topic's watermark (`POST /api/v1/watermark`), which the
//! pipeline's next commit lifts the watermark to. It only rises.

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool};

/// The floor of `topic`, if an admin set one.
pub async fn floor<'c>(
    db: impl PgExecutor<'c>,
    topic: &str,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar!(
        "SELECT advance_to FROM watermark_floors WHERE topic = $1",
        topic,
    )
    .fetch_optional(db)
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
    // The pipeline's config watcher listens on this channel (src/pipeline/watch.rs): a catch-up epoch
    // it holds open ends for the floor, so the commit that applies it comes within seconds. Sent on
    // commit, like the `meters` and `price_books` triggers' (migration 0018).
    sqlx::query!("SELECT pg_notify('meterflow_config', 'watermark_floors')")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(floor)
}
