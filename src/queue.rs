//! Admission with waiting: a request that fits is reserved at once; one that will fit
//! within `max_wait` waits in its priority class, where each caller's apps take turns by
//! weight (see [`fair`]); one that will not is shed at once with a truthful `Retry-After`,
//! predicted from its place in that fair order. Fairness is per replica: with Redis state
//! each replica orders its own waiters.
//!
//! The queue is always local, whatever [`Backend`] holds the counters: a replica queues its
//! own callers and retries admission at the predicted time, never by polling.
//! Reservations are RAII: a [`Reservation`] dropped before [`Reservation::commit`] (the
//! caller went away, the request was refused) gives everything back; a [`Permit`] holds
//! concurrency until the response is done.
//!
//! [`Admission`] ties two halves: `schedule` (waiters, priorities, wake-ups, upstream
//! pauses, when to try again) and `reservation` (what an admitted request holds, its
//! commit, refund and release).

mod fair;
pub mod jobs;
mod reservation;
mod schedule;

pub use jobs::JobHold;
pub use reservation::{headroom_headers, Permit, Reservation};

use crate::config::{Priority, QueueConfig};
use crate::error::ShedReason;
use crate::limit::window::Nanos;
use crate::limit::{BlockKind, Blocked, Demand, LayerKey, LimitSet};
use crate::reserve::{CriticalSources, Reserve};
use crate::shadow::ShadowBook;
use crate::state::{Backend, BackendStatus, Clock, Grant, LocalBackend};
use fair::pace;
use reservation::ceil_secs;
use schedule::{jitter, schedule, State, WaiterGuard};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

/// A request pacer will not send now, and when to try again.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub reason: ShedReason,
    pub retry_after: Duration,
    /// `RateLimit-Policy` and `RateLimit` values of the layer that refused.
    pub policy: Option<(String, String)>,
}

/// Who an upstream pause applies to: an upstream and a caller.
pub type PauseKey = (usize, Arc<str>);

/// What the controller, the scheduler, and every reservation share.
struct Shared {
    set: Arc<LimitSet>,
    backend: Arc<dyn Backend>,
    queue: QueueConfig,
    max_keys: usize,
    clock: Clock,
    /// Which keys keep the critical reserve.
    reserve: Reserve,
    state: Mutex<State>,
    wake: Arc<Notify>,
    /// The adaptive scale of a caller now (see [`Admission::set_scaler`]).
    scaler: OnceLock<Scaler>,
    /// What shadow limits and pauses would have done, for `/status`.
    shadow: ShadowBook,
    /// Async job slots (`jobs` limits), kept in this process.
    jobs: jobs::JobSlots,
    /// True when some limit is a job limit.
    has_jobs: bool,
}

/// The shares of its rate ceilings a caller may use now: (every layer, its per-client
/// layer), as [`Demand::rate_scale`] and [`Demand::client_scale`].
pub type Scaler = Arc<dyn Fn(&PauseKey) -> (f64, f64) + Send + Sync>;

impl Shared {
    /// The demand under the adaptive scale in force now: a request that waited through a
    /// cut or a newly learned ceiling is admitted under it, not the one it arrived with.
    fn rescaled(&self, demand: Arc<Demand>, key: Option<&PauseKey>) -> Arc<Demand> {
        let (Some(scaler), Some(key)) = (self.scaler.get(), key) else {
            return demand;
        };
        let (rate, client) = scaler(key);
        if rate == demand.rate_scale && client == demand.client_scale {
            return demand;
        }
        let mut d = (*demand).clone();
        d.rate_scale = rate;
        d.client_scale = client;
        Arc::new(d)
    }

    /// An upstream pause lasting `until` as (kept, noted): in shadow (`[server] shadow`) it
    /// is only noted, as the time it had left (see [`crate::shadow`]).
    fn split_pause(&self, until: Option<Nanos>, now: Nanos) -> (Option<Nanos>, Option<Nanos>) {
        match until {
            Some(until) if self.set.shadow_pauses => (None, Some(until.saturating_sub(now))),
            kept => (kept, None),
        }
    }

