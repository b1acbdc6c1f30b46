//! Unit tests of [`super`]: recording, rendering and the handle caches.

use super::*;

#[test]
fn renders_counters_and_gauges() {
    let m = Metrics::new();
    m.request("api", "ivr", "export", "GET /x", Outcome::Forwarded);
    m.request("api", "ivr", "export", "GET /x", Outcome::Forwarded);
    m.upstream_response("api", "ivr", "export", "GET /x", 429);
    m.queue_wait("api", "normal", "export", 0.02);
    let text = m.render(&[Gauge {
        name: "pacer_queue_depth",
        help: "Requests waiting.",
        samples: vec![(
            vec![("upstream", "a\"b".into()), ("priority", "bulk".into())],
            3.0,
        )],
    }]);
    assert!(text.contains("pacer_requests_total{upstream=\"api\",client=\"ivr\",app=\"export\",endpoint=\"GET /x\",outcome=\"forwarded\"} 2"), "{text}");
    assert!(text.contains("status=\"429\"} 1"), "{text}");
    assert!(text.contains("pacer_queue_wait_seconds_bucket"), "{text}");
    assert!(
        text.contains("pacer_queue_depth{upstream=\"a\\\"b\",priority=\"bulk\"} 3"),
        "{text}"
    );
}

/// The metric calls of a mix of requests over several label sets.
fn record_traffic(m: &Metrics) {
    let clients = ["ivr", "crm", "other"];
    let endpoints = [
        "GET /api/v2/users/{userId}",
        "PUT /api/v2/architect/ivrs/{ivrId}",
    ];
    for round in 0..5u16 {
        for (c, client) in clients.iter().enumerate() {
            for (e, endpoint) in endpoints.iter().enumerate() {
                // Client `ivr` sends one more request per endpoint each round, and so on.
                for _ in 0..=c {
                    m.queue_wait("api", "normal", "app", 0.002 * f64::from(round));
                    m.inflight("api", client, 1.0);
                    m.upstream_duration("api", 0.05);
                    let status = if e == 1 && round == 4 { 429 } else { 200 };
                    m.upstream_response("api", client, "app", endpoint, status);
                    m.inflight("api", client, -1.0);
                    m.request("api", client, "app", endpoint, Outcome::Forwarded);
                }
            }
        }
        m.request("auth", "unknown", "unknown", "none", Outcome::Rejected);
        m.shed("api", "crm", "app", "queue_full");
        m.request("api", "crm", "app", endpoints[0], Outcome::Shed);
    }
    // Held across the rest: the gauge stays up by one.
    m.inflight_gauge("api", "ivr").up();
}

/// The value of the sample line `series` (name and labels exactly as rendered).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn sorted_lines(text: &str) -> Vec<&str> {
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort_unstable();
    lines
}

#[test]
fn process_metrics_and_build_info_render_with_help_and_type() {
    let mut text = String::new();
    render_process(&mut text);
    let version = format!(
        "pacer_build_info{{version=\"{}\",os=\"{}\",arch=\"{}\"}}",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        std::env::consts::ARCH
    );
    assert_eq!(sample(&text, &version), Some(1.0), "{text}");
    assert!(
        text.contains("# TYPE process_cpu_seconds_total counter"),
        "{text}"
    );
    for name in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(text.contains(&format!("# TYPE {name} gauge")), "{text}");
        let v = sample(&text, name).unwrap_or_else(|| panic!("{name} missing:\n{text}"));
        assert!(v > 0.0, "{name} = {v}");
    }
}

