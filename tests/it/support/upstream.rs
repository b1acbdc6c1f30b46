//! A recording upstream speaking HTTP/1.1 and h2, plain or TLS.

use super::{empty, full, GenBody, TestBody, TestCerts};
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

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

/// An upstream answering every request `200` with an empty body, keeping nothing.
pub async fn start_ok_upstream() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            conns.spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<
                        bytes::Bytes,
                    >::new(
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, task)
}
