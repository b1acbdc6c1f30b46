//! Apps sharing one OAuth client (issue 14): told apart by `x-pacer-app`, each gets a fair
//! share of the client's queue, and `/metrics` and `/status` say which app sent what.
//!
//! The runaway run goes through pacer to the Genesys simulator, whose counters are the
//! ground truth for upstream 429s; the weighted share is proven on the paused clock in
//! `queue::fair_tests`.

use crate::support::*;
use http::StatusCode;
use pacer::sim::{SimConfig, Simulator};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;

async fn start_sim(toml: &str) -> Simulator {
    let config = SimConfig::from_toml_str(toml)
        .unwrap_or_else(|e| panic!("invalid sim config: {e}\n---\n{toml}"));
    Simulator::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .expect("simulator starts")
}

async fn admin_text(pacer: &pacer::app::Running, path: &str) -> String {
    let admin = TestClient::http1(pacer.admin_addr.expect("admin listener"));
    let reply = admin.get(path, &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
    reply.text()
}

/// Sends one users request as `app`; returns the shed answer's Retry-After, if shed.
async fn send_as(client: &TestClient, token: &str, app: &str, t: &mut Tally) -> Option<u64> {
    let mut req = client.get_as("/api/v2/users", token);
    req.headers_mut()
        .insert("x-pacer-app", app.parse().expect("header value"));
    // pacer's own 429s carry a reason; an upstream 429 is only counted.
    let (ra, reason) = send_counted(client, req, t).await?;
    reason.map(|_| ra.max(1))
}

/// The p99 of an app's queue waits as pacer measured them: the smallest histogram bound
/// that holds 99% of its waits.
fn p99_wait(text: &str, app: &str) -> (f64, f64) {
    let samples = prom_samples(text);
    let of_app = |name: &str| {
        samples
            .iter()
            .filter(move |s| s.name == name && s.label("app") == Some(app))
            .collect::<Vec<_>>()
    };
    let count: f64 = of_app("pacer_queue_wait_seconds_count")
        .iter()
        .map(|s| s.value)
        .sum();
    let mut buckets: Vec<(f64, f64)> = of_app("pacer_queue_wait_seconds_bucket")
        .iter()
        .filter_map(|s| Some((s.label("le")?.parse::<f64>().ok()?, s.value)))
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let p99 = buckets
        .iter()
        .find(|(_, n)| *n >= 0.99 * count)
        .map_or(f64::INFINITY, |(le, _)| *le);
    (p99, count)
}

const RUNAWAY: &str = "nightly-export";
const MODEST: [&str; 2] = ["crm-sync", "wfm-adherence"];

/// The run: one OAuth client limited to 20 per 2 s; a runaway app with 40 greedy
/// workers and two modest apps with 2 workers each at a request per second, told apart by
/// `x-pacer-app`; `max_wait` 5 s. Before fair turns 20 of the modest apps' 24 requests
/// were shed after waiting 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_app_cannot_starve_modest_ones() {
    let _slot = slot(Load::Busy).await;
    within("runaway app", async {
        let sim = start_sim(
            "window = \"2s\"\nlatency = \"2ms\"\nclient_requests = 20\n\
             org_requests = 1000\ntoken_requests = 100\n\
             [[client]]\nid = \"shared\"\nsecret = \"shared-secret\"\n",
        )
        .await;
        let url = sim.url();
        let pacer = start_pacer(&format!(
            "[[upstream]]\nname = \"api\"\nurl = \"{url}\"\n\n\
             [[upstream]]\nname = \"login\"\nurl = \"{url}\"\n\n\
             [[route]]\nprefix = \"/api/\"\nupstream = \"api\"\n\n\
             [[route]]\nprefix = \"/oauth/\"\nupstream = \"login\"\n\n\
             {NO_TOKEN_LOOKUPS}\n\
             [queue]\nmax_wait = \"5s\"\ncritical_reserve = 0.0\n\n\
             [[limit]]\nname = \"per-client\"\nupstream = \"api\"\nscope = \"client\"\n\
             requests = 20\nper = \"2s\"\nguard = \"200ms\"\n"
        ))
        .await;
        let client = Arc::new(TestClient::http1(pacer.proxy_addr));
        let token = token_via(&client, "shared", "shared-secret").await;

        const RUN: Duration = Duration::from_secs(8);
        let start = Instant::now();
        let stop = start + RUN;
        let mut tasks = JoinSet::new();
        // The modest apps: a request a second per worker, workers a quarter second apart.
        for (a, app) in MODEST.iter().enumerate() {
            for w in 0..2u32 {
                let (client, token) = (client.clone(), token.clone());
                let first = start + Duration::from_millis(250) * (a as u32 * 2 + w);
                tasks.spawn(async move {
                    let mut t = Tally::default();
                    let mut next = first;
                    while next < stop {
                        tokio::time::sleep_until(next).await;
                        send_as(&client, &token, app, &mut t).await;
                        next += Duration::from_secs(1);
                    }
                    (*app, t)
                });
            }
        }
        // The runaway: 40 workers as fast as pacer lets them, backing off as told (at most
        // 100 ms), starting a second after the modest apps.
        for _ in 0..40 {
            let (client, token) = (client.clone(), token.clone());
            tasks.spawn(async move {
                let mut t = Tally::default();
                tokio::time::sleep_until(start + Duration::from_secs(1)).await;
                while Instant::now() < stop {
                    if let Some(ra) = send_as(&client, &token, RUNAWAY, &mut t).await {
                        let back_off = Duration::from_secs(ra).min(Duration::from_millis(100));
                        tokio::time::sleep(back_off).await;
                    }
                }
                (RUNAWAY, t)
            });
        }
        let mut per_app = std::collections::BTreeMap::<&str, Tally>::new();
        while let Some(done) = tasks.join_next().await {
            let (app, t) = done.expect("worker");
            per_app.entry(app).or_default().add(&t);
        }
        let stats = sim.stats();
        let text = admin_text(&pacer, "/metrics").await;
        let status = admin_text(&pacer, "/status").await;
        eprintln!("runaway run: {per_app:?}; sim {:?}", stats.total);

        // The upstream never refused anything.
        assert_eq!(stats.total.too_many, 0, "upstream saw 429s: {stats:?}");
        for (app, t) in &per_app {
            assert_eq!(t.upstream_429, 0, "{app}: {t:?}");
            assert_eq!(t.other + t.transport_errors, 0, "{app}: {t:?}");
        }
        // Every modest request answered 200, and pacer measured their waits short.
        for app in MODEST {
            let t = per_app[app];
            assert!(t.sent >= 14, "{app}: {t:?}");
            assert_eq!(
                t.ok, t.sent,
                "{app}: not every request was answered 200: {t:?}"
            );
            let (p99, count) = p99_wait(&text, app);
            assert_eq!(count as u64, t.ok, "{app}: queue waits counted\n{text}");
            assert!(p99 <= 1.0, "{app}: p99 queue wait up to {p99} s\n{text}");
        }
        // The runaway gets the rest: what the modest apps left of about three and a half
        // windows of 20 (the guard makes pacer's window 2.2 s).
        let runaway = per_app[RUNAWAY];
        let modest_ok: u64 = MODEST.iter().map(|a| per_app[a].ok).sum();
        assert!(
            runaway.ok >= 30,
            "runaway got only {runaway:?} beside {modest_ok}"
        );
        assert!(runaway.shed > 0, "{runaway:?}");
        // /metrics names all three apps, and /status shows their use within the client.
        for app in [RUNAWAY, MODEST[0], MODEST[1]] {
            let forwarded = metric_sum(
                &text,
                "pacer_requests_total",
                &[("app", app), ("outcome", "forwarded")],
            );
            assert_eq!(forwarded as u64, per_app[app].ok, "{app}\n{text}");
            assert!(status.contains(&format!("\"app\":\"{app}\"")), "{status}");
        }
        let shed = metric_sum(&text, "pacer_shed_total", &[("app", RUNAWAY)]);
        assert_eq!(shed as u64, runaway.shed, "{text}");
    })
    .await;
}

