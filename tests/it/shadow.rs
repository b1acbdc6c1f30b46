//! Shadow mode over real sockets: a shadow limit (or `[server] shadow = true`) lets every
//! request through at once and counts what enforcement would have done, in
//! `pacer_shadow_shed_total`, `pacer_shadow_wait_seconds` and `/status`; an enforcing
//! limit beside it still sheds; `check-config` refuses shadow mode with Redis state.
//!
//! The recording test upstream is the ground truth for what was forwarded. Callers are told
//! apart by an `x-caller` header named in `[[client]]`, so their metric labels are fixed.

use crate::support::*;
use http::StatusCode;
use pacer::app::Running;
use std::process::Command;
use std::sync::Arc;
use tokio::task::JoinSet;

/// A shadow limit's quota per window in these tests.
const N: usize = 5;

/// One upstream `up` at `url`; route `/api/` (max_wait 5 s, shorter than the 10 s window,
/// so what would have waited would have been shed) and `/patient/` (max_wait 30 s, so it
/// would have waited), both identifying callers by `x-caller`. `extra` is appended.
fn config(server: &str, url: &str, extra: &str) -> String {
    format!(
        "[server]\n{server}\n\n\
         [[upstream]]\nname = \"up\"\nurl = \"{url}\"\n\n\
         [[route]]\nprefix = \"/api/\"\nupstream = \"up\"\nidentity = [\"header:x-caller\"]\n\
         max_wait = \"5s\"\n\n\
         [[route]]\nprefix = \"/patient/\"\nupstream = \"up\"\nidentity = [\"header:x-caller\"]\n\
         max_wait = \"30s\"\n\n\
         [[client]]\nid = \"bulk-job\"\nname = \"bulk\"\n\n\
         [[client]]\nid = \"patient-job\"\nname = \"patient\"\n\n\
         {NO_TOKEN_LOOKUPS}\n{extra}"
    )
}

/// A shadow limit of [`N`] per 10 s per client.
fn shadow_limit() -> String {
    format!(
        "[[limit]]\nname = \"shadowed\"\nscope = \"client\"\nrequests = {N}\nper = \"10s\"\n\
         shadow = true\n"
    )
}

async fn admin(pacer: &Running, path: &str) -> Reply {
    let reply = TestClient::http1(pacer.admin_addr.expect("admin listener"))
        .get(path, &[])
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
    reply
}

/// `count` requests from `caller` on `path`, all at once; their answers.
async fn burst(pacer: &Running, path: &str, caller: &str, count: usize) -> Vec<Reply> {
    let client = Arc::new(TestClient::http1(pacer.proxy_addr));
    let mut tasks = JoinSet::new();
    for _ in 0..count {
        let (client, path, caller) = (client.clone(), path.to_string(), caller.to_string());
        tasks.spawn(async move { client.get(&path, &[("x-caller", &caller)]).await });
    }
    let mut replies = Vec::new();
    while let Some(r) = tasks.join_next().await {
        replies.push(r.expect("request task"));
    }
    replies
}

