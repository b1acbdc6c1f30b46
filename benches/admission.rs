//! Admission latency: one request's whole way through the limiter, with counters in this
//! process and in Redis on loopback (a `redis-server` of the benchmark's own), measured in
//! the same run. Writes p50/p90/p99/max to `bench/results/admission.txt`.
//!
//! `cargo bench --bench admission` runs it in full; under `cargo test` it runs a few
//! iterations only, to prove it still works.

use pacer::config::{Config, Priority};
use pacer::limit::LimitSet;
use pacer::queue::Admission;
use pacer::state::redis::RedisBackend;
use pacer::state::{Backend, Clock, LocalBackend};
use std::fmt::Write as _;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CONFIG: &str = r#"
[[upstream]]
name = "api"
url = "http://127.0.0.1:1"
[[route]]
prefix = "/"
upstream = "api"
[[limit]]
name = "per-client"
scope = "client"
requests = 100000000
per = "60s"
[[limit]]
name = "org"
scope = "global"
requests = 1000000000
per = "60s"
[[limit]]
name = "ivr-put"
match = "PUT /api/v2/architect/ivrs/{ivrId}"
scope = "client"
requests = 100000000
per = "60s"
"#;

fn percentiles(mut v: Vec<Duration>) -> String {
    v.sort_unstable();
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    format!(
        "n={} p50={:?} p90={:?} p99={:?} max={:?}",
        v.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        v[v.len() - 1]
    )
}

async fn measure(admission: &Admission, n: usize) -> Vec<Duration> {
    let clients: Vec<Arc<str>> = (0..16).map(|i| Arc::from(format!("client-{i}"))).collect();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let caller = &clients[i % clients.len()];
        let method = if i % 4 == 0 {
            http::Method::PUT
        } else {
            http::Method::GET
        };
        let started = Instant::now();
        let demand = admission.demand(
            0,
            caller,
            &method,
            "/api/v2/architect/ivrs/42",
            Priority::Normal,
        );
        let reservation = admission
            .admit(demand, Some((0, caller.clone())), Duration::from_secs(1))
            .await;
        let permit = reservation.map(|r| r.commit());
        out.push(started.elapsed());
        drop(permit);
    }
    out
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n = if full { 20_000 } else { 200 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let config = Config::parse(CONFIG).unwrap();
    let set = Arc::new(LimitSet::new(&config.limits, &config.queue, |_| Some(0)));
    let mut report = String::new();
    let _ = writeln!(
        report,
        "admission latency ({n} sequential admissions, 2-3 layers each)"
    );

    runtime.block_on(async {
        let clock = Clock::default();
        let local: Arc<dyn Backend> = Arc::new(LocalBackend::new(set.clone(), clock));
        let admission =
            Admission::with_backend(set.clone(), local, clock, config.queue.clone(), 100_000);
        measure(&admission, n / 10).await;
        let _ = writeln!(
            report,
            "local: {}",
            percentiles(measure(&admission, n).await)
        );
    });

    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
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
    match redis {
        Err(e) => {
            let _ = writeln!(report, "redis: skipped, redis-server not available ({e})");
        }
        Ok(mut child) => {
            runtime.block_on(async {
                let mut state = config.state.clone();
                state.backend = pacer::config::StateBackend::Redis;
                state.url = Some(
                    toml::from_str::<toml::Value>(&format!("u = \"redis://127.0.0.1:{port}/\""))
                        .ok()
                        .and_then(|v| v.get("u").cloned())
                        .and_then(|v| v.try_into().ok())
                        .expect("url"),
                );
                let clock = Clock::default();
                let backend = RedisBackend::start(set.clone(), clock, state, 100_000).unwrap();
                let started = Instant::now();
                while !backend.status().up {
                    assert!(
                        started.elapsed() < Duration::from_secs(10),
                        "redis did not come up"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let admission = Admission::with_backend(
                    set.clone(),
                    backend.clone(),
                    clock,
                    config.queue.clone(),
                    100_000,
                );
                measure(&admission, n / 10).await;
                let before = script_calls(port);
                let latencies = measure(&admission, n).await;
                let calls = script_calls(port) - before;
                let _ = writeln!(report, "redis (loopback): {}", percentiles(latencies));
                let _ = writeln!(
                    report,
                    "redis script calls per admission: {:.3}",
                    calls as f64 / n as f64
                );
            });
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    print!("{report}");
    if full {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/results");
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join("admission.txt"), &report);
        println!("written to {}", dir.join("admission.txt").display());
    }
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
