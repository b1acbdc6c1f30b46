//! Caller deadlines over real sockets: `x-pacer-max-wait` sheds at once what would wait
//! longer than the caller will (429 with a truthful `Retry-After`), never makes a request
//! wait past the route's `max_wait`, is refused with 400 when malformed, sets the budget
//! shadow limits judge by, and never reaches the upstream.
//!
//! The recording test upstream is the ground truth for what was forwarded; callers are
//! told apart by an `x-caller` header.

use crate::support::*;
use http::StatusCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

const HEADER: &str = "x-pacer-max-wait";

/// One upstream at `url`, route `/api/` with `max_wait`, callers named by `x-caller` (the
/// client `da` by name),
/// and `limit` (a `[[limit]]` table). `server` goes into `[server]`.
fn config(server: &str, url: &str, max_wait: &str, limit: &str) -> String {
    format!(
        "[server]\n{server}\n\n\
         [[upstream]]\nname = \"up\"\nurl = \"{url}\"\n\n\
         [[route]]\nprefix = \"/api/\"\nupstream = \"up\"\nidentity = [\"header:x-caller\"]\n\
         max_wait = \"{max_wait}\"\n\n\
         [[client]]\nid = \"da\"\nname = \"da\"\n\n\
         {NO_TOKEN_LOOKUPS}\n{limit}"
    )
}

/// Two requests per 10 s per client.
const TWO_PER_TEN_SECONDS: &str = "[[limit]]\nname = \"rate\"\nscope = \"client\"\n\
     requests = 2\nper = \"10s\"\nguard = \"0ms\"\n";

