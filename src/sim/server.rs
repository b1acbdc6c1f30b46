//! The simulator's HTTP side: login, API, and the `/sim/*` control endpoints over
//! HTTP/1.1 and HTTP/2 on one listener.

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rand::Rng;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::config::SimConfig;
use super::jobs::Jobs;
use super::state::{Core, RateHeaders, Ticket};
use super::stats::SimStats;
use crate::answer::{self, ProxyBody};
use crate::limit::window::Nanos;

/// Stats key of requests that carry no valid client.
const UNKNOWN: &str = "unknown";

/// Largest `/oauth/token` form accepted.
const MAX_FORM_BYTES: usize = 64 * 1024;

/// Largest `/api/v2` body read and thrown away.
const MAX_DRAIN_BYTES: u64 = 16 * 1024 * 1024;

/// How long shutdown waits for requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// State every connection shares.
struct Shared {
    config: SimConfig,
    epoch: Instant,
    core: Mutex<Core>,
    jobs: Mutex<Jobs>,
}

impl Shared {
    /// Locks the core and reads the clock under the lock, so recorded times never go
    /// backwards.
    fn lock(&self) -> (MutexGuard<'_, Core>, Nanos) {
        // The core is left consistent between statements, so a poisoned lock is usable.
        let core = self.core.lock().unwrap_or_else(PoisonError::into_inner);
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        (core, now)
    }

    /// Counts one request received and answered at once.
    fn tally(&self, client: &str, status: StatusCode) {
        let (mut core, _) = self.lock();
        core.stats_mut().received(client);
        core.stats_mut().answered(client, status);
    }

    /// The answer to an analytics details jobs call, if `path` is one.
    fn jobs(&self, client: &str, method: &Method, path: &str) -> Option<Response<ProxyBody>> {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        let c = &self.config;
        jobs.answer(client, method, path, now, c.job_concurrency, c.job_duration)
    }

    fn reset_jobs(&self) {
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .reset();
    }

    fn latency(&self) -> Duration {
        let jitter = self.config.latency_jitter;
        let extra = if jitter.is_zero() {
            Duration::ZERO
        } else {
            rand::thread_rng().gen_range(Duration::ZERO..=jitter)
        };
        self.config.latency.saturating_add(extra)
    }
}

