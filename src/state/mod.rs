//! Where limit counters live: in this process ([`LocalBackend`]) or shared by every
//! replica in Redis ([`redis::RedisBackend`]). The queue in front of them is always local.

pub mod redis;

use crate::limit::window::Nanos;
use crate::limit::{Blocked, Demand, Headroom, LayerKey, Ledger, LimitSet, Taken};
use crate::shadow::WouldBlock;
use futures_util::future::BoxFuture;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// Monotonic nanoseconds since the clock was made. Built on tokio's clock, so tests with
/// paused time are exact and fast.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Clock {
            epoch: Instant::now(),
        }
    }
}

impl Clock {
    /// Now, in nanoseconds since the epoch.
    pub fn now(&self) -> Nanos {
        Instant::now()
            .saturating_duration_since(self.epoch)
            .as_nanos() as Nanos
    }

    /// The instant of a nanosecond timestamp.
    pub fn instant(&self, at: Nanos) -> Instant {
        self.epoch + Duration::from_nanos(at)
    }
}

/// Room reserved in a backend.
#[derive(Debug, Clone)]
pub struct Grant {
    pub taken: Taken,
    /// Room left in the tightest rate layer, for `RateLimit` headers.
    pub headroom: Option<Headroom>,
    /// Shadow layers that would have held the request back (see [`crate::shadow`]).
    pub shadow: Vec<WouldBlock>,
}

/// What a backend reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BackendStatus {
    /// `local`, or `redis` when shared.
    pub kind: &'static str,
    /// False while a shared backend is unreachable and local shares are in force.
    pub up: bool,
    /// Replicas sharing the quotas (1 for local).
    pub replicas: u64,
}

/// Adaptive states replicas share (field, value), with a version that changes when they do.
pub type SharedAdaptive = (u64, Arc<Vec<(String, String)>>);

/// A store of limit counters. `take` is one atomic step: room in every layer, or nothing.
pub trait Backend: Send + Sync + 'static {
    /// Reserves room for `demand`; `ahead[i]` requests wait before it on `demand.layers[i]`.
    /// `pause` names the caller's upstream pause as given to [`Backend::pause`]: a shared
    /// store refuses with [`crate::limit::BlockKind::Paused`] while it lasts.
    fn take(
        self: Arc<Self>,
        demand: Arc<Demand>,
        ahead: Vec<u64>,
        pause: Option<String>,
    ) -> BoxFuture<'static, Result<Grant, Blocked>>;
    /// Gives back everything a request reserved (refused or cancelled before it was sent).
    fn refund(&self, taken: &Taken);
    /// Ends a request's concurrency hold; its sends stay counted.
    fn release(&self, taken: &Taken);
    /// The request's answer has begun: count its send from now (see [`Ledger::resend`]).
    /// A shared store keeps Redis' admission time and relies on the guard interval.
    fn answered(&self, _taken: &Taken) {}
    /// Counts a send that already happened outside admission.
    fn record_sent(&self, demand: &Demand);
    /// The upstream says `layer`'s key has `used` requests in its window: count at least
    /// that many (others use the same OAuth client outside pacer).
    fn at_least(&self, _layer: &LayerKey, _used: u64) {}
    /// Shares an upstream's pause with other replicas (the queue keeps its own copy).
    fn pause(&self, _key: &str, _for: Duration) {}
    /// Shares a client's adaptive state (a cut, a learned ceiling) with other replicas for
    /// `ttl`; local state has no one to share with.
    fn share_adaptive(&self, _field: String, _value: String, _ttl: Duration) {}
    /// The adaptive state other replicas shared, as last read, with a version that
    /// changes whenever it does.
    fn shared_adaptive(&self) -> SharedAdaptive {
        (0, Arc::default())
    }
    /// Shares keys critical traffic was seen to reach (see [`crate::reserve`]) with other
    /// replicas, for `keep`; local state has no one to share with.
    fn share_critical(&self, _members: Vec<String>, _keep: Duration) {}
    /// Keys other replicas saw critical traffic reach since the last call, with when (on
    /// this process' clock).
    fn shared_critical(&self) -> Vec<(String, Nanos)> {
        Vec::new()
    }
    /// How often to retry a request blocked by a concurrency cap; `None` when releases
    /// are always seen (local).
    fn concurrency_retry(&self) -> Option<Duration> {
        None
    }
    /// True when `take` goes over the network (and so may be abandoned mid-way).
    fn is_remote(&self) -> bool {
        false
    }
    /// Use of every key known here: (layer, used, in flight).
    fn usage(&self) -> Vec<(LayerKey, u64, u64)>;
    /// Keys with state here.
    fn key_count(&self) -> usize;
    /// True when `key` has state here.
    fn has_key(&self, key: &LayerKey) -> bool;
    /// Forgets keys with nothing counted.
    fn sweep(&self);
    /// Mode and health.
    fn status(&self) -> BackendStatus;
}

