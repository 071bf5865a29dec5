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

impl Entity {
    /// The statement reading one row of it as JSON.
    const fn snapshot_sql(self) -> &'static str {
        match self {
            Entity::Meter => "SELECT to_jsonb(t) FROM meters t WHERE meter = $1",
            Entity::PriceBook => "SELECT to_jsonb(t) FROM price_books t WHERE price_book_id = $1",
            Entity::Customer => "SELECT to_jsonb(t) FROM customers t WHERE customer_id = $1",
            Entity::Invoice => "SELECT to_jsonb(t) FROM invoices t WHERE invoice_id = $1",
            Entity::ReratingJob => "SELECT to_jsonb(t) FROM rerating_jobs t WHERE job_id = $1",
            Entity::Event => "SELECT to_jsonb(t) FROM event_ids t WHERE event_id = $1",
        }
    }
}

/// The row `id` of `entity` as JSON (`to_jsonb`), if it exists: an audit row's before or after.
pub async fn snapshot(
    pool: &sqlx::PgPool,
    entity: Entity,
    id: &str,
) -> Result<Option<serde_json::Value>, sqlx::Error> {
    sqlx::query_scalar(entity.snapshot_sql())
        .bind(id)
        .fetch_optional(pool)
        .await
}
