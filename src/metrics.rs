//! Prometheus metrics of one pacer instance (its own recorder, not the process-global one,
//! so several instances in one process stay apart). Counters and histograms are recorded as
//! requests happen; gauges of limiter state are read at scrape time.
//!
//! Recording is on every request's path, so the handle of each label set is kept once seen
//! ([`HandleCache`]): a repeated label set costs a hash of the borrowed label values and a
//! lock-free look-up, not a [`Key`] of owned `String`s and a registry look-up.

use crate::recent::{Event, Recent};
use metrics::{Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use std::fmt::Write as _;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, OnceLock};

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
}

/// Label sets whose handles are kept, per family (powers of two). Label values reaching
/// [`Metrics`] are bounded already (configured upstreams, endpoint templates, at most a few
/// hundred client labels, enums), so these are rarely full; a label set that finds no slot
/// is recorded through the registry as before: the same result, only slower.
const REQUEST_SLOTS: usize = 4096;
const RESPONSE_SLOTS: usize = 4096;
const SHED_SLOTS: usize = 1024;
const INFLIGHT_SLOTS: usize = 1024;
const QUEUE_WAIT_SLOTS: usize = 256;
const DURATION_SLOTS: usize = 64;
const REJECTED_SLOTS: usize = 256;
const SHADOW_SLOTS: usize = 1024;

/// Slots a look-up tries before it takes the uncached path.
const PROBES: usize = 8;

/// The handle caches of one [`Metrics`].
struct Caches {
    requests: HandleCache<metrics::Counter, 3>,
    responses: HandleCache<metrics::Counter, 3>,
    shed: HandleCache<metrics::Counter, 3>,
    inflight: HandleCache<metrics::Gauge, 2>,
    queue_wait: HandleCache<metrics::Histogram, 2>,
    duration: HandleCache<metrics::Histogram, 1>,
    rejected: HandleCache<metrics::Counter, 2>,
    shadow_shed: HandleCache<metrics::Counter, 3>,
    shadow_wait: HandleCache<metrics::Histogram, 2>,
}

impl Caches {
    /// Every family with at most `cap` slots (0: nothing cached).
    fn new(cap: usize) -> Caches {
        let n = |slots: usize| slots.min(cap);
        Caches {
            requests: HandleCache::new(n(REQUEST_SLOTS)),
            responses: HandleCache::new(n(RESPONSE_SLOTS)),
            shed: HandleCache::new(n(SHED_SLOTS)),
            inflight: HandleCache::new(n(INFLIGHT_SLOTS)),
            queue_wait: HandleCache::new(n(QUEUE_WAIT_SLOTS)),
            duration: HandleCache::new(n(DURATION_SLOTS)),
            rejected: HandleCache::new(n(REJECTED_SLOTS)),
            shadow_shed: HandleCache::new(n(SHADOW_SLOTS)),
            shadow_wait: HandleCache::new(n(SHADOW_SLOTS)),
        }
    }
}

/// Handles of one metric family by label values: `N` strings and one small number (an enum's
/// index or a status code). Insert-only open addressing over a fixed array of `OnceLock`s:
/// a hit reads the slots it probes and writes nothing shared (no lock, no reference count);
/// a miss fills an empty slot once, racing writers settle on one entry per slot. Entries
/// live as long as the recorder's own (it removes none: no idle timeout is set).
struct HandleCache<H, const N: usize> {
    slots: Box<[OnceLock<Box<Entry<H, N>>>]>,
    hasher: foldhash::fast::RandomState,
}

struct Entry<H, const N: usize> {
    strs: [Box<str>; N],
    num: u16,
    handle: H,
}

impl<H, const N: usize> Entry<H, N> {
    fn is(&self, strs: &[&str; N], num: u16) -> bool {
        self.num == num && self.strs.iter().zip(strs).all(|(a, b)| **a == **b)
    }
}

