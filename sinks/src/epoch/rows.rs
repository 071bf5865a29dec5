//! The statements of one epoch commit, one function per table, all inside the commit's transaction
//! (`super::commit` holds the lease row, and runs them in this order):
//!
//! ```text
//!  group rows ─► aggregations (value += Δ, quarantine past the decimal range; written finalized when
//!                               the commit's watermark, advanced first, closes the window)
//!  multiset rows ─► meter_values (counts per item) ─► aggregations (max / unique_count / latest again)
//!  charges ─► charges (a window's charge replaced whole) │ lines ─► upcoming_lines (Σ charges)
//!  quarantined periods ─► rating_quarantine │ dead letters │ conflicting duplicates │ late events
//! ```

use std::borrow::Cow;

use meterflow_model::{
    ChargeChange, DeadLetter, Dimensions, Duplicate, DuplicateKind, LateEvent, LineChange,
    RowChange,
};
use rust_decimal::Decimal;
use sqlx::PgConnection;

use crate::error::SinkError;
use crate::metrics;
use crate::restore::{item_columns, item_kind};

// The array arguments are the batch's borrowed values, as before the macros. An array of `&str`s,
// byte slices or nullable elements carries its type (`as &[&str]`): the macros map `text[]` only to
// `&[String]`, `bytea[]` to `&[Vec<u8>]` and no array to nullable elements, and copying each string
// of a commit to please them would slow the hot path. The statement's cast (`$1::text[]`) holds.

