//! Forwarding to an upstream: one pooled hyper-util client per upstream (rustls, ALPN
//! h2/http1.1), streaming bodies both ways, hop-by-hop hygiene, timeouts mapped to answers.

use crate::admit::{Admitted, Answering};
use crate::answer::{BoxError, ProxyBody};
use crate::config::{Cidr, UpstreamConfig};
use crate::credential::CredentialForward;
use crate::egress::Connector;
use crate::error::{ErrorKind, ProxyError};
use crate::identity::TokenResolver;
use crate::metrics::Metrics;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// An upstream that failed to set up (bad CA file).
#[derive(Debug, thiserror::Error)]
#[error("upstream {name}: {reason}")]
pub struct UpstreamSetupError {
    name: String,
    reason: String,
}

/// A configured upstream and its connection pool.
#[derive(Debug)]
pub struct Upstream {
    pub name: Arc<str>,
    scheme: Scheme,
    authority: Authority,
    base_path: String,
    timeout: Duration,
    /// One connection pool per serving thread ([`crate::server::worker`]), so that a
    /// connection's task runs on the thread whose requests use it.
    clients: Vec<Client<HttpsConnector<Connector>, ProxyBody>>,
    /// Retries of failed connections, shared by all requests to this upstream.
    retry_budget: governor::DefaultDirectRateLimiter,
}

/// Attempts after the first for a request whose connection could not be made.
const CONNECT_RETRIES: u32 = 2;
/// Pause before the first retry; doubled for the next.
const RETRY_BACKOFF: Duration = Duration::from_millis(50);
/// Connection retries per second per upstream at most, so an upstream that is down is not
/// hammered by retries on top of the traffic.
const RETRY_BUDGET_PER_SECOND: u32 = 10;

impl Upstream {
    /// Builds the upstream's clients from validated configuration: one pool for each of
    /// `workers` serving threads.
    pub fn new(cfg: &UpstreamConfig, workers: usize) -> Result<Upstream, UpstreamSetupError> {
        let fail = |reason: String| UpstreamSetupError {
            name: cfg.name.clone(),
            reason,
        };
        let uri: Uri = cfg.url.parse().map_err(|e| fail(format!("url: {e}")))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| fail("url has no scheme".into()))?;
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| fail("url has no host".into()))?;
        let base_path = uri.path().trim_end_matches('/').to_string();

        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &cfg.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| fail(format!("ca_file {}: {e}", path.display())))?;
            let mut added = 0;
            use rustls::pki_types::{pem::PemObject, CertificateDer};
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| fail(format!("ca_file {}: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| fail(format!("ca_file {}: {e}", path.display())))?;
                added += 1;
            }
            if added == 0 {
                return Err(fail(format!(
                    "ca_file {}: no certificate found",
                    path.display()
                )));
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(format!("tls: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout.0));
        if let Some(p) = &cfg.egress {
            // The URI carries no credentials: they are in `auth`, never printed.
            tracing::info!(upstream = %cfg.name, proxy = %p.uri, from = p.source, "egress through a CONNECT proxy");
        }
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(Connector::new(http, cfg.egress.as_ref()));
        let clients = (0..workers.max(1))
            .map(|_| {
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(cfg.pool_idle_timeout.0)
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .build(https.clone())
            })
            .collect();
        Ok(Upstream {
            name: Arc::from(cfg.name.as_str()),
            scheme,
            authority,
            base_path,
            timeout: cfg.timeout.0,
            clients,
            retry_budget: governor::RateLimiter::direct(governor::Quota::per_second(
                std::num::NonZeroU32::new(RETRY_BUDGET_PER_SECOND)
                    .unwrap_or(std::num::NonZeroU32::MIN),
            )),
        })
    }

    /// Time this upstream has to send a response head (`[[upstream]] timeout`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends a prepared request to `path` (+ `query`) on this upstream and waits for the
    /// response head within the upstream's timeout.
    pub async fn send(
        &self,
        mut req: Request<ProxyBody>,
        path: &str,
        query: Option<&str>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let mut pq = String::with_capacity(self.base_path.len() + path.len() + 16);
        pq.push_str(&self.base_path);
        pq.push_str(path);
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        let uri = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|e| {
                ProxyError::new(
                    ErrorKind::BadRequest("invalid request target"),
                    e.to_string(),
                )
            })?;
        *req.uri_mut() = uri;
        // The pooled client chooses the version by ALPN.
        *req.version_mut() = http::Version::HTTP_11;
        req.headers_mut().remove(header::HOST);

        // Only a request that certainly never reached the upstream (its connection could
        // not be made), is idempotent and has no body can be sent again.
        let replay = is_idempotent(req.method()) && req.body().size_hint().exact() == Some(0);
        let template = replay.then(|| {
            (
                req.method().clone(),
                req.uri().clone(),
                req.headers().clone(),
            )
        });
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut attempt = 0;
        let mut next = Some(req);
        let resp = loop {
            let Some(req) = next.take() else {
                return Err(ProxyError::new(
                    ErrorKind::UpstreamUnreachable,
                    "no request to send",
                ));
            };
            let client = &self.clients[crate::server::worker() % self.clients.len()];
            match tokio::time::timeout_at(deadline, client.request(req)).await {
                Err(_) => {
                    return Err(ProxyError::new(
                        ErrorKind::UpstreamTimeout,
                        format!("{}: no response within {:?}", self.name, self.timeout),
                    ))
                }
                Ok(Ok(resp)) => break resp,
                Ok(Err(e)) => {
                    let backoff = RETRY_BACKOFF * 2u32.pow(attempt);
                    let may_retry = e.is_connect()
                        && attempt < CONNECT_RETRIES
                        && tokio::time::Instant::now() + backoff < deadline
                        && self.retry_budget.check().is_ok();
                    match (&template, may_retry) {
                        (Some((method, uri, headers)), true) => {
                            tracing::debug!(upstream = %self.name, attempt, "connect failed; retrying");
                            tokio::time::sleep(backoff).await;
                            attempt += 1;
                            let mut again = Request::new(crate::answer::full(bytes::Bytes::new()));
                            *again.method_mut() = method.clone();
                            *again.uri_mut() = uri.clone();
                            *again.headers_mut() = headers.clone();
                            next = Some(again);
                        }
                        _ => return Err(classify_client_error(&self.name, e)),
                    }
                }
            }
        };
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, boxed(body)))
    }
}

