//! [`PgClaims`]: the durable claim store behind dedup and voids (SPEC §3), on the `event_ids` table.
//!
//! ```text
//!  batch of candidates ──one statement──► INSERT INTO event_ids … ON CONFLICT DO UPDATE
//!                                           (claim an API row with the same fingerprint)
//!                                         + INSERT INTO telemetry_events (events new to meterflow)
//!                       ◄── claimed ids ── the rest: SELECT their claims ─► own position? counts (a replay)
//!                                                                          otherwise a duplicate
//! ```
//! A claim records the position `(partition, offset)` of the record that counts, so claiming is
//! idempotent: a replay after a crash finds its own claim and counts again, any other copy never does.
//! The reader threads call this; the sink's epoch commit stays the only place where results and offsets
//! become durable.
//!
//! Most batches hold only ids never seen before. Those take a fast path first: two `COPY`s in one
//! transaction, of the claims and of the raw rows, with no conflict handling at all. The unique key
//! of `event_ids` still judges every id; if one was there already (a replay after a crash, a copy of
//! an event, a race with another reader), the `COPY` fails, the transaction rolls back, and the batch
//! takes the statement above, which decides each id. The next [`STATEMENT_BATCHES_AFTER_FALLBACK`]
//! batches then go to the statement directly, so a replay does not pay twice per batch. Records the
//! API stored (`meterflow-kind: event`) always take the statement: their claim exists already.
//!
//! The fast path commits asynchronously (`synchronous_commit = off`). Nothing depends on a claim
//! until the epoch holding its records commits, and that commit is synchronous: it flushes the WAL up
//! to itself, and so every claim before it. A claim lost in a Postgres crash belongs to records whose
//! epoch never committed; they are read again and claimed again.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::Duration;

use meterflow_model::claims::{Candidate, ClaimError, ClaimOutcome, Claims, VoidCandidate};
use meterflow_model::{DuplicateKind, Event};
use rust_decimal::Decimal;
use sqlx::{ConnectOptions, Connection, PgConnection};

use crate::copy_text;

/// After the fast path met an id it knew, this many batches are claimed by the statement directly.
pub const STATEMENT_BATCHES_AFTER_FALLBACK: u32 = 16;

/// A counted event a void retracts, as [`PgClaims::claim_voids`] reads it back.
struct VoidedRow {
    event_id: String,
    customer_id: String,
    event_type: String,
    event_time: chrono::DateTime<chrono::Utc>,
    value: Decimal,
    properties: String,
}

impl From<VoidedRow> for Event {
    fn from(row: VoidedRow) -> Self {
        Event {
            event_id: row.event_id,
            customer_id: row.customer_id,
            event_type: row.event_type,
            event_time_micros: row.event_time.timestamp_micros(),
            value: row.value,
            properties: row.properties,
        }
    }
}

/// Claims against Postgres, from a reader thread: it owns one connection and drives its statements on
/// the process's runtime (a reader thread is not one of the runtime's, so it may wait on it).
pub struct PgClaims {
    url: String,
    runtime: tokio::runtime::Handle,
    conn: Option<PgConnection>,
    /// Batches still to claim by the statement before trying the fast path again.
    statement_batches: u32,
    /// The (customer, event type) pairs this reader's fast path noted and committed: a batch whose
    /// pairs are all here skips `meterflow_note_event_types` (0.5 s of Postgres per 1M backfill events).
    /// Nothing deletes a row of `customer_event_types`, so a pair once committed stays, unless
    /// Postgres lost the commit (it is asynchronous): the set is forgotten with the connection, and
    /// past [`NOTED_PAIRS`].
    noted: HashSet<(String, String)>,
}

/// How many noted pairs a reader remembers: 20-40 MB with ids of usual length, 60 MB at most with
/// the longest ids the decoder takes (128-byte customers, 64-byte types).
const NOTED_PAIRS: usize = 200_000;

impl PgClaims {
    /// Claims on `runtime` (the process's; its IO driver must be running, as a multi-thread
    /// runtime's is), connecting to `url` on first use.
    pub fn new(runtime: tokio::runtime::Handle, url: &str) -> Self {
        PgClaims {
            url: url.to_owned(),
            runtime,
            conn: None,
            statement_batches: 0,
            noted: HashSet::new(),
        }
    }

