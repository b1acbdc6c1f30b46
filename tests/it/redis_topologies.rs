//! Redis topologies other than one server: a real three-primary Redis Cluster and a primary
//! watched by a Sentinel, each started by the test on free loopback ports, with pacer
//! instances (`[state] mode = "cluster"` / `"sentinel"`) in front of the simulator.
//!
//! Needs `redis-server` (with `--cluster-enabled` and `--sentinel`) and `redis-cli`; without
//! them the tests print a notice and pass, unless `CI` is set, where they fail.

use crate::support::redis::{
    cli, greedy, one_client_sim, script_calls, shared_limit_config, status, wait_all_up, RedisProc,
    Tally,
};
use crate::support::{free_port, slot, token_via, Load, TestClient};
use http::StatusCode;
use pacer::app::Running;
use pacer::sim::Simulator;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const QUOTA: u64 = 60;
const WINDOW: &str = "2s";
/// Upper bound of one test (starting a cluster and a failover take a few seconds).
const CASE_LIMIT: Duration = Duration::from_secs(90);

async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(CASE_LIMIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {CASE_LIMIT:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Redis processes

fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// True when the tools are there; otherwise prints why the test is skipped (or fails
/// under `CI`). A Sentinel is `redis-sentinel`, or `redis-server --sentinel` without it.
fn tools_present(test: &str) -> bool {
    let mut missing = Vec::new();
    if !runs("redis-server", &["--version"]) {
        missing.push("redis-server");
    }
    if !runs("redis-cli", &["--version"]) {
        missing.push("redis-cli");
    }
    if missing.is_empty() {
        return true;
    }
    let why = format!("{test}: skipped, {} not installed", missing.join(" and "));
    if std::env::var_os("CI").is_some() {
        panic!(
            "{why} (CI is set: install redis-server/redis-cli, e.g. apt-get install redis-server)"
        );
    }
    eprintln!("NOTICE {why}");
    false
}

/// A plain `redis-server` on `port` keeping its files in `dir`, with extra arguments.
async fn server(port: u16, dir: &Path, extra: &[&str]) -> RedisProc {
    let port_arg = port.to_string();
    let listen = ["--port", &port_arg, "--dir", dir.to_str().unwrap()];
    RedisProc::server(port, &listen, extra).await
}

/// A three-primary Redis Cluster on loopback.
struct Cluster {
    nodes: Vec<RedisProc>,
    dir: PathBuf,
}

impl Cluster {
    async fn start() -> Cluster {
        let dir = crate::support::unique_temp_dir("cluster");
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let conf = dir.join(format!("nodes-{port}.conf"));
            nodes.push(
                server(
                    port,
                    &dir,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        conf.to_str().unwrap(),
                        "--cluster-node-timeout",
                        "5000",
                    ],
                )
                .await,
            );
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let started = Instant::now();
        for n in &nodes {
            while !cli(n.port, &["cluster", "info"]).contains("cluster_state:ok") {
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "cluster never reached cluster_state:ok"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Cluster { nodes, dir }
    }

    fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Sentinel monitoring `master` at 127.0.0.1:`master_port`, quorum 1.
async fn sentinel(dir: &Path, master_port: u16) -> RedisProc {
    let port = free_port();
    let conf = dir.join(format!("sentinel-{port}.conf"));
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind 127.0.0.1\ndir {}\n\
             sentinel monitor mymaster 127.0.0.1 {master_port} 1\n\
             sentinel down-after-milliseconds mymaster 1000\n\
             sentinel failover-timeout mymaster 5000\n",
            dir.display()
        ),
    )
    .unwrap();
    let conf = conf.to_str().unwrap().to_string();
    if runs("redis-sentinel", &["--version"]) {
        RedisProc::spawn("redis-sentinel", &[conf], port).await
    } else {
        RedisProc::spawn("redis-server", &[conf, "--sentinel".into()], port).await
    }
}

// ---------------------------------------------------------------------------------------
// pacer and load

async fn sim() -> Simulator {
    one_client_sim("shared", QUOTA, WINDOW).await
}

fn replica_config(sim: SocketAddr, state: &str) -> String {
    let state = format!("timeout = \"500ms\"\n{state}");
    // The guard as in tests/redis.rs: wide enough for a debug build on two loaded cores.
    shared_limit_config(sim, QUOTA, WINDOW, "guard = \"200ms\"", "200ms", &state)
}

fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("\"{s}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

async fn token(addr: SocketAddr) -> String {
    token_via(&TestClient::http1(addr), "shared", "s3cret").await
}

/// One request through `r`: its status.
async fn send(r: &Running, token: &str) -> u16 {
    TestClient::http1(r.proxy_addr)
        .get(
            "/api/v2/users",
            &[("authorization", &format!("Bearer {token}"))],
        )
        .await
        .status
        .as_u16()
}

/// Sends `n` requests through `r`, each expected to be served.
async fn served(r: &Running, token: &str, n: usize) {
    let client = TestClient::http1(r.proxy_addr);
    for _ in 0..n {
        let reply = client
            .get(
                "/api/v2/users",
                &[("authorization", &format!("Bearer {token}"))],
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_quota_through_a_redis_cluster() {
    if !tools_present("cluster") {
        return;
    }
    let _slot = slot(Load::Busy).await;
    bounded("cluster", async {
        let cluster = Cluster::start().await;
        let sim = sim().await;
        let state = format!(
            "mode = \"cluster\"\nnodes = {}\nkey_prefix = \"pacer-cluster\"",
            // One seed is enough to discover the others; give two.
            toml_list(&cluster.urls()[..2])
        );
        let mut running = Vec::new();
        let mut targets = Vec::new();
        for _ in 0..2 {
            let r = crate::support::start_pacer(&replica_config(sim.addr(), &state)).await;
            targets.push((r.proxy_addr, token(r.proxy_addr).await));
            running.push(r);
        }
        wait_all_up(&running, Duration::from_secs(15)).await;
        sim.reset();
        let before: Vec<u64> = cluster.nodes.iter().map(|n| script_calls(n.port)).collect();
        let tally = Arc::new(Tally::default());
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let tasks = greedy(&targets, 15, tally.clone(), stop.clone());
        // Three windows and a bit: the bursts at 0, ~2.2 s and ~4.4 s all fall inside.
        tokio::time::sleep(Duration::from_millis(5_000)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        let stats = sim.stats();
        let calls: Vec<u64> = cluster
            .nodes
            .iter()
            .zip(&before)
            .map(|(n, b)| script_calls(n.port) - b)
            .collect();
        eprintln!(
            "ran {:?}; callers {:?}; sim {:?}; script calls per node {calls:?}",
            started.elapsed(),
            tally.0.lock().unwrap(),
            stats.total
        );
        for r in &running {
            let s = status(r).await;
            eprintln!("status {}", s["state"]);
            assert_eq!(s["state"]["up"], true, "fell back to local shares: {s}");
            assert_eq!(s["state"]["replicas"], 2, "{s}");
        }
        assert_eq!(stats.total.too_many, 0, "the upstream had to answer 429");
        assert_eq!(tally.server_errors(), 0);
        assert_eq!(tally.get("200"), stats.total.ok);
        let quota = QUOTA * 3;
        assert!(
            stats.total.ok * 100 >= quota * 90,
            "used {} of a shared quota of {quota} (< 90%)",
            stats.total.ok
        );
        assert!(
            stats.total.ok <= quota,
            "more than the shared quota was sent"
        );
        // Every admission ran on the one primary that owns the prefix's slot.
        let slot = cli(
            cluster.nodes[0].port,
            &["cluster", "keyslot", "pacer-cluster"],
        );
        let busy: Vec<usize> = (0..3).filter(|&i| calls[i] > 0).collect();
        assert_eq!(busy.len(), 1, "scripts ran on several nodes: {calls:?}");
        let owner = cluster.nodes[busy[0]].port;
        let keys = cli(owner, &["--scan", "--pattern", "{pacer-cluster}:*"]);
        assert!(
            keys.contains("{pacer-cluster}:r:"),
            "no rate key on the owner: {keys}"
        );
        assert!(
            keys.contains("{pacer-cluster}:replicas"),
            "no replicas key on the owner: {keys}"
        );
        eprintln!("prefix slot {} on node {owner}", slot.trim());
        for r in running {
            r.shutdown().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admissions_go_to_the_primary_a_sentinel_names() {
    if !tools_present("sentinel") {
        return;
    }
    let _slot = slot(Load::Timed).await;
    bounded("sentinel", async {
        let dir = crate::support::unique_temp_dir("sentinel");
        let master = server(free_port(), &dir, &[]).await;
        let sentinel = sentinel(&dir, master.port).await;
        let sim = sim().await;
        let state = format!(
            "mode = \"sentinel\"\nnodes = [\"redis://127.0.0.1:{}\"]\nmaster = \"mymaster\"",
            sentinel.port
        );
        let r = crate::support::start_pacer(&replica_config(sim.addr(), &state)).await;
        let token = token(r.proxy_addr).await;
        wait_all_up(std::slice::from_ref(&r), Duration::from_secs(15)).await;
        // The first admission also loads the script (EVALSHA answers NOSCRIPT once).
        served(&r, &token, 1).await;
        let before = script_calls(master.port);
        served(&r, &token, 10).await;
        let scripts = script_calls(master.port) - before;
        assert_eq!(
            scripts, 10,
            "admissions should be one script each on the primary"
        );
        assert_eq!(cli(master.port, &["zcard", "{pacer}:replicas"]).trim(), "1");
        r.shutdown().await;
        drop(sentinel);
        drop(master);
        let _ = std::fs::remove_dir_all(dir);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_moves_admissions_to_the_new_primary() {
    if !tools_present("sentinel failover") {
        return;
    }
    let _slot = slot(Load::Timed).await;
    bounded("sentinel failover", async {
        let dir = crate::support::unique_temp_dir("failover");
        let mut master = server(free_port(), &dir, &[]).await;
        let replica_port = free_port();
        let master_port = master.port.to_string();
        let replica = server(
            replica_port,
            &dir,
            &["--replicaof", "127.0.0.1", &master_port],
        )
        .await;
        let started = Instant::now();
        while !cli(master.port, &["info", "replication"]).contains("connected_slaves:1") {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "replica never synced"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let sentinel = sentinel(&dir, master.port).await;
        let sim = sim().await;
        let state = format!(
            "mode = \"sentinel\"\nnodes = [\"redis://127.0.0.1:{}\"]\nmaster = \"mymaster\"",
            sentinel.port
        );
        let r = crate::support::start_pacer(&replica_config(sim.addr(), &state)).await;
        let token = token(r.proxy_addr).await;
        wait_all_up(std::slice::from_ref(&r), Duration::from_secs(15)).await;
        served(&r, &token, 1).await;
        let before = script_calls(master.port);
        served(&r, &token, 5).await;
        assert_eq!(script_calls(master.port) - before, 5);
        // The sentinel must know the replica before the primary goes.
        let started = Instant::now();
        while !cli(sentinel.port, &["sentinel", "replicas", "mymaster"])
            .contains(&replica_port.to_string())
        {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "sentinel never saw the replica"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        master.kill();
        let killed = Instant::now();
        // Sentinel promotes the replica; pacer keeps serving with local shares meanwhile.
        while !cli(replica_port, &["role"]).starts_with("master") {
            assert!(
                killed.elapsed() < Duration::from_secs(30),
                "sentinel did not promote the replica"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let promoted = killed.elapsed();
        // Meanwhile pacer answers from local shares: served or its own 429, never a 5xx.
        for _ in 0..3 {
            let status = send(&r, &token).await;
            assert!(
                status == 200 || status == 429,
                "answered {status} in the failover"
            );
        }
        // pacer notices the old primary is gone (a failed heartbeat or admissions)...
        while status(&r).await["state"]["up"] == true {
            assert!(
                killed.elapsed() < Duration::from_secs(30),
                "pacer never noticed the primary was gone"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // ...then shares again through the primary the sentinel names now.
        wait_all_up(std::slice::from_ref(&r), Duration::from_secs(30)).await;
        let back = killed.elapsed();
        eprintln!("promoted after {promoted:?}; shared again after {back:?}");
        let before = script_calls(replica_port);
        // The replayed local sends may fill this window: wait for room.
        let started = Instant::now();
        while send(&r, &token).await != 200 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "nothing served after the failover"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let scripts = script_calls(replica_port) - before;
        assert!(scripts >= 1, "admissions should go to the new primary");
        let keys = cli(replica_port, &["--scan", "--pattern", "{pacer}:r:*"]);
        assert!(!keys.trim().is_empty(), "no rate key on the new primary");
        r.shutdown().await;
        drop(sentinel);
        drop(replica);
        let _ = std::fs::remove_dir_all(dir);
    })
    .await;
}
