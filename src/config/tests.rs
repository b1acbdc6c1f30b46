use super::*;

fn env(name: &str) -> Option<String> {
    match name {
        "SECRET" => Some("s3cret".into()),
        _ => None,
    }
}

#[test]
fn minimal_config_gets_defaults() {
    let c = Config::parse_with_env(MINIMAL, &env).unwrap();
    assert_eq!(c.server.max_body_bytes, 10 * 1024 * 1024);
    assert_eq!(c.upstreams[0].timeout, Dur::secs(60));
    assert_eq!(c.queue.max_depth, 10_000);
    assert!(c.limits.is_empty());
}

#[test]
fn every_mistake_is_listed_with_its_key_path() {
    let text = r#"
[server]
listen = "0.0.0.0:8080"
header_read_timeout = "soon"
bogus = 1

[[upstream]]
name = "ok"
url = "http://127.0.0.1:1"

[[upstream]]
name = "rel"
url = "api"

[[route]]
prefix = "/"
upstream = "nowhere"

[[limit]]
name = "bad"
requests = 10
match = "GET no-slash"

[queue]
bulk_share = 2.0

[identity]
unknown_clients = "maybe"

[extra]
"#;
    let errs = Config::parse_with_env(text, &env).unwrap_err();
    let lines: Vec<String> = errs.0.iter().map(|e| e.to_string()).collect();
    let has = |needle: &str| lines.iter().any(|l| l.contains(needle));
    assert!(has("upstream[1].url: relative URL \"api\""), "{lines:#?}");
    assert!(
        has("route[0].upstream: no [[upstream]] named \"nowhere\""),
        "{lines:#?}"
    );
    assert!(has("limit[0].per: required with `requests`"), "{lines:#?}");
    assert!(
        has("limit[0].match: invalid endpoint template"),
        "{lines:#?}"
    );
    assert!(has("queue.bulk_share"), "{lines:#?}");
    assert!(has("identity.unknown_clients"), "{lines:#?}");
    assert!(has("extra: unknown section"), "{lines:#?}");
    assert!(has("server") && has("soon"), "{lines:#?}");
    assert!(lines.len() >= 8, "{lines:#?}");
}

#[test]
fn buffer_body_bytes_defaults_to_64_kib_and_is_bounded() {
    let c = Config::parse_with_env(MINIMAL, &env).unwrap();
    assert_eq!(c.server.buffer_body_bytes, 64 * 1024);
    let off = format!("[server]\nbuffer_body_bytes = 0\n{MINIMAL}");
    assert_eq!(
        Config::parse_with_env(&off, &env)
            .unwrap()
            .server
            .buffer_body_bytes,
        0
    );
    let huge = format!("[server]\nbuffer_body_bytes = 1_000_000_000\n{MINIMAL}");
    let errs = Config::parse_with_env(&huge, &env).unwrap_err();
    assert!(
        errs.to_string()
            .contains("server.buffer_body_bytes: must be at most 16777216"),
        "{errs}"
    );
    let negative = format!("[server]\nbuffer_body_bytes = -1\n{MINIMAL}");
    let errs = Config::parse_with_env(&negative, &env).unwrap_err();
    assert!(errs.to_string().contains("buffer_body_bytes"), "{errs}");
}

#[test]
fn unknown_keys_are_errors() {
    let text = format!("{MINIMAL}\n[queue]\nmax_wiat = \"1s\"\n");
    let errs = Config::parse_with_env(&text, &env).unwrap_err();
    assert!(errs.to_string().contains("max_wiat"), "{errs}");
}

#[test]
fn env_expansion_and_missing_variables() {
    let text = format!(
        "{MINIMAL}\n[[route]]\nprefix = \"/crm/\"\nupstream = \"api\"\ninbound_auth = {{ header = \"x-key\", keys = [\"${{SECRET}}\", \"${{MISSING}}\"] }}\n"
    );
    let errs = Config::parse_with_env(&text, &env).unwrap_err();
    assert_eq!(errs.0.len(), 1, "{errs}");
    assert_eq!(errs.0[0].path, "route[1].inbound_auth.keys[1]");
    assert!(errs.0[0].message.contains("MISSING"));
    assert!(!errs.to_string().contains("s3cret"));
    assert_eq!(
        env::expand("a$$b${SECRET}", &super::tests::env).unwrap(),
        "a$bs3cret"
    );
}

