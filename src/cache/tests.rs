use super::lead::forbids_storing;
use super::*;

#[test]
fn no_store_and_private_forbid_storing_in_any_spelling() {
    let forbids = |v: &'static str| {
        let mut h = HeaderMap::new();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static(v));
        forbids_storing(&h)
    };
    assert!(forbids("no-store"));
    assert!(forbids("max-age=60, No-Store"));
    assert!(forbids("private"));
    assert!(forbids("private=\"set-cookie\""));
    assert!(!forbids("max-age=60, public"));
    assert!(!forbids("no-cache"));
}

#[tokio::test(start_paused = true)]
async fn a_copy_is_handed_out_only_for_the_same_vary_values() {
    let mut headers = HeaderMap::new();
    headers.insert("x-tenant", HeaderValue::from_static("a"));
    let name = HeaderName::from_static("x-tenant");
    let now = Instant::now();
    let entry = Entry {
        rule: 0,
        headers: HeaderMap::new(),
        body: bytes::Bytes::from_static(b"{}"),
        vary: vec![(name.clone(), value_hash(&headers, &name))],
        stored: now,
        expires: now + Duration::from_secs(60),
    };
    assert!(vary_matches(&entry, &headers));
    let mut other = HeaderMap::new();
    other.insert("x-tenant", HeaderValue::from_static("b"));
    assert!(!vary_matches(&entry, &other));
    assert!(!vary_matches(&entry, &HeaderMap::new()));
    tokio::time::advance(Duration::from_secs(7)).await;
    let resp = answer(&entry, Lookup::Hit);
    assert_eq!(resp.headers()[header::AGE], "7");
    assert_eq!(resp.headers()[X_PACER_CACHE], "hit");
}
