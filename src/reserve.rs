//! Where the critical reserve is held: only on limiter keys critical traffic can reach.
//!
//! `critical_reserve` keeps a share of a quota free so that an IVR request never waits
//! behind a window normal or bulk traffic already filled. Held on a key no critical request
//! can ever count against, it only wastes quota, so [`Reserve`] decides per key:
//!
//! - no route and no `[[client]]` is critical: no key keeps it;
//! - a `[[client]]` marked critical: its own keys (`client`, `client+endpoint` scopes), and
//!   every shared key (`global`, `endpoint` scopes), from the start;
//! - a critical route: the keys of the clients that have sent critical requests, and the
//!   shared keys those requests counted against, learned when such a request is admitted
//!   and forgotten `[queue] reserve_memory` after the last one.
//!
//! The learned set holds at most `[identity] max_keys` entries; in Redis mode it is shared
//! through the backend ([`crate::state::Backend::share_critical`]), so every replica keeps
//! the reserve for a client any of them saw sending critical traffic.

use crate::config::{Config, Priority};
use crate::limit::window::Nanos;
use crate::limit::{KeyPart, LayerKey};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

/// Longest member name taken from a shared store; anything longer is not pacer's.
pub const MAX_MEMBER_BYTES: usize = 1024;

/// Which configured sources can send critical traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CriticalSources {
    /// Not known (no configuration given): every key keeps the reserve.
    Everywhere,
    /// What the configuration says.
    Configured {
        /// Some route is critical: its callers' keys are learned.
        routes: bool,
        /// Caller keys of the `[[client]]`s marked critical.
        clients: HashSet<Arc<str>>,
    },
}

impl CriticalSources {
    /// The critical routes and clients of `config`.
    pub fn of(config: &Config) -> CriticalSources {
        CriticalSources::Configured {
            routes: config
                .routes
                .iter()
                .any(|r| r.priority == Some(Priority::Critical)),
            clients: config
                .clients
                .iter()
                .filter(|c| c.priority == Priority::Critical)
                .map(|c| Arc::from(c.id.as_str()))
                .collect(),
        }
    }
}

/// A key the reserve is learned for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Member {
    /// Every key of this caller (`client` and `client+endpoint` scopes).
    Client(Arc<str>),
    /// One shared key (`global` or `endpoint` scope).
    Shared(LayerKey),
}

impl Member {
    /// What a layer's key is learned as.
    fn of(layer: &LayerKey) -> Member {
        match &layer.part {
            KeyPart::Client(c) | KeyPart::ClientEndpoint(c, _) => Member::Client(c.clone()),
            KeyPart::Global | KeyPart::Endpoint(_) => Member::Shared(layer.clone()),
        }
    }

    /// Its name in a shared store.
    fn name(&self) -> String {
        match self {
            Member::Client(c) => format!("c:{c}"),
            Member::Shared(LayerKey {
                limit,
                part: KeyPart::Endpoint(e),
            }) => format!("e:{limit}:{e}"),
            Member::Shared(LayerKey { limit, .. }) => format!("g:{limit}"),
        }
    }

    /// The member a shared store's name stands for; `None` for anything else.
    fn parse(name: &str, limits: usize) -> Option<Member> {
        if name.len() > MAX_MEMBER_BYTES {
            return None;
        }
        let (kind, rest) = name.split_once(':')?;
        let limit = |s: &str| s.parse::<usize>().ok().filter(|&l| l < limits);
        match kind {
            "c" if !rest.is_empty() => Some(Member::Client(Arc::from(rest))),
            "g" => Some(Member::Shared(LayerKey {
                limit: limit(rest)?,
                part: KeyPart::Global,
            })),
            "e" => {
                let (l, e) = rest.split_once(':')?;
                Some(Member::Shared(LayerKey {
                    limit: limit(l)?,
                    part: KeyPart::Endpoint(Arc::from(e)),
                }))
            }
            _ => None,
        }
    }
}

/// When a member was last seen sending critical traffic, and last shared.
#[derive(Debug, Clone, Copy)]
struct Seen {
    at: Nanos,
    shared: Option<Nanos>,
}

/// Decides, per limiter key, whether it keeps the critical reserve; learns the keys
/// critical requests reach.
pub struct Reserve {
    sources: RwLock<Arc<CriticalSources>>,
    /// How long a learned member lasts without critical traffic.
    memory: Nanos,
    /// A member seen again is shared again at most this often.
    refresh: Nanos,
    /// Learned members kept at most.
    max: usize,
    /// Limits in the set, to check names from a shared store.
    limits: usize,
    learned: Mutex<HashMap<Member, Seen>>,
}

impl Reserve {
    /// A reserve on every key (until [`Reserve::set_sources`] says where critical traffic
    /// can go) that remembers at most `max` members for `memory` each.
    pub fn new(memory: Duration, max: usize, limits: usize) -> Reserve {
        let memory = u64::try_from(memory.as_nanos()).unwrap_or(u64::MAX).max(1);
        Reserve {
            sources: RwLock::new(Arc::new(CriticalSources::Everywhere)),
            memory,
            // Often enough that a peer's copy is never much older than ours.
            refresh: (memory / 8).min(60_000_000_000),
            max: max.max(1),
            limits,
            learned: Mutex::new(HashMap::new()),
        }
    }

