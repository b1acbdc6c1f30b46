//! The request pipeline, assembled in one place: [`Proxy::pipeline`].
//!
//! Each phase is a [`Stage`] in its own module: it sees the request, may answer it itself
//! with a [`ProxyError`], or hands it to the next phase. What one phase learns travels to
//! the next in the request's extensions.

use crate::adaptive::Adaptive;
use crate::admit::Admit;
use crate::answer::ProxyBody;
use crate::broker::{Broker, FromCache, TokenBroker};
use crate::buffer::BufferBody;
use crate::config::{Config, Priority, StateBackend};
use crate::error::ProxyError;
use crate::feedback::Learn;
use crate::forward::{Forward, Upstream, UpstreamResolver, UpstreamSetupError};
use crate::guard::Guard;
use crate::identity::{Identify, Identity};
use crate::limit::LimitSet;
use crate::metrics::{Gauge, Metrics, Outcome};
use crate::queue::Admission;
use crate::reserve::CriticalSources;
use crate::route::{Access, RouteStage, RouteTable};
use crate::state::redis::RedisBackend;
use crate::state::{Backend, Clock, LocalBackend};
use futures_util::future::BoxFuture;
use http::{Request, Response};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceBuilder};

/// The rest of the pipeline, as seen from one stage.
pub type Next = BoxCloneSyncService<Request<ProxyBody>, Response<ProxyBody>, ProxyError>;

/// Result of one stage.
pub type StageFuture = BoxFuture<'static, Result<Response<ProxyBody>, ProxyError>>;

/// One phase of the request path.
pub trait Stage: Send + Sync + 'static {
    /// Handles `req`, calling `next` to continue down the pipeline.
    fn call(self: Arc<Self>, req: Request<ProxyBody>, next: Next) -> StageFuture;
}

/// Continues down the pipeline. Every service in it is always ready (stages wait inside
/// their futures, never in `poll_ready`), so `call` needs no `poll_ready` first.
pub fn call_next(mut next: Next, req: Request<ProxyBody>) -> StageFuture {
    next.call(req)
}

/// Puts a [`Stage`] in front of the rest of the pipeline.
pub struct StageLayer<T>(Arc<T>);

impl<T: Stage> StageLayer<T> {
    /// A layer running `stage`.
    pub fn new(stage: T) -> Self {
        StageLayer(Arc::new(stage))
    }
}

impl<T: Stage> Layer<Next> for StageLayer<T> {
    type Service = Next;
    fn layer(&self, next: Next) -> Next {
        BoxCloneSyncService::new(StageService {
            stage: self.0.clone(),
            next,
        })
    }
}

// Hand-written so that `T` need not be `Clone`: the stage is shared behind `Arc`.
struct StageService<T> {
    stage: Arc<T>,
    next: Next,
}

impl<T> Clone for StageService<T> {
    fn clone(&self) -> Self {
        StageService {
            stage: self.stage.clone(),
            next: self.next.clone(),
        }
    }
}

impl<T: Stage> Service<Request<ProxyBody>> for StageService<T> {
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = StageFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ProxyBody>) -> StageFuture {
        self.stage.clone().call(req, self.next.clone())
    }
}

/// Where a request came from; inserted by the listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// Bounded metric labels of one request, filled in by the stages as they learn them.
#[derive(Debug, Default)]
pub struct Labels {
    pub upstream: OnceLock<Arc<str>>,
    pub client: OnceLock<Arc<str>>,
    pub endpoint: OnceLock<Arc<str>>,
    pub priority: OnceLock<Priority>,
}

impl Labels {
    fn get(cell: &OnceLock<Arc<str>>, default: &'static str) -> Arc<str> {
        cell.get().cloned().unwrap_or_else(|| Arc::from(default))
    }
}

/// Why the pipeline could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Upstream(#[from] UpstreamSetupError),
    #[error("state.url: {0}")]
    State(#[from] redis::RedisError),
}

/// Everything the pipeline needs, built once from configuration.
pub struct Proxy {
    pub config: Arc<Config>,
    pub routes: RouteTable,
    pub upstreams: Vec<Arc<Upstream>>,
    pub identity: Arc<Identity>,
    pub admission: Admission,
    pub metrics: Arc<Metrics>,
    /// Rate cuts after upstream 429s (`[adaptive]`).
    pub adaptive: Arc<Adaptive>,
    /// Issued client-credentials tokens handed out again (`[identity] token_cache`).
    pub broker: Option<Arc<TokenBroker>>,
    resolver: Arc<UpstreamResolver>,
    draining: AtomicBool,
}

