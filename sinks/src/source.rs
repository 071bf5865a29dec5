//! What the pipeline's tables say about its source topic: which topic this database serves (one), the
//! anchors that tell a recreated topic from the one that was read, gaps that Kafka's retention left, and
//! the reset an operator runs after recreating a topic (review findings 8, 9 and 18).
//!
//! ```text
//!  start ─► other_topic()?  ── Some ─► refuse: one database serves one events topic
//!        ─► anchors() ── the leader re-reads each anchored record ── differs ─► refuse, name the reset
//!        ─► record_gap() for offsets retention deleted unread (a dead letter says so)
//!        ─► set_anchor() at the new positions
//! ```

use std::collections::HashMap;

use sqlx::{Connection, PgConnection};

/// A topic other than `topic` whose results this database already holds, if any.
pub async fn other_topic(
    conn: &mut PgConnection,
    topic: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT topic AS "topic!" FROM pipeline_leases WHERE topic <> $1
         UNION SELECT topic FROM source_offsets WHERE topic <> $1
         LIMIT 1"#,
        topic,
    )
    .fetch_optional(&mut *conn)
    .await
}

/// The anchors of `topic`: partition → (offset, record hash).
pub async fn anchors(
    conn: &mut PgConnection,
    topic: &str,
) -> Result<HashMap<i32, (i64, i64)>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT partition, "offset", record_hash FROM source_anchors WHERE topic = $1"#,
        topic,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.partition, (r.offset, r.record_hash)))
        .collect())
}

/// Remembers the record at `offset` of `partition` as that partition's anchor.
pub async fn set_anchor(
    conn: &mut PgConnection,
    topic: &str,
    partition: i32,
    offset: i64,
    record_hash: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        r#"INSERT INTO source_anchors (topic, partition, "offset", record_hash) VALUES ($1, $2, $3, $4)
           ON CONFLICT ON CONSTRAINT source_anchors_pkey
           DO UPDATE SET "offset" = excluded."offset", record_hash = excluded.record_hash"#,
        topic,
        partition,
        offset,
        record_hash,
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Records that Kafka deleted offsets `from..to` of `partition` (retention) before the pipeline read
/// them: a dead letter at `from` says so, once, so no record is lost without a trace.
pub async fn record_gap(
    conn: &mut PgConnection,
    topic: &str,
    partition: i32,
    from: i64,
    to: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        r#"INSERT INTO dead_letters (topic, partition, "offset", payload, reason)
           VALUES ($1, $2, $3, ''::bytea, $4)
           ON CONFLICT ON CONSTRAINT dead_letters_source_key DO NOTHING"#,
        topic,
        partition,
        from,
        format!(
            "RETENTION_GAP: offsets {from} to {} were deleted by Kafka before meterflow read them",
            to.saturating_sub(1)
        ),
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// After a topic was deleted and recreated: forget where the old topic was read, keep every result.
/// Events counted from the old topic stay counted, and are marked as counted by an earlier source
/// (position −1), so their copies in the new topic are duplicates; dead letters and duplicates of the
/// old topic are kept under `<topic> (before reset <time>)`. The new topic is read from its start.
pub async fn reset_source(conn: &mut PgConnection, topic: &str) -> Result<(), sqlx::Error> {
    let mut tx = conn.begin().await?;
    // Fence any pipeline still running on the old topic.
    sqlx::query!(
        "UPDATE pipeline_leases SET generation = generation + 1, committed_epoch = 0 WHERE topic = $1",
        topic,
    )
    .execute(&mut *tx)
    .await?;
    meterflow_store::claims::release_for_reset(&mut tx, topic).await?;
    sqlx::query!(
        "UPDATE dead_letters SET topic = topic || ' (before reset ' || now()::text || ')' WHERE topic = $1",
        topic,
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "UPDATE duplicate_events SET topic = topic || ' (before reset ' || now()::text || ')' WHERE topic = $1",
        topic,
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!("DELETE FROM source_offsets WHERE topic = $1", topic)
        .execute(&mut *tx)
        .await?;
    sqlx::query!("DELETE FROM source_anchors WHERE topic = $1", topic)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}
