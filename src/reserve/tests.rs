use super::*;

const MS: Nanos = 1_000_000;
const HOUR: Duration = Duration::from_secs(3600);

fn client(limit: usize, c: &str) -> LayerKey {
    LayerKey {
        limit,
        part: KeyPart::Client(Arc::from(c)),
    }
}

fn client_endpoint(limit: usize, c: &str, e: &str) -> LayerKey {
    LayerKey {
        limit,
        part: KeyPart::ClientEndpoint(Arc::from(c), Arc::from(e)),
    }
}

fn global(limit: usize) -> LayerKey {
    LayerKey {
        limit,
        part: KeyPart::Global,
    }
}

fn endpoint(limit: usize, e: &str) -> LayerKey {
    LayerKey {
        limit,
        part: KeyPart::Endpoint(Arc::from(e)),
    }
}

fn sources(routes: bool, clients: &[&str]) -> CriticalSources {
    CriticalSources::Configured {
        routes,
        clients: clients.iter().map(|c| Arc::from(*c)).collect(),
    }
}

fn reserve(routes: bool, clients: &[&str]) -> Reserve {
    let r = Reserve::new(HOUR, 1000, 4);
    r.set_sources(sources(routes, clients));
    r
}

#[test]
fn every_key_keeps_it_until_told_where_critical_traffic_goes() {
    let r = Reserve::new(HOUR, 1000, 4);
    let keys = [client(0, "a"), global(1), endpoint(2, "GET /x")];
    assert_eq!(r.decide(&keys, 0), vec![true; 3]);
}

#[test]
fn no_critical_source_keeps_no_reserve_anywhere() {
    let r = reserve(false, &[]);
    let keys = [
        client(0, "a"),
        client_endpoint(3, "a", "GET /x"),
        global(1),
        endpoint(2, "GET /x"),
    ];
    assert_eq!(r.decide(&keys, 0), vec![false; 4]);
    // Without a critical route nothing is learned, whatever priority the queue saw.
    assert!(!r.learns());
    assert!(r.learn(&keys, 0).is_empty());
    assert_eq!(r.decide(&keys, 1), vec![false; 4]);
}

#[test]
fn a_critical_client_keeps_its_own_keys_and_every_shared_key() {
    let r = reserve(false, &["ivr"]);
    let keys = [
        client(0, "ivr"),
        client_endpoint(3, "ivr", "GET /x"),
        client(0, "crm"),
        client_endpoint(3, "crm", "GET /x"),
        global(1),
        endpoint(2, "GET /y"),
    ];
    assert_eq!(
        r.decide(&keys, 0),
        vec![true, true, false, false, true, true]
    );
}

#[test]
fn a_critical_route_learns_the_clients_and_shared_keys_its_requests_reach() {
    let r = reserve(true, &[]);
    assert!(r.learns());
    let all = [
        client(0, "a"),
        client_endpoint(3, "a", "GET /x"),
        client(0, "b"),
        global(1),
        endpoint(2, "GET /x"),
        endpoint(2, "GET /y"),
    ];
    // Nothing critical seen yet: no reserve anywhere.
    assert_eq!(r.decide(&all, 0), vec![false; 6]);
    // Client a sends a critical request counted against its key, the global key and
    // one endpoint key.
    let shared = r.learn(&[client(0, "a"), global(1), endpoint(2, "GET /x")], 10 * MS);
    assert_eq!(shared.len(), 3, "{shared:?}");
    assert_eq!(
        r.decide(&all, 11 * MS),
        vec![true, true, false, true, true, false],
        "a's keys (all scopes), the global key and the endpoint key it reached"
    );
}

