//! Classifying records where they are read: decode and validate, then decide — durably — whether each
//! event is the copy that counts (SPEC §3). Runs on the reader threads, off the timely workers.
//!
//! ```text
//!  RawRecord ─decode+validate─► Event ──Claims::claim_events──► Count(event)       the copy that counts
//!      │                                                   └──► Duplicate(kind)   identical / conflicting / voided
//!      │ void record ──Claims::claim_voids──► Retract(event) │ nothing (not counted yet, already voided)
//!      └ invalid ─► Dead(reason)
//! ```
//! A record the claim store refuses for what it holds (a [`ClaimError::Refused`](meterflow_model::claims::ClaimError::Refused)) is narrowed down
//! to that record alone, which becomes a dead letter; the others of its batch are claimed as usual.
//! Only a [`ClaimError::Unavailable`](meterflow_model::claims::ClaimError::Unavailable) store makes the reader wait and retry.
//! The claim store is a port of the model ([`meterflow_model::claims`], with its contract and the
//! in-memory reference); Postgres implements it in production. Dedup therefore needs no memory in the
//! dataflow at all: the claim store is the truth. Within one batch the copies are claimed in the order
//! (record timestamp, partition, offset), so the least of them is the original.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use meterflow_model::claims::{Candidate, ClaimError, ClaimOutcome, Claims, VoidCandidate};
use meterflow_model::wire::VoidRecord;
use meterflow_model::{
    check_void_ids, decode_as, object, printable, DeadLetter, DecodeError, Duplicate,
    DuplicateKind, Event, Limits, DEFAULT_RETENTION_MICROS,
};
use serde::{Deserialize, Serialize};

use crate::source::{RawRecord, RecordKind};

/// A record after classification, with where it was read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceItem {
    pub partition: i32,
    pub offset: i64,
    pub what: Classified,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Classified {
    /// The copy of this event that counts.
    Count(Event),
    /// A void: take this counted event back out of every aggregate.
    Retract(Event),
    Duplicate(Duplicate),
    Dead(DeadLetter),
    /// A void with nothing to retract (the event was not counted yet, or was voided already).
    Ignored,
}

/// The committed event-time watermark, shared by the sink (writer) and the readers (for the age limit)
/// and the dataflow (to tell late events). `i64::MIN` until the first watermark.
pub type SharedWatermark = Arc<AtomicI64>;

pub fn new_watermark(initial: Option<i64>) -> SharedWatermark {
    Arc::new(AtomicI64::new(initial.unwrap_or(i64::MIN)))
}

pub fn read_watermark(w: &AtomicI64) -> Option<i64> {
    Some(w.load(Ordering::Acquire)).filter(|w| *w != i64::MIN)
}

/// Decodes, validates and claims a batch of records, in order of position.
pub fn classify(
    records: &[RawRecord],
    claims: &mut dyn Claims,
    limits: &Limits,
    watermark: &AtomicI64,
) -> Result<Vec<SourceItem>, ClaimError> {
    let limits = Limits {
        oldest_micros: read_watermark(watermark)
            .map(|w| w.saturating_sub(DEFAULT_RETENTION_MICROS)),
        ..*limits
    };
    let mut items: Vec<Option<Classified>> = vec![None; records.len()];
    // Records are decided in order, segment by segment: a void applies to the copies read after it.
    let mut segment: Vec<(usize, &RawRecord, Event)> = Vec::new();
    for (i, record) in records.iter().enumerate() {
        let reference = record.timestamp_ms.saturating_mul(1_000);
        match record.kind {
            RecordKind::Event(format) | RecordKind::Accepted(format) => {
                // The API decided an accepted event's age when it answered 201 (finding 10).
                let limits = match record.kind {
                    RecordKind::Accepted(_) => Limits {
                        oldest_micros: None,
                        ..limits
                    },
                    _ => limits,
                };
                match decode_as(format, &record.payload, reference, &limits) {
                    Ok(event) => segment.push((i, record, event)),
                    Err(e) => {
                        if let Some(item) = items.get_mut(i) {
                            *item = Some(dead(record, &e));
                        }
                    }
                }
            }
            RecordKind::Void => match decode_void(&record.payload) {
                Ok(v) => {
                    claim_segment(std::mem::take(&mut segment), claims, &mut items)?;
                    let void = VoidCandidate {
                        event_id: v.event_id,
                        partition: record.partition,
                        offset: record.offset,
                    };
                    let decided = match claims.claim_voids(&[void]) {
                        Ok(mut retract) => match retract.pop().flatten() {
                            Some(event) => Classified::Retract(event),
                            None => Classified::Ignored,
                        },
                        Err(ClaimError::Refused(why)) => refused(record, &why),
                        Err(unavailable) => return Err(unavailable),
                    };
                    if let Some(item) = items.get_mut(i) {
                        *item = Some(decided);
                    }
                }
                Err(e) => {
                    if let Some(item) = items.get_mut(i) {
                        *item = Some(dead(record, &e));
                    }
                }
            },
        }
    }
    claim_segment(segment, claims, &mut items)?;

    Ok(records
        .iter()
        .zip(items)
        .map(|(r, what)| SourceItem {
            partition: r.partition,
            offset: r.offset,
            what: what.unwrap_or(Classified::Ignored),
        })
        .collect())
}