#[test]
fn presets_add_limits_that_written_ones_override() {
    let text = r#"
[[upstream]]
name = "genesys-api"
url = "https://api.mypurecloud.com"
preset = "genesys"
[[route]]
prefix = "/"
upstream = "genesys-api"
[[limit]]
name = "per-client"
requests = 100
per = "1m"
"#;
    let c = Config::parse_with_env(text, &env).unwrap();
    let per_client: Vec<_> = c.limits.iter().filter(|l| l.name == "per-client").collect();
    assert_eq!(per_client.len(), 1);
    assert_eq!(per_client[0].requests, Some(100));
    let ivr = c.limits.iter().find(|l| l.name == "ivr-put").unwrap();
    assert_eq!(ivr.requests, Some(100));
    assert_eq!(
        ivr.matches.as_deref(),
        Some("PUT /api/v2/architect/ivrs/{ivrId}")
    );
    assert!(c
        .limits
        .iter()
        .any(|l| l.name == "org" && l.requests == Some(3000)));
}

#[test]
fn guard_and_headroom_shape_the_window() {
    let l = LimitConfig {
        name: "x".into(),
        upstream: None,
        matches: None,
        scope: Scope::Client,
        requests: Some(300),
        per: Some(Dur::secs(60)),
        concurrency: None,
        jobs: None,
        job_ttl: None,
        headroom: 0.1,
        guard: None,
        shadow: false,
    };
    assert_eq!(l.effective_requests(), Some(270));
    assert_eq!(l.effective_window(), Some(Duration::from_millis(60_600)));
}

#[test]
fn shipped_configs_validate() {
    // Every `${NAME}` is set; the access log format is left to the file.
    let lookup = |name: &str| (name != LOG_FORMAT_ENV).then(|| format!("test-{name}"));
    for file in [
        "config/pacer.toml",
        "config/genesys.toml",
        "config/genesys-crm.toml",
    ] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        if let Err(e) = Config::parse_with_env(&text, &lookup) {
            panic!("{file}:\n{e}");
        }
    }
}

