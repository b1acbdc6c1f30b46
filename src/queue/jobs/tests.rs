use crate::config::Priority;
use crate::error::ShedReason;
use crate::limit::Demand;
use crate::queue::Admission;
use http::Method;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const ONE_JOB: &str = r#"
[[limit]]
name = "jobs"
match = "POST /api/v2/analytics/*/details/jobs"
scope = "global"
jobs = 1
job_ttl = "60s"
"#;

fn admission() -> Admission {
    let (c, set) = crate::limit::test_limits(ONE_JOB);
    Admission::new(set, c.queue.clone(), c.identity.max_keys)
}

fn create(a: &Admission) -> Demand {
    a.demand(
        0,
        &Arc::from("exporter"),
        &Method::POST,
        "/api/v2/analytics/users/details/jobs",
        Priority::Bulk,
    )
}

/// Admits a creation and keeps its slot under `id`, as a 202 with that `jobId` would.
async fn started(a: &Admission, id: &str) {
    let mut r = a
        .admit(create(a), None, Duration::from_secs(1))
        .await
        .expect("a free job slot");
    r.take_jobs().expect("a job slot").keep((0, Arc::from(id)));
    r.commit();
}

fn running(a: &Admission) -> u64 {
    a.jobs_usage().iter().map(|(_, n)| n).sum()
}

#[tokio::test(start_paused = true)]
async fn a_job_never_seen_finishing_frees_its_slot_after_job_ttl() {
    let a = admission();
    started(&a, "lost").await;
    let start = Instant::now();
    // Nothing reports the job finishing: the waiting creation gets its slot when the
    // slot's job_ttl passes, woken then, not by polling.
    let r = a
        .admit(create(&a), None, Duration::from_secs(120))
        .await
        .expect("admitted once the ttl passes");
    assert_eq!(start.elapsed(), Duration::from_secs(60));
    assert!(!a.holds_job(&(0, Arc::from("lost"))));
    drop(r);
    assert_eq!(running(&a), 0, "an unkept creation gives its slot back");
}

#[tokio::test(start_paused = true)]
async fn a_finished_job_admits_the_next_creation_and_a_full_limit_sheds_honestly() {
    let a = admission();
    started(&a, "j1").await;
    // Only a finish frees the slot; a creation that may wait 5s is shed after 5s, told
    // to come back in as long (the slot's ttl is further away).
    let start = Instant::now();
    let refused = a
        .admit(create(&a), None, Duration::from_secs(5))
        .await
        .err()
        .expect("shed");
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    assert_eq!(refused.reason, ShedReason::WaitTooLong);
    assert_eq!(refused.retry_after, Duration::from_secs(5));
    // Later the slot's ttl comes first: 2s after this one is shed, so that is the hint.
    tokio::time::advance(Duration::from_secs(45)).await;
    let refused = a
        .admit(create(&a), None, Duration::from_secs(8))
        .await
        .err()
        .expect("shed");
    assert_eq!(refused.retry_after, Duration::from_secs(2));
    let waiter = {
        let a = a.clone();
        tokio::spawn(async move { a.admit(create(&a), None, Duration::from_secs(30)).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiter.is_finished());
    let at = Instant::now();
    assert!(a.job_finished(&(0, Arc::from("j1"))));
    let r = waiter
        .await
        .unwrap()
        .expect("admitted when the job finished");
    assert_eq!(at.elapsed(), Duration::ZERO);
    drop(r);
}

#[tokio::test(start_paused = true)]
async fn a_creation_held_back_by_a_rate_limit_returns_its_job_slot() {
    let (c, set) = crate::limit::test_limits(&format!(
        "{ONE_JOB}[[limit]]\nname = \"rate\"\nscope = \"global\"\nrequests = 1\nper = \"10s\"\nguard = \"0ms\"\n[queue]\ncritical_reserve = 0.0\nbulk_share = 1.0\n"
    ));
    let a = Admission::new(set, c.queue.clone(), c.identity.max_keys);
    let first = a
        .admit(create(&a), None, Duration::from_secs(1))
        .await
        .unwrap();
    drop(first); // no job: slot and send given back
    started(&a, "j1").await;
    assert!(a.job_finished(&(0, Arc::from("j1"))));
    // The window is full: the next creation waits for it, holding no job slot meanwhile.
    let start = Instant::now();
    let waiter = {
        let a = a.clone();
        tokio::spawn(async move { a.admit(create(&a), None, Duration::from_secs(30)).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(running(&a), 0, "a waiting creation holds no slot");
    let r = waiter
        .await
        .unwrap()
        .expect("admitted when the window opens");
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    drop(r);
}
