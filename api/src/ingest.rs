//! Group commit for ingestion. Every accepted event must be durable and unique in Postgres before its
//! 201 (SPEC §3); one commit per event would make the database's fsync rate the API's ceiling. Requests
//! therefore queue here, and one task stores whatever has queued in a single statement, forwards those
//! events to Kafka concurrently, and answers each request.
//!
//! ```text
//!  request ─► queue ─► [batch of up to 1000 queued] ─► one INSERT: event_ids (unique) + telemetry + outbox
//!                                                    ─► produce all (acks=all) ─ok─► 201 each
//!                                                                           └err─► withdrawn, 503
//! ```
//! Within a batch the first copy of an id is stored and any later copy answers 409, exactly as if the
//! requests had come one after the other. A copy is told 409 only once its id is marked
//! `duplicate_answered`: a first copy that Kafka then refuses is kept (the outbox relay delivers it,
//! and it is answered 201) instead of withdrawn, so "already accepted" always holds (finding 6).
//! If the statement fails for a reason other than the database being away (one event's data), every
//! event is stored on its own, so one bad request never changes another's status (finding 11).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use meterflow_model::wire::RecordKindHeader;
use meterflow_model::Event;
use meterflow_store::events;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::error::{ApiError, Overload};
use crate::metrics::GroupCommit;
use crate::AppState;

/// Most events stored in one statement.
const MAX_BATCH: usize = 1_000;
/// Events queued for the group commit by default (`api.ingest_queue`).
pub const DEFAULT_QUEUE: usize = 16_384;
/// Batches being stored at once. Few, so that under load the queue grows into larger batches (one
/// statement and one commit for many events) instead of many small commits competing for the same
/// cores; a batch gives its slot back once stored, and waits for Kafka without holding it.
pub(crate) const STORING: usize = 2;
/// Batches stored or waiting for Kafka at once: while Kafka is slow, the queue stops draining and fills,
/// so that `api.ingest_queue` refuses instead of storing events whose forwarding cannot keep up.
const FORWARDING: usize = 16;

pub(crate) struct Request {
    event: Event,
    reply: oneshot::Sender<Result<(), ApiError>>,
}

/// The handle requests use; the task behind it runs until the API stops.
#[derive(Clone)]
pub struct Ingester {
    queue: mpsc::Sender<Request>,
    /// Events handed over and not yet stored and forwarded (or refused): what a shutdown waits for.
    unfinished: Arc<AtomicUsize>,
}

impl Ingester {
    /// Starts the ingest task on the current runtime, with room for `capacity` queued events.
    pub(crate) fn start(state_rx: oneshot::Receiver<AppState>, capacity: usize) -> Self {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let unfinished = Arc::new(AtomicUsize::new(0));
        let counter = unfinished.clone();
        tokio::spawn(async move {
            if let Ok(state) = state_rx.await {
                run(state, rx, counter).await;
            }
        });
        Ingester {
            queue: tx,
            unfinished,
        }
    }

    /// Makes `event` durable and unique, forwards it to Kafka, and says how that went. Once handed
    /// over, the event is stored and forwarded even if the caller goes away. A full queue refuses at
    /// once (503 `OVERLOADED`, nothing stored) rather than making the caller wait behind it.
    pub async fn accept(&self, event: Event) -> Result<(), ApiError> {
        let (reply, answer) = oneshot::channel();
        self.unfinished.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = self.queue.try_send(Request { event, reply }) {
            self.unfinished.fetch_sub(1, Ordering::AcqRel);
            return Err(match e {
                mpsc::error::TrySendError::Full(_) => ApiError::Overloaded(Overload::IngestQueue),
                mpsc::error::TrySendError::Closed(_) => ApiError::Unavailable("the ingest queue"),
            });
        }
        answer
            .await
            .unwrap_or(Err(ApiError::Unavailable("the ingest queue")))
    }

    /// Events queued and not yet taken into a batch.
    pub fn queued(&self) -> usize {
        self.queue
            .max_capacity()
            .saturating_sub(self.queue.capacity())
    }

    /// Waits until every event handed over so far is stored and forwarded, or refused.
    pub async fn drain(&self) {
        while self.unfinished.load(Ordering::Acquire) > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn run(state: AppState, mut rx: mpsc::Receiver<Request>, unfinished: Arc<AtomicUsize>) {
    let slots = Arc::new(Semaphore::new(STORING));
    let forwarding = Arc::new(Semaphore::new(FORWARDING));
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let Ok(forward) = forwarding.clone().acquire_owned().await else {
            return;
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let state = state.clone();
        let requests = std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH));
        let unfinished = unfinished.clone();
        tokio::spawn(async move {
            let n = requests.len();
            store_and_forward(&state, requests, slot).await;
            unfinished.fetch_sub(n, Ordering::AcqRel);
            drop(forward);
        });
    }
}

