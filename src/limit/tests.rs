use super::*;
use crate::config::Config;
use crate::shadow::{Subject, WouldBlock};
use proptest::prelude::*;

fn set(text: &str) -> (Config, LimitSet) {
    test_limits(text)
}

const LAYERS: &str = r#"
[queue]
critical_reserve = 0.0
bulk_share = 1.0
[[limit]]
name = "client"
scope = "client"
requests = 5
per = "1s"
guard = "0ms"
[[limit]]
name = "org"
scope = "global"
requests = 8
per = "2s"
guard = "0ms"
[[limit]]
name = "ivr"
match = "PUT /ivrs/{id}"
scope = "client"
requests = 2
per = "500ms"
guard = "0ms"
"#;

const MS: Nanos = 1_000_000;

#[test]
fn all_or_nothing_across_layers() {
    let (_, s) = set(LAYERS);
    let mut l = Ledger::new();
    let a: Arc<str> = Arc::from("a");
    let d = s.demand(0, &a, &Method::PUT, "/ivrs/1", Priority::Normal);
    assert_eq!(d.layers.len(), 3);
    assert!(l.try_take(&s, 0, &d, &|_| 0).is_ok());
    assert!(l.try_take(&s, 1, &d, &|_| 0).is_ok());
    let blocked = l.try_take(&s, 2, &d, &|_| 0).unwrap_err();
    assert_eq!(s.specs[blocked.layer().unwrap().limit].name.as_ref(), "ivr");
    // The refused request took nothing from the other layers.
    let g = s.demand(0, &a, &Method::GET, "/x", Priority::Normal);
    for t in 0..3 {
        assert!(l.try_take(&s, 3 + t, &g, &|_| 0).is_ok(), "{t}");
    }
    assert!(l.try_take(&s, 10, &g, &|_| 0).is_err());
}

