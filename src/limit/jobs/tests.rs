use super::*;
use crate::config::Priority;
use crate::limit::test_limits;
use http::Method;

const SEC: Nanos = 1_000_000_000;

fn jobs_set(extra: &str) -> LimitSet {
    test_limits(&format!(
        r#"
[[limit]]
name = "jobs"
match = "POST /api/v2/analytics/*/details/jobs"
scope = "client"
jobs = 2
job_ttl = "60s"
{extra}"#
    ))
    .1
}

fn demand(s: &LimitSet, who: &str, family: &str) -> Demand {
    s.demand(
        0,
        &Arc::from(who),
        &Method::POST,
        &format!("/api/v2/analytics/{family}/details/jobs"),
        Priority::Normal,
    )
}

fn job(id: &str) -> JobKey {
    (0, Arc::from(id))
}

#[test]
fn n_jobs_run_per_key_and_a_finished_one_frees_its_slot() {
    let s = jobs_set("");
    let mut b = JobBook::new(100);
    let d = demand(&s, "a", "conversations");
    let t1 = b.try_take(&s, 0, &d, &|_| 0).unwrap().unwrap();
    let t2 = b.try_take(&s, 0, &d, &|_| 0).unwrap().unwrap();
    let blocked = b.try_take(&s, 0, &d, &|_| 0).unwrap_err();
    assert_eq!(blocked.wait, None, "only a finish or the ttl frees a slot");
    assert_eq!(blocked.layer(), Some(&d.layers[0]));
    // Both job families share the limit's key; another client has its own.
    assert!(b
        .try_take(&s, 0, &demand(&s, "a", "users"), &|_| 0)
        .is_err());
    assert!(b
        .try_take(&s, 0, &demand(&s, "b", "users"), &|_| 0)
        .unwrap()
        .is_some());
    assert!(b.keep(t1, job("j1")));
    assert!(b.keep(t2, job("j2")));
    assert_eq!(b.running(&d.layers[0]), 2);
    assert!(b.finish(&job("j1")));
    assert!(!b.finish(&job("j1")), "a job frees its slot once");
    assert_eq!(b.running(&d.layers[0]), 1);
    assert!(b.try_take(&s, SEC, &d, &|_| 0).unwrap().is_some());
}

#[test]
fn a_refunded_creation_frees_its_slot_and_waiters_go_first() {
    let s = jobs_set("");
    let mut b = JobBook::new(100);
    let d = demand(&s, "a", "conversations");
    let t1 = b.try_take(&s, 0, &d, &|_| 0).unwrap().unwrap();
    // One slot left, but one creation waits before this one.
    assert!(b.try_take(&s, 0, &d, &|_| 1).is_err());
    let _t2 = b.try_take(&s, 0, &d, &|_| 0).unwrap().unwrap();
    b.refund(t1);
    assert_eq!(b.running(&d.layers[0]), 1);
    assert!(b.try_take(&s, 0, &d, &|_| 0).unwrap().is_some());
}

#[test]
fn a_job_never_seen_finishing_frees_its_slot_after_job_ttl() {
    let s = jobs_set("");
    let mut b = JobBook::new(100);
    let d = demand(&s, "a", "conversations");
    let t1 = b.try_take(&s, 0, &d, &|_| 0).unwrap().unwrap();
    b.keep(t1, job("j1"));
    let t2 = b.try_take(&s, 10 * SEC, &d, &|_| 0).unwrap().unwrap();
    b.keep(t2, job("j2"));
    assert_eq!(b.opens_in(&d.layers[0], 30 * SEC), Some(30 * SEC));
    assert_eq!(b.next_deadline(), Some(60 * SEC));
    assert!(b.try_take(&s, 60 * SEC - 1, &d, &|_| 0).is_err());
    assert!(b.try_take(&s, 60 * SEC, &d, &|_| 0).unwrap().is_some());
    assert!(!b.holds(&job("j1")), "the expired job is forgotten");
    assert!(b.holds(&job("j2")));
    assert_eq!(b.sweep(200 * SEC), 0);
    assert_eq!(b.key_count(), 0);
    assert!(b.by_job.is_empty());
}

#[test]
fn requests_without_a_job_limit_take_nothing_and_keys_are_bounded() {
    let s = jobs_set("");
    let mut b = JobBook::new(2);
    let other = s.demand(
        0,
        &Arc::from("a"),
        &Method::GET,
        "/api/v2/users",
        Priority::Normal,
    );
    assert_eq!(b.try_take(&s, 0, &other, &|_| 0), Ok(None));
    for who in ["a", "b"] {
        assert!(b.try_take(&s, 0, &demand(&s, who, "users"), &|_| 0).is_ok());
    }
    // A third key waits until a key frees: the book never holds more than max_keys.
    assert!(b
        .try_take(&s, 0, &demand(&s, "c", "users"), &|_| 0)
        .is_err());
    assert_eq!(b.key_count(), 2);
    assert!(b
        .try_take(&s, 61 * SEC, &demand(&s, "c", "users"), &|_| 0)
        .unwrap()
        .is_some());
    assert_eq!(b.key_count(), 1);
}

#[test]
fn a_job_id_reported_twice_holds_one_slot() {
    let s = jobs_set("");
    let mut b = JobBook::new(100);
    let d = demand(&s, "a", "users");
    let t1 = b.try_take(&s, 0, &d, &|_| 0).unwrap().unwrap();
    let t2 = b.try_take(&s, 0, &d, &|_| 0).unwrap().unwrap();
    b.keep(t1, job("same"));
    b.keep(t2, job("same"));
    assert_eq!(b.running(&d.layers[0]), 1);
    assert!(b.finish(&job("same")));
    assert_eq!(b.running(&d.layers[0]), 0);
}
