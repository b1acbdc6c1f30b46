//! The first stage: refuse forward-proxy use and oversized requests, normalize the path.

use crate::answer::ProxyBody;
use crate::config::ServerConfig;
use crate::error::{ErrorKind, ProxyError};
use crate::path;
use crate::proxy::{call_next, Next, Proxy, Stage, StageFuture};
use http::{Method, Request};
use http_body_util::{BodyExt, Limited};
use std::sync::Arc;

/// The normalized request target; inserted by [`Guard`].
#[derive(Debug, Clone)]
pub struct Target {
    /// Normalized path.
    pub path: String,
    pub query: Option<String>,
}

/// Refuses forward-proxy use and oversized requests, and normalizes the path.
pub struct Guard {
    proxy: Arc<Proxy>,
}

impl Guard {
    /// The guard of `proxy`.
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Guard { proxy }
    }

    fn check(&self, req: &Request<ProxyBody>, server: &ServerConfig) -> Result<Target, ProxyError> {
        use ErrorKind::*;
        if self.proxy.is_draining() {
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

impl Stage for Guard {
    fn call(self: Arc<Self>, req: Request<ProxyBody>, next: Next) -> StageFuture {
        let server = &self.proxy.config.server;
        let target = match self.check(&req, server) {
            Ok(t) => t,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        let max = usize::try_from(server.max_body_bytes).unwrap_or(usize::MAX);
        let mut req = req.map(|body| Limited::new(body, max).boxed_unsync());
        req.extensions_mut().insert(target);
        call_next(next, req)
    }
}
