//! A fair share for every app of one caller: within one caller (the pause key: an upstream
//! and an OAuth client) and one priority class, waiting requests are admitted across the
//! caller's apps in turn, each app's turns in proportion to its weight.
//!
//! Self-clocked fair queueing, the equivalent of deficit round robin for requests of one
//! size: a waiter's tag is the later of the class's virtual time (the tag of the waiter
//! admitted last) and its app's last tag, plus `1 / weight`; waiters go in tag order. A
//! runaway app with 40 waiters has tags far ahead, so a modest app's request arriving
//! later is tagged near the front. Different callers keep arrival order between them.
//!
//! Turns only help if room appears while they are taken: a window whose sends all went
//! out at one instant frees all its room at one instant again, one window later, and a
//! modest app arriving in between waits for it whatever its turn. So while two apps of a
//! caller have waited together within the last window, its requests leave at most one per
//! interval of its per-client limit (window / ceiling): its sends spread over the window
//! and room appears steadily, which takes nothing from its rate. The same holds while two
//! of its apps send within a window of each other, so that a runaway app starting next to
//! modest ones cannot take the whole window's room at one instant. A caller with one app
//! is admitted as before, and critical requests are never held for turns.
//! The turns live only while requests wait: a caller's go with its last waiter, so they
//! are bounded by `[queue] max_depth`; what callers sent lately is kept for at most
//! `max_keys` callers.

use super::PauseKey;
use crate::identity::App;
use crate::limit::window::Nanos;
use crate::limit::{scaled, Demand, LayerKey, LimitSet};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::Arc;

/// Whose apps share turns: the caller's pause key (none for callers without one).
pub(super) type Domain = Option<PauseKey>;

/// A waiter's place in its caller's class: (tag as ordered bits, arrival).
type Place = (u64, u64);

/// The fair-order bookkeeping of every caller with waiters.
#[derive(Default)]
pub(super) struct Fair {
    domains: HashMap<Domain, Turns>,
    /// Callers that sent lately, at most `max_keys` (see [`Fair::sent`]).
    sends: HashMap<Domain, Sends>,
}

/// One caller's turns.
#[derive(Default)]
struct Turns {
    /// Per class: the tag of the waiter admitted last.
    clock: [f64; 3],
    /// Per (class, app): waiters and the last tag given.
    flows: HashMap<(usize, Arc<str>), Flow>,
    /// Per class: waiters in tag order.
    order: [BTreeMap<Place, Arc<Demand>>; 3],
    /// Waiters per layer and class.
    waiting: HashMap<LayerKey, [u64; 3]>,
}

/// What a caller's recent sends say about turns.
struct Sends {
    /// The app of its last send.
    app: Arc<str>,
    /// When two of its apps last sent or waited within a window of each other.
    mixed_at: Option<Nanos>,
    /// Its last send.
    at: Nanos,
}

struct Flow {
    waiting: usize,
    last: f64,
}

/// Non-negative tags order like their bit patterns.
fn bits(tag: f64) -> u64 {
    tag.max(0.0).to_bits()
}

impl Turns {
    fn tag(&self, class: usize, app: &App) -> f64 {
        let clock = self.clock[class];
        let start = self
            .flows
            .get(&(class, app.name().clone()))
            .map_or(clock, |f| f.last.max(clock));
        start + 1.0 / app.weight().max(f64::MIN_POSITIVE)
    }
}

impl Fair {
    /// Places a waiter; returns its tag.
    pub(super) fn enqueue(
        &mut self,
        domain: &Domain,
        class: usize,
        seq: u64,
        demand: &Arc<Demand>,
        now: Nanos,
    ) -> f64 {
        let turns = self.domains.entry(domain.clone()).or_default();
        let tag = turns.tag(class, &demand.app);
        if turns.flows.keys().any(|(_, app)| app != demand.app.name()) {
            if let Some(sends) = self.sends.get_mut(domain) {
                sends.mixed_at = Some(now);
            }
        }
        let flow = turns
            .flows
            .entry((class, demand.app.name().clone()))
            .or_insert(Flow {
                waiting: 0,
                last: 0.0,
            });
        flow.waiting += 1;
        flow.last = tag;
        turns.order[class].insert((bits(tag), seq), demand.clone());
        for layer in &demand.layers {
            turns.waiting.entry(layer.clone()).or_default()[class] += 1;
        }
        tag
    }

    /// Takes a waiter out; an admitted one moves its class's virtual time to its tag.
    pub(super) fn remove(
        &mut self,
        domain: &Domain,
        class: usize,
        seq: u64,
        tag: f64,
        demand: &Demand,
        admitted: bool,
    ) {
        let Some(turns) = self.domains.get_mut(domain) else {
            return;
        };
        turns.order[class].remove(&(bits(tag), seq));
        if admitted {
            turns.clock[class] = turns.clock[class].max(tag);
        }
        let key = (class, demand.app.name().clone());
        if let Some(flow) = turns.flows.get_mut(&key) {
            flow.waiting = flow.waiting.saturating_sub(1);
            if flow.waiting == 0 {
                turns.flows.remove(&key);
            }
        }
        for layer in &demand.layers {
            if let Some(c) = turns.waiting.get_mut(layer) {
                c[class] = c[class].saturating_sub(1);
                if c.iter().all(|&n| n == 0) {
                    turns.waiting.remove(layer);
                }
            }
        }
        if turns.order.iter().all(BTreeMap::is_empty) {
            self.domains.remove(domain);
        }
    }

