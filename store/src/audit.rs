//! `audit_log`, append-only (migration 0007; the database refuses UPDATE, DELETE and TRUNCATE of it):
//! who (key id), what, before/after, when. What is audited, and when, is the API's (`api/src/audit.rs`).

use sqlx::PgConnection;

/// Appends one row, in the caller's transaction or on its connection.
#[allow(clippy::too_many_arguments)]
pub async fn insert(
    conn: &mut PgConnection,
    actor: &str,
    action: &str,
    entity: &str,
    entity_id: &str,
    before: Option<serde_json::Value>,
    after: Option<serde_json::Value>,
    request_id: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO audit_log (actor, action, entity, entity_id, before, after, request_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(actor)
    .bind(action)
    .bind(entity)
    .bind(entity_id)
    .bind(before)
    .bind(after)
    .bind(request_id)
    .execute(conn)
    .await?;
    Ok(())
}
