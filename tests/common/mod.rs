//! Helpers shared by the black-box tests: a pacer instance on `127.0.0.1:0`, a recording
//! upstream, HTTP clients, raw sockets and throw-away TLS certificates.
//!
//! Everything here talks over real sockets; nothing reaches into pacer's internals
//! beyond `Config::parse` and `app::start`.

#![allow(dead_code)]

pub mod redis;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use pacer::app::Running;
use pacer::config::Config;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

/// Error type of test bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Body type every test client and the test upstream send.
pub type TestBody = UnsyncBoxBody<Bytes, BoxError>;

/// Upper bound for one whole test; a hang fails instead of stalling the suite.
pub const TEST_LIMIT: Duration = Duration::from_secs(25);

/// Runs `f`, failing the test if it takes longer than [`TEST_LIMIT`].
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(TEST_LIMIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {TEST_LIMIT:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// pacer

/// Adds `listen`/`admin_listen` on `127.0.0.1:0` to a configuration's `[server]` section
/// (creating the section when there is none).
pub fn with_test_listeners(toml: &str) -> String {
    const LISTEN: &str = "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n";
    match toml.find("[server]\n") {
        Some(i) => {
            let at = i + "[server]\n".len();
            format!("{}{LISTEN}{}", &toml[..at], &toml[at..])
        }
        None => format!("[server]\n{LISTEN}\n{toml}"),
    }
}

/// Starts pacer from configuration text; listeners are filled in (see
/// [`with_test_listeners`]).
pub async fn start_pacer(toml: &str) -> Running {
    let text = with_test_listeners(toml);
    let config =
        Config::parse(&text).unwrap_or_else(|e| panic!("invalid test config:\n{e}\n---\n{text}"));
    pacer::app::start(config).await.expect("pacer starts")
}

/// Turns off `tokens/me` look-ups, so the upstream sees only the requests under test.
pub const NO_TOKEN_LOOKUPS: &str = "[identity]\ntokens_me = false\n";

/// A configuration with one upstream `up` at `url` behind the route `/api/`, without
/// token look-ups ([`NO_TOKEN_LOOKUPS`]). `server` goes into `[server]`, `upstream` into
/// the `[[upstream]]` table.
pub fn one_route_config(server: &str, url: &str, upstream: &str) -> String {
    format!(
        "[server]\n{server}\n\n[[upstream]]\nname = \"up\"\nurl = \"{url}\"\n{upstream}\n\n\
         [[route]]\nprefix = \"/api/\"\nupstream = \"up\"\n\n{NO_TOKEN_LOOKUPS}"
    )
}

/// An address nothing listens on: a socket bound to it but never listening, kept open for
/// the rest of the test process, so connecting is refused and no other listener of this
/// process (a pacer, an upstream) can be given the same port meanwhile.
pub fn dead_addr() -> SocketAddr {
    let (addr, socket) = reserved_addr();
    std::mem::forget(socket);
    addr
}

/// A free loopback port for a child process (redis-server, a pacer process) to listen on.
/// Taken below the kernel's ephemeral range (32768 and up on Linux), where outgoing
/// connections get their source ports: a port picked with `bind(":0")` and released could
/// be taken by any connection before the child binds it; here only another test process
/// could take it, and each process walks its own stretch of the range. The port 10000
/// above it is free too and also below the ephemeral range: a Redis Cluster node listens
/// there for its cluster bus.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 12_000;
    const SPAN: u32 = 10_000;
    const BUS_OFFSET: u16 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let start = (std::process::id().wrapping_mul(7919)) % SPAN;
    let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::SeqCst, Ordering::SeqCst);
    let free = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
    for _ in 0..SPAN {
        let offset = NEXT.fetch_add(1, Ordering::SeqCst) % SPAN;
        let port = (FIRST + offset) as u16;
        if free(port) && free(port + BUS_OFFSET) {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + SPAN)
}

/// A socket bound to a free port but not listening yet: connecting is refused until
/// `socket.listen(..)` turns it into a listener on that very port.
pub fn reserved_addr() -> (SocketAddr, tokio::net::TcpSocket) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    (socket.local_addr().expect("local addr"), socket)
}

/// Resident memory of this process, from `/proc/self/status` (Linux only).
pub fn vm_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Largest value seen, for sampling memory during a transfer.
#[derive(Debug, Default)]
pub struct Peak(AtomicU64);