#[test]
fn a_learned_key_is_forgotten_after_reserve_memory_without_critical_traffic() {
    let memory = Duration::from_secs(60);
    let m = memory.as_nanos() as Nanos;
    let r = Reserve::new(memory, 1000, 4);
    r.set_sources(sources(true, &[]));
    let keys = [client(0, "a"), global(1)];
    r.learn(&keys, 0);
    assert_eq!(r.decide(&keys, m - 1), vec![true, true]);
    assert_eq!(r.decide(&keys, m), vec![false, false]);
    // Seen again before the end: the memory starts over from then.
    r.learn(&keys, m + 5);
    r.learn(&keys[..1], 2 * m);
    assert_eq!(r.decide(&keys, 2 * m + 4), vec![true, true]);
    assert_eq!(r.decide(&keys, 2 * m + 5), vec![true, false]);
    assert_eq!(r.decide(&keys, 3 * m), vec![false, false]);
    assert_eq!(r.prune(3 * m), 0);
}

#[test]
fn critical_clients_and_their_shared_keys_need_no_learning() {
    let r = reserve(true, &["ivr"]);
    // Fixed by configuration: nothing to learn or share.
    assert!(r.learn(&[client(0, "ivr"), global(1)], 0).is_empty());
    // Another client on the critical route is learned.
    assert_eq!(r.learn(&[client(0, "crm"), global(1)], 0), vec!["c:crm"]);
    assert_eq!(r.learned(1, 10).0, 1);
}

#[test]
fn a_member_is_shared_again_only_after_the_refresh_period() {
    let memory = Duration::from_secs(80);
    let r = Reserve::new(memory, 1000, 4);
    r.set_sources(sources(true, &[]));
    let refresh = (memory / 8).as_nanos() as Nanos;
    let keys = [client(0, "a")];
    assert_eq!(r.learn(&keys, 0), vec!["c:a"]);
    assert!(r.learn(&keys, refresh - 1).is_empty());
    assert_eq!(r.learn(&keys, refresh), vec!["c:a"]);
}

#[test]
fn the_learned_set_stays_bounded_for_any_number_of_critical_callers() {
    let r = Reserve::new(HOUR, 1000, 4);
    r.set_sources(sources(true, &[]));
    for i in 0..100_000u64 {
        r.learn(&[client(0, &format!("caller-{i}"))], i);
        r.merge([(format!("c:peer-{i}"), i)], i);
    }
    let (count, names) = r.learned(100_000, 50);
    assert!(count <= 1000, "{count}");
    assert!(names.len() <= 50);
    // The most recent ones are still there.
    assert_eq!(
        r.decide(
            &[client(0, "caller-99999"), client(0, "peer-99999")],
            100_000
        ),
        vec![true, true]
    );
}

#[test]
fn members_from_other_replicas_are_taken_in_and_garbage_is_ignored() {
    let memory = Duration::from_secs(60);
    let m = memory.as_nanos() as Nanos;
    let r = Reserve::new(memory, 1000, 4);
    r.set_sources(sources(true, &[]));
    let now = 10 * m;
    r.merge(
        [
            ("c:from-peer".to_string(), now - 5),
            ("g:1".to_string(), now),
            ("e:2:GET /x:y".to_string(), now),
            // Seen too long ago, a limit this set does not have, and junk.
            ("c:stale".to_string(), now - m),
            ("g:9".to_string(), now),
            ("g:x".to_string(), now),
            ("e:2".to_string(), now),
            ("c:".to_string(), now),
            ("zz".to_string(), now),
            (format!("c:{}", "x".repeat(2000)), now),
        ],
        now,
    );
    assert_eq!(r.learned(now, 100).0, 3, "{:?}", r.learned(now, 100));
    let keys = [
        client(0, "from-peer"),
        global(1),
        endpoint(2, "GET /x:y"),
        client(0, "stale"),
        global(3),
    ];
    assert_eq!(r.decide(&keys, now), vec![true, true, true, false, false]);
    // Already in the store: not shared back before the refresh.
    assert!(r.learn(&keys[..1], now).is_empty());
}

#[test]
fn store_names_round_trip() {
    for key in [
        client(0, "a:b"),
        global(3),
        endpoint(2, "GET /api/v2/x:{id}"),
    ] {
        let m = Member::of(&key);
        assert_eq!(Member::parse(&m.name(), 4), Some(m));
    }
    // client+endpoint keys are learned as the client.
    assert_eq!(
        Member::of(&client_endpoint(1, "a", "GET /x")),
        Member::Client(Arc::from("a"))
    );
}
