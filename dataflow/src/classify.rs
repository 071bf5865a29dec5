//! Classifying records where they are read: decode and validate, then decide — durably — whether each
//! event is the copy that counts (SPEC §3). Runs on the reader threads, off the timely workers.
//!
//! ```text
//!  RawRecord ─decode+validate─► Event ──Claims::claim_events──► Count(event)       the copy that counts
//!      │                                                   └──► Duplicate(kind)   identical / conflicting / voided
//!      │ void record ──Claims::claim_voids──► Retract(event) │ nothing (not counted yet, already voided)
//!      └ invalid ─► Dead(reason)
//! ```
//! Contract of a [`Claims`] store: a claim is keyed by the record's position `(partition, offset)`, so it
//! is idempotent. The first copy of an id to be claimed counts; replaying that same record after a crash
//! finds its own claim and counts again (its epoch had not committed), while any other copy is a
//! duplicate, before or after a restart. Within one batch the copies are claimed in the order
//! (record timestamp, partition, offset), so the least of them is the original. Dedup therefore needs no
//! memory in the dataflow at all: the claim store (Postgres in production) is the truth.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use meterflow_model::{
    decode_as, DeadLetter, DecodeError, Duplicate, DuplicateKind, Event, Limits,
    DEFAULT_RETENTION_MICROS,
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

/// An event read at a position, asking to be the copy that counts.
pub struct Candidate<'a> {
    pub event: &'a Event,
    pub fingerprint: i64,
    pub partition: i32,
    pub offset: i64,
    pub payload: &'a [u8],
}

/// The answer for one candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimOutcome {
    Counts,
    Duplicate(DuplicateKind),
}

/// A void record read at a position.
#[derive(Clone, Debug)]
pub struct VoidCandidate {
    pub event_id: String,
    pub partition: i32,
    pub offset: i64,
}