/// No request the upstream saw carried the caller's deadline.
fn assert_never_forwarded(upstream: &TestUpstream) {
    for r in upstream.records() {
        assert_eq!(
            r.header(HEADER),
            None,
            "{} reached the upstream: {r:?}",
            HEADER
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_deadline_is_shed_at_once_with_retry_after_instead_of_waiting() {
    let _slot = slot(Load::Timed).await;
    within("caller deadline on a full window", async {
        let upstream = TestUpstream::start().await;
        // The route would let a request wait 20 s: longer than the 10 s window.
        let pacer = start_pacer(&config("", &upstream.url(), "20s", TWO_PER_TEN_SECONDS)).await;
        let client = TestClient::http1(pacer.proxy_addr);
        for value in ["5s", "2.5"] {
            let r = client
                .get("/api/v2/users", &[("x-caller", "da"), (HEADER, value)])
                .await;
            assert_eq!(r.status, StatusCode::OK, "{r:?}");
        }
        assert_eq!(upstream.count(), 2);
        assert_never_forwarded(&upstream);

        // The window is full for about 10 s. A caller that waits 200 ms at most is told so
        // at once, with when to come back, well before the route's 20 s.
        let started = Instant::now();
        let r = client
            .get("/api/v2/users", &[("x-caller", "da"), (HEADER, "0.2")])
            .await;
        let took = started.elapsed();
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{r:?}");
        assert_eq!(r.header("x-pacer-reason"), Some("wait_too_long"), "{r:?}");
        let retry: u64 = r
            .header("retry-after")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no Retry-After in {r:?}"));
        // Truthful: the window's remaining time, not the caller's 200 ms nor the route's 20 s.
        assert!((1..=10).contains(&retry), "Retry-After {retry}");
        assert!(took < Duration::from_secs(5), "shed after {took:?}");
        assert_eq!(upstream.count(), 2, "the shed request went nowhere");

        // 0 means "do not wait"; `ms` works too; both are shed the same way.
        for value in ["0", "150ms"] {
            let r = client
                .get("/api/v2/users", &[("x-caller", "da"), (HEADER, value)])
                .await;
            assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{value}: {r:?}");
            assert!(r.header("retry-after").is_some(), "{r:?}");
        }

        // A malformed value is the caller's mistake, said plainly, and costs nothing.
        for value in ["soon", "-1", "2 s", "1e3"] {
            let r = client
                .get("/api/v2/users", &[("x-caller", "other"), (HEADER, value)])
                .await;
            r.assert_pacer_error(StatusCode::BAD_REQUEST);
            let message = r.json()["message"].as_str().unwrap_or_default().to_string();
            assert!(message.contains(HEADER), "{value}: {message}");
        }
        assert_eq!(upstream.count(), 2, "nothing malformed was forwarded");

        // Another caller with room left is forwarded, its deadline taken off on the way.
        let r = client
            .get("/api/v2/users", &[("x-caller", "other"), (HEADER, "0")])
            .await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(upstream.count(), 3);
        assert_never_forwarded(&upstream);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_deadline_never_lengthens_the_routes_max_wait() {
    let _slot = slot(Load::Timed).await;
    within("caller deadline on a busy concurrency slot", async {
        let upstream = TestUpstream::start().await;
        let limit = "[[limit]]\nname = \"one\"\nscope = \"client\"\nconcurrency = 1\n";
        let pacer = start_pacer(&config("", &upstream.url(), "2s", limit)).await;
        let client = Arc::new(TestClient::http1(pacer.proxy_addr));
        // One slow request holds the caller's only slot for 8 s.
        let holder = {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .get(
                        "/api/v2/slow",
                        &[("x-caller", "da"), ("x-reply-delay-ms", "8000")],
                    )
                    .await
            })
        };
        upstream.wait_for(1).await;
        let started = Instant::now();

        // Willing to wait an hour: pacer still gives up at the route's 2 s, long before
        // the slot frees (a lengthened wait would end in a 200 after 8 s).
        let r = client
            .get("/api/v2/users", &[("x-caller", "da"), (HEADER, "3600")])
            .await;
        let took = started.elapsed();
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{r:?}");
        assert!(r.header("retry-after").is_some(), "{r:?}");
        assert!(took >= Duration::from_millis(1900), "shed after {took:?}");
        assert!(took < Duration::from_secs(7), "shed after {took:?}");

        // Willing to wait 200 ms: shed then, before the route's 2 s.
        let started = Instant::now();
        let r = client
            .get("/api/v2/users", &[("x-caller", "da"), (HEADER, "0.2s")])
            .await;
        let took = started.elapsed();
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{r:?}");
        assert!(took < Duration::from_millis(1800), "shed after {took:?}");

        let held = holder.await.expect("holder task");
        assert_eq!(held.status, StatusCode::OK, "{held:?}");
        assert_eq!(upstream.count(), 1, "only the holder was forwarded");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_shadow_mode_a_short_deadline_is_counted_as_a_shed_and_forwarded() {
    let _slot = slot(Load::Timed).await;
    within("caller deadline in shadow mode", async {
        let upstream = TestUpstream::start().await;
        let pacer = start_pacer(&config(
            "shadow = true",
            &upstream.url(),
            "20s",
            TWO_PER_TEN_SECONDS,
        ))
        .await;
        let client = TestClient::http1(pacer.proxy_addr);
        for _ in 0..2 {
            let r = client.get("/api/v2/users", &[("x-caller", "da")]).await;
            assert_eq!(r.status, StatusCode::OK, "{r:?}");
        }
        // Over the quota: with the route's 20 s it would have waited; with the caller's
        // 200 ms it would have been shed. Both are forwarded.
        let r = client.get("/api/v2/users", &[("x-caller", "da")]).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        let r = client
            .get("/api/v2/users", &[("x-caller", "da"), (HEADER, "0.2")])
            .await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(upstream.count(), 4);
        assert_never_forwarded(&upstream);

        let admin = TestClient::http1(pacer.admin_addr.expect("admin listener"));
        let text = admin.get("/metrics", &[]).await.text();
        let sample = |name: &str| metric_sum(&text, name, &[("limit", "rate"), ("client", "da")]);
        assert_eq!(
            sample("pacer_shadow_shed_total"),
            1.0,
            "only the one with the deadline\n{text}"
        );
        assert_eq!(sample("pacer_shadow_wait_seconds_count"), 1.0, "{text}");
        assert_eq!(metric_sum(&text, "pacer_shed_total", &[]), 0.0, "{text}");
    })
    .await;
}
