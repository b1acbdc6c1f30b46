//! Every number pacer learns from an upstream answer is untrusted: 2^64-1, negative,
//! overflowing, far-future dates and garbage in `inin-ratelimit-count`, `Retry-After`,
//! `inin-ratelimit-reset` and a token answer's `expires_in` are clamped or ignored. After
//! each, another client is answered at once and the process keeps serving.
//!
//! pacer runs on a runtime of its own thread: if a hostile answer wedged it (a loop under
//! the ledger lock once did), this test's runtime still runs its timeouts and fails
//! instead of hanging with it.

use crate::support::{empty, full, slot, within, Load, Reply, TestClient, TestUpstream};
use base64::Engine as _;
use http::{Method, StatusCode};
use std::net::SocketAddr;
use std::time::Duration;

/// How long another client may wait for its answer after a hostile one: generous for a
/// loaded machine, far below a wedge (which never answers).
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// Hostile values for every learned number.
const HOSTILE: &[&str] = &[
    "18446744073709551615",
    "-1",
    "1e309",
    "999999999999999999999999999999",
    "Fri, 31 Dec 9999 23:59:59 GMT",
    "Thu, 01 Jan 1970 00:00:00 GMT",
    "%$#@! not a number",
];

/// A pacer on its own runtime and thread; stopped when dropped.
struct Isolated {
    proxy: SocketAddr,
    admin: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Isolated {
    fn start(toml: String) -> Isolated {
        let (addrs_tx, addrs_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // Never joined: a wedged pacer must not hang the test that found it.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("pacer runtime");
            rt.block_on(async move {
                let running = crate::support::start_pacer(&toml).await;
                let admin = running.admin_addr.expect("admin listener");
                let _ = addrs_tx.send((running.proxy_addr, admin));
                let _ = stopped.await;
                running.shutdown().await;
            });
        });
        let (proxy, admin) = addrs_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("pacer started");
        Isolated {
            proxy,
            admin,
            stop: Some(stop),
        }
    }

    async fn status(&self) -> serde_json::Value {
        answered("/status", TestClient::http1(self.admin).get("/status", &[]))
            .await
            .json()
    }
}

impl Drop for Isolated {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The reply, or a failed test if it takes longer than [`ANSWER_WITHIN`].
async fn answered(what: &str, reply: impl std::future::Future<Output = Reply>) -> Reply {
    tokio::time::timeout(ANSWER_WITHIN, reply)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {ANSWER_WITHIN:?}: pacer is wedged"))
}

fn basic(client: &str) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{client}:secret"));
    format!("Basic {b64}")
}

fn config(upstream: &TestUpstream, extra: &str) -> String {
    format!(
        r#"
[[upstream]]
name = "up"
url = "{url}"
[[route]]
prefix = "/"
upstream = "up"
[[route]]
prefix = "/oauth/"
upstream = "up"
[identity]
tokens_me = false
{extra}
[queue]
max_wait = "0s"
[[limit]]
name = "per-client"
upstream = "up"
scope = "client"
requests = 100
per = "60s"
"#,
        url = upstream.url()
    )
}

/// A client that never sent anything hostile is answered by the upstream at once.
async fn another_client_is_served(client: &TestClient, after: &str) {
    let reply = answered(
        after,
        client.get(
            "/api/v2/users/me",
            &[("authorization", &basic("bystander"))],
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "after {after}: {reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_rate_headers_wedge_no_one() {
    let _slot = slot(Load::Timed).await;
    within("hostile rate headers", async {
        let upstream = TestUpstream::start().await;
        let pacer = Isolated::start(config(&upstream, ""));
        let client = TestClient::http1(pacer.proxy);
        let bystander = TestClient::http1(pacer.proxy);
        // (header, status the upstream answers with)
        let cases = [
            ("inin-ratelimit-count", 200),
            ("retry-after", 429),
            ("inin-ratelimit-reset", 429),
        ];
        for (h, (header, status)) in cases.iter().enumerate() {
            for (v, value) in HOSTILE.iter().enumerate() {
                let what = format!("{header}: {value}");
                let evil = format!("evil-{h}-{v}");
                let req = client
                    .request(Method::GET, "/api/v2/users")
                    .header("authorization", basic(&evil))
                    .header("x-reply-status", status.to_string())
                    .header("x-reply-header", &what)
                    .body(empty())
                    .unwrap();
                let reply = answered(&what, client.send(req)).await;
                assert_eq!(reply.status.as_u16(), *status, "{what}: {reply:?}");
                assert_eq!(reply.header(header), Some(*value), "passed on unchanged");
                another_client_is_served(&bystander, &what).await;
            }
        }

        let st = pacer.status().await;
        let used = |client: &str| {
            st["limits"]
                .as_array()
                .unwrap()
                .iter()
                .find(|l| l["key"] == client)
                .map(|l| (l["used"].as_u64().unwrap(), l["quota"].as_u64().unwrap()))
        };
        // 2^64-1 (and a count too long for any integer) fills the key to its ceiling,
        // no further; unusable counts add nothing to the one real send.
        assert_eq!(used("evil-0-0"), Some((100, 100)), "{st}");
        assert_eq!(used("evil-0-3"), Some((100, 100)), "{st}");
        for v in [1, 2, 4, 5, 6] {
            assert_eq!(used(&format!("evil-0-{v}")), Some((1, 100)), "{v}: {st}");
        }
        // Pauses: at most MAX_PAUSE (1 h), and a huge value is a long pause, not the
        // default; garbage is the 1 s default and past dates no pause at all.
        let pause = |client: &str| {
            st["pauses"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["client"] == client)
                .map(|p| p["seconds"].as_f64().unwrap())
        };
        for p in st["pauses"].as_array().unwrap() {
            assert!(p["seconds"].as_f64().unwrap() <= 3600.0, "{st}");
        }
        for long in ["evil-1-0", "evil-1-3", "evil-1-4", "evil-2-0", "evil-2-3"] {
            let s = pause(long).unwrap_or_else(|| panic!("{long} paused: {st}"));
            assert!(s > 3000.0, "{long}: {s} s");
        }
        assert_eq!(
            pause("evil-1-5"),
            None,
            "a date in the past pauses nothing: {st}"
        );

        // The full key sheds its own client (with a truthful Retry-After), not others.
        let shed = answered(
            "full key",
            client.get("/api/v2/users", &[("authorization", &basic("evil-0-0"))]),
        )
        .await;
        assert_eq!(shed.status, StatusCode::TOO_MANY_REQUESTS, "{shed:?}");
        assert!(shed.header("x-pacer-reason").is_some(), "{shed:?}");
        let retry: u64 = shed.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=61).contains(&retry), "{retry}");
        // A paused client is shed by pacer without reaching the upstream.
        let before = upstream.count();
        let paused = answered(
            "paused",
            client.get("/api/v2/users", &[("authorization", &basic("evil-1-0"))]),
        )
        .await;
        assert_eq!(paused.header("x-pacer-reason"), Some("upstream_paused"));
        let retry: u64 = paused.header("retry-after").unwrap().parse().unwrap();
        assert!((3000..=3600).contains(&retry), "{retry}");
        assert_eq!(upstream.count(), before);
        another_client_is_served(&bystander, "everything").await;
        let health = answered(
            "healthz",
            TestClient::http1(pacer.admin).get("/healthz", &[]),
        )
        .await;
        assert_eq!(health.status, StatusCode::OK);
    })
    .await;
}

