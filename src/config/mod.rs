//! Configuration: parsed once from TOML into typed, validated structs.
//!
//! Every mistake is reported with its key path (`upstream[1].url: relative URL "api"`), all
//! of them at once, so one `pacer check-config` run shows everything to fix.

mod apps;
mod cache;
mod discover;
mod egress;
mod env;
mod load;
mod presets;
mod types;
mod usage;
mod validate;

pub use apps::{app_name_ok, AppConfig, MAX_APP_NAME};
pub use cache::{CacheConfig, CacheSettings, CacheShare};
pub use discover::{DiscoverConfig, DiscoverKey, MIN_DISCOVER_INTERVAL};
pub use egress::{parse_proxy, EgressProxy, NO_PROXY_KEYWORD};
pub use load::LOG_FORMAT_ENV;
pub use presets::Preset;
pub use types::{Cidr, Dur, IdentitySource, Priority, Scope, Secret, UnknownClients};
pub use usage::{UsageConfig, MIN_USAGE_INTERVAL};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One configuration mistake and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Key path such as `upstream[1].url`; empty for the file as a whole.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every mistake found in one configuration.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl ConfigErrors {
    fn one(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigErrors(vec![ConfigError {
            path: path.into(),
            message: message.into(),
        }])
    }
}

/// The whole validated configuration.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub server: ServerConfig,
    pub upstreams: Vec<UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
    pub identity: IdentityConfig,
    pub clients: Vec<ClientConfig>,
    /// `[[app]]`: applications named ahead of time, with their weights.
    pub apps: Vec<AppConfig>,
    /// Limits as written plus those the upstreams' presets add.
    pub limits: Vec<LimitConfig>,
    pub queue: QueueConfig,
    pub state: StateConfig,
    pub adaptive: AdaptiveConfig,
    pub log: LogConfig,
    /// `[[cache]]`: read-only answers kept and handed out again.
    pub caches: Vec<CacheConfig>,
    /// `[cache_settings]`: the response cache's memory.
    pub cache_settings: CacheSettings,
    /// OAuth clients whose tokens pacer fetches itself (`[[credential]]`).
    pub credentials: Vec<CredentialConfig>,
    /// The organization's API use per OAuth client, polled (`[usage]`).
    pub usage: UsageConfig,
    /// Reading the org's published limits (`[discover]`); off when absent.
    pub discover: Option<DiscoverConfig>,
}

/// `[log]`: the access log, one line per request on stdout.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Line format; env `PACER_LOG_FORMAT` overrides it.
    pub format: LogFormat,
    /// Write the access log at all.
    pub access: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Json,
            access: true,
        }
    }
}

/// Format of access log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object a line.
    #[default]
    Json,
    /// `key=value` pairs (logfmt).
    Text,
}

impl LogFormat {
    /// The format named `s` (`json` or `text`).
    pub fn parse(s: &str) -> Option<LogFormat> {
        match s {
            "json" => Some(LogFormat::Json),
            "text" => Some(LogFormat::Text),
            _ => None,
        }
    }
}

/// `[adaptive]`: converge on an upstream's real budget for a client, from its 429s and
/// its `inin-ratelimit-allowed` reports.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptiveConfig {
    pub enabled: bool,
    /// Share of a client's answers in a minute that must be 429 before a 429 episode cuts.
    pub threshold: f64,
    /// Fraction of the effective rate each 429 episode takes away.
    pub cut: f64,
    /// No recovery before this long without a 429; a learned `inin-ratelimit-allowed`
    /// ceiling lapses after this long without a report.
    pub hold: Dur,
    /// Answers in the minute before the share counts as evidence.
    pub min_answers: u64,
    /// Lowest share of its configured rate a client is ever cut to.
    pub floor: f64,
    /// Share of the configured rate regained per minute once `hold` has passed.
    pub recover: f64,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            threshold: 0.01,
            cut: 0.2,
            hold: Dur::secs(3600),
            min_answers: 1,
            floor: 0.25,
            recover: 0.05,
        }
    }
}

/// Where limit counters live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateBackend {
    /// In this process.
    #[default]
    Local,
    /// In Redis, shared by every replica.
    Redis,
}

