//! "No panic" properties over random input for the parsers that see network or user
//! input: the stable-toolchain twin of the `fuzz/` targets (which need nightly). The
//! targets' bodies are compiled in here too, and their corpora replayed through them.

#[path = "../../fuzz/src/lib.rs"]
mod fuzz_targets;

use http::{HeaderMap, HeaderValue, Method};
use pacer::config::Config;
use pacer::endpoint::{Classifier, Template};
use pacer::feedback::retry_after;
use pacer::identity::{basic_user, bearer};
use pacer::path::normalize;
use proptest::prelude::*;

/// Pieces of real configuration, so random documents get past the TOML parser often.
const CONFIG_PIECES: &[&str] = &[
    "[server]\n",
    "listen = \"127.0.0.1:0\"\n",
    "admin_listen = \"127.0.0.1:0\"\n",
    "max_body_bytes = 0\n",
    "max_headers = 18446744073709551615\n",
    "header_read_timeout = \"0s\"\n",
    "header_read_timeout = \"99999999999999999999h\"\n",
    "trusted_proxies = [\"10.0.0.0/8\", \"::1/200\"]\n",
    "[[upstream]]\nname = \"api\"\nurl = \"http://127.0.0.1:1\"\n",
    "[[upstream]]\nname = \"api\"\nurl = \"https://[::1]:65536/x?q\"\npreset = \"genesys\"\n",
    "preset = \"genesys-login\"\n",
    "timeout = \"1ms\"\n",
    "[[route]]\nprefix = \"/\"\nupstream = \"api\"\n",
    "[[route]]\nprefix = \"\"\nupstream = \"nope\"\nstrip_prefix = true\n",
    "identity = [\"header:x-caller\", \"basic-user\", \"bearer\", \"client-ip\", \"header:\"]\n",
    "inbound_auth = { header = \"x-key\", keys = [\"${PACER_FUZZ_UNSET}\"] }\n",
    "allow_cidrs = [\"52.0.0.0/8\", \"300.0.0.0/8\"]\n",
    "priority = \"critical\"\n",
    "max_wait = \"5s\"\n",
    "[identity]\nunknown_clients = \"reject\"\ntokens_me = false\nmax_keys = 0\n",
    "[[client]]\nid = \"c\"\npriority = \"bulk\"\n",
    "[[limit]]\nname = \"l\"\nscope = \"client+endpoint\"\nrequests = 0\nper = \"0s\"\n",
    "[[limit]]\nname = \"l\"\nmatch = \"PUT /a/{b}/*\"\nconcurrency = 0\nheadroom = 1.5\n",
    "[[limit]]\nname = \"m\"\nmatch = \"GET /{\"\nrequests = 18446744073709551615\nper = \"1ns\"\n",
    "guard = \"1h\"\n",
    "[queue]\nmax_wait = \"0s\"\nmax_depth = 0\ncritical_reserve = -1.0\nbulk_share = 2.0\n",
    "= = =\n",
    "\"\\u0000\"\n",
];

fn config_doc() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(prop::sample::select(CONFIG_PIECES), 0..12).prop_map(|v| v.concat()),
        ".{0,400}",
    ]
}

/// Paths made mostly of the characters normalization cares about.
fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        "(/|//|\\.|\\.\\.|%2e|%2E|%2f|%5c|%00|%41|%|%z|%c3%a9|a|b|\\{x\\}|\\*|\\?|~|\\\\){0,16}",
        "/[ -~]{0,60}",
        ".{0,60}",
    ]
}

fn template_text() -> impl Strategy<Value = String> {
    let method = prop_oneof![
        Just("GET".to_string()),
        Just("PUT".to_string()),
        Just("*".to_string()),
        "[A-Za-z!#]{0,8}",
    ];
    let seg = prop_oneof![
        Just("api".to_string()),
        Just("v2".to_string()),
        Just("{id}".to_string()),
        Just("*".to_string()),
        Just("{}".to_string()),
        Just(String::new()),
        "[a-z{}*?#]{1,4}",
    ];
    (method, prop::collection::vec(seg, 0..6), " {0,2}")
        .prop_map(|(m, segs, sp)| format!("{m}{sp} /{}", segs.join("/")))
}

fn method() -> impl Strategy<Value = Method> {
    prop::sample::select(vec![
        Method::GET,
        Method::PUT,
        Method::POST,
        Method::DELETE,
        Method::from_bytes(b"PURGE").expect("token"),
    ])
}

/// A header map with `name` set to each value that is a valid header value.
fn headers(name: &'static str, values: &[Vec<u8>]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for v in values {
        if let Ok(v) = HeaderValue::from_bytes(v) {
            h.append(name, v);
        }
    }
    h
}

fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        "[ -~]{0,40}".prop_map(String::into_bytes),
        "(Bearer|bearer|Basic|basic|BASIC)( {0,3})[A-Za-z0-9+/=:.\\-_ ]{0,40}"
            .prop_map(String::into_bytes),
        "[0-9 ]{0,24}".prop_map(String::into_bytes),
        "(Mon|Sun|Xyz), [0-9]{1,3} (Jan|Feb|Nov|Dec|Foo) [0-9]{1,6} [0-9:]{0,10} (GMT|UTC)"
            .prop_map(String::into_bytes),
        "[0-9]{1,6}-[0-9]{1,3}-[0-9]{1,3}T[0-9:]{0,10}Z?".prop_map(String::into_bytes),
    ]
}