impl Peak {
    /// Records the current VmRSS.
    pub fn sample_rss(&self) {
        if let Some(rss) = vm_rss_bytes() {
            self.0.fetch_max(rss, Ordering::Relaxed);
        }
    }

    /// The largest value recorded.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------------------------------
// bodies

/// An empty body.
pub fn empty() -> TestBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A body of the given bytes (sent with `Content-Length`).
pub fn full(bytes: impl Into<Bytes>) -> TestBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

static FILLER: [u8; 64 * 1024] = [b'p'; 64 * 1024];

/// A body of `len` filler bytes produced on the fly, never held in memory.
/// `exact` bodies announce their length (`Content-Length`); the others go chunked.
pub struct GenBody {
    remaining: u64,
    sent: u64,
    exact: bool,
    on_chunk: Option<Box<dyn FnMut(u64) + Send>>,
}

impl GenBody {
    /// `len` bytes announced with `Content-Length`.
    pub fn exact(len: u64) -> GenBody {
        GenBody {
            remaining: len,
            sent: 0,
            exact: true,
            on_chunk: None,
        }
    }

    /// `len` bytes of unannounced length (chunked on HTTP/1.1).
    pub fn chunked(len: u64) -> GenBody {
        GenBody {
            exact: false,
            ..GenBody::exact(len)
        }
    }

    /// Calls `f` with the number of bytes produced so far, before each chunk.
    pub fn on_chunk(mut self, f: impl FnMut(u64) + Send + 'static) -> GenBody {
        self.on_chunk = Some(Box::new(f));
        self
    }

    /// As a [`TestBody`].
    pub fn boxed(self) -> TestBody {
        BodyExt::boxed_unsync(self)
    }
}

impl Body for GenBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        if let Some(f) = this.on_chunk.as_mut() {
            f(this.sent);
        }
        let n = this.remaining.min(FILLER.len() as u64);
        this.remaining -= n;
        this.sent += n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
            &FILLER[..n as usize],
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact {
            SizeHint::with_exact(self.remaining)
        } else {
            SizeHint::default()
        }
    }
}

/// Reads a body to its end, counting bytes without keeping them; `every` is called with
/// the running total after each frame.
pub async fn count_body<B>(body: B, mut every: impl FnMut(u64)) -> Result<u64, B::Error>
where
    B: Body + Unpin,
{
    let mut body = body;
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            n += bytes::Buf::remaining(&data) as u64;
            every(n);
        }
    }
    Ok(n)
}

// ---------------------------------------------------------------------------------------
// recording upstream

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    /// Path and query exactly as received.
    pub uri: String,
    pub version: Version,
    /// The authority asked for: `:authority` on h2, else the `Host` header.
    pub host: Option<String>,
    pub headers: HeaderMap,
    /// Body bytes received.
    pub body_len: u64,
    /// The first [`KEEP_BODY`] bytes of the body.
    pub body: Bytes,
    /// False when the body ended with an error (the sender gave up).
    pub body_complete: bool,
}

impl Recorded {
    /// All values of a header, as strings.
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }

    /// The single value of a header.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }
}

/// Body bytes an upstream keeps per request for inspection (and echoes back).
pub const KEEP_BODY: usize = 1024 * 1024;

/// How the upstream treats requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Serve HTTP/1.1 and h2; each response is shaped by the request's control headers:
    /// - `x-reply-delay-ms: N`: wait N ms (after reading the body) before answering;
    /// - `x-reply-status: N`: answer with status N (default 200);
    /// - `x-reply-header: name: value`: add this response header (repeatable);
    /// - `x-reply-download: N`: answer with N filler bytes, streamed.
    ///
    /// Otherwise the body is echoed back when it is at most [`KEEP_BODY`] bytes (else
    /// empty). Every answer carries `x-received-bytes`.
    Http,
    /// Read the request head, then close the connection without answering.
    CloseWithoutAnswer,
}

#[derive(Default)]
struct Seen {
    records: Mutex<Vec<Recorded>>,
    count: watch::Sender<usize>,
}

impl Seen {
    fn push(&self, r: Recorded) {
        self.records.lock().expect("records lock").push(r);
        self.count.send_modify(|c| *c += 1);
    }
}

