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
    sqlx::query!(
        "INSERT INTO audit_log (actor, action, entity, entity_id, before, after, request_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        actor,
        action,
        entity,
        entity_id,
        before,
        after,
        request_id,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// What an audit row may show a snapshot of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entity {
    Meter,
    PriceBook,
    Customer,
    Invoice,
    ReratingJob,
    Event,
}

/// The row `id` of `entity` as JSON (`to_jsonb`), if it exists: an audit row's before or after.
pub async fn snapshot(
    pool: &sqlx::PgPool,
    entity: Entity,
    id: &str,
) -> Result<Option<serde_json::Value>, sqlx::Error> {
    // One statement per table (a table name cannot be a parameter).
    match entity {
        Entity::Meter => {
            sqlx::query_scalar!(
                r#"SELECT to_jsonb(t) AS "snapshot!" FROM meters t WHERE meter = $1"#,
                id,
            )
            .fetch_optional(pool)
            .await
        }
        Entity::PriceBook => {
            sqlx::query_scalar!(
                r#"SELECT to_jsonb(t) AS "snapshot!" FROM price_books t WHERE price_book_id = $1"#,
                id,
            )
            .fetch_optional(pool)
            .await
        }
        Entity::Customer => {
            sqlx::query_scalar!(
                r#"SELECT to_jsonb(t) AS "snapshot!" FROM customers t WHERE customer_id = $1"#,
                id,
            )
            .fetch_optional(pool)
            .await
        }
        Entity::Invoice => {
            sqlx::query_scalar!(
                r#"SELECT to_jsonb(t) AS "snapshot!" FROM invoices t WHERE invoice_id = $1"#,
                id,
            )
            .fetch_optional(pool)
            .await
        }
        Entity::ReratingJob => {
            sqlx::query_scalar!(
                r#"SELECT to_jsonb(t) AS "snapshot!" FROM rerating_jobs t WHERE job_id = $1"#,
                id,
            )
            .fetch_optional(pool)
            .await
        }
        Entity::Event => {
            sqlx::query_scalar!(
                r#"SELECT to_jsonb(t) AS "snapshot!" FROM event_ids t WHERE event_id = $1"#,
                id,
            )
            .fetch_optional(pool)
            .await
        }
    }
}
