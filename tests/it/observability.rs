//! Observability contract: after real traffic through pacer to the simulator (forwarded,
//! shed, no-route 404, upstream 404, upstream 401 for an unknown token), `/metrics` carries
//! every metric name of PRODUCT.md, labels only endpoint templates, never a token, and
//! passes `promtool check metrics`. The shipped alert rules, their unit tests and the
//! Grafana dashboard's queries pass promtool too.
//!
//! promtool comes with the Debian package `prometheus` (`.ci/run` installs it). Without it
//! the promtool checks fail when `CI` is set, and are skipped with a notice otherwise.

use crate::support::{
    full, prom_samples, slot, slot_blocking, start_pacer, within, Load, Sample, TestClient,
};
use base64::Engine as _;
use http::{Method, StatusCode};
use pacer::sim::{SimConfig, Simulator};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Metric names PRODUCT.md promises (with the label names it lists, where it lists them).
const CONTRACT: &[(&str, &[&str])] = &[
    (
        "pacer_requests_total",
        &["upstream", "client", "app", "endpoint", "outcome"],
    ),
    (
        "pacer_upstream_responses_total",
        &["upstream", "client", "app", "endpoint", "status"],
    ),
    ("pacer_shed_total", &["upstream", "client", "app", "reason"]),
    ("pacer_queue_depth", &["upstream", "priority"]),
    ("pacer_queue_wait_seconds", &[]),
    ("pacer_inflight", &["upstream", "client"]),
    ("pacer_limit_utilization_ratio", &["limit", "key"]),
    ("pacer_upstream_duration_seconds", &[]),
];

/// An id in a raw path: must never become a label value.
const USER_ID: &str = "6b1f0c3e-5a7d-4e2b-9c8d-0123456789ab";
const IVR_ID: &str = "d2a4c6e8-0b1d-4f3a-8c5e-7a9b1c3d5e7f";
const FORGED_TOKEN: &str = "forged-token-Zq8xW3vN5tR7yU1o";
/// Requests per minute the test limit allows each client.
const QUOTA: u32 = 4;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `promtool` to run, or `None` when the checks are to be skipped (no promtool, not
/// in CI). Fails the test in CI without promtool.
fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("promtool"))
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => Some(p),
        None if std::env::var_os("CI").is_some() => panic!(
            "promtool is not on PATH: install the Debian package `prometheus` \
             (apt-get install -y prometheus; .ci/run does this) to run the observability checks"
        ),
        None => {
            eprintln!(
                "SKIPPED promtool checks: promtool is not on PATH (install the Debian package \
                 `prometheus`: apt-get install -y prometheus). They fail instead when CI is set."
            );
            None
        }
    }
}

fn run(promtool: &Path, args: &[&str], stdin: Option<&Path>) -> Output {
    let mut cmd = Command::new(promtool);
    cmd.args(args).current_dir(repo_root());
    if let Some(file) = stdin {
        cmd.stdin(std::fs::File::open(file).expect("open promtool input"));
    }
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {} {args:?}: {e}", promtool.display()))
}

fn assert_success(what: &str, out: &Output) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{what}: {}\n{text}", out.status);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
}

/// A file of this test's own in the temp dir, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, contents: &str) -> TempFile {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = std::env::temp_dir().join(format!(
            "pacer-observability-{}-{nanos}-{name}",
            std::process::id()
        ));
        std::fs::write(&path, contents).expect("write temp file");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A path segment that is an id (numeric, UUID-like or long hex) rather than a template.
fn looks_like_id(seg: &str) -> bool {
    let digits = seg.chars().filter(char::is_ascii_digit).count();
    let hexish = seg.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    !seg.is_empty() && (digits == seg.len() || (hexish && digits > 0 && seg.len() >= 16))
}