/// Claims the events of one segment. Of several copies of an id, the least (timestamp, partition,
/// offset) asks first; the later copies ask in later rounds, so the store judges each against the copy
/// that counted (identical, conflicting or voided).
fn claim_segment(
    mut events: Vec<(usize, &RawRecord, Event)>,
    claims: &mut dyn Claims,
    items: &mut [Option<Classified>],
) -> Result<(), ClaimError> {
    events.sort_by(|(_, ra, ea), (_, rb, eb)| {
        (&ea.event_id, ra.timestamp_ms, ra.partition, ra.offset).cmp(&(
            &eb.event_id,
            rb.timestamp_ms,
            rb.partition,
            rb.offset,
        ))
    });
    // rounds[r] holds the r-th copy of every id that has one.
    let mut rounds: Vec<Vec<(usize, &RawRecord, Event)>> = Vec::new();
    let mut copy = 0usize;
    let mut previous: Option<String> = None;
    for (i, record, event) in events {
        copy = if previous.as_deref() == Some(event.event_id.as_str()) {
            copy.saturating_add(1)
        } else {
            0
        };
        previous = Some(event.event_id.clone());
        match rounds.get_mut(copy) {
            Some(round) => round.push((i, record, event)),
            None => rounds.push(vec![(i, record, event)]),
        }
    }
    for round in rounds {
        let fingerprints: Vec<i64> = round.iter().map(|(_, _, e)| e.fingerprint()).collect();
        let asks: Vec<Candidate> = round
            .iter()
            .zip(&fingerprints)
            .map(|((_, record, event), fingerprint)| Candidate {
                event,
                fingerprint: *fingerprint,
                partition: record.partition,
                offset: record.offset,
                payload: &record.payload,
                accepted: matches!(record.kind, RecordKind::Accepted(_)),
            })
            .collect();
        let outcomes = claim_or_narrow(claims, &asks)?;
        for ((i, record, event), outcome) in round.into_iter().zip(outcomes) {
            let decided = match outcome {
                Ok(ClaimOutcome::Counts) => Classified::Count(event),
                Ok(ClaimOutcome::Duplicate(kind)) => duplicate(record, &event.event_id, kind),
                Err(why) => refused(record, &why),
            };
            if let Some(item) = items.get_mut(i) {
                *item = Some(decided);
            }
        }
    }
    Ok(())
}

/// Claims `asks`; when the store refuses the data, halves the batch until each refused candidate stands
/// alone, so one record the store cannot hold never holds up the others. `Err` only when unavailable.
fn claim_or_narrow(
    claims: &mut dyn Claims,
    asks: &[Candidate<'_>],
) -> Result<Vec<Result<ClaimOutcome, String>>, ClaimError> {
    match claims.claim_events(asks) {
        Ok(outcomes) => Ok(outcomes.into_iter().map(Ok).collect()),
        Err(ClaimError::Refused(why)) if asks.len() <= 1 => Ok(vec![Err(why)]),
        Err(ClaimError::Refused(_)) => {
            let (left, right) = asks.split_at(asks.len() / 2);
            let mut outcomes = claim_or_narrow(claims, left)?;
            outcomes.extend(claim_or_narrow(claims, right)?);
            Ok(outcomes)
        }
        Err(unavailable) => Err(unavailable),
    }
}

/// A void record's wire form, with ids checked like an event's.
fn decode_void(payload: &[u8]) -> Result<VoidRecord, DecodeError> {
    let void: VoidRecord = serde_json::from_slice(object(payload)?)
        .map_err(|e| DecodeError::Malformed(printable(&e.to_string())))?;
    check_void_ids(&void.event_id, &void.customer_id)?;
    Ok(void)
}

/// A record the claim store refused: a dead letter with the store's reason.
fn refused(record: &RawRecord, why: &str) -> Classified {
    Classified::Dead(DeadLetter {
        partition: record.partition,
        offset: record.offset,
        reason: printable(&format!("STORE_REFUSED: {why}")),
        payload: record.payload.clone(),
    })
}

fn dead(record: &RawRecord, e: &DecodeError) -> Classified {
    Classified::Dead(DeadLetter {
        partition: record.partition,
        offset: record.offset,
        reason: printable(&format!("{}: {e}", e.code())),
        payload: record.payload.clone(),
    })
}

fn duplicate(record: &RawRecord, event_id: &str, kind: DuplicateKind) -> Classified {
    Classified::Duplicate(Duplicate {
        event_id: event_id.to_owned(),
        partition: record.partition,
        offset: record.offset,
        kind,
        payload: if kind == DuplicateKind::Conflicting {
            record.payload.clone()
        } else {
            Vec::new()
        },
    })
}
