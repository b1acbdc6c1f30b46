//! The simulator's own sliding-window count: a plain sorted list of request times.
//!
//! Deliberately written apart from pacer's [`crate::limit::window::SlidingLog`], which
//! merges nearby sends into slots to bound its memory: the simulator is the oracle that
//! pacer's limiter is tested against, so the two must not share code (a bug in one would
//! be invisible to every test that trusts the other). This one is obviously correct
//! instead of compact: one timestamp per counted request. Its memory is bounded all the
//! same, because nothing is recorded past a limit's ceiling.

use crate::limit::window::Nanos;
use std::collections::VecDeque;

/// Times of the requests counted in a window, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Timestamps(VecDeque<Nanos>);

impl Timestamps {
    /// Forgets every request that no longer lies in the window `(now - window, now]`.
    pub(crate) fn evict(&mut self, now: Nanos, window: Nanos) {
        while self
            .0
            .front()
            .is_some_and(|&at| at.saturating_add(window) <= now)
        {
            self.0.pop_front();
        }
    }

    /// Requests counted (as of the last `evict`).
    pub(crate) fn count(&self) -> u64 {
        self.0.len() as u64
    }

    /// How long from `now` until fewer than `ceiling` requests remain in the window: the
    /// request that must leave first is the `count - ceiling`-th oldest. Zero when there is
    /// room; a whole window for a ceiling of zero. Call `evict` first.
    pub(crate) fn wait_for_room(&self, now: Nanos, window: Nanos, ceiling: u64) -> Nanos {
        if self.count() < ceiling {
            return 0;
        }
        if ceiling == 0 {
            return window;
        }
        let must_leave = usize::try_from(self.count() - ceiling).unwrap_or(usize::MAX);
        self.0
            .get(must_leave)
            .map_or(window, |&at| at.saturating_add(window).saturating_sub(now))
    }

    /// Counts one request at `now`, keeping the list sorted.
    pub(crate) fn record(&mut self, now: Nanos) {
        let at = self.0.partition_point(|&t| t <= now);
        self.0.insert(at, now);
    }

    /// The oldest request counted.
    pub(crate) fn oldest(&self) -> Option<Nanos> {
        self.0.front().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_exactly_the_requests_of_the_last_window() {
        let mut t = Timestamps::default();
        for at in [0, 1, 5] {
            t.record(at);
        }
        t.evict(10, 10);
        assert_eq!((t.count(), t.oldest()), (2, Some(1)), "0 left at 10");
        assert_eq!(t.wait_for_room(10, 10, 2), 1, "1 leaves at 11");
        assert_eq!(t.wait_for_room(10, 10, 1), 5, "5 leaves at 15");
        assert_eq!(t.wait_for_room(10, 10, 3), 0);
        assert_eq!(t.wait_for_room(10, 10, 0), 10);
    }

    #[test]
    fn a_late_record_stays_in_order() {
        let mut t = Timestamps::default();
        t.record(5);
        t.record(3);
        t.evict(13, 10);
        assert_eq!((t.count(), t.oldest()), (1, Some(5)));
    }

    proptest::proptest! {
        /// The oracle and pacer's limiter log (recording without merging) agree on every
        /// count and wait, so a bug in either shows up against the other.
        #[test]
        fn agrees_with_the_limiters_log(
            gaps in proptest::collection::vec(0u64..2_000, 1..200),
            window in 1u64..5_000,
            ceiling in 0u64..20,
        ) {
            use crate::limit::window::SlidingLog;
            let (mut oracle, mut log) = (Timestamps::default(), SlidingLog::new());
            let mut now = 0;
            for gap in gaps {
                now += gap;
                oracle.evict(now, window);
                log.evict(now, window);
                proptest::prop_assert_eq!(oracle.count(), log.count());
                proptest::prop_assert_eq!(oracle.oldest(), log.oldest());
                let wait = oracle.wait_for_room(now, window, ceiling);
                proptest::prop_assert_eq!(wait, log.wait_for_room(now, window, ceiling));
                if wait == 0 {
                    oracle.record(now);
                    log.record(now, 0);
                }
            }
        }
    }
}
