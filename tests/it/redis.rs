//! Shared quotas across replicas: three pacer instances share one Redis (started by the
//! test on a free loopback port, so it can also kill it) in front of the simulator.

use crate::support::redis::{
    get_users, greedy, one_client_sim, shared_limit_config, status, wait_all_up, RedisProc,
    RedisServer, Tally,
};
use crate::support::{empty, slot, token_via, wait_listening, within, Load, TestClient};
use http::{Method, StatusCode};
use pacer::app::Running;
use pacer::sim::Simulator;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A token for the shared client, obtained through the replica at `addr`.
async fn token(addr: SocketAddr) -> String {
    token_via(&TestClient::http1(addr), "shared", "s3cret").await
}

const QUOTA: u64 = 60;
const WINDOW: &str = "2s";
/// Covers the spread of admission-to-arrival delays of a debug build on two loaded cores
/// (see `greedy_callers_never_trigger_upstream_429` in tests/limits.rs): with 40 ms, the
/// burst that follows a switch back to shared mode sometimes reached the simulator early.
const GUARD: &str = "guard = \"200ms\"";

async fn sim() -> Simulator {
    one_client_sim("shared", QUOTA, WINDOW).await
}

/// The outage tests' guard: Redis mode counts a send from its admission in Redis, not from
/// its answer (as the local ledger does), so around the switches between local and
/// shared decisions a loaded machine's admission-to-arrival delay must fit in the guard.
const OUTAGE_GUARD: &str = "guard = \"500ms\"";

fn replica_config(sim: SocketAddr, redis: &str, extra: &str) -> String {
    replica_config_guarded(sim, redis, extra, GUARD)
}

fn replica_config_guarded(sim: SocketAddr, redis: &str, extra: &str, guard: &str) -> String {
    let state = format!("url = \"{redis}\"\n{extra}");
    shared_limit_config(sim, QUOTA, WINDOW, guard, "200ms", &state)
}

/// `count` pacer instances sharing `redis`, each with a token of its own.
async fn replicas(
    sim: &Simulator,
    redis: &str,
    extra: &str,
    count: usize,
) -> (Vec<Running>, Vec<(SocketAddr, String)>) {
    replicas_guarded(sim, redis, extra, count, GUARD).await
}

/// [`replicas`] with another `guard` line.
async fn replicas_guarded(
    sim: &Simulator,
    redis: &str,
    extra: &str,
    count: usize,
    guard: &str,
) -> (Vec<Running>, Vec<(SocketAddr, String)>) {
    let config = replica_config_guarded(sim.addr(), redis, extra, guard);
    start_replicas(&config, count).await
}

/// `count` pacer instances of `config`, each with a token of its own.
async fn start_replicas(config: &str, count: usize) -> (Vec<Running>, Vec<(SocketAddr, String)>) {
    let mut running = Vec::new();
    let mut targets = Vec::new();
    for _ in 0..count {
        let r = crate::support::start_pacer(config).await;
        targets.push((r.proxy_addr, token(r.proxy_addr).await));
        running.push(r);
    }
    (running, targets)
}

