//! `api_keys`: keys by id with the hash of the whole key (never the key), their role and the customer a
//! key is bound to; created and revoked with an audit row each. Generating and checking keys is the
//! API's (`api/src/auth.rs`).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

/// A key as stored, without its hash.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct KeyInfo {
    pub key_id: String,
    pub role: String,
    pub customer_id: Option<String>,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// An `api_keys` row as [`stored`] selects it: the hash, role, binding and whether it is revoked.
struct StoredKeyRow {
    key_hash: Vec<u8>,
    role: String,
    customer_id: Option<String>,
    revoked: bool,
}

/// A new key to store: its id, the hash of the whole key, its role and binding.
pub struct NewKey<'a> {
    pub key_id: String,
    pub key_hash: &'a [u8],
    pub role: &'a str,
    pub customer_id: Option<&'a str>,
    pub name: &'a str,
}

/// Stores a new key and audits it (as `actor`).
pub async fn create(pool: &PgPool, key: NewKey<'_>, actor: &str) -> Result<KeyInfo, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let created_at: DateTime<Utc> = sqlx::query_scalar!(
        "INSERT INTO api_keys (key_id, key_hash, role, customer_id, name) VALUES ($1, $2, $3, $4, $5)
         RETURNING created_at",
        key.key_id,
        key.key_hash,
        key.role,
        key.customer_id,
        key.name,
    )
    .fetch_one(&mut *tx)
    .await?;
    let info = KeyInfo {
        key_id: key.key_id,
        role: key.role.to_owned(),
        customer_id: key.customer_id.map(str::to_owned),
        name: key.name.to_owned(),
        created_at,
        revoked_at: None,
    };
    crate::audit::insert(
        &mut tx,
        actor,
        "api_key.create",
        "api_key",
        &info.key_id,
        None,
        serde_json::to_value(&info).ok(),
        None,
    )
    .await?;
    tx.commit().await?;
    Ok(info)
}

/// Every key, oldest first.
pub async fn list(pool: &PgPool) -> Result<Vec<KeyInfo>, sqlx::Error> {
    sqlx::query_as!(
        KeyInfo,
        "SELECT key_id, role, customer_id, name, created_at, revoked_at FROM api_keys
         ORDER BY created_at, key_id",
    )
    .fetch_all(pool)
    .await
}

/// Revokes a key and audits it; `false` if there is no such key or it was already revoked.
pub async fn revoke(pool: &PgPool, key_id: &str, actor: &str) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let revoked: Option<DateTime<Utc>> = sqlx::query_scalar!(
        r#"UPDATE api_keys SET revoked_at = now() WHERE key_id = $1 AND revoked_at IS NULL
         RETURNING revoked_at AS "revoked_at!""#,
        key_id,
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(at) = revoked else {
        return Ok(false);
    };
    crate::audit::insert(
        &mut tx,
        actor,
        "api_key.revoke",
        "api_key",
        key_id,
        Some(serde_json::json!({"revoked_at": null})),
        Some(serde_json::json!({"revoked_at": at})),
        None,
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// A key's stored hash, role, bound customer and whether it is revoked.
pub async fn stored(
    pool: &PgPool,
    key_id: &str,
) -> Result<Option<(Vec<u8>, String, Option<String>, bool)>, sqlx::Error> {
    let row = sqlx::query_as!(
        StoredKeyRow,
        r#"SELECT key_hash, role, customer_id, revoked_at IS NOT NULL AS "revoked!"
         FROM api_keys WHERE key_id = $1"#,
        key_id,
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| (r.key_hash, r.role, r.customer_id, r.revoked)))
}
