//! The live page (`/` on the admin listener), rendered by real headless Chromium after
//! traffic from named clients: the page's script fetches `/status` and shows each client's
//! name, the limits that count it, and what happened to it (sheds, upstream 429s).
//!
//! Needs Debian's `chromium`: `.ci/run` installs it. Without it the browser test prints a
//! skip notice, or fails when `CI` is set.

use crate::support::*;
use http::{Method, StatusCode};
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

const CHROMIUM: &str = "chromium";
/// Longest one browser run may take (it starts cold, on a shared machine).
const BROWSER_LIMIT: Duration = Duration::from_secs(60);
const TEST_LIMIT: Duration = Duration::from_secs(90);

/// Client names as configured; one carries markup, which must show as text.
const IVR_NAME: &str = "IVR <b>Data</b> Actions";
const IVR_NAME_AS_TEXT: &str = "IVR &lt;b&gt;Data&lt;/b&gt; Actions";
const BULK_NAME: &str = "nightly-bulk-export";
/// The app behind the bulk client (`x-pacer-app`).
const BULK_APP: &str = "lp-export-worker";
const CLIENT_LIMIT: &str = "lp-client-quota";
const ENDPOINT_LIMIT: &str = "lp-users-endpoint";

fn config(upstream: &str) -> String {
    format!(
        "[queue]\nmax_wait = \"100ms\"\ncritical_reserve = 0.0\n\n\
         [[upstream]]\nname = \"up\"\nurl = \"{upstream}\"\n\n\
         [[route]]\nprefix = \"/api/\"\nupstream = \"up\"\nidentity = [\"header:x-caller\"]\n\n\
         [[client]]\nid = \"ivr-app\"\nname = \"{IVR_NAME}\"\n\n\
         [[client]]\nid = \"bulk-job\"\nname = \"{BULK_NAME}\"\n\n\
         [[limit]]\nname = \"{CLIENT_LIMIT}\"\nscope = \"client\"\nrequests = 3\nper = \"1m\"\n\n\
         [[limit]]\nname = \"{ENDPOINT_LIMIT}\"\nmatch = \"GET /api/v2/users/{{userId}}\"\n\
         scope = \"endpoint\"\nrequests = 100\nper = \"1m\"\n\n{NO_TOKEN_LOOKUPS}"
    )
}

/// Whether `chromium` runs; `false` means "skip" outside CI and a failure in CI.
fn chromium_available(test: &str) -> bool {
    let probe = std::process::Command::new(CHROMIUM)
        .arg("--version")
        .stdin(Stdio::null())
        .output();
    let why = match probe {
        Ok(out) if out.status.success() => return true,
        Ok(out) => format!("`{CHROMIUM} --version` exited {}", out.status),
        Err(e) => format!("{CHROMIUM} not runnable: {e}"),
    };
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {why}\nheadless Chromium is required in CI; .ci/run installs it (apt-get install chromium)");
    }
    eprintln!("SKIP {test}: {why} (install with `apt-get install chromium`)");
    false
}