fn state_errors(state: &str) -> Vec<String> {
    let text = format!("{MINIMAL}\n[state]\nbackend = \"redis\"\n{state}\n");
    match Config::parse_with_env(&text, &env) {
        Ok(_) => Vec::new(),
        Err(errs) => errs.0.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn redis_modes_parse_with_their_keys() {
    let text = format!(
        "{MINIMAL}\n[state]\nbackend = \"redis\"\nmode = \"cluster\"\nnodes = [\"redis://a:7000\", \"redis://:${{SECRET}}@b:7001\"]\n"
    );
    let c = Config::parse_with_env(&text, &env).unwrap();
    assert_eq!(c.state.mode, RedisMode::Cluster);
    assert_eq!(c.state.nodes.len(), 2);
    assert_eq!(c.state.nodes[1].expose(), "redis://:s3cret@b:7001");
    assert!(!format!("{:?}", c.state).contains("s3cret"));

    let text = format!(
        "{MINIMAL}\n[state]\nbackend = \"redis\"\nmode = \"sentinel\"\nnodes = [\"redis://s1:26379\"]\nmaster = \"mymaster\"\n"
    );
    let c = Config::parse_with_env(&text, &env).unwrap();
    assert_eq!(c.state.mode, RedisMode::Sentinel);
    assert_eq!(c.state.master.as_deref(), Some("mymaster"));

    // The default stays one Redis at `url`.
    let c = Config::parse_with_env(MINIMAL, &env).unwrap();
    assert_eq!(c.state.mode, RedisMode::Single);
    assert!(state_errors("url = \"redis://r:6379/\"").is_empty());
    assert!(state_errors("mode = \"single\"\nurl = \"redis://r:6379/\"").is_empty());
}

#[test]
fn redis_mode_mistakes_name_their_keys() {
    let has = |lines: &[String], needle: &str| lines.iter().any(|l| l.contains(needle));

    let e = state_errors("mode = \"cluster\"");
    assert!(
        has(&e, "state.nodes: required with mode = \"cluster\""),
        "{e:#?}"
    );
    assert!(
        !has(&e, "state.url"),
        "url is not needed for a cluster: {e:#?}"
    );

    let e = state_errors("mode = \"sentinel\"");
    assert!(
        has(&e, "state.nodes: required with mode = \"sentinel\""),
        "{e:#?}"
    );
    assert!(
        has(&e, "state.master: required with mode = \"sentinel\""),
        "{e:#?}"
    );

    let e = state_errors("mode = \"sentinel\"\nnodes = [\"redis://s:26379\"]\nmaster = \"\"");
    assert!(has(&e, "state.master: required"), "{e:#?}");

    let e = state_errors("mode = \"cluster\"\nnodes = [\"redis://a:7000\", \"a:7001\"]");
    assert!(
        has(&e, "state.nodes[1]: must start with redis://"),
        "{e:#?}"
    );
    assert_eq!(e.len(), 1, "{e:#?}");

    let e = state_errors("mode = \"cluster\"\nnodes = [\"redis://a:7000\"]\nurl = \"redis://r/\"");
    assert!(
        has(&e, "state.url: not used with mode = \"cluster\""),
        "{e:#?}"
    );

    let e = state_errors("mode = \"cluster\"\nnodes = [\"redis://a:7000\"]\nmaster = \"m\"");
    assert!(
        has(&e, "state.master: only used with mode = \"sentinel\""),
        "{e:#?}"
    );

    let e = state_errors("url = \"redis://r/\"\nnodes = [\"redis://a:7000\"]");
    assert!(has(&e, "state.nodes: only used with mode"), "{e:#?}");

    let e = state_errors("");
    assert!(
        has(&e, "state.url: required with backend = \"redis\""),
        "{e:#?}"
    );

    let e = state_errors("mode = \"ring\"\nurl = \"redis://r/\"");
    assert!(has(&e, "ring"), "{e:#?}");
}

#[test]
fn adaptive_keys_are_validated_with_their_paths() {
    let c = Config::parse(MINIMAL).expect("minimal");
    assert_eq!(c.adaptive.floor, 0.25);
    assert_eq!(c.adaptive.recover, 0.05);
    assert_eq!(c.adaptive.min_answers, 1);
    let text = format!(
        "{MINIMAL}[adaptive]\nthreshold = 1.5\ncut = 0.0\nfloor = 0.0\nrecover = 2.0\n\
         hold = \"0s\"\nmin_answers = 0\n"
    );
    let errs = Config::parse(&text).unwrap_err();
    let lines: Vec<String> = errs.0.iter().map(|e| e.to_string()).collect();
    for key in [
        "adaptive.threshold",
        "adaptive.cut",
        "adaptive.floor",
        "adaptive.recover",
        "adaptive.hold",
        "adaptive.min_answers",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(key)),
            "{key}: {lines:#?}"
        );
    }
    let ok = format!("{MINIMAL}[adaptive]\nfloor = 0.5\nrecover = 0.1\nhold = \"30s\"\n");
    let c = Config::parse(&ok).expect("valid adaptive keys");
    assert_eq!((c.adaptive.floor, c.adaptive.recover), (0.5, 0.1));
}

#[test]
fn reserve_memory_defaults_to_a_day_and_must_be_at_least_a_second() {
    let c = Config::parse_with_env(MINIMAL, &env).unwrap();
    assert_eq!(c.queue.reserve_memory, Dur::secs(24 * 3600));
    let c = Config::parse_with_env(
        &format!("{MINIMAL}\n[queue]\nreserve_memory = \"10m\"\n"),
        &env,
    )
    .unwrap();
    assert_eq!(c.queue.reserve_memory, Dur::secs(600));
    for bad in ["0s", "500ms"] {
        let e = Config::parse_with_env(
            &format!("{MINIMAL}\n[queue]\nreserve_memory = \"{bad}\"\n"),
            &env,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("queue.reserve_memory"), "{bad}: {e}");
    }
}

#[test]
fn log_format_defaults_to_json_and_the_environment_overrides_the_file() {
    let c = Config::parse_with_env(MINIMAL, &env).unwrap();
    assert_eq!(c.log, LogConfig::default());
    assert_eq!(c.log.format, LogFormat::Json);
    assert!(c.log.access);
    let text = format!("{MINIMAL}\n[log]\nformat = \"json\"\naccess = false\n");
    let from_env =
        |value: &'static str| move |name: &str| (name == LOG_FORMAT_ENV).then(|| value.to_string());
    let c = Config::parse_with_env(&text, &from_env("text")).unwrap();
    assert_eq!(c.log.format, LogFormat::Text);
    assert!(!c.log.access);
    let errors = Config::parse_with_env(&text, &from_env("yaml")).unwrap_err();
    assert_eq!(errors.0.len(), 1, "{errors}");
    assert_eq!(errors.0[0].path, "log.format");
    assert!(errors.0[0].message.contains("PACER_LOG_FORMAT"), "{errors}");
    let errors = Config::parse_with_env(
        &format!("{MINIMAL}\n[log]\nformat = \"xml\"\nlines = 1\n"),
        &env,
    )
    .unwrap_err();
    let paths: Vec<&str> = errors.0.iter().map(|e| e.path.as_str()).collect();
    assert!(paths.contains(&"log.format"), "{errors}");
    assert!(paths.contains(&"log.lines"), "{errors}");
}