/// A running simulator. Dropping the handle stops it as well.
pub struct Simulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl fmt::Debug for Simulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Simulator")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Simulator {
    /// Binds `listen` (port 0 picks a free one) and serves in a background task.
    pub async fn start(listen: SocketAddr, config: SimConfig) -> std::io::Result<Simulator> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            core: Mutex::new(Core::new(&config)),
            jobs: Mutex::new(Jobs::default()),
            config,
            epoch: Instant::now(),
        });
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&shared), stopped));
        Ok(Simulator {
            addr,
            shared,
            stop,
            task,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The counters `GET /sim/stats` returns.
    pub fn stats(&self) -> SimStats {
        self.shared.lock().0.stats()
    }

    /// Empties every window and zeroes the counters, like `POST /sim/reset`; tokens stay valid.
    pub fn reset(&self) {
        self.shared.lock().0.reset();
        self.shared.reset_jobs();
    }

    /// Stops accepting, lets requests in flight finish (briefly), and returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Runs a simulator on `listen` until ctrl-c (`pacer simulate`).
pub async fn serve(listen: SocketAddr, config: SimConfig) -> std::io::Result<()> {
    let sim = Simulator::start(listen, config).await?;
    tracing::info!(url = %sim.url(), "Genesys simulator listening");
    let signal = tokio::signal::ctrl_c().await;
    sim.shutdown().await;
    signal
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "simulator accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        let service = service_fn(move |req| {
            let shared = Arc::clone(&shared);
            async move { Ok::<_, Infallible>(route(shared, req).await) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "simulator connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await;
}

async fn route(shared: Arc<Shared>, req: Request<Incoming>) -> Response<ProxyBody> {
    let path = req.uri().path();
    match path {
        "/oauth/token" if req.method() == Method::POST => token(&shared, req).await,
        "/sim/stats" if req.method() == Method::GET => {
            answer::json_response(StatusCode::OK, &shared.lock().0.stats())
        }
        // For container health checks (`pacer healthcheck --admin SIM_ADDR`).
        "/readyz" | "/healthz" if req.method() == Method::GET => {
            answer::json_response(StatusCode::OK, &serde_json::json!({"status": "ready"}))
        }
        "/sim/reset" if req.method() == Method::POST => {
            shared.lock().0.reset();
            shared.reset_jobs();
            let mut resp = Response::new(answer::full(Bytes::new()));
            *resp.status_mut() = StatusCode::NO_CONTENT;
            resp
        }
        "/oauth/token" | "/sim/stats" | "/sim/reset" => answer::error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method.not.allowed",
            "Method not allowed",
        ),
        p if p == "/api/v2" || p.starts_with("/api/v2/") => api(shared, req).await,
        _ => answer::error_response(
            StatusCode::NOT_FOUND,
            "not.found",
            "The requested resource was not found",
        ),
    }
}

// ---- POST /oauth/token ----

#[derive(Serialize)]
struct TokenBody<'a> {
    access_token: &'a str,
    token_type: &'static str,
    expires_in: u64,
}

async fn token(shared: &Shared, req: Request<Incoming>) -> Response<ProxyBody> {
    let (parts, body) = req.into_parts();
    let form = match Limited::new(body, MAX_FORM_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            let resp = bad_request("The request body could not be read");
            shared.tally(UNKNOWN, resp.status());
            return resp;
        }
    };
    let mut grant_type = None;
    let (mut form_id, mut form_secret) = (None, None);
    for (k, v) in url::form_urlencoded::parse(&form) {
        let slot = match &*k {
            "grant_type" => &mut grant_type,
            "client_id" => &mut form_id,
            "client_secret" => &mut form_secret,
            _ => continue,
        };
        slot.get_or_insert(v.into_owned());
    }

    let credentials = match basic_credentials(&parts.headers) {
        Some(Ok(pair)) => Some(pair),
        Some(Err(())) => {
            let resp = bad_request("Malformed Basic authorization header");
            shared.tally(UNKNOWN, resp.status());
            return resp;
        }
        None => form_id.zip(form_secret),
    };
    let known = credentials
        .as_ref()
        .and_then(|(id, _)| shared.config.client(id));
    let client = match (known, &credentials) {
        (Some(c), Some((_, secret))) if c.secret == *secret => c,
        (known, _) => {
            let resp = unauthorized();
            shared.tally(known.map_or(UNKNOWN, |c| c.id.as_str()), resp.status());
            return resp;
        }
    };
    if grant_type.as_deref() != Some("client_credentials") {
        let resp = bad_request("Only grant_type=client_credentials is supported");
        shared.tally(&client.id, resp.status());
        return resp;
    }

    let issued = {
        let (mut core, now) = shared.lock();
        core.issue_token(&client.id, now)
    };
    let resp = match issued {
        Ok(token) => answer::json_response(
            StatusCode::OK,
            &TokenBody {
                access_token: &token,
                token_type: "bearer",
                expires_in: shared.config.token_ttl.as_secs(),
            },
        ),
        Err(wait) => answer::too_many_requests(wait),
    };
    shared.tally(&client.id, resp.status());
    resp
}

/// `Some(Err)` for a Basic header that cannot be decoded, `None` when there is none.
fn basic_credentials(headers: &HeaderMap) -> Option<Result<(String, String), ()>> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .map_err(drop)
        .and_then(|bytes| String::from_utf8(bytes).map_err(drop));
    Some(decoded.and_then(|pair| {
        pair.split_once(':')
            .map(|(id, secret)| (id.to_owned(), secret.to_owned()))
            .ok_or(())
    }))
}

// ---- /api/v2/... ----

/// Holds an `/api/v2` request's place in the in-flight counts until it is answered or
/// its connection goes away.
struct Hold {
    shared: Arc<Shared>,
    ticket: Option<Ticket>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let (mut core, _) = self.shared.lock();
        if let Some(ticket) = self.ticket.take() {
            core.release(ticket);
        }
        core.leave();
    }
}

#[derive(Serialize)]
struct TokensMe<'a> {
    #[serde(rename = "OAuthClient")]
    oauth_client: NamedId<'a>,
    organization: NamedId<'a>,
}