/// Traffic from both named clients: the bulk job runs past its quota (3 forwarded, the
/// rest shed), the IVR gets one upstream 429 and one 401.
async fn send_traffic(proxy: SocketAddr) {
    let client = TestClient::http1(proxy);
    let get = |caller: &'static str, extra: &'static [(&'static str, &'static str)]| {
        let client = &client;
        async move {
            let mut headers = vec![("x-caller", caller)];
            headers.extend_from_slice(extra);
            client.get("/api/v2/users/u1", &headers).await
        }
    };
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(get("bulk-job", &[("x-pacer-app", BULK_APP)]).await.status);
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 429, 429].map(|s| StatusCode::from_u16(s).unwrap())
    );
    let reply = get("ivr-app", &[("x-reply-status", "401")]).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let reply = get(
        "ivr-app",
        &[
            ("x-reply-status", "429"),
            ("x-reply-header", "retry-after: 30"),
        ],
    )
    .await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_each_clients_recent_sheds_upstream_answers_and_limits() {
    let _slot = slot(Load::Timed).await;
    within("status of recent events", async {
        let up = TestUpstream::start().await;
        let pacer = start_pacer(&config(&up.url())).await;
        send_traffic(pacer.proxy_addr).await;
        let admin = TestClient::http1(pacer.admin_addr.expect("admin listener"));
        let status = admin.get("/status", &[]).await.json();
        let recent = status["recent"]["clients"].as_array().expect("recent");
        let of = |name: &str| {
            recent
                .iter()
                .find(|r| r["client"] == name)
                .unwrap_or_else(|| panic!("no recent entry for {name}: {status}"))
        };
        assert_eq!(of(BULK_NAME)["shed"], 2, "{status}");
        assert_eq!(of(BULK_NAME)["upstream"], "up", "{status}");
        assert_eq!(of(IVR_NAME)["upstream_429"], 1, "{status}");
        assert_eq!(of(IVR_NAME)["upstream_401"], 1, "{status}");
        assert_eq!(of(IVR_NAME)["shed"], 0, "{status}");
        let limits = status["limits"].as_array().expect("limits");
        let bulk = limits
            .iter()
            .find(|l| l["limit"] == CLIENT_LIMIT && l["client"] == BULK_NAME)
            .unwrap_or_else(|| panic!("no {CLIENT_LIMIT} key of {BULK_NAME}: {status}"));
        assert_eq!(bulk["used"], 3, "{status}");
        assert_eq!(bulk["quota"], 3, "{status}");
        assert_eq!(bulk["waiting"], 0, "{status}");
        assert_eq!(bulk["per_seconds"], 60.0, "{status}");
        let endpoint = limits
            .iter()
            .find(|l| l["limit"] == ENDPOINT_LIMIT)
            .unwrap_or_else(|| panic!("no {ENDPOINT_LIMIT} key: {status}"));
        assert_eq!(endpoint["client"], serde_json::Value::Null, "{status}");
        assert_eq!(endpoint["endpoint"], "GET /api/v2/users/{userId}");
        let apps = status["apps"]["use"].as_array().expect("apps");
        let app = apps
            .iter()
            .find(|a| a["app"] == BULK_APP)
            .unwrap_or_else(|| panic!("no use of {BULK_APP}: {status}"));
        assert_eq!(app["client"], BULK_NAME, "{status}");
        assert_eq!(
            (app["forwarded"].as_u64(), app["shed"].as_u64()),
            (Some(3), Some(2))
        );
        assert_eq!(app["share"], 1.0, "{status}");
        let pause = &status["pauses"][0];
        assert_eq!(pause["label"], IVR_NAME, "{status}");
        assert_eq!(status["queue_by_upstream"]["up"]["bulk"], 0, "{status}");
        pacer.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_self_contained_html_under_a_strict_policy() {
    let _slot = slot(Load::Timed).await;
    within("live page headers", async {
        let up = TestUpstream::start().await;
        let pacer = start_pacer(&config(&up.url())).await;
        let admin = TestClient::http1(pacer.admin_addr.expect("admin listener"));
        let page = admin.get("/", &[]).await;
        assert_eq!(page.status, StatusCode::OK);
        assert_eq!(
            page.header("content-type"),
            Some("text/html; charset=utf-8")
        );
        let csp = page.header("content-security-policy").expect("CSP");
        for part in [
            "default-src 'none'",
            "script-src 'sha256-",
            "style-src 'sha256-",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(part), "{part} missing from {csp}");
        }
        assert!(!csp.contains("unsafe"), "{csp}");
        let html = page.text();
        assert!(html.starts_with("<!doctype html>"), "{html}");
        // Nothing is loaded from elsewhere.
        for outside in ["src=", "href=", "http://", "https://", "@import"] {
            assert!(!html.contains(outside), "page refers outside: {outside}");
        }
        // The admin listener stays read-only.
        let post = admin
            .send(
                admin
                    .request(Method::POST, "/")
                    .body(full(""))
                    .expect("request"),
            )
            .await;
        assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
        pacer.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_chromium_renders_client_and_limit_names_from_status() {
    const TEST: &str = "headless_chromium_renders_client_and_limit_names_from_status";
    if !chromium_available(TEST) {
        return;
    }
    let _slot = slot(Load::Busy).await;
    within_for("live page in chromium", TEST_LIMIT, async {
        let up = TestUpstream::start().await;
        let pacer = start_pacer(&config(&up.url())).await;
        send_traffic(pacer.proxy_addr).await;
        let admin_addr = pacer.admin_addr.expect("admin listener");
        // The names are not in the page itself: only its script can put them there.
        let raw = TestClient::http1(admin_addr).get("/", &[]).await.text();
        for name in [BULK_NAME, "IVR", CLIENT_LIMIT, ENDPOINT_LIMIT, BULK_APP] {
            assert!(!raw.contains(name), "{name} already in the served HTML");
        }
        let profile = unique_temp_dir("chromium");
        let run = tokio::process::Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-extensions",
                "--disable-background-networking",
                "--virtual-time-budget=10000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("--dump-dom")
            .arg(format!("http://{admin_addr}/"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(BROWSER_LIMIT, run)
            .await
            .expect("chromium finishes")
            .expect("chromium runs");
        let _ = std::fs::remove_dir_all(&profile);
        let dom = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "chromium: {}\n{stderr}\n{dom}",
            out.status
        );
        for rendered in [
            BULK_NAME,
            IVR_NAME_AS_TEXT,
            CLIENT_LIMIT,
            ENDPOINT_LIMIT,
            BULK_APP,
            "shed by pacer: 2",
            "upstream 429: 1",
            "upstream 401: 1",
            "3 / 3 per 1 min",
        ] {
            assert!(
                dom.contains(rendered),
                "{rendered:?} not rendered:\n{dom}\n---\n{stderr}"
            );
        }
        // A client name is text, never markup.
        assert!(
            !dom.contains(IVR_NAME),
            "client name inserted as HTML:\n{dom}"
        );
        // Every refresh worked.
        assert!(dom.contains("<div id=\"error\"></div>"), "{dom}");
        pacer.shutdown().await;
    })
    .await;
}
