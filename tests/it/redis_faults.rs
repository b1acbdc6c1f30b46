//! Redis faults under a running pacer: a real `redis-server` on a free loopback port,
//! reached directly or through a fault-injecting TCP proxy of the test's own, with
//! `[state] timeout = "100ms"`, in front of the simulator.
//!
//! Each case runs a paced load (a fixed request rate, so that local shares padded to the
//! previous use never hold anything back), injects one fault, removes it and checks that:
//! every request got an answer (200 or pacer's own 429, never a 5xx or a transport error);
//! the latency added during the fault stays within about the Redis timeout; the breaker
//! stops asking Redis (latency back near the baseline while Redis is still broken); nothing
//! grows (limiter keys, queues, open descriptors, memory, the proxy's connections); and that
//! after the fault the backend reports up again within 10 s and admissions go through Redis
//! again (`evalsha` calls increase, keys appear under the prefix).

use crate::support::redis::{one_client_sim, shared_limit_config, status, wait_up, RedisServer};
use crate::support::{self, slot, token_via, TestClient};
use http::StatusCode;
use http_body_util::BodyExt;
use pacer::sim::Simulator;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};

/// pacer's `[state] timeout`.
const REDIS_TIMEOUT: Duration = Duration::from_millis(100);
/// Slack for a loaded 2-core machine on top of the Redis timeout.
const SLACK: Duration = Duration::from_millis(150);
/// Upper bound of one case.
const CASE_LIMIT: Duration = Duration::from_secs(90);
/// Paced load: this many callers, each sending one request per period.
const WORKERS: usize = 4;
const PERIOD: Duration = Duration::from_millis(20);
/// pacer's limit per client per second; the simulator allows five times as much.
const QUOTA: u64 = 1000;
const PREFIX: &str = "pacer-faults";

async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(CASE_LIMIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {CASE_LIMIT:?}"),
    }
}

/// Rate keys under the test prefix.
fn rate_keys(redis: &RedisServer) -> Vec<String> {
    redis
        .cli(&["--scan", "--pattern", &format!("{{{PREFIX}}}:r:*")])
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect()
}

// ---------------------------------------------------------------------------------------
// fault-injecting TCP proxy

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Bytes flow both ways.
    Pass,
    /// Nothing is forwarded nor answered; new connections are accepted and held. Held
    /// bytes flow again, in order, when the mode changes back (a partition that heals).
    Blackhole,
    /// Every chunk is delayed this long.
    Slow(Duration),
    /// Every connection is closed and new ones are refused (nothing listens).
    Cut,
    /// Like a blackhole, but connections that saw it stay dead for good, without a reset:
    /// after it heals only new connections get through.
    Partition,
}

/// A TCP proxy on `127.0.0.1` in front of `target`, with a switchable fault.
struct FaultProxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
    accept: JoinHandle<()>,
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

impl FaultProxy {
    fn start(target: SocketAddr) -> FaultProxy {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, rx) = watch::channel(Mode::Pass);
        let conns = Arc::new(Mutex::new(Vec::new()));
        let accept = tokio::spawn(accept_loop(listener, target, rx, conns.clone()));
        FaultProxy {
            addr,
            mode,
            conns,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
        let mut conns = self.conns.lock().unwrap();
        if mode == Mode::Cut {
            for c in conns.drain(..) {
                c.abort();
            }
        } else {
            conns.retain(|c| !c.is_finished());
        }
    }

