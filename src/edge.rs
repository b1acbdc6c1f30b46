//! The tower-http layers around the request pipeline, in one place: credential headers
//! marked sensitive, and a panic while answering turned into pacer's JSON 500.

use crate::answer::{self, BoxError, ProxyBody};
use crate::metrics::{Metrics, Outcome};
use http::{HeaderName, Response, StatusCode};
use http_body_util::BodyExt;
use std::any::Any;
use std::convert::Infallible;
use std::sync::Arc;
use tower::ServiceBuilder;
use tower_http::catch_panic::{CatchPanic, CatchPanicLayer, ResponseForPanic};
use tower_http::sensitive_headers::{SetSensitiveRequestHeaders, SetSensitiveRequestHeadersLayer};

/// The pipeline of one request inside the edge layers.
pub type Edge<S> = CatchPanic<SetSensitiveRequestHeaders<S>, PanicAnswer>;

/// Wraps `inner`, the pipeline of one request, in the edge layers, outermost first:
/// - a panic in `inner` (its call or its future) answers a Genesys-shaped JSON 500 and is
///   counted as outcome `error`, instead of dropping the connection;
/// - the values of `sensitive` request headers (`authorization`, the routes' inbound-key
///   headers) are marked sensitive: never HPACK-indexed toward h2 upstreams, and redacted
///   from any `Debug` output.
pub fn wrap<S>(inner: S, sensitive: Arc<[HeaderName]>, metrics: Arc<Metrics>) -> Edge<S> {
    ServiceBuilder::new()
        .layer(CatchPanicLayer::custom(PanicAnswer { metrics }))
        .layer(SetSensitiveRequestHeadersLayer::from_shared(sensitive))
        .service(inner)
}

/// The answer of [`Edge::oneshot`] in pacer's body type (CatchPanic boxes bodies in its
/// own wrapper type).
pub fn into_answer<B>(result: Result<Response<B>, Infallible>) -> Response<ProxyBody>
where
    B: http_body::Body<Data = bytes::Bytes, Error = BoxError> + Send + 'static,
{
    match result {
        Ok(resp) => resp.map(BodyExt::boxed_unsync),
        Err(never) => match never {},
    }
}

/// The answer to a request whose handling panicked: pacer's JSON 500, counted.
#[derive(Clone)]
pub struct PanicAnswer {
    metrics: Arc<Metrics>,
}

impl ResponseForPanic for PanicAnswer {
    type ResponseBody = ProxyBody;

    fn response_for_panic(&mut self, err: Box<dyn Any + Send + 'static>) -> Response<ProxyBody> {
        let what = err
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| err.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("a panic without a message");
        tracing::error!(panic = what, "answering a request panicked; answered 500");
        self.metrics
            .request("none", "unknown", "unknown", "none", Outcome::Error);
        answer::error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal.server.error",
            "pacer could not answer this request",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::Request;
    use tower::{Service, ServiceExt};

    fn names() -> Arc<[HeaderName]> {
        Arc::from(vec![
            http::header::AUTHORIZATION,
            HeaderName::from_static("x-pacer-key"),
        ])
    }

    async fn answer_of<S>(svc: S, metrics: &Arc<Metrics>) -> (StatusCode, serde_json::Value)
    where
        S: Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let req = Request::new(answer::full(Bytes::new()));
        let resp = into_answer(wrap(svc, names(), metrics.clone()).oneshot(req).await);
        let status = resp.status();
        let correlation = resp
            .headers()
            .get("inin-correlation-id")
            .map(|v| v.to_str().unwrap().to_string());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            assert_eq!(json["contextId"].as_str(), correlation.as_deref());
        }
        (status, json)
    }

    fn errors_counted(metrics: &Metrics) -> usize {
        let text = metrics.render(&[]);
        text.lines()
            .find_map(|l| {
                l.strip_prefix(
                    "pacer_requests_total{upstream=\"none\",client=\"unknown\",app=\"unknown\",endpoint=\"none\",outcome=\"error\"} ",
                )
            })
            .map_or(0, |v| v.parse().unwrap())
    }

    #[tokio::test]
    async fn a_panic_while_answering_is_a_json_500_counted_as_error() {
        let metrics = Arc::new(Metrics::new());
        // A panic in the answer's future, and one in the call itself.
        let in_future = tower::service_fn(|_req: Request<ProxyBody>| async move {
            if true {
                panic!("boom in the future");
            }
            Ok::<_, Infallible>(Response::new(answer::full(Bytes::new())))
        });
        #[derive(Clone)]
        struct PanicsInCall;
        impl Service<Request<ProxyBody>> for PanicsInCall {
            type Response = Response<ProxyBody>;
            type Error = Infallible;
            type Future = std::future::Ready<Result<Response<ProxyBody>, Infallible>>;
            fn poll_ready(
                &mut self,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Result<(), Infallible>> {
                std::task::Poll::Ready(Ok(()))
            }
            fn call(&mut self, _: Request<ProxyBody>) -> Self::Future {
                panic!("boom in call")
            }
        }
        for (status, json) in [
            answer_of(in_future, &metrics).await,
            answer_of(PanicsInCall, &metrics).await,
        ] {
            assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
            assert_eq!(json["code"], "internal.server.error");
            assert_eq!(json["status"], 500);
            assert_eq!(json["details"], serde_json::json!([]));
            assert_eq!(json["errors"], serde_json::json!([]));
            assert_eq!(json["contextId"].as_str().map(str::len), Some(36));
        }
        assert_eq!(errors_counted(&metrics), 2);
    }

    #[tokio::test]
    async fn credential_headers_reach_the_pipeline_marked_sensitive() {
        let metrics = Arc::new(Metrics::new());
        let svc = tower::service_fn(|req: Request<ProxyBody>| async move {
            let h = req.headers();
            let status = if h["authorization"].is_sensitive()
                && h["x-pacer-key"].is_sensitive()
                && !h["x-other"].is_sensitive()
            {
                StatusCode::OK
            } else {
                StatusCode::IM_A_TEAPOT
            };
            let mut resp = Response::new(answer::full(Bytes::new()));
            *resp.status_mut() = status;
            Ok::<_, Infallible>(resp)
        });
        let req = Request::builder()
            .header("authorization", "Bearer t")
            .header("x-pacer-key", "k")
            .header("x-other", "v")
            .body(answer::full(Bytes::new()))
            .unwrap();
        let resp = into_answer(wrap(svc, names(), metrics.clone()).oneshot(req).await);
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(errors_counted(&metrics), 0);
    }
}
