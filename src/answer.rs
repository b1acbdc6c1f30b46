//! Answers pacer gives itself, in the shape of Genesys' normalized errors so that SDK
//! retry logic works unchanged.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use serde::Serialize;

/// Body type of every response pacer produces or forwards.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// The error type carried by streamed bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Genesys' normalized error body.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody<'a> {
    pub message: &'a str,
    pub code: &'a str,
    pub status: u16,
    pub context_id: &'a str,
    pub details: [(); 0],
    pub errors: [(); 0],
}

/// A fresh context id for one answer, so a caller's report can be found in the logs.
pub fn context_id() -> String {
    let bits: u128 = rand::random();
    let h = format!("{bits:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Serializes a normalized error body.
pub fn error_json(status: StatusCode, code: &str, message: &str, context_id: &str) -> Bytes {
    let body = ErrorBody {
        message,
        code,
        status: status.as_u16(),
        context_id,
        details: [],
        errors: [],
    };
    // Serializing plain strings and integers cannot fail.
    Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
}

/// The message Genesys sends with a 429.
pub fn retry_message(retry_after_secs: u64) -> String {
    format!("Rate limit exceeded the maximum. Retry the request in [{retry_after_secs}] seconds")
}

/// Whole seconds for `Retry-After`: rounded up, never below one.
pub fn retry_after_secs(wait: std::time::Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// Wraps bytes as a [`ProxyBody`].
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Reads a whole body of at most `max` bytes.
///
/// Written out rather than `http_body_util::Limited`: inside `async` blocks the compiler
/// cannot prove `Limited`'s error conversion for every lifetime.
pub async fn collect_limited(mut body: ProxyBody, max: usize) -> Result<Bytes, BoxError> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if buf.len() + data.len() > max {
                return Err(format!("body larger than {max} bytes").into());
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// A JSON response in the normalized error shape.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response<ProxyBody> {
    let ctx = context_id();
    let mut resp = Response::new(full(error_json(status, code, message, &ctx)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(&ctx) {
        resp.headers_mut().insert("inin-correlation-id", v);
    }
    resp
}

/// A 429 in Genesys' shape with `Retry-After`.
pub fn too_many_requests(wait: std::time::Duration) -> Response<ProxyBody> {
    let secs = retry_after_secs(wait);
    let mut resp = error_response(
        StatusCode::TOO_MANY_REQUESTS,
        "too.many.requests.retry.after",
        &retry_message(secs),
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    resp
}

/// A JSON success response.
pub fn json_response(status: StatusCode, value: &impl Serialize) -> Response<ProxyBody> {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(full(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        use std::time::Duration;
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(42)), 42);
    }

    #[test]
    fn body_has_genesys_shape() {
        let b = error_json(
            StatusCode::TOO_MANY_REQUESTS,
            "too.many.requests.retry.after",
            &retry_message(42),
            "c",
        );
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["status"], 429);
        assert_eq!(
            v["message"],
            "Rate limit exceeded the maximum. Retry the request in [42] seconds"
        );
        assert_eq!(v["details"], serde_json::json!([]));
        assert_eq!(v["contextId"], "c");
    }
}
