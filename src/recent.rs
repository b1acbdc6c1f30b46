//! What happened lately per upstream and client, for `/status` and the live page: upstream
//! 429 and 401 answers, pacer's own sheds, and requests that waited in the queue, counted in
//! one-minute buckets over the last [`MINUTES`] minutes.
//!
//! Keys are metric labels (configured upstreams, bounded client labels); even so at most
//! [`MAX_SERIES`] are kept, and a key that finds no room counts under the client [`OTHER`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Minutes of history kept (the current, unfinished one included).
pub const MINUTES: usize = 5;

/// Upstream/client pairs kept before new clients count as [`OTHER`] (one more pair per
/// upstream).
pub const MAX_SERIES: usize = 1024;

/// The client of events whose pair found no room.
pub const OTHER: &str = "other";

/// Requests held at least this long before admission count as queued.
pub const QUEUED_AFTER: Duration = Duration::from_millis(1);

const BUCKET: Duration = Duration::from_secs(60);

/// One thing worth showing that happened to a request.
#[derive(Debug, Clone, Copy)]
pub enum Event {
    /// The upstream answered with this status (only 429 and 401 are counted).
    Upstream(u16),
    /// pacer answered 429 itself.
    Shed,
    /// Admitted after waiting this long (counted from [`QUEUED_AFTER`] on).
    Waited(Duration),
}

/// Counts of one upstream and client over the window.
#[derive(Debug, Default, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Counts {
    pub upstream_429: u64,
    pub upstream_401: u64,
    pub shed: u64,
    pub queued: u64,
    pub wait_seconds_total: f64,
    pub wait_seconds_max: f64,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        self.upstream_429 += other.upstream_429;
        self.upstream_401 += other.upstream_401;
        self.shed += other.shed;
        self.queued += other.queued;
        self.wait_seconds_total += other.wait_seconds_total;
        self.wait_seconds_max = self.wait_seconds_max.max(other.wait_seconds_max);
    }

    fn is_empty(&self) -> bool {
        self.upstream_429 == 0 && self.upstream_401 == 0 && self.shed == 0 && self.queued == 0
    }
}

/// One upstream and client's counts over the window.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Series {
    pub upstream: String,
    pub client: String,
    #[serde(flatten)]
    pub counts: Counts,
}

#[derive(Default, Clone, Copy)]
struct Bucket {
    minute: u64,
    counts: Counts,
}

type Key = (Arc<str>, Arc<str>);

/// The recent events of one instance.
pub struct Recent {
    start: Instant,
    series: Mutex<HashMap<Key, [Bucket; MINUTES]>>,
}

impl Default for Recent {
    fn default() -> Self {
        Recent::new(Instant::now())
    }
}

impl Recent {
    /// Empty, with minutes counted from `start`.
    pub fn new(start: Instant) -> Recent {
        Recent {
            start,
            series: Mutex::new(HashMap::new()),
        }
    }

    /// Counts `event` for `upstream` and `client` now.
    pub fn record(&self, upstream: &str, client: &str, event: Event) {
        // Most admissions wait for nothing: they cost no clock read and no lock here.
        if let Some(add) = counted(event) {
            self.add_at(upstream, client, add, Instant::now());
        }
    }

    /// Counts `event` for `upstream` and `client` at `now`.
    pub fn record_at(&self, upstream: &str, client: &str, event: Event, now: Instant) {
        if let Some(add) = counted(event) {
            self.add_at(upstream, client, add, now);
        }
    }

    fn add_at(&self, upstream: &str, client: &str, add: Counts, now: Instant) {
        let minute = self.minute(now);
        let mut key: Key = (Arc::from(upstream), Arc::from(client));
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        if series.len() >= MAX_SERIES && !series.contains_key(&key) {
            series.retain(|_, b| !stale(b, minute));
            if series.len() >= MAX_SERIES {
                key.1 = Arc::from(OTHER);
            }
        }
        let buckets = series.entry(key).or_default();
        let b = &mut buckets[(minute % MINUTES as u64) as usize];
        if b.minute != minute {
            *b = Bucket {
                minute,
                counts: Counts::default(),
            };
        }
        b.counts.add(&add);
    }

    /// Every upstream and client with something in the window, sorted.
    pub fn snapshot(&self) -> Vec<Series> {
        self.snapshot_at(Instant::now())
    }

