//! Black-box tests of the Genesys simulator over real sockets.

use crate::support::{slot, Load};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use pacer::sim::{SimConfig, SimStats, Simulator};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const IVR: (&str, &str) = ("ivr-client", "ivr-secret");
const BULK: (&str, &str) = ("bulk-client", "bulk-secret");

/// Bounds every test so a hang fails instead of stalling the suite.
const TEST_LIMIT: Duration = Duration::from_secs(30);

struct Reply {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn header_u64(&self, name: &str) -> u64 {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("missing {name}"))
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }
}

/// A tiny client for one simulator.
struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl Http {
    fn new(sim: &Simulator) -> Http {
        Http {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: sim.url(),
        }
    }

    fn h2(sim: &Simulator) -> Http {
        Http {
            client: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http(),
            base: sim.url(),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
        let resp = self.client.request(req).await.unwrap();
        let status = resp.status();
        let version = resp.version();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            version,
            headers,
            body,
        }
    }

    async fn api(&self, method: Method, path: &str, token: &str) -> Reply {
        let auth = format!("Bearer {token}");
        self.send(method, path, &[("authorization", &auth)], "")
            .await
    }

    async fn get(&self, path: &str, token: &str) -> Reply {
        self.api(Method::GET, path, token).await
    }

    async fn token_basic(&self, (id, secret): (&str, &str)) -> Reply {
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
        let auth = format!("Basic {basic}");
        self.send(
            Method::POST,
            "/oauth/token",
            &[
                ("authorization", &auth),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            "grant_type=client_credentials",
        )
        .await
    }

    async fn token_form(&self, (id, secret): (&str, &str), grant: &str) -> Reply {
        let body = format!("grant_type={grant}&client_id={id}&client_secret={secret}");
        self.send(
            Method::POST,
            "/oauth/token",
            &[("content-type", "application/x-www-form-urlencoded")],
            &body,
        )
        .await
    }

    async fn token(&self, creds: (&str, &str)) -> String {
        let r = self.token_basic(creds).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        r.json()["access_token"].as_str().unwrap().to_owned()
    }
}

async fn start(toml: &str) -> Simulator {
    let config = SimConfig::from_toml_str(toml).unwrap();
    Simulator::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap()
}

fn assert_rate_limited(r: &Reply) {
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{:?}", r.body);
    let secs = r.header_u64("retry-after");
    assert!(secs >= 1);
    let v = r.json();
    assert_eq!(v["status"], 429);
    assert_eq!(v["code"], "too.many.requests.retry.after");
    assert_eq!(
        v["message"],
        format!("Rate limit exceeded the maximum. Retry the request in [{secs}] seconds")
    );
}

#[tokio::test]
async fn exactly_n_per_window_then_room_again() {
    let _slot = slot(Load::Timed).await;
    tokio::time::timeout(TEST_LIMIT, async {
        let sim = start("window = \"2s\"\nclient_requests = 5").await;
        let http = Http::new(&sim);
        let token = http.token(IVR).await;

        for round in 0..2 {
            for i in 0..5 {
                let r = http.get("/api/v2/users", &token).await;
                assert_eq!(r.status, StatusCode::OK, "round {round} request {i}");
            }
            let r = http.get("/api/v2/users", &token).await;
            assert_rate_limited(&r);
            let retry_after = r.header_u64("retry-after");
            assert!(retry_after <= 2, "{retry_after}");
            // A 429 counts nowhere, so the next one is refused the same way.
            assert_rate_limited(&http.get("/api/v2/users", &token).await);
            tokio::time::sleep(Duration::from_secs(retry_after)).await;
        }

        let s = sim.stats();
        let ivr = s.clients["ivr-client"];
        assert_eq!((ivr.requests, ivr.ok, ivr.too_many), (1 + 14, 1 + 10, 4));
        sim.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn org_limit_spans_clients() {
    let _slot = slot(Load::Timed).await;
    tokio::time::timeout(TEST_LIMIT, async {
        let sim = start("window = \"60s\"\nclient_requests = 5\norg_requests = 8").await;
        let http = Http::new(&sim);
        let (ivr, bulk) = (http.token(IVR).await, http.token(BULK).await);

        for _ in 0..5 {
            assert_eq!(http.get("/api/v2/users", &ivr).await.status, StatusCode::OK);
        }
        assert_rate_limited(&http.get("/api/v2/users", &ivr).await);
        for _ in 0..3 {
            assert_eq!(
                http.get("/api/v2/users", &bulk).await.status,
                StatusCode::OK
            );
        }
        // bulk has used 3 of its 5, but the org's 8 are gone.
        let r = http.get("/api/v2/users", &bulk).await;
        assert_rate_limited(&r);
        assert_eq!(r.header_u64("inin-ratelimit-count"), 3);

        let s = sim.stats();
        assert_eq!(s.clients["bulk-client"].too_many, 1);
        assert_eq!(s.total.ok, 2 + 8);
        sim.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn endpoint_template_limit() {
    let _slot = slot(Load::Timed).await;
    tokio::time::timeout(TEST_LIMIT, async {
        let sim = start(
            r#"
            window = "60s"
            [[endpoint]]
            match = "PUT /api/v2/architect/ivrs/{ivrId}"
            requests = 3
            "#,
        )
        .await;
        let http = Http::new(&sim);
        let (ivr, bulk) = (http.token(IVR).await, http.token(BULK).await);

        for _ in 0..3 {
            let r = http
                .api(Method::PUT, "/api/v2/architect/ivrs/abc", &ivr)
                .await;
            assert_eq!(r.status, StatusCode::OK);
        }
        assert_rate_limited(
            &http
                .api(Method::PUT, "/api/v2/architect/ivrs/abc", &ivr)
                .await,
        );
        // The template, not the id, is limited.
        assert_rate_limited(
            &http
                .api(Method::PUT, "/api/v2/architect/ivrs/xyz", &ivr)
                .await,
        );
        // Other methods and paths are not, and scope = client keeps clients apart.
        let get = http.get("/api/v2/architect/ivrs/abc", &ivr).await;
        assert_eq!(get.status, StatusCode::OK);
        assert_eq!(http.get("/api/v2/users", &ivr).await.status, StatusCode::OK);
        let other = http
            .api(Method::PUT, "/api/v2/architect/ivrs/abc", &bulk)
            .await;
        assert_eq!(other.status, StatusCode::OK);
        sim.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn concurrency_caps() {
    let _slot = slot(Load::Timed).await;
    tokio::time::timeout(TEST_LIMIT, async {
        let sim = start("latency = \"400ms\"\nclient_concurrency = 2").await;
        let http = Http::new(&sim);
        let token = http.token(IVR).await;

        let replies = futures_join3(
            http.get("/api/v2/users", &token),
            http.get("/api/v2/users", &token),
            http.get("/api/v2/users", &token),
        )
        .await;
        let mut statuses: Vec<u16> = replies.iter().map(|r| r.status.as_u16()).collect();
        statuses.sort();
        assert_eq!(statuses, [200, 200, 429]);
        assert_eq!(sim.stats().max_inflight, 3);
        // Released after answering.
        assert_eq!(
            http.get("/api/v2/users", &token).await.status,
            StatusCode::OK
        );
        sim.shutdown().await;
    })
    .await
    .unwrap();
}

async fn futures_join3<F: std::future::Future>(a: F, b: F, c: F) -> [F::Output; 3] {
    let (a, b, c) = tokio::join!(a, b, c);
    [a, b, c]
}

#[tokio::test]
async fn token_issuance() {
    let _slot = slot(Load::Timed).await;
    tokio::time::timeout(TEST_LIMIT, async {
        let sim = start("window = \"60s\"\ntoken_requests = 3\ntoken_ttl = \"1h\"").await;
        let http = Http::new(&sim);

        let basic = http.token_basic(IVR).await;
        assert_eq!(basic.status, StatusCode::OK);
        let v = basic.json();
        assert_eq!(v["token_type"], "bearer");
        assert_eq!(v["expires_in"], 3600);
        let token = v["access_token"].as_str().unwrap().to_owned();
        assert!(token.len() >= 40);

        let form = http.token_form(IVR, "client_credentials").await;
        assert_eq!(form.status, StatusCode::OK);
        assert_ne!(form.json()["access_token"], v["access_token"]);

        let wrong = http
            .token_form(("ivr-client", "nope"), "client_credentials")
            .await;
        assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
        assert_eq!(wrong.json()["code"], "bad.credentials");
        let unknown = http.token_basic(("who", "ever")).await;
        assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
        let none = http
            .send(
                Method::POST,
                "/oauth/token",
                &[],
                "grant_type=client_credentials",
            )
            .await;
        assert_eq!(none.status, StatusCode::UNAUTHORIZED);
        let grant = http.token_form(IVR, "password").await;
        assert_eq!(grant.status, StatusCode::BAD_REQUEST);

        // Two issued so far; the third fills the quota.
        assert_eq!(http.token_basic(IVR).await.status, StatusCode::OK);
        assert_rate_limited(&http.token_basic(IVR).await);
        // Per client.
        assert_eq!(http.token_basic(BULK).await.status, StatusCode::OK);

        let me = http.get("/api/v2/tokens/me", &token).await;
        assert_eq!(me.status, StatusCode::OK);
        let me = me.json();
        assert_eq!(me["OAuthClient"]["id"], "ivr-client");
        assert_eq!(me["OAuthClient"]["name"], "IVR Data Actions");
        assert_eq!(
            me["organization"]["id"],
            "00000000-0000-4000-8000-000000000001"
        );

        let bad = http.get("/api/v2/users", "not-a-token").await;
        assert_eq!(bad.status, StatusCode::UNAUTHORIZED);
        assert_eq!(bad.json()["code"], "bad.credentials");
        let missing = http.send(Method::GET, "/api/v2/users", &[], "").await;
        assert_eq!(missing.status, StatusCode::UNAUTHORIZED);

        let s = sim.stats();
        let ivr = s.clients["ivr-client"];
        // 4 issued-or-refused tokens + wrong secret + bad grant + tokens/me.
        assert_eq!(ivr.requests, 7);
        assert_eq!(
            (ivr.ok, ivr.unauthorized, ivr.too_many, ivr.other),
            (4, 1, 1, 1)
        );
        let unknown = s.clients["unknown"];
        assert_eq!((unknown.requests, unknown.unauthorized), (4, 4));
        sim.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn stats_headers_h2_and_reset() {
    let _slot = slot(Load::Timed).await;
    tokio::time::timeout(TEST_LIMIT, async {
        let sim = start("window = \"60s\"\nclient_requests = 4\nbody_bytes = 300").await;
        let http = Http::new(&sim);
        let token = http.token(IVR).await;

        for i in 1..=4u64 {
            let r = http
                .api(Method::POST, "/api/v2/conversations/calls", &token)
                .await;
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(r.header_u64("inin-ratelimit-count"), i);
            assert_eq!(r.header_u64("inin-ratelimit-allowed"), 4);
            let reset = r.header_u64("inin-ratelimit-reset");
            assert!((59..=60).contains(&reset), "{reset}");
            assert_eq!(r.body.len(), 300);
            let v = r.json();
            assert_eq!(v["path"], "/api/v2/conversations/calls");
            assert_eq!(v["method"], "POST");
        }
        let r = http.get("/api/v2/users", &token).await;
        assert_rate_limited(&r);
        assert_eq!(r.header_u64("inin-ratelimit-count"), 4);
        assert!(r.headers.contains_key("inin-ratelimit-reset"));
        assert_eq!(
            http.get("/api/v2/users", "stale").await.status,
            StatusCode::UNAUTHORIZED
        );
        let missing = http.get("/nope", &token).await;
        assert_eq!(missing.status, StatusCode::NOT_FOUND);
        assert_eq!(missing.json()["status"], 404);

        let over_http: SimStats =
            serde_json::from_slice(&http.send(Method::GET, "/sim/stats", &[], "").await.body)
                .unwrap();
        let direct = sim.stats();
        for s in [&over_http, &direct] {
            let ivr = s.clients["ivr-client"];
            assert_eq!((ivr.requests, ivr.ok, ivr.too_many), (6, 5, 1));
            assert_eq!(s.clients["unknown"].unauthorized, 1);
            assert_eq!(s.clients.len(), 2);
            assert_eq!(s.total.requests, 7);
            assert_eq!(
                (s.total.ok, s.total.unauthorized, s.total.too_many),
                (5, 1, 1)
            );
            assert_eq!(s.max_inflight, 1);
        }

        // HTTP/2 with prior knowledge on the same port.
        let h2 = Http::h2(&sim);
        let r = h2.get("/api/v2/users", &token).await;
        assert_eq!(r.version, Version::HTTP_2);
        assert_rate_limited(&r);

        let reset = http.send(Method::POST, "/sim/reset", &[], "").await;
        assert_eq!(reset.status, StatusCode::NO_CONTENT);
        assert_eq!(sim.stats().total.requests, 0);
        // Tokens survive a reset, windows do not.
        let r = h2.get("/api/v2/users", &token).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header_u64("inin-ratelimit-count"), 1);
        sim.reset();
        assert_eq!(sim.stats().total.requests, 0);

        let addr = sim.addr();
        sim.shutdown().await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn malformed_requests_get_400() {
    tokio::time::timeout(TEST_LIMIT, async {
        let sim = start("").await;
        let mut tcp = tokio::net::TcpStream::connect(sim.addr()).await.unwrap();
        tcp.write_all(b"GARBAGE \x01\x02 what\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = tcp.read_to_end(&mut out).await;
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");

        // A bad Basic header is a 400 too, and the server keeps serving.
        let http = Http::new(&sim);
        let r = http
            .send(
                Method::POST,
                "/oauth/token",
                &[("authorization", "Basic !!!")],
                "grant_type=client_credentials",
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(http.token_basic(IVR).await.status, StatusCode::OK);
        sim.shutdown().await;
    })
    .await
    .unwrap();
}

/// `rate_headers = false`: an upstream that enforces its limit but says nothing about its
/// budget (no `inin-ratelimit-*`), only 429 with `Retry-After`.
#[tokio::test]
async fn rate_headers_can_be_switched_off() {
    tokio::time::timeout(TEST_LIMIT, async {
        let sim = start("window = \"60s\"\nclient_requests = 1\nrate_headers = false").await;
        let http = Http::new(&sim);
        let token = http.token(IVR).await;
        let ok = http.get("/api/v2/users", &token).await;
        assert_eq!(ok.status, StatusCode::OK);
        let refused = http.get("/api/v2/users", &token).await;
        assert_rate_limited(&refused);
        for r in [&ok, &refused] {
            for h in [
                "inin-ratelimit-count",
                "inin-ratelimit-allowed",
                "inin-ratelimit-reset",
            ] {
                assert!(!r.headers.contains_key(h), "{h} sent: {:?}", r.headers);
            }
        }
        sim.shutdown().await;
    })
    .await
    .unwrap();
}