async fn wait_until_shared(replicas: &[Running]) {
    wait_all_up(replicas, Duration::from_secs(15)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_quota() {
    let _slot = slot(Load::Busy).await;
    within("shared quota", async {
        let redis = RedisServer::start().await;
        let sim = sim().await;
        let (running, targets) = replicas(&sim, &redis.url(), "timeout = \"500ms\"", 3).await;
        wait_until_shared(&running).await;
        sim.reset();
        let tally = Arc::new(Tally::default());
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let tasks = greedy(&targets, 20, tally.clone(), stop.clone());
        // Three windows and a bit: the bursts at 0, ~2.2 s and ~4.4 s all fall inside.
        tokio::time::sleep(Duration::from_millis(5_000)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        let ran = started.elapsed();
        let stats = sim.stats();
        let windows = 3;
        eprintln!(
            "ran {ran:?}; callers {:?}; sim {:?}",
            tally.0.lock().unwrap(),
            stats.total
        );
        for r in &running {
            eprintln!("status {}", status(r).await["state"]);
        }
        assert_eq!(stats.total.too_many, 0, "the upstream had to answer 429");
        assert_eq!(tally.server_errors(), 0);
        assert_eq!(
            tally.get("200"),
            stats.total.ok,
            "callers' 2xx = what the upstream served"
        );
        let quota = QUOTA * windows;
        assert!(
            stats.total.ok * 100 >= quota * 95,
            "used {} of a shared quota of {quota} (< 95%)",
            stats.total.ok
        );
        assert!(
            stats.total.ok <= QUOTA * 3,
            "more than the shared quota was sent"
        );
        for r in running {
            r.shutdown().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_falls_back_to_local_shares_and_recovers() {
    let _slot = slot(Load::Busy).await;
    within("outage", async {
        let mut redis = RedisServer::start().await;
        let sim = sim().await;
        let (running, targets) = replicas_guarded(
            &sim,
            &redis.url(),
            "replicas = 3\ntimeout = \"500ms\"",
            3,
            OUTAGE_GUARD,
        )
        .await;
        wait_until_shared(&running).await;
        sim.reset();
        let tally = Arc::new(Tally::default());
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = greedy(&targets, 10, tally.clone(), stop.clone());
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        redis.kill();
        if std::env::var_os("PACER_TRACE_TIMES").is_some() {
            eprintln!(
                "kill at {:?}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis()
                    % 100_000
            );
        }
        tokio::time::sleep(Duration::from_millis(3_000)).await;
        // Degraded, still serving.
        for r in &running {
            let s = status(r).await;
            assert_eq!(s["state"]["up"], false, "{s}");
            let ready = TestClient::http1(r.admin_addr.unwrap())
                .get("/readyz", &[])
                .await;
            assert_eq!(ready.status, StatusCode::OK);
            assert_eq!(ready.json()["status"], "degraded");
        }
        let served_in_outage = sim.stats().total.ok;
        redis.restart().await;
        if std::env::var_os("PACER_TRACE_TIMES").is_some() {
            eprintln!(
                "restart at {:?}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis()
                    % 100_000
            );
        }
        let restarted = Instant::now();
        wait_until_shared(&running).await;
        // Typically about 3 s (the settle time); not asserted: a failure while settling
        // restarts the wait, and the timing of a loaded machine is not the subject here.
        eprintln!("shared again {:?} after the restart", restarted.elapsed());
        if std::env::var_os("PACER_TRACE_TIMES").is_some() {
            eprintln!(
                "shared at {:?}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis()
                    % 100_000
            );
        }
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        let stats = sim.stats();
        eprintln!(
            "callers {:?}; sim {:?}",
            tally.0.lock().unwrap(),
            stats.total
        );
        assert_eq!(
            tally.server_errors(),
            0,
            "pacer answered 5xx or dropped a connection while redis was down"
        );
        assert_eq!(stats.total.too_many, 0, "the upstream had to answer 429");
        assert!(served_in_outage > 0);
        assert!(
            stats.total.ok > served_in_outage,
            "nothing was served after redis came back"
        );
        let metrics = TestClient::http1(running[0].admin_addr.unwrap())
            .get("/metrics", &[])
            .await
            .text();
        assert!(
            metrics.contains("pacer_state_backend_up{backend=\"redis\"} 1"),
            "{metrics}"
        );
        for r in running {
            r.shutdown().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_replicas_permits_come_back_within_the_lease() {
    let _slot = slot(Load::Timed).await;
    within("leases", async {
        let redis = RedisServer::start().await;
        let upstream = crate::support::TestUpstream::start().await;
        let config = |listen: &str| {
            format!(
                r#"
[server]
listen = "{listen}"
admin_listen = "127.0.0.1:0"
[[upstream]]
name = "api"
url = "{}"
timeout = "20s"
[[route]]
prefix = "/"
upstream = "api"
[identity]
tokens_me = false
[[limit]]
name = "jobs"
scope = "global"
concurrency = 2
[queue]
max_wait = "100ms"
critical_reserve = 0.0
[state]
backend = "redis"
url = "{}"
lease_ttl = "2s"
"#,
                upstream.url(),
                redis.url()
            )
        };
        // The replica that crashes is a real process, killed with SIGKILL.
        let port = crate::support::free_port();
        let dir = crate::support::unique_temp_dir("lease");
        let path = dir.join("pacer.toml");
        std::fs::write(&path, config(&format!("127.0.0.1:{port}"))).unwrap();
        let mut doomed = Command::new(env!("CARGO_BIN_EXE_pacer"))
            .args(["run", "--config", path.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_listening(addr, "pacer").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Two slow requests take both permits.
        let mut slow = Vec::new();
        for _ in 0..2 {
            let client = TestClient::http1(addr);
            slow.push(tokio::spawn(async move {
                let req = client
                    .request(Method::GET, "/slow")
                    .header("x-reply-delay-ms", "15000")
                    .body(empty())
                    .unwrap();
                let _ = client.send_streaming_result(req).await;
            }));
        }
        upstream.wait_for(2).await;
        let survivor =
            pacer::app::start(pacer::config::Config::parse(&config("127.0.0.1:0")).unwrap())
                .await
                .unwrap();
        wait_until_shared(std::slice::from_ref(&survivor)).await;
        let client = TestClient::http1(survivor.proxy_addr);
        let refused = client.get("/x", &[]).await;
        assert_eq!(
            refused.status,
            StatusCode::TOO_MANY_REQUESTS,
            "both permits should be held"
        );
        doomed.kill().unwrap();
        let _ = doomed.wait();
        let killed = Instant::now();
        // The dead replica's two permits are leases in Redis that expire, by Redis' own
        // clock, at most lease_ttl after now: nobody renews them any more.
        let leases = lease_expiries(&redis);
        let now_us = redis_time_us(&redis);
        assert_eq!(leases.len(), 2, "the two held permits: {leases:?}");
        for (member, expiry_us) in &leases {
            assert!(
                *expiry_us <= now_us + 2_000_000,
                "lease {member} expires {} µs from now, past lease_ttl 2s",
                expiry_us.saturating_sub(now_us)
            );
        }
        // And the survivor gets them back (generous bound; the exact moment is Redis').
        loop {
            let reply = client.get("/x", &[]).await;
            if reply.status == StatusCode::OK {
                break;
            }
            assert!(
                killed.elapsed() < Duration::from_secs(15),
                "permits did not come back after the lease TTL"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "permits back {:?} after the replica was killed (lease_ttl 2s)",
            killed.elapsed()
        );
        for s in slow {
            s.abort();
        }
        survivor.shutdown().await;
        let _ = std::fs::remove_dir_all(dir);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_outage_replicas_wait_for_a_missing_peer_before_sharing() {
    let _slot = slot(Load::Timed).await;
    within("missing peer", async {
        let mut redis = RedisServer::start().await;
        let sim = sim().await;
        // Three replicas are configured, two run: the third, for all they know, is still
        // deciding locally and has sends Redis has not seen.
        let (running, targets) = replicas_guarded(
            &sim,
            &redis.url(),
            "replicas = 3\ntimeout = \"500ms\"",
            2,
            OUTAGE_GUARD,
        )
        .await;
        wait_until_shared(&running).await;
        sim.reset();
        let tally = Arc::new(Tally::default());
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = greedy(&targets, 5, tally.clone(), stop.clone());
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        redis.kill();
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        redis.restart().await;
        let restarted = Instant::now();
        wait_until_shared(&running).await;
        let waited = restarted.elapsed();
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        eprintln!("shared again {waited:?} after the restart (settle 3 s, at most 10 s)");
        assert!(
            waited >= Duration::from_secs(8),
            "shared again after {waited:?}, without the missing peer"
        );
        assert_eq!(tally.server_errors(), 0);
        assert_eq!(
            sim.stats().total.too_many,
            0,
            "the upstream had to answer 429"
        );
        for r in running {
            r.shutdown().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_429_pauses_every_replica_through_redis() {
    an_upstream_pause_is_shared_and_shed_as_a_pause(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_pause_with_no_limit_at_all_is_shared_and_shed_as_a_pause() {
    an_upstream_pause_is_shared_and_shed_as_a_pause(false).await;
}

/// An upstream 429 on one replica pauses its client on every replica through Redis: both
/// shed at once, as a pause that names no limit of pacer's (whether pacer has `limits` or
/// none at all), nothing reaches the upstream, and both still share.
async fn an_upstream_pause_is_shared_and_shed_as_a_pause(limits: bool) {
    let _slot = slot(Load::Timed).await;
    within("shared pause", async {
        let redis = RedisServer::start().await;
        // The upstream allows 5 per 4 s; pacer is told 60 per 2 s, or has no `[[limit]]`
        // at all: either way the sixth request is the upstream's 429.
        let sim = one_client_sim("shared", 5, "4s").await;
        let config = if limits {
            replica_config(sim.addr(), &redis.url(), "timeout = \"500ms\"")
        } else {
            format!(
                "[[upstream]]\nname = \"api\"\nurl = \"http://{}\"\ntimeout = \"5s\"\n\
                 [[route]]\nprefix = \"/\"\nupstream = \"api\"\n\
                 [identity]\ntokens_me = false\n[queue]\nmax_wait = \"200ms\"\n\
                 [state]\nbackend = \"redis\"\nurl = \"{}\"\ntimeout = \"500ms\"\n",
                sim.addr(),
                redis.url()
            )
        };
        let (running, targets) = start_replicas(&config, 2).await;
        wait_until_shared(&running).await;
        let send = |i: usize| get_users(&targets[i]);
        let mut upstream_429 = None;
        for _ in 0..10 {
            let reply = send(0).await;
            if reply.status == StatusCode::TOO_MANY_REQUESTS {
                assert_eq!(reply.header("x-pacer-reason"), None, "{reply:?}");
                upstream_429 = reply
                    .header("retry-after")
                    .and_then(|v| v.parse::<u64>().ok());
                break;
            }
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        }
        let ra = upstream_429.expect("the simulator never answered 429 with Retry-After");
        // The pause is written to Redis in the background.
        let started = Instant::now();
        while redis.cli(&["--scan", "--pattern", "*pause*"]).is_empty() {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "no pause in Redis"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The other replica learns it from the admission script, this one keeps its own:
        // both shed at once, as a pause that names no limit.
        let before = sim.stats().total.requests;
        for i in [1, 0] {
            let reply = send(i).await;
            reply.assert_pacer_error(StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(
                reply.header("x-pacer-reason"),
                Some("upstream_paused"),
                "replica {i}"
            );
            let left: u64 = reply
                .header("retry-after")
                .and_then(|v| v.parse().ok())
                .expect("Retry-After in whole seconds");
            assert!(
                (1..=ra).contains(&left),
                "replica {i}: Retry-After {left} of {ra}"
            );
            assert_eq!(
                reply.header("ratelimit-policy"),
                None,
                "replica {i}: {reply:?}"
            );
            assert_eq!(reply.header("ratelimit"), None, "replica {i}: {reply:?}");
        }
        assert_eq!(
            sim.stats().total.requests,
            before,
            "a request reached the upstream during its pause"
        );
        // A pause is an answer, not a Redis failure: both still share.
        for r in &running {
            let s = status(r).await;
            assert_eq!(s["state"]["up"], true, "{s}");
        }
        for r in running {
            r.shutdown().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_round_trip_per_admission() {
    let _slot = slot(Load::Timed).await;
    within("round trips", async {
        let redis = RedisServer::start().await;
        let sim = sim().await;
        // A generous timeout: this counts round trips, not what a slow Redis does.
        let r = crate::support::start_pacer(&replica_config(
            sim.addr(),
            &redis.url(),
            "timeout = \"5s\"",
        ))
        .await;
        let token = token(r.proxy_addr).await;
        wait_until_shared(std::slice::from_ref(&r)).await;
        // Sends decided locally before sharing began are written through in the
        // background; let them land before counting.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = redis.script_calls();
        let client = TestClient::http1(r.proxy_addr);
        for _ in 0..20 {
            let reply = client
                .get(
                    "/api/v2/users",
                    &[("authorization", &format!("Bearer {token}"))],
                )
                .await;
            assert_eq!(reply.status, StatusCode::OK);
        }
        let scripts = redis.script_calls() - before;
        assert_eq!(
            scripts, 20,
            "admission should be one script call each (saw {scripts} for 20)"
        );
        r.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca() {
    let _slot = slot(Load::Timed).await;
    within("rediss", async {
        let certs = crate::support::TestCerts::new();
        let port = crate::support::free_port();
        let tls_port = port.to_string();
        let mut server = RedisProc::server(
            port,
            &["--port", "0", "--tls-port", &tls_port],
            &[
                "--tls-cert-file",
                certs.cert_pem.to_str().unwrap(),
                "--tls-key-file",
                certs.key_pem.to_str().unwrap(),
                "--tls-ca-cert-file",
                certs.ca_pem.to_str().unwrap(),
                "--tls-auth-clients",
                "no",
            ],
        )
        .await;
        let sim = sim().await;
        let extra = format!("ca_file = \"{}\"", certs.ca_pem.display());
        let config = replica_config(sim.addr(), &format!("rediss://localhost:{port}/"), &extra);
        let r = crate::support::start_pacer(&config).await;
        wait_until_shared(std::slice::from_ref(&r)).await;
        let token = token(r.proxy_addr).await;
        let reply = TestClient::http1(r.proxy_addr)
            .get(
                "/api/v2/users",
                &[("authorization", &format!("Bearer {token}"))],
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(status(&r).await["state"]["up"], true);
        r.shutdown().await;
        server.kill();
    })
    .await;
}

/// Every member of every sorted set in `redis` that looks like a concurrency lease
/// (`replica:id`, scored by its expiry in µs of Redis time), with that expiry.
fn lease_expiries(redis: &RedisServer) -> Vec<(String, u64)> {
    let mut leases = Vec::new();
    for key in redis.cli(&["--scan"]).lines() {
        if redis.cli(&["type", key]) != "zset" {
            continue;
        }
        let listed = redis.cli(&["zrange", key, "0", "-1", "withscores"]);
        let lines: Vec<&str> = listed.lines().collect();
        for pair in lines.chunks(2) {
            if let [member, score] = pair {
                let score: f64 = score.parse().unwrap_or_else(|_| panic!("{listed}"));
                if member.contains(':') && score > 1e15 {
                    leases.push((member.to_string(), score as u64));
                }
            }
        }
    }
    leases
}

/// Redis' clock (`TIME`) in µs.
fn redis_time_us(redis: &RedisServer) -> u64 {
    let t = redis.cli(&["time"]);
    let mut parts = t.lines().map(|l| l.trim().parse::<u64>());
    match (parts.next(), parts.next()) {
        (Some(Ok(s)), Some(Ok(us))) => s * 1_000_000 + us,
        _ => panic!("TIME answered {t:?}"),
    }
}

/// Polls `replica`'s `/status` until its `adaptive_cuts` has an entry for the shared
/// client that `accept` takes; that entry.
async fn wait_for_adaptive(
    replica: &Running,
    accept: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let s = status(replica).await;
        let found = s["adaptive_cuts"].as_array().and_then(|a| {
            a.iter()
                .find(|c| c["client"] == "shared" && accept(c))
                .cloned()
        });
        if let Some(c) = found {
            return c;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not shared within 10 s: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A budget learned by one replica (a reported `inin-ratelimit-allowed`, a cut after an
/// upstream 429) reaches the others through Redis: they admit under it without first
/// hearing from the upstream themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learned_ceilings_and_cuts_are_shared_between_replicas() {
    let _slot = slot(Load::Timed).await;
    within("shared adaptive state", async {
        // The upstream reports 30 per 2 s for the client; pacer is configured for 60.
        let redis = RedisServer::start().await;
        let sim = one_client_sim("shared", 30, WINDOW).await;
        let (running, targets) = replicas(&sim, &redis.url(), "timeout = \"500ms\"", 2).await;
        wait_until_shared(&running).await;
        assert_eq!(get_users(&targets[0]).await.status, StatusCode::OK);
        let seen = wait_for_adaptive(&running[1], |c| c["allowed"] == 30).await;
        assert_eq!(seen["client_share"], 0.5, "{seen}");
        // Replica 1's first request is admitted under the learned ceiling.
        let reply = get_users(&targets[1]).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(
            reply.header("ratelimit-policy"),
            Some("\"per-client\";q=30;w=2"),
            "{reply:?}"
        );
        for r in running {
            r.shutdown().await;
        }

        // An upstream that reports nothing and allows 5: replica 0's 429 cuts for both.
        let redis = RedisServer::start().await;
        let cfg = pacer::sim::SimConfig::from_toml_str(
            "window = \"2s\"\nclient_requests = 5\norg_requests = 1000000\n\
             token_requests = 1000\nrate_headers = false\n\
             [[client]]\nid = \"shared\"\nsecret = \"s3cret\"\n",
        )
        .unwrap();
        let sim = Simulator::start("127.0.0.1:0".parse().unwrap(), cfg)
            .await
            .unwrap();
        let (running, targets) = replicas(&sim, &redis.url(), "timeout = \"500ms\"", 2).await;
        wait_until_shared(&running).await;
        let mut upstream_429 = false;
        for _ in 0..10 {
            let reply = get_users(&targets[0]).await;
            if reply.status == StatusCode::TOO_MANY_REQUESTS {
                assert_eq!(reply.header("x-pacer-reason"), None, "{reply:?}");
                upstream_429 = true;
                break;
            }
        }
        assert!(upstream_429, "the simulator never answered 429");
        let seen = wait_for_adaptive(&running[1], |c| c["cuts"] == 1).await;
        assert_eq!(seen["factor"], 0.8, "{seen}");
        assert!(seen["allowed"].is_null(), "{seen}");
        assert_eq!(sim.stats().total.too_many, 1, "{:?}", sim.stats());
        for r in running {
            r.shutdown().await;
        }
    })
    .await;
}

/// A client seen sending critical traffic on one replica keeps the critical reserve on
/// every replica: the learned set lives in Redis (a sorted set scored by last-seen time),
/// and each replica reads it with its heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learned_critical_reserve_is_shared_by_every_replica() {
    let _slot = slot(Load::Timed).await;
    within("shared reserve", async {
        let redis = RedisServer::start().await;
        let sim = one_client_sim("shared", 1000, "10s").await;
        let config = format!(
            r#"
[[upstream]]
name = "api"
url = "http://{sim}"
[[upstream]]
name = "login"
url = "http://{sim}"
[[route]]
prefix = "/"
upstream = "api"
[[route]]
prefix = "/oauth/"
upstream = "login"
[[route]]
prefix = "/ivr/"
strip_prefix = true
upstream = "api"
priority = "critical"
[identity]
tokens_me = false
[[limit]]
name = "per-client"
upstream = "api"
scope = "client"
requests = 10
per = "20s"
[queue]
max_wait = "0s"
critical_reserve = 0.5
[state]
backend = "redis"
url = "{redis}"
timeout = "500ms"
"#,
            sim = sim.addr(),
            redis = redis.url()
        );
        let running = vec![
            crate::support::start_pacer(&config).await,
            crate::support::start_pacer(&config).await,
        ];
        wait_until_shared(&running).await;
        let (a, b) = (&running[0], &running[1]);
        // Each replica knows the tokens issued through it.
        let auth_a = format!("Bearer {}", token(a.proxy_addr).await);
        let auth = format!("Bearer {}", token(b.proxy_addr).await);
        // One IVR call through replica a: the client is learned there and in Redis.
        let reply = TestClient::http1(a.proxy_addr)
            .get("/ivr/api/v2/conversations", &[("authorization", &auth_a)])
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        let learned = |s: serde_json::Value| {
            s["critical_reserve"]["learned"]
                .as_array()
                .is_some_and(|l| l.iter().any(|v| v == "c:shared"))
        };
        assert!(learned(status(a).await));
        // Replica b reads it within a heartbeat or two.
        let started = Instant::now();
        while !learned(status(b).await) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "replica b never learned the reserve: {}",
                status(b).await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let members = redis.cli(&["ZRANGE", "{pacer}:critical", "0", "-1"]);
        assert!(members.contains("c:shared"), "{members}");
        // Normal traffic through b stops at half the quota: 5 of 10, one taken by the IVR.
        let client = TestClient::http1(b.proxy_addr);
        let mut ok = 0;
        for _ in 0..10 {
            let reply = client
                .get("/api/v2/users", &[("authorization", &auth)])
                .await;
            match reply.status {
                StatusCode::OK => ok += 1,
                StatusCode::TOO_MANY_REQUESTS => {
                    assert!(reply.header("x-pacer-reason").is_some(), "{reply:?}")
                }
                s => panic!("unexpected {s}: {reply:?}"),
            }
        }
        assert_eq!(
            ok,
            4,
            "normal requests admitted through replica b: {}\n{}\n{}",
            status(a).await,
            status(b).await,
            redis.cli(&["KEYS", "*"])
        );
        assert_eq!(sim.stats().total.too_many, 0);
        for r in running {
            r.shutdown().await;
        }
    })
    .await;
}

/// Sends made outside pacer with the same OAuth client (an `inin-ratelimit-count` above
/// the shared count) are padded into the shared key: the other replica, which never had an
/// answer saying so, forwards only what the upstream has left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_outside_pacer_is_shared_through_redis() {
    let _slot = slot(Load::Timed).await;
    within("shared inin-ratelimit-count", async {
        let redis = RedisServer::start().await;
        let sim = one_client_sim("shared", 20, "60s").await;
        let state = format!("url = \"{}\"\ntimeout = \"500ms\"", redis.url());
        let config = shared_limit_config(sim.addr(), 20, "60s", GUARD, "0s", &state);
        let (running, targets) = start_replicas(&config, 2).await;
        wait_until_shared(&running).await;
        // Another system spends 15 of the client's 20 directly.
        let auth = format!("Bearer {}", targets[0].1);
        let direct = TestClient::http1(sim.addr());
        for _ in 0..15 {
            let reply = direct
                .get("/api/v2/users", &[("authorization", &auth)])
                .await;
            assert_eq!(reply.status, StatusCode::OK);
        }
        // Replica 0 hears of it in its first answer (count 16) and pads the shared key in
        // the background: wait for it to land (pacer's own token requests count there too).
        assert_eq!(get_users(&targets[0]).await.status, StatusCode::OK);
        let started = Instant::now();
        loop {
            let keys = redis.cli(&["--scan", "--pattern", "*:r:*per-client*"]);
            let key = keys.lines().next().unwrap_or_default().to_string();
            let count: u64 = redis.cli(&["zcard", &key]).trim().parse().unwrap_or(0);
            if count >= 16 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the shared key {key:?} holds {count}, not the upstream's 16"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Replica 1 forwards only what the upstream has left.
        let mut forwarded = 0;
        for _ in 0..8 {
            let reply = get_users(&targets[1]).await;
            match reply.status {
                StatusCode::OK => forwarded += 1,
                StatusCode::TOO_MANY_REQUESTS => assert!(
                    reply.header("x-pacer-reason").is_some(),
                    "the upstream answered 429: {reply:?}"
                ),
                other => panic!("unexpected {other}: {}", reply.text()),
            }
        }
        let stats = sim.stats();
        assert_eq!(stats.total.too_many, 0, "{stats:?}");
        assert_eq!(forwarded, 4, "the upstream had 4 left");
        for r in running {
            r.shutdown().await;
        }
    })
    .await;
}
