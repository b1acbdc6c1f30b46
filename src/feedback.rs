//! Learning from upstream answers: a 429 with `Retry-After` pauses that caller's key on
//! that upstream; a token issued through pacer is remembered (hashed) with its client.

use crate::adaptive::Generation;
use crate::admit::Admitted;
use crate::answer::{collect_limited, full, ProxyBody};
use crate::broker::BrokerKey;
use crate::error::{ErrorKind, ProxyError};
use crate::identity::{is_token_path, Caller};
use crate::proxy::{call_next, Labels, Next, Proxy, Stage, StageFuture};
use crate::route::RouteMatch;
use http::{HeaderMap, Request, Response, StatusCode};
use std::sync::Arc;
use std::time::Duration;

/// Token responses read to learn the token, at most.
const MAX_TOKEN_RESPONSE_BYTES: usize = 64 * 1024;

/// Longest pause an upstream may impose through one answer.
const MAX_PAUSE: Duration = Duration::from_secs(3600);

/// How long the upstream asked callers to wait: `Retry-After` in seconds or as an HTTP
/// date, else `inin-ratelimit-reset`.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let ra = headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    if let Some(v) = ra {
        if let Ok(secs) = v.parse::<u64>() {
            return Some(Duration::from_secs(secs).min(MAX_PAUSE));
        }
        if let Ok(at) = httpdate_parse(v) {
            let left = at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or(Duration::ZERO);
            return Some(left.min(MAX_PAUSE));
        }
    }
    headers
        .get("inin-ratelimit-reset")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s).min(MAX_PAUSE))
}

fn httpdate_parse(v: &str) -> Result<std::time::SystemTime, humantime::TimestampError> {
    humantime::parse_rfc3339_weak(v).or_else(|_| {
        // IMF-fixdate, e.g. "Sun, 06 Nov 1994 08:49:37 GMT".
        let parts: Vec<&str> = v.split_whitespace().collect();
        if parts.len() != 6 {
            return humantime::parse_rfc3339("invalid");
        }
        let month = match parts[2] {
            "Jan" => 1,
            "Feb" => 2,
            "Mar" => 3,
            "Apr" => 4,
            "May" => 5,
            "Jun" => 6,
            "Jul" => 7,
            "Aug" => 8,
            "Sep" => 9,
            "Oct" => 10,
            "Nov" => 11,
            "Dec" => 12,
            _ => return humantime::parse_rfc3339("invalid"),
        };
        humantime::parse_rfc3339(&format!(
            "{}-{:02}-{:0>2}T{}Z",
            parts[3], month, parts[1], parts[4]
        ))
    })
}

/// The upstream's own count of the caller's requests in its window
/// (`inin-ratelimit-count`), if it sent one.
pub fn upstream_count(headers: &HeaderMap) -> Option<u64> {
    headers
        .get("inin-ratelimit-count")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Largest `inin-ratelimit-allowed` taken at face value; anything larger is no ceiling.
const MAX_ALLOWED: u64 = 1 << 40;

/// The budget the upstream reports for the caller's own per-client window
/// (`inin-ratelimit-allowed`), if it sent a plain number. Untrusted: anything but ASCII
/// digits is ignored, huge values are capped (a cap above the configured value is no cap).
pub fn upstream_allowed(headers: &HeaderMap) -> Option<u64> {
    let v = headers.get("inin-ratelimit-allowed")?.to_str().ok()?.trim();
    if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(v.parse::<u64>().unwrap_or(MAX_ALLOWED).min(MAX_ALLOWED))
}

/// The learning stage.
pub struct Learn {
    proxy: Arc<Proxy>,
}

impl Learn {
    /// The learning stage of `proxy`.
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Learn { proxy }
    }
}

