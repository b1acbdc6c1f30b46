//! Adaptive mode: converge on the budget an upstream really grants a client, when it is
//! smaller than the configured one (someone else uses the same OAuth client, or the
//! upstream lowered its limit).
//!
//! Two inputs, per (upstream, client):
//! - **429 episodes.** A 429 to a request admitted under the limits now in force (same
//!   [`Generation`]) is a new episode, if more than `threshold` of the client's answers in
//!   the minute were 429s; it cuts the effective rate by `cut`, never below `floor`. 429s to
//!   requests admitted before that cut belong to the same episode (one burst, one cut).
//!   After `hold` without an episode the rate recovers by `recover` of the configured rate
//!   per minute, but stays at the rate of the last episode until `hold` passes once more.
//! - **`inin-ratelimit-allowed`.** The upstream's own statement of the client's budget caps
//!   the client's per-client layer at min(configured, allowed) until an answer reports
//!   another value, or `hold` passes without a report.
//!
//! The rate is a pure function of the state and `now` ([`Track::factor`]), so the
//! schedule is exact under tokio's paused clock.

use crate::config::AdaptiveConfig;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// Length of the window the 429 share is measured over.
const WINDOW: Duration = Duration::from_secs(60);

/// Recovery rates are given per minute.
const MINUTE: f64 = 60.0;

/// Who a cut applies to: an upstream index and a caller key.
pub type ClientKey = (usize, Arc<str>);

/// Which limits were in force when a request was admitted: bumped by every cut and every
/// lower learned ceiling, so 429s to requests sent before them are not counted again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Generation(pub u64);

/// What a request of one client may use now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scale {
    /// Share of every rate ceiling (the 429-driven cut); 1.0 without one.
    pub rate: f64,
    /// Share of the per-client layer's ceiling (the learned `inin-ratelimit-allowed`).
    pub client: f64,
    pub generation: Generation,
}

impl Scale {
    /// No cut, nothing learned.
    pub const FULL: Scale = Scale {
        rate: 1.0,
        client: 1.0,
        generation: Generation(0),
    };
}

/// A learned `inin-ratelimit-allowed` ceiling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ceiling {
    /// The reported budget, requests per window.
    pub allowed: u64,
    /// Its share of the configured value, in [floor, 1).
    pub share: f64,
    /// Last answer that reported it.
    pub seen: Instant,
}

/// The state of one (upstream, client).
#[derive(Debug, Clone, Copy)]
struct Track {
    since: Instant,
    answers: u64,
    too_many: u64,
    generation: u64,
    /// 429 episodes so far.
    cuts: u64,
    /// The factor right after the last cut.
    base: f64,
    /// The factor in force when the last episode happened: recovery stops there for a hold.
    at_429: f64,
    /// When the last episode cut.
    last_429: Option<Instant>,
    /// The same as wall-clock milliseconds, for sharing with other replicas.
    last_429_wall: u64,
    ceiling: Option<Ceiling>,
    /// `ceiling.seen` as wall-clock milliseconds.
    seen_wall: u64,
    /// When this replica last shared the state.
    published: Option<Instant>,
}

impl Track {
    fn new(now: Instant) -> Track {
        Track {
            since: now,
            answers: 0,
            too_many: 0,
            generation: 0,
            cuts: 0,
            base: 1.0,
            at_429: 1.0,
            last_429: None,
            last_429_wall: 0,
            ceiling: None,
            seen_wall: 0,
            published: None,
        }
    }