async fn store_and_forward(
    state: &AppState,
    requests: Vec<Request>,
    slot: tokio::sync::OwnedSemaphorePermit,
) {
    // The first copy of each id in the batch is stored; later copies are duplicates of it.
    let mut seen = HashSet::new();
    let (firsts, repeats): (Vec<Request>, Vec<Request>) = requests
        .into_iter()
        .partition(|r| seen.insert(r.event.event_id.clone()));
    let Some((mut fresh, mut payloads, copies)) = store_firsts(state, firsts, repeats).await else {
        return;
    };
    // Copies of a stored id are answered 409 only once the id is marked as answered, so that the first
    // copy is kept even if Kafka refuses it. A copy whose id is gone again (its first copy was withdrawn
    // or refused meanwhile) is stored on its own, once; a copy still undecided then is told to retry.
    let gone = answer_copies(state, copies).await;
    if !gone.is_empty() {
        if let Some((retried, retried_payloads, copies)) =
            store_firsts(state, gone, Vec::new()).await
        {
            fresh.extend(retried);
            payloads.extend(retried_payloads);
            for r in answer_copies(state, copies).await {
                let _ = r
                    .reply
                    .send(Err(ApiError::Unavailable("the event's first copy")));
            }
        }
    }
    // Stored: the next batch may be stored while this one waits for Kafka.
    drop(slot);
    let now = Utc::now().timestamp_millis();
    let sends = fresh.iter().zip(&payloads).map(|(r, payload)| async {
        // `event`: the reader keeps this 201's decision on the event's age (finding 10).
        match crate::events::publish(state, &r.event.customer_id, payload, RecordKindHeader::Event, now).await {
            Ok(()) => Ok(true),
            Err(e) => {
                tracing::warn!(event_id = %r.event.event_id, error = %e, "kafka did not take the event; withdrawing it");
                match withdraw(state, &r.event).await {
                    // Another copy was told 409 (or the pipeline counted it): the event stays, and
                    // the outbox relay delivers it, so it is accepted.
                    Some(Withdrawal::Kept) => Ok(false),
                    Some(Withdrawal::Gone) | None => {
                        Err(ApiError::Unavailable("the event log (Kafka)"))
                    }
                }
            }
        }
    });
    let outcomes = futures::future::join_all(sends).await;
    let mut ingested: HashMap<String, u64> = HashMap::new();
    for (r, outcome) in fresh.into_iter().zip(outcomes) {
        if matches!(outcome, Ok(true)) {
            // Waits (rather than drops) when the outbox cleaner lags: a row left behind would be
            // relayed again, which the pipeline's dedup absorbs, but costs a record.
            let _ = state.published.send(r.event.event_id.clone()).await;
        }
        if outcome.is_ok() {
            *ingested.entry(r.event.event_type.clone()).or_default() += 1;
        }
        let _ = r.reply.send(outcome.map(|_| ()));
    }
    state.metrics.count_ingested(&ingested);
}

/// Stores `firsts` (distinct ids); returns those stored with their payloads, and the copies: `repeats`
/// and the firsts whose id was known already. `None` when everything was answered (the database away).
async fn store_firsts(
    state: &AppState,
    firsts: Vec<Request>,
    repeats: Vec<Request>,
) -> Option<(Vec<Request>, Vec<Vec<u8>>, Vec<Request>)> {
    // The canonical JSON is both the outbox row and the Kafka record: encode it once.
    let payloads: Vec<Vec<u8>> = firsts.iter().map(|r| r.event.to_json()).collect();
    let (firsts, payloads, stored) = match store(state, &firsts, &payloads).await {
        Ok(stored) => {
            state.metrics.count_group_commit(GroupCommit::Stored);
            (firsts, payloads, stored)
        }
        Err(e) if is_transient(&e) => {
            for r in firsts.into_iter().chain(repeats) {
                let _ = r.reply.send(Err(e.clone()));
            }
            return None;
        }
        // Not the database being away: most likely one event's data the statement could not take.
        // Requests are isolated, so each event is stored on its own and gets its own outcome.
        Err(e) => {
            tracing::warn!(error = %e, events = firsts.len(), "a group commit failed; storing its events one by one");
            state.metrics.count_group_commit(GroupCommit::OneByOne);
            store_one_by_one(state, firsts, payloads).await
        }
    };
    let mut fresh = Vec::with_capacity(firsts.len());
    let mut fresh_payloads = Vec::with_capacity(firsts.len());
    let mut copies = repeats;
    for (r, payload) in firsts.into_iter().zip(payloads) {
        if stored.contains(&r.event.event_id) {
            fresh.push(r);
            fresh_payloads.push(payload);
        } else {
            copies.push(r);
        }
    }
    Some((fresh, fresh_payloads, copies))
}