/// A test upstream on `127.0.0.1:0` that records every request. Stops when dropped.
pub struct TestUpstream {
    pub addr: SocketAddr,
    tls: bool,
    seen: Arc<Seen>,
    task: JoinHandle<()>,
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestUpstream {
    /// A plain-HTTP upstream in [`Mode::Http`].
    pub async fn start() -> TestUpstream {
        Self::start_with(Mode::Http, None).await
    }

    /// A plain upstream that closes every connection without answering.
    pub async fn start_closing() -> TestUpstream {
        Self::start_with(Mode::CloseWithoutAnswer, None).await
    }

    /// An HTTPS upstream in [`Mode::Http`] (ALPN h2 and http/1.1).
    pub async fn start_tls(certs: &TestCerts) -> TestUpstream {
        Self::start_with(Mode::Http, Some(certs.acceptor())).await
    }

    /// An upstream in `mode`, with TLS when an acceptor is given.
    pub async fn start_with(mode: Mode, tls: Option<TlsAcceptor>) -> TestUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let seen = Arc::new(Seen::default());
        let is_tls = tls.is_some();
        let task = tokio::spawn(accept_loop(listener, mode, tls, seen.clone()));
        TestUpstream {
            addr,
            tls: is_tls,
            seen,
            task,
        }
    }

    /// Base URL by address (`http://127.0.0.1:PORT`; for TLS use [`Self::url_localhost`]).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Base URL naming `localhost`, as a certificate for `localhost` expects.
    pub fn url_localhost(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://localhost:{}", self.addr.port())
    }

    /// Requests recorded so far.
    pub fn records(&self) -> Vec<Recorded> {
        self.seen.records.lock().expect("records lock").clone()
    }

    /// Number of requests recorded so far.
    pub fn count(&self) -> usize {
        *self.seen.count.borrow()
    }

    /// The only recorded request (panics unless exactly one).
    pub fn only(&self) -> Recorded {
        let r = self.records();
        assert_eq!(
            r.len(),
            1,
            "expected exactly one upstream request, got {r:#?}"
        );
        r.into_iter().next().expect("one record")
    }

    /// Waits until at least `n` requests have been recorded.
    pub async fn wait_for(&self, n: usize) {
        let mut rx = self.seen.count.subscribe();
        let _ = rx.wait_for(|c| *c >= n).await;
    }
}

async fn accept_loop(listener: TcpListener, mode: Mode, tls: Option<TlsAcceptor>, seen: Arc<Seen>) {
    // Dropping the set (when the task is aborted) aborts every connection.
    let mut conns = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors and similar: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let seen = seen.clone();
        let tls = tls.clone();
        conns.spawn(async move {
            match (mode, tls) {
                (Mode::CloseWithoutAnswer, _) => close_without_answer(stream, &seen).await,
                (Mode::Http, None) => serve_http(TokioIo::new(stream), seen).await,
                (Mode::Http, Some(acceptor)) => {
                    if let Ok(s) = acceptor.accept(stream).await {
                        serve_http(TokioIo::new(s), seen).await;
                    }
                }
            }
        });
        // Reap finished connections so the set does not grow without bound.
        while conns.try_join_next().is_some() {}
    }
}

async fn serve_http<I>(io: TokioIo<I>, seen: Arc<Seen>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| answer(req, seen.clone()));
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection(io, svc)
        .await;
}

async fn close_without_answer(mut stream: TcpStream, seen: &Seen) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 64 * 1024 {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let line = String::from_utf8_lossy(&buf);
    let mut words = line.lines().next().unwrap_or_default().split(' ');
    let method =
        Method::from_bytes(words.next().unwrap_or_default().as_bytes()).unwrap_or(Method::GET);
    seen.push(Recorded {
        method,
        uri: words.next().unwrap_or_default().to_string(),
        version: Version::HTTP_11,
        host: None,
        headers: HeaderMap::new(),
        body_len: 0,
        body: Bytes::new(),
        body_complete: false,
    });
    drop(stream);
}

