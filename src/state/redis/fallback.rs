//! When a replica decides with local shares instead of Redis, and when it goes back.
//!
//! Redis unreachable or slower than `timeout` counts as a failure; [`BREAKER_FAILURES`] in
//! a row open a breaker, and any failure switches to [`Local`] shares (`quota / replicas`,
//! padded with what this replica last saw used in Redis, see [`Observed`]). Only the
//! heartbeat ends local mode: it replays this replica's sends into Redis, then
//! [`Health`] waits [`SETTLE`] and for the peers to be back (at most [`SETTLE_MAX`]).
//! [`Health`] is a plain state machine: every transition takes the time it happens at.

use crate::limit::window::Nanos;
use crate::limit::{Blocked, Demand, LayerKey, Ledger, LimitSet};
use crate::state::{Clock, Grant};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// Consecutive failures that open the breaker.
pub(super) const BREAKER_FAILURES: u32 = 3;
/// Least time between Redis answering again and its use: every replica reconnects (at most
/// `MAX_RECONNECT` apart) and replays its local sends first.
pub(super) const SETTLE: Duration = Duration::from_secs(3);
/// After the settle time a replica also waits until as many replicas as it knew of are
/// heartbeating again (each replays before its first heartbeat), so a peer that comes back
/// late cannot have sends Redis misses; this long at most, for a peer that never returns.
pub(super) const SETTLE_MAX: Duration = Duration::from_secs(10);
/// How long the breaker opens after a heartbeat closed it (see [`Health::failed`]).
const FIRST_BREAKER: Duration = Duration::from_millis(250);
/// Longest the breaker stays open at once.
const MAX_BREAKER: Duration = Duration::from_secs(30);

/// Whether Redis answers, whether requests use it, and the recovery after an outage.
#[derive(Debug)]
pub(super) struct Health {
    /// Redis answered the last heartbeat, and no breaker opened since.
    up: bool,
    /// Failures in a row.
    failures: u32,
    /// Requests skip Redis until then.
    open_until: Option<Instant>,
    /// How long the breaker opens next time.
    backoff: Duration,
    /// True while decisions are made with local shares.
    in_fallback: bool,
    /// When this replica replayed its local sends into Redis after an outage; Redis is
    /// used again `SETTLE` later, once every peer is back too, so none admits against
    /// windows that miss another's sends.
    replayed_at: Option<Instant>,
    /// As many replicas as this one knows of heartbeat Redis now (set by the heartbeat).
    peers_back: bool,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            up: false,
            failures: 0,
            open_until: None,
            backoff: FIRST_BREAKER,
            in_fallback: false,
            replayed_at: None,
            peers_back: false,
        }
    }
}

impl Health {
    /// May a request at `now` use Redis? Not while the breaker is open or local shares are
    /// in force (which this ends once settled).
    pub fn use_redis(&mut self, now: Instant) -> bool {
        if self.open_until.is_some_and(|t| t > now) {
            return false;
        }
        self.leave_fallback_if_settled(now)
    }

    /// Up, and no longer deciding locally (which this ends once settled).
    pub fn is_up(&mut self, now: Instant) -> bool {
        self.up && self.leave_fallback_if_settled(now)
    }

    /// Redis answered the last heartbeat.
    pub fn up(&self) -> bool {
        self.up
    }

    /// True while decisions are made with local shares.
    pub fn in_fallback(&self) -> bool {
        self.in_fallback
    }

    /// Deciding locally, and this replica's sends not yet replayed into Redis.
    pub fn recovering(&self) -> bool {
        self.in_fallback && self.replayed_at.is_none()
    }

    /// False while deciding locally; ends local mode once the settle time after the replay
    /// has passed and the peers are back (or `SETTLE_MAX` has passed).
    pub fn leave_fallback_if_settled(&mut self, now: Instant) -> bool {
        if !self.in_fallback {
            return true;
        }
        let settled = |at: Instant| {
            let waited = now.saturating_duration_since(at);
            waited >= SETTLE && (self.peers_back || waited >= SETTLE_MAX)
        };
        match self.replayed_at {
            Some(at) if settled(at) => {
                self.replayed_at = None;
                self.in_fallback = false;
                tracing::info!("redis reachable: quotas shared again");
                true
            }
            _ => false,
        }
    }

    /// Redis failed a request or a heartbeat at `now`.
    pub fn failed(&mut self, why: &str, now: Instant) {
        // A failure while settling after an outage starts the recovery over.
        self.replayed_at = None;
        self.failures += 1;
        if self.failures >= BREAKER_FAILURES && self.open_until.is_none() {
            tracing::warn!(reason = why, "redis unreachable: using local shares");
            self.open_until = Some(now + self.backoff);
            self.backoff = (self.backoff * 2).min(MAX_BREAKER);
            self.up = false;
        }
    }

    /// Redis answered a request.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// Switches to local shares; true when this call switched (the caller pads them).
    pub fn enter_fallback(&mut self) -> bool {
        if self.in_fallback {
            return false;
        }
        self.in_fallback = true;
        self.peers_back = false;
        true
    }

    /// This replica's sends were replayed into Redis at `now`: settling starts.
    pub fn replayed(&mut self, now: Instant) {
        self.replayed_at = Some(now);
    }

    /// A heartbeat went through: the breaker closes, and Redis is up.
    pub fn reachable(&mut self) {
        self.failures = 0;
        self.open_until = None;
        self.backoff = FIRST_BREAKER;
        self.up = true;
    }