#[test]
fn shadow_keys_parse_and_redis_refuses_them() {
    let limit = "[[limit]]\nname = \"per-client\"\nscope = \"client\"\nrequests = 3\nper = \"1s\"\nshadow = true\n";
    let c = Config::parse(&format!("[server]\nshadow = true\n{MINIMAL}{limit}")).expect("shadow");
    assert!(c.server.shadow && c.limits[0].shadow);
    assert!(!Config::parse(MINIMAL).expect("minimal").server.shadow);
    let redis = "[state]\nbackend = \"redis\"\nurl = \"redis://r:6379/\"\n";
    let errs =
        Config::parse(&format!("[server]\nshadow = true\n{redis}{MINIMAL}{limit}")).unwrap_err();
    let lines: Vec<String> = errs.0.iter().map(|e| e.to_string()).collect();
    for key in ["server.shadow", "limit[0].shadow"] {
        assert!(
            lines.iter().any(|l| l.starts_with(key)
                && l.contains("not supported with [state] backend = \"redis\"")),
            "{key}: {lines:#?}"
        );
    }
    assert_eq!(lines.len(), 2, "{lines:#?}");
    // Turning shadow on or off is a change of limiting (counters start afresh).
    let on = Config::parse(&format!("[server]\nshadow = true\n{MINIMAL}")).expect("on");
    let off = Config::parse(MINIMAL).expect("off");
    assert!(!on.same_limiting(&off));
}

#[test]
fn credentials_are_parsed_with_defaults_and_validated_with_key_paths() {
    let ok = format!(
        "{MINIMAL}\n[[credential]]\nname = \"ivr\"\nupstream = \"api\"\nclient_id = \"id\"\nclient_secret = \"${{SECRET}}\"\n"
    );
    let c = Config::parse_with_env(&ok, &env).unwrap();
    let cred = c.credential("ivr").unwrap();
    assert_eq!(cred.client_secret.expose(), "s3cret");
    assert_eq!(cred.token_path, DEFAULT_TOKEN_PATH);
    assert_eq!(cred.refresh_before, None);
    assert!(!format!("{c:?}").contains("s3cret"));

    let bad = format!(
        r#"{MINIMAL}
[[credential]]
name = "a"
upstream = "login"
client_id = ""
client_secret = ""
token_path = "oauth/token"
refresh_before = "0s"
[[credential]]
name = "a"
upstream = "api"
client_id = "x:y"
client_secret = "${{MISSING}}"
[[credential]]
name = "b"
upstream = "api"
client_id = "x"
client_secret = "s"
extra = 1
"#
    );
    let errors = Config::parse_with_env(&bad, &env).unwrap_err().0;
    let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
    for p in [
        "credential[0].upstream",
        "credential[0].client_id",
        "credential[0].client_secret",
        "credential[0].token_path",
        "credential[0].refresh_before",
        "credential[1].name",
        "credential[1].client_id",
        "credential[1].client_secret",
        "credential[2].extra",
    ] {
        assert!(paths.contains(&p), "{p} missing from {errors:?}");
    }
}

