//! Listeners: accept TCP (optionally TLS), serve HTTP/1.1 and HTTP/2 on one port with
//! explicit limits, and shut down gracefully.

use crate::answer::{BoxError, ProxyBody};
use crate::config::{Cidr, ServerConfig};
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::collections::BTreeSet;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;

/// Where a request came from; handed to the request handler by the listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// The address the request really came from: the peer, or for a trusted proxy the
/// right-most untrusted address of its `X-Forwarded-For`.
pub fn client_ip(headers: &http::HeaderMap, peer: IpAddr, trusted: &[Cidr]) -> IpAddr {
    if !trusted.iter().any(|c| c.contains(peer)) {
        return peer;
    }
    let chain: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    chain
        .into_iter()
        .rev()
        .find(|ip| !trusted.iter().any(|c| c.contains(*ip)))
        .unwrap_or(peer)
}

/// Header fields hyper parses at most: room above pacer's own `max_headers` so that pacer
/// answers an over-full head with its JSON 431, but never below hyper's inline 100 — above
/// that, hyper builds a heap buffer for every request (≈ 10% of pacer's CPU per request in
/// `bench/compare.sh`). With the default `max_headers` (64) the buffer stays inline; a head
/// of more than 100 fields is refused by hyper itself (431, connection closed).
fn hyper_max_headers(max_headers: usize) -> usize {
    const HYPER_INLINE: usize = 100;
    if max_headers < HYPER_INLINE {
        HYPER_INLINE
    } else {
        max_headers.saturating_mul(2).saturating_add(8)
    }
}

/// Per-connection protocol settings.
#[derive(Clone)]
pub struct ConnSettings {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub h2_max_concurrent_streams: u32,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
    pub tls: Option<TlsAcceptor>,
    pub max_uri_bytes: usize,
    pub body_idle_timeout: Duration,
    pub request_deadline: Duration,
    pub max_connection_age: Duration,
    pub h2_keep_alive_interval: Duration,
    pub h2_keep_alive_timeout: Duration,
    pub h2_max_pending_accept_reset_streams: usize,
}

impl ConnSettings {
    /// Settings of the proxy listener.
    pub fn from_server(cfg: &ServerConfig) -> io::Result<ConnSettings> {
        let tls = match &cfg.tls {
            Some(t) => Some(tls_acceptor(&t.cert, &t.key)?),
            None => None,
        };
        Ok(ConnSettings {
            header_read_timeout: cfg.header_read_timeout.0,
            max_header_bytes: cfg.max_header_bytes,
            max_headers: cfg.max_headers,
            h2_max_concurrent_streams: cfg.http2_max_concurrent_streams,
            max_connections: cfg.max_connections,
            shutdown_grace: cfg.shutdown_grace.0,
            tls,
            max_uri_bytes: cfg.max_uri_bytes,
            body_idle_timeout: cfg.body_idle_timeout.0,
            request_deadline: cfg.request_deadline.0,
            max_connection_age: cfg.max_connection_age.0,
            h2_keep_alive_interval: cfg.http2_keep_alive_interval.0,
            h2_keep_alive_timeout: cfg.http2_keep_alive_timeout.0,
            h2_max_pending_accept_reset_streams: cfg.http2_max_pending_accept_reset_streams,
        })
    }

    /// Plain settings for the admin listener.
    pub fn admin() -> ConnSettings {
        ConnSettings {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            h2_max_concurrent_streams: 16,
            max_connections: 256,
            shutdown_grace: Duration::from_secs(1),
            tls: None,
            max_uri_bytes: 8 * 1024,
            body_idle_timeout: Duration::from_secs(10),
            request_deadline: Duration::from_secs(60),
            max_connection_age: Duration::from_secs(10 * 60),
            h2_keep_alive_interval: Duration::from_secs(30),
            h2_keep_alive_timeout: Duration::from_secs(20),
            h2_max_pending_accept_reset_streams: 50,
        }
    }