    /// No connection, or a heartbeat failed.
    pub fn unreachable(&mut self) {
        self.up = false;
    }

    /// Whether as many replicas as this one knows of heartbeat Redis now.
    pub fn peers_back(&mut self, back: bool) {
        self.peers_back = back;
    }
}

/// The shared use last seen per rate key: (count, when). Keys are caller input, so the map
/// is bounded: entries leave once their window has passed (they would pad nothing), and at
/// `max` keys a new key is not remembered until such entries are gone.
pub(super) struct Observed {
    pub(super) seen: HashMap<LayerKey, (u64, Nanos)>,
    max: usize,
    /// When the map was last pruned; a full map is pruned at most every `PRUNE_EVERY`, so a
    /// flood of new keys costs O(1) per admission.
    pruned_at: Option<Nanos>,
}

/// Least time between two prunings of a full [`Observed`] map.
const PRUNE_EVERY: Nanos = 1_000_000_000;

impl Observed {
    pub(super) fn new(max: usize) -> Self {
        Observed {
            seen: HashMap::new(),
            max: max.max(1),
            pruned_at: None,
        }
    }

    /// Remembers `count` for `layer` seen at `now`, unless the map is full of live keys.
    pub(super) fn insert(&mut self, set: &LimitSet, layer: &LayerKey, count: u64, now: Nanos) {
        if let Some(entry) = self.seen.get_mut(layer) {
            *entry = (count, now);
            return;
        }
        if self.seen.len() >= self.max
            && self
                .pruned_at
                .is_none_or(|at| now.saturating_sub(at) >= PRUNE_EVERY)
        {
            self.prune(set, now);
        }
        // Full of keys seen within their window: this one is not padded on a switch to
        // local shares (its replica's own sends still are, through the mirror).
        if self.seen.len() < self.max {
            self.seen.insert(layer.clone(), (count, now));
        }
    }

    /// Forgets keys whose window has passed since they were seen.
    pub(super) fn prune(&mut self, set: &LimitSet, now: Nanos) {
        self.seen.retain(|layer, (_, at)| {
            set.specs
                .get(layer.limit)
                .is_some_and(|spec| now.saturating_sub(*at) < spec.window)
        });
        self.pruned_at = Some(now);
    }
}

/// The local shares (every quota divided by the replicas) and, in their ledger, the mirror
/// of this replica's own sends through Redis, so its recent use still counts on a switch.
pub(super) struct Local {
    clock: Clock,
    shares: Mutex<(Arc<LimitSet>, Ledger)>,
}

impl Local {
    /// Shares of `set` for `replicas`, timed by `clock`.
    pub fn new(set: &LimitSet, replicas: u64, clock: Clock) -> Self {
        Local {
            clock,
            shares: Mutex::new((Arc::new(set.scaled(replicas)), Ledger::new())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, (Arc<LimitSet>, Ledger)> {
        // The ledger is plain counters; after a panic elsewhere keep serving with them.
        self.shares.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the shares and the ledger, with the time read under the lock so that
    /// records stay in order.
    pub fn with<R>(&self, f: impl FnOnce(&LimitSet, &mut Ledger, Nanos) -> R) -> R {
        let mut shares = self.lock();
        let (set, ledger) = &mut *shares;
        let set = set.clone();
        f(&set, ledger, self.clock.now())
    }

    /// The shares of `set` are now for `replicas`.
    pub fn rescale(&self, set: &LimitSet, replicas: u64) {
        let scaled = Arc::new(set.scaled(replicas));
        self.lock().0 = scaled;
    }

    /// Decides with the local shares; the request also lands in the mirror.
    pub fn take(&self, demand: &Demand, ahead: &[u64]) -> Result<Grant, Blocked> {
        self.with(|set, ledger, now| {
            let index = |l: &LayerKey| demand.layers.iter().position(|x| x == l);
            let ahead_of = |l: &LayerKey| index(l).and_then(|i| ahead.get(i).copied()).unwrap_or(0);
            let shadow = ledger.shadow_blocks(set, now, demand);
            let taken = ledger.try_take(set, now, demand, &ahead_of)?;
            let headroom = ledger.tightest(set, now, demand);
            Ok(Grant {
                taken,
                headroom,
                shadow,
            })
        })
    }

    /// Leaving shared mode: other replicas' recent sends are unknown here. Every key this
    /// replica used or saw (`seen`, with when) in the last window is padded to its full
    /// local share with stand-in sends made now, so until they expire it may only send as
    /// its own earlier sends expire. Each replica then sends no more in any window than it
    /// did before the switch, and together they stay within the quota (their earlier sends
    /// were).
    pub fn pad_seen(&self, seen: Vec<(LayerKey, Nanos)>) {
        self.with(|set, ledger, now| {
            for (layer, at) in seen {
                let spec = &set.specs[layer.limit];
                if let (Some(share), true) = (spec.requests, now.saturating_sub(at) < spec.window) {
                    ledger.pad(set, now, &layer, share);
                }
            }
        });
    }

    /// Keys with state in the ledger.
    pub fn key_count(&self) -> usize {
        self.lock().1.len()
    }

    /// True when `key` has state in the ledger.
    pub fn has_key(&self, key: &LayerKey) -> bool {
        self.lock().1.has(key)
    }
}

#[cfg(test)]
mod tests;
