//! `pacer demo`: the problem and the fix, side by side, with nothing to configure.
//!
//! The built-in simulator enforces Genesys' limits with time scaled down 10× (300 requests
//! per 6 s per OAuth client stands for 300 per minute). A runaway bulk export and the IVR's
//! Data Actions share one OAuth client. Phase 1 sends both straight to the simulator: the
//! bulk job fills the client's window and the IVR gets 429s (callers hear dead air).
//! Phase 2 sends the same load through pacer: bulk is paced and shed, the IVR is served
//! from the critical reserve, and the upstream never has to answer 429.
//!
//! With `--sim-limit N` the simulator grants the client only N per window while pacer is
//! configured for 300 (someone else uses the same OAuth client, or Genesys lowered the
//! limit): pacer learns the real budget from `inin-ratelimit-allowed`, and the table shows
//! the learned ceiling.

use crate::app;
use crate::config::Config;
use crate::sim::{SimConfig, Simulator};
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why the demo could not run at all (as opposed to a failed verdict).
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("simulator: {0}")]
    Sim(std::io::Error),
    #[error("pacer: {0}")]
    Start(#[from] app::StartError),
    #[error("configuration: {0}")]
    Config(#[from] crate::config::ConfigErrors),
    #[error("token request failed: {0}")]
    Token(String),
}

const CLIENT_ID: &str = "shared-client";
const CLIENT_SECRET: &str = "shared-secret";
/// Requests per window per client, as in Genesys.
const QUOTA: u64 = 300;
/// The scaled window: 6 s stands for one minute.
const WINDOW_SECS: u64 = 6;
const BULK_WORKERS: usize = 48;
/// IVR Data Action calls per second (well inside the 20% critical reserve).
const IVR_PER_SECOND: u64 = 6;

fn sim_config(client_requests: u64) -> SimConfig {
    let text = format!(
        r#"
window = "{WINDOW_SECS}s"
latency = "15ms"
latency_jitter = "10ms"
client_requests = {client_requests}
org_requests = 3000
token_requests = {QUOTA}
[[client]]
id = "{CLIENT_ID}"
secret = "{CLIENT_SECRET}"
name = "Shared integration client"
"#
    );
    // The text is fixed and valid; a failure here is a bug the tests catch.
    SimConfig::from_toml_str(&text).unwrap_or_default()
}

fn pacer_config(sim: SocketAddr) -> Result<Config, crate::config::ConfigErrors> {
    Config::parse(&format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[[upstream]]
name = "genesys-api"
url = "http://{sim}"
timeout = "10s"

[[upstream]]
name = "genesys-login"
url = "http://{sim}"

[[route]]
prefix = "/"
upstream = "genesys-api"

[[route]]
prefix = "/oauth/"
upstream = "genesys-login"

[[route]]
prefix = "/ivr/"
strip_prefix = true
upstream = "genesys-api"
priority = "critical"

[[limit]]
name = "per-client"
upstream = "genesys-api"
scope = "client"
requests = {QUOTA}
per = "{WINDOW_SECS}s"

[[limit]]
name = "org"
upstream = "genesys-api"
scope = "global"
requests = 3000
per = "{WINDOW_SECS}s"

[queue]
max_wait = "2s"
critical_reserve = 0.2
bulk_share = 0.5
"#
    ))
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// What one workload saw.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    ok: AtomicU64,
    upstream_429: AtomicU64,
    shed: AtomicU64,
    other: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
}

impl Tally {
    fn record(&self, status: StatusCode, from_pacer: bool, took: Duration) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        let counter = match status {
            s if s.is_success() => &self.ok,
            StatusCode::TOO_MANY_REQUESTS if from_pacer => &self.shed,
            StatusCode::TOO_MANY_REQUESTS => &self.upstream_429,
            _ => &self.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut l) = self.latencies_us.lock() {
            l.push(took.as_micros() as u64);
        }
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        let Ok(mut l) = self.latencies_us.lock() else {
            return 0.0;
        };
        if l.is_empty() {
            return 0.0;
        }
        l.sort_unstable();
        let i = ((l.len() as f64 - 1.0) * p).round() as usize;
        l[i.min(l.len() - 1)] as f64 / 1000.0
    }

    fn row(&self, name: &str) -> String {
        format!(
            "  {:<6} {:>7} {:>7} {:>13} {:>7} {:>7} {:>9.1} {:>9.1}",
            name,
            self.sent.load(Ordering::Relaxed),
            self.ok.load(Ordering::Relaxed),
            self.upstream_429.load(Ordering::Relaxed),
            self.shed.load(Ordering::Relaxed),
            self.other.load(Ordering::Relaxed),
            self.percentile_ms(0.5),
            self.percentile_ms(0.99),
        )
    }
}

