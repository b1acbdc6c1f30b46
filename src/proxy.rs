//! One pacer instance's state, built once per configuration: upstream clients, identity,
//! limits and queues, adaptive cuts, metrics — and the request [`Pipeline`] whose phases
//! each hold the handles they use. Reading the state for `/status` and `/metrics` is in
//! [`crate::status`].

use crate::access_log::{AccessLog, LogSink};
use crate::adaptive::Adaptive;
use crate::admit::Admit;
use crate::answer::ProxyBody;
use crate::broker::{Broker, TokenBroker};
use crate::buffer::BufferBody;
use crate::cache::{CachePhase, ResponseCache};
use crate::config::{Cidr, Config, StateBackend};
use crate::credential::{CredentialForward, Credentials};
use crate::discover::Discovery;
use crate::feedback::Learn;
use crate::forward::{Forward, Upstream, UpstreamResolver, UpstreamSetupError};
use crate::guard::Guard;
use crate::identity::{Apps, Identify, Identity};
use crate::limit::LimitSet;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::queue::Admission;
use crate::reserve::CriticalSources;
use crate::route::{Access, RouteSetupError, RouteTable};
use crate::server::ConnInfo;
use crate::state::redis::RedisBackend;
use crate::state::{Backend, Clock, LocalBackend};
use crate::usage::Usage;
use http::{Request, Response};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Why the pipeline could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Upstream(#[from] UpstreamSetupError),
    #[error(transparent)]
    Route(#[from] RouteSetupError),
    #[error("limit {limit}: no upstream named {upstream:?}")]
    LimitUpstream { limit: String, upstream: String },
    #[error("state.url: {0}")]
    State(#[from] redis::RedisError),
}

/// Everything one configuration's requests share, and the pipeline built from it.
pub struct Proxy {
    pub config: Arc<Config>,
    pub upstreams: Vec<Arc<Upstream>>,
    pub identity: Arc<Identity>,
    /// The applications behind the callers (see [`crate::identity::app`]).
    pub apps: Arc<Apps>,
    pub admission: Admission,
    pub metrics: Arc<Metrics>,
    /// Rate cuts after upstream 429s (`[adaptive]`).
    pub adaptive: Arc<Adaptive>,
    /// Issued client-credentials tokens handed out again (`[identity] token_cache`).
    pub broker: Option<Arc<TokenBroker>>,
    /// Kept read-only answers and flights in the air (`[[cache]]`); none without entries.
    pub cache: Option<Arc<ResponseCache>>,
    /// Tokens pacer fetches itself (`[[credential]]`), for credential routes and pacer's
    /// own API calls.
    pub credentials: Arc<Credentials>,
    /// The organization's usage (`[usage]`) and pacer's own sends per configured client;
    /// kept across reloads.
    pub usage: Arc<Usage>,
    /// The org's published limits as last read (`[discover]`).
    pub discovery: Arc<Discovery>,
    resolver: Arc<UpstreamResolver>,
    /// Where access log lines go, shared across reloads; none: no access log.
    log_sink: Option<LogSink>,
    /// Request headers whose values are credentials: `authorization` and the routes'
    /// inbound-key headers (see [`crate::edge`]).
    pub sensitive_headers: Arc<[http::HeaderName]>,
    draining: Arc<AtomicBool>,
    pipeline: Pipeline,
}

/// The shared parts a pipeline is built from.
struct Parts {
    config: Arc<Config>,
    upstreams: Vec<Arc<Upstream>>,
    identity: Arc<Identity>,
    apps: Arc<Apps>,
    admission: Admission,
    metrics: Arc<Metrics>,
    adaptive: Arc<Adaptive>,
    broker: Option<Arc<TokenBroker>>,
    credentials: Arc<Credentials>,
    usage: Arc<Usage>,
    discovery: Arc<Discovery>,
    resolver: Arc<UpstreamResolver>,
    log_sink: Option<LogSink>,
}

impl Proxy {
    /// A proxy for a reloaded configuration. Counters, queues, learned tokens and metrics
    /// carry over when the limiting settings are unchanged; otherwise limits start afresh.
    pub fn reload(old: &Proxy, config: Arc<Config>) -> Result<Arc<Proxy>, SetupError> {
        if !old.config.same_limiting(&config) {
            tracing::warn!("limits changed on reload: counters start afresh");
            return Proxy::build(
                config,
                old.metrics.clone(),
                old.log_sink.clone(),
                Some(&old.credentials),
                old.usage.clone(),
            );
        }
        let upstreams = build_upstreams(&config)?;
        // Routes may have changed: a new critical route lets keys learn the reserve.
        // Learned apps carry over while the app settings stay: the label set stays bounded.
        let apps = if same_apps(&old.config, &config) {
            old.apps.clone()
        } else {
            Arc::new(new_apps(&config))
        };
        let parts = Parts {
            upstreams: upstreams.clone(),
            identity: old.identity.clone(),
            apps,
            admission: old.admission.clone(),
            metrics: old.metrics.clone(),
            adaptive: old.adaptive.clone(),
            broker: old.broker.clone(),
            credentials: credentials(
                &config,
                &upstreams,
                &old.admission,
                &old.metrics,
                Some(&old.credentials),
                &old.usage,
            ),
            usage: old.usage.clone(),
            // Published values stay in force unless `[discover]` itself changed.
            discovery: if old.config.discover == config.discover {
                old.discovery.clone()
            } else {
                Arc::new(Discovery::new(&config, old.admission.limits()))
            },
            resolver: old.resolver.clone(),
            log_sink: old.log_sink.clone(),
            config,
        };
        let proxy = Proxy::assemble(parts)?;
        old.resolver.replace(upstreams);
        old.admission
            .set_critical_sources(CriticalSources::of(&proxy.config));
        Ok(proxy)
    }

    /// Builds routes, upstream clients, identity and limits from a validated configuration;
    /// writes no access log.
    pub fn new(config: Arc<Config>) -> Result<Arc<Proxy>, SetupError> {
        Self::with_log(config, None)
    }

    /// Like [`Proxy::new`], writing the access log (as `[log]` says) to `sink`.
    pub fn with_log(config: Arc<Config>, sink: Option<LogSink>) -> Result<Arc<Proxy>, SetupError> {
        let usage = Arc::new(Usage::new(config.identity.max_keys));
        Self::build(config, Arc::new(Metrics::new()), sink, None, usage)
    }

    /// Like [`Proxy::with_log`], recording into existing metrics.
    fn build(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        log_sink: Option<LogSink>,
        previous: Option<&Credentials>,
        usage: Arc<Usage>,
    ) -> Result<Arc<Proxy>, SetupError> {
        let upstreams = build_upstreams(&config)?;
        let index = |name: &str| config.upstream_index(name);
        // A limit naming an upstream that does not exist would otherwise count on all.
        for l in &config.limits {
            if let Some(u) = l.upstream.as_deref().filter(|u| index(u).is_none()) {
                return Err(SetupError::LimitUpstream {
                    limit: l.name.clone(),
                    upstream: u.to_string(),
                });
            }
        }
        let limits = Arc::new(
            LimitSet::new(&config.limits, &config.queue, index).shadowed(config.server.shadow),
        );
        let discovery = Arc::new(Discovery::new(&config, &limits));
        let clock = Clock::default();
        let backend: Arc<dyn Backend> = match config.state.backend {
            StateBackend::Local => Arc::new(LocalBackend::new(limits.clone(), clock)),
            StateBackend::Redis => RedisBackend::start(
                limits.clone(),
                clock,
                config.state.clone(),
                config.identity.max_keys,
            )?,
        };
        let admission = Admission::with_backend(
            limits,
            backend,
            clock,
            config.queue.clone(),
            config.identity.max_keys,
        );
        admission.set_critical_sources(CriticalSources::of(&config));
        let resolver = Arc::new(UpstreamResolver::new(upstreams.clone()));
        let (counter, sends) = (admission.clone(), usage.clone());
        let identity = Identity::new(
            config.identity.clone(),
            &config.clients,
            Some(resolver.clone()),
        )
        .with_lookup_hook(Arc::new(move |upstream, client| {
            counter.record_sent(
                upstream,
                &Arc::from(client),
                &http::Method::GET,
                "/api/v2/tokens/me",
            );
            sends.note_sent(client);
        }));
        let broker = config.identity.token_cache.then(|| {
            Arc::new(TokenBroker::new(
                config.identity.max_keys,
                config.identity.token_cache_margin.0,
            ))
        });
        let adaptive = Arc::new(Adaptive::new(
            config.adaptive.clone(),
            config.identity.max_keys,
        ));
        let (scales, outside) = (adaptive.clone(), usage.clone());
        admission.set_scaler(Arc::new(move |key| {
            let s = scales.scale(key);
            // Use outside pacer (`[usage] subtract`) lowers the per-client layer too.
            (s.rate, s.client.min(outside.client_share(key)))
        }));
        let credentials = credentials(&config, &upstreams, &admission, &metrics, previous, &usage);
        let apps = Arc::new(new_apps(&config));
        Proxy::assemble(Parts {
            config,
            upstreams,
            identity: Arc::new(identity),
            apps,
            admission,
            metrics,
            adaptive,
            broker,
            credentials,
            usage,
            discovery,
            resolver,
            log_sink,
        })
    }

    /// The request path, phase by phase, each with the handles it needs.
    fn assemble(p: Parts) -> Result<Arc<Proxy>, SetupError> {
        let config = &p.config;
        p.usage.watch(
            config
                .clients
                .iter()
                .map(|c| c.id.as_str())
                .chain(config.credentials.iter().map(|c| c.client_id.as_str())),
        );
        let server = &config.server;
        let draining = Arc::new(AtomicBool::new(false));
        let trusted: Arc<[Cidr]> = server.trusted_proxies.clone().into();
        let names = |name: &str| {
            let i = config.upstream_index(name)?;
            Some((i, p.upstreams.get(i)?.name.clone()))
        };
        let configured: Arc<[Option<u64>]> = config.limits.iter().map(|l| l.requests).collect();
        // Kept answers start afresh with each configuration.
        let cache = ResponseCache::from_config(config, p.metrics.clone());
        let pipeline = Pipeline {
            guard: Guard::new(Arc::new(server.clone()), draining.clone()),
            routes: RouteTable::new(&config.routes, names, &config.credentials)?,
            access: Access::new(trusted.clone()),
            buffer: BufferBody::new(server.buffer_body_bytes),
            identify: Identify::new(p.identity.clone(), trusted.clone(), p.apps.clone()),
            broker: Broker::new(p.broker.clone()),
            cache: CachePhase::new(cache.clone(), config.queue.max_wait.0),
            admit: Admit::new(
                p.admission.clone(),
                p.adaptive.clone(),
                p.metrics.clone(),
                config.queue.max_wait.0,
                config.state.backend == StateBackend::Redis,
            ),
            forward: Forward::new(p.upstreams.clone(), trusted, p.metrics.clone())
                .with_credentials(CredentialForward::new(
                    p.credentials.clone(),
                    server.buffer_body_bytes,
                )),
            learn: Learn::new(
                p.admission.clone(),
                p.adaptive.clone(),
                p.identity.clone(),
                p.broker.clone(),
                p.metrics.clone(),
                configured,
            )
            .with_usage(p.usage.clone()),
            metrics: p.metrics.clone(),
            access_log: p
                .log_sink
                .clone()
                .and_then(|sink| AccessLog::new(&config.log, sink, p.metrics.clone())),
            deadline: server.request_deadline.0,
        };
        let sensitive_headers = sensitive_headers(config);
        Ok(Arc::new(Proxy {
            config: p.config,
            upstreams: p.upstreams,
            identity: p.identity,
            apps: p.apps,
            admission: p.admission,
            metrics: p.metrics,
            adaptive: p.adaptive,
            broker: p.broker,
            cache,
            credentials: p.credentials,
            usage: p.usage,
            discovery: p.discovery,
            resolver: p.resolver,
            log_sink: p.log_sink,
            sensitive_headers,
            draining,
            pipeline,
        }))
    }

    /// Answers one request from a client connection.
    pub async fn handle(&self, req: Request<ProxyBody>, conn: ConnInfo) -> Response<ProxyBody> {
        self.pipeline.handle(req, conn).await
    }

    /// From now on, new requests are answered 503 with `Retry-After`.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// True once shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// The configuration's credentials, counting every request they send against the limits
/// like a forwarded one of their OAuth client (the token exchange against the login
/// preset's `token-issuance`) and as pacer's own use of it in `usage`, and keeping
/// `previous` tokens whose settings are unchanged.
fn credentials(
    config: &Config,
    upstreams: &[Arc<Upstream>],
    admission: &Admission,
    metrics: &Arc<Metrics>,
    previous: Option<&Credentials>,
    usage: &Arc<Usage>,
) -> Arc<Credentials> {
    let (counter, sends) = (admission.clone(), usage.clone());
    let mut credentials = Credentials::new(config, upstreams.to_vec())
        .with_metrics(metrics.clone())
        .with_send_hook(Arc::new(move |upstream, client, method, path| {
            counter.record_sent(upstream, &Arc::from(client), method, path);
            sends.note_sent(client);
        }));
    if let Some(old) = previous {
        credentials = credentials.carry_over(old);
    }
    Arc::new(credentials)
}

/// `authorization` and every route's inbound-key header.
fn sensitive_headers(config: &Config) -> Arc<[http::HeaderName]> {
    let mut names = vec![http::header::AUTHORIZATION];
    let inbound = config.routes.iter().filter_map(|r| r.inbound_auth.as_ref());
    for auth in inbound {
        // A name that does not parse fails the route table before this is used.
        if let Ok(name) = http::HeaderName::from_bytes(auth.header.as_bytes()) {
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names.into()
}

/// One client per configured upstream, in configuration order.
fn build_upstreams(config: &Config) -> Result<Vec<Arc<Upstream>>, UpstreamSetupError> {
    config
        .upstreams
        .iter()
        .map(|u| Upstream::new(u, crate::server::worker_count(config.server.workers)).map(Arc::new))
        .collect()
}

/// The apps of a configuration, none learned yet.
fn new_apps(config: &Config) -> Apps {
    Apps::new(&config.identity, &config.apps, config.server.app.as_deref())
}

/// True when two configurations name and bound apps alike.
fn same_apps(a: &Config, b: &Config) -> bool {
    let (x, y) = (&a.identity, &b.identity);
    a.apps == b.apps
        && a.server.app == b.server.app
        && x.app_header == y.app_header
        && x.max_apps == y.max_apps
        && x.forward_app_header == y.forward_app_header
}