    /// Runs `f` on a live connection. An error caused by what the records hold ([`is_data_error`]) is
    /// [`ClaimError::Refused`]; any other drops the connection (a
    /// fresh one is made on the next call) and is [`ClaimError::Unavailable`], for the reader to retry.
    fn with_conn<T>(
        &mut self,
        f: impl for<'c> FnOnce(
            &'c mut PgConnection,
        ) -> futures::future::BoxFuture<'c, Result<T, sqlx::Error>>,
    ) -> Result<T, ClaimError> {
        let url = self.url.clone();
        let result = self.runtime.block_on(async {
            if self.conn.is_none() {
                let options = url
                    .parse::<sqlx::postgres::PgConnectOptions>()?
                    .log_slow_statements(tracing::log::LevelFilter::Off, Duration::ZERO);
                self.conn = Some(PgConnection::connect_with(&options).await?);
            }
            match self.conn.as_mut() {
                Some(conn) => f(conn).await,
                None => Err(sqlx::Error::PoolClosed),
            }
        });
        result.map_err(|e| {
            if is_data_error(&e) {
                return ClaimError::Refused(e.to_string());
            }
            self.conn = None;
            // A crash may have lost commits made with `synchronous_commit = off`.
            self.noted = HashSet::new();
            ClaimError::Unavailable(format!("claiming events in Postgres: {e}"))
        })
    }
}