    /// Connections currently proxied (or held).
    fn live(&self) -> usize {
        let mut conns = self.conns.lock().unwrap();
        conns.retain(|c| !c.is_finished());
        conns.len()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    mut rx: watch::Receiver<Mode>,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
) {
    let addr = listener.local_addr().unwrap();
    let mut listener = Some(listener);
    loop {
        let mode = *rx.borrow_and_update();
        if mode == Mode::Cut {
            // Refuse: the port has no listener until the cut ends.
            listener = None;
            if rx.changed().await.is_err() {
                return;
            }
            continue;
        }
        let Some(l) = &listener else {
            let started = Instant::now();
            loop {
                match listen(addr) {
                    Ok(l) => {
                        listener = Some(l);
                        break;
                    }
                    Err(e) => {
                        assert!(
                            started.elapsed() < Duration::from_secs(3),
                            "fault proxy could not listen on {addr} again: {e}"
                        );
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            continue;
        };
        tokio::select! {
            accepted = l.accept() => {
                if let Ok((client, _)) = accepted {
                    let task = tokio::spawn(serve(client, target, rx.clone()));
                    conns.lock().unwrap().push(task.abort_handle());
                }
            }
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// Waits while blackholed; false once cut.
async fn open(rx: &mut watch::Receiver<Mode>) -> bool {
    loop {
        let mode = *rx.borrow_and_update();
        match mode {
            Mode::Cut => return false,
            Mode::Blackhole => {}
            Mode::Partition => std::future::pending::<()>().await,
            Mode::Pass | Mode::Slow(_) => return true,
        }
        if rx.changed().await.is_err() {
            return false;
        }
    }
}

async fn serve(client: TcpStream, target: SocketAddr, mut rx: watch::Receiver<Mode>) {
    // A connection made while blackholed is held, not forwarded.
    if !open(&mut rx).await {
        return;
    }
    let Ok(upstream) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    tokio::select! {
        _ = pump(cr, uw, rx.clone()) => {}
        _ = pump(ur, cw, rx) => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut rx: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if !open(&mut rx).await {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !open(&mut rx).await {
            return;
        }
        let mode = *rx.borrow();
        if let Mode::Slow(delay) = mode {
            tokio::time::sleep(delay).await;
        }
        if !open(&mut rx).await {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------
// simulator, pacer

async fn sim() -> Simulator {
    one_client_sim("faults", QUOTA * 5, "1s").await
}

fn pacer_config(sim: SocketAddr, redis_url: &str) -> String {
    let state = format!(
        "url = \"{redis_url}\"\nkey_prefix = \"{PREFIX}\"\ntimeout = \"{}ms\"",
        REDIS_TIMEOUT.as_millis()
    );
    shared_limit_config(sim, QUOTA, "1s", "", "50ms", &state)
}

async fn token(addr: SocketAddr) -> String {
    token_via(&TestClient::http1(addr), "faults", "s3cret").await
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

// ---------------------------------------------------------------------------------------
// paced load

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// pacer's own 429 (it carries `x-pacer-reason`).
    Shed,
    Other(u16),
    /// Transport failure or no answer within 5 s.
    Error,
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    /// When the request was sent, since the load started.
    at: Duration,
    latency: Duration,
    outcome: Outcome,
}

struct Load {
    t0: Instant,
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, token: &str) -> Load {
        let t0 = Instant::now();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for i in 0..WORKERS {
            let (client, token, samples, stop) = (
                TestClient::http1(addr),
                token.to_string(),
                samples.clone(),
                stop.clone(),
            );
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(PERIOD * i as u32 / WORKERS as u32).await;
                let mut tick = tokio::time::interval(PERIOD);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let req = client.get_as("/api/v2/users", &token);
                    let sent = Instant::now();
                    let answer = tokio::time::timeout(Duration::from_secs(5), async {
                        let resp = client.send_streaming_result(req).await.ok()?;
                        let status = resp.status();
                        let shed = resp.headers().contains_key("x-pacer-reason");
                        resp.into_body().collect().await.ok()?;
                        Some((status, shed))
                    })
                    .await;
                    let outcome = match answer {
                        Ok(Some((StatusCode::OK, _))) => Outcome::Ok,
                        Ok(Some((StatusCode::TOO_MANY_REQUESTS, true))) => Outcome::Shed,
                        Ok(Some((s, _))) => Outcome::Other(s.as_u16()),
                        _ => Outcome::Error,
                    };
                    samples.lock().unwrap().push(Sample {
                        at: sent - t0,
                        latency: sent.elapsed(),
                        outcome,
                    });
                }
            }));
        }
        Load {
            t0,
            samples,
            stop,
            tasks,
        }
    }

    fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    /// Samples of requests sent in `[from, to)`.
    fn between(&self, from: Duration, to: Duration) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.at >= from && s.at < to)
            .copied()
            .collect()
    }

    async fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let samples = self.samples.lock().unwrap().clone();
        samples
    }
}

/// Cumulative counts of pacer's `pacer_queue_wait_seconds` histogram (all labels), by
/// bucket bound: what pacer itself measured of how long it held requests before sending.
#[derive(Debug, Clone, Default)]
struct Waits(Vec<(f64, f64)>);

impl Waits {
    async fn scrape(pacer: &pacer::app::Running) -> Waits {
        let text = TestClient::http1(pacer.admin_addr.expect("admin listener"))
            .get("/metrics", &[])
            .await
            .text();
        let mut by_le: std::collections::BTreeMap<u64, f64> = Default::default();
        for s in crate::support::prom_samples(&text) {
            if s.name != "pacer_queue_wait_seconds_bucket" {
                continue;
            }
            let le = match s.label("le") {
                Some("+Inf") => f64::INFINITY,
                Some(v) => v.parse().expect("bucket bound"),
                None => continue,
            };
            *by_le.entry(le.to_bits()).or_default() += s.value;
        }
        let mut v: Vec<(f64, f64)> = by_le
            .into_iter()
            .map(|(b, n)| (f64::from_bits(b), n))
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        Waits(v)
    }

    /// The admissions between `earlier` and this snapshot, as a histogram of their own.
    fn since(&self, earlier: &Waits) -> Waits {
        let before = |le: f64| {
            earlier
                .0
                .iter()
                .find(|(b, _)| *b == le)
                .map_or(0.0, |(_, n)| *n)
        };
        Waits(self.0.iter().map(|&(le, n)| (le, n - before(le))).collect())
    }

    fn count(&self) -> f64 {
        self.0.last().map_or(0.0, |(_, n)| *n)
    }

    /// The smallest bucket bound that holds at least the share `q` of the admissions.
    fn quantile_bound(&self, q: f64) -> Duration {
        let want = q * self.count();
        let le = self
            .0
            .iter()
            .find(|(_, n)| *n >= want)
            .map_or(f64::INFINITY, |(le, _)| *le);
        Duration::try_from_secs_f64(le).unwrap_or(Duration::MAX)
    }
}

impl std::fmt::Display for Waits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "n={} p50≤{:?} p99≤{:?}",
            self.count(),
            self.quantile_bound(0.5),
            self.quantile_bound(0.99)
        )
    }
}

