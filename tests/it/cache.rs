//! The response cache and request coalescing (`[[cache]]`), through real sockets to a
//! recording upstream: one upstream call for a burst of identical reads, hits until the TTL,
//! never another caller's answer, never an answer that must not be kept. The cache's clock
//! is the real one, so the TTLs here are short real ones.

use crate::support::{
    one_route_config, prom_samples, slot, start_pacer, within, Load, Reply, TestClient,
    TestUpstream, NO_TOKEN_LOOKUPS,
};
use http::StatusCode;
use std::time::{Duration, Instant};

/// The read-only question of an IVR flow: a queue's estimated wait time.
const EWT: &str = "/api/v2/routing/queues/q1/estimatedwaittime";

/// A `[[cache]]` entry for estimated wait times, with `extra` keys.
fn ewt_entry(ttl: &str, extra: &str) -> String {
    format!(
        "[[cache]]\nmatch = \"GET /api/v2/routing/queues/{{queueId}}/estimatedwaittime\"\n\
         ttl = \"{ttl}\"\n{extra}\n"
    )
}

async fn get(client: &TestClient, path: &str, token: &str, extra: &[(&str, &str)]) -> Reply {
    let auth = format!("Bearer {token}");
    let mut headers = vec![("authorization", auth.as_str())];
    headers.extend_from_slice(extra);
    client.get(path, &headers).await
}

/// A path, the control headers shaping the upstream's answer, and the status expected.
type Case = (
    &'static str,
    &'static [(&'static str, &'static str)],
    StatusCode,
);

fn cache_header(r: &Reply) -> Option<&str> {
    r.header("x-pacer-cache")
}

#[tokio::test]
async fn fifty_identical_gets_cost_one_call_then_hits_until_the_ttl() {
    let _slot = slot(Load::Timed).await;
    let up = TestUpstream::start().await;
    let toml = format!(
        "{}\n{}",
        one_route_config("", &up.url(), ""),
        ewt_entry("2s", "")
    );
    let pacer = start_pacer(&toml).await;
    let client = TestClient::http1(pacer.proxy_addr);
    within("burst", async {
        // The leader's answer takes a while: the others arrive while it is upstream.
        let burst = (0..50).map(|_| {
            let client = &client;
            async move {
                get(
                    client,
                    EWT,
                    "tok-a",
                    &[("x-reply-delay-ms", "800"), ("x-reply-header", "x-for: a")],
                )
                .await
            }
        });
        let replies = futures_util::future::join_all(burst).await;
        assert!(replies.iter().all(|r| r.status == StatusCode::OK));
        assert_eq!(up.count(), 1, "50 identical GETs, one upstream call");
        let misses = replies
            .iter()
            .filter(|r| cache_header(r) == Some("miss"))
            .count();
        assert_eq!(misses, 1, "one leader");
        assert!(replies.iter().all(|r| matches!(
            cache_header(r),
            Some("miss" | "coalesced" | "hit")
        ) && r.header("x-for") == Some("a")));

        // Within the TTL: answered from the copy, with its age.
        for _ in 0..5 {
            let r = get(&client, EWT, "tok-a", &[]).await;
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(cache_header(&r), Some("hit"));
            assert!(r.header("age").is_some_and(|a| a.parse::<u64>().is_ok()));
        }
        assert_eq!(up.count(), 1, "hits make no upstream call");

        // After the TTL: one call again.
        tokio::time::sleep(Duration::from_millis(2300)).await;
        let r = get(&client, EWT, "tok-a", &[]).await;
        assert_eq!(cache_header(&r), Some("miss"));
        assert_eq!(up.count(), 2);
        let r = get(&client, EWT, "tok-a", &[]).await;
        assert_eq!(cache_header(&r), Some("hit"));
        assert_eq!(up.count(), 2);
    })
    .await;

    // Counted: cached outcomes, lookups by result, the store's size, hit ratios.
    let admin = TestClient::http1(pacer.admin_addr.expect("admin listener"));
    let metrics = admin.get("/metrics", &[]).await.text();
    let samples = prom_samples(&metrics);
    let sum = |name: &str, label: (&str, &str)| -> f64 {
        samples
            .iter()
            .filter(|s| s.name == name && s.label(label.0) == Some(label.1))
            .map(|s| s.value)
            .sum()
    };
    assert_eq!(sum("pacer_requests_total", ("outcome", "cached")), 55.0);
    assert_eq!(sum("pacer_requests_total", ("outcome", "forwarded")), 2.0);
    assert_eq!(sum("pacer_cache_lookups_total", ("result", "miss")), 2.0);
    assert_eq!(
        sum("pacer_cache_lookups_total", ("result", "hit"))
            + sum("pacer_cache_lookups_total", ("result", "coalesced")),
        55.0
    );
    let gauge = |name: &str| samples.iter().find(|s| s.name == name).map(|s| s.value);
    assert_eq!(gauge("pacer_cache_entries"), Some(1.0));
    assert!(gauge("pacer_cache_bytes").is_some_and(|b| b > 0.0));
    let status = admin.get("/status", &[]).await.json();
    let entry = &status["cache"]["by_entry"][0];
    assert_eq!(entry["misses"], 2);
    assert!((entry["hit_ratio"].as_f64().unwrap() - 55.0 / 57.0).abs() < 1e-9);
    assert!(!metrics.contains("tok-a"), "no token in metrics");
}

