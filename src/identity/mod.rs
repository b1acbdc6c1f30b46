//! Who is calling: the OAuth client behind a bearer token on Genesys routes, or a
//! configured source (`header:NAME`, `basic-user`, `bearer`, `client-ip`) elsewhere.
//!
//! Only SHA-256 hashes of tokens are kept, in a bounded map. Tokens never seen issued are
//! resolved once with `GET /api/v2/tokens/me` (single-flight, rate-limited); when that is
//! not possible the caller is limited under a key derived from the token's hash.

use crate::answer::{collect_limited, full, ProxyBody};
use crate::config::{Cidr, ClientConfig, IdentityConfig, IdentitySource, Priority, UnknownClients};
use crate::error::{ErrorKind, ProxyError};
use crate::route::{Allowed, Routed};
use crate::server::client_ip;
use base64::Engine as _;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http::{header, HeaderMap};
use http::{Method, Request};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// The identified caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Key its limits are counted under.
    pub key: Arc<str>,
    /// Bounded metric label: a client name or id, `unknown` or `other`.
    pub label: Arc<str>,
    /// True when the caller is an OAuth client or a configured/recognized source value.
    pub known: bool,
    /// Priority from `[[client]]`, if configured.
    pub priority: Option<Priority>,
}

/// A token's SHA-256, truncated: enough to tell tokens apart, useless to an attacker.
pub type TokenHash = [u8; 16];

/// Hashes a credential for keys and logs.
pub fn hash_secret(secret: &str) -> TokenHash {
    let digest = Sha256::digest(secret.as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The user of Basic credentials, if any.
pub fn basic_user(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, b64) = v.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let user = text.split_once(':').map_or(text.as_str(), |(u, _)| u);
    (!user.is_empty()).then(|| user.to_string())
}

/// A bounded map with approximate LRU eviction: two generations, the older dropped whole
/// when the newer fills. Lookups promote entries, so anything in use survives.
#[derive(Debug)]
pub(crate) struct Generations<K, V> {
    current: HashMap<K, V>,
    previous: HashMap<K, V>,
    half: usize,
}

impl<K: std::hash::Hash + Eq + Clone, V: Clone> Generations<K, V> {
    pub(crate) fn new(max: usize) -> Self {
        Generations {
            current: HashMap::new(),
            previous: HashMap::new(),
            half: (max / 2).max(1),
        }
    }

    pub(crate) fn get(&mut self, k: &K) -> Option<V> {
        if let Some(v) = self.current.get(k) {
            return Some(v.clone());
        }
        let v = self.previous.remove(k)?;
        self.insert(k.clone(), v.clone());
        Some(v)
    }

    pub(crate) fn insert(&mut self, k: K, v: V) {
        if self.current.len() >= self.half && !self.current.contains_key(&k) {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(k, v);
    }

    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

#[derive(Debug, Clone)]
struct Learned {
    /// `None`: the upstream could not tell; not asked again until `expires`.
    client: Option<Arc<str>>,
    expires: Instant,
}

/// How long a token `tokens/me` could not resolve is limited under its hash before asking again.
const UNRESOLVED_TTL: Duration = Duration::from_secs(60);

/// Look-ups in flight: their outcome (`None` until known) per token hash.
type Lookups = HashMap<TokenHash, watch::Receiver<Option<Option<Arc<str>>>>>;

/// Longest a `tokens/me` look-up may run; its callers fell back to the hashed key long
/// before (after `LOOKUP_TIMEOUT`), so past this it is abandoned.
const LOOKUP_LIFETIME: Duration = Duration::from_secs(30);

/// A look-up's entry in [`Identity::lookups`], removed when the look-up ends however it
/// ends (answered, abandoned, its task cancelled or panicking): an entry never outlives it.
struct LookupEntry {
    lookups: Arc<Mutex<Lookups>>,
    hash: TokenHash,
    rx: watch::Receiver<Option<Option<Arc<str>>>>,
}

impl Drop for LookupEntry {
    fn drop(&mut self) {
        let mut lookups = self.lookups.lock().unwrap_or_else(|p| p.into_inner());
        if lookups
            .get(&self.hash)
            .is_some_and(|rx| rx.same_channel(&self.rx))
        {
            lookups.remove(&self.hash);
        }
    }
}

/// Distinct metric labels for callers before new ones are labelled `other`.
const MAX_LABELS: usize = 200;

/// Resolves a token to its OAuth client id with `GET /api/v2/tokens/me`.
pub trait TokenResolver: Send + Sync + 'static {
    /// The client id behind `token`, or `None` if the upstream does not say.
    fn resolve(
        &self,
        upstream: usize,
        token: String,
    ) -> std::pin::Pin<Box<dyn Future<Output = Option<String>> + Send>>;
}

/// Identifies callers; shared by all requests.
pub struct Identity {
    config: IdentityConfig,
    clients: HashMap<String, ClientConfig>,
    tokens: Mutex<Generations<TokenHash, Learned>>,
    /// At most `max_keys`; each entry is removed by its own look-up ([`LookupEntry`]).
    lookups: Arc<Mutex<Lookups>>,
    lookup_budget: DefaultDirectRateLimiter,
    labels: Mutex<HashMap<Arc<str>, Arc<str>>>,
    resolver: Option<Arc<dyn TokenResolver>>,
    on_lookup: Option<LookupHook>,
}

/// Called with (upstream, client) after a `tokens/me` look-up the upstream answered: the
/// look-up is a request the upstream counts against that client.
pub type LookupHook = Arc<dyn Fn(usize, &str) + Send + Sync>;

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("clients", &self.clients.len())
            .finish_non_exhaustive()
    }
}