/// Sends traffic of every kind through a fresh pacer and returns its `/metrics` text and
/// the token it issued.
async fn metrics_after_traffic() -> (String, String) {
    let sim = Simulator::start("127.0.0.1:0".parse().expect("addr"), SimConfig::default())
        .await
        .expect("simulator starts");
    let url = sim.url();
    let pacer = start_pacer(&format!(
        r#"
[[upstream]]
name = "api"
url = "{url}"
preset = "genesys"
timeout = "5s"

[[upstream]]
name = "login"
url = "{url}"
preset = "genesys-login"

# No catch-all route: anything outside /api/ and /oauth/ is pacer's own 404.
[[route]]
prefix = "/api/"
upstream = "api"

[[route]]
prefix = "/oauth/"
upstream = "login"

[identity]
unknown_clients = "limit"
tokens_me = false

[[client]]
id = "ivr-client"
name = "ivr-data-actions"

[[limit]]
name = "test-per-client"
upstream = "api"
scope = "client"
requests = {QUOTA}
per = "60s"

[queue]
max_wait = "100ms"
critical_reserve = 0.0
"#
    ))
    .await;
    let client = TestClient::http1(pacer.proxy_addr);

    // A token issued through pacer: pacer learns it belongs to ivr-client.
    let basic = base64::engine::general_purpose::STANDARD.encode("ivr-client:ivr-secret");
    let req = client
        .request(Method::POST, "/oauth/token")
        .header("authorization", format!("Basic {basic}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(full("grant_type=client_credentials"))
        .expect("token request");
    let reply = client.send(req).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let token = reply.json()["access_token"]
        .as_str()
        .expect("access_token")
        .to_string();
    let bearer = format!("Bearer {token}");

    // Forwarded: paths with ids, labelled by their templates.
    for path in [
        "/api/v2/users/me".to_string(),
        format!("/api/v2/users/{USER_ID}"),
        format!("/api/v2/architect/ivrs/{IVR_ID}"),
    ] {
        let r = client.get(&path, &[("authorization", &bearer)]).await;
        assert!(
            r.header("x-pacer-reason").is_none() && r.status != StatusCode::TOO_MANY_REQUESTS,
            "{path}: {} {}",
            r.status,
            r.text()
        );
    }

    // pacer's own 404: no route.
    let r = client
        .get(
            &format!("/nowhere/{USER_ID}"),
            &[("authorization", &bearer)],
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text());

    // The upstream's 404 (the simulator knows only /api/v2).
    let r = client
        .get(
            &format!("/api/v1/users/{USER_ID}"),
            &[("authorization", &bearer)],
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text());
    assert!(r.header("x-pacer-reason").is_none(), "{}", r.text());

    // The upstream's 401: a token nobody issued.
    let r = client
        .get(
            "/api/v2/users/me",
            &[("authorization", &format!("Bearer {FORGED_TOKEN}"))],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    assert!(r.header("x-pacer-reason").is_none(), "{}", r.text());

    // Shed: the client's quota is used up, and waiting would exceed max_wait.
    let mut shed = None;
    for _ in 0..(QUOTA + 2) {
        let r = client
            .get("/api/v2/users/me", &[("authorization", &bearer)])
            .await;
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            shed = Some(r);
            break;
        }
    }
    let shed = shed.expect("pacer sheds once the quota is used up");
    assert!(
        shed.header("x-pacer-reason").is_some() && shed.header("retry-after").is_some(),
        "pacer's own 429 expected: {:?} {}",
        shed.headers,
        shed.text()
    );

    let admin = TestClient::http1(pacer.admin_addr.expect("admin listener"));
    let reply = admin.get("/metrics", &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let text = reply.text();
    pacer.shutdown().await;
    sim.shutdown().await;
    (text, token)
}

#[tokio::test]
async fn metrics_after_traffic_keep_the_contract_and_pass_promtool() {
    let _slot = slot(Load::Timed).await;
    let (text, token) = within("observability traffic", metrics_after_traffic()).await;
    let samples = prom_samples(&text);

    // Every promised name, with its labels.
    for (name, labels) in CONTRACT {
        let found: Vec<_> = samples
            .iter()
            .filter(|s| {
                s.name == *name
                    || s.name
                        .strip_prefix(*name)
                        .is_some_and(|rest| ["_bucket", "_sum", "_count"].contains(&rest))
            })
            .collect();
        assert!(!found.is_empty(), "{name} missing from /metrics:\n{text}");
        for s in &found {
            for key in *labels {
                assert!(s.label(key).is_some(), "{s:?} lacks label {key}");
            }
        }
    }
    for name in [
        "pacer_queue_wait_seconds",
        "pacer_upstream_duration_seconds",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} histogram")),
            "{name} is not a histogram:\n{text}"
        );
    }

    // What the traffic did is visible.
    let has = |name: &str, pairs: &[(&str, &str)]| {
        samples
            .iter()
            .any(|s| s.name == name && pairs.iter().all(|(k, v)| s.label(k) == Some(*v)))
    };
    for outcome in ["forwarded", "shed", "rejected"] {
        assert!(
            has("pacer_requests_total", &[("outcome", outcome)]),
            "no pacer_requests_total{{outcome=\"{outcome}\"}}:\n{text}"
        );
    }
    for status in ["200", "401", "404"] {
        assert!(
            has("pacer_upstream_responses_total", &[("status", status)]),
            "no upstream status {status}:\n{text}"
        );
    }
    // The build and the process: `pacer_build_info` and the standard `process_*` families.
    assert!(
        has(
            "pacer_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        "no pacer_build_info{{version=...}}:\n{text}"
    );
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        let value = samples
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.value)
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"));
        assert!(
            value >= 0.0 && value.is_finite(),
            "{name} = {value}:\n{text}"
        );
    }
    assert!(
        text.contains("# TYPE process_cpu_seconds_total counter"),
        "process_cpu_seconds_total is not a counter:\n{text}"
    );
    assert!(
        has("pacer_shed_total", &[("client", "ivr-data-actions")]),
        "no shed for the client:\n{text}"
    );
    // The limit key is the client (by id or by its configured name), at 100% after the shed.
    assert!(
        ["ivr-client", "ivr-data-actions"].iter().any(|key| has(
            "pacer_limit_utilization_ratio",
            &[("limit", "test-per-client"), ("key", key)]
        )),
        "no utilization of the test limit for the client:\n{text}"
    );
    assert!(
        has(
            "pacer_upstream_responses_total",
            &[("endpoint", "GET /api/v2/users/{userId}")]
        ) || has(
            "pacer_upstream_responses_total",
            &[("endpoint", "GET /api/v2/users/{id}")]
        ),
        "the user path is not labelled by a template:\n{text}"
    );

    // Bounded labels: no raw id in any label (templates only), no credential anywhere.
    for Sample { name, labels, .. } in &samples {
        for (k, v) in labels {
            assert!(
                !v.contains(USER_ID) && !v.contains(IVR_ID),
                "{name} has a raw path in label {k}={v:?}"
            );
            if k == "endpoint" && v != "none" && v != "other" {
                let (method, path) = v
                    .split_once(' ')
                    .unwrap_or_else(|| panic!("{name}: endpoint {v:?} is not METHOD /path"));
                assert!(
                    method == "*" || method.chars().all(|c| c.is_ascii_uppercase()),
                    "{name}: endpoint {v:?}"
                );
                assert!(path.starts_with('/'), "{name}: endpoint {v:?}");
                for seg in path.split('/') {
                    assert!(
                        !looks_like_id(seg),
                        "{name}: endpoint {v:?} holds a raw id {seg:?}, not a template"
                    );
                }
            }
        }
    }
    for (what, secret) in [
        ("issued token", token.as_str()),
        ("forged token", FORGED_TOKEN),
        ("client secret", "ivr-secret"),
    ] {
        assert!(
            !text.contains(secret),
            "{what} appears in /metrics:\n{text}"
        );
    }
    assert!(
        !text.to_ascii_lowercase().contains("bearer"),
        "a bearer credential appears in /metrics:\n{text}"
    );

    let Some(promtool) = promtool() else { return };
    let file = TempFile::new("metrics.prom", &text);
    let out = run(&promtool, &["check", "metrics"], Some(&file.0));
    let lint =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{lint}\n{}--- /metrics:\n{text}",
        out.status,
        if lint.contains("no help text") {
            "(every family needs a # HELP line: describe it in src/metrics.rs, Metrics::new, \
             with Recorder::describe_counter / describe_histogram / describe_gauge)\n"
        } else {
            ""
        }
    );
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let _slot = slot_blocking(Load::Timed);
    let Some(promtool) = promtool() else { return };
    let out = run(
        &promtool,
        &["check", "rules", "deploy/prometheus/alerts.yml"],
        None,
    );
    assert_success("promtool check rules", &out);
    let out = run(
        &promtool,
        &["test", "rules", "deploy/prometheus/alerts_test.yml"],
        None,
    );
    assert_success("promtool test rules", &out);
    let rules = std::fs::read_to_string(repo_root().join("deploy/prometheus/alerts.yml"))
        .expect("alerts.yml");
    let tests = std::fs::read_to_string(repo_root().join("deploy/prometheus/alerts_test.yml"))
        .expect("alerts_test.yml");
    let cases = alert_cases(&tests);
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(str::trim)
        .collect();
    assert!(alerts.len() >= 7, "too few alerts found: {alerts:?}");
    for alert in alerts {
        for (fires, what) in [(true, "fires"), (false, "stays quiet")] {
            assert!(
                cases.contains(&(alert.to_string(), fires)),
                "alerts_test.yml has no case where {alert} {what}"
            );
        }
    }
    let out = run(
        &promtool,
        &["check", "config", "deploy/prometheus/prometheus.yml"],
        None,
    );
    assert_success("promtool check config", &out);
}

