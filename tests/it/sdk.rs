//! The real official Genesys Cloud Python SDK (PyPI `purecloudplatformclientv2`) through
//! pacer in front of the simulator: SDK users change nothing but the base URL.
//!
//! `tests/sdk/through_pacer.py` sets `PureCloudPlatformClientV2.configuration.host` to
//! pacer's base URL, logs in with client credentials (the SDK derives the login URL by
//! replacing `//api.` in the host, so with `http://127.0.0.1:PORT` it posts to pacer's
//! `/oauth/token`), calls `TokensApi.get_tokens_me` (and `UsersApi.get_users`), and prints
//! a `PACER_SDK_SUMMARY {json}` line.
//!
//! pacer runs with `tokens_me = false` and `unknown_clients = "reject"`: a bearer token it
//! did not see issued through its own `/oauth/` route would be refused with 401, so every
//! successful API call proves pacer learned the token from the proxied login.
//!
//! Needs `python3` with the SDK: `.ci/run` installs it. Without it the tests print a skip
//! notice, or fail when `CI` is set.

use crate::support::*;
use http::StatusCode;
use pacer::app::Running;
use pacer::sim::{SimConfig, Simulator};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncReadExt;

const CLIENT_ID: &str = "sdk-client";
const CLIENT_SECRET: &str = "sdk-secret";
const ORG_ID: &str = "11111111-2222-4333-8444-555555555555";
/// pacer's per-client limit in the retry test: `requests` per `per`.
const PACER_REQUESTS: u64 = 4;
const PACER_PER_SECS: u64 = 2;
/// The simulator's own per-client limit in the same window: larger than pacer's.
const SIM_REQUESTS: u64 = 20;
/// Longest one run of the script may take before it is killed: importing the SDK alone
/// costs 4–6 s of CPU, and the tests share the machine with others ([`Load::Busy`]).
const SCRIPT_LIMIT: Duration = Duration::from_secs(45);
/// Longest one whole test may take (two or three runs of Python).
const SDK_TEST_LIMIT: Duration = Duration::from_secs(90);
const SUMMARY_TAG: &str = "PACER_SDK_SUMMARY ";

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/through_pacer.py")
}

/// Whether `python3` can import the SDK; `false` means "skip" outside CI and a failure in
/// CI.
fn sdk_available(test: &str) -> bool {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import PureCloudPlatformClientV2"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    let why = match probe {
        Ok(out) if out.status.success() => return true,
        Ok(out) => format!(
            "python3 cannot import PureCloudPlatformClientV2 ({}) {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => format!("python3 not runnable: {e}"),
    };
    if std::env::var_os("CI").is_some() {
        panic!(
            "{test}: {why}\nthe Genesys Python SDK is required in CI; .ci/run installs it \
             (python3 -m pip install purecloudplatformclientv2)"
        );
    }
    eprintln!(
        "SKIP {test}: {why} (install with `python3 -m pip install purecloudplatformclientv2`)"
    );
    false
}

async fn start_sim() -> Simulator {
    let toml = format!(
        "window = \"{PACER_PER_SECS}s\"\nclient_requests = {SIM_REQUESTS}\norg_id = \"{ORG_ID}\"\n\n\
         [[client]]\nid = \"{CLIENT_ID}\"\nsecret = \"{CLIENT_SECRET}\"\nname = \"SDK app\"\n"
    );
    let config = SimConfig::from_toml_str(&toml)
        .unwrap_or_else(|e| panic!("invalid sim config: {e}\n---\n{toml}"));
    Simulator::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .expect("simulator starts")
}

/// pacer in front of `sim` the way a deployment points SDKs at it: `/` → the API,
/// `/oauth/` → the login service (both the simulator), a per-client limit on the API
/// smaller than the simulator's, no share held back for critical callers (so the SDK, a
/// normal caller, gets all `PACER_REQUESTS`), and no waiting: what does not fit now is shed
/// with 429 + `Retry-After`.
async fn start_pacer_for(sim: &Simulator) -> Running {
    let url = sim.url();
    start_pacer(&format!(
        "[[upstream]]\nname = \"api\"\nurl = \"{url}\"\n\n\
         [[upstream]]\nname = \"login\"\nurl = \"{url}\"\n\n\
         [[route]]\nprefix = \"/\"\nupstream = \"api\"\n\n\
         [[route]]\nprefix = \"/oauth/\"\nupstream = \"login\"\n\n\
         [identity]\ntokens_me = false\nunknown_clients = \"reject\"\n\n\
         [queue]\nmax_wait = \"50ms\"\ncritical_reserve = 0.0\n\n\
         [[limit]]\nname = \"per-client\"\nupstream = \"api\"\nscope = \"client\"\n\
         requests = {PACER_REQUESTS}\nper = \"{PACER_PER_SECS}s\"\n"
    ))
    .await
}

