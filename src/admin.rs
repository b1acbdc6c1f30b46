//! The admin listener: `/` (the live page), `/healthz`, `/readyz`, `/metrics`, `/status`.

use crate::answer::{self, ProxyBody};
use crate::proxy::Proxy;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use std::sync::{Arc, OnceLock};

/// The live page: one self-contained document (inline style and script, nothing fetched
/// but `/status`), since sidecars often have no internet.
const PAGE: &str = include_str!("admin/page.html");

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
        "/" => page(),
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

/// The live page with a Content-Security-Policy that allows only its own inline style and
/// script (by hash) and requests to this listener.
fn page() -> Response<ProxyBody> {
    static CSP: OnceLock<Option<HeaderValue>> = OnceLock::new();
    let csp = CSP.get_or_init(|| HeaderValue::from_str(&page_csp(PAGE)).ok());
    let mut resp = Response::new(answer::full(PAGE));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // Without its policy the page is not served: it would run with none.
    match csp {
        Some(v) => h.insert(header::CONTENT_SECURITY_POLICY, v.clone()),
        None => {
            return answer::error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal.error",
                "live page policy unavailable",
            )
        }
    };
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    resp
}

/// A policy naming the SHA-256 of every inline `<script>` and `<style>` of `html`.
fn page_csp(html: &str) -> String {
    let hashes = |tag: &str| -> String {
        inline_blocks(html, tag)
            .map(|text| {
                use base64::Engine as _;
                use sha2::Digest as _;
                let digest = sha2::Sha256::digest(text.as_bytes());
                format!(
                    " 'sha256-{}'",
                    base64::engine::general_purpose::STANDARD.encode(digest)
                )
            })
            .collect()
    };
    format!(
        "default-src 'none'; script-src{}; style-src{}; connect-src 'self'; img-src 'self'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hashes("script"),
        hashes("style")
    )
}

/// The text between each `<tag>` and `</tag>` (attribute-less tags, as the page writes them).
fn inline_blocks<'a>(html: &'a str, tag: &str) -> impl Iterator<Item = &'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut rest = html;
    std::iter::from_fn(move || {
        let start = rest.find(&open)? + open.len();
        let len = rest[start..].find(&close)?;
        let text = &rest[start..start + len];
        rest = &rest[start + len + close.len()..];
        Some(text)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_allows_exactly_the_pages_inline_script_and_style() {
        let csp = page_csp(PAGE);
        assert_eq!(inline_blocks(PAGE, "script").count(), 1);
        assert_eq!(inline_blocks(PAGE, "style").count(), 1);
        // Every script and style of the page is an attribute-less inline block.
        assert_eq!(PAGE.matches("<script").count(), 1, "{PAGE}");
        assert_eq!(PAGE.matches("<style").count(), 1, "{PAGE}");
        assert!(
            !PAGE.contains(" style="),
            "inline style attributes need their own hash"
        );
        assert!(!PAGE.contains("innerHTML"), "data must go in as text");
        assert!(csp.contains("connect-src 'self'"), "{csp}");
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        // The hash of a known text, as browsers compute it.
        let csp = page_csp("<script>alert(1)</script><style></style>");
        assert!(
            csp.contains("script-src 'sha256-bhHHL3z2vDgxUt0W3dWQOrprscmda2Y5pLsLg4GF+pI='"),
            "{csp}"
        );
    }
}
