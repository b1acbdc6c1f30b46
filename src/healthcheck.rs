//! `pacer healthcheck`: asks a running pacer's admin listener whether it is ready
//! (`GET /readyz` answers 200), with a deadline, so a container image without curl can
//! have a `HEALTHCHECK`.

use crate::answer::collect_limited;
use crate::config::Config;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// The admin address when neither `--admin` nor a configuration says otherwise: the
/// default of `[server] admin_listen`.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9090";

/// Body bytes of `/readyz` kept for the report.
const MAX_BODY: usize = 4096;

/// Why pacer is not healthy, or could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("{addr}: cannot connect: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("{addr}: no answer from /readyz within {after:?}")]
    Timeout { addr: String, after: Duration },
    #[error("{addr}: /readyz: {source}")]
    Http { addr: String, source: hyper::Error },
    #[error("{addr}: /readyz answered {status}: {body}")]
    NotReady {
        addr: String,
        status: StatusCode,
        body: String,
    },
    #[error("{0}: no admin listener configured ([server] admin_listen)")]
    NoAdmin(String),
    #[error("{path}: {errors}")]
    Config { path: String, errors: String },
}

/// The admin address to ask: `admin` if given, else the configuration's `admin_listen`
/// (an unspecified address is asked on loopback), else [`DEFAULT_ADMIN`].
pub fn admin_address(
    admin: Option<String>,
    config: Option<&std::path::Path>,
) -> Result<String, HealthError> {
    if let Some(admin) = admin {
        return Ok(admin);
    }
    let Some(path) = config else {
        return Ok(DEFAULT_ADMIN.to_string());
    };
    let config = Config::load(path).map_err(|errors| HealthError::Config {
        path: path.display().to_string(),
        errors: errors
            .0
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; "),
    })?;
    let addr = config
        .server
        .admin_listen
        .ok_or_else(|| HealthError::NoAdmin(path.display().to_string()))?;
    Ok(loopback_if_unspecified(addr).to_string())
}

/// `0.0.0.0:P` → `127.0.0.1:P`, `[::]:P` → `[::1]:P`; other addresses as they are.
fn loopback_if_unspecified(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    addr
}

/// Asks `addr` (`host:port`) for `/readyz` within `timeout`; `Ok` with the answer's body
/// when it is 200.
pub async fn check(addr: &str, timeout: Duration) -> Result<String, HealthError> {
    match tokio::time::timeout(timeout, ask(addr)).await {
        Ok(r) => r,
        Err(_) => Err(HealthError::Timeout {
            addr: addr.to_string(),
            after: timeout,
        }),
    }
}

async fn ask(addr: &str) -> Result<String, HealthError> {
    let http = |source| HealthError::Http {
        addr: addr.to_string(),
        source,
    };
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| HealthError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::get("/readyz")
        .header(http::header::HOST, addr)
        .body(Empty::<Bytes>::new())
        .map_err(|e| HealthError::Connect {
            addr: addr.to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        })?;
    let resp = sender.send_request(req).await.map_err(http)?;
    let status = resp.status();
    let body = collect_limited(
        resp.into_body().map_err(Into::into).boxed_unsync(),
        MAX_BODY,
    )
    .await
    .map(|b| String::from_utf8_lossy(&b).trim().to_string())
    .unwrap_or_default();
    if status == StatusCode::OK {
        Ok(body)
    } else {
        Err(HealthError::NotReady {
            addr: addr.to_string(),
            status,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unspecified_admin_address_is_asked_on_loopback() {
        let v4: SocketAddr = "0.0.0.0:9090".parse().unwrap();
        let v6: SocketAddr = "[::]:9091".parse().unwrap();
        let set: SocketAddr = "10.1.2.3:9092".parse().unwrap();
        assert_eq!(loopback_if_unspecified(v4).to_string(), "127.0.0.1:9090");
        assert_eq!(loopback_if_unspecified(v6).to_string(), "[::1]:9091");
        assert_eq!(loopback_if_unspecified(set), set);
        assert_eq!(
            admin_address(Some("x:1".into()), None).unwrap(),
            "x:1".to_string()
        );
        assert_eq!(admin_address(None, None).unwrap(), DEFAULT_ADMIN);
    }
}
