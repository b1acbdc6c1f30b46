//! Dependency floors: the versions in `Cargo.lock` carry the HTTP/2 and HTTP/1 framing
//! fixes pacer relies on (see the comment above `[dependencies]` in `Cargo.toml`).

use std::path::Path;

/// Floors with the fix each one brings.
const FLOORS: &[(&str, (u64, u64, u64), &str)] = &[
    (
        "h2",
        (0, 4, 4),
        "CONTINUATION-flood fix (bounded header block)",
    ),
    (
        "hyper",
        (1, 4, 0),
        "strict Content-Length + Transfer-Encoding handling",
    ),
    (
        "rustls",
        (0, 23, 5),
        "current security fixes of the 0.23 line",
    ),
];

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `major.minor.patch` of a version string; pre-release and build suffixes are ignored.
fn parse_version(v: &str) -> (u64, u64, u64) {
    let core = v.split(['-', '+']).next().unwrap_or(v);
    let mut parts = core.split('.').map(|p| {
        p.parse::<u64>()
            .unwrap_or_else(|e| panic!("version {v:?}: {e}"))
    });
    let mut next = || parts.next().unwrap_or(0);
    (next(), next(), next())
}

/// Every locked version of `name` (a crate can be locked at several versions).
fn locked_versions(lock: &toml::Value, name: &str) -> Vec<String> {
    lock.get("package")
        .and_then(toml::Value::as_array)
        .expect("Cargo.lock has [[package]] entries")
        .iter()
        .filter(|p| p.get("name").and_then(toml::Value::as_str) == Some(name))
        .filter_map(|p| p.get("version").and_then(toml::Value::as_str))
        .map(str::to_string)
        .collect()
}

#[test]
fn locked_versions_meet_security_floors() {
    let text = std::fs::read_to_string(manifest_dir().join("Cargo.lock"))
        .expect("Cargo.lock is committed next to Cargo.toml");
    let lock: toml::Value = toml::from_str(&text).expect("Cargo.lock is TOML");
    for &(name, floor, why) in FLOORS {
        let versions = locked_versions(&lock, name);
        assert!(!versions.is_empty(), "{name} is not in Cargo.lock");
        for v in versions {
            assert!(
                parse_version(&v) >= floor,
                "{name} {v} is locked, but >= {}.{}.{} is needed: {why}",
                floor.0,
                floor.1,
                floor.2
            );
        }
    }
}

#[test]
fn manifest_comment_states_the_same_floors() {
    let text = std::fs::read_to_string(manifest_dir().join("Cargo.toml")).expect("Cargo.toml");
    for &(name, (a, b, c), _) in FLOORS {
        let floor = format!("{name} >= {a}.{b}.{c}");
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with('#') && l.contains(&floor)),
            "Cargo.toml should state the floor \"{floor}\" in a comment"
        );
    }
}

#[test]
fn versions_compare_numerically() {
    assert!(parse_version("0.4.10") > parse_version("0.4.4"));
    assert!(parse_version("1.12.0") >= parse_version("1.4.0"));
    assert!(parse_version("0.23.5-alpha.1") >= (0, 23, 5));
    assert!(parse_version("0.23.4") < (0, 23, 5));
}