/// The durable claim store. `Err` means "could not decide now": the reader retries the batch.
pub trait Claims: Send {
    /// Claims each candidate (all distinct event_ids), in order.
    fn claim_events(&mut self, candidates: &[Candidate<'_>]) -> Result<Vec<ClaimOutcome>, String>;
    /// Claims each void; `Some(event)` when this void takes that counted event back.
    fn claim_voids(&mut self, voids: &[VoidCandidate]) -> Result<Vec<Option<Event>>, String>;
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

/// The wire form of a void record (written by `POST /api/v1/events/{id}/void`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VoidRecord {
    pub event_id: String,
    pub customer_id: String,
}

/// Decodes, validates and claims a batch of records, in order of position.
pub fn classify(
    records: &[RawRecord],
    claims: &mut dyn Claims,
    limits: &Limits,
    watermark: &AtomicI64,
) -> Result<Vec<SourceItem>, String> {
    let limits = Limits {
        oldest_micros: read_watermark(watermark)
            .map(|w| w.saturating_sub(DEFAULT_RETENTION_MICROS)),
        ..*limits
    };
    let mut items: Vec<Option<Classified>> = vec![None; records.len()];
    // Records are decided in order, segment by segment: a void applies to the copies read after it.
    let mut segment: Vec<(usize, Event)> = Vec::new();
    for (i, record) in records.iter().enumerate() {
        let reference = record.timestamp_ms.saturating_mul(1_000);
        match record.kind {
            RecordKind::Event(format) => {
                match decode_as(format, &record.payload, reference, &limits) {
                    Ok(event) => segment.push((i, event)),
                    Err(e) => items[i] = Some(dead(record, &e)),
                }
            }
            RecordKind::Void => match serde_json::from_slice::<VoidRecord>(&record.payload) {
                Ok(v) => {
                    claim_segment(records, std::mem::take(&mut segment), claims, &mut items)?;
                    let void = VoidCandidate {
                        event_id: v.event_id,
                        partition: record.partition,
                        offset: record.offset,
                    };
                    let retract = claims.claim_voids(&[void])?.pop().flatten();
                    items[i] = Some(retract.map_or(Classified::Ignored, Classified::Retract));
                }
                Err(e) => items[i] = Some(dead(record, &DecodeError::Malformed(e.to_string()))),
            },
        }
    }
    claim_segment(records, segment, claims, &mut items)?;

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
    records: &[RawRecord],
    mut events: Vec<(usize, Event)>,
    claims: &mut dyn Claims,
    items: &mut [Option<Classified>],
) -> Result<(), String> {
    events.sort_by(|(a, ea), (b, eb)| {
        let (ra, rb) = (&records[*a], &records[*b]);
        (&ea.event_id, ra.timestamp_ms, ra.partition, ra.offset).cmp(&(
            &eb.event_id,
            rb.timestamp_ms,
            rb.partition,
            rb.offset,
        ))
    });
    // rounds[r] holds the r-th copy of every id that has one.
    let mut rounds: Vec<Vec<(usize, Event)>> = Vec::new();
    let mut copy = 0;
    let mut previous: Option<String> = None;
    for (i, event) in events {
        copy = if previous.as_deref() == Some(event.event_id.as_str()) {
            copy + 1
        } else {
            0
        };
        previous = Some(event.event_id.clone());
        if rounds.len() <= copy {
            rounds.push(Vec::new());
        }
        rounds[copy].push((i, event));
    }
    for round in rounds {
        let fingerprints: Vec<i64> = round.iter().map(|(_, e)| e.fingerprint()).collect();
        let asks: Vec<Candidate> = round
            .iter()
            .zip(&fingerprints)
            .map(|((i, event), fingerprint)| Candidate {
                event,
                fingerprint: *fingerprint,
                partition: records[*i].partition,
                offset: records[*i].offset,
                payload: &records[*i].payload,
            })
            .collect();
        let outcomes = claims.claim_events(&asks)?;
        for ((i, event), outcome) in round.into_iter().zip(outcomes) {
            items[i] = Some(match outcome {
                ClaimOutcome::Counts => Classified::Count(event),
                ClaimOutcome::Duplicate(kind) => duplicate(&records[i], &event.event_id, kind),
            });
        }
    }
    Ok(())
}

fn dead(record: &RawRecord, e: &DecodeError) -> Classified {
    Classified::Dead(DeadLetter {
        partition: record.partition,
        offset: record.offset,
        reason: format!("{}: {e}", e.code()),
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

/// Claims kept in memory: the reference semantics of [`Claims`], for tests and single-shot runs.
#[derive(Clone, Default)]
pub struct MemoryClaims {
    ids: HashMap<String, MemoryClaim>,
}

#[derive(Clone)]
struct MemoryClaim {
    fingerprint: i64,
    counted: Option<(i32, i64)>,
    voided: Option<(i32, i64)>,
    event: Event,
}

impl Claims for MemoryClaims {
    fn claim_events(&mut self, candidates: &[Candidate<'_>]) -> Result<Vec<ClaimOutcome>, String> {
        Ok(candidates
            .iter()
            .map(|c| {
                let here = (c.partition, c.offset);
                let claim =
                    self.ids
                        .entry(c.event.event_id.clone())
                        .or_insert_with(|| MemoryClaim {
                            fingerprint: c.fingerprint,
                            counted: Some(here),
                            voided: None,
                            event: c.event.clone(),
                        });
                if claim.counted == Some(here) {
                    ClaimOutcome::Counts
                } else if claim.voided.is_some() {
                    ClaimOutcome::Duplicate(DuplicateKind::Voided)
                } else if claim.fingerprint == c.fingerprint {
                    ClaimOutcome::Duplicate(DuplicateKind::Identical)
                } else {
                    ClaimOutcome::Duplicate(DuplicateKind::Conflicting)
                }
            })
            .collect())
    }

    fn claim_voids(&mut self, voids: &[VoidCandidate]) -> Result<Vec<Option<Event>>, String> {
        Ok(voids
            .iter()
            .map(|v| {
                let here = (v.partition, v.offset);
                let claim = self.ids.get_mut(&v.event_id)?;
                match claim.voided {
                    None => claim.voided = Some(here),
                    Some(at) if at == here => {}
                    Some(_) => return None,
                }
                claim.counted.map(|_| claim.event.clone())
            })
            .collect())
    }
}

/// [`MemoryClaims`] shared by several readers (the workers of one test process).
#[derive(Clone, Default)]
pub struct SharedMemoryClaims(pub Arc<std::sync::Mutex<MemoryClaims>>);

impl Claims for SharedMemoryClaims {
    fn claim_events(&mut self, candidates: &[Candidate<'_>]) -> Result<Vec<ClaimOutcome>, String> {
        self.0
            .lock()
            .map_err(|_| "claims lock poisoned".to_owned())?
            .claim_events(candidates)
    }

    fn claim_voids(&mut self, voids: &[VoidCandidate]) -> Result<Vec<Option<Event>>, String> {
        self.0
            .lock()
            .map_err(|_| "claims lock poisoned".to_owned())?
            .claim_voids(voids)
    }
}
