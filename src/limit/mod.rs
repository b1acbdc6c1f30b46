//! Layered quotas and concurrency caps: the pure admission core.
//!
//! [`Ledger`] takes `now` and a request's [`Demand`] and either reserves room in *every*
//! layer that matches (all-or-nothing) or says how long until it could. It holds no clock
//! and no lock; [`crate::queue`] adds waiting, time and sharing.

pub mod jobs;
pub mod window;

use crate::config::{LimitConfig, Priority, QueueConfig, Scope};
use crate::endpoint::{Classifier, Endpoint, Template};
use crate::shadow::{Subject, WouldBlock};
use http::Method;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use window::{Nanos, SlidingLog};

/// One compiled `[[limit]]`.
#[derive(Debug, Clone)]
pub struct LimitSpec {
    pub name: Arc<str>,
    /// Upstream index it applies to; all when `None`.
    pub upstream: Option<usize>,
    /// Template index in the classifier; every request when `None`.
    pub template: Option<usize>,
    pub scope: Scope,
    /// Requests per window after headroom, per priority class (critical, normal, bulk), on
    /// a key that keeps the critical reserve.
    pub ceilings: Option<[u64; 3]>,
    /// The same on a key no critical traffic can reach (no reserve kept).
    pub ceilings_open: Option<[u64; 3]>,
    /// Requests per window after headroom (the critical ceiling).
    pub requests: Option<u64>,
    /// The advertised window (`per`), for headers.
    pub per: Duration,
    /// The counted window: `per` plus the guard interval.
    pub window: Nanos,
    /// In-flight cap per class, on a key that keeps the critical reserve.
    pub concurrency: Option<[u64; 3]>,
    /// The same on a key no critical traffic can reach.
    pub concurrency_open: Option<[u64; 3]>,
    /// Decides and counts, never holds a request back (see [`crate::shadow`]).
    pub shadow: bool,
    /// Async jobs running at once per key (`jobs`), kept by [`jobs::JobBook`], not here.
    pub jobs: Option<u64>,
    /// How long a job slot lasts when its job is never seen finishing (`job_ttl`).
    pub job_ttl: Nanos,
}

impl LimitSpec {
    /// Rate ceiling of a priority class; `reserved` when the key keeps the critical reserve.
    pub fn rate_ceiling(&self, class: usize, reserved: bool) -> Option<u64> {
        let c = if reserved {
            self.ceilings
        } else {
            self.ceilings_open
        };
        c.map(|c| c[class])
    }

    /// In-flight cap of a priority class; `reserved` as for [`LimitSpec::rate_ceiling`].
    pub fn concurrency_cap(&self, class: usize, reserved: bool) -> Option<u64> {
        let c = if reserved {
            self.concurrency
        } else {
            self.concurrency_open
        };
        c.map(|c| c[class])
    }
}

/// Share of a limit each class may fill: critical all, normal all but the critical
/// reserve when the key keeps one (`reserved`), bulk at most `bulk_share` of that.
fn ceilings(n: u64, q: &QueueConfig, reserved: bool) -> [u64; 3] {
    let reserve = if reserved { q.critical_reserve } else { 0.0 };
    let normal = ((n as f64) * (1.0 - reserve)).floor() as u64;
    let bulk = ((n as f64) * q.bulk_share.min(1.0 - reserve)).floor() as u64;
    [n, normal.max(1), bulk.max(1)]
}

/// All limits of one configuration, with the classifier that names endpoints.
#[derive(Debug, Clone)]
pub struct LimitSet {
    pub specs: Vec<LimitSpec>,
    pub classifier: Arc<Classifier>,
    /// Upstream pauses are noted, not kept (`[server] shadow`; see [`crate::shadow`]).
    pub shadow_pauses: bool,
}

