//! Prometheus metrics of one pacer instance (its own recorder, not the process-global one,
//! so several instances in one process stay apart). Counters and histograms are recorded as
//! requests happen; gauges of limiter state are read at scrape time.
//!
//! Recording is on every request's path, so the handle of each label set is kept once seen
//! ([`cache`]): a repeated label set costs a hash of the borrowed label values and a
//! lock-free look-up, not a [`Key`] of owned `String`s and a registry look-up.

use crate::recent::{Event, Recent};
use metrics::{Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use std::fmt::Write as _;
use std::sync::Arc;

pub mod apps;
mod cache;
#[cfg(test)]
mod tests;

use cache::Caches;

static META: Metadata<'static> = Metadata::new("pacer", Level::INFO, Some(module_path!()));

/// Buckets for queue waits and upstream durations, in seconds.
const BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Outcome label of `pacer_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Forwarded,
    /// Answered without the upstream: by the token broker, or from the response cache
    /// (a kept copy or a coalesced answer).
    Cached,
    Shed,
    Rejected,
    Error,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
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
    cache: Caches,
    /// The last minutes' 429s, 401s, sheds and waits per client, for `/status`.
    recent: Recent,
    /// Use per app within each client.
    apps: apps::AppUse,
}

/// `pacer_inflight` of one upstream and client, resolved once: [`InflightGauge::up`] when a
/// request is sent upstream, [`InflightGauge::down`] when its response is finished.
#[derive(Clone)]
pub struct InflightGauge(metrics::Gauge);

impl InflightGauge {
    pub fn up(&self) {
        self.0.increment(1.0);
    }

    pub fn down(&self) {
        self.0.decrement(1.0);
    }
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
        Metrics::with_cache(usize::MAX)
    }

    /// A fresh registry keeping at most `cap` label sets' handles per family.
    fn with_cache(cap: usize) -> Metrics {
        let builder = PrometheusBuilder::new();
        // Static, valid buckets: setting them cannot fail.
        let builder = match builder.set_buckets(BUCKETS) {
            Ok(b) => b,
            Err(_) => PrometheusBuilder::new(),
        };
        let recorder = builder.build_recorder();
        describe(&recorder);
        let handle = recorder.handle();
        Metrics {
            recorder,
            handle,
            cache: Caches::new(cap),
            recent: Recent::default(),
            apps: apps::AppUse::default(),
        }
    }

    /// The registry's handle of a counter (the uncached path: owned labels, a look-up).
    fn counter(&self, name: &'static str, pairs: &[(&'static str, &str)]) -> metrics::Counter {
        self.recorder
            .register_counter(&Key::from_parts(name, labels(pairs)), &META)
    }

    fn gauge(&self, name: &'static str, pairs: &[(&'static str, &str)]) -> metrics::Gauge {
        self.recorder
            .register_gauge(&Key::from_parts(name, labels(pairs)), &META)
    }

    fn histogram(&self, name: &'static str, pairs: &[(&'static str, &str)]) -> metrics::Histogram {
        self.recorder
            .register_histogram(&Key::from_parts(name, labels(pairs)), &META)
    }

    /// `pacer_requests_total`: one per request, by what became of it.
    pub fn request(
        &self,
        upstream: &str,
        client: &str,
        app: &str,
        endpoint: &str,
        outcome: Outcome,
    ) {
        let register = || {
            self.counter(
                "pacer_requests_total",
                &[
                    ("upstream", upstream),
                    ("client", client),
                    ("app", app),
                    ("endpoint", endpoint),
                    ("outcome", outcome.as_str()),
                ],
            )
        };
        self.cache.requests.with(
            [upstream, client, app, endpoint],
            outcome as u16,
            register,
            |c| c.increment(1),
        );
    }

    /// Use per app within each client since start (see [`apps::AppUse`]).
    pub fn apps(&self) -> &apps::AppUse {
        &self.apps
    }

    /// The last minutes' events per client (see [`Recent`]).
    pub fn recent(&self) -> &Recent {
        &self.recent
    }

    /// `pacer_upstream_responses_total`: one per upstream answer, by status code.
    pub fn upstream_response(
        &self,
        upstream: &str,
        client: &str,
        app: &str,
        endpoint: &str,
        status: u16,
    ) {
        if status == 429 || status == 401 {
            self.recent
                .record(upstream, client, Event::Upstream(status));
        }
        let register = || {
            self.counter(
                "pacer_upstream_responses_total",
                &[
                    ("upstream", upstream),
                    ("client", client),
                    ("app", app),
                    ("endpoint", endpoint),
                    ("status", &status.to_string()),
                ],
            )
        };
        self.cache
            .responses
            .with([upstream, client, app, endpoint], status, register, |c| {
                c.increment(1)
            });
    }

    /// `pacer_shed_total`: one per shed request, by reason.
    pub fn shed(&self, upstream: &str, client: &str, app: &str, reason: &str) {
        self.recent.record(upstream, client, Event::Shed);
        let register = || {
            self.counter(
                "pacer_shed_total",
                &[
                    ("upstream", upstream),
                    ("client", client),
                    ("app", app),
                    ("reason", reason),
                ],
            )
        };
        self.cache
            .shed
            .with([upstream, client, app, reason], 0, register, |c| {
                c.increment(1)
            });
    }

    /// `pacer_rejected_total`: one per request pacer refused itself (400, 401, 403, 404,
    /// 405, 413, 414, 431), by upstream, route prefix and status.
    pub fn rejected(&self, upstream: &str, route: &str, status: u16) {
        let register = || {
            self.counter(
                "pacer_rejected_total",
                &[
                    ("upstream", upstream),
                    ("route", route),
                    ("status", &status.to_string()),
                ],
            )
        };
        self.cache
            .rejected
            .with([upstream, route], status, register, |c| c.increment(1));
    }

    /// `pacer_cache_lookups_total`: one per request matching a `[[cache]]` entry (the
    /// entry's template), by result: `hit`, `coalesced` or `miss`.
    pub fn cache_lookup(&self, entry: &str, result: &str) {
        // Only requests under a `[[cache]]` entry: the registry's look-up is cheap beside
        // the upstream call most of them save.
        self.counter(
            "pacer_cache_lookups_total",
            &[("entry", entry), ("result", result)],
        )
        .increment(1);
    }

    /// `pacer_credential_exchanges_total`: token exchanges pacer made for a configured
    /// `[[credential]]` (a bounded set of names), by `result` (`ok` or `error`).
    pub fn credential_exchange(&self, credential: &str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.counter(
            "pacer_credential_exchanges_total",
            &[("credential", credential), ("result", result)],
        )
        .increment(1);
    }

    /// `pacer_access_log_dropped_total`: access log lines dropped because the writer was
    /// behind.
    pub fn access_log_dropped(&self) {
        self.counter("pacer_access_log_dropped_total", &[])
            .increment(1);
    }

    /// `pacer_discovery_errors_total`: a namespace of the org's published limits could
    /// not be read (`[discover]`).
    pub fn discovery_error(&self) {
        self.counter("pacer_discovery_errors_total", &[])
            .increment(1);
    }

    /// `pacer_queue_wait_seconds`.
    pub fn queue_wait(&self, upstream: &str, priority: &str, app: &str, seconds: f64) {
        let register = || {
            self.histogram(
                "pacer_queue_wait_seconds",
                &[("upstream", upstream), ("priority", priority), ("app", app)],
            )
        };
        self.cache
            .queue_wait
            .with([upstream, priority, app], 0, register, |h| {
                h.record(seconds)
            });
    }

    /// `pacer_shadow_shed_total`: a request a shadow limit (or pause) let through that
    /// enforcement would have shed.
    pub fn shadow_shed(&self, limit: &str, client: &str, reason: &str) {
        let register = || {
            self.counter(
                "pacer_shadow_shed_total",
                &[("limit", limit), ("client", client), ("reason", reason)],
            )
        };
        self.cache
            .shadow_shed
            .with([limit, client, reason], 0, register, |c| c.increment(1));
    }

    /// `pacer_shadow_wait_seconds`: the wait a shadow limit (or pause) would have imposed.
    pub fn shadow_wait(&self, limit: &str, client: &str, seconds: f64) {
        let register = || {
            self.histogram(
                "pacer_shadow_wait_seconds",
                &[("limit", limit), ("client", client)],
            )
        };
        self.cache
            .shadow_wait
            .with([limit, client], 0, register, |h| h.record(seconds));
    }

    /// `pacer_upstream_duration_seconds`: time to the upstream's response head.
    pub fn upstream_duration(&self, upstream: &str, seconds: f64) {
        let register =
            || self.histogram("pacer_upstream_duration_seconds", &[("upstream", upstream)]);
        self.cache
            .duration
            .with([upstream], 0, register, |h| h.record(seconds));
    }

    /// `pacer_inflight` up or down by one.
    pub fn inflight(&self, upstream: &str, client: &str, delta: f64) {
        self.with_inflight(upstream, client, |g| {
            if delta >= 0.0 {
                g.increment(delta);
            } else {
                g.decrement(-delta);
            }
        });
    }

    /// The `pacer_inflight` handle of one upstream and client, for a caller that holds it
    /// from sending to the end of the response (one look-up instead of two).
    pub fn inflight_gauge(&self, upstream: &str, client: &str) -> InflightGauge {
        InflightGauge(self.with_inflight(upstream, client, |g| g.clone()))
    }

    fn with_inflight<R>(
        &self,
        upstream: &str,
        client: &str,
        record: impl FnOnce(&metrics::Gauge) -> R,
    ) -> R {
        let register = || {
            self.gauge(
                "pacer_inflight",
                &[("upstream", upstream), ("client", client)],
            )
        };
        self.cache
            .inflight
            .with([upstream, client], 0, register, record)
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
    recorder.describe_counter(
        name("pacer_rejected_total"),
        None,
        text("Requests pacer refused itself (400, 401, 403, 404, 405, 413, 414, 431), by upstream, route prefix and status."),
    );
    recorder.describe_counter(
        name("pacer_cache_lookups_total"),
        None,
        text("Requests matching a [[cache]] entry, by entry template and result (hit, coalesced, miss)."),
    );
    recorder.describe_counter(
        name("pacer_credential_exchanges_total"),
        None,
        text("Client-credentials token exchanges pacer made for a [[credential]], by result."),
    );
    recorder.describe_counter(
        name("pacer_access_log_dropped_total"),
        None,
        text("Access log lines dropped because the writer was behind."),
    );
    recorder.describe_counter(
        name("pacer_discovery_errors_total"),
        None,
        text("Reads of a namespace of the org's published limits that failed ([discover]); pacer kept the limits in force."),
    );
    recorder.describe_histogram(
        name("pacer_queue_wait_seconds"),
        None,
        text("Time pacer held admitted requests before sending them: waiting in the queue and asking the counter store."),
    );
    recorder.describe_histogram(
        name("pacer_upstream_duration_seconds"),
        None,
        text("Time from sending upstream to the response head."),
    );
    recorder.describe_counter(
        name("pacer_shadow_shed_total"),
        None,
        text("Requests a shadow limit or pause let through that enforcement would have shed, by reason."),
    );
    recorder.describe_histogram(
        name("pacer_shadow_wait_seconds"),
        None,
        text(
            "Waits a shadow limit or pause would have imposed on requests it let through at once.",
        ),
    );
    recorder.describe_gauge(
        name("pacer_inflight"),
        None,
        text("Requests sent upstream whose response is not finished."),
    );
}

/// `pacer_build_info` and the standard `process_*` metrics of the whole process (the ones
/// Prometheus' own client libraries export), read from the OS at scrape time and appended
/// to `out`. They describe the process, not one configuration, so they are kept out of
/// [`Metrics::render`].
pub fn render_process(out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP pacer_build_info The running pacer's version and target; always 1.\n\
         # TYPE pacer_build_info gauge\n\
         pacer_build_info{{version=\"{}\",os=\"{}\",arch=\"{}\"}} 1",
        escape(env!("CARGO_PKG_VERSION")),
        std::env::consts::OS,
        std::env::consts::ARCH,
    );
    let p = metrics_process::collector::collect();
    let mut family = |name: &str, kind: &str, help: &str, value: Option<f64>| {
        if let Some(v) = value {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
    };
    let num = |v: Option<u64>| v.map(|v| v as f64);
    family(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        p.cpu_seconds_total,
    );
    family(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        num(p.resident_memory_bytes),
    );
    family(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        num(p.virtual_memory_bytes),
    );
    // The collector reports an unlimited address space as 0: left out rather than shown
    // as a limit of nothing.
    family(
        "process_virtual_memory_max_bytes",
        "gauge",
        "Maximum amount of virtual memory available in bytes.",
        num(p.virtual_memory_max_bytes.filter(|v| *v > 0)),
    );
    family(
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        num(p.open_fds),
    );
    family(
        "process_max_fds",
        "gauge",
        "Maximum number of open file descriptors.",
        num(p.max_fds.filter(|v| *v > 0)),
    );
    family(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        num(p.start_time_seconds),
    );
    family(
        "process_threads",
        "gauge",
        "Number of OS threads in the process.",
        num(p.threads),
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

/// Bounded metric labels of one request, filled in by the phases as they learn them.
#[derive(Debug, Default)]
pub struct RequestLabels {
    pub upstream: Option<Arc<str>>,
    /// The configured prefix of the request's route.
    pub route: Option<Arc<str>>,
    pub client: Option<Arc<str>>,
    /// The application behind the caller (see [`crate::identity::app`]).
    pub app: Option<Arc<str>>,
    pub endpoint: Option<Arc<str>>,
    pub priority: Option<crate::config::Priority>,
    /// Time held before sending: the queue and the counter store.
    pub queue_wait: Option<std::time::Duration>,
    /// Time from sending upstream to the response head (or the failure).
    pub upstream_time: Option<std::time::Duration>,
}

impl RequestLabels {
    /// The upstream's name, or `none` before routing.
    pub fn upstream(&self) -> &str {
        self.upstream.as_deref().unwrap_or("none")
    }

    /// The route's prefix, or `none` before routing.
    pub fn route(&self) -> &str {
        self.route.as_deref().unwrap_or("none")
    }

    /// The caller's label, or `unknown` before identification.
    pub fn client(&self) -> &str {
        self.client.as_deref().unwrap_or("unknown")
    }

    /// The caller's application, or `unknown` before identification.
    pub fn app(&self) -> &str {
        self.app.as_deref().unwrap_or("unknown")
    }

    /// The endpoint template, or `none` before classification.
    pub fn endpoint(&self) -> &str {
        self.endpoint.as_deref().unwrap_or("none")
    }
}
