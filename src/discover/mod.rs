//! The org's real limits: with `[discover]`, pacer reads the limits Genesys publishes for
//! the org (`GET /api/v2/organizations/limits/namespaces/{namespace}`) at start and every
//! `interval`, with a `[[credential]]`'s token, and caps each limit that names a published
//! value (`discover = { namespace, key }`) at min(configured, published).
//!
//! A published value only ever lowers a ceiling, and it is untrusted: a missing key, 0, a
//! negative number or anything but a number counts as "not published" (the configured value
//! stays); a failed read (non-2xx, timeout, no token) keeps what was in force before, which
//! at start is the configured value. Both are logged and shown in `/status`. The cap is
//! applied through each limit's shared [`Discovered`](crate::limit::discovered::Discovered)
//! cell, so counters and queues are untouched.
//!
//! Only the org's values (the namespace itself) are read, never `…/defaults`: those are
//! Genesys' defaults, which the org's values already replace.

mod report;

pub use report::{check, LimitReport};

use crate::config::{Config, DiscoverConfig};
use crate::credential::Credentials;
use crate::limit::LimitSet;
use crate::proxy::Proxy;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Path of a namespace's published limits, without the namespace.
pub const LIMITS_PATH: &str = "/api/v2/organizations/limits/namespaces/";

/// How often the task looks whether a read is due (a reload may make one due at once).
const TICK: Duration = Duration::from_secs(1);

/// What one read found for one limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The org's value, requests per the limit's window (at least 1).
    Published(u64),
    /// The namespace answered without a usable value under the key.
    NotPublished(String),
    /// The namespace could not be read.
    Failed(String),
}

/// One read of every namespace the limits name: per limit (in configuration order), its
/// outcome, or `None` for a limit without `discover`.
#[derive(Debug, Clone, Default)]
pub struct Reading {
    pub outcomes: Vec<Option<Outcome>>,
    /// Namespaces that could not be read, and why.
    pub failures: Vec<(String, String)>,
}

/// Reads every namespace named by `config`'s limits once, on `[discover]`'s upstream with
/// its credential. Without `[discover]` every limit with `discover` is `Failed`.
pub async fn read(config: &Config, credentials: &Credentials) -> Reading {
    let target = config.discover.as_ref().zip(config.discover_upstream());
    let mut namespaces: HashMap<&str, Result<HashMap<String, serde_json::Value>, String>> =
        HashMap::new();
    let mut failures = Vec::new();
    for k in config.limits.iter().filter_map(|l| l.discover.as_ref()) {
        if namespaces.contains_key(k.namespace.as_str()) {
            continue;
        }
        let answer = match target {
            None => Err("no [discover] section".to_string()),
            Some((d, upstream)) => fetch(credentials, d, upstream, &k.namespace).await,
        };
        if let Err(e) = &answer {
            failures.push((k.namespace.clone(), e.clone()));
        }
        namespaces.insert(&k.namespace, answer);
    }
    let outcomes = config
        .limits
        .iter()
        .map(|l| {
            let k = l.discover.as_ref()?;
            Some(match namespaces.get(k.namespace.as_str()) {
                Some(Ok(values)) => match values.get(&k.key) {
                    None => Outcome::NotPublished(format!("no key {:?}", k.key)),
                    Some(v) => match published_value(v) {
                        Ok(n) => Outcome::Published(n),
                        Err(why) => Outcome::NotPublished(why),
                    },
                },
                Some(Err(e)) => Outcome::Failed(e.clone()),
                None => Outcome::Failed("not read".into()),
            })
        })
        .collect();
    Reading { outcomes, failures }
}

/// One namespace's `limits` as key → value.
async fn fetch(
    credentials: &Credentials,
    d: &DiscoverConfig,
    upstream: &str,
    namespace: &str,
) -> Result<HashMap<String, serde_json::Value>, String> {
    let path = format!("{LIMITS_PATH}{namespace}");
    let body = credentials
        .get_json(&d.credential, upstream, &path)
        .await
        .map_err(|e| e.to_string())?;
    let limits = body
        .get("limits")
        .and_then(|l| l.as_array())
        .ok_or_else(|| "answer has no \"limits\" array".to_string())?;
    Ok(limits
        .iter()
        .filter_map(|e| {
            let key = e.get("key")?.as_str()?;
            Some((key.to_string(), e.get("value")?.clone()))
        })
        .collect())
}

/// A published value as a number of requests: a positive number (a fraction rounds down);
/// 0 or less would stop all traffic and is taken as "not published", as is a non-number.
pub fn published_value(v: &serde_json::Value) -> Result<u64, String> {
    if let Some(n) = v.as_u64() {
        return if n == 0 {
            Err("published 0, ignored".into())
        } else {
            Ok(n)
        };
    }
    match v.as_f64() {
        Some(f) if f >= 1.0 => Ok(f.floor().min(u64::MAX as f64) as u64),
        Some(f) => Err(format!("published {f}, ignored")),
        None => Err("published value is not a number".into()),
    }
}

