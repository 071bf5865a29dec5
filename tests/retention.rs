//! `meterflow retention` (src/retention.rs): month partitions of raw events wholly past the retention
//! horizon (committed watermark − 35 days) are archived to gzip'd CSV and dropped; everything else is
//! untouched; `--dry-run` changes nothing; without a committed watermark nothing is past the horizon.
//!
//! Each test seeds its own database directly: events in January, February, March and April 2024 and
//! their event_ids rows, and a committed watermark of 2024-04-10 (horizon 2024-03-06): January and
//! February are wholly past it, March is not.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use sqlx::{Connection, PgConnection};

const WATERMARK: &str = "2024-04-10T00:00:00Z";
/// Events per month seeded (the last month, April, gets as many).
const PER_MONTH: i64 = 50;

async fn seed(url: &str, watermark: Option<&str>) {
    let mut conn = PgConnection::connect(url).await.unwrap();
    for (month, day_count) in [
        ("2024-01", 31),
        ("2024-02", 29),
        ("2024-03", 31),
        ("2024-04", 30),
    ] {
        sqlx::query(
            "WITH e AS (
                 SELECT format('evt_%s_%s', $1::text, i) AS event_id, format('cust_%s', i % 7) AS customer_id,
                        'api_call' AS event_type,
                        ($1 || '-01T00:00:00Z')::timestamptz + (i % $3) * interval '1 day' + i * interval '1 minute'
                          AS event_time,
                        (i % 5)::numeric AS value
                 FROM generate_series(1, $2) AS i
             ), ids AS (
                 INSERT INTO event_ids (event_id, event_time, fingerprint, source, counted_partition, counted_offset)
                 SELECT event_id, event_time, 7, 'kafka', 0, 1 FROM e
             )
             INSERT INTO telemetry_events (event_id, customer_id, event_type, event_time, value, properties)
             SELECT event_id, customer_id, event_type, event_time, value,
                    '{\"region\":\"eu\",\"note\":\"a, \\\"quoted\\\" one\"}'::json FROM e",
        )
        .bind(month)
        .bind(PER_MONTH)
        .bind(day_count)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    if let Some(w) = watermark {
        sqlx::query(
            "INSERT INTO pipeline_leases (topic, generation, committed_epoch, committed_watermark)
             VALUES ('t', 1, 1, $1::timestamptz)",
        )
        .bind(w)
        .execute(&mut conn)
        .await
        .unwrap();
    }
}

fn retention(url: &str, args: &[&str]) -> std::process::Output {
    common::meterflow(url, "unused")
        .arg("retention")
        .args(args)
        .output()
        .unwrap()
}

