//! The first phase: refuse forward-proxy use and oversized requests, normalize the path,
//! and take the caller's deadline (`x-pacer-max-wait`, see [`crate::deadline`]).

use crate::answer::ProxyBody;
use crate::config::ServerConfig;
use crate::deadline;
use crate::error::{ErrorKind, ProxyError};
use crate::path;
use crate::server::ConnInfo;
use http::{Method, Request};
use http_body_util::{BodyExt, Limited};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The normalized request target; inserted by [`Guard`].
#[derive(Debug, Clone)]
pub struct Target {
    /// Normalized path.
    pub path: String,
    pub query: Option<String>,
}

/// A request that passed the guard: its target normalized, its body bounded.
#[derive(Debug)]
pub struct Guarded {
    pub req: Request<ProxyBody>,
    pub target: Target,
    pub conn: ConnInfo,
}

/// Refuses forward-proxy use and oversized requests, and normalizes the path.
pub struct Guard {
    server: Arc<ServerConfig>,
    /// Set once shutdown has begun: new requests are answered 503.
    draining: Arc<AtomicBool>,
}

impl Guard {
    /// A guard enforcing `server`'s limits while `draining` is false.
    pub fn new(server: Arc<ServerConfig>, draining: Arc<AtomicBool>) -> Self {
        Guard { server, draining }
    }

    /// Checks a request as it arrives from `conn`.
    ///
    /// A malformed `x-pacer-max-wait` is 400; a valid one moves from the headers to the
    /// request's extensions as a [`deadline::CallerMaxWait`].
    pub fn check(
        &self,
        mut req: Request<ProxyBody>,
        conn: ConnInfo,
    ) -> Result<Guarded, ProxyError> {
        let target = self.target(&req)?;
        if let Some(wait) = deadline::take(req.headers_mut())? {
            req.extensions_mut().insert(wait);
        }
        let max = usize::try_from(self.server.max_body_bytes).unwrap_or(usize::MAX);
        let req = req.map(|body| Limited::new(body, max).boxed_unsync());
        Ok(Guarded { req, target, conn })
    }

    fn target(&self, req: &Request<ProxyBody>) -> Result<Target, ProxyError> {
        use ErrorKind::*;
        let server = &*self.server;
        if self.draining.load(Ordering::Relaxed) {
            return Err(ProxyError::new(Draining, "shutting down"));
        }
        if req.method() == Method::CONNECT {
            return Err(ProxyError::new(MethodNotAllowed, "CONNECT refused"));
        }
        // h2 always carries scheme and authority; in HTTP/1 they mean absolute-form.
        if req.version() < http::Version::HTTP_2
            && (req.uri().scheme().is_some() || req.uri().authority().is_some())
        {
            return Err(ProxyError::new(
                BadRequest(
                    "absolute-form request targets are not accepted: pacer is not a forward proxy",
                ),
                "absolute-form target",
            ));
        }
        if req.uri().path_and_query().map_or(0, |pq| pq.as_str().len()) > server.max_uri_bytes {
            return Err(ProxyError::new(UriTooLong, "request target too long"));
        }
        let headers = req.headers();
        let header_bytes: usize = headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum();
        if headers.len() > server.max_headers || header_bytes > server.max_header_bytes {
            return Err(ProxyError::new(
                HeadersTooLarge,
                format!("{} fields, {header_bytes} bytes", headers.len()),
            ));
        }
        let declared = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > server.max_body_bytes) {
            return Err(ProxyError::new(
                PayloadTooLarge,
                "content-length over max_body_bytes",
            ));
        }
        let path = path::normalize(req.uri().path())
            .map_err(|e| ProxyError::new(BadRequest("invalid request path"), e.to_string()))?;
        Ok(Target {
            path,
            query: req.uri().query().map(str::to_string),
        })
    }
}
