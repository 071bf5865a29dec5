//! Graceful shutdown on SIGTERM, of the real `meterflow api` and `meterflow pipeline` processes on the
//! real services: the API stops accepting, answers what is in flight, stores and forwards every event it
//! accepted and exits 0; the pipeline commits what it has and exits 0, and a restart goes on from there
//! with nothing lost or counted twice.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);

#[derive(Debug)]
enum Outcome {
    Status(u16),
    /// No response: the connection was refused or closed.
    Failed {
        timeout: bool,
        /// Shown (through `Debug`) when the attempt should not have failed.
        #[allow(dead_code)]
        why: String,
    },
}

#[derive(Debug)]
struct Attempt {
    id: String,
    finished: Instant,
    outcome: Outcome,
}

/// Posts events one after another, each on a new connection (as many clients do), until a request gets
/// no response (the server is gone) or `stop` is set.
async fn post_until_refused(base: String, worker: usize, stop: Arc<AtomicBool>) -> Vec<Attempt> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut attempts = Vec::new();
    for i in 0.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let id = format!("sd_{worker}_{i}");
        let event = json!({"event_id": id, "customer_id": format!("http_c{worker}"),
                           "event_type": "api_call", "event_time": "2024-01-15T14:30:00Z"});
        let sent = client
            .post(format!("{base}/api/v1/events"))
            .json(&event)
            .send()
            .await;
        let finished = Instant::now();
        let outcome = match sent {
            Ok(response) => Outcome::Status(response.status().as_u16()),
            Err(e) => Outcome::Failed {
                timeout: e.is_timeout(),
                why: format!("{e:?}"),
            },
        };
        let refused = matches!(outcome, Outcome::Failed { .. });
        attempts.push(Attempt {
            id,
            finished,
            outcome,
        });
        if refused {
            break;
        }
    }
    attempts
}

/// A request whose body is only half sent, so it is in flight until [`SlowRequest::finish`].
struct SlowRequest {
    id: String,
    stream: std::net::TcpStream,
    rest: Vec<u8>,
}

impl SlowRequest {
    fn start(addr: &str, id: &str) -> SlowRequest {
        use std::io::Write;
        let body = json!({"event_id": id, "customer_id": "slow", "event_type": "api_call",
                          "event_time": "2024-01-15T14:30:00Z"})
        .to_string()
        .into_bytes();
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let head = format!(
            "POST /api/v1/events HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        let (first, rest) = body.split_at(body.len() / 2);
        stream.write_all(first).unwrap();
        stream.flush().unwrap();
        SlowRequest {
            id: id.to_owned(),
            stream,
            rest: rest.to_vec(),
        }
    }

    /// Sends the rest of the body; returns the response's status line.
    fn finish(mut self) -> String {
        use std::io::{Read, Write};
        self.stream.write_all(&self.rest).unwrap();
        let mut response = String::new();
        let _ = self.stream.read_to_string(&mut response);
        response.lines().next().unwrap_or_default().to_owned()
    }
}

async fn counted_ids(url: &str) -> BTreeSet<String> {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM event_ids WHERE counted_partition IS NOT NULL")
            .fetch_all(&pool)
            .await
            .unwrap();
    pool.close().await;
    ids.into_iter().collect()
}

/// Waits until the pipeline has committed every record of the topic.
async fn wait_all_committed(url: &str, topic: &str) {
    let records = topic_records(topic);
    wait_until_committed(url, records, WAIT, "the pipeline").await;
}

/// SIGTERM to `meterflow api` while 24 clients post events: it exits 0; every request before the signal
/// was answered 201 (none hung, none 5xx), later ones were refused; requests in flight at the signal
/// were answered; the outbox is empty (everything accepted was forwarded); and once the pipeline caught
/// up every 201 is counted exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_the_api_after_answering_what_is_in_flight_losing_nothing() {
    let url = fresh_database().await;
    let topic = fresh_topic(4).await;
    let addr = free_addr();
    let mut command = meterflow(&url, &topic);
    command.env("MF_API_ADDR", &addr).arg("api");
    let mut api = spawn_quiet(command);
    let base = format!("http://{addr}");
    wait_healthy(&base, WAIT).await;
    let _pipeline = spawn_pipeline(&url, &topic, 2, &["--epoch-ms", "50"]);