impl LimitSet {
    /// Compiles validated limits; `upstream_index` resolves upstream names.
    pub fn new(
        limits: &[LimitConfig],
        queue: &QueueConfig,
        upstream_index: impl Fn(&str) -> Option<usize>,
    ) -> LimitSet {
        let templates: Vec<Template> = limits
            .iter()
            .filter_map(|l| l.matches.as_deref().and_then(|m| Template::parse(m).ok()))
            .collect();
        let classifier = Classifier::new(templates);
        let specs = limits
            .iter()
            .map(|l| {
                let requests = l.effective_requests();
                LimitSpec {
                    name: Arc::from(l.name.as_str()),
                    upstream: l.upstream.as_deref().and_then(&upstream_index),
                    template: l
                        .matches
                        .as_deref()
                        .and_then(|m| Template::parse(m).ok())
                        .and_then(|t| classifier.index_of(t.label())),
                    scope: l.scope,
                    ceilings: requests.map(|n| ceilings(n, queue, true)),
                    ceilings_open: requests.map(|n| ceilings(n, queue, false)),
                    requests,
                    per: l.per.map(|d| d.0).unwrap_or_default(),
                    window: l
                        .effective_window()
                        .map(|d| d.as_nanos() as Nanos)
                        .unwrap_or(0),
                    concurrency: l.concurrency.map(|n| ceilings(n, queue, true)),
                    concurrency_open: l.concurrency.map(|n| ceilings(n, queue, false)),
                    shadow: l.shadow,
                    jobs: l.jobs,
                    job_ttl: l.effective_job_ttl().as_nanos().min(Nanos::MAX as u128) as Nanos,
                }
            })
            .collect();
        LimitSet {
            specs,
            classifier: Arc::new(classifier),
            shadow_pauses: false,
        }
    }

    /// With `all` (`[server] shadow`), every limit and every upstream pause in shadow.
    pub fn shadowed(mut self, all: bool) -> LimitSet {
        if all {
            self.shadow_pauses = true;
            for spec in &mut self.specs {
                spec.shadow = true;
            }
        }
        self
    }

    /// The same limits with every quota and cap divided among `replicas` (at least 1 each):
    /// the local shares used while a shared store is unreachable.
    pub fn scaled(&self, replicas: u64) -> LimitSet {
        let r = replicas.max(1);
        let div = |n: u64| (n / r).max(1);
        let mut set = self.clone();
        for spec in &mut set.specs {
            spec.requests = spec.requests.map(div);
            spec.ceilings = spec.ceilings.map(|c| c.map(div));
            spec.ceilings_open = spec.ceilings_open.map(|c| c.map(div));
            spec.concurrency = spec.concurrency.map(|c| c.map(div));
            spec.concurrency_open = spec.concurrency_open.map(|c| c.map(div));
        }
        set
    }

    /// The layers a request is subject to, with their keys.
    pub fn demand(
        &self,
        upstream: usize,
        caller: &Arc<str>,
        method: &Method,
        path: &str,
        priority: Priority,
    ) -> Demand {
        let endpoint = self.classifier.classify(method, path);
        let layers = self
            .specs
            .iter()
            .enumerate()
            .filter(|(_, s)| s.upstream.is_none_or(|u| u == upstream))
            .filter(|(_, s)| {
                s.template
                    .is_none_or(|t| self.classifier.applies(t, &endpoint, method, path))
            })
            .map(|(i, s)| LayerKey {
                limit: i,
                part: match s.scope {
                    Scope::Global => KeyPart::Global,
                    Scope::Client => KeyPart::Client(caller.clone()),
                    Scope::Endpoint => KeyPart::Endpoint(endpoint.label.clone()),
                    Scope::ClientEndpoint => {
                        KeyPart::ClientEndpoint(caller.clone(), endpoint.label.clone())
                    }
                },
            })
            .collect::<Vec<_>>();
        let client_layer = self.per_client(&layers);
        Demand {
            upstream,
            // Until told where critical traffic goes, every key keeps the reserve.
            reserved: vec![true; layers.len()],
            layers,
            priority,
            endpoint,
            rate_scale: 1.0,
            client_scale: 1.0,
            client_layer,
            app: crate::identity::App::unknown(),
        }
    }

    /// Index among `layers` of the caller's per-client rate layer: the first client-scope
    /// rate limit without a `match`, the one the upstream's `inin-ratelimit-*` headers
    /// describe.
    pub fn per_client(&self, layers: &[LayerKey]) -> Option<usize> {
        layers.iter().position(|l| {
            let spec = &self.specs[l.limit];
            spec.scope == Scope::Client && spec.template.is_none() && spec.ceilings.is_some()
        })
    }
}

