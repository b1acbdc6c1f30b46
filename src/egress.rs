//! Connections to an upstream: direct, or tunnelled through an egress proxy with `CONNECT`
//! (hyper-util's [`Tunnel`]). TLS to an `https` upstream runs inside the tunnel, so the
//! proxy sees only the upstream's host and port; a plain `http` upstream is tunnelled too.

use crate::answer::BoxError;
use crate::config::EgressProxy;
use http::Uri;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::net::TcpStream;

/// A TCP connector for one upstream's pool, with or without an egress proxy.
#[derive(Clone, Debug)]
pub enum Connector {
    /// Straight to the upstream.
    Direct(HttpConnector),
    /// Through the proxy: a `CONNECT host:port` on a connection to it.
    Tunnel(Tunnel<HttpConnector>),
}

impl Connector {
    /// Connects through `proxy` when there is one; `http` connects to the proxy (or the
    /// upstream) and carries the connect timeout.
    pub fn new(http: HttpConnector, proxy: Option<&EgressProxy>) -> Connector {
        match proxy {
            None => Connector::Direct(http),
            Some(p) => {
                let tunnel = Tunnel::new(p.uri.clone(), http);
                Connector::Tunnel(match &p.auth {
                    Some(auth) => tunnel.with_auth(auth.clone()),
                    None => tunnel,
                })
            }
        }
    }
}

type Connecting = Pin<Box<dyn Future<Output = Result<TokioIo<TcpStream>, BoxError>> + Send>>;

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            Connector::Direct(c) => c.poll_ready(cx).map_err(Into::into),
            Connector::Tunnel(t) => t.poll_ready(cx).map_err(Into::into),
        }
    }

    fn call(&mut self, dst: Uri) -> Connecting {
        match self {
            Connector::Direct(c) => {
                let connecting = c.call(dst);
                Box::pin(async move { connecting.await.map_err(Into::into) })
            }
            Connector::Tunnel(t) => {
                let connecting = t.call(with_port(dst));
                Box::pin(async move { connecting.await.map_err(Into::into) })
            }
        }
    }
}

/// `dst` with its scheme's default port written out: the tunnel asks for port 443 when
/// the URI has none, which is wrong for `http`.
fn with_port(dst: Uri) -> Uri {
    if dst.port().is_some() {
        return dst;
    }
    let port = if dst.scheme_str() == Some("http") {
        80
    } else {
        443
    };
    let Some(host) = dst.host() else { return dst };
    // An IPv6 host keeps its brackets here.
    let mut parts = dst.clone().into_parts();
    match format!("{host}:{port}").parse() {
        Ok(a) => {
            parts.authority = Some(a);
            Uri::from_parts(parts).unwrap_or(dst)
        }
        Err(_) => dst,
    }
}

#[cfg(test)]
mod tests {
    use super::with_port;

    #[test]
    fn tunnel_targets_carry_the_scheme_port() {
        let cases = [
            ("http://crm.example.com/", "crm.example.com:80"),
            ("https://api.mypurecloud.com/", "api.mypurecloud.com:443"),
            ("http://10.0.0.1:8080/", "10.0.0.1:8080"),
            ("https://[::1]/", "[::1]:443"),
        ];
        for (uri, authority) in cases {
            let out = with_port(uri.parse().unwrap());
            assert_eq!(out.authority().unwrap().as_str(), authority, "{uri}");
        }
    }
}
