//! Hostile input against the pipeline and its sink (issue 13, red-team review of b156429), on the real
//! broker and database: each test provokes one finding and checks that the pipeline stays up, that
//! nothing is lost and that the failure is visible where it belongs.
//!
//! Length: one test per red-team finding, each readable on its own; shared helpers are in
//! `tests/common`.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use rust_decimal::Decimal;
use serde_json::json;
use sqlx::{Connection, PgConnection};

/// 2024-01-15T10:00:00Z: an hourly window of January's billing period.
const W: i64 = 1_705_312_800;
const HOUR: i64 = 3_600;

fn rfc3339(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0).unwrap().to_rfc3339()
}

fn event(id: &str, customer: &str, time: i64, value: &str) -> (String, Vec<u8>) {
    let body = json!({"event_id": id, "customer_id": customer, "event_type": "api_call",
                      "event_time": rfc3339(time + 60), "value": value});
    (customer.to_owned(), body.to_string().into_bytes())
}

/// Runs the pipeline until it has committed everything in the topic; fails the test when it exits
/// with an error or has not finished within `within`.
fn drain_within(url: &str, topic: &str, within: Duration, extra: &[&str]) {
    drain_with_env(url, topic, within, extra, &[]);
}

/// [`drain_within`] with more environment variables; returns what the pipeline wrote to stderr.
fn drain_with_env(
    url: &str,
    topic: &str,
    within: Duration,
    extra: &[&str],
    env: &[(&str, &str)],
) -> String {
    let mut child = meterflow(url, topic)
        .args(["pipeline", "--until-caught-up", "--workers", "1"])
        .args(extra)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut stderr);
            }
            assert!(status.success(), "the pipeline failed: {stderr}");
            return stderr;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the pipeline did not catch up within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn connect(url: &str) -> PgConnection {
    PgConnection::connect(url).await.unwrap()
}

async fn default_book(conn: &mut PgConnection, price: &str) {
    let model = json!({"type": "per_unit", "unit_price": price});
    insert_price_book(
        &mut *conn,
        "pb_default",
        "api_call",
        None,
        "2024-01-01T00:00:00Z",
        &model,
    )
    .await;
}

/// (value, event_count, quarantined) of a row of the default meter `api_call`.
async fn row(conn: &mut PgConnection, customer: &str, start: i64) -> (Decimal, i64, bool) {
    sqlx::query_as(
        "SELECT value, event_count, quarantined FROM aggregations
         WHERE customer_id = $1 AND meter = 'api_call' AND window_start = to_timestamp($2)",
    )
    .bind(customer)
    .bind(start)
    .fetch_one(&mut *conn)
    .await
    .unwrap()
}

/// Window start → amount of a customer's charges.
async fn charges(conn: &mut PgConnection, customer: &str) -> Vec<(i64, Decimal)> {
    let rows: Vec<(i64, Decimal)> = sqlx::query_as(
        "SELECT extract(epoch FROM window_start)::bigint, amount FROM charges
         WHERE customer_id = $1 ORDER BY window_start",
    )
    .bind(customer)
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    rows.into_iter().map(|(w, a)| (w, a.normalize())).collect()
}

