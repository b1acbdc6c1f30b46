//! The admin listener: `/healthz`, `/readyz`, `/metrics`, `/status`.

use crate::answer::{self, ProxyBody};
use crate::proxy::Proxy;
use http::{Method, Request, Response, StatusCode};
use std::sync::Arc;

/// Answers one admin request.
pub async fn handle(proxy: &Arc<Proxy>, req: Request<ProxyBody>) -> Response<ProxyBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return answer::error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method.not.allowed",
            "admin endpoints are read-only",
        );
    }
    match req.uri().path() {
        "/healthz" => answer::json_response(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        "/readyz" => {
            if proxy.is_draining() {
                answer::json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &serde_json::json!({"status": "draining"}),
                )
            } else if !proxy.admission.backend_status().up {
                // Still serving on local shares: ready, but say so.
                answer::json_response(
                    StatusCode::OK,
                    &serde_json::json!({"status": "degraded", "state": proxy.admission.backend_status()}),
                )
            } else {
                answer::json_response(StatusCode::OK, &serde_json::json!({"status": "ready"}))
            }
        }
        "/status" => answer::json_response(StatusCode::OK, &crate::status::status(proxy)),
        "/metrics" => {
            let mut resp = Response::new(answer::full(crate::status::render_metrics(proxy)));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        _ => answer::error_response(StatusCode::NOT_FOUND, "not.found", "unknown admin path"),
    }
}
