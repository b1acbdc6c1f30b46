//! [`RedisBackend`]: admissions as one script call in Redis, local shares while Redis is
//! away, and the heartbeat that connects, counts the replicas and brings Redis back.

mod heartbeat;

use super::conn::{Conn, Target};
use super::fallback::{Health, Local, Observed};
use super::keys::Keys;
use super::scripts::{AdmitKey, AdmitReply, Admitted, KeyKind, Refused, Scripts};
use super::shared::Shared;
use crate::config::StateConfig;
use crate::limit::window::Nanos;
use crate::limit::{BlockKind, Blocked, Demand, Headroom, LayerKey, LimitSet, Taken};
use crate::state::{Backend, BackendStatus, Clock, Grant, SharedAdaptive};
use futures_util::future::BoxFuture;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;
use tokio::time::Instant;

/// How often a request blocked by a shared concurrency cap asks again.
const CONCURRENCY_RETRY: Duration = Duration::from_millis(25);

/// The shared store.
pub struct RedisBackend {
    set: Arc<LimitSet>,
    clock: Clock,
    cfg: StateConfig,
    target: Target,
    conn: RwLock<Option<Conn>>,
    scripts: Arc<Scripts>,
    keys: Keys,
    replica: String,
    seq: AtomicU64,
    /// Replicas seen by heartbeat (or configured).
    replicas: AtomicU64,
    /// Breaker, local mode and recovery.
    health: Mutex<Health>,
    /// Local shares and the mirror of this replica's own sends.
    local: Local,
    /// Concurrency leases this replica holds: member → keys, renewed by the heartbeat.
    leases: Mutex<HashMap<u64, Vec<String>>>,
    /// Last shared use seen per rate key, for the switch to local shares; bounded.
    observed: Mutex<Observed>,
    /// Adaptive states and critical keys the replicas share.
    shared: Shared,
}

impl RedisBackend {
    /// Creates the backend and starts its heartbeat; Redis may be down at this point.
    /// `max_keys` bounds what it remembers per caller key (`[identity] max_keys`).
    pub fn start(
        set: Arc<LimitSet>,
        clock: Clock,
        cfg: StateConfig,
        max_keys: usize,
    ) -> Result<Arc<RedisBackend>, redis::RedisError> {
        let backend = Arc::new(Self::new(set, clock, cfg, max_keys)?);
        tokio::spawn(heartbeat::run(Arc::downgrade(&backend)));
        Ok(backend)
    }

    /// The backend without its heartbeat: it does not connect by itself.
    fn new(
        set: Arc<LimitSet>,
        clock: Clock,
        cfg: StateConfig,
        max_keys: usize,
    ) -> Result<RedisBackend, redis::RedisError> {
        let target = Target::new(&cfg)?;
        let replicas = cfg.replicas.max(1);
        Ok(RedisBackend {
            local: Local::new(&set, replicas, clock),
            keys: Keys::new(cfg.key_prefix.clone(), set.clone()),
            set,
            clock,
            target,
            conn: RwLock::new(None),
            scripts: Arc::new(Scripts::default()),
            replica: format!("{:016x}", rand::random::<u64>()),
            seq: AtomicU64::new(1),
            replicas: AtomicU64::new(replicas),
            health: Mutex::new(Health::default()),
            leases: Mutex::new(HashMap::new()),
            observed: Mutex::new(Observed::new(max_keys)),
            shared: Shared::new(clock, max_keys),
            cfg,
        })
    }

    fn health(&self) -> MutexGuard<'_, Health> {
        // Plain flags and times, consistent per call; after a panic elsewhere keep going.
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection to use for this request, or `None` to decide with local shares.
    /// After any failure only the heartbeat ends local mode: it replays this replica's
    /// sends into Redis, then waits the settle time.
    fn connection(&self) -> Option<Conn> {
        if !self.health().use_redis(Instant::now()) {
            return None;
        }
        self.conn.read().ok().and_then(|c| c.clone())
    }

    fn failed(&self, why: &str) {
        self.health().failed(why, Instant::now());
    }

    /// Leaving shared mode pads the local shares with what this replica last saw used in
    /// Redis (see [`Local::pad_seen`]).
    fn enter_fallback(&self) {
        if !self.health().enter_fallback() {
            return;
        }
        let seen: Vec<(LayerKey, Nanos)> = self
            .observed
            .lock()
            .map(|mut s| s.seen.drain().map(|(k, (_, at))| (k, at)).collect())
            .unwrap_or_default();
        self.local.pad_seen(seen);
        tracing::warn!("redis unreachable: deciding with local shares");
    }

