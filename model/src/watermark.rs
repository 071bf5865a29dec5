//! The event-time watermark policy (SPEC §4): from how far each partition has been read to the global
//! watermark the sink commits. Pure: the caller says what time it is, so tests need no clock.
//!
//! ```text
//!  PartitionProgress (max event time read) ──observe(now)──► per partition: (greatest time, last seen)
//!                                                             │
//!  global(now) = min over partitions seen within idle_timeout ┘ (all idle: the max of them)
//!                − out_of_orderness
//! ```
//! An idle partition stops holding the watermark back, so one quiet partition never stalls
//! finalization; the watermark itself never goes back (the sink keeps the greatest committed).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::batch::PartitionProgress;
use crate::window::Window;

/// Every window ends on a whole minute: minute, hour and day windows, aligned to UTC (SPEC §4).
const WINDOW_GRAIN_MICROS: i64 = Window::Minute.seconds() * 1_000_000;

/// The least watermark above `watermark` that closes a window. A window closes once the watermark
/// reaches its end plus the allowed lateness, and every end is a whole minute; so while the
/// watermark stays below this, it closes nothing that `watermark` had not closed.
pub fn next_close(watermark: i64, allowed_lateness_micros: i64) -> i64 {
    let above = watermark.saturating_add(1);
    // Both remainders are in [0, grain): their difference cannot overflow.
    let to_next = allowed_lateness_micros
        .rem_euclid(WINDOW_GRAIN_MICROS)
        .saturating_sub(above.rem_euclid(WINDOW_GRAIN_MICROS))
        .rem_euclid(WINDOW_GRAIN_MICROS);
    above.saturating_add(to_next)
}

/// How the global watermark follows the partitions.
#[derive(Clone, Debug)]
pub struct WatermarkPolicy {
    /// How far behind the slowest active partition's greatest event time the watermark trails.
    pub out_of_orderness_micros: i64,
    /// A partition with no record for this long stops holding the watermark back.
    pub idle_timeout: Duration,
    /// The greatest event time per partition as last committed (a restart goes on from there).
    pub initial: HashMap<i32, i64>,
}

impl Default for WatermarkPolicy {
    fn default() -> Self {
        WatermarkPolicy {
            out_of_orderness_micros: 5_000_000,
            idle_timeout: Duration::from_secs(10),
            initial: HashMap::new(),
        }
    }
}

/// Per-partition event-time progress under a [`WatermarkPolicy`].
#[derive(Clone, Debug)]
pub struct Watermarks {
    policy: WatermarkPolicy,
    /// Per partition: the greatest event time read, and when a record last came.
    partitions: HashMap<i32, (i64, Instant)>,
}

impl Watermarks {
    /// Starts from the policy's initial times, each as seen at `now`.
    pub fn new(policy: WatermarkPolicy, now: Instant) -> Self {
        let partitions = policy
            .initial
            .iter()
            .map(|(p, t)| (*p, (*t, now)))
            .collect();
        Watermarks { policy, partitions }
    }

    /// Takes in how far a partition has been read, at `now`.
    pub fn observe(&mut self, progress: &PartitionProgress, now: Instant) {
        if let Some(t) = progress.max_event_time_micros {
            let entry = self
                .partitions
                .entry(progress.partition)
                .or_insert((t, now));
            entry.0 = entry.0.max(t);
            entry.1 = now;
        }
    }

    /// The global watermark at `now`, if any partition has been read.
    pub fn global(&self, now: Instant) -> Option<i64> {
        let idle =
            |seen: &Instant| now.saturating_duration_since(*seen) >= self.policy.idle_timeout;
        let active = self
            .partitions
            .values()
            .filter(|(_, seen)| !idle(seen))
            .map(|(t, _)| *t)
            .min();
        let highest = active.or_else(|| self.partitions.values().map(|(t, _)| *t).max())?;
        Some(highest.saturating_sub(self.policy.out_of_orderness_micros))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(partition: i32, t: i64) -> PartitionProgress {
        PartitionProgress {
            partition,
            next_offset: 1,
            max_event_time_micros: Some(t),
        }
    }

    #[test]
    fn the_slowest_active_partition_holds_the_watermark_and_an_idle_one_does_not() {
        let start = Instant::now();
        let policy = WatermarkPolicy {
            out_of_orderness_micros: 5,
            idle_timeout: Duration::from_secs(10),
            initial: HashMap::new(),
        };
        let mut w = Watermarks::new(policy, start);
        assert_eq!(w.global(start), None);
        w.observe(&read(0, 100), start);
        w.observe(&read(1, 40), start);
        assert_eq!(w.global(start), Some(35));
        // Event times never go back per partition.
        w.observe(&read(1, 30), start);
        assert_eq!(w.global(start), Some(35));
        // Partition 1 goes quiet; 0 keeps coming.
        let later = start + Duration::from_secs(11);
        w.observe(&read(0, 200), later);
        assert_eq!(w.global(later), Some(195));
        // Everything idle: the greatest time read stands.
        let much_later = later + Duration::from_secs(60);
        assert_eq!(w.global(much_later), Some(195));
    }

    #[test]
    fn the_next_close_is_the_first_minute_end_plus_lateness_above_the_watermark() {
        const MINUTE: i64 = 60_000_000;
        const HOUR: i64 = 60 * MINUTE;
        // Lateness of an hour: windows close on whole minutes.
        assert_eq!(next_close(10 * MINUTE, HOUR), 11 * MINUTE);
        assert_eq!(next_close(10 * MINUTE - 1, HOUR), 10 * MINUTE);
        assert_eq!(next_close(10 * MINUTE + 1, HOUR), 11 * MINUTE);
        // Lateness of 90 s: half past each minute.
        assert_eq!(
            next_close(10 * MINUTE, 90_000_000),
            10 * MINUTE + 30_000_000
        );
        assert_eq!(
            next_close(10 * MINUTE + 30_000_000, 90_000_000),
            11 * MINUTE + 30_000_000
        );
        // Before 1970, and at the ends of the range: no overflow.
        assert_eq!(next_close(-MINUTE - 5, 0), -MINUTE);
        assert_eq!(next_close(i64::MAX, HOUR), i64::MAX);
        assert!(next_close(i64::MIN, HOUR) > i64::MIN);
    }

    #[test]
    fn a_restart_goes_on_from_the_committed_times() {
        let now = Instant::now();
        let policy = WatermarkPolicy {
            out_of_orderness_micros: 0,
            initial: HashMap::from([(0, 50), (1, 70)]),
            ..WatermarkPolicy::default()
        };
        let mut w = Watermarks::new(policy, now);
        assert_eq!(w.global(now), Some(50));
        w.observe(&read(0, 90), now);
        assert_eq!(w.global(now), Some(70));
    }
}
