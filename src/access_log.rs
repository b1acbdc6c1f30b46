//! The access log: one line per request on stdout, JSON or `key=value` text.
//!
//! A line is written when the request's answer has been sent (its body ended or was
//! dropped), so it carries the bytes really sent and the whole time taken. Lines go through a
//! bounded queue to one writer thread: a slow or blocked stdout never holds a request up; a
//! line that finds the queue full is dropped and counted in `pacer_access_log_dropped_total`.
//!
//! Every field is bounded and free of secrets: the endpoint template and the route prefix,
//! never the raw path or query; labels, never tokens or keys.

use crate::answer::{BoxError, ProxyBody};
use crate::config::{LogConfig, LogFormat};
use crate::metrics::{Metrics, Outcome, RequestLabels};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use serde::Serialize;
use std::io::Write;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

/// Lines the queue to the writer holds before new ones are dropped.
pub const QUEUE_LINES: usize = 8192;

/// Where access log lines go: a bounded queue in front of one writer thread. Cheap to
/// clone; the thread ends when the last clone is gone, after writing what is queued.
#[derive(Clone)]
pub struct LogSink {
    tx: SyncSender<String>,
}

impl LogSink {
    /// Lines to the process's stdout.
    pub fn stdout() -> LogSink {
        LogSink::spawn(std::io::stdout(), QUEUE_LINES)
    }

    /// Lines to `out`, at most `capacity` waiting.
    pub fn spawn(mut out: impl Write + Send + 'static, capacity: usize) -> LogSink {
        let (tx, rx) = mpsc::sync_channel::<String>(capacity);
        let writer = move || {
            // A failed write (stdout closed) loses that line, never the writer: the queue
            // keeps draining so that nothing waits on it.
            while let Ok(line) = rx.recv() {
                let _ = out.write_all(line.as_bytes());
                // Write what else is waiting before one flush.
                while let Ok(line) = rx.try_recv() {
                    let _ = out.write_all(line.as_bytes());
                }
                let _ = out.flush();
            }
        };
        let spawned = std::thread::Builder::new()
            .name("pacer-access-log".into())
            .spawn(writer);
        if let Err(e) = spawned {
            // Without a thread the queue has no reader: lines are dropped and counted.
            tracing::error!(error = %e, "cannot start the access log writer");
        }
        LogSink { tx }
    }

    /// Queues one line (ending in `\n`); false when the queue is full or the writer gone.
    fn send(&self, line: String) -> bool {
        match self.tx.try_send(line) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }
}

/// The access log of one configuration: its format and the shared sink.
#[derive(Clone)]
pub struct AccessLog {
    sink: LogSink,
    format: LogFormat,
    metrics: Arc<Metrics>,
}

impl AccessLog {
    /// The access log `config` asks for, or none when `[log] access = false`.
    pub fn new(config: &LogConfig, sink: LogSink, metrics: Arc<Metrics>) -> Option<AccessLog> {
        config.access.then_some(AccessLog {
            sink,
            format: config.format,
            metrics,
        })
    }

    /// Writes the line of `record` once `resp`'s body has ended or been dropped.
    pub fn on_answer(&self, resp: Response<ProxyBody>, record: Record) -> Response<ProxyBody> {
        let log = self.clone();
        resp.map(|inner| {
            LoggedBody {
                inner,
                sent: 0,
                pending: Some(Box::new((log, record))),
            }
            .boxed_unsync()
        })
    }

    fn write(&self, record: &Record, bytes_out: u64) {
        let line = match self.format {
            LogFormat::Json => record.json(bytes_out),
            LogFormat::Text => record.text(bytes_out),
        };
        if !self.sink.send(line) {
            self.metrics.access_log_dropped();
        }
    }
}

/// What one request's line says, gathered as the request goes.
pub struct Record {
    /// When the request arrived.
    pub at: SystemTime,
    pub started: Instant,
    pub method: Method,
    pub labels: RequestLabels,
    pub outcome: Outcome,
    pub status: u16,
    /// `x-pacer-reason` of pacer's own answer.
    pub reason: Option<HeaderValue>,
    pub request_id: HeaderValue,
    /// `inin-correlation-id` of the answer (the `contextId` of pacer's own answers).
    pub correlation_id: Option<HeaderValue>,
    /// Request body bytes read, counted by [`counted`].
    pub bytes_in: Arc<AtomicU64>,
}

