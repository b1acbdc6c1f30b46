//! Admission benchmarks (issue 10): the admission decision's latency with three layers for
//! 1, 10^4 and 10^6 keys; the memory pacer keeps per limiter key; and admission through
//! Redis on loopback (a `redis-server` of the benchmark's own), all in one run. Writes
//! `bench/results/admission.txt` with the date, the machine and the targets.
//!
//! `cargo bench --bench admission` runs it in full (about 30 s on 2 cores, most of it making the 10^6 keys). Under `cargo test` (no
//! `--bench` argument) every part runs on small sizes and checks what it measured, to prove
//! it still works, and writes nothing.
//!
//! Latency uses its own loop rather than criterion: the targets ask for the median and the
//! p99 of single decisions while callers cycle through up to 10^6 keys, and criterion
//! reports means of batched iterations. Each decision is timed on its own (the timer's own
//! cost is reported beside it), and an untimed pass gives the mean without that cost.
//!
//! Memory is counted by [`Counting`], a hand-written global allocator wrapper: about 20
//! lines, no new dependency, and it counts exactly what is needed (live bytes the program
//! asked for) with one relaxed atomic per call; heap profilers (dhat, heaptrack) cost far
//! more and report per site, not a live total. It wraps mimalloc, the pacer binary's own
//! allocator, so the latency figures are those of the binary; counts are the requested
//! sizes, so they do not depend on the allocator's size classes.

use futures_util::FutureExt as _;
use pacer::config::{Config, Priority};
use pacer::limit::LimitSet;
use pacer::queue::Admission;
use pacer::state::redis::RedisBackend;
use pacer::state::{Backend, Clock, LocalBackend};
use std::alloc::{GlobalAlloc, Layout};
use std::fmt::Write as _;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Live heap bytes, counted while [`COUNTING`] is on.
static LIVE: AtomicIsize = AtomicIsize::new(0);
/// On for the memory part, then switched off for good: latency is measured without the
/// counter's atomics. (Frees of blocks allocated while off would make the count wrong, so
/// it is never switched on again.)
static COUNTING: AtomicBool = AtomicBool::new(true);

