//! Kafka records that used to stop or skew billing (issue 13; review findings 2, 4 and 14), each sent
//! through the real pipeline on a topic and database of its own. Every test asserts the same three
//! things: the pipeline keeps going (it drains and exits 0 within a bound), the hostile record is a dead
//! letter with a printable reason (or counted exactly as what it holds), and the good events after it
//! are counted.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use meterflow_model::{Aggregation, Meter, Window};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rust_decimal::Decimal;
use sqlx::{Connection, PgConnection, Row};

const TIME: &str = "2024-03-01T10:15:00Z";

/// One record to produce: its payload, and whether it is a void record.
struct Record {
    payload: Vec<u8>,
    void: bool,
}

fn event(id: &str, rest: &str) -> Record {
    Record {
        payload: format!(
            r#"{{"event_id":"{id}","customer_id":"c","event_type":"t","event_time":"{TIME}"{rest}}}"#
        )
        .into_bytes(),
        void: false,
    }
}

fn raw(bytes: &[u8]) -> Record {
    Record {
        payload: bytes.to_vec(),
        void: false,
    }
}

fn void(payload: &str) -> Record {
    Record {
        payload: payload.as_bytes().to_vec(),
        void: true,
    }
}

/// Produces the records, in order, to partition 0 of `topic`.
fn produce_in_order(topic: &str, records: &[Record]) {
    produce_to(topic, 0, records)
}