/// `name: value` lines of the headers pacer learns numbers from, with hostile values.
fn feedback_lines() -> impl Strategy<Value = String> {
    let name = prop::sample::select(vec![
        "retry-after",
        "inin-ratelimit-count",
        "inin-ratelimit-allowed",
        "inin-ratelimit-reset",
    ]);
    let value = prop_oneof![
        header_bytes().prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        Just("18446744073709551615".to_string()),
        "-?[0-9]{1,30}",
        "-?[0-9]{1,3}(\\.[0-9]{1,3})?(e-?[0-9]{1,4})?",
        "(Sun|Sunday), [0-9]{2}(-| )(Nov|Dec)(-| )[0-9]{2,4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT",
    ];
    prop::collection::vec((name, value).prop_map(|(n, v)| format!("{n}: {v}")), 0..6)
        .prop_map(|lines| lines.join("\n"))
}

/// `expires_in` values of every JSON kind, hostile ones included.
fn expires_in() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|n| n.to_string()),
        "-?[0-9]{1,3}(\\.[0-9]{1,3})?(e-?[0-9]{1,4})?",
        "\"[ -~]{0,24}\"",
        Just("null".to_string()),
        Just("[]".to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn learned_header_numbers_stay_bounded(lines in feedback_lines()) {
        fuzz_targets::feedback_headers(lines.as_bytes());
    }

    #[test]
    fn token_answers_stay_bounded(e in expires_in()) {
        let body = format!(r#"{{"access_token":"t","token_type":"bearer","expires_in":{e}}}"#);
        fuzz_targets::token_answer(body.as_bytes());
    }

    #[test]
    fn config_parse_never_panics(doc in config_doc()) {
        let _ = Config::parse(&doc);
    }

    #[test]
    fn normalize_never_panics_and_is_stable(p in path()) {
        if let Ok(n) = normalize(&p) {
            prop_assert!(n.starts_with('/'), "{p:?} -> {n:?}");
            prop_assert!(!n.contains("//"), "{p:?} -> {n:?}");
            for seg in n.split('/') {
                prop_assert!(seg != "." && seg != "..", "{p:?} -> {n:?}");
            }
            if p.is_ascii() {
                prop_assert_eq!(normalize(&n), Ok(n.clone()), "not idempotent for {:?}", p);
            }
        }
    }

    #[test]
    fn templates_parse_match_and_classify_without_panic(
        texts in prop::collection::vec(template_text(), 0..6),
        requests in prop::collection::vec((method(), path()), 0..8),
    ) {
        let templates: Vec<Template> = texts.iter().filter_map(|t| Template::parse(t).ok()).collect();
        for t in &templates {
            // A template's own label parses back to the same template.
            let again = Template::parse(t.label());
            prop_assert_eq!(again.as_ref(), Ok(t));
        }
        let classifier = Classifier::new(templates.clone());
        for (m, p) in &requests {
            let path = normalize(p).unwrap_or_else(|_| p.clone());
            for t in &templates {
                let _ = t.matches(m, &path);
            }
            let e = classifier.classify(m, &path);
            if let Some(i) = e.template {
                prop_assert!(i < classifier.templates().len());
                for t in 0..classifier.templates().len() {
                    let _ = classifier.applies(t, &e, m, &path);
                }
            }
        }
    }

    #[test]
    fn retry_after_never_panics_and_is_bounded(
        ra in prop::collection::vec(header_bytes(), 0..3),
        reset in prop::collection::vec(header_bytes(), 0..3),
    ) {
        let mut h = headers("retry-after", &ra);
        for (k, v) in headers("inin-ratelimit-reset", &reset).iter() {
            h.append(k, v.clone());
        }
        if let Some(d) = retry_after(&h) {
            prop_assert!(d <= std::time::Duration::from_secs(3600), "{d:?} from {h:?}");
        }
    }

    #[test]
    fn identity_extraction_never_panics(values in prop::collection::vec(header_bytes(), 0..3)) {
        let h = headers("authorization", &values);
        if let Some(t) = bearer(&h) {
            prop_assert!(!t.is_empty());
        }
        if let Some(u) = basic_user(&h) {
            prop_assert!(!u.is_empty() && !u.contains(':'));
        }
    }
}

#[test]
fn basic_user_of_a_real_header() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode("client-id:s3cr:et");
    let h = headers("authorization", &[format!("Basic {b64}").into_bytes()]);
    assert_eq!(basic_user(&h).as_deref(), Some("client-id"));
    assert_eq!(bearer(&h), None);
}

/// Replays `fuzz/corpus/<target>/*` (the seeds, plus whatever `bench/fuzz.sh` grew) and any
/// crash inputs left in `fuzz/artifacts/<target>/` through the targets' bodies.
#[test]
fn fuzz_corpora_replay_without_panic() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for (name, body) in fuzz_targets::TARGETS {
        let before = replayed;
        for dir in ["corpus", "artifacts"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if !path.is_file() {
                    continue;
                }
                let data = std::fs::read(&path).expect("read corpus file");
                let outcome = std::panic::catch_unwind(|| body(&data));
                assert!(outcome.is_ok(), "{name} panics on {}", path.display());
                replayed += 1;
            }
        }
        assert!(replayed > before, "no seed corpus for target {name}");
    }
    assert!(
        replayed >= fuzz_targets::TARGETS.len(),
        "no seed corpus found under {}",
        root.display()
    );
}