impl Claims for PgClaims {
    fn claim_events(
        &mut self,
        candidates: &[Candidate<'_>],
    ) -> Result<Vec<ClaimOutcome>, ClaimError> {
        let (accepted, new): (Vec<usize>, Vec<usize>) =
            (0..candidates.len()).partition(|&i| candidates.get(i).is_some_and(|c| c.accepted));
        let mut by_statement = accepted;
        if self.statement_batches > 0 {
            self.statement_batches = self.statement_batches.saturating_sub(1);
            by_statement.extend(new);
        } else if !new.is_empty() {
            let fresh: Vec<Candidate> = new
                .iter()
                .filter_map(|&i| candidates.get(i).copied())
                .collect();
            match self.copy_new(&fresh)? {
                FastPath::Stored => crate::metrics::CLAIM_FAST_BATCHES.inc(),
                FastPath::Known => {
                    crate::metrics::CLAIM_FALLBACKS.inc();
                    self.statement_batches = STATEMENT_BATCHES_AFTER_FALLBACK;
                    by_statement.extend(new);
                }
                FastPath::Refused => by_statement.extend(new),
            }
        }
        let mut outcomes = vec![ClaimOutcome::Counts; candidates.len()];
        if by_statement.is_empty() {
            return Ok(outcomes);
        }
        // In the candidates' order (by event id): concurrent claims lock ids in one order.
        by_statement.sort_unstable();
        let asks: Vec<Candidate> = by_statement
            .iter()
            .filter_map(|&i| candidates.get(i).copied())
            .collect();
        for (i, outcome) in by_statement.iter().zip(self.claim_by_statement(&asks)?) {
            if let Some(slot) = outcomes.get_mut(*i) {
                *slot = outcome;
            }
        }
        Ok(outcomes)
    }

    fn claim_voids(&mut self, voids: &[VoidCandidate]) -> Result<Vec<Option<Event>>, ClaimError> {
        let ids: Vec<String> = voids.iter().map(|v| v.event_id.clone()).collect();
        let partitions: Vec<i32> = voids.iter().map(|v| v.partition).collect();
        let offsets: Vec<i64> = voids.iter().map(|v| v.offset).collect();
        let retracted = self.with_conn(move |conn| {
            Box::pin(async move {
                let mut tx = conn.begin().await?;
                // Claim each void (idempotently, by position); for those whose event had counted, read
                // the event back to retract exactly what it contributed. A void of an id not seen yet
                // leaves a tombstone (voided, never counted), so the event, read later, is a voided
                // duplicate — on the first run and on any replay alike.
                let rows = sqlx::query_as!(
                    VoidedRow,
                    r#"WITH tombstones AS (
                        INSERT INTO event_ids (event_id, event_time, fingerprint, source, voided_partition, voided_offset)
                        SELECT v.id, timestamptz 'epoch', 0, 'kafka', v.p, v.o
                        FROM UNNEST($1::text[], $2::int[], $3::bigint[]) AS v(id, p, o)
                        ON CONFLICT ON CONSTRAINT event_ids_pkey DO NOTHING
                     ), voided AS (
                        UPDATE event_ids e SET voided_partition = v.p, voided_offset = v.o
                        FROM UNNEST($1::text[], $2::int[], $3::bigint[]) AS v(id, p, o)
                        WHERE e.event_id = v.id
                          AND (e.voided_partition IS NULL OR (e.voided_partition, e.voided_offset) = (v.p, v.o))
                        RETURNING e.event_id, e.event_time, e.counted_partition IS NOT NULL AS counted
                     )
                     SELECT t.event_id, t.customer_id, t.event_type, t.event_time, t.value, t.properties::text AS "properties!"
                     FROM voided v JOIN telemetry_events t ON t.event_id = v.event_id AND t.event_time = v.event_time
                     WHERE v.counted"#,
                    &ids,
                    &partitions,
                    &offsets,
                )
                .fetch_all(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok::<_, sqlx::Error>(rows.into_iter().map(Event::from).collect::<Vec<Event>>())
            })
        })?;
        let mut by_id: std::collections::HashMap<String, Event> = retracted
            .into_iter()
            .map(|e| (e.event_id.clone(), e))
            .collect();
        Ok(voids.iter().map(|v| by_id.remove(&v.event_id)).collect())
    }
}

/// What the fast path did with a batch.
enum FastPath {
    /// Every claim and raw row is stored: each event counts.
    Stored,
    /// An id was there already: nothing is stored, the statement must decide.
    Known,
    /// Postgres refused what a record holds (or a time cannot be written): nothing is stored, the
    /// statement decides and names the record.
    Refused,
}

impl PgClaims {
    /// The fast path: the batch's claims and raw rows by `COPY`, all or nothing.
    fn copy_new(&mut self, candidates: &[Candidate<'_>]) -> Result<FastPath, ClaimError> {
        let Some((claims, rows)) = copy_text(candidates) else {
            return Ok(FastPath::Refused);
        };
        let (customers, types) = copy_text::event_type_pairs(candidates.iter().map(|c| c.event));
        let fresh: Vec<(String, String)> = customers
            .into_iter()
            .zip(types)
            .filter(|pair| !self.noted.contains(pair))
            .collect();
        let (customers, types): (Vec<String>, Vec<String>) = fresh.iter().cloned().unzip();
        let stored = self.with_conn(move |conn| {
            Box::pin(async move {
                let mut tx = conn.begin().await?;
                let stored = async {
                    sqlx::query!("SET LOCAL synchronous_commit = off")
                        .execute(&mut *tx)
                        .await?;
                    // The bound on event types per customer (migration 0016): 22M01 past it.
                    if !customers.is_empty() {
                        sqlx::query!(
                            "SELECT meterflow_note_event_types($1, $2)",
                            &customers,
                            &types,
                        )
                        .execute(&mut *tx)
                        .await?;
                    }
                    let mut copy = tx
                        .copy_in_raw(
                            "COPY event_ids (event_id, event_time, fingerprint, source, counted_partition, counted_offset) FROM STDIN",
                        )
                        .await?;
                    copy.send(claims).await?;
                    copy.finish().await?;
                    let mut copy = tx
                        .copy_in_raw(
                            "COPY telemetry_events (event_id, customer_id, event_type, event_time, value, properties) FROM STDIN",
                        )
                        .await?;
                    copy.send(rows).await?;
                    copy.finish().await?;
                    Ok::<_, sqlx::Error>(())
                }
                .await;
                match stored {
                    Ok(()) => tx.commit().await.map(|()| FastPath::Stored),
                    // Any refusal rolls back the whole batch; the statement then decides each record.
                    Err(sqlx::Error::Database(db)) => {
                        tx.rollback().await?;
                        Ok(if db.code().as_deref() == Some("23505") {
                            FastPath::Known
                        } else {
                            FastPath::Refused
                        })
                    }
                    Err(e) => Err(e),
                }
            })
        })?;
        if matches!(stored, FastPath::Stored) {
            if self.noted.len().saturating_add(fresh.len()) > NOTED_PAIRS {
                self.noted.clear();
            }
            self.noted.extend(fresh);
        }
        Ok(stored)
    }

    /// Claims each candidate by one statement that decides it: new, a replay of the copy that
    /// counted, or a duplicate (identical, conflicting, voided).
    fn claim_by_statement(
        &mut self,
        candidates: &[Candidate<'_>],
    ) -> Result<Vec<ClaimOutcome>, ClaimError> {
        let n = candidates.len();
        let mut ids = Vec::with_capacity(n);
        let mut micros = Vec::with_capacity(n);
        let mut fingerprints = Vec::with_capacity(n);
        let mut partitions = Vec::with_capacity(n);
        let mut offsets = Vec::with_capacity(n);
        let mut customers = Vec::with_capacity(n);
        let mut types = Vec::with_capacity(n);
        let mut values: Vec<Decimal> = Vec::with_capacity(n);
        let mut properties = Vec::with_capacity(n);
        for c in candidates {
            ids.push(c.event.event_id.clone());
            micros.push(c.event.event_time_micros);
            fingerprints.push(c.fingerprint);
            partitions.push(c.partition);
            offsets.push(c.offset);
            customers.push(c.event.customer_id.clone());
            types.push(c.event.event_type.clone());
            values.push(c.event.value);
            properties.push(c.event.properties.clone());
        }
        let (claimed, existing) = self.with_conn(move |conn| {
            Box::pin(async move {
                let mut tx = conn.begin().await?;
                let claimed: Vec<String> = sqlx::query_scalar!(
                    "WITH input AS (
                        SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::int[], $5::bigint[],
                                             $6::text[], $7::text[], $8::numeric[], $9::text[])
                          AS u(event_id, micros, fingerprint, partition, \"offset\", customer_id, event_type, value, properties)
                     ), claimed AS (
                        INSERT INTO event_ids AS e (event_id, event_time, fingerprint, source, counted_partition, counted_offset)
                        SELECT event_id, timestamptz 'epoch' + micros * interval '1 microsecond', fingerprint, 'kafka',
                               partition, \"offset\"
                        FROM input
                        ORDER BY event_id
                        ON CONFLICT ON CONSTRAINT event_ids_pkey DO UPDATE
                        SET counted_partition = excluded.counted_partition, counted_offset = excluded.counted_offset
                        WHERE e.counted_partition IS NULL AND e.voided_partition IS NULL
                          AND e.fingerprint = excluded.fingerprint
                        RETURNING e.event_id, e.source = 'kafka' AS fresh
                     ), stored AS (
                        INSERT INTO telemetry_events (event_id, customer_id, event_type, event_time, value, properties)
                        SELECT i.event_id, i.customer_id, i.event_type,
                               timestamptz 'epoch' + i.micros * interval '1 microsecond', i.value, i.properties::json
                        FROM input i JOIN claimed c ON c.event_id = i.event_id
                        WHERE c.fresh
                        ORDER BY i.customer_id, i.event_type
                        RETURNING customer_id, event_type
                     ), noted AS (
                        -- The bound on event types per customer (migration 0016): 22M01 past it.
                        SELECT meterflow_note_event_types(array_agg(customer_id), array_agg(event_type)) FROM stored
                     )
                     SELECT event_id FROM claimed CROSS JOIN noted",
                    &ids,
                    &micros,
                    &fingerprints,
                    &partitions,
                    &offsets,
                    &customers,
                    &types,
                    &values,
                    &properties,
                )
                .fetch_all(&mut *tx)
                .await?;
                let claimed: std::collections::HashSet<String> = claimed.into_iter().collect();
                let rest: Vec<&String> = ids.iter().filter(|i| !claimed.contains(*i)).collect();
                let existing = if rest.is_empty() {
                    Vec::new()
                } else {
                    // The ids are borrowed (`&String`), cast past the macro's `&[String]`.
                    sqlx::query!(
                        r#"SELECT event_id, fingerprint, counted_partition, counted_offset, voided_partition IS NOT NULL AS "voided!"
                         FROM event_ids WHERE event_id = ANY($1)"#,
                        &rest[..] as &[&String],
                    )
                    .fetch_all(&mut *tx)
                    .await?
                    .into_iter()
                    .map(|r| {
                        (
                            r.event_id,
                            (r.fingerprint, r.counted_partition, r.counted_offset, r.voided),
                        )
                    })
                    .collect::<Vec<_>>()
                };
                tx.commit().await?;
                Ok((claimed, existing))
            })
        })?;
        let existing: std::collections::HashMap<String, _> = existing.into_iter().collect();
        candidates
            .iter()
            .map(|c| {
                if claimed.contains(&c.event.event_id) {
                    return Ok(ClaimOutcome::Counts);
                }
                let Some((fingerprint, partition, offset, voided)) =
                    existing.get(&c.event.event_id)
                else {
                    return Err(ClaimError::Unavailable(format!(
                        "event {} was neither claimed nor found",
                        c.event.event_id
                    )));
                };
                Ok(
                    if (*partition, *offset) == (Some(c.partition), Some(c.offset)) {
                        ClaimOutcome::Counts
                    } else if *voided && partition.is_none() {
                        ClaimOutcome::Duplicate(DuplicateKind::Voided)
                    } else if *fingerprint == c.fingerprint {
                        ClaimOutcome::Duplicate(DuplicateKind::Identical)
                    } else {
                        ClaimOutcome::Duplicate(DuplicateKind::Conflicting)
                    },
                )
            })
            .collect()
    }
}

/// The two `COPY` texts of a batch: its claims (in the candidates' order, by id) and its raw rows.
/// `None` when an event time has no calendar date (the statement then refuses that record).
fn copy_text(candidates: &[Candidate<'_>]) -> Option<(Vec<u8>, Vec<u8>)> {
    let times = candidates
        .iter()
        .map(|c| copy_text::time(c.event.event_time_micros))
        .collect::<Option<Vec<String>>>()?;
    let mut claims = String::with_capacity(candidates.len() * 64);
    for (c, time) in candidates.iter().zip(&times) {
        copy_text::escape(&c.event.event_id, &mut claims);
        let _ = writeln!(
            claims,
            "\t{time}\t{}\tkafka\t{}\t{}",
            c.fingerprint, c.partition, c.offset
        );
    }
    let rows = copy_text::telemetry_rows(
        candidates
            .iter()
            .zip(&times)
            .map(|(c, t)| (c.event, t.as_str())),
    );
    Some((claims.into_bytes(), rows))
}

/// Whether Postgres refused a statement for the data it carries (SQLSTATE class 22, data exception,
/// or 23514, a CHECK constraint), which no retry can fix. A unique violation is not among them: it can
/// come from a race and is retried.
fn is_data_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("22") || code == "23514"),
        _ => false,
    }
}

