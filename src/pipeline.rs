//! The request path, top to bottom: [`Pipeline::run`].
//!
//! Each phase lives in its own module and hands the next one a typed request that says what
//! is known so far ([`Guarded`] → [`Routed`] → [`Allowed`] → [`Identified`] →
//! [`Admitted`] → an answer), so a phase cannot run before the facts it needs exist: the
//! forwarding phase takes only an [`Admitted`] request, which only admission makes, and
//! admission takes only an [`Identified`] one. Each phase holds only the handles it uses.

use crate::access_log::{self, AccessLog, Record};
use crate::admit::{Admit, Admitted};
use crate::answer::ProxyBody;
use crate::broker::{Broker, Brokered};
use crate::buffer::BufferBody;
use crate::cache::{CachePhase, Sending, Served};
use crate::error::{ErrorKind, ProxyError};
use crate::feedback::Learn;
use crate::forward::Forward;
use crate::guard::{Guard, Guarded};
use crate::identity::{Identified, Identify};
use crate::metrics::apps::AppCounts;
use crate::metrics::{Metrics, Outcome, RequestLabels};
use crate::route::{Access, Allowed, RouteTable, Routed};
use crate::server::ConnInfo;
use http::{Request, Response, StatusCode};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// The phases of the request path, built once per configuration.
pub struct Pipeline {
    pub(crate) guard: Guard,
    pub(crate) routes: RouteTable,
    pub(crate) access: Access,
    pub(crate) buffer: BufferBody,
    pub(crate) identify: Identify,
    pub(crate) broker: Broker,
    pub(crate) cache: CachePhase,
    pub(crate) admit: Admit,
    pub(crate) forward: Forward,
    pub(crate) learn: Learn,
    pub(crate) metrics: Arc<Metrics>,
    /// `[log]`: one line per request, unless `access = false`.
    pub(crate) access_log: Option<AccessLog>,
    /// `[server] request_deadline`: the whole exchange ends within it.
    pub(crate) deadline: Duration,
}

impl Pipeline {
    /// Runs one request through the pipeline within the request deadline, turns errors into
    /// pacer's own answers and records what became of it: metrics, the request id on the
    /// answer, and the access log line once the answer has been sent.
    pub async fn handle(&self, mut req: Request<ProxyBody>, conn: ConnInfo) -> Response<ProxyBody> {
        let mut labels = RequestLabels::default();
        let method = req.method().clone();
        // Kept from the caller or made here; forwarded upstream with the request.
        let request_id = access_log::request_id(req.headers_mut());
        // What only the access line needs (clocks, a body byte counter): only when logging.
        let logging = match &self.access_log {
            Some(log) => {
                let bytes_in = Arc::new(AtomicU64::new(0));
                let counter = bytes_in.clone();
                req = req.map(|b| access_log::counted(b, counter));
                Some((log, SystemTime::now(), Instant::now(), bytes_in))
            }
            None => None,
        };
        let result =
            match tokio::time::timeout(self.deadline, self.run(req, conn, &mut labels)).await {
                Ok(r) => r,
                Err(_) => Err(ProxyError::new(
                    ErrorKind::UpstreamTimeout,
                    "no answer within request_deadline",
                )),
            };
        let outcome = match &result {
            Ok((_, outcome)) => *outcome,
            Err(e) if e.is_shed() => Outcome::Shed,
            Err(e) if e.is_upstream() => Outcome::Error,
            Err(_) => Outcome::Rejected,
        };
        self.metrics.request(
            labels.upstream(),
            labels.client(),
            labels.app(),
            labels.endpoint(),
            outcome,
        );
        let own_answer = result.is_err();
        if let (Some(upstream), Some(client), Some(app)) =
            (&labels.upstream, &labels.client, &labels.app)
        {
            let upstream_429 =
                matches!(&result, Ok((r, _)) if r.status() == StatusCode::TOO_MANY_REQUESTS);
            let add = AppCounts {
                forwarded: u64::from(outcome == Outcome::Forwarded),
                shed: u64::from(outcome == Outcome::Shed),
                upstream_429: u64::from(upstream_429),
            };
            self.metrics.apps().record(upstream, client, app, add);
        }
        let mut resp = match result {
            Ok((resp, _)) => resp,
            Err(e) => {
                if let ErrorKind::Shed { reason, .. } = e.kind() {
                    self.metrics.shed(
                        labels.upstream(),
                        labels.client(),
                        labels.app(),
                        reason.as_str(),
                    );
                }
                tracing::debug!(
                    %method,
                    upstream = labels.upstream(),
                    client = labels.client(),
                    endpoint = labels.endpoint(),
                    error = %e,
                    "answered by pacer"
                );
                let resp = e.into_response();
                if is_refusal(resp.status()) {
                    self.metrics.rejected(
                        labels.upstream(),
                        labels.route(),
                        resp.status().as_u16(),
                    );
                }
                resp
            }
        };
        resp.headers_mut()
            .insert(access_log::REQUEST_ID, request_id.clone());
        let Some((log, at, started, bytes_in)) = logging else {
            return resp;
        };
        let mut record = Record {
            at,
            started,
            method,
            labels,
            outcome,
            status: 0,
            reason: None,
            request_id,
            correlation_id: None,
            bytes_in,
        };
        record.answered(resp.status().as_u16(), resp.headers(), own_answer);
        log.on_answer(resp, record)
    }

