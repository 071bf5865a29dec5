//! How long an epoch may be held open while the reader is behind the topic's end (issue 15): past the
//! catch-up interval, for as long as this worker holds the global watermark below the next window
//! close, up to the hold bound.
//!
//! ```text
//!   reader's last batch full? ──no──► epoch_interval
//!          │ yes
//!          ▼
//!   at least catch_up_interval ──► and up to catch_up_hold while this worker holds the watermark:
//!                                  one of its partitions, read within half the idle timeout, has its
//!                                  watermark (greatest event time − out-of-orderness) below
//!                                  next_close(committed watermark), and no admin's floor awaits its
//!                                  commit
//! ```
//!
//! Why holding keeps SPEC §4 ("a window is finalized within 5 s of the watermark passing its close"):
//! the global watermark is the least over the active partitions, so while one active partition stays
//! below the next close above the committed watermark, the global one stays below it too, and no
//! window closes that the committed watermark had not closed already, on any worker. A worker whose
//! partitions are all past that close holds nothing and ends its epochs at the catch-up interval; the
//! holder ends its own as soon as its partition passes the close, goes quiet, or an admin sets a floor.
//! The committed watermark a worker knows may be older than the writer's; an older one has an earlier
//! next close, so the rule only errs towards ending an epoch.
//!
//! A backfill of history is the case it is for: the watermark reaches the topic's newest events with
//! the first batch and then barely moves, so its epochs grow from 2 s to the hold bound, and each
//! window of the span is rewritten in fewer commits.

use std::time::{Duration, Instant};

use meterflow_model::watermark::{next_close, WatermarkPolicy};

/// What the control input told this worker (`control.rs`): the greatest committed watermark and the
/// greatest admin's floor it received.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Told {
    pub watermark: Option<i64>,
    pub floor: Option<i64>,
}

/// One of this worker's partitions as its reader read it.
#[derive(Clone, Copy, Debug)]
pub struct ReadPartition {
    pub partition: i32,
    /// The greatest event time read in this run (the watermark's input), if any event was.
    pub max_event_time_micros: Option<i64>,
    /// When a record of it was last read.
    pub last_read: Instant,
}

/// Whether this worker holds the global watermark below the next window close (the module's rule).
pub fn holds_the_watermark(
    told: Told,
    partitions: impl IntoIterator<Item = ReadPartition>,
    policy: &WatermarkPolicy,
    allowed_lateness_micros: i64,
    now: Instant,
) -> bool {
    let Some(committed) = told.watermark else {
        return false;
    };
    if told.floor > Some(committed) {
        return false; // the next commit closes windows up to the floor: it must come soon
    }
    let next = next_close(committed, allowed_lateness_micros);
    let recent = policy.idle_timeout.checked_div(2).unwrap_or_default();
    partitions.into_iter().any(|p| {
        let active = now.saturating_duration_since(p.last_read) < recent;
        // As the commit's `Watermarks` sees it: a restart goes on from the committed time.
        let greatest = p
            .max_event_time_micros
            .max(policy.initial.get(&p.partition).copied());
        let below =
            greatest.is_some_and(|t| t.saturating_sub(policy.out_of_orderness_micros) < next);
        active && below
    })
}