const HEADER: &str = "  caller    sent      ok  upstream 429    shed   other   p50 ms    p99 ms";

async fn token(client: &HttpClient, base: &str) -> Result<String, DemoError> {
    use base64::Engine as _;
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"));
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("{base}/oauth/token"))
        .header(header::AUTHORIZATION, format!("Basic {basic}"))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from_static(
            b"grant_type=client_credentials",
        )))
        .map_err(|e| DemoError::Token(e.to_string()))?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| DemoError::Token(e.to_string()))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| DemoError::Token(e.to_string()))?
        .to_bytes();
    let v: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| DemoError::Token(format!("{status}: {e}")))?;
    v["access_token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| DemoError::Token(format!("{status}: no access_token")))
}

async fn call(client: &HttpClient, method: Method, url: &str, token: &str, tally: &Tally) {
    let started = Instant::now();
    let Ok(auth) = HeaderValue::from_str(&format!("Bearer {token}")) else {
        return;
    };
    let Ok(req) = Request::builder()
        .method(method)
        .uri(url)
        .header(header::AUTHORIZATION, auth)
        .body(Full::new(Bytes::new()))
    else {
        return;
    };
    match client.request(req).await {
        Ok(resp) => {
            let status = resp.status();
            let from_pacer = resp.headers().contains_key("x-pacer-reason");
            let _ = resp.into_body().collect().await;
            tally.record(status, from_pacer, started.elapsed());
        }
        Err(_) => tally.record(StatusCode::BAD_GATEWAY, false, started.elapsed()),
    }
}

/// The per-client ceiling pacer holds for the demo client now, and why, from its
/// adaptive state (`None` while nothing lowers it).
fn learned_ceiling(pacer: &app::Running) -> Option<String> {
    let reports = pacer.proxy().adaptive.reports();
    let r = reports.iter().find(|r| &*r.key.1 == CLIENT_ID)?;
    let ceiling = crate::limit::scaled(QUOTA, r.client_share);
    let why = match r.allowed {
        Some(allowed) if r.factor >= 1.0 => format!("inin-ratelimit-allowed: {allowed}"),
        Some(allowed) => format!(
            "inin-ratelimit-allowed: {allowed}, {} cut(s) after upstream 429s",
            r.cuts
        ),
        None => format!("{} cut(s) after upstream 429s", r.cuts),
    };
    Some(format!("{ceiling} of {QUOTA} ({why})"))
}