#[test]
fn cached_handles_render_the_counts_of_every_label_set() {
    let m = Metrics::new();
    record_traffic(&m);
    // Every label set the traffic used is kept.
    assert_eq!(m.cache.requests.len(), 3 * 2 + 2);
    assert_eq!(m.cache.responses.len(), 3 * 2 + 3);
    assert_eq!(m.cache.inflight.len(), 3);
    let text = m.render(&[]);
    let req = |c: &str, e: &str, o: &str| {
        format!("pacer_requests_total{{upstream=\"api\",client=\"{c}\",app=\"app\",endpoint=\"{e}\",outcome=\"{o}\"}}")
    };
    let users = "GET /api/v2/users/{userId}";
    let ivrs = "PUT /api/v2/architect/ivrs/{ivrId}";
    assert_eq!(
        sample(&text, &req("ivr", users, "forwarded")),
        Some(5.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, &req("crm", ivrs, "forwarded")),
        Some(10.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, &req("other", users, "forwarded")),
        Some(15.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, &req("crm", users, "shed")),
        Some(5.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "pacer_requests_total{upstream=\"auth\",client=\"unknown\",app=\"unknown\",endpoint=\"none\",outcome=\"rejected\"}"
        ),
        Some(5.0),
        "{text}"
    );
    let resp = |c: &str, e: &str, s: u16| {
        format!("pacer_upstream_responses_total{{upstream=\"api\",client=\"{c}\",app=\"app\",endpoint=\"{e}\",status=\"{s}\"}}")
    };
    assert_eq!(
        sample(&text, &resp("other", ivrs, 200)),
        Some(12.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, &resp("other", ivrs, 429)),
        Some(3.0),
        "{text}"
    );
    assert_eq!(sample(&text, &resp("ivr", users, 200)), Some(5.0), "{text}");
    assert_eq!(sample(&text, &resp("ivr", users, 429)), None, "{text}");
    assert_eq!(
        sample(
            &text,
            "pacer_shed_total{upstream=\"api\",client=\"crm\",app=\"app\",reason=\"queue_full\"}"
        ),
        Some(5.0),
        "{text}"
    );
    let inflight = |c: &str| format!("pacer_inflight{{upstream=\"api\",client=\"{c}\"}}");
    assert_eq!(sample(&text, &inflight("ivr")), Some(1.0), "{text}");
    assert_eq!(sample(&text, &inflight("crm")), Some(0.0), "{text}");
    assert_eq!(
        sample(
            &text,
            "pacer_upstream_duration_seconds_count{upstream=\"api\"}"
        ),
        Some(60.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "pacer_queue_wait_seconds_count{upstream=\"api\",priority=\"normal\",app=\"app\"}"
        ),
        Some(60.0),
        "{text}"
    );
}

#[test]
fn cached_and_uncached_paths_render_the_same_text() {
    // No slots: every call takes the registry path, as before the cache existed.
    let uncached = Metrics::with_cache(0);
    // Two slots per family: a few label sets are kept, the rest overflow.
    let tiny = Metrics::with_cache(2);
    let cached = Metrics::new();
    for m in [&uncached, &tiny, &cached] {
        record_traffic(m);
    }
    assert_eq!(uncached.cache.requests.len(), 0);
    assert!(tiny.cache.requests.len() <= 2);
    // Sample order within a family follows the exporter's hash maps, which differ
    // between instances; the lines themselves must not.
    let expected = uncached.render(&[]);
    assert!(expected.contains("pacer_requests_total{"), "{expected}");
    for m in [&tiny, &cached] {
        let text = m.render(&[]);
        assert_eq!(sorted_lines(&text), sorted_lines(&expected));
    }
}

#[test]
fn concurrent_recording_through_the_cache_loses_no_count() {
    let m = std::sync::Arc::new(Metrics::with_cache(16));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let m = m.clone();
            std::thread::spawn(move || {
                for i in 0..2000 {
                    // Shared label sets, and more of them than the cache has slots.
                    let client = format!("c{}", (i + t) % 24);
                    m.request("api", &client, "app", "GET /x", Outcome::Forwarded);
                }
            })
        })
        .collect();
    for t in threads {
        assert!(t.join().is_ok(), "a recording thread panicked");
    }
    let text = m.render(&[]);
    let total: f64 = (0..24)
        .filter_map(|c| {
            sample(
                &text,
                &format!("pacer_requests_total{{upstream=\"api\",client=\"c{c}\",app=\"app\",endpoint=\"GET /x\",outcome=\"forwarded\"}}"),
            )
        })
        .sum();
    assert_eq!(total, 8000.0, "{text}");
    assert!(m.cache.requests.len() <= 16);
}