/// How pacer finds its Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// One Redis (or one endpoint in front of a primary) at `url`.
    #[default]
    Single,
    /// A Redis Cluster, discovered from the seed `nodes`.
    Cluster,
    /// The primary that the Sentinels in `nodes` name for `master`.
    Sentinel,
}

/// `[state]`: shared quotas across replicas.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    pub backend: StateBackend,
    /// Redis topology: `single` (uses `url`), `cluster` or `sentinel` (use `nodes`).
    pub mode: RedisMode,
    /// `redis://[user:password@]host:port[/db]` or `rediss://` for TLS (mode = "single").
    pub url: Option<Secret>,
    /// Cluster seed nodes, or the Sentinels, as `redis://host:port` URLs.
    pub nodes: Vec<Secret>,
    /// Name of the primary the Sentinels monitor (mode = "sentinel").
    pub master: Option<String>,
    /// Prefix of every key pacer writes.
    pub key_prefix: String,
    /// Longest wait for one Redis round trip before local shares are used for that request.
    pub timeout: Dur,
    /// Replicas sharing the quotas, for local shares while Redis is unreachable; 0 learns
    /// the number from the replicas' heartbeats.
    pub replicas: u64,
    /// A crashed replica's concurrency permits come back after this.
    pub lease_ttl: Dur,
    /// Extra trusted CA (PEM) for `rediss://` with a private CA (single and cluster modes);
    /// otherwise the system and webpki roots are used.
    pub ca_file: Option<PathBuf>,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            backend: StateBackend::Local,
            mode: RedisMode::Single,
            url: None,
            nodes: Vec::new(),
            master: None,
            key_prefix: "pacer".into(),
            timeout: Dur(Duration::from_millis(100)),
            replicas: 0,
            lease_ttl: Dur::secs(30),
            ca_file: None,
        }
    }
}

/// Largest `[server] workers`.
pub const MAX_WORKERS: usize = 256;

/// Largest `[server] buffer_body_bytes`: each request whose body is being read may hold it.
pub const MAX_BUFFER_BODY_BYTES: u64 = 16 * 1024 * 1024;

/// `[server]`: the listeners and their protections.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the proxy listens on.
    pub listen: SocketAddr,
    /// Address of `/metrics`, `/healthz`, `/readyz`, `/status`; none disables it.
    pub admin_listen: Option<SocketAddr>,
    /// Larger request bodies are answered 413.
    pub max_body_bytes: u64,
    /// Request bodies up to this size are read whole before admission (a broken or
    /// unfinished one never reaches the upstream); larger ones stream. 0 streams all.
    pub buffer_body_bytes: u64,
    /// Larger request header sections are answered 431.
    pub max_header_bytes: usize,
    /// More request header fields than this are answered 431.
    pub max_headers: usize,
    /// Time a client has to send its complete request head.
    pub header_read_timeout: Dur,
    /// Optional inbound TLS.
    pub tls: Option<TlsConfig>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<Cidr>,
    /// How long in-flight requests may finish after a shutdown signal.
    pub shutdown_grace: Dur,
    /// Reload when the configuration file's content changes on disk (polled every second;
    /// `pacer run` only). SIGHUP reloads either way.
    pub watch_config: bool,
    /// Open client connections at most; more wait in the kernel backlog.
    pub max_connections: usize,
    /// Threads serving the proxy listener, each with its own single-threaded runtime and
    /// its own listening socket on the same port (`SO_REUSEPORT`, Linux): no request
    /// crosses threads. 0 means one per CPU core. Limits and queues are shared by all.
    pub workers: usize,
    /// HTTP/2 streams per connection at most.
    pub http2_max_concurrent_streams: u32,
    /// Longer request targets (path and query) are answered 414.
    pub max_uri_bytes: usize,
    /// A body that moves no bytes for this long is aborted, in either direction (also a
    /// client that stops reading its answer).
    pub body_idle_timeout: Dur,
    /// The whole exchange, request body to the last byte of the answer, must end within this.
    pub request_deadline: Dur,
    /// A client connection older than this is closed gracefully (HTTP/1: no keep-alive;
    /// h2: GOAWAY).
    pub max_connection_age: Dur,
    /// Interval of HTTP/2 keep-alive pings to clients.
    pub http2_keep_alive_interval: Dur,
    /// An HTTP/2 client that does not answer a ping within this is disconnected.
    pub http2_keep_alive_timeout: Dur,
    /// HTTP/2 streams a client may open and reset before they are accepted (rapid-reset
    /// protection); more close the connection.
    pub http2_max_pending_accept_reset_streams: usize,
    /// Shadow mode for every limit and for upstream pauses: decide and count, never queue
    /// or shed (see [`crate::shadow`]).
    pub shadow: bool,
    /// The one application this pacer serves (a sidecar): the app of every request that
    /// names none in its header or route.
    pub app: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9090))),
            max_body_bytes: 10 * 1024 * 1024,
            buffer_body_bytes: 64 * 1024,
            max_header_bytes: 32 * 1024,
            max_headers: 64,
            header_read_timeout: Dur::secs(10),
            tls: None,
            trusted_proxies: Vec::new(),
            shutdown_grace: Dur::secs(30),
            watch_config: true,
            max_connections: 10_000,
            workers: 0,
            http2_max_concurrent_streams: 100,
            max_uri_bytes: 8 * 1024,
            body_idle_timeout: Dur::secs(30),
            request_deadline: Dur::secs(5 * 60),
            max_connection_age: Dur::secs(10 * 60),
            http2_keep_alive_interval: Dur::secs(30),
            http2_keep_alive_timeout: Dur::secs(20),
            http2_max_pending_accept_reset_streams: 50,
            shadow: false,
            app: None,
        }
    }
}

