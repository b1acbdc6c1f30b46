//! The response cache and request coalescing (`[[cache]]`): the phase after identity and
//! the token broker, before admission.
//!
//! A `GET`/`HEAD` request matching a `[[cache]]` entry is answered from a kept copy while
//! it is younger than the entry's `ttl` (`x-pacer-cache: hit`, with `Age`), or, when an
//! identical request has been admitted and is on its way upstream, with that request's
//! answer (`x-pacer-cache: coalesced`). Either way it takes no quota. Otherwise it goes
//! through admission like any request; once admitted it leads the flight of its key, and its
//! answer is kept when it may be.
//!
//! The key is the caller (a hash of the `Authorization` value for `share = "token"`, the
//! identified client for `share = "client"`), the method, the upstream, the path and query,
//! `Accept` and `Accept-Encoding`; the request headers the upstream's `Vary` names are
//! compared before a copy is handed out. Only `200` answers without `Set-Cookie`, without
//! `Cache-Control: no-store`/`private` (unless `ignore_no_store`), without `Vary: *` and
//! no larger than `max_entry_bytes` are kept or shared.

mod flight;
mod lead;
mod store;

pub use flight::Lead;
pub use store::{Entry, Store};

use crate::admit::{Admitted, Answering};
use crate::answer::{full, ProxyBody};
use crate::config::{CacheConfig, CacheSettings, CacheShare, Config};
use crate::deadline::{self, CallerMaxWait};
use crate::endpoint::Template;
use crate::error::{ErrorKind, ProxyError};
use crate::forward::Forward;
use crate::identity::Identified;
use crate::metrics::{Gauge, Metrics, RequestLabels};
use flight::Flights;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// A request's cache key: a truncated SHA-256 of what it is made of (see the module docs);
/// no credential is kept.
pub type Key = [u8; 16];

/// The answer header saying where an answer came from: `hit`, `coalesced` or `miss`.
pub const X_PACER_CACHE: &str = "x-pacer-cache";

/// One `[[cache]]` entry, resolved.
struct Rule {
    template: Template,
    upstream: Option<usize>,
    ttl: Duration,
    share: CacheShare,
    max_entry_bytes: usize,
    ignore_no_store: bool,
    stats: Stats,
}

/// Lookups of one entry, for `/status` and `pacer_cache_lookups_total`.
#[derive(Default)]
struct Stats {
    hit: AtomicU64,
    coalesced: AtomicU64,
    miss: AtomicU64,
}

/// How a lookup ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lookup {
    Hit,
    Coalesced,
    Miss,
}

impl Lookup {
    fn as_str(self) -> &'static str {
        match self {
            Lookup::Hit => "hit",
            Lookup::Coalesced => "coalesced",
            Lookup::Miss => "miss",
        }
    }
}

/// The cache phase of the pipeline: nothing to do without `[[cache]]` entries.
pub struct CachePhase {
    pub(crate) cache: Option<Arc<ResponseCache>>,
    /// `[queue] max_wait`, unless the route sets its own: how long a follower waits.
    max_wait: Duration,
}

impl CachePhase {
    /// The phase over `cache`; followers wait at most `max_wait` unless their route says
    /// otherwise.
    pub fn new(cache: Option<Arc<ResponseCache>>, max_wait: Duration) -> Self {
        CachePhase { cache, max_wait }
    }

    /// Answers from the cache or a flight when it may (see [`ResponseCache::serve`]).
    pub async fn serve(&self, req: Identified, labels: &mut RequestLabels) -> Served {
        match &self.cache {
            None => Served::Pass(req, None),
            Some(cache) => {
                // As long as it could wait for admission: the route's `max_wait`, lowered
                // by the caller's own `x-pacer-max-wait`.
                let routed = req.routed();
                let max_wait = deadline::bound(
                    routed.route.route.max_wait.unwrap_or(self.max_wait),
                    routed.req.extensions().get::<CallerMaxWait>().copied(),
                );
                cache.serve(req, max_wait, labels).await
            }
        }
    }