    /// `Retry-After` for a request `b` blocks: its predicted wait; for a concurrency cap,
    /// which only a release opens, one second. A full job limit opens when a job finishes,
    /// which nothing predicts; the request waited `max_wait` for it already, so the hint is
    /// that long, or less when a slot's `job_ttl` runs out sooner.
    fn retry_hint(&self, b: &Blocked, max_wait: Duration) -> Duration {
        if let Some(wait) = b.wait {
            return Duration::from_nanos(wait);
        }
        let job_layer = b.layer().filter(|l| {
            self.set
                .specs
                .get(l.limit)
                .is_some_and(|s| s.jobs.is_some())
        });
        match job_layer {
            Some(layer) => {
                let now = self.clock.now();
                let opens = self.jobs.lock().opens_in(layer, now);
                opens
                    .map_or(max_wait, |n| max_wait.min(Duration::from_nanos(n)))
                    .max(Duration::from_secs(1))
            }
            None => Duration::from_secs(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The queue's bookkeeping stays consistent per operation; after a panic elsewhere
        // keep serving with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Which of `demand`'s keys keep the critical reserve; a critical request first teaches
    /// that its keys are reachable (and shares that with other replicas).
    fn reserve_for(&self, demand: &Demand, now: Nanos) -> Vec<bool> {
        let reserve = &self.reserve;
        if reserve.learns() {
            self.merge_shared_critical(now);
            if demand.priority == crate::config::Priority::Critical {
                let fresh = reserve.learn(&demand.layers, now);
                if !fresh.is_empty() {
                    self.backend
                        .share_critical(fresh, self.queue.reserve_memory.0);
                }
            }
        }
        reserve.decide(&demand.layers, now)
    }

    /// Takes in what other replicas learned about critical traffic.
    fn merge_shared_critical(&self, now: Nanos) {
        if self.reserve.learns() {
            self.reserve.merge(self.backend.shared_critical(), now);
        }
    }

    /// `demand` with its reserve decided again: a waiting request keeps no reserve that a
    /// critical request learned meanwhile.
    fn redecide(&self, demand: Arc<Demand>, now: Nanos) -> Arc<Demand> {
        if !self.reserve.learns() {
            return demand;
        }
        let reserved = self.reserve.decide(&demand.layers, now);
        if reserved == demand.reserved {
            return demand;
        }
        let mut d = (*demand).clone();
        d.reserved = reserved;
        Arc::new(d)
    }

    /// Takes job slots, then asks the backend, making sure a grant whose caller went away
    /// meanwhile is refunded (job slots too: a [`JobHold`] dropped gives them back).
    async fn take(
        self: &Arc<Self>,
        demand: Arc<Demand>,
        ahead: Vec<u64>,
        pause: Option<&PauseKey>,
    ) -> Result<(Grant, Option<JobHold>), Blocked> {
        let jobs = self.take_jobs(&demand, &ahead)?;
        match self.take_counted(demand, ahead, pause).await {
            Ok(grant) => Ok((grant, jobs)),
            Err(b) => {
                // Held for no time: giving it back must not wake the scheduler, whose
                // next pass would take and return it again, and again.
                if let Some(hold) = jobs {
                    hold.untake();
                }
                Err(b)
            }
        }
    }

    /// Asks the backend, making sure a grant whose caller went away meanwhile is refunded.
    async fn take_counted(
        self: &Arc<Self>,
        demand: Arc<Demand>,
        ahead: Vec<u64>,
        pause: Option<&PauseKey>,
    ) -> Result<Grant, Blocked> {
        let demand = self.rescaled(demand, pause);
        let backend = self.backend.clone();
        let pause = pause.map(shared_pause_name);
        if !backend.is_remote() {
            return backend.take(demand, ahead, pause).await;
        }
        // A shared store answers over the network: run the call to completion even if
        // this caller leaves, so a grant is never lost.
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let result = backend.clone().take(demand, ahead, pause).await;
            if let Err(Ok(grant)) = tx.send(result) {
                backend.refund(&grant.taken);
            }
        });
        rx.await.unwrap_or(Err(Blocked {
            kind: BlockKind::Unanswered,
            wait: Some(1_000_000_000),
        }))
    }
}

/// The admission controller shared by every request of one pacer instance.
#[derive(Clone)]
pub struct Admission {
    shared: Arc<Shared>,
}

/// Caller key used once `max_keys` distinct keys are in use, so that a flood of distinct
/// unknown callers shares one quota instead of exhausting memory.
pub const OVERFLOW_CALLER: &str = "overflow";

impl Admission {
    /// A controller with counters in this process.
    pub fn new(set: LimitSet, queue: QueueConfig, max_keys: usize) -> Admission {
        let set = Arc::new(set);
        let clock = Clock::default();
        let backend = Arc::new(LocalBackend::new(set.clone(), clock));
        Self::with_backend(set, backend, clock, queue, max_keys)
    }