    fn builder(&self) -> auto::Builder<TokioExecutor> {
        let mut b = auto::Builder::new(TokioExecutor::new());
        // Without a timer, header_read_timeout silently does nothing.
        b.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            // Room above pacer's own limits, which answer with a JSON 431 or 414 first.
            .max_buf_size(
                (self.max_header_bytes * 2).max(16 * 1024) + self.max_uri_bytes + 8 * 1024,
            )
            .max_headers(hyper_max_headers(self.max_headers));
        b.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.h2_max_concurrent_streams)
            .max_header_list_size(
                u32::try_from(self.max_header_bytes * 2 + self.max_uri_bytes).unwrap_or(u32::MAX),
            )
            .max_pending_accept_reset_streams(self.h2_max_pending_accept_reset_streams)
            .max_local_error_reset_streams(256)
            .keep_alive_interval(self.h2_keep_alive_interval)
            .keep_alive_timeout(self.h2_keep_alive_timeout);
        b
    }

    fn body_limits(&self) -> BodyLimits {
        BodyLimits {
            idle: self.body_idle_timeout,
            deadline: self.request_deadline,
        }
    }
}

/// Loads a PEM certificate chain and key into a TLS acceptor offering h2 and http/1.1.
pub fn tls_acceptor(cert: &Path, key: &Path) -> io::Result<TlsAcceptor> {
    use rustls::pki_types::pem::{self, PemObject};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let invalid = |what: &Path, e: pem::Error| match e {
        pem::Error::Io(e) => e,
        pem::Error::NoItemsFound => io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: no PEM item found", what.display()),
        ),
        e => io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", what.display()),
        ),
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| invalid(cert, e))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| invalid(key, e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(io::Error::other)?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(io::Error::other)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Resolves once `rx` has turned true (or its sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}

/// Accepts connections until `shutdown` turns true, then lets open connections finish
/// for at most `shutdown_grace` and closes what is left.
pub async fn serve<H, F>(
    listener: TcpListener,
    settings: ConnSettings,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
) where
    H: Fn(Request<ProxyBody>, ConnInfo) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let builder = settings.builder();
    let settings = Arc::new(settings);
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    // Turned true when the grace period is over: remaining connections are dropped.
    let (force, forced) = watch::channel(false);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = stopped(&mut shutdown) => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let builder = builder.clone();
        let settings = settings.clone();
        let (shutdown, forced) = (shutdown.clone(), forced.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let info = ConnInfo {
                peer,
                tls: settings.tls.is_some(),
            };
            // Under TLS, so that a peer that stops reading is caught below the TLS buffers.
            let stream = StallGuard::new(stream, settings.body_idle_timeout);
            let conn = ConnCtx {
                builder: &builder,
                settings: &settings,
                shutdown,
                forced,
            };
            let result = match settings.tls.clone() {
                None => conn.run(stream, handler, info).await,
                Some(acceptor) => {
                    let handshake = acceptor.accept(stream);
                    let stream =
                        match tokio::time::timeout(settings.header_read_timeout, handshake).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake timed out");
                                return;
                            }
                        };
                    conn.run(stream, handler, info).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with error");
            }
        });
    }
    drop(listener);
    // Every open connection holds a slot: all slots back means all connections are done.
    let all = u32::try_from(settings.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(settings.shutdown_grace, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period over; closing remaining connections");
        let _ = force.send(true);
    }
}

/// How long past its deadline an exchange may still hold its connection; within it, a
/// body that is still polled ends with an error on its own (h2: only that stream is reset).
const OVERDUE_GRACE: Duration = Duration::from_secs(1);

/// What one connection's task needs besides its socket.
struct ConnCtx<'a> {
    builder: &'a auto::Builder<TokioExecutor>,
    settings: &'a ConnSettings,
    shutdown: watch::Receiver<bool>,
    forced: watch::Receiver<bool>,
}

/// Shared between a connection's task and its requests.
#[derive(Default)]
struct ConnState {
    /// A request head has arrived.
    started: AtomicBool,
    /// When each exchange still answering on this connection is overdue (its deadline plus
    /// [`OVERDUE_GRACE`]), with its number: one timer per connection watches the earliest,
    /// instead of a task per request.
    overdue_at: Mutex<BTreeSet<(Instant, u64)>>,
    /// Numbers exchanges.
    next: AtomicU64,
    /// An exchange became the earliest to be overdue: the connection re-arms its timer.
    rearm: Notify,
}

impl ConnState {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<(Instant, u64)>> {
        self.overdue_at.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The earliest time an exchange on this connection is overdue.
    fn earliest(&self) -> Option<Instant> {
        self.lock().first().map(|(at, _)| *at)
    }

