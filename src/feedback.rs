//! Learning from upstream answers: a 429 with `Retry-After` pauses that caller's key on
//! that upstream; a token issued through pacer is remembered (hashed) with its client; a
//! job's creation, status or `DELETE` keeps or frees its job slot (see [`crate::jobs`]).

use crate::adaptive::{Adaptive, ClientKey};
use crate::admit::Answering;
use crate::answer::{collect_limited, full, ProxyBody};
pub use crate::broker::{issued_token, IssuedToken, MAX_TOKEN_LIFETIME};
use crate::broker::{Flight, TokenBroker};
use crate::error::{ErrorKind, ProxyError};
use crate::identity::{is_token_path, Caller, Identity};
use crate::metrics::Metrics;
use crate::queue::Admission;
use http::{HeaderMap, Response, StatusCode};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Token responses read to learn the token, at most.
const MAX_TOKEN_RESPONSE_BYTES: usize = 64 * 1024;

/// Longest pause an upstream may impose through one answer (`Retry-After`,
/// `inin-ratelimit-reset`): longer values, however written, pause for this long.
pub const MAX_PAUSE: Duration = Duration::from_secs(3600);

/// How long the upstream asked callers to wait: `Retry-After` in seconds or as an HTTP
/// date, else `inin-ratelimit-reset` in seconds; at most [`MAX_PAUSE`]. A value that is
/// neither (negative, fractional, garbage) is no answer.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let from_retry_after = value(http::header::RETRY_AFTER.as_str()).and_then(|v| {
        delay_seconds(v).or_else(|| {
            // A date in the past asks for no pause at all.
            let at = httpdate::parse_http_date(v).ok()?;
            Some(
                at.duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO),
            )
        })
    });
    from_retry_after
        .or_else(|| value("inin-ratelimit-reset").and_then(delay_seconds))
        .map(|d| d.min(MAX_PAUSE))
}

/// RFC 9110 `delay-seconds` (`1*DIGIT`): too many digits for a `u64` is still a (very
/// long) delay, not garbage.
fn delay_seconds(v: &str) -> Option<Duration> {
    digits(v).map(|n| Duration::from_secs(n.unwrap_or(u64::MAX)))
}

/// A plain decimal number: `Some(None)` when it is one but does not fit a `u64`.
fn digits(v: &str) -> Option<Option<u64>> {
    (!v.is_empty() && v.bytes().all(|b| b.is_ascii_digit())).then(|| v.parse().ok())
}

/// The upstream's own count of the caller's requests in its window
/// (`inin-ratelimit-count`), if it sent a plain number; one too large for a `u64` counts
/// as `u64::MAX` (the ledger clamps it to what the key can hold).
pub fn upstream_count(headers: &HeaderMap) -> Option<u64> {
    let v = headers.get("inin-ratelimit-count")?.to_str().ok()?.trim();
    digits(v).map(|n| n.unwrap_or(u64::MAX))
}

/// Largest `inin-ratelimit-allowed` taken at face value; anything larger is no ceiling.
const MAX_ALLOWED: u64 = 1 << 40;

/// The budget the upstream reports for the caller's own per-client window
/// (`inin-ratelimit-allowed`), if it sent a plain number. Untrusted: anything but ASCII
/// digits is ignored, huge values are capped (a cap above the configured value is no cap).
pub fn upstream_allowed(headers: &HeaderMap) -> Option<u64> {
    let v = headers.get("inin-ratelimit-allowed")?.to_str().ok()?.trim();
    digits(v).map(|n| n.unwrap_or(MAX_ALLOWED).min(MAX_ALLOWED))
}

/// The learning phase: what an upstream answer says about limits and tokens.
pub struct Learn {
    admission: Admission,
    adaptive: Arc<Adaptive>,
    identity: Arc<Identity>,
    broker: Option<Arc<TokenBroker>>,
    metrics: Arc<Metrics>,
    /// Configured `requests` of each limit, by index (before headroom).
    configured: Arc<[Option<u64>]>,
}

