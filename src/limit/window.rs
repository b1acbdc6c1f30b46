//! Exact sliding-window counting: the pure core of every `requests`/`per` limit.
//!
//! A GCRA or token bucket with burst = N may send 2N requests inside one window, which
//! Genesys' own sliding count answers with 429. This log remembers *when* each admitted
//! request was sent, so "at most N in any window of length W, at any offset" holds exactly.
//!
//! Memory: a plain log costs N timestamps per key (2.4 KB for 300/min). To bound that for
//! large N, sends that fall within `W / RESOLUTION_STEPS` of a slot's first send share that
//! slot, whose time is the *latest* of them: a slot may only expire later than its members would, never
//! earlier, so the guarantee still holds; the price is at most 1/RESOLUTION_STEPS of the
//! quota's throughput. A key therefore holds at most `min(N, RESOLUTION_STEPS + 1)` slots of
//! 16 bytes.
//!
//! Counts are `u64` (a `u32` would leave the slot 16 bytes too, through padding) and every
//! addition saturates: stand-in sends learned from an upstream ([`SlidingLog::record_many`])
//! are counted in one step, however many there are, and never overflow a slot.

use std::collections::VecDeque;

/// Nanoseconds since an arbitrary epoch of the caller's clock.
pub type Nanos = u64;

/// How many slots a full window is split into at most.
pub const RESOLUTION_STEPS: u64 = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    /// Latest send time of the requests counted in this slot.
    at: Nanos,
    count: u64,
}

/// The admitted sends of one key that are still inside the window.
#[derive(Debug, Clone, Default)]
pub struct SlidingLog {
    slots: VecDeque<Slot>,
    total: u64,
    /// Time of the first send in the last slot: a send joins that slot only within one
    /// resolution step of it, so a steady stream cannot keep one slot open (and its whole
    /// count unexpired) for ever.
    back_start: Nanos,
}