#[test]
fn a_credential_route_needs_a_known_credential_and_a_gate() {
    let cred = "[[credential]]\nname = \"ivr\"\nupstream = \"api\"\nclient_id = \"id\"\nclient_secret = \"s\"\n";
    let text = format!(
        r#"{cred}
[[upstream]]
name = "api"
url = "http://127.0.0.1:1"
[[route]]
prefix = "/open/"
upstream = "api"
credential = "ivr"
[[route]]
prefix = "/typo/"
upstream = "api"
credential = "ivx"
allow_cidrs = ["10.0.0.0/8"]
identity = ["client-ip"]
[[route]]
prefix = "/keyed/"
upstream = "api"
credential = "ivr"
inbound_auth = {{ header = "x-app-key", keys = ["k"] }}
"#
    );
    let errors = Config::parse_with_env(&text, &env).unwrap_err().0;
    let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "route[0].credential",
            "route[1].credential",
            "route[1].identity"
        ],
        "{errors:?}"
    );
    assert!(errors[0].message.contains("inbound_auth"), "{errors:?}");
    let ok = text
        .replace("credential = \"ivx\"", "credential = \"ivr\"")
        .replace("identity = [\"client-ip\"]", "")
        .replace(
            "prefix = \"/open/\"\nupstream = \"api\"\ncredential = \"ivr\"",
            "prefix = \"/open/\"\nupstream = \"api\"",
        );
    let c = Config::parse_with_env(&ok, &env).unwrap();
    assert_eq!(c.routes[2].credential.as_deref(), Some("ivr"));
}

#[test]
fn job_limits_validate_with_key_paths_and_warn_per_replica_under_redis() {
    let jobs =
        "[[limit]]\nname = \"jobs\"\nmatch = \"POST /api/v2/analytics/*/details/jobs\"\njobs = 2\n";
    let c = Config::parse(&format!("{MINIMAL}{jobs}")).expect("a job limit");
    assert_eq!(c.limits[0].jobs, Some(2));
    assert_eq!(c.limits[0].effective_job_ttl(), Duration::from_secs(1800));
    assert!(c.warnings().is_empty());
    let c = Config::parse(&format!("{MINIMAL}{jobs}job_ttl = \"5m\"\n")).expect("ttl");
    assert_eq!(c.limits[0].effective_job_ttl(), Duration::from_secs(300));
    let errors = |limit: &str| -> Vec<String> {
        Config::parse(&format!("{MINIMAL}{limit}"))
            .unwrap_err()
            .0
            .iter()
            .map(|e| e.to_string())
            .collect()
    };
    let has = |lines: &[String], key: &str| lines.iter().any(|l| l.starts_with(key));
    let e = errors("[[limit]]\nname = \"j\"\njobs = 0\nconcurrency = 3\njob_ttl = \"0s\"\n");
    for key in [
        "limit[0].jobs: must be at least 1",
        "limit[0].jobs: a job limit",
        "limit[0].match",
        "limit[0].job_ttl",
    ] {
        assert!(has(&e, key), "{key}: {e:#?}");
    }
    let e = errors("[[limit]]\nname = \"j\"\nconcurrency = 1\njob_ttl = \"1m\"\n");
    assert!(has(&e, "limit[0].job_ttl: only with `jobs`"), "{e:#?}");
    let e = errors(&format!("{jobs}shadow = true\n"));
    assert!(has(&e, "limit[0].shadow"), "{e:#?}");
    let redis = "[state]\nbackend = \"redis\"\nurl = \"redis://r:6379/\"\n";
    let c = Config::parse(&format!("{redis}{MINIMAL}{jobs}")).expect("redis");
    let w: Vec<String> = c.warnings().iter().map(|w| w.to_string()).collect();
    assert_eq!(w.len(), 1, "{w:#?}");
    assert!(
        w[0].starts_with("limit[0].jobs: job slots are kept per replica"),
        "{w:#?}"
    );
}

#[test]
fn the_genesys_preset_holds_analytics_job_slots_for_both_families() {
    let text = "[[upstream]]\nname = \"g\"\nurl = \"https://api.mypurecloud.com\"\npreset = \"genesys\"\n[[route]]\nprefix = \"/\"\nupstream = \"g\"\n";
    let c = Config::parse(text).unwrap();
    let jobs = c
        .limits
        .iter()
        .find(|l| l.name == "analytics-jobs")
        .unwrap();
    assert_eq!(jobs.jobs, Some(5));
    assert_eq!(jobs.scope, Scope::Global);
    let set = crate::limit::LimitSet::new(&c.limits, &c.queue, |n| c.upstream_index(n));
    for family in ["conversations", "users"] {
        let d = set.demand(
            0,
            &std::sync::Arc::from("c"),
            &http::Method::POST,
            &format!("/api/v2/analytics/{family}/details/jobs"),
            Priority::Normal,
        );
        assert!(
            d.layers.iter().any(|l| set.specs[l.limit].jobs == Some(5)),
            "{family}"
        );
    }
    // The synchronous query cap stays.
    assert!(c
        .limits
        .iter()
        .any(|l| l.name == "analytics-queries" && l.concurrency == Some(8)));
}