impl Proxy {
    /// A proxy for a reloaded configuration. Counters, queues, learned tokens and metrics
    /// carry over when the limiting settings are unchanged; otherwise limits start afresh.
    pub fn reload(old: &Proxy, config: Arc<Config>) -> Result<Arc<Proxy>, SetupError> {
        if !old.config.same_limiting(&config) {
            tracing::warn!("limits changed on reload: counters start afresh");
            return Proxy::with_metrics(config, old.metrics.clone());
        }
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| Upstream::new(u).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let routes = RouteTable::new(&config.routes, |name| {
            config
                .upstreams
                .iter()
                .position(|u| u.name == name)
                .unwrap_or(0)
        });
        old.resolver.replace(upstreams.clone());
        // Routes may have changed: a new critical route lets keys learn the reserve.
        old.admission
            .set_critical_sources(CriticalSources::of(&config));
        Ok(Arc::new(Proxy {
            adaptive: old.adaptive.clone(),
            broker: old.broker.clone(),
            resolver: old.resolver.clone(),
            identity: old.identity.clone(),
            admission: old.admission.clone(),
            metrics: old.metrics.clone(),
            routes,
            upstreams,
            draining: AtomicBool::new(false),
            config,
        }))
    }

    /// Builds routes, upstream clients, identity and limits from a validated configuration.
    pub fn new(config: Arc<Config>) -> Result<Arc<Proxy>, SetupError> {
        Self::with_metrics(config, Arc::new(Metrics::new()))
    }

    /// Like [`Proxy::new`], recording into existing metrics.
    fn with_metrics(config: Arc<Config>, metrics: Arc<Metrics>) -> Result<Arc<Proxy>, SetupError> {
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| Upstream::new(u).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let index = |name: &str| config.upstreams.iter().position(|u| u.name == name);
        let routes = RouteTable::new(&config.routes, |name| index(name).unwrap_or(0));
        let limits = Arc::new(LimitSet::new(&config.limits, &config.queue, index));
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
        let counter = admission.clone();
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
        let scales = adaptive.clone();
        admission.set_scaler(Arc::new(move |key| {
            let s = scales.scale(key);
            (s.rate, s.client)
        }));
        Ok(Arc::new(Proxy {
            adaptive,
            broker,
            resolver,
            identity: Arc::new(identity),
            admission,
            metrics,
            routes,
            upstreams,
            draining: AtomicBool::new(false),
            config,
        }))
    }

    /// From now on, new requests are answered 503 with `Retry-After`.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// True once shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The whole request path, top to bottom.
    pub fn pipeline(self: &Arc<Self>) -> Next {
        let p = || self.clone();
        ServiceBuilder::new()
            // Refuse what a reverse proxy must never pass; enforce size limits; normalize the path.
            .layer(StageLayer::new(Guard::new(p())))
            // Pick the upstream by the longest configured prefix; nothing else is reachable.
            .layer(StageLayer::new(RouteStage::new(p())))
            // Route-level gates: source address ranges and inbound keys.
            .layer(StageLayer::new(Access::new(p())))
            // Read small bodies whole: a broken or unfinished one is answered here, before it
            // can cost a token look-up, quota or an upstream connection.
            .layer(StageLayer::new(BufferBody::new(p())))
            // Who is calling: the OAuth client behind the token, or the route's identity source.
            .layer(StageLayer::new(Identify::new(p())))
            // Token broker: a repeated client-credentials token request gets the issued token.
            .layer(StageLayer::new(Broker::new(p())))
            // Classify the endpoint, then reserve room in every matching limit: now, after a
            // wait in the queue, or shed with Retry-After.
            .layer(StageLayer::new(Admit::new(p())))
            // Learn from the answer: upstream pauses (429 + Retry-After), issued tokens.
            .layer(StageLayer::new(Learn::new(p())))
            // Send upstream and stream the answer back.
            .service(BoxCloneSyncService::new(Forward::new(p())))
    }

    /// Runs one request through the pipeline, turns errors into pacer's own answers and
    /// records the outcome.
    pub async fn handle(
        self: &Arc<Self>,
        pipeline: Next,
        mut req: Request<ProxyBody>,
    ) -> Response<ProxyBody> {
        let labels = Arc::new(Labels::default());
        req.extensions_mut().insert(labels.clone());
        let method = req.method().clone();
        let deadline = self.config.server.request_deadline.0;
        let result = match tokio::time::timeout(deadline, call_next(pipeline, req)).await {
            Ok(r) => r,
            Err(_) => Err(ProxyError::new(
                crate::error::ErrorKind::UpstreamTimeout,
                "no answer within request_deadline",
            )),
        };
        let upstream = Labels::get(&labels.upstream, "none");
        let client = Labels::get(&labels.client, "unknown");
        let endpoint = Labels::get(&labels.endpoint, "none");
        let outcome = match &result {
            Ok(resp) if resp.extensions().get::<FromCache>().is_some() => Outcome::Cached,
            Ok(_) => Outcome::Forwarded,
            Err(e) if e.is_shed() => Outcome::Shed,
            Err(e) if e.is_upstream() => Outcome::Error,
            Err(_) => Outcome::Rejected,
        };
        self.metrics.request(&upstream, &client, &endpoint, outcome);
        match result {
            Ok(resp) => resp,
            Err(e) => {
                if let crate::error::ErrorKind::Shed { reason, .. } = e.kind() {
                    self.metrics.shed(&upstream, &client, reason.as_str());
                }
                tracing::debug!(%method, %upstream, %client, %endpoint, error = %e, "answered by pacer");
                e.into_response()
            }
        }
    }

