use super::*;
use crate::config::Config;
use crate::forward::Upstream;
use crate::sim::{SimConfig, Simulator};
use serde_json::json;

const KEY: &str = "client.credentials.token.rate.per.minute";

fn config(url: &str, extra: &str) -> Config {
    let text = format!(
        r#"
[[upstream]]
name = "login"
url = "{url}"
[[upstream]]
name = "api"
url = "{url}"
[[route]]
prefix = "/"
upstream = "api"
[[credential]]
name = "ivr"
upstream = "login"
client_id = "ivr-client"
client_secret = "ivr-secret"
[discover]
credential = "ivr"
upstream = "api"
[[limit]]
name = "lowered"
upstream = "api"
scope = "client"
requests = 100
per = "60s"
discover = {{ namespace = "platform.api", key = "{KEY}" }}
[[limit]]
name = "kept"
upstream = "api"
scope = "global"
requests = 10
per = "60s"
discover = {{ namespace = "platform.api", key = "org.app.user.rate.per.minute" }}
[[limit]]
name = "plain"
requests = 50
per = "60s"
{extra}
"#
    );
    Config::parse(&text).unwrap()
}

fn credentials(config: &Config) -> Credentials {
    let upstreams = config
        .upstreams
        .iter()
        .map(|u| Arc::new(Upstream::new(u, 1).unwrap()))
        .collect();
    Credentials::new(config, upstreams)
}

async fn sim(publish: bool) -> Simulator {
    let cfg = SimConfig {
        client_requests: 20,
        publish_limits: publish,
        ..SimConfig::default()
    };
    Simulator::start("127.0.0.1:0".parse().unwrap(), cfg)
        .await
        .unwrap()
}

fn set_of(config: &Config) -> LimitSet {
    LimitSet::new(&config.limits, &config.queue, |n| config.upstream_index(n))
}

fn by_name<'a>(reports: &'a [LimitReport], name: &str) -> &'a LimitReport {
    reports.iter().find(|r| r.limit == name).unwrap()
}