/// Runs one phase against `base` (the simulator or pacer) for `length`.
async fn phase(
    title: &str,
    base: &str,
    ivr_prefix: &str,
    length: Duration,
    pacer: Option<&app::Running>,
) -> Result<(Arc<Tally>, Arc<Tally>), DemoError> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(128)
        .build(http);
    let token = token(&client, base).await?;
    let bulk = Arc::new(Tally::default());
    let ivr = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for worker in 0..BULK_WORKERS {
        let (client, token, bulk, stop) =
            (client.clone(), token.clone(), bulk.clone(), stop.clone());
        let url = format!("{base}/api/v2/analytics/conversations/details/query?page={worker}");
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let before =
                    bulk.upstream_429.load(Ordering::Relaxed) + bulk.shed.load(Ordering::Relaxed);
                call(&client, Method::POST, &url, &token, &bulk).await;
                // A runaway job: it ignores Retry-After and retries almost at once.
                if bulk.upstream_429.load(Ordering::Relaxed) + bulk.shed.load(Ordering::Relaxed)
                    > before
                {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            }
        }));
    }
    {
        let (client, token, ivr, stop) = (client.clone(), token.clone(), ivr.clone(), stop.clone());
        let url = format!("{base}{ivr_prefix}/api/v2/integrations/actions/lookup-account/execute");
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / IVR_PER_SECOND));
            let mut calls = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let (client, token, ivr, url) =
                    (client.clone(), token.clone(), ivr.clone(), url.clone());
                calls.push(tokio::spawn(async move {
                    call(&client, Method::POST, &url, &token, &ivr).await
                }));
            }
            for c in calls {
                let _ = c.await;
            }
        }));
    }
    println!("\n{title}");
    println!("{HEADER}");
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(2));
    ticker.tick().await;
    while started.elapsed() < length {
        ticker.tick().await;
        println!(
            "{}   [{:>4.1}s]",
            bulk.row("bulk"),
            started.elapsed().as_secs_f64()
        );
        println!("{}", ivr.row("ivr"));
        if let Some(ceiling) = pacer.and_then(learned_ceiling) {
            println!("  pacer: learned per-client ceiling {ceiling}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    Ok((bulk, ivr))
}

/// Runs the demo; `Ok(true)` when the verdict holds. `sim_limit` makes the simulator grant
/// the client fewer requests per window than pacer's configured quota.
pub async fn run(duration: Duration, sim_limit: Option<u64>) -> Result<bool, DemoError> {
    let half = (duration / 2).max(Duration::from_secs(3));
    // Below 200 the IVR's 36 calls per window outgrow the 20% critical reserve of the
    // real budget and queue (no 429, but the point of the demo is lost).
    let real = sim_limit.unwrap_or(QUOTA).clamp(200, QUOTA);
    println!("pacer demo: a runaway bulk export and IVR Data Actions share one OAuth client.");
    println!(
        "The simulator enforces Genesys' limits with time scaled 10x: {real} requests per {WINDOW_SECS} s per client \
         stands for {real} per minute. Bulk: {BULK_WORKERS} workers retrying at once; IVR: {IVR_PER_SECOND} calls/s."
    );
    if real < QUOTA {
        println!(
            "pacer is configured for {QUOTA} per window: it has to learn the smaller real budget \
             from the answers' inin-ratelimit-allowed."
        );
    }
    let sim = Simulator::start(SocketAddr::from(([127, 0, 0, 1], 0)), sim_config(real))
        .await
        .map_err(DemoError::Sim)?;

    let (_, direct_ivr) = phase("Phase 1: straight to the API", &sim.url(), "", half, None).await?;
    let direct_stats = sim.stats();

    sim.reset();
    let pacer = app::start(pacer_config(sim.addr())?).await?;
    let base = format!("http://{}", pacer.proxy_addr);
    let (bulk, ivr) = phase(
        "Phase 2: the same load through pacer",
        &base,
        "/ivr",
        half,
        Some(&pacer),
    )
    .await?;
    let stats = sim.stats();
    let learned = learned_ceiling(&pacer);
    pacer.shutdown().await;
    sim.shutdown().await;

    let direct_ivr_429 = direct_ivr.upstream_429.load(Ordering::Relaxed);
    let ivr_failed = ivr.sent.load(Ordering::Relaxed) - ivr.ok.load(Ordering::Relaxed);
    let upstream_429 = stats.total.too_many;
    let quota_windows = half.as_secs_f64() / WINDOW_SECS as f64;
    println!("\nVerdict");
    println!(
        "  direct:      the API answered 429 to {} requests, {} of them the IVR's",
        direct_stats.total.too_many, direct_ivr_429
    );
    println!(
        "  with pacer:  the API answered 429 to {upstream_429} requests; the IVR had {ivr_failed} failures of {} calls (p99 {:.1} ms)",
        ivr.sent.load(Ordering::Relaxed),
        ivr.percentile_ms(0.99)
    );
    println!(
        "               bulk was paced: {} served, {} shed by pacer with Retry-After; the API served {} requests \
         of a quota of about {:.0} (20% of every window stays reserved for critical traffic)",
        bulk.ok.load(Ordering::Relaxed),
        bulk.shed.load(Ordering::Relaxed),
        stats.total.ok,
        quota_windows.ceil() * real as f64
    );
    if let Some(ceiling) = &learned {
        println!("               pacer's per-client ceiling: {ceiling}");
    }
    let holds = direct_ivr_429 > 0
        && ivr_failed == 0
        && upstream_429 == 0
        && ivr.sent.load(Ordering::Relaxed) > 0;
    if holds {
        println!("  PASS: through pacer the IVR got no 429 and the API never had to say 429.");
    } else {
        println!("  FAIL: the verdict does not hold (see the numbers above).");
    }
    Ok(holds)
}