    /// A JSON snapshot for `/status`: limit use, queue depths, pauses.
    pub fn status(&self) -> serde_json::Value {
        // Show the cuts and ceilings other replicas shared, as the next admission will.
        let (version, shared) = self.admission.shared_adaptive();
        self.adaptive.merge(version, &shared);
        let set = self.admission.limits();
        let usage: Vec<_> = self
            .admission
            .usage()
            .into_iter()
            .map(|(layer, used, inflight)| {
                let spec = &set.specs[layer.limit];
                serde_json::json!({
                    "limit": &*spec.name,
                    "key": layer.part.label(),
                    "used": used,
                    "quota": spec.requests,
                    "inflight": inflight,
                    "concurrency": spec.concurrency.map(|c| c[0]),
                })
            })
            .collect();
        let pauses: Vec<_> = self
            .admission
            .pauses()
            .into_iter()
            .map(|((u, caller), left)| {
                serde_json::json!({
                    "upstream": self.upstreams.get(u).map(|u| u.name.to_string()),
                    "client": &*caller,
                    "seconds": left.as_secs_f64(),
                })
            })
            .collect();
        let depth = self.admission.depth();
        serde_json::json!({
            "draining": self.is_draining(),
            "upstreams": self.upstreams.iter().map(|u| u.name.to_string()).collect::<Vec<_>>(),
            "queue": {"critical": depth[0], "normal": depth[1], "bulk": depth[2]},
            "limits": usage,
            "pauses": pauses,
            "limiter_keys": self.admission.keys(),
            "critical_reserve": self.reserve_status(),
            "adaptive_cuts": self
                .adaptive
                .reports()
                .into_iter()
                .map(|r| serde_json::json!({
                    "upstream": self.upstreams.get(r.key.0).map(|u| u.name.to_string()),
                    "client": &*r.key.1,
                    "factor": r.factor,
                    "cuts": r.cuts,
                    "seconds": r.hold_left.as_secs_f64(),
                    "allowed": r.allowed,
                    "client_share": r.client_share,
                }))
                .collect::<Vec<_>>(),
            "state": self.admission.backend_status(),
            "remembered_tokens": self.identity.remembered_tokens(),
        })
    }

    /// Which keys keep the critical reserve, and why (see [`crate::reserve`]).
    fn reserve_status(&self) -> serde_json::Value {
        use crate::config::Priority;
        let c = &self.config;
        let clients: Vec<&str> = c
            .clients
            .iter()
            .filter(|cl| cl.priority == Priority::Critical)
            .map(|cl| cl.name.as_deref().unwrap_or(&cl.id))
            .collect();
        let routes: Vec<&str> = c
            .routes
            .iter()
            .filter(|r| r.priority == Some(Priority::Critical))
            .map(|r| r.prefix.as_str())
            .collect();
        let (count, learned) = self.admission.learned_reserve(100);
        serde_json::json!({
            "share": c.queue.critical_reserve,
            "critical_clients": clients,
            "critical_routes": routes,
            "shared_keys_always": !clients.is_empty(),
            "learned_count": count,
            "learned": learned,
        })
    }

    /// A limiter key as a bounded label, naming clients as `pacer_requests_total` does.
    fn key_label(&self, part: &crate::limit::KeyPart) -> String {
        use crate::limit::KeyPart;
        let client = |id: &str| -> String { self.identity.label_of(id).to_string() };
        match part {
            KeyPart::Global => "global".into(),
            KeyPart::Client(c) => client(c),
            KeyPart::Endpoint(e) => e.to_string(),
            KeyPart::ClientEndpoint(c, e) => format!("{} {e}", client(c)),
        }
    }