    /// [`Recent::snapshot`] as of `now`; forgets pairs with nothing left in the window.
    pub fn snapshot_at(&self, now: Instant) -> Vec<Series> {
        let minute = self.minute(now);
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        series.retain(|_, b| !stale(b, minute));
        let mut out: Vec<Series> = series
            .iter()
            .filter_map(|((upstream, client), buckets)| {
                let mut counts = Counts::default();
                for b in buckets.iter().filter(|b| in_window(b, minute)) {
                    counts.add(&b.counts);
                }
                (!counts.is_empty()).then(|| Series {
                    upstream: upstream.to_string(),
                    client: client.to_string(),
                    counts,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.upstream, &a.client).cmp(&(&b.upstream, &b.client)));
        out
    }

    fn minute(&self, now: Instant) -> u64 {
        // Bucket 0 is never "unused" by accident: minutes start at 1.
        now.saturating_duration_since(self.start).as_secs() / BUCKET.as_secs() + 1
    }
}

/// What `event` adds to its pair's counts, if anything.
fn counted(event: Event) -> Option<Counts> {
    let mut add = Counts::default();
    match event {
        Event::Upstream(429) => add.upstream_429 = 1,
        Event::Upstream(401) => add.upstream_401 = 1,
        Event::Upstream(_) => return None,
        Event::Shed => add.shed = 1,
        Event::Waited(d) if d >= QUEUED_AFTER => {
            add.queued = 1;
            add.wait_seconds_total = d.as_secs_f64();
            add.wait_seconds_max = d.as_secs_f64();
        }
        Event::Waited(_) => return None,
    }
    Some(add)
}

fn in_window(b: &Bucket, minute: u64) -> bool {
    b.minute != 0 && b.minute + MINUTES as u64 > minute
}

fn stale(buckets: &[Bucket; MINUTES], minute: u64) -> bool {
    !buckets.iter().any(|b| in_window(b, minute))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn counts_events_per_upstream_and_client_within_the_window() {
        let t0 = Instant::now();
        let r = Recent::new(t0);
        r.record_at("api", "ivr", Event::Upstream(429), t0);
        r.record_at("api", "ivr", Event::Upstream(429), t0 + MIN);
        r.record_at("api", "ivr", Event::Upstream(401), t0 + MIN);
        r.record_at("api", "ivr", Event::Upstream(200), t0 + MIN);
        r.record_at("api", "bulk", Event::Shed, t0 + MIN);
        r.record_at("api", "bulk", Event::Waited(Duration::from_millis(500)), t0);
        r.record_at("api", "bulk", Event::Waited(Duration::from_secs(2)), t0);
        r.record_at("api", "bulk", Event::Waited(Duration::ZERO), t0);
        let s = r.snapshot_at(t0 + MIN);
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s[0].client, "bulk");
        assert_eq!(s[0].counts.shed, 1);
        assert_eq!(s[0].counts.queued, 2);
        assert_eq!(s[0].counts.wait_seconds_total, 2.5);
        assert_eq!(s[0].counts.wait_seconds_max, 2.0);
        assert_eq!(s[1].client, "ivr");
        assert_eq!((s[1].counts.upstream_429, s[1].counts.upstream_401), (2, 1));
        // Minute 0 leaves the window first; then everything does, and is forgotten.
        let later = r.snapshot_at(t0 + MIN * MINUTES as u32);
        assert_eq!(later.len(), 2, "{later:?}");
        assert_eq!(later[1].counts.upstream_429, 1);
        assert_eq!(later[0].counts.queued, 0);
        assert_eq!(later[0].counts.shed, 1);
        assert!(r.snapshot_at(t0 + MIN * (MINUTES as u32 + 1)).is_empty());
        assert!(r.series.lock().unwrap().is_empty());
    }

    #[test]
    fn a_reused_bucket_starts_from_zero() {
        let t0 = Instant::now();
        let r = Recent::new(t0);
        r.record_at("api", "ivr", Event::Shed, t0);
        r.record_at("api", "ivr", Event::Shed, t0 + MIN * MINUTES as u32);
        let s = r.snapshot_at(t0 + MIN * MINUTES as u32);
        assert_eq!(s[0].counts.shed, 1);
    }

    #[test]
    fn keeps_at_most_max_series_pairs() {
        let t0 = Instant::now();
        let r = Recent::new(t0);
        for i in 0..MAX_SERIES * 3 {
            r.record_at("api", &format!("client-{i}"), Event::Shed, t0);
        }
        let s = r.snapshot_at(t0);
        assert_eq!(s.len(), MAX_SERIES + 1);
        let other = s.iter().find(|s| s.client == OTHER).expect("other");
        assert_eq!(other.counts.shed, (MAX_SERIES * 2) as u64);
        // Once the old pairs leave the window, new ones find room again.
        r.record_at("api", "late", Event::Shed, t0 + MIN * MINUTES as u32);
        let s = r.snapshot_at(t0 + MIN * MINUTES as u32);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].client, "late");
    }
}