    /// Per layer of `demand`: the waiters of its class that go before it in its caller's
    /// fair order, and all waiters of its caller in its class (to tell them from other
    /// callers' waiters, who keep arrival order).
    pub(super) fn ahead_in_turn(&self, domain: &Domain, demand: &Demand) -> Vec<(u64, u64)> {
        let class = demand.priority.index();
        let Some(turns) = self.domains.get(domain) else {
            return vec![(0, 0); demand.layers.len()];
        };
        let tag = turns.tag(class, &demand.app);
        let mut out: Vec<(u64, u64)> = demand
            .layers
            .iter()
            .map(|l| (0, turns.waiting.get(l).map_or(0, |c| c[class])))
            .collect();
        for before in turns.order[class].range(..(bits(tag), 0)).map(|(_, d)| d) {
            for (i, layer) in demand.layers.iter().enumerate() {
                if before.layers.contains(layer) {
                    out[i].0 += 1;
                }
            }
        }
        out
    }

    /// The waiters of `class` in admission order, as (class, arrival): each caller's in
    /// tag order; between callers, the one whose next waiter arrived first goes first.
    pub(super) fn order(&self, class: usize) -> Vec<(usize, u64)> {
        let mut lists: Vec<_> = self
            .domains
            .values()
            .map(|t| t.order[class].keys().map(|&(_, seq)| seq).peekable())
            .collect();
        let mut heads: BinaryHeap<Reverse<(u64, usize)>> = lists
            .iter_mut()
            .enumerate()
            .filter_map(|(i, l)| l.peek().map(|&seq| Reverse((seq, i))))
            .collect();
        let mut out = Vec::new();
        while let Some(Reverse((seq, i))) = heads.pop() {
            out.push((class, seq));
            let list = &mut lists[i];
            list.next();
            if let Some(&next) = list.peek() {
                heads.push(Reverse((next, i)));
            }
        }
        out
    }

    /// When the caller's next request may leave, if that is later than `now`: while two
    /// of its apps sent or waited within `window` of each other, one per `interval`.
    pub(super) fn held(
        &self,
        domain: &Domain,
        now: Nanos,
        (interval, window): (Nanos, Nanos),
    ) -> Option<Nanos> {
        let sends = self.sends.get(domain)?;
        let mixed = sends.mixed_at? >= now.saturating_sub(window);
        let next = sends.at.saturating_add(interval);
        (mixed && next > now).then_some(next)
    }

    /// A request of `app` of the caller was admitted at `now`. At most `cap` callers are
    /// remembered: when full, those that sent in the last `window` stay, or none.
    pub(super) fn sent(
        &mut self,
        domain: &Domain,
        app: &App,
        now: Nanos,
        window: Nanos,
        cap: usize,
    ) {
        if !self.sends.contains_key(domain) && self.sends.len() >= cap.max(1) {
            let since = now.saturating_sub(window);
            self.sends.retain(|_, s| s.at >= since);
            if self.sends.len() >= cap.max(1) {
                self.sends.clear();
            }
        }
        let sends = self.sends.entry(domain.clone()).or_insert_with(|| Sends {
            app: app.name().clone(),
            mixed_at: None,
            at: now,
        });
        if sends.app != *app.name() {
            if now.saturating_sub(sends.at) <= window {
                sends.mixed_at = Some(now);
            }
            sends.app = app.name().clone();
        }
        sends.at = now;
    }

    /// Forgets callers that sent nothing for `idle`.
    pub(super) fn prune(&mut self, now: Nanos, idle: Nanos) {
        let since = now.saturating_sub(idle);
        self.sends.retain(|_, s| s.at >= since);
    }

    /// Callers with waiters.
    #[cfg(test)]
    pub(super) fn callers(&self) -> usize {
        self.domains.len()
    }
}

/// (interval, window) of `demand`'s per-client rate limit as it applies to the request:
/// the spacing of its caller's waiters while its apps take turns. None without one, and
/// for critical requests: they are never held back for turns.
pub(crate) fn pace(set: &LimitSet, demand: &Demand) -> Option<(Nanos, Nanos)> {
    if demand.priority == crate::config::Priority::Critical {
        return None;
    }
    let i = demand.client_layer?;
    let spec = set.specs.get(demand.layers.get(i)?.limit)?;
    let ceiling = spec.rate_ceiling(demand.priority.index(), demand.holds_reserve(i))?;
    let ceiling = scaled(ceiling, demand.scale_of(i)).max(1);
    Some((spec.window / ceiling, spec.window))
}
