//! Routing: the longest configured prefix picks the upstream; anything else is 404, so
//! pacer is never an open proxy.

use crate::answer::ProxyBody;
use crate::config::{Cidr, IdentitySource, Priority, RouteConfig, Secret};
use crate::error::{ErrorKind, ProxyError};
use crate::forward::client_ip;
use crate::guard::Target;
use crate::proxy::{call_next, ConnInfo, Labels, Next, Proxy, Stage, StageFuture};
use http::Request;
use std::sync::Arc;
use std::time::Duration;

/// A configured route, ready to use.
#[derive(Debug)]
pub struct Route {
    pub prefix: String,
    pub upstream: usize,
    pub strip_prefix: bool,
    pub priority: Option<Priority>,
    pub identity: Vec<IdentitySource>,
    /// Header and accepted keys; `Secret` keeps them out of any debug output.
    pub inbound_auth: Option<(http::HeaderName, Vec<Secret>)>,
    pub allow_cidrs: Vec<Cidr>,
    pub max_wait: Option<Duration>,
}

/// A request's route and the path to send upstream.
#[derive(Debug, Clone)]
pub struct RouteMatch {
    pub route: Arc<Route>,
    /// Normalized path after prefix stripping, always starting with `/`.
    pub path: String,
}

/// Routes ordered by prefix length, longest first.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    /// Builds the table; `upstream_index` resolves upstream names (validated before).
    pub fn new(configs: &[RouteConfig], upstream_index: impl Fn(&str) -> usize) -> Self {
        let mut routes: Vec<Arc<Route>> = configs
            .iter()
            .map(|c| {
                Arc::new(Route {
                    prefix: c.prefix.clone(),
                    upstream: upstream_index(&c.upstream),
                    strip_prefix: c.strip_prefix,
                    priority: c.priority,
                    identity: c.identity.clone(),
                    inbound_auth: c.inbound_auth.as_ref().and_then(|a| {
                        let name = http::HeaderName::from_bytes(a.header.as_bytes()).ok()?;
                        Some((name, a.keys.clone()))
                    }),
                    allow_cidrs: c.allow_cidrs.clone(),
                    max_wait: c.max_wait.map(|d| d.0),
                })
            })
            .collect();
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        RouteTable { routes }
    }

    /// The route for a normalized path, if any.
    pub fn find(&self, path: &str) -> Option<RouteMatch> {
        let route = self
            .routes
            .iter()
            .find(|r| matches_prefix(&r.prefix, path))?;
        let path = if route.strip_prefix {
            let rest = path.get(route.prefix.len()..).unwrap_or("");
            let rest = rest.trim_start_matches('/');
            format!("/{rest}")
        } else {
            path.to_string()
        };
        Some(RouteMatch {
            route: route.clone(),
            path,
        })
    }
}

/// `/ivr/` matches `/ivr/x` and `/ivr`; `/api` matches `/api/x` but not `/apix`.
fn matches_prefix(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    let bare = prefix.trim_end_matches('/');
    match path.strip_prefix(bare) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Picks the route; no route is 404.
pub struct RouteStage {
    proxy: Arc<Proxy>,
}

impl RouteStage {
    /// The routing stage of `proxy`.
    pub fn new(proxy: Arc<Proxy>) -> Self {
        RouteStage { proxy }
    }
}

impl Stage for RouteStage {
    fn call(self: Arc<Self>, mut req: Request<ProxyBody>, next: Next) -> StageFuture {
        let found = req
            .extensions()
            .get::<Target>()
            .and_then(|t| self.proxy.routes.find(&t.path));
        let Some(m) = found else {
            return Box::pin(async { Err(ProxyError::new(ErrorKind::NoRoute, "no route")) });
        };
        if let (Some(labels), Some(u)) = (
            req.extensions().get::<Arc<Labels>>(),
            self.proxy.upstreams.get(m.route.upstream),
        ) {
            let _ = labels.upstream.set(u.name.clone());
        }
        req.extensions_mut().insert(m);
        call_next(next, req)
    }
}

/// Route-level gates: `allow_cidrs` (403) and `inbound_auth` (401). The inbound key is
/// removed before forwarding: it is pacer's, not the upstream's.
pub struct Access {
    proxy: Arc<Proxy>,
}

impl Access {
    /// The access stage of `proxy`.
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Access { proxy }
    }

    fn check(&self, req: &mut Request<ProxyBody>) -> Result<(), ProxyError> {
        let Some(m) = req.extensions().get::<RouteMatch>() else {
            return Ok(());
        };
        let route = m.route.clone();
        if !route.allow_cidrs.is_empty() {
            let peer = req.extensions().get::<ConnInfo>().map(|c| c.peer.ip());
            let ip = peer
                .map(|p| client_ip(req.headers(), p, &self.proxy.config.server.trusted_proxies));
            if !ip.is_some_and(|ip| route.allow_cidrs.iter().any(|c| c.contains(ip))) {
                return Err(ProxyError::new(
                    ErrorKind::Forbidden,
                    "source address not allowed",
                ));
            }
        }
        if let Some((header, keys)) = &route.inbound_auth {
            let presented = req.headers().get(header).map(|v| v.as_bytes().to_vec());
            let ok = presented.is_some_and(|p| {
                keys.iter()
                    .any(|k| constant_time_eq(k.expose().as_bytes(), &p))
            });
            req.headers_mut().remove(header);
            if !ok {
                return Err(ProxyError::new(
                    ErrorKind::Unauthorized,
                    "inbound key missing or wrong",
                ));
            }
        }
        Ok(())
    }
}

/// Compares secrets without an early exit that would leak their prefix through timing
/// (`subtle`; only the length, which is no secret here, decides early).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

impl Stage for Access {
    fn call(self: Arc<Self>, mut req: Request<ProxyBody>, next: Next) -> StageFuture {
        match self.check(&mut req) {
            Ok(()) => call_next(next, req),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix: &str, upstream: &str, strip: bool) -> RouteConfig {
        toml::from_str(&format!(
            "prefix = {prefix:?}\nupstream = {upstream:?}\nstrip_prefix = {strip}"
        ))
        .unwrap()
    }

    #[test]
    fn longest_prefix_wins_and_strips() {
        let t = RouteTable::new(
            &[
                route("/", "api", false),
                route("/ivr/", "api2", true),
                route("/oauth/", "login", false),
            ],
            |n| match n {
                "api" => 0,
                "api2" => 1,
                _ => 2,
            },
        );
        let m = t.find("/ivr/api/v2/x").unwrap();
        assert_eq!((m.route.upstream, m.path.as_str()), (1, "/api/v2/x"));
        let m = t.find("/ivr").unwrap();
        assert_eq!((m.route.upstream, m.path.as_str()), (1, "/"));
        let m = t.find("/ivrx/a").unwrap();
        assert_eq!((m.route.upstream, m.path.as_str()), (0, "/ivrx/a"));
        let m = t.find("/oauth/token").unwrap();
        assert_eq!((m.route.upstream, m.path.as_str()), (2, "/oauth/token"));
        let only = RouteTable::new(&[route("/crm/", "crm", true)], |_| 0);
        assert!(only.find("/api/v2/users").is_none());
    }
}