impl Learn {
    /// Learns into `admission` (counts, pauses), `adaptive` (cuts, reported budgets),
    /// `identity` and `broker` (issued tokens); `configured` holds each limit's `requests`.
    pub fn new(
        admission: Admission,
        adaptive: Arc<Adaptive>,
        identity: Arc<Identity>,
        broker: Option<Arc<TokenBroker>>,
        metrics: Arc<Metrics>,
        configured: Arc<[Option<u64>]>,
    ) -> Self {
        Learn {
            admission,
            adaptive,
            identity,
            broker,
            metrics,
            configured,
        }
    }

    /// Learns from the upstream's answer to an admitted request and passes it on.
    pub async fn learn(
        &self,
        sent: &mut Answering,
        endpoint: &str,
        flight: Option<&Flight>,
        result: Result<Response<ProxyBody>, ProxyError>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let resp = result?;
        let (route, caller) = (&sent.route, &sent.caller);
        let status = resp.status();
        self.metrics.upstream_response(
            &route.route.upstream_name,
            &caller.label,
            sent.app.name(),
            endpoint,
            status.as_u16(),
        );
        if let Some(used) = upstream_count(resp.headers()) {
            self.admission.upstream_count(&sent.layers, used);
        }
        let client_key = (route.route.upstream, caller.key.clone());
        if let Some(allowed) = upstream_allowed(resp.headers()) {
            // The reported budget is the caller's own per-client one: it caps only that
            // layer, relative to its configured (pre-headroom) size.
            let set = self.admission.limits();
            let configured = set
                .per_client(&sent.layers)
                .and_then(|i| self.configured.get(sent.layers[i].limit).copied().flatten());
            if let Some(configured) = configured {
                if self
                    .adaptive
                    .learn_allowed(&client_key, allowed, configured)
                {
                    self.share_adaptive(&client_key);
                }
            }
        }
        if self.adaptive.observe(
            &client_key,
            status == StatusCode::TOO_MANY_REQUESTS,
            sent.generation,
        ) {
            self.share_adaptive(&client_key);
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            let wait = retry_after(resp.headers()).unwrap_or(Duration::from_secs(1));
            tracing::info!(client = %caller.label, ?wait, "upstream asked for a pause");
            self.admission
                .pause((route.route.upstream, caller.key.clone()), wait);
        }
        if status.is_success() && is_token_path(&route.path) && caller.known {
            return self.learn_token(caller, flight, resp).await;
        }
        let (upstream, job) = (route.route.upstream, sent.job.take());
        Ok(crate::jobs::watch(
            &self.admission,
            upstream,
            &sent.method,
            &route.path,
            job,
            resp,
        )
        .await)
    }

    /// Tells the other replicas (in Redis mode) about a client's new cut or learned ceiling.
    fn share_adaptive(&self, key: &ClientKey) {
        if let Some((field, value)) = self.adaptive.export(key) {
            self.admission
                .share_adaptive(field, value, self.adaptive.shared_ttl());
        }
    }