#[tokio::test]
async fn another_token_or_another_client_never_gets_the_first_ones_answer() {
    let _slot = slot(Load::Timed).await;
    let up = TestUpstream::start().await;
    // Callers are told apart by a header here, so two tokens can be one client.
    let toml = format!(
        "[[upstream]]\nname = \"up\"\nurl = \"{}\"\n\n[[route]]\nprefix = \"/api/\"\n\
         upstream = \"up\"\nidentity = [\"header:x-caller\"]\n\n{NO_TOKEN_LOOKUPS}\n{}\n\
         [[cache]]\nmatch = \"GET /api/v2/users/{{userId}}/presences/purecloud\"\nttl = \"1m\"\n\
         share = \"client\"\n",
        up.url(),
        ewt_entry("1m", "share = \"token\""),
    );
    let pacer = start_pacer(&toml).await;
    let client = TestClient::http1(pacer.proxy_addr);
    within("callers", async {
        let ask = |path: &'static str, token: &'static str, caller: &'static str| {
            let client = &client;
            async move {
                let mark = format!("x-for: {token}/{caller}");
                get(
                    client,
                    path,
                    token,
                    &[("x-caller", caller), ("x-reply-header", &mark)],
                )
                .await
            }
        };
        // share = "token": the same client's other token gets its own answer.
        let a = ask(EWT, "tok-a", "acme").await;
        assert_eq!(cache_header(&a), Some("miss"));
        let b = ask(EWT, "tok-b", "acme").await;
        assert_eq!(
            (cache_header(&b), b.header("x-for")),
            (Some("miss"), Some("tok-b/acme"))
        );
        let a2 = ask(EWT, "tok-a", "acme").await;
        assert_eq!(
            (cache_header(&a2), a2.header("x-for")),
            (Some("hit"), Some("tok-a/acme"))
        );
        assert_eq!(up.count(), 2);

        // share = "client": one client's tokens share; another client never does.
        const PRESENCE: &str = "/api/v2/users/u1/presences/purecloud";
        let c = ask(PRESENCE, "tok-a", "acme").await;
        assert_eq!(cache_header(&c), Some("miss"));
        let d = ask(PRESENCE, "tok-b", "acme").await;
        assert_eq!(
            (cache_header(&d), d.header("x-for")),
            (Some("hit"), Some("tok-a/acme"))
        );
        let e = ask(PRESENCE, "tok-a", "globex").await;
        assert_eq!(
            (cache_header(&e), e.header("x-for")),
            (Some("miss"), Some("tok-a/globex"))
        );
        assert_eq!(up.count(), 4);
        // Another query string is another question.
        let q = ask("/api/v2/users/u1/presences/purecloud?x=1", "tok-a", "acme").await;
        assert_eq!(cache_header(&q), Some("miss"));
        assert_eq!(up.count(), 5);
    })
    .await;
}