    /// A controller over any backend; starts the scheduler task.
    pub fn with_backend(
        set: Arc<LimitSet>,
        backend: Arc<dyn Backend>,
        clock: Clock,
        queue: QueueConfig,
        max_keys: usize,
    ) -> Admission {
        let wake = Arc::new(Notify::new());
        let reserve = Reserve::new(queue.reserve_memory.0, max_keys, set.specs.len());
        let has_jobs = set.specs.iter().any(|s| s.jobs.is_some());
        let shared = Arc::new(Shared {
            set,
            backend,
            queue,
            max_keys,
            reserve,
            clock,
            state: Mutex::new(State::default()),
            wake: wake.clone(),
            scaler: OnceLock::new(),
            shadow: ShadowBook::default(),
            jobs: jobs::JobSlots::new(max_keys),
            has_jobs,
        });
        tokio::spawn(schedule(Arc::downgrade(&shared), wake));
        Admission { shared }
    }

    /// Makes every admission attempt, also a waiting request's, use the adaptive scale in
    /// force at that moment. Set once; later calls are ignored.
    pub fn set_scaler(&self, scaler: Scaler) {
        let _ = self.shared.scaler.set(scaler);
    }

    /// The compiled limits.
    pub fn limits(&self) -> &LimitSet {
        &self.shared.set
    }

    /// What shadow limits and pauses would have done so far.
    pub fn shadow_book(&self) -> &ShadowBook {
        &self.shared.shadow
    }

    /// Mode and health of the counter store.
    pub fn backend_status(&self) -> BackendStatus {
        self.shared.backend.status()
    }

    /// What a request needs; a caller new to a full store is counted as [`OVERFLOW_CALLER`].
    pub fn demand(
        &self,
        upstream: usize,
        caller: &Arc<str>,
        method: &http::Method,
        path: &str,
        priority: Priority,
    ) -> Demand {
        let set = &self.shared.set;
        let backend = &self.shared.backend;
        let demand = set.demand(upstream, caller, method, path, priority);
        let (job_keys, new_job_key) = if self.shared.has_jobs {
            let book = self.shared.jobs.lock();
            let new = |l: &LayerKey| set.specs[l.limit].jobs.is_some() && !book.has(l);
            (book.key_count(), demand.layers.iter().any(new))
        } else {
            (0, false)
        };
        let new_key = new_job_key
            || demand
                .layers
                .iter()
                .any(|l| set.specs[l.limit].jobs.is_none() && !backend.has_key(l));
        if backend.key_count().saturating_add(job_keys) >= self.shared.max_keys && new_key {
            return set.demand(
                upstream,
                &Arc::from(OVERFLOW_CALLER),
                method,
                path,
                priority,
            );
        }
        demand
    }

    /// Where critical traffic can come from, so that only keys it can reach keep the
    /// critical reserve (every key does until this is called).
    pub fn set_critical_sources(&self, sources: CriticalSources) {
        self.shared.reserve.set_sources(sources);
    }

    /// Learned keys that keep the critical reserve: how many, and up to `limit` names.
    pub fn learned_reserve(&self, limit: usize) -> (usize, Vec<String>) {
        let now = self.shared.clock.now();
        self.shared.merge_shared_critical(now);
        self.shared.reserve.learned(now, limit)
    }

