//! Routing: the longest configured prefix picks the upstream; anything else is 404, so
//! pacer is never an open proxy.

use crate::answer::ProxyBody;
use crate::config::{Cidr, CredentialConfig, IdentitySource, Priority, RouteConfig, Secret};
use crate::error::{ErrorKind, ProxyError};
use crate::guard::{Guarded, Target};
use crate::server::{client_ip, ConnInfo};
use http::Request;
use std::sync::Arc;
use std::time::Duration;

/// A configured route, ready to use.
#[derive(Debug)]
pub struct Route {
    /// The configured prefix, also the route's metric label.
    pub prefix: Arc<str>,
    /// Index of the upstream in the configuration, resolved when the table is built.
    pub upstream: usize,
    /// The upstream's name, its metric label.
    pub upstream_name: Arc<str>,
    pub strip_prefix: bool,
    pub priority: Option<Priority>,
    pub identity: Vec<IdentitySource>,
    /// Header and accepted keys; `Secret` keeps them out of any debug output.
    pub inbound_auth: Option<(http::HeaderName, Vec<Secret>)>,
    pub allow_cidrs: Vec<Cidr>,
    pub max_wait: Option<Duration>,
    /// `app`: the application of requests that name none in the app header.
    pub app: Option<Arc<str>>,
    /// `credential = "NAME"`: pacer's own token goes upstream in place of the caller's.
    pub credential: Option<RouteCredential>,
}