    /// The cut factor at `now`: `base` during the hold, then a ramp of `recover` per
    /// minute that pauses for another hold at `at_429`, then goes on to 1.
    fn factor(&self, cfg: &AdaptiveConfig, now: Instant) -> f64 {
        let Some(cut_at) = self.last_429 else {
            return 1.0;
        };
        let hold = cfg.hold.0;
        let ramp_from = cut_at + hold;
        if now <= ramp_from {
            return self.base;
        }
        let per_sec = cfg.recover / MINUTE;
        let ramped = |from: Instant, level: f64| {
            level + per_sec * now.saturating_duration_since(from).as_secs_f64()
        };
        let level = ramped(ramp_from, self.base);
        if level < self.at_429 {
            return level;
        }
        let to_cap = Duration::try_from_secs_f64((self.at_429 - self.base).max(0.0) / per_sec)
            .unwrap_or(Duration::MAX);
        let Some(plateau_end) = ramp_from
            .checked_add(to_cap)
            .and_then(|t| t.checked_add(hold))
        else {
            return self.at_429;
        };
        if now <= plateau_end {
            return self.at_429;
        }
        ramped(plateau_end, self.at_429).min(1.0)
    }

    /// The learned ceiling's share, while it lasts.
    fn ceiling_share(&self, cfg: &AdaptiveConfig, now: Instant) -> f64 {
        self.ceiling
            .filter(|c| now.saturating_duration_since(c.seen) < cfg.hold.0)
            .map_or(1.0, |c| c.share)
    }

    /// True while this track limits anything or its minute is still counting.
    fn live(&self, cfg: &AdaptiveConfig, now: Instant) -> bool {
        self.factor(cfg, now) < 1.0
            || self.ceiling_share(cfg, now) < 1.0
            || now.saturating_duration_since(self.since) < WINDOW
    }
}

/// Cuts and learned ceilings per (upstream, client).
pub struct Adaptive {
    cfg: AdaptiveConfig,
    max_keys: usize,
    tracks: Mutex<HashMap<ClientKey, Track>>,
    /// Version of the replicas' shared state merged last ([`Adaptive::merge`]).
    merged: AtomicU64,
}

/// One client's adaptive state, for `/status` and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub key: ClientKey,
    /// Share of the configured rate the 429 cuts leave now (1.0: none).
    pub factor: f64,
    /// Cuts so far (429 episodes).
    pub cuts: u64,
    /// Time until recovery begins, if it has not.
    pub hold_left: Duration,
    /// The learned `inin-ratelimit-allowed` ceiling, while it lasts.
    pub allowed: Option<u64>,
    /// Share of its configured size the per-client layer may use now: the cut or the
    /// learned ceiling, whichever is lower.
    pub client_share: f64,
}

