//! The claim store on a real Postgres (`store/src/claims.rs`): the fast path (`COPY`) for batches of
//! new ids, and its fallback to the deciding statement when an id is known already. Whatever path a
//! batch takes, each id is decided exactly as SPEC §3 says: new ones count, a replay of the copy that
//! counted counts again, every other copy is a duplicate.

mod common;

use meterflow_model::claims::{Candidate, ClaimOutcome, Claims};
use meterflow_model::{DuplicateKind, Event};
use meterflow_store::claims::PgClaims;
use rust_decimal::Decimal;

/// Events whose text needs `COPY`'s escapes: tabs, newlines and backslashes, and non-ASCII.
fn events(prefix: &str, n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| Event {
            event_id: format!("{prefix}{i:03}\tid\\{i}"),
            customer_id: format!("cust\n{}", i % 3),
            event_type: "api_call".to_owned(),
            event_time_micros: 1_764_000_000_123_456 + i as i64,
            value: Decimal::new(12_345 + i as i64, 3),
            properties: format!(r#"{{"note":"tab\tnewline\nslash\\ é {i}"}}"#),
        })
        .collect()
}

fn candidates(events: &[Event], offset: i64, accepted: bool) -> Vec<Candidate<'_>> {
    events
        .iter()
        .enumerate()
        .map(|(i, event)| Candidate {
            event,
            fingerprint: event.fingerprint(),
            partition: 0,
            offset: offset + i as i64,
            payload: b"",
            accepted,
        })
        .collect()
}

/// (batches by the fast path, fallbacks): process-wide counters, so one test reads them.
fn paths() -> (u64, u64) {
    (
        meterflow_store::metrics::CLAIM_FAST_BATCHES.get(),
        meterflow_store::metrics::CLAIM_FALLBACKS.get(),
    )
}

#[test]
fn claims_by_copy_and_by_statement() {
    new_ids_count_replays_count_again_and_copies_are_duplicates();
    events_the_api_stored_are_claimed_by_the_statement();
    known_event_types_are_noted_once();
}