/// Produces the records, in order, to one partition of `topic`.
fn produce_to(topic: &str, partition: i32, records: &[Record]) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    for r in records {
        let mut record = BaseRecord::to(topic)
            .key("c")
            .partition(partition)
            .payload(&r.payload);
        if r.void {
            record = record.headers(OwnedHeaders::new().insert(Header {
                key: "meterflow-kind",
                value: Some("void"),
            }));
        }
        producer.send(record).map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// Runs the pipeline until it has committed the whole topic; fails (rather than hangs) when it exits
/// with an error or has not finished within `within`.
fn drain_within(url: &str, topic: &str, within: Duration) {
    let mut child = meterflow(url, topic)
        .args(["pipeline", "--until-caught-up", "--workers", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                use std::io::Read;
                let _ = pipe.read_to_string(&mut stderr);
            }
            assert!(status.success(), "the pipeline stopped: {status}: {stderr}");
            return;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the pipeline did not get past the records within {within:?}: a partition is stuck"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn setup(meters: &[Meter]) -> (String, String) {
    let url = fresh_database().await;
    let topic = fresh_topic(1).await;
    let mut conn = PgConnection::connect(&url).await.unwrap();
    for m in meters {
        meterflow_store::meters::create_meter(&mut conn, m)
            .await
            .unwrap();
    }
    (url, topic)
}

/// `(value, event_count)` of every row of one meter, summed over its windows.
async fn meter_total(url: &str, meter: &str) -> (Decimal, i64) {
    let mut conn = PgConnection::connect(url).await.unwrap();
    let row = sqlx::query(
        "SELECT COALESCE(sum(value), 0), COALESCE(sum(event_count), 0)::bigint FROM aggregations WHERE meter = $1",
    )
    .bind(meter)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    (row.get::<Decimal, _>(0).normalize(), row.get(1))
}

/// The reasons of the dead letters, by offset.
async fn dead_letters(url: &str) -> Vec<(i64, String)> {
    let mut conn = PgConnection::connect(url).await.unwrap();
    sqlx::query(r#"SELECT "offset", reason FROM dead_letters ORDER BY "offset""#)
        .fetch_all(&mut conn)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn sum_meter(name: &str, property: &str, aggregation: Aggregation) -> Meter {
    Meter {
        meter: name.into(),
        event_type: "t".into(),
        aggregation,
        value_property: Some(property.into()),
        window: Window::Hour,
        group_by: Default::default(),
        max_dimension_values: None,
    }
}

const BOUND: Duration = Duration::from_secs(60);

#[tokio::test]
async fn finding_04a_nul_in_an_unknown_field_name_is_a_dead_letter_and_the_partition_moves_on() {
    let (url, topic) = setup(&[]).await;
    produce_in_order(
        &topic,
        &[
            event("a1", ""),
            event("p1", r#","\u0000":1"#),
            event("p2", r#","properties":{"\u0000":null}"#),
            event("a2", r#","value":2"#),
        ],
    );
    drain_within(&url, &topic, BOUND);
    let dead = dead_letters(&url).await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    for (_, reason) in &dead {
        assert!(
            !reason.is_empty() && !reason.chars().any(char::is_control),
            "{reason:?}"
        );
    }
    assert_eq!(meter_total(&url, "t").await, (Decimal::from(3), 2));
}

#[tokio::test]
async fn finding_04b_nul_or_a_lone_surrogate_in_a_property_is_a_dead_letter_and_later_events_count()
{
    let (url, topic) = setup(&[]).await;
    produce_in_order(
        &topic,
        &[
            event("b1", r#","properties":{"k":"\u0000"}"#),
            event("b2", r#","properties":{"k":"\ud800"}"#),
            event("b3", r#","properties":{"k":"x\udc00y"}"#),
            raw(b"\xff\xfe not UTF-8"),
            raw(&[
                br#"{"event_id":"b4","customer_id":"c","event_type":"t","event_time":"2024-03-01T10:15:00Z","properties":{"k":""#.as_slice(),
                b"\xc3",
                br#""}}"#.as_slice(),
            ]
            .concat()),
            event("g1", r#","value":5,"properties":{"k":"\ud83d\ude00"}"#),
        ],
    );
    drain_within(&url, &topic, BOUND);
    let offsets: Vec<i64> = dead_letters(&url).await.iter().map(|d| d.0).collect();
    assert_eq!(offsets, [0, 1, 2, 3, 4]);
    assert_eq!(meter_total(&url, "t").await, (Decimal::from(5), 1));
}

#[tokio::test]
async fn finding_04c_a_void_record_with_a_nul_id_is_a_dead_letter() {
    let (url, topic) = setup(&[]).await;
    produce_in_order(
        &topic,
        &[
            event("c1", r#","value":3"#),
            void(r#"{"event_id":"\u0000","customer_id":"c"}"#),
            void(r#"["c1","c"]"#),
            event("c2", r#","value":4"#),
        ],
    );
    drain_within(&url, &topic, BOUND);
    let offsets: Vec<i64> = dead_letters(&url).await.iter().map(|d| d.0).collect();
    assert_eq!(offsets, [1, 2]);
    assert_eq!(meter_total(&url, "t").await, (Decimal::from(7), 2));
}

#[tokio::test]
async fn finding_02_a_void_takes_back_exactly_what_an_escaped_number_added() {
    let meters = [
        sum_meter("tok", "properties.n", Aggregation::Sum),
        sum_meter("peak", "properties.n", Aggregation::Max),
        sum_meter("distinct", "properties.u", Aggregation::UniqueCount),
    ];
    let (url, topic) = setup(&meters).await;
    produce_in_order(
        &topic,
        &[
            event("v1", r#","properties":{"n":"100\u0030","u":1e29}"#),
            event("v2", r#","properties":{"n":7,"u":"x"}"#),
        ],
    );
    drain_within(&url, &topic, BOUND);
    assert_eq!(meter_total(&url, "tok").await, (Decimal::from(1007), 2));
    produce_in_order(&topic, &[void(r#"{"event_id":"v1","customer_id":"c"}"#)]);
    drain_within(&url, &topic, BOUND);
    assert_eq!(meter_total(&url, "tok").await, (Decimal::from(7), 1));
    assert_eq!(meter_total(&url, "peak").await.1, 1);
    assert_eq!(meter_total(&url, "distinct").await.1, 1);
    assert!(dead_letters(&url).await.is_empty());
}

/// Runs the pipeline once over the topic with more flags; returns whether it succeeded and its stderr.
fn run_pipeline(url: &str, topic: &str, extra: &[&str]) -> (bool, String) {
    let out = meterflow(url, topic)
        .args(["pipeline", "--until-caught-up", "--workers", "1"])
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn events(prefix: &str, n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| event(&format!("{prefix}{i}"), r#","value":1"#))
        .collect()
}

async fn recreate_topic(topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .create()
        .unwrap();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    admin.delete_topics(&[topic], &options).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let created = admin
            .create_topics(
                [&NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
                &options,
            )
            .await
            .unwrap();
        if created.iter().all(Result::is_ok) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "could not recreate {topic}: {created:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn finding_08_a_recreated_topic_is_refused_until_the_source_is_reset() {
    let (url, topic) = setup(&[]).await;
    produce_in_order(&topic, &events("old", 20));
    drain_within(&url, &topic, BOUND);
    assert_eq!(meter_total(&url, "t").await, (Decimal::from(20), 20));
    // Deleted and recreated: 25 new events (and two copies of old ones) at offsets 0..27.
    recreate_topic(&topic).await;
    let mut again = events("new", 25);
    again.extend(events("old", 2));
    produce_in_order(&topic, &again);
    let (ok, stderr) = run_pipeline(&url, &topic, &[]);
    assert!(!ok && stderr.contains("--reset-source"), "{stderr}");
    assert_eq!(meter_total(&url, "t").await, (Decimal::from(20), 20));
    let (ok, stderr) = run_pipeline(&url, &topic, &["--reset-source"]);
    assert!(ok, "{stderr}");
    assert_eq!(
        meter_total(&url, "t").await,
        (Decimal::from(45), 45),
        "every new event counted once, the old copies are duplicates"
    );
    let (ok, stderr) = run_pipeline(&url, &topic, &[]);
    assert!(ok, "the next start accepts the new topic: {stderr}");
}

#[tokio::test]
async fn finding_08_a_topic_truncated_below_the_stored_offsets_is_refused() {
    let (url, topic) = setup(&[]).await;
    produce_in_order(&topic, &events("a", 10));
    drain_within(&url, &topic, BOUND);
    recreate_topic(&topic).await;
    produce_in_order(&topic, &events("b", 3));
    let (ok, stderr) = run_pipeline(&url, &topic, &[]);
    assert!(!ok && stderr.contains("recreated"), "{stderr}");
}

/// A database `meterflow migrate` never ran on (or an older one) is refused at start with what to do,
/// not met later as a missing relation with a backtrace.
#[tokio::test]
async fn a_database_without_the_schema_is_refused_with_what_to_do() {
    let url = empty_database().await;
    let topic = fresh_topic(1).await;
    let (ok, stderr) = run_pipeline(&url, &topic, &[]);
    assert!(
        !ok && stderr.contains("has no meterflow schema: run `meterflow migrate` first"),
        "{stderr}"
    );
    assert!(!stderr.contains("does not exist"), "{stderr}");
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    meterflow_sinks::MIGRATOR.run(&pool).await.unwrap();
    sqlx::query(
        "DELETE FROM _sqlx_migrations WHERE version = (SELECT max(version) FROM _sqlx_migrations)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let (ok, stderr) = run_pipeline(&url, &topic, &[]);
    assert!(
        !ok && stderr.contains("run `meterflow migrate` first")
            && stderr.contains("is migrated up to"),
        "{stderr}"
    );
}

#[tokio::test]
async fn finding_09_a_second_topic_on_one_database_is_refused() {
    let (url, first) = setup(&[]).await;
    produce_in_order(&first, &events("x", 3));
    drain_within(&url, &first, BOUND);
    let second = fresh_topic(1).await;
    produce_in_order(&second, &events("x", 3));
    let (ok, stderr) = run_pipeline(&url, &second, &[]);
    assert!(
        !ok && stderr.contains("one database serves one"),
        "{stderr}"
    );
    assert_eq!(meter_total(&url, "t").await, (Decimal::from(3), 3));
}

/// Waits until the default meter `t` has counted `n` events.
async fn wait_counted(url: &str, n: i64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (_, count) = meter_total(url, "t").await;
        if count == n {
            return;
        }
        assert!(Instant::now() < deadline, "{count} of {n} events counted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn finding_18_partitions_added_while_running_are_read() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
    use rdkafka::client::DefaultClientContext;
    let (url, topic) = setup(&[]).await;
    let _pipeline = spawn_pipeline(&url, &topic, 1, &["--epoch-ms", "50"]);
    produce_in_order(&topic, &events("p0-", 5));
    wait_counted(&url, 5, BOUND).await;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .create()
        .unwrap();
    let added = admin
        .create_partitions(&[NewPartitions::new(&topic, 2)], &AdminOptions::new())
        .await
        .unwrap();
    assert!(added.iter().all(Result::is_ok), "{added:?}");
    produce_to(&topic, 1, &events("p1-", 5));
    wait_counted(&url, 10, BOUND).await;
}

/// Review finding 21 (state per distinct event type): each event type no meter reads is a default meter
/// with rows and rating state of its own, so a key varying `event_type` grew the pipeline's state
/// without end. A customer now gets at most 1000 distinct event types, over Kafka and HTTP alike.
#[tokio::test(flavor = "multi_thread")]
async fn finding_21_a_customer_gets_at_most_1000_distinct_event_types() {
    let api = spawn_api().await;
    let records: Vec<Record> = (0..1005)
        .map(|i| Record {
            payload: format!(
                r#"{{"event_id":"ty{i}","customer_id":"c","event_type":"t{i:04}","event_time":"{TIME}"}}"#
            )
            .into_bytes(),
            void: false,
        })
        .collect();
    produce_in_order(&api.topic, &records);
    drain_within(&api.url, &api.topic, Duration::from_secs(120));
    let counted = scalar_i64(
        &api.url,
        "SELECT count(*) FROM event_ids WHERE counted_partition IS NOT NULL",
    )
    .await;
    assert_eq!(counted, 1000);
    let refused = dead_letters(&api.url).await;
    assert_eq!(refused.len(), 5, "{refused:?}");
    assert!(
        refused[0].1.contains("1000 distinct event types"),
        "{refused:?}"
    );
    // Over HTTP: a 1001st type is a 422 naming the field, a known one is accepted.
    let event = |id: &str, kind: &str| serde_json::json!({"event_id": id, "customer_id": "c", "event_type": kind, "event_time": TIME});
    let (status, body) = problem(api.post_event(&event("h1", "t9999")).await).await;
    assert_eq!(status, reqwest::StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body.to_string().contains("event_type"), "{body}");
    assert_eq!(
        api.post_event(&event("h2", "t0001")).await.status(),
        reqwest::StatusCode::CREATED
    );
    // Another customer is not affected.
    let mut other = event("h3", "t9999");
    other["customer_id"] = "d".into();
    assert_eq!(
        api.post_event(&other).await.status(),
        reqwest::StatusCode::CREATED
    );
}

/// Review finding 18 (retention): records Kafka deleted before the pipeline read them were skipped
/// without a trace (`auto.offset.reset=earliest`). Now a dead letter at the first lost offset names the
/// gap, and the records after it are counted. `DeleteRecords` stands in for retention.
#[tokio::test]
async fn finding_18_records_deleted_before_they_were_read_leave_a_dead_letter() {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::{Offset, TopicPartitionList};
    let (url, topic) = setup(&[]).await;
    produce_in_order(&topic, &events("r", 10));
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .create()
        .unwrap();
    let mut before = TopicPartitionList::new();
    before
        .add_partition_offset(&topic, 0, Offset::Offset(4))
        .unwrap();
    admin
        .delete_records(&before, &AdminOptions::new())
        .await
        .unwrap();
    drain_within(&url, &topic, BOUND);
    let dead = dead_letters(&url).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, 0);
    assert!(dead[0].1.starts_with("RETENTION_GAP"), "{dead:?}");
    assert_eq!(meter_total(&url, "t").await, (Decimal::from(6), 6));
}

/// The performance gate at 06f5dd5 (p99 0.8 and 1.3 s, the API's insert at 2.2 ms a call instead of
/// 0.25 ms): `meterflow_note_event_types`, which every ingest statement calls, had its plans made while
/// `customer_event_types` was empty (a freshly vacuumed database), a sequential scan that plpgsql keeps
/// for the session, so each call read the whole table as it grew. It now goes through the key.
#[tokio::test(flavor = "multi_thread")]
async fn noting_event_types_reads_the_table_through_its_key_whatever_plan_was_cached_when_empty() {
    let url = fresh_database().await;
    let mut conn = PgConnection::connect(&url).await.unwrap();
    sqlx::query("VACUUM (ANALYZE) customer_event_types")
        .execute(&mut conn)
        .await
        .unwrap();
    // Plans made on the empty table, and kept for this session.
    for i in 0..8 {
        sqlx::query("SELECT meterflow_note_event_types(ARRAY[$1], ARRAY['t'])")
            .bind(format!("warm{i}"))
            .execute(&mut conn)
            .await
            .unwrap();
    }
    let mut other = PgConnection::connect(&url).await.unwrap();
    sqlx::query(
        "INSERT INTO customer_event_types SELECT 'c' || i, 't' FROM generate_series(1, 20000) i",
    )
    .execute(&mut other)
    .await
    .unwrap();
    let mut tx = conn.begin().await.unwrap();
    let scans =
        "SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relname = 'customer_event_types'";
    let before: i64 = sqlx::query_scalar(scans).fetch_one(&mut *tx).await.unwrap();
    sqlx::query(
        "SELECT meterflow_note_event_types(ARRAY['c1', 'c2', 'new1', 'new2'], ARRAY['t', 't', 't', 't'])",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    let after: i64 = sqlx::query_scalar(scans).fetch_one(&mut *tx).await.unwrap();
    assert_eq!(
        after - before,
        0,
        "sequential scans of customer_event_types in one call"
    );
    let added: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM customer_event_types WHERE customer_id IN ('new1', 'new2')",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(added, 2);
}