/// The pacer binary's allocator, counting live bytes.
struct Counting;

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn count(delta: isize) {
    if COUNTING.load(Relaxed) {
        LIVE.fetch_add(delta, Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to mimalloc; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = mimalloc::MiMalloc.alloc(layout);
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = mimalloc::MiMalloc.alloc_zeroed(layout);
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        mimalloc::MiMalloc.dealloc(ptr, layout);
        count(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = mimalloc::MiMalloc.realloc(ptr, layout, new_size);
        if !p.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        p
    }
}

fn live() -> isize {
    LIVE.load(Relaxed)
}

/// Three layers on every request: one global key, one per caller, one per caller and
/// endpoint. Quotas that never bind.
const THREE_LAYERS: &str = r#"
[[upstream]]
name = "api"
url = "http://127.0.0.1:1"
[[route]]
prefix = "/"
upstream = "api"
[[limit]]
name = "org"
scope = "global"
requests = 1000000000
per = "60s"
[[limit]]
name = "per-client"
scope = "client"
requests = 100000000
per = "60s"
[[limit]]
name = "per-client-endpoint"
scope = "client+endpoint"
requests = 100000000
per = "60s"
"#;

/// One per-client limit of 300 per minute that normal traffic may fill whole.
const PER_MINUTE_300: &str = r#"
[[upstream]]
name = "api"
url = "http://127.0.0.1:1"
[[route]]
prefix = "/"
upstream = "api"
[queue]
critical_reserve = 0.0
[[limit]]
name = "per-client"
scope = "client"
requests = 300
per = "60s"
"#;

const PATH: &str = "/api/v2/users/8f9c1e2a-1b2c-4d5e-8f90-123456789abc";

struct Setup {
    config: Config,
    set: Arc<LimitSet>,
}

fn setup(toml: &str) -> Setup {
    let config = Config::parse(toml).expect("bench config parses");
    let set = Arc::new(LimitSet::new(&config.limits, &config.queue, |_| Some(0)));
    Setup { config, set }
}

/// A controller over local state; call inside a runtime.
fn local_admission(s: &Setup, max_keys: usize) -> Admission {
    let clock = Clock::default();
    let local: Arc<dyn Backend> = Arc::new(LocalBackend::new(s.set.clone(), clock));
    Admission::with_backend(
        s.set.clone(),
        local,
        clock,
        s.config.queue.clone(),
        max_keys,
    )
}

fn callers(n: usize) -> Vec<Arc<str>> {
    (0..n)
        .map(|i| Arc::from(format!("client-{i:07}")))
        .collect()
}

/// One admission decision as the pipeline makes it: the demand, the reservation (local
/// state answers at once, so it is polled once), its commit, and the permit's release.
fn decide(admission: &Admission, caller: &Arc<str>) {
    let demand = admission.demand(0, caller, &http::Method::GET, PATH, Priority::Normal);
    let admitted = admission
        .admit(demand, Some((0, caller.clone())), Duration::ZERO)
        .now_or_never();
    match admitted {
        Some(Ok(reservation)) => drop(reservation.commit()),
        Some(Err(refusal)) => panic!("refused for {caller}: {refusal:?}"),
        None => panic!("local admission did not answer at once for {caller}"),
    }
}

struct Percentiles {
    p50: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
}

fn percentiles(mut v: Vec<Duration>) -> Percentiles {
    assert!(!v.is_empty(), "no samples");
    v.sort_unstable();
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    Percentiles {
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        max: v[v.len() - 1],
    }
}

fn ns(d: Duration) -> String {
    format!("{} ns", d.as_nanos())
}

/// Median cost of reading the clock twice, the floor under every timed decision.
fn timer_overhead() -> Duration {
    let samples = (0..100_000)
        .map(|_| {
            let t = Instant::now();
            t.elapsed()
        })
        .collect();
    percentiles(samples).p50
}

struct LatencyRow {
    callers: usize,
    keys: usize,
    prewarm: Duration,
    timed: Percentiles,
    mean: Duration,
}

/// Decision latency with `n` callers cycling, each of which admitted once before (so every
/// key exists): `samples` decisions timed one by one, then as many untimed for the mean.
fn latency(s: &Setup, n: usize, samples: usize) -> LatencyRow {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _entered = runtime.enter();
    let admission = local_admission(s, 2 * n + 16);
    let callers = callers(n);
    let started = Instant::now();
    for caller in &callers {
        decide(&admission, caller);
    }
    let prewarm = started.elapsed();
    let keys = admission.keys();
    assert_eq!(
        keys,
        2 * n + 1,
        "three layers: one global key, two per caller"
    );
    let mut times = Vec::with_capacity(samples);
    for i in 0..samples {
        let caller = &callers[i % n];
        let t = Instant::now();
        decide(&admission, caller);
        times.push(t.elapsed());
    }
    let started = Instant::now();
    for i in 0..samples {
        decide(&admission, &callers[(i + samples) % n]);
    }
    let mean = started.elapsed() / samples as u32;
    // Nothing was refused, and nothing new: the overflow key never came into use.
    assert_eq!(admission.keys(), keys, "cycling created keys");
    LatencyRow {
        callers: n,
        keys,
        prewarm,
        timed: percentiles(times),
        mean,
    }
}

struct MemoryRow {
    what: &'static str,
    keys: usize,
    bytes: isize,
}

impl MemoryRow {
    fn per_key(&self) -> f64 {
        self.bytes as f64 / self.keys as f64
    }
}

/// Live bytes of `n` distinct callers admitted once each under three layers. The caller
/// names are made inside the measurement and only pacer keeps them, so they count.
fn memory_one_send(s: &Setup, n: usize) -> MemoryRow {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    let _entered = runtime.enter();
    let admission = local_admission(s, 2 * n + 16);
    // The global key and the classifier's label exist before any caller is counted.
    decide(&admission, &Arc::from("warm-up"));
    let keys_before = admission.keys();
    let before = live();
    for i in 0..n {
        decide(&admission, &Arc::from(format!("client-{i:07}")));
    }
    let bytes = live() - before;
    let keys = admission.keys() - keys_before;
    assert_eq!(keys, 2 * n, "two new keys per caller");
    let usage = admission.usage();
    let one_send = usage
        .iter()
        .filter(|(l, used, _)| l.limit != 0 && *used == 1)
        .count();
    assert_eq!(
        one_send,
        2 * n + 2,
        "every caller key holds exactly one send"
    );
    drop(usage);
    MemoryRow {
        what: "one send (3 layers: 2 new keys per caller)",
        keys,
        bytes,
    }
}

/// How the 300 sends of a full minute are spread.
#[derive(Clone, Copy)]
enum Spread {
    /// All at once.
    Burst,
    /// Evenly, one every 200 ms (a steady 5 per second).
    Steady,
    /// As many slots as the sliding log can hold: 256 send times, just over the log's
    /// resolution (window / 256) apart, the first 44 of them with two sends.
    Worst,
}

/// Live bytes of `n` callers that each hold 300 sends in the window of a 300-per-minute
/// per-client limit (one key per caller).
fn memory_full_minute(s: &Setup, n: usize, spread: Spread) -> MemoryRow {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    let admission = runtime.block_on(async { local_admission(s, n + 16) });
    let window = s.set.specs[0].window;
    let callers_before = live();
    let callers = callers(n);
    let callers_bytes = live() - callers_before;
    let before = live();
    runtime.block_on(async {
        // (sends at this time, pause after it) per step.
        let steps: Vec<(u32, Duration)> = match spread {
            Spread::Burst => vec![(300, Duration::ZERO)],
            Spread::Steady => vec![(1, Duration::from_millis(200)); 300],
            Spread::Worst => {
                let gap = Duration::from_nanos(window / 256 + 1);
                (0..256)
                    .map(|i| (if i < 44 { 2 } else { 1 }, gap))
                    .collect()
            }
        };
        for (sends, pause) in steps {
            for caller in &callers {
                for _ in 0..sends {
                    decide(&admission, caller);
                }
            }
            tokio::time::advance(pause).await;
        }
    });
    let bytes = live() - before;
    let usage = admission.usage();
    assert_eq!(usage.len(), n, "one key per caller");
    for (layer, used, _) in &usage {
        assert_eq!(*used, 300, "{layer:?} holds 300 sends in its window");
    }
    drop(usage);
    drop(callers);
    MemoryRow {
        what: match spread {
            Spread::Burst => "300/min full, 300 sends at once",
            Spread::Steady => "300/min full, one send every 200 ms",
            Spread::Worst => "300/min full, most log slots (256)",
        },
        keys: n,
        // The caller names are made before the measurement here: add them back, since
        // pacer keeps them for as long as the key lives.
        bytes: bytes + callers_bytes,
    }
}

fn redis_section(s: &Setup, n: usize, report: &mut String) {
    let port = match TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(a) => a.port(),
        Err(e) => {
            let _ = writeln!(report, "redis: skipped, no free port ({e})");
            return;
        }
    };
    let redis = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let mut child = match redis {
        Ok(child) => child,
        Err(e) => {
            let _ = writeln!(report, "redis: skipped, redis-server not available ({e})");
            return;
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut state = s.config.state.clone();
        state.backend = pacer::config::StateBackend::Redis;
        state.url = Some(
            toml::from_str::<toml::Value>(&format!("u = \"redis://127.0.0.1:{port}/\""))
                .ok()
                .and_then(|v| v.get("u").cloned())
                .and_then(|v| v.try_into().ok())
                .expect("url"),
        );
        let clock = Clock::default();
        let backend =
            RedisBackend::start(s.set.clone(), clock, state, 100_000).expect("redis backend");
        let started = Instant::now();
        while !backend.status().up {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis did not come up"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let admission = Admission::with_backend(
            s.set.clone(),
            backend.clone(),
            clock,
            s.config.queue.clone(),
            100_000,
        );
        redis_admissions(&admission, n / 10).await;
        let before = script_calls(port);
        let (latencies, refused) = redis_admissions(&admission, n).await;
        let p = percentiles(latencies);
        let calls = script_calls(port) - before;
        let _ = writeln!(
            report,
            "redis (loopback), {n} sequential admissions, 16 callers, three layers:\n  \
             p50={:?} p90={:?} p99={:?} max={:?}\n  \
             redis script calls per admission: {:.3}; refused: {refused}",
            p.p50,
            p.p90,
            p.p99,
            p.max,
            calls as f64 / n as f64
        );
    });
    let _ = child.kill();
    let _ = child.wait();
}

/// Latencies of `n` admissions through Redis, and how many were refused (none unless
/// Redis stalls past the one-second wait).
async fn redis_admissions(admission: &Admission, n: usize) -> (Vec<Duration>, usize) {
    let clients = callers(16);
    let mut out = Vec::with_capacity(n);
    let mut refused = 0;
    for i in 0..n {
        let caller = &clients[i % clients.len()];
        let started = Instant::now();
        let demand = admission.demand(0, caller, &http::Method::GET, PATH, Priority::Normal);
        let reservation = admission
            .admit(demand, Some((0, caller.clone())), Duration::from_secs(1))
            .await;
        let permit = reservation.map(|r| r.commit());
        out.push(started.elapsed());
        refused += usize::from(permit.is_err());
    }
    (out, refused)
}

fn script_calls(port: u16) -> u64 {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "info", "commandstats"])
        .output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    ["evalsha", "eval"]
        .iter()
        .filter_map(|name| {
            text.lines()
                .find(|l| l.starts_with(&format!("cmdstat_{name}:")))
                .and_then(|l| l.split("calls=").nth(1))
                .and_then(|v| v.split(',').next())
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

/// Today's date (UTC) as YYYY-MM-DD, from the days since 1970 (H. Hinnant's algorithm).
fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    // Other work on the machine moves every latency figure: say how busy it was.
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into());
    format!("{cores} cores (nproc), {model}; load average {load} at the start")
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let three = setup(THREE_LAYERS);
    let minute = setup(PER_MINUTE_300);
    let mut report = String::new();
    let _ = writeln!(
        report,
        "admission benchmarks, {} ({})\nmachine: {}\nallocator: mimalloc (as the pacer \
         binary), wrapped in a live-byte counter that is off while latency is timed\n",
        today(),
        if full {
            "cargo bench --bench admission"
        } else {
            "quick run under cargo test"
        },
        machine()
    );

    // Memory first, while the counter is on and nothing else has run.
    let one_send = memory_one_send(&three, if full { 100_000 } else { 2_000 });
    let per_minute = [Spread::Burst, Spread::Steady, Spread::Worst]
        .map(|spread| memory_full_minute(&minute, if full { 1_000 } else { 20 }, spread));
    COUNTING.store(false, Relaxed);

    let timer = timer_overhead();
    let sizes: &[usize] = if full {
        &[1, 10_000, 1_000_000]
    } else {
        &[1, 100, 1_000]
    };
    let samples = if full { 300_000 } else { 2_000 };
    let rows: Vec<LatencyRow> = sizes.iter().map(|&n| latency(&three, n, samples)).collect();

    let _ = writeln!(
        report,
        "1. admission decision latency, local state, three layers on every request (global, \
         per-client, per-client-endpoint), current-thread runtime. One decision = demand + \
         admit + commit + permit release. Callers cycle through the keys, every one admitted \
         once before (prewarm). {samples} decisions timed one by one (the clock pair costs \
         {} itself, included), then {samples} untimed for the mean.",
        ns(timer)
    );
    let _ = writeln!(
        report,
        "  {:>9} {:>10} {:>9} {:>8} {:>8} {:>8} {:>10} {:>10}",
        "callers", "layer keys", "prewarm", "p50", "p90", "p99", "max", "mean"
    );
    for r in &rows {
        let _ = writeln!(
            report,
            "  {:>9} {:>10} {:>7}ms {:>8} {:>8} {:>8} {:>10} {:>10}",
            r.callers,
            r.keys,
            r.prewarm.as_millis(),
            ns(r.timed.p50),
            ns(r.timed.p90),
            ns(r.timed.p99),
            ns(r.timed.max),
            ns(r.mean)
        );
    }
    let worst_p50 = rows.iter().map(|r| r.timed.p50).max().unwrap_or_default();
    let _ = writeln!(
        report,
        "  target: admission decision < 1 µs median with three layers: {} (largest p50 {})\n",
        met(worst_p50 < Duration::from_micros(1)),
        ns(worst_p50)
    );

    let _ = writeln!(
        report,
        "2. memory per limiter key: live bytes pacer keeps (ledger map entries, sliding \
         logs, caller names, queue state), counted by the allocator wrapper, divided by the \
         keys made"
    );
    for row in std::iter::once(&one_send).chain(per_minute.iter()) {
        let _ = writeln!(
            report,
            "  {:<44} {:>7} keys {:>11} bytes {:>8.0} bytes/key",
            row.what,
            row.keys,
            row.bytes,
            row.per_key()
        );
        assert!(row.bytes > 0, "{}: nothing counted", row.what);
    }
    let _ = writeln!(
        report,
        "  (the one-send figure is 3 layers' worth: {:.0} bytes per caller; the ledger's \
         hash map grows by doubling, so part of it is free table room)",
        one_send.bytes as f64 / (one_send.keys / 2) as f64
    );
    let _ = writeln!(
        report,
        "  target: a limiter key holding one send <= 1 KiB: {} ({:.0} bytes)",
        met(one_send.per_key() <= 1024.0),
        one_send.per_key()
    );
    let _ = writeln!(
        report,
        "  target: a key at full use of a 300-per-minute limit <= 4 KiB: {}\n",
        per_minute
            .iter()
            .map(|r| format!(
                "{} for \"{}\" ({:.0} bytes)",
                met(r.per_key() <= 4096.0),
                r.what,
                r.per_key()
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );

    redis_section(&three, if full { 20_000 } else { 200 }, &mut report);

    print!("{report}");
    if full {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/results");
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join("admission.txt"), &report);
        println!("written to {}", dir.join("admission.txt").display());
    }
}