/// What a counter is kept per.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyPart {
    Global,
    Client(Arc<str>),
    Endpoint(Arc<str>),
    ClientEndpoint(Arc<str>, Arc<str>),
}

impl KeyPart {
    /// Label value for metrics and `/status`.
    pub fn label(&self) -> String {
        match self {
            KeyPart::Global => "global".into(),
            KeyPart::Client(c) => c.to_string(),
            KeyPart::Endpoint(e) => e.to_string(),
            KeyPart::ClientEndpoint(c, e) => format!("{c} {e}"),
        }
    }
}

/// One counter: a limit and the key it is counted under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LayerKey {
    pub limit: usize,
    pub part: KeyPart,
}

/// Everything one request needs from the ledger.
#[derive(Debug, Clone)]
pub struct Demand {
    pub upstream: usize,
    pub layers: Vec<LayerKey>,
    pub priority: Priority,
    pub endpoint: Endpoint,
    /// Share of every rate ceiling this request may use (adaptive mode cuts it after
    /// upstream 429s); 1.0 normally.
    pub rate_scale: f64,
    /// Share of the per-client layer's ceiling the upstream reports as the client's budget
    /// (`inin-ratelimit-allowed`); 1.0 normally.
    pub client_scale: f64,
    /// Index in `layers` of the per-client layer ([`LimitSet::per_client`]).
    pub client_layer: Option<usize>,
    /// Per layer: true when its key keeps the critical reserve, so normal and bulk stop
    /// short of it (see [`crate::reserve`]).
    pub reserved: Vec<bool>,
    /// The application that sent it: waiting requests of one caller are admitted across
    /// its apps in turn, by weight (see [`crate::queue`]).
    pub app: crate::identity::App,
}

impl Demand {
    /// True when the `i`-th layer's key keeps the critical reserve; a layer the
    /// admission did not decide on keeps it.
    pub fn holds_reserve(&self, i: usize) -> bool {
        self.reserved.get(i).copied().unwrap_or(true)
    }

    /// Share of its rate ceiling the `i`-th layer allows this request.
    pub fn scale_of(&self, i: usize) -> f64 {
        if self.client_layer == Some(i) {
            self.rate_scale.min(self.client_scale)
        } else {
            self.rate_scale
        }
    }
}

/// Room taken by one admitted request; give it back with [`Ledger::refund`] or
/// [`Ledger::release`].
#[derive(Debug, Clone)]
pub struct Taken {
    pub at: Nanos,
    pub layers: Vec<LayerKey>,
    /// Unique per reservation where a shared store needs to name it; 0 in the local ledger.
    pub id: u64,
}

/// Why a request cannot be admitted now.
#[derive(Debug, Clone, PartialEq)]
pub struct Blocked {
    /// What blocks it.
    pub kind: BlockKind,
    /// Time until it could be admitted; `None` when a concurrency cap blocks and only a
    /// release can help.
    pub wait: Option<Nanos>,
}

/// What blocks a request: a layer of pacer's own, or something that is no layer at all.
#[derive(Debug, Clone, PartialEq)]
pub enum BlockKind {
    /// This layer has no room (of the demand's layers, the one that blocks longest).
    Layer(LayerKey),
    /// The upstream asked for a pause (429 + `Retry-After`), shared through the store: no
    /// limit of pacer's is involved, so the answer names none.
    Paused,
    /// The store gave no answer at all (its task ended); ask again shortly.
    Unanswered,
}

impl Blocked {
    /// The layer that blocks, when a layer does.
    pub fn layer(&self) -> Option<&LayerKey> {
        match &self.kind {
            BlockKind::Layer(l) => Some(l),
            BlockKind::Paused | BlockKind::Unanswered => None,
        }
    }
}

#[derive(Debug, Default)]
struct Counter {
    log: SlidingLog,
    inflight: u64,
}

/// The counters of every key: pure state, time passed in.
#[derive(Debug, Default)]
pub struct Ledger {
    counters: HashMap<LayerKey, Counter>,
}