/// `[server.tls]`: PEM files for inbound TLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[[upstream]]`: a target pacer may call; nothing else is reachable.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    /// Base URL, `http` or `https`, without query.
    pub url: String,
    /// Documented limits and endpoint templates of a known API.
    #[serde(default)]
    pub preset: Option<Preset>,
    /// Time to the upstream's response head; past it the caller gets 504.
    #[serde(default = "defaults::upstream_timeout")]
    pub timeout: Dur,
    /// Time to establish a connection (TCP + TLS); past it the caller gets 502.
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: Dur,
    /// Extra trusted CA in PEM (private CAs, tests).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Idle pooled connections are closed after this.
    #[serde(default = "defaults::pool_idle_timeout")]
    pub pool_idle_timeout: Dur,
    /// Egress proxy, `http://[user:password@]host:port`, tunnelled with `CONNECT`; `"none"`
    /// connects directly. Unset: `HTTPS_PROXY`/`HTTP_PROXY` and `NO_PROXY` apply.
    #[serde(default)]
    pub proxy: Option<Secret>,
    /// The proxy in force, resolved at load from `proxy` or the environment.
    #[serde(skip)]
    pub egress: Option<EgressProxy>,
}

/// `[[route]]`: which requests go to which upstream, and how they are treated.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Path prefix; the longest matching prefix wins.
    pub prefix: String,
    pub upstream: String,
    /// Remove the prefix (keeping a leading `/`) before forwarding.
    #[serde(default)]
    pub strip_prefix: bool,
    /// Priority of everything on this route; else the client's.
    #[serde(default)]
    pub priority: Option<Priority>,
    /// How callers are told apart; empty means the OAuth client (Genesys routes).
    #[serde(default)]
    pub identity: Vec<IdentitySource>,
    /// A shared key callers must present.
    #[serde(default)]
    pub inbound_auth: Option<InboundAuth>,
    /// Source addresses allowed on this route; empty allows all.
    #[serde(default)]
    pub allow_cidrs: Vec<Cidr>,
    /// Longest queue wait on this route; else `[queue] max_wait`.
    #[serde(default)]
    pub max_wait: Option<Dur>,
    /// A `[[credential]]` name: pacer sends its own token for that OAuth client, drops the
    /// caller's `Authorization`, and counts the requests under that client. Requires
    /// `inbound_auth` and/or `allow_cidrs`.
    #[serde(default)]
    pub credential: Option<String>,
    /// The application of requests on this route that name none in the app header.
    #[serde(default)]
    pub app: Option<String>,
}

