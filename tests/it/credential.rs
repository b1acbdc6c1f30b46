//! The credential broker: a route with `credential = "NAME"` sends pacer's own token
//! (fetched once however many callers arrive, refreshed after an upstream 401) and never
//! the caller's.

use crate::support::{
    full, metric_sum, slot, start_pacer_with_env, within, GenBody, Load, TestClient, TestUpstream,
};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use pacer::sim::{SimConfig, Simulator};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

const KEY: &str = "app-key-1";
const SECRET: &str = "ivr-secret";

async fn sim() -> Simulator {
    Simulator::start("127.0.0.1:0".parse().unwrap(), SimConfig::default())
        .await
        .unwrap()
}

/// Login at `login`, the credential route `/api/` to `api`, a second one `/rec/` to `rec`.
fn config(login: &str, api: &str, rec: &str, buffer: u64) -> String {
    format!(
        r#"
[server]
buffer_body_bytes = {buffer}
[identity]
tokens_me = false
unknown_clients = "reject"
[[upstream]]
name = "login"
url = "{login}"
[[upstream]]
name = "api"
url = "{api}"
[[upstream]]
name = "rec"
url = "{rec}"
[[credential]]
name = "ivr"
upstream = "login"
client_id = "ivr-client"
client_secret = "${{IVR_SECRET}}"
[[route]]
prefix = "/api/"
upstream = "api"
credential = "ivr"
inbound_auth = {{ header = "x-app-key", keys = ["{KEY}"] }}
[[route]]
prefix = "/rec/"
upstream = "rec"
strip_prefix = true
credential = "ivr"
inbound_auth = {{ header = "x-app-key", keys = ["{KEY}"] }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_first_callers_cost_one_token_exchange_and_never_send_their_own_token() {
    let _slot = slot(Load::Timed).await;
    within("credential route", async {
        let sim = sim().await;
        let rec = TestUpstream::start().await;
        let text = config(&sim.url(), &sim.url(), &rec.url(), 64 * 1024);
        let pacer = start_pacer_with_env(&text, &[("IVR_SECRET", SECRET)]).await;
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let client = TestClient::http1(pacer.proxy_addr);
                tokio::spawn(async move {
                    let token = format!("Bearer caller-own-{i}");
                    let headers = [("x-app-key", KEY), ("authorization", token.as_str())];
                    client.get("/api/v2/users/me", &headers).await
                })
            })
            .collect();
        for t in tasks {
            let reply = t.await.unwrap();
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        }
        // The simulator answers 401 to any token it did not issue: all 50 went with the
        // credential's token, fetched once.
        let stats = sim.stats();
        let ivr = stats.clients["ivr-client"];
        assert_eq!((ivr.requests, ivr.ok), (51, 51), "{stats:?}");
        assert_eq!(stats.total.requests, 51, "{stats:?}");

        // What the upstream receives: pacer's token, not the caller's, nor the inbound key.
        let client = TestClient::http1(pacer.proxy_addr);
        let reply = client
            .get(
                "/rec/anything",
                &[("x-app-key", KEY), ("authorization", "Bearer mine")],
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK);
        let seen = rec.only();
        let auth = seen
            .header("authorization")
            .expect("an Authorization upstream");
        assert!(
            auth.starts_with("Bearer ") && auth != "Bearer mine",
            "{auth}"
        );
        assert!(seen.header("x-app-key").is_none());
        assert_eq!(
            sim.stats().total.requests,
            51,
            "the cached token was reused"
        );

        // Without the inbound key: 401 from pacer, nothing upstream.
        let reply = client
            .get("/rec/x", &[("authorization", "Bearer mine")])
            .await;
        reply.assert_pacer_error(StatusCode::UNAUTHORIZED);
        assert_eq!(rec.count(), 1);

        // The token and the secret appear nowhere on the admin side.
        let admin = TestClient::http1(pacer.admin_addr.unwrap());
        let token = auth.trim_start_matches("Bearer ");
        for path in ["/metrics", "/status"] {
            let text = admin.get(path, &[]).await.text();
            assert!(!text.contains(token) && !text.contains(SECRET), "{path}");
        }
        let metrics = admin.get("/metrics", &[]).await.text();
        let exchanges = |result| {
            let want = [("credential", "ivr"), ("result", result)];
            metric_sum(&metrics, "pacer_credential_exchanges_total", &want)
        };
        assert_eq!((exchanges("ok"), exchanges("error")), (1.0, 0.0));
        // /status says which credentials there are and that the token is in force.
        let status = admin.get("/status", &[]).await.json();
        let cred = &status["credentials"][0];
        assert_eq!(cred["name"], "ivr", "{status}");
        assert_eq!(cred["client_id"], "ivr-client", "{status}");
        assert_eq!(cred["token"], "valid", "{status}");
        assert!(cred["expires_in_seconds"].as_u64().unwrap() > 0, "{status}");
        assert_eq!(cred["last_error"], serde_json::Value::Null, "{status}");
        sim.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_that_refuses_the_secret_is_a_502_not_a_hang() {
    let _slot = slot(Load::Timed).await;
    within("credential unavailable", async {
        let sim = sim().await;
        let rec = TestUpstream::start().await;
        let text = config(&sim.url(), &sim.url(), &rec.url(), 64 * 1024);
        let pacer = start_pacer_with_env(&text, &[("IVR_SECRET", "wrong")]).await;
        let client = TestClient::http1(pacer.proxy_addr);
        let reply = client.get("/rec/x", &[("x-app-key", KEY)]).await;
        reply.assert_pacer_error(StatusCode::BAD_GATEWAY);
        assert_eq!(
            reply.header("x-pacer-reason"),
            Some("credential_unavailable")
        );
        assert_eq!(rec.count(), 0);
        let admin = TestClient::http1(pacer.admin_addr.unwrap());
        let metrics = admin.get("/metrics", &[]).await.text();
        let want = [("credential", "ivr"), ("result", "error")];
        assert_eq!(
            metric_sum(&metrics, "pacer_credential_exchanges_total", &want),
            1.0
        );
        sim.shutdown().await;
    })
    .await;
}

/// A login and API in one: tokens `tok-1`, `tok-2`, …; the API refuses `tok-1` with 401
/// (as if it had been revoked) and echoes the body of requests with any other.
#[derive(Default)]
struct Revoking {
    exchanges: AtomicUsize,
    api: Mutex<Vec<(String, Bytes)>>,
}

async fn revoking() -> (SocketAddr, Arc<Revoking>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(Revoking::default());
    let shared = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let state = shared.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(answer(&state, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, state)
}

async fn answer(state: &Revoking, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: Bytes| {
        let mut r = Response::new(Full::new(body));
        *r.status_mut() = status;
        r
    };
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if parts.uri.path() == "/oauth/token" {
        let n = state.exchanges.fetch_add(1, Ordering::SeqCst) + 1;
        let json = format!(r#"{{"access_token":"tok-{n}","expires_in":3600}}"#);
        return reply(StatusCode::OK, Bytes::from(json));
    }
    let auth = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    state.api.lock().unwrap().push((auth.clone(), body.clone()));
    if auth == "Bearer tok-1" {
        return reply(StatusCode::UNAUTHORIZED, Bytes::new());
    }
    reply(StatusCode::OK, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_401_costs_one_refresh_and_one_replay() {
    let _slot = slot(Load::Timed).await;
    within("credential refresh", async {
        let (addr, up) = revoking().await;
        let url = format!("http://{addr}");
        let text = config(&url, &url, &url, 1024);
        let pacer = start_pacer_with_env(&text, &[("IVR_SECRET", SECRET)]).await;
        let client = TestClient::http1(pacer.proxy_addr);
        let post = |body: crate::support::TestBody| {
            client
                .request(Method::POST, "/api/v2/things")
                .header("x-app-key", KEY)
                .body(body)
                .unwrap()
        };
        // Read whole (within buffer_body_bytes): refused with tok-1, replayed with tok-2.
        let reply = client.send(post(full("hello"))).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.body, Bytes::from_static(b"hello"));
        assert_eq!(up.exchanges.load(Ordering::SeqCst), 2);
        let seen: Vec<_> = up.api.lock().unwrap().clone();
        let auths: Vec<_> = seen.iter().map(|(a, _)| a.as_str()).collect();
        assert_eq!(auths, ["Bearer tok-1", "Bearer tok-2"]);
        assert!(seen.iter().all(|(_, b)| b == "hello"), "{seen:?}");

        // The refreshed token stays in use: no further exchange.
        let reply = client.send(post(full("again"))).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(up.exchanges.load(Ordering::SeqCst), 2);
        assert_api_requests(&up, 3);
    })
    .await;
}

fn assert_api_requests(up: &Revoking, api_requests: usize) {
    assert_eq!(up.api.lock().unwrap().len(), api_requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_to_a_streamed_body_is_a_502_credential_rejected() {
    let _slot = slot(Load::Timed).await;
    within("credential rejected", async {
        let (addr, up) = revoking().await;
        let url = format!("http://{addr}");
        // Bodies over 16 bytes stream: they cannot be sent again.
        let text = config(&url, &url, &url, 16);
        let pacer = start_pacer_with_env(&text, &[("IVR_SECRET", SECRET)]).await;
        let client = TestClient::http1(pacer.proxy_addr);
        let req = client
            .request(Method::POST, "/api/v2/things")
            .header("x-app-key", KEY)
            .body(GenBody::chunked(4096).boxed())
            .unwrap();
        let reply = client.send(req).await;
        reply.assert_pacer_error(StatusCode::BAD_GATEWAY);
        assert_eq!(reply.header("x-pacer-reason"), Some("credential_rejected"));
        // The token was dropped all the same: the next request goes with a fresh one.
        let reply = client.get("/api/v2/x", &[("x-app-key", KEY)]).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(up.exchanges.load(Ordering::SeqCst), 2);
        assert_api_requests(&up, 2);
    })
    .await;
}