/// Sums and counts add up: `value += Δ`, `event_count += Δ`. A row in `quarantined` (its change
/// overflowed), or whose sum would leave the 96-bit decimal range, is quarantined instead: its value
/// stays as it was (the last value in range), its event count goes on.
pub(super) async fn upsert_group_rows(
    tx: &mut PgConnection,
    topic: &str,
    rows: &[&RowChange],
    quarantined: &[meterflow_model::AggregateKey],
) -> Result<(), SinkError> {
    let quarantined: std::collections::HashSet<&meterflow_model::AggregateKey> =
        quarantined.iter().collect();
    let mut rows = rows.to_vec();
    rows.sort_unstable_by(|(a, _, _), (b, _, _)| row_order(a).cmp(&row_order(b)));
    let n = rows.len();
    let dimensions = dimension_texts(rows.iter().map(|(key, _, _)| &key.dimensions));
    let (mut customers, mut meters, mut starts, mut ends, mut values, mut counts, mut flags) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::<Decimal>::with_capacity(n),
        Vec::with_capacity(n),
        Vec::<bool>::with_capacity(n),
    );
    for (key, _, agg) in rows {
        let q = quarantined.contains(key);
        customers.push(key.customer_id.as_str());
        meters.push(key.meter.as_str());
        starts.push(key.window_start);
        ends.push(key.window_end);
        values.push(if q { Decimal::ZERO } else { agg.value });
        counts.push(agg.event_count);
        flags.push(q);
    }
    sqlx::query!(
        "INSERT INTO aggregations AS a (customer_id, meter, window_start, window_end, value, event_count,
                                        quarantined, finalized, dimensions)
         SELECT c, m, to_timestamp(s), to_timestamp(e), v, n, q,
                -- Born finalized when the committed watermark (this commit's, advanced first) closes
                -- its window: no finalizing UPDATE (a non-HOT write) for it.
                COALESCE(to_timestamp(e) + l.allowed_lateness <= l.committed_watermark, false),
                d::jsonb
         FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::numeric[], $6::bigint[],
                     $7::bool[], $10::text[]) AS u(c, m, s, e, v, n, q, d)
         LEFT JOIN pipeline_leases l ON l.topic = $9
         ON CONFLICT ON CONSTRAINT aggregations_pkey DO UPDATE
         SET value = CASE WHEN a.quarantined OR excluded.quarantined OR abs(a.value + excluded.value) > $8
                          THEN a.value ELSE a.value + excluded.value END,
             quarantined = a.quarantined OR excluded.quarantined OR abs(a.value + excluded.value) > $8,
             event_count = a.event_count + excluded.event_count,
             finalized = a.finalized OR excluded.finalized,
             revision = a.revision + 1,
             updated_at = now()",
        &customers as &[&str],
        &meters as &[&str],
        &starts,
        &ends,
        &values,
        &counts,
        &flags,
        Decimal::MAX,
        topic,
        &text_refs(&dimensions) as &[&str],
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Periods enter quarantine (`+1`: upserted, the first window without a charge and the reason) or
/// leave it (`−1` with no `+1` for the same period: deleted).
pub(super) async fn apply_quarantined_periods(
    tx: &mut PgConnection,
    changes: &[(meterflow_model::batch::QuarantinedPeriod, i64)],
) -> Result<(), SinkError> {
    let period = |q: &meterflow_model::batch::QuarantinedPeriod| {
        (
            q.customer_id.clone(),
            q.meter.clone(),
            q.period_start,
            q.dimensions.clone(),
        )
    };
    let added: Vec<_> = changes.iter().filter(|c| c.1 > 0).map(|c| &c.0).collect();
    let still: std::collections::HashSet<_> = added.iter().map(|q| period(q)).collect();
    let removed: Vec<_> = changes
        .iter()
        .filter(|c| c.1 < 0 && !still.contains(&period(&c.0)))
        .map(|c| &c.0)
        .collect();
    if !removed.is_empty() {
        let dimensions = dimension_texts(removed.iter().map(|q| &q.dimensions));
        let dimensions = text_refs(&dimensions);
        sqlx::query!(
            "DELETE FROM rating_quarantine q
             USING UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[]) AS u(c, m, p, d)
             WHERE q.customer_id = u.c AND q.meter = u.m AND q.period_start = to_timestamp(u.p)
               AND q.dimensions = u.d::jsonb",
            &removed
                .iter()
                .map(|q| q.customer_id.as_str())
                .collect::<Vec<_>>() as &[&str],
            &removed.iter().map(|q| q.meter.as_str()).collect::<Vec<_>>() as &[&str],
            &removed.iter().map(|q| q.period_start).collect::<Vec<_>>(),
            &dimensions as &[&str],
        )
        .execute(&mut *tx)
        .await?;
    }
    if !added.is_empty() {
        let dimensions = dimension_texts(added.iter().map(|q| &q.dimensions));
        let dimensions = text_refs(&dimensions);
        sqlx::query!(
            "INSERT INTO rating_quarantine AS q (customer_id, meter, period_start, from_window, reason,
                                                 dimensions)
             SELECT c, m, to_timestamp(p), to_timestamp(f), r, d::jsonb
             FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::text[], $6::text[])
               AS u(c, m, p, f, r, d)
             ON CONFLICT ON CONSTRAINT rating_quarantine_pkey DO UPDATE
             SET from_window = excluded.from_window, reason = excluded.reason",
            &added.iter().map(|q| q.customer_id.as_str()).collect::<Vec<_>>() as &[&str],
            &added.iter().map(|q| q.meter.as_str()).collect::<Vec<_>>() as &[&str],
            &added.iter().map(|q| q.period_start).collect::<Vec<_>>(),
            &added.iter().map(|q| q.from_window).collect::<Vec<_>>(),
            &added.iter().map(|q| q.reason.as_str()).collect::<Vec<_>>() as &[&str],
            &dimensions as &[&str],
        )
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Max, unique_count and latest rows: update the multiset of items (`meter_values`), then recompute
/// each touched row from its multiset.
pub(super) async fn apply_multiset_rows(
    tx: &mut PgConnection,
    topic: &str,
    rows: &[&RowChange],
) -> Result<(), SinkError> {
    let n = rows.len();
    let (
        mut customers,
        mut meters,
        mut starts,
        mut sort_times,
        mut items,
        mut nums,
        mut kinds,
        mut counts,
        mut dimensions,
    ) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::<Option<Decimal>>::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for (key, item, agg) in rows {
        let Some(item) = item else { continue };
        let (kind, sort_time, text, num) = item_columns(item);
        customers.push(key.customer_id.as_str());
        meters.push(key.meter.as_str());
        starts.push(key.window_start);
        sort_times.push(sort_time);
        items.push(text);
        nums.push(num);
        kinds.push(kind);
        counts.push(agg.event_count);
        dimensions.push(dimension_text(&key.dimensions));
    }
    let dimensions = text_refs(&dimensions);
    // Existing items change by their delta; new items are inserted. Not an upsert: Postgres checks
    // CHECK constraints on the proposed row before it finds the conflict, and a retraction's proposed
    // row has a negative count. A retraction should only ever meet an existing item; one that does not
    // (or takes more than is stored) is data at fault, not a reason to stop the pipeline (finding 2's
    // crash loop): it is dropped, counted and logged, and the row shows the items stored.
    let dropped = sqlx::query!(
        r#"WITH u AS (
             SELECT c, m, to_timestamp(s) AS s, t, i, x, k, n, d::jsonb AS d
             FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::text[], $6::numeric[], $7::text[], $8::bigint[], $9::text[])
               AS u(c, m, s, t, i, x, k, n, d)
         ), changed AS (
             UPDATE meter_values v SET count = GREATEST(v.count + u.n, 0)
             FROM u
             WHERE v.customer_id = u.c AND v.meter = u.m AND v.window_start = u.s AND v.dimensions = u.d
               AND v.sort_time = u.t AND v.item = u.i
             RETURNING v.customer_id, v.meter, v.window_start, v.dimensions, v.sort_time, v.item
         ), inserted AS (
             INSERT INTO meter_values (customer_id, meter, window_start, dimensions, sort_time, item, num, kind, count)
             SELECT c, m, s, d, t, i, x, k, n FROM u
             WHERE n > 0 AND NOT EXISTS (
                 SELECT 1 FROM changed
                 WHERE changed.customer_id = u.c AND changed.meter = u.m AND changed.window_start = u.s
                   AND changed.dimensions = u.d AND changed.sort_time = u.t AND changed.item = u.i)
         )
         -- Every part of a WITH reads the rows as they were before the statement.
         SELECT (SELECT count(*) FROM u WHERE n < 0 AND NOT EXISTS (
                     SELECT 1 FROM changed
                     WHERE changed.customer_id = u.c AND changed.meter = u.m AND changed.window_start = u.s
                       AND changed.dimensions = u.d AND changed.sort_time = u.t AND changed.item = u.i)) AS "orphans!",
                (SELECT count(*) FROM u JOIN meter_values v
                   ON v.customer_id = u.c AND v.meter = u.m AND v.window_start = u.s AND v.dimensions = u.d
                  AND v.sort_time = u.t AND v.item = u.i
                 WHERE v.count + u.n < 0) AS "over!""#,
        &customers as &[&str],
        &meters as &[&str],
        &starts,
        &sort_times,
        &items,
        &nums as &[Option<Decimal>],
        &kinds as &[&str],
        &counts,
        &dimensions as &[&str],
    )
    .fetch_one(&mut *tx)
    .await?;
    let (orphans, over) = (dropped.orphans, dropped.over);
    if orphans > 0 || over > 0 {
        tracing::warn!(
            orphans,
            over,
            "retractions met no stored item, or took more than it holds (a void of what was never \
             counted); dropped"
        );
        metrics::DROPPED_RETRACTIONS.inc_by(orphans.saturating_add(over).unsigned_abs());
    }
    sqlx::query!(
        "DELETE FROM meter_values v
         USING UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::text[], $6::text[])
           AS u(c, m, s, t, i, d)
         WHERE v.count = 0 AND v.customer_id = u.c AND v.meter = u.m AND v.window_start = to_timestamp(u.s)
           AND v.dimensions = u.d::jsonb AND v.sort_time = u.t AND v.item = u.i",
        &customers as &[&str],
        &meters as &[&str],
        &starts,
        &sort_times,
        &items,
        &dimensions as &[&str],
    )
    .execute(&mut *tx)
    .await?;

    // One recomputation per touched row.
    let mut touched: Vec<(&str, &str, i64, i64, &str, &Dimensions)> = rows
        .iter()
        .filter_map(|(key, item, _)| {
            let kind = item_kind(item.as_ref()?);
            Some((
                key.customer_id.as_str(),
                key.meter.as_str(),
                key.window_start,
                key.window_end,
                kind,
                &key.dimensions,
            ))
        })
        .collect();
    touched.sort_unstable();
    touched.dedup();
    let dimensions = dimension_texts(touched.iter().map(|t| t.5));
    let dimensions = text_refs(&dimensions);
    sqlx::query!(
        "INSERT INTO aggregations AS a (customer_id, meter, window_start, window_end, value, event_count,
                                        finalized, dimensions)
         SELECT k.c, k.m, to_timestamp(k.s), to_timestamp(k.e),
                CASE k.kind WHEN 'max' THEN COALESCE(agg.max_num, 0)
                            WHEN 'unique_count' THEN agg.items
                            ELSE COALESCE(agg.latest, 0) END,
                COALESCE(agg.events, 0),
                -- Finalized when the committed watermark closes its window (upsert_group_rows).
                COALESCE(to_timestamp(k.e) + l.allowed_lateness <= l.committed_watermark, false),
                k.d::jsonb
         FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::text[], $7::text[])
           AS k(c, m, s, e, kind, d)
         LEFT JOIN pipeline_leases l ON l.topic = $6
         CROSS JOIN LATERAL (
             SELECT max(v.num) AS max_num, count(*) AS items, sum(v.count)::bigint AS events,
                    (array_agg(v.num ORDER BY v.sort_time DESC, v.item DESC))[1] AS latest
             FROM meter_values v
             WHERE v.customer_id = k.c AND v.meter = k.m AND v.window_start = to_timestamp(k.s)
               AND v.dimensions = k.d::jsonb
         ) agg
         ON CONFLICT ON CONSTRAINT aggregations_pkey DO UPDATE
         SET value = excluded.value,
             event_count = excluded.event_count,
             finalized = a.finalized OR excluded.finalized,
             revision = a.revision + 1,
             updated_at = now()",
        &touched.iter().map(|t| t.0).collect::<Vec<_>>() as &[&str],
        &touched.iter().map(|t| t.1).collect::<Vec<_>>() as &[&str],
        &touched.iter().map(|t| t.2).collect::<Vec<_>>(),
        &touched.iter().map(|t| t.3).collect::<Vec<_>>(),
        &touched.iter().map(|t| t.4).collect::<Vec<_>>() as &[&str],
        topic,
        &dimensions as &[&str],
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Window charges are replaced whole: a window with a new charge (`+1`) is upserted, one whose charge
/// was only withdrawn (`−1`, e.g. its price book closed) is deleted.
pub(super) async fn apply_charges(
    tx: &mut PgConnection,
    changes: &[ChargeChange],
) -> Result<(), SinkError> {
    fn window(c: &ChargeChange) -> (&str, &str, i64, &Dimensions) {
        (&c.0, &c.1, c.2.window_start, &c.2.dimensions)
    }
    let added: std::collections::HashSet<(&str, &str, i64, &Dimensions)> =
        changes.iter().filter(|c| c.3 > 0).map(window).collect();
    let removed: Vec<&ChargeChange> = changes
        .iter()
        .filter(|c| c.3 < 0 && !added.contains(&window(c)))
        .collect();
    if !removed.is_empty() {
        let dimensions = dimension_texts(removed.iter().map(|c| &c.2.dimensions));
        let dimensions = text_refs(&dimensions);
        sqlx::query!(
            "DELETE FROM charges c
             USING UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[]) AS u(c, m, s, d)
             WHERE c.customer_id = u.c AND c.meter = u.m AND c.window_start = to_timestamp(u.s)
               AND c.dimensions = u.d::jsonb",
            &removed.iter().map(|c| c.0.as_str()).collect::<Vec<_>>() as &[&str],
            &removed.iter().map(|c| c.1.as_str()).collect::<Vec<_>>() as &[&str],
            &removed.iter().map(|c| c.2.window_start).collect::<Vec<_>>(),
            &dimensions as &[&str],
        )
        .execute(&mut *tx)
        .await?;
    }
    let upserts: Vec<&ChargeChange> = changes.iter().filter(|c| c.3 > 0).collect();
    if !upserts.is_empty() {
        let dimensions = dimension_texts(upserts.iter().map(|c| &c.2.dimensions));
        let dimensions = text_refs(&dimensions);
        sqlx::query!(
            "INSERT INTO charges AS c (customer_id, meter, window_start, window_end, quantity, amount,
                                       currency, price_book_id, dimensions)
             SELECT c, m, to_timestamp(s), to_timestamp(e), q, a, cur, pb, d::jsonb
             FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::numeric[], $6::numeric[],
                         $7::text[], $8::text[], $9::text[]) AS u(c, m, s, e, q, a, cur, pb, d)
             ON CONFLICT ON CONSTRAINT charges_pkey DO UPDATE
             SET window_end = excluded.window_end, quantity = excluded.quantity,
                 amount = excluded.amount, currency = excluded.currency,
                 price_book_id = excluded.price_book_id,
                 revision = c.revision + 1, updated_at = now()",
            &upserts.iter().map(|c| c.0.as_str()).collect::<Vec<_>>() as &[&str],
            &upserts.iter().map(|c| c.1.as_str()).collect::<Vec<_>>() as &[&str],
            &upserts.iter().map(|c| c.2.window_start).collect::<Vec<_>>(),
            &upserts.iter().map(|c| c.2.window_end).collect::<Vec<_>>(),
            &upserts.iter().map(|c| c.2.quantity).collect::<Vec<_>>(),
            &upserts.iter().map(|c| c.2.amount).collect::<Vec<_>>(),
            &upserts.iter().map(|c| c.2.currency.as_str()).collect::<Vec<_>>() as &[&str],
            &upserts.iter().map(|c| c.2.price_book_id.as_str()).collect::<Vec<_>>() as &[&str],
            &dimensions as &[&str],
        )
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Upcoming-invoice lines add up their windows' charge changes; a line with no window left goes. As
/// for `meter_values`, existing lines are updated and new ones inserted (not an upsert: a withdrawal's
/// proposed row would break the CHECK before the conflict is found).
pub(super) async fn apply_lines(
    tx: &mut PgConnection,
    lines: &[LineChange],
) -> Result<(), SinkError> {
    let mut lines: Vec<&LineChange> = lines.iter().collect();
    lines.sort_unstable_by(|a, b| line_order(a).cmp(&line_order(b)));
    let dimensions = dimension_texts(lines.iter().map(|l| &l.dimensions));
    let dimensions = text_refs(&dimensions);
    sqlx::query!(
        "WITH u AS (
             SELECT c, to_timestamp(p) AS p, m, b, cur, a, q, w, d::jsonb AS d
             FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::numeric[],
                         $7::numeric[], $8::bigint[], $9::text[]) AS u(c, p, m, b, cur, a, q, w, d)
         ), changed AS (
             UPDATE upcoming_lines l
             SET amount = l.amount + u.a, quantity = l.quantity + u.q, windows = l.windows + u.w,
                 updated_at = now()
             FROM u
             WHERE l.customer_id = u.c AND l.period_start = u.p AND l.meter = u.m AND l.price_book_id = u.b
               AND l.dimensions = u.d
             RETURNING l.customer_id, l.period_start, l.meter, l.price_book_id, l.dimensions
         )
         INSERT INTO upcoming_lines (customer_id, period_start, meter, price_book_id, currency, quantity,
                                     amount, windows, dimensions)
         SELECT c, p, m, b, cur, q, a, w, d FROM u
         WHERE NOT EXISTS (
             SELECT 1 FROM changed
             WHERE changed.customer_id = u.c AND changed.period_start = u.p AND changed.meter = u.m
               AND changed.price_book_id = u.b AND changed.dimensions = u.d)",
        &lines.iter().map(|l| l.customer_id.as_str()).collect::<Vec<_>>() as &[&str],
        &lines.iter().map(|l| l.period_start).collect::<Vec<_>>(),
        &lines.iter().map(|l| l.meter.as_str()).collect::<Vec<_>>() as &[&str],
        &lines.iter().map(|l| l.price_book_id.as_str()).collect::<Vec<_>>() as &[&str],
        &lines.iter().map(|l| l.currency.as_str()).collect::<Vec<_>>() as &[&str],
        &lines.iter().map(|l| l.amount).collect::<Vec<_>>(),
        &lines.iter().map(|l| l.quantity).collect::<Vec<_>>(),
        &lines.iter().map(|l| l.windows).collect::<Vec<_>>(),
        &dimensions as &[&str],
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!("DELETE FROM upcoming_lines WHERE windows = 0")
        .execute(&mut *tx)
        .await?;
    Ok(())
}