    let stop = Arc::new(AtomicBool::new(false));
    let posters: Vec<_> = (0..24)
        .map(|w| tokio::spawn(post_until_refused(base.clone(), w, stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Three requests certainly in flight at the signal: their bodies are only half sent.
    let slow: Vec<SlowRequest> = (0..3)
        .map(|i| SlowRequest::start(&addr, &format!("slow_{i}")))
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let signalled = Instant::now();
    sigterm(&api.0);
    // Once new connections are refused the shutdown has begun: only then do the slow requests go on.
    let refusing = Instant::now();
    while std::net::TcpStream::connect(&addr).is_ok() {
        assert!(
            refusing.elapsed() < Duration::from_secs(10),
            "the API still accepts connections 10 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let slow_ids: Vec<String> = slow.iter().map(|s| s.id.clone()).collect();
    let slow_answers = tokio::task::spawn_blocking(move || {
        slow.into_iter()
            .map(SlowRequest::finish)
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for answer in &slow_answers {
        assert!(
            answer.starts_with("HTTP/1.1 201"),
            "a request in flight at SIGTERM is answered: {slow_answers:?}"
        );
    }
    let status = tokio::task::spawn_blocking(move || {
        let status = wait_exit(&mut api.0, Duration::from_secs(60), "the API");
        (status, api)
    })
    .await
    .unwrap()
    .0;
    let exited = Instant::now();
    assert!(status.success(), "the API exits 0 on SIGTERM: {status:?}");
    // Every client sees the refusal at its next request; the flag is only a safety net.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut attempts = Vec::new();
    for poster in posters {
        attempts.extend(poster.await.unwrap());
    }

    let unexpected: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| match &a.outcome {
            Outcome::Status(s) => *s != 201,
            Outcome::Failed { timeout, .. } => *timeout || a.finished < signalled,
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "only 201, or no connection once the shutdown began: {:?}",
        &unexpected[..unexpected.len().min(5)]
    );
    let accepted: BTreeSet<String> = attempts
        .iter()
        .filter(|a| matches!(a.outcome, Outcome::Status(201)))
        .map(|a| a.id.clone())
        .chain(slow_ids.iter().cloned())
        .collect();
    assert!(
        accepted.len() > 50,
        "events were accepted before the signal: {}",
        accepted.len()
    );
    assert!(
        attempts
            .iter()
            .any(|a| matches!(a.outcome, Outcome::Status(201)) && a.finished > signalled),
        "requests in flight at the signal were answered"
    );
    assert!(
        attempts
            .iter()
            .all(|a| matches!(a.outcome, Outcome::Status(_))
                || a.finished <= exited + Duration::from_secs(2)),
        "refused once stopped"
    );
    assert_eq!(
        scalar_i64(&url, "SELECT count(*) FROM event_outbox").await,
        0,
        "every accepted event was forwarded to Kafka and its outbox row cleared before exiting"
    );

    wait_all_committed(&url, &topic).await;
    let counted = counted_ids(&url).await;
    let missing: Vec<&String> = accepted.difference(&counted).take(5).collect();
    assert!(
        missing.is_empty(),
        "accepted but never counted: {missing:?}"
    );
    let attempted: BTreeSet<&str> = attempts
        .iter()
        .map(|a| a.id.as_str())
        .chain(slow_ids.iter().map(String::as_str))
        .collect();
    assert!(counted.iter().all(|id| attempted.contains(id.as_str())));
    assert_eq!(
        scalar_i64(
            &url,
            "SELECT coalesce(sum(event_count), 0)::bigint FROM aggregations"
        )
        .await,
        counted.len() as i64,
        "each counted event once"
    );
}

/// SIGTERM to `meterflow pipeline` while input streams in: it commits what it has and exits 0; a
/// restart resumes from the committed offsets, and the result equals the reference with every event
/// counted once by distinct id.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_the_pipeline_cleanly_and_a_restart_loses_and_doubles_nothing() {
    let url = fresh_database().await;
    let topic = fresh_topic(4).await;
    let events = random_events(20_000, 707);
    let summary_file = std::env::temp_dir().join(format!("{}.json", unique("pipeline_summary")));
    let mut command = meterflow(&url, &topic);
    command
        .args(["pipeline", "--workers", "2", "--epoch-ms", "50"])
        .stdout(std::fs::File::create(&summary_file).unwrap())
        .stderr(std::process::Stdio::null());
    let mut pipeline = Running(command.spawn().unwrap());
    let producer = produce_in_waves(&topic, &events, 1_000);
    wait_until_committed(&url, 3_000, WAIT, "the first run").await;
    sigterm(&pipeline.0);
    let status = wait_exit(&mut pipeline.0, Duration::from_secs(60), "the pipeline");
    assert!(
        status.success(),
        "the pipeline exits 0 on SIGTERM: {status:?}"
    );
    let at_stop = committed(&url).await;
    // Its summary: everything it read was committed before it exited.
    let summary: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&summary_file)
            .unwrap()
            .lines()
            .last()
            .expect("the pipeline prints its summary on SIGTERM"),
    )
    .unwrap();
    std::fs::remove_file(&summary_file).unwrap();
    assert_eq!(
        summary["records"].as_i64(),
        Some(at_stop),
        "every record read was committed before exiting: {summary}"
    );
    producer.join().unwrap();
    let total = topic_records(&topic);
    assert_eq!(total, events.len() as i64);
    assert!(
        (3_000..total).contains(&at_stop),
        "stopped mid-stream, after committing: {at_stop} of {total}"
    );

    drain(&url, &topic, 3);
    assert_eq!(committed(&url).await, total);
    assert_same(
        &stored_aggregates(&url).await,
        &reference(&events),
        "after SIGTERM and a restart",
    );
    let counted = counted_ids(&url).await;
    let valid: BTreeSet<String> = events
        .iter()
        .filter(|e| !e.invalid)
        .map(|e| e.id.clone())
        .collect();
    assert_eq!(counted, valid, "every valid event counted, by distinct id");
    assert_eq!(
        scalar_i64(
            &url,
            "SELECT coalesce(sum(event_count), 0)::bigint FROM aggregations"
        )
        .await,
        counted.len() as i64,
        "each once"
    );
    assert_eq!(
        scalar_i64(&url, "SELECT count(*) FROM dead_letters").await,
        invalid_count(&events)
    );
}