#[tokio::test]
async fn no_store_errors_set_cookie_and_oversize_answers_are_never_kept() {
    let _slot = slot(Load::Timed).await;
    let up = TestUpstream::start().await;
    let toml = format!(
        "{}\n{}",
        one_route_config("", &up.url(), ""),
        ewt_entry("1m", "max_entry_bytes = 1024"),
    );
    let pacer = start_pacer(&toml).await;
    let client = TestClient::http1(pacer.proxy_addr);
    within("uncacheable", async {
        let cases: [Case; 5] = [
            (
                "/api/v2/routing/queues/nostore/estimatedwaittime",
                &[("x-reply-header", "cache-control: max-age=60, no-store")],
                StatusCode::OK,
            ),
            (
                "/api/v2/routing/queues/private/estimatedwaittime",
                &[("x-reply-header", "cache-control: private")],
                StatusCode::OK,
            ),
            (
                "/api/v2/routing/queues/missing/estimatedwaittime",
                &[("x-reply-status", "404")],
                StatusCode::NOT_FOUND,
            ),
            (
                "/api/v2/routing/queues/cookie/estimatedwaittime",
                &[("x-reply-header", "set-cookie: s=1")],
                StatusCode::OK,
            ),
            (
                "/api/v2/routing/queues/big/estimatedwaittime",
                &[("x-reply-download", "5000")],
                StatusCode::OK,
            ),
        ];
        for (path, headers, status) in cases {
            let before = up.count();
            for _ in 0..2 {
                let r = get(&client, path, "tok-a", headers).await;
                assert_eq!(r.status, status, "{path}");
                assert_ne!(cache_header(&r), Some("hit"), "{path}");
            }
            assert_eq!(up.count(), before + 2, "{path}: both went upstream");
        }
        // The over-size answer streamed through whole.
        let r = get(
            &client,
            "/api/v2/routing/queues/big/estimatedwaittime",
            "tok-a",
            &[("x-reply-download", "5000")],
        )
        .await;
        assert_eq!(r.body.len(), 5000);
        // The control case: a plain 200 is kept.
        let path = "/api/v2/routing/queues/plain/estimatedwaittime";
        get(&client, path, "tok-a", &[]).await;
        let r = get(&client, path, "tok-a", &[]).await;
        assert_eq!(cache_header(&r), Some("hit"));
    })
    .await;
    let status = TestClient::http1(pacer.admin_addr.expect("admin"))
        .get("/status", &[])
        .await
        .json();
    assert_eq!(
        status["cache"]["entries"], 1,
        "only the plain answer is kept"
    );
}

