//! The whole org in view (`[usage]`): pacer polls the simulator's Usage API, exports the
//! requests of clients that never pass through it, and subtracts a configured client's
//! use outside pacer from what pacer sends for it.

use crate::support::{slot, start_pacer, token_via, within, within_for, Load, Reply, TestClient};
use http::StatusCode;
use pacer::app::Running;
use pacer::sim::{SimConfig, Simulator};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// pacer in front of `sim` (`api` behind `/api/`, `login` behind `/oauth/`), reading
/// usage every second with `reporting-client`'s credential. `extra` is appended.
fn config(sim: &Simulator, usage: &str, extra: &str) -> String {
    let url = sim.url();
    format!(
        r#"
[identity]
tokens_me = false
[[upstream]]
name = "api"
url = "{url}"
[[upstream]]
name = "login"
url = "{url}"
[[route]]
prefix = "/api/"
upstream = "api"
[[route]]
prefix = "/oauth/"
upstream = "login"
[[credential]]
name = "reader"
upstream = "login"
client_id = "reporting-client"
client_secret = "reporting-secret"
[usage]
credential = "reader"
interval = "1s"
{usage}
{extra}
"#
    )
}

async fn admin_get(pacer: &Running, path: &str) -> Reply {
    let admin = TestClient::http1(pacer.admin_addr.expect("admin listener"));
    let reply = admin.get(path, &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
    reply
}

/// The value of the sample `line_start` (name and labels) in `/metrics`, if present.
fn sample(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
}

/// `promtool check metrics` passes on `text`, when promtool is on PATH (the observability
/// tests require it in CI).
fn promtool_accepts(text: &str) {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        eprintln!("SKIPPED promtool check: promtool is not on PATH");
        return;
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_org_poll_exports_a_client_that_never_went_through_pacer() {
    let _slot = slot(Load::Timed).await;
    within("org usage", async {
        let sim = Simulator::start("127.0.0.1:0".parse().unwrap(), SimConfig::default())
            .await
            .unwrap();
        let pacer = start_pacer(&config(&sim, "", "")).await;
        // Straight to the simulator: pacer never sees bulk-client.
        let direct = TestClient::http1(sim.addr());
        let token = token_via(&direct, "bulk-client", "bulk-secret").await;
        const N: u64 = 12;
        for _ in 0..N {
            let reply = direct.send(direct.get_as("/api/v2/users/me", &token)).await;
            assert_eq!(reply.status, StatusCode::OK);
        }
        let (count, text) = loop {
            let text = admin_get(&pacer, "/metrics").await.text();
            let count = sample(&text, "pacer_org_api_requests{client=\"bulk-client\"}");
            let named =
                text.contains("pacer_client_info{client=\"bulk-client\",name=\"Bulk export\"} 1");
            match count {
                Some(c) if c >= N as f64 && named => break (c, text),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        // N API requests and the token exchange, as the simulator counted them.
        assert_eq!(count, sim.stats().clients["bulk-client"].requests as f64);
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("pacer_requests_total") && l.contains("bulk-client")),
            "pacer itself never saw bulk-client:\n{text}"
        );
        assert!(
            text.contains("# TYPE pacer_org_api_requests gauge"),
            "{text}"
        );
        assert!(text.contains("# TYPE pacer_client_info gauge"), "{text}");
        promtool_accepts(&text);
        let status = admin_get(&pacer, "/status").await.json();
        assert!(status["usage"]["polls"].as_u64() >= Some(1), "{status}");
        assert_eq!(
            status["usage"]["last_error"],
            serde_json::Value::Null,
            "{status}"
        );
        pacer.shutdown().await;
        sim.shutdown().await;
    })
    .await;
}

/// The per-client limit pacer keeps for ivr-client: 20 requests per 2 s.
const QUOTA: u64 = 20;
/// Direct requests per second of ivr-client outside pacer: half the quota per window.
const OUTSIDE_EVERY: Duration = Duration::from_millis(200);
/// How long pacer's own traffic for ivr-client is counted.
const MEASURE: Duration = Duration::from_secs(4);

/// What one run saw: the 200s pacer's callers got for ivr-client while measuring, and
/// the client's entry in `/status` `usage.outside` just before.
struct Run {
    forwarded: u64,
    outside: serde_json::Value,
}

/// ivr-client used outside pacer at 5 requests a second (half its 20-per-2-s quota) while
/// greedy callers use it through pacer; counts what pacer forwards for them.
async fn outside_run(subtract: bool) -> Run {
    let sim_config = SimConfig {
        window: Duration::from_secs(2),
        client_requests: 10_000,
        org_requests: 100_000,
        // pacer's own `inin-ratelimit-count` reading would also see the outside use: keep
        // this test about the usage poll.
        rate_headers: false,
        ..SimConfig::default()
    };
    let sim = Simulator::start("127.0.0.1:0".parse().unwrap(), sim_config)
        .await
        .unwrap();
    let extra = format!(
        "[queue]\nmax_wait = \"20s\"\ncritical_reserve = 0.0\n\
         [[client]]\nid = \"ivr-client\"\nname = \"ivr\"\n\
         [[limit]]\nname = \"per-client\"\nupstream = \"api\"\nscope = \"client\"\n\
         requests = {QUOTA}\nper = \"2s\"\n"
    );
    let pacer = start_pacer(&config(&sim, &format!("subtract = {subtract}"), &extra)).await;

    // Outside pacer, all along.
    let stop = Arc::new(AtomicBool::new(false));
    let direct = TestClient::http1(sim.addr());
    let direct_token = token_via(&direct, "ivr-client", "ivr-secret").await;
    let outside = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(OUTSIDE_EVERY);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let reply = direct
                    .send(direct.get_as("/api/v2/users/me", &direct_token))
                    .await;
                assert_eq!(reply.status, StatusCode::OK);
            }
        })
    };

    // Two polls make an estimate: wait for it.
    let estimate = loop {
        let status = admin_get(&pacer, "/status").await.json();
        let found = status["usage"]["outside"]
            .as_array()
            .and_then(|o| o.iter().find(|e| e["client"] == "ivr-client").cloned());
        match found {
            Some(e) if e["outside_per_second"].as_f64() > Some(2.0) => break e,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };

    // Greedy callers through pacer, for MEASURE.
    let client = Arc::new(TestClient::http1(pacer.proxy_addr));
    let token = token_via(&client, "ivr-client", "ivr-secret").await;
    let forwarded = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + MEASURE;
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (client, token, forwarded) = (client.clone(), token.clone(), forwarded.clone());
        workers.push(tokio::spawn(async move {
            while Instant::now() < end {
                let req = client.get_as("/api/v2/users/me", &token);
                let reply = tokio::time::timeout_at(end, client.send(req)).await;
                if let Ok(reply) = reply {
                    if reply.status == StatusCode::OK && Instant::now() <= end {
                        forwarded.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for w in workers {
        w.await.expect("worker");
    }
    stop.store(true, Ordering::Relaxed);
    outside.await.expect("outside traffic");
    pacer.shutdown().await;
    sim.shutdown().await;
    Run {
        forwarded: forwarded.load(Ordering::Relaxed),
        outside: estimate,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_use_lowers_what_pacer_sends_for_the_client_only_with_subtract() {
    let _slot = slot(Load::Timed).await;
    within_for("outside use", Duration::from_secs(40), async {
        let (with, without) = tokio::join!(outside_run(true), outside_run(false));
        eprintln!(
            "usage: subtract forwarded {} ({}), without {} ({})",
            with.forwarded, with.outside, without.forwarded, without.outside
        );
        // Both estimate the outside rate; only subtract lowers the ceiling.
        let share = with.outside["ceiling_share"].as_f64().expect("share");
        assert!(share < 0.8, "{}", with.outside);
        assert_eq!(without.outside["ceiling_share"], 1.0, "{}", without.outside);
        assert_eq!(with.outside["label"], "ivr");
        // Without subtract pacer fills its quota: a burst of 20 and 20 per 2 s after it
        // (40 in 4 s; a slow machine may miss part of the second window).
        assert!(without.forwarded * 2 >= 3 * QUOTA, "{}", without.forwarded);
        assert!(without.forwarded <= QUOTA * 3 + 2, "{}", without.forwarded);
        // With it, about half of that: what the outside use leaves.
        assert!(
            with.forwarded * 4 <= without.forwarded * 3,
            "subtract {} vs {}",
            with.forwarded,
            without.forwarded
        );
        assert!(with.forwarded >= 6, "pacer still sends: {}", with.forwarded);
    })
    .await;
}
