//! The handle caches of [`super::Metrics`]: each metric family's handles by label values.

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::OnceLock;

/// Label sets whose handles are kept, per family (powers of two). Label values reaching
/// [`super::Metrics`] are bounded already (configured upstreams, endpoint templates, at most a few
/// hundred client labels, the bounded app names, enums), so these are rarely full; a label set that finds no slot
/// is recorded through the registry as before: the same result, only slower.
const REQUEST_SLOTS: usize = 8192;
const RESPONSE_SLOTS: usize = 8192;
const SHED_SLOTS: usize = 1024;
const INFLIGHT_SLOTS: usize = 1024;
const QUEUE_WAIT_SLOTS: usize = 1024;
const DURATION_SLOTS: usize = 64;
const REJECTED_SLOTS: usize = 256;
const SHADOW_SLOTS: usize = 1024;

/// Slots a look-up tries before it takes the uncached path.
const PROBES: usize = 8;

/// The handle caches of one [`super::Metrics`].
pub(super) struct Caches {
    pub(super) requests: HandleCache<metrics::Counter, 4>,
    pub(super) responses: HandleCache<metrics::Counter, 4>,
    pub(super) shed: HandleCache<metrics::Counter, 4>,
    pub(super) inflight: HandleCache<metrics::Gauge, 2>,
    pub(super) queue_wait: HandleCache<metrics::Histogram, 3>,
    pub(super) duration: HandleCache<metrics::Histogram, 1>,
    pub(super) rejected: HandleCache<metrics::Counter, 2>,
    pub(super) shadow_shed: HandleCache<metrics::Counter, 3>,
    pub(super) shadow_wait: HandleCache<metrics::Histogram, 2>,
}

impl Caches {
    /// Every family with at most `cap` slots (0: nothing cached).
    pub(super) fn new(cap: usize) -> Caches {
        let n = |slots: usize| slots.min(cap);
        Caches {
            requests: HandleCache::new(n(REQUEST_SLOTS)),
            responses: HandleCache::new(n(RESPONSE_SLOTS)),
            shed: HandleCache::new(n(SHED_SLOTS)),
            inflight: HandleCache::new(n(INFLIGHT_SLOTS)),
            queue_wait: HandleCache::new(n(QUEUE_WAIT_SLOTS)),
            duration: HandleCache::new(n(DURATION_SLOTS)),
            rejected: HandleCache::new(n(REJECTED_SLOTS)),
            shadow_shed: HandleCache::new(n(SHADOW_SLOTS)),
            shadow_wait: HandleCache::new(n(SHADOW_SLOTS)),
        }
    }
}

/// Handles of one metric family by label values: `N` strings and one small number (an enum's
/// index or a status code). Insert-only open addressing over a fixed array of `OnceLock`s:
/// a hit reads the slots it probes and writes nothing shared (no lock, no reference count);
/// a miss fills an empty slot once, racing writers settle on one entry per slot. Entries
/// live as long as the recorder's own (it removes none: no idle timeout is set).
pub(super) struct HandleCache<H, const N: usize> {
    slots: Box<[OnceLock<Box<Entry<H, N>>>]>,
    hasher: foldhash::fast::RandomState,
}

struct Entry<H, const N: usize> {
    strs: [Box<str>; N],
    num: u16,
    handle: H,
}

impl<H, const N: usize> Entry<H, N> {
    fn is(&self, strs: &[&str; N], num: u16) -> bool {
        self.num == num && self.strs.iter().zip(strs).all(|(a, b)| **a == **b)
    }
}

impl<H, const N: usize> HandleCache<H, N> {
    /// A cache of `slots` slots, rounded down to a power of two (0: caches nothing).
    fn new(slots: usize) -> Self {
        let slots = match slots {
            0 => 0,
            n => 1usize << n.ilog2(),
        };
        HandleCache {
            slots: (0..slots).map(|_| OnceLock::new()).collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// Runs `record` on the handle of this label set: the kept one, or one from `register`
    /// (which is called at most once), kept if a slot is free within [`PROBES`].
    pub(super) fn with<R>(
        &self,
        strs: [&str; N],
        num: u16,
        register: impl Fn() -> H,
        record: impl FnOnce(&H) -> R,
    ) -> R {
        match self.get(&strs, num, &register) {
            Some(h) => record(h),
            None => record(&register()),
        }
    }

    pub(super) fn get(&self, strs: &[&str; N], num: u16, register: &impl Fn() -> H) -> Option<&H> {
        if self.slots.is_empty() {
            return None;
        }
        let mut hasher = self.hasher.build_hasher();
        strs.hash(&mut hasher);
        num.hash(&mut hasher);
        let start = hasher.finish() as usize;
        let mask = self.slots.len() - 1;
        for probe in 0..PROBES.min(self.slots.len()) {
            let slot = &self.slots[start.wrapping_add(probe) & mask];
            let entry = slot.get_or_init(|| {
                Box::new(Entry {
                    strs: strs.map(Box::from),
                    num,
                    handle: register(),
                })
            });
            if entry.is(strs, num) {
                return Some(&entry.handle);
            }
        }
        None
    }

    /// Label sets kept.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.get().is_some()).count()
    }
}
