use super::*;

const MS: Duration = Duration::from_millis(1);

#[test]
fn the_breaker_opens_after_failures_in_a_row_until_a_heartbeat_closes_it() {
    let t0 = Instant::now();
    let mut h = Health::default();
    h.reachable();
    assert!(h.use_redis(t0));
    for _ in 1..BREAKER_FAILURES {
        h.failed("test", t0);
        assert!(h.use_redis(t0), "open before {BREAKER_FAILURES} failures");
    }
    h.failed("test", t0);
    assert!(!h.use_redis(t0));
    assert!(!h.up());
    assert!(!h.use_redis(t0 + 249 * MS));
    assert!(h.use_redis(t0 + 250 * MS));
    // Still failing once it expired does not open it again: only a heartbeat closes it.
    for _ in 0..BREAKER_FAILURES {
        h.failed("test", t0 + 300 * MS);
    }
    assert!(h.use_redis(t0 + 300 * MS));
    // A heartbeat closes it and resets its open time.
    h.reachable();
    let t1 = t0 + Duration::from_secs(1);
    for _ in 0..BREAKER_FAILURES {
        h.failed("test", t1);
    }
    assert!(!h.use_redis(t1 + 249 * MS));
    assert!(h.use_redis(t1 + 250 * MS));
}

#[test]
fn a_success_resets_the_count_of_failures() {
    let t0 = Instant::now();
    let mut h = Health::default();
    for _ in 0..10 {
        h.failed("test", t0);
        h.failed("test", t0);
        h.succeeded();
    }
    assert!(h.use_redis(t0));
}

#[test]
fn local_mode_ends_only_after_the_replay_the_settle_time_and_the_peers() {
    let t0 = Instant::now();
    let mut h = Health::default();
    h.reachable();
    assert!(h.enter_fallback());
    // Already local: nothing to pad again.
    assert!(!h.enter_fallback());
    assert!(h.recovering());
    assert!(!h.use_redis(t0 + Duration::from_secs(60)), "no replay yet");
    h.replayed(t0);
    assert!(!h.recovering());
    h.peers_back(true);
    assert!(!h.use_redis(t0 + SETTLE - MS));
    assert!(!h.is_up(t0 + SETTLE - MS));
    assert!(h.in_fallback());
    assert!(h.use_redis(t0 + SETTLE));
    assert!(!h.in_fallback());
    assert!(h.is_up(t0 + SETTLE));
}

#[test]
fn a_peer_that_never_returns_holds_local_mode_for_at_most_settle_max() {
    let t0 = Instant::now();
    let mut h = Health::default();
    h.peers_back(true);
    h.enter_fallback();
    // Entering local mode forgets which peers were back.
    h.replayed(t0);
    assert!(!h.use_redis(t0 + SETTLE));
    assert!(!h.use_redis(t0 + SETTLE_MAX - MS));
    assert!(h.use_redis(t0 + SETTLE_MAX));
}

#[test]
fn a_failure_while_settling_starts_the_recovery_over() {
    let t0 = Instant::now();
    let mut h = Health::default();
    h.enter_fallback();
    h.replayed(t0);
    h.peers_back(true);
    h.failed("test", t0 + MS);
    assert!(h.recovering());
    assert!(!h.use_redis(t0 + SETTLE_MAX * 2));
    // The next good heartbeat replays again, and settling starts from then.
    let t1 = t0 + SETTLE_MAX * 2;
    h.replayed(t1);
    assert!(!h.use_redis(t1 + SETTLE - MS));
    assert!(h.use_redis(t1 + SETTLE));
}

#[test]
fn down_is_never_reported_up() {
    let t0 = Instant::now();
    let mut h = Health::default();
    assert!(!h.is_up(t0), "up before any heartbeat");
    h.reachable();
    assert!(h.is_up(t0));
    h.unreachable();
    assert!(!h.is_up(t0));
}
