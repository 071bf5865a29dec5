//! The claim-store port: how the Kafka readers ask, durably, whether an event is the copy that counts
//! (SPEC §3), and [`MemoryClaims`], its reference semantics in memory.
//!
//! ```text
//!  reader ──claim_events(candidates)──► Claims ──► Counts | Duplicate(identical / conflicting / voided)
//!         ──claim_voids(voids)────────►        ──► Some(the counted event to take back) | None
//!                                        ▲
//!            Postgres in production (`meterflow_store::PgClaims`), MemoryClaims in tests
//! ```
//! Contract of a [`Claims`] store: a claim is keyed by the record's position `(partition, offset)`, so it
//! is idempotent. The first copy of an id to be claimed counts; replaying that same record after a crash
//! finds its own claim and counts again (its epoch had not committed), while any other copy is a
//! duplicate, before or after a restart. A void of an id of which no copy was claimed yet leaves a
//! tombstone: that event, whenever it is read, is a voided duplicate.

use std::collections::HashMap;
use std::sync::Arc;

use crate::{DuplicateKind, Event};

/// An event read at a position, asking to be the copy that counts.
#[derive(Clone, Copy)]
pub struct Candidate<'a> {
    pub event: &'a Event,
    pub fingerprint: i64,
    pub partition: i32,
    pub offset: i64,
    pub payload: &'a [u8],
    /// The record says the API stored it (`meterflow-kind: event`): its id is claimed already, by the
    /// API, so a claim store need not try it as new.
    pub accepted: bool,
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

/// Why the claim store gave no answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// The store cannot answer now (connection lost, Postgres restarting): the reader retries the
    /// batch with backoff and skips nothing.
    #[error("the claim store is unavailable: {0}")]
    Unavailable(String),
    /// The store refused what the records hold (Postgres SQLSTATE class 22 or 23): retrying cannot
    /// help. The batch is narrowed down to the refused records, which become dead letters.
    #[error("the claim store refused the data: {0}")]
    Refused(String),
}

/// The durable claim store.
pub trait Claims: Send {
    /// Claims each candidate (all distinct event_ids), in order.
    fn claim_events(
        &mut self,
        candidates: &[Candidate<'_>],
    ) -> Result<Vec<ClaimOutcome>, ClaimError>;
    /// Claims each void; `Some(event)` when this void takes that counted event back.
    fn claim_voids(&mut self, voids: &[VoidCandidate]) -> Result<Vec<Option<Event>>, ClaimError>;
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
    /// `None` for a tombstone: a void read before any copy of its event.
    event: Option<Event>,
}

impl Claims for MemoryClaims {
    fn claim_events(
        &mut self,
        candidates: &[Candidate<'_>],
    ) -> Result<Vec<ClaimOutcome>, ClaimError> {
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
                            event: Some(c.event.clone()),
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

    fn claim_voids(&mut self, voids: &[VoidCandidate]) -> Result<Vec<Option<Event>>, ClaimError> {
        Ok(voids
            .iter()
            .map(|v| {
                let here = (v.partition, v.offset);
                let claim = self
                    .ids
                    .entry(v.event_id.clone())
                    .or_insert_with(|| MemoryClaim {
                        fingerprint: 0,
                        counted: None,
                        voided: None,
                        event: None,
                    });
                match claim.voided {
                    None => claim.voided = Some(here),
                    Some(at) if at == here => {}
                    Some(_) => return None,
                }
                claim.counted.and(claim.event.clone())
            })
            .collect())
    }
}

/// [`MemoryClaims`] shared by several readers (the workers of one test process).
#[derive(Clone, Default)]
pub struct SharedMemoryClaims(pub Arc<std::sync::Mutex<MemoryClaims>>);

impl Claims for SharedMemoryClaims {
    fn claim_events(
        &mut self,
        candidates: &[Candidate<'_>],
    ) -> Result<Vec<ClaimOutcome>, ClaimError> {
        self.0
            .lock()
            .map_err(|_| ClaimError::Unavailable("claims lock poisoned".to_owned()))?
            .claim_events(candidates)
    }

    fn claim_voids(&mut self, voids: &[VoidCandidate]) -> Result<Vec<Option<Event>>, ClaimError> {
        self.0
            .lock()
            .map_err(|_| ClaimError::Unavailable("claims lock poisoned".to_owned()))?
            .claim_voids(voids)
    }
}
