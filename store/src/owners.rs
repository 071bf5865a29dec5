//! Whose is it: the customer a stored invoice, re-rating job or event belongs to, for the API's
//! customer-bound keys (`api/src/auth.rs`, `confine`).

use sqlx::PgPool;

/// What a path names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owned {
    Invoice,
    /// A job of exactly one customer (a job over several or all customers has no one owner).
    ReratingJob,
    Event,
}

/// The customer `id` belongs to; `None` when it does not exist or is not one customer's.
pub async fn owner(pool: &PgPool, what: Owned, id: &str) -> Result<Option<String>, sqlx::Error> {
    match what {
        Owned::Invoice => {
            sqlx::query_scalar!("SELECT customer_id FROM invoices WHERE invoice_id = $1", id)
                .fetch_optional(pool)
                .await
        }
        Owned::ReratingJob => {
            sqlx::query_scalar!(
                r#"SELECT customer_ids[1] AS "customer_id!" FROM rerating_jobs
                   WHERE job_id = $1 AND cardinality(customer_ids) = 1"#,
                id,
            )
            .fetch_optional(pool)
            .await
        }
        Owned::Event => {
            sqlx::query_scalar!(
                "SELECT customer_id FROM telemetry_events WHERE event_id = $1 LIMIT 1",
                id,
            )
            .fetch_optional(pool)
            .await
        }
    }
}