/// How long the current epoch lasts: `interval` (the catch-up interval already applied), or `hold`
/// while `holds` says this worker holds the watermark. `holds` is asked only once `interval` has
/// passed.
pub fn epoch_length(
    interval: Duration,
    hold: Option<Duration>,
    elapsed: Duration,
    holds: impl FnOnce() -> bool,
) -> Duration {
    match hold {
        Some(hold) if hold > interval && elapsed >= interval && holds() => hold,
        _ => interval,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: i64 = 60_000_000;
    const HOUR: i64 = 60 * MINUTE;

    fn policy() -> WatermarkPolicy {
        WatermarkPolicy {
            out_of_orderness_micros: 5_000_000,
            idle_timeout: Duration::from_secs(10),
            ..WatermarkPolicy::default()
        }
    }

    fn read(max: Option<i64>, ago: Duration, now: Instant) -> ReadPartition {
        ReadPartition {
            partition: 0,
            max_event_time_micros: max,
            last_read: now - ago,
        }
    }

    fn told(watermark: i64) -> Told {
        Told {
            watermark: Some(watermark),
            floor: None,
        }
    }

    #[test]
    fn a_partition_below_the_next_close_holds_the_watermark() {
        let now = Instant::now();
        let fresh = Duration::ZERO;
        // Committed at 10:00 with an hour's lateness: the next close is 10:01. A partition at
        // 10:01:04 has its watermark (−5 s) at 10:00:59, below it.
        let committed = 10 * HOUR;
        let holds = |parts: &[ReadPartition]| {
            holds_the_watermark(told(committed), parts.iter().copied(), &policy(), HOUR, now)
        };
        assert!(holds(&[read(
            Some(10 * HOUR + MINUTE + 4_000_000),
            fresh,
            now
        )]));
        // At 10:01:05 its watermark reaches the close: it holds nothing.
        assert!(!holds(&[read(
            Some(10 * HOUR + MINUTE + 5_000_000),
            fresh,
            now
        )]));
        // One partition of several is enough: the global watermark is their least.
        assert!(holds(&[
            read(Some(11 * HOUR), fresh, now),
            read(Some(10 * HOUR), fresh, now),
        ]));
        // A partition of dead letters only has no watermark; one not read for half the idle timeout
        // may soon stop holding the global watermark back.
        assert!(!holds(&[read(None, fresh, now)]));
        assert!(!holds(&[read(
            Some(10 * HOUR),
            Duration::from_secs(5),
            now
        )]));
        assert!(holds(&[read(Some(10 * HOUR), Duration::from_secs(4), now)]));
    }

    #[test]
    fn after_a_restart_a_partition_is_as_far_as_its_committed_time() {
        let now = Instant::now();
        // Committed before the restart: partition 0 had read up to 11:00.
        let restarted = WatermarkPolicy {
            initial: [(0, 11 * HOUR)].into(),
            ..policy()
        };
        let parts = [read(Some(10 * HOUR), Duration::ZERO, now)];
        assert!(holds_the_watermark(
            told(10 * HOUR),
            parts,
            &policy(),
            HOUR,
            now
        ));
        assert!(!holds_the_watermark(
            told(10 * HOUR),
            parts,
            &restarted,
            HOUR,
            now
        ));
    }

    #[test]
    fn nothing_is_held_without_a_committed_watermark_or_under_a_pending_floor() {
        let now = Instant::now();
        let parts = [read(Some(10 * HOUR), Duration::ZERO, now)];
        let policy = policy();
        let holds = |told: Told| holds_the_watermark(told, parts, &policy, HOUR, now);
        assert!(!holds(Told::default()));
        assert!(holds(told(10 * HOUR)));
        // An admin set a floor above the committed watermark: its commit is due.
        assert!(!holds(Told {
            watermark: Some(10 * HOUR),
            floor: Some(12 * HOUR),
        }));
        // Once committed, the floor is the watermark: the partition is below its next close.
        assert!(holds(Told {
            watermark: Some(12 * HOUR),
            floor: Some(12 * HOUR),
        }));
    }

    #[test]
    fn an_epoch_is_held_only_past_its_interval_and_only_while_held() {
        let s = Duration::from_secs;
        let asked = std::cell::Cell::new(0);
        let holds = |answer: bool| {
            asked.set(asked.get() + 1);
            answer
        };
        assert_eq!(epoch_length(s(2), Some(s(8)), s(1), || holds(true)), s(2));
        assert_eq!(asked.get(), 0, "not asked before the interval passed");
        assert_eq!(epoch_length(s(2), Some(s(8)), s(3), || holds(true)), s(8));
        assert_eq!(epoch_length(s(2), Some(s(8)), s(3), || holds(false)), s(2));
        assert_eq!(epoch_length(s(2), None, s(3), || holds(true)), s(2));
        // A hold shorter than the interval never shortens it.
        assert_eq!(epoch_length(s(9), Some(s(8)), s(9), || holds(true)), s(9));
    }
}