/// What discovery knows of one limit between reads.
#[derive(Debug, Clone, Default)]
struct Known {
    /// The last value read, kept while later reads fail.
    published: Option<u64>,
    /// The last read's outcome, when it was not a value.
    problem: Option<Outcome>,
}

struct State {
    /// When the next read is due; `None`: never (no `[discover]`).
    due: Option<Instant>,
    /// Per limit, in configuration order.
    known: Vec<Known>,
    /// Reads that found at least one namespace failing.
    reads: u64,
}

/// Discovery's state for one configuration, kept across reloads that leave `[discover]`
/// and the limits unchanged.
pub struct Discovery {
    interval: Option<Duration>,
    state: Mutex<State>,
}

impl Discovery {
    /// Nothing read yet; the first read is due at once when `[discover]` is on. Caps left
    /// in `set` by an earlier configuration are cleared.
    pub fn new(config: &Config, set: &LimitSet) -> Discovery {
        for spec in &set.specs {
            if let Some(d) = &spec.discovered {
                d.set(0);
            }
        }
        let interval = config.discover.as_ref().map(|d| d.interval.0);
        Discovery {
            interval,
            state: Mutex::new(State {
                due: interval.map(|_| Instant::now()),
                known: vec![Known::default(); config.limits.len()],
                reads: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True when a read is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        self.lock().due.is_some_and(|d| d <= now)
    }

    /// Reads once and applies what was found; the next read is due an interval later.
    pub async fn refresh(&self, proxy: &Proxy) {
        let Some(interval) = self.interval else {
            return;
        };
        self.lock().due = Some(Instant::now() + interval);
        let reading = read(&proxy.config, &proxy.credentials).await;
        for (namespace, error) in &reading.failures {
            tracing::warn!(
                namespace = %namespace,
                error = %error,
                "discover: cannot read the org's limits; running on the configured values"
            );
            proxy.metrics.discovery_error();
        }
        self.apply(&proxy.config, proxy.admission.limits(), reading);
    }

    /// Takes in one reading: caps each limit at its published value (after its headroom).
    pub fn apply(&self, config: &Config, set: &LimitSet, reading: Reading) {
        let mut state = self.lock();
        if !reading.failures.is_empty() {
            state.reads += 1;
        }
        let rows = config.limits.iter().zip(&set.specs).zip(reading.outcomes);
        for (i, ((limit, spec), outcome)) in rows.enumerate() {
            let (Some(outcome), Some(cell), Some(known)) =
                (outcome, spec.discovered.as_ref(), state.known.get_mut(i))
            else {
                continue;
            };
            match outcome {
                Outcome::Published(n) => {
                    known.published = Some(n);
                    known.problem = None;
                    cell.set(after_headroom(n, limit.headroom));
                }
                Outcome::NotPublished(why) => {
                    tracing::warn!(limit = %limit.name, reason = %why, "discover: no published value; using the configured one");
                    known.published = None;
                    known.problem = Some(Outcome::NotPublished(why));
                    cell.set(0);
                }
                Outcome::Failed(why) => known.problem = Some(Outcome::Failed(why)),
            }
        }
    }

    /// Every rate limit's configured, published and effective size and where it came from.
    pub fn report(&self, config: &Config) -> Vec<LimitReport> {
        let state = self.lock();
        config
            .limits
            .iter()
            .zip(state.known.iter())
            .filter_map(|(l, k)| {
                LimitReport::of(l, k.published, k.problem.as_ref(), self.interval.is_some())
            })
            .collect()
    }

    /// Reads that found a namespace failing, so far.
    pub fn failed_reads(&self) -> u64 {
        self.lock().reads
    }
}

/// A published size less `headroom`, as [`crate::config::LimitConfig::effective_requests`]
/// does for the configured one; at least 1.
fn after_headroom(n: u64, headroom: f64) -> u64 {
    (((n as f64) * (1.0 - headroom)).floor() as u64).max(1)
}

/// Runs discovery for the configuration in force until `stop`: a read at start, then
/// every `interval`; a reload with another `[discover]` or other limits reads at once.
pub async fn run(current: Arc<ArcSwap<Proxy>>, mut stop: watch::Receiver<bool>) {
    loop {
        let proxy = current.load_full();
        if proxy.discovery.due(Instant::now()) {
            let discovery = proxy.discovery.clone();
            tokio::select! {
                _ = discovery.refresh(&proxy) => {}
                _ = stop.changed() => return,
            }
        }
        drop(proxy);
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
