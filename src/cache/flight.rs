//! Single flight: identical requests already admitted and on their way upstream, by key.
//!
//! A request becomes a flight's leader only once it has been admitted ([`Flights::lead`]),
//! so a request that joins ([`Flights::join`]) never inherits another's wait for
//! admission. The leader lands its flight with the answer to share, or drops it: then
//! every follower goes through admission on its own.

use super::store::Entry;
use super::Key;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Flights at most: each is an admitted request, so this is never reached by honest
/// traffic; past it, requests simply are not coalesced.
const MAX_FLIGHTS: usize = 10_000;

/// What a flight ended with: the answer to share, or nothing (`None` while in the air).
type Landing = Option<Arc<Entry>>;

/// The flights in the air, by request key.
#[derive(Default)]
pub struct Flights {
    map: Mutex<HashMap<Key, watch::Receiver<Landing>>>,
}

/// The one request of a flight that goes upstream. Dropping it without
/// [`Lead::land`] tells the followers to go on their own.
pub struct Lead {
    pub(super) key: Key,
    tx: watch::Sender<Landing>,
    flights: Arc<Flights>,
}

impl Flights {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, watch::Receiver<Landing>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The flight of `key` in the air, to wait for.
    pub fn join(&self, key: &Key) -> Option<watch::Receiver<Landing>> {
        self.lock().get(key).cloned()
    }

    /// Makes an admitted request the leader of `key`'s flight; `None` when one is in the
    /// air already (or too many are).
    pub fn lead(self: &Arc<Self>, key: Key) -> Option<Lead> {
        let mut map = self.lock();
        if map.contains_key(&key) || map.len() >= MAX_FLIGHTS {
            return None;
        }
        let (tx, rx) = watch::channel(None);
        map.insert(key, rx);
        Some(Lead {
            key,
            tx,
            flights: self.clone(),
        })
    }

    /// Flights in the air.
    pub fn entries(&self) -> usize {
        self.lock().len()
    }
}

impl Lead {
    /// Hands `entry` to every follower.
    pub fn land(self, entry: Arc<Entry>) {
        self.tx.send_replace(Some(entry));
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        // Followers that join from now on find no flight; those waiting see the answer, or
        // the channel closed when there is none.
        let mut map = self.flights.lock();
        if map
            .get(&self.key)
            .is_some_and(|rx| rx.same_channel(&self.tx.subscribe()))
        {
            map.remove(&self.key);
        }
    }
}
