//! Rating end to end (issue 4) on real Kafka and Postgres: events through the API, price books in
//! Postgres, window charges committed by the pipeline — following late events, voids, price-book edits
//! and customer overrides within seconds, and surviving a restart during which a book changed.

mod common;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::{Duration, Instant};

use common::*;
use reqwest::StatusCode;
use rust_decimal::Decimal;
use serde_json::json;
use sqlx::PgPool;

const WAIT: Duration = Duration::from_secs(60);

/// Window start (RFC 3339 hour) → (amount, quantity, price_book_id, revision), normalized decimals.
type Charges = BTreeMap<String, (Decimal, Decimal, String, i32)>;

async fn charges(pool: &PgPool, customer: &str) -> Charges {
    let rows: Vec<(String, Decimal, Decimal, String, i32)> = sqlx::query_as(
        "SELECT to_char(window_start AT TIME ZONE 'UTC', 'DD HH24'), amount, quantity, price_book_id, revision
         FROM charges WHERE customer_id = $1 ORDER BY window_start",
    )
    .bind(customer)
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(w, a, q, b, r)| (w, (a.normalize(), q.normalize(), b, r)))
        .collect()
}

/// Waits until the customer's charges, as (window → amount, book), are `expected`; returns how long.
async fn wait_for_charges(
    pool: &PgPool,
    customer: &str,
    expected: &[(&str, &str, &str)],
    what: &str,
) -> Duration {
    let started = Instant::now();
    let want: BTreeMap<String, (Decimal, String)> = expected
        .iter()
        .map(|(w, a, b)| {
            (
                (*w).to_owned(),
                (Decimal::from_str(a).unwrap().normalize(), (*b).to_owned()),
            )
        })
        .collect();
    loop {
        let got: BTreeMap<String, (Decimal, String)> = charges(pool, customer)
            .await
            .into_iter()
            .map(|(w, (a, _, b, _))| (w, (a, b)))
            .collect();
        if got == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < WAIT,
            "{what}: charges of {customer} are {got:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn insert_book(
    pool: &PgPool,
    id: &str,
    customer: Option<&str>,
    from: &str,
    model: serde_json::Value,
) {
    insert_price_book(pool, id, "api_call", customer, from, &model).await;
}

fn event(id: &str, customer: &str, time: &str, value: &str) -> serde_json::Value {
    json!({"event_id": id, "customer_id": customer, "event_type": "api_call",
           "event_time": time, "value": value})
}

async fn post_all(api: &TestApi, events: &[serde_json::Value]) {
    for e in events {
        assert_eq!(api.post_event(e).await.status(), StatusCode::CREATED, "{e}");
    }
}

/// Graduated: the first 10 units at 1.00, the rest at 0.50.
fn graduated() -> serde_json::Value {
    json!({"type": "graduated", "tiers": [
        {"up_to": "10", "unit_price": "1.00", "flat_fee": "0"},
        {"up_to": null, "unit_price": "0.50", "flat_fee": "0"}]})
}

#[tokio::test(flavor = "multi_thread")]
async fn charges_follow_late_usage_voids_book_edits_and_customer_books() {
    let api = spawn_api().await;
    let _pipeline = spawn_pipeline(&api.url, &api.topic, 2, &["--epoch-ms", "50"]);
    insert_book(
        &api.pool,
        "pb_default",
        None,
        "2024-01-01T00:00:00Z",
        graduated(),
    )
    .await;
    post_all(
        &api,
        &[
            event("a1", "cust_a", "2024-01-15T14:05:00Z", "4"),
            event("a2", "cust_a", "2024-01-15T14:10:00Z", "4"),
            event("a3", "cust_a", "2024-01-15T14:20:00Z", "4"),
            event("a4", "cust_a", "2024-01-15T15:30:00Z", "5"),
            // Another period: its period-to-date starts again from zero.
            event("a5", "cust_a", "2024-02-01T00:30:00Z", "12"),
        ],
    )
    .await;
    // 14:00 takes the period to 12 units: 10 × 1.00 + 2 × 0.50; 15:00 to 17: 5 × 0.50.
    wait_for_charges(
        &api.pool,
        "cust_a",
        &[
            ("15 14", "11", "pb_default"),
            ("15 15", "2.5", "pb_default"),
            ("01 00", "11", "pb_default"),
        ],
        "first usage",
    )
    .await;
    let feb = charges(&api.pool, "cust_a").await["01 00"].clone();

    // A late event before both windows moves their period-to-date: 13:00 gets 2 × 1.00, 14:00 the
    // next 12 units (8 × 1.00 + 4 × 0.50), 15:00 stays at 5 × 0.50. The period still totals price(19).
    post_all(&api, &[event("a0", "cust_a", "2024-01-15T13:59:59Z", "2")]).await;
    wait_for_charges(
        &api.pool,
        "cust_a",
        &[
            ("15 13", "2", "pb_default"),
            ("15 14", "10", "pb_default"),
            ("15 15", "2.5", "pb_default"),
            ("01 00", "11", "pb_default"),
        ],
        "a late event",
    )
    .await;

    // A void retracts from the charges as from the aggregates: without a2, 14:00 takes the period
    // from 2 to 10 units (8 × 1.00) and 15:00 from 10 to 15 (5 × 0.50).
    let voided = api.post_json("/api/v1/events/a2/void", &json!({})).await;
    assert_eq!(voided.status(), StatusCode::ACCEPTED);
    wait_for_charges(
        &api.pool,
        "cust_a",
        &[
            ("15 13", "2", "pb_default"),
            ("15 14", "8", "pb_default"),
            ("15 15", "2.5", "pb_default"),
            ("01 00", "11", "pb_default"),
        ],
        "a void",
    )
    .await;

    // The book's model is edited: every window it prices is re-rated, within seconds.
    sqlx::query("UPDATE price_books SET model = $1 WHERE price_book_id = 'pb_default'")
        .bind(json!({"type": "per_unit", "unit_price": "0.1"}))
        .execute(&api.pool)
        .await
        .unwrap();
    let took = wait_for_charges(
        &api.pool,
        "cust_a",
        &[
            ("15 13", "0.2", "pb_default"),
            ("15 14", "0.8", "pb_default"),
            ("15 15", "0.5", "pb_default"),
            ("01 00", "1.2", "pb_default"),
        ],
        "an edited book",
    )
    .await;
    eprintln!("a price change reached the stored charges in {took:?}");
    assert!(took < Duration::from_secs(5), "re-rated in {took:?}");

    // The customer's own book from 15:00 on beats the default; windows before it keep theirs, and
    // rating goes on from the period-to-date quantity (10 units before 15:00).
    insert_book(
        &api.pool,
        "pb_acme",
        Some("cust_a"),
        "2024-01-15T15:00:00Z",
        json!({"type": "volume", "tiers": [
            {"up_to": "12", "unit_price": "2", "flat_fee": "0"},
            {"up_to": null, "unit_price": "1", "flat_fee": "0"}]}),
    )
    .await;
    // 15:00: volume(15) − volume(10) = 15 × 1 − 10 × 2 = −5 (a credit); February: volume(12) = 24.
    wait_for_charges(
        &api.pool,
        "cust_a",
        &[
            ("15 13", "0.2", "pb_default"),
            ("15 14", "0.8", "pb_default"),
            ("15 15", "-5", "pb_acme"),
            ("01 00", "24", "pb_acme"),
        ],
        "a customer's own book",
    )
    .await;
    let now = charges(&api.pool, "cust_a").await;
    assert!(now["15 13"].3 > 1, "re-rated windows carry a new revision");
    assert_eq!(
        now["15 15"].1,
        Decimal::from(5),
        "quantity: what the window added to the period"
    );
    assert_ne!(feb, now["01 00"]);
    assert_lines_sum_charges(&api.pool).await;
}

/// The upcoming-invoice lines the pipeline keeps equal the stored charges summed per line.
async fn assert_lines_sum_charges(pool: &PgPool) {
    let query = |sql: &'static str| async move {
        let rows: Vec<(String, String, String, String, Decimal, Decimal, i64)> =
            sqlx::query_as(sql).fetch_all(pool).await.unwrap();
        rows.into_iter()
            .map(|(c, p, m, b, a, q, w)| ((c, p, m, b), (a.normalize(), q.normalize(), w)))
            .collect::<BTreeMap<_, _>>()
    };
    let lines = query(
        "SELECT customer_id, period_start::text, meter, price_book_id, amount, quantity, windows
         FROM upcoming_lines",
    )
    .await;
    let sums = query(
        "SELECT customer_id, date_trunc('month', window_start AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' || '',
                meter, price_book_id, sum(amount), sum(quantity), count(*)
         FROM charges GROUP BY 1, 2, 3, 4",
    )
    .await;
    assert!(!lines.is_empty());
    assert_eq!(
        lines, sums,
        "upcoming-invoice lines are the sums of the charges"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_book_changed_while_the_pipeline_was_down_re_rates_exactly_its_windows_on_restart() {
    let api = spawn_api().await;
    insert_book(
        &api.pool,
        "pb_default",
        None,
        "2024-01-01T00:00:00Z",
        graduated(),
    )
    .await;
    let mut pipeline = spawn_pipeline(&api.url, &api.topic, 2, &["--epoch-ms", "50"]);
    post_all(
        &api,
        &[
            event("b1", "cust_b", "2024-01-10T09:00:00Z", "6"),
            event("b2", "cust_b", "2024-01-10T10:00:00Z", "6"),
            event("b3", "cust_b", "2024-03-05T10:00:00Z", "3"),
        ],
    )
    .await;
    wait_for_charges(
        &api.pool,
        "cust_b",
        &[
            ("10 09", "6", "pb_default"),
            ("10 10", "5", "pb_default"),
            ("05 10", "3", "pb_default"),
        ],
        "before the restart",
    )
    .await;
    pipeline.kill();
    // While it is down, the book closes at March and a new one prices March on.
    sqlx::query(
        "UPDATE price_books SET effective = tstzrange(lower(effective), '2024-03-01', '[)')
         WHERE price_book_id = 'pb_default'",
    )
    .execute(&api.pool)
    .await
    .unwrap();
    insert_book(
        &api.pool,
        "pb_march",
        None,
        "2024-03-01T00:00:00Z",
        json!({"type": "package", "package_size": "2", "package_price": "7"}),
    )
    .await;
    let before = charges(&api.pool, "cust_b").await;
    let _pipeline = spawn_pipeline(&api.url, &api.topic, 3, &["--epoch-ms", "50"]);
    // March: two packages of 2 for 3 units = 14. January is untouched.
    wait_for_charges(
        &api.pool,
        "cust_b",
        &[
            ("10 09", "6", "pb_default"),
            ("10 10", "5", "pb_default"),
            ("05 10", "14", "pb_march"),
        ],
        "after the restart",
    )
    .await;
    api.wait_caught_up(WAIT).await;
    let after = charges(&api.pool, "cust_b").await;
    assert_eq!(
        after["10 09"], before["10 09"],
        "a window the change does not touch is not rewritten"
    );
    assert_eq!(after["10 10"], before["10 10"]);
    assert_lines_sum_charges(&api.pool).await;
}

/// A restart reads the group rows and the charges by binary COPY (`sinks/src/restore/copy.rs`); the
/// state it loads equals the one the compile-time checked queries read, for rows of every shape:
/// names with tabs, quotes, backslashes and non-ASCII; dimensions with escapes and nulls; a value past
/// the decimal range (read as quarantined, value 0), a quarantined row, a zero row (left out), and
/// decimals at full scale.
#[tokio::test(flavor = "multi_thread")]
async fn the_state_a_restart_copies_equals_the_one_its_queries_read() {
    use meterflow_model::{Charge, RatingState};
    use sqlx::types::Json;
    use sqlx::Connection;

    let url = fresh_database().await;
    let pool = PgPool::connect(&url).await.unwrap();
    let hostile = "c\t\"q\"\\n\u{e9}\u{1F600}";
    let dims = json!({"model": "l\targe \"x\" \\ \u{e9}", "region": null});
    for (customer, hour, value, count, quarantined, dimensions) in [
        ("c1", 0, "1.5", 2_i64, false, json!({})),
        (
            "c1",
            1,
            "0.0000000000000000000000000001",
            1,
            false,
            dims.clone(),
        ),
        ("c1", 2, "0", 0, false, json!({})),
        ("c1", 3, "7", 3, true, json!({})),
        ("c1", 4, "1e40", 9, false, json!({})),
        (
            hostile,
            0,
            "-79228162514264337593543950335",
            1,
            false,
            dims.clone(),
        ),
    ] {
        sqlx::query(
            "INSERT INTO aggregations (customer_id, meter, window_start, window_end, value, event_count,
                                       quarantined, dimensions)
             VALUES ($1, 'tokens', '2024-01-15T00:00:00Z'::timestamptz + $2 * interval '1 hour',
                     '2024-01-15T01:00:00Z'::timestamptz + $2 * interval '1 hour', $3::numeric, $4, $5, $6)",
        )
        .bind(customer)
        .bind(hour)
        .bind(value)
        .bind(count)
        .bind(quarantined)
        .bind(&dimensions)
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO charges (customer_id, meter, window_start, window_end, quantity, amount, currency,
                                  price_book_id, dimensions)
             VALUES ($1, 'tokens', '2024-01-15T00:00:00Z'::timestamptz + $2 * interval '1 hour',
                     '2024-01-15T01:00:00Z'::timestamptz + $2 * interval '1 hour', $3::numeric,
                     '123456789.0123456789012345678', 'EUR', $1 || '-book', $4)",
        )
        .bind(customer)
        .bind(hour)
        .bind(if value == "1e40" { "1" } else { value })
        .bind(&dimensions)
        .execute(&pool)
        .await
        .unwrap();
    }
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let mut beside = sqlx::PgConnection::connect(&url).await.unwrap();
    let copied = meterflow_sinks::restore::load_rating_state(&mut conn, &mut beside)
        .await
        .unwrap();

    let mut queried: RatingState = meterflow_sinks::restore::rating_rows(&mut conn, None)
        .await
        .unwrap();
    type Row = (
        String,
        String,
        Json<meterflow_model::Dimensions>,
        i64,
        i64,
        Decimal,
        Decimal,
        String,
        String,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT customer_id, meter, dimensions, extract(epoch FROM window_start)::bigint,
                extract(epoch FROM window_end)::bigint, quantity, amount, currency, price_book_id
         FROM charges",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    queried.charges = rows
        .into_iter()
        .map(|(c, m, d, start, end, quantity, amount, currency, book)| {
            let charge = Charge {
                dimensions: d.0,
                window_start: start,
                window_end: end,
                quantity,
                amount,
                currency: currency.into(),
                price_book_id: book.into(),
            };
            (c.into(), m.into(), charge)
        })
        .collect();

    let sorted = |mut s: RatingState| {
        s.rows.sort();
        s.quarantined_rows.sort();
        s.charges.sort();
        s
    };
    let (copied, queried) = (sorted(copied), sorted(queried));
    assert_eq!(copied.rows.len(), 5, "the zero row is left out");
    assert_eq!(
        copied.quarantined_rows.len(),
        2,
        "the marked row and the one past the range"
    );
    assert_eq!(copied.charges.len(), 6);
    assert!(copied.rows.iter().any(|(k, _, _)| k.customer_id == hostile));
    assert_eq!(copied, queried);
    // Equal as decimals is not enough: the scale survives too.
    for ((_, _, a), (_, _, b)) in copied.charges.iter().zip(&queried.charges) {
        assert_eq!(a.amount.to_string(), b.amount.to_string());
        assert_eq!(a.quantity.to_string(), b.quantity.to_string());
    }
}