#[derive(Serialize)]
struct NamedId<'a> {
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
}

#[derive(Serialize)]
struct Echo<'a> {
    id: String,
    path: &'a str,
    method: &'a str,
    padding: String,
}

async fn api(shared: Arc<Shared>, req: Request<Incoming>) -> Response<ProxyBody> {
    let (parts, body) = req.into_parts();
    let (method, path) = (parts.method.as_str(), parts.uri.path());

    // Every check happens at arrival, as the upstream counts arrivals.
    let (client, admission) = {
        let (mut core, now) = shared.lock();
        core.enter();
        let client = bearer(&parts.headers)
            .and_then(|t| core.authenticate(t, now))
            .map(str::to_owned);
        core.stats_mut()
            .received(client.as_deref().unwrap_or(UNKNOWN));
        let admission = client.as_deref().map(|c| core.admit(c, method, path, now));
        (client, admission)
    };
    let mut hold = Hold {
        shared: Arc::clone(&shared),
        ticket: None,
    };
    let mut headers = None;
    let mut refused = None;
    if let Some(a) = admission {
        headers = Some(a.headers);
        match a.decision {
            Ok(ticket) => hold.ticket = Some(ticket),
            Err(wait) => refused = Some(wait),
        }
    }

    let drained = drain(body).await;
    let latency = shared.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }

    let mut resp = match (&client, drained, refused) {
        (_, Err(resp), _) => resp,
        (None, ..) => unauthorized(),
        (Some(_), _, Some(wait)) => answer::too_many_requests(wait),
        (Some(id), _, None) if path == "/api/v2/tokens/me" && parts.method == Method::GET => {
            let name = shared.config.client(id).and_then(|c| c.name.as_deref());
            answer::json_response(
                StatusCode::OK,
                &TokensMe {
                    oauth_client: NamedId {
                        id,
                        name: Some(name.unwrap_or(id)),
                    },
                    organization: NamedId {
                        id: &shared.config.org_id,
                        name: None,
                    },
                },
            )
        }
        (Some(id), _, None) => shared
            .jobs(id, &parts.method, path)
            .unwrap_or_else(|| echo(method, path, shared.config.body_bytes)),
    };
    if let Some(h) = headers.filter(|_| shared.config.rate_headers) {
        rate_headers(resp.headers_mut(), h);
    }
    {
        let (mut core, _) = shared.lock();
        core.stats_mut()
            .answered(client.as_deref().unwrap_or(UNKNOWN), resp.status());
    }
    drop(hold);
    resp
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Reads the request body to its end without keeping it, so the connection stays usable.
async fn drain(mut body: Incoming) -> Result<(), Response<ProxyBody>> {
    let mut seen: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| bad_request("The request body could not be read"))?;
        if let Some(data) = frame.data_ref() {
            seen = seen.saturating_add(data.len() as u64);
            if seen > MAX_DRAIN_BYTES {
                return Err(answer::error_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request.entity.too.large",
                    "The request body is too large",
                ));
            }
        }
    }
    Ok(())
}

/// A 200 body of about `body_bytes` bytes.
fn echo(method: &str, path: &str, body_bytes: usize) -> Response<ProxyBody> {
    let mut echo = Echo {
        id: answer::context_id(),
        path,
        method,
        padding: String::new(),
    };
    let bare = serde_json::to_vec(&echo).map_or(0, |v| v.len());
    echo.padding = "x".repeat(body_bytes.saturating_sub(bare));
    answer::json_response(StatusCode::OK, &echo)
}

fn rate_headers(headers: &mut HeaderMap, h: RateHeaders) {
    headers.insert("inin-ratelimit-count", HeaderValue::from(h.count));
    headers.insert("inin-ratelimit-allowed", HeaderValue::from(h.allowed));
    headers.insert("inin-ratelimit-reset", HeaderValue::from(h.reset_secs));
}

fn unauthorized() -> Response<ProxyBody> {
    answer::error_response(
        StatusCode::UNAUTHORIZED,
        "bad.credentials",
        "Invalid login credentials.",
    )
}

fn bad_request(message: &str) -> Response<ProxyBody> {
    answer::error_response(StatusCode::BAD_REQUEST, "bad.request", message)
}
