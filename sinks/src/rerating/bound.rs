//! The bound on dimension values inside a re-rating job (issue 17, `docs/dimensions.md`): a job
//! recomputing a `group_by` meter's rows from the raw events admits values by the rule the pipeline's
//! Admit operator follows (`meterflow_model::dimensions::Admitted`), starting from the values admitted
//! so far, so that history re-rated under a new meter is bounded as live events are.
//!
//! ```text
//!  snapshot:  dimension_values (the meters with group_by) ──► Admitted
//!             events in (event time, event id) order ──admit──► counted | refused (a dead letter)
//!  locked:    values of those meters admitted since the snapshot? ──yes──► the job runs again
//!             the job's new values ─► dimension_values; its refusals ─► dead_letters
//!  correction: after.dimension_values = the job's new values ─► the running Admit operator's state
//! ```
//! What stays open: values the pipeline admits in epochs not yet committed when the job commits were
//! decided without the job's values (the operator learns them at the correction's epoch). When a live
//! stream brings new values of a meter in the very seconds a job admits history's values of it, the
//! bound can be passed by the values of those in-flight epochs (at most 8 of them).

use std::collections::HashMap;

use meterflow_model::batch::DimensionValue;
use meterflow_model::dimensions::{refusal_reason, Admitted};
use meterflow_model::{AggregateKey, Event, Meter};
use sqlx::PgConnection;

/// A refused contribution's dead letter.
struct Refusal {
    partition: i32,
    offset: i64,
    payload: Vec<u8>,
    reason: String,
}

/// The admitted values a job starts from, and what it admits and refuses.
pub(super) struct Bound {
    /// `max_dimension_values` of each meter with `group_by`.
    bounds: HashMap<String, u32>,
    admitted: Admitted,
    /// How many values each of those meters had admitted at the snapshot.
    loaded: HashMap<String, i64>,
    /// The values this job admitted, in the order it admitted them.
    pub(super) new: Vec<DimensionValue>,
    refused: Vec<Refusal>,
}

impl Bound {
    /// The values admitted so far for the meters with `group_by` among `meters`.
    pub(super) async fn load(tx: &mut PgConnection, meters: &[Meter]) -> Result<Self, sqlx::Error> {
        let bounds: HashMap<String, u32> = meters
            .iter()
            .filter(|m| !m.group_by.is_empty())
            .map(|m| (m.meter.clone(), m.dimension_bound()))
            .collect();
        let names: Vec<String> = bounds.keys().cloned().collect();
        let rows = sqlx::query!(
            "SELECT meter, key, value FROM dimension_values WHERE meter = ANY($1)",
            &names,
        )
        .fetch_all(&mut *tx)
        .await?;
        let mut admitted = Admitted::default();
        let mut loaded: HashMap<String, i64> = HashMap::new();
        for r in rows {
            admitted.insert(&r.meter, &r.key, r.value.as_deref());
            let count = loaded.entry(r.meter).or_default();
            *count = count.saturating_add(1);
        }
        Ok(Bound {
            bounds,
            admitted,
            loaded,
            new: Vec::new(),
            refused: Vec::new(),
        })
    }

    /// Whether a contribution to the row `key` of `event` (read at `position`) counts: always for a
    /// meter without `group_by`; else if the bound admits its values (new ones are recorded).
    pub(super) fn admits(
        &mut self,
        key: &AggregateKey,
        event: &Event,
        position: (i32, i64),
    ) -> bool {
        let Some(&bound) = self.bounds.get(key.meter.as_str()) else {
            return true;
        };
        match self.admitted.admit(&key.meter, &key.dimensions, bound) {
            Ok(new) => {
                self.new.extend(new);
                true
            }
            Err((dimension, value)) => {
                self.refused.push(Refusal {
                    partition: position.0,
                    offset: position.1,
                    payload: event.to_json(),
                    reason: format!(
                        "{} (re-rating job)",
                        refusal_reason(&key.meter, bound, dimension, value)
                    ),
                });
                false
            }
        }
    }

    /// Whether the pipeline committed more values of a meter this job admits values of since the
    /// snapshot (the job then decided without them, and runs again).
    pub(super) async fn admitted_meanwhile(
        &self,
        tx: &mut PgConnection,
    ) -> Result<bool, sqlx::Error> {
        let mut meters: Vec<String> = self.new.iter().map(|(m, _, _)| m.clone()).collect();
        meters.sort();
        meters.dedup();
        if meters.is_empty() {
            return Ok(false);
        }
        let now = sqlx::query!(
            r#"SELECT meter AS "meter!", count(*) AS "n!" FROM dimension_values
               WHERE meter = ANY($1) GROUP BY meter"#,
            &meters,
        )
        .fetch_all(&mut *tx)
        .await?;
        Ok(now
            .iter()
            .any(|r| self.loaded.get(&r.meter).copied().unwrap_or(0) != r.n))
    }

    /// Stores the job's new values and its refusals' dead letters (`topic`: the pipeline's), in the
    /// job's transaction.
    pub(super) async fn store(
        &self,
        tx: &mut PgConnection,
        topic: &str,
    ) -> Result<(), sqlx::Error> {
        crate::epoch::insert_dimension_values(&mut *tx, &self.new).await?;
        if !self.refused.is_empty() {
            sqlx::query!(
                r#"INSERT INTO dead_letters (topic, partition, "offset", payload, reason)
                   SELECT $1, p, o, b, r FROM UNNEST($2::int[], $3::bigint[], $4::bytea[], $5::text[])
                        AS u(p, o, b, r)
                   ON CONFLICT (topic, partition, "offset") DO NOTHING"#,
                topic,
                &self.refused.iter().map(|r| r.partition).collect::<Vec<_>>(),
                &self.refused.iter().map(|r| r.offset).collect::<Vec<_>>(),
                &self.refused.iter().map(|r| r.payload.clone()).collect::<Vec<_>>(),
                &self.refused.iter().map(|r| r.reason.clone()).collect::<Vec<_>>(),
            )
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }
}
