//! Is the database migrated for this binary? Checked by `meterflow pipeline` and `meterflow api` at
//! start, so an empty or older database is refused with what to do (`meterflow migrate`), not met later
//! as a missing relation.

use sqlx::PgConnection;

use crate::MIGRATOR;

/// How the database's schema stands against this binary's migrations.
#[derive(Debug, PartialEq, Eq)]
pub enum Schema {
    /// Every migration of this binary is applied.
    Current,
    /// Applied up to `applied` (none: no meterflow schema at all); this binary needs `needed`.
    Behind { applied: Option<i64>, needed: i64 },
}

/// How a database stands, as the rest of a sentence that names it: "the database X {schema}".
impl std::fmt::Display for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Schema::Current => write!(f, "is migrated"),
            Schema::Behind {
                applied: None,
                needed,
            } => write!(
                f,
                "has no meterflow schema: run `meterflow migrate` first (this binary needs \
                 migration {needed})"
            ),
            Schema::Behind {
                applied: Some(applied),
                needed,
            } => write!(
                f,
                "is migrated up to {applied}, and this binary needs {needed}: run `meterflow \
                 migrate` first"
            ),
        }
    }
}

/// Reads which migrations the database has applied (sqlx's `_sqlx_migrations`).
pub async fn schema(conn: &mut PgConnection) -> Result<Schema, sqlx::Error> {
    let needed = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    let present =
        sqlx::query_scalar!(r#"SELECT to_regclass('_sqlx_migrations') IS NOT NULL AS "present!""#)
            .fetch_one(&mut *conn)
            .await?;
    let applied = if present {
        sqlx::query_scalar!("SELECT max(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(&mut *conn)
            .await?
    } else {
        None
    };
    Ok(match applied {
        Some(applied) if applied >= needed => Schema::Current,
        applied => Schema::Behind { applied, needed },
    })
}