/// Counters in this process, behind one lock: every admission is exact and ordered.
pub struct LocalBackend {
    set: Arc<LimitSet>,
    clock: Clock,
    ledger: Mutex<Ledger>,
}

impl LocalBackend {
    /// A local store for `set`, timed by `clock`.
    pub fn new(set: Arc<LimitSet>, clock: Clock) -> Self {
        LocalBackend {
            set,
            clock,
            ledger: Mutex::new(Ledger::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ledger> {
        // The ledger is plain counters; after a panic elsewhere keep serving with them.
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Synchronous `take`; the time is read under the lock, so records stay in order.
    pub fn take_now(&self, demand: &Demand, ahead: &[u64]) -> Result<Grant, Blocked> {
        let mut ledger = self.lock();
        let now = self.clock.now();
        let index = |l: &LayerKey| demand.layers.iter().position(|x| x == l);
        let ahead_of = |l: &LayerKey| index(l).and_then(|i| ahead.get(i).copied()).unwrap_or(0);
        let shadow = ledger.shadow_blocks(&self.set, now, demand);
        let taken = ledger.try_take(&self.set, now, demand, &ahead_of)?;
        let headroom = ledger.tightest(&self.set, now, demand);
        Ok(Grant {
            taken,
            headroom,
            shadow,
        })
    }
}

impl Backend for LocalBackend {
    fn take(
        self: Arc<Self>,
        demand: Arc<Demand>,
        ahead: Vec<u64>,
        // Pauses are the queue's own here: it never asks while one lasts.
        _pause: Option<String>,
    ) -> BoxFuture<'static, Result<Grant, Blocked>> {
        let result = self.take_now(&demand, &ahead);
        Box::pin(std::future::ready(result))
    }

    fn refund(&self, taken: &Taken) {
        self.lock().refund(&self.set, taken);
    }

    fn release(&self, taken: &Taken) {
        self.lock().release(&self.set, taken);
    }

    fn record_sent(&self, demand: &Demand) {
        self.lock()
            .record_sent(&self.set, self.clock.now(), &demand.layers);
    }

    fn answered(&self, taken: &Taken) {
        self.lock().resend(&self.set, self.clock.now(), taken);
    }

    fn at_least(&self, layer: &LayerKey, used: u64) {
        self.lock().pad(&self.set, self.clock.now(), layer, used);
    }

    fn usage(&self) -> Vec<(LayerKey, u64, u64)> {
        self.lock().usage(&self.set, self.clock.now())
    }

    fn key_count(&self) -> usize {
        self.lock().len()
    }

    fn has_key(&self, key: &LayerKey) -> bool {
        self.lock().has(key)
    }

    fn sweep(&self) {
        self.lock().sweep(&self.set, self.clock.now());
    }

    fn status(&self) -> BackendStatus {
        BackendStatus {
            kind: "local",
            up: true,
            replicas: 1,
        }
    }
}
