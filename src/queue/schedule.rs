//! Scheduling: who waits, in what order, and when to look again. Waiters queue per
//! priority class, each caller's in the fair order of its apps (see [`super::fair`]) and
//! callers in arrival order; one task admits them whenever room may have appeared (a
//! release or refund, a new waiter, or the earliest time a blocked layer opens), predicted
//! from what blocked them, never by polling; upstream pauses hold them back.

use super::fair::{pace, Fair};
use super::reservation::Reservation;
use super::{PauseKey, Shared};
use crate::limit::window::Nanos;
use crate::limit::{Blocked, Demand, LayerKey};
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

/// A request waiting for room.
pub(super) struct Waiter {
    demand: Arc<Demand>,
    pause: Option<PauseKey>,
    /// Not admitted before this (pause end plus jitter).
    not_before: Nanos,
    /// Its place in its caller's fair order.
    tag: f64,
    /// Requests with the same signature are blocked by the same thing.
    signature: u64,
    /// What blocked it last, for the answer if it times out.
    pub(super) last_blocked: Option<Blocked>,
    tx: oneshot::Sender<Reservation>,
}

/// The queue's bookkeeping, behind the controller's lock.
#[derive(Default)]
pub(super) struct State {
    /// Waiters by (priority, arrival).
    waiters: BTreeMap<(usize, u64), Waiter>,
    /// The order they are admitted in: per caller, across its apps in turn.
    pub(super) fair: Fair,
    /// Waiting requests per layer and class.
    waiting: HashMap<LayerKey, [u64; 3]>,
    /// Waiting requests per priority class.
    pub(super) depth: [usize; 3],
    /// Waiting requests per upstream and priority class.
    pub(super) depth_by_upstream: HashMap<usize, [usize; 3]>,
    /// When each paused key may send again.
    pub(super) pauses: HashMap<PauseKey, Nanos>,
    seq: u64,
}

impl State {
    /// Takes a waiter out of the queue; `admitted` when it leaves with a reservation.
    fn remove_waiter(&mut self, key: (usize, u64), admitted: bool) -> Option<Waiter> {
        let w = self.waiters.remove(&key)?;
        self.fair
            .remove(&w.pause, key.0, key.1, w.tag, &w.demand, admitted);
        for layer in &w.demand.layers {
            if let Some(c) = self.waiting.get_mut(layer) {
                c[key.0] = c[key.0].saturating_sub(1);
                if c.iter().all(|&n| n == 0) {
                    self.waiting.remove(layer);
                }
            }
        }
        self.depth[key.0] = self.depth[key.0].saturating_sub(1);
        if let Some(d) = self.depth_by_upstream.get_mut(&w.demand.upstream) {
            d[key.0] = d[key.0].saturating_sub(1);
        }
        Some(w)
    }

    /// Pauses `key` until `until` (or longer, if it already is). At most `cap` keys are
    /// paused: when full, ended pauses go first, then the eighth that end soonest (losing
    /// one costs at most one more upstream 429), so inserts stay amortized O(1).
    pub(super) fn pause(&mut self, key: PauseKey, until: Nanos, now: Nanos, cap: usize) {
        let cap = cap.max(1);
        if self.pauses.len() >= cap && !self.pauses.contains_key(&key) {
            self.pauses.retain(|_, end| *end > now);
            if self.pauses.len() >= cap {
                let mut ends: Vec<(Nanos, PauseKey)> =
                    self.pauses.iter().map(|(k, &e)| (e, k.clone())).collect();
                let evict = (ends.len() / 8).max(1);
                ends.select_nth_unstable_by_key(evict - 1, |(e, _)| *e);
                for (_, k) in &ends[..evict] {
                    self.pauses.remove(k);
                }
            }
        }
        let entry = self.pauses.entry(key).or_insert(0);
        *entry = (*entry).max(until);
    }

    pub(super) fn paused_until(&self, key: &Option<PauseKey>, now: Nanos) -> Option<Nanos> {
        let until = *self.pauses.get(key.as_ref()?)?;
        (until > now).then_some(until)
    }

