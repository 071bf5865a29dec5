//! Scale-out and fencing on the real broker and database: a 2-process × 2-worker timely cluster gives
//! exactly the single-worker results, also across a crash and a restart with another shape; and a paused
//! (zombie) pipeline that wakes up after a newer one took over can never commit.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A timely hostfile naming two free loopback ports; removed when dropped.
struct Hostfile(std::path::PathBuf);

impl Hostfile {
    fn new() -> Self {
        let ports: Vec<u16> = (0..2)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            })
            .collect();
        let path = std::env::temp_dir().join(unique("mf_hosts"));
        std::fs::write(
            &path,
            ports
                .iter()
                .map(|p| format!("127.0.0.1:{p}\n"))
                .collect::<String>(),
        )
        .unwrap();
        Hostfile(path)
    }
}

impl Drop for Hostfile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Starts process `index` of a 2-process × 2-worker cluster.
fn cluster_process(
    url: &str,
    topic: &str,
    hosts: &std::path::Path,
    index: usize,
    extra: &[&str],
) -> Running {
    cluster_process_of(2, url, topic, hosts, index, extra)
}

/// Starts process `index` of a 2-process × `workers`-worker cluster.
fn cluster_process_of(
    workers: usize,
    url: &str,
    topic: &str,
    hosts: &std::path::Path,
    index: usize,
    extra: &[&str],
) -> Running {
    let mut command = meterflow(url, topic);
    command
        .args([
            "pipeline",
            "--workers",
            &workers.to_string(),
            "--processes",
            "2",
            "--process",
            &index.to_string(),
        ])
        .arg("--hostfile")
        .arg(hosts)
        .args(extra);
    spawn_quiet(command)
}