/// The values of `label` over every sample of `name`.
fn label_values(text: &str, name: &str, label: &str) -> BTreeSet<String> {
    prom_samples(text)
        .iter()
        .filter(|s| s.name == name)
        .filter_map(|s| s.label(label).map(str::to_string))
        .collect()
}

/// 10^4 distinct app header values: the app label set stays within the named apps, at
/// most `max_apps` learned ones and `other`, and memory stays flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_app_names_keep_labels_and_memory_bounded() {
    let _slot = slot(Load::Alone).await;
    within("distinct app names", async {
        const MAX_APPS: usize = 50;
        const TOTAL: usize = 10_000;
        const WORKERS: usize = 16;
        let (up, _up_task) = start_ok_upstream().await;
        let pacer = start_pacer(&format!(
            "[[upstream]]\nname = \"api\"\nurl = \"http://{up}\"\n\n\
             [[route]]\nprefix = \"/api/\"\nupstream = \"api\"\nidentity = [\"client-ip\"]\n\n\
             [identity]\ntokens_me = false\nmax_apps = {MAX_APPS}\n\n\
             [[app]]\nname = \"named-one\"\nweight = 3\n\n\
             [[limit]]\nname = \"per-client\"\nscope = \"client\"\nrequests = 10000000\nper = \"60s\"\n"
        ))
        .await;
        let client = Arc::new(TestClient::http1(pacer.proxy_addr));
        let send = |client: Arc<TestClient>, app: String| async move {
            client
                .get("/api/v2/users", &[("x-pacer-app", app.as_str())])
                .await
                .status
        };
        assert_eq!(
            send(client.clone(), "named-one".into()).await,
            StatusCode::OK
        );
        // Warm up connections and allocator arenas under names already learned.
        for i in 0..500 {
            send(client.clone(), format!("warm-{}", i % 8)).await;
        }
        let before = vm_rss_bytes().expect("VmRSS");
        let mut tasks = JoinSet::new();
        for w in 0..WORKERS {
            let client = client.clone();
            tasks.spawn(async move {
                let mut ok = 0;
                for i in (w..TOTAL).step_by(WORKERS) {
                    // Long, odd and distinct: each is sanitized, then learned or `other`.
                    let app = format!("app-{i}-{}", "x".repeat(i % 100));
                    if send(client.clone(), app).await == StatusCode::OK {
                        ok += 1;
                    }
                }
                ok
            });
        }
        let mut ok = 0;
        while let Some(n) = tasks.join_next().await {
            ok += n.expect("worker");
        }
        let after = vm_rss_bytes().expect("VmRSS");
        assert_eq!(ok, TOTAL, "every request answered 200");
        let text = admin_text(&pacer, "/metrics").await;
        let status: serde_json::Value =
            serde_json::from_str(&admin_text(&pacer, "/status").await).expect("json");
        // Named, learned (the warm-up's eight among them), other and unknown at most.
        let bound = 1 + MAX_APPS + 2;
        for name in [
            "pacer_requests_total",
            "pacer_upstream_responses_total",
            "pacer_queue_wait_seconds_count",
        ] {
            let apps = label_values(&text, name, "app");
            assert!(apps.len() <= bound, "{name}: {} apps", apps.len());
            assert!(apps.contains("other"), "{name}: {apps:?}");
            assert!(apps.contains("named-one"), "{name}: {apps:?}");
            assert!(apps.iter().all(|a| a.len() <= 64), "{name}: {apps:?}");
        }
        assert_eq!(status["apps"]["learned"], MAX_APPS, "{status}");
        assert!(
            status["apps"]["use"].as_array().unwrap().len() <= bound,
            "{status}"
        );
        let growth = after.saturating_sub(before);
        eprintln!(
            "distinct app names: VmRSS growth {:.1} MiB",
            growth as f64 / (1024.0 * 1024.0)
        );
        assert!(growth < 32 * 1024 * 1024, "memory grew by {growth} bytes");
    })
    .await;
}

/// The app header is pacer's: removed before forwarding unless configured otherwise.
#[tokio::test]
async fn the_app_header_is_removed_before_forwarding_unless_configured() {
    for (forward, expect) in [(false, None), (true, Some("crm-sync".to_string()))] {
        let up = TestUpstream::start().await;
        let pacer = start_pacer(&format!(
            "[[upstream]]\nname = \"api\"\nurl = \"{}\"\n\n\
             [[route]]\nprefix = \"/api/\"\nupstream = \"api\"\nidentity = [\"client-ip\"]\n\n\
             [identity]\ntokens_me = false\nforward_app_header = {forward}\n",
            up.url()
        ))
        .await;
        let client = TestClient::http1(pacer.proxy_addr);
        let reply = client
            .get("/api/v2/users", &[("x-pacer-app", "crm-sync")])
            .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(
            up.only().header("x-pacer-app"),
            expect,
            "forward = {forward}"
        );
        let text = admin_text(&pacer, "/metrics").await;
        assert!(
            label_values(&text, "pacer_requests_total", "app").contains("crm-sync"),
            "{text}"
        );
    }
}
