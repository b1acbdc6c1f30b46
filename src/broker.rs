//! Token broker: a client-credentials token request that repeats one already answered
//! (same credentials, same body) gets the issued token again, with its remaining lifetime,
//! until shortly before it expires. A fleet of workers that each ask for a token then costs
//! one request of `client.credentials.token.rate.per.minute`, not one per worker.
//!
//! Requests are keyed by a hash of their credentials and body; concurrent identical
//! requests wait for the first one's answer (single flight). Tokens are kept in memory
//! only, in a bounded map; they never reach logs or metrics.

use crate::answer::{collect_limited, full, ProxyBody};
use crate::error::{ErrorKind, ProxyError};
use crate::identity::{is_token_path, Generations, Identified, TokenHash};
use bytes::Bytes;
use http::{header, HeaderValue, Method, Response, StatusCode};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Longest lifetime believed from a token answer's `expires_in` (Genesys issues tokens
/// for at most 24 h): the token broker hands a token out no longer than this.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// What pacer learns from a successful token answer.
#[derive(Debug, Clone, PartialEq)]
pub struct IssuedToken {
    /// The whole answer, as JSON.
    pub body: serde_json::Value,
    pub access_token: String,
    /// `expires_in`, at most [`MAX_TOKEN_LIFETIME`]; `None` when missing or not a
    /// non-negative number (or a string of one).
    pub lifetime: Option<Duration>,
}

/// Parses a token answer (`{"access_token": .., "expires_in": ..}`); `None` when it is
/// not JSON with a string `access_token`. Nothing in it can panic or overflow pacer.
pub fn issued_token(bytes: &[u8]) -> Option<IssuedToken> {
    let body: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let access_token = body.get("access_token")?.as_str()?.to_string();
    let secs = match body.get("expires_in") {
        Some(serde_json::Value::Number(n)) => n.as_f64(),
        Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    // `f64` covers integers, fractions and numeric strings alike; NaN and negatives fail
    // the comparison, and the clamp comes before the conversion, which panics past u64.
    let lifetime = secs
        .filter(|s| *s >= 0.0)
        .map(|s| Duration::from_secs_f64(s.min(MAX_TOKEN_LIFETIME.as_secs_f64())));
    Some(IssuedToken {
        body,
        access_token,
        lifetime,
    })
}

/// Token request bodies read to key the cache, at most.
const MAX_BODY: usize = 64 * 1024;

#[derive(Clone)]
struct Cached {
    token: serde_json::Value,
    expires: Instant,
}

/// The cache key of a token request, put into the request for the learning stage.
#[derive(Debug, Clone, Copy)]
pub struct BrokerKey(pub TokenHash);

/// Issued tokens by request key.
pub struct TokenBroker {
    margin: Duration,
    entries: Mutex<Generations<TokenHash, Cached>>,
    flights: Mutex<HashMap<TokenHash, Arc<tokio::sync::Mutex<()>>>>,
}

impl TokenBroker {
    /// A broker keeping at most `max` tokens, handing each out until `margin` before expiry.
    pub fn new(max: usize, margin: Duration) -> Self {
        TokenBroker {
            margin,
            entries: Mutex::new(Generations::new(max)),
            flights: Mutex::new(HashMap::new()),
        }
    }

    /// The key of a token request: its credentials and body, hashed.
    pub fn key(authorization: Option<&HeaderValue>, body: &[u8]) -> TokenHash {
        let mut h = Sha256::new();
        h.update(authorization.map_or(&b""[..], |v| v.as_bytes()));
        h.update(b"\n");
        h.update(body);
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.finalize()[..16]);
        out
    }

    /// The cached answer for `key` with `expires_in` set to what is left, if enough is.
    pub fn get(&self, key: &TokenHash) -> Option<Bytes> {
        let cached = self.entries.lock().ok()?.get(key)?;
        let left = cached.expires.checked_duration_since(Instant::now())?;
        if left < self.margin {
            return None;
        }
        let mut token = cached.token;
        token["expires_in"] = serde_json::Value::from(left.as_secs());
        serde_json::to_vec(&token).ok().map(Bytes::from)
    }

    /// Remembers an issued token (a successful answer to the request keyed `key`); one
    /// without a lifetime is not handed out again.
    pub fn put(&self, key: TokenHash, issued: IssuedToken) {
        let Some(lifetime) = issued.lifetime else {
            return;
        };
        // The lifetime is clamped already ([`MAX_TOKEN_LIFETIME`]); an
        // `Instant` that cannot be that far ahead still must not panic.
        let Some(expires) = Instant::now().checked_add(lifetime) else {
            return;
        };
        if let Ok(mut entries) = self.entries.lock() {
            entries.insert(
                key,
                Cached {
                    token: issued.body,
                    expires,
                },
            );
        }
    }

    fn flight(&self, key: TokenHash) -> Arc<tokio::sync::Mutex<()>> {
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        // Forget finished flights so the map holds only keys in use.
        flights.retain(|_, f| Arc::strong_count(f) > 1);
        flights.entry(key).or_default().clone()
    }
}

