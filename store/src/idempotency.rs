//! `idempotency_keys`: a claim per (scope, `Idempotency-Key`), then the answer stored under it, so a
//! retry gets the same answer (the protocol is the API's, `api/src/idempotency.rs`).

use sqlx::PgPool;

/// A stored claim: the request's hash, and the answer once there is one (status, content type, body).
pub type StoredAnswer = (Vec<u8>, Option<i32>, Option<String>, Option<Vec<u8>>);

/// An `idempotency_keys` row as [`stored`] selects it.
struct AnswerRow {
    request_hash: Vec<u8>,
    status: Option<i32>,
    content_type: Option<String>,
    body: Option<Vec<u8>>,
}

impl From<AnswerRow> for StoredAnswer {
    fn from(row: AnswerRow) -> Self {
        (row.request_hash, row.status, row.content_type, row.body)
    }
}

/// Claims the key for this request; `false` when another request holds it (or answered under it). A
/// claim left without an answer for a minute (its request died) may be taken over.
pub async fn claim(
    pool: &PgPool,
    scope: &str,
    key: &str,
    route: &str,
    request_hash: &[u8],
) -> Result<bool, sqlx::Error> {
    let claimed: Option<bool> = sqlx::query_scalar!(
        r#"INSERT INTO idempotency_keys (scope, idem_key, route, request_hash) VALUES ($1, $2, $3, $4)
         ON CONFLICT (scope, idem_key) DO UPDATE
             SET request_hash = EXCLUDED.request_hash, route = EXCLUDED.route, created_at = now()
             WHERE idempotency_keys.status IS NULL
               AND idempotency_keys.created_at < now() - interval '1 minute'
         RETURNING true AS "claimed!""#,
        scope,
        key,
        route,
        request_hash,
    )
    .fetch_optional(pool)
    .await?;
    Ok(claimed.is_some())
}

/// What is stored under the key.
pub async fn stored(
    pool: &PgPool,
    scope: &str,
    key: &str,
) -> Result<Option<StoredAnswer>, sqlx::Error> {
    let row = sqlx::query_as!(
        AnswerRow,
        "SELECT request_hash, status, content_type, body FROM idempotency_keys
         WHERE scope = $1 AND idem_key = $2",
        scope,
        key,
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.map(StoredAnswer::from))
}

/// Drops the claim (its answer is not to be replayed: a 5xx or a 429).
pub async fn release(pool: &PgPool, scope: &str, key: &str) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "DELETE FROM idempotency_keys WHERE scope = $1 AND idem_key = $2",
        scope,
        key,
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Stores the answer under the claim.
pub async fn record(
    pool: &PgPool,
    scope: &str,
    key: &str,
    (status, content_type, body): (i32, Option<&str>, &[u8]),
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE idempotency_keys SET status = $3, content_type = $4, body = $5
         WHERE scope = $1 AND idem_key = $2",
        scope,
        key,
        status,
        content_type,
        body,
    )
    .execute(pool)
    .await?;
    Ok(())
}
