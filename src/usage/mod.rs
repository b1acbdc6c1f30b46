//! The whole organization in view (`[usage]`): pacer polls the Genesys Usage API for the
//! requests of every OAuth client of the organization today — also of clients that never
//! pass through pacer — exports them as `pacer_org_api_requests{client}`, resolves each
//! client's name once (`pacer_client_info{client,name}`), and estimates each configured
//! client's use outside pacer: the growth of its organization count between two polls
//! minus what pacer itself sent for it meanwhile. With `[usage] subtract = true` that
//! outside rate lowers the client's per-client ceiling for the rest of the time until the
//! next poll (never raises it; see [`Usage::client_share`]).
//!
//! Everything the Usage API answers is untrusted: bodies are bounded, counts clamped,
//! malformed entries skipped, and at most `[identity] max_keys` clients are kept.
//! The polling itself is in [`poll`], reading answers in [`parse`].

mod parse;
mod poll;
#[cfg(test)]
mod tests;

pub use parse::{clean_name, client_id_ok};
pub use poll::{poll_once, run, PollError};

use crate::metrics::Gauge;
use crate::queue::PauseKey;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;
use tokio::time::Instant;

/// One poll's answer: the organization's requests today per OAuth client id.
#[derive(Debug, Clone, PartialEq)]
pub struct Polled {
    /// The UTC day the counts are of (`YYYY-MM-DD`); counts start again at 00:00 UTC.
    pub day: String,
    /// When the poll was answered.
    pub at: Instant,
    /// Requests today per client id (at most `max_keys`).
    pub counts: BTreeMap<String, u64>,
}

/// What the poll needs to know about the configuration in force.
#[derive(Debug, Clone)]
pub struct Context {
    /// The configured clients whose outside use is estimated (`[[client]]` ids and the
    /// credentials' client ids).
    pub watched: Vec<Arc<str>>,
    /// The upstream index the usage is of: the per-client ceilings lowered are its.
    pub upstream: usize,
    /// The per-client limit there: configured requests per window, if there is one.
    pub ceiling: Option<(u64, Duration)>,
    /// `[usage] subtract`.
    pub subtract: bool,
}

/// A configured client's use outside pacer, estimated from the last two polls.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Outside {
    /// Growth of the organization's count for the client between the polls.
    pub org_growth: u64,
    /// Requests pacer sent for it over the same time.
    pub pacer_sent: u64,
    /// Seconds between the polls.
    pub seconds: f64,
    /// `org_growth - pacer_sent` (never below 0) per second.
    pub per_second: f64,
    /// The same per window of the client's per-client limit, if it has one.
    pub per_window: Option<f64>,
    /// Share of its per-client ceiling the client may use now (1: not lowered).
    pub ceiling_share: f64,
}

/// A watched client's counts at one poll.
#[derive(Debug, Clone)]
struct Sample {
    day: String,
    at: Instant,
    org: u64,
    sent: u64,
}

#[derive(Default)]
struct State {
    /// Requests today per client id, from the last poll.
    org: BTreeMap<String, u64>,
    /// Resolved names: `None` when the API has none (404), so it is not asked again.
    names: HashMap<String, Option<String>>,
    day: Option<String>,
    polls: u64,
    /// Wall-clock time of the last successful poll (RFC 3339).
    polled_at: Option<String>,
    last_error: Option<String>,
    samples: HashMap<Arc<str>, Sample>,
    outside: BTreeMap<Arc<str>, Outside>,
    /// The usage upstream and the per-client shares to apply there, when subtracting.
    shares: HashMap<PauseKey, f64>,
}

/// The organization's usage as last polled, and pacer's own sends per watched client;
/// shared across configuration reloads.
pub struct Usage {
    max_keys: usize,
    /// Requests pacer sent upstream per watched client (a fixed set from the configuration,
    /// never keyed by network input).
    sent: RwLock<HashMap<Arc<str>, AtomicU64>>,
    state: Mutex<State>,
}