/// `inbound_auth = { header, keys }` on a route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundAuth {
    pub header: String,
    pub keys: Vec<Secret>,
}

/// Default `[[credential]] token_path`: Genesys' login token endpoint.
pub const DEFAULT_TOKEN_PATH: &str = "/oauth/token";

/// `[[credential]]`: an OAuth client (client credentials grant) whose token pacer fetches
/// from the login upstream, caches and refreshes itself (see [`crate::credential`]).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CredentialConfig {
    /// The name routes and `[discover]` refer to it by.
    pub name: String,
    /// The `[[upstream]]` that issues its tokens (Genesys: `login.<region>`).
    pub upstream: String,
    /// OAuth client id; also the caller identity of the requests sent with its token.
    pub client_id: String,
    /// OAuth client secret, usually `${ENV}`; never printed.
    pub client_secret: Secret,
    /// Path of the token endpoint on the login upstream.
    #[serde(default = "defaults::token_path")]
    pub token_path: String,
    /// Fetch a new token this long before the cached one expires; default 10% of the
    /// token's lifetime, at least 60 s. Never more than half the lifetime.
    #[serde(default)]
    pub refresh_before: Option<Dur>,
}

/// `[identity]`: how callers are identified.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    pub unknown_clients: UnknownClients,
    /// Resolve tokens never seen issued with `GET /api/v2/tokens/me`.
    pub tokens_me: bool,
    /// `tokens/me` look-ups per second at most, so unknown tokens cannot flood the API.
    pub tokens_me_per_second: u32,
    /// Identities and limiter keys kept at most (bounded memory).
    pub max_keys: usize,
    /// How long a learned token → client mapping is kept without use.
    pub token_ttl: Dur,
    /// Token broker: answer repeated client-credentials token requests (same credentials,
    /// same body) with the token already issued, until `token_cache_margin` before it
    /// expires, so a fleet of workers does not burn the token issuance limit. Keeps issued
    /// tokens in memory (never in logs or metrics).
    pub token_cache: bool,
    /// A cached token is handed out only while it has at least this long left.
    pub token_cache_margin: Dur,
    /// Request header naming the calling application (see [`crate::identity::app`]).
    pub app_header: String,
    /// Apps learned from callers at most, besides `[[app]]`; the rest count as `other`.
    pub max_apps: usize,
    /// Send the app header upstream too (removed by default).
    pub forward_app_header: bool,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            unknown_clients: UnknownClients::Limit,
            tokens_me: true,
            tokens_me_per_second: 20,
            max_keys: 100_000,
            token_ttl: Dur::secs(24 * 3600),
            token_cache: false,
            token_cache_margin: Dur::secs(300),
            app_header: "x-pacer-app".into(),
            max_apps: 100,
            forward_app_header: false,
        }
    }
}

/// `[[client]]`: a name and priority for an OAuth client or caller.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub priority: Priority,
}

/// `[[limit]]`: a quota or concurrency cap.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    pub name: String,
    /// The upstream it applies to; all when omitted.
    #[serde(default)]
    pub upstream: Option<String>,
    /// Endpoint template `METHOD /path/{param}/*`; every request when omitted.
    #[serde(default, rename = "match")]
    pub matches: Option<String>,
    #[serde(default)]
    pub scope: Scope,
    #[serde(default)]
    pub requests: Option<u64>,
    #[serde(default)]
    pub per: Option<Dur>,
    #[serde(default)]
    pub concurrency: Option<u64>,
    /// Async job slots: at most this many jobs created through the matching endpoint run
    /// at once per key (see [`crate::queue::jobs`]).
    #[serde(default)]
    pub jobs: Option<u64>,
    /// A job slot no status answer or `DELETE` freed is given back after this long;
    /// [`DEFAULT_JOB_TTL`] when omitted.
    #[serde(default)]
    pub job_ttl: Option<Dur>,
    /// Fraction of the quota left unused as a safety margin.
    #[serde(default)]
    pub headroom: f64,
    /// Extra window length absorbing network jitter between pacer's send and the
    /// upstream's count; default 1% of `per`, at most 1s.
    #[serde(default)]
    pub guard: Option<Dur>,
    /// Decide and count, but never queue or shed (see [`crate::shadow`]).
    #[serde(default)]
    pub shadow: bool,
    /// Where the org's published value of this limit is (used with `[discover]`).
    #[serde(default)]
    pub discover: Option<DiscoverKey>,
}

