use super::*;
use crate::limit::Taken;
use http::Method;

use super::test_admission as admission;

fn demand(a: &Admission, caller: &str, p: Priority) -> Demand {
    a.demand(0, &Arc::from(caller), &Method::GET, "/x", p)
}

#[tokio::test(start_paused = true)]
async fn waits_for_the_window_then_sheds_what_cannot_wait() {
    let a = admission(TEN_PER_SECOND);
    for _ in 0..10 {
        a.admit(
            demand(&a, "c", Priority::Normal),
            None,
            Duration::from_secs(5),
        )
        .await
        .unwrap()
        .commit();
    }
    let start = Instant::now();
    let r = a
        .admit(
            demand(&a, "c", Priority::Normal),
            None,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    assert_eq!(r.waited(), Duration::from_secs(1));
    r.commit();
    // Window full again and a wait of 1s allowed only 500ms: shed at once with Retry-After.
    for _ in 0..9 {
        a.admit(
            demand(&a, "c", Priority::Normal),
            None,
            Duration::from_secs(5),
        )
        .await
        .unwrap()
        .commit();
    }
    let before = Instant::now();
    let refused = a
        .admit(
            demand(&a, "c", Priority::Normal),
            None,
            Duration::from_millis(500),
        )
        .await
        .err()
        .unwrap();
    assert_eq!(before.elapsed(), Duration::ZERO);
    assert_eq!(refused.reason, ShedReason::WaitTooLong);
    assert!(refused.retry_after > Duration::from_millis(500));
    let (policy, state) = refused.policy.unwrap();
    assert_eq!(policy, "\"client\";q=10;w=1");
    assert!(state.starts_with("\"client\";r=0;t="), "{state}");
}

#[tokio::test(start_paused = true)]
async fn cancelled_waiters_free_everything() {
    let a = admission(TEN_PER_SECOND);
    for _ in 0..10 {
        a.admit(
            demand(&a, "c", Priority::Normal),
            None,
            Duration::from_secs(5),
        )
        .await
        .unwrap()
        .commit();
    }
    let mut waiting = Vec::new();
    for _ in 0..1000 {
        let a2 = a.clone();
        let d = demand(&a, "c", Priority::Normal);
        waiting.push(tokio::spawn(async move {
            a2.admit(d, None, Duration::from_secs(300))
                .await
                .map(|_| ())
        }));
    }
    for _ in 0..100 {
        if a.depth()[1] == 1000 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(a.depth()[1], 1000);
    for w in &waiting {
        w.abort();
    }
    for w in waiting {
        let _ = w.await;
    }
    assert_eq!(a.depth(), [0, 0, 0]);
    // The next window is fully usable by a different caller's neighbour on the same key.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..10 {
        let r = a
            .admit(demand(&a, "c", Priority::Normal), None, Duration::ZERO)
            .await;
        assert!(r.is_ok());
        r.unwrap().commit();
    }
}

#[tokio::test(start_paused = true)]
async fn uncommitted_reservations_are_refunded() {
    let a = admission(TEN_PER_SECOND);
    for _ in 0..100 {
        let r = a
            .admit(demand(&a, "c", Priority::Normal), None, Duration::ZERO)
            .await
            .unwrap();
        drop(r);
    }
    assert_eq!(a.keys(), 0);
}

#[tokio::test(start_paused = true)]
async fn critical_waiters_go_first() {
    let a = admission(TEN_PER_SECOND);
    for _ in 0..10 {
        a.admit(
            demand(&a, "c", Priority::Normal),
            None,
            Duration::from_secs(5),
        )
        .await
        .unwrap()
        .commit();
    }
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (i, p) in [
        Priority::Bulk,
        Priority::Normal,
        Priority::Critical,
        Priority::Bulk,
    ]
    .into_iter()
    .enumerate()
    {
        let a2 = a.clone();
        let d = demand(&a, "c", p);
        let order = order.clone();
        tasks.push(tokio::spawn(async move {
            let r = a2.admit(d, None, Duration::from_secs(5)).await.unwrap();
            order.lock().unwrap().push(i);
            r.commit();
        }));
        tokio::task::yield_now().await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![2, 1, 0, 3]);
}

#[tokio::test(start_paused = true)]
async fn upstream_pause_holds_then_resumes() {
    let a = admission(TEN_PER_SECOND);
    let key: PauseKey = (0, Arc::from("c"));
    a.pause(key.clone(), Duration::from_secs(3));
    let refused = a
        .admit(
            demand(&a, "c", Priority::Normal),
            Some(key.clone()),
            Duration::from_secs(1),
        )
        .await
        .err()
        .unwrap();
    assert_eq!(refused.reason, ShedReason::UpstreamPaused);
    assert_eq!(refused.retry_after, Duration::from_secs(3));
    let start = Instant::now();
    a.admit(
        demand(&a, "c", Priority::Normal),
        Some(key),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_millis(3400),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn distinct_callers_beyond_max_keys_share_the_overflow_key() {
    let text = format!("{TEN_PER_SECOND}\n[identity]\nmax_keys = 100\n");
    let a = admission(&text);
    for i in 0..10_000 {
        let d = demand(&a, &format!("token:{i}"), Priority::Normal);
        if let Ok(r) = a.admit(d, None, Duration::ZERO).await {
            r.commit();
        }
    }
    assert!(a.keys() <= 101, "{}", a.keys());
}

#[tokio::test(start_paused = true)]
async fn upstream_pauses_of_distinct_callers_stay_bounded() {
    let a = admission("[identity]\nmax_keys = 1000\n");
    for i in 0..100_000u64 {
        // Later pauses are longer, so the ones that end soonest are the oldest.
        a.pause(
            (0, Arc::from(format!("caller-{i}"))),
            Duration::from_secs(60) + Duration::from_millis(i),
        );
        let paused = a.shared.lock().pauses.len();
        assert!(paused <= 1000, "{paused} pauses after {i} callers");
    }
    // The newest pause is in force; the one ending soonest made room for it.
    let newest = (0, Arc::from("caller-99999"));
    let d = a.demand(0, &newest.1, &Method::GET, "/x", Priority::Normal);
    let refused = a
        .admit(d, Some(newest), Duration::ZERO)
        .await
        .err()
        .unwrap();
    assert_eq!(refused.reason, ShedReason::UpstreamPaused);
    assert!(a.pauses().iter().all(|((_, c), _)| &**c != "caller-0"));
}

#[tokio::test(start_paused = true)]
async fn an_upstream_pause_with_no_limit_at_all_names_no_limit() {
    // No `[[limit]]`: the demand has no layers, and the pause is still the answer.
    let a = admission("");
    let caller: Arc<str> = Arc::from("c");
    let key = (0, caller.clone());
    a.pause(key.clone(), Duration::from_secs(30));
    let d = a.demand(0, &caller, &Method::GET, "/x", Priority::Normal);
    assert!(d.layers.is_empty());
    let refused = a
        .admit(d, Some(key.clone()), Duration::from_secs(5))
        .await
        .err()
        .unwrap();
    assert_eq!(refused.reason, ShedReason::UpstreamPaused);
    assert_eq!(refused.retry_after, Duration::from_secs(30));
    assert_eq!(refused.policy, None);
    // Within max_wait it waits the pause out, then goes.
    let d = a.demand(0, &caller, &Method::GET, "/x", Priority::Normal);
    let start = Instant::now();
    a.admit(d, Some(key), Duration::from_secs(60))
        .await
        .unwrap()
        .commit();
    assert!(
        start.elapsed() >= Duration::from_secs(29),
        "{:?}",
        start.elapsed()
    );
}

/// A shared store whose every answer is the upstream's pause (as Redis' script gives it).
struct PausedStore(std::sync::Mutex<Vec<Option<String>>>);

impl Backend for PausedStore {
    fn take(
        self: Arc<Self>,
        _demand: Arc<Demand>,
        _ahead: Vec<u64>,
        pause: Option<String>,
    ) -> futures_util::future::BoxFuture<'static, Result<Grant, Blocked>> {
        self.0.lock().unwrap().push(pause);
        Box::pin(std::future::ready(Err(Blocked {
            kind: BlockKind::Paused,
            wait: Some(20_000_000_000),
        })))
    }
    fn refund(&self, _: &Taken) {}
    fn release(&self, _: &Taken) {}
    fn record_sent(&self, _: &Demand) {}
    fn is_remote(&self) -> bool {
        true
    }
    fn usage(&self) -> Vec<(LayerKey, u64, u64)> {
        Vec::new()
    }
    fn key_count(&self) -> usize {
        0
    }
    fn has_key(&self, _: &LayerKey) -> bool {
        false
    }
    fn sweep(&self) {}
    fn status(&self) -> BackendStatus {
        BackendStatus {
            kind: "paused",
            up: true,
            replicas: 2,
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_shared_pause_is_shed_as_a_pause_without_an_unrelated_policy() {
    // Limits exist, but none is what refuses: another replica's upstream 429 is.
    let (c, set) = crate::limit::test_limits(TEN_PER_SECOND);
    let set = Arc::new(set);
    let store = Arc::new(PausedStore(Default::default()));
    let a = Admission::with_backend(
        set,
        store.clone(),
        Clock::default(),
        c.queue.clone(),
        c.identity.max_keys,
    );
    let caller: Arc<str> = Arc::from("c");
    let refused = a
        .admit(
            demand(&a, "c", Priority::Normal),
            Some((3, caller)),
            Duration::from_secs(5),
        )
        .await
        .err()
        .unwrap();
    assert_eq!(refused.reason, ShedReason::UpstreamPaused);
    assert_eq!(refused.retry_after, Duration::from_secs(20));
    assert_eq!(refused.policy, None);
    // The store was asked under the name the pause is shared by.
    assert_eq!(*store.0.lock().unwrap(), vec![Some("3:c".to_string())]);
    // Waiting for a pause within max_wait and timing out still says why.
    let refused = a
        .admit(
            demand(&a, "c", Priority::Normal),
            Some((3, Arc::from("c"))),
            Duration::from_secs(25),
        )
        .await
        .err()
        .unwrap();
    assert_eq!(refused.reason, ShedReason::UpstreamPaused);
    assert_eq!(refused.policy, None);
}

#[tokio::test(start_paused = true)]
async fn sends_recorded_for_distinct_clients_share_the_overflow_key_too() {
    // `tokens/me` look-ups are counted for whatever client the upstream names.
    let text = format!("{TEN_PER_SECOND}\n[identity]\nmax_keys = 100\n");
    let a = admission(&text);
    for i in 0..100_000 {
        a.record_sent(0, &Arc::from(format!("client-{i}")), &Method::GET, "/x");
    }
    assert!(a.keys() <= 101, "{}", a.keys());
}

/// A request that waits through a cut is admitted under the cut, not under the scale it
/// arrived with: after 10 sends in the first second, a cut to half lets only 5 of the
/// waiting requests into the next window.
#[tokio::test(start_paused = true)]
async fn waiters_are_admitted_under_the_scale_in_force() {
    let a = admission(TEN_PER_SECOND);
    let half = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cut = half.clone();
    a.set_scaler(Arc::new(move |_| {
        let s = if cut.load(std::sync::atomic::Ordering::Relaxed) {
            0.5
        } else {
            1.0
        };
        (s, 1.0)
    }));
    let key: PauseKey = (0, Arc::from("c"));
    for _ in 0..10 {
        a.admit(
            demand(&a, "c", Priority::Normal),
            Some(key.clone()),
            Duration::from_secs(5),
        )
        .await
        .unwrap()
        .commit();
    }
    let start = Instant::now();
    let mut waiting = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let (a, key) = (a.clone(), key.clone());
        waiting.spawn(async move {
            let d = demand(&a, "c", Priority::Normal);
            a.admit(d, Some(key), Duration::from_secs(5))
                .await
                .unwrap()
                .commit();
            Instant::now() - start
        });
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    half.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut at = Vec::new();
    while let Some(t) = waiting.join_next().await {
        at.push(t.unwrap());
    }
    at.sort();
    assert!(
        at[..5].iter().all(|&t| t == Duration::from_secs(1)),
        "{at:?}"
    );
    assert!(
        at[5..].iter().all(|&t| t == Duration::from_secs(2)),
        "{at:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_learned_reserve_holds_while_critical_traffic_comes_and_is_forgotten_after() {
    let a = admission(
        r#"
[queue]
critical_reserve = 0.2
reserve_memory = "1h"
[[limit]]
name = "client"
scope = "client"
requests = 10
per = "1s"
guard = "0ms"
"#,
    );
    // A critical route exists, but this client has sent nothing critical yet.
    a.set_critical_sources(CriticalSources::Configured {
        routes: true,
        clients: Default::default(),
    });
    let normal_fit = |a: Admission| async move {
        let mut n = 0;
        while a
            .admit(demand(&a, "c", Priority::Normal), None, Duration::ZERO)
            .await
            .map(Reservation::commit)
            .is_ok()
        {
            n += 1;
        }
        n
    };
    assert_eq!(
        normal_fit(a.clone()).await,
        10,
        "no reserve before critical"
    );
    tokio::time::sleep(Duration::from_millis(1001)).await;
    a.admit(demand(&a, "c", Priority::Critical), None, Duration::ZERO)
        .await
        .unwrap()
        .commit();
    assert_eq!(
        normal_fit(a.clone()).await,
        7,
        "8 of 10 for normal, 1 taken"
    );
    // Another client keeps no reserve.
    let mut other = 0;
    while a
        .admit(demand(&a, "d", Priority::Normal), None, Duration::ZERO)
        .await
        .map(Reservation::commit)
        .is_ok()
    {
        other += 1;
    }
    assert_eq!(other, 10);
    assert_eq!(a.learned_reserve(10), (1, vec!["c:c".to_string()]));
    // Within reserve_memory of the critical request the reserve stays...
    tokio::time::sleep(Duration::from_secs(3599)).await;
    assert_eq!(normal_fit(a.clone()).await, 8);
    // ...and after it, it is gone.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(normal_fit(a.clone()).await, 10);
    assert_eq!(a.learned_reserve(10).0, 0);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_request_stops_short_of_a_reserve_learned_while_it_waits() {
    let a = admission(
        r#"
[queue]
critical_reserve = 0.5
[[limit]]
name = "client"
scope = "client"
requests = 4
per = "1s"
guard = "0ms"
"#,
    );
    a.set_critical_sources(CriticalSources::Configured {
        routes: true,
        clients: Default::default(),
    });
    for _ in 0..4 {
        a.admit(demand(&a, "c", Priority::Normal), None, Duration::ZERO)
            .await
            .unwrap()
            .commit();
    }
    // Four normal requests wait for the next window, decided without a reserve.
    let mut waiting = Vec::new();
    for _ in 0..4 {
        let a = a.clone();
        waiting.push(tokio::spawn(async move {
            a.admit(
                demand(&a, "c", Priority::Normal),
                None,
                Duration::from_millis(1500),
            )
            .await
            .map(Reservation::commit)
            .is_ok()
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A critical request arrives (it waits too, ahead of them).
    let critical = {
        let a = a.clone();
        tokio::spawn(async move {
            a.admit(
                demand(&a, "c", Priority::Critical),
                None,
                Duration::from_secs(2),
            )
            .await
            .map(Reservation::commit)
            .is_ok()
        })
    };
    let mut admitted = 0;
    for w in waiting {
        admitted += usize::from(w.await.unwrap());
    }
    assert!(critical.await.unwrap());
    // The next window: the critical request and two normal (half is reserved).
    assert_eq!(admitted, 1, "normal stopped short of the learned reserve");
}

#[tokio::test(start_paused = true)]
async fn in_shadow_an_upstream_pause_is_noted_and_nothing_waits() {
    let (c, set) = crate::limit::test_limits(TEN_PER_SECOND);
    let a = Admission::new(set.shadowed(true), c.queue.clone(), c.identity.max_keys);
    let key: PauseKey = (0, Arc::from("c"));
    a.pause(key.clone(), Duration::from_secs(30));
    let start = Instant::now();
    for i in 0..15u64 {
        let r = a
            .admit(
                demand(&a, "c", Priority::Normal),
                Some(key.clone()),
                Duration::from_secs(5),
            )
            .await
            .expect("shadow never sheds");
        assert_eq!(r.waited(), Duration::ZERO, "{i}");
        let shadow = r.shadow();
        // The pause is always there; the shadow quota of 10 adds itself from the eleventh.
        assert_eq!(shadow.len(), 1 + usize::from(i >= 10), "{i}: {shadow:?}");
        assert!(shadow.iter().any(
            |b| b.subject == crate::shadow::Subject::Pause(0) && b.wait == Some(30_000_000_000)
        ));
        r.commit();
    }
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(a.depth(), [0, 0, 0]);
}

#[tokio::test(start_paused = true)]
async fn a_shadow_limit_next_to_an_enforcing_one_does_not_stop_it_queueing() {
    let a = admission(
        r#"
[queue]
critical_reserve = 0.0
bulk_share = 1.0
[[limit]]
name = "shadowed"
scope = "client"
requests = 2
per = "1s"
guard = "0ms"
shadow = true
[[limit]]
name = "enforced"
scope = "client"
requests = 4
per = "1s"
guard = "0ms"
"#,
    );
    let mut shadowed = 0;
    for _ in 0..4 {
        let r = a
            .admit(
                demand(&a, "c", Priority::Normal),
                None,
                Duration::from_secs(5),
            )
            .await
            .expect("room in the enforcing limit");
        assert_eq!(r.waited(), Duration::ZERO);
        shadowed += r.shadow().len();
        r.commit();
    }
    assert_eq!(
        shadowed, 2,
        "the third and fourth were over the shadow quota"
    );
    // The enforcing limit is full: the fifth waits its window out, the shadow one's
    // verdict is taken when it is finally sent.
    let r = a
        .admit(
            demand(&a, "c", Priority::Normal),
            None,
            Duration::from_secs(5),
        )
        .await
        .expect("admitted after a wait");
    assert_eq!(r.waited(), Duration::from_secs(1));
    assert!(r.shadow().is_empty(), "{:?}", r.shadow());
    r.commit();
    for _ in 0..3 {
        a.admit(
            demand(&a, "c", Priority::Normal),
            None,
            Duration::from_secs(5),
        )
        .await
        .expect("room again")
        .commit();
    }
    let refused = a
        .admit(
            demand(&a, "c", Priority::Normal),
            None,
            Duration::from_millis(10),
        )
        .await;
    assert!(refused.is_err(), "the enforcing limit still sheds");
}