/// The `[[credential]]` a route sends requests with.
#[derive(Debug, Clone)]
pub struct RouteCredential {
    /// Its name, for [`crate::credential::Credentials`].
    pub name: Arc<str>,
    /// Its OAuth client id: the caller of every request on the route.
    pub client_id: Arc<str>,
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

/// A route that names an upstream or header pacer does not have; `check-config` refuses
/// both, so this is only reachable by building a table from unvalidated configuration.
#[derive(Debug, thiserror::Error)]
pub enum RouteSetupError {
    #[error("route {prefix}: no upstream named {upstream:?}")]
    UnknownUpstream { prefix: String, upstream: String },
    #[error("route {prefix}: inbound_auth.header {header:?} is not a header name")]
    BadHeader { prefix: String, header: String },
    #[error("route {prefix}: no [[credential]] named {credential:?}")]
    UnknownCredential { prefix: String, credential: String },
}

impl RouteTable {
    /// Builds the table; `upstream` resolves an upstream name to its index and name, and
    /// routes' `credential` names are looked up in `credentials`. Every name and header is
    /// resolved here, once: a route that cannot be resolved is an error, never a silent
    /// fallback to another upstream, to no inbound key or to the caller's own token.
    pub fn new(
        configs: &[RouteConfig],
        upstream: impl Fn(&str) -> Option<(usize, Arc<str>)>,
        credentials: &[CredentialConfig],
    ) -> Result<Self, RouteSetupError> {
        let mut routes = Vec::with_capacity(configs.len());
        for c in configs {
            let (index, name) =
                upstream(&c.upstream).ok_or_else(|| RouteSetupError::UnknownUpstream {
                    prefix: c.prefix.clone(),
                    upstream: c.upstream.clone(),
                })?;
            let inbound_auth = match &c.inbound_auth {
                None => None,
                Some(a) => {
                    let header =
                        http::HeaderName::from_bytes(a.header.as_bytes()).map_err(|_| {
                            RouteSetupError::BadHeader {
                                prefix: c.prefix.clone(),
                                header: a.header.clone(),
                            }
                        })?;
                    Some((header, a.keys.clone()))
                }
            };
            let credential = match &c.credential {
                None => None,
                Some(name) => {
                    let found = credentials
                        .iter()
                        .find(|k| k.name == *name)
                        .ok_or_else(|| RouteSetupError::UnknownCredential {
                            prefix: c.prefix.clone(),
                            credential: name.clone(),
                        })?;
                    Some(RouteCredential {
                        name: Arc::from(name.as_str()),
                        client_id: Arc::from(found.client_id.as_str()),
                    })
                }
            };
            routes.push(Arc::new(Route {
                prefix: Arc::from(c.prefix.as_str()),
                upstream: index,
                upstream_name: name,
                strip_prefix: c.strip_prefix,
                priority: c.priority,
                identity: c.identity.clone(),
                inbound_auth,
                allow_cidrs: c.allow_cidrs.clone(),
                max_wait: c.max_wait.map(|d| d.0),
                credential,
                app: c.app.as_deref().map(Arc::from),
            }));
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Ok(RouteTable { routes })
    }

    /// Picks the route of a guarded request; no route is 404.
    pub fn route(&self, g: Guarded) -> Result<Routed, ProxyError> {
        let Some(m) = self.find(&g.target.path) else {
            return Err(ProxyError::new(ErrorKind::NoRoute, "no route"));
        };
        Ok(Routed {
            req: g.req,
            target: g.target,
            conn: g.conn,
            route: m,
        })
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

/// A request with its route.
#[derive(Debug)]
pub struct Routed {
    pub req: Request<ProxyBody>,
    pub target: Target,
    pub conn: ConnInfo,
    pub route: RouteMatch,
}

/// A routed request that passed its route's gates; only [`Access::check`] makes one.
#[derive(Debug)]
pub struct Allowed(Routed);

impl Allowed {
    /// The request and its route.
    pub fn routed(&self) -> &Routed {
        &self.0
    }

    /// The request, to be read or re-framed by later phases.
    pub fn request_mut(&mut self) -> &mut Request<ProxyBody> {
        &mut self.0.req
    }

    /// The routed request, for the identity phase.
    pub(crate) fn into_routed(self) -> Routed {
        self.0
    }
}

/// Route-level gates: `allow_cidrs` (403) and `inbound_auth` (401). The inbound key is
/// removed before forwarding: it is pacer's, not the upstream's.
pub struct Access {
    trusted_proxies: Arc<[Cidr]>,
}

impl Access {
    /// Gates that believe `X-Forwarded-For` from `trusted_proxies` only.
    pub fn new(trusted_proxies: Arc<[Cidr]>) -> Self {
        Access { trusted_proxies }
    }

    /// Lets a request through its route's gates, or refuses it.
    pub fn check(&self, mut r: Routed) -> Result<Allowed, ProxyError> {
        let route = &r.route.route;
        if !route.allow_cidrs.is_empty() {
            let ip = client_ip(r.req.headers(), r.conn.peer.ip(), &self.trusted_proxies);
            if !route.allow_cidrs.iter().any(|c| c.contains(ip)) {
                return Err(ProxyError::new(
                    ErrorKind::Forbidden,
                    "source address not allowed",
                ));
            }
        }
        if let Some((header, keys)) = &route.inbound_auth {
            let ok = r.req.headers().get(header).is_some_and(|p| {
                keys.iter()
                    .any(|k| constant_time_eq(k.expose().as_bytes(), p.as_bytes()))
            });
            r.req.headers_mut().remove(header);
            if !ok {
                return Err(ProxyError::new(
                    ErrorKind::Unauthorized,
                    "inbound key missing or wrong",
                ));
            }
        }
        Ok(Allowed(r))
    }
}

/// Compares secrets without an early exit that would leak their prefix through timing
/// (`subtle`; only the length, which is no secret here, decides early).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
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
            |n| {
                let i = match n {
                    "api" => 0,
                    "api2" => 1,
                    _ => 2,
                };
                Some((i, Arc::from(n)))
            },
            &[],
        )
        .unwrap();
        let m = t.find("/ivr/api/v2/x").unwrap();
        assert_eq!((m.route.upstream, m.path.as_str()), (1, "/api/v2/x"));
        let m = t.find("/ivr").unwrap();
        assert_eq!((m.route.upstream, m.path.as_str()), (1, "/"));
        let m = t.find("/ivrx/a").unwrap();
        assert_eq!((m.route.upstream, m.path.as_str()), (0, "/ivrx/a"));
        let m = t.find("/oauth/token").unwrap();
        assert_eq!((m.route.upstream, m.path.as_str()), (2, "/oauth/token"));
        let only = RouteTable::new(
            &[route("/crm/", "crm", true)],
            |n| Some((0, Arc::from(n))),
            &[],
        )
        .unwrap();
        assert!(only.find("/api/v2/users").is_none());
        // A name that does not resolve is an error, not the first upstream.
        let err = RouteTable::new(&[route("/crm/", "crm", true)], |_| None, &[]).unwrap_err();
        assert!(err.to_string().contains("crm"), "{err}");
    }
}