async fn partitions(url: &str) -> BTreeSet<String> {
    let mut conn = PgConnection::connect(url).await.unwrap();
    sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'telemetry_events'::regclass AND c.relname::text LIKE 'telemetry_events_2024_0%'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

async fn ids_in(url: &str, sql: &str) -> BTreeSet<String> {
    let mut conn = PgConnection::connect(url).await.unwrap();
    sqlx::query_scalar(sql)
        .fetch_all(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// The event ids of a `telemetry_events_YYYY_MM.csv.gz` archive (header checked).
fn archived_ids(path: &Path) -> Vec<String> {
    let out = Command::new("gzip").arg("-dc").arg(path).output().unwrap();
    assert!(out.status.success(), "gzip -dc {}", path.display());
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("event_id,customer_id,event_type,event_time,value,properties,received_at")
    );
    lines
        .map(|l| l.split(',').next().unwrap().to_owned())
        .collect()
}

fn stdout(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn months_past_the_horizon_are_archived_exactly_and_dropped_the_rest_untouched() {
    let url = common::fresh_database().await;
    seed(&url, Some(WATERMARK)).await;
    let dir = std::env::temp_dir().join(common::unique("mf_retention"));
    let march_before = ids_in(&url, "SELECT event_id FROM telemetry_events_2024_03").await;
    let april_before = ids_in(&url, "SELECT event_id FROM telemetry_events_2024_04").await;
    let jan = ids_in(&url, "SELECT event_id FROM telemetry_events_2024_01").await;
    let feb = ids_in(&url, "SELECT event_id FROM telemetry_events_2024_02").await;
    let all_ids = ids_in(&url, "SELECT event_id FROM event_ids").await;

    // --before May asks for April too: only January and February lie wholly behind the horizon.
    let out = retention(
        &url,
        &["--before", "2024-05", "--archive", dir.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stdout(&out));

    // The archives hold exactly the months' rows.
    let jan_archived = archived_ids(&dir.join("telemetry_events_2024_01.csv.gz"));
    let feb_archived = archived_ids(&dir.join("telemetry_events_2024_02.csv.gz"));
    assert_eq!(jan_archived.len() as i64, PER_MONTH);
    assert_eq!(jan_archived.into_iter().collect::<BTreeSet<_>>(), jan);
    assert_eq!(feb_archived.into_iter().collect::<BTreeSet<_>>(), feb);
    assert!(!dir.join("telemetry_events_2024_03.csv.gz").exists());

    // The two partitions are gone; March (inside the horizon) and April are untouched.
    let left = partitions(&url).await;
    assert!(!left.contains("telemetry_events_2024_01"), "{left:?}");
    assert!(!left.contains("telemetry_events_2024_02"), "{left:?}");
    assert!(left.contains("telemetry_events_2024_03"), "{left:?}");
    assert_eq!(
        ids_in(&url, "SELECT event_id FROM telemetry_events_2024_03").await,
        march_before
    );
    assert_eq!(
        ids_in(&url, "SELECT event_id FROM telemetry_events_2024_04").await,
        april_before
    );
    assert_eq!(
        common::scalar_i64(&url, "SELECT count(*) FROM telemetry_events").await,
        2 * PER_MONTH
    );
    // Dedup's truth is kept (no --prune-event-ids).
    assert_eq!(
        ids_in(&url, "SELECT event_id FROM event_ids").await,
        all_ids
    );
    // Where raw events now start is recorded, and a re-rating job reaching before it is refused.
    assert_eq!(
        common::scalar_i64(
            &url,
            "SELECT extract(epoch FROM archived_before)::bigint FROM telemetry_retention"
        )
        .await,
        1_709_251_200 // 2024-03-01
    );
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let refused = sqlx::query(
        "INSERT INTO rerating_jobs (job_id, customer_ids, scope, reason)
         VALUES ('j1', '{}', tstzrange('2024-02-15', '2024-03-15', '[)'), 'test')",
    )
    .execute(&mut conn)
    .await
    .unwrap_err();
    assert_eq!(
        refused
            .as_database_error()
            .and_then(|d| d.code())
            .as_deref(),
        Some("22M02")
    );
    sqlx::query(
        "INSERT INTO rerating_jobs (job_id, customer_ids, scope, reason)
         VALUES ('j2', '{}', tstzrange('2024-03-01', '2024-03-15', '[)'), 'test')",
    )
    .execute(&mut conn)
    .await
    .unwrap();

    // Run again: nothing left to do, nothing changes.
    let out = retention(
        &url,
        &["--before", "2024-05", "--archive", dir.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stdout(&out));
    assert_eq!(
        common::scalar_i64(&url, "SELECT count(*) FROM telemetry_events").await,
        2 * PER_MONTH
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn dry_run_changes_nothing() {
    let url = common::fresh_database().await;
    seed(&url, Some(WATERMARK)).await;
    let dir = std::env::temp_dir().join(common::unique("mf_retention_dry"));
    let before = partitions(&url).await;
    let out = retention(
        &url,
        &[
            "--before",
            "2024-04",
            "--archive",
            dir.to_str().unwrap(),
            "--prune-event-ids",
            "--dry-run",
        ],
    );
    assert!(out.status.success(), "{}", stdout(&out));
    let said = stdout(&out);
    assert!(said.contains("telemetry_events_2024_01"), "{said}");
    assert_eq!(partitions(&url).await, before);
    assert_eq!(
        common::scalar_i64(&url, "SELECT count(*) FROM telemetry_events").await,
        4 * PER_MONTH
    );
    assert_eq!(
        common::scalar_i64(&url, "SELECT count(*) FROM event_ids").await,
        4 * PER_MONTH
    );
    assert_eq!(
        common::scalar_i64(&url, "SELECT count(*) FROM telemetry_retention").await,
        0
    );
    assert!(!dir.exists(), "a dry run writes no archive");
}

#[tokio::test]
async fn without_a_committed_watermark_nothing_is_past_the_horizon() {
    let url = common::fresh_database().await;
    seed(&url, None).await;
    let out = retention(&url, &["--before", "2024-04"]);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("no committed watermark"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        common::scalar_i64(&url, "SELECT count(*) FROM telemetry_events").await,
        4 * PER_MONTH
    );
}

#[tokio::test]
async fn pruned_event_ids_are_those_of_dropped_months_and_never_an_unsent_outbox_row() {
    let url = common::fresh_database().await;
    seed(&url, Some(WATERMARK)).await;
    let mut conn = PgConnection::connect(&url).await.unwrap();
    // An accepted event still on its way to Kafka (an outbox row) keeps its id.
    sqlx::query(
        "INSERT INTO event_outbox (event_id, payload, customer_id) VALUES ('evt_2024-01_3', '\\x00', 'cust_3')",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let out = retention(&url, &["--before", "2024-03", "--prune-event-ids"]);
    assert!(out.status.success(), "{}", stdout(&out));
    let left = ids_in(&url, "SELECT event_id FROM event_ids").await;
    assert!(left.contains("evt_2024-01_3"));
    assert_eq!(
        left.iter().filter(|i| i.starts_with("evt_2024-01")).count(),
        1
    );
    assert!(!left.iter().any(|i| i.starts_with("evt_2024-02")));
    assert_eq!(
        left.iter().filter(|i| i.starts_with("evt_2024-03")).count() as i64,
        PER_MONTH
    );
    assert_eq!(
        common::scalar_i64(&url, "SELECT count(*) FROM event_outbox").await,
        1
    );
}