/// For a source reset (`meterflow_sinks::source::reset_source`, in its transaction): the claims and
/// voids the old topic committed become "by an earlier source" (position −1); those it made but never
/// committed are released: their events are stored (`telemetry_events`) but not counted, as after an
/// API insert, so a copy in the new topic counts; such voids are forgotten.
pub async fn release_for_reset(tx: &mut PgConnection, topic: &str) -> Result<(), sqlx::Error> {
    // One statement per claim (the counted, then the voided), each the text the former `format!` made.
    sqlx::query!(
        "UPDATE event_ids e
             SET counted_partition = CASE WHEN committed THEN -1 END,
                 counted_offset = CASE WHEN committed THEN -1 END,
                 source = CASE WHEN committed THEN e.source ELSE 'api' END
             FROM (SELECT i.event_id, i.counted_offset < COALESCE(o.next_offset, 0) AS committed
                   FROM event_ids i
                   LEFT JOIN source_offsets o ON o.topic = $1 AND o.partition = i.counted_partition
                   WHERE i.counted_partition >= 0) c
             WHERE e.event_id = c.event_id",
        topic,
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "UPDATE event_ids e
             SET voided_partition = CASE WHEN committed THEN -1 END,
                 voided_offset = CASE WHEN committed THEN -1 END,
                 source = CASE WHEN committed THEN e.source ELSE e.source END
             FROM (SELECT i.event_id, i.voided_offset < COALESCE(o.next_offset, 0) AS committed
                   FROM event_ids i
                   LEFT JOIN source_offsets o ON o.topic = $1 AND o.partition = i.voided_partition
                   WHERE i.voided_partition >= 0) c
             WHERE e.event_id = c.event_id",
        topic,
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}