    /// Waiting requests admitted before `demand` would be, per layer of `demand`: those of
    /// higher priority, other callers' of its priority, and its caller's that go before it
    /// in the fair order of its apps (not every waiter of its class: a modest app's request
    /// behind a runaway app's backlog is not shed for the backlog's sake).
    pub(super) fn ahead(&self, demand: &Demand, pause: &Option<PauseKey>) -> Vec<u64> {
        let top = demand.priority.index();
        let in_turn = self.fair.ahead_in_turn(pause, demand);
        demand
            .layers
            .iter()
            .zip(in_turn)
            .map(|(l, (before, mine))| {
                let Some(c) = self.waiting.get(l) else {
                    return 0;
                };
                let higher: u64 = c[..top].iter().sum();
                higher + c[top].saturating_sub(mine) + before
            })
            .collect()
    }

    /// Waiting requests per layer, all classes together.
    pub(super) fn waiting_by_layer(&self) -> HashMap<LayerKey, u64> {
        self.waiting
            .iter()
            .map(|(k, c)| (k.clone(), c.iter().sum()))
            .collect()
    }

    /// Requests waiting in all classes.
    pub(super) fn queued(&self) -> usize {
        self.depth.iter().sum()
    }

    /// Queues `demand` behind those of its class, admitted no earlier than `not_before`;
    /// `blocked` is what refused it last. Returns where the reservation will come, and the
    /// waiter's key (see [`WaiterGuard`]).
    pub(super) fn enqueue(
        &mut self,
        demand: Arc<Demand>,
        pause: Option<PauseKey>,
        not_before: Nanos,
        blocked: Option<Blocked>,
        now: Nanos,
    ) -> (oneshot::Receiver<Reservation>, (usize, u64)) {
        let (tx, rx) = oneshot::channel();
        self.seq += 1;
        let key = (demand.priority.index(), self.seq);
        for layer in &demand.layers {
            self.waiting.entry(layer.clone()).or_default()[key.0] += 1;
        }
        self.depth[key.0] += 1;
        self.depth_by_upstream.entry(demand.upstream).or_default()[key.0] += 1;
        let signature = signature(&demand, &pause);
        let tag = self.fair.enqueue(&pause, key.0, key.1, &demand, now);
        self.waiters.insert(
            key,
            Waiter {
                demand,
                pause,
                not_before,
                tag,
                signature,
                last_blocked: blocked,
                tx,
            },
        );
        (rx, key)
    }
}