    /// Prometheus text: recorded metrics plus gauges read from the limiter now.
    pub fn render_metrics(&self) -> String {
        let set = self.admission.limits();
        // Keys of unidentified callers are folded into one `unknown` sample (their maximum),
        // so the label set stays bounded.
        let mut utilization: std::collections::BTreeMap<(String, String), f64> = Default::default();
        for (layer, used, inflight) in self.admission.usage() {
            let spec = &set.specs[layer.limit];
            let mut ratio: f64 = 0.0;
            if let Some(q) = spec.requests {
                ratio = ratio.max(used as f64 / q.max(1) as f64);
            }
            if let Some(c) = spec.concurrency {
                ratio = ratio.max(inflight as f64 / c[0].max(1) as f64);
            }
            let key = self.key_label(&layer.part);
            let e = utilization
                .entry((spec.name.to_string(), key))
                .or_insert(0.0);
            *e = e.max(ratio);
        }
        // Pauses of callers that share a label are one sample (the longest).
        let mut paused: std::collections::BTreeMap<(String, String), f64> = Default::default();
        for ((u, caller), left) in self.admission.pauses() {
            let upstream = self
                .upstreams
                .get(u)
                .map_or_else(String::new, |u| u.name.to_string());
            let client = self.key_label(&crate::limit::KeyPart::Client(caller));
            let e = paused.entry((upstream, client)).or_insert(0.0);
            *e = e.max(left.as_secs_f64());
        }
        let depth = self.admission.depth_by_upstream();
        let gauges = [
            Gauge {
                name: "pacer_limit_utilization_ratio",
                help: "Share of a limit's quota (or concurrency) in use now, per key.",
                samples: utilization
                    .into_iter()
                    .map(|((limit, key), v)| (vec![("limit", limit), ("key", key)], v))
                    .collect(),
            },
            Gauge {
                name: "pacer_queue_depth",
                help: "Requests waiting for admission.",
                samples: self
                    .upstreams
                    .iter()
                    .enumerate()
                    .flat_map(|(i, u)| {
                        let d = depth.get(&i).copied().unwrap_or_default();
                        Priority::ALL.into_iter().map(move |p| {
                            (
                                vec![
                                    ("upstream", u.name.to_string()),
                                    ("priority", p.as_str().to_string()),
                                ],
                                d[p.index()] as f64,
                            )
                        })
                    })
                    .collect(),
            },
            Gauge {
                name: "pacer_adaptive_rate_factor",
                help:
                    "Share of its per-client rate ceiling a client may use after upstream 429s and reported budgets (1 = no cut).",
                samples: {
                    // Keys folded into one label (`unknown`) show the deepest cut.
                    let mut factors: std::collections::BTreeMap<(String, String), f64> =
                        Default::default();
                    for r in self.adaptive.reports() {
                        let upstream = self
                            .upstreams
                            .get(r.key.0)
                            .map_or_else(String::new, |u| u.name.to_string());
                        let client = self.key_label(&crate::limit::KeyPart::Client(r.key.1));
                        let e = factors.entry((upstream, client)).or_insert(1.0);
                        *e = e.min(r.client_share);
                    }
                    factors
                        .into_iter()
                        .map(|((upstream, client), v)| {
                            (vec![("upstream", upstream), ("client", client)], v)
                        })
                        .collect()
                },
            },
            Gauge {
                name: "pacer_state_backend_up",
                help: "1 while the counter store is reachable (always 1 for local state).",
                samples: vec![(
                    vec![("backend", self.admission.backend_status().kind.to_string())],
                    if self.admission.backend_status().up {
                        1.0
                    } else {
                        0.0
                    },
                )],
            },
            Gauge {
                name: "pacer_upstream_paused_seconds",
                help: "Seconds left of a pause the upstream asked for (429 + Retry-After).",
                samples: paused
                    .into_iter()
                    .map(|((upstream, client), v)| {
                        (vec![("upstream", upstream), ("client", client)], v)
                    })
                    .collect(),
            },
        ];
        self.metrics.render(&gauges)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn paused_seconds_labels_stay_bounded_for_any_number_of_callers() {
        let text = format!(
            "{}\n[[client]]\nid = \"ivr-id\"\nname = \"ivr\"\npriority = \"critical\"\n",
            crate::config::MINIMAL
        );
        let proxy = Proxy::new(Arc::new(Config::parse(&text).expect("config"))).expect("proxy");
        proxy.identity.client("oauth-client");
        let pause = |key: &str| {
            proxy
                .admission
                .pause((0, Arc::from(key)), Duration::from_secs(60))
        };
        // Header identities (raw values from the network) and hashed unknown tokens.
        for i in 0..50_000 {
            pause(&format!("header-value-{i}"));
            pause(&format!("token:{i:016x}"));
        }
        pause("ivr-id");
        pause("oauth-client");
        let text = proxy.render_metrics();
        let samples: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("pacer_upstream_paused_seconds{"))
            .collect();
        let clients: std::collections::BTreeSet<&str> = samples
            .iter()
            .filter_map(|l| l.split("client=\"").nth(1)?.split('"').next())
            .collect();
        assert_eq!(
            clients.into_iter().collect::<Vec<_>>(),
            ["ivr", "oauth-client", "other", "unknown"],
            "{samples:?}"
        );
        assert_eq!(samples.len(), 4, "one sample per label set: {samples:?}");
    }
}