    /// The script's view of one admission's keys, in `keys` order.
    fn admit_keys(
        &self,
        demand: &Demand,
        ahead: &[u64],
        keys: &[(LayerKey, bool)],
    ) -> Vec<AdmitKey> {
        let class = demand.priority.index();
        let lease = self.cfg.lease_ttl.0.as_micros() as u64;
        keys.iter()
            .map(|(layer, cap)| {
                let spec = &self.set.specs[layer.limit];
                let index = demand.layers.iter().position(|l| l == layer);
                let a = index.and_then(|i| ahead.get(i)).copied().unwrap_or(0);
                let scale = index.map_or(demand.rate_scale, |i| demand.scale_of(i));
                // Decided in Rust per key: the script only sees each key's ceiling.
                let reserved = index.is_none_or(|i| demand.holds_reserve(i));
                let (kind, ceiling, span_us, quota) = match (
                    cap,
                    spec.ceiling_now(class, reserved, scale),
                    spec.concurrency_cap(class, reserved),
                ) {
                    (false, Some(ceil), _) => (KeyKind::Rate, ceil, spec.window / 1000, ceil),
                    (true, _, Some(c)) => (
                        KeyKind::Concurrency,
                        c,
                        lease,
                        spec.concurrency_cap(0, true).unwrap_or(c),
                    ),
                    _ => (KeyKind::Concurrency, u64::MAX, lease, 0),
                };
                AdmitKey {
                    key: self.keys.layer(layer, *cap),
                    kind,
                    ceiling,
                    span_us,
                    ahead: a,
                    quota,
                }
            })
            .collect()
    }

    /// Remembers the shared use each key had, for a conservative switch to local shares.
    fn observe(&self, keys: &[(LayerKey, bool)], counts: &[u64]) {
        let now = self.clock.now();
        if let Ok(mut seen) = self.observed.lock() {
            for ((layer, cap), &count) in keys.iter().zip(counts) {
                if !cap {
                    seen.insert(&self.set, layer, count, now);
                }
            }
        }
    }

    /// An admission Redis recorded: mirrored locally, its leases held for renewal.
    fn admitted(&self, demand: &Demand, keys: &[(LayerKey, bool)], id: u64, a: Admitted) -> Grant {
        let mut taken = self
            .local
            .with(|set, ledger, now| ledger.record(set, now, &demand.layers));
        taken.id = id;
        let conc = self.keys.concurrency(&demand.layers);
        if !conc.is_empty() {
            if let Ok(mut leases) = self.leases.lock() {
                leases.insert(id, conc);
            }
        }
        let headroom = a.tightest.and_then(|t| {
            let layer = &keys.get(t.key)?.0;
            let index = demand.layers.iter().position(|l| l == layer);
            let scale = index.map_or(demand.rate_scale, |i| demand.scale_of(i));
            let reserved = index.is_none_or(|i| demand.holds_reserve(i));
            Some(Headroom {
                limit: layer.limit,
                quota: self.set.specs[layer.limit]
                    .ceiling_now(demand.priority.index(), reserved, scale)
                    .unwrap_or(0),
                remaining: t.remaining,
                reset: t.reset,
            })
        });
        Grant {
            taken,
            headroom,
            // Shadow mode is refused with Redis (`check-config`): the script holds every layer.
            shadow: Vec::new(),
        }
    }

    /// Local sends are also written to Redis, best effort: when only this replica lost
    /// Redis for a moment (a timeout under load), or while it settles after an outage, the
    /// replicas still sharing see them.
    fn write_through(&self, taken: &Taken) {
        if let Some(conn) = self.conn.read().ok().and_then(|c| c.clone()) {
            self.record_in_redis(conn, &taken.layers);
        }
    }