impl<H, const N: usize> HandleCache<H, N> {
    /// A cache of `slots` slots, rounded down to a power of two (0: caches nothing).
    fn new(slots: usize) -> Self {
        let slots = match slots {
            0 => 0,
            n => 1usize << n.ilog2(),
        };
        HandleCache {
            slots: (0..slots).map(|_| OnceLock::new()).collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// Runs `record` on the handle of this label set: the kept one, or one from `register`
    /// (which is called at most once), kept if a slot is free within [`PROBES`].
    fn with<R>(
        &self,
        strs: [&str; N],
        num: u16,
        register: impl Fn() -> H,
        record: impl FnOnce(&H) -> R,
    ) -> R {
        match self.get(&strs, num, &register) {
            Some(h) => record(h),
            None => record(&register()),
        }
    }

    fn get(&self, strs: &[&str; N], num: u16, register: &impl Fn() -> H) -> Option<&H> {
        if self.slots.is_empty() {
            return None;
        }
        let mut hasher = self.hasher.build_hasher();
        strs.hash(&mut hasher);
        num.hash(&mut hasher);
        let start = hasher.finish() as usize;
        let mask = self.slots.len() - 1;
        for probe in 0..PROBES.min(self.slots.len()) {
            let slot = &self.slots[start.wrapping_add(probe) & mask];
            let entry = slot.get_or_init(|| {
                Box::new(Entry {
                    strs: strs.map(Box::from),
                    num,
                    handle: register(),
                })
            });
            if entry.is(strs, num) {
                return Some(&entry.handle);
            }
        }
        None
    }

    /// Label sets kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.get().is_some()).count()
    }
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
    pub fn request(&self, upstream: &str, client: &str, endpoint: &str, outcome: Outcome) {
        let register = || {
            self.counter(
                "pacer_requests_total",
                &[
                    ("upstream", upstream),
                    ("client", client),
                    ("endpoint", endpoint),
                    ("outcome", outcome.as_str()),
                ],
            )
        };
        self.cache.requests.with(
            [upstream, client, endpoint],
            outcome as u16,
            register,
            |c| c.increment(1),
        );
    }

    /// The last minutes' events per client (see [`Recent`]).
    pub fn recent(&self) -> &Recent {
        &self.recent
    }

    /// `pacer_upstream_responses_total`: one per upstream answer, by status code.
    pub fn upstream_response(&self, upstream: &str, client: &str, endpoint: &str, status: u16) {
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
                    ("endpoint", endpoint),
                    ("status", &status.to_string()),
                ],
            )
        };
        self.cache
            .responses
            .with([upstream, client, endpoint], status, register, |c| {
                c.increment(1)
            });
    }

    /// `pacer_shed_total`: one per shed request, by reason.
    pub fn shed(&self, upstream: &str, client: &str, reason: &str) {
        self.recent.record(upstream, client, Event::Shed);
        let register = || {
            self.counter(
                "pacer_shed_total",
                &[
                    ("upstream", upstream),
                    ("client", client),
                    ("reason", reason),
                ],
            )
        };
        self.cache
            .shed
            .with([upstream, client, reason], 0, register, |c| c.increment(1));
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

    /// `pacer_access_log_dropped_total`: access log lines dropped because the writer was
    /// behind.
    pub fn access_log_dropped(&self) {
        self.counter("pacer_access_log_dropped_total", &[])
            .increment(1);
    }

    /// `pacer_queue_wait_seconds`.
    pub fn queue_wait(&self, upstream: &str, priority: &str, seconds: f64) {
        let register = || {
            self.histogram(
                "pacer_queue_wait_seconds",
                &[("upstream", upstream), ("priority", priority)],
            )
        };
        self.cache
            .queue_wait
            .with([upstream, priority], 0, register, |h| h.record(seconds));
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
        name("pacer_access_log_dropped_total"),
        None,
        text("Access log lines dropped because the writer was behind."),
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
                        m.queue_wait("api", "normal", 0.002 * f64::from(round));
                        m.inflight("api", client, 1.0);
                        m.upstream_duration("api", 0.05);
                        let status = if e == 1 && round == 4 { 429 } else { 200 };
                        m.upstream_response("api", client, endpoint, status);
                        m.inflight("api", client, -1.0);
                        m.request("api", client, endpoint, Outcome::Forwarded);
                    }
                }
            }
            m.request("auth", "unknown", "none", Outcome::Rejected);
            m.shed("api", "crm", "queue_full");
            m.request("api", "crm", endpoints[0], Outcome::Shed);
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
            format!("pacer_requests_total{{upstream=\"api\",client=\"{c}\",endpoint=\"{e}\",outcome=\"{o}\"}}")
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
                "pacer_requests_total{upstream=\"auth\",client=\"unknown\",endpoint=\"none\",outcome=\"rejected\"}"
            ),
            Some(5.0),
            "{text}"
        );
        let resp = |c: &str, e: &str, s: u16| {
            format!("pacer_upstream_responses_total{{upstream=\"api\",client=\"{c}\",endpoint=\"{e}\",status=\"{s}\"}}")
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
                "pacer_shed_total{upstream=\"api\",client=\"crm\",reason=\"queue_full\"}"
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
                "pacer_queue_wait_seconds_count{upstream=\"api\",priority=\"normal\"}"
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
                        m.request("api", &client, "GET /x", Outcome::Forwarded);
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
                    &format!("pacer_requests_total{{upstream=\"api\",client=\"c{c}\",endpoint=\"GET /x\",outcome=\"forwarded\"}}"),
                )
            })
            .sum();
        assert_eq!(total, 8000.0, "{text}");
        assert!(m.cache.requests.len() <= 16);
    }
}

/// Bounded metric labels of one request, filled in by the phases as they learn them.
#[derive(Debug, Default)]
pub struct RequestLabels {
    pub upstream: Option<Arc<str>>,
    /// The configured prefix of the request's route.
    pub route: Option<Arc<str>>,
    pub client: Option<Arc<str>>,
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

    /// The endpoint template, or `none` before classification.
    pub fn endpoint(&self) -> &str {
        self.endpoint.as_deref().unwrap_or("none")
    }
}