#[test]
fn published_values_are_clamped() {
    assert_eq!(published_value(&json!(300)), Ok(300));
    assert_eq!(published_value(&json!(12.7)), Ok(12));
    assert!(published_value(&json!(0)).is_err());
    assert!(published_value(&json!(-5)).is_err());
    assert!(published_value(&json!(0.5)).is_err());
    assert!(published_value(&json!("300")).is_err());
    assert!(published_value(&json!(null)).is_err());
    assert_eq!(published_value(&json!(1e30)), Ok(u64::MAX));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_value_lowers_a_ceiling_and_never_raises_one() {
    let sim = sim(true).await;
    let config = config(&sim.url(), "");
    let set = set_of(&config);
    let discovery = Discovery::new(&config, &set);
    let reading = read(&config, &credentials(&config)).await;
    assert!(reading.failures.is_empty(), "{:?}", reading.failures);
    assert_eq!(reading.outcomes[0], Some(Outcome::Published(20)));
    assert_eq!(reading.outcomes[1], Some(Outcome::Published(20)));
    assert_eq!(reading.outcomes[2], None);
    discovery.apply(&config, &set, reading);

    assert_eq!(set.specs[0].ceiling_now(0, true, 1.0), Some(20));
    assert_eq!(set.specs[0].requests_now(), Some(20));
    assert_eq!(set.specs[1].ceiling_now(0, true, 1.0), Some(10));
    assert_eq!(set.specs[2].ceiling_now(0, true, 1.0), Some(50));
    let reports = discovery.report(&config);
    let lowered = by_name(&reports, "lowered");
    assert_eq!(
        (lowered.configured, lowered.published, lowered.effective),
        (100, Some(20), 20)
    );
    assert_eq!(lowered.source, "discovered");
    let kept = by_name(&reports, "kept");
    assert_eq!((kept.published, kept.effective), (Some(20), 10));
    assert_eq!(kept.source, "configured");
    assert_eq!(by_name(&reports, "plain").source, "configured");
    // The read counted against the credential's client, like any request it sends.
    assert!(sim.stats().clients["ivr-client"].requests >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_leaves_the_configured_values_and_says_so() {
    let sim = sim(false).await;
    let config = config(&sim.url(), "");
    let set = set_of(&config);
    let discovery = Discovery::new(&config, &set);
    let reading = read(&config, &credentials(&config)).await;
    assert_eq!(reading.failures.len(), 1, "one namespace, one failure");
    discovery.apply(&config, &set, reading);
    assert_eq!(set.specs[0].ceiling_now(0, true, 1.0), Some(100));
    let reports = discovery.report(&config);
    let lowered = by_name(&reports, "lowered");
    assert_eq!((lowered.published, lowered.effective), (None, 100));
    assert!(
        lowered.source.starts_with("configured (discovery failed: "),
        "{}",
        lowered.source
    );
    assert!(
        lowered.error.as_deref().unwrap().contains("503"),
        "{lowered:?}"
    );
    assert_eq!(discovery.failed_reads(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_namespace_or_key_is_not_a_value() {
    let sim = sim(true).await;
    let extra = r#"
[[limit]]
name = "elsewhere"
requests = 30
per = "60s"
discover = { namespace = "no.such.namespace", key = "x" }
[[limit]]
name = "unnamed"
requests = 40
per = "60s"
discover = { namespace = "platform.api", key = "no.such.key" }
"#;
    let config = config(&sim.url(), extra);
    let set = set_of(&config);
    let discovery = Discovery::new(&config, &set);
    let reading = read(&config, &credentials(&config)).await;
    assert!(matches!(&reading.outcomes[3], Some(Outcome::Failed(e)) if e.contains("404")));
    assert!(matches!(
        &reading.outcomes[4],
        Some(Outcome::NotPublished(_))
    ));
    discovery.apply(&config, &set, reading);
    let reports = discovery.report(&config);
    assert_eq!(by_name(&reports, "elsewhere").effective, 30);
    let unnamed = by_name(&reports, "unnamed");
    assert_eq!(unnamed.effective, 40);
    assert!(unnamed.source.starts_with("configured (not published: "));
    // The namespace that answered still lowers its limits.
    assert_eq!(by_name(&reports, "lowered").effective, 20);
}

#[test]
fn a_failed_read_keeps_the_last_published_value() {
    let config = config("http://127.0.0.1:9", "");
    let set = set_of(&config);
    let discovery = Discovery::new(&config, &set);
    let published = Reading {
        outcomes: vec![
            Some(Outcome::Published(20)),
            Some(Outcome::Published(5)),
            None,
        ],
        failures: vec![],
    };
    discovery.apply(&config, &set, published);
    assert_eq!(set.specs[1].ceiling_now(0, true, 1.0), Some(5));
    let failed = |e: &str| Some(Outcome::Failed(e.into()));
    discovery.apply(
        &config,
        &set,
        Reading {
            outcomes: vec![failed("timeout"), failed("timeout"), None],
            failures: vec![("platform.api".into(), "timeout".into())],
        },
    );
    assert_eq!(set.specs[0].ceiling_now(0, true, 1.0), Some(20));
    let reports = discovery.report(&config);
    assert_eq!(
        by_name(&reports, "lowered").source,
        "discovered (last read failed: timeout)"
    );
    // A value no longer published gives the configured one back.
    discovery.apply(
        &config,
        &set,
        Reading {
            outcomes: vec![Some(Outcome::NotPublished("gone".into())), None, None],
            failures: vec![],
        },
    );
    assert_eq!(set.specs[0].ceiling_now(0, true, 1.0), Some(100));
    // A new discovery (another `[discover]` on reload) starts from the configured values.
    let _ = Discovery::new(&config, &set);
    assert_eq!(set.specs[1].ceiling_now(0, true, 1.0), Some(10));
}

#[test]
fn published_values_take_the_limits_headroom_and_classes() {
    let config = config(
        "http://127.0.0.1:9",
        r#"
[[limit]]
name = "spare"
requests = 100
per = "60s"
headroom = 0.1
discover = { namespace = "platform.api", key = "k" }
"#,
    );
    let set = set_of(&config);
    let discovery = Discovery::new(&config, &set);
    discovery.apply(
        &config,
        &set,
        Reading {
            outcomes: vec![None, None, None, Some(Outcome::Published(50))],
            failures: vec![],
        },
    );
    // 50 less 10% headroom; the configured 90 is no longer the ceiling.
    assert_eq!(set.specs[3].ceiling_now(0, true, 1.0), Some(45));
    // Adaptive cuts stay shares of the configured size: the smaller one wins.
    assert_eq!(set.specs[3].ceiling_now(0, true, 0.3), Some(27));
    assert_eq!(set.specs[3].ceiling_now(0, true, 0.9), Some(45));
}

#[test]
fn discover_settings_are_validated() {
    let base = r#"
[[upstream]]
name = "api"
url = "http://127.0.0.1:9"
[[route]]
prefix = "/"
upstream = "api"
"#;
    let errors = |extra: &str| -> Vec<String> {
        match Config::parse(&format!("{base}{extra}")) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    };
    let e = errors("[discover]\ncredential = \"nope\"\ninterval = \"1s\"\n");
    assert!(
        e.iter()
            .any(|e| e.starts_with("discover.credential: no [[credential]]")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|e| e.starts_with("discover.interval: must be at least")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|e| e.starts_with("discover.upstream: required unless")),
        "{e:?}"
    );
    let e = errors(
        "[[limit]]\nname = \"c\"\nconcurrency = 2\ndiscover = { namespace = \"a b\", key = \"\" }\n",
    );
    assert!(
        e.iter()
            .any(|e| e.starts_with("limit[0].discover.namespace:")),
        "{e:?}"
    );
    assert!(
        e.iter().any(|e| e.starts_with("limit[0].discover.key:")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|e| e.starts_with("limit[0].discover: only a rate limit")),
        "{e:?}"
    );
    let e = errors("[discover]\ncredential = \"x\"\nupstream = \"api\"\nbogus = 1\n");
    assert!(e.iter().any(|e| e.contains("bogus")), "{e:?}");
}

#[test]
fn the_genesys_preset_names_the_per_client_limits_published_key() {
    let text = r#"
[[upstream]]
name = "api"
url = "http://127.0.0.1:9"
preset = "genesys"
[[route]]
prefix = "/"
upstream = "api"
"#;
    let config = Config::parse(text).unwrap();
    let per_client = config
        .limits
        .iter()
        .find(|l| l.name == "per-client")
        .unwrap();
    let k = per_client.discover.as_ref().unwrap();
    assert_eq!(
        (k.namespace.as_str(), k.key.as_str()),
        ("platform.api", KEY)
    );
    // Without `[discover]` nothing reads it; with it, the preset upstream is the default.
    assert_eq!(config.discover_upstream(), None);
}

#[test]
fn the_readme_example_is_a_valid_configuration() {
    let readme = include_str!("../../README.md");
    let section = readme
        .split("## The org's real limits")
        .nth(1)
        .expect("README section");
    let block = section
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("toml block");
    let text = format!("{block}\n[[route]]\nprefix = \"/\"\nupstream = \"genesys-api\"\n");
    let config = Config::parse_with_env(&text, &|n| {
        (n == "LIMITS_READER_SECRET").then(|| "s".into())
    })
    .unwrap();
    assert_eq!(config.discover_upstream(), Some("genesys-api"));
    let with_discover = config
        .limits
        .iter()
        .filter(|l| l.discover.is_some())
        .count();
    assert_eq!(with_discover, 2, "the preset's per-client and user-apps");
}