impl std::fmt::Debug for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Usage")
            .field("watched", &self.read_sent().len())
            .finish_non_exhaustive()
    }
}

/// `now - prev` as outside requests per second, or `None` when there is no estimate: the
/// day rolled over (counts start at zero again) or the count went down.
fn outside_rate(prev: &Sample, now: &Sample) -> Option<(u64, u64, f64, f64)> {
    if prev.day != now.day || now.org < prev.org {
        return None;
    }
    let seconds = now.at.saturating_duration_since(prev.at).as_secs_f64();
    if seconds <= 0.0 {
        return None;
    }
    let growth = now.org - prev.org;
    let sent = now.sent.saturating_sub(prev.sent);
    let outside = growth.saturating_sub(sent);
    Some((growth, sent, seconds, outside as f64 / seconds))
}

impl Usage {
    /// Usage of at most `max_keys` clients (and as many names).
    pub fn new(max_keys: usize) -> Usage {
        Usage {
            max_keys: max_keys.max(1),
            sent: RwLock::default(),
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain maps; after a panic elsewhere keep using them.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_sent(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Arc<str>, AtomicU64>> {
        self.sent.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts counting pacer's sends for these configured client ids (counts of ids
    /// already watched go on).
    pub fn watch<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut sent = self.sent.write().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            if !sent.contains_key(id) {
                sent.insert(Arc::from(id), AtomicU64::new(0));
            }
        }
    }

    /// pacer sent one request upstream for `client` (counted only for watched clients).
    pub fn note_sent(&self, client: &str) {
        if let Some(n) = self.read_sent().get(client) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Requests pacer sent for a watched client so far.
    pub fn sent_by(&self, client: &str) -> u64 {
        self.read_sent()
            .get(client)
            .map_or(0, |n| n.load(Ordering::Relaxed))
    }

    /// Takes a poll's counts: keeps them for the metrics, and for every watched client
    /// estimates its outside rate since the previous poll and, when subtracting, the share
    /// of its per-client ceiling left to pacer.
    pub fn record(&self, polled: Polled, ctx: &Context, wall: &str) {
        let sent: Vec<(Arc<str>, u64)> = ctx
            .watched
            .iter()
            .map(|id| (id.clone(), self.sent_by(id)))
            .collect();
        let mut s = self.lock();
        s.outside.clear();
        s.shares.clear();
        for (id, sent) in sent {
            let now = Sample {
                day: polled.day.clone(),
                at: polled.at,
                org: polled.counts.get(&*id).copied().unwrap_or(0),
                sent,
            };
            let estimate = s.samples.get(&id).and_then(|prev| outside_rate(prev, &now));
            s.samples.insert(id.clone(), now);
            let Some((org_growth, pacer_sent, seconds, per_second)) = estimate else {
                continue;
            };
            let per_window = ctx.ceiling.map(|(_, per)| per_second * per.as_secs_f64());
            let ceiling_share = match (ctx.subtract, ctx.ceiling, per_window) {
                (true, Some((requests, _)), Some(outside)) if requests > 0 => {
                    // Never raise; `limit::scaled` keeps at least one request.
                    ((requests as f64 - outside) / requests as f64).clamp(0.0, 1.0)
                }
                _ => 1.0,
            };
            if ceiling_share < 1.0 {
                s.shares.insert((ctx.upstream, id.clone()), ceiling_share);
            }
            s.outside.insert(
                id,
                Outside {
                    org_growth,
                    pacer_sent,
                    seconds,
                    per_second,
                    per_window,
                    ceiling_share,
                },
            );
        }
        s.samples.retain(|id, _| ctx.watched.contains(id));
        s.org = polled.counts;
        s.day = Some(polled.day);
        s.polls = s.polls.saturating_add(1);
        s.polled_at = Some(wall.to_string());
        s.last_error = None;
    }

    /// `[usage]` is off (a reload removed it): no counts, estimates or lowered ceilings
    /// linger from earlier polls. Names stay cached.
    pub fn forget(&self) {
        let mut s = self.lock();
        if s.polls == 0 && s.org.is_empty() {
            return;
        }
        let names = std::mem::take(&mut s.names);
        *s = State {
            names,
            ..State::default()
        };
    }

    /// A poll failed: shown in `/status`; the last counts stay.
    pub fn failed(&self, error: String) {
        self.lock().last_error = Some(error);
    }

    /// Client ids of the last poll whose names have not been looked up yet, at most `n`.
    pub fn unnamed(&self, n: usize) -> Vec<String> {
        let s = self.lock();
        s.org
            .keys()
            .filter(|id| !s.names.contains_key(*id))
            .take(n)
            .cloned()
            .collect()
    }

    /// Remembers a client's name (`None`: it has none); at most `max_keys` names.
    pub fn set_name(&self, id: &str, name: Option<String>) {
        let mut s = self.lock();
        if s.names.len() >= self.max_keys && !s.names.contains_key(id) {
            // Keep the names of clients still counted; forget the rest.
            let State { names, org, .. } = &mut *s;
            names.retain(|k, _| org.contains_key(k));
            if names.len() >= self.max_keys {
                return;
            }
        }
        s.names.insert(id.to_string(), name);
    }

    /// The share of its per-client ceiling `key` may use after outside use is subtracted
    /// (1.0: not lowered).
    pub fn client_share(&self, key: &PauseKey) -> f64 {
        self.lock().shares.get(key).copied().unwrap_or(1.0)
    }

    /// The estimate for a watched client from the last two polls.
    pub fn outside(&self, client: &str) -> Option<Outside> {
        self.lock().outside.get(client).copied()
    }

    /// The organization's count for a client at the last poll.
    pub fn org_requests(&self, client: &str) -> Option<u64> {
        self.lock().org.get(client).copied()
    }

    /// `/status` `usage`: the last poll, and per watched client its outside estimate;
    /// `label` names a client id as the metrics do.
    pub fn status(&self, label: impl Fn(&str) -> String) -> serde_json::Value {
        let s = self.lock();
        let outside: Vec<_> = s
            .outside
            .iter()
            .map(|(id, o)| {
                serde_json::json!({
                    "client": &**id,
                    "label": label(id),
                    "org_requests_today": s.org.get(&**id).copied().unwrap_or(0),
                    "org_growth": o.org_growth,
                    "pacer_sent": o.pacer_sent,
                    "seconds": o.seconds,
                    "outside_per_second": o.per_second,
                    "outside_per_window": o.per_window,
                    "ceiling_share": o.ceiling_share,
                })
            })
            .collect();
        serde_json::json!({
            "day": s.day,
            "polls": s.polls,
            "polled_at": s.polled_at,
            "last_error": s.last_error,
            "org_clients": s.org.len(),
            "org_requests_today": s.org.values().fold(0u64, |a, b| a.saturating_add(*b)),
            "outside": outside,
        })
    }

    /// `pacer_org_api_requests` and `pacer_client_info`, both keyed by client id (at most
    /// `max_keys` each); empty before the first poll.
    pub fn gauges(&self) -> [Gauge; 2] {
        let s = self.lock();
        [
            Gauge {
                name: "pacer_org_api_requests",
                help: "Requests of the organization today (UTC) per OAuth client, from the Genesys Usage API; also clients that never pass through pacer.",
                samples: s
                    .org
                    .iter()
                    .map(|(id, n)| (vec![("client", id.clone())], *n as f64))
                    .collect(),
            },
            Gauge {
                name: "pacer_client_info",
                help: "1 per OAuth client of the organization with its name, as GET /api/v2/oauth/clients/{id} has it.",
                samples: {
                    let mut named: Vec<_> = s
                        .names
                        .iter()
                        .filter_map(|(id, name)| {
                            let name = name.clone()?;
                            Some((vec![("client", id.clone()), ("name", name)], 1.0))
                        })
                        .collect();
                    named.sort_by(|a, b| a.0.cmp(&b.0));
                    named
                },
            },
        ]
    }
}