fn new_ids_count_replays_count_again_and_copies_are_duplicates() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let url = runtime.block_on(common::fresh_database());
    let mut claims = PgClaims::new(runtime.handle().clone(), &url);
    let sorted = |mut e: Vec<Event>| {
        e.sort_by(|a, b| a.event_id.cmp(&b.event_id));
        e
    };

    // A batch of new ids: every event counts, its claim and raw row are stored as sent.
    let first = sorted(events("a", 20));
    let (fast, fallbacks) = paths();
    let outcomes = claims.claim_events(&candidates(&first, 0, false)).unwrap();
    assert!(
        outcomes.iter().all(|o| *o == ClaimOutcome::Counts),
        "{outcomes:?}"
    );
    assert_eq!(paths(), (fast + 1, fallbacks), "new ids take the fast path");
    let stored: Vec<(String, String, String, i64, Decimal, String)> = runtime.block_on(async {
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        sqlx::query_as(
            "SELECT t.event_id, t.customer_id, t.event_type,
                    (extract(epoch FROM t.event_time) * 1000000)::bigint, t.value, t.properties::text
             FROM telemetry_events t JOIN event_ids e USING (event_id)
             WHERE e.source = 'kafka' AND e.counted_partition = 0
             ORDER BY t.event_id",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    });
    let expected: Vec<_> = first
        .iter()
        .map(|e| {
            (
                e.event_id.clone(),
                e.customer_id.clone(),
                e.event_type.clone(),
                e.event_time_micros,
                e.value,
                e.properties.clone(),
            )
        })
        .collect();
    assert_eq!(stored, expected);

    // The same records again (a replay after a crash): the fast path meets known ids, falls back, and
    // the statement finds each claim at its own position, so each counts again, stored once.
    let outcomes = claims.claim_events(&candidates(&first, 0, false)).unwrap();
    assert!(
        outcomes.iter().all(|o| *o == ClaimOutcome::Counts),
        "{outcomes:?}"
    );
    assert_eq!(paths(), (fast + 1, fallbacks + 1));
    let rows = runtime.block_on(common::scalar_i64(
        &url,
        "SELECT count(*) FROM telemetry_events",
    ));
    assert_eq!(rows, 20);

    // Copies at other positions are duplicates; a changed one is a conflicting duplicate. New ids in
    // the same batch still count (they are decided by the statement while it has the batches).
    let mut changed = first.clone();
    changed[0].value += Decimal::ONE;
    let mut mixed = changed[..2].to_vec();
    mixed.extend(events("b", 2));
    let mixed = sorted(mixed);
    let outcomes = claims
        .claim_events(&candidates(&mixed, 100, false))
        .unwrap();
    let by_id: std::collections::HashMap<&str, ClaimOutcome> = mixed
        .iter()
        .map(|e| e.event_id.as_str())
        .zip(outcomes)
        .collect();
    assert_eq!(
        by_id[changed[0].event_id.as_str()],
        ClaimOutcome::Duplicate(DuplicateKind::Conflicting)
    );
    assert_eq!(
        by_id[changed[1].event_id.as_str()],
        ClaimOutcome::Duplicate(DuplicateKind::Identical)
    );
    assert!(mixed
        .iter()
        .filter(|e| e.event_id.starts_with('b'))
        .all(|e| by_id[e.event_id.as_str()] == ClaimOutcome::Counts));
    let rows = runtime.block_on(common::scalar_i64(
        &url,
        "SELECT count(*) FROM telemetry_events",
    ));
    assert_eq!(rows, 22);
}

fn events_the_api_stored_are_claimed_by_the_statement() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let url = runtime.block_on(common::fresh_database());
    let api_events = events("api", 3);
    // What the API's group commit leaves: a claim with source 'api', not counted yet, and the raw row.
    runtime.block_on(async {
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        for e in &api_events {
            sqlx::query(
                "INSERT INTO event_ids (event_id, event_time, fingerprint, source)
                 VALUES ($1, timestamptz 'epoch' + $2 * interval '1 microsecond', $3, 'api')",
            )
            .bind(&e.event_id)
            .bind(e.event_time_micros)
            .bind(e.fingerprint())
            .execute(&pool)
            .await
            .unwrap();
        }
    });
    let mut claims = PgClaims::new(runtime.handle().clone(), &url);
    let (fast, fallbacks) = paths();
    let mut batch = candidates(&api_events, 0, true);
    let fresh = events("new", 2);
    batch.extend(candidates(&fresh, 10, false));
    batch.sort_by(|a, b| a.event.event_id.cmp(&b.event.event_id));
    let outcomes = claims.claim_events(&batch).unwrap();
    assert!(
        outcomes.iter().all(|o| *o == ClaimOutcome::Counts),
        "{outcomes:?}"
    );
    // The new ones by the fast path, the API's by the statement: no fallback.
    assert_eq!(paths(), (fast + 1, fallbacks));
    let counted = runtime.block_on(common::scalar_i64(
        &url,
        "SELECT count(*) FROM event_ids WHERE counted_partition IS NOT NULL",
    ));
    assert_eq!(counted, 5);
    // The API's raw rows are its own: the pipeline stored only the two new ones.
    let rows = runtime.block_on(common::scalar_i64(
        &url,
        "SELECT count(*) FROM telemetry_events",
    ));
    assert_eq!(rows, 2);
}

/// Issue 15: the fast path notes a batch's (customer, event type) pairs (`meterflow_note_event_types`,
/// the bound of 1000 types per customer) only for pairs it has not committed before. With the function
/// gone, a batch of known pairs is still stored; one with a new pair is not.
fn known_event_types_are_noted_once() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let url = runtime.block_on(common::fresh_database());
    let mut claims = PgClaims::new(runtime.handle().clone(), &url);
    let counts = |outcomes: &[ClaimOutcome]| outcomes.iter().all(|o| *o == ClaimOutcome::Counts);
    let first = events("a", 10);
    assert!(counts(
        &claims.claim_events(&candidates(&first, 0, false)).unwrap()
    ));
    runtime.block_on(async {
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        sqlx::query(
            "ALTER FUNCTION meterflow_note_event_types(text[], text[]) RENAME TO note_event_types_gone",
        )
        .execute(&pool)
        .await
        .unwrap();
    });
    let known = events("b", 10);
    assert!(counts(
        &claims.claim_events(&candidates(&known, 10, false)).unwrap()
    ));
    let mut new_type = events("c", 1);
    new_type[0].event_type = "other".to_owned();
    let noted = claims.claim_events(&candidates(&new_type, 20, false));
    assert!(
        !matches!(&noted, Ok(outcomes) if counts(outcomes)),
        "a new pair is noted: {noted:?}"
    );
    let rows = runtime.block_on(common::scalar_i64(
        &url,
        "SELECT count(*) FROM telemetry_events",
    ));
    assert_eq!(rows, 20);
}