impl Stage for Learn {
    fn call(self: Arc<Self>, req: Request<ProxyBody>, next: Next) -> StageFuture {
        Box::pin(async move {
            let proxy = &self.proxy;
            let m = req.extensions().get::<RouteMatch>().cloned();
            let caller = req.extensions().get::<Caller>().cloned();
            let admitted = req.extensions().get::<Admitted>().cloned();
            let generation = req
                .extensions()
                .get::<Generation>()
                .copied()
                .unwrap_or_default();
            let broker_key = req.extensions().get::<BrokerKey>().copied();
            let labels = req
                .extensions()
                .get::<Arc<Labels>>()
                .cloned()
                .unwrap_or_default();
            let resp = call_next(next, req).await?;
            let (Some(m), Some(caller)) = (m, caller) else {
                return Ok(resp);
            };
            let status = resp.status();
            let get = |c: &std::sync::OnceLock<Arc<str>>| {
                c.get().cloned().unwrap_or_else(|| Arc::from("none"))
            };
            proxy.metrics.upstream_response(
                &get(&labels.upstream),
                &caller.label,
                &get(&labels.endpoint),
                status.as_u16(),
            );
            if let (Some(used), Some(admitted)) = (upstream_count(resp.headers()), &admitted) {
                proxy.admission.upstream_count(&admitted.0, used);
            }
            let client_key = (m.route.upstream, caller.key.clone());
            if let (Some(allowed), Some(admitted)) = (upstream_allowed(resp.headers()), &admitted) {
                // The reported budget is the caller's own per-client one: it caps only that
                // layer, relative to its configured (pre-headroom) size.
                let set = proxy.admission.limits();
                let configured = set
                    .per_client(&admitted.0)
                    .and_then(|i| proxy.config.limits.get(admitted.0[i].limit))
                    .and_then(|l| l.requests);
                if let Some(configured) = configured {
                    if proxy
                        .adaptive
                        .learn_allowed(&client_key, allowed, configured)
                    {
                        share_adaptive(proxy, &client_key);
                    }
                }
            }
            if proxy.adaptive.observe(
                &client_key,
                status == StatusCode::TOO_MANY_REQUESTS,
                generation,
            ) {
                share_adaptive(proxy, &client_key);
            }
            if status == StatusCode::TOO_MANY_REQUESTS {
                let wait = retry_after(resp.headers()).unwrap_or(Duration::from_secs(1));
                tracing::info!(client = %caller.label, ?wait, "upstream asked for a pause");
                proxy
                    .admission
                    .pause((m.route.upstream, caller.key.clone()), wait);
            }
            if status.is_success() && is_token_path(&m.path) && caller.known {
                return learn_token(proxy, &caller, broker_key, resp).await;
            }
            Ok(resp)
        })
    }
}

/// Tells the other replicas (in Redis mode) about a client's new cut or learned ceiling.
fn share_adaptive(proxy: &Proxy, key: &crate::adaptive::ClientKey) {
    if let Some((field, value)) = proxy.adaptive.export(key) {
        proxy
            .admission
            .share_adaptive(field, value, proxy.adaptive.shared_ttl());
    }
}

/// Reads a token response, remembers the token's hash with the client, passes it on.
async fn learn_token(
    proxy: &Proxy,
    caller: &Caller,
    broker_key: Option<BrokerKey>,
    resp: Response<ProxyBody>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (mut parts, body) = resp.into_parts();
    let bytes = collect_limited(body, MAX_TOKEN_RESPONSE_BYTES)
        .await
        .map_err(|e| {
            ProxyError::new(
                ErrorKind::UpstreamUnreachable,
                format!("token response: {e}"),
            )
        })?;
    #[derive(serde::Deserialize)]
    struct Issued {
        access_token: String,
        #[serde(default)]
        expires_in: Option<u64>,
    }
    if let Ok(issued) = serde_json::from_slice::<Issued>(&bytes) {
        let ttl = Duration::from_secs(issued.expires_in.unwrap_or(86_400));
        proxy.identity.learn(&issued.access_token, &caller.key, ttl);
        if let (Some(broker), Some(BrokerKey(key))) = (&proxy.broker, broker_key) {
            broker.put(key, &bytes);
        }
    }
    parts.headers.remove(http::header::CONTENT_LENGTH);
    Ok(Response::from_parts(parts, full(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("42"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(42)));
        h.insert(
            "retry-after",
            HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert("retry-after", HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
        h.insert("inin-ratelimit-reset", HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert("retry-after", HeaderValue::from_static("99999999"));
        assert_eq!(retry_after(&h), Some(MAX_PAUSE));
    }

    #[test]
    fn allowed_is_a_plain_clamped_number() {
        let allowed = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("inin-ratelimit-allowed", HeaderValue::from_static(v));
            upstream_allowed(&h)
        };
        assert_eq!(allowed(" 300 "), Some(300));
        assert_eq!(allowed("0"), Some(0));
        assert_eq!(allowed("18446744073709551615"), Some(MAX_ALLOWED));
        assert_eq!(allowed("99999999999999999999"), Some(MAX_ALLOWED));
        assert_eq!(allowed("999999999999999999999999"), None);
        for bad in ["-1", "+5", "1e3", "3.5", "", "ten", "0x10"] {
            assert_eq!(allowed(bad), None, "{bad:?}");
        }
        assert_eq!(upstream_allowed(&HeaderMap::new()), None);
    }
}
