use super::*;
use crate::config::Dur;

fn cfg(hold_secs: u64) -> AdaptiveConfig {
    AdaptiveConfig {
        enabled: true,
        threshold: 0.01,
        cut: 0.2,
        hold: Dur::secs(hold_secs),
        min_answers: 1,
        floor: 0.25,
        recover: 0.05,
    }
}

fn key(upstream: usize) -> ClientKey {
    (upstream, Arc::from("client"))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[track_caller]
fn assert_rate(a: &Adaptive, k: &ClientKey, want: f64) {
    let got = a.scale(k).rate;
    assert!(close(got, want), "rate {got}, want {want}");
}

async fn advance(secs: f64) {
    tokio::time::advance(Duration::from_secs_f64(secs)).await;
}

/// Several 429s to requests admitted under the same limits are one episode, one cut; a
/// 429 to a request admitted after the cut is the next episode.
#[tokio::test(start_paused = true)]
async fn one_cut_per_episode() {
    let a = Adaptive::new(cfg(3600), 100);
    let k = key(0);
    let g0 = a.scale(&k).generation;
    for _ in 0..10 {
        a.observe(&k, false, g0);
    }
    for _ in 0..10 {
        a.observe(&k, true, g0);
    }
    assert_rate(&a, &k, 0.8);
    let g1 = a.scale(&k).generation;
    assert_ne!(g1, g0);
    a.observe(&k, true, g0);
    assert_rate(&a, &k, 0.8);
    a.observe(&k, true, g1);
    assert_rate(&a, &k, 0.64);
    assert_eq!(a.scale(&key(1)), Scale::FULL, "only that upstream");
    assert_eq!(a.reports()[0].cuts, 2);
}

#[tokio::test(start_paused = true)]
async fn cuts_stop_at_the_floor() {
    let a = Adaptive::new(cfg(3600), 100);
    let k = key(0);
    for _ in 0..20 {
        let g = a.scale(&k).generation;
        a.observe(&k, true, g);
    }
    assert_rate(&a, &k, 0.25);
}

/// Rare 429s of a busy client are under the threshold; a small client's are not.
#[tokio::test(start_paused = true)]
async fn threshold_and_min_answers() {
    let a = Adaptive::new(cfg(3600), 100);
    let k = key(0);
    let g = a.scale(&k).generation;
    for _ in 0..200 {
        a.observe(&k, false, g);
    }
    a.observe(&k, true, g);
    assert_rate(&a, &k, 1.0);

    let strict = Adaptive::new(
        AdaptiveConfig {
            min_answers: 5,
            ..cfg(3600)
        },
        100,
    );
    let g = strict.scale(&k).generation;
    for _ in 0..4 {
        strict.observe(&k, true, g);
    }
    assert_rate(&strict, &k, 1.0);
    strict.observe(&k, true, g);
    assert_rate(&strict, &k, 0.8);
}

/// After `hold` without an episode the rate climbs `recover` per minute to the rate of the
/// last episode, stays there for another hold, then climbs on to the configured rate.
#[tokio::test(start_paused = true)]
async fn recovery_waits_a_hold_and_pauses_at_the_rate_of_the_last_429() {
    let a = Adaptive::new(cfg(60), 100);
    let k = key(0);
    let g = a.scale(&k).generation;
    a.observe(&k, true, g);
    let g = a.scale(&k).generation;
    a.observe(&k, true, g);
    assert_rate(&a, &k, 0.64);
    advance(59.0).await;
    assert_rate(&a, &k, 0.64);
    advance(61.0).await; // hold + 1 min
    assert_rate(&a, &k, 0.69);
    advance(132.0).await; // 0.64 + 0.05 × 3.2 = 0.8: the rate of the last 429
    assert_rate(&a, &k, 0.8);
    advance(59.0).await;
    assert_rate(&a, &k, 0.8);
    advance(61.0).await; // a hold at 0.8, then one more minute
    assert_rate(&a, &k, 0.85);
    advance(600.0).await;
    assert_rate(&a, &k, 1.0);
    assert!(a.reports().is_empty(), "fully recovered: nothing to report");
}

/// An episode during recovery cuts from the rate in force then.
#[tokio::test(start_paused = true)]
async fn an_episode_during_recovery_cuts_from_the_current_rate() {
    let a = Adaptive::new(cfg(60), 100);
    let k = key(0);
    let g = a.scale(&k).generation;
    a.observe(&k, true, g);
    advance(120.0).await; // 0.8 + 0.05
    assert_rate(&a, &k, 0.85);
    let g = a.scale(&k).generation;
    a.observe(&k, true, g);
    assert_rate(&a, &k, 0.68);
}

/// `inin-ratelimit-allowed` lowers the per-client ceiling, never raises it, never below the
/// floor; another value replaces it; it lapses after `hold` without a report.
#[tokio::test(start_paused = true)]
async fn allowed_ceiling_rules() {
    let a = Adaptive::new(cfg(60), 100);
    let k = key(0);
    a.learn_allowed(&k, 30, 20);
    assert_eq!(a.scale(&k), Scale::FULL, "never above the configured value");
    a.learn_allowed(&k, 10, 20);
    let s = a.scale(&k);
    assert!(close(s.client, 0.5), "{s:?}");
    assert!(close(s.rate, 1.0), "only the per-client ceiling: {s:?}");
    assert_eq!(a.reports()[0].allowed, Some(10));
    a.learn_allowed(&k, 15, 20);
    assert!(close(a.scale(&k).client, 0.75));
    a.learn_allowed(&k, 0, 20);
    assert!(close(a.scale(&k).client, 0.25), "clamped to the floor");
    a.learn_allowed(&k, u64::MAX, 20);
    assert!(close(a.scale(&k).client, 1.0), "another value ends it");

    a.learn_allowed(&k, 10, 20);
    advance(30.0).await;
    a.learn_allowed(&k, 10, 20);
    advance(59.0).await;
    assert!(close(a.scale(&k).client, 0.5), "refreshed by the report");
    advance(1.0).await;
    assert!(
        close(a.scale(&k).client, 1.0),
        "lapsed after a hold without a report"
    );
}

/// A lower learned ceiling starts a new generation: 429s to requests sent before it are not
/// an episode; an episode after it cuts from the ceiling.
#[tokio::test(start_paused = true)]
async fn a_learned_ceiling_starts_a_generation() {
    let a = Adaptive::new(cfg(60), 100);
    let k = key(0);
    let before = a.scale(&k).generation;
    a.learn_allowed(&k, 10, 20);
    let after = a.scale(&k).generation;
    assert_ne!(before, after);
    a.observe(&k, true, before);
    assert_rate(&a, &k, 1.0);
    a.learn_allowed(&k, 10, 20);
    assert_eq!(
        a.scale(&k).generation,
        after,
        "the same value is no new generation"
    );
    a.observe(&k, true, after);
    assert_rate(&a, &k, 0.4);
}

#[tokio::test(start_paused = true)]
async fn bounded_by_max_keys() {
    let a = Adaptive::new(cfg(60), 100);
    for i in 0..100_000u32 {
        let k: ClientKey = (0, Arc::from(format!("c{i}")));
        a.observe(&k, true, Generation(0));
        a.learn_allowed(&k, 1, 20);
    }
    assert!(a.len() <= 100, "{} tracks", a.len());
}

#[tokio::test(start_paused = true)]
async fn disabled_does_nothing() {
    let a = Adaptive::new(
        AdaptiveConfig {
            enabled: false,
            ..cfg(60)
        },
        100,
    );
    let k = key(0);
    a.observe(&k, true, Generation(0));
    a.learn_allowed(&k, 1, 20);
    assert_eq!(a.scale(&k), Scale::FULL);
}
