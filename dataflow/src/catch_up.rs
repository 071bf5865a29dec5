//! How long an epoch may be held open while the reader is behind the topic's end (issue 15): past the
//! catch-up interval, for as long as this worker holds the global watermark below the next window
//! close, up to the hold bound.
//!
//! ```text
//!   reader's last batch full? ──no──► epoch_interval
//!          │ yes
//!          ▼
//!   at least catch_up_interval ──► and up to catch_up_hold while this worker holds the watermark:
//!                                  one of its partitions, read within the catch-up interval, has its
//!                                  watermark (greatest event time − out-of-orderness) below
//!                                  next_close(committed watermark); none read in this epoch has gone
//!                                  quiet for the catch-up interval; no admin's floor awaits its commit
//! ```
//!
//! Why holding keeps SPEC §4 ("a window is finalized within 5 s of the watermark passing its close"):
//! the global watermark is the least over the active partitions, so while one active partition stays
//! below the next close above the committed watermark, the global one stays below it too, and no
//! window closes that the committed watermark had not closed already, on any worker. A worker whose
//! partitions are all past that close holds nothing and ends its epochs at the catch-up interval; the
//! holder ends its own as soon as its partition passes the close, goes quiet, or an admin sets a floor.
//!
//! Why a quiet partition ends the hold: the commit learns that a partition was read from the marker
//! sent when the epoch ends, and starts the partition's idle clock then (`commit.rs`). A partition read
//! early in a held epoch and quiet since would look active to the commit for as long as the hold
//! lasted past its last record, and hold the global watermark back that much longer than SPEC §4's
//! idle timeout says. Ending the hold once one has been quiet for the catch-up interval keeps that
//! error where unheld epochs already had it.
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
    /// Whether it was read in the current epoch (its marker, and so the commit's idle clock, waits
    /// for the epoch's end).
    pub read_this_epoch: bool,
}