async fn answer(req: Request<Incoming>, seen: Arc<Seen>) -> Result<Response<TestBody>, Infallible> {
    let (parts, mut body) = req.into_parts();
    let mut len = 0u64;
    let mut kept = BytesMut::new();
    let mut complete = true;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    len += data.len() as u64;
                    let room = KEEP_BODY.saturating_sub(kept.len());
                    kept.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            Err(_) => {
                complete = false;
                break;
            }
        }
    }
    let control = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let uri = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.to_string(), |pq| pq.as_str().to_string());
    seen.push(Recorded {
        method: parts.method.clone(),
        uri,
        version: parts.version,
        host: parts
            .uri
            .authority()
            .map(|a| a.to_string())
            .or_else(|| control("host")),
        headers: parts.headers.clone(),
        body_len: len,
        body: kept.clone().freeze(),
        body_complete: complete,
    });

    if let Some(ms) = control("x-reply-delay-ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let body = match control("x-reply-download").and_then(|v| v.parse().ok()) {
        Some(n) => GenBody::exact(n).boxed(),
        None if len <= KEEP_BODY as u64 => full(kept.freeze()),
        None => empty(),
    };
    let mut resp = Response::new(body);
    if let Some(status) = control("x-reply-status").and_then(|v| v.parse().ok()) {
        *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    }
    let h = resp.headers_mut();
    for v in parts.headers.get_all("x-reply-header") {
        let Some((name, value)) = v.to_str().ok().and_then(|s| s.split_once(':')) else {
            continue;
        };
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_str(value.trim()),
        ) {
            h.append(n, v);
        }
    }
    h.insert("x-received-bytes", HeaderValue::from(len));
    Ok(resp)
}

// ---------------------------------------------------------------------------------------
// clients

/// A response read to its end.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON (panics otherwise).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The single value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// All values of a header.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect()
    }

    /// Asserts pacer's own JSON error shape with this status.
    pub fn assert_pacer_error(&self, status: StatusCode) {
        assert_eq!(self.status, status, "body: {}", self.text());
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{self:?}"
        );
        let v = self.json();
        assert_eq!(v["status"], status.as_u16(), "{v}");
        for key in ["message", "code", "contextId"] {
            assert!(v[key].is_string(), "{key} missing in {v}");
        }
        assert_eq!(v["details"], serde_json::json!([]), "{v}");
        assert_eq!(v["errors"], serde_json::json!([]), "{v}");
    }
}

/// A pooled hyper-util client bound to one base URL.
pub struct TestClient {
    client: Client<HttpsConnector<HttpConnector>, TestBody>,
    base: String,
}

fn connector(tls: rustls::ClientConfig, h2_only: bool) -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    if h2_only {
        b.enable_http2().wrap_connector(http)
    } else {
        b.enable_http1().enable_http2().wrap_connector(http)
    }
}

fn client_tls(roots: rustls::RootCertStore) -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

impl TestClient {
    /// HTTP/1.1 to `http://addr`.
    pub fn http1(addr: SocketAddr) -> TestClient {
        TestClient {
            client: Client::builder(TokioExecutor::new())
                .build(connector(client_tls(rustls::RootCertStore::empty()), false)),
            base: format!("http://{addr}"),
        }
    }

    /// HTTP/2 with prior knowledge (h2c) to `http://addr`.
    pub fn h2c(addr: SocketAddr) -> TestClient {
        TestClient {
            client: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(connector(client_tls(rustls::RootCertStore::empty()), true)),
            base: format!("http://{addr}"),
        }
    }

    /// HTTPS to `https://localhost:PORT` trusting only the test CA; ALPN h2 and http/1.1.
    pub fn https(addr: SocketAddr, certs: &TestCerts) -> TestClient {
        TestClient {
            client: Client::builder(TokioExecutor::new())
                .build(connector(certs.client_config(), false)),
            base: format!("https://localhost:{}", addr.port()),
        }
    }

    /// A request builder for `path` (path and query) on this client's base URL.
    pub fn request(&self, method: Method, path: &str) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
    }

    /// Sends and returns the response with its body still streaming.
    pub async fn send_streaming(&self, req: Request<TestBody>) -> Response<Incoming> {
        self.send_streaming_result(req)
            .await
            .expect("request to pacer failed")
    }

    /// Sends; a connection failure is returned rather than a panic.
    pub async fn send_streaming_result(
        &self,
        req: Request<TestBody>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        self.client.request(req).await
    }

    /// Sends and reads the whole response.
    pub async fn send(&self, req: Request<TestBody>) -> Reply {
        let resp = self.send_streaming(req).await;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("response body").to_bytes();
        Reply {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body,
        }
    }

    /// `GET path` with these headers.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut b = self.request(Method::GET, path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(empty()).expect("request")).await
    }
}