/// Admits waiters in priority then fair order whenever room may have appeared: on a
/// release or refund, a new waiter, or the earliest time a blocked layer opens.
pub(super) async fn schedule(shared: Weak<Shared>, wake: Arc<Notify>) {
    let mut last_sweep = Instant::now();
    loop {
        let next = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            if last_sweep.elapsed() > Duration::from_secs(10) {
                shared.backend.sweep();
                let now = shared.clock.now();
                {
                    let mut state = shared.lock();
                    state.pauses.retain(|_, until| *until > now);
                    state.fair.prune(now, 60_000_000_000);
                }
                shared.reserve.prune(now);
                shared.jobs.lock().sweep(now);
                last_sweep = Instant::now();
            }
            drain(&shared).await.map(|at| shared.clock.instant(at))
        };
        match next {
            Some(at) => {
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep_until(at) => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

struct Candidate {
    key: (usize, u64),
    signature: u64,
    demand: Arc<Demand>,
    pause: Option<PauseKey>,
    not_before: Nanos,
}

/// One pass over the waiters; returns when to look again.
async fn drain(shared: &Arc<Shared>) -> Option<Nanos> {
    let candidates: Vec<Candidate> = {
        let mut state = shared.lock();
        let closed: Vec<(usize, u64)> = state
            .waiters
            .iter()
            .filter(|(_, w)| w.tx.is_closed())
            .map(|(k, _)| *k)
            .collect();
        for key in closed {
            state.remove_waiter(key, false);
        }
        let order: Vec<(usize, u64)> = (0..3).flat_map(|class| state.fair.order(class)).collect();
        order
            .into_iter()
            .filter_map(|key| {
                let w = state.waiters.get(&key)?;
                Some(Candidate {
                    key,
                    signature: w.signature,
                    demand: w.demand.clone(),
                    pause: w.pause.clone(),
                    not_before: w.not_before,
                })
            })
            .collect()
    };
    let mut next: Option<Nanos> = None;
    let mut soonest = |t: Nanos| next = Some(next.map_or(t, |n: Nanos| n.min(t)));
    let mut blocked: HashSet<u64> = HashSet::new();
    // Callers whose apps take turns and whose next turn is not yet due.
    let mut spaced: HashSet<Option<PauseKey>> = HashSet::new();
    for c in candidates {
        if blocked.contains(&c.signature) || spaced.contains(&c.pause) {
            continue;
        }
        let now = shared.clock.now();
        let held =
            pace(&shared.set, &c.demand).and_then(|p| shared.lock().fair.held(&c.pause, now, p));
        if let Some(until) = held {
            soonest(until);
            spaced.insert(c.pause.clone());
            continue;
        }
        let paused = shared.lock().paused_until(&c.pause, now);
        let (paused, shadow_pause) = shared.split_pause(paused, now);
        let not_before = paused.unwrap_or(0).max(c.not_before);
        if not_before > now {
            soonest(not_before);
            blocked.insert(c.signature);
            continue;
        }
        let zeros = vec![0; c.demand.layers.len()];
        let demand = shared.redecide(c.demand.clone(), now);
        match shared.take(demand, zeros, c.pause.as_ref()).await {
            Ok((grant, jobs)) => {
                let waiter = {
                    let mut state = shared.lock();
                    if let Some((_, window)) = pace(&shared.set, &c.demand) {
                        state
                            .fair
                            .sent(&c.pause, &c.demand.app, now, window, shared.max_keys);
                    }
                    state.remove_waiter(c.key, true)
                };
                let reservation = Reservation::new(shared.clone(), grant, jobs, Duration::ZERO)
                    .with_pause(c.pause.as_ref(), shadow_pause);
                // A caller that left meanwhile drops it here, outside the lock: refunded.
                if let Some(w) = waiter {
                    let _ = w.tx.send(reservation);
                }
            }
            Err(b) => {
                blocked.insert(c.signature);
                match b.wait {
                    Some(wait) => soonest(now + wait.max(1)),
                    None => {
                        if let Some(retry) = shared.backend.concurrency_retry() {
                            soonest(
                                now + retry.as_nanos() as Nanos
                                    + jitter(retry.as_nanos() as Nanos * 5),
                            );
                        }
                    }
                }
                if let Some(w) = shared.lock().waiters.get_mut(&c.key) {
                    w.last_blocked = Some(b);
                }
            }
        }
    }
    next
}

/// Removes a waiter whose caller gave up (timeout or disconnect).
pub(super) struct WaiterGuard {
    shared: Arc<Shared>,
    key: Option<(usize, u64)>,
}

impl WaiterGuard {
    /// Removes the waiter at `key` from the queue when dropped, unless disarmed.
    pub(super) fn new(shared: Arc<Shared>, key: (usize, u64)) -> Self {
        WaiterGuard {
            shared,
            key: Some(key),
        }
    }

    /// The waiter was admitted: the scheduler removed it already.
    pub(super) fn disarm(&mut self) {
        self.key = None;
    }

    /// Removes the waiter now, with what blocked it last.
    pub(super) fn take(&mut self) -> Option<Waiter> {
        let key = self.key.take()?;
        let removed = self.shared.lock().remove_waiter(key, false);
        removed
    }
}

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        // Dropped outside the lock: the waiter owns nothing but its channel.
        drop(self.take());
    }
}

/// Up to a tenth of the pause, at most one second: resumed requests do not all leave at once.
pub(super) fn jitter(pause: Nanos) -> Nanos {
    let max = (pause / 10).min(1_000_000_000);
    if max == 0 {
        0
    } else {
        rand::random::<u64>() % max
    }
}

fn signature(demand: &Demand, pause: &Option<PauseKey>) -> u64 {
    let mut h = DefaultHasher::new();
    demand.layers.hash(&mut h);
    demand.reserved.hash(&mut h);
    demand.priority.hash(&mut h);
    pause.hash(&mut h);
    h.finish()
}