    /// Sends an admitted request upstream: as the leader of its flight when it may be
    /// cached, no copy was kept while it waited for admission, and no flight is in the air.
    /// When one is (an identical request was admitted meanwhile), it waits for that one's
    /// answer instead, and goes upstream itself only if there is none to share. A request
    /// answered either way gives its admission back ([`Admitted::unsent`]).
    pub async fn send(
        &self,
        forward: &Forward,
        req: Admitted,
        pending: Option<Pending>,
    ) -> Result<Sending, ProxyError> {
        let (Some(cache), Some(pending)) = (&self.cache, pending) else {
            let (answer, sent) = forward.send(req).await;
            return Ok(Sending::Upstream(answer, sent));
        };
        // A copy kept while it waited for admission answers it: it is not sent at all.
        if let Some(entry) = cache.store.get(&pending.key, Instant::now()) {
            if vary_matches(&entry, &pending.headers) {
                cache.count(pending.rule, Lookup::Hit);
                req.unsent();
                return Ok(Sending::Answered(answer(&entry, Lookup::Hit)));
            }
        }
        let mut pending = match cache.flights.lead(pending.key) {
            Some(lead) => {
                cache.count(pending.rule, Lookup::Miss);
                let (answer, sent) = cache
                    .send_shared(forward, req, (lead, pending))
                    .await
                    .ok_or_else(|| {
                        ProxyError::new(
                            ErrorKind::UpstreamUnreachable,
                            "the shared upstream call ended without an answer",
                        )
                    })?;
                return Ok(Sending::Upstream(answer, sent));
            }
            None => pending,
        };
        let max_wait = pending.max_wait;
        if let Some((resp, how)) = cache.follow(&mut pending, max_wait).await {
            cache.count(pending.rule, how);
            // It never went upstream: its place in every window is given back.
            req.unsent();
            return Ok(Sending::Answered(resp));
        }
        cache.count(pending.rule, Lookup::Miss);
        let (answer, sent) = forward.send(req).await;
        Ok(Sending::Upstream(answer, sent))
    }
}

/// How an admitted request was answered.
// Moved once per request, never stored.
#[allow(clippy::large_enum_variant)]
pub enum Sending {
    /// It went upstream: the answer (or failure) and what the request holds meanwhile.
    Upstream(Result<Response<ProxyBody>, ProxyError>, Answering),
    /// An identical request admitted just before it answered for it.
    Answered(Response<ProxyBody>),
}

/// The kept answers, the flights in the air and the entries they are kept under.
pub struct ResponseCache {
    rules: Vec<Rule>,
    store: Store,
    flights: Arc<Flights>,
    metrics: Arc<Metrics>,
    /// Longest a leader's answer body is read for its followers.
    read_deadline: Duration,
}

/// A request that may be answered from the cache but was not: what it needs to lead its
/// flight once admitted.
pub struct Pending {
    rule: usize,
    key: Key,
    /// The request's headers, to remember the values of those the upstream's `Vary` names.
    headers: HeaderMap,
    /// False once a flight it waited for failed: it then goes upstream on its own.
    may_follow: bool,
    /// Longest it waits for a flight.
    max_wait: Duration,
}

/// What the cache phase made of a request.
// Moved once per request, never stored.
#[allow(clippy::large_enum_variant)]
pub enum Served {
    /// Answered without the upstream: a kept copy or a coalesced answer.
    Answered(Response<ProxyBody>),
    /// Goes on to admission, with what it needs to lead a flight when it may be cached.
    Pass(Identified, Option<Pending>),
}

impl ResponseCache {
    /// The cache of `config`'s `[[cache]]` entries; `None` when there are none.
    pub fn from_config(config: &Config, metrics: Arc<Metrics>) -> Option<Arc<ResponseCache>> {
        if config.caches.is_empty() {
            return None;
        }
        let rules = config
            .caches
            .iter()
            .filter_map(|c| Rule::new(c, &config.cache_settings, config))
            .collect();
        Some(Arc::new(ResponseCache {
            rules,
            store: Store::new(config.cache_settings.max_bytes),
            flights: Arc::default(),
            metrics,
            read_deadline: config.server.request_deadline.0,
        }))
    }