// ---------------------------------------------------------------------------------------
// raw sockets

/// What came back on a raw connection.
#[derive(Debug)]
pub struct RawReply {
    pub bytes: Vec<u8>,
    /// The peer closed (or reset) the connection.
    pub closed: bool,
}

impl RawReply {
    /// The status code of the first response, if one arrived.
    pub fn status(&self) -> Option<u16> {
        let text = std::str::from_utf8(self.bytes.get(..self.head_len()?)?).ok()?;
        let line = text.lines().next()?;
        line.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
    }

    /// Length of the response head including the blank line.
    pub fn head_len(&self) -> Option<usize> {
        head_len(&self.bytes)
    }

    /// A header of the first response (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<String> {
        header_in(&self.bytes[..self.head_len()?], name)
    }

    /// The bytes after the first response head.
    pub fn body(&self) -> &[u8] {
        self.head_len().map_or(&[][..], |n| &self.bytes[n..])
    }
}

fn head_len(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
}

fn header_in(head: &[u8], name: &str) -> Option<String> {
    String::from_utf8_lossy(head).lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// True once `bytes` hold one whole response (by `Content-Length`, chunked end or a
/// bodiless status).
fn response_complete(bytes: &[u8]) -> bool {
    let Some(n) = head_len(bytes) else {
        return false;
    };
    let head = &bytes[..n];
    let status = RawReply {
        bytes: bytes.to_vec(),
        closed: false,
    }
    .status();
    if matches!(status, Some(100..=199 | 204 | 304)) {
        return true;
    }
    if let Some(len) = header_in(head, "content-length").and_then(|v| v.parse::<usize>().ok()) {
        return bytes.len() >= n + len;
    }
    if header_in(head, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        return bytes.ends_with(b"0\r\n\r\n");
    }
    false
}

/// Writes `request` on a new connection (write errors are ignored: the server may close
/// early), optionally half-closes, and reads until one whole response has arrived, the
/// peer closes, or `quiet` passes without data.
pub async fn raw_exchange(
    addr: SocketAddr,
    request: &[u8],
    half_close: bool,
    quiet: Duration,
) -> RawReply {
    raw_io(addr, request, half_close, quiet, true).await
}

/// Writes `request` on a new connection, optionally half-closes, and reads everything
/// until the peer closes or `quiet` passes without data.
pub async fn raw_read_all(
    addr: SocketAddr,
    request: &[u8],
    half_close: bool,
    quiet: Duration,
) -> RawReply {
    raw_io(addr, request, half_close, quiet, false).await
}

async fn raw_io(
    addr: SocketAddr,
    request: &[u8],
    half_close: bool,
    quiet: Duration,
    one_response: bool,
) -> RawReply {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = stream.split();
    let write = async {
        let _ = wr.write_all(request).await;
        if half_close {
            let _ = wr.shutdown().await;
        }
    };
    let mut bytes = Vec::new();
    let mut closed = false;
    let read = async {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match tokio::time::timeout(quiet, rd.read(&mut chunk)).await {
                Err(_) => break,
                Ok(Ok(0)) | Ok(Err(_)) => {
                    closed = true;
                    break;
                }
                Ok(Ok(n)) => {
                    bytes.extend_from_slice(&chunk[..n]);
                    if one_response && response_complete(&bytes) {
                        break;
                    }
                }
            }
        }
    };
    // Read while writing, so a server that answers early cannot dead-lock a large write.
    tokio::join!(write, read);
    RawReply { bytes, closed }
}

// ---------------------------------------------------------------------------------------
// Prometheus text

/// One sample of a Prometheus text exposition.
#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The samples of a Prometheus text exposition, as pacer writes it (no timestamps). Label
/// values are unescaped; a malformed label fails the test.
pub fn prom_samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let mut labels = Vec::new();
        if line[name_end..].starts_with('{') {
            let mut chars = line[name_end + 1..].chars().peekable();
            loop {
                while chars.peek() == Some(&',') || chars.peek() == Some(&' ') {
                    chars.next();
                }
                if chars.peek() == Some(&'}') || chars.peek().is_none() {
                    break;
                }
                let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
                assert_eq!(chars.next(), Some('"'), "label {key} in {line}");
                let mut value = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => match chars.next() {
                            Some('n') => value.push('\n'),
                            Some(other) => value.push(other),
                            None => break,
                        },
                        '"' => break,
                        c => value.push(c),
                    }
                }
                labels.push((key, value));
            }
        }
        let value = line
            .trim()
            .rsplit_once(' ')
            .and_then(|(_, v)| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("sample without a value: {line}"));
        out.push(Sample {
            name: line[..name_end].to_string(),
            labels,
            value,
        });
    }
    out
}

