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

/// Form bodies of token requests read to find `client_id`, at most.
const MAX_TOKEN_FORM_BYTES: usize = 64 * 1024;

/// True for the OAuth token endpoint, whatever prefix routed it.
pub fn is_token_path(path: &str) -> bool {
    path.ends_with("/oauth/token")
}

/// A request whose caller is known: the client its limits count under and its priority.
/// Only [`Identify::identify`] makes one.
#[derive(Debug)]
pub struct Identified {
    routed: Routed,
    caller: Caller,
    priority: Priority,
}

impl Identified {
    /// The request and its route.
    pub fn routed(&self) -> &Routed {
        &self.routed
    }

    /// The request, to be read or re-framed by later phases.
    pub fn request_mut(&mut self) -> &mut Request<ProxyBody> {
        &mut self.routed.req
    }

    /// Who is calling.
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// The request's priority class.
    pub fn priority(&self) -> Priority {
        self.priority
    }

    /// The parts, for the admission phase.
    pub(crate) fn into_parts(self) -> (Routed, Caller, Priority) {
        (self.routed, self.caller, self.priority)
    }
}

/// The identification phase: the caller behind the token or the route's identity source,
/// and the request's priority.
pub struct Identify {
    identity: Arc<Identity>,
    trusted_proxies: Arc<[Cidr]>,
}

impl Identify {
    /// Identifies callers with `identity`, believing `X-Forwarded-For` from
    /// `trusted_proxies` only.
    pub fn new(identity: Arc<Identity>, trusted_proxies: Arc<[Cidr]>) -> Self {
        Identify {
            identity,
            trusted_proxies,
        }
    }

    /// Identifies the caller of an allowed request; an unknown caller is 401 under
    /// `unknown_clients = "reject"`.
    pub async fn identify(&self, allowed: Allowed) -> Result<Identified, ProxyError> {
        let mut r = allowed.into_routed();
        let route = &r.route.route;
        let ip = client_ip(r.req.headers(), r.conn.peer.ip(), &self.trusted_proxies);
        let identity = &self.identity;
        let form_client = if route.identity.is_empty()
            && r.req.method() == Method::POST
            && is_token_path(&r.route.path)
        {
            token_form_client(&mut r.req).await?
        } else {
            None
        };
        let caller = match form_client {
            Some(id) if basic_user(r.req.headers()).is_none() => identity.client(&id),
            _ => {
                identity
                    .identify(&route.identity, r.req.headers(), ip, route.upstream)
                    .await
            }
        };
        if !caller.known && identity.rejects_unknown() {
            return Err(ProxyError::new(
                ErrorKind::Unauthorized,
                "caller could not be identified",
            ));
        }
        let priority = Identity::priority(route.priority, &caller, r.req.headers());
        r.req.headers_mut().remove("x-pacer-priority");
        Ok(Identified {
            routed: r,
            caller,
            priority,
        })
    }
}

