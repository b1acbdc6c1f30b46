use super::parse::{client_name, execution_id, results, QueryStatus, MAX_COUNT};
use super::*;
use crate::config::Config;
use crate::proxy::Proxy;
use crate::sim::{SimConfig, Simulator};
use serde_json::json;

fn polled(day: &str, counts: &[(&str, u64)]) -> Polled {
    Polled {
        day: day.into(),
        at: Instant::now(),
        counts: counts.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
    }
}

fn ctx(subtract: bool) -> Context {
    Context {
        watched: vec![Arc::from("ivr")],
        upstream: 0,
        ceiling: Some((300, Duration::from_secs(60))),
        subtract,
    }
}

#[test]
fn results_keep_valid_entries_clamped_and_at_most_max_keys() {
    let answer = json!({"queryStatus": "Complete", "results": [
        {"clientId": "a", "requests": 5},
        {"clientId": "a", "requests": 2.9},
        {"clientId": "b", "requests": 1e300},
        {"clientId": "c", "requests": -4},
        {"clientId": "../x", "requests": 1},
        {"clientId": "has space", "requests": 1},
        {"clientId": 7, "requests": 1},
        {"requests": 1},
        "not an object",
        {"clientId": "d", "requests": "12"},
        {"clientId": "e", "requests": 1},
        {"clientId": "f", "requests": 1},
    ]});
    let (status, counts) = results(&answer, 3);
    assert_eq!(status, QueryStatus::Complete);
    let expected: BTreeMap<String, u64> = [("a", 7), ("b", MAX_COUNT), ("e", 1)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    assert_eq!(counts, expected);
    assert_eq!(
        results(
            &json!({"queryStatus": "Running", "results": [{"clientId": "a", "requests": 1}]}),
            3
        ),
        (QueryStatus::Running, BTreeMap::new())
    );
    assert_eq!(
        results(&json!({"queryStatus": "Failed"}), 3).0,
        QueryStatus::Failed
    );
    assert_eq!(results(&json!([1, 2]), 3).0, QueryStatus::Running);
    assert_eq!(
        results(&json!({"queryStatus": "Complete", "results": 5}), 3)
            .1
            .len(),
        0
    );
}

#[test]
fn ids_and_names_are_checked_before_they_become_paths_or_labels() {
    assert_eq!(
        execution_id(&json!({"executionId": "abc-123"})).as_deref(),
        Some("abc-123")
    );
    for bad in [
        json!({"executionId": "../../x"}),
        json!({"executionId": ""}),
        json!({"executionId": 5}),
        json!({}),
    ] {
        assert_eq!(execution_id(&bad), None, "{bad}");
    }
    assert!(!client_id_ok(&"a".repeat(65)));
    assert!(!client_id_ok(".."));
    assert!(client_id_ok("3b2c9a1e-0000-4000-8000-000000000001"));
    assert_eq!(
        client_name(&json!({"name": " WFM\n sync\u{7} "})).as_deref(),
        Some("WFM sync")
    );
    assert_eq!(client_name(&json!({"name": "\n\t"})), None);
    assert_eq!(client_name(&json!({"name": 3})), None);
    assert_eq!(clean_name(&"n".repeat(1000)).map(|n| n.len()), Some(128));
}

#[tokio::test(start_paused = true)]
async fn outside_use_is_the_org_growth_beyond_what_pacer_sent() {
    let usage = Usage::new(100);
    usage.watch(["ivr"]);
    usage.record(polled("2026-12-06", &[("ivr", 1000)]), &ctx(false), "t0");
    assert_eq!(usage.outside("ivr"), None, "one poll is no estimate");
    for _ in 0..40 {
        usage.note_sent("ivr");
    }
    usage.note_sent("not-watched");
    tokio::time::advance(Duration::from_secs(10)).await;
    usage.record(polled("2026-12-06", &[("ivr", 1100)]), &ctx(false), "t1");
    let o = usage.outside("ivr").expect("an estimate");
    assert_eq!((o.org_growth, o.pacer_sent), (100, 40));
    assert!((o.per_second - 6.0).abs() < 1e-9, "{o:?}");
    assert_eq!(o.per_window, Some(360.0));
    assert_eq!(o.ceiling_share, 1.0, "without subtract nothing is lowered");
    assert_eq!(usage.client_share(&(0, Arc::from("ivr"))), 1.0);
    assert_eq!(usage.sent_by("not-watched"), 0);
}

#[tokio::test(start_paused = true)]
async fn subtracting_lowers_the_ceiling_never_raises_it() {
    let usage = Usage::new(100);
    usage.watch(["ivr"]);
    let key = (0, Arc::from("ivr"));
    usage.record(polled("2026-12-06", &[("ivr", 0)]), &ctx(true), "t0");
    tokio::time::advance(Duration::from_secs(60)).await;
    // 120 outside requests in a minute: 300 - 120 of the per-client 300.
    usage.record(polled("2026-12-06", &[("ivr", 120)]), &ctx(true), "t1");
    assert!((usage.client_share(&key) - 0.6).abs() < 1e-9);
    assert_eq!(
        usage.client_share(&(1, Arc::from("ivr"))),
        1.0,
        "only the usage upstream"
    );
    // More outside than the whole limit: share 0 (the limiter keeps one request).
    tokio::time::advance(Duration::from_secs(60)).await;
    usage.record(polled("2026-12-06", &[("ivr", 1120)]), &ctx(true), "t2");
    assert_eq!(usage.client_share(&key), 0.0);
    assert_eq!(crate::limit::scaled(300, usage.client_share(&key)), 1);
    // pacer sent more than the growth (the data lags): no outside use, nothing lowered.
    for _ in 0..50 {
        usage.note_sent("ivr");
    }
    tokio::time::advance(Duration::from_secs(60)).await;
    usage.record(polled("2026-12-06", &[("ivr", 1130)]), &ctx(true), "t3");
    assert_eq!(usage.outside("ivr").map(|o| o.per_second), Some(0.0));
    assert_eq!(usage.client_share(&key), 1.0);
}

#[tokio::test(start_paused = true)]
async fn the_day_rolling_over_gives_no_estimate() {
    let usage = Usage::new(100);
    usage.watch(["ivr"]);
    usage.record(polled("2026-12-06", &[("ivr", 5000)]), &ctx(true), "t0");
    tokio::time::advance(Duration::from_secs(300)).await;
    usage.record(polled("2026-12-07", &[("ivr", 30)]), &ctx(true), "t1");
    assert_eq!(usage.outside("ivr"), None);
    assert_eq!(usage.client_share(&(0, Arc::from("ivr"))), 1.0);
    // A count that went down on the same day (a glitch upstream) is no estimate either.
    tokio::time::advance(Duration::from_secs(300)).await;
    usage.record(polled("2026-12-07", &[("ivr", 10)]), &ctx(true), "t2");
    assert_eq!(usage.outside("ivr"), None);
    // From the new baseline on, estimates resume.
    tokio::time::advance(Duration::from_secs(100)).await;
    usage.record(polled("2026-12-07", &[("ivr", 110)]), &ctx(true), "t3");
    assert_eq!(usage.outside("ivr").map(|o| o.per_second), Some(1.0));
    // `[usage]` removed on reload: nothing lingers.
    usage.forget();
    assert_eq!(usage.outside("ivr"), None);
    assert_eq!(usage.org_requests("ivr"), None);
    assert!(usage.gauges()[0].samples.is_empty());
}

#[test]
fn names_and_gauges_stay_within_max_keys() {
    let usage = Usage::new(3);
    let counts: BTreeMap<String, u64> = (0..3).map(|i| (format!("c{i}"), i)).collect();
    usage.record(
        Polled {
            day: "d".into(),
            at: Instant::now(),
            counts,
        },
        &ctx(false),
        "t",
    );
    assert_eq!(usage.unnamed(2), ["c0", "c1"]);
    for i in 0..10 {
        usage.set_name(&format!("c{i}"), Some(format!("name \"{i}\"")));
    }
    assert!(usage.unnamed(10).is_empty());
    let [org, info] = usage.gauges();
    assert_eq!(org.samples.len(), 3);
    assert_eq!(info.samples.len(), 3, "names beyond max_keys are not kept");
    let text = crate::metrics::Metrics::new().render(&[org, info]);
    assert!(
        text.contains("pacer_org_api_requests{client=\"c2\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("pacer_client_info{client=\"c0\",name=\"name \\\"0\\\"\"} 1"),
        "{text}"
    );
}

fn usage_errors(usage: &str) -> Vec<String> {
    let text = format!(
        "{}\n[[upstream]]\nname = \"login\"\nurl = \"http://127.0.0.1:2\"\n[[credential]]\nname = \"reader\"\nupstream = \"login\"\nclient_id = \"r\"\nclient_secret = \"s\"\n[usage]\n{usage}\n",
        crate::config::MINIMAL
    );
    match Config::parse(&text) {
        Ok(_) => vec![],
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn usage_settings_are_validated_with_their_key_paths() {
    assert!(usage_errors("credential = \"reader\"").is_empty());
    assert!(usage_errors(
        "credential = \"reader\"\ninterval = \"1s\"\nsubtract = true\nupstream = \"api\""
    )
    .is_empty());
    let errors =
        usage_errors("credential = \"nobody\"\ninterval = \"500ms\"\nupstream = \"nowhere\"");
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(
        errors[0].starts_with("usage.credential: no [[credential]] named \"nobody\""),
        "{errors:?}"
    );
    assert!(
        errors[1].starts_with("usage.upstream: no [[upstream]] named \"nowhere\""),
        "{errors:?}"
    );
    assert!(
        errors[2].starts_with("usage.interval: must be at least 1s"),
        "{errors:?}"
    );
    assert_eq!(
        usage_errors("subtract = true"),
        ["usage.subtract: needs usage.credential: without polls there is nothing to subtract"]
    );
    assert!(!usage_errors("colour = \"red\"").is_empty());
}

#[test]
fn the_default_upstream_is_the_genesys_one_else_the_first_that_is_no_login() {
    let base = "[[route]]\nprefix = \"/\"\nupstream = \"api\"\n[[credential]]\nname = \"reader\"\nupstream = \"login\"\nclient_id = \"r\"\nclient_secret = \"s\"\n[usage]\ncredential = \"reader\"\n";
    let plain = format!("[[upstream]]\nname = \"login\"\nurl = \"http://127.0.0.1:2\"\n[[upstream]]\nname = \"api\"\nurl = \"http://127.0.0.1:1\"\n{base}");
    let c = Config::parse(&plain).unwrap();
    assert_eq!(c.usage_upstream(), Some(1));
    assert_eq!(c.usage.interval.0, Duration::from_secs(300));
    assert!(!c.usage.subtract);
    let preset = format!("[[upstream]]\nname = \"login\"\nurl = \"http://127.0.0.1:2\"\n[[upstream]]\nname = \"other\"\nurl = \"http://127.0.0.1:3\"\n[[upstream]]\nname = \"api\"\nurl = \"http://127.0.0.1:1\"\npreset = \"genesys\"\n{base}");
    assert_eq!(Config::parse(&preset).unwrap().usage_upstream(), Some(2));
}

/// pacer in front of a simulator, reading usage with `reporting-client`'s credential.
fn config_for(sim: &Simulator, extra: &str) -> Config {
    Config::parse(&config_text(sim, extra)).expect("config")
}

fn config_text(sim: &Simulator, extra: &str) -> String {
    format!(
        r#"
[[upstream]]
name = "api"
url = "{url}"
[[upstream]]
name = "login"
url = "{url}"
[[route]]
prefix = "/"
upstream = "api"
[[client]]
id = "ivr-client"
name = "ivr"
[[limit]]
name = "per-client"
upstream = "api"
scope = "client"
requests = 100
per = "10s"
[[credential]]
name = "reader"
upstream = "login"
client_id = "reporting-client"
client_secret = "reporting-secret"
[usage]
credential = "reader"
interval = "1s"
{extra}
"#,
        url = sim.url()
    )
}

/// `n` requests straight to the simulator (never through pacer) with `client`'s token.
async fn direct(sim: &Simulator, client: &str, secret: &str, n: usize) {
    let text = format!(
        "{}\n[[credential]]\nname = \"d\"\nupstream = \"api\"\nclient_id = \"{client}\"\nclient_secret = \"{secret}\"\n",
        crate::config::MINIMAL.replace("http://127.0.0.1:1", &sim.url())
    );
    let config = Config::parse(&text).expect("config");
    let upstreams = config
        .upstreams
        .iter()
        .map(|u| Arc::new(crate::forward::Upstream::new(u, 1).expect("upstream")))
        .collect();
    let creds = crate::credential::Credentials::new(&config, upstreams);
    for _ in 0..n {
        creds
            .get_json("d", "api", "/api/v2/users/me")
            .await
            .expect("direct request");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_counts_clients_that_never_pass_through_pacer_and_names_them() {
    let sim = Simulator::start("127.0.0.1:0".parse().unwrap(), SimConfig::default())
        .await
        .unwrap();
    let proxy = Proxy::new(Arc::new(config_for(&sim, ""))).unwrap();
    direct(&sim, "bulk-client", "bulk-secret", 7).await;
    poll_once(&proxy).await.expect("poll");
    assert_eq!(
        proxy.usage.org_requests("bulk-client"),
        Some(8),
        "7 + its token"
    );
    let text = crate::status::render_metrics(&proxy);
    assert!(
        text.contains("pacer_org_api_requests{client=\"bulk-client\"} 8"),
        "{text}"
    );
    assert!(
        text.contains("pacer_client_info{client=\"bulk-client\",name=\"Bulk export\"} 1"),
        "{text}"
    );
    // The second poll: outside use of the configured `ivr-client`, none of the reader's
    // own polls (pacer counted those itself).
    direct(&sim, "ivr-client", "ivr-secret", 30).await;
    poll_once(&proxy).await.expect("poll");
    let ivr = proxy.usage.outside("ivr-client").expect("estimate");
    assert_eq!((ivr.org_growth, ivr.pacer_sent), (31, 0));
    assert_eq!(ivr.ceiling_share, 1.0, "subtract is off");
    let reader = proxy.usage.outside("reporting-client").expect("estimate");
    assert!(reader.pacer_sent >= 2, "{reader:?}");
    assert_eq!(reader.org_growth, reader.pacer_sent, "{reader:?}");
    let status = crate::status::status(&proxy);
    assert_eq!(status["usage"]["polls"], 2, "{status}");
    assert_eq!(status["usage"]["outside"][0]["label"], "ivr", "{status}");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_subtract_outside_use_lowers_the_per_client_share() {
    let sim = Simulator::start("127.0.0.1:0".parse().unwrap(), SimConfig::default())
        .await
        .unwrap();
    let proxy = Proxy::new(Arc::new(config_for(&sim, "subtract = true"))).unwrap();
    poll_once(&proxy).await.expect("poll");
    direct(&sim, "ivr-client", "ivr-secret", 40).await;
    poll_once(&proxy).await.expect("poll");
    let o = proxy.usage.outside("ivr-client").expect("estimate");
    assert_eq!(o.org_growth, 41);
    let per_window = o.per_window.expect("a per-client limit");
    let expected = ((100.0 - per_window) / 100.0).clamp(0.0, 1.0);
    assert!(o.ceiling_share < 1.0, "{o:?}");
    assert!((o.ceiling_share - expected).abs() < 1e-9, "{o:?}");
    assert_eq!(
        proxy.usage.client_share(&(0, Arc::from("ivr-client"))),
        o.ceiling_share
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_poll_is_an_error_not_a_panic() {
    let sim = Simulator::start("127.0.0.1:0".parse().unwrap(), SimConfig::default())
        .await
        .unwrap();
    let text = config_text(&sim, "").replace("reporting-secret", "wrong");
    let proxy = Proxy::new(Arc::new(Config::parse(&text).unwrap())).unwrap();
    let err = poll_once(&proxy).await.unwrap_err();
    assert_eq!(
        err,
        PollError::Call(crate::credential::CredentialError::Status(401))
    );
    sim.shutdown().await;
}
