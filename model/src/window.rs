//! Tumbling windows aligned to UTC (SPEC §4).

use serde::{Deserialize, Serialize};

/// The length of a tumbling window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Window {
    Minute,
    Hour,
    Day,
}

impl Window {
    /// The window's length in seconds.
    pub const fn seconds(self) -> i64 {
        match self {
            Window::Minute => 60,
            Window::Hour => 3_600,
            Window::Day => 86_400,
        }
    }

    /// The start, in seconds since the epoch, of the window holding `micros` (microseconds since the epoch).
    /// Floors towards negative infinity, so instants before 1970 land in the right window too.
    pub fn start_of(self, micros: i64) -> i64 {
        let secs = micros.div_euclid(1_000_000);
        secs.saturating_sub(secs.rem_euclid(self.seconds()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;

    #[test]
    fn an_instant_falls_in_the_hour_that_contains_it() {
        let t = DateTime::parse_from_rfc3339("2024-01-15T14:30:00Z")
            .unwrap()
            .timestamp_micros();
        let start = Window::Hour.start_of(t);
        assert_eq!(
            DateTime::from_timestamp(start, 0).unwrap().to_rfc3339(),
            "2024-01-15T14:00:00+00:00"
        );
    }

    #[test]
    fn the_first_instant_of_a_window_belongs_to_it_and_the_last_to_the_one_before() {
        let t = DateTime::parse_from_rfc3339("2024-01-15T14:00:00Z")
            .unwrap()
            .timestamp_micros();
        assert_eq!(Window::Hour.start_of(t), t / 1_000_000);
        assert_eq!(Window::Hour.start_of(t - 1), t / 1_000_000 - 3_600);
    }

    #[test]
    fn instants_before_1970_floor_to_their_window() {
        assert_eq!(Window::Minute.start_of(-1), -60);
    }
}