/// Sum of every sample of `name` whose labels include all of `want`.
pub fn metric_sum(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    prom_samples(text)
        .iter()
        .filter(|s| s.name == name && want.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .map(|s| s.value)
        .sum()
}

// ---------------------------------------------------------------------------------------
// TLS

/// A throw-away CA and a server certificate for `localhost` and `127.0.0.1`, as PEM files
/// in a fresh temporary directory (removed on drop).
pub struct TestCerts {
    pub dir: PathBuf,
    pub ca_pem: PathBuf,
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
}

impl Drop for TestCerts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A new, empty directory under the system temporary directory.
pub fn unique_temp_dir(tag: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!(
        "pacer-{tag}-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

impl TestCerts {
    /// Generates the CA and the server certificate.
    pub fn new() -> TestCerts {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "pacer test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca_params.self_signed(&ca_key).expect("CA cert");

        let key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &ca, &ca_key).expect("server cert");

        let dir = unique_temp_dir("certs");
        let write = |name: &str, pem: String| {
            let p = dir.join(name);
            std::fs::write(&p, pem).expect("write PEM");
            p
        };
        TestCerts {
            ca_pem: write("ca.pem", ca.pem()),
            cert_pem: write("cert.pem", cert.pem()),
            key_pem: write("key.pem", key.serialize_pem()),
            dir,
        }
    }

    /// A TLS acceptor with the server certificate, ALPN h2 and http/1.1.
    pub fn acceptor(&self) -> TlsAcceptor {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(&self.cert_pem)
            .expect("server cert PEM")
            .collect::<Result<Vec<_>, _>>()
            .expect("server cert PEM");
        let key = PrivateKeyDer::from_pem_file(&self.key_pem).expect("key PEM");
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server TLS config");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        TlsAcceptor::from(Arc::new(config))
    }

    /// A client configuration trusting only the test CA.
    pub fn client_config(&self) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        for cert in CertificateDer::pem_file_iter(&self.ca_pem).expect("CA PEM") {
            roots.add(cert.expect("CA PEM")).expect("add CA");
        }
        client_tls(roots)
    }
}

impl Default for TestCerts {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------------------
// raw recording upstream

/// One request as a raw TCP upstream received it, byte for byte.
#[derive(Debug, Clone)]
pub struct RawRecorded {
    /// Which accepted connection it came on (0, 1, ...).
    pub conn: usize,
    /// Every byte of the request (head and framed body) as received.
    pub raw: Vec<u8>,
    /// The request line, without its line ending.
    pub line: String,
    /// Header fields in order, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body bytes as framed (chunked framing included).
    pub framed_body: Vec<u8>,
    /// The body after removing chunked framing.
    pub body: Vec<u8>,
    /// False when the connection ended (or the framing broke) before the request was whole.
    pub complete: bool,
}

impl RawRecorded {
    /// All values of a header.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The single value of a header (panics when repeated).
    pub fn header(&self, name: &str) -> Option<&str> {
        let all = self.header_all(name);
        assert!(all.len() <= 1, "{name} repeated: {self:?}");
        all.first().copied()
    }
}

/// How a [`RawUpstream`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawMode {
    /// `HTTP/1.1 200 OK`, `content-length: 2`, `ok` after each whole request.
    Ok,
    /// Reads requests, never answers.
    Silent,
    /// After a whole request: a head announcing 1 MiB and 1 KiB of it, then nothing.
    HeadThenStall,
    /// After a whole request: a head announcing 1 MiB and 64 KiB of it, then a TCP reset.
    ResetMidBody,
}

/// The canned answer of [`RawMode::Ok`].
pub const RAW_OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

/// A plain TCP upstream that records the raw bytes of each request. Stops when dropped.
pub struct RawUpstream {
    pub addr: SocketAddr,
    seen: Arc<RawSeen>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct RawSeen {
    records: Mutex<Vec<RawRecorded>>,
    count: watch::Sender<usize>,
    conns: AtomicU64,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawUpstream {
    /// An upstream in `mode` on `127.0.0.1:0`.
    pub async fn start(mode: RawMode) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind raw upstream");
        let addr = listener.local_addr().expect("raw upstream addr");
        let seen = Arc::new(RawSeen::default());
        let s = seen.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let conn = s.conns.fetch_add(1, Ordering::Relaxed) as usize;
                conns.spawn(raw_serve(stream, conn, mode, s.clone()));
                while conns.try_join_next().is_some() {}
            }
        });
        RawUpstream { addr, seen, task }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests recorded so far (whole or cut short).
    pub fn records(&self) -> Vec<RawRecorded> {
        self.seen.records.lock().expect("records lock").clone()
    }

    /// Number of requests recorded so far.
    pub fn count(&self) -> usize {
        *self.seen.count.borrow()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.seen.conns.load(Ordering::Relaxed) as usize
    }

    /// Waits until at least `n` requests have been recorded.
    pub async fn wait_for(&self, n: usize) {
        let mut rx = self.seen.count.subscribe();
        let _ = rx.wait_for(|c| *c >= n).await;
    }
}

