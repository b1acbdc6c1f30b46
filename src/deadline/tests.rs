//! The header's grammar and its bound; then, with paused time, what a caller deadline does
//! to a request in the queue: sheds at once what would wait longer, never lengthens a wait,
//! composes with priorities and the critical reserve, and sets the budget shadow limits
//! judge by.

use super::*;
use crate::config::Priority;
use crate::error::ShedReason;
use crate::limit::Demand;
use crate::queue::{test_admission as admission, Admission, Refusal, Reservation, TEN_PER_SECOND};
use crate::shadow::{verdict, ShadowReason, Verdict};
use http::{HeaderValue, Method};
use std::sync::Arc;
use tokio::time::Instant;

#[test]
fn reads_seconds_fractions_and_milliseconds() {
    let ms = Duration::from_millis;
    assert_eq!(parse("2.5s"), Some(ms(2500)));
    assert_eq!(parse("2.5"), Some(ms(2500)));
    assert_eq!(parse(" 3 "), Some(ms(3000)));
    assert_eq!(parse("500ms"), Some(ms(500)));
    assert_eq!(parse("0.2"), Some(ms(200)));
    assert_eq!(parse(".25s"), Some(ms(250)));
    assert_eq!(parse("7."), Some(ms(7000)));
    assert_eq!(parse("1.5ms"), Some(Duration::from_micros(1500)));
    assert_eq!(parse("0"), Some(Duration::ZERO));
    assert_eq!(parse("0ms"), Some(Duration::ZERO));
    assert_eq!(parse("0.0000000019"), Some(Duration::from_nanos(1)));
}

#[test]
fn refuses_what_is_not_a_plain_duration() {
    for bad in [
        "", " ", "s", "ms", ".", ".s", "-1", "-0.5s", "+1", "1e3", "2.5 s", "1m", "1h", "2s500ms",
        "1,5", "1.2.3", "NaN", "inf", "0x10", "2.5S", "٣",
    ] {
        assert_eq!(parse(bad), None, "{bad:?}");
    }
    assert_eq!(parse(&"1".repeat(MAX_LEN + 1)), None);
}

#[test]
fn a_huge_value_is_no_bound_rather_than_an_overflow() {
    assert_eq!(parse(&"9".repeat(MAX_LEN)), Some(Duration::MAX));
    assert_eq!(parse(&"9".repeat(MAX_LEN - 2)), Some(Duration::MAX));
    let big = u64::MAX / 1000;
    assert_eq!(parse(&format!("{big}ms")), Some(Duration::from_millis(big)));
    // However large, it never raises the configured wait.
    let configured = Duration::from_secs(10);
    let huge = parse(&"9".repeat(MAX_LEN)).map(CallerMaxWait);
    assert_eq!(bound(configured, huge), configured);
}

#[test]
fn lowers_never_raises() {
    let configured = Duration::from_secs(10);
    let caller = |ms| Some(CallerMaxWait(Duration::from_millis(ms)));
    assert_eq!(bound(configured, None), configured);
    assert_eq!(bound(configured, caller(200)), Duration::from_millis(200));
    assert_eq!(bound(configured, caller(0)), Duration::ZERO);
    assert_eq!(bound(configured, caller(60_000)), configured);
}

#[test]
fn take_removes_the_header_and_refuses_bad_or_repeated_values() {
    let mut h = HeaderMap::new();
    assert_eq!(take(&mut h).unwrap(), None);

    h.insert(HEADER, HeaderValue::from_static("1.5s"));
    h.insert("x-other", HeaderValue::from_static("kept"));
    let got = take(&mut h).unwrap();
    assert_eq!(got, Some(CallerMaxWait(Duration::from_millis(1500))));
    assert!(!h.contains_key(HEADER));
    assert!(h.contains_key("x-other"));

    for values in [&["soon"][..], &["-1"], &["1s", "2s"]] {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(HEADER, HeaderValue::from_static(v));
        }
        let e = take(&mut h).unwrap_err();
        assert!(
            matches!(e.kind(), ErrorKind::BadRequest(why) if why.contains(HEADER)),
            "{values:?}: {e}"
        );
        assert!(!h.contains_key(HEADER), "{values:?}");
    }
    // Not text at all.
    let mut h = HeaderMap::new();
    h.insert(HEADER, HeaderValue::from_bytes(b"\xff1s").unwrap());
    assert!(take(&mut h).is_err());
}

// ---- In the queue, with paused time ----

/// A route's `max_wait` in these tests.
const ROUTE: Duration = Duration::from_secs(5);

fn demand(a: &Admission, p: Priority) -> Demand {
    a.demand(0, &Arc::from("c"), &Method::GET, "/x", p)
}

/// What the header asks for, as the admission phase reads it.
fn asked(value: &str) -> Option<CallerMaxWait> {
    Some(CallerMaxWait(parse(value).expect("a valid value")))
}

/// Admits a request of priority `p` with the route's wait bounded by the caller's.
async fn admit(
    a: &Admission,
    p: Priority,
    caller: Option<CallerMaxWait>,
) -> Result<Reservation, Refusal> {
    a.admit(demand(a, p), None, bound(ROUTE, caller)).await
}

/// One request at a time per client.
const ONE_AT_A_TIME: &str = r#"
[queue]
critical_reserve = 0.0
bulk_share = 1.0
[[limit]]
name = "client"
scope = "client"
concurrency = 1
"#;