    /// The whole request path, one phase after the other.
    async fn run(
        &self,
        req: Request<ProxyBody>,
        conn: ConnInfo,
        labels: &mut RequestLabels,
    ) -> Result<(Response<ProxyBody>, Outcome), ProxyError> {
        // Refuse what a reverse proxy must never pass; enforce size limits; normalize the path.
        let req: Guarded = self.guard.check(req, conn)?;
        // Pick the upstream by the longest configured prefix; nothing else is reachable.
        let req: Routed = self.routes.route(req)?;
        labels.upstream = Some(req.route.route.upstream_name.clone());
        labels.route = Some(req.route.route.prefix.clone());
        // Route-level gates: source address ranges and inbound keys.
        let req: Allowed = self.access.check(req)?;
        // Read small bodies whole: a broken or unfinished one is answered here, before it
        // can cost a token look-up, quota or an upstream connection.
        let req: Allowed = self.buffer.read(req).await?;
        // Who is calling: the OAuth client behind the token, or the route's identity source.
        let req: Identified = self.identify.identify(req).await?;
        labels.client = Some(req.caller().label.clone());
        labels.app = Some(req.app().name().clone());
        // Token broker: a repeated client-credentials token request gets the issued token.
        let (req, flight) = match self.broker.serve(req).await? {
            Brokered::Answered(resp) => return Ok((resp, Outcome::Cached)),
            Brokered::Pass(req, flight) => (req, flight),
        };
        // Response cache: a fresh kept answer, or that of an identical request already
        // admitted and upstream; either takes no quota.
        let (req, pending) = match self.cache.serve(req, labels).await {
            Served::Answered(resp) => return Ok((resp, Outcome::Cached)),
            Served::Pass(req, pending) => (req, pending),
        };
        // Classify the endpoint, then reserve room in every matching limit: now, after a
        // wait in the queue, or shed with Retry-After.
        let req: Admitted = self.admit.admit(req, labels).await?;
        // Send upstream (a cacheable request as the leader of its flight); the answer
        // streams back.
        let sending = Instant::now();
        let (answer, mut sent) = match self.cache.send(&self.forward, req, pending).await? {
            Sending::Upstream(answer, sent) => (answer, sent),
            Sending::Answered(resp) => return Ok((resp, Outcome::Cached)),
        };
        labels.upstream_time = Some(sending.elapsed());
        // Learn from the answer: counts, upstream pauses (429 + Retry-After), issued tokens.
        let answer = self
            .learn
            .learn(&mut sent, labels.endpoint(), flight.as_ref(), answer)
            .await;
        // The answer carries the RateLimit headers and holds concurrency until it ends.
        Ok((sent.finish(answer)?, Outcome::Forwarded))
    }
}

/// Pacer's own refusals of a request, counted in `pacer_rejected_total`.
fn is_refusal(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        400 | 401 | 403 | 404 | 405 | 413 | 414 | 431
    )
}
