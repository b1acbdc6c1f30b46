//! Soak: `PACER_SOAK_REQUESTS` requests (default 100 000) at 200 concurrent through pacer
//! to the built-in simulator, with per-client limits tight enough that some requests queue
//! and some are shed. Then everything is reconciled: every request got exactly one answer;
//! the callers' counts equal pacer's `pacer_requests_total` and the simulator's counts; the
//! simulator never answered 429; memory and open descriptors are flat at the end.
//!
//! The figures go to `target/soak-report.txt`. `bench/soak.sh` runs 10^6 in release mode.

use crate::support::*;
use base64::Engine as _;
use http::{Method, StatusCode};
use pacer::sim::{SimConfig, Simulator};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DEFAULT_REQUESTS: usize = 100_000;
const CONCURRENCY: usize = 200;
/// Requests per second each OAuth client may send: the simulator's limit and pacer's. Low
/// enough that 200 greedy callers overrun it even on a slow, loaded machine (a debug
/// build under a load average of 10 still sent ~900/s in all), so the load is always
/// shaped: some requests wait, some are shed, whatever the machine's speed.
const PER_SECOND: u64 = 300;
const CLIENTS: [(&str, &str); 2] = [("soak-a", "soak-a-secret"), ("soak-b", "soak-b-secret")];
/// The whole soak, warm-up and reconciliation included, must end within this.
const SOAK_LIMIT: Duration = Duration::from_secs(600);

fn requests() -> usize {
    std::env::var("PACER_SOAK_REQUESTS")
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(DEFAULT_REQUESTS)
}

/// Open file descriptors of this process.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn report_path() -> std::path::PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("soak-report.txt")
}