impl Record {
    /// The answer's facts: status, correlation id and, for pacer's `own` answers, the reason
    /// (an upstream's `x-pacer-reason` is not pacer's).
    pub fn answered(&mut self, status: u16, headers: &HeaderMap, own: bool) {
        self.status = status;
        self.reason = own
            .then(|| headers.get("x-pacer-reason").cloned())
            .flatten();
        self.correlation_id = headers.get("inin-correlation-id").cloned();
    }

    fn line(&self, bytes_out: u64) -> Line<'_> {
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let text = |v: &HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
        Line {
            time: humantime::format_rfc3339_millis(self.at).to_string(),
            method: self.method.as_str(),
            endpoint: self.labels.endpoint(),
            route: self.labels.route(),
            upstream: self.labels.upstream(),
            client: self.labels.client(),
            app: self.labels.app(),
            priority: self.labels.priority.map(|p| p.as_str()),
            status: self.status,
            outcome: self.outcome.as_str(),
            reason: self.reason.as_ref().map(text),
            queue_wait_ms: self.labels.queue_wait.map(ms),
            upstream_ms: self.labels.upstream_time.map(ms),
            total_ms: ms(self.started.elapsed()),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out,
            request_id: text(&self.request_id),
            correlation_id: self.correlation_id.as_ref().map(text),
        }
    }

    fn json(&self, bytes_out: u64) -> String {
        // Strings and numbers only: serializing cannot fail.
        let mut line = serde_json::to_string(&self.line(bytes_out)).unwrap_or_default();
        line.push('\n');
        line
    }

    fn text(&self, bytes_out: u64) -> String {
        let l = self.line(bytes_out);
        let mut out = String::with_capacity(320);
        let mut field = |k: &str, v: &str| {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(k);
            out.push('=');
            push_text_value(&mut out, v);
        };
        let opt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
        field("time", &l.time);
        field("method", l.method);
        field("endpoint", l.endpoint);
        field("route", l.route);
        field("upstream", l.upstream);
        field("client", l.client);
        field("app", l.app);
        field("priority", l.priority.unwrap_or("-"));
        field("status", &l.status.to_string());
        field("outcome", l.outcome);
        field("reason", l.reason.as_deref().unwrap_or("-"));
        field("queue_wait_ms", &opt(l.queue_wait_ms));
        field("upstream_ms", &opt(l.upstream_ms));
        field("total_ms", &l.total_ms.to_string());
        field("bytes_in", &l.bytes_in.to_string());
        field("bytes_out", &l.bytes_out.to_string());
        field("request_id", &l.request_id);
        field("correlation_id", l.correlation_id.as_deref().unwrap_or("-"));
        out.push('\n');
        out
    }
}

/// A value of the text format: bare when plain, else quoted with `"` and `\` escaped.
fn push_text_value(out: &mut String, v: &str) {
    let plain = !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '\\' && c != '=');
    if plain {
        out.push_str(v);
        return;
    }
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&c.escape_default().to_string()),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// One access log line; field names are the contract of the JSON format.
#[derive(Serialize)]
struct Line<'a> {
    time: String,
    method: &'a str,
    endpoint: &'a str,
    route: &'a str,
    upstream: &'a str,
    client: &'a str,
    /// The application behind the client (see [`crate::identity::app`]).
    app: &'a str,
    priority: Option<&'static str>,
    status: u16,
    outcome: &'static str,
    reason: Option<String>,
    queue_wait_ms: Option<f64>,
    upstream_ms: Option<f64>,
    total_ms: f64,
    bytes_in: u64,
    bytes_out: u64,
    request_id: String,
    correlation_id: Option<String>,
}

/// An answer body that counts what it sends and writes the request's line when it ends,
/// fails or is dropped.
struct LoggedBody {
    inner: ProxyBody,
    sent: u64,
    pending: Option<Box<(AccessLog, Record)>>,
}

impl LoggedBody {
    fn finish(&mut self) {
        if let Some(p) = self.pending.take() {
            let (log, record) = &*p;
            log.write(record, self.sent);
        }
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                }
            }
            Poll::Ready(None | Some(Err(_))) => self.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// `body`, counting the bytes read from it into `read` (http-body-util's `map_frame`).