/// A token request answered with `body`, through pacer (the test upstream echoes it).
async fn token(client: &TestClient, id: &str, body: &str) -> Reply {
    let req = client
        .request(Method::POST, "/oauth/token")
        .header("authorization", basic(id))
        .header("content-type", "application/json")
        .body(full(body.to_string()))
        .unwrap();
    answered(body, client.send(req)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_token_lifetimes_leave_the_answer_unchanged() {
    let _slot = slot(Load::Timed).await;
    within("hostile expires_in", async {
        let upstream = TestUpstream::start().await;
        let pacer = Isolated::start(config(&upstream, "token_cache = true"));
        let client = TestClient::http1(pacer.proxy);
        let bystander = TestClient::http1(pacer.proxy);
        // (expires_in as the upstream writes it, longest lifetime a cached copy may claim;
        // `None`: not cached, there is no usable lifetime)
        let cases: &[(&str, Option<u64>)] = &[
            ("18446744073709551615", Some(86_400)),
            ("1e300", Some(86_400)),
            ("\"3600\"", Some(3600)),
            ("3599.9", Some(3600)),
            ("-1", None),
            ("-9223372036854775808", None),
            ("1e309", None),
            ("\"soon\"", None),
            ("\"NaN\"", None),
            ("null", None),
            ("{\"a\":1}", None),
        ];
        for (i, (expires_in, cached)) in cases.iter().enumerate() {
            let id = format!("tok-client-{i}");
            let body = format!(
                r#"{{"access_token":"tok-{i}","token_type":"bearer","expires_in":{expires_in}}}"#
            );
            let first = token(&client, &id, &body).await;
            assert_eq!(first.status, StatusCode::OK, "{body}: {first:?}");
            assert_eq!(
                first.text(),
                body,
                "the caller gets the upstream's body unchanged"
            );
            another_client_is_served(&bystander, &body).await;

            let sent = upstream.count();
            let again = token(&client, &id, &body).await;
            assert_eq!(again.status, StatusCode::OK, "{body}: {again:?}");
            match cached {
                Some(longest) => {
                    assert_eq!(again.header("x-pacer-token-cache"), Some("hit"), "{body}");
                    let v = again.json();
                    assert_eq!(v["access_token"], format!("tok-{i}"));
                    let left = v["expires_in"].as_u64().expect("a whole number of seconds");
                    assert!(left <= *longest && left + 60 > *longest, "{body}: {left}");
                    assert_eq!(upstream.count(), sent);
                }
                None => {
                    assert_eq!(again.header("x-pacer-token-cache"), None, "{body}");
                    assert_eq!(again.text(), body);
                    assert_eq!(upstream.count(), sent + 1);
                }
            }
        }
        // Tokens with a clamped or no usable lifetime were still learned: each names its
        // client (an unknown token would be limited under a `token:` key).
        for (token, id) in [("tok-0", "tok-client-0"), ("tok-4", "tok-client-4")] {
            let reply = answered(
                "learned token",
                client.get(
                    "/api/v2/users",
                    &[("authorization", &format!("Bearer {token}"))],
                ),
            )
            .await;
            assert_eq!(reply.status, StatusCode::OK);
            let st = pacer.status().await;
            let keys: Vec<&str> = st["limits"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|l| l["key"].as_str())
                .collect();
            assert!(keys.contains(&id), "{st}");
            assert!(
                !keys.iter().any(|k| k.starts_with("token:")),
                "{token}: {st}"
            );
        }
        another_client_is_served(&bystander, "everything").await;
    })
    .await;
}