/// Longest wait for a `tokens/me` answer before falling back to the hashed key.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

impl Identity {
    /// Builds the identity stage's state.
    pub fn new(
        config: IdentityConfig,
        clients: &[ClientConfig],
        resolver: Option<Arc<dyn TokenResolver>>,
    ) -> Identity {
        let per_second =
            NonZeroU32::new(config.tokens_me_per_second.max(1)).unwrap_or(NonZeroU32::MIN);
        Identity {
            tokens: Mutex::new(Generations::new(config.max_keys)),
            lookups: Arc::new(Mutex::new(HashMap::new())),
            lookup_budget: RateLimiter::direct(Quota::per_second(per_second)),
            labels: Mutex::new(HashMap::new()),
            clients: clients.iter().map(|c| (c.id.clone(), c.clone())).collect(),
            resolver,
            on_lookup: None,
            config,
        }
    }

    /// Calls `hook` after every `tokens/me` look-up that found a client.
    pub fn with_lookup_hook(mut self, hook: LookupHook) -> Self {
        self.on_lookup = Some(hook);
        self
    }

    /// Whether unidentified callers are refused.
    pub fn rejects_unknown(&self) -> bool {
        self.config.unknown_clients == UnknownClients::Reject
    }

    /// Number of remembered tokens (bounded by `max_keys`).
    pub fn remembered_tokens(&self) -> usize {
        self.tokens.lock().map_or(0, |t| t.len())
    }

    /// Number of `tokens/me` look-ups in flight (bounded by `max_keys`).
    pub fn lookups_in_flight(&self) -> usize {
        self.lookups.lock().map_or(0, |l| l.len())
    }

    /// Remembers that `token` belongs to `client` (seen in a proxied `/oauth/token` exchange).
    pub fn learn(&self, token: &str, client: &str, ttl: Duration) {
        let ttl = ttl.min(self.config.token_ttl.0);
        // `ttl` may come from an upstream's answer: no `Instant` overflow, whatever it says.
        let Some(expires) = Instant::now().checked_add(ttl) else {
            return;
        };
        if let Ok(mut t) = self.tokens.lock() {
            t.insert(
                hash_secret(token),
                Learned {
                    client: Some(Arc::from(client)),
                    expires,
                },
            );
        }
    }

    /// The caller for a known client id.
    pub fn client(&self, id: &str) -> Caller {
        let configured = self.clients.get(id);
        let name = configured.and_then(|c| c.name.as_deref()).unwrap_or(id);
        Caller {
            key: Arc::from(id),
            label: self.label(name),
            known: true,
            priority: configured.map(|c| c.priority),
        }
    }

    fn unknown(&self, key: String) -> Caller {
        Caller {
            key: Arc::from(key),
            label: Arc::from("unknown"),
            known: false,
            priority: None,
        }
    }

    /// The metric label of a limiter key's caller, as [`Caller::label`] has it, without
    /// adding a label: keys from the network (header values, hashed tokens) are `other` or
    /// `unknown`, so the label set stays bounded whatever keys are rendered.
    pub fn label_of(&self, key: &str) -> Arc<str> {
        if key.starts_with("token:") || key == crate::queue::OVERFLOW_CALLER || key == "anonymous" {
            return Arc::from("unknown");
        }
        if self.clients.contains_key(key) {
            return self.client(key).label;
        }
        self.labels
            .lock()
            .ok()
            .and_then(|l| l.get(key).cloned())
            .unwrap_or_else(|| Arc::from("other"))
    }

    fn label(&self, name: &str) -> Arc<str> {
        let Ok(mut labels) = self.labels.lock() else {
            return Arc::from("other");
        };
        if let Some(l) = labels.get(name) {
            return l.clone();
        }
        if labels.len() >= MAX_LABELS {
            return Arc::from("other");
        }
        let l: Arc<str> = Arc::from(name);
        labels.insert(l.clone(), l.clone());
        l
    }

