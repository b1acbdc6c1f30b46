//! Why pacer answered a request itself, and the one mapping from that to an HTTP answer.

use crate::answer::{self, ProxyBody};
use http::{HeaderValue, Response, StatusCode};
use std::time::Duration;

/// Why a request was shed with 429.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedReason {
    /// The queue for the request's class is full.
    QueueFull,
    /// The predicted or actual wait exceeds `max_wait`.
    WaitTooLong,
    /// The upstream asked for a pause (its own 429 + Retry-After).
    UpstreamPaused,
}

impl ShedReason {
    /// Value of `x-pacer-reason` and the `reason` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ShedReason::QueueFull => "queue_full",
            ShedReason::WaitTooLong => "wait_too_long",
            ShedReason::UpstreamPaused => "upstream_paused",
        }
    }
}

/// What went wrong, as far as the caller's answer is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    /// No route for the path (404).
    NoRoute,
    /// Absolute-form target or malformed request (400).
    BadRequest(&'static str),
    /// CONNECT and other methods pacer never proxies (405).
    MethodNotAllowed,
    /// Body larger than `max_body_bytes` (413).
    PayloadTooLarge,
    /// Header section too large or too many fields (431).
    HeadersTooLarge,
    /// Request target too long (414).
    UriTooLong,
    /// Inbound auth failed or caller unknown under `reject` (401).
    Unauthorized,
    /// Source address not allowed on the route (403).
    Forbidden,
    /// Upstream could not be reached or broke the protocol (502).
    UpstreamUnreachable,
    /// Upstream did not answer in time (504).
    UpstreamTimeout,
    /// The client's request body stalled or ran past the request deadline (408).
    RequestTimeout,
    /// Shed before reaching the upstream (429).
    Shed {
        reason: ShedReason,
        retry_after: Duration,
        /// `RateLimit-Policy` and `RateLimit` of the layer that refused.
        policy: Option<(String, String)>,
    },
    /// Shutting down (503).
    Draining,
    /// A credential route's token could not be fetched from its login upstream (502,
    /// `x-pacer-reason: credential_unavailable`).
    CredentialUnavailable,
    /// The upstream refused a credential route's token (401) and the request could not be
    /// replayed with a fresh one, or was refused again (502,
    /// `x-pacer-reason: credential_rejected`).
    CredentialRejected,
}

/// A request pacer answers itself.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind:?}: {detail}")]
pub struct ProxyError {
    kind: ErrorKind,
    detail: String,
}

impl ProxyError {
    /// An error of this kind with a detail for the log (never a secret).
    pub fn new(kind: ErrorKind, detail: impl Into<String>) -> Self {
        ProxyError {
            kind,
            detail: detail.into(),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// Detail for the log.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// True for answers that count as `shed` in metrics.
    pub fn is_shed(&self) -> bool {
        matches!(self.kind, ErrorKind::Shed { .. })
    }

    /// True for answers caused by the upstream (502/504).
    pub fn is_upstream(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::UpstreamUnreachable
                | ErrorKind::UpstreamTimeout
                | ErrorKind::CredentialUnavailable
                | ErrorKind::CredentialRejected
        )
    }

    /// The caller's answer: the one place errors become HTTP.
    pub fn into_response(self) -> Response<ProxyBody> {
        use ErrorKind::*;
        let (status, code, message): (StatusCode, &str, String) = match &self.kind {
            Shed {
                reason,
                retry_after,
                policy,
            } => {
                let mut resp = answer::too_many_requests(*retry_after);
                let h = resp.headers_mut();
                h.insert("x-pacer-reason", HeaderValue::from_static(reason.as_str()));
                if let Some((pol, state)) = policy {
                    if let Ok(v) = HeaderValue::from_str(pol) {
                        h.insert("ratelimit-policy", v);
                    }
                    if let Ok(v) = HeaderValue::from_str(state) {
                        h.insert("ratelimit", v);
                    }
                }
                return resp;
            }
            Draining => {
                let mut resp = answer::error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "service.unavailable",
                    "pacer is shutting down; retry the request",
                );
                resp.headers_mut()
                    .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
                return resp;
            }
            CredentialUnavailable | CredentialRejected => {
                let (reason, message) = if self.kind == CredentialUnavailable {
                    (
                        "credential_unavailable",
                        "pacer could not obtain a token for this route's credential",
                    )
                } else {
                    (
                        "credential_rejected",
                        "the upstream refused this route's credential",
                    )
                };
                let mut resp =
                    answer::error_response(StatusCode::BAD_GATEWAY, "bad.gateway", message);
                resp.headers_mut()
                    .insert("x-pacer-reason", HeaderValue::from_static(reason));
                return resp;
            }
            NoRoute => (
                StatusCode::NOT_FOUND,
                "not.found",
                "no route for this path".into(),
            ),
            BadRequest(why) => (StatusCode::BAD_REQUEST, "bad.request", (*why).to_string()),
            MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method.not.allowed",
                "pacer is not a forward proxy".into(),
            ),
            PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "request.entity.too.large",
                "request body is larger than allowed".into(),
            ),
            HeadersTooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request.header.fields.too.large",
                "request headers are larger than allowed".into(),
            ),
            UriTooLong => (
                StatusCode::URI_TOO_LONG,
                "uri.too.long",
                "request target is longer than allowed".into(),
            ),
            Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "authentication.required",
                "caller could not be authenticated".into(),
            ),
            Forbidden => (
                StatusCode::FORBIDDEN,
                "forbidden",
                "source address is not allowed on this route".into(),
            ),
            UpstreamUnreachable => (
                StatusCode::BAD_GATEWAY,
                "bad.gateway",
                "upstream could not be reached".into(),
            ),
            UpstreamTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "gateway.timeout",
                "upstream did not answer in time".into(),
            ),
            RequestTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                "request.timeout",
                "request body was not received in time".into(),
            ),
        };
        answer::error_response(status, code, &message)
    }
}