/// Runs the script against pacer and returns its summary; killed after [`SCRIPT_LIMIT`].
async fn run_sdk(pacer: &Running, mode: &str, calls: u32) -> Value {
    let base_url = format!("http://{}", pacer.proxy_addr);
    let mut child = tokio::process::Command::new("python3")
        .arg(script())
        .args([base_url.as_str(), CLIENT_ID, CLIENT_SECRET, mode])
        .arg(format!("--calls={calls}"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn python3");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let (mut out, mut err) = (String::new(), String::new());
    let run = async {
        let (o, e, status) = tokio::join!(
            stdout.read_to_string(&mut out),
            stderr.read_to_string(&mut err),
            child.wait()
        );
        o.expect("read stdout");
        e.expect("read stderr");
        status.expect("wait for python3")
    };
    let status = match tokio::time::timeout(SCRIPT_LIMIT, run).await {
        Ok(status) => status,
        Err(_) => {
            let _ = child.kill().await;
            panic!("SDK script ({mode}) did not finish within {SCRIPT_LIMIT:?}; killed");
        }
    };
    let Some(line) = out.lines().rev().find_map(|l| l.strip_prefix(SUMMARY_TAG)) else {
        panic!("SDK script ({mode}) printed no summary ({status})\nstdout:\n{out}\nstderr:\n{err}")
    };
    let summary: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("summary is not JSON ({e}): {line}\nstderr:\n{err}"));
    eprintln!("SDK {mode}: {summary}");
    assert!(
        status.success(),
        "SDK script ({mode}) failed ({status}): {summary:#}\nstderr:\n{err}"
    );
    summary
}

async fn metrics(pacer: &Running) -> String {
    let admin = TestClient::http1(pacer.admin_addr.expect("admin listener"));
    let reply = admin.get("/metrics", &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "/metrics: {}", reply.text());
    reply.text()
}

fn num(summary: &Value, key: &str) -> f64 {
    summary[key]
        .as_f64()
        .unwrap_or_else(|| panic!("summary has no number {key}: {summary:#}"))
}

/// Checks every run shares: the SDK found its login at pacer's `/oauth/token`, and kept its
/// default retry policy (10 tries, `Retry-After` honoured for 429).
fn assert_sdk_defaults(summary: &Value, pacer: &Running) {
    let base = format!("http://{}", pacer.proxy_addr);
    assert_eq!(summary["login"], true, "login failed: {summary:#}");
    assert_eq!(
        summary["login_url"],
        format!("{base}/oauth/token"),
        "{summary:#}"
    );
    assert_eq!(
        summary["api_url"],
        format!("{base}/api/v2/tokens/me"),
        "{summary:#}"
    );
    let retry = &summary["sdk_retry"];
    assert_eq!(retry["total"], 10, "SDK retry policy: {retry}");
    assert_eq!(retry["respect_retry_after_header"], true, "{retry}");
    assert!(
        retry["retry_after_status_codes"]
            .as_array()
            .is_some_and(|c| c.contains(&Value::from(429))),
        "{retry}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_logs_in_and_calls_through_pacer() {
    let _slot = slot(Load::Busy).await;
    if !sdk_available("sdk_logs_in_and_calls_through_pacer") {
        return;
    }
    within_for("SDK through pacer", SDK_TEST_LIMIT, async {
        let sim = start_sim().await;
        let pacer = start_pacer_for(&sim).await;
        let calls = 3;
        let summary = run_sdk(&pacer, "plain", calls).await;

        assert_sdk_defaults(&summary, &pacer);
        assert_eq!(num(&summary, "calls"), f64::from(calls), "{summary:#}");
        assert_eq!(num(&summary, "ok"), f64::from(calls), "{summary:#}");
        assert_eq!(summary["exceptions"], Value::Array(vec![]), "{summary:#}");
        assert_eq!(num(&summary, "retries"), 0.0, "{summary:#}");
        // tokens/me deserialized into the SDK's TokenInfo model, users into its listing.
        assert_eq!(summary["token_client_id"], CLIENT_ID, "{summary:#}");
        assert_eq!(summary["token_client_name"], "SDK app", "{summary:#}");
        assert_eq!(summary["org_id"], ORG_ID, "{summary:#}");
        assert_eq!(summary["users_type"], "UserEntityListing", "{summary:#}");

        // The simulator saw the login and every call under the SDK's client, nothing else.
        let stats = sim.stats();
        let mine = stats.clients.get(CLIENT_ID).copied().unwrap_or_default();
        assert_eq!(mine.requests, u64::from(calls) + 1, "{stats:?}");
        assert_eq!(mine.ok, u64::from(calls) + 1, "{stats:?}");
        assert_eq!(
            stats.total, mine,
            "requests outside the SDK's client: {stats:?}"
        );

        // pacer attributed the calls to the client learned from the proxied /oauth/token.
        let text = metrics(&pacer).await;
        let forwarded = metric_sum(
            &text,
            "pacer_requests_total",
            &[
                ("client", CLIENT_ID),
                ("upstream", "api"),
                ("outcome", "forwarded"),
            ],
        );
        assert_eq!(forwarded, f64::from(calls), "pacer_requests_total:\n{text}");
        assert_eq!(metric_sum(&text, "pacer_shed_total", &[]), 0.0, "{text}");
        assert_eq!(
            metric_sum(&text, "pacer_requests_total", &[("client", "unknown")]),
            0.0,
            "{text}"
        );

        pacer.shutdown().await;
        sim.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_retries_pacer_429s_honouring_retry_after() {
    let _slot = slot(Load::Busy).await;
    if !sdk_available("sdk_retries_pacer_429s_honouring_retry_after") {
        return;
    }
    within_for("SDK retries through pacer", SDK_TEST_LIMIT, async {
        let sim = start_sim().await;
        let pacer = start_pacer_for(&sim).await;
        // Three windows' worth of calls, sent back to back by one sequential SDK client.
        let calls = 3 * PACER_REQUESTS as u32;
        let summary = run_sdk(&pacer, "retry", calls).await;

        assert_sdk_defaults(&summary, &pacer);
        // Every call ended successful: the SDK absorbed pacer's 429s by itself.
        assert_eq!(num(&summary, "calls"), f64::from(calls), "{summary:#}");
        assert_eq!(num(&summary, "ok"), f64::from(calls), "{summary:#}");
        assert_eq!(summary["exceptions"], Value::Array(vec![]), "{summary:#}");

        // pacer shed, and each shed 429 was one retry inside the SDK.
        let text = metrics(&pacer).await;
        let shed = metric_sum(&text, "pacer_shed_total", &[]);
        assert!(shed > 0.0, "pacer shed nothing:\n{text}");
        let retries = num(&summary, "retries");
        assert_eq!(
            retries, shed,
            "SDK retries vs pacer sheds: {summary:#}\n{text}"
        );
        let statuses = summary["retry_statuses"]
            .as_object()
            .expect("retry_statuses");
        assert_eq!(statuses.keys().collect::<Vec<_>>(), ["429"], "{summary:#}");
        let shed_mine = metric_sum(&text, "pacer_shed_total", &[("client", CLIENT_ID)]);
        assert_eq!(shed_mine, shed, "sheds not under the SDK's client:\n{text}");

        // pacer's Retry-After was truthful (one window plus its guard, rounded up to whole
        // seconds: never more) and the SDK slept exactly that.
        for asked in summary["retry_after"].as_array().expect("retry_after") {
            let asked = asked.as_f64().unwrap_or_else(|| panic!("{summary:#}"));
            assert!(
                (1.0..=(PACER_PER_SECS + 1) as f64).contains(&asked),
                "Retry-After {asked}: {summary:#}"
            );
        }
        let asked = num(&summary, "retry_after_total");
        let slept = num(&summary, "slept");
        let elapsed = num(&summary, "elapsed");
        assert!(slept >= asked - 0.05, "slept {slept} < asked {asked}");
        // The SDK spent its time in those sleeps, not in pacer's queue: every wait pacer
        // measured stayed near the route's max_wait of 50 ms (generously: under 1 s).
        // And it could not have finished faster than the limit allows: 3 windows of calls
        // span 2 windows.
        assert!(elapsed >= slept, "elapsed {elapsed} < slept {slept}");
        let waits = metric_sum(&text, "pacer_queue_wait_seconds_count", &[]);
        let short = metric_sum(&text, "pacer_queue_wait_seconds_bucket", &[("le", "1")]);
        assert!(waits > 0.0, "no queue waits recorded:\n{text}");
        assert_eq!(short, waits, "queue waits of a second or more:\n{text}");
        let floor = (calls as u64 / PACER_REQUESTS - 1) * PACER_PER_SECS;
        assert!(
            elapsed >= floor as f64 - 0.1,
            "elapsed {elapsed} < {floor}s"
        );

        // The simulator never had to refuse anything, and served every call once.
        let stats = sim.stats();
        assert_eq!(stats.total.too_many, 0, "{stats:?}");
        let mine = stats.clients.get(CLIENT_ID).copied().unwrap_or_default();
        assert_eq!(mine.requests, u64::from(calls) + 1, "{stats:?}");
        assert_eq!(mine.ok, u64::from(calls) + 1, "{stats:?}");

        pacer.shutdown().await;
        sim.shutdown().await;
    })
    .await;
}