    /// The entry a request falls under: the first whose template and upstream match.
    fn rule_of(&self, method: &Method, upstream: usize, path: &str) -> Option<usize> {
        if method != Method::GET && method != Method::HEAD {
            return None;
        }
        self.rules.iter().position(|r| {
            r.upstream.is_none_or(|u| u == upstream) && r.template.matches(method, path)
        })
    }

    fn count(&self, rule: usize, lookup: Lookup) {
        let Some(r) = self.rules.get(rule) else {
            return;
        };
        let n = match lookup {
            Lookup::Hit => &r.stats.hit,
            Lookup::Coalesced => &r.stats.coalesced,
            Lookup::Miss => &r.stats.miss,
        };
        n.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .cache_lookup(r.template.label(), lookup.as_str());
    }

    /// Answers a request from a fresh copy, or with the answer of an identical request in
    /// flight (waiting at most `max_wait` for it); otherwise lets it go on.
    pub async fn serve(
        &self,
        req: Identified,
        max_wait: Duration,
        labels: &mut RequestLabels,
    ) -> Served {
        let routed = req.routed();
        let upstream = routed.route.route.upstream;
        let Some(rule) = self.rule_of(routed.req.method(), upstream, &routed.route.path) else {
            return Served::Pass(req, None);
        };
        let key = self.key(rule, &req);
        let headers = req.routed().req.headers();
        let mut pending = Pending {
            rule,
            key,
            headers: headers.clone(),
            may_follow: true,
            max_wait,
        };
        if let Some((resp, how)) = self.follow(&mut pending, max_wait).await {
            self.count(rule, how);
            labels.endpoint = Some(self.rules[rule].template.label().clone());
            return Served::Answered(resp);
        }
        Served::Pass(req, Some(pending))
    }

    /// A fresh kept answer for `pending`, or else the answer of the identical request in
    /// flight (waiting for it at most `max_wait`); `None` when there is neither, the
    /// flight failed or its answer is not to be shared.
    async fn follow(
        &self,
        pending: &mut Pending,
        max_wait: Duration,
    ) -> Option<(Response<ProxyBody>, Lookup)> {
        if let Some(entry) = self.store.get(&pending.key, Instant::now()) {
            if vary_matches(&entry, &pending.headers) {
                return Some((answer(&entry, Lookup::Hit), Lookup::Hit));
            }
        }
        if !pending.may_follow {
            return None;
        }
        let mut flight = self.flights.join(&pending.key)?;
        let landed = tokio::time::timeout(max_wait, flight.wait_for(Option::is_some)).await;
        let entry = landed
            .ok()
            .and_then(|l| l.ok().and_then(|e| e.clone()))
            .filter(|e| vary_matches(e, &pending.headers));
        match entry {
            Some(entry) => Some((answer(&entry, Lookup::Coalesced), Lookup::Coalesced)),
            None => {
                // The flight failed, was not to be shared, or took longer than this
                // request may wait: it goes on on its own, never waiting for another.
                pending.may_follow = false;
                None
            }
        }
    }

    /// The key of a request under `rule` (see the module docs).
    fn key(&self, rule: usize, req: &Identified) -> Key {
        let r = &self.rules[rule];
        let routed = req.routed();
        let headers = routed.req.headers();
        let mut h = Sha256::new();
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(routed.req.method().as_str().as_bytes());
        field(&(routed.route.route.upstream as u64).to_le_bytes());
        field(r.share.as_str().as_bytes());
        match (r.share, headers.get(header::AUTHORIZATION)) {
            (CacheShare::Token, Some(auth)) => field(auth.as_bytes()),
            _ => field(req.caller().key.as_bytes()),
        }
        field(routed.route.path.as_bytes());
        field(routed.target.query.as_deref().unwrap_or("").as_bytes());
        for name in [header::ACCEPT, header::ACCEPT_ENCODING] {
            for v in headers.get_all(&name) {
                field(v.as_bytes());
            }
            field(b"");
        }
        let mut key = [0u8; 16];
        key.copy_from_slice(&h.finalize()[..16]);
        key
    }