    /// Watches an exchange until the returned guard is dropped.
    fn watch(self: &Arc<Self>, at: Instant) -> Overdue {
        let key = (at, self.next.fetch_add(1, Ordering::Relaxed));
        let earliest = {
            let mut set = self.lock();
            set.insert(key);
            set.first() == Some(&key)
        };
        if earliest {
            self.rearm.notify_one();
        }
        Overdue {
            state: self.clone(),
            key,
        }
    }
}

/// An exchange watched for being overdue; it stops being watched when this is dropped
/// (its answer's body ended or was dropped).
struct Overdue {
    state: Arc<ConnState>,
    key: (Instant, u64),
}

impl Drop for Overdue {
    fn drop(&mut self) {
        self.state.lock().remove(&self.key);
    }
}

impl ConnCtx<'_> {
    /// Serves one connection: the first request must arrive within `header_read_timeout`
    /// (hyper's own timer starts only once the protocol is known), the connection is
    /// closed gracefully past `max_connection_age` or on shutdown, and dropped when an
    /// exchange outlives its deadline or the grace period is over.
    async fn run<I, H, F>(mut self, io: I, handler: H, info: ConnInfo) -> Result<(), BoxError>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        H: Fn(Request<ProxyBody>, ConnInfo) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<ProxyBody>> + Send + 'static,
    {
        let state = Arc::new(ConnState::default());
        let limits = self.settings.body_limits();
        let svc = {
            let state = state.clone();
            hyper::service::service_fn(move |req: Request<Incoming>| {
                let (handler, state) = (handler.clone(), state.clone());
                async move {
                    state.started.store(true, Ordering::Relaxed);
                    Ok::<_, Infallible>(exchange(req, handler, info, limits, state).await)
                }
            })
        };
        let conn = self.builder.serve_connection(TokioIo::new(io), svc);
        tokio::pin!(conn);
        let first_request = tokio::time::sleep(self.settings.header_read_timeout);
        let too_old = tokio::time::sleep(self.settings.max_connection_age);
        let overdue = tokio::time::sleep(self.settings.header_read_timeout);
        tokio::pin!(first_request, too_old, overdue);
        let (mut waiting_first, mut closing, mut watching) = (true, false, false);
        loop {
            tokio::select! {
                r = conn.as_mut() => return r,
                _ = state.rearm.notified() => {
                    if let Some(at) = state.earliest() {
                        overdue.as_mut().reset(at);
                        watching = true;
                    }
                }
                _ = &mut overdue, if watching => {
                    match state.earliest() {
                        Some(at) if at <= Instant::now() => {
                            return Err("an exchange outlived request_deadline".into());
                        }
                        Some(at) => overdue.as_mut().reset(at),
                        None => watching = false,
                    }
                }
                _ = &mut first_request, if waiting_first => {
                    if !state.started.load(Ordering::Relaxed) {
                        return Err("no request within header_read_timeout".into());
                    }
                    waiting_first = false;
                }
                _ = &mut too_old, if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                _ = stopped(&mut self.shutdown), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                _ = stopped(&mut self.forced) => return Err("closed at the end of shutdown".into()),
            }
        }
    }
}

/// One request and its answer, bounded in time: both bodies fail when idle for
/// `body_idle_timeout` or past `request_deadline`, and a connection whose answer is
/// overdue (its client stopped reading) is closed.
async fn exchange<H, F>(
    req: Request<Incoming>,
    handler: H,
    info: ConnInfo,
    limits: BodyLimits,
    state: Arc<ConnState>,
) -> Response<ProxyBody>
where
    H: Fn(Request<ProxyBody>, ConnInfo) -> F,
    F: Future<Output = Response<ProxyBody>>,
{
    let deadline = Instant::now() + limits.deadline;
    let watched = state.watch(deadline + OVERDUE_GRACE);
    let req = req.map(|b| {
        let b = b
            .map_err(|e| -> BoxError { Box::new(ClientBodyError(e)) })
            .boxed_unsync();
        TimedBody::new(b, limits, deadline, None).boxed_unsync()
    });
    // The handler answers within the deadline itself (the proxy pipeline answers 504 and
    // counts it); should it not, the connection's overdue timer closes the connection.
    let resp = handler(req, info).await;
    resp.map(|b| TimedBody::new(b, limits, deadline, Some(watched)).boxed_unsync())
}

mod body;
mod workers;
use body::StallGuard;
pub use body::{BodyLimits, BodyTimeout, ClientBodyError, TimedBody};
pub use workers::{bind_shared, run_workers, worker, worker_count};

#[cfg(test)]
mod tests;