/// What the callers saw, by answer.
#[derive(Debug, Default)]
struct Tally {
    by_status: BTreeMap<u16, u64>,
    /// 429s pacer itself answered (`x-pacer-reason`), by reason.
    shed: BTreeMap<String, u64>,
    /// 429s that came from the upstream.
    upstream_429: u64,
    transport_errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn answers(&self) -> u64 {
        self.by_status.values().sum()
    }
    fn shed_total(&self) -> u64 {
        self.shed.values().sum()
    }
    fn ok(&self) -> u64 {
        self.by_status
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, n)| n)
            .sum()
    }
    fn merge(&mut self, other: Tally) {
        for (s, n) in other.by_status {
            *self.by_status.entry(s).or_default() += n;
        }
        for (r, n) in other.shed {
            *self.shed.entry(r).or_default() += n;
        }
        self.upstream_429 += other.upstream_429;
        self.transport_errors += other.transport_errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// `pacer_requests_total` summed by `outcome`.
fn requests_by_outcome(metrics: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for sample in prom_samples(metrics) {
        if let (true, Some(outcome)) = (
            sample.name == "pacer_requests_total",
            sample.label("outcome"),
        ) {
            *out.entry(outcome.to_string()).or_default() += sample.value as u64;
        }
    }
    out
}

async fn token(client: &TestClient, id: &str, secret: &str) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
    let req = client
        .request(Method::POST, "/oauth/token")
        .header("authorization", format!("Basic {b64}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(full("grant_type=client_credentials"))
        .expect("request");
    let r = client.send(req).await;
    assert_eq!(r.status, StatusCode::OK, "token: {}", r.text());
    r.json()["access_token"]
        .as_str()
        .expect("access_token")
        .to_string()
}

/// Sends requests `next..total` (shared counter) one after another, tallying the answers.
async fn worker(
    client: Arc<TestClient>,
    tokens: Arc<Vec<String>>,
    next: Arc<AtomicUsize>,
    total: usize,
) -> Tally {
    let mut tally = Tally::default();
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= total {
            return tally;
        }
        let auth = format!("Bearer {}", tokens[i % tokens.len()]);
        let req = client
            .request(Method::GET, &format!("/api/v2/users/{}", i % 1000))
            .header("authorization", auth)
            .body(empty())
            .expect("request");
        let resp = match client.send_streaming_result(req).await {
            Ok(r) => r,
            Err(e) => {
                tally.transport_errors += 1;
                tally.first_error.get_or_insert_with(|| format!("{e:?}"));
                continue;
            }
        };
        let status = resp.status();
        let reason = resp
            .headers()
            .get("x-pacer-reason")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        // Read the whole answer: a body cut short is a transport error too.
        if let Err(e) = count_body(resp.into_body(), |_| {}).await {
            tally.transport_errors += 1;
            tally
                .first_error
                .get_or_insert_with(|| format!("body: {e:?}"));
            continue;
        }
        *tally.by_status.entry(status.as_u16()).or_default() += 1;
        if status == StatusCode::TOO_MANY_REQUESTS {
            match reason {
                Some(r) => *tally.shed.entry(r).or_default() += 1,
                None => tally.upstream_429 += 1,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_reconciles_callers_pacer_and_upstream() {
    let _slot = slot(Load::Alone).await;
    let n = requests();
    let outcome = tokio::time::timeout(SOAK_LIMIT, soak(n)).await;
    outcome.unwrap_or_else(|_| panic!("soak of {n} requests did not finish within {SOAK_LIMIT:?}"));
}

async fn soak(n: usize) {
    let clients: String = CLIENTS
        .iter()
        .map(|(id, secret)| format!("[[client]]\nid = \"{id}\"\nsecret = \"{secret}\"\n"))
        .collect();
    let sim_config = SimConfig::from_toml_str(&format!(
        "window = \"1s\"\nlatency = \"2ms\"\nclient_requests = {PER_SECOND}\n\
         org_requests = 1000000\ntoken_requests = 100\n{clients}"
    ))
    .expect("simulator config");
    let sim = Simulator::start("127.0.0.1:0".parse().expect("addr"), sim_config)
        .await
        .expect("simulator starts");
    let url = sim.url();
    let named: String = CLIENTS
        .iter()
        .map(|(id, _)| format!("[[client]]\nid = \"{id}\"\n\n"))
        .collect();
    // pacer enforces the simulator's own per-client window; a short max_wait makes some
    // requests wait and sheds the rest.
    let pacer = start_pacer(&format!(
        "[[upstream]]\nname = \"api\"\nurl = \"{url}\"\npool_idle_timeout = \"1s\"\n\n\
         [[upstream]]\nname = \"login\"\nurl = \"{url}\"\npool_idle_timeout = \"1s\"\n\n\
         [[route]]\nprefix = \"/\"\nupstream = \"api\"\n\n\
         [[route]]\nprefix = \"/oauth/\"\nupstream = \"login\"\n\n\
         [identity]\ntokens_me = false\n\n{named}\
         [[limit]]\nname = \"per-client\"\nupstream = \"api\"\nscope = \"client\"\n\
         requests = {PER_SECOND}\nper = \"1s\"\n\n\
         [queue]\nmax_wait = \"100ms\"\nmax_depth = 100000\n"
    ))
    .await;
    let admin = TestClient::http1(pacer.admin_addr.expect("admin listener"));
    let fds_start = open_fds();
    let rss_start = vm_rss_bytes().unwrap_or(0);

    let client = Arc::new(TestClient::http1(pacer.proxy_addr));
    let mut tokens = Vec::new();
    let mut callers = Tally::default();
    for (id, secret) in CLIENTS {
        tokens.push(token(&client, id, secret).await);
        *callers.by_status.entry(200).or_default() += 1;
    }
    let tokens = Arc::new(tokens);

    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let rss_peak = Arc::new(Peak::default());
    let sampler = {
        let (peak, next) = (rss_peak.clone(), next.clone());
        tokio::spawn(async move {
            loop {
                peak.sample_rss();
                if next.load(Ordering::Relaxed) >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| tokio::spawn(worker(client.clone(), tokens.clone(), next.clone(), n)))
        .collect();
    let mut load = Tally::default();
    for w in workers {
        load.merge(w.await.expect("worker"));
    }
    let duration = started.elapsed();
    let _ = sampler.await;
    callers.merge(load);

    let metrics = admin.get("/metrics", &[]).await.text();
    let status = admin.get("/status", &[]).await.json();
    let stats = sim.stats();

    // Connections close: the callers' pool, then pacer's idle upstream pool (1s idle timeout).
    drop(client);
    let rss_end_loaded = vm_rss_bytes().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(15);
    while open_fds() > fds_start + 20 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let fds_end = open_fds();
    let rss_end = vm_rss_bytes().unwrap_or(0);

    let pacer_counts = requests_by_outcome(&metrics);
    let forwarded = pacer_counts.get("forwarded").copied().unwrap_or(0);
    let shed = pacer_counts.get("shed").copied().unwrap_or(0);
    let sent = n as u64 + CLIENTS.len() as u64;
    let mut report = String::new();
    let _ = writeln!(
        report,
        "pacer soak, {} build",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    let _ = writeln!(report, "requests: {n} (+{} token requests), {CONCURRENCY} concurrent, {} clients at {PER_SECOND}/s each", CLIENTS.len(), CLIENTS.len());
    let _ = writeln!(
        report,
        "duration: {:.1}s ({:.0} requests/s)",
        duration.as_secs_f64(),
        n as f64 / duration.as_secs_f64()
    );
    let _ = writeln!(
        report,
        "answers: {} by status {:?}",
        callers.answers(),
        callers.by_status
    );
    let _ = writeln!(
        report,
        "shed by pacer (429 + x-pacer-reason): {} {:?}; upstream 429s seen by callers: {}",
        callers.shed_total(),
        callers.shed,
        callers.upstream_429
    );
    let _ = writeln!(
        report,
        "transport errors: {} {}",
        callers.transport_errors,
        callers.first_error.as_deref().unwrap_or("")
    );
    let _ = writeln!(report, "pacer_requests_total: {pacer_counts:?}");
    let _ = writeln!(
        report,
        "simulator: requests {} ok {} too_many {} unauthorized {} other {}; max in flight {}",
        stats.total.requests,
        stats.total.ok,
        stats.total.too_many,
        stats.total.unauthorized,
        stats.total.other,
        stats.max_inflight
    );
    let _ = writeln!(
        report,
        "pacer status after: queue {} limiter_keys {}",
        status["queue"], status["limiter_keys"]
    );
    let _ = writeln!(
        report,
        "RSS: start {:.1} MiB, peak {:.1} MiB, end (loaded) {:.1} MiB, end {:.1} MiB",
        mib(rss_start),
        mib(rss_peak.get()),
        mib(rss_end_loaded),
        mib(rss_end)
    );
    let _ = writeln!(report, "fds: start {fds_start}, end {fds_end}");
    eprintln!("{report}");
    let path = report_path();
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = std::fs::write(&path, &report) {
        eprintln!("cannot write {}: {e}", path.display());
    }

    // Every request got exactly one answer.
    assert_eq!(callers.transport_errors, 0, "{report}");
    assert_eq!(callers.answers(), sent, "{report}");
    // The load was shaped: some requests waited and went through, some were shed.
    assert!(callers.shed_total() > 0, "nothing was shed:\n{report}");
    assert!(
        callers.ok() > CLIENTS.len() as u64,
        "nothing was served:\n{report}"
    );
    // Callers == pacer's metrics.
    assert_eq!(shed, callers.shed_total(), "{report}");
    assert_eq!(forwarded, sent - callers.shed_total(), "{report}");
    assert_eq!(pacer_counts.values().sum::<u64>(), sent, "{report}");
    // Callers == the simulator: every 2xx was the simulator's, and it never said 429.
    assert_eq!(stats.total.ok, callers.ok(), "{report}");
    assert_eq!(stats.total.requests, forwarded, "{report}");
    assert_eq!(stats.total.too_many, 0, "{report}");
    assert_eq!(callers.upstream_429, 0, "{report}");
    // Admission state drained.
    for p in ["critical", "normal", "bulk"] {
        assert_eq!(status["queue"][p], 0, "{report}");
    }
    // Flat at the end: descriptors back, memory bounded.
    assert!(fds_end <= fds_start + 20, "{report}");
    assert!(
        rss_end.saturating_sub(rss_start) < 256 << 20,
        "RSS grew by more than 256 MiB:\n{report}"
    );
    pacer.shutdown().await;
    sim.shutdown().await;
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[test]
fn parses_requests_total_by_outcome() {
    let text = "# TYPE pacer_requests_total counter\n\
        pacer_requests_total{upstream=\"api\",client=\"a\",endpoint=\"GET /x\",outcome=\"forwarded\"} 3\n\
        pacer_requests_total{upstream=\"api\",client=\"b\",endpoint=\"GET /x\",outcome=\"forwarded\"} 4\n\
        pacer_requests_total{upstream=\"api\",client=\"b\",endpoint=\"GET /x\",outcome=\"shed\"} 5\n\
        pacer_shed_total{upstream=\"api\",client=\"b\",reason=\"x\"} 5\n";
    let m = requests_by_outcome(text);
    assert_eq!(m.get("forwarded"), Some(&7));
    assert_eq!(m.get("shed"), Some(&5));
    assert_eq!(m.len(), 2);
}
