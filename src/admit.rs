//! The admission stage: classify the endpoint, reserve room in every matching limit
//! (now, or after waiting in the queue), or shed with `Retry-After`. Concurrency stays held
//! until the response body has been sent completely, failed, or been dropped.

use crate::answer::{BoxError, ProxyBody};
use crate::config::Priority;
use crate::error::{ErrorKind, ProxyError};
use crate::identity::Caller;
use crate::proxy::{call_next, Labels, Next, Proxy, Stage, StageFuture};
use crate::queue::Permit;
use crate::route::RouteMatch;
use bytes::Bytes;
use http::{HeaderValue, Request};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// The admission stage.
pub struct Admit {
    proxy: Arc<Proxy>,
}

impl Admit {
    /// The admission stage of `proxy`.
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Admit { proxy }
    }
}

impl Stage for Admit {
    fn call(self: Arc<Self>, req: Request<ProxyBody>, next: Next) -> StageFuture {
        Box::pin(async move {
            let proxy = &self.proxy;
            let (Some(m), Some(caller)) = (
                req.extensions().get::<RouteMatch>().cloned(),
                req.extensions().get::<Caller>().cloned(),
            ) else {
                return call_next(next, req).await;
            };
            let priority = req
                .extensions()
                .get::<Priority>()
                .copied()
                .unwrap_or_default();
            let labels = req
                .extensions()
                .get::<Arc<Labels>>()
                .cloned()
                .unwrap_or_default();
            let upstream = m.route.upstream;
            let mut demand =
                proxy
                    .admission
                    .demand(upstream, &caller.key, req.method(), &m.path, priority);
            let (version, shared) = proxy.admission.shared_adaptive();
            proxy.adaptive.merge(version, &shared);
            let client_key = (upstream, caller.key.clone());
            let scale = proxy.adaptive.scale(&client_key);
            demand.rate_scale = scale.rate;
            demand.client_scale = scale.client;
            let _ = labels.endpoint.set(demand.endpoint.label.clone());
            let mut req = req;
            req.extensions_mut().insert(Admitted(demand.layers.clone()));
            let max_wait = m.route.max_wait.unwrap_or(proxy.config.queue.max_wait.0);
            let reservation = proxy
                .admission
                .admit(demand, Some((upstream, caller.key.clone())), max_wait)
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
            req.extensions_mut()
                .insert(proxy.adaptive.scale(&client_key).generation);
            let upstream_label = labels
                .upstream
                .get()
                .cloned()
                .unwrap_or_else(|| Arc::from("none"));
            proxy.metrics.queue_wait(
                &upstream_label,
                priority.as_str(),
                reservation.waited().as_secs_f64(),
            );
            let rate_headers = reservation.headers();
            let held = InFlight {
                proxy: proxy.clone(),
                upstream: upstream_label,
                client: caller.label.clone(),
                permit: reservation.commit(),
            };
            proxy.metrics.inflight(&held.upstream, &held.client, 1.0);
            let result = call_next(next, req).await;
            held.permit.answered();
            let resp = result?;
            let (mut parts, body) = resp.into_parts();
            if let Some((policy, state)) = rate_headers {
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
                held: Some(held),
            }
            .boxed_unsync();
            Ok(http::Response::from_parts(parts, body))
        })
    }
}

/// The limiter keys a request was admitted under, for the learning stage.
#[derive(Debug, Clone)]
pub struct Admitted(pub Vec<crate::limit::LayerKey>);

/// A request in flight: its concurrency permit and its `pacer_inflight` count.
struct InFlight {
    proxy: Arc<Proxy>,
    upstream: Arc<str>,
    client: Arc<str>,
    permit: Permit,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.proxy
            .metrics
            .inflight(&self.upstream, &self.client, -1.0);
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