#[tokio::test(start_paused = true)]
async fn a_short_deadline_is_shed_at_once_with_the_true_retry_after() {
    let a = admission(TEN_PER_SECOND);
    for _ in 0..10 {
        admit(&a, Priority::Normal, None).await.unwrap().commit();
    }
    // The window is full for one more second: 200 ms is not enough, and the answer says
    // so at once, with when to come back.
    let start = Instant::now();
    let refused = admit(&a, Priority::Normal, asked("0.2"))
        .await
        .err()
        .unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(refused.reason, ShedReason::WaitTooLong);
    assert_eq!(refused.retry_after, Duration::from_secs(1));
    // Without a deadline of its own the same request waits the window out within the
    // route's 5 s; so does one whose deadline (1500 ms) covers the wait.
    let r = admit(&a, Priority::Normal, asked("1500ms")).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    assert_eq!(r.waited(), Duration::from_secs(1));
    r.commit();
    let r = admit(&a, Priority::Normal, None).await.unwrap();
    assert_eq!(r.waited(), Duration::ZERO, "the window rolled over");
    r.commit();
}

#[tokio::test(start_paused = true)]
async fn a_long_deadline_never_lengthens_the_wait() {
    let a = admission(ONE_AT_A_TIME);
    let held = admit(&a, Priority::Normal, None).await.unwrap();
    let _permit = held.commit();
    // The wait for a concurrency slot cannot be predicted: the request waits, but only
    // the route's 5 s, whatever the caller offered.
    let start = Instant::now();
    let refused = admit(&a, Priority::Normal, asked("3600s"))
        .await
        .err()
        .unwrap();
    assert_eq!(start.elapsed(), ROUTE);
    assert_eq!(refused.reason, ShedReason::WaitTooLong);
    // A shorter one ends the wait sooner, and 0 does not wait at all.
    let start = Instant::now();
    admit(&a, Priority::Normal, asked("750ms"))
        .await
        .err()
        .unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(750));
    let start = Instant::now();
    admit(&a, Priority::Normal, asked("0")).await.err().unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(a.depth(), [0, 0, 0], "nobody left in the queue");
}

#[tokio::test(start_paused = true)]
async fn zero_still_admits_what_fits_now() {
    let a = admission(TEN_PER_SECOND);
    for _ in 0..10 {
        let r = admit(&a, Priority::Normal, asked("0")).await.unwrap();
        assert_eq!(r.waited(), Duration::ZERO);
        r.commit();
    }
    let refused = admit(&a, Priority::Normal, asked("0")).await.err().unwrap();
    assert_eq!(refused.retry_after, Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn composes_with_priorities_and_the_critical_reserve() {
    // Ten a second with a fifth kept for critical traffic: normal gets eight.
    let a = admission(
        r#"
[queue]
critical_reserve = 0.2
bulk_share = 1.0
[[limit]]
name = "client"
scope = "client"
requests = 10
per = "1s"
guard = "0ms"
"#,
    );
    for _ in 0..8 {
        admit(&a, Priority::Normal, None).await.unwrap().commit();
    }
    // Normal traffic with a deadline of its own is shed at once rather than waiting for
    // the next window; critical traffic with "do not wait" still takes the reserve.
    let start = Instant::now();
    let refused = admit(&a, Priority::Normal, asked("100ms"))
        .await
        .err()
        .unwrap();
    assert_eq!(refused.reason, ShedReason::WaitTooLong);
    assert!(
        refused.retry_after > Duration::from_millis(100),
        "{refused:?}"
    );
    for _ in 0..2 {
        let r = admit(&a, Priority::Critical, asked("0")).await.unwrap();
        assert_eq!(r.waited(), Duration::ZERO);
        r.commit();
    }
    assert_eq!(start.elapsed(), Duration::ZERO);
    // The reserve is used up too: a critical request waits for the window like any other,
    // and is shed when its own deadline is shorter than that.
    admit(&a, Priority::Critical, asked("0.5"))
        .await
        .err()
        .unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
    let r = admit(&a, Priority::Critical, asked("2s")).await.unwrap();
    assert_eq!(r.waited(), Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn in_shadow_the_deadline_sets_the_would_be_verdict_and_nothing_is_shed() {
    let (c, set) = crate::limit::test_limits(TEN_PER_SECOND);
    let a = Admission::new(set.shadowed(true), c.queue.clone(), c.identity.max_keys);
    for _ in 0..10 {
        admit(&a, Priority::Normal, None).await.unwrap().commit();
    }
    let start = Instant::now();
    let r = admit(&a, Priority::Normal, asked("0.2"))
        .await
        .expect("shadow never sheds");
    assert_eq!(start.elapsed(), Duration::ZERO);
    let block = r.shadow().first().cloned().expect("over the shadow quota");
    // The admission phase judges the shadow block against the bounded wait: with the
    // caller's 200 ms it would have been shed; with the route's 5 s it would have waited.
    assert_eq!(
        verdict(&block, bound(ROUTE, asked("0.2"))),
        Verdict::Shed(ShadowReason::WaitTooLong)
    );
    assert_eq!(
        verdict(&block, bound(ROUTE, None)),
        Verdict::Wait(Duration::from_secs(1))
    );
    assert_eq!(
        verdict(&block, bound(ROUTE, asked("60"))),
        Verdict::Wait(Duration::from_secs(1))
    );
}
