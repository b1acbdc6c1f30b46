//! Adaptive mode: when more than `threshold` of a client's answers from an upstream are
//! 429 within a minute, pacer's configured limits are evidently looser than the upstream's
//! for that client; its rate ceilings are cut by `cut` for `hold`, then restored.

use crate::config::AdaptiveConfig;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Length of the window the 429 share is measured over.
const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
struct Track {
    since: Instant,
    answers: u64,
    too_many: u64,
    cut_until: Option<Instant>,
}

/// Upstream 429 shares per (upstream, client) and the cuts they caused.
pub struct Adaptive {
    cfg: AdaptiveConfig,
    max_keys: usize,
    tracks: Mutex<HashMap<(usize, Arc<str>), Track>>,
}

impl Adaptive {
    /// Adaptive state for at most `max_keys` clients.
    pub fn new(cfg: AdaptiveConfig, max_keys: usize) -> Self {
        Adaptive {
            cfg,
            max_keys,
            tracks: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one upstream answer for `client`; a 429 share over the threshold starts a cut.
    pub fn observe(&self, upstream: usize, client: &Arc<str>, too_many: bool) {
        if !self.cfg.enabled {
            return;
        }
        let now = Instant::now();
        let Ok(mut tracks) = self.tracks.lock() else {
            return;
        };
        if tracks.len() >= self.max_keys && !tracks.contains_key(&(upstream, client.clone())) {
            // Keep the map bounded: forget clients that are neither cut nor recently seen.
            tracks.retain(|_, t| t.cut_until.is_some_and(|u| u > now) || now - t.since < WINDOW);
            if tracks.len() >= self.max_keys {
                return;
            }
        }
        let t = tracks.entry((upstream, client.clone())).or_insert(Track {
            since: now,
            answers: 0,
            too_many: 0,
            cut_until: None,
        });
        if now - t.since >= WINDOW {
            t.since = now;
            t.answers = 0;
            t.too_many = 0;
        }
        t.answers += 1;
        t.too_many += u64::from(too_many);
        let share = t.too_many as f64 / t.answers as f64;
        if too_many && t.answers >= self.cfg.min_answers && share > self.cfg.threshold {
            let was_cut = t.cut_until.is_some_and(|u| u > now);
            t.cut_until = Some(now + self.cfg.hold.0);
            if !was_cut {
                tracing::warn!(%client, share, "upstream 429s over the threshold: cutting the client's rate");
            }
        }
    }

    /// The share of its rate ceilings `client` may use on `upstream` now.
    pub fn scale(&self, upstream: usize, client: &Arc<str>) -> f64 {
        if !self.cfg.enabled {
            return 1.0;
        }
        let now = Instant::now();
        let cut = self
            .tracks
            .lock()
            .ok()
            .and_then(|t| t.get(&(upstream, client.clone())).and_then(|t| t.cut_until))
            .is_some_and(|until| until > now);
        if cut {
            1.0 - self.cfg.cut
        } else {
            1.0
        }
    }

    /// Clients under a cut now, with the time left.
    pub fn cuts(&self) -> Vec<((usize, Arc<str>), Duration)> {
        let now = Instant::now();
        self.tracks
            .lock()
            .map(|t| {
                t.iter()
                    .filter_map(|(k, t)| {
                        Some((k.clone(), t.cut_until?.checked_duration_since(now)?))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;

    fn adaptive() -> Adaptive {
        Adaptive::new(
            AdaptiveConfig {
                enabled: true,
                threshold: 0.01,
                cut: 0.2,
                hold: Dur::secs(3600),
                min_answers: 100,
            },
            1000,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn cuts_after_one_percent_429s_and_recovers_after_the_hold() {
        let a = adaptive();
        let c: Arc<str> = Arc::from("client");
        for _ in 0..198 {
            a.observe(0, &c, false);
        }
        a.observe(0, &c, true);
        assert_eq!(a.scale(0, &c), 1.0, "0.5% is under the threshold");
        a.observe(0, &c, true);
        a.observe(0, &c, true);
        assert_eq!(a.scale(0, &c), 0.8);
        assert_eq!(a.scale(1, &c), 1.0, "only that upstream");
        tokio::time::advance(Duration::from_secs(3601)).await;
        assert_eq!(a.scale(0, &c), 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_few_answers_are_not_evidence() {
        let a = adaptive();
        let c: Arc<str> = Arc::from("client");
        for _ in 0..10 {
            a.observe(0, &c, true);
        }
        assert_eq!(a.scale(0, &c), 1.0);
    }
}
