//! The bodies of pacer's fuzz targets, one function per target, free of libFuzzer so the
//! same code also runs on stable: `tests/fuzz_smoke.rs` includes this file and replays
//! `fuzz/corpus/<target>/` through it. Each function may reject input; it must not panic
//! except on a broken invariant (asserted here).

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use pacer::broker::TokenBroker;
use pacer::config::{Config, Priority};
use pacer::endpoint::{Classifier, Template};
use pacer::feedback::{issued_token, MAX_PAUSE, MAX_TOKEN_LIFETIME};
use pacer::limit::{Ledger, LimitSet};
use pacer::path::normalize;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// One fuzz target's body.
pub type Target = fn(&[u8]);

/// Target names with their bodies, as the corpus directories are named.
pub const TARGETS: &[(&str, Target)] = &[
    ("config", config),
    ("path_template", path_template),
    ("retry_after", retry_after),
    ("identity", identity),
    ("feedback_headers", feedback_headers),
    ("token_answer", token_answer),
];

/// Configuration text → `Config::parse`: errors are fine, panics are not.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = pacer::config::Config::parse(text);
    }
}

/// Path normalization, endpoint templates and the classifier. Input: template lines,
/// then a line `--`, then `METHOD path` request lines.
pub fn path_template(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (templates, requests) = text.split_once("\n--\n").unwrap_or(("", text));
    let templates: Vec<Template> = templates
        .lines()
        .take(32)
        .filter_map(|l| Template::parse(l).ok())
        .collect();
    for t in &templates {
        let again = Template::parse(t.label());
        assert_eq!(again.as_ref(), Ok(t), "label does not parse back");
    }
    let classifier = Classifier::new(templates.clone());
    for line in requests.lines().take(64) {
        let (method, path) = line.split_once(' ').unwrap_or(("GET", line));
        let method = Method::from_bytes(method.as_bytes()).unwrap_or(Method::GET);
        let path = match normalize(path) {
            Ok(n) => {
                assert!(n.starts_with('/'), "{path:?} -> {n:?}");
                assert!(!n.contains("//"), "{path:?} -> {n:?}");
                if path.is_ascii() {
                    assert_eq!(normalize(&n).as_ref(), Ok(&n), "not idempotent: {path:?}");
                }
                n
            }
            Err(_) => path.to_string(),
        };
        for t in &templates {
            let _ = t.matches(&method, &path);
        }
        let e = classifier.classify(&method, &path);
        for t in 0..classifier.templates().len() {
            let _ = classifier.applies(t, &e, &method, &path);
        }
    }
}

/// `Retry-After` / `inin-ratelimit-reset` parsing. Input: lines; even lines are
/// `Retry-After` values, odd lines `inin-ratelimit-reset` values.
pub fn retry_after(data: &[u8]) {
    let mut headers = HeaderMap::new();
    for (i, line) in data.split(|b| *b == b'\n').take(8).enumerate() {
        let Ok(v) = HeaderValue::from_bytes(line) else {
            continue;
        };
        let name = if i % 2 == 0 {
            "retry-after"
        } else {
            "inin-ratelimit-reset"
        };
        headers.append(name, v);
    }
    if let Some(d) = pacer::feedback::retry_after(&headers) {
        assert!(d <= Duration::from_secs(3600), "{d:?}");
    }
}

/// Caller identity from `Authorization`: bearer tokens and Basic users. Input: one
/// `Authorization` value per line.
pub fn identity(data: &[u8]) {
    let mut headers = HeaderMap::new();
    for line in data.split(|b| *b == b'\n').take(4) {
        if let Ok(v) = HeaderValue::from_bytes(line) {
            headers.append(http::header::AUTHORIZATION, v);
        }
    }
    if let Some(t) = pacer::identity::bearer(&headers) {
        assert!(!t.is_empty());
    }
    if let Some(u) = pacer::identity::basic_user(&headers) {
        assert!(!u.is_empty() && !u.contains(':'), "{u:?}");
    }
}

/// The numbers pacer learns from an upstream answer's headers (`Retry-After`,
/// `inin-ratelimit-count`, `inin-ratelimit-reset`, ...) through their parsers and into
/// the ledger (`Ledger::pad`): each stays within its documented bound. Input: `name: value`
/// lines, any header names, so a parser for a new header only needs a line here.
pub fn feedback_headers(data: &[u8]) {
    let mut headers = HeaderMap::new();
    for line in data.split(|b| *b == b'\n').take(16) {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (line[..colon].trim_ascii(), line[colon + 1..].trim_ascii());
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            headers.append(n, v);
        }
    }
    if let Some(d) = pacer::feedback::retry_after(&headers) {
        assert!(d <= MAX_PAUSE, "{d:?}");
    }
    if let Some(used) = pacer::feedback::upstream_count(&headers) {
        let (set, ceiling) = per_client_limit();
        let demand = set.demand(0, &Arc::from("c"), &Method::GET, "/x", Priority::Critical);
        let layer = &demand.layers[0];
        let mut ledger = Ledger::new();
        const SEC: u64 = 1_000_000_000;
        // A real send, then the count twice, the second time half a window later.
        assert!(ledger.try_take(set, SEC, &demand, &|_| 0).is_ok());
        for now in [SEC, 31 * SEC] {
            ledger.pad(set, now, layer, used);
            let counted: u64 = ledger.usage(set, now).iter().map(|(_, n, _)| n).sum();
            assert!(counted <= ceiling, "{counted} counted for {used}");
            assert!(counted >= used.min(ceiling), "{counted} counted for {used}");
        }
    }
}

/// One per-client limit of 300 per minute, and its ceiling.
fn per_client_limit() -> (&'static LimitSet, u64) {
    static SET: OnceLock<LimitSet> = OnceLock::new();
    let set = SET.get_or_init(|| {
        let c = Config::parse(
            "[[upstream]]\nname = \"api\"\nurl = \"http://127.0.0.1:1\"\n\
             [[route]]\nprefix = \"/\"\nupstream = \"api\"\n\
             [[limit]]\nname = \"per-client\"\nscope = \"client\"\nrequests = 300\nper = \"60s\"\n",
        )
        .expect("fuzz fixture config");
        LimitSet::new(&c.limits, &c.queue, |_| Some(0))
    });
    (set, 300)
}

/// A token answer (the body of a successful `/oauth/token`) → what pacer learns from it
/// and the token broker's copy: the lifetime stays within 24 h, and an answer served
/// again from the broker is a token answer for the same token.
pub fn token_answer(data: &[u8]) {
    let Some(issued) = issued_token(data) else {
        return;
    };
    if let Some(l) = issued.lifetime {
        assert!(l <= MAX_TOKEN_LIFETIME, "{l:?}");
    }
    let broker = TokenBroker::new(4, Duration::from_secs(300));
    let key = TokenBroker::key(None, data);
    broker.put(key, issued.clone());
    if let Some(again) = broker.get(&key) {
        let again = issued_token(&again).expect("the broker serves a token answer");
        assert_eq!(again.access_token, issued.access_token);
        assert!(again.lifetime.is_some_and(|l| l <= MAX_TOKEN_LIFETIME));
    }
}