/// Remaining room of the tightest layer, for `RateLimit` headers.
#[derive(Debug, Clone, PartialEq)]
pub struct Headroom {
    pub limit: usize,
    pub quota: u64,
    pub remaining: u64,
    /// Seconds until the oldest counted request leaves the window.
    pub reset: Duration,
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of keys with state.
    pub fn len(&self) -> usize {
        self.counters.len()
    }

    /// True when no key has state.
    pub fn is_empty(&self) -> bool {
        self.counters.is_empty()
    }

    /// True when this key already has state.
    pub fn has(&self, key: &LayerKey) -> bool {
        self.counters.contains_key(key)
    }

    /// Reserves room in every layer, or says what blocks. `queued_ahead(layer)` is the number
    /// of waiting requests that go before this one on that layer.
    pub fn try_take(
        &mut self,
        set: &LimitSet,
        now: Nanos,
        demand: &Demand,
        queued_ahead: &dyn Fn(&LayerKey) -> u64,
    ) -> Result<Taken, Blocked> {
        let class = demand.priority.index();
        let mut blocked: Option<Blocked> = None;
        for (i, layer) in demand.layers.iter().enumerate() {
            let spec = &set.specs[layer.limit];
            if spec.ceilings.is_none() && spec.concurrency.is_none() {
                // A job limit: its slots are the job book's (see [`jobs`]).
                continue;
            }
            let reserved = demand.holds_reserve(i);
            let counter = self.counters.entry(layer.clone()).or_default();
            if spec.shadow {
                // Never blocks; what it would have done is `shadow_blocks`' answer. The
                // send is still counted below.
                counter.log.evict(now, spec.window);
                continue;
            }
            let ahead = queued_ahead(layer);
            if let Some(ceil) = spec.rate_ceiling(class, reserved) {
                counter.log.evict(now, spec.window);
                let ceil = scaled(ceil, demand.scale_of(i));
                let wait = predicted_wait(&counter.log, now, spec.window, ceil, ahead);
                if wait > 0 {
                    let worse = match &blocked {
                        None => true,
                        Some(b) => b.wait.is_some_and(|w| wait > w),
                    };
                    if worse {
                        blocked = Some(Blocked {
                            kind: BlockKind::Layer(layer.clone()),
                            wait: Some(wait),
                        });
                    }
                }
            }
            if let Some(ceil) = spec.concurrency_cap(class, reserved) {
                if counter.inflight + ahead >= ceil {
                    blocked = Some(Blocked {
                        kind: BlockKind::Layer(layer.clone()),
                        wait: None,
                    });
                }
            }
        }
        if let Some(b) = blocked {
            self.forget_idle(&demand.layers);
            return Err(b);
        }
        for layer in &demand.layers {
            let spec = &set.specs[layer.limit];
            if let Some(counter) = self.counters.get_mut(layer) {
                if spec.ceilings.is_some() {
                    counter.log.record(now, spec.window);
                }
                if spec.concurrency.is_some() {
                    counter.inflight += 1;
                }
            }
        }
        Ok(Taken {
            at: now,
            layers: demand.layers.clone(),
            id: 0,
        })
    }

    /// The shadow layers of `demand` that would have held it back at `now`, and for how
    /// long: each decided as [`Ledger::try_take`] decides an enforcing layer, against every
    /// send really counted (see [`crate::shadow`] for why), with nothing queued ahead.
    /// Call before `try_take`, under the same lock, so both see the same counts.
    pub fn shadow_blocks(
        &mut self,
        set: &LimitSet,
        now: Nanos,
        demand: &Demand,
    ) -> Vec<WouldBlock> {
        let class = demand.priority.index();
        let mut out = Vec::new();
        for (i, layer) in demand.layers.iter().enumerate() {
            let spec = &set.specs[layer.limit];
            if !spec.shadow {
                continue;
            }
            let reserved = demand.holds_reserve(i);
            let Some(counter) = self.counters.get_mut(layer) else {
                // No use yet: every ceiling is at least one request.
                continue;
            };
            let subject = Subject::Limit(layer.limit);
            if let Some(cap) = spec.concurrency_cap(class, reserved) {
                if counter.inflight >= cap {
                    out.push(WouldBlock {
                        subject,
                        wait: None,
                    });
                    continue;
                }
            }
            if let Some(ceil) = spec.rate_ceiling(class, reserved) {
                counter.log.evict(now, spec.window);
                let ceil = scaled(ceil, demand.scale_of(i));
                let wait = predicted_wait(&counter.log, now, spec.window, ceil, 0);
                if wait > 0 {
                    out.push(WouldBlock {
                        subject,
                        wait: Some(wait),
                    });
                }
            }
        }
        out
    }