#[tokio::test]
async fn when_the_shared_call_fails_each_follower_goes_on_its_own() {
    let _slot = slot(Load::Timed).await;
    let up = TestUpstream::start().await;
    let toml = format!(
        "{}\n{}",
        one_route_config("", &up.url(), ""),
        ewt_entry("1m", "")
    );
    let pacer = start_pacer(&toml).await;
    let client = TestClient::http1(pacer.proxy_addr);
    within("failed flight", async {
        let burst = (0..5).map(|_| {
            let client = &client;
            async move {
                get(
                    client,
                    EWT,
                    "tok-a",
                    &[("x-reply-delay-ms", "300"), ("x-reply-status", "503")],
                )
                .await
            }
        });
        let replies = futures_util::future::join_all(burst).await;
        // Every caller is answered, by the upstream: nobody got the leader's failure.
        assert!(replies
            .iter()
            .all(|r| r.status == StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(up.count(), 5);
    })
    .await;
}

#[tokio::test]
async fn the_leaders_caller_going_away_does_not_cancel_the_shared_call() {
    let _slot = slot(Load::Timed).await;
    let up = TestUpstream::start().await;
    let toml = format!(
        "{}\n{}",
        one_route_config("", &up.url(), ""),
        ewt_entry("1m", "")
    );
    let pacer = start_pacer(&toml).await;
    let addr = pacer.proxy_addr;
    within("leader gone", async {
        let leader = tokio::spawn(async move {
            let client = TestClient::http1(addr);
            get(&client, EWT, "tok-a", &[("x-reply-delay-ms", "1000")]).await
        });
        up.wait_for(1).await;
        let client = TestClient::http1(addr);
        let followers = tokio::spawn(async move {
            let burst = (0..3).map(|_| get(&client, EWT, "tok-a", &[]));
            futures_util::future::join_all(burst).await
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The leader's caller hangs up while its call is upstream.
        leader.abort();
        let replies = followers.await.expect("followers");
        for r in &replies {
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(cache_header(r), Some("coalesced"));
        }
        assert_eq!(up.count(), 1);
    })
    .await;
}

/// Issue 15, done when 2: an IVR flow asks the same read-only question on every call;
/// with a `[[cache]]` entry the flood costs one upstream call per TTL, not one per call.
#[tokio::test]
async fn an_ivr_flood_of_one_question_costs_one_call_per_ttl() {
    let _slot = slot(Load::Timed).await;
    let up = TestUpstream::start().await;
    let toml = format!(
        "{}\n{}",
        one_route_config("", &up.url(), ""),
        ewt_entry("1s", "share = \"client\"")
    );
    let pacer = start_pacer(&toml).await;
    let client = TestClient::http1(pacer.proxy_addr);
    const CALLS_AT_ONCE: usize = 10;
    const ROUNDS: usize = 25;
    let started = Instant::now();
    within("flood", async {
        for _ in 0..ROUNDS {
            let calls = (0..CALLS_AT_ONCE).map(|_| get(&client, EWT, "ivr-token", &[]));
            for r in futures_util::future::join_all(calls).await {
                assert_eq!(r.status, StatusCode::OK);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    let upstream_calls = up.count();
    // One call per started TTL window: at most elapsed / ttl + 1 (no assumption on speed).
    let per_ttl = (elapsed / 1.0).floor() as usize + 1;
    assert!(
        upstream_calls <= per_ttl,
        "{upstream_calls} upstream calls in {elapsed:.1}s with a 1s TTL"
    );
    assert!(upstream_calls >= 1);
    // And at most one per round: the calls asked at once share one upstream call.
    assert!(
        upstream_calls <= ROUNDS,
        "{upstream_calls} calls for {ROUNDS} rounds of {CALLS_AT_ONCE}"
    );
}

#[tokio::test]
async fn a_follower_waits_for_a_flight_no_longer_than_its_own_max_wait() {
    let _slot = slot(Load::Timed).await;
    let up = TestUpstream::start().await;
    let toml = format!(
        "{}\n{}",
        one_route_config("", &up.url(), ""),
        ewt_entry("1m", "")
    );
    let pacer = start_pacer(&toml).await;
    let client = TestClient::http1(pacer.proxy_addr);
    within("impatient follower", async {
        let leader = get(&client, EWT, "tok-a", &[("x-reply-delay-ms", "1500")]);
        let followers = async {
            up.wait_for(1).await;
            // One caller may wait 100 ms (x-pacer-max-wait): it does not sit out the
            // leader's 1.5 s but goes upstream on its own; a patient one waits.
            let impatient = get(
                &client,
                EWT,
                "tok-a",
                &[
                    ("x-pacer-max-wait", "100ms"),
                    ("x-reply-header", "x-own: yes"),
                ],
            );
            let patient = get(&client, EWT, "tok-a", &[]);
            futures_util::future::join(impatient, patient).await
        };
        let (lead, (impatient, patient)) = futures_util::future::join(leader, followers).await;
        assert_eq!(cache_header(&lead), Some("miss"));
        assert_eq!(patient.status, StatusCode::OK);
        assert_eq!(cache_header(&patient), Some("coalesced"));
        assert_eq!(impatient.status, StatusCode::OK);
        assert_eq!(
            impatient.header("x-own"),
            Some("yes"),
            "its own upstream answer"
        );
        assert_eq!(up.count(), 2);
    })
    .await;
}

#[tokio::test]
async fn requests_answered_by_an_identical_flight_give_their_quota_back() {
    let _slot = slot(Load::Timed).await;
    let up = TestUpstream::start().await;
    // One request at a time, three a minute: two identical reads queue behind another
    // request, so they are admitted one after the other.
    let toml = format!(
        "{}
{}
[queue]
max_wait = \"3s\"\n\n\
         [[limit]]\nname = \"one-at-a-time\"\nconcurrency = 1\n\n\
         [[limit]]\nname = \"three-a-minute\"\nrequests = 3\nper = \"60s\"\n",
        one_route_config("", &up.url(), ""),
        ewt_entry("10s", "")
    );
    let pacer = start_pacer(&toml).await;
    let client = TestClient::http1(pacer.proxy_addr);
    within("queued identical reads", async {
        let other = get(
            &client,
            "/api/v2/users/me",
            "tok-a",
            &[("x-reply-delay-ms", "400")],
        );
        let identical = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let reads = (0..2).map(|_| {
                let client = &client;
                async move { get(client, EWT, "tok-a", &[("x-reply-delay-ms", "300")]).await }
            });
            futures_util::future::join_all(reads).await
        };
        let (other, reads) = tokio::join!(other, identical);
        assert_eq!(other.status, StatusCode::OK);
        // The second read is admitted once the first (the leader) has ended: it is answered
        // with the first one's answer, and gives its place in the window back.
        for r in &reads {
            assert_eq!(r.status, StatusCode::OK, "{:?}", cache_header(r));
        }
        assert_eq!(up.count(), 2, "the other request and one identical read");
        // Two sends counted (without the refund, three: the next read would be shed): one
        // more distinct read fits, the next does not.
        let r = get(&client, &format!("{EWT}?q=1"), "tok-a", &[]).await;
        assert_eq!(r.status, StatusCode::OK, "the third send of the minute");
        let r = get(
            &client,
            &format!("{EWT}?q=2"),
            "tok-a",
            &[("x-pacer-max-wait", "0")],
        )
        .await;
        assert_eq!(
            r.status,
            StatusCode::TOO_MANY_REQUESTS,
            "the window is full"
        );
    })
    .await;
}