    /// Reads a token response, remembers the token's hash with the client, passes it on.
    async fn learn_token(
        &self,
        caller: &Caller,
        flight: Option<&Flight>,
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
        if let Some(issued) = issued_token(&bytes) {
            // Without a usable lifetime the token is remembered as long as any may live.
            let ttl = issued.lifetime.unwrap_or(MAX_TOKEN_LIFETIME);
            self.identity.learn(&issued.access_token, &caller.key, ttl);
            if let (Some(broker), Some(flight)) = (&self.broker, flight) {
                broker.put(flight.key.0, issued);
            }
        }
        parts.headers.remove(http::header::CONTENT_LENGTH);
        Ok(Response::from_parts(parts, full(bytes)))
    }
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
        assert_eq!(allowed("999999999999999999999999"), Some(MAX_ALLOWED));
        for bad in ["-1", "+5", "1e3", "3.5", "", "ten", "0x10"] {
            assert_eq!(allowed(bad), None, "{bad:?}");
        }
        assert_eq!(upstream_allowed(&HeaderMap::new()), None);
    }

    fn pause_of(pairs: &[(&'static str, &'static str)]) -> Option<Duration> {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        retry_after(&h)
    }

    #[test]
    fn every_http_date_form_and_its_extremes() {
        // RFC 9110 §5.6.7: IMF-fixdate, obsolete RFC 850 and asctime forms.
        for past in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            "Thu, 01 Jan 1970 00:00:00 GMT",
        ] {
            assert_eq!(
                pause_of(&[("retry-after", past)]),
                Some(Duration::ZERO),
                "{past}"
            );
        }
        for future in ["Fri, 31 Dec 9999 23:59:59 GMT", "Fri Dec 31 23:59:59 9999"] {
            assert_eq!(
                pause_of(&[("retry-after", future)]),
                Some(MAX_PAUSE),
                "{future}"
            );
        }
        let soon = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_str(&soon).unwrap());
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
    }

    #[test]
    fn hostile_numbers_are_clamped_or_ignored() {
        for huge in [
            "18446744073709551615",
            "18446744073709551616",
            "999999999999999999999999",
        ] {
            assert_eq!(
                pause_of(&[("retry-after", huge)]),
                Some(MAX_PAUSE),
                "{huge}"
            );
            assert_eq!(
                pause_of(&[("inin-ratelimit-reset", huge)]),
                Some(MAX_PAUSE),
                "{huge}"
            );
        }
        for bad in [
            "-1",
            "1e309",
            "1.5",
            "+5",
            "",
            "0x10",
            "Fri, 32 Dec 9999 25:00:00 GMT",
            "soon",
        ] {
            assert_eq!(pause_of(&[("retry-after", bad)]), None, "{bad:?}");
            assert_eq!(pause_of(&[("inin-ratelimit-reset", bad)]), None, "{bad:?}");
        }
        // Garbage in `Retry-After` leaves `inin-ratelimit-reset` to answer.
        assert_eq!(
            pause_of(&[("retry-after", "-1"), ("inin-ratelimit-reset", "9")]),
            Some(Duration::from_secs(9))
        );
        let count = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("inin-ratelimit-count", HeaderValue::from_static(v));
            upstream_count(&h)
        };
        assert_eq!(count(" 18 "), Some(18));
        assert_eq!(count("18446744073709551615"), Some(u64::MAX));
        assert_eq!(count("99999999999999999999999"), Some(u64::MAX));
        for bad in ["-1", "1e309", "3.5", "", "ten"] {
            assert_eq!(count(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn token_lifetimes_are_clamped_and_garbage_is_no_lifetime() {
        let life = |body: &str| issued_token(body.as_bytes()).map(|t| t.lifetime);
        let day = Some(Some(MAX_TOKEN_LIFETIME));
        assert_eq!(
            life(r#"{"access_token":"t","expires_in":3600}"#),
            Some(Some(Duration::from_secs(3600)))
        );
        assert_eq!(
            life(r#"{"access_token":"t","expires_in":18446744073709551615}"#),
            day
        );
        assert_eq!(life(r#"{"access_token":"t","expires_in":1e300}"#), day);
        assert_eq!(life(r#"{"access_token":"t","expires_in":"1e309"}"#), day);
        assert_eq!(
            life(r#"{"access_token":"t","expires_in":" 60 "}"#),
            Some(Some(Duration::from_secs(60)))
        );
        assert_eq!(
            life(r#"{"access_token":"t","expires_in":1.5}"#),
            Some(Some(Duration::from_millis(1500)))
        );
        for none in [
            r#"{"access_token":"t"}"#,
            r#"{"access_token":"t","expires_in":-1}"#,
            r#"{"access_token":"t","expires_in":-1e300}"#,
            r#"{"access_token":"t","expires_in":"NaN"}"#,
            r#"{"access_token":"t","expires_in":"soon"}"#,
            r#"{"access_token":"t","expires_in":null}"#,
            r#"{"access_token":"t","expires_in":[1]}"#,
        ] {
            assert_eq!(life(none), Some(None), "{none}");
        }
        // Not a token answer at all: a number JSON cannot hold, no token, not JSON.
        for not in [
            r#"{"access_token":"t","expires_in":1e309}"#,
            r#"{"access_token":7,"expires_in":60}"#,
            r#"[1,2]"#,
            "garbage",
        ] {
            assert_eq!(life(not), None, "{not}");
        }
    }
}