/// Latency figures of a set of samples.
#[derive(Debug, Clone, Copy)]
struct Lat {
    n: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Lat {
    fn of(samples: &[Sample]) -> Lat {
        let mut l: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
        l.sort();
        let q = |p: f64| -> Duration {
            if l.is_empty() {
                Duration::ZERO
            } else {
                l[((l.len() - 1) as f64 * p).round() as usize]
            }
        };
        Lat {
            n: l.len(),
            p50: q(0.5),
            p99: q(0.99),
            max: l.last().copied().unwrap_or_default(),
        }
    }
}

impl std::fmt::Display for Lat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "n={} p50={:.1}ms p99={:.1}ms max={:.1}ms",
            self.n,
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.max.as_secs_f64() * 1e3
        )
    }
}

// ---------------------------------------------------------------------------------------
// the cases

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// redis-server killed, then started again on the same port.
    Down,
    /// The proxy forwards nothing and answers nothing.
    Blackhole,
    /// The proxy delays every chunk by 300 ms.
    Slow,
    /// `maxmemory 1` + `noeviction`: writes fail with -OOM. Not the admission script's,
    /// though: Redis lets a script without flags go on writing past maxmemory once it has
    /// called a write command, and the script's first one is the window trim
    /// (`ZREMRANGEBYSCORE`, not deny-oom). Admissions stay shared; the heartbeat's `ZADD`,
    /// write-through and replay are refused, so the backend reports down.
    Oom,
    /// `REPLICAOF` a dead port: writes fail with -READONLY.
    ReadOnly,
    /// The proxy toggles between pass and cut every 300 ms for 5 s.
    Flap,
    /// A partition whose connections never come back: recovery needs new ones.
    Partition,
}

