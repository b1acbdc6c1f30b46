//! Prometheus metrics of one pacer instance (its own recorder, not the process-global one,
//! so several instances in one process stay apart). Counters and histograms are recorded as
//! requests happen; gauges of limiter state are read at scrape time.

use metrics::{Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use std::fmt::Write as _;
use std::sync::Arc;

static META: Metadata<'static> = Metadata::new("pacer", Level::INFO, Some(module_path!()));

/// Buckets for queue waits and upstream durations, in seconds.
const BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Outcome label of `pacer_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Forwarded,
    /// Answered by the token broker without the upstream.
    Cached,
    Shed,
    Rejected,
    Error,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::Cached => "cached",
            Outcome::Shed => "shed",
            Outcome::Rejected => "rejected",
            Outcome::Error => "error",
        }
    }
}

/// The metrics of one instance.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn labels(pairs: &[(&'static str, &str)]) -> Vec<Label> {
    pairs
        .iter()
        .map(|(k, v)| Label::new(*k, v.to_string()))
        .collect()
}

impl Metrics {
    /// A fresh registry.
    pub fn new() -> Metrics {
        let builder = PrometheusBuilder::new();
        // Static, valid buckets: setting them cannot fail.
        let builder = match builder.set_buckets(BUCKETS) {
            Ok(b) => b,
            Err(_) => PrometheusBuilder::new(),
        };
        let recorder = builder.build_recorder();
        describe(&recorder);
        let handle = recorder.handle();
        Metrics { recorder, handle }
    }

    fn counter(&self, name: &'static str, pairs: &[(&'static str, &str)]) {
        self.recorder
            .register_counter(&Key::from_parts(name, labels(pairs)), &META)
            .increment(1);
    }

    /// `pacer_requests_total`: one per request, by what became of it.
    pub fn request(&self, upstream: &str, client: &str, endpoint: &str, outcome: Outcome) {
        self.counter(
            "pacer_requests_total",
            &[
                ("upstream", upstream),
                ("client", client),
                ("endpoint", endpoint),
                ("outcome", outcome.as_str()),
            ],
        );
    }

    /// `pacer_upstream_responses_total`: one per upstream answer, by status code.
    pub fn upstream_response(&self, upstream: &str, client: &str, endpoint: &str, status: u16) {
        let status = status.to_string();
        self.counter(
            "pacer_upstream_responses_total",
            &[
                ("upstream", upstream),
                ("client", client),
                ("endpoint", endpoint),
                ("status", &status),
            ],
        );
    }

    /// `pacer_shed_total`: one per shed request, by reason.
    pub fn shed(&self, upstream: &str, client: &str, reason: &str) {
        self.counter(
            "pacer_shed_total",
            &[
                ("upstream", upstream),
                ("client", client),
                ("reason", reason),
            ],
        );
    }

    /// `pacer_queue_wait_seconds`.
    pub fn queue_wait(&self, upstream: &str, priority: &str, seconds: f64) {
        self.recorder
            .register_histogram(
                &Key::from_parts(
                    "pacer_queue_wait_seconds",
                    labels(&[("upstream", upstream), ("priority", priority)]),
                ),
                &META,
            )
            .record(seconds);
    }

    /// `pacer_upstream_duration_seconds`: time to the upstream's response head.
    pub fn upstream_duration(&self, upstream: &str, seconds: f64) {
        self.recorder
            .register_histogram(
                &Key::from_parts(
                    "pacer_upstream_duration_seconds",
                    labels(&[("upstream", upstream)]),
                ),
                &META,
            )
            .record(seconds);
    }

    /// `pacer_inflight` up or down by one.
    pub fn inflight(&self, upstream: &str, client: &str, delta: f64) {
        let g = self.recorder.register_gauge(
            &Key::from_parts(
                "pacer_inflight",
                labels(&[("upstream", upstream), ("client", client)]),
            ),
            &META,
        );
        if delta >= 0.0 {
            g.increment(delta);
        } else {
            g.decrement(-delta);
        }
    }

    /// Prometheus text of the recorded metrics followed by `gauges`.
    pub fn render(&self, gauges: &[Gauge]) -> String {
        let mut out = self.handle.render();
        for g in gauges {
            let _ = writeln!(out, "# HELP {} {}", g.name, g.help);
            let _ = writeln!(out, "# TYPE {} gauge", g.name);
            for (labels, value) in &g.samples {
                let _ = write!(out, "{}", g.name);
                if !labels.is_empty() {
                    out.push('{');
                    for (i, (k, v)) in labels.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        let _ = write!(out, "{k}=\"{}\"", escape(v));
                    }
                    out.push('}');
                }
                let _ = writeln!(out, " {value}");
            }
        }
        out
    }

    /// Drains histogram buffers; call periodically when nobody scrapes.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

/// HELP text of the recorded metrics (the gauges read at scrape time carry their own).
fn describe(recorder: &PrometheusRecorder) {
    use metrics::{KeyName, SharedString};
    let text = |t: &'static str| SharedString::const_str(t);
    let name = KeyName::from_const_str;
    recorder.describe_counter(
        name("pacer_requests_total"),
        None,
        text("Requests, by upstream, client, endpoint template and outcome."),
    );
    recorder.describe_counter(
        name("pacer_upstream_responses_total"),
        None,
        text("Upstream answers, by upstream, client, endpoint template and status."),
    );
    recorder.describe_counter(
        name("pacer_shed_total"),
        None,
        text("Requests pacer answered 429 itself, by reason."),
    );
    recorder.describe_histogram(
        name("pacer_queue_wait_seconds"),
        None,
        text("Time admitted requests waited in the queue."),
    );
    recorder.describe_histogram(
        name("pacer_upstream_duration_seconds"),
        None,
        text("Time from sending upstream to the response head."),
    );
    recorder.describe_gauge(
        name("pacer_inflight"),
        None,
        text("Requests sent upstream whose response is not finished."),
    );
}

/// A gauge read from live state at scrape time.
pub struct Gauge {
    pub name: &'static str,
    pub help: &'static str,
    pub samples: Vec<(Vec<(&'static str, String)>, f64)>,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_gauges() {
        let m = Metrics::new();
        m.request("api", "ivr", "GET /x", Outcome::Forwarded);
        m.request("api", "ivr", "GET /x", Outcome::Forwarded);
        m.upstream_response("api", "ivr", "GET /x", 429);
        m.queue_wait("api", "normal", 0.02);
        let text = m.render(&[Gauge {
            name: "pacer_queue_depth",
            help: "Requests waiting.",
            samples: vec![(
                vec![("upstream", "a\"b".into()), ("priority", "bulk".into())],
                3.0,
            )],
        }]);
        assert!(text.contains("pacer_requests_total{upstream=\"api\",client=\"ivr\",endpoint=\"GET /x\",outcome=\"forwarded\"} 2"), "{text}");
        assert!(text.contains("status=\"429\"} 1"), "{text}");
        assert!(text.contains("pacer_queue_wait_seconds_bucket"), "{text}");
        assert!(
            text.contains("pacer_queue_depth{upstream=\"a\\\"b\",priority=\"bulk\"} 3"),
            "{text}"
        );
    }
}

/// Bounded metric labels of one request, filled in by the phases as they learn them.
#[derive(Debug, Default)]
pub struct RequestLabels {
    pub upstream: Option<Arc<str>>,
    pub client: Option<Arc<str>>,
    pub endpoint: Option<Arc<str>>,
}

impl RequestLabels {
    /// The upstream's name, or `none` before routing.
    pub fn upstream(&self) -> &str {
        self.upstream.as_deref().unwrap_or("none")
    }

    /// The caller's label, or `unknown` before identification.
    pub fn client(&self) -> &str {
        self.client.as_deref().unwrap_or("unknown")
    }

    /// The endpoint template, or `none` before classification.
    pub fn endpoint(&self) -> &str {
        self.endpoint.as_deref().unwrap_or("none")
    }
}
