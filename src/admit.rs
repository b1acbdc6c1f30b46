//! The admission phase: classify the endpoint, reserve room in every matching limit
//! (now, or after waiting in the queue), or shed with `Retry-After`. Concurrency stays held
//! until the response body has been sent completely, failed, or been dropped.
//!
//! An [`Admitted`] request can only be made here, and forwarding takes nothing else: a
//! request that skipped identity or admission cannot reach an upstream.
//!
//! ```compile_fail,E0308
//! // Forwarding takes an admitted request; an identified one does not type-check.
//! async fn skip(forward: &pacer::forward::Forward, req: pacer::identity::Identified) {
//!     let _ = forward.send(req).await;
//! }
//! ```
//!
//! ```compile_fail,E0451
//! // Nor can an `Admitted` be made outside admission: its fields are private.
//! fn forge(req: http::Request<pacer::answer::ProxyBody>) -> pacer::admit::Admitted {
//!     pacer::admit::Admitted { req }
//! }
//! ```
//!
//! ```
//! // What does compile: forwarding what admission let through.
//! async fn forward(forward: &pacer::forward::Forward, req: pacer::admit::Admitted) {
//!     let _ = forward.send(req).await;
//! }
//! ```

use crate::adaptive::{Adaptive, Generation};
use crate::answer::{BoxError, ProxyBody};
use crate::deadline::{self, CallerMaxWait};
use crate::error::{ErrorKind, ProxyError};
use crate::identity::{App, Caller, Identified};
use crate::limit::LayerKey;
use crate::metrics::{InflightGauge, Metrics, RequestLabels};
use crate::queue::{Admission, JobHold, Permit, Reservation};
use crate::recent::Event;
use crate::route::{RouteMatch, Routed};
use crate::server::ConnInfo;
use crate::shadow::{pause_label, verdict, Subject, Verdict};
use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// The admission phase.
pub struct Admit {
    admission: Admission,
    adaptive: Arc<Adaptive>,
    metrics: Arc<Metrics>,
    /// `[queue] max_wait`, unless the route sets its own.
    max_wait: Duration,
    /// Other replicas share cuts (Redis state): merge theirs before each admission.
    shared: bool,
}

/// A request admitted under its limits, ready to be forwarded; only [`Admit::admit`]
/// makes one.
pub struct Admitted {
    req: Request<ProxyBody>,
    query: Option<String>,
    conn: ConnInfo,
    answering: Answering,
}

impl Admitted {
    /// The request's route.
    pub fn route(&self) -> &RouteMatch {
        &self.answering.route
    }

    /// It was answered without going upstream (an identical request admitted just before
    /// answered for it): what it holds is given back, its sends uncounted.
    pub(crate) fn unsent(self) {
        let mut answering = self.answering;
        answering.held.permit.unsent();
    }

    /// The parts the forwarding phase sends, and what stays for the answer.
    pub(crate) fn into_parts(self) -> (Request<ProxyBody>, Option<String>, ConnInfo, Answering) {
        (self.req, self.query, self.conn, self.answering)
    }
}

/// What an admitted request keeps while its answer comes back: the facts the learning
/// phase needs, and the concurrency it holds.
pub struct Answering {
    pub route: RouteMatch,
    /// The request's method, for what its answer may say (a job's `DELETE`).
    pub method: http::Method,
    pub caller: Caller,
    /// The application that sent it.
    pub app: App,
    /// The limiter keys the request was admitted under.
    pub layers: Vec<LayerKey>,
    /// The adaptive cut in force at admission, so that a 429 is judged against it.
    pub generation: Generation,
    /// The job slots of a job's creation, until its answer keeps them or gives them back
    /// (see [`crate::jobs`]).
    pub job: Option<JobHold>,
    held: InFlight,
    /// `RateLimit-Policy` and `RateLimit` of the tightest layer.
    rate_headers: Option<(String, String)>,
}

impl Answering {
    /// The upstream has answered (or failed): the answer gets the `RateLimit` headers and
    /// holds the request's concurrency until its body ends.
    pub fn finish(
        self,
        result: Result<Response<ProxyBody>, ProxyError>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        self.held.permit.answered();
        let resp = result?;
        let (mut parts, body) = resp.into_parts();
        if let Some((policy, state)) = self.rate_headers {
            if let (Ok(p), Ok(s)) = (
                HeaderValue::from_str(&policy),
                HeaderValue::from_str(&state),
            ) {
                parts.headers.insert("ratelimit-policy", p);
                parts.headers.insert("ratelimit", s);
            }
        }
        let body = HoldBody {
            inner: body,
            held: Some(self.held),
        }
        .boxed_unsync();
        Ok(Response::from_parts(parts, body))
    }
}

