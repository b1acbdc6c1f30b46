//! A `redis-server` of the test's own on a free loopback port (so a test can also kill
//! it), and the load and status helpers the tests of pacer over Redis share.

use super::TestClient;
use http::StatusCode;
use http_body_util::BodyExt;
use pacer::app::Running;
use pacer::sim::{SimConfig, Simulator};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A Redis process of the test's own (a server, a cluster node, a Sentinel) listening on
/// `port`; killed on drop.
pub struct RedisProc {
    pub port: u16,
    child: Option<Child>,
}

impl RedisProc {
    /// Starts `program args...` and waits (without blocking the runtime) until it accepts
    /// connections on `port`.
    pub async fn spawn(program: &str, args: &[String], port: u16) -> RedisProc {
        let child = Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{program}: {e} (redis-server must be installed; .ci/run installs it)")
            });
        let p = RedisProc {
            port,
            child: Some(child),
        };
        super::wait_listening(SocketAddr::from(([127, 0, 0, 1], port)), program).await;
        p
    }

    /// A plain `redis-server` on loopback keeping nothing on disk: `listen` names its
    /// port(s) (`--port P`, or `--port 0 --tls-port P` and the TLS files), `extra` more
    /// arguments; it is waited for on `port`.
    pub async fn server(port: u16, listen: &[&str], extra: &[&str]) -> RedisProc {
        let args: Vec<String> = listen
            .iter()
            .chain(&["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .chain(extra)
            .map(|s| s.to_string())
            .collect();
        RedisProc::spawn("redis-server", &args, port).await
    }

    /// Kills it (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `redis-server` on a free loopback port that a test can kill and restart.
pub struct RedisServer {
    pub port: u16,
    proc: Option<RedisProc>,
}

impl RedisServer {
    /// Starts one and waits until it accepts connections.
    pub async fn start() -> RedisServer {
        let port = super::free_port();
        let mut r = RedisServer { port, proc: None };
        r.restart().await;
        r
    }

    /// Starts it (again) on the same port.
    pub async fn restart(&mut self) {
        let port = self.port.to_string();
        self.proc = Some(RedisProc::server(self.port, &["--port", &port], &[]).await);
    }

    /// Kills it (SIGKILL).
    pub fn kill(&mut self) {
        self.proc = None;
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// `redis-cli -p PORT args...`, its standard output.
    pub fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args)
    }

    /// Script calls so far (`evalsha` + `eval`).
    pub fn script_calls(&self) -> u64 {
        script_calls(self.port)
    }
}

/// `redis-cli -p PORT args...`, its standard output.
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Script calls (`evalsha` + `eval`) a server has run so far.
pub fn script_calls(port: u16) -> u64 {
    let text = cli(port, &["info", "commandstats"]);
    let calls = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("cmdstat_{name}:")))
            .and_then(|l| l.split("calls=").nth(1))
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    calls("evalsha") + calls("eval")
}

/// One `GET /api/v2/users` through a replica, with that replica's token.
pub async fn get_users((addr, token): &(SocketAddr, String)) -> super::Reply {
    TestClient::http1(*addr)
        .get(
            "/api/v2/users",
            &[("authorization", &format!("Bearer {token}"))],
        )
        .await
}

/// pacer's `/status`.
pub async fn status(r: &Running) -> serde_json::Value {
    TestClient::http1(r.admin_addr.unwrap())
        .get("/status", &[])
        .await
        .json()
}

/// True while pacer shares its quotas through Redis.
pub async fn is_up(r: &Running) -> bool {
    status(r).await["state"]["up"] == true
}

/// Waits until pacer shares its quotas through Redis; how long that took.
pub async fn wait_up(r: &Running, limit: Duration) -> Duration {
    let started = Instant::now();
    while !is_up(r).await {
        assert!(
            started.elapsed() < limit,
            "backend not up within {limit:?}: {}",
            status(r).await
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    started.elapsed()
}

/// Waits until every replica decides through Redis.
pub async fn wait_all_up(replicas: &[Running], limit: Duration) {
    for r in replicas {
        wait_up(r, limit).await;
    }
}

/// A simulator whose one OAuth client `id` (secret `s3cret`) may send `requests` per
/// `window`; the org and token limits are out of the way.
pub async fn one_client_sim(id: &str, requests: u64, window: &str) -> Simulator {
    let cfg = SimConfig::from_toml_str(&format!(
        r#"
window = "{window}"
client_requests = {requests}
org_requests = 1000000
token_requests = 1000
[[client]]
id = "{id}"
secret = "s3cret"
"#
    ))
    .unwrap();
    Simulator::start("127.0.0.1:0".parse().unwrap(), cfg)
        .await
        .unwrap()
}

/// pacer in front of `sim` with one per-client limit of `requests` per `per` kept in
/// Redis; `limit` and `state` are more lines for those sections (e.g. a guard, the URL).
/// No critical traffic in these tests: normal callers may use the whole quota.
pub fn shared_limit_config(
    sim: SocketAddr,
    requests: u64,
    per: &str,
    limit: &str,
    max_wait: &str,
    state: &str,
) -> String {
    format!(
        r#"
[[upstream]]
name = "api"
url = "http://{sim}"
timeout = "5s"
[[route]]
prefix = "/"
upstream = "api"
[identity]
tokens_me = false
[[limit]]
name = "per-client"
upstream = "api"
scope = "client"
requests = {requests}
per = "{per}"
{limit}
[queue]
max_wait = "{max_wait}"
critical_reserve = 0.0
[state]
backend = "redis"
{state}
"#
    )
}

/// What callers saw, by status ("shed" for pacer's own refusals, "error" for transport
/// failures).
#[derive(Default)]
pub struct Tally(pub Mutex<BTreeMap<String, u64>>);

impl Tally {
    pub fn add(&self, what: String) {
        *self.0.lock().unwrap().entry(what).or_default() += 1;
    }
    pub fn get(&self, what: &str) -> u64 {
        self.0.lock().unwrap().get(what).copied().unwrap_or(0)
    }
    pub fn server_errors(&self) -> u64 {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with('5') || *k == "error")
            .map(|(_, v)| v)
            .sum()
    }
}

/// `workers` callers per (replica, token), each sending `GET /api/v2/users` as fast as
/// pacer admits until `stop`; after a 429 or a transport error a caller pauses 20 ms.
pub fn greedy(
    replicas: &[(SocketAddr, String)],
    workers: usize,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for (addr, token) in replicas {
        for _ in 0..workers {
            let (client, token, tally, stop) = (
                TestClient::http1(*addr),
                token.clone(),
                tally.clone(),
                stop.clone(),
            );
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let req = client.get_as("/api/v2/users", &token);
                    match client.send_streaming_result(req).await {
                        Ok(resp) => {
                            let status = resp.status();
                            let shed = resp.headers().contains_key("x-pacer-reason");
                            let _ = resp.into_body().collect().await;
                            tally.add(if shed {
                                "shed".into()
                            } else {
                                status.as_u16().to_string()
                            });
                            if status == StatusCode::TOO_MANY_REQUESTS {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                        Err(_) => {
                            tally.add("error".into());
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            }));
        }
    }
    tasks
}
