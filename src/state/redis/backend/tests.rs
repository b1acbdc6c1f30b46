use super::*;
use crate::limit::KeyPart;

#[tokio::test(start_paused = true)]
async fn observed_use_of_distinct_keys_stays_bounded() {
    let (c, set) = crate::limit::test_limits(
        "[state]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:1/\"\n\
         [[limit]]\nname = \"per-client\"\nscope = \"client\"\nrequests = 10\nper = \"2s\"\n",
    );
    let set = Arc::new(set);
    let max = 1000;
    // No heartbeat: it never connects, and nothing but this test touches the map.
    let b = RedisBackend::new(set.clone(), Clock::default(), c.state.clone(), max).unwrap();
    let key = |i: u64| {
        (
            LayerKey {
                limit: 0,
                part: KeyPart::Client(Arc::from(format!("caller-{i}"))),
            },
            false,
        )
    };
    let len = || b.observed.lock().unwrap().seen.len();
    for i in 0..100_000 {
        b.observe(&[key(i)], &[3]);
        assert!(len() <= max, "{} keys after {i}", len());
    }
    // A key already remembered is still updated while the map is full.
    b.observe(&[key(0)], &[7]);
    assert_eq!(b.observed.lock().unwrap().seen[&key(0).0].0, 7);
    // Once their window has passed, new keys take their place.
    tokio::time::advance(Duration::from_secs(3)).await;
    for i in 100_000..200_000 {
        b.observe(&[key(i)], &[1]);
        assert!(len() <= max, "{} keys after {i}", len());
    }
    assert!(b
        .observed
        .lock()
        .unwrap()
        .seen
        .contains_key(&key(100_000).0));
    // The regular sweep forgets what no switch to local shares would pad.
    tokio::time::advance(Duration::from_secs(3)).await;
    b.sweep();
    assert_eq!(len(), 0);
}