    /// Records one send in every rate key of `layers` at Redis' time, in the background.
    fn record_in_redis(&self, mut conn: Conn, layers: &[LayerKey]) {
        let keys: Vec<(String, u64)> = layers
            .iter()
            .filter(|l| self.set.specs[l.limit].ceilings.is_some())
            .map(|l| {
                (
                    self.keys.layer(l, false),
                    self.set.specs[l.limit].window / 1_000_000 + 1000,
                )
            })
            .collect();
        if keys.is_empty() {
            return;
        }
        let member = format!(
            "{}:sent:{}",
            self.replica,
            self.seq.fetch_add(1, Ordering::Relaxed)
        );
        let scripts = self.scripts.clone();
        let timeout = self.cfg.timeout.0;
        tokio::spawn(async move {
            let record = scripts.record(&mut conn, member, keys);
            let _ = tokio::time::timeout(timeout * 5, record).await;
        });
    }

    /// Removes a member from keys in Redis, in the background.
    fn forget(&self, keys: Vec<String>, member: String) {
        if keys.is_empty() {
            return;
        }
        let Some(mut conn) = self.connection() else {
            return;
        };
        let timeout = self.cfg.timeout.0;
        tokio::spawn(async move {
            let mut pipe = redis::pipe();
            for k in &keys {
                pipe.zrem(k, &member).ignore();
            }
            let _ = tokio::time::timeout(timeout * 5, pipe.query_async::<()>(&mut conn)).await;
        });
    }
}