/// Answers copies whose id stays 409; returns those whose id is gone (to be stored again).
async fn answer_copies(state: &AppState, copies: Vec<Request>) -> Vec<Request> {
    if copies.is_empty() {
        return copies;
    }
    let ids: Vec<String> = copies.iter().map(|r| r.event.event_id.clone()).collect();
    let answered = match events::answered_duplicates(&state.ingest_pool, &ids)
        .await
        .map_err(ApiError::from)
    {
        Ok(answered) => answered,
        Err(e) => {
            for r in copies {
                let _ = r.reply.send(Err(e.clone()));
            }
            return Vec::new();
        }
    };
    let mut gone = Vec::new();
    let mut again = HashSet::new();
    for r in copies {
        if answered.contains(&r.event.event_id) {
            let _ = r
                .reply
                .send(Err(ApiError::DuplicateEvent(r.event.event_id.clone())));
        } else if again.insert(r.event.event_id.clone()) {
            gone.push(r);
        } else {
            // A third copy in one batch of an id that is gone: the second is stored, this one retries.
            let _ = r
                .reply
                .send(Err(ApiError::Unavailable("the event's first copy")));
        }
    }
    gone
}

/// Whether an error is the database (or Kafka) being away for now, the same for every event.
fn is_transient(e: &ApiError) -> bool {
    matches!(
        e,
        ApiError::Unavailable(_) | ApiError::Timeout(_) | ApiError::PoolTimedOut
    )
}

/// Stores each event in a statement of its own. An event the database refuses is answered with that
/// error here (a 4xx when its data is at fault) and left out; returns the rest, their payloads and the ids
/// stored.
async fn store_one_by_one(
    state: &AppState,
    requests: Vec<Request>,
    payloads: Vec<Vec<u8>>,
) -> (Vec<Request>, Vec<Vec<u8>>, HashSet<String>) {
    let mut kept = Vec::with_capacity(requests.len());
    let mut kept_payloads = Vec::with_capacity(requests.len());
    let mut stored = HashSet::new();
    for (r, payload) in requests.into_iter().zip(payloads) {
        match store(
            state,
            std::slice::from_ref(&r),
            std::slice::from_ref(&payload),
        )
        .await
        {
            Ok(ids) => {
                stored.extend(ids);
                kept.push(r);
                kept_payloads.push(payload);
            }
            Err(e) => {
                let _ = r.reply.send(Err(e));
            }
        }
    }
    (kept, kept_payloads, stored)
}

/// Attempts of a group commit that Postgres rolled back as a deadlock or a serialization failure.
const ATTEMPTS: usize = 3;

/// Stores the claims, raw events and outbox rows of a batch in one statement; returns the ids stored
/// (the others were known already).
///
/// Concurrent batches take their row locks in one order (event ids, then customer and event type for
/// the event-type rows of migration 0013), so they do not deadlock one another; a statement Postgres
/// still rolls back as a deadlock or serialization failure (SQLSTATE class 40) is tried again as it
/// is, up to [`ATTEMPTS`] times, before it counts as failed.
async fn store(
    state: &AppState,
    requests: &[Request],
    payloads: &[Vec<u8>],
) -> Result<HashSet<String>, ApiError> {
    let mut attempt = 1;
    loop {
        match store_once(state, requests, payloads).await {
            Err(e) if attempt < ATTEMPTS && rolled_back(&e) => {
                state.metrics.count_group_commit(GroupCommit::Retried);
                tracing::info!(error = %e, attempt, "a group commit was rolled back; trying it again");
                attempt += 1;
            }
            result => return result.map_err(ApiError::from),
        }
    }
}

/// Whether Postgres rolled the statement back for its concurrency with others (40P01 deadlock,
/// 40001 serialization failure), which says nothing about the events in it. Not the rest of class 40:
/// "statement completion unknown" may have committed, and a retry would then answer its own events 409.
fn rolled_back(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("40P01" | "40001")))
}

async fn store_once(
    state: &AppState,
    requests: &[Request],
    payloads: &[Vec<u8>],
) -> Result<HashSet<String>, sqlx::Error> {
    let events: Vec<&Event> = requests.iter().map(|r| &r.event).collect();
    events::store_new(&state.ingest_pool, &events, payloads).await
}

/// What a withdrawal did.
enum Withdrawal {
    /// The event is gone: its id is free again.
    Gone,
    /// The event stays (another copy was answered 409, or the pipeline counted it); the outbox relay
    /// delivers it.
    Kept,
}

/// Compensation when Kafka refused: the event was not accepted, so its id is free again, unless another
/// copy was already answered 409 (then it is kept and the relay delivers it). `None` if the delete
/// failed: the outbox row stays and the relay delivers the event later, which is consistent with a
/// retry answering 409.
async fn withdraw(state: &AppState, event: &Event) -> Option<Withdrawal> {
    let gone = events::withdraw(&state.pool, event).await;
    match gone {
        Ok(false) => Some(Withdrawal::Kept),
        Ok(true) => Some(Withdrawal::Gone),
        Err(e) => {
            tracing::warn!(event_id = %event.event_id, error = %e, "cannot withdraw the event; the relay delivers it");
            None
        }
    }
}
