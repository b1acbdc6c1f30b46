//! Metric recording cost of one forwarded request: the six calls the pipeline makes for it
//! (`pacer_requests_total`, `pacer_upstream_responses_total`, `pacer_queue_wait_seconds`,
//! `pacer_inflight` up and down, `pacer_upstream_duration_seconds`).
//!
//! `cargo bench --bench metrics` measures it with criterion: one label set (a single busy
//! client), and 64 label sets in rotation (16 clients x 4 endpoints). Under `cargo test` each
//! case runs once, to prove it still works.
//!
//! For a noise-free figure, `PACER_METRICS_ITERS=N` skips criterion and records N requests
//! (64 label sets in rotation) after a warm-up, so that `valgrind --tool=callgrind` run at
//! two values of N gives the instructions per request as the difference over the extra
//! requests (see `bench/results/metrics.txt`).

use criterion::{black_box, criterion_group, Criterion};
use pacer::metrics::{Metrics, Outcome};
use std::sync::Arc;

/// Label values as the pipeline holds them: interned `Arc<str>`s.
struct LabelSet {
    upstream: Arc<str>,
    client: Arc<str>,
    endpoint: Arc<str>,
}

fn label_sets(clients: usize, endpoints: usize) -> Vec<LabelSet> {
    let upstream: Arc<str> = Arc::from("genesys");
    let endpoint_names = [
        "GET /api/v2/users/{userId}",
        "PUT /api/v2/architect/ivrs/{ivrId}",
        "POST /api/v2/analytics/conversations/details/query",
        "GET /api/v2/routing/queues",
    ];
    let mut out = Vec::new();
    for c in 0..clients {
        let client: Arc<str> = Arc::from(format!("client-{c:02}").as_str());
        for endpoint in endpoint_names.iter().take(endpoints) {
            out.push(LabelSet {
                upstream: upstream.clone(),
                client: client.clone(),
                endpoint: Arc::from(*endpoint),
            });
        }
    }
    out
}

/// The metric calls of one forwarded request, in pipeline order.
fn one_request(m: &Metrics, l: &LabelSet) {
    m.queue_wait(&l.upstream, "normal", "crm-sync", black_box(0.0002));
    m.inflight(&l.upstream, &l.client, 1.0);
    m.upstream_duration(&l.upstream, black_box(0.012));
    m.upstream_response(
        &l.upstream,
        &l.client,
        "crm-sync",
        &l.endpoint,
        black_box(200),
    );
    m.inflight(&l.upstream, &l.client, -1.0);
    m.request(
        &l.upstream,
        &l.client,
        "crm-sync",
        &l.endpoint,
        Outcome::Forwarded,
    );
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("metrics per forwarded request");
    for (name, sets) in [
        ("1 label set", label_sets(1, 1)),
        ("64 label sets", label_sets(16, 4)),
    ] {
        let m = Metrics::new();
        let mut i = 0usize;
        group.bench_function(name, |b| {
            b.iter(|| {
                one_request(&m, &sets[i % sets.len()]);
                i = i.wrapping_add(1);
            })
        });
        // Histogram samples are buffered until a scrape or upkeep drains them.
        m.upkeep();
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default();
    targets = bench
}

fn main() {
    if let Some(n) = std::env::var("PACER_METRICS_ITERS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        let m = Metrics::new();
        let sets = label_sets(16, 4);
        // Warm-up: every label set seen once.
        for l in &sets {
            one_request(&m, l);
        }
        for i in 0..n {
            one_request(&m, &sets[i % sets.len()]);
        }
        black_box(m.render(&[]).len());
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