/// Outcome of parsing one request from the front of a buffer.
enum RawParse {
    /// Need more bytes.
    More,
    /// A whole request of this many bytes.
    Whole(usize, RawRecorded),
    /// The framing is broken: the request so far.
    Broken(RawRecorded),
}

/// Header fields in order, names lower-cased.
type RawHeaders = Vec<(String, String)>;

/// The head's length, its request line and its fields.
fn raw_head(buf: &[u8]) -> Option<(usize, String, RawHeaders)> {
    let end = head_len(buf)?;
    let text = String::from_utf8_lossy(&buf[..end - 4]).into_owned();
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or_default().to_string();
    let headers = lines
        .filter_map(|l| {
            let (n, v) = l.split_once(':')?;
            Some((n.to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect();
    Some((end, line, headers))
}

/// Decodes strict chunked framing; `Ok(None)` when more bytes are needed.
fn raw_chunked(buf: &[u8]) -> Result<Option<(usize, Vec<u8>)>, ()> {
    let (mut at, mut body) = (0, Vec::new());
    loop {
        let Some(nl) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&buf[at..at + nl]).map_err(|_| ())?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or_default(), 16)
            .map_err(|_| ())?;
        at += nl + 2;
        if size == 0 {
            // Trailers until the empty line.
            loop {
                let Some(nl) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                at += nl + 2;
                if nl == 0 {
                    return Ok(Some((at, body)));
                }
            }
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[at..at + size]);
        if &buf[at + size..at + size + 2] != b"\r\n" {
            return Err(());
        }
        at += size + 2;
    }
}

fn raw_parse(buf: &[u8], conn: usize) -> RawParse {
    let Some((head, line, headers)) = raw_head(buf) else {
        return RawParse::More;
    };
    let mut rec = RawRecorded {
        conn,
        raw: buf.to_vec(),
        line,
        headers,
        framed_body: buf[head..].to_vec(),
        body: Vec::new(),
        complete: false,
    };
    let chunked = rec
        .header_all("transfer-encoding")
        .iter()
        .any(|v| v.eq_ignore_ascii_case("chunked"));
    let len = match (chunked, rec.header_all("content-length").as_slice()) {
        (true, []) => match raw_chunked(&buf[head..]) {
            Ok(Some((n, body))) => {
                rec.body = body;
                Some(n)
            }
            Ok(None) => None,
            Err(()) => return RawParse::Broken(rec),
        },
        (false, []) => Some(0),
        (false, [one]) => match one.parse::<usize>() {
            Ok(n) if buf.len() >= head + n => {
                rec.body = buf[head..head + n].to_vec();
                Some(n)
            }
            Ok(_) => None,
            Err(_) => return RawParse::Broken(rec),
        },
        // Two framings, or several lengths: exactly what an upstream must never receive.
        _ => return RawParse::Broken(rec),
    };
    match len {
        None => RawParse::More,
        Some(n) => {
            let total = head + n;
            rec.raw.truncate(total);
            rec.framed_body.truncate(n);
            rec.complete = true;
            RawParse::Whole(total, rec)
        }
    }
}

async fn raw_serve(mut stream: TcpStream, conn: usize, mode: RawMode, seen: Arc<RawSeen>) {
    let push = |r: RawRecorded| {
        seen.records.lock().expect("records lock").push(r);
        seen.count.send_modify(|c| *c += 1);
    };
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match raw_parse(&buf, conn) {
            RawParse::Whole(n, rec) => {
                buf.drain(..n);
                push(rec);
                match mode {
                    RawMode::Ok => {
                        if stream.write_all(RAW_OK).await.is_err() {
                            return;
                        }
                    }
                    RawMode::Silent => {}
                    RawMode::HeadThenStall | RawMode::ResetMidBody => {
                        let sent = if mode == RawMode::HeadThenStall {
                            1024
                        } else {
                            64 * 1024
                        };
                        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 1048576\r\n\r\n";
                        let _ = stream.write_all(head).await;
                        let _ = stream.write_all(&FILLER[..sent]).await;
                        let _ = stream.flush().await;
                        if mode == RawMode::ResetMidBody {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            let _ = stream.set_zero_linger();
                            return;
                        }
                        // Hold the connection open, silent, until the peer gives up.
                        let mut sink = [0u8; 1024];
                        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                        return;
                    }
                }
                continue;
            }
            RawParse::Broken(rec) => {
                push(rec);
                return;
            }
            RawParse::More => {}
        }
        match stream.read(&mut chunk).await {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => {
                if !buf.is_empty() {
                    if let RawParse::More = raw_parse(&buf, conn) {
                        let (head, line, headers) = raw_head(&buf).unwrap_or_default();
                        push(RawRecorded {
                            conn,
                            raw: buf.clone(),
                            line,
                            headers,
                            framed_body: buf[head..].to_vec(),
                            body: Vec::new(),
                            complete: false,
                        });
                    }
                }
                return;
            }
        }
    }
}

/// Status codes of every response head in `bytes`, in order.
pub fn response_statuses(bytes: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(bytes);
    text.match_indices("HTTP/1.")
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

/// A client sending normal requests to `path` in a loop until stopped, counting answers.
pub struct Bystander {
    stop: watch::Sender<bool>,
    task: JoinHandle<(usize, Vec<String>)>,
}

impl Bystander {
    /// Starts sending `GET path` to pacer at `addr` every 100 ms, on fresh connections.
    pub fn start(addr: SocketAddr, path: &str) -> Bystander {
        let (stop, mut stopped) = watch::channel(false);
        let path = path.to_string();
        let task = tokio::spawn(async move {
            let (mut ok, mut failed) = (0, Vec::new());
            loop {
                let client = TestClient::http1(addr);
                let req = client
                    .request(Method::GET, &path)
                    .body(empty())
                    .expect("request");
                let sent = tokio::time::timeout(Duration::from_secs(2), async {
                    let resp = client.send_streaming_result(req).await?;
                    let status = resp.status();
                    let body = resp.into_body().collect().await;
                    Ok::<_, BoxError>((status, body.is_ok()))
                })
                .await;
                match sent {
                    Ok(Ok((StatusCode::OK, true))) => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stopped.changed() => break,
                }
            }
            (ok, failed)
        });
        Bystander { stop, task }
    }

    /// Stops and asserts every request was served, and at least one was sent.
    pub async fn assert_served(self) {
        let _ = self.stop.send(true);
        let (ok, failed) = self.task.await.expect("bystander task");
        assert!(failed.is_empty(), "bystander requests failed: {failed:?}");
        assert!(ok > 0, "bystander sent nothing");
    }
}

/// The answer to a client-credentials exchange (Basic credentials, form body) sent through
/// `client`; it must be 200.
pub async fn token_reply_via(client: &TestClient, id: &str, secret: &str) -> Reply {
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
    let req = client
        .request(Method::POST, "/oauth/token")
        .header("authorization", format!("Basic {basic}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(full("grant_type=client_credentials"))
        .unwrap();
    let reply = client.send(req).await;
    assert_eq!(reply.status, StatusCode::OK, "token: {}", reply.text());
    reply
}

/// A client-credentials token obtained *through pacer* (Basic credentials, form body), so
/// that pacer learns the token's client.
pub async fn token_via(client: &TestClient, id: &str, secret: &str) -> String {
    token_reply_via(client, id, secret).await.json()["access_token"]
        .as_str()
        .expect("access_token")
        .to_string()
}