    /// Reserves room for `demand`, waiting at most `max_wait`.
    pub async fn admit(
        &self,
        mut demand: Demand,
        pause: Option<PauseKey>,
        max_wait: Duration,
    ) -> Result<Reservation, Refusal> {
        let shared = &self.shared;
        let started = Instant::now();
        let max_wait_ns = max_wait.as_nanos() as Nanos;
        let now = shared.clock.now();
        demand.reserved = shared.reserve_for(&demand, now);
        let demand = Arc::new(demand);
        let paced = pace(&shared.set, &demand);
        let (paused, ahead, spaced) = {
            let state = shared.lock();
            let spaced = paced.and_then(|p| Some((state.fair.held(&pause, now, p)?, p.0)));
            (
                state.paused_until(&pause, now),
                state.ahead(&demand, &pause),
                spaced,
            )
        };
        let (paused, shadow_pause) = shared.split_pause(paused, now);
        if let Some(until) = paused {
            if until - now > max_wait_ns {
                return Err(Refusal {
                    reason: ShedReason::UpstreamPaused,
                    retry_after: Duration::from_nanos(until - now),
                    policy: None,
                });
            }
        }
        let blocked = match (paused, spaced) {
            (Some(_), _) => None,
            // Its caller's apps take turns and the next is not due: it waits its turn, about
            // one interval per waiter before it in the fair order.
            (None, Some((until, interval))) => {
                Some(in_turn(&demand, &ahead, until - now, interval))
            }
            (None, None) => match shared.take(demand.clone(), ahead, pause.as_ref()).await {
                Ok((grant, jobs)) => {
                    if let Some((_, window)) = paced {
                        let at = shared.clock.now();
                        shared
                            .lock()
                            .fair
                            .sent(&pause, &demand.app, at, window, shared.max_keys);
                    }
                    // Admitted at once, but the counter store may have taken its time
                    // (Redis): the wait is everything pacer held the request for.
                    return Ok(
                        Reservation::new(shared.clone(), grant, jobs, started.elapsed())
                            .with_pause(pause.as_ref(), shadow_pause),
                    );
                }
                Err(b) => Some(b),
            },
        };
        if let Some(b) = &blocked {
            if let Some(wait) = b.wait.filter(|&w| w > max_wait_ns) {
                return Err(Refusal {
                    reason: shed_reason(b, ShedReason::WaitTooLong),
                    retry_after: Duration::from_nanos(wait),
                    policy: shed_headers(&shared.set, b),
                });
            }
        }
        let (rx, key) = {
            let mut state = shared.lock();
            if state.queued() >= shared.queue.max_depth {
                let retry_after = blocked
                    .as_ref()
                    .map_or(Duration::from_secs(1), |b| shared.retry_hint(b, max_wait));
                return Err(Refusal {
                    reason: ShedReason::QueueFull,
                    retry_after,
                    policy: blocked.as_ref().and_then(|b| shed_headers(&shared.set, b)),
                });
            }
            let not_before = paused.map_or(0, |until| until + jitter(until - now));
            state.enqueue(demand, pause, not_before, blocked, now)
        };
        shared.wake.notify_one();

        let mut guard = WaiterGuard::new(shared.clone(), key);
        match tokio::time::timeout_at(started + max_wait, rx).await {
            Ok(Ok(mut reservation)) => {
                guard.disarm();
                reservation.waited = started.elapsed();
                Ok(reservation)
            }
            _ => {
                let last = guard.take();
                Err(match last.and_then(|w| w.last_blocked) {
                    Some(b) => Refusal {
                        reason: shed_reason(&b, ShedReason::WaitTooLong),
                        retry_after: shared.retry_hint(&b, max_wait),
                        policy: shed_headers(&shared.set, &b),
                    },
                    None => Refusal {
                        reason: ShedReason::WaitTooLong,
                        retry_after: Duration::from_secs(1),
                        policy: None,
                    },
                })
            }
        }
    }

    /// Counts a request pacer itself sent to the upstream (a `tokens/me` look-up) against
    /// the caller's quotas.
    pub fn record_sent(
        &self,
        upstream: usize,
        caller: &Arc<str>,
        method: &http::Method,
        path: &str,
    ) {
        // Through `demand`: the client comes from the upstream's answer about a caller's
        // token, so a full store counts it under the overflow key like any other.
        let demand = self.demand(upstream, caller, method, path, Priority::Critical);
        self.shared.backend.record_sent(&demand);
    }

    /// The upstream reported its own count for the caller (`inin-ratelimit-count`): the
    /// caller's per-client quota among `layers` counts at least that many, so use of the
    /// same OAuth client outside pacer is taken into account.
    pub fn upstream_count(&self, layers: &[LayerKey], used: u64) {
        let set = &self.shared.set;
        let per_client = layers.iter().find(|l| {
            let spec = &set.specs[l.limit];
            spec.scope == crate::config::Scope::Client
                && spec.template.is_none()
                && spec.ceilings.is_some()
        });
        if let Some(layer) = per_client {
            self.shared.backend.at_least(layer, used);
        }
    }

    /// Shares a client's adaptive state with the other replicas (see [`Backend::share_adaptive`]).
    pub fn share_adaptive(&self, field: String, value: String, ttl: Duration) {
        self.shared.backend.share_adaptive(field, value, ttl);
    }

    /// The adaptive state the other replicas shared, with its version.
    pub fn shared_adaptive(&self) -> crate::state::SharedAdaptive {
        self.shared.backend.shared_adaptive()
    }