pub(super) async fn insert_dead_letters(
    tx: &mut PgConnection,
    topic: &str,
    dead: &[DeadLetter],
) -> Result<(), SinkError> {
    sqlx::query!(
        "INSERT INTO dead_letters (topic, partition, \"offset\", payload, reason)
         SELECT $1, p, o, b, r FROM UNNEST($2::int[], $3::bigint[], $4::bytea[], $5::text[]) AS u(p, o, b, r)
         ON CONFLICT ON CONSTRAINT dead_letters_source_key DO NOTHING",
        topic,
        &dead.iter().map(|d| d.partition).collect::<Vec<_>>(),
        &dead.iter().map(|d| d.offset).collect::<Vec<_>>(),
        &dead.iter().map(|d| d.payload.as_slice()).collect::<Vec<_>>() as &[&[u8]],
        &dead.iter().map(|d| d.reason.as_str()).collect::<Vec<_>>() as &[&str],
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Keeps the payload of each conflicting copy (an id seen before with other content); identical and
/// voided copies are only counted.
pub(super) async fn insert_conflicting_duplicates(
    tx: &mut PgConnection,
    topic: &str,
    duplicates: &[Duplicate],
) -> Result<(), SinkError> {
    let conflicting: Vec<&Duplicate> = duplicates
        .iter()
        .filter(|d| d.kind == DuplicateKind::Conflicting)
        .collect();
    if conflicting.is_empty() {
        return Ok(());
    }
    sqlx::query!(
        "INSERT INTO duplicate_events (topic, partition, \"offset\", event_id, kind, payload)
         SELECT $1, p, o, i, 'conflicting', b FROM UNNEST($2::int[], $3::bigint[], $4::text[], $5::bytea[]) AS u(p, o, i, b)
         ON CONFLICT ON CONSTRAINT duplicate_events_pkey DO NOTHING",
        topic,
        &conflicting.iter().map(|d| d.partition).collect::<Vec<_>>(),
        &conflicting.iter().map(|d| d.offset).collect::<Vec<_>>(),
        &conflicting.iter().map(|d| d.event_id.as_str()).collect::<Vec<_>>() as &[&str],
        &conflicting.iter().map(|d| d.payload.as_slice()).collect::<Vec<_>>() as &[&[u8]],
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Records the events applied to windows that were already finalized (SPEC §4).
pub(super) async fn insert_late_events(
    tx: &mut PgConnection,
    late: &[LateEvent],
) -> Result<(), SinkError> {
    if late.is_empty() {
        return Ok(());
    }
    sqlx::query!(
        "INSERT INTO late_events (event_id, meter, customer_id, window_start, event_time, watermark)
         SELECT i, m, c, to_timestamp(s), timestamptz 'epoch' + t * interval '1 microsecond',
                timestamptz 'epoch' + w * interval '1 microsecond'
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[]) AS u(i, m, c, s, t, w)",
        &late.iter().map(|l| l.event_id.as_str()).collect::<Vec<_>>() as &[&str],
        &late.iter().map(|l| l.meter.as_str()).collect::<Vec<_>>() as &[&str],
        &late.iter().map(|l| l.customer_id.as_str()).collect::<Vec<_>>() as &[&str],
        &late.iter().map(|l| l.window_start).collect::<Vec<_>>(),
        &late.iter().map(|l| l.event_time_micros).collect::<Vec<_>>(),
        &late.iter().map(|l| l.watermark_micros).collect::<Vec<_>>(),
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Stores dimension values admitted (by the batch's Admit operator, dataflow/src/admit.rs, or by a
/// re-rating job, rerating/bound.rs), so a restart bounds the same.
pub(crate) async fn insert_dimension_values(
    tx: &mut PgConnection,
    values: &[meterflow_model::batch::DimensionValue],
) -> Result<(), sqlx::Error> {
    if values.is_empty() {
        return Ok(());
    }
    sqlx::query!(
        "INSERT INTO dimension_values (meter, key, value)
         SELECT m, k, v FROM UNNEST($1::text[], $2::text[], $3::text[]) AS u(m, k, v)
         ON CONFLICT (meter, key, value) DO NOTHING",
        &values.iter().map(|v| v.0.as_str()).collect::<Vec<_>>() as &[&str],
        &values.iter().map(|v| v.1.as_str()).collect::<Vec<_>>() as &[&str],
        &values.iter().map(|v| v.2.as_deref()).collect::<Vec<_>>() as &[Option<&str>],
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// A group row's primary key, in its order. Rows are written in it: each row's index page is then the
/// last one's or the next (the dataflow sums an epoch's rows in a hash table, so they come in no order).
fn row_order(key: &meterflow_model::AggregateKey) -> (&str, &str, i64, &Dimensions) {
    (
        &key.customer_id,
        &key.meter,
        key.window_start,
        &key.dimensions,
    )
}

/// An upcoming-invoice line's primary key, in its order; lines are written in it, as group rows are.
fn line_order(line: &LineChange) -> (&str, i64, &str, &str, &Dimensions) {
    (
        &line.customer_id,
        line.period_start,
        &line.meter,
        &line.price_book_id,
        &line.dimensions,
    )
}

/// A key's dimension values as the text a statement casts to `jsonb` (`{}`, the common case, without
/// an allocation).
fn dimension_text(dimensions: &Dimensions) -> Cow<'static, str> {
    if dimensions.is_empty() {
        Cow::Borrowed("{}")
    } else {
        Cow::Owned(dimensions.to_string())
    }
}

/// [`dimension_text`] of each.
fn dimension_texts<'a>(all: impl Iterator<Item = &'a Dimensions>) -> Vec<Cow<'static, str>> {
    all.map(dimension_text).collect()
}

/// Borrowed, as the statements' array arguments take them.
fn text_refs<'a>(texts: &'a [Cow<'static, str>]) -> Vec<&'a str> {
    texts.iter().map(AsRef::as_ref).collect()
}