fn is_idempotent(m: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
        Method::TRACE,
    ]
    .contains(m)
}

/// Wraps hyper's body as a [`ProxyBody`].
pub fn boxed(body: Incoming) -> ProxyBody {
    body.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync()
}

fn classify_client_error(upstream: &str, e: hyper_util::client::legacy::Error) -> ProxyError {
    // The client's body failed: the upstream request was aborted mid-body and its
    // connection closed, so it never sees a cut-short body as complete.
    crate::buffer::client_body_error(&e).unwrap_or_else(|| {
        ProxyError::new(
            ErrorKind::UpstreamUnreachable,
            format!("{upstream}: {}", error_chain(&e)),
        )
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Header fields that describe one connection and must not be forwarded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Removes hop-by-hop fields, including those named in `Connection`. `TE: trailers` is the
/// one value allowed through. A `Content-Length` next to `Transfer-Encoding` describes a
/// framing this hop did not use (RFC 9112 §6.3), so it goes too: the next hop is framed
/// from the body itself.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Prepares request headers for the upstream: hop-by-hop removed first (so `Connection`
/// cannot name pacer's own fields), then forwarding fields set. A client's own
/// `X-Forwarded-For`/`Forwarded`/`X-Real-IP` is kept only when the peer is trusted.
pub fn prepare_request_headers(headers: &mut HeaderMap, peer: IpAddr, tls: bool, trusted: &[Cidr]) {
    strip_hop_by_hop(headers);
    let peer_trusted = trusted.iter().any(|c| c.contains(peer));
    let mut xff = String::new();
    if peer_trusted {
        for v in headers.get_all(&X_FORWARDED_FOR).iter() {
            if let Ok(s) = v.to_str() {
                if !xff.is_empty() {
                    xff.push_str(", ");
                }
                xff.push_str(s);
            }
        }
    } else {
        headers.remove(header::FORWARDED);
        headers.remove(&X_REAL_IP);
    }
    headers.remove(&X_FORWARDED_FOR);
    if !xff.is_empty() {
        xff.push_str(", ");
    }
    xff.push_str(&peer.to_string());
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    if !(peer_trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(
            X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(if tls { "https" } else { "http" }),
        );
    }
}

/// The forwarding phase: an admitted request goes to its upstream.
#[derive(Clone)]
pub struct Forward {
    upstreams: Vec<Arc<Upstream>>,
    trusted_proxies: Arc<[Cidr]>,
    metrics: Arc<Metrics>,
    /// Credential routes' requests go with pacer's own token.
    credentials: Option<CredentialForward>,
}

impl Forward {
    /// Forwards to `upstreams` (indexed as in the configuration), believing
    /// `X-Forwarded-For` from `trusted_proxies` only.
    pub fn new(
        upstreams: Vec<Arc<Upstream>>,
        trusted_proxies: Arc<[Cidr]>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Forward {
            upstreams,
            trusted_proxies,
            metrics,
            credentials: None,
        }
    }

    /// Sends credential routes' requests with `credentials`' tokens.
    pub fn with_credentials(mut self, credentials: CredentialForward) -> Self {
        self.credentials = Some(credentials);
        self
    }

    /// Sends an admitted request upstream and waits for the response head; what the
    /// request keeps while its answer comes back is handed back beside the answer.
    pub async fn send(
        &self,
        admitted: Admitted,
    ) -> (Result<Response<ProxyBody>, ProxyError>, Answering) {
        let (mut req, query, conn, answering) = admitted.into_parts();
        let route = &answering.route;
        // Route indices are resolved against these same upstreams when the pipeline is
        // built; a miss would be a bug, answered as such rather than sent elsewhere.
        let Some(upstream) = self.upstreams.get(route.route.upstream) else {
            let e = ProxyError::new(ErrorKind::NoRoute, "route names a missing upstream");
            return (Err(e), answering);
        };
        prepare_request_headers(
            req.headers_mut(),
            conn.peer.ip(),
            conn.tls,
            &self.trusted_proxies,
        );
        let started = tokio::time::Instant::now();
        let result = match (&route.route.credential, &self.credentials) {
            (None, _) => upstream.send(req, &route.path, query.as_deref()).await,
            (Some(c), Some(credentials)) => {
                let index = route.route.upstream;
                credentials
                    .send(upstream, index, c, req, &route.path, query.as_deref())
                    .await
            }
            // Never the caller's own token instead: the route was built with a credential.
            (Some(_), None) => Err(ProxyError::new(
                ErrorKind::CredentialUnavailable,
                "credential route without credentials",
            )),
        };
        self.metrics
            .upstream_duration(&upstream.name, started.elapsed().as_secs_f64());
        (result, answering)
    }
}

/// Resolves unseen tokens with `GET /api/v2/tokens/me` on the route's upstream.
pub struct UpstreamResolver {
    upstreams: arc_swap::ArcSwap<Vec<Arc<Upstream>>>,
}

impl UpstreamResolver {
    /// A resolver over the configured upstreams.
    pub fn new(upstreams: Vec<Arc<Upstream>>) -> Self {
        UpstreamResolver {
            upstreams: arc_swap::ArcSwap::from_pointee(upstreams),
        }
    }

    /// Uses the upstreams of a reloaded configuration from now on.
    pub fn replace(&self, upstreams: Vec<Arc<Upstream>>) {
        self.upstreams.store(Arc::new(upstreams));
    }
}

/// Largest `tokens/me` answer read.
const MAX_TOKENS_ME_BYTES: usize = 64 * 1024;

impl TokenResolver for UpstreamResolver {
    fn resolve(
        &self,
        upstream: usize,
        token: String,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<String>> + Send>> {
        let upstream = self.upstreams.load().get(upstream).cloned();
        Box::pin(async move {
            let upstream = upstream?;
            let auth = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
            let mut req = Request::new(crate::answer::full(bytes::Bytes::new()));
            req.headers_mut().insert(header::AUTHORIZATION, auth);
            req.headers_mut()
                .insert(header::ACCEPT, HeaderValue::from_static("application/json"));
            let resp = upstream.send(req, "/api/v2/tokens/me", None).await.ok()?;
            if !resp.status().is_success() {
                return None;
            }
            let body = crate::answer::collect_limited(resp.into_body(), MAX_TOKENS_ME_BYTES)
                .await
                .ok()?;
            let me: serde_json::Value = serde_json::from_slice(&body).ok()?;
            me.get("OAuthClient")?
                .get("id")?
                .as_str()
                .map(str::to_string)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_cannot_remove_forwarding_fields() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("x-forwarded-for, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert("x-real-ip", HeaderValue::from_static("6.6.6.6"));
        prepare_request_headers(&mut h, "10.1.2.3".parse().unwrap(), false, &[]);
        assert!(!h.contains_key("x-secret"));
        assert!(!h.contains_key("keep-alive"));
        assert!(!h.contains_key("x-real-ip"));
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    #[test]
    fn trusted_proxy_chain_is_appended() {
        let trusted = [Cidr("10.0.0.0/8".parse().unwrap())];
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("1.2.3.4, 10.9.9.9"),
        );
        let ip = crate::server::client_ip(&h, "10.1.2.3".parse().unwrap(), &trusted);
        assert_eq!(ip, "1.2.3.4".parse::<IpAddr>().unwrap());
        prepare_request_headers(&mut h, "10.1.2.3".parse().unwrap(), true, &trusted);
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.9.9.9, 10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "https");
        let spoofed = crate::server::client_ip(&h, "8.8.8.8".parse().unwrap(), &trusted);
        assert_eq!(spoofed, "8.8.8.8".parse::<IpAddr>().unwrap());
    }
}