impl Fault {
    fn through_proxy(self) -> bool {
        matches!(
            self,
            Fault::Blackhole | Fault::Slow | Fault::Flap | Fault::Partition
        )
    }

    /// Redis is unusable the whole time (not merely now and then).
    fn steady(self) -> bool {
        self != Fault::Flap
    }

    /// The fault makes Redis wait rather than answer: only the breaker keeps requests fast.
    fn stalls(self) -> bool {
        matches!(self, Fault::Blackhole | Fault::Slow | Fault::Partition)
    }
}

/// Load before the fault, for the report's baseline figures only (nothing is asserted on it).
const BASELINE: Duration = Duration::from_secs(1);
const FAULT: Duration = Duration::from_secs(4);
const FLAP: Duration = Duration::from_secs(5);
/// The part of the fault at its end where the breaker must keep requests fast.
const TAIL: Duration = Duration::from_millis(1500);
const RECOVERY_LIMIT: Duration = Duration::from_secs(10);

async fn scenario(fault: Fault) {
    if std::env::var_os("FAULTS_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("pacer=debug,redis_faults=info")
            .try_init();
    }
    let mut redis = RedisServer::start().await;
    let proxy = Arc::new(FaultProxy::start(redis.addr()));
    let url = if fault.through_proxy() {
        proxy.url()
    } else {
        format!("redis://{}/", redis.addr())
    };
    let sim = sim().await;
    let pacer = crate::support::start_pacer(&pacer_config(sim.addr(), &url)).await;
    wait_up(&pacer, Duration::from_secs(10)).await;
    let token = token(pacer.proxy_addr).await;
    sim.reset();

    let load = Load::start(pacer.proxy_addr, &token);
    tokio::time::sleep(Duration::from_millis(500) + BASELINE).await;
    let fds_before = open_fds();
    let rss_before = crate::support::vm_rss_bytes().unwrap_or(0);
    let waits_at_fault = Waits::scrape(&pacer).await;
    let fault_at = load.now();
    tracing::warn!("FAULT INJECT");

    // Inject.
    let mut flapper = None;
    match fault {
        Fault::Down => redis.kill(),
        Fault::Blackhole => proxy.set(Mode::Blackhole),
        Fault::Partition => proxy.set(Mode::Partition),
        Fault::Slow => proxy.set(Mode::Slow(Duration::from_millis(300))),
        Fault::Oom => {
            assert_eq!(
                redis.cli(&["config", "set", "maxmemory-policy", "noeviction"]),
                "OK"
            );
            assert_eq!(redis.cli(&["config", "set", "maxmemory", "1"]), "OK");
        }
        Fault::ReadOnly => {
            let dead = crate::support::dead_addr().port().to_string();
            assert_eq!(redis.cli(&["replicaof", "127.0.0.1", &dead]), "OK");
        }
        Fault::Flap => {
            let toggles = proxy.clone();
            flapper = Some(tokio::spawn(async move {
                let started = Instant::now();
                let mut cut = false;
                while started.elapsed() < FLAP {
                    cut = !cut;
                    toggles.set(if cut { Mode::Cut } else { Mode::Pass });
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                toggles.set(Mode::Pass);
            }));
        }
    }
    let proxy_live_during;
    // Status polls that found the backend up while a steady fault lasted.
    let mut up_during = Vec::new();
    let mut polls = 0u32;
    // pacer's own waits when the fault's last stretch began (steady faults only).
    let mut waits_at_tail = None;
    if let Some(toggler) = flapper {
        toggler.await.unwrap();
        proxy_live_during = 0;
    } else {
        // Degraded while the fault lasts (after a moment to notice), still serving.
        let started = Instant::now();
        while started.elapsed() < FAULT {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if waits_at_tail.is_none() && started.elapsed() >= FAULT - TAIL {
                waits_at_tail = Some(Waits::scrape(&pacer).await);
            }
            if started.elapsed() < Duration::from_millis(500) {
                continue;
            }
            polls += 1;
            let st = status(&pacer).await;
            if st["state"]["up"] == true {
                up_during.push(started.elapsed());
            }
        }
        let ready = TestClient::http1(pacer.admin_addr.unwrap())
            .get("/readyz", &[])
            .await;
        assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());
        proxy_live_during = proxy.live();
    }
    let waits_at_heal = Waits::scrape(&pacer).await;
    let heal_at = load.now();
    tracing::warn!("FAULT HEAL");

    // Remove the fault.
    match fault {
        Fault::Down => redis.restart().await,
        Fault::Blackhole | Fault::Slow | Fault::Partition => proxy.set(Mode::Pass),
        Fault::Oom => {
            assert_eq!(redis.cli(&["config", "set", "maxmemory", "0"]), "OK");
        }
        Fault::ReadOnly => assert_eq!(redis.cli(&["replicaof", "no", "one"]), "OK"),
        Fault::Flap => {}
    }
    let recovered_in = wait_up(&pacer, RECOVERY_LIMIT).await;
    let recovered_at = load.now();

    // Admissions go through Redis again.
    let calls_before = redis.script_calls();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let calls_after = redis.script_calls();
    let sent_since = load.between(recovered_at, load.now()).len() as u64;
    let keys = rate_keys(&redis);
    let fds_after = open_fds();
    let rss_after = crate::support::vm_rss_bytes().unwrap_or(0);
    let proxy_live_after = proxy.live();
    let end = load.now();
    let samples = load.stop().await;
    let waits_at_end = Waits::scrape(&pacer).await;
    // pacer's own measure of how long it held requests, by phase.
    let held_during = waits_at_heal.since(&waits_at_fault);
    let held_tail = waits_at_tail
        .as_ref()
        .map(|at| waits_at_heal.since(at))
        .unwrap_or_default();
    let held_after = waits_at_end.since(&waits_at_heal);
    let st = status(&pacer).await;
    let stats = sim.stats();

    // Figures.
    let in_range = |from: Duration, to: Duration| -> Vec<Sample> {
        samples
            .iter()
            .filter(|s| s.at >= from && s.at < to)
            .copied()
            .collect()
    };
    let base = Lat::of(&in_range(fault_at - BASELINE, fault_at));
    let during = Lat::of(&in_range(fault_at, heal_at));
    let tail = Lat::of(&in_range(heal_at - TAIL, heal_at));
    let after = Lat::of(&in_range(heal_at, end));
    let count = |o: fn(&Outcome) -> bool| samples.iter().filter(|s| o(&s.outcome)).count();
    let ok = count(|o| *o == Outcome::Ok);
    let shed = count(|o| *o == Outcome::Shed);
    let bad: Vec<&Sample> = samples
        .iter()
        .filter(|s| matches!(s.outcome, Outcome::Other(_) | Outcome::Error))
        .collect();
    let report = format!(
        "[{fault:?}] requests {} (200: {ok}, pacer 429: {shed}, other: {}); \
         baseline {base}; fault {during}; fault tail {tail}; after {after}; \
         pacer's waits: fault {held_during}, fault tail {held_tail}, after {held_after}; \
         up again {recovered_in:?} after the fault ended; script calls +{} for {sent_since} \
         requests once up; rate keys {}; fds {fds_before} -> {fds_after}; \
         rss {:.1} -> {:.1} MiB; proxy conns during {proxy_live_during}, after {proxy_live_after}; \
         sim {:?}; status state {} limiter_keys {} queue {}; \
         up in {} of {polls} polls during the fault {up_during:?}",
        samples.len(),
        bad.len(),
        calls_after - calls_before,
        keys.len(),
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0,
        stats.total,
        st["state"],
        st["limiter_keys"],
        st["queue"],
        up_during.len(),
    );
    eprintln!("{report}");
    if let Some(dir) = option_env!("CARGO_TARGET_TMPDIR") {
        use std::io::Write as _;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(std::path::Path::new(&dir).join("redis-faults-report.txt"))
        {
            let _ = writeln!(f, "{report}");
        }
    }

    // Every request got an answer: 200 or pacer's own 429.
    assert!(
        bad.is_empty(),
        "{report}\nrequests without a 200 or pacer 429: {:?}",
        &bad[..bad.len().min(10)]
    );
    assert!(
        ok * 10 >= samples.len() * 9,
        "{report}\nfewer than 90% of requests were served"
    );
    assert_eq!(
        stats.total.too_many, 0,
        "{report}\nthe upstream answered 429"
    );
    assert_eq!(
        stats.total.ok, ok as u64,
        "{report}\nthe upstream served other than what callers got"
    );
    // Degraded while the fault lasted.
    if fault == Fault::Oom {
        // Noticed by the heartbeat (every 2 s while up), not by admissions.
        assert!(
            up_during.iter().all(|&t| t < FAULT - TAIL),
            "{report}\nreported up at the end of the fault"
        );
    } else if fault.steady() {
        assert!(
            up_during.is_empty(),
            "{report}\nreported up during the fault"
        );
    }
    // Added latency within about the Redis timeout, as pacer measured how long it held
    // requests before sending them (not the test's own clock).
    let bound = REDIS_TIMEOUT + SLACK;
    assert!(
        held_during.quantile_bound(0.99) <= bound,
        "{report}\npacer held requests longer than the Redis timeout + slack {bound:?} during the fault"
    );
    assert!(
        held_after.quantile_bound(0.99) <= bound,
        "{report}\npacer held requests longer than the Redis timeout + slack {bound:?} after it"
    );
    // The breaker skips Redis while it still stalls: in the fault's last stretch pacer holds
    // requests for far less than the Redis timeout (asking Redis would take all of it).
    if fault.stalls() && fault.steady() {
        assert!(
            held_tail.count() > 0.0,
            "{report}\nno admissions at the end of the fault"
        );
        assert!(
            held_tail.quantile_bound(0.5) <= REDIS_TIMEOUT / 2,
            "{report}\nthe median admission at the end of the fault still asked Redis"
        );
        assert!(
            held_tail.quantile_bound(0.99) <= REDIS_TIMEOUT,
            "{report}\nadmissions at the end of the fault still wait for the Redis timeout"
        );
    }
    // Recovery: up within the limit (checked by wait_up) and admissions through Redis.
    assert!(
        calls_after - calls_before >= sent_since / 2 && calls_after > calls_before,
        "{report}\nadmissions do not go through Redis again"
    );
    assert!(!keys.is_empty(), "{report}\nno rate keys in Redis");
    // Nothing grows.
    assert!(
        st["limiter_keys"].as_u64().unwrap() <= 8,
        "{report}\nlimiter keys grew"
    );
    for class in ["critical", "normal", "bulk"] {
        assert_eq!(st["queue"][class], 0, "{report}\nqueue not empty");
    }
    assert!(
        fds_after <= fds_before + 16,
        "{report}\nopen descriptors grew"
    );
    assert!(
        rss_after <= rss_before + 48 * 1024 * 1024,
        "{report}\nmemory grew"
    );
    if fault.through_proxy() {
        assert!(
            proxy_live_after <= 4,
            "{report}\nconnections to Redis piled up"
        );
    }
    pacer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_then_restarted() {
    let _slot = slot(support::Load::Busy).await;
    bounded("down", scenario(Fault::Down)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_blackholed() {
    let _slot = slot(support::Load::Busy).await;
    bounded("blackhole", scenario(Fault::Blackhole)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_slower_than_the_timeout() {
    let _slot = slot(support::Load::Busy).await;
    bounded("slow", scenario(Fault::Slow)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_out_of_memory() {
    let _slot = slot(support::Load::Busy).await;
    bounded("oom", scenario(Fault::Oom)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_read_only_replica() {
    let _slot = slot(support::Load::Busy).await;
    bounded("readonly", scenario(Fault::ReadOnly)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_flapping() {
    let _slot = slot(support::Load::Busy).await;
    bounded("flapping", scenario(Fault::Flap)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_partition_that_kills_the_connection() {
    let _slot = slot(support::Load::Busy).await;
    bounded("partition", scenario(Fault::Partition)).await;
}