/// Reads a small form body to find `client_id`, then puts the body back.
async fn token_form_client(req: &mut Request<ProxyBody>) -> Result<Option<String>, ProxyError> {
    let is_form = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !is_form {
        return Ok(None);
    }
    let body = std::mem::replace(req.body_mut(), full(bytes::Bytes::new()));
    let bytes = collect_limited(body, MAX_TOKEN_FORM_BYTES)
        .await
        .map_err(|_| {
            ProxyError::new(
                ErrorKind::PayloadTooLarge,
                "token request body too large or broken",
            )
        })?;
    let client = url::form_urlencoded::parse(&bytes)
        .find(|(k, _)| k == "client_id")
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty() && v.len() <= 128);
    *req.body_mut() = full(bytes);
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting(AtomicUsize);
    impl TokenResolver for Counting {
        fn resolve(
            &self,
            _: usize,
            token: String,
        ) -> std::pin::Pin<Box<dyn Future<Output = Option<String>> + Send>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                token.strip_prefix("good-").map(|c| c.to_string())
            })
        }
    }

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        h
    }

    #[tokio::test(start_paused = true)]
    async fn learned_and_looked_up_tokens() {
        let resolver = Arc::new(Counting(AtomicUsize::new(0)));
        let id = Arc::new(Identity::new(
            IdentityConfig::default(),
            &[],
            Some(resolver.clone()),
        ));
        id.learn("t1", "client-a", Duration::from_secs(60));
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let c = id.identify(&[], &headers("Bearer t1"), ip, 0).await;
        assert_eq!(&*c.key, "client-a");
        // Ten concurrent requests with one unseen token make one look-up.
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let id = id.clone();
            tasks.push(tokio::spawn(async move {
                id.identify(&[], &headers("Bearer good-b"), ip, 0).await
            }));
        }
        for t in tasks {
            assert_eq!(&*t.await.unwrap().key, "b");
        }
        assert_eq!(resolver.0.load(Ordering::SeqCst), 1);
        let c = id.identify(&[], &headers("Bearer bad"), ip, 0).await;
        assert!(!c.known);
        assert!(c.key.starts_with("token:") && !c.key.contains("bad"));
        assert_eq!(&*c.label, "unknown");
        // A token the upstream could not resolve is not asked about again for a while.
        let asked = resolver.0.load(Ordering::SeqCst);
        id.identify(&[], &headers("Bearer bad"), ip, 0).await;
        assert_eq!(resolver.0.load(Ordering::SeqCst), asked);
        let c = id
            .identify(&[], &headers("Basic Y2xpZW50LXg6c2VjcmV0"), ip, 0)
            .await;
        assert_eq!(&*c.key, "client-x");
    }

    #[tokio::test(start_paused = true)]
    async fn lookups_are_rate_limited() {
        let resolver = Arc::new(Counting(AtomicUsize::new(0)));
        let cfg = IdentityConfig {
            tokens_me_per_second: 5,
            ..IdentityConfig::default()
        };
        let id = Identity::new(cfg, &[], Some(resolver.clone()));
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for i in 0..100 {
            id.identify(&[], &headers(&format!("Bearer flood-{i}")), ip, 0)
                .await;
        }
        assert!(resolver.0.load(Ordering::SeqCst) <= 10);
    }

    #[test]
    fn token_map_is_bounded() {
        let cfg = IdentityConfig {
            max_keys: 1000,
            ..IdentityConfig::default()
        };
        let id = Identity::new(cfg, &[], None);
        for i in 0..100_000 {
            id.learn(&format!("tok{i}"), "c", Duration::from_secs(60));
        }
        assert!(id.remembered_tokens() <= 1000);
    }

    /// Answers `slow-*` tokens after 10 s and never answers any other.
    struct Late;
    impl TokenResolver for Late {
        fn resolve(
            &self,
            _: usize,
            token: String,
        ) -> std::pin::Pin<Box<dyn Future<Output = Option<String>> + Send>> {
            Box::pin(async move {
                if !token.starts_with("slow-") {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(Duration::from_secs(10)).await;
                Some("late-client".to_string())
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lookups_that_outlive_their_callers_remove_their_own_entry() {
        let cfg = IdentityConfig {
            max_keys: 1000,
            tokens_me_per_second: 1_000_000,
            ..IdentityConfig::default()
        };
        let id = Identity::new(cfg, &[], Some(Arc::new(Late)));
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        // The caller gives up after LOOKUP_TIMEOUT; the look-up goes on, then goes away.
        let c = id.identify(&[], &headers("Bearer slow-one"), ip, 0).await;
        assert!(!c.known);
        assert_eq!(id.lookups_in_flight(), 1);
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert_eq!(id.lookups_in_flight(), 0);
        // A caller that leaves mid-way leaves nothing behind either.
        let left = tokio::time::timeout(
            Duration::from_millis(10),
            id.identify(&[], &headers("Bearer slow-two"), ip, 0),
        )
        .await;
        assert!(left.is_err());
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(id.lookups_in_flight(), 0);
        // 10^5 distinct tokens, 1000 callers at a time, half of them never answered.
        for batch in 0..100 {
            let callers = (0..1000).map(|i| {
                let kind = if i % 2 == 0 { "slow" } else { "never" };
                let auth = format!("Bearer {kind}-{batch}-{i}");
                let id = &id;
                async move { id.identify(&[], &headers(&auth), ip, 0).await }
            });
            for c in futures_util::future::join_all(callers).await {
                assert!(!c.known);
            }
            let n = id.lookups_in_flight();
            assert!(n <= 1000, "{n} look-ups in flight after batch {batch}");
        }
        tokio::time::sleep(LOOKUP_LIFETIME + Duration::from_secs(1)).await;
        assert_eq!(id.lookups_in_flight(), 0);
    }

    #[tokio::test]
    async fn network_identities_take_no_label_from_oauth_clients() {
        let id = Identity::new(IdentityConfig::default(), &[], None);
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        let sources = vec![IdentitySource::Header(http::HeaderName::from_static(
            "x-caller",
        ))];
        for i in 0..100_000 {
            let mut h = HeaderMap::new();
            h.insert("x-caller", HeaderValue::from_str(&format!("v{i}")).unwrap());
            let c = id.identify(&sources, &h, ip, 0).await;
            assert_eq!(&*c.label, "other");
        }
        // OAuth clients are still labelled by their id, and rendered keys add no label.
        assert_eq!(&*id.client("oauth-client").label, "oauth-client");
        assert_eq!(&*id.label_of("oauth-client"), "oauth-client");
        assert_eq!(&*id.label_of("v7"), "other");
        assert_eq!(&*id.label_of("token:0123"), "unknown");
        assert!(id.labels.lock().unwrap().len() <= 1);
    }

    #[tokio::test]
    async fn configured_sources_and_priority() {
        let clients: Vec<ClientConfig> =
            vec![toml::from_str("id = \"ivr\"\nname = \"IVR\"\npriority = \"critical\"").unwrap()];
        let id = Identity::new(IdentityConfig::default(), &clients, None);
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        let sources = vec![
            IdentitySource::Header(http::HeaderName::from_static("x-caller")),
            IdentitySource::ClientIp,
        ];
        let mut h = HeaderMap::new();
        h.insert("x-caller", HeaderValue::from_static("ivr"));
        let c = id.identify(&sources, &h, ip, 0).await;
        assert_eq!((&*c.key, &*c.label), ("ivr", "IVR"));
        assert_eq!(Identity::priority(None, &c, &h), Priority::Critical);
        h.insert("x-pacer-priority", HeaderValue::from_static("bulk"));
        assert_eq!(Identity::priority(None, &c, &h), Priority::Bulk);
        let other = id.identify(&sources, &HeaderMap::new(), ip, 0).await;
        assert_eq!(&*other.key, "10.0.0.9");
        assert_eq!(&*other.label, "other");
        h.insert("x-pacer-priority", HeaderValue::from_static("critical"));
        assert_eq!(
            Identity::priority(Some(Priority::Bulk), &c, &h),
            Priority::Bulk
        );
    }
}
