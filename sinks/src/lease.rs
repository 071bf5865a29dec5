//! The writer lease. Starting a pipeline bumps the topic's `generation`; every commit checks it under a row
//! lock (compare-and-set), so an older instance that wakes up later can never commit again.

use std::collections::HashMap;

use sqlx::PgConnection;

/// This instance's right to commit for a topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub topic: String,
    pub generation: i64,
}

/// Takes over the topic: every earlier instance is fenced from now on.
pub async fn acquire_lease(conn: &mut PgConnection, topic: &str) -> Result<Lease, sqlx::Error> {
    let generation: i64 = sqlx::query_scalar!(
        "INSERT INTO pipeline_leases (topic, generation, committed_epoch) VALUES ($1, 1, 0)
         ON CONFLICT ON CONSTRAINT pipeline_leases_pkey
         DO UPDATE SET generation = pipeline_leases.generation + 1, committed_epoch = 0, acquired_at = now()
         RETURNING generation",
        topic,
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(Lease {
        topic: topic.to_owned(),
        generation,
    })
}

/// The next offset to read per partition, as last committed together with the results.
pub async fn stored_offsets(
    conn: &mut PgConnection,
    topic: &str,
) -> Result<HashMap<i32, i64>, sqlx::Error> {
    let rows = sqlx::query!(
        "SELECT partition, next_offset FROM source_offsets WHERE topic = $1",
        topic,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.partition, r.next_offset))
        .collect())
}