/// The broker phase: answers repeated token requests from the cache.
pub struct Broker {
    broker: Option<Arc<TokenBroker>>,
}

/// A token request on its way upstream: its cache key, and the single-flight lock that
/// makes identical requests wait for its answer (held until the answer has been learned).
pub struct Flight {
    pub key: BrokerKey,
    _leader: tokio::sync::OwnedMutexGuard<()>,
}

/// What the broker phase made of a request.
// Moved once per request, never stored: boxing the larger variant would only add an
// allocation to every request.
#[allow(clippy::large_enum_variant)]
pub enum Brokered {
    /// Answered from the cache: nothing goes upstream.
    Answered(Response<ProxyBody>),
    /// Goes on, as the token request of a flight when it is one.
    Pass(Identified, Option<Flight>),
}

impl Broker {
    /// The broker phase; `None` when `[identity] token_cache` is off.
    pub fn new(broker: Option<Arc<TokenBroker>>) -> Self {
        Broker { broker }
    }

    /// Answers a repeated client-credentials token request from the cache, or lets it go
    /// on as the one request of its key that goes upstream.
    pub async fn serve(&self, mut req: Identified) -> Result<Brokered, ProxyError> {
        let is_token =
            req.routed().req.method() == Method::POST && is_token_path(&req.routed().route.path);
        let Some(broker) = self.broker.as_ref().filter(|_| is_token) else {
            return Ok(Brokered::Pass(req, None));
        };
        let r = req.request_mut();
        let body = std::mem::replace(r.body_mut(), full(Bytes::new()));
        let body = collect_limited(body, MAX_BODY).await.map_err(|_| {
            ProxyError::new(
                ErrorKind::PayloadTooLarge,
                "token request body too large or broken",
            )
        })?;
        let key = TokenBroker::key(r.headers().get(header::AUTHORIZATION), &body);
        if let Some(hit) = broker.get(&key) {
            return Ok(Brokered::Answered(cached_response(hit)));
        }
        // One request per key goes upstream; the others wait for its answer.
        let leader = broker.flight(key).lock_owned().await;
        if let Some(hit) = broker.get(&key) {
            return Ok(Brokered::Answered(cached_response(hit)));
        }
        *r.body_mut() = full(body);
        Ok(Brokered::Pass(
            req,
            Some(Flight {
                key: BrokerKey(key),
                _leader: leader,
            }),
        ))
    }
}

fn cached_response(body: Bytes) -> Response<ProxyBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert("x-pacer-token-cache", HeaderValue::from_static("hit"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn hands_out_until_the_margin_with_the_time_left() {
        let b = TokenBroker::new(100, Duration::from_secs(300));
        let key = TokenBroker::key(
            Some(&HeaderValue::from_static("Basic eDp5")),
            b"grant_type=client_credentials",
        );
        assert!(b.get(&key).is_none());
        let issued = |body: &[u8]| issued_token(body).unwrap();
        b.put(
            key,
            issued(br#"{"access_token":"t","token_type":"bearer","expires_in":1000}"#),
        );
        let v: serde_json::Value = serde_json::from_slice(&b.get(&key).unwrap()).unwrap();
        assert_eq!(
            (v["access_token"].as_str(), v["expires_in"].as_u64()),
            (Some("t"), Some(1000))
        );
        tokio::time::advance(Duration::from_secs(600)).await;
        let v: serde_json::Value = serde_json::from_slice(&b.get(&key).unwrap()).unwrap();
        assert_eq!(v["expires_in"].as_u64(), Some(400));
        tokio::time::advance(Duration::from_secs(101)).await;
        assert!(
            b.get(&key).is_none(),
            "inside the margin: ask upstream again"
        );
        let other = TokenBroker::key(
            Some(&HeaderValue::from_static("Basic eDp6")),
            b"grant_type=client_credentials",
        );
        assert!(
            b.get(&other).is_none(),
            "other credentials never share a token"
        );
        // An upstream's lifetime is believed up to 24 h; none at all is not cached.
        b.put(
            other,
            issued(br#"{"access_token":"u","expires_in":18446744073709551615}"#),
        );
        let v: serde_json::Value = serde_json::from_slice(&b.get(&other).unwrap()).unwrap();
        assert_eq!(v["expires_in"].as_u64(), Some(86_400));
        b.put(key, issued(br#"{"access_token":"t","expires_in":-1}"#));
        assert!(b.get(&key).is_none());
    }
}
