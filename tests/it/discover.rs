//! The org's real limits (`[discover]`): pacer reads the published limits from the
//! simulator and caps its limits at min(configured, published); with the limits endpoint
//! failing it runs on its configured values and says so.

use crate::support::{slot, start_pacer, unique_temp_dir, within, Load, TestClient};
use http::StatusCode;
use pacer::app::Running;
use pacer::sim::{SimConfig, Simulator};
use std::time::Duration;

const KEY: &str = "app-key-1";
const WINDOW: Duration = Duration::from_secs(2);

/// A simulator whose clients may send `published` requests per 2 s window (and publish
/// that), without `inin-ratelimit-*` headers, so that only discovery can teach pacer it.
async fn sim(published: u64, publish: bool) -> Simulator {
    let cfg = SimConfig {
        window: WINDOW,
        client_requests: published,
        rate_headers: false,
        publish_limits: publish,
        ..SimConfig::default()
    };
    Simulator::start("127.0.0.1:0".parse().unwrap(), cfg)
        .await
        .unwrap()
}

/// pacer in front of `sim`: the credential route `/api/` sends as `ivr-client`, whose
/// per-client limit is `configured` per 2 s and names the published per-client key;
/// discovery reads with another client (`admin-client`), so its reads count elsewhere.
fn config(sim: &Simulator, configured: u64, max_wait: &str) -> String {
    format!(
        r#"
[identity]
tokens_me = false
[queue]
max_wait = "{max_wait}"
[[upstream]]
name = "login"
url = "{url}"
[[upstream]]
name = "api"
url = "{url}"
[[credential]]
name = "ivr"
upstream = "login"
client_id = "ivr-client"
client_secret = "ivr-secret"
[[credential]]
name = "reader"
upstream = "login"
client_id = "admin-client"
client_secret = "admin-secret"
[[route]]
prefix = "/api/"
upstream = "api"
credential = "ivr"
inbound_auth = {{ header = "x-app-key", keys = ["{KEY}"] }}
[discover]
credential = "reader"
upstream = "api"
interval = "1h"
[[limit]]
name = "per-client"
upstream = "api"
scope = "client"
requests = {configured}
per = "2s"
discover = {{ namespace = "platform.api", key = "client.credentials.token.rate.per.minute" }}
"#,
        url = sim.url()
    )
}

/// The `per-client` row of `/status`' discovery once a read has happened.
async fn discovered(pacer: &Running) -> serde_json::Value {
    let admin = TestClient::http1(pacer.admin_addr.unwrap());
    loop {
        let status = admin.get("/status", &[]).await.json();
        let row = status["discovery"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["limit"] == "per-client").cloned())
            .expect("per-client in /status discovery");
        if row["source"] != "configured (not read yet)" {
            return row;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `n` concurrent requests through the credential route; their statuses.
async fn burst(pacer: &Running, n: usize) -> Vec<StatusCode> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let client = TestClient::http1(pacer.proxy_addr);
            tokio::spawn(async move {
                client
                    .get("/api/v2/users", &[("x-app-key", KEY)])
                    .await
                    .status
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_lowers_a_configured_ceiling_to_the_published_one() {
    let _slot = slot(Load::Timed).await;
    within("discovery lowers", async {
        let sim = sim(20, true).await;
        let pacer = start_pacer(&config(&sim, 100, "10s")).await;
        let row = discovered(&pacer).await;
        assert_eq!(row["configured"], 100, "{row}");
        assert_eq!(row["published"], 20, "{row}");
        assert_eq!(row["effective"], 20, "{row}");
        assert_eq!(row["source"], "discovered", "{row}");
        // Configured at 100, pacer would send all 45 at once and the upstream refuse 25.
        let statuses = burst(&pacer, 45).await;
        assert!(
            statuses.iter().all(|s| *s == StatusCode::OK),
            "{statuses:?}"
        );
        let ivr = sim.stats().clients["ivr-client"];
        assert_eq!(ivr.too_many, 0, "{ivr:?}");
        // The 45 and pacer's one token exchange.
        assert_eq!(ivr.ok, 46, "{ivr:?}");
        let metrics = TestClient::http1(pacer.admin_addr.unwrap())
            .get("/metrics", &[])
            .await
            .text();
        assert!(
            metrics.contains("pacer_limit_discovered{limit=\"per-client\",upstream=\"api\"} 20"),
            "{metrics}"
        );
        pacer.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_never_raises_a_configured_ceiling() {
    let _slot = slot(Load::Timed).await;
    within("discovery never raises", async {
        let sim = sim(50, true).await;
        let pacer = start_pacer(&config(&sim, 10, "50ms")).await;
        let row = discovered(&pacer).await;
        assert_eq!(
            (&row["published"], &row["effective"]),
            (&50.into(), &10.into()),
            "{row}"
        );
        assert_eq!(row["source"], "configured", "{row}");
        // Anything past the configured 10 in the window is shed by pacer, not sent.
        let statuses = burst(&pacer, 25).await;
        let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
        assert_eq!(ok, 10, "{statuses:?}");
        // The 10 and pacer's one token exchange.
        assert_eq!(sim.stats().clients["ivr-client"].requests, 11);
        pacer.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_limits_endpoint_failing_pacer_runs_on_its_configured_values_and_says_so() {
    let _slot = slot(Load::Timed).await;
    within("discovery failing", async {
        let sim = sim(20, false).await;
        let pacer = start_pacer(&config(&sim, 10, "50ms")).await;
        let row = discovered(&pacer).await;
        assert_eq!(row["effective"], 10, "{row}");
        assert_eq!(row["published"], serde_json::Value::Null, "{row}");
        let source = row["source"].as_str().unwrap();
        assert!(
            source.starts_with("configured (discovery failed: "),
            "{row}"
        );
        assert!(row["error"].as_str().unwrap().contains("503"), "{row}");
        let statuses = burst(&pacer, 15).await;
        let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
        assert_eq!(ok, 10, "{statuses:?}");
        let metrics = TestClient::http1(pacer.admin_addr.unwrap())
            .get("/metrics", &[])
            .await
            .text();
        assert!(
            metrics.contains("pacer_discovery_errors_total 1"),
            "{metrics}"
        );
        assert!(!metrics.contains("pacer_limit_discovered{"), "{metrics}");
        pacer.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_discover_prints_each_limits_value_and_source() {
    let _slot = slot(Load::Timed).await;
    within("check-config --discover", async {
        let dir = unique_temp_dir("discover");
        for (publish, expect) in [
            (
                true,
                "limit \"per-client\" (upstream api): configured 100, published 20, effective 20 per 2s: discovered",
            ),
            (false, "FAILED to read namespace \"platform.api\""),
        ] {
            let sim = sim(20, publish).await;
            let file = dir.join(format!("discover-{publish}.toml"));
            std::fs::write(&file, config(&sim, 100, "1s")).unwrap();
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pacer"))
                .args(["check-config", "--discover", file.to_str().unwrap()])
                .output()
                .await
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{text}");
            assert!(text.contains(expect), "{expect:?} missing in:\n{text}");
            if !publish {
                assert!(text.contains("configured 100, published -, effective 100"), "{text}");
            }
        }
        let _ = std::fs::remove_dir_all(dir);
    })
    .await;
}