impl Admit {
    /// Admits through `admission`, scaled by `adaptive`'s cuts, waiting at most `max_wait`
    /// unless the route says otherwise.
    pub fn new(
        admission: Admission,
        adaptive: Arc<Adaptive>,
        metrics: Arc<Metrics>,
        max_wait: Duration,
        shared: bool,
    ) -> Self {
        Admit {
            admission,
            adaptive,
            metrics,
            max_wait,
            shared,
        }
    }

    /// Reserves room for the request in every limit it falls under, waiting in the queue
    /// when it may (up to the route's `max_wait`, lowered by the caller's
    /// `x-pacer-max-wait`); sheds it with `Retry-After` when it may not.
    pub async fn admit(
        &self,
        req: Identified,
        labels: &mut RequestLabels,
    ) -> Result<Admitted, ProxyError> {
        let (routed, caller, priority, app) = req.into_parts();
        labels.priority = Some(priority);
        labels.app = Some(app.name().clone());
        let Routed {
            req,
            target,
            conn,
            route,
        } = routed;
        let upstream = route.route.upstream;
        let mut demand =
            self.admission
                .demand(upstream, &caller.key, req.method(), &route.path, priority);
        if self.shared {
            let (version, shared) = self.admission.shared_adaptive();
            self.adaptive.merge(version, &shared);
        }
        let client_key = (upstream, caller.key.clone());
        let scale = self.adaptive.scale(&client_key);
        demand.rate_scale = scale.rate;
        demand.client_scale = scale.client;
        demand.app = app.clone();
        labels.endpoint = Some(demand.endpoint.label.clone());
        let layers = demand.layers.clone();
        // The caller's own deadline (`x-pacer-max-wait`) lowers the route's, never raises it.
        let max_wait = deadline::bound(
            route.route.max_wait.unwrap_or(self.max_wait),
            req.extensions().get::<CallerMaxWait>().copied(),
        );
        let mut reservation = self
            .admission
            .admit(demand, Some(client_key.clone()), max_wait)
            .await
            .map_err(|r| {
                ProxyError::new(
                    ErrorKind::Shed {
                        reason: r.reason,
                        retry_after: r.retry_after,
                        policy: r.policy,
                    },
                    "shed before the upstream",
                )
            })?;
        // The limits the request was admitted under (the queue applies the scale in force
        // at admission), so that its 429 is judged against them.
        let generation = self.adaptive.scale(&client_key).generation;
        let upstream_name = route.route.upstream_name.clone();
        labels.queue_wait = Some(reservation.waited());
        self.metrics.queue_wait(
            &upstream_name,
            priority.as_str(),
            app.name(),
            reservation.waited().as_secs_f64(),
        );
        self.record_shadow(&reservation, &upstream_name, &caller.label, max_wait);
        self.metrics.recent().record(
            &upstream_name,
            &caller.label,
            Event::Waited(reservation.waited()),
        );
        let rate_headers = reservation.headers();
        let job = reservation.take_jobs();
        let method = req.method().clone();
        let gauge = self.metrics.inflight_gauge(&upstream_name, &caller.label);
        gauge.up();
        let held = InFlight {
            gauge,
            permit: reservation.commit(),
        };
        Ok(Admitted {
            req,
            query: target.query,
            conn,
            answering: Answering {
                route,
                method,
                caller,
                app,
                layers,
                generation,
                job,
                held,
                rate_headers,
            },
        })
    }
}

impl Admit {
    /// Counts what shadow limits and pauses would have done with a request they let
    /// through: wait (up to what is left of `max_wait` after any real wait) or be shed.
    fn record_shadow(
        &self,
        reservation: &Reservation,
        upstream: &str,
        client: &Arc<str>,
        max_wait: Duration,
    ) {
        let budget = max_wait.saturating_sub(reservation.waited());
        for block in reservation.shadow() {
            let limit: Arc<str> = match block.subject {
                Subject::Limit(i) => match self.admission.limits().specs.get(i) {
                    Some(spec) => spec.name.clone(),
                    None => continue,
                },
                // The pause is the caller's on this request's upstream.
                Subject::Pause(_) => Arc::from(pause_label(upstream)),
            };
            let v = verdict(block, budget);
            match v {
                Verdict::Wait(d) => self.metrics.shadow_wait(&limit, client, d.as_secs_f64()),
                Verdict::Shed(r) => self.metrics.shadow_shed(&limit, client, r.as_str()),
            }
            self.admission.shadow_book().record(&limit, client, v);
        }
    }
}

/// A request in flight: its concurrency permit and its `pacer_inflight` count.
struct InFlight {
    gauge: InflightGauge,
    permit: Permit,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gauge.down();
    }
}

/// A response body that holds the request's [`InFlight`] until it ends, fails or is dropped.
struct HoldBody {
    inner: ProxyBody,
    held: Option<InFlight>,
}

impl Body for HoldBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.held = None;
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