impl Adaptive {
    /// Adaptive state for at most `max_keys` clients.
    pub fn new(cfg: AdaptiveConfig, max_keys: usize) -> Self {
        Adaptive {
            cfg,
            max_keys,
            tracks: Mutex::new(HashMap::new()),
            merged: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<ClientKey, Track>> {
        // Plain numbers; after a panic elsewhere keep using them.
        self.tracks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The track of `key`, made if there is room: the map stays within `max_keys` by
    /// forgetting clients that limit nothing and were not seen within a minute.
    fn track<'a>(
        &self,
        tracks: &'a mut HashMap<ClientKey, Track>,
        key: &ClientKey,
        now: Instant,
    ) -> Option<&'a mut Track> {
        if tracks.len() >= self.max_keys && !tracks.contains_key(key) {
            let cfg = &self.cfg;
            tracks.retain(|_, t| t.live(cfg, now));
            if tracks.len() >= self.max_keys {
                return None;
            }
        }
        Some(tracks.entry(key.clone()).or_insert_with(|| Track::new(now)))
    }

    /// Counts one upstream answer to a request admitted under `admitted`; a 429 of the
    /// current generation with the share over the threshold is a new episode and cuts.
    /// True when it cut (the state is worth sharing).
    pub fn observe(&self, key: &ClientKey, too_many: bool, admitted: Generation) -> bool {
        if !self.cfg.enabled {
            return false;
        }
        let now = Instant::now();
        let cfg = &self.cfg;
        let mut tracks = self.lock();
        let Some(t) = self.track(&mut tracks, key, now) else {
            return false;
        };
        if now.saturating_duration_since(t.since) >= WINDOW {
            t.since = now;
            t.answers = 0;
            t.too_many = 0;
        }
        t.answers = t.answers.saturating_add(1);
        t.too_many = t.too_many.saturating_add(u64::from(too_many));
        let share = t.too_many as f64 / t.answers as f64;
        if !too_many
            || admitted.0 != t.generation
            || t.answers < cfg.min_answers
            || share <= cfg.threshold
        {
            return false;
        }
        // The rate the upstream refused: the cut factor or the learned ceiling, whichever
        // held this client back.
        let effective = t.factor(cfg, now).min(t.ceiling_share(cfg, now));
        t.at_429 = effective;
        t.base = (effective * (1.0 - cfg.cut)).max(cfg.floor).min(effective);
        t.last_429 = Some(now);
        t.last_429_wall = wall_ms();
        t.published = Some(now);
        t.generation = t.generation.wrapping_add(1);
        t.cuts = t.cuts.saturating_add(1);
        tracing::warn!(
            client = %key.1,
            factor = t.base,
            share,
            "upstream 429 episode: cutting the client's rate"
        );
        true
    }

    /// The upstream reported the client's budget (`inin-ratelimit-allowed`) for a
    /// per-client layer configured at `configured` requests per window: caps it at
    /// min(configured, allowed), never above, never below `floor` of it. True when the
    /// state is worth sharing (a new value, or the last share is getting old).
    pub fn learn_allowed(&self, key: &ClientKey, allowed: u64, configured: u64) -> bool {
        if !self.cfg.enabled || configured == 0 {
            return false;
        }
        let now = Instant::now();
        let cfg = &self.cfg;
        let share = (allowed as f64 / configured as f64).clamp(cfg.floor, 1.0);
        let mut tracks = self.lock();
        if share >= 1.0 {
            // Another value ends a learned ceiling; an unlimited one never starts one.
            return match tracks.get_mut(key) {
                Some(t) if t.ceiling.is_some() => {
                    t.ceiling = None;
                    t.seen_wall = wall_ms();
                    t.published = Some(now);
                    true
                }
                _ => false,
            };
        }
        let Some(t) = self.track(&mut tracks, key, now) else {
            return false;
        };
        let current = t.ceiling_share(cfg, now);
        if share < current {
            // Requests in flight were admitted under the looser ceiling: their 429s are
            // not evidence against this one.
            t.generation = t.generation.wrapping_add(1);
        }
        t.ceiling = Some(Ceiling {
            allowed: allowed.min(configured),
            share,
            seen: now,
        });
        t.seen_wall = wall_ms();
        let stale = t
            .published
            .is_none_or(|p| now.saturating_duration_since(p) >= cfg.hold.0 / 4);
        let publish = share != current || stale;
        if publish {
            t.published = Some(now);
        }
        publish
    }

    /// What `key` may use on its limits now.
    pub fn scale(&self, key: &ClientKey) -> Scale {
        if !self.cfg.enabled {
            return Scale::FULL;
        }
        let now = Instant::now();
        self.lock().get(key).map_or(Scale::FULL, |t| Scale {
            rate: t.factor(&self.cfg, now),
            client: t.ceiling_share(&self.cfg, now),
            generation: Generation(t.generation),
        })
    }

    /// Clients limited now, by a cut or a learned ceiling.
    pub fn reports(&self) -> Vec<Report> {
        let now = Instant::now();
        let cfg = &self.cfg;
        self.lock()
            .iter()
            .filter(|(_, t)| t.factor(cfg, now) < 1.0 || t.ceiling_share(cfg, now) < 1.0)
            .map(|(k, t)| Report {
                key: k.clone(),
                factor: t.factor(cfg, now),
                cuts: t.cuts,
                hold_left: t
                    .last_429
                    .and_then(|at| (at + cfg.hold.0).checked_duration_since(now))
                    .unwrap_or_default(),
                allowed: (t.ceiling_share(cfg, now) < 1.0)
                    .then_some(t.ceiling.map(|c| c.allowed))
                    .flatten(),
                client_share: t.factor(cfg, now).min(t.ceiling_share(cfg, now)),
            })
            .collect()
    }

    /// How long a shared state stays worth reading: a hold, the slowest full recovery,
    /// and the hold at the rate of the last 429.
    pub fn shared_ttl(&self) -> Duration {
        let recovery = Duration::try_from_secs_f64(MINUTE / self.cfg.recover.max(1e-3))
            .unwrap_or(Duration::from_secs(3600));
        self.cfg.hold.0.saturating_mul(2).saturating_add(recovery)
    }

    /// `key`'s state as other replicas read it: a field name and a value.
    pub fn export(&self, key: &ClientKey) -> Option<(String, String)> {
        let tracks = self.lock();
        let t = tracks.get(key)?;
        let shared = SharedTrack {
            base: t.base,
            at_429: t.at_429,
            cut_ms: t.last_429.map(|_| t.last_429_wall),
            cuts: t.cuts,
            allowed: t.ceiling.map(|c| c.allowed),
            share: t.ceiling.map(|c| c.share),
            seen_ms: t.seen_wall,
        };
        let value = serde_json::to_string(&shared).ok()?;
        Some((format!("{}:{}", key.0, key.1), value))
    }

    /// Merges what other replicas shared (`version` changes when `entries` do): a newer
    /// cut or a newer ceiling report than this replica's own is taken over, so replicas
    /// do not each rediscover the budget with 429s of their own.
    pub fn merge(&self, version: u64, entries: &[(String, String)]) {
        if !self.cfg.enabled || self.merged.swap(version, Ordering::Relaxed) == version {
            return;
        }
        let now = Instant::now();
        let wall_now = wall_ms();
        let at = |ms: u64| now.checked_sub(Duration::from_millis(wall_now.saturating_sub(ms)));
        let cfg = &self.cfg;
        let mut tracks = self.lock();
        for (field, value) in entries {
            let Some((upstream, client)) = field.split_once(':') else {
                continue;
            };
            let (Ok(upstream), Ok(s)) = (
                upstream.parse::<usize>(),
                serde_json::from_str::<SharedTrack>(value),
            ) else {
                continue;
            };
            // Written by a replica, but read back from the network: keep it in range.
            let base = s.base.clamp(cfg.floor, 1.0);
            let at_429 = s.at_429.clamp(base, 1.0);
            let key: ClientKey = (upstream, Arc::from(client));
            let Some(t) = self.track(&mut tracks, &key, now) else {
                continue;
            };
            if let Some(cut_ms) = s.cut_ms.filter(|&ms| ms > t.last_429_wall) {
                if let Some(cut_at) = at(cut_ms) {
                    t.base = base;
                    t.at_429 = at_429;
                    t.last_429 = Some(cut_at);
                    t.last_429_wall = cut_ms;
                    t.cuts = t.cuts.max(s.cuts);
                    t.generation = t.generation.wrapping_add(1);
                }
            }
            if s.seen_ms > t.seen_wall {
                let before = t.ceiling_share(cfg, now);
                let seen = at(s.seen_ms);
                t.ceiling = match (s.allowed, s.share, seen) {
                    (Some(allowed), Some(share), Some(seen)) => Some(Ceiling {
                        allowed,
                        share: share.clamp(cfg.floor, 1.0),
                        seen,
                    }),
                    _ => None,
                };
                t.seen_wall = s.seen_ms;
                if t.ceiling_share(cfg, now) < before {
                    t.generation = t.generation.wrapping_add(1);
                }
            }
        }
    }

    /// Clients tracked now (bounded by `max_keys`).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no client is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One client's state as replicas share it (in Redis, as JSON).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SharedTrack {
    base: f64,
    at_429: f64,
    /// Wall-clock milliseconds of the last cut.
    cut_ms: Option<u64>,
    cuts: u64,
    allowed: Option<u64>,
    share: Option<f64>,
    /// Wall-clock milliseconds of the last ceiling report.
    seen_ms: u64,
}

/// Milliseconds since the Unix epoch: replicas' instants are their own, wall clocks are
/// shared (to well within the seconds a hold lasts).
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests;