    /// Records a send in every layer without checking for room: mirrors a send that a
    /// shared store admitted, so local shares know this replica's own recent use.
    pub fn record(&mut self, set: &LimitSet, now: Nanos, layers: &[LayerKey]) -> Taken {
        self.record_sent(set, now, layers);
        for layer in layers {
            if set.specs[layer.limit].concurrency.is_some() {
                self.counters.entry(layer.clone()).or_default().inflight += 1;
            }
        }
        Taken {
            at: now,
            layers: layers.to_vec(),
            id: 0,
        }
    }

    /// Counts a send that already happened outside admission (pacer's own `tokens/me`
    /// look-up): the upstream counts it, so the quota must too.
    pub fn record_sent(&mut self, set: &LimitSet, now: Nanos, layers: &[LayerKey]) {
        for layer in layers {
            let spec = &set.specs[layer.limit];
            if spec.ceilings.is_some() {
                let counter = self.counters.entry(layer.clone()).or_default();
                counter.log.evict(now, spec.window);
                counter.log.record(now, spec.window);
            }
        }
    }

    /// Raises a rate key's count to at least `at_least` with sends recorded at `now`:
    /// stands in for sends made elsewhere that this ledger cannot see.
    ///
    /// `at_least` usually comes from an upstream's answer, so it is untrusted: it is
    /// clamped to what the key can hold (its full ceiling; a key that full admits nothing
    /// until its oldest sends leave the window) and recorded in one step.
    pub fn pad(&mut self, set: &LimitSet, now: Nanos, layer: &LayerKey, at_least: u64) {
        let spec = &set.specs[layer.limit];
        let Some(full) = spec.ceilings.map(|c| c[0]) else {
            return;
        };
        let counter = self.counters.entry(layer.clone()).or_default();
        counter.log.evict(now, spec.window);
        let missing = at_least.min(full).saturating_sub(counter.log.count());
        counter.log.record_many(now, spec.window, missing);
    }

    /// Moves a request's counted send from its admission time to `now`, when its answer
    /// has begun: the upstream received it no later than that, so the count now lasts at
    /// least a window past its arrival however long it spent in pools and queues.
    pub fn resend(&mut self, set: &LimitSet, now: Nanos, taken: &Taken) {
        for layer in &taken.layers {
            let spec = &set.specs[layer.limit];
            if spec.ceilings.is_none() {
                continue;
            }
            let counter = self.counters.entry(layer.clone()).or_default();
            counter.log.evict(now, spec.window);
            // Only while the admission-time entry is still counted: once it has expired,
            // refunding would take someone else's.
            if taken.at.saturating_add(spec.window) > now {
                counter.log.refund(taken.at);
            }
            counter.log.record(now, spec.window);
        }
    }

    /// Counted sends of every rate key as (time, count), for replaying into a shared store.
    pub fn export(&mut self, set: &LimitSet, now: Nanos) -> Vec<(LayerKey, Vec<(Nanos, u64)>)> {
        self.counters
            .iter_mut()
            .filter(|(k, _)| set.specs[k.limit].ceilings.is_some())
            .map(|(k, c)| {
                c.log.evict(now, set.specs[k.limit].window);
                (k.clone(), c.log.entries().collect())
            })
            .filter(|(_, e): &(LayerKey, Vec<(Nanos, u64)>)| !e.is_empty())
            .collect()
    }

    /// Takes back everything a request reserved: it was refused or cancelled before it
    /// was sent, so it counts nowhere.
    pub fn refund(&mut self, set: &LimitSet, taken: &Taken) {
        for layer in &taken.layers {
            let spec = &set.specs[layer.limit];
            if let Some(counter) = self.counters.get_mut(layer) {
                if spec.ceilings.is_some() {
                    counter.log.refund(taken.at);
                }
            }
        }
        self.release(set, taken);
    }