/// How long a job slot is held when pacer never sees its job finish (`job_ttl`).
pub const DEFAULT_JOB_TTL: Duration = Duration::from_secs(30 * 60);

impl LimitConfig {
    /// How long a job slot lasts at most: `job_ttl`, else [`DEFAULT_JOB_TTL`].
    pub fn effective_job_ttl(&self) -> Duration {
        self.job_ttl.map_or(DEFAULT_JOB_TTL, |d| d.0)
    }

    /// Requests allowed per window after headroom.
    pub fn effective_requests(&self) -> Option<u64> {
        self.requests
            .map(|n| ((n as f64) * (1.0 - self.headroom)).floor() as u64)
    }

    /// Window length pacer counts in: `per` plus the guard interval.
    pub fn effective_window(&self) -> Option<Duration> {
        let per = self.per?.0;
        let guard = self
            .guard
            .map(|g| g.0)
            .unwrap_or_else(|| (per / 100).min(Duration::from_secs(1)));
        Some(per + guard)
    }
}

/// `[queue]`: waiting and shedding.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// A request whose predicted wait is longer is shed at once.
    pub max_wait: Dur,
    /// Waiting requests at most.
    pub max_depth: usize,
    /// Share of every quota only critical traffic may fill.
    pub critical_reserve: f64,
    /// Bulk may fill at most this share of any quota.
    pub bulk_share: f64,
    /// A client that sent critical requests on a critical route keeps the reserve on its
    /// keys (and the shared keys those requests counted against) until this long passes
    /// without another.
    pub reserve_memory: Dur,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_wait: Dur::secs(30),
            max_depth: 10_000,
            critical_reserve: 0.2,
            bulk_share: 0.5,
            reserve_memory: Dur::secs(24 * 3600),
        }
    }
}

mod defaults {
    use super::Dur;
    pub fn upstream_timeout() -> Dur {
        Dur::secs(60)
    }
    pub fn connect_timeout() -> Dur {
        Dur::secs(5)
    }
    pub fn pool_idle_timeout() -> Dur {
        Dur::secs(90)
    }
    pub fn token_path() -> String {
        super::DEFAULT_TOKEN_PATH.to_string()
    }
}

impl Config {
    /// True when `other` keeps every limiter and identity setting of this configuration,
    /// so a reload may keep the counters, queues and learned tokens.
    pub fn same_limiting(&self, other: &Config) -> bool {
        let names = |c: &Config| {
            c.upstreams
                .iter()
                .map(|u| u.name.clone())
                .collect::<Vec<_>>()
        };
        self.limits == other.limits
            && self.queue == other.queue
            && self.state == other.state
            && self.identity == other.identity
            && self.clients == other.clients
            && self.adaptive == other.adaptive
            && self.server.shadow == other.server.shadow
            && names(self) == names(other)
    }

    /// The upstream with this name.
    pub fn upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.name == name)
    }

    /// The `[[credential]]` with this name.
    pub fn credential(&self, name: &str) -> Option<&CredentialConfig> {
        self.credentials.iter().find(|c| c.name == name)
    }

    /// The index of the upstream with this name, as limits and routes refer to it.
    pub fn upstream_index(&self, name: &str) -> Option<usize> {
        self.upstreams.iter().position(|u| u.name == name)
    }
}

/// One upstream and one route: the smallest valid configuration, for unit tests to extend.
#[cfg(test)]
pub(crate) const MINIMAL: &str = r#"
[[upstream]]
name = "api"
url = "http://127.0.0.1:1"
[[route]]
prefix = "/"
upstream = "api"
"#;

#[cfg(test)]
mod tests;