/// The `/status` shadow tally of one limit and client.
fn would<'a>(status: &'a serde_json::Value, limit: &str, client: &str) -> &'a serde_json::Value {
    status["shadow"]["would"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|w| w["limit"] == limit && w["client"] == client)
        .unwrap_or_else(|| panic!("no shadow tally for {limit}/{client}: {status}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_limit_forwards_a_burst_and_counts_what_it_would_have_done() {
    let _slot = slot(Load::Timed).await;
    within("shadow burst", async {
        let upstream = TestUpstream::start().await;
        let pacer = start_pacer(&config("", &upstream.url(), &shadow_limit())).await;

        // 3N at once from each caller: all forwarded, none answered by pacer.
        for (path, caller) in [
            ("/api/v2/users", "bulk-job"),
            ("/patient/v2/users", "patient-job"),
        ] {
            let replies = burst(&pacer, path, caller, 3 * N).await;
            for r in &replies {
                assert_eq!(r.status, StatusCode::OK, "{caller}: {r:?}");
                assert!(r.header("x-pacer-reason").is_none(), "{r:?}");
                // Nothing about the shadow limit reaches the caller.
                assert!(r.header("ratelimit-policy").is_none(), "{r:?}");
            }
        }
        assert_eq!(
            upstream.count(),
            6 * N,
            "every request reached the upstream"
        );

        let text = admin(&pacer, "/metrics").await.text();
        let shed = |client: &str| {
            metric_sum(
                &text,
                "pacer_shadow_shed_total",
                &[
                    ("limit", "shadowed"),
                    ("client", client),
                    ("reason", "wait_too_long"),
                ],
            )
        };
        let waits = |client: &str| {
            metric_sum(
                &text,
                "pacer_shadow_wait_seconds_count",
                &[("limit", "shadowed"), ("client", client)],
            )
        };
        // Max wait 5 s, a 10 s window: the 2N over the quota would have been shed...
        assert_eq!(shed("bulk"), (2 * N) as f64, "{text}");
        assert_eq!(waits("bulk"), 0.0, "{text}");
        // ...and with a max wait of 30 s they would have waited (about a window each).
        assert_eq!(waits("patient"), (2 * N) as f64, "{text}");
        assert_eq!(shed("patient"), 0.0, "{text}");
        let waited = metric_sum(
            &text,
            "pacer_shadow_wait_seconds_sum",
            &[("limit", "shadowed"), ("client", "patient")],
        );
        assert!(
            waited >= (2 * N) as f64 * 5.0,
            "would-wait total {waited}\n{text}"
        );
        // pacer itself shed nothing and made nothing wait: the whole queue-wait histogram
        // lies below 1 s, where enforcement would have held these for ~10 s.
        assert_eq!(metric_sum(&text, "pacer_shed_total", &[]), 0.0, "{text}");
        let admitted = metric_sum(&text, "pacer_queue_wait_seconds_count", &[]);
        let quick = metric_sum(&text, "pacer_queue_wait_seconds_bucket", &[("le", "1")]);
        assert_eq!(admitted, (6 * N) as f64, "{text}");
        assert_eq!(quick, admitted, "a request waited in pacer's queue\n{text}");

        let s = admin(&pacer, "/status").await.json();
        assert_eq!(
            s["shadow"]["limits"],
            serde_json::json!(["shadowed"]),
            "{s}"
        );
        assert_eq!(s["shadow"]["server"], false, "{s}");
        let bulk = would(&s, "shadowed", "bulk");
        assert_eq!(bulk["would_shed"], 2 * N, "{s}");
        assert_eq!(bulk["would_shed_by_reason"]["wait_too_long"], 2 * N, "{s}");
        assert_eq!(bulk["would_wait"], 0, "{s}");
        let patient = would(&s, "shadowed", "patient");
        assert_eq!(patient["would_wait"], 2 * N, "{s}");
        assert_eq!(patient["would_shed"], 0, "{s}");
        // Every request really sent is counted in the shadow limit's window.
        let used: Vec<u64> = s["limits"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|l| l["limit"] == "shadowed" && l["shadow"] == true)
            .filter_map(|l| l["used"].as_u64())
            .collect();
        assert_eq!(used, [3 * N as u64, 3 * N as u64], "{s}");
        assert_eq!(s["queue"]["normal"], 0, "{s}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_shadow_forwards_through_an_upstream_pause_and_counts_it() {
    let _slot = slot(Load::Timed).await;
    within("shadow pause", async {
        let upstream = TestUpstream::start().await;
        let pacer = start_pacer(&config("shadow = true", &upstream.url(), &shadow_limit())).await;
        let client = TestClient::http1(pacer.proxy_addr);

        // The upstream's own 429 reaches the caller as it is, and pauses the caller.
        let reply = client
            .get(
                "/api/v2/users",
                &[
                    ("x-caller", "bulk-job"),
                    ("x-reply-status", "429"),
                    ("x-reply-header", "retry-after: 30"),
                ],
            )
            .await;
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{reply:?}");
        assert!(reply.header("x-pacer-reason").is_none(), "{reply:?}");
        assert_eq!(reply.header("retry-after"), Some("30"), "{reply:?}");

        // Paused for 30 s, longer than max_wait: in shadow, forwarded anyway.
        for i in 0..3 {
            let r = client
                .get("/api/v2/users", &[("x-caller", "bulk-job")])
                .await;
            assert_eq!(r.status, StatusCode::OK, "{i}: {r:?}");
        }
        // The patient route would have waited the pause out.
        let r = client
            .get("/patient/v2/users", &[("x-caller", "bulk-job")])
            .await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(upstream.count(), 5);

        let s = admin(&pacer, "/status").await.json();
        let paused = s["pauses"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["client"] == "bulk-job");
        assert!(paused, "the pause is still known: {s}");
        assert_eq!(s["shadow"]["server"], true, "{s}");
        assert_eq!(s["shadow"]["pauses"], true, "{s}");
        let pause = would(&s, "upstream_pause:up", "bulk");
        assert_eq!(pause["would_shed_by_reason"]["upstream_paused"], 3, "{s}");
        assert_eq!(pause["would_wait"], 1, "{s}");

        let text = admin(&pacer, "/metrics").await.text();
        let labels = [("limit", "upstream_pause:up"), ("client", "bulk")];
        assert_eq!(
            metric_sum(
                &text,
                "pacer_shadow_shed_total",
                &[labels[0], labels[1], ("reason", "upstream_paused")]
            ),
            3.0,
            "{text}"
        );
        assert_eq!(
            metric_sum(&text, "pacer_shadow_wait_seconds_count", &labels),
            1.0,
            "{text}"
        );
        assert_eq!(metric_sum(&text, "pacer_shed_total", &[]), 0.0, "{text}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enforcing_limit_next_to_a_shadow_one_still_sheds() {
    let _slot = slot(Load::Timed).await;
    within("shadow beside enforcement", async {
        let upstream = TestUpstream::start().await;
        let enforced = "[[limit]]\nname = \"enforced\"\nscope = \"client\"\nrequests = 8\n\
                        per = \"10s\"\n";
        let pacer = start_pacer(&config(
            "",
            &upstream.url(),
            &format!("{}\n{enforced}", shadow_limit()),
        ))
        .await;
        let client = TestClient::http1(pacer.proxy_addr);
        let mut statuses = Vec::new();
        for _ in 0..12 {
            let r = client
                .get("/api/v2/users", &[("x-caller", "bulk-job")])
                .await;
            if r.status == StatusCode::TOO_MANY_REQUESTS {
                assert_eq!(r.header("x-pacer-reason"), Some("wait_too_long"), "{r:?}");
                let policy = r.header("ratelimit-policy").unwrap_or_default();
                assert!(policy.contains("\"enforced\""), "{r:?}");
            }
            statuses.push(r.status.as_u16());
        }
        let mut expected = vec![200; 8];
        expected.extend([429; 4]);
        assert_eq!(statuses, expected);
        assert_eq!(
            upstream.count(),
            8,
            "the enforcing limit held the upstream to 8"
        );

        let text = admin(&pacer, "/metrics").await.text();
        // Of the 8 sent, 3 were over the shadow quota of 5; the 4 shed never got that far.
        assert_eq!(
            metric_sum(&text, "pacer_shadow_shed_total", &[("limit", "shadowed")]),
            (8 - N) as f64,
            "{text}"
        );
        assert_eq!(
            metric_sum(&text, "pacer_shed_total", &[("reason", "wait_too_long")]),
            4.0,
            "{text}"
        );
        let s = admin(&pacer, "/status").await.json();
        assert_eq!(
            s["shadow"]["limits"],
            serde_json::json!(["shadowed"]),
            "{s}"
        );
    })
    .await;
}

#[test]
fn check_config_refuses_shadow_mode_with_redis_state() {
    let _slot = slot_blocking(Load::Timed);
    let dir = unique_temp_dir("shadow-redis");
    let file = dir.join("pacer.toml");
    let text = format!(
        "{}\n[state]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:1/\"\n",
        config("shadow = true", "http://127.0.0.1:1", &shadow_limit())
    );
    std::fs::write(&file, text).expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_pacer"))
        .args(["check-config", file.to_str().expect("utf-8 path")])
        .output()
        .expect("run pacer");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in ["server.shadow", "limit[0].shadow"] {
        assert!(
            stderr.contains(&format!(
                "{key}: shadow mode is not supported with [state] backend = \"redis\""
            )),
            "missing {key} in:\n{stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
