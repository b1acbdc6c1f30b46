//! The token broker: a fleet of workers asking for client-credentials tokens costs the
//! upstream one token request, not one per worker.

use crate::support::{slot, start_pacer, token_reply_via, within, Load, TestClient};
use http::StatusCode;
use pacer::sim::{SimConfig, Simulator};
use std::collections::BTreeSet;

async fn sim() -> Simulator {
    let cfg = SimConfig::from_toml_str(
        r#"
token_requests = 1000
[[client]]
id = "fleet"
secret = "fleet-secret"
[[client]]
id = "other"
secret = "other-secret"
"#,
    )
    .unwrap();
    Simulator::start("127.0.0.1:0".parse().unwrap(), cfg)
        .await
        .unwrap()
}

fn config(sim: &Simulator, cache: bool) -> String {
    format!(
        r#"
[[upstream]]
name = "api"
url = "{url}"
[[upstream]]
name = "login"
url = "{url}"
[[route]]
prefix = "/"
upstream = "api"
[[route]]
prefix = "/oauth/"
upstream = "login"
[identity]
tokens_me = false
token_cache = {cache}
"#,
        url = sim.url()
    )
}

async fn token(client: &TestClient, id: &str, secret: &str) -> (String, u64, bool) {
    let reply = token_reply_via(client, id, secret).await;
    let v = reply.json();
    (
        v["access_token"].as_str().unwrap().to_string(),
        v["expires_in"].as_u64().unwrap(),
        reply.header("x-pacer-token-cache") == Some("hit"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_workers_costs_one_token_request() {
    let _slot = slot(Load::Timed).await;
    within("broker", async {
        let sim = sim().await;
        let pacer = start_pacer(&config(&sim, true)).await;
        let mut tasks = Vec::new();
        for _ in 0..40 {
            let client = TestClient::http1(pacer.proxy_addr);
            tasks.push(tokio::spawn(async move {
                token(&client, "fleet", "fleet-secret").await
            }));
        }
        let mut tokens = BTreeSet::new();
        let mut hits = 0;
        for t in tasks {
            let (token, expires_in, hit) = t.await.unwrap();
            assert!(expires_in > 0 && expires_in <= 86_400, "{expires_in}");
            tokens.insert(token);
            hits += u64::from(hit);
        }
        assert_eq!(tokens.len(), 1, "every worker gets the one issued token");
        assert_eq!(hits, 39);
        let stats = sim.stats();
        assert_eq!(stats.clients["fleet"].requests, 1, "{stats:?}");

        // Other credentials never share it; the token works through pacer.
        let client = TestClient::http1(pacer.proxy_addr);
        let (other, _, hit) = token(&client, "other", "other-secret").await;
        assert!(!hit && !tokens.contains(&other));
        let fleet_token = tokens.into_iter().next().unwrap();
        let reply = client
            .get(
                "/api/v2/users",
                &[("authorization", &format!("Bearer {fleet_token}"))],
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(sim.stats().clients["fleet"].ok, 2);

        let metrics = TestClient::http1(pacer.admin_addr.unwrap())
            .get("/metrics", &[])
            .await
            .text();
        let cached: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("pacer_requests_total{") && l.contains("outcome=\"cached\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(cached, 39.0, "{metrics}");
        assert!(!metrics.contains(&fleet_token));
        pacer.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_cache_every_request_goes_upstream() {
    let _slot = slot(Load::Timed).await;
    within("no broker", async {
        let sim = sim().await;
        let pacer = start_pacer(&config(&sim, false)).await;
        let client = TestClient::http1(pacer.proxy_addr);
        let mut tokens = BTreeSet::new();
        for _ in 0..5 {
            let (token, _, hit) = token(&client, "fleet", "fleet-secret").await;
            assert!(!hit);
            tokens.insert(token);
        }
        assert_eq!(tokens.len(), 5);
        assert_eq!(sim.stats().clients["fleet"].requests, 5);
        pacer.shutdown().await;
    })
    .await;
}
