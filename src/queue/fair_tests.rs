//! The fair share of apps within one caller, on tokio's paused clock.

use super::*;
use crate::identity::App;
use http::Method;
use std::sync::atomic::{AtomicU64, Ordering};

use super::test_admission as admission;

const TEN_PER_SECOND: &str = r#"
[queue]
critical_reserve = 0.0
bulk_share = 1.0
max_depth = 1000
[[limit]]
name = "client"
scope = "client"
requests = 10
per = "1s"
guard = "0ms"
"#;

fn demand(a: &Admission, app: &App) -> Demand {
    let mut d = a.demand(0, &Arc::from("c"), &Method::GET, "/x", Priority::Normal);
    d.app = app.clone();
    d
}

fn key() -> Option<PauseKey> {
    Some((0, Arc::from("c")))
}

/// Fills the caller's window so that what follows waits.
async fn fill(a: &Admission) {
    let app = App::unknown();
    for _ in 0..10 {
        a.admit(demand(a, &app), key(), Duration::from_secs(5))
            .await
            .unwrap()
            .commit();
    }
}

/// `workers` tasks sending as fast as they are admitted, counting admissions.
fn greedy(a: &Admission, app: &App, workers: usize, count: &Arc<AtomicU64>) {
    greedy_noted(a, app, workers, count, &Arc::default());
}

/// [`greedy`], noting when each admission happened.
fn greedy_noted(
    a: &Admission,
    app: &App,
    workers: usize,
    count: &Arc<AtomicU64>,
    at: &Arc<Mutex<Vec<Instant>>>,
) {
    for _ in 0..workers {
        let (a, app, count, at) = (a.clone(), app.clone(), count.clone(), at.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(r) = a
                    .admit(demand(&a, &app), key(), Duration::from_secs(60))
                    .await
                {
                    r.commit();
                    count.fetch_add(1, Ordering::Relaxed);
                    at.lock().unwrap().push(Instant::now());
                }
            }
        });
    }
}

#[tokio::test(start_paused = true)]
async fn a_weight_of_two_gets_twice_the_share() {
    let a = admission(TEN_PER_SECOND);
    fill(&a).await;
    let (heavy, light) = (App::new("heavy", 2.0), App::new("light", 1.0));
    let (h, l) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    // Equally greedy: as many workers each, always more waiting than the limit admits.
    greedy(&a, &light, 20, &l);
    greedy(&a, &heavy, 20, &h);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let (h, l) = (h.load(Ordering::Relaxed), l.load(Ordering::Relaxed));
    // 10 a second for 30 s between them, never more.
    assert!(h + l <= 300 && h + l >= 280, "{h} + {l}");
    let ratio = h as f64 / l as f64;
    assert!((1.8..=2.2).contains(&ratio), "{h} vs {l}: {ratio}");
}

#[tokio::test(start_paused = true)]
async fn equal_weights_share_equally_whatever_the_backlog() {
    let a = admission(TEN_PER_SECOND);
    fill(&a).await;
    let (runaway, modest) = (App::new("runaway", 1.0), App::new("modest", 1.0));
    let (r, m) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    // Both always have at least a window's worth waiting, the runaway four times more.
    greedy(&a, &runaway, 40, &r);
    greedy(&a, &modest, 10, &m);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let (r, m) = (r.load(Ordering::Relaxed), m.load(Ordering::Relaxed));
    // FIFO would give the modest app 10 of every 50; in turn it gets half.
    let share = m as f64 / (r + m) as f64;
    assert!((0.45..=0.55).contains(&share), "{m} of {}", r + m);
}

#[tokio::test(start_paused = true)]
async fn a_modest_request_behind_a_runaway_backlog_is_not_shed() {
    let a = admission(TEN_PER_SECOND);
    fill(&a).await;
    let runaway = App::new("runaway", 1.0);
    // 40 waiting: 4 s of the limit.
    let mut backlog = Vec::new();
    for _ in 0..40 {
        let (a, d) = (a.clone(), demand(&a, &runaway));
        backlog.push(tokio::spawn(async move {
            a.admit(d, key(), Duration::from_secs(10))
                .await
                .map(Reservation::commit)
        }));
        tokio::task::yield_now().await;
    }
    assert_eq!(a.depth()[1], 40);
    // Counting every waiter ahead, its wait (over 4 s) would be past its max_wait and it
    // would be shed at once; in its app's turn it waits for the next slot.
    let modest = App::new("modest", 1.0);
    let r = a
        .admit(demand(&a, &modest), key(), Duration::from_secs(2))
        .await
        .expect("admitted in its turn");
    assert!(
        r.waited() <= Duration::from_millis(1100),
        "{:?}",
        r.waited()
    );
    r.commit();
    // One that cannot wait at all is told to come back when its turn comes, not after
    // the whole backlog.
    let refused = a
        .admit(demand(&a, &modest), key(), Duration::ZERO)
        .await
        .err()
        .unwrap();
    assert!(
        refused.retry_after <= Duration::from_millis(1100),
        "{refused:?}"
    );
    for t in backlog {
        t.await.unwrap().unwrap();
    }
    // Nothing kept once nobody waits.
    assert_eq!(a.shared.lock().fair.callers(), 0);
}

#[tokio::test(start_paused = true)]
async fn priorities_still_go_first_across_apps() {
    let a = admission(TEN_PER_SECOND);
    fill(&a).await;
    let (x, y) = (App::new("x", 1.0), App::new("y", 1000.0));
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (i, (app, p)) in [
        (&y, Priority::Bulk),
        (&x, Priority::Normal),
        (&y, Priority::Bulk),
    ]
    .into_iter()
    .enumerate()
    {
        let mut d = demand(&a, app);
        d.priority = p;
        let (a, order) = (a.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let r = a.admit(d, key(), Duration::from_secs(5)).await.unwrap();
            order.lock().unwrap().push(i);
            r.commit();
        }));
        tokio::task::yield_now().await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![1, 0, 2]);
}

#[tokio::test(start_paused = true)]
async fn while_apps_take_turns_sends_spread_over_the_window() {
    let a = admission(TEN_PER_SECOND);
    // The window's ten sends all at one instant: its room comes back all at once.
    fill(&a).await;
    let at = Arc::new(Mutex::new(Vec::new()));
    let count = Arc::new(AtomicU64::new(0));
    greedy_noted(&a, &App::new("runaway", 1.0), 20, &count, &at);
    greedy_noted(&a, &App::new("modest", 1.0), 2, &count, &at);
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let at = at.lock().unwrap().clone();
    // After the first window, one send per interval (100 ms), never a burst.
    let later: Vec<Instant> = at
        .into_iter()
        .filter(|t| *t >= start + Duration::from_secs(2))
        .collect();
    assert!(later.len() >= 75, "{} sends in 8 s", later.len());
    for pair in later.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(99),
            "two sends {:?} apart",
            pair[1] - pair[0]
        );
    }
}