#[test]
fn priority_ceilings_keep_a_reserve_for_critical() {
    let (_, s) = set(r#"
[queue]
critical_reserve = 0.2
bulk_share = 0.5
[[limit]]
name = "client"
scope = "client"
requests = 10
per = "1s"
"#);
    let mut l = Ledger::new();
    let a: Arc<str> = Arc::from("a");
    let bulk = s.demand(0, &a, &Method::GET, "/x", Priority::Bulk);
    let normal = s.demand(0, &a, &Method::GET, "/x", Priority::Normal);
    let critical = s.demand(0, &a, &Method::GET, "/x", Priority::Critical);
    let taken = (0..20)
        .filter(|&t| l.try_take(&s, t, &bulk, &|_| 0).is_ok())
        .count();
    assert_eq!(taken, 5);
    let taken = (0..20)
        .filter(|&t| l.try_take(&s, 20 + t, &normal, &|_| 0).is_ok())
        .count();
    assert_eq!(taken, 3);
    let taken = (0..20)
        .filter(|&t| l.try_take(&s, 40 + t, &critical, &|_| 0).is_ok())
        .count();
    assert_eq!(taken, 2);
}

#[test]
fn concurrency_is_held_until_release() {
    let (_, s) = set(r#"
[[limit]]
name = "jobs"
scope = "global"
concurrency = 2
[queue]
critical_reserve = 0.0
"#);
    let mut l = Ledger::new();
    let a: Arc<str> = Arc::from("a");
    let d = s.demand(0, &a, &Method::POST, "/jobs", Priority::Critical);
    let t1 = l.try_take(&s, 0, &d, &|_| 0).unwrap();
    let _t2 = l.try_take(&s, 0, &d, &|_| 0).unwrap();
    assert_eq!(l.try_take(&s, 0, &d, &|_| 0).unwrap_err().wait, None);
    l.release(&s, &t1);
    assert!(l.try_take(&s, 0, &d, &|_| 0).is_ok());
}

proptest! {
    /// Random arrivals over several layers, some refunded: in no window of any layer's
    /// length, at any offset, are more than its quota admitted under one key.
    #[test]
    fn no_window_holds_more_than_the_quota(
        steps in proptest::collection::vec((0u64..120, 0usize..3, 0usize..3, any::<bool>()), 1..600),
    ) {
        let (_, s) = set(LAYERS);
        let mut l = Ledger::new();
        let clients: Vec<Arc<str>> = ["a", "b", "c"].iter().map(|c| Arc::from(*c)).collect();
        let paths = [(Method::PUT, "/ivrs/1"), (Method::GET, "/x"), (Method::PUT, "/ivrs/2")];
        let mut now = 0;
        let mut sent: HashMap<LayerKey, Vec<Nanos>> = HashMap::new();
        for (gap, c, p, cancel) in steps {
            now += gap * MS / 4;
            let (m, path) = &paths[p];
            let d = s.demand(0, &clients[c], m, path, Priority::Normal);
            if let Ok(taken) = l.try_take(&s, now, &d, &|_| 0) {
                if cancel {
                    l.refund(&s, &taken);
                } else {
                    for layer in &taken.layers {
                        sent.entry(layer.clone()).or_default().push(now);
                    }
                }
            }
        }
        for (layer, times) in &sent {
            let spec = &s.specs[layer.limit];
            let n = spec.requests.unwrap();
            for (i, &start) in times.iter().enumerate() {
                let inside = times[i..].iter().take_while(|&&t| t < start + spec.window).count() as u64;
                prop_assert!(inside <= n, "{} {:?}: {inside} > {n}", spec.name, layer.part);
            }
        }
    }

    /// Refunded requests leave the ledger exactly as if they never came.
    #[test]
    fn refunds_leave_no_trace(times in proptest::collection::vec(0u64..1000, 1..50)) {
        let (_, s) = set(LAYERS);
        let mut l = Ledger::new();
        let a: Arc<str> = Arc::from("a");
        let d = s.demand(0, &a, &Method::PUT, "/ivrs/1", Priority::Normal);
        let mut now = 0;
        for t in times {
            now += t * MS;
            if let Ok(taken) = l.try_take(&s, now, &d, &|_| 0) {
                l.refund(&s, &taken);
            }
            prop_assert!(l.is_empty());
        }
    }
}

/// A learned `inin-ratelimit-allowed` share caps only the per-client layer without a
/// `match`; the adaptive cut caps every layer of the request.
#[test]
fn client_scale_caps_only_the_per_client_layer() {
    let (_, s) = set(LAYERS);
    let a: Arc<str> = Arc::from("a");
    let mut d = s.demand(0, &a, &Method::PUT, "/ivrs/1", Priority::Normal);
    let names: Vec<&str> = d
        .layers
        .iter()
        .map(|l| s.specs[l.limit].name.as_ref())
        .collect();
    assert_eq!(names, ["client", "org", "ivr"]);
    assert_eq!(d.client_layer, Some(0), "not the `match`ed client layer");
    d.client_scale = 0.4;
    assert_eq!(d.scale_of(0), 0.4);
    assert_eq!(d.scale_of(1), 1.0, "the global layer keeps its size");
    assert_eq!(d.scale_of(2), 1.0, "the endpoint layer keeps its size");
    d.rate_scale = 0.6;
    assert_eq!(d.scale_of(0), 0.4, "the lower of the two");
    assert_eq!(d.scale_of(1), 0.6);

    // In the ledger: 5 × 0.4 = 2 per second for the client, the others unchanged.
    let mut l = Ledger::new();
    let mut g = s.demand(0, &a, &Method::GET, "/x", Priority::Normal);
    g.client_scale = 0.4;
    assert!(l.try_take(&s, 0, &g, &|_| 0).is_ok());
    assert!(l.try_take(&s, 1, &g, &|_| 0).is_ok());
    let blocked = l.try_take(&s, 2, &g, &|_| 0).unwrap_err();
    assert_eq!(
        s.specs[blocked.layer().expect("a layer blocks").limit]
            .name
            .as_ref(),
        "client"
    );
    let head = l.tightest(&s, 2, &g).expect("headroom");
    assert_eq!((head.quota, head.remaining), (2, 0));
    let b: Arc<str> = Arc::from("b");
    let other = s.demand(0, &b, &Method::GET, "/x", Priority::Normal);
    for t in 0..5 {
        assert!(l.try_take(&s, 3 + t, &other, &|_| 0).is_ok(), "{t}");
    }
}

/// An upstream's count is untrusted: 2^64-1 fills the key to its ceiling in one step (the
/// old loop recorded one send per unit under the ledger lock), and other keys are untouched.
#[test]
fn a_huge_upstream_count_fills_the_key_to_its_ceiling_at_once() {
    let (_, s) = set(LAYERS);
    let mut l = Ledger::new();
    let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
    let d = s.demand(0, &a, &Method::GET, "/x", Priority::Critical);
    let client = d.layers[0].clone();
    assert_eq!(s.specs[client.limit].name.as_ref(), "client");
    assert!(l.try_take(&s, 0, &d, &|_| 0).is_ok());
    l.pad(&s, 100 * MS, &client, u64::MAX);
    let used = |l: &mut Ledger, at: Nanos| {
        l.usage(&s, at)
            .into_iter()
            .find(|(k, _, _)| *k == client)
            .map(|(_, used, _)| used)
    };
    assert_eq!(used(&mut l, 100 * MS), Some(5), "clamped to the ceiling");
    // A lower count later changes nothing; the key holds no more than it can.
    l.pad(&s, 150 * MS, &client, 3);
    l.pad(&s, 150 * MS, &client, u64::MAX);
    assert_eq!(used(&mut l, 150 * MS), Some(5));
    let blocked = l.try_take(&s, 200 * MS, &d, &|_| 0).unwrap_err();
    assert_eq!(blocked.layer(), Some(&client));
    // Full until the first real send leaves the window; the stand-ins stay a window.
    assert_eq!(blocked.wait, Some(800 * MS));
    assert!(l.try_take(&s, 1_000 * MS, &d, &|_| 0).is_ok());
    assert!(l.try_take(&s, 1_000 * MS, &d, &|_| 0).is_err());
    assert_eq!(
        used(&mut l, 1_100 * MS),
        Some(1),
        "the stand-ins left with their window"
    );
    // Another client's key was never touched.
    let other = s.demand(0, &b, &Method::GET, "/x", Priority::Critical);
    assert!(l.try_take(&s, 1_100 * MS, &other, &|_| 0).is_ok());
}

/// A count below what is already counted adds nothing; a count in between adds the rest.
#[test]
fn pad_adds_only_what_is_missing() {
    let (_, s) = set(LAYERS);
    let mut l = Ledger::new();
    let a: Arc<str> = Arc::from("a");
    let d = s.demand(0, &a, &Method::GET, "/x", Priority::Critical);
    let client = d.layers[0].clone();
    for t in 0..2 {
        assert!(l.try_take(&s, t, &d, &|_| 0).is_ok());
    }
    l.pad(&s, 10, &client, 1);
    let used = |l: &mut Ledger| {
        l.usage(&s, 10)
            .into_iter()
            .find(|(k, _, _)| *k == client)
            .map(|(_, used, _)| used)
    };
    assert_eq!(used(&mut l), Some(2));
    l.pad(&s, 10, &client, 4);
    assert_eq!(used(&mut l), Some(4));
}

#[test]
fn normal_and_bulk_fill_a_key_without_reserve_up_to_their_own_share() {
    let (_, s) = set(r#"
[queue]
critical_reserve = 0.2
bulk_share = 0.9
[[limit]]
name = "client"
scope = "client"
requests = 10
per = "1s"
concurrency = 10
"#);
    let spec = &s.specs[0];
    // critical, normal, bulk with the reserve kept, then without.
    let rate = |reserved| [0, 1, 2].map(|c| spec.rate_ceiling(c, reserved).unwrap());
    assert_eq!(rate(true), [10, 8, 8]);
    assert_eq!(rate(false), [10, 10, 9]);
    let cap = |reserved| [0, 1, 2].map(|c| spec.concurrency_cap(c, reserved).unwrap());
    assert_eq!(cap(true), [10, 8, 8]);
    assert_eq!(cap(false), [10, 10, 9]);
    // Local shares divide both.
    let half = s.scaled(2);
    assert_eq!(half.specs[0].rate_ceiling(1, false), Some(5));
    assert_eq!(half.specs[0].rate_ceiling(1, true), Some(4));

    let a: Arc<str> = Arc::from("a");
    let b: Arc<str> = Arc::from("b");
    let mut open = s.demand(0, &a, &Method::GET, "/x", Priority::Normal);
    open.reserved = vec![false];
    let kept = s.demand(0, &b, &Method::GET, "/x", Priority::Normal);
    assert_eq!(
        kept.reserved,
        vec![true],
        "a demand keeps the reserve by default"
    );
    let mut l = Ledger::new();
    let taken = |l: &mut Ledger, d: &Demand| {
        (0..20)
            .filter(|&t| l.try_take(&s, t, d, &|_| 0).is_ok())
            .count()
    };
    assert_eq!(taken(&mut l, &open), 10);
    assert_eq!(taken(&mut l, &kept), 8);
    // The headroom headers name the class share in force on the key.
    let h = l.tightest(&s, 20, &open).unwrap();
    assert_eq!((h.quota, h.remaining), (10, 0));
    let h = l.tightest(&s, 20, &kept).unwrap();
    assert_eq!((h.quota, h.remaining), (8, 0));
}

const SHADOWED: &str = r#"
[queue]
critical_reserve = 0.0
bulk_share = 1.0
[[limit]]
name = "client"
scope = "client"
requests = 3
per = "1s"
guard = "0ms"
shadow = true
[[limit]]
name = "org"
scope = "global"
requests = 5
per = "1s"
guard = "0ms"
[[limit]]
name = "jobs"
scope = "global"
concurrency = 1
shadow = true
"#;

/// Takes with the shadow verdicts first, as the backends do under one lock.
fn take_shadowed(
    l: &mut Ledger,
    s: &LimitSet,
    now: Nanos,
    d: &Demand,
) -> (Vec<WouldBlock>, Result<Taken, Blocked>) {
    let shadow = l.shadow_blocks(s, now, d);
    (shadow, l.try_take(s, now, d, &|_| 0))
}

#[test]
fn a_shadow_layer_decides_and_counts_but_never_blocks() {
    let (_, s) = set(SHADOWED);
    let mut l = Ledger::new();
    let a: Arc<str> = Arc::from("a");
    let d = s.demand(0, &a, &Method::GET, "/x", Priority::Normal);
    let client = d.layers[0].clone();
    let mut held = Vec::new();
    for t in 0..3 {
        let (shadow, taken) = take_shadowed(&mut l, &s, t * 100 * MS, &d);
        // From the second, the shadow concurrency cap of one is full: admitted anyway.
        held.push(taken.expect("admitted"));
        assert!(
            shadow
                .iter()
                .all(|b| b.subject == Subject::Limit(2) && b.wait.is_none()),
            "{t}: {shadow:?}"
        );
        assert_eq!(shadow.len(), usize::from(t > 0), "{t}: {shadow:?}");
    }
    for taken in &held {
        l.release(&s, taken);
    }
    // Over the shadow quota of 3: admitted, counted, and the wait it would have had told.
    let (shadow, taken) = take_shadowed(&mut l, &s, 300 * MS, &d);
    assert!(taken.is_ok());
    assert_eq!(
        shadow,
        vec![WouldBlock {
            subject: Subject::Limit(0),
            wait: Some(700 * MS),
        }]
    );
    let used = |l: &mut Ledger, at| {
        l.usage(&s, at)
            .into_iter()
            .find(|(k, _, _)| *k == client)
            .map(|(_, used, _)| used)
    };
    assert_eq!(
        used(&mut l, 300 * MS),
        Some(4),
        "the let-through send is counted"
    );
    // The next decision sees the real count: with 4 sent, room comes when the second
    // (at 100 ms) leaves, not the first.
    let (shadow, taken) = take_shadowed(&mut l, &s, 400 * MS, &d);
    assert!(taken.is_ok());
    assert_eq!(shadow[0].wait, Some(700 * MS));
    // The enforcing layer still refuses past its quota of 5, and names itself.
    let (_, refused) = take_shadowed(&mut l, &s, 500 * MS, &d);
    let b = refused.expect_err("the org limit enforces");
    assert_eq!(b.layer().map(|k| k.limit), Some(1));
    // No RateLimit headers from a shadow layer: the tightest is the enforcing one.
    assert_eq!(l.tightest(&s, 500 * MS, &d).map(|h| h.limit), Some(1));
}

#[test]
fn server_shadow_puts_every_limit_and_pause_in_shadow() {
    let (_, s) = set(LAYERS);
    assert!(!s.shadow_pauses && s.specs.iter().all(|sp| !sp.shadow));
    let s = s.shadowed(true);
    assert!(s.shadow_pauses && s.specs.iter().all(|sp| sp.shadow));
    let mut l = Ledger::new();
    let a: Arc<str> = Arc::from("a");
    let d = s.demand(0, &a, &Method::PUT, "/ivrs/1", Priority::Normal);
    let blocked: Vec<usize> = (0..10)
        .map(|t| {
            let (shadow, taken) = take_shadowed(&mut l, &s, t, &d);
            assert!(taken.is_ok(), "{t}");
            shadow.len()
        })
        .collect();
    // ivr (2 per window) would block from the third, client (5) from the sixth, org (8)
    // from the ninth.
    assert_eq!(blocked, [0, 0, 1, 1, 1, 2, 2, 2, 3, 3]);
}
