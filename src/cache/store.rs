//! The kept answers: an LRU map bounded by bytes, each entry with its own expiry.
//!
//! The `lru` crate keeps the exact recency order; what it does not have, a bound in bytes
//! rather than entries and a per-entry TTL, is added here: every entry is weighed (body,
//! headers, key and bookkeeping) and the least recently used ones are dropped until the new
//! one fits; an expired entry is dropped when it is next asked for, or evicted by age of use
//! like any other, so expired entries never hold memory past the byte bound.

use super::Key;
use bytes::Bytes;
use http::{HeaderMap, HeaderName};
use lru::LruCache;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::time::Instant;

/// Bytes counted per entry on top of its body, headers and key: the map's slot, the `Arc`
/// and the entry's own fields.
pub const ENTRY_OVERHEAD: u64 = 256;

/// One kept answer (always a `200`).
#[derive(Debug)]
pub struct Entry {
    /// The `[[cache]]` entry it was kept under.
    pub rule: usize,
    /// The upstream's headers, hop-by-hop fields already removed.
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The request headers the upstream's `Vary` names, with a hash of the value they had
    /// (never the value: it may be a credential).
    pub vary: Vec<(HeaderName, [u8; 16])>,
    /// When the upstream answered.
    pub stored: Instant,
    /// Handed out until then.
    pub expires: Instant,
}

impl Entry {
    /// Bytes this entry is counted as.
    pub fn weight(&self) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum();
        let vary: usize = self.vary.iter().map(|(n, _)| n.as_str().len() + 16).sum();
        (self.body.len() + headers + vary + std::mem::size_of::<Key>()) as u64 + ENTRY_OVERHEAD
    }
}

struct Inner {
    map: LruCache<Key, (Arc<Entry>, u64)>,
    bytes: u64,
}

/// Kept answers, at most `max_bytes` of them by [`Entry::weight`].
pub struct Store {
    inner: Mutex<Inner>,
    max_bytes: u64,
}

impl Store {
    /// An empty store holding at most `max_bytes`.
    pub fn new(max_bytes: u64) -> Store {
        Store {
            inner: Mutex::new(Inner {
                map: LruCache::unbounded(),
                bytes: 0,
            }),
            max_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The map stays consistent through a panic elsewhere: no operation here can panic
        // half-way.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fresh entry under `key`, now the most recently used; an expired one is dropped.
    pub fn get(&self, key: &Key, now: Instant) -> Option<Arc<Entry>> {
        let mut inner = self.lock();
        let (entry, weight) = inner.map.get(key).map(|(e, w)| (e.clone(), *w))?;
        if entry.expires <= now {
            inner.map.pop(key);
            inner.bytes = inner.bytes.saturating_sub(weight);
            return None;
        }
        Some(entry)
    }

    /// Keeps `entry` under `key` (replacing what was there), dropping the least recently
    /// used entries until it fits; one heavier than the whole store is not kept.
    pub fn insert(&self, key: Key, entry: Arc<Entry>) -> bool {
        let weight = entry.weight();
        if weight > self.max_bytes {
            return false;
        }
        let mut inner = self.lock();
        if let Some((_, old)) = inner.map.pop(&key) {
            inner.bytes = inner.bytes.saturating_sub(old);
        }
        while inner.bytes + weight > self.max_bytes {
            match inner.map.pop_lru() {
                Some((_, (_, w))) => inner.bytes = inner.bytes.saturating_sub(w),
                None => break,
            }
        }
        inner.map.put(key, (entry, weight));
        inner.bytes += weight;
        true
    }

    /// Entries kept now (expired ones included until they are dropped).
    pub fn entries(&self) -> usize {
        self.lock().map.len()
    }

    /// Bytes kept now, by [`Entry::weight`]; never above the bound.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// The bound in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(i: u64) -> Key {
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&i.to_le_bytes());
        k
    }

    fn entry(body: usize, ttl: Duration) -> Arc<Entry> {
        let now = Instant::now();
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/json".parse().unwrap());
        Arc::new(Entry {
            rule: 0,
            headers,
            body: Bytes::from(vec![b'x'; body]),
            vary: Vec::new(),
            stored: now,
            expires: now + ttl,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn stays_within_max_bytes_under_a_hundred_thousand_distinct_keys() {
        let max = 1024 * 1024;
        let store = Store::new(max);
        let hour = Duration::from_secs(3600);
        for i in 0..100_000u64 {
            assert!(store.insert(key(i), entry(100 + (i % 900) as usize, hour)));
            assert!(store.bytes() <= max, "{} bytes after {i}", store.bytes());
        }
        // The bound is met by what is really kept, not by a counter drifting away from it.
        let counted: u64 = (0..100_000u64)
            .filter_map(|i| store.get(&key(i), Instant::now()))
            .map(|e| e.weight())
            .sum();
        assert_eq!(counted, store.bytes());
        assert!(
            store.entries() > 100 && store.entries() < 10_000,
            "{}",
            store.entries()
        );
        // The most recent ones are the ones kept.
        assert!(store.get(&key(99_999), Instant::now()).is_some());
        assert!(store.get(&key(0), Instant::now()).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn evicts_the_least_recently_used_and_expires_by_ttl() {
        let one = entry(1000, Duration::from_secs(60)).weight();
        let store = Store::new(one * 3);
        for i in 0..3 {
            store.insert(key(i), entry(1000, Duration::from_secs(60)));
        }
        // Using 0 makes 1 the least recently used: it goes when 3 comes.
        assert!(store.get(&key(0), Instant::now()).is_some());
        store.insert(key(3), entry(1000, Duration::from_secs(60)));
        assert!(store.get(&key(1), Instant::now()).is_none());
        assert!(store.get(&key(0), Instant::now()).is_some());
        assert_eq!(store.entries(), 3);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(store.get(&key(0), Instant::now()).is_none(), "expired");
        assert_eq!(store.entries(), 2);
        assert_eq!(store.bytes(), one * 2);
        // Larger than the whole store: never kept, nothing evicted for it.
        assert!(!store.insert(key(9), entry(one as usize * 4, Duration::from_secs(60))));
        assert_eq!(store.entries(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn replacing_an_entry_counts_its_bytes_once() {
        let store = Store::new(1 << 20);
        store.insert(key(1), entry(500, Duration::from_secs(60)));
        let once = store.bytes();
        store.insert(key(1), entry(500, Duration::from_secs(60)));
        assert_eq!((store.entries(), store.bytes()), (1, once));
    }
}
