//! The identification phase: who is calling an allowed request, and its priority.

use super::*;

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
    app: App,
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

    /// The application behind the caller (see [`app`](super::app)).
    pub fn app(&self) -> &App {
        &self.app
    }

    /// The parts, for the admission phase.
    pub(crate) fn into_parts(self) -> (Routed, Caller, Priority, App) {
        (self.routed, self.caller, self.priority, self.app)
    }
}

/// The identification phase: the caller behind the token or the route's identity source,
/// and the request's priority.
pub struct Identify {
    identity: Arc<Identity>,
    trusted_proxies: Arc<[Cidr]>,
    apps: Arc<Apps>,
}

impl Identify {
    /// Identifies callers with `identity`, believing `X-Forwarded-For` from
    /// `trusted_proxies` only, and their applications among `apps`.
    pub fn new(identity: Arc<Identity>, trusted_proxies: Arc<[Cidr]>, apps: Arc<Apps>) -> Self {
        Identify {
            identity,
            trusted_proxies,
            apps,
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
            && route.credential.is_none()
            && r.req.method() == Method::POST
            && is_token_path(&r.route.path)
        {
            token_form_client(&mut r.req).await?
        } else {
            None
        };
        let caller = match (&route.credential, form_client) {
            // The caller's own token is neither looked up nor refused: pacer sends the
            // credential's, so the caller is the credential's client.
            (Some(credential), _) => {
                r.req.headers_mut().remove(header::AUTHORIZATION);
                identity.client(&credential.client_id)
            }
            (None, Some(id)) if basic_user(r.req.headers()).is_none() => identity.client(&id),
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
        let app = self
            .apps
            .resolve(r.req.headers(), r.route.route.app.as_deref());
        self.apps.strip(r.req.headers_mut());
        Ok(Identified {
            routed: r,
            caller,
            priority,
            app,
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