/// Finding 3 (and 17's mechanism): a window's usage leaves the 96-bit decimal range. It used to panic
/// a worker, and every restart replayed the same records into the same panic: billing stopped for
/// every customer, for good. Now the row is quarantined (value frozen, count going on), the period is
/// in `rating_quarantine` from that window on, the earlier window keeps its charge, another customer is
/// counted and charged, and a restart runs as well.
#[tokio::test(flavor = "multi_thread")]
async fn finding_03_a_window_whose_usage_overflows_is_quarantined_and_billing_goes_on() {
    let url = fresh_database().await;
    let topic = fresh_topic(1).await;
    let mut conn = connect(&url).await;
    default_book(&mut conn, "1").await;
    // What an earlier run committed: a window holding nearly the whole decimal range.
    let near_max = Decimal::MAX - Decimal::from(100);
    sqlx::query(
        "INSERT INTO aggregations (customer_id, meter, window_start, window_end, value, event_count)
         VALUES ('a', 'api_call', to_timestamp($1), to_timestamp($1 + 3600), $2, 1)",
    )
    .bind(W)
    .bind(near_max)
    .execute(&mut conn)
    .await
    .unwrap();
    produce(
        &topic,
        &[
            event("a-early", "a", W - HOUR, "10"),
            event("a-over", "a", W, "1000"),
            event("b-1", "b", W, "5"),
        ],
    );
    drain_within(&url, &topic, Duration::from_secs(60), &[]);

    assert_eq!(
        row(&mut conn, "a", W).await,
        (near_max, 2, true),
        "the overflowing row is quarantined, its value frozen"
    );
    assert_eq!(row(&mut conn, "b", W).await, (Decimal::from(5), 1, false));
    assert_eq!(
        charges(&mut conn, "a").await,
        vec![(W - HOUR, Decimal::from(10))],
        "the window before the overflow keeps its charge"
    );
    assert_eq!(charges(&mut conn, "b").await, vec![(W, Decimal::from(5))]);
    let quarantine: Vec<(String, i64, String)> = sqlx::query_as(
        "SELECT customer_id, extract(epoch FROM from_window)::bigint, reason FROM rating_quarantine",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(quarantine, vec![("a".into(), W, "usage_overflow".into())]);

    // A restart resumes (no crash loop), keeps the quarantine, and counts what comes next.
    produce(&topic, &[event("b-2", "b", W, "7")]);
    drain_within(&url, &topic, Duration::from_secs(60), &[]);
    assert_eq!(row(&mut conn, "b", W).await, (Decimal::from(12), 2, false));
    assert_eq!(row(&mut conn, "a", W).await, (near_max, 2, true));
    assert_eq!(
        scalar_i64(&url, "SELECT count(*) FROM rating_quarantine").await,
        1
    );

    // The way out: a re-rating job recomputes the window from its events (only `a-over` is one; the
    // near-full row was planted), which ends the row's quarantine; the pipeline then rates the period
    // again and the period leaves quarantine.
    let scope = meterflow_sinks::rerating::Scope {
        customer_ids: vec!["a".into()],
        from_micros: W * 1_000_000,
        to_micros: (W + HOUR) * 1_000_000,
    };
    let lease = lease_of(&url, &topic).await;
    meterflow_sinks::rerating::rerate(&mut conn, &scope, &lease)
        .await
        .unwrap();
    assert_eq!(
        row(&mut conn, "a", W).await,
        (Decimal::from(1000), 1, false)
    );
    drain_within(&url, &topic, Duration::from_secs(60), &[]);
    assert_eq!(
        scalar_i64(&url, "SELECT count(*) FROM rating_quarantine").await,
        0
    );
    assert_eq!(
        charges(&mut conn, "a").await,
        vec![(W - HOUR, Decimal::from(10)), (W, Decimal::from(1000))]
    );
}

/// Finding 22: re-rating summed charge amounts with `.sum()` and `+=`, which panic when the sum leaves
/// the decimal range (and a panic killed the API's job runner). Now the job fails with an error.
#[tokio::test(flavor = "multi_thread")]
async fn finding_22_a_rerating_job_whose_amounts_overflow_fails_with_an_error_not_a_panic() {
    let url = fresh_database().await;
    let mut conn = connect(&url).await;
    let huge = Decimal::MAX / Decimal::from(2) + Decimal::ONE;
    for start in [W, W + HOUR] {
        sqlx::query(
            "INSERT INTO aggregations (customer_id, meter, window_start, window_end, value, event_count)
             VALUES ('c', 'api_call', to_timestamp($1), to_timestamp($1 + 3600), 1, 1)",
        )
        .bind(start)
        .execute(&mut conn)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO charges (customer_id, meter, window_start, window_end, quantity, amount, currency,
                                  price_book_id)
             VALUES ('c', 'api_call', to_timestamp($1), to_timestamp($1 + 3600), 1, $2, 'USD', 'pb')",
        )
        .bind(start)
        .bind(huge)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let scope = meterflow_sinks::rerating::Scope {
        customer_ids: vec!["c".into()],
        from_micros: W * 1_000_000,
        to_micros: (W + 2 * HOUR) * 1_000_000,
    };
    // The job runs as a pipeline's leader (no pipeline runs here).
    let lease = meterflow_sinks::acquire_lease(&mut conn, "t")
        .await
        .unwrap();
    let job = tokio::spawn(async move {
        let mut conn = connect(&url).await;
        meterflow_sinks::rerating::rerate(&mut conn, &scope, &lease).await
    })
    .await;
    let outcome = job.expect("the re-rating job does not panic");
    assert!(
        outcome.is_err(),
        "Σ charges past the decimal range is an error: {outcome:?}"
    );
}

/// Finding 5 (DATA LOSS): every run's dataflow starts at epoch 0 and taking the lease reset the
/// committed epoch to 0, so after a transient failure of the run's first commit the writer asked
/// "is epoch 0 committed?", read `0 >= 0`, and acknowledged the batch without committing it; later
/// epochs stored offsets past its records. Now an epoch counts as committed only when a commit of this
/// generation stored it.
#[tokio::test(flavor = "multi_thread")]
async fn finding_05_a_transient_failure_of_the_first_commit_loses_nothing() {
    let url = fresh_database().await;
    let topic = fresh_topic(1).await;
    let records: Vec<(String, Vec<u8>)> = (0..600)
        .map(|i| {
            event(
                &format!("e{i}"),
                &format!("c{}", i % 3),
                W + (i % 4) * HOUR,
                "1",
            )
        })
        .collect();
    produce(&topic, &records);
    let log = drain_with_env(
        &url,
        &topic,
        Duration::from_secs(60),
        // A long first epoch: every record is read into epoch 0.
        &["--epoch-ms", "3000"],
        &[("MF_FAILPOINT", "error_before_commit:1")],
    );
    assert!(
        log.contains("failpoint error_before_commit"),
        "the first commit failed once: {log}"
    );
    assert_eq!(
        committed(&url).await,
        600,
        "every record's offset is stored"
    );
    assert_eq!(
        scalar_i64(
            &url,
            "SELECT coalesce(sum(event_count), 0)::bigint FROM aggregations"
        )
        .await,
        600,
        "every record stored as read is counted"
    );
}

/// (amount of the charge, value of the row) of customer `c`'s window W, once both are `want` or
/// `within` has passed.
async fn settled_charge(url: &str, want: u32, within: Duration) -> (Decimal, Decimal) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let mut conn = connect(url).await;
        let got: Option<(Decimal, Decimal)> = sqlx::query_as(
            "SELECT c.amount, a.value FROM charges c JOIN aggregations a USING (customer_id, meter, window_start)
             WHERE c.customer_id = 'c' AND c.window_start = to_timestamp($1)",
        )
        .bind(W)
        .fetch_optional(&mut conn)
        .await
        .unwrap();
        if let Some((amount, value)) = got {
            let want = Decimal::from(want);
            if (amount == want && value == want) || std::time::Instant::now() > deadline {
                return (amount.normalize(), value.normalize());
            }
        }
        assert!(std::time::Instant::now() < deadline, "no charge for c");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Finding 13a: the pipeline loaded its rating state in one snapshot and read `resync_requested`
/// afterwards, so a re-rating job committing in between was counted as loaded, and the pipeline rated
/// on the stale state. Jobs now run in the leader, after its load, and only under its lease: the job of
/// a leader fenced by a starting one changes nothing, even while the new leader's load is under way
/// (held up here by a lock on `charges`, read after the snapshot is taken).
#[tokio::test(flavor = "multi_thread")]
async fn finding_13a_a_rerating_that_commits_during_the_state_load_is_not_lost() {
    let url = fresh_database().await;
    let topic = fresh_topic(1).await;
    let mut conn = connect(&url).await;
    default_book(&mut conn, "1").await;
    produce(&topic, &[event("c-1", "c", W, "10")]);
    drain_within(&url, &topic, Duration::from_secs(60), &[]);
    assert_eq!(
        settled_charge(&url, 10, Duration::from_secs(5)).await,
        (Decimal::from(10), Decimal::from(10))
    );
    let generation: i64 =
        sqlx::query_scalar("SELECT generation FROM pipeline_leases WHERE topic = $1")
            .bind(&topic)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    let fenced = meterflow_sinks::Lease {
        topic: topic.clone(),
        generation,
    };
    // The stored row disagrees with its events: what a job would correct.
    sqlx::query(
        "UPDATE aggregations SET value = 20 WHERE customer_id = 'c' AND window_start = to_timestamp($1)",
    )
    .bind(W)
    .execute(&mut conn)
    .await
    .unwrap();

    // Hold the state load up after its snapshot.
    let mut locker = connect(&url).await;
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("LOCK TABLE charges IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .unwrap();
    let _pipeline = spawn_pipeline(&url, &topic, 1, &["--epoch-ms", "50"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let waiting = scalar_i64(
            &url,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%FROM charges%'",
        )
        .await;
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the pipeline never reached the charges of its state load"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The fenced leader's job, meanwhile: it must not commit.
    let scope = meterflow_sinks::rerating::Scope {
        customer_ids: vec!["c".into()],
        from_micros: W * 1_000_000,
        to_micros: (W + 3600) * 1_000_000,
    };
    // It returns at once, having changed nothing (an unfenced job would wait here for `charges`).
    let ran = tokio::time::timeout(
        Duration::from_secs(20),
        meterflow_sinks::rerating::rerate(&mut conn, &scope, &fenced),
    )
    .await
    .expect("a fenced leader's job returns without waiting on the new leader's load")
    .unwrap();
    assert!(ran.is_none(), "a fenced leader's job changed the state");
    sqlx::query("COMMIT").execute(&mut locker).await.unwrap();

    // New usage in the window: the charge follows the stored row (20 + 1) the pipeline loaded.
    produce(&topic, &[event("c-2", "c", W, "1")]);
    assert_eq!(
        settled_charge(&url, 21, Duration::from_secs(20)).await,
        (Decimal::from(21), Decimal::from(21)),
        "the window's charge follows its stored usage"
    );
}

/// The topic's lease as its pipeline holds it now (a job run by hand runs as that pipeline's leader).
async fn lease_of(url: &str, topic: &str) -> meterflow_sinks::Lease {
    let generation: i64 =
        sqlx::query_scalar("SELECT generation FROM pipeline_leases WHERE topic = $1")
            .bind(topic)
            .fetch_one(&mut connect(url).await)
            .await
            .unwrap();
    meterflow_sinks::Lease {
        topic: topic.to_owned(),
        generation,
    }
}

fn meter(name: &str, event_type: &str, aggregation: &str) -> meterflow_model::Meter {
    let property = (aggregation != "count").then_some("value");
    serde_json::from_value(json!({"meter": name, "event_type": event_type,
        "aggregation": aggregation, "value_property": property}))
    .unwrap()
}

/// Finding 15a: a meter may not take the name of an event type that has history under its default
/// meter (it would reinterpret those rows, and the next restart withdrew their charges), nor the
/// name of the event type another meter reads.
#[tokio::test(flavor = "multi_thread")]
async fn finding_15a_a_meter_named_after_an_event_type_in_use_is_refused() {
    use meterflow_store::meters::{create_meter, MeterCreated};
    let url = fresh_database().await;
    let topic = fresh_topic(1).await;
    produce(
        &topic,
        &[(
            "c".into(),
            json!({"event_id": "g1", "customer_id": "c", "event_type": "gs",
                   "event_time": rfc3339(W), "value": "3"})
            .to_string()
            .into_bytes(),
        )],
    );
    drain_within(&url, &topic, Duration::from_secs(60), &[]);
    let mut conn = connect(&url).await;
    let outcome = create_meter(&mut conn, &meter("gs", "gs", "max"))
        .await
        .unwrap();
    assert!(
        matches!(outcome, MeterCreated::Collides(_)),
        "gs has history under its default meter: {outcome:?}"
    );
    assert_eq!(
        create_meter(&mut conn, &meter("calls", "api_call", "count"))
            .await
            .unwrap(),
        MeterCreated::Created
    );
    let outcome = create_meter(&mut conn, &meter("api_call", "other", "sum"))
        .await
        .unwrap();
    assert!(
        matches!(outcome, MeterCreated::Collides(_)),
        "api_call is the type meter calls reads: {outcome:?}"
    );
    // A meter named after the type it reads itself, with no history, is fine; so is re-creating one.
    assert_eq!(
        create_meter(&mut conn, &meter("tokens", "tokens", "sum"))
            .await
            .unwrap(),
        MeterCreated::Created
    );
    assert_eq!(
        create_meter(&mut conn, &meter("calls", "api_call", "count"))
            .await
            .unwrap(),
        MeterCreated::Identical
    );
}

/// Finding 15b: an event whose type is the name of a meter that reads another type went to its
/// default meter, named like that meter, and so added its value into the meter's rows.
#[tokio::test(flavor = "multi_thread")]
async fn finding_15b_an_event_typed_like_a_meter_name_does_not_add_into_that_meter() {
    let url = fresh_database().await;
    let topic = fresh_topic(1).await;
    let mut conn = connect(&url).await;
    meterflow_store::meters::create_meter(&mut conn, &meter("api_calls", "api_call", "count"))
        .await
        .unwrap();
    produce(
        &topic,
        &[
            event("a1", "c", W, "1"),
            (
                "c".into(),
                json!({"event_id": "forged", "customer_id": "c", "event_type": "api_calls",
                       "event_time": rfc3339(W), "value": "1000"})
                .to_string()
                .into_bytes(),
            ),
        ],
    );
    drain_within(&url, &topic, Duration::from_secs(60), &[]);
    let rows: Vec<(String, Decimal, i64)> = sqlx::query_as(
        "SELECT meter, value, event_count FROM aggregations WHERE customer_id = 'c' ORDER BY meter",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        rows.iter()
            .filter(|r| r.0 == "api_calls")
            .map(|r| (r.1.normalize(), r.2))
            .collect::<Vec<_>>(),
        vec![(Decimal::ONE, 1)],
        "only api_call events count into meter api_calls: {rows:?}"
    );
}

/// Finding 10: the age limit was checked twice, by the API against the watermark it knew and by the
/// reader against the watermark at read time. Between the two the watermark can move (consumer lag, a
/// backfill, an admin's floor), and an event answered 201 became a dead letter "older than the
/// retention horizon". The API's decision now stands: its records say it accepted them.
#[tokio::test(flavor = "multi_thread")]
async fn finding_10_an_event_answered_201_is_never_dead_lettered_as_too_old() {
    let api = spawn_api().await;
    let e = json!({"event_id": "accepted-then-old", "customer_id": "c", "event_type": "api_call",
                   "event_time": rfc3339(W), "value": "2"});
    assert_eq!(
        api.post_event(&e).await.status(),
        reqwest::StatusCode::CREATED
    );
    // Before the pipeline reads it, the committed watermark moves 40 days past its time.
    sqlx::query(
        "INSERT INTO pipeline_leases (topic, generation, committed_epoch, committed_watermark)
         VALUES ($1, 0, 0, to_timestamp($2))",
    )
    .bind(&api.topic)
    .bind(W + 40 * 86_400)
    .execute(&api.pool)
    .await
    .unwrap();
    drain_within(&api.url, &api.topic, Duration::from_secs(60), &[]);
    let dead: Vec<(String,)> = sqlx::query_as("SELECT reason FROM dead_letters")
        .fetch_all(&api.pool)
        .await
        .unwrap();
    assert!(dead.is_empty(), "{dead:?}");
    let mut conn = connect(&api.url).await;
    assert_eq!(
        row(&mut conn, "c", W).await,
        (Decimal::from(2), 1, false),
        "the accepted event is counted"
    );
}

/// Finding 19: "in the future" is judged against the record's timestamp, which the producer sets, and
/// the watermark follows the greatest event time read: one record with a forged timestamp moved the
/// watermark (monotone, so for good) far past the clock, finalizing windows early and making every later
/// event too old. The watermark now trusts event times only up to the reader's clock plus the
/// tolerance for the future (5 minutes).
#[tokio::test(flavor = "multi_thread")]
async fn finding_19_a_forged_record_timestamp_does_not_move_the_watermark_past_the_clock() {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    let url = fresh_database().await;
    let topic = fresh_topic(1).await;
    let now = chrono::Utc::now().timestamp();
    let body = json!({"event_id": "forged", "customer_id": "c", "event_type": "api_call",
                      "event_time": rfc3339(now + 59 * 60), "value": "1"})
    .to_string();
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .create()
        .unwrap();
    producer
        .send(
            BaseRecord::to(&topic)
                .key("c")
                .payload(body.as_bytes())
                .timestamp((now + 55 * 60) * 1000),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    producer.flush(Duration::from_secs(10)).unwrap();
    drain_within(&url, &topic, Duration::from_secs(60), &[]);
    let watermark: Option<i64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM committed_watermark)::bigint FROM pipeline_leases",
    )
    .fetch_one(&mut connect(&url).await)
    .await
    .unwrap();
    let bound = chrono::Utc::now().timestamp() + 5 * 60;
    assert!(
        watermark.is_some_and(|w| w <= bound),
        "the watermark {watermark:?} stays within the clock plus 5 minutes ({bound})"
    );
}

/// Finding 23: a re-rating job held every pipeline lease row (`FOR UPDATE`) for its whole
/// recomputation, so a long job stopped every epoch commit, i.e. all ingestion. Now it reads and
/// recomputes from a snapshot without the lease and holds it only to apply its corrections. Here the
/// job is held up in its reading (a lock on `meters`) while events keep coming.
#[tokio::test(flavor = "multi_thread")]
async fn finding_23_the_pipeline_commits_while_a_rerating_job_recomputes() {
    let url = fresh_database().await;
    let topic = fresh_topic(1).await;
    let _pipeline = spawn_pipeline(&url, &topic, 1, &["--epoch-ms", "50"]);
    let first: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| event(&format!("a{i}"), "c", W, "1"))
        .collect();
    produce(&topic, &first);
    wait_until_committed(&url, 20, Duration::from_secs(30), "the pipeline").await;

    let mut locker = connect(&url).await;
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("LOCK TABLE meters IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .unwrap();
    let job_url = url.clone();
    let lease = lease_of(&url, &topic).await;
    let job = tokio::spawn(async move {
        let mut conn = connect(&job_url).await;
        let scope = meterflow_sinks::rerating::Scope {
            customer_ids: vec!["c".into()],
            from_micros: W * 1_000_000,
            to_micros: (W + HOUR) * 1_000_000,
        };
        meterflow_sinks::rerating::rerate(&mut conn, &scope, &lease).await
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while scalar_i64(
        &url,
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%FROM meters%'
           AND query NOT LIKE '%pg_stat_activity%'",
    )
    .await
        == 0
    {
        assert!(std::time::Instant::now() < deadline, "the job never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // While the job is held up, events are still committed.
    let second: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| event(&format!("b{i}"), "c", W, "1"))
        .collect();
    produce(&topic, &second);
    wait_until_committed(
        &url,
        40,
        Duration::from_secs(10),
        "the pipeline during a re-rating job",
    )
    .await;
    sqlx::query("COMMIT").execute(&mut locker).await.unwrap();
    let (outcome, _) = job.await.unwrap().unwrap().expect("the pipeline's lease");
    assert_eq!(outcome.windows_changed, 0, "nothing was wrong: {outcome:?}");
    let mut conn = connect(&url).await;
    assert_eq!(row(&mut conn, "c", W).await, (Decimal::from(40), 40, false));
}

/// Finding 3, on the API: a quarantined window says so in `GET /api/v1/aggregations`.
#[tokio::test(flavor = "multi_thread")]
async fn finding_03_a_quarantined_window_is_marked_on_the_api() {
    let api = spawn_api().await;
    for (customer, quarantined) in [("q", true), ("ok", false)] {
        sqlx::query(
            "INSERT INTO aggregations (customer_id, meter, window_start, window_end, value, event_count,
                                       quarantined)
             VALUES ($1, 'api_call', to_timestamp($2), to_timestamp($2 + 3600), 5, 1, $3)",
        )
        .bind(customer)
        .bind(W)
        .bind(quarantined)
        .execute(&api.pool)
        .await
        .unwrap();
    }
    let page = api.get_json("/api/v1/aggregations?meter=api_call").await;
    let flags: Vec<(String, serde_json::Value)> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["customer_id"].as_str().unwrap().to_owned(),
                r["quarantined"].clone(),
            )
        })
        .collect();
    assert_eq!(
        flags,
        vec![
            ("ok".into(), serde_json::Value::Null),
            ("q".into(), serde_json::Value::Bool(true))
        ]
    );
}

/// Findings 3 and 17, on invoices: a period in rating quarantine is billed only up to its quarantined
/// window, so issuing its invoice is refused (409 PERIOD_QUARANTINED) until the usage is corrected.
#[tokio::test(flavor = "multi_thread")]
async fn finding_17_a_quarantined_period_is_not_invoiced() {
    let api = spawn_api().await;
    let response = api
        .post_json(
            "/api/v1/customers",
            &json!({"customer_id": "q", "name": "Q", "currency": "USD"}),
        )
        .await;
    assert_eq!(response.status(), reqwest::StatusCode::CREATED);
    sqlx::query(
        "INSERT INTO rating_quarantine (customer_id, meter, period_start, from_window, reason)
         VALUES ('q', 'api_call', '2024-01-01T00:00:00Z', to_timestamp($1), 'usage_overflow')",
    )
    .bind(W)
    .execute(&api.pool)
    .await
    .unwrap();
    let response = api
        .post_json(
            "/api/v1/invoices",
            &json!({"customer_id": "q", "period_start": "2024-01-01T00:00:00Z",
                    "period_end": "2024-01-31T23:59:59.999Z"}),
        )
        .await;
    expect_problem(
        response,
        reqwest::StatusCode::CONFLICT,
        "PERIOD_QUARANTINED",
    )
    .await;
}

/// Finding 2's crash loop, in the sink: a retraction that meets no stored item (a void taking back what
/// was never added) made `meter_values` break its non-negative CHECK, a permanent error that stopped the
/// pipeline at every restart. The sink now drops such a retraction; the row shows its stored items.
#[tokio::test(flavor = "multi_thread")]
async fn finding_02_a_retraction_of_an_item_never_stored_does_not_stop_the_sink() {
    use meterflow_model::{Aggregate, AggregateKey, EpochBatch, Item, PartitionProgress};
    let url = fresh_database().await;
    let mut conn = connect(&url).await;
    let lease = meterflow_sinks::acquire_lease(&mut conn, "t")
        .await
        .unwrap();
    let (batches, batch_rx) = crossbeam_channel::bounded(4);
    let (ack_tx, acks) = crossbeam_channel::unbounded();
    let writer = meterflow_sinks::spawn_writer(
        tokio::runtime::Handle::current(),
        url.clone(),
        lease,
        batch_rx,
        ack_tx,
        std::sync::Arc::new(std::sync::atomic::AtomicI64::new(i64::MIN)),
    )
    .unwrap();
    let key = AggregateKey {
        dimensions: Default::default(),
        customer_id: "c".into(),
        meter: "peak".into(),
        window_start: W,
        window_end: W + HOUR,
    };
    let change = |item: &str, n: i64| {
        (
            key.clone(),
            Some(Item::Max(item.parse().unwrap())),
            Aggregate {
                value: Decimal::ZERO,
                event_count: n,
            },
        )
    };
    batches
        .send(EpochBatch {
            epoch: 0,
            aggregates: vec![change("7", 1), change("99", -1)],
            offsets: vec![PartitionProgress {
                partition: 0,
                next_offset: 2,
                max_event_time_micros: None,
            }],
            ..EpochBatch::default()
        })
        .unwrap();
    drop(batches);
    let outcome = tokio::task::spawn_blocking(move || writer.join().unwrap())
        .await
        .unwrap();
    assert!(outcome.is_ok(), "the sink goes on: {outcome:?}");
    assert_eq!(acks.try_recv().ok(), Some(0));
    assert_eq!(row_of(&mut conn, "peak").await, (Decimal::from(7), 1));
    assert_eq!(committed(&url).await, 2);
}

async fn row_of(conn: &mut PgConnection, meter: &str) -> (Decimal, i64) {
    let (value, count): (Decimal, i64) = sqlx::query_as(
        "SELECT value, event_count FROM aggregations WHERE customer_id = 'c' AND meter = $1",
    )
    .bind(meter)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    (value.normalize(), count)
}