    /// Identifies the caller of a request on a route with the given sources (empty: OAuth).
    pub async fn identify(
        &self,
        sources: &[IdentitySource],
        headers: &HeaderMap,
        ip: IpAddr,
        upstream: usize,
    ) -> Caller {
        if sources.is_empty() {
            return self.oauth(headers, upstream).await;
        }
        for source in sources {
            let found = match source {
                IdentitySource::OAuth => return self.oauth(headers, upstream).await,
                IdentitySource::Header(name) => headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::trim)
                    .filter(|v| !v.is_empty() && v.len() <= 128)
                    .map(str::to_string),
                IdentitySource::BasicUser => basic_user(headers).filter(|u| u.len() <= 128),
                IdentitySource::Bearer => {
                    bearer(headers).map(|t| format!("token:{}", hex(&hash_secret(t)[..8])))
                }
                IdentitySource::ClientIp => Some(ip.to_string()),
            };
            if let Some(id) = found {
                // Values from the network are labelled only when configured: the label set
                // stays bounded, and they take no place in it from OAuth clients.
                if self.clients.contains_key(&id) {
                    return self.client(&id);
                }
                return Caller {
                    key: Arc::from(id),
                    label: Arc::from("other"),
                    known: true,
                    priority: None,
                };
            }
        }
        self.unknown("anonymous".into())
    }

    async fn oauth(&self, headers: &HeaderMap, upstream: usize) -> Caller {
        if let Some(user) = basic_user(headers) {
            // Token requests carry the client id as the Basic user.
            return self.client(&user);
        }
        let Some(token) = bearer(headers) else {
            return self.unknown("anonymous".into());
        };
        let hash = hash_secret(token);
        let now = Instant::now();
        let cached = self.tokens.lock().ok().and_then(|mut t| t.get(&hash));
        let fallback = || self.unknown(format!("token:{}", hex(&hash[..8])));
        match cached.filter(|l| l.expires > now) {
            Some(Learned {
                client: Some(client),
                ..
            }) => return self.client(&client),
            Some(Learned { client: None, .. }) => return fallback(),
            None => {}
        }
        if !self.config.tokens_me {
            return fallback();
        }
        match self.lookup(hash, token, upstream).await {
            Some(client) => self.client(&client),
            None => fallback(),
        }
    }

    /// Single-flight `tokens/me`: one look-up per token at a time, within a global budget.
    async fn lookup(&self, hash: TokenHash, token: &str, upstream: usize) -> Option<Arc<str>> {
        let resolver = self.resolver.clone()?;
        let mut rx = {
            let mut lookups = self.lookups.lock().ok()?;
            match lookups.get(&hash) {
                Some(rx) => rx.clone(),
                None => {
                    if lookups.len() >= self.config.max_keys || self.lookup_budget.check().is_err()
                    {
                        return None;
                    }
                    let (tx, rx) = watch::channel(None);
                    lookups.insert(hash, rx.clone());
                    let entry = LookupEntry {
                        lookups: self.lookups.clone(),
                        hash,
                        rx: rx.clone(),
                    };
                    let token = token.to_string();
                    let done = resolver.resolve(upstream, token);
                    let hook = self.on_lookup.clone();
                    // The look-up finishes even if this caller leaves, so others waiting on it
                    // are answered; its entry goes with it.
                    tokio::spawn(async move {
                        let _entry = entry;
                        let client = tokio::time::timeout(LOOKUP_LIFETIME, done)
                            .await
                            .ok()
                            .flatten()
                            .map(Arc::<str>::from);
                        if let (Some(hook), Some(c)) = (&hook, &client) {
                            hook(upstream, c);
                        }
                        let _ = tx.send(Some(client));
                    });
                    rx
                }
            }
        };
        let result = tokio::time::timeout(LOOKUP_TIMEOUT, rx.wait_for(|v| v.is_some()))
            .await
            .ok()
            .and_then(|r| r.ok().and_then(|v| v.clone()))
            .flatten();
        let ttl = if result.is_some() {
            self.config.token_ttl.0
        } else {
            UNRESOLVED_TTL
        };
        if let Ok(mut t) = self.tokens.lock() {
            t.insert(
                hash,
                Learned {
                    client: result.clone(),
                    expires: Instant::now() + ttl,
                },
            );
        }
        result
    }

    /// Priority of a request: the route's, else the client's, else normal; the
    /// `x-pacer-priority` header may lower it, never raise it.
    pub fn priority(route: Option<Priority>, caller: &Caller, headers: &HeaderMap) -> Priority {
        let base = route.or(caller.priority).unwrap_or_default();
        let asked = headers
            .get("x-pacer-priority")
            .and_then(|v| v.to_str().ok())
            .and_then(Priority::parse);
        match asked {
            Some(p) if p > base => p,
            _ => base,
        }
    }
}

pub mod app;
mod phase;
pub use app::{App, Apps};
pub use phase::{is_token_path, Identified, Identify};

#[cfg(test)]
mod tests;
