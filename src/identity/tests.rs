use super::*;
use http::HeaderValue;
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting(AtomicUsize);
impl TokenResolver for Counting {
    fn resolve(
        &self,
        _: usize,
        token: String,
    ) -> std::pin::Pin<Box<dyn Future<Output = Option<String>> + Send>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            token.strip_prefix("good-").map(|c| c.to_string())
        })
    }
}

fn headers(auth: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
    h
}

#[tokio::test(start_paused = true)]
async fn learned_and_looked_up_tokens() {
    let resolver = Arc::new(Counting(AtomicUsize::new(0)));
    let id = Arc::new(Identity::new(
        IdentityConfig::default(),
        &[],
        Some(resolver.clone()),
    ));
    id.learn("t1", "client-a", Duration::from_secs(60));
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    let c = id.identify(&[], &headers("Bearer t1"), ip, 0).await;
    assert_eq!(&*c.key, "client-a");
    // Ten concurrent requests with one unseen token make one look-up.
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            id.identify(&[], &headers("Bearer good-b"), ip, 0).await
        }));
    }
    for t in tasks {
        assert_eq!(&*t.await.unwrap().key, "b");
    }
    assert_eq!(resolver.0.load(Ordering::SeqCst), 1);
    let c = id.identify(&[], &headers("Bearer bad"), ip, 0).await;
    assert!(!c.known);
    assert!(c.key.starts_with("token:") && !c.key.contains("bad"));
    assert_eq!(&*c.label, "unknown");
    // A token the upstream could not resolve is not asked about again for a while.
    let asked = resolver.0.load(Ordering::SeqCst);
    id.identify(&[], &headers("Bearer bad"), ip, 0).await;
    assert_eq!(resolver.0.load(Ordering::SeqCst), asked);
    let c = id
        .identify(&[], &headers("Basic Y2xpZW50LXg6c2VjcmV0"), ip, 0)
        .await;
    assert_eq!(&*c.key, "client-x");
}

#[tokio::test(start_paused = true)]
async fn lookups_are_rate_limited() {
    let resolver = Arc::new(Counting(AtomicUsize::new(0)));
    let cfg = IdentityConfig {
        tokens_me_per_second: 5,
        ..IdentityConfig::default()
    };
    let id = Identity::new(cfg, &[], Some(resolver.clone()));
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    for i in 0..100 {
        id.identify(&[], &headers(&format!("Bearer flood-{i}")), ip, 0)
            .await;
    }
    assert!(resolver.0.load(Ordering::SeqCst) <= 10);
}

#[test]
fn token_map_is_bounded() {
    let cfg = IdentityConfig {
        max_keys: 1000,
        ..IdentityConfig::default()
    };
    let id = Identity::new(cfg, &[], None);
    for i in 0..100_000 {
        id.learn(&format!("tok{i}"), "c", Duration::from_secs(60));
    }
    assert!(id.remembered_tokens() <= 1000);
}

/// Answers `slow-*` tokens after 10 s and never answers any other.
struct Late;
impl TokenResolver for Late {
    fn resolve(
        &self,
        _: usize,
        token: String,
    ) -> std::pin::Pin<Box<dyn Future<Output = Option<String>> + Send>> {
        Box::pin(async move {
            if !token.starts_with("slow-") {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(Duration::from_secs(10)).await;
            Some("late-client".to_string())
        })
    }
}

#[tokio::test(start_paused = true)]
async fn lookups_that_outlive_their_callers_remove_their_own_entry() {
    let cfg = IdentityConfig {
        max_keys: 1000,
        tokens_me_per_second: 1_000_000,
        ..IdentityConfig::default()
    };
    let id = Identity::new(cfg, &[], Some(Arc::new(Late)));
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    // The caller gives up after LOOKUP_TIMEOUT; the look-up goes on, then goes away.
    let c = id.identify(&[], &headers("Bearer slow-one"), ip, 0).await;
    assert!(!c.known);
    assert_eq!(id.lookups_in_flight(), 1);
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(id.lookups_in_flight(), 0);
    // A caller that leaves mid-way leaves nothing behind either.
    let left = tokio::time::timeout(
        Duration::from_millis(10),
        id.identify(&[], &headers("Bearer slow-two"), ip, 0),
    )
    .await;
    assert!(left.is_err());
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(id.lookups_in_flight(), 0);
    // 10^5 distinct tokens, 1000 callers at a time, half of them never answered.
    for batch in 0..100 {
        let callers = (0..1000).map(|i| {
            let kind = if i % 2 == 0 { "slow" } else { "never" };
            let auth = format!("Bearer {kind}-{batch}-{i}");
            let id = &id;
            async move { id.identify(&[], &headers(&auth), ip, 0).await }
        });
        for c in futures_util::future::join_all(callers).await {
            assert!(!c.known);
        }
        let n = id.lookups_in_flight();
        assert!(n <= 1000, "{n} look-ups in flight after batch {batch}");
    }
    tokio::time::sleep(LOOKUP_LIFETIME + Duration::from_secs(1)).await;
    assert_eq!(id.lookups_in_flight(), 0);
}

#[tokio::test]
async fn network_identities_take_no_label_from_oauth_clients() {
    let id = Identity::new(IdentityConfig::default(), &[], None);
    let ip: IpAddr = "10.0.0.9".parse().unwrap();
    let sources = vec![IdentitySource::Header(http::HeaderName::from_static(
        "x-caller",
    ))];
    for i in 0..100_000 {
        let mut h = HeaderMap::new();
        h.insert("x-caller", HeaderValue::from_str(&format!("v{i}")).unwrap());
        let c = id.identify(&sources, &h, ip, 0).await;
        assert_eq!(&*c.label, "other");
    }
    // OAuth clients are still labelled by their id, and rendered keys add no label.
    assert_eq!(&*id.client("oauth-client").label, "oauth-client");
    assert_eq!(&*id.label_of("oauth-client"), "oauth-client");
    assert_eq!(&*id.label_of("v7"), "other");
    assert_eq!(&*id.label_of("token:0123"), "unknown");
    assert!(id.labels.lock().unwrap().len() <= 1);
}

#[tokio::test]
async fn configured_sources_and_priority() {
    let clients: Vec<ClientConfig> =
        vec![toml::from_str("id = \"ivr\"\nname = \"IVR\"\npriority = \"critical\"").unwrap()];
    let id = Identity::new(IdentityConfig::default(), &clients, None);
    let ip: IpAddr = "10.0.0.9".parse().unwrap();
    let sources = vec![
        IdentitySource::Header(http::HeaderName::from_static("x-caller")),
        IdentitySource::ClientIp,
    ];
    let mut h = HeaderMap::new();
    h.insert("x-caller", HeaderValue::from_static("ivr"));
    let c = id.identify(&sources, &h, ip, 0).await;
    assert_eq!((&*c.key, &*c.label), ("ivr", "IVR"));
    assert_eq!(Identity::priority(None, &c, &h), Priority::Critical);
    h.insert("x-pacer-priority", HeaderValue::from_static("bulk"));
    assert_eq!(Identity::priority(None, &c, &h), Priority::Bulk);
    let other = id.identify(&sources, &HeaderMap::new(), ip, 0).await;
    assert_eq!(&*other.key, "10.0.0.9");
    assert_eq!(&*other.label, "other");
    h.insert("x-pacer-priority", HeaderValue::from_static("critical"));
    assert_eq!(
        Identity::priority(Some(Priority::Bulk), &c, &h),
        Priority::Bulk
    );
}