/// Whether this worker holds the global watermark below the next window close (the module's rule).
/// `quiet` is the catch-up interval: a partition not read for that long holds nothing, and one read
/// in this epoch and quiet that long ends the hold.
pub fn holds_the_watermark(
    told: Told,
    partitions: impl IntoIterator<Item = ReadPartition>,
    policy: &WatermarkPolicy,
    allowed_lateness_micros: i64,
    quiet: Duration,
    now: Instant,
) -> bool {
    let Some(committed) = told.watermark else {
        return false;
    };
    if told.floor > Some(committed) {
        return false; // the next commit closes windows up to the floor: it must come soon
    }
    let next = next_close(committed, allowed_lateness_micros);
    let mut holding = false;
    for p in partitions {
        let active = now.saturating_duration_since(p.last_read) < quiet;
        if p.read_this_epoch && !active {
            return false; // gone quiet: the commit must see its marker soon
        }
        // As the commit's `Watermarks` sees it: a restart goes on from the committed time, and a
        // partition whose records had no event time (dead letters only) is not seen at all.
        let greatest = p
            .max_event_time_micros
            .map(|t| t.max(policy.initial.get(&p.partition).copied().unwrap_or(t)));
        let below =
            greatest.is_some_and(|t| t.saturating_sub(policy.out_of_orderness_micros) < next);
        holding |= active && below;
    }
    holding
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
    /// The catch-up interval.
    const QUIET: Duration = Duration::from_secs(2);

    fn policy() -> WatermarkPolicy {
        WatermarkPolicy {
            out_of_orderness_micros: 5_000_000,
            idle_timeout: Duration::from_secs(10),
            ..WatermarkPolicy::default()
        }
    }

    /// Partition 0, read `ago`, before this epoch.
    fn read(max: Option<i64>, ago: Duration, now: Instant) -> ReadPartition {
        ReadPartition {
            partition: 0,
            max_event_time_micros: max,
            last_read: now - ago,
            read_this_epoch: false,
        }
    }

    /// Partition `partition`, read `ago`, in this epoch.
    fn read_in_epoch(partition: i32, max: i64, ago: Duration, now: Instant) -> ReadPartition {
        ReadPartition {
            partition,
            max_event_time_micros: Some(max),
            last_read: now - ago,
            read_this_epoch: true,
        }
    }

    fn told(watermark: i64) -> Told {
        Told {
            watermark: Some(watermark),
            floor: None,
        }
    }

    fn holds(told: Told, parts: &[ReadPartition], policy: &WatermarkPolicy, now: Instant) -> bool {
        holds_the_watermark(told, parts.iter().copied(), policy, HOUR, QUIET, now)
    }

    #[test]
    fn a_partition_below_the_next_close_holds_the_watermark() {
        let now = Instant::now();
        let fresh = Duration::ZERO;
        // Committed at 10:00 with an hour's lateness: the next close is 10:01. A partition at
        // 10:01:04 has its watermark (−5 s) at 10:00:59, below it.
        let at_ten = |parts: &[ReadPartition]| holds(told(10 * HOUR), parts, &policy(), now);
        assert!(at_ten(&[read(
            Some(10 * HOUR + MINUTE + 4_000_000),
            fresh,
            now
        )]));
        // At 10:01:05 its watermark reaches the close: it holds nothing.
        assert!(!at_ten(&[read(
            Some(10 * HOUR + MINUTE + 5_000_000),
            fresh,
            now
        )]));
        // One partition of several is enough: the global watermark is their least.
        assert!(at_ten(&[
            read(Some(11 * HOUR), fresh, now),
            read(Some(10 * HOUR), fresh, now),
        ]));
        // A partition of dead letters only has no watermark; one not read for the catch-up
        // interval may soon stop holding the global watermark back.
        assert!(!at_ten(&[read(None, fresh, now)]));
        assert!(!at_ten(&[read(Some(10 * HOUR), QUIET, now)]));
        assert!(at_ten(&[read(
            Some(10 * HOUR),
            Duration::from_secs(1),
            now
        )]));
    }

    /// Review of this change: a partition read early in a held epoch and quiet since would look
    /// active to the commit until the epoch ended, past SPEC §4's idle timeout.
    #[test]
    fn a_partition_gone_quiet_in_the_epoch_ends_the_hold() {
        let now = Instant::now();
        let holder = read(Some(10 * HOUR), Duration::ZERO, now);
        let at_ten = |parts: &[ReadPartition]| holds(told(10 * HOUR), parts, &policy(), now);
        let second = Duration::from_secs(1);
        assert!(at_ten(&[holder, read_in_epoch(1, 11 * HOUR, second, now)]));
        assert!(!at_ten(&[holder, read_in_epoch(1, 11 * HOUR, QUIET, now)]));
        // Quiet since an earlier epoch: the commit saw its marker when that epoch ended.
        assert!(at_ten(&[holder, read(Some(11 * HOUR), 3 * QUIET, now)]));
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
        assert!(holds(told(10 * HOUR), &parts, &policy(), now));
        assert!(!holds(told(10 * HOUR), &parts, &restarted, now));
        // Read since the restart, but no event time (dead letters only): the commit does not see it
        // (review of this change), so it holds nothing whatever its committed time.
        let below = WatermarkPolicy {
            initial: [(0, 9 * HOUR)].into(),
            ..policy()
        };
        assert!(!holds(
            told(10 * HOUR),
            &[read(None, Duration::ZERO, now)],
            &below,
            now
        ));
    }

    #[test]
    fn nothing_is_held_without_a_committed_watermark_or_under_a_pending_floor() {
        let now = Instant::now();
        let parts = [read(Some(10 * HOUR), Duration::ZERO, now)];
        let at = |told: Told| holds(told, &parts, &policy(), now);
        assert!(!at(Told::default()));
        assert!(at(told(10 * HOUR)));
        // An admin set a floor above the committed watermark: its commit is due.
        assert!(!at(Told {
            watermark: Some(10 * HOUR),
            floor: Some(12 * HOUR),
        }));
        // Once committed, the floor is the watermark: the partition is below its next close.
        assert!(at(Told {
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
