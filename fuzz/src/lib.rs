//! The bodies of pacer's fuzz targets, one function per target, free of libFuzzer so the
//! same code also runs on stable: `tests/fuzz_smoke.rs` includes this file and replays
//! `fuzz/corpus/<target>/` through it. Each function may reject input; it must not panic
//! except on a broken invariant (asserted here).

use http::{HeaderMap, HeaderValue, Method};
use pacer::endpoint::{Classifier, Template};
use pacer::path::normalize;
use std::time::Duration;

/// One fuzz target's body.
pub type Target = fn(&[u8]);

/// Target names with their bodies, as the corpus directories are named.
pub const TARGETS: &[(&str, Target)] = &[
    ("config", config),
    ("path_template", path_template),
    ("retry_after", retry_after),
    ("identity", identity),
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