impl SlidingLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Drops every send that no longer lies in the window `(now - window, now]`.
    pub fn evict(&mut self, now: Nanos, window: Nanos) {
        while let Some(front) = self.slots.front() {
            if front.at.saturating_add(window) <= now {
                self.total = self.total.saturating_sub(front.count);
                self.slots.pop_front();
            } else {
                break;
            }
        }
    }

    /// Sends counted in the window ending at the last `evict`.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// How long from `now` until fewer than `ceiling` sends remain in the window; zero if
    /// there is room already. Call `evict` first.
    pub fn wait_for_room(&self, now: Nanos, window: Nanos, ceiling: u64) -> Nanos {
        if self.total < ceiling {
            return 0;
        }
        if ceiling == 0 {
            return window;
        }
        // The send that must expire is the (total - ceiling)-th oldest, counted from 0.
        let mut skip = self.total - ceiling;
        for slot in &self.slots {
            if skip < slot.count {
                return slot.at.saturating_add(window).saturating_sub(now);
            }
            skip -= slot.count;
        }
        window
    }

    /// Records a send at `now`. A `now` earlier than the last record (two threads read the
    /// clock in one order and lock in the other) counts as that record's time: later, so
    /// the send expires late rather than early, and the slots stay in order.
    pub fn record(&mut self, now: Nanos, window: Nanos) {
        self.record_many(now, window, 1);
    }

    /// Records `n` sends at `now` in one step (as [`SlidingLog::record`] would one by one).
    pub fn record_many(&mut self, now: Nanos, window: Nanos, n: u64) {
        if n == 0 {
            return;
        }
        let resolution = window / RESOLUTION_STEPS;
        match self.slots.back_mut() {
            // Within a step of the slot's first send, or a late clock reading (see above).
            Some(last) if now <= self.back_start.saturating_add(resolution) || now <= last.at => {
                last.at = last.at.max(now);
                last.count = last.count.saturating_add(n);
            }
            _ => {
                if self.slots.len() == self.slots.capacity() {
                    // Grow by an eighth rather than doubling: a key at full use keeps a log
                    // near its real size (150 slots for 300/min at a steady pace, not 256).
                    self.slots.reserve_exact((self.slots.len() / 8).max(4));
                }
                self.slots.push_back(Slot { at: now, count: n });
                self.back_start = now;
            }
        }
        self.total = self.total.saturating_add(n);
    }

    /// Takes back a send recorded at `at` (a refused or cancelled reservation).
    ///
    /// The slot that absorbed it is the first one whose time is not earlier than `at`:
    /// slots only move later, and every slot before it was closed before `at`.
    pub fn refund(&mut self, at: Nanos) {
        let idx = self.slots.partition_point(|s| s.at < at);
        if let Some(slot) = self.slots.get_mut(idx) {
            slot.count = slot.count.saturating_sub(1);
            self.total = self.total.saturating_sub(1);
            if slot.count == 0 {
                self.slots.remove(idx);
                if idx == self.slots.len() {
                    // The last slot is gone: the one before it is closed to new sends.
                    self.back_start = 0;
                }
            }
        }
    }

    /// True when nothing is counted, so the key may be forgotten.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Counted sends as (time, how many at that time), oldest first.
    pub fn entries(&self) -> impl Iterator<Item = (Nanos, u64)> + '_ {
        self.slots.iter().map(|s| (s.at, s.count))
    }

    /// Oldest counted send, if any.
    pub fn oldest(&self) -> Option<Nanos> {
        self.slots.front().map(|s| s.at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: Nanos = 1_000_000_000;

    #[test]
    fn admits_exactly_n_per_window() {
        let mut log = SlidingLog::new();
        let w = 10 * S;
        for i in 0..5 {
            log.evict(i * S, w);
            assert_eq!(log.wait_for_room(i * S, w, 5), 0);
            log.record(i * S, w);
        }
        log.evict(5 * S, w);
        assert_eq!(log.wait_for_room(5 * S, w, 5), 5 * S);
        assert_eq!(log.wait_for_room(5 * S, w, 3), 7 * S);
        log.evict(w, w);
        assert_eq!(log.count(), 4);
    }

    #[test]
    fn a_late_clock_reading_never_unorders_the_log() {
        let mut log = SlidingLog::new();
        let w = 10 * S;
        log.record(5 * S, w);
        log.record(S, w);
        let times: Vec<_> = log.entries().collect();
        assert_eq!(times, vec![(5 * S, 2)]);
    }

    #[test]
    fn many_sends_are_counted_in_one_slot_without_overflow() {
        let mut log = SlidingLog::new();
        let w = 10 * S;
        log.record(S, w);
        log.record_many(S, w, u64::MAX);
        log.record(S, w);
        assert_eq!(log.count(), u64::MAX);
        assert_eq!(log.entries().count(), 1);
        assert_eq!(log.wait_for_room(S, w, u64::MAX), w);
        log.refund(S);
        assert_eq!(log.count(), u64::MAX - 1);
        log.evict(11 * S, w);
        assert!(log.is_empty() && log.count() == 0);
    }

    #[test]
    fn a_steady_stream_expires_slot_by_slot() {
        // 300 per minute, one send every 200 ms: sends closer than a step (234 ms) share a
        // slot, but no slot spans more than a step, so the oldest sends expire on time.
        let mut log = SlidingLog::new();
        let w = 60 * S;
        let gap = S / 5;
        for i in 0..300 {
            log.evict(i * gap, w);
            assert_eq!(log.wait_for_room(i * gap, w, 300), 0, "send {i}");
            log.record(i * gap, w);
        }
        assert!(log.entries().count() >= 128, "{}", log.entries().count());
        log.evict(w, w);
        let wait = log.wait_for_room(w, w, 300);
        assert!(wait <= w / RESOLUTION_STEPS, "waits {wait} ns for room");
    }

    #[test]
    fn refund_restores_room() {
        let mut log = SlidingLog::new();
        let w = 10 * S;
        log.record(100, w);
        log.record(200, w);
        log.refund(100);
        assert_eq!(log.count(), 1);
        log.refund(200);
        assert!(log.is_empty());
    }

    proptest! {
        /// Greedy admission over random arrival times never puts more than `n` sends in any
        /// window of length `w` at any offset, and refunds leave no trace.
        #[test]
        fn never_more_than_n_in_any_window(
            n in 1u64..20,
            w_ms in 1u64..2_000,
            steps in proptest::collection::vec((0u64..50_000_000, any::<bool>()), 1..400),
        ) {
            let w = w_ms * 1_000_000;
            let mut log = SlidingLog::new();
            let mut now = 0;
            let mut sent: Vec<Nanos> = Vec::new();
            for (gap, cancel) in steps {
                now += gap;
                log.evict(now, w);
                if log.wait_for_room(now, w, n) == 0 {
                    log.record(now, w);
                    if cancel { log.refund(now); } else { sent.push(now); }
                }
            }
            for (i, &start) in sent.iter().enumerate() {
                let inside = sent[i..].iter().take_while(|&&t| t < start + w).count() as u64;
                prop_assert!(inside <= n, "{inside} sends in window starting {start}");
            }
            log.evict(now, w);
            let live = sent.iter().filter(|&&t| t + w > now).count() as u64;
            prop_assert!(log.count() >= live);
        }
    }
}