/// The (alert, fires) pairs of a promtool test file: each `alertname:` with whether its
/// `exp_alerts` lists an alert (`true`) or is empty (`false`).
fn alert_cases(tests: &str) -> std::collections::BTreeSet<(String, bool)> {
    let mut cases = std::collections::BTreeSet::new();
    let mut current = None;
    for line in tests.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("alertname:") {
            current = Some(name.trim().to_string());
        } else if let Some(rest) = line.strip_prefix("exp_alerts:") {
            if let Some(name) = current.take() {
                cases.insert((name, rest.trim() != "[]"));
            }
        }
    }
    cases
}

#[test]
fn alert_cases_are_read_from_a_test_file() {
    let cases = alert_cases(
        r#"
      - eval_time: 1m
        alertname: A
        exp_alerts: []
      - eval_time: 5m
        alertname: B
        exp_alerts:
          - exp_labels: {}
"#,
    );
    let want: std::collections::BTreeSet<(String, bool)> =
        [("A".to_string(), false), ("B".to_string(), true)].into();
    assert_eq!(cases, want);
}

/// Every query of the Grafana dashboard parses as PromQL, and names only pacer's metrics.
#[test]
fn dashboard_queries_are_valid_promql() {
    let _slot = slot_blocking(Load::Timed);
    let path = repo_root().join("deploy/grafana/dashboards/pacer.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard JSON"))
            .expect("dashboard is JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 8, "too few queries: {exprs:?}");
    // Process metrics are joined with pacer_build_info, so they show pacer's targets only.
    for e in &exprs {
        assert!(e.contains("pacer_"), "query names no pacer metric: {e}");
    }
    for wanted in [
        "pacer_requests_total",
        "pacer_upstream_responses_total",
        "pacer_limit_utilization_ratio",
        "pacer_queue_depth",
        "pacer_queue_wait_seconds_bucket",
        "pacer_shed_total",
        "pacer_inflight",
        "pacer_state_backend_up",
        "pacer_adaptive_rate_factor",
        "pacer_shadow_shed_total",
        "pacer_shadow_wait_seconds_bucket",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(wanted)),
            "dashboard has no panel on {wanted}"
        );
    }

    let Some(promtool) = promtool() else { return };
    // As recording rules, with Grafana's variables filled in, promtool parses every query.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        let e = e
            .replace("$__rate_interval", "1m")
            .replace("$__interval", "1m")
            .replace("$upstream", ".*")
            .replace("$client", ".*")
            .replace("$limit", ".*");
        rules.push_str(&format!(
            "      - record: dashboard_query_{i}\n        expr: {}\n",
            serde_json::to_string(&e).expect("quote")
        ));
    }
    let file = TempFile::new("dashboard-rules.yml", &rules);
    let file_arg = file.0.to_string_lossy().into_owned();
    let out = run(&promtool, &["check", "rules", &file_arg], None);
    assert_success("promtool check rules (dashboard queries)", &out);
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

#[test]
fn compose_config_is_valid() {
    let _slot = slot_blocking(Load::Timed);
    for file in [
        "deploy/compose/pacer.toml",
        "deploy/compose/pacer-shared.toml",
    ] {
        let text = std::fs::read_to_string(repo_root().join(file)).expect("compose config");
        let config = pacer::config::Config::parse(&text)
            .unwrap_or_else(|e| panic!("{file} does not pass check-config:\n{e}"));
        drop(config);
    }
}