pub fn counted(body: ProxyBody, read: Arc<AtomicU64>) -> ProxyBody {
    body.map_frame(move |frame| {
        if let Some(data) = frame.data_ref() {
            read.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        frame
    })
    .boxed_unsync()
}

/// Longest caller-supplied `x-request-id` kept.
const MAX_REQUEST_ID: usize = 128;

/// The request's id: the caller's `x-request-id` when it is short and plain (letters,
/// digits, `-_.:/+=@`), else a fresh random one. Written back into `headers`, so it is
/// forwarded upstream.
pub fn request_id(headers: &mut HeaderMap) -> HeaderValue {
    let valid = |v: &HeaderValue| {
        let b = v.as_bytes();
        !b.is_empty()
            && b.len() <= MAX_REQUEST_ID
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.:/+=@".contains(c))
    };
    let mut ids = headers.get_all(REQUEST_ID).iter();
    let id = match (ids.next(), ids.next()) {
        (Some(v), None) if valid(v) => v.clone(),
        // Hex digits and dashes are always a valid header value.
        _ => HeaderValue::from_str(&crate::answer::context_id())
            .unwrap_or_else(|_| HeaderValue::from_static("-")),
    };
    headers.insert(REQUEST_ID, id.clone());
    id
}

/// The request id header: kept or made by pacer, forwarded upstream, echoed on the answer.
pub const REQUEST_ID: &str = "x-request-id";

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A writer that appends to a shared buffer; blocks while `gate` is held.
    #[derive(Clone, Default)]
    struct Shared {
        buf: Arc<Mutex<Vec<u8>>>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let _open = self.gate.lock().unwrap_or_else(|p| p.into_inner());
            self.buf
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn record() -> Record {
        let labels = RequestLabels {
            upstream: Some("api".into()),
            endpoint: Some("GET /api/v2/users/{userId}".into()),
            ..Default::default()
        };
        Record {
            at: SystemTime::UNIX_EPOCH,
            started: Instant::now(),
            method: Method::GET,
            labels,
            outcome: Outcome::Forwarded,
            status: 200,
            reason: None,
            request_id: HeaderValue::from_static("rid-1"),
            correlation_id: Some(HeaderValue::from_static("ctx \"1\"")),
            bytes_in: Arc::new(AtomicU64::new(7)),
        }
    }

    #[test]
    fn json_line_has_every_field() {
        let line = record().json(42);
        assert!(line.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["time"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["endpoint"], "GET /api/v2/users/{userId}");
        assert_eq!(v["route"], "none");
        assert_eq!(v["client"], "unknown");
        assert_eq!(v["app"], "unknown");
        assert_eq!(v["bytes_in"], 7);
        assert_eq!(v["bytes_out"], 42);
        assert_eq!(v["queue_wait_ms"], serde_json::Value::Null);
        assert_eq!(v["correlation_id"], "ctx \"1\"");
    }

    #[test]
    fn text_line_quotes_values_with_spaces_and_quotes() {
        let line = record().text(0);
        assert!(
            line.contains(" endpoint=\"GET /api/v2/users/{userId}\" "),
            "{line}"
        );
        assert!(
            line.contains(" correlation_id=\"ctx \\\"1\\\"\"\n"),
            "{line}"
        );
        assert!(
            line.contains(" status=200 outcome=forwarded reason=- "),
            "{line}"
        );
    }

    #[test]
    fn a_full_queue_drops_lines_and_counts_them() {
        let out = Shared::default();
        let metrics = Arc::new(Metrics::new());
        let config = LogConfig::default();
        let held = out.gate.lock().unwrap();
        let log = AccessLog::new(&config, LogSink::spawn(out.clone(), 2), metrics.clone()).unwrap();
        // The writer takes one line and blocks on the gate; two more fill the queue.
        for _ in 0..10 {
            log.write(&record(), 0);
        }
        drop(held);
        let text = metrics.render(&[]);
        let dropped = text
            .lines()
            .find_map(|l| l.strip_prefix("pacer_access_log_dropped_total "))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        assert!((7..=9).contains(&dropped), "{text}");
        drop(log);
        // Lines that were queued are all written once the writer is free.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let n = out.buf.lock().unwrap().split(|b| *b == b'\n').count() - 1;
            if n as u64 == 10 - dropped {
                break;
            }
            assert!(Instant::now() < deadline, "{n} lines written");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn request_id_keeps_a_plain_one_and_replaces_the_rest() {
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&mut h), "abc-123");
        for bad in ["has space", "quote\"", ""] {
            let mut h = HeaderMap::new();
            h.insert(REQUEST_ID, HeaderValue::from_str(bad).unwrap());
            let id = request_id(&mut h);
            assert_ne!(id, bad);
            assert_eq!(id.len(), 36);
            assert_eq!(h.get(REQUEST_ID), Some(&id));
        }
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID, HeaderValue::from_static("x".repeat(129).leak()));
        assert_eq!(request_id(&mut h).len(), 36);
        let mut h = HeaderMap::new();
        assert_eq!(request_id(&mut h).len(), 36);
    }
}