impl Backend for RedisBackend {
    fn take(
        self: Arc<Self>,
        demand: Arc<Demand>,
        ahead: Vec<u64>,
        pause: Option<String>,
    ) -> BoxFuture<'static, Result<Grant, Blocked>> {
        Box::pin(async move {
            let Some(mut conn) = self.connection() else {
                self.enter_fallback();
                let granted = self.local.take(&demand, &ahead);
                if let Ok(g) = &granted {
                    self.write_through(&g.taken);
                }
                return granted;
            };
            let keys = self.keys.admission(&demand);
            let id = self.seq.fetch_add(1, Ordering::Relaxed);
            let admit_keys = self.admit_keys(&demand, &ahead, &keys);
            let member = format!("{}:{id}", self.replica);
            // Without a caller to pause, a key no one sets: the script's check finds nothing.
            let pause_key = self.keys.pause(pause.as_deref().unwrap_or("-"));
            let answer = tokio::time::timeout(
                self.cfg.timeout.0,
                self.scripts
                    .admit(&mut conn, member, &admit_keys, pause_key),
            )
            .await;
            let reply = match answer {
                Ok(Ok(reply)) => reply,
                Ok(Err(e)) => {
                    self.failed(&e.to_string());
                    self.enter_fallback();
                    return self.local.take(&demand, &ahead);
                }
                Err(_) => {
                    self.failed("timeout");
                    self.enter_fallback();
                    return self.local.take(&demand, &ahead);
                }
            };
            self.health().succeeded();
            // Redis' waits in µs, as nanoseconds.
            let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
            match reply {
                AdmitReply::Admitted(a) => {
                    self.observe(&keys, &a.counts);
                    Ok(self.admitted(&demand, &keys, id, a))
                }
                AdmitReply::Refused(Refused { key, wait, counts }) => {
                    self.observe(&keys, &counts);
                    let kind = match keys.get(key) {
                        Some((layer, _)) => BlockKind::Layer(layer.clone()),
                        None => BlockKind::Unanswered,
                    };
                    Err(Blocked {
                        kind,
                        wait: wait.map(nanos),
                    })
                }
                AdmitReply::Paused { wait } => Err(Blocked {
                    kind: BlockKind::Paused,
                    wait: wait.map(nanos),
                }),
            }
        })
    }

    fn refund(&self, taken: &Taken) {
        self.local.with(|set, ledger, _| ledger.refund(set, taken));
        if taken.id > 0 {
            if let Ok(mut leases) = self.leases.lock() {
                leases.remove(&taken.id);
            }
            let mut keys = self.keys.rate(&taken.layers);
            keys.extend(self.keys.concurrency(&taken.layers));
            self.forget(keys, format!("{}:{}", self.replica, taken.id));
        }
    }

    fn release(&self, taken: &Taken) {
        self.local.with(|set, ledger, _| ledger.release(set, taken));
        if taken.id > 0 {
            let held = self
                .leases
                .lock()
                .ok()
                .and_then(|mut l| l.remove(&taken.id));
            if let Some(keys) = held {
                self.forget(keys, format!("{}:{}", self.replica, taken.id));
            }
        }
    }

    /// The upstream counts `used` sends in `layer`'s window: sends made outside pacer (the
    /// same OAuth client used by another system) are padded into the shared key, so every
    /// replica sees them. Only when `used` is above the count Redis last reported for the
    /// key (otherwise pacer's own sends already explain it: no extra round trip), clamped
    /// to the key's whole quota (the number is the upstream's, so untrusted). While Redis
    /// is unreachable the local shares are padded instead.
    fn at_least(&self, layer: &LayerKey, used: u64) {
        let spec = &self.set.specs[layer.limit];
        let Some(full) = spec.ceilings.map(|c| c[0]) else {
            return;
        };
        let used = used.min(full);
        let now = self.clock.now();
        let known = self
            .observed
            .lock()
            .ok()
            .and_then(|o| o.seen.get(layer).copied())
            .filter(|&(_, at)| now.saturating_sub(at) < spec.window)
            .map_or(0, |(count, _)| count);
        if used <= known {
            return;
        }
        let Some(mut conn) = self.connection() else {
            self.local
                .with(|set, ledger, now| ledger.pad(set, now, layer, used));
            return;
        };
        if let Ok(mut o) = self.observed.lock() {
            o.insert(&self.set, layer, used, now);
        }
        let key = self.keys.layer(layer, false);
        let span_us = spec.window / 1000;
        let expiry_ms = spec.window / 1_000_000 + 1000;
        let member = format!(
            "{}:pad:{}",
            self.replica,
            self.seq.fetch_add(1, Ordering::Relaxed)
        );
        let scripts = self.scripts.clone();
        let timeout = self.cfg.timeout.0;
        tokio::spawn(async move {
            let pad = scripts.pad(&mut conn, key, used, span_us, member, expiry_ms);
            let _ = tokio::time::timeout(timeout * 5, pad).await;
        });
    }

    fn record_sent(&self, demand: &Demand) {
        self.local
            .with(|set, ledger, now| ledger.record_sent(set, now, &demand.layers));
        if let Some(conn) = self.conn.read().ok().and_then(|c| c.clone()) {
            self.record_in_redis(conn, &demand.layers);
        }
    }

    fn pause(&self, key: &str, pause: Duration) {
        let Some(mut conn) = self.connection() else {
            return;
        };
        let key = self.keys.pause(key);
        let ms = pause.as_millis().max(1) as u64;
        let timeout = self.cfg.timeout.0;
        tokio::spawn(async move {
            let cmd = redis::cmd("SET")
                .arg(&key)
                .arg(1)
                .arg("PX")
                .arg(ms)
                .to_owned();
            let _ = tokio::time::timeout(timeout * 5, cmd.query_async::<()>(&mut conn)).await;
        });
    }

    fn share_adaptive(&self, field: String, value: String, ttl: Duration) {
        let Some(conn) = self.connection() else {
            return;
        };
        let key = self.keys.adaptive();
        Shared::share_adaptive(conn, key, field, value, ttl, self.cfg.timeout.0 * 5);
    }

    fn shared_adaptive(&self) -> SharedAdaptive {
        self.shared.adaptive()
    }

    fn share_critical(&self, members: Vec<String>, keep: Duration) {
        let Some(conn) = self.connection() else {
            return;
        };
        let key = self.keys.critical();
        let scripts = self.scripts.clone();
        self.shared
            .share_critical(conn, scripts, key, members, keep, self.cfg.timeout.0 * 5);
    }

    fn shared_critical(&self) -> Vec<(String, Nanos)> {
        self.shared.take_critical()
    }

    fn is_remote(&self) -> bool {
        true
    }

    fn concurrency_retry(&self) -> Option<Duration> {
        Some(CONCURRENCY_RETRY)
    }

    fn usage(&self) -> Vec<(LayerKey, u64, u64)> {
        self.local.with(|set, ledger, now| ledger.usage(set, now))
    }

    fn key_count(&self) -> usize {
        self.local.key_count()
    }

    fn has_key(&self, key: &LayerKey) -> bool {
        self.local.has_key(key)
    }

    fn sweep(&self) {
        self.local.with(|set, ledger, now| {
            ledger.sweep(set, now);
        });
        let now = self.clock.now();
        if let Ok(mut seen) = self.observed.lock() {
            seen.prune(&self.set, now);
        }
    }

    fn status(&self) -> BackendStatus {
        BackendStatus {
            kind: "redis",
            up: self.health().is_up(Instant::now()),
            replicas: self.replicas.load(Ordering::SeqCst),
        }
    }
}

#[cfg(test)]
mod tests;