fn wait_success(process: &mut Running, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = process.0.try_wait().unwrap() {
            assert!(status.success(), "a cluster process failed: {status}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "a cluster process did not finish"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_two_process_cluster_gives_exactly_the_single_worker_results() {
    let topic = fresh_topic(4).await;
    let events = random_events(6_000, 21);
    produce_events(&topic, &events);

    let single = fresh_database().await;
    drain(&single, &topic, 1);

    let clustered = fresh_database().await;
    let hosts = Hostfile::new();
    let mut p1 = cluster_process(&clustered, &topic, &hosts.0, 1, &["--until-caught-up"]);
    let mut p0 = cluster_process(&clustered, &topic, &hosts.0, 0, &["--until-caught-up"]);
    wait_success(&mut p0, Duration::from_secs(120));
    wait_success(&mut p1, Duration::from_secs(30));

    let expected = reference(&events);
    assert_same(
        &stored_aggregates(&single).await,
        &expected,
        "1 process × 1 worker",
    );
    assert_same(
        &stored_aggregates(&clustered).await,
        &expected,
        "2 processes × 2 workers",
    );
    for url in [&single, &clustered] {
        assert_eq!(
            scalar_i64(url, "SELECT count(*) FROM dead_letters").await,
            invalid_count(&events)
        );
    }
}

/// The committed watermark reaches every process: an event late for a window the watermark closed is
/// a late event whichever process reads its partition. (It was a shared atomic that only the writer's
/// process saw move, so process 1's partitions recorded no late events; now worker 0 feeds it to every
/// worker as the dataflow's control input.)
#[tokio::test(flavor = "multi_thread")]
async fn late_events_are_told_on_every_process_of_a_cluster() {
    let api = spawn_api().await; // its topic has 2 partitions: one per process below
    let hosts = Hostfile::new();
    let _p1 = cluster_process_of(1, &api.url, &api.topic, &hosts.0, 1, &[]);
    let _p0 = cluster_process_of(1, &api.url, &api.topic, &hosts.0, 0, &[]);
    // Close 14:00–15:00 (and its hour of allowed lateness) before the events arrive.
    api.advance_watermark("2024-01-15T16:00:01Z", Duration::from_secs(60))
        .await;
    for i in 0..20 {
        let body = serde_json::json!({"event_id": format!("evt_late_{i}"),
            "customer_id": format!("cust_{i}"), "event_type": "api_call",
            "event_time": "2024-01-15T14:30:00Z"});
        assert_eq!(api.post_event(&body).await.status().as_u16(), 201);
    }
    api.wait_caught_up(Duration::from_secs(60)).await;
    let by_partition: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT COALESCE(i.counted_partition, -1), count(*) FROM late_events l \
         JOIN event_ids i USING (event_id) GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&api.pool)
    .await
    .unwrap();
    let total: i64 = by_partition.iter().map(|(_, n)| n).sum();
    assert_eq!(total, 20, "every late event is told: {by_partition:?}");
    assert_eq!(
        by_partition.len(),
        2,
        "both partitions had some: {by_partition:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashed_cluster_restarted_with_another_shape_changes_nothing() {
    let topic = fresh_topic(4).await;
    let url = fresh_database().await;
    let events = random_events(60_000, 23);
    let total = events.len() as i64;
    let producer = produce_in_waves(&topic, &events, 4_000);
    let hosts = Hostfile::new();
    let mut p1 = cluster_process(&url, &topic, &hosts.0, 1, &["--epoch-ms", "20"]);
    let mut p0 = cluster_process(&url, &topic, &hosts.0, 0, &["--epoch-ms", "20"]);
    wait_until_committed(&url, total / 10, Duration::from_secs(120), "the cluster").await;
    p0.kill(); // kill -9, both processes
    p1.kill();
    let at_crash = committed(&url).await;
    producer.join().unwrap();
    assert!(
        at_crash < total,
        "the crash must land mid-stream ({at_crash} of {total})"
    );

    drain(&url, &topic, 3); // one process, three workers
    assert_same(
        &stored_aggregates(&url).await,
        &reference(&events),
        "after a crash and a restart as 1 × 3",
    );
    assert_eq!(
        scalar_i64(&url, "SELECT count(*) FROM dead_letters").await,
        invalid_count(&events)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_zombie_pipeline_that_wakes_up_cannot_commit() {
    let topic = fresh_topic(2).await;
    let url = fresh_database().await;
    let events = random_events(4_000, 29);
    let (first, second) = events.split_at(2_000);
    produce_events(&topic, first);

    // A runs and commits the first half, then is paused (SIGSTOP).
    let zombie = meterflow(&url, &topic)
        .args(["pipeline", "--epoch-ms", "20"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut zombie = Running(zombie);
    wait_until_committed(
        &url,
        first.len() as i64,
        Duration::from_secs(60),
        "the first pipeline",
    )
    .await;
    let pid = zombie.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());

    // B takes over and commits the second half.
    produce_events(&topic, second);
    let _successor = spawn_pipeline(&url, &topic, 1, &["--epoch-ms", "20"]);
    wait_until_committed(
        &url,
        events.len() as i64,
        Duration::from_secs(60),
        "the second pipeline",
    )
    .await;

    // A wakes up with the second half still to commit: its commit is refused and it stops.
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = zombie.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the zombie neither committed nor stopped"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "the zombie must stop");
    let mut stderr = String::new();
    std::io::Read::read_to_string(zombie.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains("took over"),
        "the zombie says why it stopped: {stderr}"
    );

    assert_same(
        &stored_aggregates(&url).await,
        &reference(&events),
        "after the zombie woke up",
    );
}

/// Review finding 7: a process other than the leader read the committed offsets when it started, before
/// the new leader held the lease, so the old leader's last commits could overtake them and that
/// process's readers counted those records again. Here process 1 starts first and waits for the cluster;
/// meanwhile another pipeline (the old leader, finishing) commits the whole topic; then process 0 starts.
#[tokio::test]
async fn finding_07_a_non_leader_reads_offsets_only_once_the_leader_holds_the_lease() {
    let url = fresh_database().await;
    let topic = fresh_topic(4).await;
    let events = random_events(400, 7);
    produce_events(&topic, &events);
    let hosts = Hostfile::new();
    let mut second = cluster_process(&url, &topic, &hosts.0, 1, &["--until-caught-up"]);
    std::thread::sleep(Duration::from_secs(3));
    drain(&url, &topic, 1);
    let mut first = cluster_process(&url, &topic, &hosts.0, 0, &["--until-caught-up"]);
    wait_success(&mut first, Duration::from_secs(120));
    wait_success(&mut second, Duration::from_secs(120));
    assert_same(
        &stored_aggregates(&url).await,
        &reference(&events),
        "nothing counted twice",
    );
}

/// Meters and price books reach every process of a cluster, and a period is rated alike wherever it
/// lands. Both are broadcast to the workers, and timely encodes what crosses processes with bincode,
/// which cannot read back a struct that skipped a field when serializing: a meter without a
/// `value_property` (a count) and a book without a selector or entries did that, and process 1 died
/// decoding them (review of issue 15's rating operator).
#[tokio::test(flavor = "multi_thread")]
async fn meters_and_price_books_reach_every_process_and_charges_match_one_worker() {
    let topic = fresh_topic(4).await;
    let events = random_events(3_000, 23);
    produce_events(&topic, &events);
    let meters = meters_file(
        r#"[{"meter":"calls","event_type":"api_call","aggregation":"count","window":"hour"}]"#,
    );
    let meters = meters.to_str().unwrap();
    let graduated = serde_json::json!({"type": "graduated", "tiers": [
        {"up_to": "10", "unit_price": "1.00", "flat_fee": "0"},
        {"up_to": null, "unit_price": "0.50", "flat_fee": "0"}]});
    let with_books = || async {
        let url = fresh_database().await;
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        for (id, meter) in [("calls_book", "calls"), ("tokens_book", "tokens")] {
            insert_price_book(&pool, id, meter, None, "2024-01-01", &graduated).await;
        }
        url
    };
    let charges = |url: String| async move {
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        let rows: Vec<(String, String, i64, String, String)> = sqlx::query_as(
            "SELECT customer_id, meter, extract(epoch FROM window_start)::bigint,
                    amount::text, quantity::text
             FROM charges ORDER BY 1, 2, 3",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        rows
    };

    let single = with_books().await;
    drain_with(&single, &topic, 1, &["--meters", meters]);
    let clustered = with_books().await;
    let hosts = Hostfile::new();
    let args = ["--until-caught-up", "--meters", meters];
    let mut p1 = cluster_process(&clustered, &topic, &hosts.0, 1, &args);
    let mut p0 = cluster_process(&clustered, &topic, &hosts.0, 0, &args);
    wait_success(&mut p0, Duration::from_secs(120));
    wait_success(&mut p1, Duration::from_secs(30));

    let expected = charges(single).await;
    assert!(
        expected.iter().any(|c| c.1 == "calls") && expected.iter().any(|c| c.1 == "tokens"),
        "both books price windows on one worker"
    );
    assert_eq!(
        charges(clustered).await,
        expected,
        "2 processes × 2 workers rate as 1 worker"
    );
}