    /// Ends a request's concurrency hold; its sends stay counted.
    pub fn release(&mut self, set: &LimitSet, taken: &Taken) {
        for layer in &taken.layers {
            if set.specs[layer.limit].concurrency.is_some() {
                if let Some(counter) = self.counters.get_mut(layer) {
                    counter.inflight = counter.inflight.saturating_sub(1);
                }
            }
        }
        self.forget_idle(&taken.layers);
    }

    fn forget_idle(&mut self, layers: &[LayerKey]) {
        for layer in layers {
            if self
                .counters
                .get(layer)
                .is_some_and(|c| c.inflight == 0 && c.log.is_empty())
            {
                self.counters.remove(layer);
            }
        }
    }

    /// Drops every key with nothing counted; returns how many remain.
    pub fn sweep(&mut self, set: &LimitSet, now: Nanos) -> usize {
        self.counters.retain(|k, c| {
            c.log.evict(now, set.specs[k.limit].window);
            c.inflight > 0 || !c.log.is_empty()
        });
        self.counters.len()
    }

    /// The enforcing rate layer of the demand's layers with the least room left for its
    /// priority class (its share of the quota, as cut by adaptive mode, not the whole).
    pub fn tightest(&mut self, set: &LimitSet, now: Nanos, demand: &Demand) -> Option<Headroom> {
        let class = demand.priority.index();
        let mut best: Option<Headroom> = None;
        for (i, layer) in demand.layers.iter().enumerate() {
            let spec = &set.specs[layer.limit];
            // A shadow limit changes nothing the caller sees, its headers included.
            if spec.shadow {
                continue;
            }
            let Some(quota) = spec
                .rate_ceiling(class, demand.holds_reserve(i))
                .map(|c| scaled(c, demand.scale_of(i)))
            else {
                continue;
            };
            let (used, oldest) = match self.counters.get_mut(layer) {
                Some(c) => {
                    c.log.evict(now, spec.window);
                    (c.log.count(), c.log.oldest())
                }
                None => (0, None),
            };
            let remaining = quota.saturating_sub(used);
            let reset = oldest.map_or(Duration::ZERO, |t| {
                Duration::from_nanos((t + spec.window).saturating_sub(now))
            });
            if best.as_ref().is_none_or(|b| remaining < b.remaining) {
                best = Some(Headroom {
                    limit: layer.limit,
                    quota,
                    remaining,
                    reset,
                });
            }
        }
        best
    }

    /// Use of every key with state: (layer, used, in flight).
    pub fn usage(&mut self, set: &LimitSet, now: Nanos) -> Vec<(LayerKey, u64, u64)> {
        self.counters
            .iter_mut()
            .map(|(k, c)| {
                c.log.evict(now, set.specs[k.limit].window);
                (k.clone(), c.log.count(), c.inflight)
            })
            .collect()
    }
}

/// A rate ceiling cut to `scale`, never below one request.
pub fn scaled(ceiling: u64, scale: f64) -> u64 {
    if scale >= 1.0 {
        ceiling
    } else {
        ((ceiling as f64) * scale.max(0.0)).floor().max(1.0) as u64
    }
}

/// Time until a request with `ahead` others queued before it fits under `ceiling`.
fn predicted_wait(log: &SlidingLog, now: Nanos, window: Nanos, ceiling: u64, ahead: u64) -> Nanos {
    if ahead < ceiling {
        return log.wait_for_room(now, window, ceiling - ahead);
    }
    // More waiting than one window holds: each full window of them adds a window.
    let windows = ahead / ceiling;
    let rest = ahead % ceiling;
    let first = log.wait_for_room(now, window, ceiling - rest).max(1);
    first.saturating_add(window.saturating_mul(windows))
}

/// [`crate::config::MINIMAL`] plus `text`, and its compiled limits.
#[cfg(test)]
pub(crate) fn test_limits(text: &str) -> (crate::config::Config, LimitSet) {
    let c = crate::config::Config::parse(&format!("{}{text}", crate::config::MINIMAL))
        .expect("test config");
    let s = LimitSet::new(&c.limits, &c.queue, |n| c.upstream_index(n));
    (c, s)
}

#[cfg(test)]
mod tests;
