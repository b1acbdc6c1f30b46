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

thread_local! {
    /// Which serving thread this is (see [`run_workers`]); 0 outside them.
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The serving thread the caller runs on, so that per-thread resources (upstream
/// connection pools) stay with their thread.
pub fn worker() -> usize {
    WORKER.with(|w| w.get())
}

/// The number of serving threads `[server] workers` asks for (0: one per CPU core).
pub fn worker_count(configured: usize) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// A listener on `addr` that other threads may listen on too (`SO_REUSEPORT`): the
/// kernel spreads new connections over them.
pub fn bind_shared(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    #[cfg(unix)]
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Serves `addr` (already bound by the caller with [`bind_shared`]) on `extra` more threads,
/// each running its own single-threaded runtime and listening socket, so a request and
/// its answer never cross threads. Each thread ends when `shutdown` fires; the returned
/// receivers resolve when it has.
pub fn run_workers<H, F>(
    addr: SocketAddr,
    extra: usize,
    settings: ConnSettings,
    handler: H,
    shutdown: watch::Receiver<bool>,
) -> io::Result<Vec<tokio::sync::oneshot::Receiver<()>>>
where
    H: Fn(Request<ProxyBody>, ConnInfo) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let mut done = Vec::with_capacity(extra);
    for i in 1..=extra {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // Bound here so that a failure is reported before anything serves.
        let listener = {
            let _entered = runtime.enter();
            bind_shared(addr)?
        };
        let (handler, settings, shutdown) = (handler.clone(), settings.clone(), shutdown.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("pacer-worker-{i}"))
            .spawn(move || {
                WORKER.with(|w| w.set(i));
                runtime.block_on(serve(listener, settings, handler, shutdown));
                let _ = tx.send(());
            })?;
        done.push(rx);
    }
    Ok(done)
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

/// Time limits of request and response bodies.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Longest wait for the next body bytes.
    pub idle: Duration,
    /// The whole exchange.
    pub deadline: Duration,
}

/// A body stalled or ran past the request deadline.
#[derive(Debug, thiserror::Error)]
pub enum BodyTimeout {
    #[error("no body bytes for {0:?}")]
    Idle(Duration),
    #[error("request deadline of {0:?} passed")]
    Deadline(Duration),
}

/// The client's request body broke: bad framing, or the connection closed mid-body.
#[derive(Debug, thiserror::Error)]
#[error("request body from the client broke: {0}")]
pub struct ClientBodyError(#[source] pub hyper::Error);

/// A body that fails with [`BodyTimeout`] when it moves no bytes for `idle` while being
/// read, or once the exchange's deadline has passed. Dropping it (hyper does on error)
/// drops the inner body, which aborts the other side.
pub struct TimedBody {
    inner: ProxyBody,
    limits: BodyLimits,
    deadline: Instant,
    idle: Pin<Box<Sleep>>,
    idle_armed: bool,
    overdue: Pin<Box<Sleep>>,
    done: bool,
    _watched: Option<Overdue>,
}

impl TimedBody {
    fn new(
        inner: ProxyBody,
        limits: BodyLimits,
        deadline: Instant,
        watched: Option<Overdue>,
    ) -> Self {
        TimedBody {
            inner,
            limits,
            deadline,
            idle: Box::pin(tokio::time::sleep(limits.idle)),
            idle_armed: false,
            overdue: Box::pin(tokio::time::sleep_until(deadline)),
            done: false,
            _watched: watched,
        }
    }

    fn fail(&mut self, e: BodyTimeout) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.done = true;
        Poll::Ready(Some(Err(Box::new(e))))
    }
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        // Checked before reading, so that a steady trickle cannot outlive the deadline.
        if Instant::now() >= this.deadline {
            return this.fail(BodyTimeout::Deadline(this.limits.deadline));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.idle_armed = false;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(end) => {
                this.done = true;
                Poll::Ready(end)
            }
            Poll::Pending => {
                // The idle clock runs only while someone waits for bytes: time spent
                // queued before the body is first read is not the client's idleness.
                if !this.idle_armed {
                    this.idle_armed = true;
                    let at = Instant::now() + this.limits.idle;
                    this.idle.as_mut().reset(at);
                }
                if this.idle.as_mut().poll(cx).is_ready() {
                    return this.fail(BodyTimeout::Idle(this.limits.idle));
                }
                if this.overdue.as_mut().poll(cx).is_ready() {
                    return this.fail(BodyTimeout::Deadline(this.limits.deadline));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A socket whose writes fail once they make no progress for `limit`: a peer that stops
/// reading cannot hold a connection, and the answer buffered for it, forever.
struct StallGuard<I> {
    io: I,
    limit: Duration,
    stall: Pin<Box<Sleep>>,
    armed: bool,
}

impl<I> StallGuard<I> {
    fn new(io: I, limit: Duration) -> Self {
        StallGuard {
            io,
            limit,
            stall: Box::pin(tokio::time::sleep(limit)),
            armed: false,
        }
    }

    fn check<T>(
        &mut self,
        polled: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.armed = false;
            return polled;
        }
        if !self.armed {
            self.armed = true;
            let at = Instant::now() + self.limit;
            self.stall.as_mut().reset(at);
        }
        if self.stall.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "peer stopped reading",
            )));
        }
        Poll::Pending
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for StallGuard<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for StallGuard<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.check(polled, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.check(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.check(polled, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_shutdown(cx);
        this.check(polled, cx)
    }
}

#[cfg(test)]
mod tests;