    /// The upstream asked for a pause: nothing for this key is sent before `retry_after`.
    pub fn pause(&self, key: PauseKey, retry_after: Duration) {
        let shared = &self.shared;
        let now = shared.clock.now();
        let until = now.saturating_add(retry_after.as_nanos().min(u64::MAX as u128) as Nanos);
        shared.backend.pause(&shared_pause_name(&key), retry_after);
        shared.lock().pause(key, until, now, shared.max_keys);
        shared.wake.notify_one();
    }

    /// Remaining pause of every paused key.
    pub fn pauses(&self) -> Vec<(PauseKey, Duration)> {
        let now = self.shared.clock.now();
        let state = self.shared.lock();
        state
            .pauses
            .iter()
            .filter(|(_, &until)| until > now)
            .map(|(k, &until)| (k.clone(), Duration::from_nanos(until - now)))
            .collect()
    }

    /// Waiting requests per priority class (critical, normal, bulk).
    pub fn depth(&self) -> [usize; 3] {
        self.shared.lock().depth
    }

    /// Waiting requests per upstream and priority class.
    pub fn depth_by_upstream(&self) -> HashMap<usize, [usize; 3]> {
        self.shared.lock().depth_by_upstream.clone()
    }

    /// Waiting requests per limit key (all classes), for `/status`.
    pub fn waiting(&self) -> HashMap<LayerKey, u64> {
        self.shared.lock().waiting_by_layer()
    }

    /// Use of every key with state: (layer, used, in flight).
    pub fn usage(&self) -> Vec<(LayerKey, u64, u64)> {
        self.shared.backend.usage()
    }

    /// Number of keys with state (bounded by `max_keys` plus the overflow key).
    pub fn keys(&self) -> usize {
        self.shared.backend.key_count()
    }
}

/// The name of a caller's upstream pause in a shared store.
fn shared_pause_name(key: &PauseKey) -> String {
    format!("{}:{}", key.0, key.1)
}

/// What holds back a request whose caller's apps take turns: its per-client layer, for
/// `first` until the next turn and one `interval` per request `ahead` of it there.
fn in_turn(demand: &Demand, ahead: &[u64], first: Nanos, interval: Nanos) -> Blocked {
    let i = demand.client_layer.unwrap_or(0);
    let before = ahead.get(i).copied().unwrap_or(0);
    Blocked {
        kind: match demand.layers.get(i) {
            Some(layer) => BlockKind::Layer(layer.clone()),
            None => BlockKind::Unanswered,
        },
        wait: Some(first.saturating_add(interval.saturating_mul(before))),
    }
}

/// Why a refusal happened: the upstream's pause, else `otherwise`.
fn shed_reason(b: &Blocked, otherwise: ShedReason) -> ShedReason {
    match b.kind {
        BlockKind::Paused => ShedReason::UpstreamPaused,
        BlockKind::Layer(_) | BlockKind::Unanswered => otherwise,
    }
}

/// `RateLimit-Policy` and `RateLimit` (IETF httpapi draft syntax) for a layer that refused;
/// none when no layer did (an upstream pause names no limit of pacer's).
fn shed_headers(set: &LimitSet, b: &Blocked) -> Option<(String, String)> {
    let spec = set.specs.get(b.layer()?.limit)?;
    let quota = spec
        .requests_now()
        .or(spec.concurrency.map(|c| c[0]))
        .or(spec.jobs)
        .unwrap_or(0);
    let reset = ceil_secs(Duration::from_nanos(b.wait.unwrap_or(1_000_000_000))).max(1);
    let policy = match spec.requests {
        Some(_) => format!(
            "\"{}\";q={quota};w={}",
            spec.name,
            spec.per.as_secs().max(1)
        ),
        None => format!("\"{}\";q={quota}", spec.name),
    };
    Some((policy, format!("\"{}\";r=0;t={reset}", spec.name)))
}

/// An admission over `limits` (`[queue]` and `[[limit]]`s added to a minimal config), for
/// unit tests of the queue and of what builds on it.
#[cfg(test)]
pub(crate) fn test_admission(limits: &str) -> Admission {
    let (c, set) = crate::limit::test_limits(limits);
    Admission::new(set, c.queue.clone(), c.identity.max_keys)
}

/// Ten a second per client, no critical reserve, for unit tests.
#[cfg(test)]
pub(crate) const TEN_PER_SECOND: &str = r#"
[queue]
critical_reserve = 0.0
bulk_share = 1.0
[[limit]]
name = "client"
scope = "client"
requests = 10
per = "1s"
guard = "0ms"
"#;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod fair_tests;