    /// The cache's state for `/status`: its size and each entry's lookups and hit ratio.
    pub fn status(&self) -> serde_json::Value {
        let entries: Vec<_> = self
            .rules
            .iter()
            .map(|r| {
                let hit = r.stats.hit.load(Ordering::Relaxed);
                let coalesced = r.stats.coalesced.load(Ordering::Relaxed);
                let miss = r.stats.miss.load(Ordering::Relaxed);
                let total = hit + coalesced + miss;
                let ratio = if total == 0 {
                    0.0
                } else {
                    (hit + coalesced) as f64 / total as f64
                };
                serde_json::json!({
                    "match": &**r.template.label(),
                    "ttl_seconds": r.ttl.as_secs_f64(),
                    "share": r.share.as_str(),
                    "hits": hit,
                    "coalesced": coalesced,
                    "misses": miss,
                    "hit_ratio": ratio,
                })
            })
            .collect();
        serde_json::json!({
            "entries": self.store.entries(),
            "bytes": self.store.bytes(),
            "max_bytes": self.store.max_bytes(),
            "in_flight": self.flights.entries(),
            "by_entry": entries,
        })
    }

    /// `pacer_cache_entries` and `pacer_cache_bytes`, read now.
    pub fn gauges(cache: Option<&ResponseCache>) -> [Gauge; 2] {
        let (entries, bytes) = cache.map_or((0, 0), |c| (c.store.entries(), c.store.bytes()));
        [
            Gauge {
                name: "pacer_cache_entries",
                help: "Answers the response cache keeps now.",
                samples: vec![(Vec::new(), entries as f64)],
            },
            Gauge {
                name: "pacer_cache_bytes",
                help: "Bytes the response cache keeps now (bodies, headers, keys).",
                samples: vec![(Vec::new(), bytes as f64)],
            },
        ]
    }
}

impl Rule {
    fn new(c: &CacheConfig, settings: &CacheSettings, config: &Config) -> Option<Rule> {
        // Validated already; an entry that does not resolve is left out, never widened.
        let template = Template::parse(&c.matches).ok()?;
        let upstream = match &c.upstream {
            Some(name) => Some(config.upstream_index(name)?),
            None => None,
        };
        Some(Rule {
            template,
            upstream,
            ttl: c.ttl.0,
            share: c.share,
            max_entry_bytes: usize::try_from(c.entry_bytes(settings)).unwrap_or(usize::MAX),
            ignore_no_store: c.ignore_no_store,
            stats: Stats::default(),
        })
    }
}

/// A hash of a request header's values, as [`Entry::vary`] keeps them.
fn value_hash(headers: &HeaderMap, name: &HeaderName) -> [u8; 16] {
    let mut h = Sha256::new();
    for v in headers.get_all(name) {
        h.update((v.len() as u64).to_le_bytes());
        h.update(v.as_bytes());
    }
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize()[..16]);
    out
}

/// True when the request's headers named by the kept answer's `Vary` are those of the
/// request that fetched it.
fn vary_matches(entry: &Entry, headers: &HeaderMap) -> bool {
    entry
        .vary
        .iter()
        .all(|(name, hash)| value_hash(headers, name) == *hash)
}

/// A kept answer, handed out again.
fn answer(entry: &Entry, how: Lookup) -> Response<ProxyBody> {
    let mut resp = Response::new(full(entry.body.clone()));
    *resp.status_mut() = StatusCode::OK;
    *resp.headers_mut() = entry.headers.clone();
    let age = Instant::now().saturating_duration_since(entry.stored);
    resp.headers_mut()
        .insert(header::AGE, HeaderValue::from(age.as_secs()));
    resp.headers_mut()
        .insert(X_PACER_CACHE, HeaderValue::from_static(how.as_str()));
    resp
}

#[cfg(test)]
mod tests;