    /// Where critical traffic can come from (set at start and on every reload).
    pub fn set_sources(&self, sources: CriticalSources) {
        let mut s = self.sources.write().unwrap_or_else(|p| p.into_inner());
        *s = Arc::new(sources);
    }

    fn sources(&self) -> Arc<CriticalSources> {
        self.sources
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Member, Seen>> {
        // Plain timestamps; after a panic elsewhere keep using them.
        self.learned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True when learning from critical requests can change any decision.
    pub fn learns(&self) -> bool {
        matches!(
            *self.sources(),
            CriticalSources::Configured { routes: true, .. }
        )
    }

    /// Per layer: does its key keep the reserve now.
    pub fn decide(&self, layers: &[LayerKey], now: Nanos) -> Vec<bool> {
        let sources = self.sources();
        let (routes, clients) = match &*sources {
            CriticalSources::Everywhere => return vec![true; layers.len()],
            CriticalSources::Configured { routes, clients } => (*routes, clients),
        };
        let fixed = |l: &LayerKey| match &l.part {
            KeyPart::Client(c) | KeyPart::ClientEndpoint(c, _) => clients.contains(c),
            // A critical client may count against any shared key.
            KeyPart::Global | KeyPart::Endpoint(_) => !clients.is_empty(),
        };
        if !routes {
            return layers.iter().map(fixed).collect();
        }
        let learned = self.lock();
        layers
            .iter()
            .map(|l| {
                fixed(l)
                    || learned
                        .get(&Member::of(l))
                        .is_some_and(|s| now < s.at.saturating_add(self.memory))
            })
            .collect()
    }

    /// A critical request counts against `layers`: their keys keep the reserve from now on.
    /// Returns the names to share with other replicas (new ones, and ones last shared
    /// longer ago than the refresh period).
    pub fn learn(&self, layers: &[LayerKey], now: Nanos) -> Vec<String> {
        let sources = self.sources();
        let CriticalSources::Configured {
            routes: true,
            clients,
        } = &*sources
        else {
            return Vec::new();
        };
        let mut share = Vec::new();
        let mut learned = self.lock();
        for layer in layers {
            let member = Member::of(layer);
            let fixed = match &member {
                Member::Client(c) => clients.contains(c),
                Member::Shared(_) => !clients.is_empty(),
            };
            if fixed {
                continue;
            }
            let due = |s: &Seen| {
                s.shared
                    .is_none_or(|t| now.saturating_sub(t) >= self.refresh)
            };
            let seen = match learned.get_mut(&member) {
                Some(s) => s,
                None => {
                    self.make_room(&mut learned, now);
                    learned.entry(member.clone()).or_insert(Seen {
                        at: now,
                        shared: None,
                    })
                }
            };
            seen.at = seen.at.max(now);
            if due(seen) {
                seen.shared = Some(now);
                let name = member.name();
                if !share.contains(&name) {
                    share.push(name);
                }
            }
        }
        share
    }

    /// Takes in members other replicas learned, with when they were last seen.
    pub fn merge(&self, entries: impl IntoIterator<Item = (String, Nanos)>, now: Nanos) {
        let mut learned = self.lock();
        for (name, at) in entries {
            let Some(member) = Member::parse(&name, self.limits) else {
                continue;
            };
            if now >= at.saturating_add(self.memory) {
                continue;
            }
            if !learned.contains_key(&member) {
                self.make_room(&mut learned, now);
            }
            // The store has it already: no need to share it again before the refresh.
            let seen = learned.entry(member).or_insert(Seen { at, shared: None });
            seen.at = seen.at.max(at);
            seen.shared = Some(seen.shared.map_or(at, |s| s.max(at)));
        }
    }

    /// Forgets members not seen for `reserve_memory`; returns how many remain.
    pub fn prune(&self, now: Nanos) -> usize {
        let mut learned = self.lock();
        learned.retain(|_, s| now < s.at.saturating_add(self.memory));
        learned.len()
    }

    /// Learned members now in force, by store name (for `/status`), at most `limit`.
    pub fn learned(&self, now: Nanos, limit: usize) -> (usize, Vec<String>) {
        let learned = self.lock();
        let live: Vec<&Member> = learned
            .iter()
            .filter(|(_, s)| now < s.at.saturating_add(self.memory))
            .map(|(m, _)| m)
            .collect();
        let mut names: Vec<String> = live.iter().take(limit).map(|m| m.name()).collect();
        names.sort_unstable();
        (live.len(), names)
    }

    /// Makes room for one more member: forgotten ones go first, then the eighth seen
    /// longest ago (they lose the reserve until their next critical request).
    fn make_room(&self, learned: &mut HashMap<Member, Seen>, now: Nanos) {
        if learned.len() < self.max {
            return;
        }
        learned.retain(|_, s| now < s.at.saturating_add(self.memory));
        if learned.len() < self.max {
            return;
        }
        let mut ages: Vec<(Nanos, Member)> =
            learned.iter().map(|(m, s)| (s.at, m.clone())).collect();
        let evict = (ages.len() / 8).max(1);
        ages.select_nth_unstable_by_key(evict - 1, |(at, _)| *at);
        for (_, m) in &ages[..evict] {
            learned.remove(m);
        }
    }
}

#[cfg(test)]
mod tests;
